"""MONAI training/validation transforms on small synthetic (C, z, y, x) samples."""

import numpy as np
import torch

from RecognitionCore.augmentation import AugmentationSettings, training_transforms, validation_transforms
from RecognitionCore.errors import InputError
from RecognitionCore.testing import assert_raises

ALWAYS_SPATIAL = AugmentationSettings(flip_prob=1.0, rotation_prob=1.0, zoom_prob=1.0, intensity_prob=0.0,
                                      noise_prob=0.0, smooth_prob=0.0)


def _sphere_sample(shape=(48, 48, 48), center=(24, 28, 20), radius=10.0):
    """A bright sphere (1.0 on 0.0) off-centre, and its label."""
    k, j, i = np.indices(shape)
    inside = (k - center[0]) ** 2 + (j - center[1]) ** 2 + (i - center[2]) ** 2 <= radius ** 2
    image = inside[None].astype(np.float32)
    return {"image": image, "label": image.copy()}


def _as_numpy(value):
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def test_training_transforms_are_deterministic_for_a_seed():
    sample = _sphere_sample()
    runs = [training_transforms((16, 16, 16), num_samples=3, seed=seed)(dict(sample)) for seed in (7, 7, 8)]
    for first, second in zip(runs[0], runs[1]):
        assert np.array_equal(_as_numpy(first["image"]), _as_numpy(second["image"]))
        assert np.array_equal(_as_numpy(first["label"]), _as_numpy(second["label"]))
    assert any(not np.array_equal(_as_numpy(a["image"]), _as_numpy(b["image"])) for a, b in zip(runs[0], runs[2]))


def test_outputs_have_roi_size_even_from_a_smaller_image():
    sample = _sphere_sample(shape=(12, 40, 40), center=(6, 20, 20), radius=5.0)
    roi = (16, 24, 20)
    outputs = training_transforms(roi, num_samples=4, seed=0)(sample)
    assert len(outputs) == 4
    for output in outputs:
        assert tuple(output["image"].shape) == (1,) + roi and tuple(output["label"].shape) == (1,) + roi
        assert output["image"].dtype == torch.float32


def test_label_stays_aligned_with_the_image_after_flips_rotations_and_zoom():
    sample = _sphere_sample()
    for seed in range(3):
        for output in training_transforms((32, 32, 32), num_samples=3, pos=1, neg=0, seed=seed,
                                          settings=ALWAYS_SPATIAL)(dict(sample)):
            bright = _as_numpy(output["image"])[0] > 0.5
            label = _as_numpy(output["label"])[0] > 0.5
            dice = 2.0 * (bright & label).sum() / (bright.sum() + label.sum())
            assert dice > 0.93, dice  # nearest vs linear interpolation differ on the surface only
            shift = np.argwhere(bright).mean(axis=0) - np.argwhere(label).mean(axis=0)
            assert np.linalg.norm(shift) < 0.5, shift  # a half-voxel offset (torch's plain "nearest") fails this


def test_crops_contain_positives_at_the_configured_ratio():
    image = np.zeros((1, 64, 64, 64), dtype=np.float32)
    image[0, 40:42, 20:22, 30:32] = 1.0
    sample = {"image": image, "label": image.copy()}
    only_positive = training_transforms((8, 8, 8), num_samples=20, pos=1, neg=0, seed=0)(dict(sample))
    assert all(_as_numpy(output["label"]).any() for output in only_positive)
    mixed = training_transforms((8, 8, 8), num_samples=120, pos=1, neg=3, seed=0)(dict(sample))
    positive_fraction = np.mean([_as_numpy(output["label"]).any() for output in mixed])
    assert 0.15 < positive_fraction < 0.35, positive_fraction  # expected 1 / (1 + 3)


def test_validation_transforms_keep_the_data_and_accept_a_missing_label():
    sample = _sphere_sample(shape=(10, 12, 14), center=(5, 6, 7), radius=3.0)
    output = validation_transforms()(dict(sample))
    assert isinstance(output["image"], torch.Tensor)
    assert np.array_equal(_as_numpy(output["image"]), sample["image"])
    assert np.array_equal(_as_numpy(output["label"]), sample["label"])
    image_only = validation_transforms()({"image": sample["image"]})
    assert set(image_only) == {"image"} and tuple(image_only["image"].shape) == (1, 10, 12, 14)


def test_training_transforms_reject_bad_settings():
    assert_raises(InputError, training_transforms, (16, 16), match="roi_size")
    assert_raises(InputError, training_transforms, (16, 16, 16), 0, match="num_samples")
    assert_raises(InputError, training_transforms, (16, 16, 16), 2, 0, 0, match="pos and neg")
    assert_raises(InputError, training_transforms, (16, 16, 16), settings=AugmentationSettings(flip_axes=(3,)),
                  match="flip axes")
