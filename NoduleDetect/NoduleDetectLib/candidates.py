"""Lung nodule candidates on chest CT: a multi-scale Hessian "dot" filter inside the lungs (classical, no network).

A nodule is a bright, roughly spherical blob in the dark lung: at the scale that matches its size, the three
eigenvalues of the image's Hessian are all negative and of similar magnitude. A vessel is a bright tube (two strongly
negative eigenvalues, one near zero) and the pleura a sheet (one). The dot enhancement of Li, Sone and Doi (Med. Phys.
30(8), 2003), |l3|^2 / |l1| with |l1| >= |l2| >= |l3| where all three are negative, responds to the first and hardly
to the others; normalised by sigma^2 it compares blobs of different sizes on one scale of HU.

What keeps it fast and robust on a whole CT:
- only the lung bounding box is processed, and everything outside the lung mask is set to the lung's own median HU,
  so the chest wall and the mediastinum leave no edge: a juxta-pleural nodule inside the mask stays a blob;
- intensities are clipped to [lung median, -400 HU]: a ground-glass nodule (-600..-300 HU) keeps most of the
  contrast of a solid one, and bone or contrast agent cannot dominate;
- each scale runs on a pyramid level whose spacing follows its sigma (1 mm for the smallest nodules, up to 4 mm for
  the largest), and the Hessian is evaluated only where the smoothed image rises above the lung background.
Local maxima of each scale become candidates; a stronger candidate suppresses weaker ones within its radius (in mm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from RecognitionCore.errors import InputError
from RecognitionCore.preprocessing import (bounding_box, check_same_grid, crop, resample_to_reference,
                                          resample_to_spacing)
from RecognitionCore.progress import Progress, as_progress

WINDOW_TOP_HU = -400.0  # ground glass keeps most of the contrast of solid tissue below this
DIAMETER_PER_SIGMA = 3.4  # a uniform ball of this diameter gives its strongest normalised dot response at sigma
SCALE_STEP = math.sqrt(2.0)
SIGMA_VOXELS = 1.25  # each scale runs on the pyramid level where sigma is about this many voxels
FINEST_SPACING_MM = 1.0
COARSEST_SPACING_MM = 4.0
BOX_MARGIN_MM = 5.0
SUPPRESSION_FACTOR = 1.25  # a weaker peak closer than this many radii to a stronger one belongs to it
DEFAULT_MIN_BLOB_SCORE = 20.0
SMALLEST_DIAMETER_MM = 2.0
LARGEST_DIAMETER_MM = 60.0


@dataclass(frozen=True)
class Candidate:
    """A bright blob in the lungs that may be a nodule, with the features a classifier can use.

    ``blob_score``: the scale-normalised dot response, in HU of contrast above the lung within the clipped window (a
    uniform ball of contrast C gives about C / 4 at its own scale, less below 5 mm); higher is more nodule-like.
    ``line_score``: Li's line response at the same place and scale (high on vessels). ``roundness``: |l3| / |l1| in
    [0, 1] (1 for a sphere, near 0 for a tube). ``diameter_mm`` is estimated from the best scale ``scale_mm`` (the
    Gaussian sigma, interpolated between the scales); ``center_hu`` is the mean of the 3 x 3 x 3 input voxels around
    the centre.
    """

    center_lps_mm: Tuple[float, float, float]
    diameter_mm: float
    blob_score: float
    scale_mm: float
    line_score: float
    roundness: float
    center_hu: float


@dataclass(frozen=True)
class _Peak:
    center_lps_mm: Tuple[float, float, float]
    scale_index: int
    sigma_mm: float
    dot: float
    line: float
    roundness: float


def find_candidates(image: sitk.Image, lung_mask: sitk.Image, min_diameter_mm: float = 3.0,
                    max_diameter_mm: float = 30.0, progress: Optional[Progress] = None, *,
                    min_blob_score: float = DEFAULT_MIN_BLOB_SCORE,
                    max_candidates: Optional[int] = None) -> List[Candidate]:
    """Nodule candidates of ``min_diameter_mm``..``max_diameter_mm`` inside ``lung_mask``, strongest first.

    ``image`` is a CT in HU; ``lung_mask`` (non-zero = lung) on the same grid must include the nodules, vessels and
    airway walls within the lungs (a lung segmentation with its holes filled and juxta-pleural bumps closed): the blob
    filter only sees what is inside it. ``max_candidates`` keeps the strongest ones (None: all above
    ``min_blob_score``).
    """
    progress = as_progress(progress)
    _check_arguments(image, lung_mask, min_diameter_mm, max_diameter_mm, min_blob_score, max_candidates)
    progress.report(0.0, "Preparing the lungs")
    lungs_native = sitk.Cast(lung_mask != 0, sitk.sitkUInt8)
    box = bounding_box(lungs_native, BOX_MARGIN_MM)
    lungs = crop(lungs_native, box)
    flattened, background_hu = _flatten_outside_lungs(crop(image, box), lungs)
    sigmas = _scales_mm(min_diameter_mm, max_diameter_mm)
    plan = _pyramid_plan(sigmas)
    peaks: List[_Peak] = []
    level, level_blur_mm = flattened, None
    for spacing_mm, level_sigmas in plan:
        level, level_blur_mm = _next_level(level, spacing_mm, level_blur_mm)
        level_lungs = sitk.GetArrayFromImage(resample_to_reference(lungs, level, "nearest")) != 0
        for sigma_mm in level_sigmas:
            scale_index = sigmas.index(sigma_mm)
            progress.report(0.05 + 0.9 * scale_index / len(sigmas),
                            f"Blob filter at {sigma_mm * DIAMETER_PER_SIGMA:.0f} mm")
            peaks.extend(_scale_peaks(level, level_lungs, scale_index, sigma_mm, level_blur_mm, background_hu,
                                      min_blob_score))
    progress.report(0.95, "Suppressing overlapping candidates")
    kept = _suppress_overlaps(peaks, max_candidates)
    candidates = [Candidate(center_lps_mm=peak.center_lps_mm, diameter_mm=sigma_mm * DIAMETER_PER_SIGMA,
                            blob_score=peak.dot, scale_mm=sigma_mm, line_score=peak.line,
                            roundness=peak.roundness, center_hu=_mean_hu_around(image, peak.center_lps_mm))
                  for peak, sigma_mm in kept]
    progress.report(1.0, f"{len(candidates)} nodule candidates")
    return candidates


def _check_arguments(image, lung_mask, min_diameter_mm, max_diameter_mm, min_blob_score, max_candidates) -> None:
    for name, value in (("image", image), ("lung mask", lung_mask)):
        if not isinstance(value, sitk.Image) or value.GetDimension() != 3:
            raise InputError(f"the {name} must be a 3D SimpleITK image, got {_describe(value)}")
    check_same_grid(image, lung_mask, "lung mask")
    if not all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
               for v in (min_diameter_mm, max_diameter_mm, min_blob_score)):
        raise InputError(f"diameters and min_blob_score must be numbers, got {min_diameter_mm!r}, {max_diameter_mm!r}, "
                         f"{min_blob_score!r}")
    if not SMALLEST_DIAMETER_MM <= min_diameter_mm < max_diameter_mm <= LARGEST_DIAMETER_MM:
        raise InputError(f"nodule diameters {min_diameter_mm:g}..{max_diameter_mm:g} mm must be increasing and within "
                         f"{SMALLEST_DIAMETER_MM:g}..{LARGEST_DIAMETER_MM:g} mm")
    if not min_blob_score > 0:
        raise InputError(f"min_blob_score must be positive, got {min_blob_score!r}")
    if max_candidates is not None and (isinstance(max_candidates, bool) or not isinstance(max_candidates, int)
                                       or max_candidates < 1):
        raise InputError(f"max_candidates must be None or a positive integer, got {max_candidates!r}")


def _describe(value) -> str:
    if isinstance(value, sitk.Image):
        return f"a {value.GetDimension()}D image"
    return type(value).__name__


def _flatten_outside_lungs(ct: sitk.Image, lungs: sitk.Image) -> Tuple[sitk.Image, float]:
    """The CT clipped to [lung median, WINDOW_TOP_HU] with the lung median outside the lungs (float32), and that
    median: the filter then sees the nodules and vessels in the lungs against a flat background. The mask's outer
    voxel layer counts as outside: it is partial volume with the chest wall, a bright rim that would make blobs at
    every corner of the lung surface."""
    values = sitk.GetArrayFromImage(ct).astype(np.float32)
    inside = sitk.GetArrayViewFromImage(lungs) != 0
    background_hu = float(np.median(values[inside]))
    if background_hu >= WINDOW_TOP_HU:
        raise InputError(f"the lung mask holds tissue, not aerated lung (median {background_hu:.0f} HU, expected "
                         f"below {WINDOW_TOP_HU:g} HU): is it the lung mask of this CT?")
    core = _eroded_by_one_voxel(inside)
    np.clip(values, background_hu, WINDOW_TOP_HU, out=values)
    values[~core] = background_hu
    flattened = sitk.GetImageFromArray(values)
    flattened.CopyInformation(ct)
    return flattened, background_hu


def _eroded_by_one_voxel(mask: np.ndarray) -> np.ndarray:
    """Erosion by the 6 face neighbours (beyond the array counts as inside), by shifted views: fast on a full CT."""
    core = mask.copy()
    for axis in range(3):
        lower = [slice(None)] * 3
        upper = [slice(None)] * 3
        lower[axis], upper[axis] = slice(0, -1), slice(1, None)
        core[tuple(lower)] &= mask[tuple(upper)]
        core[tuple(upper)] &= mask[tuple(lower)]
    return core


def _scales_mm(min_diameter_mm: float, max_diameter_mm: float) -> List[float]:
    """Gaussian sigmas in a geometric series from the smallest to (at least) the largest nodule size."""
    smallest, largest = min_diameter_mm / DIAMETER_PER_SIGMA, max_diameter_mm / DIAMETER_PER_SIGMA
    count = int(math.ceil(math.log(largest / smallest) / math.log(SCALE_STEP) - 1e-9)) + 1
    return [smallest * SCALE_STEP ** n for n in range(count)]


def _pyramid_plan(sigmas_mm: Sequence[float]) -> List[Tuple[float, List[float]]]:
    """(level spacing, sigmas run on it) from fine to coarse: spacing ~ sigma / SIGMA_VOXELS within the limits."""
    plan: List[Tuple[float, List[float]]] = []
    for sigma in sigmas_mm:
        spacing = min(max(sigma / SIGMA_VOXELS, FINEST_SPACING_MM), COARSEST_SPACING_MM)
        if plan and spacing < plan[-1][0] * 1.2:
            plan[-1][1].append(sigma)
        else:
            plan.append((spacing, [sigma]))
    return plan


def _next_level(previous: sitk.Image, spacing_mm: float,
                previous_blur_mm: Optional[float]) -> Tuple[sitk.Image, float]:
    """The next pyramid level and its blur (Gaussian sigma in mm already applied). The first level comes straight from
    the input; later ones are smoothed to half their spacing before subsampling, so that they do not alias."""
    if previous_blur_mm is None:
        return resample_to_spacing(previous, spacing_mm, "linear"), 0.0
    blur_mm = 0.5 * spacing_mm
    extra_mm = math.sqrt(max(blur_mm ** 2 - previous_blur_mm ** 2, 0.0))
    values = ndimage.gaussian_filter(sitk.GetArrayViewFromImage(previous), extra_mm / previous.GetSpacing()[0],
                                     mode="nearest", truncate=3.0)
    smoothed = sitk.GetImageFromArray(values)
    smoothed.CopyInformation(previous)
    return resample_to_spacing(smoothed, spacing_mm, "linear"), blur_mm


def _scale_peaks(level: sitk.Image, lungs: np.ndarray, scale_index: int, sigma_mm: float, level_blur_mm: float,
                 background_hu: float, min_blob_score: float) -> List[_Peak]:
    """Local maxima of the normalised dot response at ``sigma_mm`` inside the lungs, above ``min_blob_score``."""
    spacing_mm = level.GetSpacing()[0]
    sigma_voxels = sigma_mm / spacing_mm
    smoothed = ndimage.gaussian_filter(sitk.GetArrayViewFromImage(level),
                                       math.sqrt(sigma_mm ** 2 - level_blur_mm ** 2) / spacing_mm,
                                       mode="nearest", truncate=3.0)
    # a blob's centre is brighter than the background; every voxel with a response must pass this cheap test
    seeds = lungs & (smoothed > background_hu + min_blob_score)
    _clear_border(seeds)
    index = np.flatnonzero(seeds)
    if index.size == 0:
        return []
    flat = smoothed.ravel()
    strides = (smoothed.shape[1] * smoothed.shape[2], smoothed.shape[2], 1)  # z, y, x
    hessian = _hessian_at(flat, index, strides) * np.float32(sigma_voxels ** 2)
    negative = (hessian[0] < 0) & (hessian[1] < 0) & (hessian[2] < 0)  # necessary for a negative definite Hessian
    index, hessian = index[negative], hessian[:, negative]
    magnitudes = -_eigenvalues(hessian)  # |l1| >= |l2| >= |l3| where all three are negative
    blob = magnitudes[2] > 0
    index, magnitudes = index[blob], magnitudes[:, blob]
    dot = magnitudes[2] ** 2 / magnitudes[0]
    response = np.zeros(flat.shape, dtype=np.float32)
    response[index] = dot
    strong = dot >= min_blob_score
    index, magnitudes, dot = index[strong], magnitudes[:, strong], dot[strong]
    is_peak = np.ones(index.shape, dtype=bool)
    for offset in _neighbour_offsets(strides):
        is_peak &= dot >= response[index + offset]
    index, magnitudes, dot = index[is_peak], magnitudes[:, is_peak], dot[is_peak]
    line = magnitudes[1] * (magnitudes[1] - magnitudes[2]) / magnitudes[0]
    centres = _refined_centres(level, flat, index, strides, smoothed.shape)
    return [_Peak(center_lps_mm=centre, scale_index=scale_index, sigma_mm=sigma_mm, dot=float(d), line=float(v),
                  roundness=float(m[2] / m[0])) for centre, d, v, m in zip(centres, dot, line, magnitudes.T)]


def _clear_border(mask: np.ndarray) -> None:
    """Unset the outer layer of voxels: finite differences and the neighbour test need one voxel all around."""
    mask[[0, -1]] = False
    mask[:, [0, -1]] = False
    mask[:, :, [0, -1]] = False


def _hessian_at(flat: np.ndarray, index: np.ndarray, strides: Sequence[int]) -> np.ndarray:
    """Second derivatives (in voxel units) by central differences at ``index``: rows zz, yy, xx, zy, zx, yx."""
    centre = flat[index]
    rows = [flat[index + s] + flat[index - s] - 2.0 * centre for s in strides]
    for a, b in ((0, 1), (0, 2), (1, 2)):
        sa, sb = strides[a], strides[b]
        rows.append(0.25 * (flat[index + sa + sb] - flat[index + sa - sb] - flat[index - sa + sb]
                            + flat[index - sa - sb]))
    return np.stack(rows)


def _eigenvalues(hessian: np.ndarray) -> np.ndarray:
    """Eigenvalues of symmetric 3 x 3 matrices (rows zz, yy, xx, zy, zx, yx; one matrix per column), in increasing
    order, by the closed form of Smith (1961): no per-voxel matrix work."""
    h = hessian.astype(np.float64)
    zz, yy, xx, zy, zx, yx = h
    mean = (zz + yy + xx) / 3.0
    off = zy ** 2 + zx ** 2 + yx ** 2
    p = np.sqrt(((zz - mean) ** 2 + (yy - mean) ** 2 + (xx - mean) ** 2 + 2.0 * off) / 6.0)
    safe = np.where(p > 0, p, 1.0)
    a, b, c = (zz - mean) / safe, (yy - mean) / safe, (xx - mean) / safe
    d, e, f = zy / safe, zx / safe, yx / safe
    half_det = 0.5 * (a * (b * c - f * f) - d * (d * c - f * e) + e * (d * f - b * e))
    phi = np.arccos(np.clip(half_det, -1.0, 1.0)) / 3.0
    largest = mean + 2.0 * p * np.cos(phi)
    smallest = mean + 2.0 * p * np.cos(phi + 2.0 * math.pi / 3.0)
    middle = 3.0 * mean - largest - smallest
    return np.stack([smallest, middle, largest]).astype(np.float32)


def _neighbour_offsets(strides: Sequence[int]) -> List[int]:
    return [dz * strides[0] + dy * strides[1] + dx * strides[2]
            for dz in (-1, 0, 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dz, dy, dx) != (0, 0, 0)]


def _refined_centres(level: sitk.Image, flat: np.ndarray, index: np.ndarray, strides: Sequence[int],
                     shape: Sequence[int]) -> List[Tuple[float, float, float]]:
    """Sub-voxel peak positions (a parabola through the smoothed image along each axis), in LPS mm."""
    zyx = np.stack(np.unravel_index(index, shape)).astype(np.float64)
    centre = flat[index].astype(np.float64)
    for axis, stride in enumerate(strides):
        before, after = flat[index - stride].astype(np.float64), flat[index + stride].astype(np.float64)
        curvature = before - 2.0 * centre + after
        shift = np.where(curvature < 0, 0.5 * (before - after) / np.where(curvature < 0, curvature, -1.0), 0.0)
        zyx[axis] += np.clip(shift, -0.5, 0.5)
    return [tuple(float(v) for v in level.TransformContinuousIndexToPhysicalPoint((x, y, z)))
            for z, y, x in zyx.T]


def _suppress_overlaps(peaks: Sequence[_Peak], max_candidates: Optional[int]) -> List[Tuple[_Peak, float]]:
    """(peak, refined sigma) strongest first: a peak closer than SUPPRESSION_FACTOR times the larger radius to a
    stronger kept one is dropped (several maxima of one nodule: at neighbouring scales, or small ones on its rim)."""
    ordered = sorted(peaks, key=lambda peak: peak.dot, reverse=True)
    by_scale = _peaks_by_scale(ordered)
    kept: List[Tuple[_Peak, float]] = []
    centres = np.empty((0, 3))
    radii = np.empty(0)
    for peak in ordered:
        sigma_mm = _refined_sigma(peak, by_scale)
        radius = 0.5 * sigma_mm * DIAMETER_PER_SIGMA
        if len(kept):
            distance = np.linalg.norm(centres - np.asarray(peak.center_lps_mm), axis=1)
            if np.any(distance < SUPPRESSION_FACTOR * np.maximum(radii, radius)):
                continue
        kept.append((peak, sigma_mm))
        centres = np.vstack([centres, peak.center_lps_mm])
        radii = np.append(radii, radius)
        if max_candidates is not None and len(kept) == max_candidates:
            break
    return kept


def _peaks_by_scale(peaks: Sequence[_Peak]) -> Dict[int, Tuple[np.ndarray, np.ndarray]]:
    """scale index -> (centres N x 3, dots N) of that scale's peaks."""
    grouped: Dict[int, List[_Peak]] = {}
    for peak in peaks:
        grouped.setdefault(peak.scale_index, []).append(peak)
    return {index: (np.array([p.center_lps_mm for p in group]), np.array([p.dot for p in group]))
            for index, group in grouped.items()}


def _refined_sigma(peak: _Peak, by_scale: Dict[int, Tuple[np.ndarray, np.ndarray]]) -> float:
    """The sigma of the strongest response, between the scales: a parabola in log(sigma) through the peak and the
    strongest peaks of the neighbouring scales within its radius (none there: a response of 0)."""
    radius = 0.5 * peak.sigma_mm * DIAMETER_PER_SIGMA
    neighbours = []
    for index in (peak.scale_index - 1, peak.scale_index + 1):
        centres, dots = by_scale.get(index, (np.empty((0, 3)), np.empty(0)))
        near = np.linalg.norm(centres - np.asarray(peak.center_lps_mm), axis=1) <= radius
        neighbours.append(float(dots[near].max()) if near.any() else 0.0)
    below, above = neighbours
    curvature = below - 2.0 * peak.dot + above
    shift = 0.5 * (below - above) / curvature if curvature < 0 else 0.0
    return peak.sigma_mm * SCALE_STEP ** float(np.clip(shift, -0.5, 0.5))


def _mean_hu_around(image: sitk.Image, point_lps_mm: Sequence[float]) -> float:
    """Mean HU of the 3 x 3 x 3 input voxels around the voxel nearest to ``point_lps_mm`` (clipped to the image)."""
    index = np.rint(image.TransformPhysicalPointToContinuousIndex(tuple(point_lps_mm))).astype(int)
    size = np.array(image.GetSize())
    start = np.clip(index - 1, 0, size - 1)
    stop = np.clip(index + 2, start + 1, size)
    region = sitk.GetArrayViewFromImage(image)[start[2]:stop[2], start[1]:stop[1], start[0]:stop[0]]
    return float(np.mean(region, dtype=np.float64))
