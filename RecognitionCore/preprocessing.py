"""CT preprocessing on SimpleITK images: validation, resampling, Hounsfield windows, denoising, body/lung cropping.

Every function is pure: it returns a new image and never modifies its input. Geometry is LPS physical space as
SimpleITK stores it (spacing, origin, direction), and every step keeps it explicit, so a result can always be put back
exactly where it came from (``resample_to_reference``, ``uncrop``, ``restore_to_input``). numpy arrays are in
``GetArrayFromImage`` order (z, y, x); sizes, indices and spacings are in SimpleITK order (x, y, z).

Padding outside the scan circle (-2048, -3024, ... HU) is treated as follows: ``window_to_unit`` with ``clip=True``
is unaffected by it; ``zscore_normalise`` is only meaningful with a body mask or after ``replace_padding``;
``preprocess_for_model`` calls ``replace_padding`` first, so that interpolation never blends padding into tissue.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from .errors import InputError, ModelError
from .progress import Progress, as_progress

SpacingLike = Union[float, Sequence[float]]

# Display/normalisation windows as (hu_min, hu_max); use window_center_width_to_range for (center, width) values.
HU_WINDOWS: Dict[str, Tuple[float, float]] = {
    "lung": (-1350.0, 150.0),          # center -600, width 1500
    "mediastinum": (-160.0, 240.0),    # center 40, width 400
    "soft_tissue": (-160.0, 240.0),    # center 40, width 400
    "abdomen": (-135.0, 215.0),        # center 40, width 350
    "liver": (-20.0, 140.0),           # center 60, width 160
    "bone": (-500.0, 1300.0),          # center 400, width 1800
    "brain": (0.0, 80.0),              # center 40, width 80
}

AIR_HU = -1024.0
MIN_SPACING_MM = 0.05
MAX_SPACING_MM = 20.0
THICK_SLICE_MM = 5.0
LARGE_VOLUME_VOXELS = 512 * 512 * 1000

_INTERPOLATORS = {
    "linear": sitk.sitkLinear,
    "nearest": sitk.sitkNearestNeighbor,
    "bspline": sitk.sitkBSpline,
}


# ---------------------------------------------------------------------------------------------------------------------
# Validation


@dataclass
class CtReport:
    """What ``validate_ct`` found: the basic facts and warnings for borderline (but usable) inputs."""

    size: Tuple[int, ...]
    spacing_mm: Tuple[float, ...]
    hu_min: float
    hu_max: float
    warnings: List[str] = field(default_factory=list)


def validate_ct(image: sitk.Image, min_size_voxels: int = 8) -> CtReport:
    """Reject inputs no CT pipeline can use (2D, empty, constant, NaN/Inf, absurd spacing, not in HU); warn on the rest.

    Raises ``InputError`` naming the problem and the offending value. ``min_size_voxels`` is the smallest size
    accepted along each axis.
    """
    if not isinstance(image, sitk.Image):
        raise InputError(f"expected a SimpleITK image, got {type(image).__name__}")
    size = tuple(image.GetSize())
    if image.GetNumberOfPixels() == 0:
        raise InputError(f"the image is empty (size {_format_size(size)})")
    if image.GetDimension() == 2:
        raise InputError(f"the image is 2D (size {_format_size(size)}): a 3D CT volume is needed")
    if image.GetDimension() != 3:
        raise InputError(f"the image is {image.GetDimension()}D (size {_format_size(size)}): a 3D CT volume is needed")
    if min(size) == 1:
        raise InputError(f"the image is a single 2D slice (size {_format_size(size)}): a 3D CT volume is needed")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"the image has {image.GetNumberOfComponentsPerPixel()} components per voxel (colour or "
                         "vector image): a scalar CT volume is needed")
    if min(size) < min_size_voxels:
        raise InputError(f"the image is too small (size {_format_size(size)}): at least {min_size_voxels} voxels "
                         "are needed along each axis")
    spacing = tuple(image.GetSpacing())
    if min(spacing) < MIN_SPACING_MM or max(spacing) > MAX_SPACING_MM:
        raise InputError(f"the voxel spacing {_format_spacing(spacing)} mm is implausible for a CT (expected "
                         f"{MIN_SPACING_MM} to {MAX_SPACING_MM} mm): check the image header")

    values = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(values.dtype, np.floating):
        n_nan = int(np.count_nonzero(np.isnan(values)))
        n_inf = int(np.count_nonzero(np.isinf(values)))
        if n_nan or n_inf:
            raise InputError(f"the image contains {n_nan} NaN and {n_inf} infinite voxel values")
    hu_min, hu_max = float(values.min()), float(values.max())
    if hu_min == hu_max:
        raise InputError(f"the image is constant (every voxel is {hu_min:g}): there is nothing to analyse")
    if hu_min >= -500.0:
        raise InputError(f"the image does not look like a CT in Hounsfield units (range {hu_min:g}..{hu_max:g}, no "
                         "air below -500 HU): is it an MR, or a CT stored without its rescale slope/intercept?")

    warnings = []
    n_voxels = image.GetNumberOfPixels()
    if n_voxels > LARGE_VOLUME_VOXELS:
        warnings.append(f"very large volume ({_format_size(size)} = {n_voxels / 1e6:.0f} million voxels): "
                        "processing will be slow and memory hungry")
    if max(spacing) > THICK_SLICE_MM:
        warnings.append(f"thick slices ({max(spacing):.2g} mm): small structures may be missed")
    n_padding = int(np.count_nonzero(values < AIR_HU))
    if n_padding:
        warnings.append(f"{n_padding} voxels below {AIR_HU:g} HU (padding outside the scan field?): "
                        "replace_padding and preprocess_for_model set them to air")
    return CtReport(size=size, spacing_mm=spacing, hu_min=hu_min, hu_max=hu_max, warnings=warnings)


def to_float32(image: sitk.Image) -> sitk.Image:
    """A float32 copy (interpolation and normalisation need real values, not integer HU)."""
    return sitk.Cast(image, sitk.sitkVectorFloat32 if image.GetNumberOfComponentsPerPixel() > 1 else sitk.sitkFloat32)


def _format_size(size: Sequence[int]) -> str:
    return "x".join(str(s) for s in size) if size else "0"


def _format_spacing(spacing: Sequence[float]) -> str:
    return "x".join(f"{s:g}" for s in spacing)


# ---------------------------------------------------------------------------------------------------------------------
# Resampling


@dataclass(frozen=True)
class ImageGeometry:
    """A voxel grid in LPS physical space (SimpleITK order): enough to resample onto it without keeping the pixels."""

    size: Tuple[int, ...]
    spacing_mm: Tuple[float, ...]
    origin_lps_mm: Tuple[float, ...]
    direction: Tuple[float, ...]

    @classmethod
    def from_image(cls, image: sitk.Image) -> "ImageGeometry":
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                   tuple(image.GetDirection()))


def resample_to_spacing(image: sitk.Image, spacing_mm: SpacingLike, interpolator: str = "linear",
                        default_value: Optional[float] = None) -> sitk.Image:
    """Resample onto a grid of ``spacing_mm`` covering the same physical extent, in the same direction.

    The outer corner of the first voxel stays at the same physical point and the output size is
    ceil(extent / spacing), so the new grid covers the whole input (at most one new voxel beyond it). "linear" and
    "bspline" give float32 intensities (``default_value`` defaults to the image minimum); "nearest" is for label maps
    and keeps the pixel type (``default_value`` defaults to 0).
    """
    new_spacing = _as_spacing(spacing_mm, image.GetDimension())
    old_spacing = np.array(image.GetSpacing())
    extent = np.array(image.GetSize()) * old_spacing
    new_size = [max(1, int(math.ceil(e / s - 1e-6))) for e, s in zip(extent, new_spacing)]
    direction = np.array(image.GetDirection()).reshape(image.GetDimension(), -1)
    shift_mm = direction @ ((new_spacing - old_spacing) / 2.0)
    new_origin = tuple(float(o) for o in np.array(image.GetOrigin()) + shift_mm)
    geometry = ImageGeometry(tuple(new_size), tuple(float(s) for s in new_spacing), new_origin,
                             tuple(image.GetDirection()))
    return _resample(image, geometry, interpolator, default_value)


def resample_to_reference(image: sitk.Image, reference: Union[sitk.Image, ImageGeometry],
                          interpolator: str = "linear", default_value: Optional[float] = None) -> sitk.Image:
    """Resample onto the grid of ``reference`` (an image or its ``ImageGeometry``), e.g. a model output back to the
    input CT. Interpolator and default value as in ``resample_to_spacing``."""
    geometry = reference if isinstance(reference, ImageGeometry) else ImageGeometry.from_image(reference)
    return _resample(image, geometry, interpolator, default_value)


def _resample(image: sitk.Image, geometry: ImageGeometry, interpolator: str,
              default_value: Optional[float]) -> sitk.Image:
    if interpolator not in _INTERPOLATORS:
        raise InputError(f"unknown interpolator {interpolator!r} (expected one of {', '.join(_INTERPOLATORS)})")
    is_label = interpolator == "nearest"
    if default_value is None:
        default_value = 0.0 if is_label else float(sitk.GetArrayViewFromImage(image).min())
    source = image if is_label else to_float32(image)
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(s) for s in geometry.size])
    resampler.SetOutputSpacing(geometry.spacing_mm)
    resampler.SetOutputOrigin(geometry.origin_lps_mm)
    resampler.SetOutputDirection(geometry.direction)
    resampler.SetInterpolator(_INTERPOLATORS[interpolator])
    resampler.SetDefaultPixelValue(float(default_value))
    resampler.SetOutputPixelType(source.GetPixelID())
    return resampler.Execute(source)


def three_numbers(values, what: str) -> np.ndarray:
    """``values`` as three finite floats (a point in mm, a spacing, a normal); ``InputError`` naming ``what``."""
    try:
        vector = np.asarray(values, dtype=float).reshape(-1)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be three finite numbers (x, y, z), got {values!r}") from None
    if vector.size != 3 or not np.all(np.isfinite(vector)):
        raise InputError(f"{what} must be three finite numbers (x, y, z), got {values!r}")
    return vector


def _as_spacing(spacing_mm: SpacingLike, dimension: int) -> np.ndarray:
    spacing = np.atleast_1d(np.asarray(spacing_mm, dtype=float))
    if spacing.size == 1:
        spacing = np.repeat(spacing, dimension)
    if spacing.size != dimension or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(f"target spacing {spacing_mm} mm must be one positive value or {dimension} positive values")
    return spacing


# ---------------------------------------------------------------------------------------------------------------------
# Intensity


def window_center_width_to_range(center_hu: float, width_hu: float) -> Tuple[float, float]:
    """Convert a DICOM-style window (center, width) to the (hu_min, hu_max) used everywhere here."""
    if width_hu <= 0:
        raise InputError(f"window width must be positive (got {width_hu:g} HU)")
    return center_hu - width_hu / 2.0, center_hu + width_hu / 2.0


def replace_padding(image: sitk.Image, padding_below_hu: float = AIR_HU, air_hu: float = AIR_HU) -> sitk.Image:
    """Set voxels below ``padding_below_hu`` (scanner padding such as -2048 or -3024 outside the scan circle) to air,
    so that interpolation and statistics see air there. Keeps the pixel type."""
    return sitk.Threshold(image, lower=float(padding_below_hu), upper=float(np.finfo(np.float64).max),
                          outsideValue=float(air_hu))


def clip_hu(image: sitk.Image, hu_min: float, hu_max: float) -> sitk.Image:
    """Clamp intensities to [hu_min, hu_max], keeping the pixel type."""
    _check_range(hu_min, hu_max)
    return sitk.Clamp(image, lowerBound=float(hu_min), upperBound=float(hu_max))


def window_to_unit(image: sitk.Image, hu_min: float, hu_max: float, out_min: float = 0.0, out_max: float = 1.0,
                   clip: bool = True) -> sitk.Image:
    """Map [hu_min, hu_max] linearly onto [out_min, out_max] as float32 (MONAI's ScaleIntensityRange), clipping
    outside values when ``clip`` (then padding below hu_min is harmless)."""
    _check_range(hu_min, hu_max)
    scale = (out_max - out_min) / (hu_max - hu_min)
    scaled = sitk.ShiftScale(to_float32(image), shift=-float(hu_min), scale=float(scale)) + float(out_min)
    if clip:
        return sitk.Clamp(scaled, lowerBound=float(min(out_min, out_max)), upperBound=float(max(out_min, out_max)))
    return scaled


def zscore_normalise(image: sitk.Image, mask: Optional[sitk.Image] = None, outside_unchanged: bool = False) -> sitk.Image:
    """(value - mean) / std as float32, with mean and std taken within ``mask`` (e.g. the body) or the whole image;
    ``outside_unchanged`` normalises only the voxels inside the mask (MONAI's ``nonzero`` mode)."""
    values = sitk.GetArrayViewFromImage(image)
    if mask is not None:
        check_same_grid(image, mask, "mask")
        inside = sitk.GetArrayViewFromImage(mask) != 0
        if not inside.any():
            raise InputError("the normalisation mask is empty")
        values = values[inside]
    mean, std = _mean_std(values)
    if std == 0:
        raise InputError(f"cannot z-score normalise: the intensities are constant ({mean:g}) within the mask")
    normalised = sitk.ShiftScale(to_float32(image), shift=-mean, scale=1.0 / std)
    if outside_unchanged:
        normalised = sitk.Mask(normalised, mask, outsideValue=0) + sitk.Mask(to_float32(image), mask == 0)
    return normalised


def _mean_std(values: np.ndarray) -> Tuple[float, float]:
    values = values.astype(np.float64, copy=False)
    return float(values.mean()), float(values.std())


def _check_range(low: float, high: float) -> None:
    if not high > low:
        raise InputError(f"intensity window maximum must exceed its minimum (got {low:g}..{high:g} HU)")


def check_same_grid(image: sitk.Image, other: sitk.Image, name: str) -> None:
    """InputError unless ``other`` (e.g. a mask) lies on ``image``'s voxel grid."""
    same = (image.GetSize() == other.GetSize()
            and np.allclose(image.GetSpacing(), other.GetSpacing(), atol=1e-4)
            and np.allclose(image.GetOrigin(), other.GetOrigin(), atol=1e-3)
            and np.allclose(image.GetDirection(), other.GetDirection(), atol=1e-5))
    if not same:
        raise InputError(f"the {name} is not on the image grid (size {_format_size(other.GetSize())} vs "
                         f"{_format_size(image.GetSize())}, or different spacing/origin/direction)")


# ---------------------------------------------------------------------------------------------------------------------
# Denoising


def denoise(image: sitk.Image, method: str = "median", *, median_radius_voxels: Union[int, Sequence[int]] = 1,
            sigma_mm: float = 1.0, iterations: int = 5, conductance: float = 1.0,
            time_step: Optional[float] = None) -> sitk.Image:
    """Edge-aware or plain smoothing against CT noise.

    "median": radius in voxels (1 = 3x3x3; (1, 1, 0) filters each slice, several times faster), keeps the pixel
    type. "gaussian": ``sigma_mm`` in millimetres, float32.
    "curvature_anisotropic": ``iterations``, ``conductance`` (relative to the image's gradient, ~1) and
    ``time_step`` (default and maximum min_spacing / 2**(N+1), the stability limit of the explicit scheme), float32;
    it is slow on full CT volumes (tens of seconds).
    """
    if method == "median":
        radius = [int(r) for r in np.broadcast_to(median_radius_voxels, (image.GetDimension(),))]
        if min(radius) < 0:
            raise InputError(f"median radius must be >= 0 voxels (got {median_radius_voxels})")
        return sitk.Median(image, radius)
    if method == "gaussian":
        if sigma_mm <= 0:
            raise InputError(f"gaussian sigma must be positive (got {sigma_mm:g} mm)")
        return sitk.SmoothingRecursiveGaussian(to_float32(image), sigma=float(sigma_mm))
    if method == "curvature_anisotropic":
        stable_step = min(image.GetSpacing()) / 2.0 ** (image.GetDimension() + 1)
        step = stable_step if time_step is None else float(time_step)
        if not 0 < step <= stable_step * (1 + 1e-9):
            raise InputError(f"diffusion time step {step:g} is unstable for spacing "
                             f"{_format_spacing(image.GetSpacing())} mm (must be in (0, {stable_step:.4g}])")
        if iterations < 1:
            raise InputError(f"diffusion needs at least 1 iteration (got {iterations})")
        return sitk.CurvatureAnisotropicDiffusion(to_float32(image), timeStep=step,
                                                  conductanceParameter=float(conductance),
                                                  numberOfIterations=int(iterations))
    raise InputError(f"unknown denoising method {method!r} (expected 'median', 'gaussian' or 'curvature_anisotropic')")


# ---------------------------------------------------------------------------------------------------------------------
# Body and coarse lung masks, cropping


@dataclass(frozen=True)
class BoundingBox:
    """A box of voxels in SimpleITK index order (x, y, z): ``index`` is the first voxel, ``size`` the extent."""

    index: Tuple[int, ...]
    size: Tuple[int, ...]

    @property
    def stop(self) -> Tuple[int, ...]:
        """One past the last voxel along each axis."""
        return tuple(i + s for i, s in zip(self.index, self.size))


def body_mask(image: sitk.Image, threshold_hu: float = -500.0, table_opening_mm: float = 3.0) -> sitk.Image:
    """The patient's body as a uint8 mask: voxels above ``threshold_hu``, opened by a ball of ``table_opening_mm``
    radius (drops the table shell, blankets and cables thinner than twice the radius; where the table touches the
    body a stub of it may stay), largest connected component, holes filled per axial slice (in 3D the lungs are
    open to the outside through the airway; within a slice they are holes). Body parts thinner than twice the radius
    (fingers, ear lobes) can be lost: it is meant for cropping and intensity statistics."""
    above = sitk.GetArrayViewFromImage(image) > threshold_hu
    if not above.any():
        raise InputError(f"no body found above {threshold_hu:g} HU: is this a CT?")
    opened = _open_largest_component(above, image.GetSpacing(), table_opening_mm)
    if opened is None:
        raise InputError(f"no body found above {threshold_hu:g} HU thicker than {2 * table_opening_mm:g} mm: "
                         "is this a CT of a patient?")
    return _mask_image(_fill_holes_per_slice(opened), image)


def lung_mask_coarse(image: sitk.Image, body: Optional[sitk.Image] = None, threshold_hu: float = -400.0,
                     second_component_min_fraction: float = 0.2) -> sitk.Image:
    """Air inside the body (below ``threshold_hu``) as a uint8 mask: the largest connected component, plus the
    second when it is at least ``second_component_min_fraction`` of the largest (two separate lungs). Components
    touching the in-plane border are outside air where the body leaves the field of view (the lungs may leave it
    through the first or last slice, so those are kept). Good enough for a lung bounding box; not a clinical lung
    segmentation (vessels are left out, airways and large gas pockets may be in)."""
    if body is None:
        body = body_mask(image)
    else:
        check_same_grid(image, body, "body mask")
    air = (sitk.GetArrayViewFromImage(image) < threshold_hu) & (sitk.GetArrayViewFromImage(body) != 0)
    labels, sizes = _components_by_size(air)
    for edge in (labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1]):
        sizes[edge] = 0
    enclosed = np.flatnonzero(sizes)  # from the largest, as labelled
    if enclosed.size == 0:
        raise InputError(f"no air (< {threshold_hu:g} HU) enclosed by the body: does this CT contain the lungs?")
    lungs = labels == enclosed[0]
    if enclosed.size > 1 and sizes[enclosed[1]] >= second_component_min_fraction * sizes[enclosed[0]]:
        lungs |= labels == enclosed[1]
    return _mask_image(lungs, image)


def bounding_box(mask: sitk.Image, margin_mm: SpacingLike = 0.0) -> BoundingBox:
    """The smallest box holding every non-zero voxel of ``mask``, grown by ``margin_mm`` (one value or per axis
    x, y, z; rounded up to whole voxels) and clipped to the image."""
    values = sitk.GetArrayViewFromImage(mask) != 0
    if not values.any():
        raise InputError("the mask is empty: there is no region to crop to")
    margin_voxels = np.ceil(np.broadcast_to(np.asarray(margin_mm, dtype=float), (mask.GetDimension(),))
                            / np.array(mask.GetSpacing()) - 1e-6).astype(int)
    if np.any(margin_voxels < 0):
        raise InputError(f"crop margin must be >= 0 mm (got {margin_mm})")
    start_zyx, stop_zyx = [], []
    for axis in range(values.ndim):
        occupied = np.flatnonzero(values.any(axis=tuple(a for a in range(values.ndim) if a != axis)))
        start_zyx.append(int(occupied[0]))
        stop_zyx.append(int(occupied[-1]) + 1)
    size = np.array(mask.GetSize())
    start = np.maximum(np.array(start_zyx[::-1]) - margin_voxels, 0)
    stop = np.minimum(np.array(stop_zyx[::-1]) + margin_voxels, size)
    return BoundingBox(tuple(int(v) for v in start), tuple(int(v) for v in stop - start))


def crop(image: sitk.Image, box: BoundingBox) -> sitk.Image:
    """The voxels of ``box``, at exactly the same physical place (the origin moves to the box's first voxel)."""
    _check_box(box, image)
    return sitk.RegionOfInterest(image, size=[int(s) for s in box.size], index=[int(i) for i in box.index])


def uncrop(cropped: sitk.Image, reference: sitk.Image, box: BoundingBox, fill: float = 0.0) -> sitk.Image:
    """Paste ``cropped`` (e.g. a result computed on ``crop(reference, box)``) back onto the grid of ``reference``,
    with ``fill`` elsewhere; keeps the pixel type of ``cropped``."""
    _check_box(box, reference)
    if tuple(cropped.GetSize()) != tuple(box.size):
        raise InputError(f"the cropped image size {_format_size(cropped.GetSize())} differs from the box size "
                         f"{_format_size(box.size)}")
    expected_origin = reference.TransformIndexToPhysicalPoint([int(i) for i in box.index])
    if not np.allclose(cropped.GetOrigin(), expected_origin, atol=1e-3 * max(reference.GetSpacing())) or \
            not np.allclose(cropped.GetSpacing(), reference.GetSpacing(), atol=1e-4):
        raise InputError("the cropped image is not the box region of the reference grid (origin or spacing differ): "
                         "resample it onto the cropped grid first")
    canvas = sitk.Image(reference.GetSize(), cropped.GetPixelID(), cropped.GetNumberOfComponentsPerPixel())
    canvas.CopyInformation(reference)
    if fill != 0:
        canvas = sitk.Cast(canvas + float(fill), cropped.GetPixelID())
    return sitk.Paste(canvas, cropped, sourceSize=cropped.GetSize(), sourceIndex=[0] * cropped.GetDimension(),
                      destinationIndex=[int(i) for i in box.index])


def _check_box(box: BoundingBox, image: sitk.Image) -> None:
    if (len(box.index) != image.GetDimension() or min(box.index) < 0 or min(box.size) < 1
            or any(stop > size for stop, size in zip(box.stop, image.GetSize()))):
        raise InputError(f"box index {box.index} size {box.size} does not fit the image of size "
                         f"{_format_size(image.GetSize())}")


def _open_largest_component(mask: np.ndarray, spacing: Sequence[float], radius_mm: float) -> Optional[np.ndarray]:
    """Opening by a ball of ``radius_mm`` (exact: every voxel offset within ``radius_mm``), keeping the largest
    component of the eroded mask so that what erosion detached (the table) is not grown back.

    It works on the bounding box of ``mask`` grown by the radius: erosion and dilation cannot reach beyond it."""
    margin_voxels = [int(math.ceil(radius_mm / s)) if radius_mm > 0 else 0 for s in spacing]
    box = _bounding_slices(mask, margin_voxels)
    region = mask[box]
    eroded = region if radius_mm <= 0 else _ball_morphology(region, spacing, radius_mm, erode=True)
    if not eroded.any():
        return None
    labels, _ = _components_by_size(eroded)
    largest = labels == 1
    opened = np.zeros_like(mask)
    opened[box] = largest if radius_mm <= 0 else _ball_morphology(largest, spacing, radius_mm, erode=False) & region
    return opened


def _ball_morphology(mask: np.ndarray, spacing: Sequence[float], radius_mm: float, erode: bool) -> np.ndarray:
    """Erosion or dilation of a (z, y, x) mask by the voxel offsets within ``radius_mm`` (spacing in x, y, z order);
    beyond the image counts as foreground for erosion and background for dilation (as distance maps do).

    The ball is a stack of x segments, one per (dz, dy) row: the mask is eroded (dilated) along x once per segment
    length, bit-packed along x, then the shifted rows are combined, 8 voxels per byte."""
    rows = _ball_rows(spacing, radius_mm)
    halves = {half for _, _, half in rows}
    packed = {half: np.packbits(run, axis=2)
              for half, run in _runs_along_x(mask, max(halves), np.logical_and if erode else np.logical_or)
              if half in halves}
    result = np.full(packed[max(halves)].shape, 255 if erode else 0, dtype=np.uint8)
    combine_bits = np.bitwise_and if erode else np.bitwise_or
    for dz, dy, half in rows:  # the ball is symmetric, so the same shifts serve erosion and dilation
        (target_z, source_z), (target_y, source_y) = _shifted(dz, mask.shape[0]), _shifted(dy, mask.shape[1])
        target = result[target_z, target_y]
        combine_bits(target, packed[half][source_z, source_y], out=target)
    return np.unpackbits(result, axis=2, count=mask.shape[2]).view(bool)


def _ball_rows(spacing: Sequence[float], radius_mm: float) -> List[Tuple[int, int, int]]:
    """(dz, dy, half-length along x) in voxels for each x segment of the ball of ``radius_mm``."""
    spacing_x, spacing_y, spacing_z = (float(s) for s in spacing)
    tolerance = 1e-9 * radius_mm ** 2
    rows = []
    reach_z = int(math.floor(radius_mm / spacing_z + 1e-9))
    for dz in range(-reach_z, reach_z + 1):
        left_z = radius_mm ** 2 - (dz * spacing_z) ** 2 + tolerance
        reach_y = int(math.floor(math.sqrt(left_z) / spacing_y))
        for dy in range(-reach_y, reach_y + 1):
            rows.append((dz, dy, int(math.floor(math.sqrt(left_z - (dy * spacing_y) ** 2) / spacing_x))))
    return rows


def _runs_along_x(mask: np.ndarray, max_half: int, combine) -> Iterator[Tuple[int, np.ndarray]]:
    """(h, run) for h = 0..max_half, where ``run[..., i]`` combines ``mask[..., i - h : i + h + 1]`` (beyond the
    image does not count); each run combines three neighbours of the previous one."""
    run = mask
    yield 0, run
    for half in range(1, max_half + 1):
        previous, run = run, run.copy()
        combine(run[..., 1:], previous[..., :-1], out=run[..., 1:])
        combine(run[..., :-1], previous[..., 1:], out=run[..., :-1])
        yield half, run


def _shifted(offset: int, length: int) -> Tuple[slice, slice]:
    """(target, source) slices such that target index i reads source index i + offset, both within ``length``."""
    offset = max(-length, min(offset, length))
    if offset >= 0:
        return slice(0, length - offset), slice(offset, length)
    return slice(-offset, length), slice(0, length + offset)


def _components_by_size(mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Face-connected components of a (z, y, x) mask, labelled 1, 2, ... from the largest, and ``sizes[label]`` in
    voxels (``sizes[0]`` = 0)."""
    relabel = sitk.RelabelComponentImageFilter()
    relabel.SortByObjectSizeOn()
    labels = relabel.Execute(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), False))
    return sitk.GetArrayFromImage(labels), np.array([0] + list(relabel.GetSizeOfObjectsInPixels()), dtype=np.int64)


def _bounding_slices(mask: np.ndarray, margin_voxels: Sequence[int]) -> Tuple[slice, ...]:
    """The bounding box of a non-empty (z, y, x) mask, grown by ``margin_voxels`` per axis (x, y, z order) within
    the array."""
    box = []
    for axis, margin in zip(range(mask.ndim), margin_voxels[::-1]):
        occupied = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(int(occupied[0]) - margin, 0), min(int(occupied[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


def _fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """Fill every background region of each axial slice that does not touch that slice's border (4-connected).

    One 2D fill does all slices: they are stacked along y, each below a row of background that joins its border to
    the image border. It works on the bounding box of ``mask``: background on the box's edge touches the background
    around the box, which reaches the slice border, so it is never a hole."""
    box = _bounding_slices(mask, (0, 0, 0))
    region = mask[box]
    depth, height, width = region.shape
    stacked = np.zeros((depth, height + 1, width), dtype=np.uint8)
    stacked[:, 1:] = region
    filled = sitk.BinaryFillhole(sitk.GetImageFromArray(stacked.reshape(depth * (height + 1), width)),
                                 fullyConnected=False, foregroundValue=1)
    result = np.zeros_like(mask)
    result[box] = sitk.GetArrayViewFromImage(filled).reshape(depth, height + 1, width)[:, 1:] != 0
    return result


def _mask_image(mask: np.ndarray, reference: sitk.Image) -> sitk.Image:
    result = sitk.GetImageFromArray(mask.astype(np.uint8))
    result.CopyInformation(reference)
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Model input/output


@dataclass(frozen=True)
class InverseInfo:
    """What ``restore_to_input`` needs to put a model output back onto the input CT grid."""

    input_geometry: ImageGeometry


def preprocess_for_model(image: sitk.Image, spacing_mm: Optional[SpacingLike], intensity: dict,
                         progress: Optional[Progress] = None) -> Tuple[sitk.Image, InverseInfo]:
    """Padding to air, resampling to ``spacing_mm`` (None keeps the grid), then intensity normalisation (float32).

    ``intensity`` is {"type": "window", "hu_min", "hu_max", "out_min" (0), "out_max" (1), "clip" (true)} or
    {"type": "zscore"} with optional "hu_min"/"hu_max" (clip first) and "mean"/"std" (fixed dataset statistics, as
    nnU-Net does for CT; otherwise those of the resampled volume). A malformed spec raises ``ModelError``.
    """
    progress = as_progress(progress)
    normalise = _intensity_function(intensity)
    inverse = InverseInfo(ImageGeometry.from_image(image))
    progress.report(0.0, "Replacing padding")
    prepared = to_float32(replace_padding(image))
    if spacing_mm is not None:
        progress.report(0.2, "Resampling")
        prepared = resample_to_spacing(prepared, spacing_mm, "linear")
    progress.report(0.8, "Normalising intensities")
    prepared = normalise(prepared)
    progress.report(1.0, "Preprocessed")
    return prepared, inverse


def restore_to_input(model_output: sitk.Image, inverse_info: InverseInfo, interpolator: str = "linear",
                     default_value: Optional[float] = None) -> sitk.Image:
    """Resample a model output (probabilities: "linear"; labels: "nearest") back onto the input CT grid."""
    return resample_to_reference(model_output, inverse_info.input_geometry, interpolator, default_value)


INTENSITY_KEYS = {"window": ("hu_min", "hu_max", "out_min", "out_max", "clip"),
                  "zscore": ("hu_min", "hu_max", "mean", "std", "nonzero", "out_min", "out_max")}


def intensity_spec(spec: dict) -> dict:
    """Validate a model's intensity normalisation and fill in its defaults; raise ModelError naming what is wrong.

    ``{"type": "window", "hu_min", "hu_max", "out_min": 0, "out_max": 1, "clip": true}`` maps [hu_min, hu_max]
    linearly onto [out_min, out_max] (MONAI's ScaleIntensityRange). ``{"type": "zscore"}`` subtracts the mean and
    divides by the standard deviation: fixed ``mean``/``std`` (dataset statistics, as nnU-Net does for CT) or the
    volume's own, over its non-zero voxels only when ``nonzero`` (MONAI's NormalizeIntensity); optional ``hu_min``/
    ``hu_max`` clip first, optional ``out_min``/``out_max`` rescale the result's min..max after (ScaleIntensity).
    """
    if not isinstance(spec, dict) or "type" not in spec:
        raise ModelError(f"the intensity normalisation must be a dict with a 'type'; got {spec!r}")
    if spec["type"] not in INTENSITY_KEYS:
        raise ModelError(f"unknown intensity normalisation type {spec['type']!r} (expected one of "
                         f"{list(INTENSITY_KEYS)})")
    kind = spec["type"]
    unknown = sorted(set(spec) - {"type", *INTENSITY_KEYS[kind]})
    if unknown:
        raise ModelError(f"unknown keys {unknown} in the {kind!r} intensity normalisation")
    for key in ("hu_min", "hu_max", "out_min", "out_max", "mean", "std"):
        value = spec.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise ModelError(f"intensity normalisation {key!r} must be a finite number; got {value!r}")
    for key in ("clip", "nonzero"):
        if not isinstance(spec.get(key, False), bool):
            raise ModelError(f"intensity normalisation {key!r} must be true or false; got {spec[key]!r}")
    for low, high in (("hu_min", "hu_max"), ("out_min", "out_max"), ("mean", "std")):
        if (low in spec) != (high in spec):
            raise ModelError(f"the {kind!r} intensity normalisation needs both {low!r} and {high!r}, or neither")
    if kind == "window":
        if "hu_min" not in spec:
            raise ModelError("a 'window' intensity normalisation needs 'hu_min' and 'hu_max'")
        spec = {"type": "window", "out_min": 0.0, "out_max": 1.0, "clip": True, **spec}
    if "hu_min" in spec and spec["hu_min"] >= spec["hu_max"]:
        raise ModelError(f"intensity normalisation needs hu_min < hu_max; got {spec['hu_min']} and {spec['hu_max']}")
    if "out_min" in spec and spec["out_min"] >= spec["out_max"]:
        raise ModelError(f"intensity normalisation needs out_min < out_max; got {spec['out_min']} and "
                         f"{spec['out_max']}")
    if "std" in spec and not spec["std"] > 0:
        raise ModelError(f"zscore 'std' must be positive (got {spec['std']})")
    return dict(spec)


def _intensity_function(spec: dict):
    spec = intensity_spec(spec)
    if spec["type"] == "window":
        return lambda image: window_to_unit(image, spec["hu_min"], spec["hu_max"], spec["out_min"], spec["out_max"],
                                            spec["clip"])

    def normalise(image: sitk.Image) -> sitk.Image:
        if "hu_min" in spec:
            image = clip_hu(image, spec["hu_min"], spec["hu_max"])
        if "mean" in spec:
            image = sitk.ShiftScale(to_float32(image), shift=-float(spec["mean"]), scale=1.0 / float(spec["std"]))
        elif spec.get("nonzero"):
            image = zscore_normalise(image, sitk.Cast(image != 0, sitk.sitkUInt8), outside_unchanged=True)
        else:
            image = zscore_normalise(image)
        if "out_min" in spec:
            image = sitk.RescaleIntensity(image, float(spec["out_min"]), float(spec["out_max"]))
        return image

    return normalise


def ball_mask(reference: sitk.Image, center_lps_mm, diameter_mm: float) -> sitk.Image:
    """A uint8 ball of ``diameter_mm`` around ``center_lps_mm`` on the reference grid (voxel centres inside), e.g. a
    tumour placed to rehearse a plan; computed in the ball's box of voxels only."""
    center = three_numbers(center_lps_mm, "center_lps_mm")
    if not diameter_mm > 0:
        raise InputError(f"the ball's diameter must be > 0 mm (got {diameter_mm})")
    size_xyz = np.array(reference.GetSize())
    center_index = np.array(reference.TransformPhysicalPointToContinuousIndex([float(v) for v in center]))
    reach = diameter_mm / 2.0 / np.array(reference.GetSpacing()) + 1
    low = np.clip(np.floor(center_index - reach), 0, size_xyz).astype(int)
    high = np.clip(np.ceil(center_index + reach) + 1, 0, size_xyz).astype(int)
    values = np.zeros(size_xyz[::-1], np.uint8)
    if np.all(high > low):
        index_xyz = np.indices(tuple(high - low)[::-1]).reshape(3, -1)[::-1].T + low
        direction = np.array(reference.GetDirection()).reshape(3, 3)
        points = np.array(reference.GetOrigin()) + (index_xyz * reference.GetSpacing()) @ direction.T
        inside = index_xyz[np.linalg.norm(points - center, axis=1) <= diameter_mm / 2.0]
        values[inside[:, 2], inside[:, 1], inside[:, 0]] = 1
    if not values.any():
        raise InputError(f"a ball of {diameter_mm:g} mm at {center.round(1).tolist()} mm (LPS) lies outside the image")
    image = sitk.GetImageFromArray(values)
    image.CopyInformation(reference)
    return image
