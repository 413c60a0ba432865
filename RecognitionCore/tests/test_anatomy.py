"""Classical chest and trunk anatomy: phantoms with exact truth (any direction matrix, padding, touching lungs,
no lungs) and the real CTs (TotalSegmentator lung bases, LIDC-IDRI-0001).

"Lung" as a clinician outlines it, on the phantom: the lung label plus the vessels, small airways and nodules lying
within the lung's envelope (its in-plane closing by 3 voxels = 7.5 mm); the trachea and main bronchi outside the
lungs are not lung.
"""

import functools
import time

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from RecognitionCore import anatomy, phantoms
from RecognitionCore.errors import Cancelled, InputError
from RecognitionCore.evaluation import dice
from RecognitionCore.io import read_image
from RecognitionCore.phantoms import NoduleSpec
from RecognitionCore.progress import CancelToken, Progress
from RecognitionCore.testing import assert_raises

CHEST_SIZE = (128, 128, 64)
CHEST_SPACING_MM = (2.5, 2.5, 5.0)
NODULES = (NoduleSpec(8.0, "solid", "juxta-pleural"), NoduleSpec(12.0, "part-solid", "juxta-pleural"),
           NoduleSpec(10.0, "solid", "juxta-vascular"), NoduleSpec(6.0, "ground-glass", "isolated"))
FLIP_X = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
SWAP_XY_FLIP_Z = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
LUNG_RIGHT, LUNG_LEFT = 2, 3
IN_LUNG_LABELS = (4, 5, 9)  # airway, vessel, nodule


@functools.lru_cache(maxsize=None)
def _chest(direction=None, padding_hu=-2048):
    """Seed 3: its main bronchi are too thin to grow into at 5 mm slices, so the lungs stay joined through the
    bronchial tree and must be split."""
    return phantoms.make_chest_ct(CHEST_SIZE, CHEST_SPACING_MM, seed=3, nodules=list(NODULES), direction=direction,
                                  padding_hu=padding_hu)


def _array(image):
    return sitk.GetArrayViewFromImage(image) != 0


def _clinical_lung(labels, side_label):
    lung = labels == side_label
    envelope = ndimage.binary_closing(lung, structure=np.ones((1, 7, 7), dtype=bool))
    return lung | (np.isin(labels, IN_LUNG_LABELS) & envelope)


def _same_geometry(mask, image):
    return (mask.GetSize() == image.GetSize() and mask.GetPixelID() == sitk.sitkUInt8
            and np.allclose(mask.GetOrigin(), image.GetOrigin()) and np.allclose(mask.GetSpacing(), image.GetSpacing())
            and np.allclose(mask.GetDirection(), image.GetDirection()))


def _lung_dice(result, phantom):
    labels = sitk.GetArrayFromImage(phantom.labels)
    return (dice(_clinical_lung(labels, LUNG_RIGHT), _array(result.right)),
            dice(_clinical_lung(labels, LUNG_LEFT), _array(result.left)))


def test_phantom_lungs_match_the_truth_with_nodules_inside_and_airways_out():
    phantom = _chest()
    assert float(sitk.GetArrayViewFromImage(phantom.image).min()) == -2048.0  # padding outside the scan circle
    result = anatomy.segment_lungs(phantom.image)
    dice_right, dice_left = _lung_dice(result, phantom)
    print(f"phantom lung Dice: right {dice_right:.3f}, left {dice_left:.3f}; volumes {result.right_volume_ml:.0f} + "
          f"{result.left_volume_ml:.0f} mL, airways {result.airways_volume_ml:.1f} mL")
    assert dice_right >= 0.95 and dice_left >= 0.95
    for mask in (result.right, result.left, result.airways):
        assert _same_geometry(mask, phantom.image)

    right, left, airways = _array(result.right), _array(result.left), _array(result.airways)
    voxel_ml = float(np.prod(CHEST_SPACING_MM)) / 1000.0
    assert np.isclose(result.right_volume_ml, right.sum() * voxel_ml)
    labels = sitk.GetArrayFromImage(phantom.labels)
    assert abs(result.right_volume_ml / (_clinical_lung(labels, LUNG_RIGHT).sum() * voxel_ml) - 1.0) < 0.1
    assert not (right & left).any() and not (airways & (right | left)).any()

    assert [n.location for n in phantom.nodules].count("juxta-pleural") == 2
    for nodule in phantom.nodules:  # the phantom is centred on x = 0: patient right is x < 0
        i, j, k = phantom.image.TransformPhysicalPointToIndex(nodule.center_lps_mm)
        side = left if nodule.center_lps_mm[0] > 0 else right
        assert side[k, j, i], f"{nodule.location} nodule of {nodule.diameter_mm} mm is outside its lung"

    top_of_lungs = int(np.flatnonzero(np.isin(labels, (LUNG_RIGHT, LUNG_LEFT)).any(axis=(1, 2)))[-1])
    trachea = labels[top_of_lungs + 1:] == 4
    assert trachea.any() and airways[top_of_lungs + 1:][trachea].mean() >= 0.8
    near_airway_label = ndimage.binary_dilation(labels == 4)
    assert near_airway_label[airways].mean() >= 0.9


def test_left_and_right_are_patient_sides_whatever_the_direction_matrix():
    for direction, padding_hu in ((FLIP_X, -3024), (SWAP_XY_FLIP_Z, -2048)):
        phantom = _chest(direction, padding_hu)
        result = anatomy.segment_lungs(phantom.image)
        dice_right, dice_left = _lung_dice(result, phantom)
        assert dice_right >= 0.95 and dice_left >= 0.95, (direction, dice_right, dice_left)
        assert _same_geometry(result.right, phantom.image) and _same_geometry(result.left, phantom.image)
        if direction == FLIP_X:  # the patient's right lies at the high array indices
            right_i = np.flatnonzero(_array(result.right).any(axis=(0, 1))).mean()
            left_i = np.flatnonzero(_array(result.left).any(axis=(0, 1))).mean()
            assert right_i > left_i


def test_lungs_touching_at_the_anterior_junction_are_split():
    phantom = _chest()
    hu = sitk.GetArrayFromImage(phantom.image)
    labels = sitk.GetArrayFromImage(phantom.labels)
    lungs = np.isin(labels, (LUNG_RIGHT, LUNG_LEFT))
    slices = np.flatnonzero(lungs.any(axis=(1, 2)))
    for k in slices[len(slices) // 3: 2 * len(slices) // 3]:
        rows = np.flatnonzero((labels[k] == LUNG_RIGHT).any(axis=1) & (labels[k] == LUNG_LEFT).any(axis=1))
        front = rows[0]  # the most anterior row (LPS y grows posteriorly) that crosses both lungs
        columns = np.flatnonzero(lungs[k, front])
        hu[k, front:front + 2, columns[0]:columns[-1] + 1] = -850  # a band of lung joining them in front
    joined = sitk.GetImageFromArray(hu)
    joined.CopyInformation(phantom.image)
    result = anatomy.segment_lungs(joined)
    dice_right, dice_left = _lung_dice(result, phantom)
    assert dice_right >= 0.93 and dice_left >= 0.93, (dice_right, dice_left)
    assert 0.6 < result.left_volume_ml / result.right_volume_ml < 1.1


def test_trunk_anatomy_on_the_phantom_with_progress_cancel_and_labelmap():
    phantom = _chest()
    reports = []
    masks = anatomy.segment_trunk_anatomy(phantom.image, progress=Progress(lambda f, m: reports.append((f, m))))
    assert list(masks) == list(anatomy.TRUNK_STRUCTURES)
    fractions = [f for f, _ in reports]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and fractions == sorted(fractions)
    assert all(message for _, message in reports)

    labels = sitk.GetArrayFromImage(phantom.labels)
    hu = sitk.GetArrayFromImage(phantom.image)
    arrays = {name: _array(mask) for name, mask in masks.items()}
    assert all(_same_geometry(mask, phantom.image) for mask in masks.values())
    assert arrays["body"][(labels >= 1) & (labels <= 9)].mean() >= 0.99
    assert not arrays["body"][(labels == 0) & (hu < -900)].any()  # outside air and padding
    bone_dice = dice(labels == 6, arrays["bones"])
    assert bone_dice >= 0.75, bone_dice
    fat, soft = arrays["fat"], arrays["soft_tissue"]
    assert fat.sum() > 0 and soft.sum() > 0 and not (fat & soft).any()
    assert np.all((hu[fat] >= -190) & (hu[fat] <= -30)) and np.all((hu[soft] > -30) & (hu[soft] <= 150))
    for other in ("lung_right", "lung_left", "airways", "bones"):
        assert not ((fat | soft) & arrays[other]).any(), other
    lungs = anatomy.segment_lungs(phantom.image)
    assert np.array_equal(arrays["lung_right"], _array(lungs.right))

    labelmap_image, names = anatomy.segment_trunk_labelmap(phantom.image)
    assert names == anatomy.TRUNK_LABELS and _same_geometry(labelmap_image, phantom.image)
    labelmap = sitk.GetArrayFromImage(labelmap_image)
    for number, name in anatomy.TRUNK_LABELS.items():  # each structure where no later one overlaps it
        later = [other for other in anatomy.TRUNK_STRUCTURES[anatomy.TRUNK_STRUCTURES.index(name) + 1:]]
        alone = arrays[name] & ~np.logical_or.reduce([arrays[other] for other in later] or [np.zeros_like(fat)])
        assert np.all(labelmap[alone] == number), name
    assert not labelmap[~np.logical_or.reduce(list(arrays.values()))].any()

    only_bones = anatomy.segment_trunk_anatomy(phantom.image, ["bones"])
    assert list(only_bones) == ["bones"] and np.array_equal(_array(only_bones["bones"]), arrays["bones"])
    assert_raises(InputError, anatomy.segment_trunk_anatomy, phantom.image, ["liver"], match="unknown")
    token = CancelToken()
    token.cancel()
    assert_raises(Cancelled, anatomy.segment_trunk_anatomy, phantom.image, progress=Progress(cancel_token=token))
    assert_raises(Cancelled, anatomy.segment_lungs, phantom.image, Progress(cancel_token=token))


def test_fat_and_soft_tissue_ranges_are_exact():
    values = np.array([-1000, -191, -190, -100, -30, -29, 40, 150, 151, 400], dtype=np.int16)
    hu = np.tile(values, (10, 10, 1))
    image = sitk.GetImageFromArray(hu)
    body = sitk.GetImageFromArray(np.ones(hu.shape, dtype=np.uint8))
    excluded = np.zeros(hu.shape, dtype=np.uint8)
    excluded[0] = 1
    exclude = sitk.GetImageFromArray(excluded)
    fat, soft = anatomy.segment_fat_and_soft_tissue(image, body, [exclude])
    fat, soft = _array(fat), _array(soft)
    assert np.array_equal(fat[1, 0], np.isin(values, (-190, -100, -30)))
    assert np.array_equal(soft[1, 0], np.isin(values, (-29, 40, 150)))
    assert not fat[0].any() and not soft[0].any()
    moved = sitk.GetImageFromArray(excluded)
    moved.SetOrigin((5.0, 0.0, 0.0))
    assert_raises(InputError, anatomy.segment_fat_and_soft_tissue, image, body, [moved], match="grid")


def test_no_lungs_is_an_input_error_naming_it():
    abdomen = phantoms.make_abdomen_ct((96, 96, 48), (3.5, 3.5, 6.0), seed=2, padding_hu=-2048)
    assert_raises(InputError, anatomy.segment_lungs, abdomen.image, match="no lungs")
    assert_raises(InputError, anatomy.segment_trunk_anatomy, abdomen.image, ["lung_left"], match="no lungs")
    tissues = anatomy.segment_trunk_anatomy(abdomen.image, ["body", "bones", "fat", "soft_tissue"])
    assert dice(sitk.GetArrayFromImage(abdomen.labels) == 6, _array(tissues["bones"])) >= 0.7

    rng = np.random.default_rng(0)
    block = np.full((40, 64, 64), -1000.0, dtype=np.float32)
    block[5:35, 12:52, 12:52] = 40.0
    block += rng.normal(0.0, 10.0, block.shape).astype(np.float32)
    assert_raises(InputError, anatomy.segment_lungs, sitk.GetImageFromArray(block), match="no lungs")
    air = sitk.GetImageFromArray(rng.normal(-1000.0, 10.0, (40, 64, 64)).astype(np.float32))
    assert_raises(InputError, anatomy.segment_lungs, air, match="no lungs")
    for constant_hu in (-1000, 40):
        constant = sitk.GetImageFromArray(np.full((40, 64, 64), constant_hu, dtype=np.int16))
        assert_raises(InputError, anatomy.segment_lungs, constant, match="constant")


def test_lung_bases_of_the_totalsegmentator_example(shared_data):
    folder = shared_data / "totalsegmentator"
    image = sitk.ReadImage(str(folder / "example_ct.nii.gz"))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "example_seg_fast_force_split.nii.gz")))
    # The 1.5 mm model's labels (same label table) of example_ct_sm.nii.gz: slices 82-111 of the same CT, whose
    # header keeps the full CT's origin, so it is placed by its voxel values.
    slab = slice(82, 112)
    assert np.array_equal(sitk.GetArrayViewFromImage(image)[slab],
                          sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "example_ct_sm.nii.gz"))))
    truth_fine = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "example_seg.nii.gz")))
    start = time.perf_counter()
    result = anatomy.segment_lungs(image)
    seconds = time.perf_counter() - start
    right, left = _array(result.right), _array(result.left)
    both = dice(np.isin(truth, (10, 11, 12, 13, 14)), right | left)
    left_dice = dice(np.isin(truth, (10, 11)), left)  # left upper and lower lobes
    right_dice = dice(np.isin(truth, (12, 13, 14)), right)  # right upper, middle and lower lobes
    both_fine = dice(np.isin(truth_fine, (10, 11, 12, 13, 14)), (right | left)[slab])
    print(f"TotalSegmentator example: lung Dice {both:.3f} (left {left_dice:.3f}, right {right_dice:.3f}), "
          f"{both_fine:.3f} against the 1.5 mm model, {result.right_volume_ml:.0f} + {result.left_volume_ml:.0f} "
          f"mL, {seconds:.2f} s")
    assert both >= 0.96 and left_dice >= 0.955 and right_dice >= 0.955
    assert both_fine >= 0.96
    assert not _array(result.airways).any() and any("trachea" in warning for warning in result.warnings)


def test_lidc_0001_both_lungs_plausible_and_airways_apart(shared_data):
    image = read_image(shared_data / "lidc" / "LIDC-IDRI-0001")
    start = time.perf_counter()
    result = anatomy.segment_lungs(image)
    seconds = time.perf_counter() - start
    print(f"LIDC-IDRI-0001: right {result.right_volume_ml:.0f} mL, left {result.left_volume_ml:.0f} mL, airways "
          f"{result.airways_volume_ml:.0f} mL, {seconds:.2f} s")
    assert 1000 < result.right_volume_ml < 4000 and 1000 < result.left_volume_ml < 4000
    assert 10 < result.airways_volume_ml < 150 and not result.warnings
    right, left, airways = _array(result.right), _array(result.left), _array(result.airways)
    assert not (airways & (right | left)).any()

    def center_lps(mask):
        index = [float(np.flatnonzero(mask.any(axis=axes)).mean()) for axes in ((0, 1), (0, 2), (1, 2))]
        return np.array(image.TransformContinuousIndexToPhysicalPoint(index))

    assert center_lps(right)[0] < center_lps(left)[0]  # patient right is -x in LPS
    top_of_lungs = np.flatnonzero((right | left).any(axis=(1, 2)))[-1]
    assert np.flatnonzero(airways.any(axis=(1, 2)))[-1] > top_of_lungs  # the trachea rises above the apices
