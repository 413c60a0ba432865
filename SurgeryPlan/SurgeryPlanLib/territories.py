"""Vascular territories: each organ voxel belongs to the vessel branch nearest to it, so removing the branch that
feeds a tumour removes its territory (a Couinaud-like segmentation when the portal vein is given).

The vessel's centreline is traced through its voxels (TEASAR, see ``_centreline``) and moved to sub-voxel positions,
hung from the root where the vessel enters the organ, and split into branches at bifurcations. Territories are the
subtrees rooted at one branch generation; every organ voxel goes to the subtree whose centreline is nearest
(Euclidean, mm, exact on anisotropic grids). Masks are uint8 SimpleITK images on one CT grid, LPS geometry; label
maps carve the vessels out of the organ, so a centreline within its radius of the organ counts as in it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage, sparse
from scipy.sparse import csgraph
from scipy.spatial import cKDTree

from RecognitionCore.errors import InputError
from RecognitionCore.preprocessing import check_same_grid, three_numbers
from RecognitionCore.progress import Progress, as_progress
from SurgeryPlanLib.geometry import (_FACE_NEIGHBOURS, _boundary_zyx, _box_zyx, _index_zyx_to_lps,
                                     _mask_array, _organ_region, _spacing_zyx, _to_mask_image, _voxel_volume_ml)

MAX_TERRITORIES = 255  # the labels are uint8
_SMOOTHING_HALF_WINDOW = 2  # centreline points averaged on each side (branch lengths, directions at bifurcations)
_ASSIGN_CHUNK_VOXELS = 500_000  # organ voxels per nearest-branch query, between progress reports
_CLAIM_SCALE = 1.5  # a centreline voxel claims the vessel within this many local radii (+ one voxel diagonal)
_CENTRING_POWER = 6  # path cost per mm ~ radius ** -power: steep enough to keep a path in the lumen's middle
_MEAN_SHIFT_STEPS = 3  # moves of a bifurcation towards the centroid of the vessel around it
_SEED_SKIP_RADII = 2.0  # a branch attracts organ voxels from this many parent radii beyond its bifurcation
# One offset of each opposite pair of the 26 neighbours, so each centreline edge is listed once.
_HALF_NEIGHBOURHOOD = np.array([offset for offset in np.ndindex(3, 3, 3) if offset > (1, 1, 1)]) - 1


@dataclass
class Branch:
    """A vessel segment between bifurcations (or from the root / to a tip), in LPS mm."""

    id: int  # 1..N, breadth first from the root
    parent_id: int  # 0 for the root
    generation: int  # 0 = the root segment before the first bifurcation
    length_mm: float  # along the centreline from the bifurcation (or the root) to the branch's last voxel
    mean_radius_mm: float
    start_lps_mm: Tuple[float, float, float]  # the bifurcation it leaves (the root point for the root)
    end_lps_mm: Tuple[float, float, float]
    voxel_count: int  # centreline voxels
    child_ids: Tuple[int, ...] = ()
    # (N, 3) smoothed centreline from start to end (the start, a bifurcation, belongs to the parent)
    centreline_lps_mm: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)), repr=False)


@dataclass
class VesselTree:
    branches: List[Branch]
    skeleton: sitk.Image  # uint16 on the vessel grid, value = branch id
    root_lps_mm: Tuple[float, float, float]

    def branch(self, branch_id: int) -> Branch:
        return self.branches[branch_id - 1]

    def subtree_ids(self, branch_id: int) -> List[int]:
        """The branch and all its descendants, sorted."""
        ids, pending = [], [branch_id]
        while pending:
            current = pending.pop()
            ids.append(current)
            pending.extend(self.branch(current).child_ids)
        return sorted(ids)


@dataclass
class Territory:
    id: int  # the value in ``Territories.labels``
    branch_ids: List[int]  # the supplying branch and its descendants
    volume_ml: float
    supplying_branch_id: int


@dataclass
class Territories:
    labels: sitk.Image  # uint8 on the organ grid: 0 outside the organ, k inside territory k
    territories: List[Territory]
    tree: VesselTree
    generation: int = 0


# ---------------------------------------------------------------------------------------------------------------------
# Centreline graph


@dataclass
class _Centreline:
    """Centreline voxels of one connected vessel: full-grid (z, y, x) indices and sub-voxel positions, the tree of
    their links (a sparse symmetric graph, edge weights in mm) and the vessel radius at each voxel."""

    zyx: np.ndarray
    centre_zyx: np.ndarray  # sub-voxel (continuous index) position of each
    graph: sparse.csr_matrix
    radius_mm: np.ndarray


def _neighbour_graph(zyx: np.ndarray, shape: Sequence[int], spacing: np.ndarray) -> sparse.csr_matrix:
    """Symmetric graph of the 26-neighbour pairs among voxels (indices strictly inside ``shape``), weights in mm."""
    lookup = np.full(shape, -1, dtype=np.int32)
    lookup[tuple(zyx.T)] = np.arange(len(zyx))
    rows, columns, weights = [], [], []
    for offset in _HALF_NEIGHBOURHOOD:
        neighbours = lookup[tuple((zyx + offset).T)]
        linked = neighbours >= 0
        rows.append(np.flatnonzero(linked))
        columns.append(neighbours[linked])
        weights.append(np.full(int(linked.sum()), float(np.linalg.norm(offset * spacing))))
    return _symmetric_graph(np.concatenate(rows), np.concatenate(columns), np.concatenate(weights), len(zyx))


def _symmetric_graph(rows: np.ndarray, columns: np.ndarray, weights: np.ndarray, size: int) -> sparse.csr_matrix:
    graph = sparse.coo_matrix((weights, (rows, columns)), shape=(size, size))
    return (graph + graph.T).tocsr()


def _radii_mm(inside: np.ndarray, points_zyx: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Vessel radius at inside voxels: the distance to the nearest outside voxel centre (the vessel's distance map).
    On a centreline voxel it is about unbiased: the outside centre lies up to a voxel beyond the wall, the centreline
    voxel itself up to half a voxel off the axis. The nearest outside voxel always has a face neighbour inside, so
    only that shell is searched."""
    shell = np.argwhere(ndimage.binary_dilation(inside, _FACE_NEIGHBOURS) & ~inside)
    return cKDTree(shell * spacing).query(points_zyx * spacing)[0]


def _vessel_component(vessel_values: np.ndarray, organ_values: Optional[np.ndarray]) -> np.ndarray:
    """(N, 3) voxels of the largest 26-connected part of the vessel (with an organ: the largest touching it)."""
    box = _box_zyx(vessel_values, (1, 1, 1))
    parts, _ = ndimage.label(vessel_values[box], np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(parts.ravel())
    sizes[0] = 0
    if organ_values is not None:
        touching = np.zeros(len(sizes), dtype=bool)
        touching[parts[ndimage.binary_dilation(organ_values[box], _FACE_NEIGHBOURS)]] = True
        sizes[~touching] = 0
    return np.argwhere(parts == int(np.argmax(sizes))) + np.array([s.start for s in box])


def _link_to_line(voxel: int, parent: np.ndarray, points_mm: np.ndarray, graph: sparse.csr_matrix
                  ) -> Tuple[List[int], int]:
    """How a traced path that reached a claimed voxel joins the centreline: the shortest way through the vessel
    towards the nearest centreline voxel, up to the first centreline voxel on it (paths in an evenly thick vessel
    may otherwise run side by side to the root). Returns the voxels before the join and the join (-1 for the first
    path, which ends at the root)."""
    if voxel < 0:
        return [], -1
    on_line = np.flatnonzero(parent != -2)
    gaps_mm = np.linalg.norm(points_mm[on_line] - points_mm[voxel], axis=1)
    nearest = int(on_line[np.argmin(gaps_mm)])
    _, predecessor = csgraph.dijkstra(graph, indices=nearest, return_predecessors=True,
                                      limit=3.0 * float(gaps_mm.min()) + 1e-6)
    link = []
    while voxel >= 0 and parent[voxel] == -2:
        link.append(voxel)
        voxel = int(predecessor[voxel])
    return (link, voxel) if voxel >= 0 else ([], nearest)


def _recentred_zyx(line: np.ndarray, tree: sparse.csr_matrix, local: np.ndarray, spacing: np.ndarray,
                   search: cKDTree, reach_mm: np.ndarray) -> np.ndarray:
    """Sub-voxel centreline, so an evenly thick vessel's centreline lies on its axis, not half a voxel beside it:
    each centreline voxel moves to the centroid of the vessel's cross-section through it (the vessel voxels within
    ``reach_mm`` and within half the largest spacing of the plane normal to the centreline), and each bifurcation to
    the centroid of the vessel within ``reach_mm`` of it, found by a few mean-shift steps."""
    points_mm = local[line] * spacing
    degree = np.diff(tree.indptr)
    centres_mm = points_mm.copy()
    for n in range(len(line)):
        neighbours = tree.indices[tree.indptr[n]:tree.indptr[n + 1]]
        if degree[n] > 2:
            for _ in range(_MEAN_SHIFT_STEPS):
                centres_mm[n] = search.data[search.query_ball_point(centres_mm[n], reach_mm[n])].mean(axis=0)
            continue
        ends = points_mm[neighbours] if degree[n] == 2 else np.vstack([points_mm[n], points_mm[neighbours]])
        direction = ends[-1] - ends[0]
        if not np.any(direction):
            continue
        direction /= np.linalg.norm(direction)
        section = search.data[search.query_ball_point(points_mm[n], reach_mm[n])]
        section = section[np.abs((section - points_mm[n]) @ direction) <= 0.5 * float(spacing.max())]
        centres_mm[n] = section.mean(axis=0)
    return centres_mm / spacing


def _centreline(vessel_values: np.ndarray, spacing: np.ndarray, organ_values: Optional[np.ndarray],
                progress: Progress) -> _Centreline:
    """Centreline tree of the largest connected part of the vessel, by TEASAR (Sato et al. 2000): from one far end
    of the vessel, repeatedly trace the path to the farthest voxel not yet claimed, along a cost that keeps paths
    near the vessel's middle, until each path's neighbourhood (1.5 x the local radius + one voxel diagonal) has
    claimed every voxel. A path ends where it reaches a claimed voxel, linked to the nearest centreline voxel.
    Unlike 3D thinning it never loses a straight, evenly thick vessel (skimage's ``skeletonize`` removes a 2 x 2
    voxel tube entirely, scikit-image issue 3757), and it yields a tree (no loops where vessels touch)."""
    zyx = _vessel_component(vessel_values, organ_values)
    low = zyx.min(axis=0) - 1
    local = zyx - low
    inside = np.zeros(tuple(zyx.max(axis=0) + 2 - low), dtype=bool)
    inside[tuple(local.T)] = True
    graph = _neighbour_graph(local, inside.shape, spacing)
    radius = _radii_mm(inside, local, spacing)
    points_mm = local * spacing
    far_end = int(np.argmax(csgraph.dijkstra(graph, indices=int(np.argmax(radius)))))
    from_far_end = csgraph.dijkstra(graph, indices=far_end)
    # Path cost per mm: a steep inverse power of the radius, blurred by a voxel so that the flat top of the distance
    # map across a vessel only a few (anisotropic) voxels thick still peaks in its middle.
    blurred = np.zeros(inside.shape, dtype=np.float32)
    blurred[tuple(local.T)] = radius
    centrality = ndimage.gaussian_filter(blurred, sigma=1.0)[tuple(local.T)].astype(float)
    penalty = (centrality.max() / centrality) ** _CENTRING_POWER
    weighted = graph.tocoo()
    weighted.data = weighted.data * 0.5 * (penalty[weighted.row] + penalty[weighted.col])
    _, predecessor = csgraph.dijkstra(weighted.tocsr(), indices=far_end, return_predecessors=True)
    search = cKDTree(points_mm)
    claim_mm = _CLAIM_SCALE * radius + float(np.linalg.norm(spacing))
    claimed = np.zeros(len(zyx), dtype=bool)
    parent = np.full(len(zyx), -2)  # -2: not on the centreline, -1: its far end
    paths = 0
    while not claimed.all():
        voxel = int(np.argmax(np.where(claimed, -1.0, from_far_end)))
        path = []
        while voxel >= 0 and not claimed[voxel]:
            path.append(voxel)
            voxel = int(predecessor[voxel])
        link, join = _link_to_line(voxel, parent, points_mm, graph)
        parent[path + link] = path[1:] + link + [join]
        for near in search.query_ball_point(points_mm[path], claim_mm[path]):
            claimed[near] = True
        paths += 1
        if paths % 64 == 0:
            progress.report(float(claimed.mean()), "Tracing the vessel centreline")
    on_line = np.flatnonzero(parent != -2)
    index = np.full(len(zyx), -1)
    index[on_line] = np.arange(len(on_line))
    linked = on_line[parent[on_line] >= 0]
    steps_mm = np.linalg.norm((zyx[linked] - zyx[parent[linked]]) * spacing, axis=1)  # a join may skip voxels
    tree = _symmetric_graph(index[linked], index[parent[linked]], steps_mm, len(on_line))
    centres = _recentred_zyx(on_line, tree, local, spacing, search, claim_mm[on_line]) + low
    return _Centreline(zyx[on_line], centres, tree, radius[on_line])


# ---------------------------------------------------------------------------------------------------------------------
# Rooted branch tree


class _Node:
    """A branch while the tree is being simplified: centreline voxel indices from the bifurcation outwards."""

    def __init__(self, start: int, parent: Optional["_Node"]) -> None:
        self.start = start  # the voxel it leaves from: the parent's bifurcation, or the root voxel itself
        self.voxels: List[int] = []
        self.parent = parent
        self.children: List["_Node"] = []


def _rooted_nodes(graph: sparse.csr_matrix, root: int) -> Tuple[_Node, np.ndarray]:
    """The centreline tree hung from ``root``, split into nodes at voxels with several children; also each voxel's
    distance from the root along the centreline (mm)."""
    distance, predecessor = csgraph.dijkstra(graph, indices=root, return_predecessors=True)
    child_counts = np.bincount(predecessor[predecessor >= 0], minlength=len(distance))
    node_of: Dict[int, _Node] = {}
    top = _Node(root, None)
    for voxel in np.argsort(distance, kind="stable"):
        parent_voxel = int(predecessor[voxel])
        if parent_voxel < 0:
            node = top
        elif child_counts[parent_voxel] == 1:
            node = node_of[parent_voxel]
        else:
            node = _Node(parent_voxel, node_of[parent_voxel])
            node.parent.children.append(node)
        node.voxels.append(int(voxel))
        node_of[int(voxel)] = node
    return top, distance


def _walk(top: _Node) -> List[_Node]:
    """Nodes breadth first from ``top``."""
    nodes, pending = [], deque([top])
    while pending:
        node = pending.popleft()
        nodes.append(node)
        pending.extend(node.children)
    return nodes


def _drop_outside_subtrees(top: _Node, in_organ: np.ndarray) -> None:
    """Remove the subtrees with no centreline voxel in the organ (e.g. the splenic vein beside a portal vein)."""
    reaches_organ: Dict[int, bool] = {}
    for node in reversed(_walk(top)):
        reaches_organ[id(node)] = bool(in_organ[node.voxels].any()) or any(reaches_organ[id(c)] for c in node.children)
    for node in _walk(top):
        node.children = [child for child in node.children if reaches_organ[id(child)]]


def _trim_free_ends(top: _Node, line: _Centreline, spacing: np.ndarray, trim_root: bool) -> None:
    """Shorten each free end to the centre of the vessel's end: a traced path ends on the vessel's wall, about one
    radius beyond the end of its centreline. The new end is the innermost voxel whose ball (its radius, + half a
    voxel diagonal as the end voxel's centre lies up to that far inside the wall) still holds the end voxel; the
    voxels before it are dropped."""
    slack_mm = 0.5 * float(np.linalg.norm(spacing))

    def kept(voxels: List[int]) -> int:
        reach_mm = np.linalg.norm((line.zyx[voxels] - line.zyx[voxels[0]]) * spacing, axis=1)
        return int(np.flatnonzero(reach_mm <= line.radius_mm[voxels] + slack_mm)[-1])

    for node in _walk(top):
        if not node.children:
            node.voxels = node.voxels[:len(node.voxels) - kept(node.voxels[::-1])]
    if trim_root:
        top.voxels = top.voxels[kept(top.voxels):]
        top.start = top.voxels[0]


def _absorb(node: _Node, child: _Node) -> None:
    """Append a child's voxels to the node and hand its children over (the child disappears)."""
    node.voxels.extend(child.voxels)
    node.children.remove(child)
    node.children.extend(child.children)
    for grandchild in child.children:
        grandchild.parent = node


def _simplify(top: _Node, distance: np.ndarray, min_length_mm: float) -> None:
    """Until stable: prune terminal spurs shorter than ``min_length_mm``, join a branch with its only child, and
    fold internal segments shorter than that into their parent (a skeleton's junction clusters and near-
    trifurcations become one bifurcation)."""

    def length(node: _Node) -> float:
        return float(distance[node.voxels[-1]] - distance[node.start])

    changed = True
    while changed:
        changed = False
        for node in _walk(top):
            spurs = [c for c in node.children if not c.children and length(c) < min_length_mm]
            if spurs:
                node.children = [c for c in node.children if c not in spurs]
                changed = True
        for node in _walk(top):
            while len(node.children) == 1:
                _absorb(node, node.children[0])
                changed = True
        for node in _walk(top)[1:]:
            if node.children and length(node) < min_length_mm and node.parent is not None:
                _absorb(node.parent, node)
                changed = True
                break  # the walk is stale once a node is folded


def _smoothed_path(points_mm: np.ndarray) -> np.ndarray:
    """A voxel path after a short moving average (windows shrink towards the ends, which stay fixed), so that a
    straight oblique vessel is neither lengthened by the staircase of its voxels nor bent at a bifurcation."""
    count = len(points_mm)
    index = np.arange(count)
    half = np.minimum(np.minimum(index, count - 1 - index), _SMOOTHING_HALF_WINDOW)
    cumulative = np.vstack([np.zeros((1, 3)), np.cumsum(points_mm, axis=0)])
    return (cumulative[index + half + 1] - cumulative[index - half]) / (2 * half + 1)[:, None]


def _node_points(node: _Node) -> List[int]:
    return node.voxels if node.start == node.voxels[0] else [node.start] + node.voxels


# ---------------------------------------------------------------------------------------------------------------------
# Root


def _tips(graph: sparse.csr_matrix, min_length_mm: float) -> Tuple[List[int], List[_Node]]:
    """End voxels of the centreline once spurs are pruned, each with its terminal branch. The tree is rooted at a
    far end of the centreline (the end of a longest path, never a spur), which counts as a tip too."""
    distance = csgraph.dijkstra(graph, indices=0)
    far_end = int(np.argmax(np.where(np.isfinite(distance), distance, -1.0)))
    top, distance = _rooted_nodes(graph, far_end)
    _simplify(top, distance, min_length_mm)
    leaves = [node for node in _walk(top) if not node.children and node is not top]
    return [far_end] + [node.voxels[-1] for node in leaves], [top] + leaves


def _organ_contact(line: _Centreline, organ_values: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Centreline voxels in the organ: inside its mask or within their vessel radius (+ one voxel diagonal) of it,
    so a vessel carved out of the organ's label, as label maps store them, still counts as in the organ."""
    distance_mm, _ = cKDTree(_boundary_zyx(organ_values) * spacing).query(line.zyx * spacing)
    inside = organ_values[tuple(line.zyx.T)]
    return inside | (distance_mm <= line.radius_mm + float(np.linalg.norm(spacing)))


def _default_root(line: _Centreline, spacing: np.ndarray, vessel_values: np.ndarray,
                  organ_values: Optional[np.ndarray], in_organ: Optional[np.ndarray], min_length_mm: float) -> int:
    """Where the vessel enters the organ: the thickest tip (mean radius of its terminal branch) outside the organ;
    when every tip is in it, the thickest of those at the surface of organ and vessel together (within radius + one
    voxel diagonal), or else the tip nearest that surface. Without an organ, the thickest tip."""
    tips, nodes = _tips(line.graph, min_length_mm)
    radius = np.array([line.radius_mm[node.voxels].mean() for node in nodes])
    candidates = np.arange(len(tips))
    if organ_values is not None and not in_organ[tips].all():
        candidates = np.flatnonzero(~in_organ[tips])
    elif organ_values is not None:
        surface = cKDTree(_boundary_zyx(organ_values | vessel_values) * spacing)
        depth_mm, _ = surface.query(line.zyx[tips] * spacing)
        at_surface = depth_mm <= radius + float(np.linalg.norm(spacing))
        candidates = np.flatnonzero(at_surface) if at_surface.any() else np.flatnonzero(depth_mm == depth_mm.min())
    return tips[int(candidates[np.argmax(radius[candidates])])]


# ---------------------------------------------------------------------------------------------------------------------
# Public API


def _checked_inputs(vessel: sitk.Image, organ: Optional[sitk.Image]) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(vessel, organ) arrays; InputError for empty or non-3D masks, another grid, or a vessel off the organ."""
    vessel_values = _mask_array(vessel, "vessel")
    if organ is None:
        return vessel_values, None
    organ_values = _mask_array(organ, "organ")
    check_same_grid(organ, vessel, "vessel mask")
    box = _box_zyx(vessel_values, (1, 1, 1))
    if not (ndimage.binary_dilation(vessel_values[box], _FACE_NEIGHBOURS) & organ_values[box]).any():
        raise InputError("the vessel does not touch the organ (no vessel voxel inside or beside the organ mask)")
    return vessel_values, organ_values


def vessel_tree(vessel: sitk.Image, organ: Optional[sitk.Image] = None, root_lps_mm=None,
                min_branch_length_mm: float = 5.0, progress: Optional[Progress] = None) -> VesselTree:
    """The vessel's centreline as a tree of branches, rooted where it enters the organ.

    The largest 26-connected part of the vessel is kept (with an organ: the largest touching it). The root is the
    centreline voxel nearest ``root_lps_mm`` or, by default, the thickest end outside the organ (when every end is in
    it, the thickest at its surface; without an organ, the thickest end). Terminal spurs shorter than
    ``min_branch_length_mm`` are pruned and internal segments shorter than that are folded into their parent's
    bifurcation; with an organ, side trees that never reach it (e.g. the splenic vein beside the portal vein) are
    removed. A root inside a vessel (not at an end) makes both directions generation-1 branches.
    """
    vessel_values, organ_values = _checked_inputs(vessel, organ)
    return _vessel_tree(vessel, vessel_values, organ_values, root_lps_mm, min_branch_length_mm, as_progress(progress))


def _vessel_tree(vessel: sitk.Image, vessel_values: np.ndarray, organ_values: Optional[np.ndarray], root_lps_mm,
                 min_branch_length_mm: float, progress: Progress) -> VesselTree:
    if not min_branch_length_mm >= 0:
        raise InputError(f"min_branch_length_mm must be >= 0 (got {min_branch_length_mm})")
    if root_lps_mm is not None:
        root_lps_mm = three_numbers(root_lps_mm, "root_lps_mm")
    spacing = _spacing_zyx(vessel)
    progress.report(0.0, "Tracing the vessel centreline")
    line = _centreline(vessel_values, spacing, organ_values, progress.sub(0.0, 0.8))
    progress.report(0.8, "Splitting the centreline into branches")
    in_organ = None if organ_values is None else _organ_contact(line, organ_values, spacing)
    if root_lps_mm is not None:
        root = int(np.argmin(np.linalg.norm(_index_zyx_to_lps(vessel, line.zyx) - root_lps_mm, axis=1)))
    else:
        root = _default_root(line, spacing, vessel_values, organ_values, in_organ, min_branch_length_mm)
    top, distance = _rooted_nodes(line.graph, root)
    _trim_free_ends(top, line, spacing, trim_root=root_lps_mm is None)
    if in_organ is not None:
        _drop_outside_subtrees(top, in_organ)
    _simplify(top, distance, min_branch_length_mm)
    tree = _as_vessel_tree(top, line, vessel)
    progress.report(1.0, f"Vessel tree: {len(tree.branches)} branches")
    return tree


def _as_vessel_tree(top: _Node, line: _Centreline, vessel: sitk.Image) -> VesselTree:
    """Numbered branches (breadth first, longer sibling first) and the uint16 skeleton image of their ids."""
    points_lps = _index_zyx_to_lps(vessel, line.centre_zyx)
    paths = {id(node): _smoothed_path(points_lps[_node_points(node)]) for node in _walk(top)}
    lengths = {key: float(np.linalg.norm(np.diff(path, axis=0), axis=1).sum()) for key, path in paths.items()}
    for node in _walk(top):
        node.children.sort(key=lambda child: -lengths[id(child)])
    nodes = _walk(top)
    number = {id(node): n + 1 for n, node in enumerate(nodes)}
    generation = {id(top): 0}
    skeleton = np.zeros(vessel.GetSize()[::-1], dtype=np.uint16)
    branches = []
    for node in nodes:
        if node.parent is not None:
            generation[id(node)] = generation[id(node.parent)] + 1
        skeleton[tuple(line.zyx[node.voxels].T)] = number[id(node)]
        branches.append(Branch(
            id=number[id(node)], parent_id=number[id(node.parent)] if node.parent is not None else 0,
            generation=generation[id(node)], length_mm=lengths[id(node)],
            mean_radius_mm=float(line.radius_mm[node.voxels].mean()),
            start_lps_mm=tuple(float(v) for v in points_lps[node.start]),
            end_lps_mm=tuple(float(v) for v in points_lps[node.voxels[-1]]),
            voxel_count=len(node.voxels), child_ids=tuple(number[id(child)] for child in node.children),
            centreline_lps_mm=paths[id(node)]))
    image = sitk.GetImageFromArray(skeleton)
    image.CopyInformation(vessel)
    return VesselTree(branches, image, tuple(float(v) for v in points_lps[top.voxels[0]]))


def _territory_seeds(tree: VesselTree, territories: Sequence[Territory]) -> Tuple[np.ndarray, np.ndarray]:
    """Smoothed centreline points (LPS mm) of the territories' subtrees and the territory id of each. Ancestors are
    left out, and so is the part of each branch inside the lumen it leaves, so that the split behind a bifurcation
    follows the directions in which the branches leave it."""
    points, ids = [], []
    for territory in territories:
        for branch_id in territory.branch_ids:
            branch = tree.branch(branch_id)
            own = branch.centreline_lps_mm
            if branch.parent_id:
                own = _beyond(own, _SEED_SKIP_RADII * tree.branch(branch.parent_id).mean_radius_mm)
            points.append(own)
            ids.append(np.full(len(own), territory.id, dtype=np.uint8))
    return np.concatenate(points), np.concatenate(ids)


def _beyond(path_mm: np.ndarray, distance_mm: float) -> np.ndarray:
    """The part of a path farther than ``distance_mm`` from its start, beginning with the point where the path
    crosses that distance (interpolated, so sibling branches start equally far from their bifurcation); the last
    point for a path that never gets so far."""
    reach = np.linalg.norm(path_mm - path_mm[0], axis=1)
    outside = np.flatnonzero(reach > distance_mm)
    if len(outside) == 0:
        return path_mm[-1:]
    first = int(outside[0])
    before, after = path_mm[first - 1], path_mm[first]
    fraction = (distance_mm - reach[first - 1]) / (reach[first] - reach[first - 1])
    return np.vstack([before + fraction * (after - before), path_mm[first:]])


def _nearest_territory(seed_lps: np.ndarray, seed_ids: np.ndarray, image: sitk.Image, points_zyx: np.ndarray,
                       progress: Progress) -> np.ndarray:
    """Territory id of the seed nearest to each voxel centre (Euclidean, mm), in chunks that report progress. The
    search runs in the grid's own axes scaled to mm (a rotation of LPS), so the voxels need no transform."""
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    seeds_zyx_mm = ((seed_lps - np.array(image.GetOrigin())) @ direction)[:, ::-1]
    search = cKDTree(seeds_zyx_mm)
    spacing = _spacing_zyx(image)
    result = np.empty(len(points_zyx), dtype=np.uint8)
    for start in range(0, len(points_zyx), _ASSIGN_CHUNK_VOXELS):
        progress.report(start / max(len(points_zyx), 1), "Assigning organ voxels to the nearest vessel branch")
        chunk = slice(start, start + _ASSIGN_CHUNK_VOXELS)
        result[chunk] = seed_ids[search.query(points_zyx[chunk] * spacing, workers=-1)[1]]
    return result


def vascular_territories(organ: sitk.Image, vessel: sitk.Image, generation: int = 2, root_lps_mm=None,
                         min_branch_length_mm: float = 5.0, progress: Optional[Progress] = None) -> Territories:
    """The organ split into the territories of the vessel's subtrees rooted at ``generation``.

    Each branch of that generation, and each terminal branch of a lower one (no descendant reaches it), with its
    descendants is one territory; every organ voxel goes to the territory whose centreline voxel is nearest (mm).
    Ancestor branches attract no voxels. Territory k has value k in ``labels`` (k = 1.. in branch order).
    """
    progress = as_progress(progress)
    if isinstance(generation, bool) or not isinstance(generation, (int, np.integer)) or generation < 0:
        raise InputError(f"the branch generation must be an integer >= 0 (got {generation!r})")
    vessel_values, organ_values = _checked_inputs(vessel, organ)
    tree = _vessel_tree(vessel, vessel_values, organ_values, root_lps_mm, min_branch_length_mm, progress.sub(0.0, 0.5))
    if generation >= 1 and len(tree.branches) == 1:
        raise InputError(f"the vessel does not branch: its centreline ({tree.branches[0].length_mm:.0f} mm) has no "
                         f"bifurcation with branches of {min_branch_length_mm:g} mm or more; use generation 0 or a "
                         f"smaller minimum branch length")
    supplying = [branch for branch in tree.branches
                 if branch.generation == generation or (branch.generation < generation and not branch.child_ids)]
    if len(supplying) > MAX_TERRITORIES:
        raise InputError(f"generation {generation} gives {len(supplying)} territories (at most {MAX_TERRITORIES}); "
                         f"choose a lower generation")
    territories = [Territory(k + 1, tree.subtree_ids(branch.id), 0.0, branch.id) for k, branch in enumerate(supplying)]
    seed_lps, seed_ids = _territory_seeds(tree, territories)
    box = _box_zyx(organ_values)
    organ_zyx = np.argwhere(organ_values[box]) + np.array([s.start for s in box])
    assigned = _nearest_territory(seed_lps, seed_ids, organ, organ_zyx, progress.sub(0.5, 1.0))
    labels = np.zeros(organ_values.shape, dtype=np.uint8)
    labels[tuple(organ_zyx.T)] = assigned
    counts = np.bincount(assigned, minlength=len(territories) + 1)
    for territory in territories:
        territory.volume_ml = float(counts[territory.id]) * _voxel_volume_ml(organ)
    progress.report(1.0, f"{len(territories)} vascular territories")
    return Territories(_to_mask_image(labels, organ), territories, tree, generation)


def feeding_territories(territories: Territories, tumour: sitk.Image) -> Tuple[List[int], sitk.Image]:
    """The territories that feed a tumour and the resection that removes them with it.

    Returns the ids of the territories holding tumour voxels, most tumour voxels first, and the uint8 mask of their
    union with the tumour (the organ including the tumour, clipped to it). A tumour segmented as its own label, carved
    out of the organ, is assigned by the same nearest-branch rule; it must overlap or touch the organ.
    """
    labels = territories.labels
    organ = _to_mask_image(sitk.GetArrayViewFromImage(labels) != 0, labels)
    tumour_values, _ = _organ_region(tumour, organ)
    seed_lps, seed_ids = _territory_seeds(territories.tree, territories.territories)
    tumour_territories = _nearest_territory(seed_lps, seed_ids, labels, np.argwhere(tumour_values), as_progress(None))
    counts = np.bincount(tumour_territories, minlength=len(territories.territories) + 1)
    feeding = sorted((int(k) for k in np.flatnonzero(counts)), key=lambda k: (-counts[k], k))
    resected = np.isin(sitk.GetArrayViewFromImage(labels), feeding) | tumour_values
    return feeding, _to_mask_image(resected, labels)
