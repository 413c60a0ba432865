"""Interactive organ segmentation: threshold, region growing from automatic seeds and grow from seeds (GrowCut) from
automatic scribbles, on abdomen phantoms (exact truth; also on an oblique grid) and on real CT (TotalSegmentator
example, dcmqi 3-slice CT); refine and re-apply; progress, cancel and bad input."""

import functools

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from OrganSegmentLib.interactive import (grow_from_seeds, region_grow, scribbles_from_reference, seeds_from_reference,
                                         threshold_segment)
from RecognitionCore.errors import Cancelled, InputError
from RecognitionCore.evaluation import dice
from RecognitionCore.io import read_image
from RecognitionCore.phantoms import make_abdomen_ct
from RecognitionCore.preprocessing import resample_to_reference, resample_to_spacing
from RecognitionCore.progress import CancelToken, Progress
from RecognitionCore.testing import assert_raises

LIVER, SPLEEN, BONE = 2, 3, 6  # phantoms.ABDOMEN_LABELS


@functools.lru_cache(maxsize=1)
def abdomen():
    return make_abdomen_ct((112, 112, 72), (3.0, 3.0, 3.5), seed=3)


def organ(phantom, value):
    return sitk.Cast(phantom.labels == value, sitk.sitkUInt8)


@functools.lru_cache(maxsize=1)
def totalsegmentator(data_dir):
    folder = data_dir / "totalsegmentator"
    image = read_image(folder / "example_ct.nii.gz")
    labels = sitk.ReadImage(str(folder / "example_seg_fast_force_split.nii.gz"))
    return image, sitk.Cast(labels == 5, sitk.sitkUInt8)  # 5: liver (labels_total.csv)


def assert_on_grid(result, image):
    assert result.GetPixelID() == sitk.sitkUInt8
    assert result.GetSize() == image.GetSize()
    assert result.GetSpacing() == image.GetSpacing()
    assert result.GetOrigin() == image.GetOrigin()
    assert result.GetDirection() == image.GetDirection()


def test_seeds_from_reference_are_deep_spread_and_reproducible():
    phantom = abdomen()
    liver = organ(phantom, LIVER)
    seeds = seeds_from_reference(liver, 4, seed=0)
    assert seeds == seeds_from_reference(liver, 4, seed=0)
    assert seeds != seeds_from_reference(liver, 4, seed=1)
    depth_mm = ndimage.distance_transform_edt(sitk.GetArrayViewFromImage(liver), sampling=liver.GetSpacing()[::-1])
    for point in seeds:
        index = liver.TransformPhysicalPointToIndex(point)
        assert liver[index] == 1
        assert depth_mm[index[::-1]] >= 0.4 * depth_mm.max()
    gaps = [np.linalg.norm(np.subtract(a, b)) for n, a in enumerate(seeds) for b in seeds[n + 1:]]
    assert min(gaps) > 20.0, gaps


def test_region_grow_finds_the_phantom_liver_and_spleen_from_three_seeds():
    phantom = abdomen()
    for value, minimum_dice in ((LIVER, 0.9), (SPLEEN, 0.95)):  # measured 0.953 and 0.989
        truth = organ(phantom, value)
        result = region_grow(phantom.image, seeds_from_reference(truth, 3))
        assert_on_grid(result, phantom.image)
        assert dice(truth, result) >= minimum_dice, (value, dice(truth, result))


def test_region_grow_redraws_the_boundary_at_full_resolution():
    """On a CT finer than the working grid (the phantom resampled to 1.5 mm in-plane), the organ is found on the
    working grid and its boundary redrawn at full resolution."""
    phantom = abdomen()
    fine_image = resample_to_spacing(phantom.image, (1.5, 1.5, 3.5), "linear")
    liver = sitk.Cast(resample_to_reference(organ(phantom, LIVER), fine_image, "nearest"), sitk.sitkUInt8)
    result = region_grow(fine_image, seeds_from_reference(liver, 3))
    assert_on_grid(result, fine_image)
    assert dice(liver, result) >= 0.92, dice(liver, result)


def test_region_grow_respects_the_maximum_distance():
    phantom = abdomen()
    seed = seeds_from_reference(organ(phantom, LIVER), 1)[0]
    result = region_grow(phantom.image, [seed], max_distance_mm=30.0)
    points = np.argwhere(sitk.GetArrayViewFromImage(result))[:, ::-1]
    assert len(points) > 100
    distances = [np.linalg.norm(np.subtract(result.TransformIndexToPhysicalPoint([int(v) for v in p]), seed))
                 for p in points[:: max(1, len(points) // 500)]]
    assert max(distances) <= 30.0 + 1e-6


def test_oblique_grid_progress_and_cancel():
    phantom = make_abdomen_ct((112, 112, 72), (3.0, 3.0, 3.5), seed=3,
                              direction=(0.0, -0.6, 0.8, 1.0, 0.0, 0.0, 0.0, 0.8, 0.6))
    liver = organ(phantom, LIVER)
    reports = []
    result = region_grow(phantom.image, seeds_from_reference(liver, 3),
                         progress=Progress(lambda fraction, message: reports.append(fraction)))
    assert_on_grid(result, phantom.image)
    assert dice(liver, result) >= 0.9, dice(liver, result)  # measured 0.951
    assert reports == sorted(reports) and reports[-1] == 1.0
    token = CancelToken()
    token.cancel()
    assert_raises(Cancelled, grow_from_seeds, phantom.image, scribbles_from_reference(liver),
                  progress=Progress(cancel_token=token))


def test_threshold_segment_with_and_without_seeds():
    phantom = abdomen()
    hu = sitk.GetArrayViewFromImage(phantom.image)
    everything = threshold_segment(phantom.image, 250, 3000)
    assert_on_grid(everything, phantom.image)
    assert np.array_equal(sitk.GetArrayViewFromImage(everything) == 1, (hu >= 250) & (hu <= 3000))
    spleen = organ(phantom, SPLEEN)
    seed = seeds_from_reference(spleen, 1)[0]
    spleen_hu = float(np.median(hu[sitk.GetArrayViewFromImage(spleen) == 1]))
    low, high = spleen_hu - 40, spleen_hu + 40
    seeded = sitk.GetArrayFromImage(threshold_segment(phantom.image, low, high, [seed])) == 1
    whole = sitk.GetArrayFromImage(threshold_segment(phantom.image, low, high)) == 1
    assert seeded.sum() < whole.sum() and np.all(whole[seeded])
    assert seeded[tuple(phantom.image.TransformPhysicalPointToIndex(seed))[::-1]]
    assert_raises(InputError, threshold_segment, phantom.image, high, 3000, [seed], match="outside the threshold")
    assert_raises(InputError, threshold_segment, phantom.image, 100, 20, match="lower <= upper")


def test_grow_from_seeds_with_organ_and_background_scribbles():
    phantom = abdomen()
    liver = organ(phantom, LIVER)
    scribbles = scribbles_from_reference(liver)
    result = grow_from_seeds(phantom.image, scribbles)
    assert_on_grid(result.labels, phantom.image)
    assert set(np.unique(sitk.GetArrayViewFromImage(result.labels))) <= {0, 1, 2}
    assert dice(liver, result.labels == 1) >= 0.9, dice(liver, result.labels == 1)  # measured 0.925
    # the two-level path: a working grid twice as coarse, boundaries regrown at full resolution
    coarse = grow_from_seeds(phantom.image, scribbles, working_spacing_mm=6.5)
    assert coarse.working_spacing_mm[0] > 5.0
    assert dice(liver, coarse.labels == 1) >= 0.9, dice(liver, coarse.labels == 1)  # measured 0.962


def test_grow_from_seeds_refine_and_reapply():
    """Background scribbles added where the liver leaked fix the leak, and re-applying on the previous result equals
    one run from all the scribbles."""
    phantom = abdomen()
    liver = organ(phantom, LIVER)
    full = sitk.GetArrayFromImage(scribbles_from_reference(liver))
    first = np.where(full == 2, 0, full).astype(np.uint8)
    centre = int(np.argwhere(full == 1)[:, 0].mean())
    first[centre] = full[centre]  # background only in the axial plane
    first_image = sitk.GetImageFromArray(first)
    first_image.CopyInformation(phantom.image)
    before = grow_from_seeds(phantom.image, first_image)
    added = sitk.GetImageFromArray(np.where((full == 2) & (first == 0), 2, 0).astype(np.uint8))
    added.CopyInformation(phantom.image)
    after = grow_from_seeds(phantom.image, added, previous=before)
    assert dice(liver, after.labels == 1) > dice(liver, before.labels == 1) + 0.02, \
        (dice(liver, before.labels == 1), dice(liver, after.labels == 1))
    merged = sitk.GetImageFromArray(np.maximum(first, np.where(full == 2, 2, 0)).astype(np.uint8))
    merged.CopyInformation(phantom.image)
    assert np.array_equal(sitk.GetArrayViewFromImage(after.seeds), sitk.GetArrayViewFromImage(merged))
    again = grow_from_seeds(phantom.image, merged)
    assert np.array_equal(sitk.GetArrayViewFromImage(after.labels), sitk.GetArrayViewFromImage(again.labels))


def test_grow_from_seeds_with_three_labels():
    phantom = abdomen()
    liver, spleen = organ(phantom, LIVER), organ(phantom, SPLEEN)
    liver_scribbles = sitk.GetArrayFromImage(scribbles_from_reference(liver, 1, 3))
    spleen_scribbles = sitk.GetArrayFromImage(scribbles_from_reference(spleen, 2, 3))
    inside = (sitk.GetArrayViewFromImage(liver) == 1) | (sitk.GetArrayViewFromImage(spleen) == 1)
    background = ((liver_scribbles == 3) | (spleen_scribbles == 3)) & ~inside  # no background painted on an organ
    scribbles = np.where(liver_scribbles == 1, 1, np.where(spleen_scribbles == 2, 2, np.where(background, 3, 0)))
    seeds = sitk.GetImageFromArray(scribbles.astype(np.uint8))
    seeds.CopyInformation(phantom.image)
    result = grow_from_seeds(phantom.image, seeds)
    assert dice(liver, result.labels == 1) >= 0.9, dice(liver, result.labels == 1)  # measured 0.931
    assert dice(spleen, result.labels == 2) >= 0.93, dice(spleen, result.labels == 2)  # measured 0.981


def test_bad_input_is_refused_with_the_reason():
    phantom = abdomen()
    image = phantom.image
    seed = seeds_from_reference(organ(phantom, LIVER), 1)[0]
    assert_raises(InputError, region_grow, image, [], match="no seed")
    assert_raises(InputError, region_grow, image, [(5000.0, 0.0, 0.0)], match="outside the image")
    corner = image.TransformIndexToPhysicalPoint([1, 1, 10])
    assert_raises(InputError, region_grow, image, [corner], match="outside the body")
    assert_raises(InputError, region_grow, image, [seed], multiplier=-1, match="multiplier")
    assert_raises(InputError, region_grow, image, [seed], smoothing="bilateral", match="smoothing")
    flat = sitk.Extract(image, [image.GetSize()[0], image.GetSize()[1], 0], [0, 0, 10])
    assert_raises(InputError, region_grow, flat, [seed], match="2D")
    assert_raises(InputError, region_grow, sitk.Image([0, 0, 0], sitk.sitkInt16), [seed], match="empty")
    one_label = sitk.Cast(organ(phantom, LIVER), sitk.sitkUInt8)
    assert_raises(InputError, grow_from_seeds, image, one_label, match="at least two labels")
    assert_raises(InputError, grow_from_seeds, image, one_label * 0, match="no scribbles")
    other_grid = sitk.Image([10, 10, 10], sitk.sitkUInt8)
    assert_raises(InputError, grow_from_seeds, image, other_grid, match="not on the image grid")
    assert_raises(InputError, seeds_from_reference, one_label * 0, 3, match="empty")


def test_region_grow_totalsegmentator_liver_from_five_seeds(shared_data):
    """The project's goal: liver Dice >= 0.92 from <= 5 seeds on the real TotalSegmentator example (3 mm voxels;
    its model's labels as reference). Measured 0.935 with 3 or 5 seeds, for seed sets 0-4."""
    image, liver = totalsegmentator(shared_data)
    result = region_grow(image, seeds_from_reference(liver, 5, seed=0))
    assert_on_grid(result, image)
    assert dice(liver, result) >= 0.925, dice(liver, result)


def test_grow_from_seeds_totalsegmentator_liver(shared_data):
    """Scribbles on three planes only: the liver leaks a little where no background was painted (measured 0.885)."""
    image, liver = totalsegmentator(shared_data)
    result = grow_from_seeds(image, scribbles_from_reference(liver))
    assert dice(liver, result.labels == 1) >= 0.86, dice(liver, result.labels == 1)


def test_region_grow_on_a_three_slice_ct(shared_data):
    """dcmqi's 3-slice CT (0.8 mm, noisy): liver 1 in liver_spine_seg.nrrd; measured 0.92 from 3 seeds."""
    folder = shared_data / "dcmqi_ct3slice"
    image = read_image(folder / "ct")
    reference = sitk.ReadImage(str(folder / "liver_spine_seg.nrrd"))
    assert np.allclose(reference.GetOrigin(), image.GetOrigin(), atol=1e-3)
    reference.CopyInformation(image)
    liver = sitk.Cast(reference == 1, sitk.sitkUInt8)
    result = region_grow(image, seeds_from_reference(liver, 3))
    assert_on_grid(result, image)
    assert dice(liver, result) >= 0.9, dice(liver, result)
