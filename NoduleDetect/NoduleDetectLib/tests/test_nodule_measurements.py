"""Per-nodule segmentation and measurements: phantom nodules (solid, ground glass, juxta-pleural, juxta-vascular)
against their drawn truth, also on a flipped grid and with a wrong size hint; small ground glass on the chest wall;
ground glass beside a thick vessel; exact answers on synthetic balls (diameters, shape, solid component, type), also
beside a thick vessel or the chest wall; axial diameters without a voxel's bias on a coarse grid; the Lung-RADS size
bands at their edges; bad input; LIDC-IDRI-0001."""

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from NoduleDetectLib.nodules import (LUNG_RADS_NOTE, SOLID_HU, NoduleMeasurement, lung_rads_size_category,
                                     measure_nodule, segment_nodule)
from RecognitionCore.errors import InputError
from RecognitionCore.phantoms import NoduleSpec, make_chest_ct
from RecognitionCore.preprocessing import resample_to_reference
from RecognitionCore.testing import assert_raises

from .phantom_cases import FLIP_X, VOXEL_MM, chest_phantom, phantom_lung_mask

# (volume fraction, longest 3D diameter in mm) against the drawn nodule, from 6 mm up: volume within 20 %, 3D diameter
# within 1.5 slices; a juxta-vascular nodule keeps a stub of the vessel it lies on (measured on this phantom: volume
# +31 %, 3D diameter +4.5 mm), so it gets wider bounds.
TOLERANCE = {"isolated": (0.2, 1.5 * VOXEL_MM[2]), "juxta-pleural": (0.2, 1.5 * VOXEL_MM[2]),
             "juxta-vascular": (0.4, 2.5 * VOXEL_MM[2])}


def _check_against_truth(nodule, measurement):
    what = f"{nodule.diameter_mm:g} mm {nodule.type} {nodule.location}"
    volume_tolerance, diameter_3d_tolerance_mm = TOLERANCE[nodule.location]
    volume_ml = measurement.volume_mm3 / 1000.0
    assert abs(volume_ml / nodule.mask_volume_ml - 1.0) <= volume_tolerance, \
        f"{what}: {volume_ml:.3f} mL against {nodule.mask_volume_ml:.3f} mL drawn"
    assert abs(measurement.mean_axial_diameter_mm - nodule.diameter_mm) <= 1.5 * VOXEL_MM[0], what
    assert abs(measurement.longest_diameter_3d_mm - nodule.diameter_mm) <= diameter_3d_tolerance_mm, what
    assert np.linalg.norm(np.subtract(measurement.center_lps_mm, nodule.center_lps_mm)) <= 1.5, what
    assert measurement.type == ("ground-glass" if nodule.type == "ground-glass" else "solid"), what


def test_phantom_nodules_from_6_mm_match_their_truth():
    phantom = chest_phantom()
    lungs = phantom_lung_mask(phantom)
    truth = sitk.GetArrayViewFromImage(phantom.lesion_labels)
    for nodule in phantom.nodules:
        if nodule.diameter_mm < 6.0:
            continue
        mask = segment_nodule(phantom.image, nodule.center_lps_mm, nodule.diameter_mm, lungs)
        assert mask.GetSpacing() == phantom.image.GetSpacing() and mask.GetDirection() == phantom.image.GetDirection()
        measurement = measure_nodule(phantom.image, mask)
        _check_against_truth(nodule, measurement)
        full = sitk.GetArrayFromImage(resample_to_reference(mask, phantom.image, "nearest")) != 0
        drawn = truth == nodule.id
        dice = 2.0 * np.count_nonzero(full & drawn) / (np.count_nonzero(full) + np.count_nonzero(drawn))
        assert dice > (0.85 if nodule.location != "juxta-vascular" else 0.75), (nodule, dice)
        assert measurement.lung_rads_size_category == lung_rads_size_category(
            measurement.type, measurement.mean_axial_diameter_mm, measurement.solid_mean_axial_diameter_mm)
    large, ground_glass = phantom.nodules[2], phantom.nodules[3]
    assert measure_nodule(phantom.image, segment_nodule(phantom.image, large.center_lps_mm, 15.0, lungs)) \
        .lung_rads_size_category == "4B"
    assert measure_nodule(phantom.image, segment_nodule(phantom.image, ground_glass.center_lps_mm, 12.0, lungs)) \
        .lung_rads_size_category == "2"


def test_a_wrong_size_hint_and_a_flipped_grid_give_the_same_nodule():
    for phantom in (chest_phantom(), chest_phantom(FLIP_X)):
        lungs = phantom_lung_mask(phantom)
        for index in (2, 3):  # the 15 mm solid and the 12 mm ground-glass nodule
            nodule = phantom.nodules[index]
            for factor in (0.7, 1.0, 1.4):
                mask = segment_nodule(phantom.image, nodule.center_lps_mm, factor * nodule.diameter_mm, lungs)
                _check_against_truth(nodule, measure_nodule(phantom.image, mask))
    assert chest_phantom(FLIP_X).image.GetDirection() == FLIP_X


def test_small_juxta_pleural_ground_glass_is_segmented_without_the_chest_wall():
    """The chest wall beside a small ground-glass nodule puts solid tissue into the first cut; a cut at the solid
    level then leaves nothing at the centre (the mask was empty before). The nodule is the ground glass beyond the
    wall's rim."""
    phantom = make_chest_ct((192, 192, 80), VOXEL_MM, seed=5, nodules=[NoduleSpec(5.0, "ground-glass", "juxta-pleural"),
                                                                     NoduleSpec(7.0, "ground-glass", "juxta-pleural")])
    lungs = phantom_lung_mask(phantom)
    truth = sitk.GetArrayViewFromImage(phantom.lesion_labels)
    for nodule in phantom.nodules:
        mask = segment_nodule(phantom.image, nodule.center_lps_mm, nodule.diameter_mm, lungs)
        measurement = measure_nodule(phantom.image, mask)
        full = sitk.GetArrayFromImage(resample_to_reference(mask, phantom.image, "nearest")) != 0
        assert full.any() and sitk.GetArrayViewFromImage(phantom.image)[full].max() < SOLID_HU, nodule
        drawn = truth == nodule.id
        assert 2.0 * np.count_nonzero(full & drawn) / (np.count_nonzero(full) + np.count_nonzero(drawn)) > 0.5, nodule
        assert np.linalg.norm(np.subtract(measurement.center_lps_mm, nodule.center_lps_mm)) <= 1.5, nodule
        assert abs(measurement.mean_axial_diameter_mm - nodule.diameter_mm) <= 1.5 * VOXEL_MM[0], nodule
        assert measurement.type == "ground-glass", nodule


def test_ground_glass_beside_a_thick_vessel_leaves_the_vessel_out():
    """A vessel thicker than the opening stays attached to the cut at the ground-glass level; the ground glass shows
    where the nodule ends (the mask took 15 mm of the vessel on either side before)."""
    grid = _ball_grid(spacing=(0.7, 0.7, 1.5), size=(90, 90, 40), origin=(0.0, 0.0, 0.0))
    z, y, x = grid[1]
    center = (31.5, -31.5, 30.0)
    nodule = (x - center[0]) ** 2 + (y - center[1]) ** 2 + (z - center[2]) ** 2 <= 8.0 ** 2  # 16 mm
    vessel = (y - center[1] - 11.0) ** 2 + (z - center[2]) ** 2 <= 5.0 ** 2  # 10 mm thick, 2 mm into the nodule
    image, _ = _image_and_mask(grid, np.where(vessel, 40, np.where(nodule, -600, -850)), nodule)
    mask = segment_nodule(image, center, 16.0)
    full = sitk.GetArrayFromImage(resample_to_reference(mask, image, "nearest")) != 0
    assert np.count_nonzero(full & vessel & ~nodule) < 0.05 * np.count_nonzero(full)
    measurement = measure_nodule(image, mask)
    assert measurement.type == "ground-glass" and measurement.longest_diameter_3d_mm <= 16.0 + 2.0
    assert abs(measurement.mean_axial_diameter_mm - 16.0) <= 1.5


def _ball_grid(spacing=(0.5, 0.5, 0.5), size=(60, 60, 60), origin=(10.0, -20.0, 30.0)):
    """A grid with a y flip, and the (z, y, x) LPS coordinates of its voxel centres."""
    image = sitk.Image(list(size), sitk.sitkInt16)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection((1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    k, j, i = np.meshgrid(*[np.arange(n, dtype=float) for n in size[::-1]], indexing="ij")
    x = origin[0] + i * spacing[0]
    y = origin[1] - j * spacing[1]
    z = origin[2] + k * spacing[2]
    return image, (z, y, x)


def _image_and_mask(grid, hu, mask):
    image, _ = grid
    values = sitk.GetImageFromArray(hu.astype(np.int16))
    values.CopyInformation(image)
    labels = sitk.GetImageFromArray(mask.astype(np.uint8))
    labels.CopyInformation(image)
    return values, labels


def test_measurements_of_synthetic_balls():
    grid = _ball_grid()
    z, y, x = grid[1]
    center = (25.0, -35.0, 45.0)
    distance = np.sqrt((x - center[0]) ** 2 + (y - center[1]) ** 2 + (z - center[2]) ** 2)
    ball = distance <= 5.0  # 10 mm across at 0.5 mm voxels

    image, mask = _image_and_mask(grid, np.where(ball, 30, -850), ball)
    solid = measure_nodule(image, mask)
    assert isinstance(solid, NoduleMeasurement) and solid.type == "solid" and solid.solid_fraction == 1.0
    assert abs(solid.volume_mm3 - np.count_nonzero(ball) * 0.125) < 1e-6
    assert abs(solid.volume_ml - 4.0 / 3.0 * np.pi * 5.0 ** 3 / 1000.0) < 0.02
    for diameter in (solid.longest_axial_diameter_mm, solid.short_axial_diameter_mm, solid.longest_diameter_3d_mm):
        assert abs(diameter - 10.0) <= 0.5
    assert np.allclose(solid.center_lps_mm, center, atol=0.05)
    assert solid.sphericity > 0.95 and solid.elongation < 1.05 and solid.mean_hu == 30.0
    assert solid.lung_rads_size_category == "4A" and "not a diagnosis" in solid.lung_rads_label

    # ground glass with a vessel running through it and beyond: the vessel is not a solid component
    vessel = np.sqrt((y - center[1]) ** 2 + (z - center[2]) ** 2) <= 1.0
    image, mask = _image_and_mask(grid, np.where(vessel, 40, np.where(ball, -600, -850)), ball)
    ground_glass = measure_nodule(image, mask)
    assert ground_glass.type == "ground-glass" and ground_glass.solid_mean_axial_diameter_mm == 0.0
    assert 0.0 < ground_glass.solid_fraction < 0.2 and ground_glass.lung_rads_size_category == "2"

    # part-solid: 14 mm of ground glass around a 7 mm solid core
    large = distance <= 7.0
    image, mask = _image_and_mask(grid, np.where(distance <= 3.5, 20, np.where(large, -600, -850)), large)
    part_solid = measure_nodule(image, mask)
    assert part_solid.type == "part-solid"
    assert abs(part_solid.solid_mean_axial_diameter_mm - 7.0) <= 0.5
    assert abs(part_solid.mean_axial_diameter_mm - 14.0) <= 0.5
    assert part_solid.lung_rads_size_category == "4A"  # total >= 6 mm, solid component 6 to < 8 mm

    # an elongated (prolate) nodule: elongation, lower sphericity, longest 3D diameter along z
    prolate = ((x - center[0]) / 3.0) ** 2 + ((y - center[1]) / 3.0) ** 2 + ((z - center[2]) / 9.0) ** 2 <= 1.0
    image, mask = _image_and_mask(grid, np.where(prolate, 30, -850), prolate)
    elongated = measure_nodule(image, mask)
    assert elongated.elongation > 2.5 and elongated.sphericity < 0.9  # a 1:3 spheroid: 0.85
    assert abs(elongated.longest_diameter_3d_mm - 18.0) <= 0.75
    assert abs(elongated.longest_axial_diameter_mm - 6.0) <= 0.5


def test_axial_diameters_on_a_coarse_grid_are_not_a_voxel_long():
    """Discs of 4-20 mm (upright cylinders 10 mm tall, so that every slice cuts their full width) drawn at random
    sub-voxel positions on 1.1 x 1.1 x 2.5 mm voxels, a voxel in when its centre is: the mean axial diameter is right
    on average to within a quarter of a pixel. Adding a whole voxel to the width between voxel centres made them
    0.3-0.7 mm too long."""
    rng = np.random.default_rng(7)
    grid = _ball_grid(spacing=(1.1, 1.1, 2.5), size=(28, 28, 14))
    z, y, x = grid[1]
    for diameter_mm in (4.0, 8.0, 12.0, 20.0):
        errors = []
        for _ in range(6):
            center = np.array((25.0, -35.0, 45.0)) + rng.uniform(0.0, 1.0, 3) * (1.1, 1.1, 2.5)
            disc = (((x - center[0]) ** 2 + (y - center[1]) ** 2 <= (diameter_mm / 2.0) ** 2)
                    & (abs(z - center[2]) < 5.0))
            measurement = measure_nodule(*_image_and_mask(grid, np.where(disc, 30, -850), disc))
            errors.append(measurement.mean_axial_diameter_mm - diameter_mm)
        assert abs(np.mean(errors)) <= 0.25 * 1.1, (diameter_mm, np.round(errors, 2))


def test_the_solid_component_is_the_nodules_own():
    """Solid tissue at a nodule's edge that goes on outside it (a vessel thicker than the opening, the chest wall) is
    not its solid component, even where the mask takes some of it in, nor is a vessel that crosses the ground glass;
    a vessel running into a solid core does not lengthen the core."""
    grid = _ball_grid()
    z, y, x = grid[1]
    center = (25.0, -35.0, 45.0)
    distance = np.sqrt((x - center[0]) ** 2 + (y - center[1]) ** 2 + (z - center[2]) ** 2)
    nodule = distance <= 7.0  # 14 mm of ground glass
    vessel_along_x = np.sqrt((y - center[1] - 6.5) ** 2 + (z - center[2]) ** 2) <= 2.5  # 5 mm thick, 3 mm inside
    chest_wall = z >= center[2] + 4.0  # 3 mm inside
    vessel_across = np.sqrt((y - center[1]) ** 2 + (z - center[2]) ** 2) <= 2.0  # 4 mm thick, through the middle
    for neighbour in (vessel_along_x, chest_wall, vessel_across):
        image, mask = _image_and_mask(grid, np.where(neighbour, 40, np.where(nodule, -600, -850)), nodule)
        ground_glass = measure_nodule(image, mask)
        assert ground_glass.type == "ground-glass" and ground_glass.solid_mean_axial_diameter_mm == 0.0
        assert ground_glass.solid_fraction > 0.05 and ground_glass.lung_rads_size_category == "2"

    core = distance <= 3.5  # 7 mm
    vessel_into_core = (np.sqrt((y - center[1]) ** 2 + (z - center[2]) ** 2) <= 2.5) & (x >= center[0])
    image, mask = _image_and_mask(grid, np.where(core | vessel_into_core, 20, np.where(nodule, -600, -850)), nodule)
    part_solid = measure_nodule(image, mask)
    assert part_solid.type == "part-solid" and abs(part_solid.solid_mean_axial_diameter_mm - 7.0) <= 1.0
    assert part_solid.lung_rads_size_category == "4A"  # solid component 6 to < 8 mm, not the 8.75 mm with the vessel


def test_lung_rads_size_bands_at_their_edges():
    cases = [("solid", 5.9, None, "2"), ("solid", 6.0, None, "3"), ("solid", 7.9, None, "3"),
             ("solid", 8.0, None, "4A"), ("solid", 14.9, None, "4A"), ("solid", 15.0, None, "4B"),
             ("solid", 5.96, None, "3"), ("solid", 5.94, None, "2"),  # Lung-RADS rounds to 0.1 mm
             ("part-solid", 5.9, 5.0, "2"), ("part-solid", 6.0, 5.9, "3"), ("part-solid", 6.0, 6.0, "4A"),
             ("part-solid", 12.0, 7.9, "4A"), ("part-solid", 12.0, 8.0, "4B"), ("part-solid", 20.0, 0.0, "3"),
             ("ground-glass", 29.9, None, "2"), ("ground-glass", 30.0, None, "3"), ("ground-glass", 3.0, None, "2")]
    for nodule_type, diameter, solid, expected in cases:
        assert lung_rads_size_category(nodule_type, diameter, solid) == expected, (nodule_type, diameter, solid)
    assert_raises(InputError, lung_rads_size_category, "calcified", 5.0, match="nodule type")
    assert_raises(InputError, lung_rads_size_category, "solid", -1.0, match="diameter")
    assert_raises(InputError, lung_rads_size_category, "solid", float("nan"), match="diameter")
    assert_raises(InputError, lung_rads_size_category, "part-solid", 9.0, match="solid component")
    assert "size" in LUNG_RADS_NOTE and "not a diagnosis" in LUNG_RADS_NOTE


def test_empty_results_and_bad_input():
    phantom = chest_phantom()
    lungs = phantom_lung_mask(phantom)
    nodule = phantom.nodules[2]
    # aerated lung only (no nodule there), and a point outside the body: empty masks
    lung_voxels = np.argwhere((sitk.GetArrayViewFromImage(phantom.labels) == 2)
                              & (ndimage.distance_transform_edt(sitk.GetArrayViewFromImage(phantom.image) < -600,
                                                                sampling=(2.5, 1.0, 1.0)) > 6.0))
    empty_lung = phantom.image.TransformIndexToPhysicalPoint([int(v) for v in lung_voxels[len(lung_voxels) // 2][::-1]])
    outside = phantom.image.TransformIndexToPhysicalPoint([1, 1, 40])
    for point in (empty_lung, outside):
        assert not sitk.GetArrayFromImage(segment_nodule(phantom.image, point, 6.0, lungs)).any(), point

    assert_raises(InputError, segment_nodule, phantom.image, (500.0, 0.0, 0.0), 8.0, match="outside the image")
    assert_raises(InputError, segment_nodule, phantom.image, (0.0, 0.0), 8.0, match="three")
    assert_raises(InputError, segment_nodule, phantom.image, nodule.center_lps_mm, 0.0, match="diameter hint")
    shifted = sitk.Image(lungs)
    shifted.SetOrigin((1.0, 2.0, 3.0))
    assert_raises(InputError, segment_nodule, phantom.image, nodule.center_lps_mm, 8.0, shifted, match="image grid")

    mask = segment_nodule(phantom.image, nodule.center_lps_mm, 15.0, lungs)
    assert_raises(InputError, measure_nodule, phantom.image, mask * 0, match="empty")
    off_grid = sitk.Image(mask)
    off_grid.SetOrigin(tuple(v + 0.3 for v in mask.GetOrigin()))
    assert_raises(InputError, measure_nodule, phantom.image, off_grid, match="not on the image grid")


def test_lidc_0001_nodule_is_measured(shared_data):
    from RecognitionCore.io import read_image

    image = read_image(shared_data / "lidc" / "LIDC-IDRI-0001")
    # the four readers outlined it over 26.7-29.5 mm (x) by 30.2-35.9 mm (y) on 7-9 slices of 2.5 mm
    measurement = measure_nodule(image, segment_nodule(image, (56.17, 86.2, -115.86), 26.6))
    assert measurement.type == "solid" and measurement.lung_rads_size_category == "4B"
    assert 20.0 <= measurement.longest_axial_diameter_mm <= 36.0
    assert 3.0 <= measurement.volume_ml <= 12.0
    assert np.linalg.norm(np.subtract(measurement.center_lps_mm, (56.17, 86.2, -115.86))) < 4.0
