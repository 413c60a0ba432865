"""Preprocessing on small synthetic SimpleITK images (exact geometry) and on the real CT in shared data."""

import math

import numpy as np
import SimpleITK as sitk

from RecognitionCore import preprocessing as pp
from RecognitionCore.errors import InputError, ModelError
from RecognitionCore.testing import assert_raises


def _image(array, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    return image


def _oblique_direction():
    """A rotation of 30 degrees about z followed by 10 degrees about x."""
    a, b = math.radians(30), math.radians(10)
    about_z = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    about_x = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return tuple((about_x @ about_z).ravel())


def _cube_image(direction=None):
    """-1000 HU air with a +1000 HU cube over voxels x 10..19, y 8..15, z 4..7 (spacing 1 x 1 x 2.5 mm)."""
    array = np.full((16, 30, 40), -1000.0, dtype=np.float32)
    array[4:8, 8:16, 10:20] = 1000.0
    return _image(array, spacing=(1.0, 1.0, 2.5), origin=(-20.0, 35.5, 100.0), direction=direction)


def _bright_centroid_lps(image, threshold=0.0):
    """Intensity-weighted physical centroid of the voxels above ``threshold``."""
    array = sitk.GetArrayFromImage(image).astype(np.float64)
    weights = np.clip(array - array.min(), 0, None) * (array > threshold)
    k, j, i = np.indices(array.shape)
    index = [float((weights * c).sum() / weights.sum()) for c in (i, j, k)]
    return np.array(image.TransformContinuousIndexToPhysicalPoint(index))


def _corner_lps(image):
    """Physical position of the outer corner of the first voxel."""
    return np.array(image.TransformContinuousIndexToPhysicalPoint([-0.5] * image.GetDimension()))


def test_resample_to_spacing_keeps_extent_and_feature_position():
    for direction in (None, _oblique_direction()):
        image = _cube_image(direction)
        resampled = pp.resample_to_spacing(image, 1.5)
        assert resampled.GetSize() == (27, 20, 27)  # ceil(40/1.5), ceil(30/1.5), ceil(40/1.5)
        assert np.allclose(resampled.GetSpacing(), (1.5, 1.5, 1.5))
        assert np.allclose(resampled.GetDirection(), image.GetDirection())
        assert np.allclose(_corner_lps(resampled), _corner_lps(image), atol=1e-6)
        cube_center = np.array(image.TransformContinuousIndexToPhysicalPoint([14.5, 11.5, 5.5]))
        assert np.linalg.norm(_bright_centroid_lps(resampled) - cube_center) < 0.75  # half an output voxel
        assert resampled.GetPixelID() == sitk.sitkFloat32
        assert float(sitk.GetArrayViewFromImage(resampled).min()) == -1000.0


def test_resample_anisotropic_spacing_and_bad_arguments():
    image = _cube_image()
    resampled = pp.resample_to_spacing(image, (2.0, 0.5, 5.0), "bspline")
    assert resampled.GetSize() == (20, 60, 8)
    assert np.allclose(_corner_lps(resampled), _corner_lps(image))
    assert_raises(InputError, pp.resample_to_spacing, image, (1.0, 1.0), match="spacing")
    assert_raises(InputError, pp.resample_to_spacing, image, 0.0, match="positive")
    assert_raises(InputError, pp.resample_to_spacing, image, 1.0, "cubic", match="interpolator")


def test_label_round_trip_through_coarser_and_finer_grids_is_exact():
    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 5, size=(6, 7, 8), dtype=np.uint8)
    labels = np.kron(blocks, np.ones((2, 2, 2), dtype=np.uint8))  # 2x2x2 blocks aligned on even indices
    for direction in (None, _oblique_direction()):
        image = _image(labels, spacing=(0.8, 0.8, 1.25), origin=(5.0, -7.0, 3.0), direction=direction)
        for spacing in ((1.6, 1.6, 2.5), (0.4, 0.4, 0.625)):
            moved = pp.resample_to_spacing(image, spacing, "nearest")
            assert moved.GetPixelID() == sitk.sitkUInt8
            back = pp.resample_to_reference(moved, image, "nearest")
            assert np.array_equal(sitk.GetArrayViewFromImage(back), labels), spacing


def test_window_clip_and_padding_values_are_exact():
    array = np.array([-3024, -2048, -1024, -300, 0, 400, 1000, 3000], dtype=np.int16).reshape(2, 2, 2)
    image = _image(array)
    unit = sitk.GetArrayFromImage(pp.window_to_unit(image, -1024, 400))
    expected = np.clip((array.astype(np.float64) + 1024) / 1424, 0, 1)
    assert np.allclose(unit, expected, atol=1e-6)
    unclipped = sitk.GetArrayFromImage(pp.window_to_unit(image, -1000, 1000, out_min=-1, out_max=1, clip=False))
    assert np.allclose(unclipped, array / 1000.0, atol=1e-6)
    clipped = sitk.GetArrayFromImage(pp.clip_hu(image, -1000, 1000))
    assert np.array_equal(clipped, np.clip(array, -1000, 1000))
    unpadded = sitk.GetArrayFromImage(pp.replace_padding(image))
    assert np.array_equal(unpadded, np.maximum(array, -1024))
    assert pp.replace_padding(image).GetPixelID() == sitk.sitkInt16
    assert np.array_equal(sitk.GetArrayViewFromImage(image), array)  # the input is untouched
    assert pp.window_center_width_to_range(-600, 1500) == pp.HU_WINDOWS["lung"] == (-1350.0, 150.0)
    assert_raises(InputError, pp.window_to_unit, image, 400, -1024, match="maximum must exceed")
    assert_raises(InputError, pp.window_center_width_to_range, 40, 0, match="width")


def test_zscore_has_zero_mean_and_unit_std_inside_the_mask():
    rng = np.random.default_rng(0)
    array = np.full((10, 12, 14), -2048.0, dtype=np.float32)
    array[2:8, 3:9, 4:10] = rng.normal(40.0, 15.0, size=(6, 6, 6))
    mask_array = np.zeros(array.shape, dtype=np.uint8)
    mask_array[2:8, 3:9, 4:10] = 1
    image = _image(array, spacing=(0.7, 0.7, 2.0))
    mask = _image(mask_array, spacing=(0.7, 0.7, 2.0))
    normalised = sitk.GetArrayFromImage(pp.zscore_normalise(image, mask))
    inside = normalised[mask_array == 1]
    assert abs(inside.mean()) < 1e-5 and abs(inside.std() - 1.0) < 1e-5
    whole = sitk.GetArrayFromImage(pp.zscore_normalise(image))
    assert abs(whole.mean()) < 1e-5 and abs(whole.std() - 1.0) < 1e-5
    assert_raises(InputError, pp.zscore_normalise, image, _image(np.zeros_like(mask_array), (0.7, 0.7, 2.0)),
                  match="empty")
    assert_raises(InputError, pp.zscore_normalise, image, _image(mask_array), match="not on the image grid")


def test_denoise_reduces_noise_and_keeps_the_edge():
    rng = np.random.default_rng(1)
    clean = np.zeros((12, 32, 32), dtype=np.float32)
    clean[:, :, 16:] = 400.0
    noisy = _image(clean + rng.normal(0, 40.0, clean.shape).astype(np.float32), spacing=(0.8, 0.8, 2.0))
    flat = (slice(2, 10), slice(4, 28), slice(2, 11))
    noise_before = sitk.GetArrayViewFromImage(noisy)[flat].std()
    for method, options in (("median", {}), ("gaussian", {"sigma_mm": 1.0}),
                            ("curvature_anisotropic", {"iterations": 5})):
        result = sitk.GetArrayFromImage(pp.denoise(noisy, method, **options))
        assert result[flat].std() < 0.7 * noise_before, method
        step = result[2:10, 4:28, 18:30].mean() - result[2:10, 4:28, 2:14].mean()
        assert step > 0.9 * 400.0, (method, step)
        profile = result[2:10, 4:28, :].mean(axis=(0, 1))
        assert profile[14] < 200.0 < profile[17], (method, profile[13:19])  # edge stays between x 15 and 16
    assert pp.denoise(noisy, "gaussian").GetPixelID() == sitk.sitkFloat32
    assert_raises(InputError, pp.denoise, noisy, "curvature_anisotropic", time_step=0.2, match="unstable")
    assert_raises(InputError, pp.denoise, noisy, "bilateral", match="unknown denoising method")


def _chest_phantom():
    """Axial ellipse body (40 HU) with two lungs (-850 HU), lying on a 3 mm table (300 HU) that touches it, in air
    (-1000 HU) with -2048 padding outside a scan circle; 1 x 1 x 2 mm voxels."""
    shape = (24, 96, 96)
    k, j, i = np.indices(shape)
    array = np.full(shape, -1000.0, dtype=np.float32)
    body = ((i - 48) / 36.0) ** 2 + ((j - 44) / 26.0) ** 2 <= 1.0
    array[body] = 40.0
    for lung_x in (33, 63):
        lung = (((i - lung_x) / 10.0) ** 2 + ((j - 42) / 14.0) ** 2 + ((k - 12) / 9.0) ** 2) <= 1.0
        array[lung] = -850.0
    table = (j >= 70) & (j < 73) & (i >= 4) & (i < 92)
    array[table] = 300.0
    array[(i - 47.5) ** 2 + (j - 47.5) ** 2 > 47.5 ** 2] = -2048.0
    return _image(array, spacing=(1.0, 1.0, 2.0), origin=(-48.0, -60.0, 10.0)), body, table


def test_body_mask_ignores_the_table_and_fills_the_lungs():
    image, body, table = _chest_phantom()
    mask = pp.body_mask(image)
    assert mask.GetPixelID() == sitk.sitkUInt8
    assert mask.GetOrigin() == image.GetOrigin() and mask.GetSpacing() == image.GetSpacing()
    values = sitk.GetArrayViewFromImage(mask) == 1
    assert (values & body).sum() / body.sum() > 0.99  # lungs filled
    assert (values & ~body & ~table).sum() == 0
    i = np.indices(table.shape)[2]
    assert not values[table & ((i < 28) | (i > 68))].any()  # the table away from the contact (x 38..58) is left out
    assert values[table].sum() < 0.25 * table.sum()
    lungs = sitk.GetArrayFromImage(pp.lung_mask_coarse(image, mask)) == 1
    assert lungs.sum() > 0 and np.all(sitk.GetArrayViewFromImage(image)[lungs] == -850.0)
    box = pp.bounding_box(pp.lung_mask_coarse(image))
    assert box.index[0] <= 24 and box.stop[0] >= 73  # both lungs (x 23..43 and 53..73)
    air = _image(np.full((8, 16, 16), -1000.0, dtype=np.float32))
    assert_raises(InputError, pp.body_mask, air, match="no body found above -500 HU")
    solid = _image(np.full((8, 40, 40), 40.0, dtype=np.float32))
    solid_body = pp.body_mask(solid, table_opening_mm=2.0)
    assert_raises(InputError, pp.lung_mask_coarse, solid, solid_body, match="no air")


def test_body_mask_ball_opening_equals_thresholded_distance_maps():
    """The fast erosion and dilation of body_mask are exactly "distance to the background > r" and "distance to the
    mask <= r" in mm, also for anisotropic voxels and at the image border."""
    rng = np.random.default_rng(5)
    for spacing, radius_mm in (((0.7, 0.7, 2.5), 3.0), ((1.0, 1.3, 0.6), 2.0), ((2.0, 2.0, 2.0), 2.0)):
        mask = np.kron(rng.random((4, 5, 6)) > 0.4, np.ones((4, 5, 5), dtype=bool))
        eroded = _distance_mm_to(~mask, spacing) > radius_mm
        dilated = _distance_mm_to(mask, spacing) <= radius_mm
        assert eroded.any() and not np.array_equal(eroded, mask) and not np.array_equal(dilated, mask)
        assert np.array_equal(pp._ball_morphology(mask, spacing, radius_mm, erode=True), eroded), spacing
        assert np.array_equal(pp._ball_morphology(mask, spacing, radius_mm, erode=False), dilated), spacing


def _distance_mm_to(mask, spacing):
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.SetSpacing(spacing)
    return sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False,
                                                               useImageSpacing=True))


def test_bounding_box_crop_uncrop_round_trip_in_place():
    rng = np.random.default_rng(2)
    array = rng.integers(-1000, 1000, size=(10, 20, 30)).astype(np.int16)
    image = _image(array, spacing=(0.7, 0.9, 2.5), origin=(12.0, -4.0, 50.0), direction=_oblique_direction())
    mask_array = np.zeros(array.shape, dtype=np.uint8)
    mask_array[3:6, 5:9, 10:20] = 1
    mask = _image(mask_array, spacing=(0.7, 0.9, 2.5))
    mask.CopyInformation(image)
    box = pp.bounding_box(mask, margin_mm=(1.4, 1.0, 2.5))
    assert box.index == (8, 3, 2) and box.size == (14, 8, 5)  # margins of 2, 2 and 1 voxels
    cropped = pp.crop(image, box)
    assert cropped.GetSize() == box.size
    assert np.allclose(cropped.TransformIndexToPhysicalPoint((0, 0, 0)), image.TransformIndexToPhysicalPoint(box.index))
    assert np.allclose(cropped.TransformIndexToPhysicalPoint((13, 7, 4)),
                       image.TransformIndexToPhysicalPoint((21, 10, 6)))
    assert np.array_equal(sitk.GetArrayViewFromImage(cropped), array[2:7, 3:11, 8:22])
    restored = pp.uncrop(cropped, image, box, fill=-1024)
    restored_array = sitk.GetArrayViewFromImage(restored)
    assert restored.GetPixelID() == sitk.sitkInt16 and np.allclose(restored.GetDirection(), image.GetDirection())
    assert np.array_equal(restored_array[2:7, 3:11, 8:22], array[2:7, 3:11, 8:22])
    outside = np.ones(array.shape, dtype=bool)
    outside[2:7, 3:11, 8:22] = False
    assert np.all(restored_array[outside] == -1024)
    assert np.array_equal(sitk.GetArrayFromImage(pp.crop(restored, box)), sitk.GetArrayViewFromImage(cropped))
    clipped = pp.bounding_box(mask, margin_mm=100.0)
    assert clipped.index == (0, 0, 0) and clipped.size == image.GetSize()
    assert_raises(InputError, pp.bounding_box, _image(np.zeros((4, 4, 4), np.uint8)), match="empty")
    assert_raises(InputError, pp.crop, image, pp.BoundingBox((25, 0, 0), (10, 5, 5)), match="does not fit")
    assert_raises(InputError, pp.uncrop, cropped, image, pp.BoundingBox((0, 0, 0), box.size), match="not the box")


def test_validate_ct_accepts_a_ct_and_reports_warnings():
    image, _, _ = _chest_phantom()
    report = pp.validate_ct(image)
    assert report.size == (96, 96, 24) and report.hu_min == -2048.0 and report.hu_max == 300.0
    assert any("padding" in warning for warning in report.warnings)
    thick_array = np.full((10, 10, 10), -1000.0, dtype=np.float32)
    thick_array[5, 5, 5] = 40.0
    thick = _image(thick_array, spacing=(0.8, 0.8, 7.5))
    assert any("thick slices" in warning for warning in pp.validate_ct(thick).warnings)
    as_float = pp.to_float32(sitk.Cast(image, sitk.sitkInt16))
    assert as_float.GetPixelID() == sitk.sitkFloat32 and as_float.GetOrigin() == image.GetOrigin()


def test_validate_ct_rejects_each_bad_input_naming_the_problem():
    ct = np.full((10, 10, 10), -1000.0, dtype=np.float32)
    ct[3:7, 3:7, 3:7] = 50.0
    with_nan = ct.copy()
    with_nan[0, 0, :3] = np.nan
    with_nan[1, 1, 1] = np.inf
    mr_like = np.linspace(0, 4000, 1000, dtype=np.float32).reshape(10, 10, 10)
    cases = [
        (sitk.GetImageFromArray(ct[0]), "2D"),
        (_image(ct[:1]), "single 2D slice"),
        (sitk.Image([0, 0, 0], sitk.sitkFloat32), "empty"),
        (_image(np.full((10, 10, 10), 40.0, dtype=np.float32)), "constant"),
        (_image(with_nan), "3 NaN and 1 infinite"),
        (_image(ct, spacing=(1.0, 1.0, 25.0)), "implausible"),
        (_image(ct, spacing=(0.01, 1.0, 1.0)), "implausible"),
        (_image(mr_like), "does not look like a CT in Hounsfield units (range 0..4000"),
        (_image(ct[:4]), "too small"),
        (sitk.Compose([_image(ct), _image(ct), _image(ct)]), "components"),
    ]
    for image, message in cases:
        assert_raises(InputError, pp.validate_ct, image, match=message)
    assert_raises(InputError, pp.validate_ct, ct, match="SimpleITK image")


def test_preprocess_for_model_and_restore_to_input_are_exact_in_geometry():
    image = _cube_image(_oblique_direction())
    window = {"type": "window", "hu_min": -1024, "hu_max": 400, "out_min": 0, "out_max": 1, "clip": True}
    prepared, inverse = pp.preprocess_for_model(image, 2.0, window)
    assert prepared.GetPixelID() == sitk.sitkFloat32 and np.allclose(prepared.GetSpacing(), (2.0, 2.0, 2.0))
    assert np.allclose(_corner_lps(prepared), _corner_lps(image))
    values = sitk.GetArrayViewFromImage(prepared)
    assert values.min() >= 0.0 and values.max() == 1.0
    assert abs(values.min() - 24.0 / 1424.0) < 1e-6  # -1000 HU
    label = sitk.Cast(sitk.BinaryThreshold(prepared, 0.5, 2.0), sitk.sitkUInt8)
    restored = pp.restore_to_input(label, inverse, "nearest")
    assert restored.GetSize() == image.GetSize() and restored.GetOrigin() == image.GetOrigin()
    assert restored.GetDirection() == image.GetDirection()
    truth = sitk.GetArrayViewFromImage(image) > 0
    found = sitk.GetArrayViewFromImage(restored) == 1
    assert (truth & found).sum() / (truth | found).sum() > 0.6  # a 2 mm model grid over a 10 x 8 x 10 mm cube
    assert np.linalg.norm(_bright_centroid_lps(sitk.Cast(restored, sitk.sitkFloat32), 0.5)
                          - _bright_centroid_lps(image)) < 1.0
    zscored, _ = pp.preprocess_for_model(image, None, {"type": "zscore"})
    assert zscored.GetSize() == image.GetSize()
    assert abs(sitk.GetArrayViewFromImage(zscored).mean()) < 1e-5
    fixed, _ = pp.preprocess_for_model(image, None, {"type": "zscore", "hu_min": -500, "hu_max": 500,
                                                     "mean": 100.0, "std": 50.0})
    assert np.allclose(np.unique(sitk.GetArrayViewFromImage(fixed)), [-12.0, 8.0])
    for spec, message in (({"type": "minmax"}, "unknown intensity"), ({"type": "window", "hu_min": 0}, "hu_max"),
                          ({"type": "window", "hu_min": 0, "hu_max": 1, "gamma": 2}, "unknown keys"),
                          ({"type": "zscore", "mean": 1.0}, "both"), ("window", "dict")):
        assert_raises(ModelError, pp.preprocess_for_model, image, 2.0, spec, match=message)


def test_validate_ct_on_real_ct_and_rejects_a_single_dicom_slice(shared_data):
    report = pp.validate_ct(sitk.ReadImage(str(shared_data / "totalsegmentator" / "example_ct.nii.gz")))
    assert report.size == (122, 101, 112) and report.hu_min < -900
    single = sitk.ReadImage(str(shared_data / "single_slice" / "lidc_slice.dcm"))
    assert_raises(InputError, pp.validate_ct, single, match="single 2D slice")


def test_body_and_coarse_lung_masks_on_a_real_chest_ct(shared_data):
    full = sitk.ReadImage(str(shared_data / "lidc" / "LIDC-IDRI-0003.nrrd"))
    image = sitk.BinShrink(full, [2, 2, 2])  # 256 x 256 x 70 at 1.64 x 1.64 x 5 mm keeps the test fast
    body = pp.body_mask(image)
    body_ml = sitk.GetArrayViewFromImage(body).sum() * np.prod(image.GetSpacing()) / 1000.0
    assert 15000 < body_ml < 40000, body_ml
    body_box = pp.bounding_box(body)
    assert body_box.stop[1] < 230  # the back is at y ~ 227; the table (y ~ 232..245 of 256) is left out
    lungs = pp.lung_mask_coarse(image, body)
    lung_ml = sitk.GetArrayViewFromImage(lungs).sum() * np.prod(image.GetSpacing()) / 1000.0
    assert 2500 < lung_ml < 8000, lung_ml
    box = pp.bounding_box(lungs, margin_mm=10.0)
    lung_extent_mm = np.array(box.size) * np.array(image.GetSpacing())
    assert 250 < lung_extent_mm[0] < 380 and 150 < lung_extent_mm[1] < 260 and lung_extent_mm[2] > 250
    cropped = pp.crop(image, box)
    assert np.allclose(cropped.GetOrigin(), image.TransformIndexToPhysicalPoint(box.index))
