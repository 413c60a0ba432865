"""Resection-planning geometry on plain masks: distances, margins, cutting planes and liver volumetry.

Inputs are uint8 SimpleITK masks (non-zero = inside) on one CT grid, any (anisotropic) spacing, LPS geometry. Every
distance is in millimetres and exact for the voxel centres (no resampling to isotropic voxels).

Voxel-centre convention: a voxel stands for its centre point. Between two voxel sets, the *surface-to-surface*
distance is the centre-to-centre distance of their closest pair less the part of that segment covered by the two
voxels themselves (each voxel is a box of one spacing), so touching voxels (face, edge or corner neighbours) are 0 mm
apart and a gap of n empty voxels along an axis measures n spacings. As each voxelised surface lies within half a
voxel of the true one, such a distance is within one voxel (along its direction) of the true gap, without bias.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError, cKDTree

from RecognitionCore.errors import InputError
from RecognitionCore.preprocessing import check_same_grid

DEFAULT_FLR_WARNING_PERCENT = 30.0
DEFAULT_INNER_VESSEL_REACH_MM = 10.0  # organ within this on both sides: channels up to 20 mm wide (portal vein ~13)

_FACE_NEIGHBOURS = ndimage.generate_binary_structure(3, 1)


# ---------------------------------------------------------------------------------------------------------------------
# Grid helpers


def _mask_array(mask: sitk.Image, name: str) -> np.ndarray:
    """The mask as a (z, y, x) bool array; InputError when it is not 3D or is empty."""
    if mask.GetDimension() != 3:
        raise InputError(f"the {name} mask must be 3D (got {mask.GetDimension()}D)")
    values = sitk.GetArrayViewFromImage(mask) != 0
    if not values.any():
        raise InputError(f"the {name} mask is empty")
    return values


def _spacing_zyx(image: sitk.Image) -> np.ndarray:
    return np.array(image.GetSpacing()[::-1], dtype=float)


def _index_zyx_to_lps(image: sitk.Image, index_zyx: np.ndarray) -> np.ndarray:
    """Voxel-centre LPS mm of (N, 3) (z, y, x) indices (vectorised TransformIndexToPhysicalPoint)."""
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    scaled_xyz = np.asarray(index_zyx, dtype=float)[:, ::-1] * np.array(image.GetSpacing())
    return np.array(image.GetOrigin()) + scaled_xyz @ direction.T


def _box_zyx(values: np.ndarray, margin_voxels: Sequence[int] = (0, 0, 0)) -> Tuple[slice, ...]:
    """Slices of the smallest box holding every True voxel, grown by ``margin_voxels`` and clipped to the array."""
    slices = []
    for axis in range(3):
        occupied = np.flatnonzero(values.any(axis=tuple(a for a in range(3) if a != axis)))
        start = max(int(occupied[0]) - int(margin_voxels[axis]), 0)
        stop = min(int(occupied[-1]) + 1 + int(margin_voxels[axis]), values.shape[axis])
        slices.append(slice(start, stop))
    return tuple(slices)


def _to_mask_image(values: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(values.astype(np.uint8, copy=False))
    image.CopyInformation(reference)
    return image


def _voxel_volume_ml(image: sitk.Image) -> float:
    return float(np.prod(image.GetSpacing())) / 1000.0


def _boundary_zyx(values: np.ndarray) -> np.ndarray:
    """(N, 3) indices of the voxels with a face neighbour outside the set (the image border counts as outside),
    found in the set's bounding box so large masks stay fast."""
    box = _box_zyx(values)
    inside = values[box]
    edge = inside & ~ndimage.binary_erosion(inside, _FACE_NEIGHBOURS, border_value=0)
    return np.argwhere(edge) + np.array([s.start for s in box])


# ---------------------------------------------------------------------------------------------------------------------
# Distances


def signed_distance_mm(mask: sitk.Image, max_distance_mm: Optional[float] = None) -> sitk.Image:
    """Exact Euclidean signed distance (float32, mm) on the mask's anisotropic grid: negative inside.

    Outside voxels get the distance from their centre to the nearest inside voxel centre, inside voxels minus the
    distance to the nearest outside voxel centre (the image border counts as outside), so values jump from about
    -spacing to +spacing across the boundary. With ``max_distance_mm`` the transform runs only in the mask's
    bounding box grown by that distance (much faster on a full CT) and values are clipped to +-max_distance_mm.
    """
    values = _mask_array(mask, "distance")
    spacing = _spacing_zyx(mask)
    if max_distance_mm is not None and not max_distance_mm > 0:
        raise InputError(f"max_distance_mm must be > 0 (got {max_distance_mm})")
    if max_distance_mm is None:
        box = tuple(slice(0, n) for n in values.shape)
    else:
        box = _box_zyx(values, np.ceil(max_distance_mm / spacing).astype(int) + 1)
    padded = np.pad(values[box], 1, constant_values=False)
    outside = ndimage.distance_transform_edt(~padded, sampling=spacing)
    inside = ndimage.distance_transform_edt(padded, sampling=spacing)
    signed = (outside - inside)[1:-1, 1:-1, 1:-1].astype(np.float32)
    if max_distance_mm is not None:
        full = np.full(values.shape, max_distance_mm, dtype=np.float32)
        full[box] = np.clip(signed, -max_distance_mm, max_distance_mm)
        signed = full
    image = sitk.GetImageFromArray(signed)
    image.CopyInformation(mask)
    return image


def _closest_boundary_pair(first: np.ndarray, second: np.ndarray, image: sitk.Image
                           ) -> Tuple[float, np.ndarray, np.ndarray]:
    """Surface-to-surface distance (mm, see module docstring) between two voxel sets and their closest voxel centres
    in LPS mm; 0 with a shared voxel twice when they overlap."""
    overlap = first & second
    if overlap.any():
        point = _index_zyx_to_lps(image, np.argwhere(overlap)[:1])[0]
        return 0.0, point, point
    spacing = _spacing_zyx(image)
    first_zyx = _boundary_zyx(first)
    second_zyx = _boundary_zyx(second)
    tree = cKDTree(second_zyx * spacing)
    centre_distances, nearest = tree.query(first_zyx * spacing)
    best = int(np.argmin(centre_distances))
    first_index, second_index = first_zyx[best], second_zyx[nearest[best]]
    offset_mm = (second_index - first_index) * spacing
    centre_distance = float(np.linalg.norm(offset_mm))
    # rounded to a micrometre so that a gap of exactly the margin is not "within" it by a rounding error
    gap = round(max(centre_distance - 2.0 * float(_half_cover_mm(offset_mm, spacing)), 0.0), 6)
    points = _index_zyx_to_lps(image, np.stack([first_index, second_index]))
    return gap, points[0], points[1]


def _longest_diameter_mm(values: np.ndarray, spacing: np.ndarray) -> float:
    """Largest centre-to-centre distance between boundary voxels (mm), over the convex hull's vertices."""
    points = _boundary_zyx(values) * spacing
    if len(points) > 3:
        try:
            points = points[ConvexHull(points).vertices]
        except QhullError:  # flat (one-slice) or collinear sets: use every boundary point
            pass
    if len(points) < 2:
        return 0.0
    differences = points[:, None, :] - points[None, :, :]
    return float(np.sqrt((differences ** 2).sum(axis=-1).max()))


def _organ_region(tumour: sitk.Image, organ: sitk.Image) -> Tuple[np.ndarray, np.ndarray]:
    """Checked (tumour, organ including the tumour) arrays.

    A tumour segmented as its own label is carved out of the organ, so the organ region is organ | tumour; the
    tumour must overlap or touch (face neighbour) the organ.
    """
    check_same_grid(organ, tumour, "tumour mask")
    organ_values = _mask_array(organ, "organ")
    tumour_values = _mask_array(tumour, "tumour")
    box = _box_zyx(tumour_values, (1, 1, 1))
    near_organ = ndimage.binary_dilation(organ_values[box], _FACE_NEIGHBOURS)
    if not (near_organ & tumour_values[box]).any():
        raise InputError("the tumour lies outside the organ (no tumour voxel inside or touching the organ mask)")
    return tumour_values, organ_values | tumour_values


def _within_reach_on_both_sides(values: np.ndarray, axis: int, reach_voxels: int) -> np.ndarray:
    """Voxels with a True voxel at most ``reach_voxels`` before them and one at most that far after them along
    ``axis`` (a voxel that is True itself counts on both sides)."""
    count = values.shape[axis]
    index = np.arange(count, dtype=np.int32).reshape([-1 if a == axis else 1 for a in range(3)])
    far = np.int32(count + reach_voxels + 1)
    last_before = np.maximum.accumulate(np.where(values, index, -far), axis=axis)
    first_after = np.flip(np.minimum.accumulate(np.flip(np.where(values, index, count + far), axis=axis), axis=axis),
                          axis=axis)
    return (index - last_before <= reach_voxels) & (first_after - index <= reach_voxels)


def organ_with_inner_vessels(organ: sitk.Image, vessels: Sequence[sitk.Image],
                             reach_mm: float = DEFAULT_INNER_VESSEL_REACH_MM) -> sitk.Image:
    """The organ with the vessel voxels that run inside it.

    Organ segmentations usually leave the vessels out, yet the intra-organ vessels are part of the organ for volumetry
    and its surface is not where a vessel channel runs. A vessel voxel counts as inside when organ tissue lies within
    ``reach_mm`` on both sides of it along at least two of the three grid axes (a channel through the organ), so the
    vessel trunks outside the organ stay out and the organ's outer surface is unchanged. Linear time (running
    maxima along each axis), in the organ's bounding box.
    """
    organ_values = _mask_array(organ, "organ")
    spacing = _spacing_zyx(organ)
    vessel_values = np.zeros(organ_values.shape, dtype=bool)
    for vessel in vessels:
        check_same_grid(organ, vessel, "vessel mask")
        vessel_values |= sitk.GetArrayViewFromImage(vessel) != 0
    candidates = vessel_values & ~organ_values
    if not candidates.any():
        return organ
    box = _box_zyx(organ_values)
    organ_box = organ_values[box]
    sides = np.zeros(organ_box.shape, dtype=np.uint8)
    for axis in range(3):
        sides += _within_reach_on_both_sides(organ_box, axis, int(reach_mm // spacing[axis]))
    inside = organ_values.copy()
    inside[box] |= candidates[box] & (sides >= 2)
    return _to_mask_image(inside, organ)


def tumour_report(tumour: sitk.Image, organ: sitk.Image, vessels: Optional[Dict[str, sitk.Image]] = None,
                  margin_mm: float = 10.0) -> dict:
    """Size of a tumour and its clearance to the organ surface and to each vessel, the figures a resection needs.

    Returns ``volume_ml``, ``longest_diameter_mm`` (largest distance between boundary voxel centres),
    ``organ_surface_distance_mm`` (surface-to-surface distance to the voxels outside the organ; 0 at the capsule)
    and ``vessels``: name -> ``{"distance_mm", "tumour_point_lps_mm", "vessel_point_lps_mm", "at_risk"}`` where
    ``at_risk`` means closer than ``margin_mm``. Distances follow the module's voxel-centre convention.
    """
    if not margin_mm >= 0:
        raise InputError(f"margin_mm must be >= 0 (got {margin_mm})")
    tumour_values, organ_values = _organ_region(tumour, organ)
    spacing = _spacing_zyx(organ)
    organ_box = _box_zyx(organ_values, (1, 1, 1))
    padded_organ = np.pad(organ_values[organ_box], 1, constant_values=False)
    outside_shell = ndimage.binary_dilation(padded_organ, _FACE_NEIGHBOURS) & ~padded_organ
    padded_tumour = np.pad(tumour_values[organ_box], 1, constant_values=False)
    # Only the distance is kept: the points of this padded crop are not in the image's index space.
    surface_distance, _, _ = _closest_boundary_pair(padded_tumour, outside_shell, organ)
    report = {
        "volume_ml": float(tumour_values.sum()) * _voxel_volume_ml(organ),
        "longest_diameter_mm": _longest_diameter_mm(tumour_values, spacing),
        "organ_surface_distance_mm": surface_distance,
        "margin_mm": float(margin_mm),
        "vessels": {},
    }
    for name, vessel in (vessels or {}).items():
        check_same_grid(organ, vessel, f"{name} mask")
        distance, tumour_point, vessel_point = _closest_boundary_pair(tumour_values, _mask_array(vessel, name), organ)
        report["vessels"][name] = {
            "distance_mm": distance,
            "tumour_point_lps_mm": tuple(float(v) for v in tumour_point),
            "vessel_point_lps_mm": tuple(float(v) for v in vessel_point),
            "at_risk": distance < margin_mm,
        }
    return report


def _half_cover_mm(offsets_mm: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """How far a voxel box reaches from its centre along each offset's direction: min over axes of s/2 / |u|."""
    length = np.linalg.norm(offsets_mm, axis=-1, keepdims=True)
    unit = np.abs(offsets_mm) / np.where(length > 0, length, 1.0)
    with np.errstate(divide="ignore"):
        return np.min(np.where(unit > 0, spacing / 2.0 / unit, np.inf), axis=-1)


def margin_resection(tumour: sitk.Image, organ: sitk.Image, margin_mm: float) -> sitk.Image:
    """The tumour grown by ``margin_mm``, clipped to the organ (including the tumour): the minimal atypical
    resection.

    A voxel is kept when the distance from its centre to the nearest tumour voxel centre, less half of that voxel's
    reach along the line (s/2 along an axis), is within the margin. The true tumour surface lies on average between
    the outermost voxel centres (oblique directions, where the lattice is dense) and the voxel faces (along the axes):
    plain centre distances shrink a grown ball by ~6 % in volume on 0.7 x 0.7 x 2.5 mm voxels and full reaches
    inflate it by ~5 %, half the reach keeps it within ~1.5 % (measured on balls of 4-10 mm radius, 5-10 mm margins).
    """
    if not margin_mm > 0:
        raise InputError(f"margin_mm must be > 0 (got {margin_mm})")
    tumour_values, organ_values = _organ_region(tumour, organ)
    spacing = _spacing_zyx(organ)
    box = _box_zyx(tumour_values, np.ceil(margin_mm / spacing).astype(int) + 1)
    outside_distance, nearest = ndimage.distance_transform_edt(~tumour_values[box], sampling=spacing,
                                                               return_indices=True)
    offsets_mm = (np.indices(outside_distance.shape) - nearest).transpose(1, 2, 3, 0) * spacing
    within = outside_distance - 0.5 * _half_cover_mm(offsets_mm, spacing) <= margin_mm
    grown = np.zeros(tumour_values.shape, dtype=bool)
    grown[box] = within | tumour_values[box]
    return _to_mask_image(grown & organ_values, organ)


# ---------------------------------------------------------------------------------------------------------------------
# Cutting planes


def _unit_normal(normal_lps: Sequence[float]) -> np.ndarray:
    normal = np.asarray(normal_lps, dtype=float).reshape(-1)
    length = float(np.linalg.norm(normal)) if normal.size == 3 else 0.0
    if not np.isfinite(length) or length == 0.0:
        raise InputError(f"the plane normal must be a non-zero LPS 3-vector (got {list(normal_lps)})")
    return normal / length


class OrganPlaneCutter:
    """Splits one organ by planes quickly: the organ's bounding box is found once, then each plane is a separable
    dot product of the voxel-centre coordinates (three 1D ramps broadcast over the box), for interactive dragging."""

    def __init__(self, organ: sitk.Image):
        self.organ = organ
        values = _mask_array(organ, "organ")
        self.box = _box_zyx(values)
        self.organ_in_box = values[self.box]
        self._shape = values.shape
        self._direction = np.array(organ.GetDirection(), dtype=float).reshape(3, 3)
        starts_xyz = np.array([s.start for s in self.box[::-1]], dtype=float)
        self._box_origin_lps = np.array(organ.GetOrigin()) + self._direction @ (starts_xyz * organ.GetSpacing())

    def resected_in_box(self, point_lps_mm: Sequence[float], normal_lps: Sequence[float]) -> np.ndarray:
        """Organ voxels (bool, in ``box``) whose centre lies on the normal's side of the plane (strictly positive
        signed distance)."""
        normal = _unit_normal(normal_lps)
        point = np.asarray(point_lps_mm, dtype=float).reshape(3)
        steps_xyz = (self._direction.T @ normal) * np.array(self.organ.GetSpacing())
        nz, ny, nx = self.organ_in_box.shape
        offset = float(normal @ (self._box_origin_lps - point))
        side = ((offset + steps_xyz[2] * np.arange(nz, dtype=np.float32))[:, None, None]
                + (steps_xyz[1] * np.arange(ny, dtype=np.float32))[None, :, None]
                + (steps_xyz[0] * np.arange(nx, dtype=np.float32))[None, None, :]) > 0
        return side & self.organ_in_box

    def split(self, point_lps_mm: Sequence[float], normal_lps: Sequence[float]) -> Tuple[sitk.Image, sitk.Image]:
        """(resected, remnant) masks: the organ voxels on the normal's side of the plane and the rest.
        InputError when the plane leaves the organ whole."""
        resected_box = self.resected_in_box(point_lps_mm, normal_lps)
        remnant_box = np.greater(self.organ_in_box, resected_box)  # organ and not resected, in one pass
        if not resected_box.any() or not remnant_box.any():
            raise InputError(f"the plane through {np.round(point_lps_mm, 1).tolist()} mm with normal "
                             f"{np.round(_unit_normal(normal_lps), 3).tolist()} does not cut the organ")
        return self.to_full(resected_box), self.to_full(remnant_box)

    def to_full(self, box_values: np.ndarray) -> sitk.Image:
        """A mask on the organ's whole grid from values in ``box``."""
        full = np.zeros(self._shape, dtype=np.uint8)
        full[self.box] = box_values.view(np.uint8)
        return _to_mask_image(full, self.organ)


def plane_split(organ: sitk.Image, point_lps_mm: Sequence[float], normal_lps: Sequence[float]
                ) -> Tuple[sitk.Image, sitk.Image]:
    """(resected, remnant) of the organ cut by a plane; the resected side is the one the normal points to.
    For repeated cuts of one organ keep an ``OrganPlaneCutter``."""
    return OrganPlaneCutter(organ).split(point_lps_mm, normal_lps)


def proposed_plane(tumour: sitk.Image, organ: sitk.Image, margin_mm: float = 10.0
                   ) -> Tuple[Tuple[float, float, float], Tuple[float, float, float]]:
    """An initial cutting plane (point LPS mm, unit normal LPS) for the surgeon to drag: the normal runs from the
    organ's centroid to the tumour's centroid (towards the periphery, so the smaller side is resected), and the
    plane sits ``margin_mm`` beyond the tumour's deepest voxel centre along it, so the whole tumour lies on the
    resected side with at least the margin to the plane."""
    if not margin_mm >= 0:
        raise InputError(f"margin_mm must be >= 0 (got {margin_mm})")
    tumour_values, organ_values = _organ_region(tumour, organ)
    tumour_points = _index_zyx_to_lps(organ, np.argwhere(tumour_values))
    organ_centroid = _index_zyx_to_lps(organ, np.argwhere(organ_values).mean(axis=0, keepdims=True))[0]
    tumour_centroid = tumour_points.mean(axis=0)
    direction = tumour_centroid - organ_centroid
    if np.linalg.norm(direction) < 1e-6 * max(organ.GetSpacing()):
        raise InputError("the tumour is centred on the organ's centroid: no peripheral plane to propose")
    normal = direction / np.linalg.norm(direction)
    deepest = float((tumour_points @ normal).min())
    point = tumour_centroid + (deepest - float(tumour_centroid @ normal) - margin_mm) * normal
    return tuple(float(v) for v in point), tuple(float(v) for v in normal)


# ---------------------------------------------------------------------------------------------------------------------
# Volumetry


def volumetry(organ: sitk.Image, tumour: sitk.Image, resected: sitk.Image,
              flr_warning_percent: float = DEFAULT_FLR_WARNING_PERCENT) -> dict:
    """Volumes (mL) of the organ (including the tumour), tumour, resected and remnant parts and the future liver
    remnant, from the masks (see ``volumetry_from_volumes``)."""
    _, organ_values = _organ_region(tumour, organ)
    check_same_grid(organ, resected, "resected mask")
    tumour_values = sitk.GetArrayViewFromImage(tumour) != 0
    resected_values = (sitk.GetArrayViewFromImage(resected) != 0) & organ_values
    voxel_ml = _voxel_volume_ml(organ)
    return volumetry_from_volumes(float(organ_values.sum()) * voxel_ml, float(tumour_values.sum()) * voxel_ml,
                                  float(resected_values.sum()) * voxel_ml, flr_warning_percent)


def volumetry_from_volumes(total_ml: float, tumour_ml: float, resected_ml: float,
                           flr_warning_percent: float = DEFAULT_FLR_WARNING_PERCENT) -> dict:
    """The volumetry record: ``total_ml`` (organ including the tumour), ``tumour_ml``, ``resected_ml``,
    ``remnant_ml`` and the future liver remnant ``flr_percent`` = remnant / (total - tumour) * 100 (the tumour is not
    functional liver), with ``flr_warning`` when it is below ``flr_warning_percent``."""
    if not 0 <= flr_warning_percent <= 100:
        raise InputError(f"the remnant warning threshold must be between 0 and 100 % (got {flr_warning_percent})")
    remnant_ml = total_ml - resected_ml
    functional_ml = total_ml - tumour_ml
    if functional_ml <= 0:
        raise InputError("the tumour fills the whole organ: no functional volume for the remnant")
    flr_percent = remnant_ml / functional_ml * 100.0
    return {"total_ml": total_ml, "tumour_ml": tumour_ml, "resected_ml": resected_ml, "remnant_ml": remnant_ml,
            "flr_percent": flr_percent, "flr_warning": flr_percent < flr_warning_percent,
            "flr_warning_percent": float(flr_warning_percent)}
