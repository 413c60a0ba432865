"""Resection-planning geometry against closed-form phantoms on an anisotropic CT grid (0.7 x 0.7 x 2.5 mm)."""

import math
import time

import numpy as np
import SimpleITK as sitk

from RecognitionCore.errors import InputError
from RecognitionCore.phantoms import TumourSpec, make_abdomen_ct
from RecognitionCore.testing import assert_raises
from SurgeryPlanLib.geometry import (OrganPlaneCutter, margin_resection, organ_with_inner_vessels, plane_split,
                                     proposed_plane, signed_distance_mm, tumour_report, volumetry)

SPACING_XYZ = (0.7, 0.7, 2.5)
ORIGIN_LPS = (-40.0, 25.0, -100.0)


def _grid_points(size_xyz, spacing_xyz=SPACING_XYZ, origin=ORIGIN_LPS):
    """Voxel-centre LPS coordinates (x, y, z), each shaped (z, y, x) by broadcasting (identity direction)."""
    axes = [origin[a] + spacing_xyz[a] * np.arange(size_xyz[a]) for a in range(3)]
    return axes[0][None, None, :], axes[1][None, :, None], axes[2][:, None, None]


def _mask(values, size_xyz, spacing_xyz=SPACING_XYZ, origin=ORIGIN_LPS):
    image = sitk.GetImageFromArray(np.broadcast_to(values, size_xyz[::-1]).astype(np.uint8))
    image.SetSpacing(spacing_xyz)
    image.SetOrigin(origin)
    return image


def _ball(size_xyz, centre, radius_mm):
    x, y, z = _grid_points(size_xyz)
    return _mask((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2 <= radius_mm ** 2, size_xyz)


def _box(size_xyz, low, high):
    x, y, z = _grid_points(size_xyz)
    return _mask((x >= low[0]) & (x <= high[0]) & (y >= low[1]) & (y <= high[1]) & (z >= low[2]) & (z <= high[2]),
                 size_xyz)


def _count(image):
    return int((sitk.GetArrayViewFromImage(image) != 0).sum())


SIZE = (100, 100, 30)  # 70 x 70 x 75 mm from ORIGIN_LPS
CENTRE = (-5.0, 60.0, -62.5)
ORGAN = ((-38.0, 27.0, -98.0), (28.0, 93.0, -27.0))


def test_vessel_distance_within_half_a_voxel_on_average():
    """Each voxelised surface is off by up to half a voxel, so one distance is within a voxel of the truth and the
    mean error over sub-voxel placements within half a voxel."""
    tumour_radius, vessel_radius, gap = 8.0, 3.0, 6.0
    organ = _box(SIZE, *ORGAN)
    tumour = _ball(SIZE, CENTRE, tumour_radius)
    x, y, z = _grid_points(SIZE)
    for axis, spacing in [(0, SPACING_XYZ[0]), (2, SPACING_XYZ[2])]:  # vessel along z beside, or along x above
        errors = []
        for shift in np.arange(5) / 5 * spacing:
            axis_lps = np.array(CENTRE, dtype=float)
            axis_lps[axis] += tumour_radius + gap + vessel_radius + shift
            radial = ((x - axis_lps[0]) ** 2 + (y - axis_lps[1]) ** 2 if axis == 0
                      else (y - axis_lps[1]) ** 2 + (z - axis_lps[2]) ** 2)
            report = tumour_report(tumour, organ, {"vessel": _mask(radial <= vessel_radius ** 2, SIZE)}, 10.0)
            vessel = report["vessels"]["vessel"]
            errors.append(vessel["distance_mm"] - (gap + shift))
            assert abs(errors[-1]) <= spacing + 1e-9, (axis, shift, vessel["distance_mm"])
            assert vessel["at_risk"]
            expected_tumour = np.array(CENTRE, dtype=float)
            expected_tumour[axis] += tumour_radius
            expected_vessel = axis_lps.copy()
            expected_vessel[axis] -= vessel_radius
            # Voxelised round surfaces tie over a few voxels beside the true closest points: allow 1.5 slices.
            assert np.linalg.norm(vessel["tumour_point_lps_mm"] - expected_tumour) <= 1.5 * SPACING_XYZ[2], vessel
            assert np.linalg.norm(vessel["vessel_point_lps_mm"] - expected_vessel) <= 1.5 * SPACING_XYZ[2], vessel
            relaxed = tumour_report(tumour, organ, {"vessel": _mask(radial <= vessel_radius ** 2, SIZE)}, 5.0)
            assert not relaxed["vessels"]["vessel"]["at_risk"]
        print(f"vessel gap along axis {axis}: errors {np.round(errors, 3).tolist()} mm (voxel {spacing} mm)")
        assert abs(np.mean(np.abs(errors))) <= spacing / 2, errors


def test_touching_and_overlapping_vessels_are_zero_mm_away():
    organ = _box(SIZE, *ORGAN)
    tumour = _box(SIZE, (-10.0, 50.0, -70.0), (0.0, 60.0, -60.0))
    tumour_values = sitk.GetArrayFromImage(tumour)
    touching = np.roll(tumour_values, 1, axis=2) & ~tumour_values  # the face layer just beyond the box in +x
    overlapping = np.roll(tumour_values, 3, axis=0)
    vessels = {"touching": _mask(touching, SIZE), "overlapping": _mask(overlapping, SIZE)}
    report = tumour_report(tumour, organ, vessels)
    assert report["vessels"]["touching"]["distance_mm"] == 0.0
    assert report["vessels"]["overlapping"]["distance_mm"] == 0.0
    two_voxel_gap = np.roll(touching, 2, axis=2)
    far = tumour_report(tumour, organ, {"gap": _mask(two_voxel_gap, SIZE)})["vessels"]["gap"]["distance_mm"]
    assert abs(far - 2 * SPACING_XYZ[0]) < 1e-6, far


def test_ball_volume_diameter_and_organ_surface_distance():
    radius, clearance = 12.0, 7.0
    low, high = ORGAN
    centre = (low[0] + radius + clearance, CENTRE[1], CENTRE[2])  # the ball clears the organ's -x face by 7 mm
    report = tumour_report(_ball(SIZE, centre, radius), _box(SIZE, low, high), {})
    truth_ml = 4.0 / 3.0 * math.pi * radius ** 3 / 1000.0
    print(f"volume {report['volume_ml']:.3f} mL (truth {truth_ml:.3f}); diameter {report['longest_diameter_mm']:.2f} "
          f"mm; surface {report['organ_surface_distance_mm']:.3f} mm (truth {clearance})")
    assert abs(report["volume_ml"] / truth_ml - 1.0) < 0.02, report["volume_ml"]
    assert 2 * radius - 2 * SPACING_XYZ[2] <= report["longest_diameter_mm"] <= 2 * radius, report
    assert abs(report["organ_surface_distance_mm"] - clearance) <= SPACING_XYZ[0], report


def test_signed_distance_is_exact_in_mm_and_cropped_when_bounded():
    single = _ball(SIZE, CENTRE, 0.1)  # one voxel
    assert _count(single) == 1
    distance = sitk.GetArrayFromImage(signed_distance_mm(single))
    index_zyx = np.argwhere(sitk.GetArrayViewFromImage(single))[0]
    assert distance[tuple(index_zyx)] < 0
    for offset_zyx in [(1, 0, 0), (0, 3, 4), (2, 1, 5)]:
        truth = float(np.linalg.norm(np.array(offset_zyx) * np.array(SPACING_XYZ[::-1])))
        assert abs(distance[tuple(index_zyx + offset_zyx)] - truth) < 1e-4, (offset_zyx, truth)
    ball = _ball(SIZE, CENTRE, 8.0)
    full = sitk.GetArrayFromImage(signed_distance_mm(ball))
    bounded = sitk.GetArrayFromImage(signed_distance_mm(ball, max_distance_mm=5.0))
    near = np.abs(full) <= 5.0
    assert np.allclose(bounded[near], full[near], atol=1e-4)
    assert np.all(bounded[~near] == np.clip(full[~near], -5.0, 5.0))
    assert full.min() < -5.0 < 5.0 < full.max()


def test_margin_resection_matches_the_clipped_ball():
    radius, margin, clearance = 6.0, 10.0, 6.0
    low, high = ORGAN
    centre = (low[0] + radius + clearance, CENTRE[1], CENTRE[2])  # the grown ball is cut by the organ's -x face
    tumour = _ball(SIZE, centre, radius)
    resection = margin_resection(tumour, _box(SIZE, low, high), margin)
    grown = radius + margin
    cap_height = grown - (radius + clearance + SPACING_XYZ[0] / 2)  # the organ's voxel faces, half a voxel out
    truth_ml = (4.0 / 3.0 * math.pi * grown ** 3 - math.pi * cap_height ** 2 * (3 * grown - cap_height) / 3) / 1000
    volume_ml = _count(resection) * float(np.prod(SPACING_XYZ)) / 1000
    print(f"margin resection {volume_ml:.3f} mL (truth {truth_ml:.3f})")
    assert abs(volume_ml / truth_ml - 1.0) < 0.02, (volume_ml, truth_ml)
    assert np.all(sitk.GetArrayViewFromImage(resection)[sitk.GetArrayViewFromImage(tumour) != 0] == 1)


def _face_bounds(mask):
    """(low, high) LPS mm of the voxel faces bounding a box mask (identity direction)."""
    box_zyx = np.argwhere(sitk.GetArrayViewFromImage(mask))
    spacing, origin = np.array(mask.GetSpacing()), np.array(mask.GetOrigin())
    return (origin + (box_zyx.min(axis=0)[::-1] - 0.5) * spacing, origin + (box_zyx.max(axis=0)[::-1] + 0.5) * spacing)


def test_plane_split_volumes_for_axis_and_oblique_planes():
    organ = _box(SIZE, (-30.0, 35.0, -90.0), (20.0, 85.0, -40.0))  # about a 50 mm cube
    low, high = _face_bounds(organ)
    extent = high - low
    voxel_ml = float(np.prod(SPACING_XYZ)) / 1000
    total = _count(organ)
    cut_x = low[0] + 15.0
    corner = 12.0  # the corner tetrahedron x + y + z > corner cut by a (1, 1, 1) plane, 12 mm legs
    cases = [("axis", (cut_x, 0.0, 0.0), (1.0, 0.0, 0.0), (high[0] - cut_x) * extent[1] * extent[2]),
             ("oblique", (low + high) / 2, (1.0, 1.0, 1.0), 0.5 * np.prod(extent)),
             ("oblique_corner", high - (corner, 0.0, 0.0), (1.0, 1.0, 1.0), corner ** 3 / 6)]
    cutter = OrganPlaneCutter(organ)
    for name, point, normal, truth_mm3 in cases:
        resected, remnant = cutter.split(point, normal)
        assert _count(resected) + _count(remnant) == total
        assert not np.any(sitk.GetArrayViewFromImage(resected) & sitk.GetArrayViewFromImage(remnant))
        measured_ml = _count(resected) * voxel_ml
        print(f"{name}: resected {measured_ml:.3f} mL (truth {truth_mm3 / 1000:.3f})")
        tolerance = 0.02 if name != "oblique_corner" else 0.1  # a 0.29 mL corner spans only five slices
        assert abs(measured_ml / (truth_mm3 / 1000) - 1.0) < tolerance, (name, measured_ml, truth_mm3 / 1000)
    same = plane_split(organ, cases[0][1], cases[0][2])
    assert _count(same[0]) == _count(cutter.split(cases[0][1], cases[0][2])[0])


def test_volumetry_and_future_liver_remnant():
    low, high = (-30.0, 35.0, -90.0), (20.0, 85.0, -40.0)
    organ = _box(SIZE, low, high)
    tumour = _ball(SIZE, (high[0] - 10.0, 60.0, -65.0), 6.0)
    for cut_offset_mm, warns in [(5.0, True), (40.0, False)]:  # remnants of 10 % and 80 % of the cube
        resected, _ = plane_split(organ, (low[0] + cut_offset_mm, 0.0, 0.0), (1.0, 0.0, 0.0))
        result = volumetry(organ, tumour, resected)
        voxel_ml = float(np.prod(SPACING_XYZ)) / 1000
        assert abs(result["total_ml"] - _count(organ) * voxel_ml) < 1e-9
        assert abs(result["remnant_ml"] + result["resected_ml"] - result["total_ml"]) < 1e-9
        expected = result["remnant_ml"] / (result["total_ml"] - result["tumour_ml"]) * 100
        assert abs(result["flr_percent"] - expected) < 1e-9
        analytic = cut_offset_mm / 50.0 * 125.0 / (125.0 - 4 / 3 * math.pi * 6.0 ** 3 / 1000) * 100
        assert abs(result["flr_percent"] - analytic) < 2.0, (result["flr_percent"], analytic)
        assert result["flr_warning"] == warns == (result["flr_percent"] < 30.0), result


def test_proposed_plane_clears_the_margin_and_cuts_the_organ():
    low, high = ORGAN
    organ = _box(SIZE, low, high)
    radius, margin = 6.0, 5.0
    tumour = _ball(SIZE, (high[0] - 15.0, 60.0, -62.5), radius)
    point, normal = proposed_plane(tumour, organ, margin)
    assert np.allclose(normal, (1.0, 0.0, 0.0), atol=0.05), normal
    resected, remnant = plane_split(organ, point, normal)
    tumour_values = sitk.GetArrayViewFromImage(tumour) != 0
    assert np.all(sitk.GetArrayViewFromImage(resected)[tumour_values] == 1)
    x, y, z = _grid_points(SIZE)
    tumour_x = np.broadcast_to(x, tumour_values.shape)[tumour_values]
    assert abs((tumour_x.min() - point[0]) - margin) < 0.5 * SPACING_XYZ[0] + 0.1, (tumour_x.min(), point)
    assert _count(remnant) > _count(resected)


def test_vessel_channels_through_the_organ_count_as_organ():
    """A segmentation that carves a 6 mm vessel out of a box organ: the channel inside the box is organ again, the
    vessel's trunk outside the box and a vessel lying on the box's surface are not."""
    low, high = ORGAN
    organ_with_channel = _box(SIZE, low, high)
    x, y, z = _grid_points(SIZE)
    channel = np.broadcast_to((x - CENTRE[0]) ** 2 + (y - CENTRE[1]) ** 2 <= 3.0 ** 2, SIZE[::-1])  # along z
    on_surface = np.broadcast_to((x - (high[0] + 3.5)) ** 2 + (y - CENTRE[1]) ** 2 <= 3.0 ** 2, SIZE[::-1])
    carved = sitk.GetArrayFromImage(organ_with_channel).astype(bool) & ~channel
    organ = _mask(carved, SIZE)
    vessels = [_mask(channel, SIZE), _mask(on_surface, SIZE)]
    whole = sitk.GetArrayFromImage(organ_with_inner_vessels(organ, vessels)) != 0  # a copy: the image is temporary
    box_values = sitk.GetArrayViewFromImage(organ_with_channel) != 0
    assert np.array_equal(whole, box_values), (int(whole.sum()), int(box_values.sum()))
    plain = tumour_report(_ball(SIZE, (CENTRE[0] + 12.0, CENTRE[1], CENTRE[2]), 5.0), organ)
    assert plain["organ_surface_distance_mm"] < 5.0  # the carved channel looks like the organ's surface
    assert organ_with_inner_vessels(organ, []) is organ


def test_bad_inputs_are_named():
    organ = _box(SIZE, *ORGAN)
    tumour = _ball(SIZE, CENTRE, 6.0)
    empty = _mask(np.zeros(1, bool), SIZE)
    assert_raises(InputError, tumour_report, empty, organ, {}, match="tumour mask is empty")
    assert_raises(InputError, tumour_report, tumour, empty, {}, match="organ mask is empty")
    small_organ = _box(SIZE, (-38.0, 27.0, -98.0), (-30.0, 35.0, -90.0))
    assert_raises(InputError, tumour_report, tumour, small_organ, {}, match="outside the organ")
    assert_raises(InputError, margin_resection, tumour, small_organ, 5.0, match="outside the organ")
    other_grid = sitk.Image(tumour)
    other_grid.SetSpacing((0.8, 0.7, 2.5))
    assert_raises(InputError, tumour_report, other_grid, organ, {}, match="not on the image grid")
    assert_raises(InputError, tumour_report, tumour, organ, {"portal": other_grid}, match="portal mask")
    assert_raises(InputError, volumetry, organ, tumour, other_grid, match="resected mask")
    assert_raises(InputError, plane_split, organ, (500.0, 0.0, 0.0), (1.0, 0.0, 0.0), match="does not cut the organ")
    assert_raises(InputError, plane_split, organ, CENTRE, (0.0, 0.0, 0.0), match="normal")
    assert_raises(InputError, margin_resection, tumour, organ, 0.0, match="margin_mm")
    assert_raises(InputError, signed_distance_mm, empty, match="empty")


def test_plane_split_timing_on_a_full_ct_grid():
    size = (512, 512, 300)
    values = np.zeros(size[::-1], dtype=np.uint8)
    values[60:240, 120:420, 80:400] = 1  # a liver-sized block: 320 x 300 x 180 voxels
    organ = sitk.GetImageFromArray(values)
    organ.SetSpacing(SPACING_XYZ)
    point = organ.TransformContinuousIndexToPhysicalPoint((250.0, 270.0, 150.0))
    start = time.perf_counter()
    cutter = OrganPlaneCutter(organ)
    prepared = time.perf_counter()
    split_seconds = []
    for _ in range(3):  # best of three: the machine is shared
        split_start = time.perf_counter()
        resected, remnant = cutter.split(point, (1.0, 0.5, 0.2))
        split_seconds.append(time.perf_counter() - split_start)
    one_shot = time.perf_counter()
    plane_split(organ, point, (1.0, 0.5, 0.2))
    print(f"512x512x300: cutter set-up {prepared - start:.3f} s, split {min(split_seconds):.3f} s (best of 3), "
          f"plane_split {time.perf_counter() - one_shot:.3f} s")
    assert _count(resected) + _count(remnant) == int(values.sum())


def test_report_on_an_abdomen_phantom():
    phantom = make_abdomen_ct((112, 112, 64), (3.5, 3.5, 4.0), seed=3, tumours=[TumourSpec(30.0)])
    labels = sitk.GetArrayFromImage(phantom.labels)
    lesions = sitk.GetArrayFromImage(phantom.lesion_labels)

    def mask(values):
        image = sitk.GetImageFromArray(values.astype(np.uint8))
        image.CopyInformation(phantom.labels)
        return image

    liver, tumour = mask(labels == 2), mask(lesions == phantom.tumours[0].id)
    vessels = {"portal_vein": mask(labels == 9), "hepatic_vein": mask(labels == 10)}
    report = tumour_report(tumour, liver, vessels)
    print({key: value for key, value in report.items() if key != "vessels"},
          {name: round(vessel["distance_mm"], 2) for name, vessel in report["vessels"].items()})
    assert abs(report["volume_ml"] - phantom.tumours[0].mask_volume_ml) < 1e-6
    assert report["longest_diameter_mm"] <= phantom.tumours[0].diameter_mm + 1e-6
    assert report["organ_surface_distance_mm"] >= 0
    liver_values = (labels == 2) | (lesions == phantom.tumours[0].id)
    for name, vessel in report["vessels"].items():
        assert vessel["distance_mm"] >= 0, name
        index = phantom.labels.TransformPhysicalPointToIndex(vessel["tumour_point_lps_mm"])
        assert liver_values[index[::-1]] and lesions[index[::-1]] == phantom.tumours[0].id, name
        assert vessel["at_risk"] == (vessel["distance_mm"] < report["margin_mm"])
    resected, _ = plane_split(liver, *proposed_plane(tumour, liver, 5.0))
    result = volumetry(liver, tumour, resected)
    assert 0 < result["flr_percent"] < 100
