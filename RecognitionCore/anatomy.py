"""Classical segmentation of the chest and trunk on CT: lungs, airways, body, bones, fat and soft tissue.

Hounsfield thresholds, connected components and morphology, no trained model: it runs on any CT in HU, whatever its
orientation, spacing or padding (-2048, -3024 HU outside the scan circle), and returns uint8 masks on the input grid.
NoduleDetect restricts its search to the lungs; OrganSegment offers it as its automatic classical method.

How it stays fast: the CT is put in LPS axis order (a permutation and flips of the voxel grid, so exact) and
block-averaged to about ``WORKING_SPACING_MM``. Structures are found on that coarse copy (components, region growing,
closing); then each boundary is redrawn at full resolution by the HU threshold, only within one coarse voxel of the
coarse boundary (deeper inside, the coarse decision stands). Left and right are patient sides in LPS physical
coordinates (left = +x), whatever the direction matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .errors import InputError
from .preprocessing import body_mask, check_same_grid, replace_padding, validate_ct
from .progress import Progress, as_progress

TRUNK_STRUCTURES: Tuple[str, ...] = ("body", "soft_tissue", "fat", "bones", "lung_right", "lung_left", "airways")
TRUNK_LABELS: Dict[int, str] = {value: name for value, name in enumerate(TRUNK_STRUCTURES, start=1)}

WORKING_SPACING_MM = 2.0
NOMINAL_AIR_HU = -1000.0
LUNG_THRESHOLD_HU = -400.0  # lung parenchyma (about -850 HU) against the chest wall, vessels and mediastinum
BODY_THRESHOLD_HU = -500.0
BONE_THRESHOLD_HU = 250.0
FAT_RANGE_HU = (-190.0, -30.0)
SOFT_TISSUE_MAX_HU = 150.0
LUNG_CLOSING_RADIUS_MM = 10.0
BOUNDARY_SMOOTHING_VOXELS = 0.6  # in-plane Gaussian sigma of the image the lung boundary is drawn on
MIN_BONE_COMPONENT_ML = 0.5
CORTICAL_BONE_HU = 600.0
BONE_MAX_CORTEX_DISTANCE_MM = 6.0

# Telling lungs from bowel gas: parenchyma is air mixed with tissue, at least this far above the scan's own air
# (outside the body), and below LUNG_MAX_MEDIAN_HU; gas in the bowel is within a few tens of HU of that air.
LUNG_MIN_HU_ABOVE_AIR = 60.0
LUNG_MAX_MEDIAN_HU = -500.0
MIN_CORE_VOXELS = 8               # the median is taken one voxel inside a region when that leaves this many
MIN_LUNG_ML = 20.0                # the largest lung region: less than this is no lung (or too little to segment)
MIN_LUNG_PART_FRACTION = 0.1      # further lung regions (other lung, parts cut by the field of view) vs the largest
MIN_LUNG_PART_ML = 1.0
MIN_LUNG_SEPARATION_MM = 40.0     # two regions whose centres are this far apart left-right ...
MAX_LUNG_OVERLAP_FRACTION = 0.3   # ... and that lie side by side are two lungs
MAX_LUNG_SPLIT_EROSIONS = 8       # steps of one coarse voxel while looking for two lungs in one region

# The trachea: a small round air region near the midline in the upper third of the lungs' extent.
TRACHEA_AREA_MM2 = (40.0, 900.0)
TRACHEA_MAX_MIDLINE_OFFSET_MM = 30.0
TRACHEA_MAX_ELONGATION = 2.5
AIRWAY_FIRST_THRESHOLD_ABOVE_AIR_HU = 40.0
AIRWAY_THRESHOLD_STEP_HU = 15.0
AIRWAY_THRESHOLD_STEPS = 8
MAX_AIRWAY_ML = 300.0
AIRWAY_LEAK_FACTOR = 2.0
AIRWAY_LEAK_MIN_ML = 40.0

_BOX = np.ones((3, 3, 3), dtype=bool)


@dataclass
class LungSegmentation:
    """Right and left lung (parenchyma with the vessels, bronchi and nodules inside it; trachea and main/lobar bronchi
    excluded) and the airways, as uint8 masks on the input grid, with their volumes."""

    right: sitk.Image
    left: sitk.Image
    airways: sitk.Image
    right_volume_ml: float
    left_volume_ml: float
    airways_volume_ml: float
    warnings: List[str] = field(default_factory=list)

    @property
    def total_volume_ml(self) -> float:
        return self.right_volume_ml + self.left_volume_ml


# ---------------------------------------------------------------------------------------------------------------------
# Public API


def segment_lungs(image: sitk.Image, progress: Optional[Progress] = None, *,
                  closing_radius_mm: float = LUNG_CLOSING_RADIUS_MM,
                  working_spacing_mm: float = WORKING_SPACING_MM) -> LungSegmentation:
    """Right and left lungs and the airways of a CT in HU.

    Lung air (< -400 HU) enclosed by the body, told from bowel gas by its density; the trachea is found in the
    upper slices and the airways grown from it (threshold raised until the region leaks into the lungs), then cut
    out, which separates the lungs (lungs still touching at the anterior junction, or through bronchi too small to
    grow into, are split by erosion and a watershed). Each lung is closed with a ball of ``closing_radius_mm`` and
    its holes filled: vessels and nodules inside it are in the lung, and so are juxta-pleural nodules narrower than
    the ball (larger ones only in part); the closing also bridges notches of the hilum narrower than the ball.
    Works when only part of the lungs is in the field of view (without the trachea, the airways are empty and a
    warning says so). Raises ``InputError`` when there is no lung.
    """
    progress = as_progress(progress)
    progress.report(0.0, "Preparing the CT")
    workspace = _Workspace(image, working_spacing_mm)
    lungs = _find_lungs(workspace, progress.sub(0.1, 0.95), closing_radius_mm)
    if lungs is None:
        raise InputError(_no_lung_message(workspace))
    progress.report(0.95, "Writing the lung masks")
    result = LungSegmentation(
        right=workspace.to_input(lungs.right), left=workspace.to_input(lungs.left),
        airways=workspace.to_input(lungs.airways),
        right_volume_ml=workspace.volume_ml(lungs.right), left_volume_ml=workspace.volume_ml(lungs.left),
        airways_volume_ml=workspace.volume_ml(lungs.airways), warnings=list(lungs.warnings))
    progress.report(1.0, "Lungs segmented")
    return result


def segment_body(image: sitk.Image, working_spacing_mm: float = WORKING_SPACING_MM) -> sitk.Image:
    """The patient's body (``preprocessing.body_mask``: table removed, lungs and other cavities filled per slice),
    found on the coarse copy, its skin boundary redrawn at full resolution at -500 HU."""
    workspace = _Workspace(image, working_spacing_mm)
    return workspace.to_input(_body(workspace))


def segment_bones(image: sitk.Image, body: Optional[sitk.Image] = None, threshold_hu: float = BONE_THRESHOLD_HU,
                  min_component_ml: float = MIN_BONE_COMPONENT_ML) -> sitk.Image:
    """Bone: voxels at or above ``threshold_hu`` inside the body (``segment_body`` when None) and within
    ``BONE_MAX_CORTEX_DISTANCE_MM`` of cortical bone (>= 600 HU), connected components smaller than
    ``min_component_ml`` dropped (calcifications, noise), marrow enclosed by cortex filled. Iodinated contrast is
    kept out except for a rim where enhanced vessels touch the skeleton, and where it is denser than cortex."""
    workspace = _Workspace(image)
    body_array = _body(workspace) if body is None else workspace.from_input(body, "body mask")
    return workspace.to_input(_bones(workspace, body_array, threshold_hu, min_component_ml))


def segment_fat_and_soft_tissue(image: sitk.Image, body: sitk.Image, exclude: Sequence[sitk.Image] = (),
                                fat_range_hu: Tuple[float, float] = FAT_RANGE_HU,
                                soft_tissue_max_hu: float = SOFT_TISSUE_MAX_HU) -> Tuple[sitk.Image, sitk.Image]:
    """(fat, soft_tissue) inside ``body`` and outside the ``exclude`` masks (lungs, airways, bones: their vessels and
    marrow are not counted): fat within ``fat_range_hu`` (inclusive), soft tissue above it up to
    ``soft_tissue_max_hu``."""
    validate_ct(image)
    check_same_grid(image, body, "body mask")
    inside = sitk.GetArrayViewFromImage(body) != 0
    for number, mask in enumerate(exclude):
        check_same_grid(image, mask, f"excluded mask {number}")
        inside = inside & (sitk.GetArrayViewFromImage(mask) == 0)
    fat, soft = _fat_and_soft_tissue(sitk.GetArrayViewFromImage(image), inside, fat_range_hu, soft_tissue_max_hu)
    return _mask_like(fat, image), _mask_like(soft, image)


def segment_trunk_anatomy(image: sitk.Image, structures: Optional[Iterable[str]] = None,
                          progress: Optional[Progress] = None) -> Dict[str, sitk.Image]:
    """Masks (uint8, input grid) of the requested ``structures`` among ``TRUNK_STRUCTURES`` (all when None).

    Only what the request needs is computed, sharing the coarse copy: body, then lungs and airways, bones, fat and
    soft tissue (which exclude lungs, airways and bones). A CT without lungs raises ``InputError`` only when a lung
    or the airways are requested; fat and soft tissue alone work on any trunk CT.
    """
    workspace, arrays = _trunk_arrays(image, structures, progress)
    return {name: workspace.to_input(values) for name, values in arrays.items()}


def segment_trunk_labelmap(image: sitk.Image, structures: Optional[Iterable[str]] = None,
                           progress: Optional[Progress] = None) -> Tuple[sitk.Image, Dict[int, str]]:
    """The structures of ``segment_trunk_anatomy`` as one uint8 labelmap on the input grid (values of
    ``TRUNK_LABELS``; where they overlap the later structure of ``TRUNK_STRUCTURES`` wins, a lung over the body) and
    {value: name} of those requested. Built before the one reorientation to the input grid: faster than masks."""
    workspace, arrays = _trunk_arrays(image, structures, progress)
    labels = np.zeros(workspace.hu.shape, dtype=np.uint8)
    names = {}
    for value, name in TRUNK_LABELS.items():
        if name in arrays:
            labels[arrays[name]] = value
            names[value] = name
    return workspace.to_input(labels), names


def _trunk_arrays(image: sitk.Image, structures: Optional[Iterable[str]], progress: Optional[Progress]
                  ) -> Tuple["_Workspace", Dict[str, np.ndarray]]:
    """The workspace and the requested structures as full-resolution arrays in its (LPS) voxel order."""
    names = _requested_structures(structures)
    progress = as_progress(progress)
    progress.report(0.0, "Preparing the CT")
    workspace = _Workspace(image)
    wants_tissue = bool({"fat", "soft_tissue"} & set(names))
    wants_lungs = bool({"lung_right", "lung_left", "airways"} & set(names))
    arrays: Dict[str, np.ndarray] = {}
    if wants_tissue or {"body", "bones"} & set(names):
        progress.report(0.1, "Segmenting the body")
        arrays["body"] = _body(workspace)
    if wants_lungs or wants_tissue:
        lungs = _find_lungs(workspace, progress.sub(0.2, 0.65))
        if lungs is None and wants_lungs:
            raise InputError(_no_lung_message(workspace))
        if lungs is not None:
            arrays.update(lung_right=lungs.right, lung_left=lungs.left, airways=lungs.airways)
    if wants_tissue or "bones" in names:
        progress.report(0.65, "Segmenting the bones")
        arrays["bones"] = _bones(workspace, arrays["body"], BONE_THRESHOLD_HU, MIN_BONE_COMPONENT_ML)
    if wants_tissue:
        progress.report(0.8, "Segmenting fat and soft tissue")
        inside = arrays["body"] & ~arrays["bones"]
        for name in ("lung_right", "lung_left", "airways"):
            if name in arrays:
                inside &= ~arrays[name]
        arrays["fat"], arrays["soft_tissue"] = _fat_and_soft_tissue(workspace.hu, inside, FAT_RANGE_HU,
                                                                    SOFT_TISSUE_MAX_HU)
    progress.report(0.9, "Writing the masks")
    requested = {name: arrays[name] for name in names}
    progress.report(1.0, "Trunk anatomy segmented")
    return workspace, requested


# ---------------------------------------------------------------------------------------------------------------------
# Working grids


class _Workspace:
    """The CT in LPS axis order (its voxels permuted and flipped, exact) and a block average of it at about
    ``working_spacing_mm``, with the mapping from coarse to fine voxels and back to the input's orientation.

    Arrays are (z, y, x) with x towards the patient's left, y posterior, z superior. The coarse copy has padding
    replaced by air first, so that averaging never mixes -2048 HU into tissue."""

    def __init__(self, image: sitk.Image, working_spacing_mm: float = WORKING_SPACING_MM) -> None:
        validate_ct(image)
        if not working_spacing_mm > 0:
            raise InputError(f"the working spacing must be positive (got {working_spacing_mm:g} mm)")
        self.input = image
        self.orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
        self.image = image if self.orientation == "LPS" else sitk.DICOMOrient(image, "LPS")
        # Back to the input's voxel order: for each input array axis, the LPS array axis it runs along and whether
        # it runs backwards (numpy views: much faster than DICOMOrient on every output mask).
        direction = np.array(image.GetDirection()).reshape(3, 3)
        lps_axis_of = np.argmax(np.abs(direction), axis=0)  # per input index axis (x, y, z)
        self._to_input_axes = tuple(int(2 - lps_axis_of[2 - axis]) for axis in range(3))
        self._to_input_flips = tuple(axis for axis in range(3)
                                     if direction[lps_axis_of[2 - axis], 2 - axis] < 0)
        self.hu = sitk.GetArrayViewFromImage(self.image)
        factors_xyz = [max(1, min(n, int(math.ceil(working_spacing_mm / s - 0.25))))  # coarse voxels 1.5-2.5 mm
                       for n, s in zip(self.image.GetSize(), self.image.GetSpacing())]
        self.factors_zyx = tuple(factors_xyz[::-1])
        self.coarse_image = sitk.BinShrink(replace_padding(self.image), factors_xyz)
        self.coarse_hu = sitk.GetArrayFromImage(self.coarse_image)
        self.coarse_spacing_zyx = np.array(self.coarse_image.GetSpacing()[::-1])
        self.coarse_voxel_ml = float(np.prod(self.coarse_spacing_zyx)) / 1000.0
        self.voxel_ml = float(np.prod(self.image.GetSpacing())) / 1000.0

    def volume_ml(self, mask: np.ndarray) -> float:
        return float(np.count_nonzero(mask)) * self.voxel_ml

    def to_input(self, mask: np.ndarray) -> sitk.Image:
        """A full-resolution (z, y, x) mask of this workspace as a uint8 image on the input grid."""
        if self.orientation != "LPS":
            mask = np.ascontiguousarray(np.flip(np.transpose(mask, self._to_input_axes), self._to_input_flips))
        return _mask_like(mask, self.input)  # the same grid: the round trip only permutes and flips voxels

    def coarse_physical_x_mm(self, index_zyx: Sequence[float]) -> float:
        """LPS x (patient left positive) of a continuous coarse (z, y, x) index."""
        point = self.coarse_image.TransformContinuousIndexToPhysicalPoint([float(v) for v in index_zyx[::-1]])
        return float(point[0])

    def fine_box(self, box: Tuple[slice, ...]) -> Tuple[slice, ...]:
        """The full-resolution voxels of a box of coarse voxels (the last coarse voxel along an axis also owns the
        few fine voxels BinShrink left over)."""
        fine = []
        for axis, part in enumerate(box):
            factor, coarse_size = self.factors_zyx[axis], self.coarse_hu.shape[axis]
            stop = self.hu.shape[axis] if part.stop >= coarse_size else part.stop * factor
            fine.append(slice(part.start * factor, stop))
        return tuple(fine)

    def upsample(self, coarse: np.ndarray, box: Tuple[slice, ...]) -> Tuple[np.ndarray, Tuple[slice, ...]]:
        """Nearest-neighbour copy at full resolution of the coarse sub-array ``coarse`` = ``whole[box]``, and its
        fine box."""
        fine_box = self.fine_box(box)
        indices = [np.minimum(np.arange(fine.start, fine.stop) // factor, size - 1) - part.start
                   for fine, part, factor, size in zip(fine_box, box, self.factors_zyx, self.coarse_hu.shape)]
        fine = coarse.take(indices[0], axis=0).take(indices[1], axis=1).take(indices[2], axis=2)
        return fine, fine_box

    def block_any(self, mask: np.ndarray) -> np.ndarray:
        """Coarse mask of the coarse voxels holding at least one voxel of a full-resolution ``mask``."""
        for axis in (2, 1, 0):  # the innermost first: it shrinks the array fastest
            factor, count = self.factors_zyx[axis], self.coarse_hu.shape[axis]
            reduced = mask[_along(axis, slice(0, count * factor, factor))].copy()
            for offset in range(1, factor):  # element-wise ORs of strided views: much faster than any() on blocks
                reduced |= mask[_along(axis, slice(offset, count * factor, factor))]
            if mask.shape[axis] > count * factor:  # the last coarse voxel owns the few voxels left over
                reduced[_along(axis, slice(count - 1, count))] |= mask[_along(axis, slice(count * factor, None))].any(
                    axis=axis, keepdims=True)
            mask = reduced
        return mask

    def from_input(self, mask: sitk.Image, name: str) -> np.ndarray:
        """A mask on the input grid as a full-resolution boolean array of this workspace."""
        check_same_grid(self.input, mask, name)
        oriented = mask if self.orientation == "LPS" else sitk.DICOMOrient(mask, "LPS")
        return sitk.GetArrayViewFromImage(oriented) != 0

    def refine(self, coarse_mask: np.ndarray, belongs: Callable[[Tuple[slice, ...]], np.ndarray]) -> np.ndarray:
        """Full-resolution mask of a coarse one: voxels deeper than one coarse voxel inside are kept; within one
        coarse voxel of its boundary (either side) a fine voxel is in when ``belongs(fine_box)[voxel]``."""
        fine = np.zeros(self.hu.shape, dtype=bool)
        if not coarse_mask.any():
            return fine
        box = _bounding_box(coarse_mask, margin=1)
        inner = ndimage.binary_erosion(coarse_mask[box], _BOX, border_value=1)
        classes = ndimage.binary_dilation(coarse_mask[box], _BOX).astype(np.uint8) + inner
        fine_classes, fine_box = self.upsample(classes, box)
        fine[fine_box] = (fine_classes == 2) | ((fine_classes == 1) & belongs(fine_box))
        return fine


# ---------------------------------------------------------------------------------------------------------------------
# Lungs and airways


@dataclass
class _Lungs:
    """Full-resolution (z, y, x) masks in the workspace's LPS axis order."""

    right: np.ndarray
    left: np.ndarray
    airways: np.ndarray
    warnings: List[str]


def _find_lungs(workspace: _Workspace, progress: Optional[Progress] = None,
                closing_radius_mm: float = LUNG_CLOSING_RADIUS_MM) -> Optional[_Lungs]:
    """The lungs and airways, or None when the CT holds no lung region."""
    progress = as_progress(progress)
    if not closing_radius_mm >= 0:
        raise InputError(f"the lung closing radius must be >= 0 mm (got {closing_radius_mm:g} mm)")
    hu, spacing = workspace.coarse_hu, workspace.coarse_spacing_zyx
    progress.report(0.0, "Finding the lung air")
    air = hu < LUNG_THRESHOLD_HU
    outside = _outside_air_per_slice(air)
    air_hu = float(np.median(hu[outside])) if outside.any() else NOMINAL_AIR_HU
    lung_air = _lung_air(hu, air & ~outside, air_hu, workspace.coarse_voxel_ml)
    if lung_air is None:
        return None
    warnings = []
    progress.report(0.2, "Growing the airways from the trachea")
    body = ~outside
    seed = _trachea_seed(lung_air, body, spacing)
    airways = None if seed is None else _grow_airways(workspace, seed, air_hu)
    if airways is None:
        airways = np.zeros_like(lung_air)
        warnings.append("no trachea found above the lungs (the field of view may start below the carina): "
                        "the airways are not segmented")
    airway_zone = ndimage.binary_dilation(airways, _BOX) if airways.any() else airways
    progress.report(0.4, "Separating the right and left lungs")
    right, left = _split_sides(workspace, lung_air & ~airway_zone, body)
    if not (right.any() or left.any()):
        return None
    for side, mask in (("right", right), ("left", left)):
        if not mask.any():
            warnings.append(f"no {side} lung found")
    progress.report(0.55, "Closing the lungs over vessels and nodules")
    right = _close_and_fill(right, spacing, closing_radius_mm) & ~airway_zone & ~left
    left = _close_and_fill(left, spacing, closing_radius_mm) & ~airway_zone & ~right
    progress.report(0.8, "Refining the lung boundaries at full resolution")
    is_air = _air_in_smoothed(workspace, right | left | airway_zone)
    fine_airways = workspace.refine(airways, is_air)  # its band covers the zone cut out of the lungs
    fine_right = workspace.refine(right, is_air) & ~fine_airways
    fine_left = workspace.refine(left, is_air) & ~fine_airways & ~fine_right
    progress.report(1.0, "Lungs found")
    return _Lungs(fine_right, fine_left, fine_airways, warnings)


def _air_in_smoothed(workspace: _Workspace, coarse_region: np.ndarray) -> Callable[[Tuple[slice, ...]], np.ndarray]:
    """``is_air(fine_box)``: below ``LUNG_THRESHOLD_HU`` once smoothed in-plane by ``BOUNDARY_SMOOTHING_VOXELS``
    (noise and single-voxel partial-volume spikes do not fray the boundary), for fine boxes within one coarse voxel
    of ``coarse_region``."""
    region_box = workspace.fine_box(_bounding_box(coarse_region, margin=1))
    smoothed = ndimage.gaussian_filter(workspace.hu[region_box].astype(np.float32), truncate=3.0,
                                       sigma=(0.0, BOUNDARY_SMOOTHING_VOXELS, BOUNDARY_SMOOTHING_VOXELS))

    def is_air(box: Tuple[slice, ...]) -> np.ndarray:
        relative = tuple(slice(b.start - r.start, b.stop - r.start) for b, r in zip(box, region_box))
        return smoothed[relative] < LUNG_THRESHOLD_HU

    return is_air


def _outside_air_per_slice(air: np.ndarray) -> np.ndarray:
    """Air connected, within its axial slice, to the slice border: around the patient. Per slice rather than in 3D,
    so that lungs stay inside even where a whole-body CT's airway opens to the outside at the nose."""
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    labels, _ = ndimage.label(air, structure=in_plane)
    border = np.unique(np.concatenate([labels[:, 0].ravel(), labels[:, -1].ravel(),
                                       labels[:, :, 0].ravel(), labels[:, :, -1].ravel()]))
    return np.isin(labels, border[border > 0])


def _lung_air(hu: np.ndarray, enclosed_air: np.ndarray, air_hu: float, voxel_ml: float) -> Optional[np.ndarray]:
    """The enclosed air regions of lung density: the largest one (at least ``MIN_LUNG_ML``) and those at least
    ``MIN_LUNG_PART_FRACTION`` of it; None when there is none."""
    labels, sizes = _components_by_size(enclosed_air)
    candidates = np.flatnonzero(sizes * voxel_ml >= MIN_LUNG_PART_ML)
    if candidates.size == 0:
        return None
    boxes = ndimage.find_objects(labels, max_label=int(candidates[-1]))
    medians = np.array([_core_median_hu(hu[boxes[label - 1]], labels[boxes[label - 1]] == label)
                        for label in candidates])
    lung_like = candidates[(medians >= air_hu + LUNG_MIN_HU_ABOVE_AIR) & (medians <= LUNG_MAX_MEDIAN_HU)]
    if lung_like.size == 0 or sizes[lung_like[0]] * voxel_ml < MIN_LUNG_ML:
        return None
    kept = lung_like[sizes[lung_like] >= MIN_LUNG_PART_FRACTION * sizes[lung_like[0]]]
    return np.isin(labels, kept)


def _core_median_hu(hu: np.ndarray, region: np.ndarray) -> float:
    """Median HU of a region away from its boundary (eroded by one voxel, unless that leaves fewer than
    ``MIN_CORE_VOXELS``): partial volume with the wall makes a gas-filled bowel loop look as dense as lung at its
    edge, not inside."""
    core = ndimage.binary_erosion(region, _BOX)
    if np.count_nonzero(core) < MIN_CORE_VOXELS:
        core = region
    return float(np.median(hu[core]))


def _no_lung_message(workspace: _Workspace) -> str:
    return (f"no lungs found in this CT (size {'x'.join(str(s) for s in workspace.input.GetSize())}): no region of "
            f"air below {LUNG_THRESHOLD_HU:g} HU enclosed by the body, of lung density (median between "
            f"{LUNG_MIN_HU_ABOVE_AIR:g} HU above the scan's air and {LUNG_MAX_MEDIAN_HU:g} HU, unlike bowel gas) and "
            f"of at least {MIN_LUNG_ML:g} mL. Does the field of view include the chest?")


def _trachea_seed(lung_air: np.ndarray, body: np.ndarray, spacing_zyx: np.ndarray) -> Optional[np.ndarray]:
    """Voxels of the trachea: going down from the top of the lung air through its upper third, the first small,
    round cross-section near the body's midline (above the apices the trachea is the only one there)."""
    slices = np.flatnonzero(lung_air.any(axis=(1, 2)))
    top, bottom = int(slices[-1]), int(slices[0])
    lowest = top - max(2, (top - bottom) // 3)
    pixel_mm2 = float(spacing_zyx[1] * spacing_zyx[2])
    for z in range(top, max(lowest, bottom) - 1, -1):
        body_columns = np.flatnonzero(body[z].any(axis=0))
        midline_x = 0.5 * (body_columns[0] + body_columns[-1]) if body_columns.size else lung_air.shape[2] / 2
        labels, count = ndimage.label(lung_air[z])
        for label, box in enumerate(ndimage.find_objects(labels), start=1):
            region = labels[box] == label
            area_mm2 = np.count_nonzero(region) * pixel_mm2
            extent_mm = np.array([region.shape[0] * spacing_zyx[1], region.shape[1] * spacing_zyx[2]])
            center_x = box[1].start + (region.shape[1] - 1) / 2.0
            if (TRACHEA_AREA_MM2[0] <= area_mm2 <= TRACHEA_AREA_MM2[1]
                    and abs(center_x - midline_x) * spacing_zyx[2] <= TRACHEA_MAX_MIDLINE_OFFSET_MM
                    and extent_mm.max() <= TRACHEA_MAX_ELONGATION * extent_mm.min()):
                seed = np.zeros_like(lung_air)
                seed[z][box] = region
                return seed
    return None


def _grow_airways(workspace: _Workspace, seed: np.ndarray, air_hu: float) -> Optional[np.ndarray]:
    """Region growing from the trachea on the coarse copy, the upper threshold raised step by step from near air;
    the last region before it leaks into the lungs (its volume jumps, or passes ``MAX_AIRWAY_ML``)."""
    seed_zyx = np.argwhere(seed)
    seed_hu = workspace.coarse_hu[tuple(seed_zyx.T)]
    best, best_ml = None, 0.0
    for step in range(AIRWAY_THRESHOLD_STEPS):
        threshold = air_hu + AIRWAY_FIRST_THRESHOLD_ABOVE_AIR_HU + step * AIRWAY_THRESHOLD_STEP_HU
        seeds = [(int(x), int(y), int(z)) for z, y, x in seed_zyx[seed_hu < threshold]]
        if not seeds:
            continue
        grown = sitk.ConnectedThreshold(workspace.coarse_image, seedList=seeds, lower=-1e6, upper=float(threshold))
        region = sitk.GetArrayViewFromImage(grown) != 0
        volume_ml = np.count_nonzero(region) * workspace.coarse_voxel_ml
        leaked = volume_ml > MAX_AIRWAY_ML or (
            best is not None and volume_ml > AIRWAY_LEAK_FACTOR * best_ml and volume_ml - best_ml > AIRWAY_LEAK_MIN_ML)
        if leaked:
            break
        best, best_ml = region.copy(), volume_ml
    return best


def _split_sides(workspace: _Workspace, lungs: np.ndarray, body: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(right, left) coarse masks: the two largest regions when they lie apart left-right, else the largest split
    by erosion where the lungs touch; smaller regions go to the side of the nearer lung centre, and a single lung to
    its side of the body's midline."""
    labels, sizes = _components_by_size(lungs)
    minimum = max(MIN_LUNG_PART_ML / workspace.coarse_voxel_ml, 0.01 * sizes.sum())
    parts = [labels == label for label in range(1, len(sizes)) if sizes[label] >= minimum]
    right, left = np.zeros_like(lungs), np.zeros_like(lungs)
    if not parts:
        return right, left
    halves = _two_lungs(workspace, parts[0], parts[1]) if len(parts) > 1 else None
    rest = parts[2:]
    if halves is None:
        halves, rest = _split_by_erosion(workspace, parts[0]), parts[1:]
    if halves is None:
        rest = parts
        divide_x = _centroid_x_mm(workspace, body & lungs.any(axis=(1, 2))[:, None, None])
    else:
        right |= halves[0]
        left |= halves[1]
        divide_x = 0.5 * (_centroid_x_mm(workspace, halves[0]) + _centroid_x_mm(workspace, halves[1]))
    for part in rest:
        if _centroid_x_mm(workspace, part) > divide_x:
            left |= part
        else:
            right |= part
    return right, left


def _two_lungs(workspace: _Workspace, first: np.ndarray, second: np.ndarray) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """(right, left) when two regions are two lungs: centres at least ``MIN_LUNG_SEPARATION_MM`` apart left-right,
    and side by side (their left-right extents overlap by less than ``MAX_LUNG_OVERLAP_FRACTION`` of the narrower)."""
    x_first, x_second = _centroid_x_mm(workspace, first), _centroid_x_mm(workspace, second)
    if abs(x_first - x_second) < MIN_LUNG_SEPARATION_MM:
        return None
    (low_first, high_first), (low_second, high_second) = _x_extent(first), _x_extent(second)
    overlap = min(high_first, high_second) - max(low_first, low_second)
    if overlap > MAX_LUNG_OVERLAP_FRACTION * min(high_first - low_first, high_second - low_second):
        return None
    return (first, second) if x_first < x_second else (second, first)


def _x_extent(mask: np.ndarray) -> Tuple[int, int]:
    columns = np.flatnonzero(mask.any(axis=(0, 1)))
    return int(columns[0]), int(columns[-1]) + 1


def _split_by_erosion(workspace: _Workspace, region: np.ndarray) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """(right, left) halves of one region holding both lungs (joined at the anterior junction, or through bronchi too
    small to grow into): eroded deeper and deeper (one coarse voxel at a time) until it falls into two parts lying
    apart left-right, which then share the region by a watershed on depth; None when it never does."""
    box = _bounding_box(region, margin=1)
    spacing = workspace.coarse_spacing_zyx
    depth_mm = -_distance_mm(region[box], spacing)  # 0 on the boundary, growing inwards
    step_mm = float(spacing.max())
    for erosion in range(1, MAX_LUNG_SPLIT_EROSIONS + 1):
        labels, sizes = _components_by_size(depth_mm >= erosion * step_mm)
        if len(sizes) < 2:
            return None
        if len(sizes) < 3 or sizes[2] < MIN_LUNG_PART_FRACTION * sizes[1]:
            continue
        cores = []
        for label in (1, 2):
            core = np.zeros_like(region)
            core[box] = labels == label
            cores.append(core)
        two = _two_lungs(workspace, *cores)
        if two is None:
            continue
        markers = two[0][box].astype(np.uint8) + 2 * two[1][box].astype(np.uint8)
        flooded = _watershed(depth_mm, region[box], markers)
        right, left = np.zeros_like(region), np.zeros_like(region)
        right[box] = flooded == 1
        left[box] = flooded == 2
        return right, left
    return None


def _watershed(depth_mm: np.ndarray, region: np.ndarray, markers: np.ndarray) -> np.ndarray:
    """Each voxel of ``region`` labelled with the marker that floods it first, the flood rising from the deepest
    voxels: the regions meet where the region is narrowest (where the lungs touch), and the flood stays inside
    the region (outside it is flooded last)."""
    relief = np.where(region, -depth_mm, np.float32(1e6)).astype(np.float32)
    flooded = sitk.MorphologicalWatershedFromMarkers(sitk.GetImageFromArray(relief), sitk.GetImageFromArray(markers),
                                                     markWatershedLine=False, fullyConnected=False)
    return np.where(region, sitk.GetArrayViewFromImage(flooded), 0)


def _centroid_x_mm(workspace: _Workspace, mask: np.ndarray) -> float:
    """LPS x of the centre of a coarse mask (patient left positive)."""
    centroid = []
    for axis in range(3):
        counts = mask.sum(axis=tuple(a for a in range(3) if a != axis), dtype=np.int64)
        centroid.append(float(np.dot(counts, np.arange(counts.size)) / counts.sum()))
    return workspace.coarse_physical_x_mm(centroid)


def close_with_ball(mask: np.ndarray, spacing_zyx: np.ndarray, radius_mm: float) -> np.ndarray:
    """Morphological closing of a (z, y, x) mask by a ball of ``radius_mm`` (exact Euclidean distances in mm, so
    anisotropic voxels are handled); computed on the mask's bounding box padded by the radius, so the image border
    does not stop the dilation."""
    if not mask.any() or radius_mm <= 0:
        return mask.copy()
    box = _bounding_box(mask)
    margin = [int(math.ceil(radius_mm / s)) + 1 for s in spacing_zyx]
    padded = np.pad(mask[box], [(m, m) for m in margin])
    dilated = _distance_mm(padded, spacing_zyx) <= radius_mm
    closed = _distance_mm(~dilated, spacing_zyx) > radius_mm
    result = np.zeros_like(mask)
    result[box] = closed[tuple(slice(m, m + s.stop - s.start) for m, s in zip(margin, box))]
    return result


def _close_and_fill(mask: np.ndarray, spacing_zyx: np.ndarray, radius_mm: float) -> np.ndarray:
    """Closing by a ball of ``radius_mm``, then 3D hole filling (within the bounding box: a hole lies inside it)."""
    closed = close_with_ball(mask, spacing_zyx, radius_mm)
    if not closed.any():
        return closed
    box = _bounding_box(closed, margin=1)
    filled = sitk.BinaryFillhole(sitk.GetImageFromArray(closed[box].astype(np.uint8)), fullyConnected=False)
    closed[box] = sitk.GetArrayViewFromImage(filled) != 0
    return closed


def _distance_mm(mask: np.ndarray, spacing_zyx: np.ndarray) -> np.ndarray:
    """Distance in mm from each voxel outside ``mask`` to the nearest voxel of it (<= 0 inside)."""
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.SetSpacing([float(s) for s in spacing_zyx[::-1]])
    return sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False,
                                                               useImageSpacing=True))


# ---------------------------------------------------------------------------------------------------------------------
# Body, bones, fat and soft tissue


def _body(workspace: _Workspace) -> np.ndarray:
    coarse = sitk.GetArrayFromImage(body_mask(workspace.coarse_image, BODY_THRESHOLD_HU)) != 0
    return workspace.refine(coarse, lambda box: workspace.hu[box] > BODY_THRESHOLD_HU)


def _bones(workspace: _Workspace, body: np.ndarray, threshold_hu: float, min_component_ml: float) -> np.ndarray:
    """(hu >= threshold_hu) & body near cortical bone (within ``BONE_MAX_CORTEX_DISTANCE_MM`` of a voxel at
    ``CORTICAL_BONE_HU`` or more), in components of at least ``min_component_ml``, with the marrow they enclose.

    The distance to cortex keeps contrast-enhanced blood (heart, aorta: 200-500 HU) out but for a rim where it
    touches the skeleton, and drops enhanced kidneys and vessels; deep marrow comes back as enclosed by cortex.
    Components are found on the coarse grid, a coarse voxel counting when any of its fine voxels does (thin cortex
    is kept); the fine mask is the threshold within the kept coarse voxels, plus the enclosed marrow."""
    candidate = (workspace.hu >= threshold_hu) & body
    coarse = workspace.block_any(candidate)
    if not coarse.any():
        return candidate
    box = _bounding_box(coarse)
    coarse = coarse[box]
    cortex = workspace.block_any(workspace.hu >= CORTICAL_BONE_HU)[box] & coarse
    if cortex.any():
        coarse &= _distance_mm(cortex, workspace.coarse_spacing_zyx) <= BONE_MAX_CORTEX_DISTANCE_MM
    else:
        coarse[...] = False
    relabel = sitk.RelabelComponentImageFilter()
    relabel.SetMinimumObjectSize(int(math.ceil(min_component_ml / workspace.coarse_voxel_ml)))
    kept = sitk.GetArrayFromImage(relabel.Execute(
        sitk.ConnectedComponent(sitk.GetImageFromArray(coarse.view(np.uint8)), True))) != 0
    filled = sitk.GetArrayFromImage(sitk.BinaryFillhole(sitk.GetImageFromArray(kept.view(np.uint8)),
                                                        fullyConnected=False)) != 0
    classes = kept.view(np.uint8) + 2 * (filled & ~kept).view(np.uint8)  # 1: bone by threshold, 2: enclosed marrow
    fine_classes, fine_box = workspace.upsample(classes, box)
    bones = np.zeros_like(candidate)
    bones[fine_box] = (fine_classes == 2) | ((fine_classes == 1) & candidate[fine_box])
    return bones


def _fat_and_soft_tissue(hu: np.ndarray, inside: np.ndarray, fat_range_hu: Tuple[float, float],
                         soft_tissue_max_hu: float) -> Tuple[np.ndarray, np.ndarray]:
    low, high = (float(v) for v in fat_range_hu)
    if not low < high < soft_tissue_max_hu:
        raise InputError(f"expected fat range low < high < soft tissue maximum (got {low:g}..{high:g} and "
                         f"{soft_tissue_max_hu:g} HU)")
    fat = inside & (hu >= low) & (hu <= high)
    soft = inside & (hu > high) & (hu <= soft_tissue_max_hu)
    return fat, soft


# ---------------------------------------------------------------------------------------------------------------------
# Helpers


def _requested_structures(structures: Optional[Iterable[str]]) -> Tuple[str, ...]:
    if structures is None:
        return TRUNK_STRUCTURES
    names = tuple(dict.fromkeys(structures))
    unknown = [name for name in names if name not in TRUNK_STRUCTURES]
    if unknown or not names:
        raise InputError(f"unknown or no structures {unknown} requested (expected some of {list(TRUNK_STRUCTURES)})")
    return names


def _components_by_size(mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Face-connected components labelled 1, 2, ... from the largest, and ``sizes[label]`` in voxels."""
    relabel = sitk.RelabelComponentImageFilter()
    relabel.SortByObjectSizeOn()
    labels = relabel.Execute(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), False))
    return sitk.GetArrayFromImage(labels), np.array([0] + list(relabel.GetSizeOfObjectsInPixels()), dtype=np.int64)


def _bounding_box(mask: np.ndarray, margin: int = 0) -> Tuple[slice, ...]:
    """The bounding box of a non-empty mask, grown by ``margin`` voxels within the array."""
    box = []
    for axis in range(mask.ndim):
        occupied = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(int(occupied[0]) - margin, 0), min(int(occupied[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


def _along(axis: int, part: slice) -> Tuple[slice, ...]:
    """Index of ``part`` along ``axis`` of a 3D array, everything along the others."""
    return tuple(part if a == axis else slice(None) for a in range(3))


def _mask_like(mask: np.ndarray, reference: sitk.Image) -> sitk.Image:
    result = sitk.GetImageFromArray(mask.view(np.uint8) if mask.dtype == bool else mask.astype(np.uint8, copy=False))
    result.CopyInformation(reference)
    return result
