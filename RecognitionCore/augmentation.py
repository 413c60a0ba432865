"""MONAI dictionary transforms for training and validating 3D CT models on {"image", "label"} samples.

Samples are what networks receive (``predict.to_network_array``): channel-first arrays or MetaTensors of shape
(C, I, J, K) of a preprocessed image reoriented to RAS. So spatial axis 0 runs right (left-right), axis 1 anterior,
axis 2 superior; axes 0 and 1 span the axial plane. Only transforms that need neither torchvision nor itk are used. Every random transform is seeded through ``Compose.set_random_state``, so a
pipeline built with the same seed gives the same samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
from monai.transforms import (
    Compose,
    EnsureTyped,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandRotated,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandZoomd,
    SpatialPadd,
)

from .errors import InputError

KEYS = ("image", "label")


@dataclass(frozen=True)
class AugmentationSettings:
    """Probabilities and ranges of the random transforms (rotations in radians, smoothing sigma in voxels).

    ``flip_axes`` are spatial axes (0 left-right, 1 anterior-posterior, 2 superior-inferior): leave 0 out when the
    labels tell left from right (left and right kidney, lung lobes), since a left-right flip would swap their meaning.
    """

    flip_axes: Tuple[int, ...] = (0, 1, 2)
    flip_prob: float = 0.5
    axial_rotation_rad: float = np.pi / 12
    tilt_rotation_rad: float = np.pi / 36
    rotation_prob: float = 0.2
    zoom_range: Tuple[float, float] = (0.9, 1.1)
    zoom_prob: float = 0.2
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1
    intensity_prob: float = 0.5
    noise_std: float = 0.01
    noise_prob: float = 0.15
    smooth_sigma_voxels: Tuple[float, float] = (0.5, 1.0)
    smooth_prob: float = 0.1


def training_transforms(roi_size: Sequence[int], num_samples: int = 4, pos: float = 1.0, neg: float = 1.0,
                        seed: int = 0, settings: Optional[AugmentationSettings] = None) -> Compose:
    """Pad to ``roi_size``, take ``num_samples`` crops centred on a label voxel with ratio pos:neg, then random flips,
    small rotations (mostly in the axial plane), zoom, intensity scale/shift, Gaussian noise and smoothing.

    Called on one sample dict, it returns a list of ``num_samples`` dicts whose arrays have spatial shape
    ``roi_size``. The image is interpolated linearly, the label by nearest neighbour ("nearest-exact" for zoom:
    torch's plain "nearest" is shifted by up to half a voxel), and both are padded by replicating their border, so
    they stay aligned.
    """
    roi_size = _check_roi_size(roi_size)
    if num_samples < 1:
        raise InputError(f"num_samples must be >= 1 (got {num_samples})")
    if pos < 0 or neg < 0 or pos + neg == 0:
        raise InputError(f"pos and neg must be >= 0 and not both 0 (got pos={pos}, neg={neg})")
    settings = settings or AugmentationSettings()
    if any(axis not in (0, 1, 2) for axis in settings.flip_axes):
        raise InputError(f"flip axes must be spatial axes 0, 1 or 2 (got {settings.flip_axes})")
    keys = list(KEYS)
    transforms = [
        EnsureTyped(keys=keys),
        SpatialPadd(keys=keys, spatial_size=roi_size, mode="constant"),
        RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=roi_size, pos=pos, neg=neg,
                               num_samples=num_samples),
    ]
    transforms += [RandFlipd(keys=keys, prob=settings.flip_prob, spatial_axis=axis) for axis in settings.flip_axes]
    transforms += [
        # MONAI's range_z turns within the plane of the first two spatial axes: the axial plane for (I, J, K).
        RandRotated(keys=keys, range_x=settings.tilt_rotation_rad, range_y=settings.tilt_rotation_rad,
                    range_z=settings.axial_rotation_rad, prob=settings.rotation_prob, keep_size=True,
                    mode=("bilinear", "nearest"), padding_mode="border"),
        RandZoomd(keys=keys, min_zoom=settings.zoom_range[0], max_zoom=settings.zoom_range[1],
                  prob=settings.zoom_prob, keep_size=True, mode=("trilinear", "nearest-exact"),
                  padding_mode="edge"),
        RandScaleIntensityd(keys="image", factors=settings.intensity_scale, prob=settings.intensity_prob),
        RandShiftIntensityd(keys="image", offsets=settings.intensity_shift, prob=settings.intensity_prob),
        RandGaussianNoised(keys="image", std=settings.noise_std, prob=settings.noise_prob),
        RandGaussianSmoothd(keys="image", sigma_x=settings.smooth_sigma_voxels,
                            sigma_y=settings.smooth_sigma_voxels, sigma_z=settings.smooth_sigma_voxels,
                            prob=settings.smooth_prob),
    ]
    pipeline = Compose(transforms)
    pipeline.set_random_state(seed=seed)
    return pipeline


def validation_transforms() -> Compose:
    """No randomness: the whole preprocessed volume as tensors (sliding-window inference does the tiling);
    the label is optional."""
    return Compose([EnsureTyped(keys=list(KEYS), allow_missing_keys=True)])


def _check_roi_size(roi_size: Sequence[int]) -> Tuple[int, ...]:
    size = tuple(int(s) for s in roi_size)
    if len(size) != 3 or min(size) < 1:
        raise InputError(f"roi_size must be 3 positive voxel counts (I, J, K), got {tuple(roi_size)}")
    return size
