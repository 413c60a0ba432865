"""A dense nodule map: a small 3D U-Net that scores every voxel of the lungs as a nodule's centre, the candidate
source for the small nodules the blob filter does not reach.

Why: a 3-5 mm nodule on 2.5 mm slices beside a vessel or on the pleura gives the Hessian dot filter no peak of its
own (the vessel's or the wall's response covers it), so no candidate, and no classifier after it can find it. A
network that sees the CT around every voxel learns what such a nodule looks like next to its neighbours.

CenterNet-style (Zhou et al. 2019, "Objects as points"): the target is a Gaussian on each nodule's centre (sigma
``GAUSSIAN_SIGMA_FRACTION`` of its diameter, at least ``MIN_SIGMA_MM``) trained with the penalty-reduced focal loss,
and a second channel regresses the nodule's log diameter near its centre; a local maximum of the map is a candidate,
its value the candidate's score, and the diameter there the size that the region growing starts from. The network
runs on an axis-aligned LPS grid of ``MAP_SPACING_MM`` (whatever the input's grid and orientation) over the lung
bounding box, HU mapped from ``HU_RANGE`` to 0..1, by the project's sliding-window runner (progress, cancel, GPU).
It is trained on generated phantoms only (``dev/train_nodule_map.py``).

The weights file is a ``torch.save`` dictionary of plain types and tensors (loaded with ``weights_only``): ``format``,
``format_version``, the grid it was trained for, ``metadata`` and ``state_dict``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from RecognitionCore.errors import InputError
from RecognitionCore.preprocessing import ImageGeometry, bounding_box, crop, resample_to_reference
from RecognitionCore.progress import Progress, as_progress

from .patch_classifier import load_weights_file, save_weights_file

FORMAT_NAME = "mir-nodule-centre-map"
FORMAT_VERSION = 1
MAP_SPACING_MM = (1.0, 1.0, 2.5)  # x, y, z: the in-plane pixels of a chest CT, the slices of most LIDC scans
HU_RANGE = (-1000.0, 400.0)
CHANNELS = (16, 32, 64)
GAUSSIAN_SIGMA_FRACTION = 1 / 6  # a nodule's centre Gaussian falls to 0.33 at its edge
MIN_SIGMA_MM = 1.0
MAX_WINDOW_VOXELS = (64, 320, 320)  # z, y, x: the sliding-window runner's window, at most the whole lung box
TRAINING_WINDOW_VOXELS = (32, 128, 128)
LUNG_BOX_MARGIN_MM = 10.0


def map_network():
    """A three-level U-Net whose first convolution halves the in-plane grid (a 3 mm nodule still spans three input
    pixels; the rest works on a quarter of the voxels), upsampled back at the end: two output channels, the centre
    logit and the log diameter. ~0.3 M weights, about 2.5 s per 10 M voxels on two CPU cores."""
    import torch
    from torch import nn

    def convolution(inputs: int, outputs: int, stride=1):
        return nn.Sequential(nn.Conv3d(inputs, outputs, 3, stride=stride, padding=1, bias=False),
                             nn.BatchNorm3d(outputs), nn.LeakyReLU(0.1, inplace=True))

    first, second, third = CHANNELS

    class CentreMapNetwork(nn.Module):
        def __init__(self):
            super().__init__()
            self.level1 = nn.Sequential(convolution(1, first, (1, 2, 2)), convolution(first, first))
            self.level2 = nn.Sequential(convolution(first, second, 2), convolution(second, second))
            self.level3 = nn.Sequential(convolution(second, third, 2), convolution(third, third))
            self.up3 = nn.ConvTranspose3d(third, second, 2, 2)
            self.decode2 = convolution(2 * second, second)
            self.up2 = nn.ConvTranspose3d(second, first, 2, 2)
            self.decode1 = convolution(2 * first, first)
            self.head = nn.Conv3d(first, 2, 1)
            with torch.no_grad():  # start from a map of 0.01 everywhere and 6 mm nodules (CenterNet's prior)
                self.head.bias.copy_(torch.tensor([-4.6, 1.8]))
            self.upsample = nn.Upsample(scale_factor=(1, 2, 2), mode="trilinear", align_corners=False)

        def forward(self, x):
            level1 = self.level1(x)
            level2 = self.level2(level1)
            level3 = self.level3(level2)
            decoded = self.decode2(torch.cat([self.up3(level3), level2], 1))
            decoded = self.decode1(torch.cat([self.up2(decoded), level1], 1))
            return self.upsample(self.head(decoded))

    return CentreMapNetwork()


def map_geometry(image: sitk.Image, lungs_mask: sitk.Image) -> ImageGeometry:
    """The axis-aligned LPS grid of ``MAP_SPACING_MM`` over the lungs' bounding box (plus a margin), its size a
    multiple of the network's downsampling (4 slices, 8 pixels)."""
    box = bounding_box(lungs_mask, LUNG_BOX_MARGIN_MM)
    region = crop(image, box)
    corners = np.array([region.TransformContinuousIndexToPhysicalPoint([float(v) for v in corner])
                        for corner in np.array(np.meshgrid(*[(-0.5, n - 0.5) for n in region.GetSize()]))
                        .reshape(3, -1).T])
    low, high = corners.min(axis=0), corners.max(axis=0)
    spacing = np.array(MAP_SPACING_MM)
    size = np.ceil((high - low) / spacing / (8, 8, 4)).astype(int) * (8, 8, 4)
    origin = (low + high) / 2 - (size - 1) * spacing / 2
    return ImageGeometry(tuple(int(v) for v in size), tuple(float(v) for v in spacing),
                         tuple(float(v) for v in origin), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


def scaled_ct(image: sitk.Image, geometry: ImageGeometry) -> np.ndarray:
    """The CT on ``geometry`` (linear; beyond the image counts as air), HU_RANGE mapped to 0..1, (z, y, x) float32."""
    region = sitk.GetArrayFromImage(resample_to_reference(image, geometry, "linear", default_value=HU_RANGE[0]))
    return np.clip((region - HU_RANGE[0]) / (HU_RANGE[1] - HU_RANGE[0]), 0.0, 1.0).astype(np.float32)


@dataclass
class MapPeak:
    """A local maximum of the centre map: where (LPS mm), the diameter the map gives there, and its score (0..1)."""

    center_lps_mm: Tuple[float, float, float]
    diameter_mm: float
    score: float


class NoduleMap:
    """The trained network and its description; ``peaks`` gives the candidates of a CT."""

    def __init__(self, network, metadata: Optional[Dict] = None):
        self.network = network.eval()
        self.metadata = dict(metadata or {})

    @classmethod
    def load(cls, path: Union[str, Path]) -> "NoduleMap":
        network = map_network()
        metadata = load_weights_file(path, _file_header(), network, "nodule map network", "dev/train_nodule_map.py")
        return cls(network, metadata)

    def save(self, path: Union[str, Path]) -> Path:
        return save_weights_file(path, _file_header(), self.network, self.metadata)

    def predict(self, image: sitk.Image, lungs_mask: sitk.Image, device: str = "cpu",
                progress: Optional[Progress] = None) -> Tuple[np.ndarray, np.ndarray, ImageGeometry]:
        """(centre probability, diameter in mm, their grid): the network over the lungs' bounding box, (z, y, x)
        float32 arrays on ``map_geometry``; zero outside ``lungs_mask``."""
        from RecognitionCore.inference import SlidingWindowRunner

        geometry = map_geometry(image, lungs_mask)
        window = tuple(min(size, limit) for size, limit in zip(geometry.size[::-1], MAX_WINDOW_VOXELS))
        runner = SlidingWindowRunner(self.network, roi_size=window, sw_batch_size=1, overlap=0.125, device=device)
        outputs = runner(scaled_ct(image, geometry), output="logits", progress=progress)
        lungs = sitk.GetArrayViewFromImage(resample_to_reference(lungs_mask, geometry, "nearest")) != 0
        probability = np.where(lungs, 1 / (1 + np.exp(-outputs[0])), 0).astype(np.float32)
        return probability, np.exp(outputs[1]).astype(np.float32), geometry

    def peaks(self, image: sitk.Image, lungs_mask: sitk.Image, min_score: float, max_count: int,
              device: str = "cpu", progress: Optional[Progress] = None) -> List[MapPeak]:
        """The local maxima of the centre map of at least ``min_score``, strongest first, at most ``max_count``."""
        progress = as_progress(progress)
        probability, diameter_mm, geometry = self.predict(image, lungs_mask, device, progress.sub(0.0, 0.9))
        return map_peaks(probability, diameter_mm, geometry, min_score, max_count)


def map_peaks(probability: np.ndarray, diameter_mm: np.ndarray, geometry: ImageGeometry, min_score: float,
              max_count: int) -> List[MapPeak]:
    """Local maxima (over 3 x 5 x 5 voxels: 7.5 x 5 x 5 mm) of the centre map of at least ``min_score``."""
    local_max = ndimage.maximum_filter(probability, size=(3, 5, 5), mode="constant")
    zyx = np.argwhere((probability == local_max) & (probability >= min_score))
    scores = probability[tuple(zyx.T)]
    order = np.argsort(-scores, kind="stable")[:max_count]
    spacing, origin = np.array(geometry.spacing_mm), np.array(geometry.origin_lps_mm)
    return [MapPeak(tuple(float(v) for v in origin + zyx[n, ::-1] * spacing), float(diameter_mm[tuple(zyx[n])]),
                    float(scores[n])) for n in order]


def centre_targets(geometry: ImageGeometry, nodules: Sequence[Tuple[Sequence[float], float]]
                   ) -> Tuple[np.ndarray, np.ndarray]:
    """(Gaussian centre map, log-diameter map) on ``geometry`` for (centre LPS mm, diameter mm) nodules; the voxel
    nearest each centre is exactly 1, and the log diameter is that of the nodule whose Gaussian is highest."""
    shape = geometry.size[::-1]
    heat = np.zeros(shape, dtype=np.float32)
    log_diameter = np.zeros(shape, dtype=np.float32)
    spacing, origin = np.array(geometry.spacing_mm), np.array(geometry.origin_lps_mm)
    for center, diameter in nodules:
        sigma = max(GAUSSIAN_SIGMA_FRACTION * diameter, MIN_SIGMA_MM)
        index = (np.asarray(center) - origin) / spacing  # x, y, z
        reach = np.ceil(3 * sigma / spacing).astype(int)
        nearest = np.rint(index).astype(int)
        low = np.maximum(nearest - reach, 0)
        high = np.minimum(nearest + reach + 1, geometry.size)
        if np.any(high <= low):
            continue
        axes = [(np.arange(a, b) - i) * s for a, b, i, s in zip(low, high, index, spacing)]
        squared = axes[2][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[0][None, None, :] ** 2
        gaussian = np.exp(-squared / (2 * sigma ** 2)).astype(np.float32)
        box = tuple(slice(a, b) for a, b in zip(low[::-1], high[::-1]))
        if np.all((nearest >= 0) & (nearest < geometry.size)):
            gaussian[tuple(nearest[::-1] - low[::-1])] = 1.0
        higher = gaussian > heat[box]
        heat[box][higher] = gaussian[higher]
        log_diameter[box][higher] = np.log(diameter)
    return heat, log_diameter


def _file_header() -> dict:
    return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "map_spacing_mm": list(MAP_SPACING_MM),
            "hu_range": list(HU_RANGE), "channels": list(CHANNELS)}


def focal_loss(logits, heat, log_diameter, diameter_logits):
    """CenterNet's penalty-reduced focal loss on the centre map (per nodule centre) plus an L1 loss on the log
    diameter where the centre Gaussian is above 0.5."""
    import torch

    probability = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    centres = heat >= 1.0
    positive = -((1 - probability) ** 2) * torch.log(probability) * centres
    negative = -((1 - heat) ** 4) * probability ** 2 * torch.log(1 - probability) * ~centres
    count = centres.sum().clamp(min=1)
    near = heat > 0.5
    size = (torch.abs(diameter_logits - log_diameter) * near).sum() / near.sum().clamp(min=1)
    return (positive.sum() + negative.sum()) / count + size


def train_nodule_map(cases: Sequence[Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], iterations: int,
                     batch_size: int = 16, positive_share: float = 0.6, device: str = "auto", seed: int = 0,
                     max_seconds: Optional[float] = None, description: str = "",
                     progress: Optional[Progress] = None) -> NoduleMap:
    """A ``NoduleMap`` trained with AdamW and a one-cycle schedule on ``cases`` of (scaled CT, centre map, log diameter
    map, nodule centres as (z, y, x) voxel indices), all on one grid per case (``map_geometry``). Windows of
    ``TRAINING_WINDOW_VOXELS`` are cut around a nodule (``positive_share`` of them, shifted at random) or anywhere in
    the case, flipped in x and y, in-plane axes swapped, with noise of up to 25 HU and an offset of up to 20 HU.
    ``max_seconds``: fewer than ``iterations`` steps when steps ``_TIMED_STEPS`` (at a low, constant rate) show that
    they would take longer. bfloat16 autocast on a GPU."""
    import torch

    from RecognitionCore.device import choose_device

    progress = as_progress(progress)
    if not cases or not any(len(centres) for *_, centres in cases):
        raise InputError("the nodule map needs training cases with nodules")
    device = choose_device(device)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    stored = [tuple(torch.from_numpy(np.ascontiguousarray(array)).to(device, torch.float16) for array in case[:3])
              for case in cases]
    with_nodules = [n for n, case in enumerate(cases) if len(case[3])]
    network = map_network().to(device).train()
    torch.backends.cudnn.benchmark = True  # one window size throughout
    optimiser = torch.optim.AdamW(network.parameters(), lr=1e-4, weight_decay=1e-4)
    schedule = None
    started = time.perf_counter()
    step = 0
    while step < iterations:
        if step == _TIMED_STEPS[0]:
            timed_from = time.perf_counter()
        if schedule is None and (step == _TIMED_STEPS[1] or iterations <= _TIMED_STEPS[1]):
            if max_seconds is not None and step:
                per_step = (time.perf_counter() - timed_from) / (step - _TIMED_STEPS[0])
                left = max_seconds - (time.perf_counter() - started)
                iterations = min(iterations, step + max(1, int(left / per_step)))
            schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=2e-3,
                                                           total_steps=max(1, iterations - step))
        inputs, heats, diameters = _training_batch(cases, stored, with_nodules, batch_size, positive_share, rng,
                                                   device)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            outputs = network(inputs)
        loss = focal_loss(outputs[:, 0].float(), heats, diameters, outputs[:, 1].float())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if schedule is not None:
            schedule.step()
        if step % 100 == 0 or step == iterations - 1:
            progress.report(step / iterations, f"step {step} of {iterations}: loss {loss.item():.4f}")
        step += 1
    network = network.cpu().eval()
    metadata = {"description": description, "training": {
        "library": f"torch {torch.__version__}", "device": device.type, "cases": len(cases),
        "nodules": int(sum(len(case[3]) for case in cases)), "iterations": iterations, "batch_size": batch_size,
        "window_voxels": list(TRAINING_WINDOW_VOXELS), "positive_share": positive_share, "seed": seed}}
    return NoduleMap(network, metadata)


_TIMED_STEPS = (10, 30)  # the steps timed for max_seconds (the first ones include cuDNN's search)


def _training_batch(cases, stored, with_nodules, batch_size: int, positive_share: float, rng, device):
    """(inputs (B, 1, z, y, x), centre maps, log-diameter maps) of ``batch_size`` augmented training windows."""
    import torch

    window = np.array(TRAINING_WINDOW_VOXELS)
    noise_scale, hu_offset_scale = np.array([25.0, 20.0]) / (HU_RANGE[1] - HU_RANGE[0])
    inputs, heats, diameters = [], [], []
    for _ in range(batch_size):
        if rng.random() < positive_share:
            number = int(rng.choice(with_nodules))
            centres = cases[number][3]
            middle = centres[rng.integers(len(centres))] + rng.integers(-window // 3, window // 3 + 1)
        else:
            number = int(rng.integers(len(cases)))
            middle = rng.integers(0, np.array(cases[number][0].shape) + 1)
        shape = np.array(cases[number][0].shape)
        start = np.clip(middle - window // 2, 0, np.maximum(shape - window, 0))
        box = tuple(slice(a, a + w) for a, w in zip(start, window))
        arrays = [_padded(array[box], window) for array in stored[number]]
        flips = [axis for axis in (1, 2) if rng.random() < 0.5]
        if flips:
            arrays = [array.flip(flips) for array in arrays]
        if rng.random() < 0.5:
            arrays = [array.transpose(1, 2) for array in arrays]
        noise = torch.randn(tuple(window), device=device) * (noise_scale * rng.random())
        offset = (2 * rng.random() - 1) * hu_offset_scale
        inputs.append((arrays[0].float() + noise + offset).clamp(0, 1))
        heats.append(arrays[1].float())
        diameters.append(arrays[2].float())
    return torch.stack(inputs)[:, None], torch.stack(heats), torch.stack(diameters)


def _padded(array, window: np.ndarray):
    """A window cut at a case's edge, padded to the full window size with zeros (air, no nodule)."""
    import torch

    missing = [(0, int(w - n)) for n, w in zip(array.shape, window)]
    if not any(after for _, after in missing):
        return array
    return torch.nn.functional.pad(array, [v for pair in reversed(missing) for v in pair])
