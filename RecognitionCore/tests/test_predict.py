"""A catalogue model end to end: preprocessing at the model's spacing, the RAS (I, J, K) network convention, and the
labels back on oblique and left-handed input grids. Direction-sensitive networks make any axis flip or swap fail."""

import numpy as np
import SimpleITK as sitk
import torch

from RecognitionCore.errors import ModelError
from RecognitionCore.models import ModelCard
from RecognitionCore.predict import from_network_array, predict_labels, to_network_array
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
