"""Synthetic CT volumes with exact ground truth: chest (lungs, vessels, airways, nodules) and abdomen (liver trees,
tumours).

Used by the tests, the benchmarks, the demos and synthetic pretraining. Every structure is defined analytically in
physical millimetres (LPS) from a seed before anything is drawn on the grid, so the same seed gives the same anatomy
at any spacing (for the same field of view). The anatomy is scaled to fit the field of view (at most adult size):
``patient_scale`` overrides that. Drawing is bounded: organs are drawn slab by slab, tubes and spheres only inside
their own bounding box, so a 512 x 512 x 600 volume stays within a few GiB.

Image formation: an ideal image with partial-volume edges for tubes and spheres (coverage ramp one voxel wide), a
Gaussian point spread function (``psf_fwhm_mm``, plus the voxel box), correlated Gaussian noise (``noise_sigma_hu``),
an optional padding value outside the reconstruction circle, and int16 HU.
"""

from __future__ import annotations

import csv
import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .errors import InputError
from .preprocessing import three_numbers
from .progress import Progress, as_progress

CHEST_LABELS: Dict[int, str] = {
    1: "body", 2: "lung_right", 3: "lung_left", 4: "airway", 5: "vessel", 6: "bone", 7: "heart", 8: "aorta",
    9: "nodule", 10: "table",
}
ABDOMEN_LABELS: Dict[int, str] = {
    1: "body", 2: "liver", 3: "spleen", 4: "kidney_right", 5: "kidney_left", 6: "bone", 7: "aorta",
    8: "inferior_vena_cava", 9: "portal_vein", 10: "hepatic_vein", 11: "tumour", 12: "table",
}
_C = {name: value for value, name in CHEST_LABELS.items()}
_A = {name: value for value, name in ABDOMEN_LABELS.items()}

NODULE_TYPES = ("solid", "part-solid", "ground-glass")
NODULE_LOCATIONS = ("isolated", "juxta-pleural", "juxta-vascular")
NODULE_DIAMETER_RANGE_MM = (3.0, 30.0)
TUMOUR_DIAMETER_RANGE_MM = (5.0, 40.0)
MIN_SIZE = 16
MAX_SIZE_IJK = (512, 512, 600)
LUNA16_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")

_AIR, _FAT, _SKIN, _MUSCLE, _BLOOD, _LUNG = -1000.0, -100.0, 30.0, 45.0, 40.0, -850.0
_CORTEX, _CANCELLOUS, _DISC, _CSF = 900.0, 350.0, 80.0, 15.0
_TABLE_SHELL, _TABLE_CORE = 450.0, -300.0
_RIGHT, _LEFT = -1, +1  # sign of the LPS x offset from the midline


@dataclass(frozen=True)
class NoduleSpec:
    """A requested nodule; without a centre it is placed at random where ``location`` asks."""

    diameter_mm: float
    type: str = "solid"
    location: str = "isolated"
    center_lps_mm: Optional[Tuple[float, float, float]] = None


@dataclass(frozen=True)
class TumourSpec:
    """A requested liver tumour; without a centre it is placed at random inside the liver."""

    diameter_mm: float
    center_lps_mm: Optional[Tuple[float, float, float]] = None


@dataclass
class NoduleTruth:
    id: int
    center_lps_mm: Tuple[float, float, float]
    diameter_mm: float
    type: str
    location: str
    volume_ml: float  # analytic sphere volume
    mask_volume_ml: float  # voxels of this id in ``lesion_labels`` times the voxel volume
    solid_diameter_mm: float = 0.0  # the solid part: the whole nodule if solid, its core if part-solid, else 0


@dataclass
class TumourTruth:
    id: int
    center_lps_mm: Tuple[float, float, float]
    diameter_mm: float
    hu: float
    volume_ml: float
    mask_volume_ml: float


@dataclass
class Phantom:
    """A generated CT with its truth. ``lesion_labels`` holds nodule/tumour k as value k (matches ``id``)."""

    image: sitk.Image
    labels: sitk.Image
    label_names: Dict[int, str]
    lesion_labels: sitk.Image
    nodules: List[NoduleTruth] = field(default_factory=list)
    tumours: List[TumourTruth] = field(default_factory=list)
    seed: int = 0

    def luna16_rows(self, seriesuid: str) -> List[dict]:
        """LUNA16 ``annotations.csv`` rows (world LPS mm, as LUNA16 writes them) for the nodules and tumours."""
        return [{"seriesuid": seriesuid, "coordX": lesion.center_lps_mm[0], "coordY": lesion.center_lps_mm[1],
                 "coordZ": lesion.center_lps_mm[2], "diameter_mm": lesion.diameter_mm}
                for lesion in [*self.nodules, *self.tumours]]

    def save(self, directory: Union[str, Path], seriesuid: str = "phantom") -> Dict[str, Path]:
        """Write image, labels (+ label CSV), lesion labels, LUNA16 annotations and the full lesion truth."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {"image": directory / f"{seriesuid}.nrrd", "labels": directory / f"{seriesuid}_labels.nrrd",
                 "label_names": directory / f"{seriesuid}_labels.csv",
                 "lesion_labels": directory / f"{seriesuid}_lesions.nrrd",
                 "annotations": directory / "annotations.csv", "lesions": directory / f"{seriesuid}_lesions.csv"}
        sitk.WriteImage(self.image, str(paths["image"]), True)
        sitk.WriteImage(self.labels, str(paths["labels"]), True)
        sitk.WriteImage(self.lesion_labels, str(paths["lesion_labels"]), True)
        with open(paths["label_names"], "w", newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow(("value", "name"))
            writer.writerows(sorted(self.label_names.items()))
        write_luna16_csv(self.luna16_rows(seriesuid), paths["annotations"])
        self.write_lesion_truth(paths["lesions"])
        return paths

    def write_lesion_truth(self, path: Union[str, Path]) -> Path:
        """The full truth of the nodules and tumours as CSV (world LPS mm, type, location, volumes); floats exact."""
        path = Path(path)
        with open(path, "w", newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow(("id", "kind", "coordX", "coordY", "coordZ", "diameter_mm", "type", "location",
                             "volume_ml", "mask_volume_ml", "solid_diameter_mm"))
            for nodule in self.nodules:
                writer.writerow((nodule.id, "nodule", *map(repr, nodule.center_lps_mm), repr(nodule.diameter_mm),
                                 nodule.type, nodule.location, repr(nodule.volume_ml), repr(nodule.mask_volume_ml),
                                 repr(nodule.solid_diameter_mm)))
            for tumour in self.tumours:
                writer.writerow((tumour.id, "tumour", *map(repr, tumour.center_lps_mm), repr(tumour.diameter_mm),
                                 "hypodense", "liver", repr(tumour.volume_ml), repr(tumour.mask_volume_ml), ""))
        return path


def write_luna16_csv(rows: Sequence[dict], path: Union[str, Path]) -> Path:
    """Write rows in LUNA16 ``annotations.csv`` layout; floats are written exactly (``repr``)."""
    path = Path(path)
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(LUNA16_COLUMNS)
        for row in rows:
            writer.writerow([row["seriesuid"]] + [repr(float(row[column])) for column in LUNA16_COLUMNS[1:]])
    return path


def read_luna16_csv(path: Union[str, Path]) -> List[dict]:
    """Read a LUNA16 ``annotations.csv`` into rows with float coordinates and diameter."""
    with open(path, newline="") as stream:
        reader = csv.DictReader(stream)
        missing = set(LUNA16_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise InputError(f"{path} is not a LUNA16 annotations file: missing columns {sorted(missing)}")
        return [{"seriesuid": row["seriesuid"], **{c: float(row[c]) for c in LUNA16_COLUMNS[1:]}} for row in reader]


# ----------------------------------------------------------------------------------------------------------------
# Grid and drawing


class _Grid:
    """Index <-> LPS geometry of the output, and open-grid coordinates of a box (broadcast, not materialised)."""

    def __init__(self, size_ijk, spacing_mm, origin_mm, direction) -> None:
        self.size = np.array(size_ijk, dtype=int)
        self.spacing = np.array(spacing_mm, dtype=float)
        self.direction = np.array(direction, dtype=float).reshape(3, 3)
        self.matrix = self.direction * self.spacing[None, :]
        self.inverse = np.linalg.inv(self.matrix)
        half = (self.size - 1) / 2.0
        self.origin = -self.matrix @ half if origin_mm is None else np.array(origin_mm, dtype=float)
        self.shape = (int(self.size[2]), int(self.size[1]), int(self.size[0]))
        self.center = self.origin + self.matrix @ half
        self.extent = np.abs(self.direction) @ (self.size * self.spacing)
        self.footprint = np.abs(self.direction) @ self.spacing  # voxel width along x, y, z

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    def box(self, low_mm, high_mm) -> Optional[Tuple[slice, slice, slice]]:
        """(k, j, i) slices covering the physical box [low, high], clipped to the grid; None when outside."""
        low, high = np.asarray(low_mm, float), np.asarray(high_mm, float)
        corners = np.array([[(low, high)[(c >> a) & 1][a] for a in range(3)] for c in range(8)])
        index = (self.inverse @ (corners - self.origin).T).T
        start = np.maximum(np.floor(index.min(axis=0)).astype(int), 0)
        stop = np.minimum(np.ceil(index.max(axis=0)).astype(int) + 1, self.size)
        if np.any(start >= stop):
            return None
        return slice(start[2], stop[2]), slice(start[1], stop[1]), slice(start[0], stop[0])

    def slabs(self, thickness: int = 16):
        for k in range(0, self.shape[0], thickness):
            yield slice(k, min(k + thickness, self.shape[0])), slice(0, self.shape[1]), slice(0, self.shape[2])

    def coordinates(self, box) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """x, y, z (float32) of the voxel centres of ``box``, broadcastable to its shape."""
        k = np.arange(box[0].start, box[0].stop, dtype=np.float32)[:, None, None]
        j = np.arange(box[1].start, box[1].stop, dtype=np.float32)[None, :, None]
        i = np.arange(box[2].start, box[2].stop, dtype=np.float32)[None, None, :]
        axes = (i, j, k)
        result = []
        for a in range(3):
            value = np.full((1, 1, 1), self.origin[a], dtype=np.float32)
            for b in range(3):
                if self.matrix[a, b] != 0.0:
                    value = value + np.float32(self.matrix[a, b]) * axes[b]
            result.append(value)
        return result[0], result[1], result[2]


class _Canvas:
    """The float32 image being drawn, its organ labels and lesion instance labels."""

    def __init__(self, grid: _Grid) -> None:
        self.grid = grid
        self.image = np.full(grid.shape, _AIR, dtype=np.float32)
        self.labels = np.zeros(grid.shape, dtype=np.uint8)
        self.lesions = np.zeros(grid.shape, dtype=np.uint16)

    def fill(self, box, mask, hu, label: Optional[int], over: Optional[Sequence[int]] = None) -> None:
        """Hard-edged paint: ``hu`` (scalar or broadcastable array) where ``mask``; organ ``label`` with it."""
        region, labels = self.image[box], self.labels[box]
        mask = np.broadcast_to(mask, region.shape)
        if over is not None:
            mask = mask & np.isin(labels, over)
        np.copyto(region, np.asarray(hu, dtype=np.float32), where=mask)
        if label is not None:
            labels[mask] = label

    def blend(self, box, coverage, hu: float, label: Optional[int], over: Optional[Sequence[int]] = None,
              lesion: int = 0, lighten: bool = False) -> None:
        """Partial-volume paint: mix ``hu`` in by ``coverage``; labels where coverage >= 0.5.

        ``lighten`` only raises voxels darker than ``hu`` (ground glass keeps the vessels that run through it).
        """
        region, labels = self.image[box], self.labels[box]
        if over is not None:
            coverage = coverage * np.isin(labels, over)
        difference = np.float32(hu) - region
        if lighten:
            np.maximum(difference, 0, out=difference)
        region += difference * coverage
        inside = coverage >= 0.5
        if label is not None:
            labels[inside] = label
        if lesion:
            self.lesions[box][inside] = lesion


def _capsule_coverage(grid: _Grid, p0, p1, r0: float, r1: float):
    """Box and partial-volume coverage of a tapered tube (a ramp one voxel wide across its surface)."""
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    reach = max(r0, r1) + grid.footprint.max()
    box = grid.box(np.minimum(p0, p1) - reach, np.maximum(p0, p1) + reach)
    if box is None:
        return None, None
    x, y, z = grid.coordinates(box)
    d = (p1 - p0).astype(np.float32)
    length2 = max(float(d @ d), 1e-12)
    t = np.clip(((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / length2, 0.0, 1.0)
    offset = [x - (p0[0] + t * d[0]), y - (p0[1] + t * d[1]), z - (p0[2] + t * d[2])]
    return box, _coverage(grid, offset, r0 + t * (r1 - r0))


def _sphere_coverage(grid: _Grid, center, radius: float):
    center = np.asarray(center, float)
    reach = radius + grid.footprint.max()
    box = grid.box(center - reach, center + reach)
    if box is None:
        return None, None
    x, y, z = grid.coordinates(box)
    return box, _coverage(grid, [x - center[0], y - center[1], z - center[2]], radius)


def _coverage(grid: _Grid, offset, radius):
    """Fraction of each voxel inside a surface at ``radius`` along ``offset``: ramp as wide as the voxel's footprint
    along the surface normal."""
    distance = np.sqrt(offset[0] ** 2 + offset[1] ** 2 + offset[2] ** 2)
    width = sum(np.abs(o) * np.float32(f) for o, f in zip(offset, grid.footprint)) / np.maximum(distance, 1e-3)
    width = np.maximum(width, np.float32(0.5 * grid.footprint.min()))
    return np.clip(0.5 - (distance - radius) / width, 0.0, 1.0).astype(np.float32)


def _paint_tube(canvas: _Canvas, polyline, radius, hu, label, over=None, lighten=False) -> None:
    """A tube along ``polyline`` (N x 3); ``radius`` scalar or one per point."""
    points = np.asarray(polyline, float)
    radii = np.broadcast_to(np.asarray(radius, float), (len(points),))
    for a in range(len(points) - 1):
        box, coverage = _capsule_coverage(canvas.grid, points[a], points[a + 1], radii[a], radii[a + 1])
        if box is not None:
            canvas.blend(box, coverage, hu, label, over, lighten=lighten)


def _paint_segments(canvas: _Canvas, segments: np.ndarray, hu, label, over=None, radius_scale=1.0,
                    radius_add=0.0) -> None:
    """Tree segments (rows p0, p1, r0, r1) as tubes; tubes far thinner than a voxel are splatted by volume instead
    (the same partial volume, without a box per segment)."""
    if len(segments) == 0:
        return
    r0 = segments[:, 6] * radius_scale + radius_add
    r1 = segments[:, 7] * radius_scale + radius_add
    thin = np.maximum(r0, r1) < 0.4 * canvas.grid.footprint.min()
    for row, start, end in zip(segments[~thin], r0[~thin], r1[~thin]):
        box, coverage = _capsule_coverage(canvas.grid, row[0:3], row[3:6], start, end)
        if box is not None:
            canvas.blend(box, coverage, hu, label, over)
    if thin.any():
        _splat_segments(canvas, segments[thin, 0:3], segments[thin, 3:6], r0[thin], r1[thin], hu, label, over)


def _splat_segments(canvas: _Canvas, p0, p1, r0, r1, hu, label, over) -> None:
    """Deposit each thin tube's volume trilinearly at points along it; the sum per voxel is its coverage."""
    grid = canvas.grid
    lengths = np.linalg.norm(p1 - p0, axis=1)
    counts = np.maximum(np.ceil(lengths / (0.5 * grid.footprint.min())).astype(int), 1)
    segment = np.repeat(np.arange(len(p0)), counts)
    t = (np.arange(len(segment)) - np.repeat(np.cumsum(counts) - counts, counts) + 0.5) / counts[segment]
    points = p0[segment] + t[:, None] * (p1 - p0)[segment]
    radius = r0[segment] + t * (r1 - r0)[segment]
    volume = math.pi * radius ** 2 * lengths[segment] / counts[segment] / float(np.prod(grid.spacing))
    index = (grid.inverse @ (points - grid.origin).T).T
    base = np.floor(index).astype(int)
    fraction = index - base
    flat_parts, weight_parts = [], []
    for corner in range(8):
        step = np.array([(corner >> a) & 1 for a in range(3)])
        ijk = base + step
        weight = volume * np.prod(np.where(step, fraction, 1.0 - fraction), axis=1)
        valid = np.all((ijk >= 0) & (ijk < grid.size), axis=1)
        flat_parts.append((ijk[valid, 2] * grid.shape[1] + ijk[valid, 1]) * grid.shape[2] + ijk[valid, 0])
        weight_parts.append(weight[valid])
    voxels, inverse = np.unique(np.concatenate(flat_parts), return_inverse=True)
    coverage = np.minimum(np.bincount(inverse, weights=np.concatenate(weight_parts)), 1.0).astype(np.float32)
    image, labels = canvas.image.reshape(-1), canvas.labels.reshape(-1)
    if over is not None:
        coverage *= np.isin(labels[voxels], over)
    image[voxels] += (np.float32(hu) - image[voxels]) * coverage
    if label is not None:
        labels[voxels[coverage >= 0.5]] = label


# ----------------------------------------------------------------------------------------------------------------
# Geometry helpers (physical mm, numpy broadcasting)


def _superellipse_rho(dx, dy, a: float, b: float, power: float = 2.4):
    return (np.abs(dx / a) ** power + np.abs(dy / b) ** power) ** (1.0 / power)


def _ellipsoid_rho2(x, y, z, center, semi, angle_z: float = 0.0):
    """Squared normalised radius of an ellipsoid turned by ``angle_z`` about the z axis (<= 1 inside)."""
    dx, dy, dz = x - center[0], y - center[1], z - center[2]
    c, s = math.cos(angle_z), math.sin(angle_z)
    u, v = c * dx + s * dy, -s * dx + c * dy
    return (u / semi[0]) ** 2 + (v / semi[1]) ** 2 + (dz / semi[2]) ** 2


def _ellipsoid_box(center, semi, margin=0.0):
    reach = max(semi[0], semi[1]) + margin
    center = np.asarray(center, float)
    return center - [reach, reach, semi[2] + margin], center + [reach, reach, semi[2] + margin]


def _unit(vectors):
    vectors = np.asarray(vectors, float)
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def _distance_to_segments(points, p0, p1):
    """Distances (N x M) from points (N x 3) to segments (M x 3, M x 3), and the segment parameter t."""
    d = p1 - p0
    length2 = np.maximum((d * d).sum(-1), 1e-12)
    rel = [points[:, a, None] - p0[None, :, a] for a in range(3)]
    t = np.clip((rel[0] * d[:, 0] + rel[1] * d[:, 1] + rel[2] * d[:, 2]) / length2, 0.0, 1.0)
    squared = sum((rel[a] - t * d[:, a]) ** 2 for a in range(3))
    return np.sqrt(squared), t


def _fibonacci_directions(count: int) -> np.ndarray:
    n = np.arange(count) + 0.5
    polar = np.arccos(1.0 - 2.0 * n / count)
    azimuth = math.pi * (1.0 + 5 ** 0.5) * n
    return np.stack([np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar), np.cos(polar)], axis=1)


_DIRECTIONS = _fibonacci_directions(96)


def _nearest_boundary(center, inside: Callable, max_distance: float, step: float = 0.5):
    """Distance from ``center`` to where ``inside`` first turns false along 96 rays, and that ray's direction."""
    radii = np.arange(step, max_distance + step, step)
    points = center[None, None, :] + _DIRECTIONS[:, None, :] * radii[None, :, None]
    outside = ~inside(points.reshape(-1, 3)).reshape(points.shape[:2])
    first = np.where(outside.any(axis=1), outside.argmax(axis=1), len(radii) - 1)
    ray = int(np.argmin(first))
    return float(radii[first[ray]]) - step / 2, _DIRECTIONS[ray]


def _ball_points(rng, count=300):
    points = rng.normal(size=(count, 3))
    return _unit(points) * rng.uniform(0, 1, size=(count, 1)) ** (1 / 3)


def _grow_tree(rng, roots, inside: Callable, min_radius: float, max_segments: int,
               avoid: Optional[Callable] = None, length_per_radius=(4.0, 7.0), attempts: int = 8) -> np.ndarray:
    """A branching tree of tapered tubes, breadth first, each segment's axis and tip kept ``inside``.

    Bifurcations follow Murray's law (r^3 = r1^3 + r2^3) with the thinner child at the wider angle. Rows of the
    result are (p0, p1, r0, r1). ``avoid(p0, p1, r)`` rejects candidates (F x A) too close to something else.
    """
    frontier = deque((np.asarray(p, float), _unit(d), float(r)) for p, d, r in roots)
    segments: List[np.ndarray] = []
    spread = np.linspace(0.0, 1.0, attempts)[None, :, None]
    samples = np.array([0.35, 0.7, 1.0])
    while frontier and len(segments) < max_segments:
        generation = list(frontier)
        frontier.clear()
        starts = np.array([g[0] for g in generation])
        directions = np.array([g[1] for g in generation])
        radii = np.array([g[2] for g in generation])
        candidates = _unit(directions[:, None, :] + spread * rng.normal(size=(len(generation), attempts, 3)))
        lengths = np.maximum(radii[:, None] * rng.uniform(*length_per_radius, size=(len(generation), attempts)), 2.0)
        along = np.concatenate([lengths[..., None] * samples, (lengths + radii[:, None])[..., None]], axis=-1)
        points = starts[:, None, None, :] + candidates[:, :, None, :] * along[..., None]
        ok = inside(points.reshape(-1, 3)).reshape(points.shape[:3]).all(axis=-1)
        ends = starts[:, None, :] + candidates * lengths[..., None]
        if avoid is not None:
            ok &= avoid(starts, ends, radii)
        chosen = np.flatnonzero(ok.any(axis=1))[:max_segments - len(segments)]
        if len(chosen) == 0:
            break
        pick = np.argmax(ok[chosen], axis=1)
        axes, tips = candidates[chosen, pick], ends[chosen, pick]
        radius, end_radius = radii[chosen], 0.96 * radii[chosen]
        segments.extend(np.column_stack([starts[chosen], tips, radius, end_radius]))
        major = end_radius * rng.uniform(0.8, 0.95, size=len(chosen))
        minor = end_radius * (1.0 - (major / end_radius) ** 3) ** (1.0 / 3.0)
        normals = _unit(np.cross(axes, rng.normal(size=(len(chosen), 3))))
        turned = np.cross(normals, axes)
        angles = np.radians(np.column_stack([rng.uniform(15, 32, len(chosen)), -rng.uniform(35, 60, len(chosen))]))
        for n in range(len(chosen)):
            for child_radius, theta in ((major[n], angles[n, 0]), (minor[n], angles[n, 1])):
                if child_radius >= min_radius:
                    frontier.append((tips[n], axes[n] * math.cos(theta) + turned[n] * math.sin(theta), child_radius))
    return np.array(segments).reshape(-1, 8)


def _tree_avoider(other: np.ndarray, clearance: float) -> Callable:
    """``avoid`` for ``_grow_tree``: candidates must stay ``clearance`` mm off the surface of ``other`` segments."""
    def avoid(starts, ends, radii):
        if len(other) == 0:
            return np.ones(ends.shape[:2], dtype=bool)
        points = (starts[:, None, None, :] + (ends - starts[:, None, :])[:, :, None, :]
                  * np.array([0.5, 1.0])[None, None, :, None])
        distance, t = _distance_to_segments(points.reshape(-1, 3), other[:, 0:3], other[:, 3:6])
        other_radius = other[:, 6] + t * (other[:, 7] - other[:, 6])
        gap = (distance - other_radius).min(axis=1).reshape(points.shape[:3]).min(axis=-1)
        return gap > radii[:, None] + clearance
    return avoid


# ----------------------------------------------------------------------------------------------------------------
# Anatomy shared by chest and abdomen: table, body wall, spine


class _Torso:
    """Body cross-section (skin, fat, muscle, cavity), spine and table, scaled by ``s`` (1 = adult)."""

    power = 2.4

    def __init__(self, grid: _Grid, rng, s: float, half_width: float, half_depth: float, fat_mm,
                 spine_inset: float, spine_radius: float) -> None:
        self.grid, self.s = grid, s
        self.cx, cy, self.cz = grid.center
        self.A = half_width * s * rng.uniform(0.95, 1.03)
        self.B = half_depth * s * rng.uniform(0.94, 1.04)
        self.yb = cy - 14.0 * s  # room for the table behind the back (LPS y grows posteriorly)
        self.skin = 2.5 * s
        self.fat = rng.uniform(*fat_mm) * s
        self.muscle = 11.0 * s
        wall = self.skin + self.fat + self.muscle
        back = 12.0 * s  # the back muscles make the posterior wall thicker: the cavity sits forward
        self.Ac, self.Bc = self.A - wall, self.B - wall - back
        self.y_cavity = self.yb - back
        self.r_vb = spine_radius * s
        self.y_vb = self.y_cavity + self.Bc - spine_inset * s
        self.r_canal = 8.0 * s
        self.y_canal = self.y_vb + self.r_vb + 9.0 * s
        self.vertebra_period = 27.0 * s
        self.vertebra_phase = rng.uniform(0, self.vertebra_period)

    def cavity_rho(self, x, y, inset=0.0, z=None):
        """Normalised radius of the body cavity (<= 1 inside); ``z`` is used where the cavity narrows."""
        return _superellipse_rho(x - self.cx, y - self.y_cavity, self.Ac - inset, self.Bc - inset, self.power)

    def paint_spine(self, canvas: _Canvas, box, x, y, z) -> None:
        s, dx = self.s, x - self.cx
        bone, body = self.bone_label, self.body_label
        for side in (-1, 1):  # paraspinal muscles
            muscle = ((x - self.cx - side * 30 * s) / (24 * s)) ** 2 + ((y - self.y_canal - 10 * s) / (20 * s)) ** 2
            canvas.fill(box, muscle <= 1.0, _MUSCLE, body, over=[body])
        vertebral_body = (dx / (1.12 * self.r_vb)) ** 2 + ((y - self.y_vb) / self.r_vb) ** 2
        level = np.mod(z - self.vertebra_phase, self.vertebra_period)
        disc = level < 5.0 * s
        canvas.fill(box, (vertebral_body <= 1.0) & disc, _DISC, body)
        canvas.fill(box, (vertebral_body <= 1.0) & ~disc, _CORTEX, bone)
        canvas.fill(box, (vertebral_body <= (1 - 2.0 * s / self.r_vb) ** 2) & ~disc, _CANCELLOUS, bone)
        canal = dx ** 2 + (y - self.y_canal) ** 2
        arch = (canal <= (self.r_canal + 5 * s) ** 2) & (y > self.y_canal - 4 * s)
        spinous = (dx / (4 * s)) ** 2 + ((y - self.y_canal - self.r_canal - 10 * s) / (10 * s)) ** 2 <= 1.0
        transverse = ((np.abs(dx) - 24 * s) / (13 * s)) ** 2 + ((y - self.y_canal + 3 * s) / (5 * s)) ** 2 <= 1.0
        canvas.fill(box, arch | spinous | transverse, 0.75 * _CORTEX, bone)
        canvas.fill(box, canal <= self.r_canal ** 2, _CSF, body)

    def paint_table(self, canvas: _Canvas, box) -> None:
        """Carbon-fibre shell with a foam core, curved, below the patient's back."""
        x, y, _ = canvas.grid.coordinates(box)
        s, dx = self.s, x - self.cx
        top = self.yb + self.B + 1.0 * s + 0.0015 * dx ** 2 / s
        width = np.abs(dx) < 1.25 * self.A
        canvas.fill(box, width & (y >= top) & (y <= top + 26 * s), _TABLE_SHELL, self.table_label)
        canvas.fill(box, width & (y >= top + 3 * s) & (y <= top + 23 * s) & (np.abs(dx) < 1.25 * self.A - 3 * s),
                    _TABLE_CORE, self.table_label)

    def paint_body(self, canvas: _Canvas, box, cavity_hu: float) -> None:
        x, y, z = canvas.grid.coordinates(box)
        dx, dy = x - self.cx, y - self.yb
        layers = ((0.0, _SKIN), (self.skin, _FAT), (self.skin + self.fat, _MUSCLE),
                  (self.skin + self.fat + self.muscle, cavity_hu))
        for inset, hu in layers:
            inside = _superellipse_rho(dx, dy, self.A - inset, self.B - inset, self.power) <= 1.0
            canvas.fill(box, inside, hu, self.body_label)
        self.paint_spine(canvas, box, x, y, z)


def _find_inside(start, direction, inside: Callable, depth: float, max_distance: float, step: float = 1.0):
    """First point from ``start`` along ``direction`` whose neighbourhood (``depth`` mm) is all ``inside``."""
    offsets = np.vstack([np.zeros(3), np.eye(3) * depth, -np.eye(3) * depth])
    direction = _unit(direction)
    for distance in np.arange(0.0, max_distance, step):
        point = np.asarray(start, float) + direction * distance
        if inside(point[None] + offsets).all():
            return point
    return None


class _Tube:
    """A mediastinal / abdominal tube: polyline, radius per point, HU, label, lumen (air) radius, lung clearance."""

    def __init__(self, points, radius, hu, label, clearance=0.0, lumen=None, lumen_hu=_AIR, lumen_label=None):
        self.points = np.asarray(points, float)
        self.radius = np.broadcast_to(np.asarray(radius, float), (len(self.points),)).copy()
        self.hu, self.label, self.clearance = hu, label, clearance
        self.lumen, self.lumen_hu, self.lumen_label = lumen, lumen_hu, lumen_label

    def paint(self, canvas: _Canvas, over) -> None:
        _paint_tube(canvas, self.points, self.radius, self.hu, self.label, over)
        if self.lumen is not None:
            _paint_tube(canvas, self.points, self.radius * self.lumen, self.lumen_hu, self.lumen_label, over)


def _tube_segments(tubes: Sequence[_Tube]):
    """Flattened (p0, p1, radius + clearance) of all tubes, for point-distance tests."""
    p0 = np.concatenate([t.points[:-1] for t in tubes])
    p1 = np.concatenate([t.points[1:] for t in tubes])
    reach = np.concatenate([np.maximum(t.radius[:-1], t.radius[1:]) + t.clearance for t in tubes])
    return p0, p1, reach


class _Chest(_Torso):
    """Adult chest at scale ``s``: lungs with vessel and airway trees, mediastinum, heart, aorta, ribs, spine."""

    body_label, bone_label, table_label = _C["body"], _C["bone"], _C["table"]

    def __init__(self, grid: _Grid, rng, s: float) -> None:
        super().__init__(grid, rng, s, 170.0, 112.0, (8.0, 20.0), spine_inset=14.0, spine_radius=17.0)
        cx, yb, Ac, Bc = self.cx, self.y_cavity, self.Ac, self.Bc
        self.z_apex, self.z_recess = self.cz + 125.0 * s, self.cz - 125.0 * s
        self.dome_peak = {_RIGHT: self.z_recess + rng.uniform(80, 95) * s,
                          _LEFT: self.z_recess + rng.uniform(62, 76) * s}
        self.medial = 11.0 * s
        self.lung_center = {side: (cx + side * 0.5 * Ac, yb + 0.05 * Bc) for side in (_RIGHT, _LEFT)}
        self.lung_semi = (0.56 * Ac, 0.98 * Bc)
        self.z_shoulder = self.z_recess + 110.0 * s  # above it lungs and rib cage narrow to the apex
        self.heart_center = np.array([cx + 25.0 * s, yb - 0.28 * Bc, self.z_recess + 105.0 * s])
        self.heart_semi = np.array([60.0, 46.0, 52.0]) * s * rng.uniform(0.95, 1.05)
        self.heart_angle = math.radians(rng.uniform(25, 40))
        self.z_carina = self.z_recess + 165.0 * s
        self.tubes = self._mediastinal_tubes()
        self.tube_p0, self.tube_p1, self.tube_reach = _tube_segments(self.tubes)
        self.tube_low = (np.minimum(self.tube_p0, self.tube_p1) - self.tube_reach[:, None]).min(axis=0)
        self.tube_high = (np.maximum(self.tube_p0, self.tube_p1) + self.tube_reach[:, None]).max(axis=0)
        self.rib_radius = 4.5 * s
        self.ribs = self._ribs(rng)
        self.vessels = np.zeros((0, 8))
        self.airways = np.zeros((0, 8))
        self.hilum_tubes: List[_Tube] = []

    # -- analytic shape ------------------------------------------------------------------------------------------
    def _dome(self, side, x, y):
        """Diaphragm height under one lung: a paraboloid dome, lowest in the costophrenic recess."""
        lcx, _ = self.lung_center[side]
        peak = self.dome_peak[side]
        spread = ((x - lcx) / (0.62 * self.Ac)) ** 2 + ((y - (self.y_cavity - 0.1 * self.Bc)) / (0.9 * self.Bc)) ** 2
        return np.maximum(self.z_recess, peak - (peak - self.z_recess) * spread)

    def _apex_taper(self, z):
        """1 below the shoulder level, falling like a dome to 0 at the lung apex."""
        u = np.maximum((z - self.z_shoulder) / (self.z_apex - self.z_shoulder), 0.0)
        return np.sqrt(np.clip(1.0 - u ** 2, 0.0, 1.0))

    def cavity_rho(self, x, y, inset=0.0, z=None):
        rho = super().cavity_rho(x, y, inset)
        return rho if z is None else rho / (0.62 + 0.38 * self._apex_taper(z))

    def lung_side(self, x, y, z):
        """Lung label (0, lung_right, lung_left) of the analytic lungs, without the mediastinal tubes."""
        s = self.s
        shape = np.broadcast_shapes(np.shape(x), np.shape(y), np.shape(z))
        out = np.zeros(shape, dtype=np.uint8)
        cavity = self.cavity_rho(x, y, 1.0 * s, z) <= 1.0
        taper2 = self._apex_taper(z) ** 2
        for side, label in ((_RIGHT, _C["lung_right"]), (_LEFT, _C["lung_left"])):
            lcx, lcy = self.lung_center[side]
            radial = ((x - lcx) / self.lung_semi[0]) ** 2 + ((y - lcy) / self.lung_semi[1]) ** 2
            inside = cavity & (side * (x - self.cx) > self.medial) & (radial <= taper2) & (z > self._dome(side, x, y))
            out[np.broadcast_to(inside, shape)] = label
        heart = _ellipsoid_rho2(x, y, z, self.heart_center, self.heart_semi + 5.0 * s, self.heart_angle) <= 1.0
        dx = x - self.cx
        spine = (dx ** 2 + (y - self.y_vb) ** 2 <= (self.r_vb + 6.0 * s) ** 2) | (
            (y > self.y_vb) & (np.abs(dx) < self.r_vb + 8.0 * s))
        out[np.broadcast_to(heart | spine, shape)] = 0
        return out

    def lung_at(self, points) -> np.ndarray:
        """Lung label at points (N x 3), the mediastinal tubes and their clearance excluded."""
        points = np.asarray(points, float)
        side = self.lung_side(points[:, 0], points[:, 1], points[:, 2])
        near = (side > 0) & np.all((points >= self.tube_low) & (points <= self.tube_high), axis=1)
        candidates = np.flatnonzero(near)
        distance, _ = _distance_to_segments(points[candidates], self.tube_p0, self.tube_p1)
        side[candidates[(distance <= self.tube_reach[None, :]).any(axis=1)]] = 0
        return side

    # -- structures ----------------------------------------------------------------------------------------------
    def _mediastinal_tubes(self) -> List[_Tube]:
        s, cx, yb, Bc = self.s, self.cx, self.y_cavity, self.Bc
        z_top = self.grid.center[2] + self.grid.extent[2]
        z_bottom = self.grid.center[2] - self.grid.extent[2]
        heart = self.heart_center
        arch_z = self.z_apex - 70.0 * s
        ascending = np.array([cx + 5.0 * s, yb - 0.3 * Bc])
        descending = np.array([cx + self.r_vb + 14.0 * s, self.y_vb - 8.0 * s])
        u = np.linspace(0.0, math.pi, 9)
        blend = (1.0 - np.cos(u)) / 2.0
        arch = np.stack([ascending[0] + (descending[0] - ascending[0]) * blend + 10.0 * s * np.sin(u),
                         ascending[1] + (descending[1] - ascending[1]) * blend, arch_z + 22.0 * s * np.sin(u)], 1)
        aorta = np.vstack([[ascending[0], ascending[1], heart[2] + 20.0 * s], arch,
                           [descending[0], descending[1], z_bottom]])
        aorta_radius = np.concatenate([[14.0 * s], np.linspace(14.0, 11.0, 9) * s, [11.0 * s]])
        y_trachea = self.y_vb - self.r_vb - 27.0 * s
        carina = np.array([cx, y_trachea, self.z_carina])
        self.bronchus_ends = {_RIGHT: np.array([cx - 38.0 * s, y_trachea + 6.0 * s, self.z_carina - 20.0 * s]),
                              _LEFT: np.array([cx + 42.0 * s, y_trachea + 8.0 * s, self.z_carina - 32.0 * s])}
        bifurcation = np.array([cx + 6.0 * s, yb - 0.12 * Bc, self.z_carina - 18.0 * s])
        self.artery_hila = {_RIGHT: np.array([cx - 40.0 * s, yb + 0.1 * Bc, self.z_carina - 28.0 * s]),
                            _LEFT: np.array([cx + 40.0 * s, yb + 0.12 * Bc, self.z_carina - 18.0 * s])}
        self.vein_hila = {side: np.array([cx + side * 36.0 * s, yb + 0.3 * Bc, self.z_carina - 50.0 * s])
                          for side in (_RIGHT, _LEFT)}
        airway, vessel, body = _C["airway"], _C["vessel"], _C["body"]
        tubes = [
            _Tube(aorta, aorta_radius, _BLOOD, _C["aorta"], clearance=4.0 * s),
            _Tube([[cx - 22.0 * s, yb - 0.22 * Bc, z_top], [cx - 22.0 * s, yb - 0.22 * Bc, heart[2] + 30.0 * s]],
                  9.0 * s, _BLOOD, vessel, clearance=3.0 * s),
            _Tube([[cx + 6.0 * s, self.y_vb - self.r_vb - 9.0 * s, z_top],
                   [cx + 10.0 * s, self.y_vb - self.r_vb - 9.0 * s, z_bottom]], 7.0 * s, _MUSCLE, body,
                  clearance=3.0 * s),
            _Tube([[cx, y_trachea, z_top], carina], 10.0 * s, _SKIN, body, clearance=3.0 * s, lumen=0.8,
                  lumen_label=airway),
            _Tube([[cx + 12.0 * s, yb - 0.4 * Bc, heart[2] + 35.0 * s], bifurcation], 12.0 * s, _BLOOD, vessel,
                  clearance=3.0 * s),
        ]
        for side in (_RIGHT, _LEFT):
            tubes.append(_Tube([carina, self.bronchus_ends[side]], 7.0 * s, _SKIN, body, lumen=0.75,
                               lumen_label=airway))
            tubes.append(_Tube([bifurcation, self.artery_hila[side]], 9.0 * s, _BLOOD, vessel, clearance=2.0 * s))
            tubes.append(_Tube([heart + [0.0, 35.0 * s, 10.0 * s], self.vein_hila[side]], 8.0 * s, _BLOOD, vessel,
                               clearance=2.0 * s))
        return tubes

    def _ribs(self, rng) -> List[np.ndarray]:
        """Twelve ribs a side: from the transverse process round the chest wall, falling anteriorly."""
        s, p = self.s, self.power
        ribs = []
        for side in (_RIGHT, _LEFT):
            for n in range(12):
                z0 = self.z_apex - 5.0 * s - n * 20.0 * s + rng.normal(0.0, 1.5) * s
                end = math.radians(-55.0 + n * 2.0 + (45.0 if n >= 10 else 0.0))
                t = np.linspace(math.radians(78.0), end, 16)
                fraction = (t[0] - t) / (t[0] - end)
                z = z0 + 8.0 * s * np.sin(math.pi * fraction) - 55.0 * s * fraction ** 1.5
                narrowing = 0.62 + 0.38 * self._apex_taper(z)  # follow the cavity up to the thoracic inlet
                a_rib = self.Ac * narrowing + self.rib_radius + 2.0 * s
                b_rib = self.Bc * narrowing + self.rib_radius + 2.0 * s
                x = self.cx + side * a_rib * np.abs(np.cos(t)) ** (2.0 / p)
                y = self.y_cavity + b_rib * np.sign(np.sin(t)) * np.abs(np.sin(t)) ** (2.0 / p)
                ribs.append(np.stack([x, y, z], axis=1))
        return ribs

    def grow_trees(self, rng) -> None:
        """Pulmonary arteries and veins (two trees a lung) and the bronchial tree, all inside their own lung."""
        s = self.s
        min_radius = max(0.35, 0.45 * s)
        vessels, airways = [], []
        for side, label in ((_RIGHT, _C["lung_right"]), (_LEFT, _C["lung_left"])):
            def inside(points, label=label):
                return self.lung_at(points) == label
            lobes = ((0.3, -0.5, 1.0), (0.3, 0.5, 1.0), (1.0, 0.0, 0.1), (0.4, -0.5, -1.0), (0.4, 0.6, -1.0))
            for hilum, tilt in ((self.artery_hila[side], 0.0), (self.vein_hila[side], 0.3)):
                root = _find_inside(hilum, (side, 0.0, 0.0), inside, 3.0 * s, 80.0 * s)
                if root is None:
                    continue
                self.hilum_tubes.append(_Tube([hilum, root], 7.0 * s, _BLOOD, _C["vessel"]))
                roots = [(root, (side * d[0], d[1] + tilt, d[2]), 4.5 * s) for d in lobes]
                vessels.append(_grow_tree(rng, roots, inside, min_radius, 2000))
            bronchus = self.bronchus_ends[side]
            root = _find_inside(bronchus, (side, 0.0, 0.0), inside, 3.0 * s, 80.0 * s)
            if root is not None:
                self.hilum_tubes.append(_Tube([bronchus, root], 7.0 * s, _SKIN, _C["body"], lumen=0.75,
                                              lumen_label=_C["airway"]))
                roots = [(root, (side * 0.3, 0.0, 1.0), 4.5 * s), (root, (side * 0.6, 0.3, -1.0), 5.0 * s)]
                airways.append(_grow_tree(rng, roots, inside, max(1.0, 1.2 * s), 120))
        self.vessels = np.vstack(vessels) if vessels else np.zeros((0, 8))
        self.airways = np.vstack(airways) if airways else np.zeros((0, 8))

    # -- drawing -------------------------------------------------------------------------------------------------
    def paint_slab(self, canvas: _Canvas, box) -> None:
        body, bone = self.body_label, self.bone_label
        self.paint_table(canvas, box)
        self.paint_body(canvas, box, cavity_hu=_FAT)
        x, y, z = canvas.grid.coordinates(box)
        s = self.s
        cavity = self.cavity_rho(x, y, 0.0, z) <= 1.0
        narrowed = (self.cavity_rho(x, y) <= 1.0) & ~cavity & (
            (x - self.cx) ** 2 + (y - self.y_vb) ** 2 > (self.r_vb + 2.0 * s) ** 2)
        canvas.fill(box, narrowed, _MUSCLE, body, over=[body])  # chest wall thickens towards the inlet
        diaphragm = np.where(x < self.cx, self._dome(_RIGHT, x, y), self._dome(_LEFT, x, y))
        canvas.fill(box, cavity & (z <= diaphragm), 55.0, body, over=[body])  # liver, stomach under the domes
        sternum_y = self.y_cavity - self.Bc - 5.0 * s
        sternum = (((x - self.cx) / (15.0 * s)) ** 2 + ((y - sternum_y) / (6.0 * s)) ** 2 <= 1.0) \
            & (z > self.z_recess + 60.0 * s) & (z < self.z_apex - 5.0 * s)
        canvas.fill(box, sternum, 0.7 * _CORTEX, bone, over=[body])
        heart = _ellipsoid_rho2(x, y, z, self.heart_center, self.heart_semi, self.heart_angle) <= 1.0
        canvas.fill(box, heart, _BLOOD, _C["heart"], over=[body])
        lungs = self.lung_side(x, y, z)
        hu = _LUNG + 35.0 * (y - self.y_cavity) / self.Bc  # dependent (posterior) lung is denser
        canvas.fill(box, lungs == _C["lung_right"], hu, _C["lung_right"])
        canvas.fill(box, lungs == _C["lung_left"], hu, _C["lung_left"])

    def paint_structures(self, canvas: _Canvas) -> None:
        lungs = [_C["lung_right"], _C["lung_left"]]
        soft = [self.body_label, _C["heart"], _C["vessel"], _C["aorta"], *lungs]
        for tube in self.tubes:  # a fat cuff keeps the lungs off the mediastinal tubes
            if tube.clearance > 0:
                _paint_tube(canvas, tube.points, tube.radius + tube.clearance, _FAT, self.body_label, over=lungs)
        for tube in [*self.tubes, *self.hilum_tubes]:
            tube.paint(canvas, over=soft + [_C["airway"]])
        for rib in self.ribs:
            _paint_tube(canvas, rib, self.rib_radius, _CORTEX, self.bone_label, over=[self.body_label])
            _paint_tube(canvas, rib, 0.55 * self.rib_radius, _CANCELLOUS, self.bone_label, over=[self.bone_label])
        in_lung = lungs + [_C["vessel"], _C["airway"]]
        _paint_segments(canvas, self.vessels, _BLOOD, _C["vessel"], over=in_lung)
        _paint_segments(canvas, self.airways, _SKIN, None, over=in_lung, radius_scale=1.3, radius_add=0.3)
        _paint_segments(canvas, self.airways, _AIR, _C["airway"], over=in_lung)


# ----------------------------------------------------------------------------------------------------------------
# Lesions


@dataclass
class _Placed:
    center: np.ndarray
    radius: float
    spec: Union[NoduleSpec, TumourSpec]


def _random_points_inside(rng, low, high, inside: Callable, count: int = 4096) -> np.ndarray:
    points = rng.uniform(low, high, size=(count, 3))
    return points[inside(points)]


def _clear_of(center, radius, placed: Sequence[_Placed], gap: float) -> bool:
    return all(np.linalg.norm(center - other.center) >= radius + other.radius + gap for other in placed)


def _gap_to_segments(center, segments: np.ndarray, min_segment_radius: float = 0.0) -> float:
    """Smallest distance from ``center`` to the surface of the segments at least ``min_segment_radius`` thick."""
    rows = segments[segments[:, 6] >= min_segment_radius] if len(segments) else segments
    if len(rows) == 0:
        return math.inf
    distance, t = _distance_to_segments(center[None], rows[:, 0:3], rows[:, 3:6])
    return float((distance[0] - (rows[:, 6] + t[0] * (rows[:, 7] - rows[:, 6]))).min())


def log_uniform_diameter_mm(rng, low: float, high: float) -> float:
    """A diameter drawn uniformly in log scale (as many small lesions as large ones per size octave), 0.1 mm steps."""
    return float(round(math.exp(rng.uniform(math.log(low), math.log(high))), 1))


def _nodule_specs(nodules, rng, max_diameter: float) -> List[NoduleSpec]:
    """The requested nodules: None -> one of each type, N -> a deterministic mix, or a list of ``NoduleSpec``."""
    if nodules is None:
        nodules = 3
    if isinstance(nodules, (int, np.integer)) and not isinstance(nodules, bool):
        if not 0 <= nodules <= 50:
            raise InputError(f"nodules must be between 0 and 50, got {nodules}")
        type_offset, location_offset = rng.integers(0, 3, size=2)
        low, high = NODULE_DIAMETER_RANGE_MM[0], max(NODULE_DIAMETER_RANGE_MM[0], max_diameter)
        return [NoduleSpec(diameter_mm=log_uniform_diameter_mm(rng, low, high),
                           type=NODULE_TYPES[(k + type_offset) % 3],
                           location=NODULE_LOCATIONS[(k + location_offset + k // 3) % 3])
                for k in range(int(nodules))]
    specs = list(nodules) if isinstance(nodules, (list, tuple)) else [nodules]
    for spec in specs:
        if not isinstance(spec, NoduleSpec):
            raise InputError(f"nodules must be None, an int or a list of NoduleSpec, got {spec!r}")
        _check_diameter("nodule", spec.diameter_mm, NODULE_DIAMETER_RANGE_MM)
        if spec.type not in NODULE_TYPES:
            raise InputError(f"nodule type must be one of {NODULE_TYPES}, got {spec.type!r}")
        if spec.location not in NODULE_LOCATIONS:
            raise InputError(f"nodule location must be one of {NODULE_LOCATIONS}, got {spec.location!r}")
    return specs


def _check_diameter(kind: str, diameter_mm, limits) -> None:
    if not (isinstance(diameter_mm, (int, float, np.number)) and limits[0] <= float(diameter_mm) <= limits[1]):
        raise InputError(f"{kind} diameter must be within {limits[0]:g}-{limits[1]:g} mm, got {diameter_mm!r}")


def _place_nodules(chest: _Chest, specs: Sequence[NoduleSpec], rng) -> List[_Placed]:
    """Centres for the nodules inside the lungs, where each one's location asks, not touching each other."""
    def inside(points):
        return chest.lung_at(points) > 0
    low = [chest.cx - chest.Ac, chest.yb - chest.Bc, chest.z_recess]
    high = [chest.cx + chest.Ac, chest.yb + chest.Bc, chest.z_apex]
    pool = _random_points_inside(rng, low, high, inside)
    ball = _ball_points(rng)
    vessels = chest.vessels
    big = vessels[vessels[:, 6] >= min(1.5, 0.5 * vessels[:, 6].max())] if len(vessels) else vessels
    placed: List[_Placed] = []
    for spec in specs:
        radius = float(spec.diameter_mm) / 2.0
        if spec.center_lps_mm is not None:
            center = np.asarray(spec.center_lps_mm, float)
            if not inside(center[None])[0]:
                raise InputError(f"nodule centre {tuple(spec.center_lps_mm)} mm is not inside a lung")
            placed.append(_Placed(center, radius, spec))
            continue
        for attempt in range(400):
            start = pool[rng.integers(len(pool))]
            center = _nodule_center(chest, spec.location, start, radius, big, rng, inside)
            if center is None or not _clear_of(center, radius, placed, 2.0):
                continue
            if _gap_to_segments(center, chest.airways) < radius + 1.0:
                continue
            ball_inside = inside(center + ball * radius).mean()
            if ball_inside < (0.85 if spec.location == "juxta-pleural" else 1.0):
                continue
            if spec.location == "isolated":
                threshold = 1.2 if attempt < 200 else 2.5
                if _gap_to_segments(center, vessels, threshold) < radius + 1.0:
                    continue
            placed.append(_Placed(center, radius, spec))
            break
        else:
            raise InputError(f"could not place a {spec.diameter_mm:g} mm {spec.location} nodule in these lungs; "
                             f"use a smaller nodule or a larger field of view")
    return placed


def _nodule_center(chest: _Chest, location: str, start, radius: float, big_vessels, rng, inside):
    """A candidate centre for ``location`` near ``start`` (None when this start does not work)."""
    if location == "isolated":
        distance, _ = _nearest_boundary(start, inside, radius + 5.5)
        return start if distance >= radius + 5.0 else None
    if location == "juxta-pleural":
        overlap = max(0.8, 0.08 * radius)
        center = start
        for _ in range(3):  # walk towards the nearest pleura until the surface just crosses it
            distance, direction = _nearest_boundary(center, inside, 120.0 * chest.s + radius)
            center = center + direction * (distance - (radius - overlap))
        distance, _ = _nearest_boundary(center, inside, radius + 1.0)
        return center if radius - 2.0 * overlap - 0.5 <= distance <= radius else None
    if len(big_vessels) == 0:
        return None
    row = big_vessels[rng.integers(len(big_vessels))]
    t = rng.uniform(0.2, 0.8)
    axis = row[3:6] - row[0:3]
    vessel_radius = row[6] + t * (row[7] - row[6])
    side = _unit(np.cross(axis, rng.normal(size=3)))
    center = row[0:3] + t * axis + side * (vessel_radius + radius - (0.3 * vessel_radius + 0.3))
    distance, _ = _nearest_boundary(center, inside, radius + 4.5)
    return center if distance >= radius + 4.0 else None


def _mark_center(canvas: _Canvas, center, lesion_id: int, label: int) -> None:
    """Label the voxel holding a lesion's centre, so a lesion smaller than a voxel still has truth on the grid."""
    index = np.rint(canvas.grid.inverse @ (np.asarray(center, float) - canvas.grid.origin)).astype(int)
    if np.all((index >= 0) & (index < canvas.grid.size)):
        canvas.lesions[index[2], index[1], index[0]] = lesion_id
        canvas.labels[index[2], index[1], index[0]] = label


def _paint_nodule(canvas: _Canvas, placed: _Placed, lesion_id: int, rng) -> float:
    """Paint one nodule; returns the diameter of its solid part (``NoduleTruth.solid_diameter_mm``)."""
    over = [_C["body"], _C["lung_right"], _C["lung_left"], _C["vessel"], _C["airway"], _C["nodule"]]
    kind = placed.spec.type
    solid_radius = placed.radius if kind == "solid" else 0.0
    box, coverage = _sphere_coverage(canvas.grid, placed.center, placed.radius)
    if box is None:
        return 2.0 * solid_radius
    if kind == "solid":
        canvas.blend(box, coverage, rng.uniform(10.0, 50.0), _C["nodule"], over, lesion=lesion_id)
    else:
        canvas.blend(box, coverage, rng.uniform(-650.0, -430.0), _C["nodule"], over, lesion=lesion_id, lighten=True)
    if kind == "part-solid":
        solid_radius = placed.radius * rng.uniform(0.35, 0.6)
        box, core = _sphere_coverage(canvas.grid, placed.center, solid_radius)
        canvas.blend(box, core, rng.uniform(0.0, 40.0), _C["nodule"], over, lesion=lesion_id)
    _mark_center(canvas, placed.center, lesion_id, _C["nodule"])
    return 2.0 * solid_radius


# ----------------------------------------------------------------------------------------------------------------
# Abdomen


class _Abdomen(_Torso):
    """Adult upper abdomen at scale ``s`` (portal venous phase): liver with portal and hepatic vein trees, spleen,
    kidneys, stomach, bowel, aorta, IVC, spine."""

    body_label, bone_label, table_label = _A["body"], _A["bone"], _A["table"]

    def __init__(self, grid: _Grid, rng, s: float) -> None:
        super().__init__(grid, rng, s, 165.0, 120.0, (12.0, 30.0), spine_inset=26.0, spine_radius=20.0)
        cx, yb, Ac, Bc = self.cx, self.y_cavity, self.Ac, self.Bc
        self.z_top, self.z_bottom = self.cz + 130.0 * s, self.cz - 130.0 * s
        jitter = lambda: rng.uniform(0.93, 1.07)  # noqa: E731
        self.liver_parts = [  # right lobe filling the right upper quadrant, left lobe reaching over the stomach
            (np.array([cx - 50.0 * s, yb - 5.0 * s, self.z_top - 72.0 * s]),
             np.array([100.0, 85.0, 75.0]) * s * jitter()),
            (np.array([cx + 25.0 * s, yb - 45.0 * s, self.z_top - 55.0 * s]),
             np.array([70.0, 40.0, 35.0]) * s * jitter()),
        ]
        self.liver_floor = (cx - 130.0 * s, self.z_top - 150.0 * s, 0.35)  # inferior surface rises to the left
        self.spleen = (np.array([cx + 0.72 * Ac, yb + 0.3 * Bc, self.z_top - 80.0 * s]),
                       np.array([24.0, 55.0, 48.0]) * s * jitter(), math.radians(-35.0))
        self.kidneys = {side: (np.array([cx + side * 64.0 * s, yb + 0.5 * Bc, self.z_top - (170.0 if side == _RIGHT
                                                                                          else 155.0) * s]),
                               np.array([27.0, 23.0, 52.0]) * s * jitter(), math.radians(side * 30.0))
                        for side in (_RIGHT, _LEFT)}
        self.stomach = (np.array([cx + 58.0 * s, yb - 38.0 * s, self.z_top - 70.0 * s]),
                        np.array([42.0, 32.0, 45.0]) * s, math.radians(30.0))
        self.aorta_xy = np.array([cx + 14.0 * s, self.y_vb - self.r_vb - 12.0 * s])
        self.ivc_xy = np.array([cx - 26.0 * s, self.y_vb - self.r_vb - 10.0 * s])
        self.aorta_radius, self.ivc_radius = 11.0 * s, 12.0 * s
        self.bowel = self._bowel_loops(rng)
        self.portal = np.zeros((0, 8))
        self.hepatic = np.zeros((0, 8))
        self.vessel_tubes: List[_Tube] = []

    def liver_at_xyz(self, x, y, z):
        """The liver: two lobes clipped to the abdominal wall, kept off the spine, aorta, IVC, kidney and spleen."""
        s = self.s
        inside = np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y), np.shape(z)), dtype=bool)
        for center, semi in self.liver_parts:
            inside |= _ellipsoid_rho2(x, y, z, center, semi) <= 1.0
        dome = self.z_top - 30.0 * s * (((x - self.cx + 50.0 * s) / (110.0 * s)) ** 2
                                        + ((y - self.y_cavity) / (90.0 * s)) ** 2)
        inside &= (self.cavity_rho(x, y, inset=2.0 * s) <= 1.0) & (z <= dome)
        floor_x, floor_z, slope = self.liver_floor
        inside &= z >= floor_z + slope * (x - floor_x)
        inside &= (x - self.cx) ** 2 + (y - self.y_vb) ** 2 > (self.r_vb + 10.0 * s) ** 2
        inside &= (x - self.aorta_xy[0]) ** 2 + (y - self.aorta_xy[1]) ** 2 > (self.aorta_radius + 6.0 * s) ** 2
        inside &= (x - self.ivc_xy[0]) ** 2 + (y - self.ivc_xy[1]) ** 2 > (self.ivc_radius + 2.0 * s) ** 2
        kidney_center, kidney_semi, kidney_angle = self.kidneys[_RIGHT]
        inside &= _ellipsoid_rho2(x, y, z, kidney_center, kidney_semi + 4.0 * s, kidney_angle) > 1.0
        spleen_center, spleen_semi, spleen_angle = self.spleen
        inside &= _ellipsoid_rho2(x, y, z, spleen_center, spleen_semi + 4.0 * s, spleen_angle) > 1.0
        return inside

    def liver_at(self, points) -> np.ndarray:
        points = np.asarray(points, float)
        return self.liver_at_xyz(points[:, 0], points[:, 1], points[:, 2])

    def liver_bounds(self):
        lows, highs = zip(*(_ellipsoid_box(c, semi) for c, semi in self.liver_parts))
        return np.min(lows, axis=0), np.max(highs, axis=0)

    def _bowel_loops(self, rng) -> List[np.ndarray]:
        """Random walks through the lower cavity, smooth, kept away from the wall."""
        s, loops = self.s, []
        for _ in range(7):
            point = np.array([self.cx + rng.uniform(-0.6, 0.6) * self.Ac,
                              self.y_cavity + rng.uniform(-0.7, 0.1) * self.Bc,
                              rng.uniform(self.z_bottom, self.z_top - 150.0 * s)])
            heading = _unit(rng.normal(size=3))
            points = [point]
            for _ in range(10):
                heading = _unit(heading + 0.8 * rng.normal(size=3))
                candidate = points[-1] + heading * 18.0 * s
                if self.cavity_rho(candidate[0], candidate[1]) > 0.7 or candidate[1] > self.y_cavity + 0.2 * self.Bc:
                    heading = -heading
                    continue
                points.append(candidate)
            if len(points) > 2:
                loops.append(np.array(points))
        return loops

    def grow_trees(self, rng) -> None:
        """Portal vein from the confluence through the hilum, hepatic veins draining to the IVC; never touching."""
        s, cx, yb = self.s, self.cx, self.y_cavity
        inside = self.liver_at
        portal_label, hepatic_label = _A["portal_vein"], _A["hepatic_vein"]
        confluence = np.array([cx + 2.0 * s, yb + 0.1 * self.Bc, self.z_top - 175.0 * s])
        hilum = np.array([cx - 25.0 * s, yb - 12.0 * s, self.z_top - 125.0 * s])
        spleen_hilum = self.spleen[0] + np.array([-22.0 * s, -10.0 * s, -5.0 * s])
        self.vessel_tubes = [
            _Tube([confluence, hilum], 7.0 * s, 170.0, portal_label),
            _Tube([spleen_hilum, confluence], 5.0 * s, 170.0, portal_label),
            _Tube([confluence, [cx + 6.0 * s, yb - 15.0 * s, self.z_bottom - 20.0 * s]], 6.0 * s, 170.0, portal_label),
        ]
        root = _find_inside(hilum, (-1.0, 0.2, 0.4), inside, 3.0 * s, 60.0 * s)
        if root is not None:
            self.vessel_tubes.append(_Tube([hilum, root], 7.0 * s, 170.0, portal_label))
            roots = [(root, (-1.0, 0.3, 0.35), 7.0 * s), (root, (1.0, -0.8, 0.5), 5.5 * s),
                     (root, (0.0, -1.0, 0.6), 5.0 * s)]
            self.portal = _grow_tree(rng, roots, inside, 0.9, 350)
        ivc_top = np.array([self.ivc_xy[0], self.ivc_xy[1], self.z_top - 22.0 * s])
        hepatic_roots = []
        for direction, radius in (((-1.0, -0.2, -0.5), 6.0), ((-0.3, -1.0, -0.5), 5.0), ((0.7, -1.0, -0.2), 5.0)):
            flat = _unit([direction[0], direction[1], 0.0])
            root = _find_inside(ivc_top + flat * (self.ivc_radius + 2.0 * s), direction, inside, 2.0 * s, 40.0 * s)
            if root is not None:
                self.vessel_tubes.append(_Tube([ivc_top, root], radius * s, 160.0, hepatic_label))
                hepatic_roots.append((root, direction, radius * s))
        self.hepatic = _grow_tree(rng, hepatic_roots, inside, 0.9, 350, avoid=_tree_avoider(self.portal, 1.5))

    def paint_slab(self, canvas: _Canvas, box) -> None:
        self.paint_table(canvas, box)
        self.paint_body(canvas, box, cavity_hu=_FAT)
        x, y, z = canvas.grid.coordinates(box)
        s, body = self.s, self.body_label
        grow = np.clip((self.z_top - 110.0 * s - z) / (120.0 * s), 0.0, 1.0)
        for side in (_RIGHT, _LEFT):  # psoas, from the upper lumbar spine downwards
            psoas = ((x - self.cx - side * (self.r_vb + 15.0 * s)) / (15.0 * s * (0.4 + 0.8 * grow))) ** 2 \
                + ((y - self.y_vb - 2.0 * s) / (13.0 * s * (0.4 + 0.8 * grow))) ** 2
            canvas.fill(box, (psoas <= 1.0) & (grow > 0), _MUSCLE, body, over=[body])

    def paint_organs(self, canvas: _Canvas) -> None:
        s, body, grid = self.s, self.body_label, canvas.grid
        for loop in self.bowel:
            _paint_tube(canvas, loop, 11.0 * s, _MUSCLE - 5.0, body, over=[body])
        for n, loop in enumerate(self.bowel):
            _paint_tube(canvas, loop, 8.0 * s, _AIR if n % 3 == 0 else 20.0, body, over=[body])
        center, semi, angle = self.stomach
        box = grid.box(*_ellipsoid_box(center, semi))
        if box is not None:
            x, y, z = grid.coordinates(box)
            canvas.fill(box, _ellipsoid_rho2(x, y, z, center, semi, angle) <= 1.0, _MUSCLE - 5.0, body, over=[body])
            lumen = _ellipsoid_rho2(x, y, z, center, semi - 4.0 * s, angle) <= 1.0
            canvas.fill(box, lumen, np.where(z > center[2] + 12.0 * s, _AIR, 15.0), body, over=[body])
        low, high = self.liver_bounds()
        box = grid.box(low, high)
        if box is not None:
            x, y, z = grid.coordinates(box)
            canvas.fill(box, self.liver_at_xyz(x, y, z), 105.0, _A["liver"], over=[body])
        center, semi, angle = self.spleen
        box = grid.box(*_ellipsoid_box(center, semi))
        if box is not None:
            x, y, z = grid.coordinates(box)
            inside = (_ellipsoid_rho2(x, y, z, center, semi, angle) <= 1.0) & (self.cavity_rho(x, y, 2.0 * s) <= 1.0)
            canvas.fill(box, inside, 115.0, _A["spleen"], over=[body])
        for side, label in ((_RIGHT, _A["kidney_right"]), (_LEFT, _A["kidney_left"])):
            center, semi, angle = self.kidneys[side]
            box = grid.box(*_ellipsoid_box(center, semi))
            if box is None:
                continue
            x, y, z = grid.coordinates(box)
            canvas.fill(box, _ellipsoid_rho2(x, y, z, center, semi, angle) <= 1.0, 180.0, label, over=[body])
            canvas.fill(box, _ellipsoid_rho2(x, y, z, center, semi, angle) <= 0.42, 120.0, label, over=[label])
            sinus_center = center + np.array([-side * 0.55 * semi[0], -0.2 * semi[1], 0.0])
            sinus = _ellipsoid_rho2(x, y, z, sinus_center, semi * [0.4, 0.4, 0.5], angle) <= 1.0
            canvas.fill(box, sinus, -60.0, body, over=[label])
        soft = [body, _A["liver"], _A["portal_vein"], _A["hepatic_vein"]]
        z_far = [self.z_bottom - 300.0 * s, self.z_top + 300.0 * s]
        _paint_tube(canvas, [[*self.aorta_xy, z_far[0]], [*self.aorta_xy, z_far[1]]], self.aorta_radius, 180.0,
                    _A["aorta"], over=soft)
        _paint_tube(canvas, [[*self.ivc_xy, z_far[0]], [*self.ivc_xy, z_far[1]]], self.ivc_radius, 140.0,
                    _A["inferior_vena_cava"], over=soft)
        for tube in self.vessel_tubes:
            tube.paint(canvas, over=soft)
        in_liver = [_A["liver"], _A["portal_vein"], _A["hepatic_vein"]]
        _paint_segments(canvas, self.portal, 170.0, _A["portal_vein"], over=in_liver)
        _paint_segments(canvas, self.hepatic, 160.0, _A["hepatic_vein"], over=in_liver)


def _tumour_specs(tumours, rng, max_diameter: float) -> List[TumourSpec]:
    if tumours is None:
        tumours = 2
    if isinstance(tumours, (int, np.integer)) and not isinstance(tumours, bool):
        if not 0 <= tumours <= 20:
            raise InputError(f"tumours must be between 0 and 20, got {tumours}")
        low, high = TUMOUR_DIAMETER_RANGE_MM[0], max(TUMOUR_DIAMETER_RANGE_MM[0], max_diameter)
        return [TumourSpec(log_uniform_diameter_mm(rng, low, high))
                for _ in range(int(tumours))]
    specs = list(tumours) if isinstance(tumours, (list, tuple)) else [tumours]
    for spec in specs:
        if not isinstance(spec, TumourSpec):
            raise InputError(f"tumours must be None, an int or a list of TumourSpec, got {spec!r}")
        _check_diameter("tumour", spec.diameter_mm, TUMOUR_DIAMETER_RANGE_MM)
    return specs


def _place_tumours(abdomen: _Abdomen, specs: Sequence[TumourSpec], rng) -> List[_Placed]:
    """Centres for the tumours inside the liver, 2 mm clear of its surface and 3 mm clear of each other."""
    pool = _random_points_inside(rng, *abdomen.liver_bounds(), abdomen.liver_at)
    placed: List[_Placed] = []
    for spec in specs:
        radius = float(spec.diameter_mm) / 2.0
        if spec.center_lps_mm is not None:
            center = np.asarray(spec.center_lps_mm, float)
            if not abdomen.liver_at(center[None])[0]:
                raise InputError(f"tumour centre {tuple(spec.center_lps_mm)} mm is not inside the liver")
            placed.append(_Placed(center, radius, spec))
            continue
        candidates = pool[rng.permutation(len(pool))[:400]]
        for center in candidates:
            if _clear_of(center, radius, placed, 3.0) and \
                    _nearest_boundary(center, abdomen.liver_at, radius + 2.5)[0] >= radius + 2.0:
                placed.append(_Placed(center, radius, spec))
                break
        else:
            raise InputError(f"could not place a {spec.diameter_mm:g} mm tumour in this liver; use a smaller tumour "
                             f"or a larger field of view")
    return placed


# ----------------------------------------------------------------------------------------------------------------
# Validation, image formation, entry points


def _validated_grid(size_ijk, spacing_mm, origin_mm, direction) -> _Grid:
    try:
        size = [int(v) for v in size_ijk]
        exact = all(float(v) == int(v) for v in size_ijk)
    except (TypeError, ValueError):
        raise InputError(f"size_ijk must be three integers, got {size_ijk!r}") from None
    if len(size) != 3 or not exact:
        raise InputError(f"size_ijk must be three integers, got {size_ijk!r}")
    if any(v < MIN_SIZE for v in size):
        raise InputError(f"size_ijk must be at least {MIN_SIZE} voxels along each axis, got {tuple(size)}")
    if any(v > limit for v, limit in zip(size, MAX_SIZE_IJK)):
        raise InputError(f"size_ijk {tuple(size)} is above the limit {MAX_SIZE_IJK}")
    spacing = three_numbers(spacing_mm, "spacing_mm")
    if np.any(spacing <= 0):
        raise InputError(f"spacing_mm must be positive, got {tuple(spacing)}")
    origin = None if origin_mm is None else three_numbers(origin_mm, "origin_mm")
    matrix = np.eye(3) if direction is None else np.asarray(direction, dtype=float)
    if matrix.size != 9 or not np.all(np.isfinite(matrix)) or \
            not np.allclose(matrix.reshape(3, 3) @ matrix.reshape(3, 3).T, np.eye(3), atol=1e-6):
        raise InputError(f"direction must be an orthonormal 3 x 3 matrix (9 values, row-major), got {direction!r}")
    return _Grid(size, spacing, origin, matrix.reshape(3, 3))


def _scale(grid: _Grid, patient_scale, width_mm: float, depth_mm: float, height_mm: float) -> float:
    """The anatomy scale: ``patient_scale`` if given, else the largest (<= 1, adult) that fits the field of view."""
    if patient_scale is None:
        patient_scale = min(1.0, 0.86 * grid.extent[0] / (1.03 * width_mm),
                            0.9 * grid.extent[1] / (1.04 * depth_mm + 50.0), 0.95 * grid.extent[2] / height_mm)
        if patient_scale < 0.2:
            raise InputError(f"the field of view {tuple(np.round(grid.extent, 1))} mm is too small for a phantom; "
                             f"it needs at least {0.2 * width_mm / 0.86:.0f} mm across")
    elif not 0.2 <= float(patient_scale) <= 1.5:
        raise InputError(f"patient_scale must be within 0.2-1.5, got {patient_scale!r}")
    return float(patient_scale)


def _check_imaging(noise_sigma_hu, psf_fwhm_mm, padding_hu) -> None:
    if not (np.isfinite(noise_sigma_hu) and 0 <= noise_sigma_hu <= 500):
        raise InputError(f"noise_sigma_hu must be within 0-500 HU, got {noise_sigma_hu!r}")
    if not (np.isfinite(psf_fwhm_mm) and 0 <= psf_fwhm_mm <= 20):
        raise InputError(f"psf_fwhm_mm must be within 0-20 mm, got {psf_fwhm_mm!r}")
    if padding_hu is not None and not -32768 <= padding_hu <= 32767:
        raise InputError(f"padding_hu must fit int16, got {padding_hu!r}")


def _form_image(canvas: _Canvas, rng, noise_sigma_hu: float, psf_fwhm_mm: float, padding_hu,
                progress: Progress) -> np.ndarray:
    """Blur by the PSF and the voxel box, add correlated noise, clip like a scanner, pad outside the circle; int16."""
    grid, image = canvas.grid, canvas.image
    sigma_mm = psf_fwhm_mm / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    for axis, spacing in zip((2, 1, 0), grid.spacing):  # spacing is i, j, k; array axes are k, j, i
        sigma = math.sqrt(sigma_mm ** 2 + spacing ** 2 / 12.0) / spacing
        ndimage.gaussian_filter1d(image, sigma, axis=axis, output=image, mode="nearest", truncate=3.0)
        progress.report(0.3 + 0.2 * (3 - axis) / 3, "Blurring")
    grain = 0.6  # noise correlation in voxels, in-plane, like filtered back projection
    kernel = ndimage.gaussian_filter1d(np.eye(1, 15, 7).ravel(), grain, truncate=3.0)
    gain = noise_sigma_hu / float(np.sum(kernel ** 2))
    out = np.empty(grid.shape, dtype=np.int16)
    slabs = list(grid.slabs(32))
    for n, box in enumerate(slabs):
        slab = image[box]
        if noise_sigma_hu > 0:
            noise = rng.standard_normal(slab.shape, dtype=np.float32)
            ndimage.gaussian_filter(noise, (0, grain, grain), output=noise, truncate=3.0)
            slab += noise * np.float32(gain)
        np.clip(np.rint(slab), -1024, 3071, out=slab)
        out[box] = slab
        progress.report(0.5 + 0.45 * (n + 1) / len(slabs), "Adding noise")
    if padding_hu is not None:
        j, i = np.ogrid[0:grid.shape[1], 0:grid.shape[2]]
        radius = min(grid.shape[1], grid.shape[2]) / 2.0
        outside = (i - (grid.shape[2] - 1) / 2.0) ** 2 + (j - (grid.shape[1] - 1) / 2.0) ** 2 > radius ** 2
        out[:, outside] = padding_hu
        canvas.labels[:, outside] = 0
        canvas.lesions[:, outside] = 0
    return out


def _to_image(array: np.ndarray, grid: _Grid) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(v) for v in grid.spacing))
    image.SetOrigin(tuple(float(v) for v in grid.origin))
    image.SetDirection(tuple(float(v) for v in grid.direction.ravel()))
    return image


def _streams(seed: int):
    """Independent random streams: anatomy, trees, lesions, noise (changing the lesions keeps the anatomy)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    return [np.random.default_rng(child) for child in np.random.SeedSequence(int(seed)).spawn(4)]


def _paint_slabs(canvas: _Canvas, anatomy, progress: Progress) -> None:
    slabs = list(canvas.grid.slabs())
    for n, box in enumerate(slabs):
        anatomy.paint_slab(canvas, box)
        progress.report(0.05 + 0.15 * (n + 1) / len(slabs), "Drawing the body")


def _mask_volumes_ml(canvas: _Canvas, count: int) -> np.ndarray:
    return np.bincount(canvas.lesions.ravel(), minlength=count + 1) * canvas.grid.voxel_volume_ml


def make_chest_ct(size_ijk: Sequence[int] = (160, 160, 96), spacing_mm: Sequence[float] = (0.8, 0.8, 2.5),
                  seed: int = 0, nodules: Union[None, int, Sequence[NoduleSpec]] = None, *,
                  origin_mm: Optional[Sequence[float]] = None, direction: Optional[Sequence[float]] = None,
                  noise_sigma_hu: float = 15.0, psf_fwhm_mm: float = 1.0, padding_hu: Optional[int] = None,
                  patient_scale: Optional[float] = None, progress: Optional[Progress] = None) -> Phantom:
    """A chest CT (int16 HU, LPS) with organ labels, nodule instance labels and nodule truth.

    ``nodules``: None -> three nodules (one of each type), N -> a deterministic mix of N (sizes 3-30 mm, capped
    to the lung size; types and locations cycle so each appears once N >= 3), or a list of ``NoduleSpec``.
    ``origin_mm`` None centres the volume on (0, 0, 0); ``direction`` is 9 row-major values (identity by default).
    ``padding_hu`` (e.g. -2048) fills outside the reconstruction circle; labels there are 0.
    """
    progress = as_progress(progress)
    grid = _validated_grid(size_ijk, spacing_mm, origin_mm, direction)
    _check_imaging(noise_sigma_hu, psf_fwhm_mm, padding_hu)
    anatomy_rng, tree_rng, lesion_rng, noise_rng = _streams(seed)
    chest = _Chest(grid, anatomy_rng, _scale(grid, patient_scale, 354.0, 232.0, 300.0))
    specs = _nodule_specs(nodules, lesion_rng, min(NODULE_DIAMETER_RANGE_MM[1], 0.25 * chest.Ac))
    progress.report(0.0, "Growing vessel and airway trees")
    chest.grow_trees(tree_rng)
    placed = _place_nodules(chest, specs, lesion_rng)
    canvas = _Canvas(grid)
    _paint_slabs(canvas, chest, progress)
    chest.paint_structures(canvas)
    solid_diameters_mm = [_paint_nodule(canvas, nodule, n + 1, lesion_rng) for n, nodule in enumerate(placed)]
    progress.report(0.3, "Forming the image")
    pixels = _form_image(canvas, noise_rng, noise_sigma_hu, psf_fwhm_mm, padding_hu, progress)
    volumes = _mask_volumes_ml(canvas, len(placed))
    truths = [NoduleTruth(id=n + 1, center_lps_mm=tuple(float(v) for v in p.center),
                          diameter_mm=float(p.spec.diameter_mm),
                          type=p.spec.type, location=p.spec.location,
                          volume_ml=math.pi * float(p.spec.diameter_mm) ** 3 / 6000.0,
                          mask_volume_ml=float(volumes[n + 1]), solid_diameter_mm=solid_diameters_mm[n])
              for n, p in enumerate(placed)]
    phantom = Phantom(image=_to_image(pixels, grid), labels=_to_image(canvas.labels, grid),
                      label_names=dict(CHEST_LABELS), lesion_labels=_to_image(canvas.lesions, grid),
                      nodules=truths, seed=int(seed))
    progress.report(1.0, "Chest phantom ready")
    return phantom


def make_abdomen_ct(size_ijk: Sequence[int] = (160, 160, 96), spacing_mm: Sequence[float] = (2.5, 2.5, 2.5),
                    seed: int = 0, tumours: Union[None, int, Sequence[TumourSpec]] = None, *,
                    origin_mm: Optional[Sequence[float]] = None, direction: Optional[Sequence[float]] = None,
                    noise_sigma_hu: float = 15.0, psf_fwhm_mm: float = 1.0, padding_hu: Optional[int] = None,
                    patient_scale: Optional[float] = None, progress: Optional[Progress] = None) -> Phantom:
    """A portal-venous abdominal CT (int16 HU, LPS) with organ labels, tumour instance labels and tumour truth.

    ``tumours``: None -> two, N -> N hypodense liver tumours (5-40 mm, capped to the liver size), or a list of
    ``TumourSpec``. Other arguments as ``make_chest_ct``.
    """
    progress = as_progress(progress)
    grid = _validated_grid(size_ijk, spacing_mm, origin_mm, direction)
    _check_imaging(noise_sigma_hu, psf_fwhm_mm, padding_hu)
    anatomy_rng, tree_rng, lesion_rng, noise_rng = _streams(seed)
    abdomen = _Abdomen(grid, anatomy_rng, _scale(grid, patient_scale, 343.0, 250.0, 270.0))
    specs = _tumour_specs(tumours, lesion_rng, min(TUMOUR_DIAMETER_RANGE_MM[1], 0.45 * abdomen.liver_parts[0][1].min()))
    progress.report(0.0, "Growing the liver vessel trees")
    abdomen.grow_trees(tree_rng)
    placed = _place_tumours(abdomen, specs, lesion_rng)
    canvas = _Canvas(grid)
    _paint_slabs(canvas, abdomen, progress)
    abdomen.paint_organs(canvas)
    hus = []
    for n, tumour in enumerate(placed):
        hus.append(float(lesion_rng.uniform(30.0, 60.0)))
        box, coverage = _sphere_coverage(grid, tumour.center, tumour.radius)
        if box is not None:
            canvas.blend(box, coverage, hus[-1], _A["tumour"], [_A["liver"], _A["portal_vein"], _A["hepatic_vein"],
                                                              _A["tumour"]], lesion=n + 1)
        _mark_center(canvas, tumour.center, n + 1, _A["tumour"])
    progress.report(0.3, "Forming the image")
    pixels = _form_image(canvas, noise_rng, noise_sigma_hu, psf_fwhm_mm, padding_hu, progress)
    volumes = _mask_volumes_ml(canvas, len(placed))
    truths = [TumourTruth(id=n + 1, center_lps_mm=tuple(float(v) for v in p.center),
                          diameter_mm=float(p.spec.diameter_mm),
                          hu=hus[n], volume_ml=math.pi * float(p.spec.diameter_mm) ** 3 / 6000.0,
                          mask_volume_ml=float(volumes[n + 1])) for n, p in enumerate(placed)]
    phantom = Phantom(image=_to_image(pixels, grid), labels=_to_image(canvas.labels, grid),
                      label_names=dict(ABDOMEN_LABELS), lesion_labels=_to_image(canvas.lesions, grid),
                      tumours=truths, seed=int(seed))
    progress.report(1.0, "Abdomen phantom ready")
    return phantom
