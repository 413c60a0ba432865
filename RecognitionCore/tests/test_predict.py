"""A catalogue model end to end: preprocessing at the model's spacing, the RAS (I, J, K) network convention, and the
labels back on oblique and left-handed input grids. Direction-sensitive networks make any axis flip or swap fail."""

import numpy as np
import SimpleITK as sitk
import torch

from RecognitionCore.errors import Cancelled, InputError, ModelError
from RecognitionCore.models import ModelCard
from RecognitionCore.predict import (from_network_array, predict_labels, predict_nodules, predict_nodules_monai,
                                     to_network_array)
from RecognitionCore.progress import CancelToken, Progress
from RecognitionCore.testing import assert_raises
from RecognitionCore.tests.test_volumes import LEFT_HANDED, OBLIQUE, make_image

RAS_AXIS_NAMES = ("right", "anterior", "superior")


class IncreasesAlong(torch.nn.Module):
    """Label 1 where the (windowed) intensity increases along network axis ``axis`` (0: towards R, 1: A, 2: S)."""

    def __init__(self, axis: int):
        super().__init__()
        kernel = [1, 1, 1]
        kernel[axis] = 3
        self.difference = torch.nn.Conv3d(1, 1, kernel, padding=[k // 2 for k in kernel], bias=False)
        weights = torch.zeros(kernel)
        weights[(slice(None),) * axis + (0,)] = -1.0
        weights[(slice(None),) * axis + (2,)] = 1.0
        self.difference.weight.data[:] = weights

    def forward(self, x):
        gradient = self.difference(x)
        return torch.cat([torch.full_like(gradient, 0.05), gradient], dim=1)


def card(spacing_mm=(2.0, 2.0, 3.0)):
    return ModelCard(id="test", title="test", task="segmentation", labels={1: "edge"}, spacing_mm=spacing_mm,
                     intensity={"type": "window", "hu_min": -1000, "hu_max": 1000}, roi_size=(24, 24, 16))


def sphere_image(direction, radius_mm=14.0):
    """A bright sphere (+600 HU) in air, centred in an anisotropic grid of the given direction."""
    image = sitk.Image((40, 36, 20), sitk.sitkInt16)
    image.SetSpacing((1.5, 1.7, 2.5))
    image.SetDirection(np.asarray(direction, float).flatten().tolist())
    image.SetOrigin((-30.0, 20.0, -10.0))
    center = np.array(image.TransformContinuousIndexToPhysicalPoint([19.5, 17.5, 9.5]))
    k, j, i = np.indices(tuple(reversed(image.GetSize())))
    points = physical_points(image, i, j, k)
    inside = np.linalg.norm(points - center, axis=-1) < radius_mm
    array = np.where(inside, 600, -1000).astype(np.int16)
    result = sitk.GetImageFromArray(array)
    result.CopyInformation(image)
    return result, center


def physical_points(image, i, j, k):
    matrix = np.asarray(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    return np.stack([i, j, k], axis=-1) @ matrix.T + np.asarray(image.GetOrigin())


def test_network_array_is_monai_ras_order(tmp_path):
    from monai.transforms import LoadImage, Orientation

    image = make_image(LEFT_HANDED, dtype=np.float32)  # every voxel value encodes its index
    path = tmp_path / "image.nii.gz"
    sitk.WriteImage(image, str(path))
    monai_array = Orientation("RAS")(LoadImage(image_only=True, ensure_channel_first=True)(str(path)))[0].numpy()
    np.testing.assert_array_equal(to_network_array(image), monai_array)
    back = from_network_array(to_network_array(image), image)
    resampled = sitk.Resample(back, image, sitk.Transform(), sitk.sitkNearestNeighbor)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(resampled), sitk.GetArrayViewFromImage(image))


def test_labels_come_back_on_the_input_grid_on_the_right_side():
    for direction in (np.eye(3), OBLIQUE, LEFT_HANDED):
        image, center_lps = sphere_image(direction)
        for axis, name in enumerate(RAS_AXIS_NAMES):
            labels = predict_labels(image, card(), IncreasesAlong(axis), device="cpu")
            assert labels.GetSize() == image.GetSize() and labels.GetDirection() == image.GetDirection()
            assert labels.GetOrigin() == image.GetOrigin() and labels.GetSpacing() == image.GetSpacing()
            k, j, i = np.nonzero(sitk.GetArrayViewFromImage(labels) == 1)
            assert len(k) > 20, name
            center_ras = np.array([-1, -1, 1]) * center_lps
            edge_ras = np.array([-1, -1, 1]) * physical_points(image, i, j, k).mean(axis=0)
            # intensity rises towards +axis on the sphere's far side in -axis: the edge lies on the negative side
            assert edge_ras[axis] < center_ras[axis] - 5.0, (name, edge_ras, center_ras)
            others = [a for a in range(3) if a != axis]
            assert np.all(np.abs(edge_ras[others] - center_ras[others]) < 4.0), (name, edge_ras, center_ras)


def test_wrong_models_are_refused():
    image, _ = sphere_image(np.eye(3))
    detection = ModelCard(id="det", title="det", task="detection", labels={0: "nodule"}, roi_size=(8, 8, 8),
                          intensity={"type": "window", "hu_min": -1000, "hu_max": 400})
    assert_raises(ModelError, predict_labels, image, detection, IncreasesAlong(0), match="segmentation model")
    no_roi = ModelCard(id="x", title="x", task="segmentation", labels={1: "a"},
                       intensity={"type": "window", "hu_min": -1000, "hu_max": 400})
    assert_raises(ModelError, predict_labels, image, no_roi, IncreasesAlong(0), match="ROI size")


def test_bundle_style_zscore_matches_monai():
    """wholeBody_ct_segmentation's preprocessing: NormalizeIntensity(nonzero) then ScaleIntensity(-1, 1)."""
    from monai.transforms import NormalizeIntensity, ScaleIntensity

    from RecognitionCore.preprocessing import preprocess_for_model

    image, _ = sphere_image(OBLIQUE)
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    array[:, :, :5] = 0  # some exact zeros, which "nonzero" leaves out of the statistics and unchanged
    image_with_zeros = sitk.GetImageFromArray(array)
    image_with_zeros.CopyInformation(image)
    prepared, _ = preprocess_for_model(image_with_zeros, None, {"type": "zscore", "nonzero": True,
                                                                "out_min": -1.0, "out_max": 1.0})
    expected = ScaleIntensity(minv=-1.0, maxv=1.0)(NormalizeIntensity(nonzero=True)(torch.as_tensor(array)))
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(prepared), np.asarray(expected), atol=1e-5)


# --- nodule detection: our windows against MONAI's SlidingWindowInferer ----------------------------------------------

def detection_card():
    return ModelCard(id="det", title="det", task="detection", labels={0: "nodule"}, spacing_mm=(3.0, 3.0, 3.0),
                     intensity={"type": "window", "hu_min": -1000, "hu_max": 400}, roi_size=(32, 32, 16))


def tiny_detector(**overrides):
    """The tiny RetinaNet with a spread of classification logits (untrained, every anchor would score ~0.01)."""
    from RecognitionCore.networks import NoduleDetector

    torch.manual_seed(0)
    network = NoduleDetector.build({"config": "tiny", **overrides}).eval()
    torch.nn.init.normal_(network.classification_head.cls_logits.weight, std=0.3)
    return network


def random_ct(size_ijk, seed=0):
    """Lung-like noise with bright blobs on the detection card's grid (3 mm, axis-aligned LPS)."""
    rng = np.random.default_rng(seed)
    array = rng.normal(-800.0, 150.0, size_ijk[::-1])
    for _ in range(6):
        centre = rng.uniform(0, 1, 3) * np.array(size_ijk[::-1])
        k, j, i = np.indices(array.shape)
        array[np.linalg.norm(np.stack([k, j, i], -1) - centre, axis=-1) < rng.uniform(1.5, 4.0)] = 40.0
    image = sitk.GetImageFromArray(array.astype(np.int16))
    image.SetSpacing((3.0, 3.0, 3.0))
    image.SetOrigin((-50.0, -40.0, 10.0))
    return image


class WindowCounter:
    """Counts the windows the network's feature extractor sees."""

    def __init__(self, network):
        self.count = 0
        self.handle = network.feature_extractor.register_forward_pre_hook(self._seen)

    def _seen(self, module, inputs):
        self.count += inputs[0].shape[0]


def assert_same_nodules(ours, reference, rtol=1e-5):
    assert len(ours) == len(reference), (len(ours), len(reference))
    for (center, diameter, score), (center_ref, diameter_ref, score_ref) in zip(ours, reference):
        np.testing.assert_allclose(center, center_ref, atol=1e-3)
        np.testing.assert_allclose([diameter, score], [diameter_ref, score_ref], rtol=rtol, atol=1e-6)


def test_windowed_detection_gives_the_boxes_of_monai_sliding_window_inference():
    """Same windows, padding, blending and box selection as RetinaNetDetector + SlidingWindowInferer: several windows
    with one axis smaller than the ROI (MONAI pads it symmetrically), and an image that fits in one window."""
    network = tiny_detector()
    for size_ijk in ((64, 14, 40), (24, 20, 12)):
        image = random_ct(size_ijk)
        reference = predict_nodules_monai(image, detection_card(), network, device="cpu")
        assert len(reference) >= 5, (size_ijk, len(reference))
        assert_same_nodules(predict_nodules(image, detection_card(), network, device="cpu", windows_per_pass=1),
                            reference, rtol=1e-6)
        # several windows per pass: other convolution kernels, the same boxes to rounding
        assert_same_nodules(predict_nodules(image, detection_card(), network, device="cpu", windows_per_pass=3),
                            reference, rtol=1e-4)


def test_windows_outside_the_roi_mask_are_skipped_and_boxes_inside_it_are_unchanged():
    # No NMS and no caps, so that boxes outside the ROI cannot change which boxes inside it are kept; boxes equal to
    # their anchors, so that a box inside the ROI is an anchor inside it.
    network = tiny_detector(score_thresh=0.8, nms_thresh=1.0, topk_candidates_per_level=100000,
                            detections_per_image=100000)
    torch.nn.init.zeros_(network.regression_head.bbox_reg.weight)
    image = random_ct((64, 64, 40), seed=1)
    roi = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    roi.CopyInformation(image)
    roi[40:56, 6:20, 4:14] = 1
    counter = WindowCounter(network)
    whole = predict_nodules(image, detection_card(), network, device="cpu")
    windows_whole, counter.count = counter.count, 0
    inside_only = predict_nodules(image, detection_card(), network, device="cpu", roi_mask=roi)
    counter.handle.remove()
    assert windows_whole == 27 and counter.count == 4, (windows_whole, counter.count)

    def inside(nodules):
        return [row for row in nodules if roi[roi.TransformPhysicalPointToIndex(row[0])]]

    assert len(inside(whole)) >= 5 and len(inside_only) < len(whole) / 2, (len(inside(whole)), len(inside_only))
    assert_same_nodules(inside(inside_only), inside(whole), rtol=1e-4)
    empty = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(image)
    assert predict_nodules(image, detection_card(), network, device="cpu", roi_mask=empty) == []


def test_detection_reports_windows_and_can_be_cancelled():
    image = random_ct((64, 14, 40))
    messages, token = [], CancelToken()

    def callback(fraction, message):
        messages.append((fraction, message))
        if "window 1 of" in message:
            token.cancel()

    assert_raises(Cancelled, predict_nodules, image, detection_card(), tiny_detector(), device="cpu",
                  progress=Progress(callback, token), windows_per_pass=1)
    assert messages[-1][1].startswith("Detecting nodules: window 1 of 9"), messages
    assert_raises(InputError, predict_nodules, image, detection_card(), tiny_detector(), windows_per_pass=0,
                  match="window")
    other_grid = sitk.Image((8, 8, 8), sitk.sitkUInt8)
    assert_raises(InputError, predict_nodules, image, detection_card(), tiny_detector(), roi_mask=other_grid,
                  match="ROI mask")
