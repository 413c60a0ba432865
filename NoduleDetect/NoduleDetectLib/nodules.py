"""One nodule at a time: its 3D mask around a given centre, its measurements, and the Lung-RADS size band.

Segmentation works on a small isotropic copy of the region around the centre. A generous cut just above the lung
background finds the nodule; its solid tissue (above -300 HU) and the ground glass around it (beyond the blurred rim
of solid tissue) then choose the level of the final half-maximum cut: the solid tissue's for a solid nodule (about
-400 HU), the ground glass's for a part-solid or ground-glass one (about -730 HU for ground glass at -600 HU). When
the solid level leaves nothing at the centre, the solid tissue was a neighbour's (the chest wall beside a small
ground-glass nodule): the ground glass beyond that tissue's blurred rim sets the level, and the cut stays out of the
rim. Each cut keeps the connected component at the centre after an opening by a ball of 0.3 expected diameters
(at most 4 mm), which detaches vessels (what it shaves off within one input pixel comes back), within the lung mask
(closed locally so that a juxta-pleural nodule stays inside it), which keeps the chest wall out. A cut at the ground
glass's level ends where the ground glass does (its farthest voxel from the centre): a vessel too thick for the
opening stays attached to such a cut, and the ground glass tells where the nodule ends. Back on the input grid, a voxel
belongs to the nodule when it is above the final threshold and the isotropic mask covers a quarter of it at least.

Measurements follow the input grid and its physical geometry: volume from the voxel count, Feret diameters (longest
in-plane on the axial slices with the perpendicular one, and in 3D), HU statistics, the solid component and the type.
``lung_rads_size_category`` maps the size to the Lung-RADS v2022 baseline band: size alone, never a diagnosis
(morphology, growth, location and the reader decide the real category).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from RecognitionCore.errors import InputError
from RecognitionCore.preprocessing import (BoundingBox, ImageGeometry, check_same_grid, crop, resample_to_reference,
                                          resample_to_spacing, three_numbers)

NODULE_TYPES = ("solid", "part-solid", "ground-glass")
SOLID_HU = -300.0  # voxels above this are the solid component
SOFT_TISSUE_HU = 0.0  # a solid nodule's level is at least this: blur lowers the peak of a small one
SOLID_TYPE_MIN_FRACTION = 0.5  # at least this fraction of solid voxels: a solid nodule
GROUND_GLASS_MAX_SOLID_DIAMETER_MM = 2.5  # a solid component smaller than this (or none): a ground-glass nodule
SOLID_COMPONENT_OPENING_MM = 1.5  # solid tissue thinner than twice this (vessels) is not a solid component
NEIGHBOUR_RIM_MM = 3.0  # ... nor solid tissue this close to its surface that goes on this far outside it (a neighbour)
PARENCHYMA_MAX_HU = -500.0  # lung voxels below this give the background level
PADDING_BELOW_HU = -1100.0  # ... and above this (scanner padding outside the field of view is not lung)
MIN_PARENCHYMA_VOXELS = 20
MIN_CONTRAST_HU = 100.0  # a centre less than this above the lung is not a nodule
LOW_THRESHOLD_STEP_HU = 100.0  # the generous cut above the background (keeps faint ground glass)
REGION_DIAMETERS = 1.5  # half-size of the region around the centre, in expected diameters ...
REGION_MARGIN_MM = 6.0  # ... and at least this beyond the expected radius (lung for the background level)
REACH_DIAMETERS = 1.0  # the mask stays within this many expected diameters of the centre
OPENING_DIAMETER_FRACTION = 0.3  # opening radius as a fraction of the expected diameter (detaches vessels)
MAX_OPENING_MM = 4.0
PARTIAL_VOLUME_RIM_VOXELS = 1.5  # input voxels around solid tissue that blur and slice thickness make brighter
SMALL_NODULE_MM = 8.0  # below this across, blur makes a solid nodule look part-solid: taken as solid
SMALL_NODULE_MIN_CORE_MM = 1.5  # ... when its solid component is at least this across
GROUND_GLASS_MIN_RATIO = 0.25  # ground glass (beyond the rim) per solid voxel that makes it part of the nodule
MIN_HINT_MM, MAX_HINT_MM = 1.0, 60.0
MIN_SPACING_MM = 0.5  # finest isotropic working grid
MIN_COVERAGE = 0.25  # input voxels this much covered by the isotropic mask join it when above its threshold
LUNG_RADS_NOTE = ("Lung-RADS v2022 baseline size band from the measured size only: not a diagnosis and not the "
                  "Lung-RADS category (morphology, growth, location and the reader decide that)")


@dataclass(frozen=True)
class NoduleMeasurement:
    """What ``measure_nodule`` found. Diameters in mm, volume in mm^3, centre in LPS mm.

    ``mean_axial_diameter_mm`` is Lung-RADS' size: the mean of the longest in-plane diameter and the longest
    diameter perpendicular to it, on the axial slice where the nodule is longest; ``solid_mean_axial_diameter_mm``
    is the same for the solid component (0 when there is none). ``sphericity`` is 1 for a ball and lower for any
    other shape; ``elongation`` is the ratio of the two largest principal axes (1 for a ball).
    """

    volume_mm3: float
    longest_axial_diameter_mm: float
    short_axial_diameter_mm: float
    mean_axial_diameter_mm: float
    longest_diameter_3d_mm: float
    mean_hu: float
    solid_fraction: float
    solid_mean_axial_diameter_mm: float
    type: str
    center_lps_mm: Tuple[float, float, float]
    sphericity: float
    elongation: float
    lung_rads_size_category: str

    @property
    def volume_ml(self) -> float:
        return self.volume_mm3 / 1000.0

    @property
    def lung_rads_label(self) -> str:
        return f"size band {self.lung_rads_size_category} ({LUNG_RADS_NOTE})"


# ---------------------------------------------------------------------------------------------------------------------
# Segmentation


def segment_nodule(image: sitk.Image, center_lps_mm: Sequence[float], diameter_hint_mm: float,
                   lung_mask: Optional[sitk.Image] = None) -> sitk.Image:
    """The nodule around ``center_lps_mm`` as a uint8 mask (1 = nodule) on a small region of the input grid.

    The mask is a crop of ``image``'s voxel grid (same spacing and direction, its own origin), so it lies exactly
    on the input: ``resample_to_reference(mask, image, "nearest")`` gives the full-size mask. It is all zeros when
    nothing brighter than the lung is at the centre, or no aerated lung around it. ``diameter_hint_mm`` (e.g. a
    candidate's diameter) sets the region, the vessel-detaching opening and how far the mask may reach (a hint too
    large is corrected by the nodule's own size); ``lung_mask`` (same grid, non-zero = lung) keeps the chest wall and
    the mediastinum out.
    """
    center = _check_segment_arguments(image, center_lps_mm, diameter_hint_mm, lung_mask)
    half_size_mm = max(REGION_DIAMETERS * diameter_hint_mm, 0.5 * diameter_hint_mm + REGION_MARGIN_MM)
    box = _box_around(image, center, half_size_mm)
    region = crop(image, box)
    spacing_mm = _isotropic_spacing(image, diameter_hint_mm)
    fine = resample_to_spacing(region, spacing_mm, "linear")
    values = sitk.GetArrayFromImage(fine)
    lungs = None
    if lung_mask is not None:
        lungs = sitk.GetArrayFromImage(resample_to_reference(crop(lung_mask, box), fine, "nearest")) != 0
    center_index = np.array(fine.TransformPhysicalPointToContinuousIndex(tuple(center)))[::-1]  # z, y, x
    distance_mm = _distance_to(center_index, values.shape, spacing_mm)
    background_hu = _background_hu(values, lungs)
    if background_hu is None:
        return _to_input_grid(np.zeros(values.shape, dtype=bool), math.inf, fine, region)
    # the nodule stays within its reach; the lung mask's closing needs its own radius around that
    reach_mm = _reach_mm(diameter_hint_mm, spacing_mm)
    work = _bounding_slices(distance_mm <= reach_mm + _closing_radius_mm(diameter_hint_mm) + spacing_mm)
    nodule = np.zeros(values.shape, dtype=bool)
    nodule[work], threshold_hu = _segment_on_grid(values[work], None if lungs is None else lungs[work],
                                                  distance_mm[work], background_hu, spacing_mm, diameter_hint_mm,
                                                  image.GetSpacing())
    return sitk.BinaryFillhole(_trimmed(_to_input_grid(nodule, threshold_hu, fine, region)))


def _check_segment_arguments(image, center_lps_mm, diameter_hint_mm, lung_mask) -> np.ndarray:
    if not isinstance(image, sitk.Image) or image.GetDimension() != 3:
        raise InputError(f"the image must be a 3D SimpleITK image, got {type(image).__name__}")
    center = three_numbers(center_lps_mm, "the nodule centre (LPS mm)")
    index = np.array(image.TransformPhysicalPointToContinuousIndex(tuple(center)))
    if np.any(index < -0.5) or np.any(index > np.array(image.GetSize()) - 0.5):
        raise InputError(f"the nodule centre {tuple(np.round(center, 1))} mm is outside the image")
    if isinstance(diameter_hint_mm, bool) or not isinstance(diameter_hint_mm, (int, float, np.number)) \
            or not MIN_HINT_MM <= float(diameter_hint_mm) <= MAX_HINT_MM:
        raise InputError(f"the diameter hint must be within {MIN_HINT_MM:g}..{MAX_HINT_MM:g} mm, got "
                         f"{diameter_hint_mm!r}")
    if lung_mask is not None:
        check_same_grid(image, lung_mask, "lung mask")
    return center


def _box_around(image: sitk.Image, center: np.ndarray, half_size_mm: float) -> BoundingBox:
    """The voxels within ``half_size_mm`` of ``center`` along each grid axis, clipped to the image."""
    index = np.array(image.TransformPhysicalPointToContinuousIndex(tuple(center)))
    reach = np.ceil(half_size_mm / np.array(image.GetSpacing())).astype(int)
    start = np.maximum(np.floor(index).astype(int) - reach, 0)
    stop = np.minimum(np.ceil(index).astype(int) + reach + 1, np.array(image.GetSize()))
    return BoundingBox(tuple(int(v) for v in start), tuple(int(v) for v in stop - start))


def _isotropic_spacing(image: sitk.Image, diameter_hint_mm: float) -> float:
    """The in-plane resolution of the input, finer for small nodules (8 voxels across, never below MIN_SPACING_MM),
    coarser for large ones (at most 24 voxels across: the time goes with the cube of it)."""
    return float(max(min(min(image.GetSpacing()), diameter_hint_mm / 8.0), diameter_hint_mm / 24.0, MIN_SPACING_MM))


def _reach_mm(diameter_hint_mm: float, spacing_mm: float) -> float:
    return max(REACH_DIAMETERS * diameter_hint_mm, _core_radius_mm(diameter_hint_mm, spacing_mm) + 2.0 * spacing_mm)


def _core_radius_mm(diameter_hint_mm: float, spacing_mm: float) -> float:
    """The centre region the nodule must overlap (and whose HU tells whether anything is there)."""
    return max(0.25 * diameter_hint_mm, 1.5 * spacing_mm)


def _closing_radius_mm(diameter_hint_mm: float) -> float:
    return 0.5 * diameter_hint_mm + 1.0


def _bounding_slices(mask: np.ndarray) -> Tuple[slice, ...]:
    """The bounding box of a non-empty (z, y, x) mask."""
    box = []
    for axis in range(3):
        occupied = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(int(occupied[0]), int(occupied[-1]) + 1))
    return tuple(box)


def _distance_to(center_index_zyx: np.ndarray, shape: Sequence[int], spacing_mm: float) -> np.ndarray:
    axes = [(np.arange(n, dtype=np.float32) - np.float32(c)) * np.float32(spacing_mm)
            for n, c in zip(shape, center_index_zyx)]
    return np.sqrt(axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2)


def _segment_on_grid(values: np.ndarray, lungs: Optional[np.ndarray], distance_mm: np.ndarray, background_hu: float,
                     spacing_mm: float, diameter_hint_mm: float,
                     native_spacing_mm: Sequence[float]) -> Tuple[np.ndarray, float]:
    """The nodule on the isotropic region and its threshold: a generous cut finds it, then a half-maximum cut at the
    level of its solid tissue, or of its ground glass when there is more ground glass than the solid part's blurred
    rim."""
    empty = (np.zeros(values.shape, dtype=bool), math.inf)
    allowed = distance_mm <= _reach_mm(diameter_hint_mm, spacing_mm)
    if lungs is not None and not lungs[allowed].all():
        allowed &= _closed(lungs, _closing_radius_mm(diameter_hint_mm), spacing_mm)
    core = distance_mm <= _core_radius_mm(diameter_hint_mm, spacing_mm)
    core_hu = float(np.percentile(values[core], 75))
    if core_hu - background_hu < MIN_CONTRAST_HU:
        return empty

    def half_maximum(level_hu: float) -> float:
        return background_hu + 0.5 * max(level_hu - background_hu, MIN_CONTRAST_HU)

    def cut(threshold_hu: float, diameter_mm: float, within: np.ndarray = allowed) -> np.ndarray:
        opening_mm = min(OPENING_DIAMETER_FRACTION * diameter_mm, MAX_OPENING_MM)
        return _opened_component_at(values > threshold_hu, within, core, opening_mm, spacing_mm,
                                    restore_mm=min(native_spacing_mm))

    def final_cut(threshold_hu: float, within: np.ndarray = allowed) -> Tuple[np.ndarray, float]:
        return cut(threshold_hu, diameter_mm, within), threshold_hu

    # a first cut with half the opening tells the size when the hint is too large (the opening would erase the
    # nodule); the halo and the vessels it keeps only make it larger, so a hint too small stays in charge
    low_hu = background_hu + min(LOW_THRESHOLD_STEP_HU, 0.5 * (core_hu - background_hu))
    probe = cut(low_hu, 0.5 * diameter_hint_mm)
    if not probe.any():
        return empty
    diameter_mm = min(diameter_hint_mm, _equivalent_diameter_mm(np.count_nonzero(probe) * spacing_mm ** 3))
    generous = cut(low_hu, diameter_mm)
    if not generous.any():
        return empty
    solid_tissue = values > SOLID_HU
    if not (generous & solid_tissue).any():
        return final_cut(half_maximum(float(np.percentile(values[generous], 75))))
    # a nodule small altogether (generous cut under SMALL_NODULE_MM across) has no ground glass of its own: there the
    # blur of a solid nodule cannot be told from a thin rim of ground glass (and Lung-RADS puts a part-solid nodule
    # under 6 mm in the solid nodule's lowest band anyway); its solid tissue's rim is mapped only when the cut needs it
    beyond_rim = ground_glass = None
    if _equivalent_diameter_mm(np.count_nonzero(generous) * spacing_mm ** 3) >= SMALL_NODULE_MM:
        beyond_rim = _beyond_solid_rim(solid_tissue, spacing_mm, native_spacing_mm)
        ground_glass = _ground_glass(generous, solid_tissue, beyond_rim, native_spacing_mm)
    if ground_glass is None:
        nodule, threshold_hu = final_cut(half_maximum(max(float(np.percentile(values[generous], 95)),
                                                          SOFT_TISSUE_HU)))
        if nodule.any():
            return nodule, threshold_hu
        # nothing at the centre reaches the solid level: the solid tissue in the cut is a neighbour's (the chest
        # wall beside a juxta-pleural ground-glass nodule, a vessel), and the nodule is the ground glass beyond its rim
        if beyond_rim is None:
            beyond_rim = _beyond_solid_rim(solid_tissue, spacing_mm, native_spacing_mm)
        faint = generous & beyond_rim
        if not faint.any():
            return nodule, threshold_hu
        return final_cut(half_maximum(float(np.percentile(values[faint], 75))), allowed & beyond_rim)
    nodule, threshold_hu = final_cut(half_maximum(float(np.percentile(values[ground_glass], 75))))
    # the ground glass reaches the nodule's edge: what lies farther out is a vessel too thick for the opening
    glass = nodule & beyond_rim
    if glass.any():
        nodule &= distance_mm <= distance_mm[glass].max()
    return nodule, threshold_hu


def _beyond_solid_rim(solid_tissue: np.ndarray, spacing_mm: float, native_spacing_mm: Sequence[float]) -> np.ndarray:
    """Voxels farther than PARTIAL_VOLUME_RIM_VOXELS input voxels from solid tissue (whose blur brightens its rim)."""
    native = np.asarray(native_spacing_mm, dtype=float)[::-1]  # z, y, x like the arrays
    return ndimage.distance_transform_edt(~solid_tissue, sampling=spacing_mm / native) > PARTIAL_VOLUME_RIM_VOXELS


def _ground_glass(generous: np.ndarray, solid_tissue: np.ndarray, beyond_rim: np.ndarray,
                  native_spacing_mm: Sequence[float]) -> Optional[np.ndarray]:
    """The ground glass in the generous cut: what lies ``beyond_rim`` of solid tissue (the nodule's, the vessels',
    the chest wall's: ``_beyond_solid_rim``); None when there is too little of it to be more than the blurred rim of
    a solid nodule.

    Only the slices through the middle of the solid part (at least half its largest cross-section) decide, where a
    ground-glass rim is widest and the slice thickness blurs least."""
    ground_glass = generous & beyond_rim
    solid = generous & solid_tissue
    axis = int(np.argmax(native_spacing_mm[::-1]))
    area = solid.sum(axis=tuple(a for a in range(3) if a != axis))
    middle = np.flatnonzero(area >= 0.5 * area.max())
    slab = [slice(None)] * 3
    slab[axis] = slice(int(middle[0]), int(middle[-1]) + 1)
    enough = np.count_nonzero(ground_glass[tuple(slab)]) > GROUND_GLASS_MIN_RATIO * np.count_nonzero(solid[tuple(slab)])
    return ground_glass if enough and ground_glass.any() else None


def _equivalent_diameter_mm(volume_mm3: float) -> float:
    return (6.0 * volume_mm3 / math.pi) ** (1.0 / 3.0)


def _background_hu(values: np.ndarray, lungs: Optional[np.ndarray]) -> Optional[float]:
    """Median of the aerated lung in the region (the lung mask's voxels below PARENCHYMA_MAX_HU when there is one);
    None when there is hardly any (the centre is not in a lung)."""
    parenchyma = (values < PARENCHYMA_MAX_HU) & (values > PADDING_BELOW_HU)
    if lungs is not None and np.count_nonzero(parenchyma & lungs) >= MIN_PARENCHYMA_VOXELS:
        parenchyma &= lungs
    if np.count_nonzero(parenchyma) < MIN_PARENCHYMA_VOXELS:
        return None
    return float(np.median(values[parenchyma]))


def _opened_component_at(foreground: np.ndarray, allowed: np.ndarray, core: np.ndarray, opening_mm: float,
                         spacing_mm: float, restore_mm: float) -> np.ndarray:
    """The face-connected component of ``foreground & allowed`` that meets ``core`` most after an opening by a ball
    of ``opening_mm`` (thin vessels and bridges to the chest wall go), given back what the opening shaved off within
    ``restore_mm`` of it: interpolated thick slices make a thin rim around a nodule's equator that an opening would
    take. An opening that would leave nothing at the core is skipped (the nodule is thinner than it)."""
    mask = foreground & allowed
    component = None
    if opening_mm >= spacing_mm:
        component = _component_at(_opened(mask, opening_mm, spacing_mm), core)
    if component is None:
        component = _component_at(mask, core)
        return np.zeros_like(mask) if component is None else component
    near = ndimage.distance_transform_edt(~component, sampling=spacing_mm) <= restore_mm
    labels, _ = ndimage.label(mask & (near | component))
    return labels == int(np.bincount(labels[component]).argmax())


def _component_at(mask: np.ndarray, core: np.ndarray) -> Optional[np.ndarray]:
    """The face-connected component of ``mask`` that overlaps ``core`` most; None when none does."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return None
    overlap = np.bincount(labels[core & mask], minlength=count + 1)
    overlap[0] = 0
    return labels == int(overlap.argmax()) if overlap.max() > 0 else None


def _opened(mask: np.ndarray, radius_mm: float, spacing_mm) -> np.ndarray:
    """Opening by a ball, through distance maps (exact for any radius, fast for large ones); ``spacing_mm`` is one
    value or one per array axis."""
    eroded = ndimage.distance_transform_edt(mask, sampling=spacing_mm) > radius_mm
    if not eroded.any():
        return eroded
    return (ndimage.distance_transform_edt(~eroded, sampling=spacing_mm) <= radius_mm) & mask


def _closed(mask: np.ndarray, radius_mm: float, spacing_mm: float) -> np.ndarray:
    """Closing by a ball: fills the dent a juxta-pleural nodule makes in a lung mask that leaves it out."""
    if not mask.any():
        return mask
    dilated = ndimage.distance_transform_edt(~mask, sampling=spacing_mm) <= radius_mm
    return ndimage.distance_transform_edt(dilated, sampling=spacing_mm) > radius_mm


def _to_input_grid(nodule: np.ndarray, threshold_hu: float, fine: sitk.Image, region: sitk.Image) -> sitk.Image:
    """The isotropic mask on the input region's grid: the voxels above ``threshold_hu`` that it covers at least in
    part (MIN_COVERAGE). The input's own values decide at the edge, where interpolating thick slices leaves a voxel
    whose centre is at the threshold covered by less than half."""
    mask = sitk.Image(region.GetSize(), sitk.sitkUInt8)
    mask.CopyInformation(region)
    if not nodule.any():
        return mask
    box = _input_box_of(nodule, fine, region)
    spacing = np.array(region.GetSpacing())
    samples = 2 * np.ceil(spacing / (2.0 * fine.GetSpacing()[0])).astype(int) + 1  # per axis x, y, z
    direction = np.array(region.GetDirection()).reshape(3, 3)
    sub_spacing = spacing / samples
    first_corner = np.array(region.TransformIndexToPhysicalPoint([int(v) for v in box.index]))
    origin = first_corner + direction @ ((sub_spacing - spacing) / 2.0)
    geometry = ImageGeometry(tuple(int(v) for v in np.array(box.size) * samples),
                             tuple(float(v) for v in sub_spacing), tuple(float(v) for v in origin),
                             tuple(region.GetDirection()))
    fine_mask = sitk.GetImageFromArray(nodule.astype(np.uint8))
    fine_mask.CopyInformation(fine)
    values = sitk.GetArrayFromImage(resample_to_reference(fine_mask, geometry, "nearest"))
    size_x, size_y, size_z = box.size
    coverage = values.reshape(size_z, samples[2], size_y, samples[1], size_x, samples[0]).mean(axis=(1, 3, 5))
    box_region = crop(region, box)
    covered = sitk.GetImageFromArray(((coverage >= MIN_COVERAGE)
                                      & (sitk.GetArrayViewFromImage(box_region) > threshold_hu)).astype(np.uint8))
    covered.CopyInformation(box_region)
    return sitk.Paste(mask, covered, covered.GetSize(), [0, 0, 0], [int(v) for v in box.index])


def _input_box_of(nodule: np.ndarray, fine: sitk.Image, region: sitk.Image) -> BoundingBox:
    """The region's voxels that the isotropic mask's bounding box touches, one voxel more all around."""
    box = _bounding_slices(nodule)
    corners = [fine.TransformContinuousIndexToPhysicalPoint([float(box[2 - a].start - 0.5) if (c >> a) & 1 == 0
                                                             else float(box[2 - a].stop - 0.5) for a in range(3)])
               for c in range(8)]
    index = np.array([region.TransformPhysicalPointToContinuousIndex(p) for p in corners])
    start = np.maximum(np.floor(index.min(axis=0)).astype(int) - 1, 0)
    stop = np.minimum(np.ceil(index.max(axis=0)).astype(int) + 2, np.array(region.GetSize()))
    return BoundingBox(tuple(int(v) for v in start), tuple(int(v) for v in stop - start))


def _trimmed(mask: sitk.Image) -> sitk.Image:
    """The mask cropped to its non-zero voxels plus one voxel all around (unchanged when empty)."""
    values = sitk.GetArrayViewFromImage(mask)
    if not values.any():
        return mask
    start, stop = [], []
    for axis in (2, 1, 0):  # x, y, z
        occupied = np.flatnonzero(values.any(axis=tuple(a for a in range(3) if a != axis)))
        start.append(max(int(occupied[0]) - 1, 0))
        stop.append(min(int(occupied[-1]) + 2, values.shape[axis]))
    return crop(mask, BoundingBox(tuple(start), tuple(b - a for a, b in zip(start, stop))))


# ---------------------------------------------------------------------------------------------------------------------
# Measurements


def measure_nodule(image: sitk.Image, mask: sitk.Image) -> NoduleMeasurement:
    """Size, density, type, shape and Lung-RADS size band of the nodule in ``mask`` (non-zero = nodule).

    ``mask`` lies on ``image``'s voxel grid: full size, or a crop of it such as ``segment_nodule`` returns. The solid
    component is the largest part of the voxels above SOLID_HU (-300 HU) that is the nodule's own
    (``_solid_component``: a vessel crossing ground glass, or the chest wall at its edge, is not). Types: 'solid' when
    at least SOLID_TYPE_MIN_FRACTION (0.5) of the voxels are above SOLID_HU, or when the nodule is under SMALL_NODULE_MM
    (8 mm) across (volume-equivalent) with solid voxels at least SMALL_NODULE_MIN_CORE_MM (1.5 mm) across: blur makes a
    small solid nodule look part-solid; otherwise 'ground-glass' when the solid component is under
    GROUND_GLASS_MAX_SOLID_DIAMETER_MM (2.5 mm) across, else 'part-solid'. Diameters are Feret diameters (``_feret``).
    """
    # the CT around the mask, far enough to see a neighbour's tissue go on beyond NEIGHBOUR_RIM_MM
    around, nodule_around, under = image_around(image, mask, NEIGHBOUR_RIM_MM + 2.0 * max(image.GetSpacing()))
    values, nodule = around[under], nodule_around[under]
    if not nodule.any():
        raise InputError("the nodule mask is empty: there is nothing to measure")
    hu = values[nodule].astype(np.float64)
    solid = nodule & (values > SOLID_HU)
    solid_fraction = float(np.count_nonzero(solid)) / hu.size
    volume_mm3 = float(np.count_nonzero(nodule) * np.prod(mask.GetSpacing()))
    longest, short = _axial_diameters(nodule, mask)
    mean_diameter = 0.5 * (longest + short)
    component_diameter = _mean_axial_diameter(_solid_component(around, nodule_around, mask.GetSpacing())[under], mask)
    solid_diameter = _mean_axial_diameter(solid, mask)
    nodule_type = _nodule_type(solid_fraction, solid_diameter, component_diameter, volume_mm3)
    solid_mean_diameter = solid_diameter if nodule_type == "solid" else component_diameter
    shape = _shape_statistics(nodule, mask)
    return NoduleMeasurement(
        volume_mm3=volume_mm3, longest_axial_diameter_mm=longest, short_axial_diameter_mm=short,
        mean_axial_diameter_mm=mean_diameter, longest_diameter_3d_mm=_feret_3d(nodule, mask),
        mean_hu=float(hu.mean()), solid_fraction=solid_fraction, solid_mean_axial_diameter_mm=solid_mean_diameter,
        type=nodule_type, center_lps_mm=tuple(float(v) for v in shape.GetCentroid(1)),
        sphericity=float(shape.GetRoundness(1)), elongation=float(shape.GetElongation(1)),
        lung_rads_size_category=lung_rads_size_category(nodule_type, mean_diameter, solid_mean_diameter))


def image_around(image: sitk.Image, mask: sitk.Image, margin_mm: float
                 ) -> Tuple[np.ndarray, np.ndarray, Tuple[slice, ...]]:
    """The image voxels under ``mask`` (which must lie on the image grid) and within ``margin_mm`` around it (clipped
    to the image), as a (z, y, x) array; the mask on that array (bool); and the slices of it the mask covers."""
    if not isinstance(image, sitk.Image) or not isinstance(mask, sitk.Image) or image.GetDimension() != 3 \
            or mask.GetDimension() != 3:
        raise InputError("the image and the nodule mask must be 3D SimpleITK images")
    index = np.array(image.TransformPhysicalPointToContinuousIndex(mask.GetOrigin()))
    start = np.rint(index).astype(int)
    on_grid = (np.allclose(index, start, atol=1e-3)
               and np.allclose(mask.GetSpacing(), image.GetSpacing(), atol=1e-4)
               and np.allclose(mask.GetDirection(), image.GetDirection(), atol=1e-5))
    stop = start + np.array(mask.GetSize())
    size = np.array(image.GetSize())
    if not on_grid or np.any(start < 0) or np.any(stop > size):
        raise InputError("the nodule mask is not on the image grid (a crop of it or the full grid): resample it onto "
                         "the image first")
    margin = np.ceil(margin_mm / np.array(image.GetSpacing())).astype(int)
    low, high = np.maximum(start - margin, 0), np.minimum(stop + margin, size)
    around = sitk.GetArrayViewFromImage(image)[low[2]:high[2], low[1]:high[1], low[0]:high[0]]
    under = tuple(slice(a - l, b - l) for a, b, l in zip(start[::-1], stop[::-1], low[::-1]))
    mask_around = np.zeros(around.shape, dtype=bool)
    mask_around[under] = sitk.GetArrayViewFromImage(mask) != 0
    return around, mask_around, under


def _solid_component(values: np.ndarray, nodule: np.ndarray, spacing_mm: Sequence[float]) -> np.ndarray:
    """The largest part of the solid tissue (above SOLID_HU) in ``nodule`` that is its own, on the CT ``values``
    around it: thicker than a vessel (an opening by a ball of SOLID_COMPONENT_OPENING_MM), and not a neighbour's.

    A neighbour is solid tissue that goes on farther than NEIGHBOUR_RIM_MM outside the nodule (a vessel, the chest
    wall). None of it within NEIGHBOUR_RIM_MM of the nodule's surface is the nodule's; deeper in, only what is thicker
    than the neighbour where it leaves the nodule: a solid core that a vessel runs into stays, a vessel that crosses
    ground glass (no thicker inside than outside) is not a solid part. What is left must still be thicker than a
    vessel."""
    sampling = np.asarray(spacing_mm, dtype=float)[::-1]
    tissue = _opened(values > SOLID_HU, SOLID_COMPONENT_OPENING_MM, sampling)
    labels, _ = ndimage.label(tissue)
    outside_mm = ndimage.distance_transform_edt(~nodule, sampling=sampling)  # 0 in the nodule
    neighbours = np.unique(labels[tissue & (outside_mm > NEIGHBOUR_RIM_MM)])
    rim = ndimage.distance_transform_edt(nodule, sampling=sampling) <= NEIGHBOUR_RIM_MM
    own = tissue & nodule & ~(np.isin(labels, neighbours) & rim)
    crossing = np.intersect1d(neighbours, labels[own])
    if crossing.size:
        tissue_radius_mm = ndimage.distance_transform_edt(tissue, sampling=sampling)
        # the band the neighbour leaves through: its first voxel outside the nodule is at most a voxel step away
        band_mm = max(NEIGHBOUR_RIM_MM, float(sampling.max()))
        for label in crossing:
            neighbour = labels == label
            leaving = neighbour & (outside_mm > 0) & (outside_mm <= band_mm)
            deep_part = own & neighbour
            own &= ~deep_part
            own |= _opened(deep_part, float(tissue_radius_mm[leaving].max()), sampling)
    return _largest_component(_opened(own, SOLID_COMPONENT_OPENING_MM, sampling))


def _mean_axial_diameter(mask_array: np.ndarray, mask: sitk.Image) -> float:
    if not mask_array.any():
        return 0.0
    longest, short = _axial_diameters(_largest_component(mask_array), mask)
    return 0.5 * (longest + short)


def _nodule_type(solid_fraction: float, solid_diameter_mm: float, solid_component_mm: float,
                 volume_mm3: float) -> str:
    small = _equivalent_diameter_mm(volume_mm3) < SMALL_NODULE_MM
    if solid_fraction >= SOLID_TYPE_MIN_FRACTION or (small and solid_diameter_mm >= SMALL_NODULE_MIN_CORE_MM):
        return "solid"
    if solid_component_mm < GROUND_GLASS_MAX_SOLID_DIAMETER_MM:
        return "ground-glass"
    return "part-solid"


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    return labels == int(np.argmax(np.bincount(labels.ravel())[1:]) + 1)


def _voxel_matrix(mask: sitk.Image) -> np.ndarray:
    """Index (x, y, z) -> LPS offset in mm."""
    return np.array(mask.GetDirection()).reshape(3, 3) * np.array(mask.GetSpacing())[None, :]


def _axial_axis(image: sitk.Image) -> int:
    """The grid axis (x=0, y=1, z=2) closest to the patient's superior-inferior axis: its slices are axial."""
    return int(np.argmax(np.abs(np.array(image.GetDirection()).reshape(3, 3)[2])))


def axial_pixel_mm(image: sitk.Image) -> float:
    """The larger pixel size of ``image``'s axial slices: the finest an axial diameter measured on them can tell."""
    axis = _axial_axis(image)
    return float(max(spacing for a, spacing in enumerate(image.GetSpacing()) if a != axis))


def _axial_diameters(nodule: np.ndarray, mask: sitk.Image) -> Tuple[float, float]:
    """(longest, perpendicular) in-plane Feret diameters on the axial slice where the nodule is longest (see
    ``_feret``)."""
    axis = _axial_axis(mask)
    edges = _voxel_matrix(mask)[:, [a for a in range(3) if a != axis]]  # in-plane pixel edges in mm (3 x 2)
    array_axis = 2 - axis  # (z, y, x) array order
    best = (0.0, 0.0)
    for k in np.flatnonzero(nodule.any(axis=tuple(a for a in range(3) if a != array_axis))):
        slice_mask = np.take(nodule, k, axis=array_axis)  # its columns, then rows, follow the in-plane axes
        rows, columns = np.nonzero(slice_mask & ~ndimage.binary_erosion(slice_mask, border_value=0))
        points = np.stack([columns, rows], axis=1).astype(np.float64) @ edges.T
        longest, direction = _feret(points, edges)
        if longest > best[0]:
            normal = np.cross(direction, np.cross(edges[:, 0], edges[:, 1]))
            normal /= np.linalg.norm(normal)
            projection = points @ normal
            best = (longest, float(projection.max() - projection.min()) + _edge_allowance_mm(normal, edges))
    return best


def _feret_3d(nodule: np.ndarray, mask: sitk.Image) -> float:
    """The longest 3D diameter (see ``_feret``)."""
    boundary = nodule & ~ndimage.binary_erosion(nodule, border_value=0)
    edges = _voxel_matrix(mask)
    points = np.stack(np.nonzero(boundary), axis=1)[:, ::-1].astype(np.float64) @ edges.T  # from x, y, z indices
    return _feret(points, edges)[0]


def _feret(points: np.ndarray, edges: np.ndarray) -> Tuple[float, np.ndarray]:
    """Feret diameter of a set of voxels given by their centres (mm) and their edge vectors (columns of ``edges``):
    the longest distance between centres plus half a voxel's extent along it (``_edge_allowance_mm``), and its unit
    direction."""
    hull = points
    if len(points) > 16:
        try:
            centred = points - points.mean(axis=0)
            rank = np.linalg.matrix_rank(centred, tol=1e-6)
            if rank >= 2:
                basis = np.linalg.svd(centred, full_matrices=False)[2][:rank]
                hull = points[ConvexHull(centred @ basis.T).vertices]
        except QhullError:
            hull = points
    difference = hull[:, None, :] - hull[None, :, :]
    distance = np.linalg.norm(difference, axis=2)
    i, j = np.unravel_index(int(np.argmax(distance)), distance.shape)
    length = float(distance[i, j])
    direction = difference[i, j] / length if length > 0 else edges[:, 0] / np.linalg.norm(edges[:, 0])
    return length + _edge_allowance_mm(direction, edges), direction


def _edge_allowance_mm(direction: np.ndarray, edges: np.ndarray) -> float:
    """What a width between voxel centres along ``direction`` falls short of the shape's width: half a voxel's
    extent. For one row of voxels the edges lie half a voxel beyond the outermost centres on average, but a round
    shape has rows in every direction and the longest width picks the one whose centres lie nearest its edges: on
    ideal masks of discs 3-30 pixels across, the longest width between centres falls short by 0.15-0.6 pixels and the
    one perpendicular to it by 0.4-0.9. The extent is the root sum of squares of the edges' projections: a voxel
    counted as round rather than as a box whose corners stick out along the diagonals (which would overstate diagonal
    diameters, most with thick slices)."""
    return 0.5 * float(np.sqrt(np.sum((direction @ edges) ** 2)))


def _shape_statistics(nodule: np.ndarray, mask: sitk.Image) -> sitk.LabelShapeStatisticsImageFilter:
    labels = sitk.GetImageFromArray(nodule.astype(np.uint8))
    labels.CopyInformation(mask)
    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.ComputePerimeterOn()
    shape.Execute(labels)
    return shape


# ---------------------------------------------------------------------------------------------------------------------
# Lung-RADS


def lung_rads_size_category(nodule_type: str, diameter_mm: float, solid_diameter_mm: Optional[float] = None) -> str:
    """The Lung-RADS v2022 baseline-screening size band ('2', '3', '4A', '4B') from size alone (LUNG_RADS_NOTE).

    Diameters are mean diameters (mean of the long and short axis, Lung-RADS' measure), rounded to 0.1 mm as
    Lung-RADS reports them. solid: < 6 mm '2', 6 to < 8 '3', 8 to < 15 '4A', >= 15 '4B'. part-solid
    (``solid_diameter_mm`` = its solid component): total < 6 mm '2'; solid component < 6 '3', 6 to < 8 '4A', >= 8
    '4B'. ground-glass: < 30 mm '2', >= 30 '3'.
    """
    if nodule_type not in NODULE_TYPES:
        raise InputError(f"nodule type must be one of {NODULE_TYPES}, got {nodule_type!r}")
    diameter = _rounded_diameter("diameter", diameter_mm)
    if nodule_type == "solid":
        return "2" if diameter < 6.0 else "3" if diameter < 8.0 else "4A" if diameter < 15.0 else "4B"
    if nodule_type == "ground-glass":
        return "2" if diameter < 30.0 else "3"
    if solid_diameter_mm is None:
        raise InputError("a part-solid nodule needs the diameter of its solid component (solid_diameter_mm)")
    solid = _rounded_diameter("solid component diameter", solid_diameter_mm)
    if diameter < 6.0:
        return "2"
    return "3" if solid < 6.0 else "4A" if solid < 8.0 else "4B"


def _rounded_diameter(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value) \
            or value < 0:
        raise InputError(f"the {name} must be a finite number >= 0 mm, got {value!r}")
    return round(float(value), 1)
