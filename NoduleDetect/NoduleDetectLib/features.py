"""Hand-made features of one nodule candidate, as classic lung CAD systems compute them before a classifier.

A candidate is a patch of the CT in HU, cropped around it, and the candidate's segmented region (a mask of the same
shape). The features describe its size, its shape (round nodule or elongated vessel), its intensities inside and in a
shell around it, its texture, how much of it leaves the patch, and its Hessian structure, plus the detector's own blob
score and scale. Every feature is finite for any valid patch, also for an empty mask or a constant patch: a statistic
of an empty region takes the value documented in ``FEATURE_UNITS`` (air for HU values, 0 otherwise).

Surface area is the discretised Cauchy-Crofton estimate of stereology (e.g. Ohser and Schladitz, "3D Images of
Materials Structures", 2009): boundary crossings are counted along the 13 lattice directions of the voxel grid and
averaged with the solid angle each direction stands for (its Voronoi cell on the sphere, computed in mm, so that
anisotropic voxels are weighted correctly). It is within a few percent for balls; planes aligned with the grid are its
worst case (about -13 %). Counting exposed voxel faces instead would overestimate a ball's surface by half.

Arrays are (k, j, i) = (z, y, x); ``spacing_mm`` is (x, y, z) as SimpleITK gives it.
"""

from __future__ import annotations

import functools
import math
from typing import Dict, Sequence, Tuple

import numpy as np
from scipy import ndimage

from RecognitionCore.errors import InputError
from RecognitionCore.preprocessing import AIR_HU

SOLID_HU = -300.0        # above: solid tissue (the solid part of a part-solid nodule); below: ground glass or lung
CALCIFIED_HU = 200.0     # above: calcification (benign calcified granulomas)
SHELL_MM = 3.0           # thickness of the shell around the mask whose intensities are compared with the inside
HISTOGRAM_BIN_HU = 50.0  # bin width of the quantised histogram whose entropy describes the texture
HISTOGRAM_RANGE_HU = (AIR_HU, 1000.0)
FLAT_CURVATURE = 1e-6    # HU/mm2: Hessian eigenvalues below are numerical noise of a flat patch

# name -> unit (or the range of a unit-free feature); the order is the order of candidate_features' output.
FEATURE_UNITS: Dict[str, str] = {
    "equivalent_diameter_mm": "mm, diameter of the ball of the same volume (0 for an empty mask)",
    "volume_mm3": "mm3",
    "surface_area_mm2": "mm2, Crofton estimate over 13 directions",
    "sphericity": "1 for a ball, lower for elongated or irregular shapes (pi^(1/3) (6V)^(2/3) / A; 0 if empty)",
    "major_axis_mm": "mm, length of the ellipsoid with the mask's second moments",
    "elongation": "sqrt(second / largest principal moment), 0..1, 1 = not elongated",
    "flatness": "sqrt(smallest / largest principal moment), 0..1, 1 = not flat",
    "mean_hu": "HU inside the mask (air if empty)",
    "std_hu": "HU inside the mask",
    "p10_hu": "HU, 10th percentile inside the mask",
    "p50_hu": "HU, median inside the mask",
    "p90_hu": "HU, 90th percentile inside the mask",
    "solid_fraction": f"fraction of the mask above {SOLID_HU:g} HU, 0..1",
    "calcified_fraction": f"fraction of the mask above {CALCIFIED_HU:g} HU, 0..1",
    "shell_mean_hu": f"HU in the shell up to {SHELL_MM:g} mm outside the mask (air if empty)",
    "shell_std_hu": "HU in the shell",
    "shell_p90_hu": "HU, 90th percentile in the shell",
    "shell_solid_fraction": f"fraction of the shell above {SOLID_HU:g} HU, 0..1 (vessels, pleura attached)",
    "contrast_hu": "HU, mean inside minus mean in the shell",
    "gradient_mean_hu_per_mm": "HU/mm, mean gradient magnitude inside the mask",
    "edge_gradient_hu_per_mm": "HU/mm, mean gradient magnitude on the mask's boundary voxels (edge sharpness)",
    "local_std_hu": "HU, mean over the mask of the standard deviation in each 3x3x3 neighbourhood",
    "entropy_bits": f"bits, Shannon entropy of the mask's HU histogram in {HISTOGRAM_BIN_HU:g} HU bins",
    "border_fraction": "fraction of the mask's surface (face area) on the patch border, 0..1 (vessels leave it)",
    "hessian_blobness": "median |l1| / sqrt(|l2 l3|) on the mask's core, 0..1: 1 blob, 0 line or plate",
    "hessian_lineness": "median |l2| / |l3| on the mask's core, 0..1: 1 blob or line, 0 plate",
    "hessian_bright_blob_fraction": "fraction of the core where all Hessian eigenvalues are negative, 0..1",
    "blob_score": "the candidate detector's score (its units)",
    "scale_mm": "mm, the candidate detector's scale",
}
FEATURE_NAMES: Tuple[str, ...] = tuple(FEATURE_UNITS)

_LATTICE_DIRECTIONS = np.array([
    (1, 0, 0), (0, 1, 0), (0, 0, 1),
    (1, 1, 0), (1, -1, 0), (1, 0, 1), (1, 0, -1), (0, 1, 1), (0, 1, -1),
    (1, 1, 1), (1, 1, -1), (1, -1, 1), (1, -1, -1),
], dtype=int)  # (dk, dj, di); each stands for itself and its opposite


def candidate_features(patch_hu: np.ndarray, mask: np.ndarray, spacing_mm: Sequence[float],
                       blob_score: float = 0.0, scale_mm: float = 0.0) -> np.ndarray:
    """The features of one candidate, float32, in the order of ``FEATURE_NAMES`` (units in ``FEATURE_UNITS``).

    ``patch_hu`` is the (k, j, i) patch in HU around the candidate, ``mask`` its segmented region (same shape; may be
    empty), ``spacing_mm`` the voxel size (x, y, z); ``blob_score`` and ``scale_mm`` come from the candidate detector.
    """
    patch, region, spacing_zyx = _checked_inputs(patch_hu, mask, spacing_mm)
    for name, value in (("blob_score", blob_score), ("scale_mm", scale_mm)):
        if not math.isfinite(float(value)):
            raise InputError(f"{name} must be a finite number, got {value!r}")
    moments_mm2 = _principal_moments_mm2(region, spacing_zyx)
    features: Dict[str, float] = {}
    features.update(_shape_features(region, spacing_zyx, moments_mm2))
    features.update(_intensity_features(patch, region, spacing_zyx))
    features.update(_texture_features(patch, region, spacing_zyx))
    features["border_fraction"] = _border_fraction(region, spacing_zyx)
    features.update(_hessian_features(patch, region, spacing_zyx, thinnest_moment_mm2=moments_mm2[2]))
    features["blob_score"] = float(blob_score)
    features["scale_mm"] = float(scale_mm)
    return np.array([features[name] for name in FEATURE_NAMES], dtype=np.float32)


def _checked_inputs(patch_hu, mask, spacing_mm) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    patch = np.asarray(patch_hu, dtype=np.float64)
    region = np.asarray(mask)
    if patch.ndim != 3 or patch.size == 0:
        raise InputError(f"the candidate patch must be a non-empty 3D (k, j, i) array, got shape {patch.shape}")
    if region.shape != patch.shape:
        raise InputError(f"the candidate mask has shape {region.shape}, the patch {patch.shape}: they must match")
    n_not_finite = int(np.count_nonzero(~np.isfinite(patch)))
    if n_not_finite:
        raise InputError(f"the candidate patch holds {n_not_finite} NaN or infinite values")
    try:
        spacing = np.asarray(spacing_mm, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        spacing = np.zeros(0)
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(f"spacing_mm must be three positive numbers (x, y, z), got {spacing_mm!r}")
    return patch, region.astype(bool), spacing[::-1].copy()


# -- shape ---------------------------------------------------------------------------------------------------------

def _shape_features(region: np.ndarray, spacing_zyx: np.ndarray, moments: np.ndarray) -> Dict[str, float]:
    n_voxels = int(np.count_nonzero(region))
    volume = n_voxels * float(np.prod(spacing_zyx))
    surface = crofton_surface_area_mm2(region, spacing_zyx[::-1])
    largest = moments[0] if n_voxels else 0.0
    return {
        "equivalent_diameter_mm": (6.0 * volume / math.pi) ** (1.0 / 3.0),
        "volume_mm3": volume,
        "surface_area_mm2": surface,
        "sphericity": math.pi ** (1.0 / 3.0) * (6.0 * volume) ** (2.0 / 3.0) / surface if surface > 0 else 0.0,
        "major_axis_mm": 2.0 * math.sqrt(5.0 * largest),
        "elongation": math.sqrt(moments[1] / largest) if largest > 0 else 0.0,
        "flatness": math.sqrt(moments[2] / largest) if largest > 0 else 0.0,
    }


def crofton_surface_area_mm2(mask: np.ndarray, spacing_mm: Sequence[float]) -> float:
    """Surface area (mm2) of a (k, j, i) mask, spacing (x, y, z): Cauchy-Crofton over the 13 lattice directions.

    Along direction u, the boundary crossings of the lattice lines integrate |n . u| over the surface; its mean over
    all directions is A / 2. Beyond the array counts as outside, so a mask cut by the border is closed there."""
    spacing_zyx = np.asarray(spacing_mm, dtype=np.float64)[::-1]
    padded = np.pad(np.asarray(mask, dtype=bool), 1)
    voxel_volume = float(np.prod(spacing_zyx))
    weights = _crofton_weights(tuple(float(s) for s in spacing_zyx))
    area = 0.0
    for direction, weight in zip(_LATTICE_DIRECTIONS, weights):
        crossings = np.count_nonzero(_shifted_pairs_differ(padded, direction))
        step_mm = float(np.linalg.norm(direction * spacing_zyx))
        area += weight * crossings * voxel_volume / step_mm
    return 2.0 * area


def _shifted_pairs_differ(padded: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """For every voxel p whose neighbour p + direction is in the array: whether the two differ."""
    source, target = [], []
    for offset, length in zip(direction, padded.shape):
        source.append(slice(max(0, -offset), length - max(0, offset)))
        target.append(slice(max(0, offset), length - max(0, -offset)))
    return padded[tuple(source)] != padded[tuple(target)]


@functools.lru_cache(maxsize=32)
def _crofton_weights(spacing_zyx: Tuple[float, float, float], n_samples: int = 4000) -> np.ndarray:
    """Share of the unit sphere nearest to each lattice direction in mm (with its opposite): the Crofton weights."""
    golden_angle = math.pi * (3.0 - math.sqrt(5.0))
    index = np.arange(n_samples) + 0.5
    z = 1.0 - 2.0 * index / n_samples
    radius = np.sqrt(1.0 - z * z)
    sphere = np.stack([z, radius * np.cos(golden_angle * index), radius * np.sin(golden_angle * index)], axis=1)
    directions = _LATTICE_DIRECTIONS * np.asarray(spacing_zyx)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    nearest = np.argmax(np.abs(sphere @ directions.T), axis=1)
    return np.bincount(nearest, minlength=len(directions)) / n_samples


def _principal_moments_mm2(region: np.ndarray, spacing_zyx: np.ndarray) -> np.ndarray:
    """Eigenvalues (mm2, largest first) of the mask's covariance, each voxel a uniform box (so never all zero)."""
    coordinates = np.argwhere(region) * spacing_zyx
    if len(coordinates) == 0:
        return np.zeros(3)
    covariance = np.cov(coordinates, rowvar=False, bias=True) if len(coordinates) > 1 else np.zeros((3, 3))
    covariance = covariance + np.diag(spacing_zyx ** 2 / 12.0)
    return np.clip(np.linalg.eigvalsh(covariance)[::-1], 0.0, None)


# -- intensity -----------------------------------------------------------------------------------------------------

def _intensity_features(patch: np.ndarray, region: np.ndarray, spacing_zyx: np.ndarray) -> Dict[str, float]:
    inside = patch[region]
    shell = patch[_shell(region, spacing_zyx)]
    inside_mean = _mean_or_air(inside)
    shell_mean = _mean_or_air(shell)
    return {
        "mean_hu": inside_mean,
        "std_hu": float(inside.std()) if inside.size else 0.0,
        "p10_hu": _percentile_or_air(inside, 10),
        "p50_hu": _percentile_or_air(inside, 50),
        "p90_hu": _percentile_or_air(inside, 90),
        "solid_fraction": _fraction_above(inside, SOLID_HU),
        "calcified_fraction": _fraction_above(inside, CALCIFIED_HU),
        "shell_mean_hu": shell_mean,
        "shell_std_hu": float(shell.std()) if shell.size else 0.0,
        "shell_p90_hu": _percentile_or_air(shell, 90),
        "shell_solid_fraction": _fraction_above(shell, SOLID_HU),
        "contrast_hu": inside_mean - shell_mean if inside.size and shell.size else 0.0,
    }


def _shell(region: np.ndarray, spacing_zyx: np.ndarray) -> np.ndarray:
    """Voxels outside the mask within ``SHELL_MM`` of it (empty for an empty mask)."""
    if not region.any():
        return region
    distance_mm = ndimage.distance_transform_edt(~region, sampling=spacing_zyx)
    return (distance_mm > 0) & (distance_mm <= SHELL_MM)


def _mean_or_air(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else AIR_HU


def _percentile_or_air(values: np.ndarray, percent: float) -> float:
    return float(np.percentile(values, percent)) if values.size else AIR_HU


def _fraction_above(values: np.ndarray, threshold_hu: float) -> float:
    return float(np.count_nonzero(values > threshold_hu)) / values.size if values.size else 0.0


# -- texture -------------------------------------------------------------------------------------------------------

def _texture_features(patch: np.ndarray, region: np.ndarray, spacing_zyx: np.ndarray) -> Dict[str, float]:
    if not region.any():
        return {"gradient_mean_hu_per_mm": 0.0, "edge_gradient_hu_per_mm": 0.0, "local_std_hu": 0.0,
                "entropy_bits": 0.0}
    gradient = _gradient_magnitude(patch, spacing_zyx)
    boundary = region & ~ndimage.binary_erosion(region)
    local_mean = ndimage.uniform_filter(patch, size=3, mode="nearest")
    local_variance = ndimage.uniform_filter(patch * patch, size=3, mode="nearest") - local_mean * local_mean
    return {
        "gradient_mean_hu_per_mm": float(gradient[region].mean()),
        "edge_gradient_hu_per_mm": float(gradient[boundary].mean()),
        "local_std_hu": float(np.sqrt(np.clip(local_variance[region], 0.0, None)).mean()),
        "entropy_bits": _histogram_entropy_bits(patch[region]),
    }


def _gradient_magnitude(patch: np.ndarray, spacing_zyx: np.ndarray) -> np.ndarray:
    """|grad| in HU/mm, each axis's derivative in physical units."""
    squared = np.zeros_like(patch)
    for axis, step_mm in enumerate(spacing_zyx):
        squared += _central_difference(patch, axis, step_mm) ** 2
    return np.sqrt(squared)


def _central_difference(values: np.ndarray, axis: int, step_mm: float) -> np.ndarray:
    """Derivative along ``axis`` (per mm) by central differences, one-sided at the border through edge padding, so
    that any patch size works (np.gradient needs two voxels per axis)."""
    padded = np.pad(values, [(1, 1) if index == axis else (0, 0) for index in range(values.ndim)], mode="edge")
    length = values.shape[axis]
    ahead = np.take(padded, np.arange(2, length + 2), axis=axis)
    behind = np.take(padded, np.arange(length), axis=axis)
    return (ahead - behind) / (2.0 * step_mm)


def _histogram_entropy_bits(values: np.ndarray) -> float:
    low, high = HISTOGRAM_RANGE_HU
    n_bins = int(math.ceil((high - low) / HISTOGRAM_BIN_HU))
    bins = np.clip(((values - low) // HISTOGRAM_BIN_HU).astype(np.int64), 0, n_bins - 1)
    probabilities = np.bincount(bins, minlength=n_bins) / values.size
    probabilities = probabilities[probabilities > 0]
    return float(np.sum(probabilities * np.log2(1.0 / probabilities)))


def _border_fraction(region: np.ndarray, spacing_zyx: np.ndarray) -> float:
    """Face area of the mask on the patch border over all its exposed face area."""
    padded = np.pad(region, 1)
    total_area = 0.0
    border_area = 0.0
    for axis in range(3):
        face_area = float(np.prod(np.delete(spacing_zyx, axis)))
        total_area += face_area * np.count_nonzero(np.diff(padded, axis=axis))
        first = np.take(region, 0, axis=axis)
        last = np.take(region, -1, axis=axis)
        border_area += face_area * (np.count_nonzero(first) + np.count_nonzero(last))
    return border_area / total_area if total_area > 0 else 0.0


# -- Hessian -------------------------------------------------------------------------------------------------------

def _hessian_features(patch: np.ndarray, region: np.ndarray, spacing_zyx: np.ndarray,
                      thinnest_moment_mm2: float) -> Dict[str, float]:
    """Hessian eigenvalues on the mask's core (its brightest quarter after smoothing: a blob's centre, a vessel's
    centreline), at the Gaussian scale that best fits the mask's thinnest axis (radius / sqrt(3))."""
    empty = {"hessian_blobness": 0.0, "hessian_lineness": 0.0, "hessian_bright_blob_fraction": 0.0}
    if not region.any():
        return empty
    thinnest_radius_mm = math.sqrt(5.0 * thinnest_moment_mm2)
    sigma_mm = float(np.clip(thinnest_radius_mm / math.sqrt(3.0), 0.5 * spacing_zyx.min(), 5.0))
    smoothed = ndimage.gaussian_filter(patch, sigma_mm / spacing_zyx, mode="nearest", truncate=3.0)
    core = region & (smoothed >= np.percentile(smoothed[region], 75))
    hessian = np.empty((int(np.count_nonzero(core)), 3, 3))
    for row in range(3):
        first = _central_difference(smoothed, row, spacing_zyx[row])
        for column in range(row, 3):
            second = _central_difference(first, column, spacing_zyx[column])[core]
            hessian[:, row, column] = hessian[:, column, row] = second
    eigenvalues = np.linalg.eigvalsh(hessian)
    by_magnitude = np.take_along_axis(eigenvalues, np.argsort(np.abs(eigenvalues), axis=1), axis=1)
    l1, l2, l3 = np.abs(by_magnitude).T
    blobness = _safe_ratio(l1, np.sqrt(l2 * l3))
    lineness = _safe_ratio(l2, l3)
    return {
        "hessian_blobness": float(np.median(blobness)),
        "hessian_lineness": float(np.median(lineness)),
        "hessian_bright_blob_fraction": float(np.mean(np.all(eigenvalues < 0, axis=1))),
    }


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the curvature is below 1e-6 HU/mm2 (a flat patch has no structure)."""
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > FLAT_CURVATURE)
