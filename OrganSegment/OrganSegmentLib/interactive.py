"""Interactive organ segmentation on CT: a HU threshold, region growing from seed points, and "grow from seeds"
(GrowCut) from painted scribbles.

All three take a SimpleITK CT in HU and return uint8 label images on the input grid (same size, spacing, origin and
direction). Seed points are physical LPS millimetres (the module's Logic converts markups from RAS); scribbles are a
label image on the CT's grid (segments painted in Slicer, one value per segment).

How they stay fast on a 512 x 512 x 300 CT: region growing and grow from seeds work on a box of the CT (the seeds'
reach) block-averaged to a working spacing of a few millimetres, where the organ is found; the boundary is then
redrawn at full resolution, only within one working voxel of the working-grid boundary (by the HU interval for region
growing, by a second, local grow-from-seeds pass for GrowCut). Every step is a compiled filter (SimpleITK, SciPy):
no Python loop visits voxels.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage, sparse
from scipy.sparse.csgraph import dijkstra

from RecognitionCore.errors import InputError
from RecognitionCore.preprocessing import BoundingBox, check_same_grid, replace_padding, validate_ct
from RecognitionCore.progress import Progress, as_progress

from .postprocess import bounding_box_slices, gaussian_mm, holes_filled_array

Point = Sequence[float]

BODY_THRESHOLD_HU = -500.0  # air below this that reaches the border of its slice is outside the patient
MIN_SLICES = 2  # thin stacks (a few slices around a lesion) are fine for interactive work

SMOOTHING_METHODS = ("curvature_flow", "median", "gaussian", "none")
REGION_GROW_WORKING_SPACING_MM = 2.5
GROW_CUT_WORKING_SPACING_MM = 2.5
GROW_CUT_MAX_WORKING_VOXELS = 1_200_000  # the working spacing is coarsened until the box fits
STEP_COST_HU = 1e-3  # added to every step of a GrowCut path: ties go to the nearer seed, no free paths
CURVATURE_FLOW_STEP = 0.0625
CURVATURE_FLOW_ITERATIONS = 5
MIN_STANDARD_DEVIATION_HU = 1.0  # a flat seed neighbourhood still gives an interval
MIN_OPENING_VOXELS = 3.0  # region growing's working spacing is at most a third of the opening radius


@dataclass
class GrowCutResult:
    """What ``grow_from_seeds`` made: ``labels`` (uint8, input grid, 0 outside ``box``), the ``seeds`` it grew from
    (the scribbles, merged with those of a previous run), the ``box`` of input voxels it covered (seeds' box plus the
    margin), the working spacing of its first pass and the time it took."""

    labels: sitk.Image
    seeds: sitk.Image
    box: BoundingBox
    working_spacing_mm: Tuple[float, float, float]
    seconds: float


# ---------------------------------------------------------------------------------------------------------------------
# Threshold


def threshold_segment(image: sitk.Image, lower_hu: float, upper_hu: float,
                      seeds_lps_mm: Optional[Sequence[Point]] = None) -> sitk.Image:
    """Voxels with ``lower_hu <= HU <= upper_hu``; with seeds, only the face-connected components holding a seed."""
    _validate(image)
    lower_hu, upper_hu = _hu_range(lower_hu, upper_hu)
    mask = sitk.BinaryThreshold(image, lower_hu, upper_hu, 1, 0)
    if seeds_lps_mm is None:
        return mask
    indices = _seed_indices(image, seeds_lps_mm)
    hu = sitk.GetArrayViewFromImage(image)
    _check_inside_body(hu, indices, seeds_lps_mm)
    for number, index in enumerate(indices, start=1):
        value = float(hu[tuple(index)])
        if not lower_hu <= value <= upper_hu:
            raise InputError(f"seed {number} at {_format_point(seeds_lps_mm[number - 1])} is {value:g} HU, outside "
                             f"the threshold range {lower_hu:g}..{upper_hu:g} HU")
    components = sitk.GetArrayFromImage(sitk.ConnectedComponent(mask, False))
    return _mask_like(_select_labels(components, [components[tuple(index)] for index in indices]), image)


# ---------------------------------------------------------------------------------------------------------------------
# Region growing


def region_grow(image: sitk.Image, seeds_lps_mm: Sequence[Point], multiplier: float = 3.0, iterations: int = 2,
                initial_radius_mm: float = 2.0, max_distance_mm: Optional[float] = None,
                smoothing: str = "curvature_flow", opening_radius_mm: float = 9.0, fill_holes: bool = True,
                working_spacing_mm: float = REGION_GROW_WORKING_SPACING_MM,
                progress: Optional[Progress] = None) -> sitk.Image:
    """Confidence-connected region growing from one or more seed points, made robust for organs.

    As ``sitk.ConfidenceConnected``: the HU interval is mean +- ``multiplier`` standard deviations of the voxels
    within ``initial_radius_mm`` of the seeds, the region is what the interval connects to the seeds, and the
    interval is re-estimated from the region ``iterations`` times. Organs touch neighbours of the same density (the
    liver its veins, the diaphragm, muscle), so plain growing leaks; here the image is smoothed first
    (``smoothing``: one of ``SMOOTHING_METHODS``), the interval mask gets its holes filled, and it is opened by a ball
    of ``opening_radius_mm`` before the region is taken (bridges narrower than the ball are cut; the radius shrinks
    to 0.8 times the depth of the shallowest seed so no seed is lost; 0 turns the opening off). The region's holes
    are filled when ``fill_holes``. ``max_distance_mm`` limits the region to that distance from the nearest seed.

    Works at ``working_spacing_mm`` (a block average of the CT; no change for coarser CTs; at most a third of the
    opening radius), then redraws the boundary at full resolution by the final interval. Seeds outside the image or
    in the air around the patient raise ``InputError``.
    """
    progress = as_progress(progress)
    _validate(image)
    _check_region_grow_parameters(multiplier, iterations, initial_radius_mm, max_distance_mm, smoothing,
                                  opening_radius_mm, working_spacing_mm)
    indices = _seed_indices(image, seeds_lps_mm)
    _check_inside_body(sitk.GetArrayViewFromImage(image), indices, seeds_lps_mm)
    progress.report(0.05, "Preparing the working grid")
    box = _seed_box(image, indices, max_distance_mm)
    if opening_radius_mm > 0:  # the opening cuts nothing with a ball of hardly more than one working voxel
        working_spacing_mm = min(working_spacing_mm, opening_radius_mm / MIN_OPENING_VOXELS)
    grid = _WorkingGrid(image, box, working_spacing_mm)
    smoothed_image = _smooth(grid.coarse, smoothing)
    smoothed = sitk.GetArrayFromImage(smoothed_image)
    seeds = grid.coarse_indices(indices)
    allowed = None if max_distance_mm is None else _near_seeds(smoothed.shape, grid.coarse_spacing_zyx, seeds,
                                                               max_distance_mm)
    mean, deviation = _seed_statistics(smoothed_image, seeds, multiplier, initial_radius_mm, grid.coarse_spacing_zyx)
    for iteration in range(iterations + 1):
        progress.report(0.1 + 0.6 * iteration / (iterations + 1), f"Growing the region (pass {iteration + 1})")
        interval = (mean - multiplier * deviation, mean + multiplier * deviation)
        candidate = (smoothed >= interval[0]) & (smoothed <= interval[1])
        if allowed is not None:
            candidate &= allowed
        if fill_holes:
            candidate = holes_filled_array(candidate)
        region = _opened_from_seeds(candidate, seeds, opening_radius_mm, grid.coarse_spacing_zyx)
        if not region.any():
            raise InputError(f"no region grows from the seeds within {interval[0]:.0f}..{interval[1]:.0f} HU: place "
                             "the seeds well inside the organ, or raise the multiplier")
        if iteration < iterations:
            values = smoothed[region]
            mean, deviation = float(values.mean()), max(float(values.std()), MIN_STANDARD_DEVIATION_HU)
    if fill_holes:
        region = holes_filled_array(region)
    progress.report(0.75, "Redrawing the boundary at full resolution")
    fine = grid.refine(region, lambda values: (values >= interval[0]) & (values <= interval[1]), indices)
    if fill_holes:
        fine = holes_filled_array(fine)
    if allowed is not None:
        fine &= _near_seeds(fine.shape, grid.fine_spacing_zyx, indices - grid.start, max_distance_mm)
    progress.report(1.0, "Region grown")
    return grid.paste(fine)


def _check_region_grow_parameters(multiplier, iterations, initial_radius_mm, max_distance_mm, smoothing,
                                  opening_radius_mm, working_spacing_mm) -> None:
    if not (math.isfinite(multiplier) and multiplier > 0):
        raise InputError(f"the multiplier must be a positive number (got {multiplier})")
    if int(iterations) != iterations or iterations < 0:
        raise InputError(f"iterations must be a whole number >= 0 (got {iterations})")
    if not (math.isfinite(initial_radius_mm) and initial_radius_mm >= 0):
        raise InputError(f"the initial radius must be >= 0 mm (got {initial_radius_mm})")
    if max_distance_mm is not None and not (math.isfinite(max_distance_mm) and max_distance_mm > 0):
        raise InputError(f"the maximum distance must be a positive number of mm (got {max_distance_mm})")
    if smoothing not in SMOOTHING_METHODS:
        raise InputError(f"unknown smoothing {smoothing!r} (expected one of {', '.join(SMOOTHING_METHODS)})")
    if not (math.isfinite(opening_radius_mm) and opening_radius_mm >= 0):
        raise InputError(f"the opening radius must be >= 0 mm (got {opening_radius_mm})")
    if not (math.isfinite(working_spacing_mm) and working_spacing_mm > 0):
        raise InputError(f"the working spacing must be positive (got {working_spacing_mm} mm)")


def _smooth(image: sitk.Image, method: str) -> sitk.Image:
    """Edge-preserving smoothing against noise (curvature flow, median 3x3x3) or a Gaussian of one voxel."""
    if method == "curvature_flow":
        return sitk.CurvatureFlow(image, timeStep=CURVATURE_FLOW_STEP, numberOfIterations=CURVATURE_FLOW_ITERATIONS)
    if method == "median":
        return sitk.Median(image, [1, 1, 1])
    if method == "gaussian":
        return gaussian_mm(image, float(min(image.GetSpacing())))
    return image


def _seed_statistics(image: sitk.Image, seeds: np.ndarray, multiplier: float, radius_mm: float,
                     spacing_zyx: np.ndarray) -> Tuple[float, float]:
    """Mean and standard deviation of the seeds' neighbourhoods, as ``sitk.ConfidenceConnected`` estimates them (its
    neighbourhood is a cube of ``radius_mm`` in voxels, at least one)."""
    grower = sitk.ConfidenceConnectedImageFilter()
    grower.SetSeedList([[int(v) for v in seed[::-1]] for seed in seeds])
    grower.SetMultiplier(float(multiplier))
    grower.SetNumberOfIterations(0)
    grower.SetInitialNeighborhoodRadius(max(1, int(round(radius_mm / float(spacing_zyx.min())))))
    grower.Execute(image)
    return float(grower.GetMean()), max(math.sqrt(max(grower.GetVariance(), 0.0)), MIN_STANDARD_DEVIATION_HU)


def _opened_from_seeds(candidate: np.ndarray, seeds: np.ndarray, radius_mm: float,
                       spacing_zyx: np.ndarray) -> np.ndarray:
    """The part of ``candidate`` connected to the seeds through passages at least ``2 * radius_mm`` wide: the
    components of the eroded mask that hold a seed, dilated back within ``candidate``."""
    inside = [tuple(seed) for seed in seeds if candidate[tuple(seed)]]
    if not inside:
        return np.zeros_like(candidate)
    if radius_mm > 0:
        depth_mm = ndimage.distance_transform_edt(candidate, sampling=spacing_zyx)
        radius_mm = min(radius_mm, 0.8 * min(float(depth_mm[seed]) for seed in inside))
    if radius_mm <= float(spacing_zyx.min()) / 2:
        return _components_holding(candidate, inside)
    core = _components_holding(depth_mm > radius_mm, inside)
    grown = ndimage.distance_transform_edt(~core, sampling=spacing_zyx) <= radius_mm * (1 + 1e-6)
    return _components_holding(grown & candidate, inside)


def _near_seeds(shape: Tuple[int, ...], spacing_zyx: np.ndarray, seeds: np.ndarray, distance_mm: float) -> np.ndarray:
    """Voxels of a (z, y, x) grid within ``distance_mm`` of the nearest seed (indices on that grid)."""
    points = np.zeros(shape, dtype=bool)
    inside = np.all((seeds >= 0) & (seeds < np.array(shape)), axis=1)
    points[tuple(seeds[inside].T)] = True
    return ndimage.distance_transform_edt(~points, sampling=spacing_zyx) <= distance_mm


# ---------------------------------------------------------------------------------------------------------------------
# Grow from seeds (GrowCut)


def grow_from_seeds(image: sitk.Image, seed_labels: sitk.Image, previous: Optional[GrowCutResult] = None, *,
                    margin_mm: float = 15.0, smoothing_mm: float = 2.0, fine_smoothing_mm: float = 1.0,
                    working_spacing_mm: float = GROW_CUT_WORKING_SPACING_MM,
                    progress: Optional[Progress] = None) -> GrowCutResult:
    """Competitive region growing from scribbles, like Slicer's "Grow from seeds" (``vtkImageGrowCutSegment``).

    Every voxel of the box around the scribbles (their bounding box plus ``margin_mm``) takes the label of the
    scribble it reaches most cheaply, the cost of a path being the sum of the HU differences between neighbouring
    voxels along it (6-connected): a label floods its homogeneous region and stops at edges, where another label
    arrives more cheaply. Exact shortest paths (Dijkstra, ``scipy.sparse.csgraph``) on the CT block-averaged to
    ``working_spacing_mm`` and Gaussian-smoothed by ``smoothing_mm``, then again at full resolution (Gaussian
    ``fine_smoothing_mm``) within one working voxel of the boundaries found, from the labels just outside that band.
    Voxels outside the box are 0. Needs scribbles of two labels or more (e.g. the organ and its surroundings).

    Refine and re-apply: pass the last result as ``previous`` and only the new scribbles as ``seed_labels``; they are
    painted over the previous scribbles (a non-zero voxel replaces the scribble there) and the result is computed
    again from all of them: the same as one run from the merged scribbles (``result.seeds``). To take scribbles away,
    edit ``result.seeds`` and run without ``previous``.
    """
    started = time.perf_counter()
    progress = as_progress(progress)
    _validate(image)
    for name, value in (("margin", margin_mm), ("smoothing", smoothing_mm), ("fine smoothing", fine_smoothing_mm)):
        if not (math.isfinite(value) and value >= 0):
            raise InputError(f"the {name} must be >= 0 mm (got {value})")
    if not (math.isfinite(working_spacing_mm) and working_spacing_mm > 0):
        raise InputError(f"the working spacing must be positive (got {working_spacing_mm} mm)")
    seeds = _merged_seeds(image, seed_labels, previous)
    labels_present = [int(v) for v in np.flatnonzero(np.bincount(seeds.ravel(), minlength=256)[1:]) + 1]
    if not labels_present:
        raise InputError("no scribbles: the seed label image is empty (paint the organ and its surroundings)")
    if len(labels_present) < 2:
        raise InputError(f"grow from seeds needs scribbles of at least two labels (the organ and what surrounds it); "
                         f"only label {labels_present[0]} is painted")
    progress.report(0.05, "Preparing the working grid")
    box = _mask_box(image, seeds != 0, margin_mm)
    grid = _WorkingGrid(image, box, working_spacing_mm, GROW_CUT_MAX_WORKING_VOXELS)
    fine_seeds = seeds[box]
    coarse_values = gaussian_mm(grid.coarse, smoothing_mm)
    progress.report(0.15, "Growing the labels on the working grid")
    coarse = _cheapest_source_labels(sitk.GetArrayViewFromImage(coarse_values), grid.block_labels(fine_seeds))
    if grid.is_fine:
        labels = coarse
    else:
        progress.report(0.5, "Redrawing the boundaries at full resolution")
        labels = _refine_boundaries(grid, coarse, fine_seeds, fine_smoothing_mm)
    labels[fine_seeds != 0] = fine_seeds[fine_seeds != 0]
    progress.report(1.0, "Grown from the seeds")
    return GrowCutResult(labels=grid.paste(labels), seeds=_mask_like(seeds, image), box=grid.bounding_box,
                         working_spacing_mm=tuple(float(s) for s in grid.coarse.GetSpacing()),
                         seconds=time.perf_counter() - started)


def _merged_seeds(image: sitk.Image, seed_labels: sitk.Image, previous: Optional[GrowCutResult]) -> np.ndarray:
    """The scribbles as a uint8 (z, y, x) array; new ones painted over those of ``previous``."""
    seeds = _label_array(image, seed_labels, "seed label image")
    if previous is None:
        return seeds
    merged = _label_array(image, previous.seeds, "previous result's seed image").copy()
    merged[seeds != 0] = seeds[seeds != 0]
    return merged


def _refine_boundaries(grid: "_WorkingGrid", coarse: np.ndarray, fine_seeds: np.ndarray,
                       smoothing_mm: float) -> np.ndarray:
    """Full-resolution labels: the working-grid labels, regrown within one working voxel of every boundary between
    labels, from the voxels just outside that band (and the scribbles inside it)."""
    labels = grid.upsample(coarse)[0]
    boundaries = _label_boundaries(coarse)
    if not boundaries.any():
        return labels
    band_box, box = grid.upsample(boundaries, bounding_box_slices(boundaries, margin=1))
    nodes = ndimage.binary_dilation(band_box, structure=ndimage.generate_binary_structure(3, 1))
    sources = np.where(nodes & ~band_box, labels[box], 0).astype(np.uint8)
    inside_seeds = band_box & (fine_seeds[box] != 0)
    sources[inside_seeds] = fine_seeds[box][inside_seeds]
    values = grid.fine_values(box, smoothing_mm)
    regrown = _cheapest_source_labels(values, sources, nodes)
    labels[box][band_box] = regrown[band_box]
    return labels


def _label_boundaries(labels: np.ndarray) -> np.ndarray:
    """Voxels with a face neighbour of another label."""
    boundary = np.zeros(labels.shape, dtype=bool)
    for axis in range(labels.ndim):
        lower = [slice(None)] * labels.ndim
        upper = [slice(None)] * labels.ndim
        lower[axis], upper[axis] = slice(0, -1), slice(1, None)
        differs = labels[tuple(lower)] != labels[tuple(upper)]
        boundary[tuple(lower)] |= differs
        boundary[tuple(upper)] |= differs
    return boundary


def _cheapest_source_labels(values: np.ndarray, sources: np.ndarray, nodes: Optional[np.ndarray] = None) -> np.ndarray:
    """Each voxel of ``nodes`` (all when None) labelled with the label of the source (a non-zero voxel of
    ``sources``) it reaches by the path of least total |HU difference| between face neighbours, all within ``nodes``;
    0 outside ``nodes`` and where no source can be reached. One multi-source Dijkstra (compiled, SciPy)."""
    shape = values.shape
    if nodes is None:
        flat = np.arange(values.size, dtype=np.int64)
        node_ids = flat.reshape(shape)
    else:
        flat = np.flatnonzero(nodes)
        node_ids = np.full(shape, -1, dtype=np.int64)
        node_ids.ravel()[flat] = np.arange(flat.size)
    count = flat.size
    coords = np.unravel_index(flat, shape)
    node_values = values.ravel()[flat].astype(np.float64)
    all_ids = node_ids.ravel()
    own = np.arange(count, dtype=np.int64)
    columns = np.empty((count, 6), dtype=np.int32)
    weights = np.empty((count, 6), dtype=np.float64)
    strides = [int(np.prod(shape[axis + 1:])) for axis in range(3)]
    for slot, (axis, step) in enumerate((a, s) for a in range(3) for s in (-1, 1)):
        valid = (coords[axis] > 0) if step < 0 else (coords[axis] < shape[axis] - 1)
        neighbour_ids = np.where(valid, all_ids[np.where(valid, flat + step * strides[axis], 0)], -1)
        linked = neighbour_ids >= 0
        neighbour_ids = np.where(linked, neighbour_ids, own)  # a missing neighbour becomes a harmless self-loop
        columns[:, slot] = neighbour_ids
        weights[:, slot] = np.abs(node_values - node_values[neighbour_ids]) + STEP_COST_HU
    graph = sparse.csr_matrix((weights.ravel(), columns.ravel(), np.arange(0, 6 * count + 1, 6)), shape=(count, count))
    source_labels = sources.ravel()[flat]
    source_ids = np.flatnonzero(source_labels)
    labels = np.zeros(shape, dtype=np.uint8)
    if source_ids.size == 0:
        return labels
    _, _, nearest = dijkstra(graph, directed=True, indices=source_ids, min_only=True, return_predecessors=True)
    reached = nearest >= 0
    labels.ravel()[flat[reached]] = source_labels[nearest[reached]]
    return labels


# ---------------------------------------------------------------------------------------------------------------------
# Seeds and scribbles for evaluation


def seeds_from_reference(mask: sitk.Image, count: int, seed: int = 0) -> List[Tuple[float, float, float]]:
    """``count`` LPS points (mm) deep inside a reference mask and spread over it, for reproducible evaluations.

    Candidates are the voxels at least half as deep (distance to the mask's boundary, mm) as the deepest one; the
    first point is drawn among them with ``seed``, each next one is the candidate farthest from those chosen."""
    if int(count) != count or count < 1:
        raise InputError(f"the number of seeds must be a whole number >= 1 (got {count})")
    inside = sitk.GetArrayViewFromImage(mask) != 0
    if not inside.any():
        raise InputError("the reference mask is empty: there is nowhere to place seeds")
    box = bounding_box_slices(inside, margin=1)
    spacing_zyx = np.array(mask.GetSpacing()[::-1])
    depth_mm = ndimage.distance_transform_edt(inside[box], sampling=spacing_zyx)  # the organ goes on beyond the image
    candidates = np.argwhere(depth_mm >= 0.5 * depth_mm.max())
    rng = np.random.default_rng(seed)
    if len(candidates) > 200_000:
        candidates = candidates[rng.choice(len(candidates), 200_000, replace=False)]
    positions_mm = candidates * spacing_zyx
    chosen = [int(rng.integers(len(candidates)))]
    nearest_mm = np.full(len(candidates), np.inf)
    for _ in range(int(count) - 1):
        nearest_mm = np.minimum(nearest_mm, np.linalg.norm(positions_mm - positions_mm[chosen[-1]], axis=1))
        chosen.append(int(np.argmax(nearest_mm)))
    start = np.array([part.start for part in box])
    return [tuple(float(v) for v in mask.TransformIndexToPhysicalPoint([int(i) for i in (candidates[c] + start)[::-1]]))
            for c in chosen]


def scribbles_from_reference(mask: sitk.Image, organ_label: int = 1, background_label: int = 2,
                             inset_mm: float = 5.0, gap_mm: float = 10.0, width_mm: float = 20.0) -> sitk.Image:
    """Scribbles as a user paints them for grow from seeds, made from a reference mask for reproducible evaluations:
    on the three index planes through the mask's centre, the organ deeper than ``inset_mm`` (``organ_label``) and a
    ring ``gap_mm`` to ``gap_mm + width_mm`` outside it (``background_label``). uint8, on the mask's grid."""
    inside = sitk.GetArrayViewFromImage(mask) != 0
    if not inside.any():
        raise InputError("the reference mask is empty: there is nothing to paint scribbles on")
    if not 0 < organ_label < 256 or not 0 < background_label < 256 or organ_label == background_label:
        raise InputError(f"the organ and background labels must be two different values 1..255 (got {organ_label} "
                         f"and {background_label})")
    spacing_zyx = np.array(mask.GetSpacing()[::-1])
    box = bounding_box_slices(inside, margin=np.ceil((gap_mm + width_mm) / spacing_zyx).astype(int) + 1)
    region = inside[box]
    depth_mm = ndimage.distance_transform_edt(region, sampling=spacing_zyx)
    outside_mm = ndimage.distance_transform_edt(~region, sampling=spacing_zyx)
    centre = np.round(np.argwhere(region).mean(axis=0)).astype(int)
    planes = np.zeros(region.shape, dtype=bool)
    for axis in range(3):
        planes[tuple(int(centre[axis]) if a == axis else slice(None) for a in range(3))] = True
    scribbles = np.zeros(inside.shape, dtype=np.uint8)
    scribbles[box][planes & (depth_mm > inset_mm)] = organ_label
    scribbles[box][planes & (outside_mm >= gap_mm) & (outside_mm <= gap_mm + width_mm)] = background_label
    return _mask_like(scribbles, mask)


# ---------------------------------------------------------------------------------------------------------------------
# Working grid


class _WorkingGrid:
    """A box of the CT (padding set to air) and its block average at about ``spacing_mm`` (whole input voxels per
    working voxel, at least one), with the mapping of working voxels back to the box and of the box to the input.

    Arrays are (z, y, x). Input voxels beyond the last whole block of an axis belong to the last working voxel."""

    def __init__(self, image: sitk.Image, box: Tuple[slice, ...], spacing_mm: float,
                 max_voxels: Optional[int] = None) -> None:
        self.image = image
        self.box = box
        self.start = np.array([part.start for part in box])
        self.shape = tuple(part.stop - part.start for part in box)
        self.fine_spacing_zyx = np.array(image.GetSpacing()[::-1])
        self.factors = self._factors(spacing_mm, max_voxels)
        fine = sitk.RegionOfInterest(image, size=[int(s) for s in self.shape[::-1]],
                                     index=[int(i) for i in self.start[::-1]])
        self.fine = sitk.Cast(replace_padding(fine), sitk.sitkFloat32)
        self.coarse = self.fine if self.is_fine else sitk.BinShrink(self.fine, [int(f) for f in self.factors[::-1]])
        self.coarse_shape = tuple(sitk.GetArrayViewFromImage(self.coarse).shape)
        self.coarse_spacing_zyx = self.fine_spacing_zyx * self.factors

    def _factors(self, spacing_mm: float, max_voxels: Optional[int]) -> np.ndarray:
        target = float(spacing_mm)
        while True:
            factors = np.clip(np.round(target / self.fine_spacing_zyx), 1, self.shape).astype(int)
            if max_voxels is None or np.prod(np.array(self.shape) // factors) <= max_voxels or \
                    np.all(factors == self.shape):
                return factors
            target *= 1.1

    @property
    def is_fine(self) -> bool:
        return bool(np.all(self.factors == 1))

    @property
    def bounding_box(self) -> BoundingBox:
        return BoundingBox(tuple(int(v) for v in self.start[::-1]), tuple(int(v) for v in self.shape[::-1]))

    def coarse_indices(self, indices: np.ndarray) -> np.ndarray:
        """Working-grid (z, y, x) indices of input (z, y, x) indices inside the box."""
        return np.minimum((indices - self.start) // self.factors, np.array(self.coarse_shape) - 1)

    def upsample(self, coarse: np.ndarray, coarse_box: Optional[Tuple[slice, ...]] = None
                 ) -> Tuple[np.ndarray, Tuple[slice, ...]]:
        """Nearest-neighbour copy on the box of a working-grid array (or of its sub-array ``coarse_box``), and the
        part of the box it covers."""
        if coarse_box is None:
            coarse_box = tuple(slice(0, n) for n in self.coarse_shape)
        box, picks = [], []
        for axis, part in enumerate(coarse_box):
            factor = int(self.factors[axis])
            stop = self.shape[axis] if part.stop >= self.coarse_shape[axis] else part.stop * factor
            box.append(slice(part.start * factor, stop))
            picks.append(np.minimum(np.arange(part.start * factor, stop) // factor,
                                    self.coarse_shape[axis] - 1) - part.start)
        fine = coarse[coarse_box]
        for axis, pick in enumerate(picks):
            fine = np.take(fine, pick, axis=axis)
        return fine, tuple(box)

    def block_labels(self, fine_labels: np.ndarray) -> np.ndarray:
        """Working-grid labels of a label array on the box: a block's label where all its labelled voxels agree, 0
        where none is labelled or labels disagree (voxels beyond the last whole block count for it)."""
        if self.is_fine:
            return fine_labels
        labelled = np.nonzero(fine_labels)
        values = fine_labels[labelled]
        block_indices = tuple(np.minimum(labelled[axis] // self.factors[axis], self.coarse_shape[axis] - 1)
                              for axis in range(3))
        blocks = np.ravel_multi_index(block_indices, self.coarse_shape)
        highest = np.zeros(self.coarse_shape, dtype=np.uint8)
        lowest = np.full(self.coarse_shape, 255, dtype=np.uint8)
        np.maximum.at(highest.ravel(), blocks, values)
        np.minimum.at(lowest.ravel(), blocks, values)
        return np.where(highest == lowest, highest, 0).astype(np.uint8)

    def fine_values(self, box: Tuple[slice, ...], smoothing_mm: float) -> np.ndarray:
        """Input HU (padding as air) within a sub-box of the box, Gaussian-smoothed by ``smoothing_mm``."""
        size = [part.stop - part.start for part in box][::-1]
        index = [part.start for part in box][::-1]
        values = sitk.RegionOfInterest(self.fine, size=[int(s) for s in size], index=[int(i) for i in index])
        return sitk.GetArrayFromImage(gaussian_mm(values, smoothing_mm))

    def refine(self, coarse: np.ndarray, inside, seeds: np.ndarray, smoothing_mm: float = 1.0) -> np.ndarray:
        """A working-grid mask at full resolution on the box: kept deeper than one working voxel inside, dropped
        farther than one outside; in between, voxels where ``inside(smoothed HU)`` holds, connected to the kept core
        or the ``seeds`` (input indices)."""
        result = np.zeros(self.shape, dtype=bool)
        if not coarse.any():
            return result
        if self.is_fine:
            return coarse.copy()
        face = ndimage.generate_binary_structure(3, 1)
        reach = ndimage.binary_dilation(coarse, structure=face)
        coarse_box = bounding_box_slices(reach)
        core, box = self.upsample(ndimage.binary_erosion(coarse, structure=face), coarse_box)
        band = self.upsample(reach, coarse_box)[0] & ~core
        fine = core | (band & inside(self.fine_values(box, smoothing_mm)))
        anchors = core.copy()
        local = seeds - np.array([part.start for part in box])
        within = np.all((local >= 0) & (local < np.array(fine.shape)), axis=1)
        anchors[tuple(local[within].T)] = fine[tuple(local[within].T)]
        if anchors.any():
            components = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(fine.view(np.uint8)),
                                                                        False))
            fine = _select_labels(components, components[anchors])
        else:
            fine = self.upsample(coarse, coarse_box)[0]
        result[box] = fine
        return result

    def paste(self, labels: np.ndarray) -> sitk.Image:
        """A (z, y, x) array on the box as a uint8 image on the input grid (0 outside the box)."""
        full = np.zeros(sitk.GetArrayViewFromImage(self.image).shape, dtype=np.uint8)
        full[self.box] = labels
        return _mask_like(full, self.image)


# ---------------------------------------------------------------------------------------------------------------------
# Checks and helpers


def _validate(image: sitk.Image) -> None:
    validate_ct(image, min_size_voxels=MIN_SLICES)


def _hu_range(lower_hu: float, upper_hu: float) -> Tuple[float, float]:
    lower_hu, upper_hu = float(lower_hu), float(upper_hu)
    if not (math.isfinite(lower_hu) and math.isfinite(upper_hu)) or lower_hu > upper_hu:
        raise InputError(f"expected a HU range lower <= upper (got {lower_hu:g}..{upper_hu:g} HU)")
    return lower_hu, upper_hu


def _format_point(point: Point) -> str:
    return "(" + ", ".join(f"{float(v):.1f}" for v in point) + ") mm LPS"


def _seed_indices(image: sitk.Image, seeds_lps_mm: Sequence[Point]) -> np.ndarray:
    """(n, 3) voxel indices (z, y, x) of seed points given in LPS mm; ``InputError`` for none or outside the image."""
    points = [] if seeds_lps_mm is None else list(seeds_lps_mm)
    if not points:
        raise InputError("no seed points: place at least one seed inside the organ")
    size = np.array(image.GetSize())
    indices = []
    for number, point in enumerate(points, start=1):
        values = np.asarray(point, dtype=float).ravel()
        if values.size != 3 or not np.all(np.isfinite(values)):
            raise InputError(f"seed {number} must be three finite LPS coordinates in mm (got {point!r})")
        index = np.round(image.TransformPhysicalPointToContinuousIndex([float(v) for v in values])).astype(int)
        if np.any(index < 0) or np.any(index >= size):
            raise InputError(f"seed {number} at {_format_point(values)} is outside the image (voxel index "
                             f"{tuple(int(v) for v in index)}, image size {tuple(int(v) for v in size)})")
        indices.append(index[::-1])
    return np.array(indices, dtype=int)


def _check_inside_body(hu: np.ndarray, indices: np.ndarray, seeds_lps_mm: Sequence[Point]) -> None:
    """Seeds in air (< -500 HU) that reaches the border of the seed's slice are outside the patient: refuse them.
    Air enclosed in its slice (lungs, bowel gas) is inside the body and accepted."""
    for number, index in enumerate(indices, start=1):
        value = float(hu[tuple(index)])
        if value >= BODY_THRESHOLD_HU:
            continue
        components, _ = ndimage.label(hu[index[0]] < BODY_THRESHOLD_HU)
        label = components[index[1], index[2]]
        edges = np.concatenate([components[0], components[-1], components[:, 0], components[:, -1]])
        if label in edges:
            raise InputError(f"seed {number} at {_format_point(list(seeds_lps_mm)[number - 1])} is in the air "
                             f"outside the body ({value:g} HU): place it inside the organ")


def _seed_box(image: sitk.Image, indices: np.ndarray, max_distance_mm: Optional[float]) -> Tuple[slice, ...]:
    """The whole image, or the seeds' bounding box grown by ``max_distance_mm``."""
    shape = np.array(image.GetSize()[::-1])
    if max_distance_mm is None:
        return tuple(slice(0, int(n)) for n in shape)
    margin = np.ceil(max_distance_mm / np.array(image.GetSpacing()[::-1])).astype(int)
    low = np.maximum(indices.min(axis=0) - margin, 0)
    high = np.minimum(indices.max(axis=0) + margin + 1, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(low, high))


def _mask_box(image: sitk.Image, mask: np.ndarray, margin_mm: float) -> Tuple[slice, ...]:
    margin = np.ceil(margin_mm / np.array(image.GetSpacing()[::-1])).astype(int)
    box = bounding_box_slices(mask)
    return tuple(slice(max(part.start - m, 0), min(part.stop + m, n))
                 for part, m, n in zip(box, margin, mask.shape))


def _components_holding(mask: np.ndarray, points: Sequence[Tuple[int, ...]]) -> np.ndarray:
    """Face-connected components of ``mask`` that hold one of ``points`` (z, y, x)."""
    components = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.view(np.uint8)), False))
    return _select_labels(components, [components[point] for point in points])


def _select_labels(components: np.ndarray, labels) -> np.ndarray:
    """Where ``components`` holds one of ``labels`` (0, the background of a component image, never counts)."""
    wanted = np.zeros(int(components.max()) + 1, dtype=bool)
    wanted[np.asarray(labels, dtype=np.int64).ravel()] = True
    wanted[0] = False
    return wanted[components]


def _label_array(image: sitk.Image, labels: sitk.Image, name: str) -> np.ndarray:
    """A label image on the CT's grid as uint8 (z, y, x); ``InputError`` for another grid or non-label values."""
    if not isinstance(labels, sitk.Image):
        raise InputError(f"the {name} must be a SimpleITK image (got {type(labels).__name__})")
    check_same_grid(image, labels, name)
    values = sitk.GetArrayViewFromImage(labels)
    if labels.GetNumberOfComponentsPerPixel() != 1 or not np.issubdtype(values.dtype, np.integer):
        raise InputError(f"the {name} must hold integer labels (got {labels.GetPixelIDTypeAsString()})")
    if values.min() < 0 or values.max() > 255:
        raise InputError(f"the {name} holds values outside 0..255 ({values.min()}..{values.max()})")
    return values.astype(np.uint8)


def _mask_like(mask: np.ndarray, reference: sitk.Image) -> sitk.Image:
    result = sitk.GetImageFromArray(mask.view(np.uint8) if mask.dtype == bool else mask.astype(np.uint8, copy=False))
    result.CopyInformation(reference)
    return result
