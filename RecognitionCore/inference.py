"""Sliding-window inference of a 3D network over a whole CT, in bounded memory, with progress and cancel.

The windows, their blending weights and the order in which they are summed are exactly those of
``monai.inferers.sliding_window_inference``, so the result equals MONAI's up to float rounding, everywhere (not only in
the interior). What differs is memory: MONAI keeps a float32 accumulator for every output channel of the whole volume;
here the accumulator covers only a slab of planes along k (at least one ROI deep, deeper when the memory budget
allows). Windows come in k-major order, so once a window starting at plane z is reached, no later window touches the
planes below z: those are finalised (averaged, then argmax/softmax) into the output and the slab moves on. Every
window is computed once, as in MONAI.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import traceback
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from monai.data.utils import compute_importance_map, dense_patch_slices

from .device import choose_device
from .errors import InputError, ModelError
from .progress import Progress, as_progress

logger = logging.getLogger(__name__)

OUTPUT_MODES = ("labels", "probabilities", "logits")
ACTIVATIONS = ("softmax", "sigmoid")
_FLUSH_PLANES = 8  # planes finalised at once: bounds the softmax/argmax temporaries to a few planes


def available_memory_bytes(device: Union[str, torch.device] = "cpu") -> int:
    """Memory that can be allocated now on ``device``: free GPU memory, or MemAvailable of the host."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 * 2 ** 30  # no way to ask (e.g. Windows without /proc): assume a modest machine


def _as_channel_first(volume) -> np.ndarray:
    """A validated (C, D, H, W) numpy view of a (k, j, i) array or a (C, D, H, W) array/tensor (no copy if possible)."""
    if isinstance(volume, torch.Tensor):
        volume = volume.detach()
        if volume.dtype in (torch.bfloat16, torch.bool):
            volume = volume.float()
        volume = volume.cpu().numpy()
    array = np.asarray(volume)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4:
        raise InputError(f"Sliding-window inference needs a 3D volume (k, j, i) or (channels, k, j, i); "
                         f"got an array of shape {tuple(np.shape(volume))}.")
    if array.size == 0:
        raise InputError(f"The volume is empty (shape {tuple(np.shape(volume))}).")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise InputError(f"The volume must hold real numbers; got dtype {array.dtype}.")
    if np.issubdtype(array.dtype, np.floating):
        not_finite = sum(int(np.count_nonzero(~np.isfinite(array[:, z:z + 16]))) for z in range(0, array.shape[1], 16))
        if not_finite:
            raise InputError(f"The volume contains {not_finite} NaN or infinite voxel(s); fix or mask them first.")
    return array


def _pad_to_roi(image: np.ndarray, roi_size: Tuple[int, int, int], pad_value: Optional[float]):
    """Pad dimensions smaller than the ROI symmetrically (as MONAI does); return the image and the leading pads."""
    shortfall = [max(roi - size, 0) for roi, size in zip(roi_size, image.shape[1:])]
    leading = tuple(diff // 2 for diff in shortfall)
    if not any(shortfall):
        return image, leading
    value = float(image.min()) if pad_value is None else float(pad_value)
    widths = [(0, 0)] + [(lead, diff - lead) for lead, diff in zip(leading, shortfall)]
    return np.pad(image, widths, mode="constant", constant_values=value), leading


def _scan_interval(image_size: Sequence[int], roi_size: Sequence[int], overlap: float) -> Tuple[int, ...]:
    """Step between windows, as MONAI computes it (a whole-axis ROI does not slide)."""
    return tuple(roi if roi == size else max(int(roi * (1 - overlap)), 1) for size, roi in zip(image_size, roi_size))


def _output_array(shape: Tuple[int, ...], dtype, memmap: Optional[bool], memmap_dir: Optional[str]) -> np.ndarray:
    """The result array; a memmap on an anonymous temporary file when it would not fit in RAM (or when asked)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if memmap is None:
        memmap = nbytes > available_memory_bytes("cpu") // 2
    if not memmap:
        return np.empty(shape, dtype=dtype)
    logger.info("Writing the %.1f GB inference result to a memory-mapped temporary file.", nbytes / 2 ** 30)
    with tempfile.TemporaryFile(dir=memmap_dir) as backing:  # unlinked: the mapping keeps it alive, nothing leaks
        return np.memmap(backing, dtype=dtype, mode="w+", shape=shape)


class _WindowStager:
    """Copies a batch of windows (any input dtype) into a reused float32 host buffer, then onto the device.

    On CUDA the host buffers are pinned and the copy is asynchronous; two buffers alternate and an event guards
    each one, so a buffer is not refilled while its previous copy is still in flight.
    """

    def __init__(self, batch_size: int, channels: int, roi_size: Tuple[int, int, int], device: torch.device,
                 memory_format: torch.memory_format) -> None:
        self.device = device
        self.memory_format = memory_format
        pinned = device.type == "cuda"
        self.buffers = [torch.empty((batch_size, channels, *roi_size), dtype=torch.float32, pin_memory=pinned)
                        for _ in range(2 if pinned else 1)]
        self.events: List[Optional[torch.cuda.Event]] = [None] * len(self.buffers)
        self.turn = 0

    def stage(self, image: np.ndarray, windows: Sequence[Tuple[slice, ...]]) -> torch.Tensor:
        index, self.turn = self.turn, (self.turn + 1) % len(self.buffers)
        if self.events[index] is not None:
            self.events[index].synchronize()
        host = self.buffers[index][:len(windows)]
        host_array = host.numpy()
        for position, window in enumerate(windows):
            host_array[position] = image[(slice(None),) + window]
        batch = host.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            self.events[index] = torch.cuda.Event()
            self.events[index].record()
        return batch.contiguous(memory_format=self.memory_format)


class _SlabAccumulator:
    """Weighted sum of window predictions over a slab of planes [base, base + depth) of the padded volume."""

    def __init__(self, channels: int, depth: int, plane_shape: Tuple[int, int], device: torch.device,
                 with_weights: bool) -> None:
        self.base = 0
        self.depth = depth
        self.values = torch.zeros((channels, depth, *plane_shape), dtype=torch.float32, device=device)
        self.weights = torch.zeros((1, depth, *plane_shape), dtype=torch.float32, device=device) if with_weights \
            else None

    def add(self, window: Tuple[slice, ...], prediction: torch.Tensor, importance: torch.Tensor) -> None:
        local = (slice(None), slice(window[0].start - self.base, window[0].stop - self.base), window[1], window[2])
        self.values[local] += prediction * importance
        if self.weights is not None:
            self.weights[local] += importance

    def shift(self, new_base: int) -> None:
        """Drop the planes below ``new_base`` (already finalised) and move the rest to the front of the slab."""
        offset, self.base = new_base - self.base, new_base
        keep = max(self.depth - offset, 0)
        for tensor in (self.values, self.weights):
            if tensor is None:
                continue
            for start in range(0, keep, offset):  # chunks no longer than the offset never overlap their source
                stop = min(start + offset, keep)
                tensor[:, start:stop] = tensor[:, start + offset:stop + offset]
            tensor[:, keep:] = 0


class SlidingWindowRunner:
    """Runs a 3D network over a whole volume by sliding windows, MONAI-compatible, in a bounded amount of memory.

    ``network`` maps (B, C_in, *roi_size) to (B, C_out, *roi_size) logits; it is moved to ``device`` and put in eval
    mode. ``blend_mode`` is "gaussian" or "constant" (as MONAI's ``mode``). ``amp`` uses ``torch.autocast`` with
    ``amp_dtype`` on CUDA only. ``memory_budget_bytes`` bounds the accumulator slab on the device (default: a quarter
    of the memory available there); the slab is never shallower than one ROI. ``channels_last`` stores activations as
    NDHWC (faster with oneDNN/cuDNN on some machines; default off).
    """

    def __init__(self, network: torch.nn.Module, roi_size: Sequence[int] = (96, 96, 96), sw_batch_size: int = 4,
                 overlap: float = 0.25, blend_mode: str = "gaussian", sigma_scale: float = 0.125,
                 device: Union[str, torch.device, None] = None, amp: bool = True,
                 amp_dtype: torch.dtype = torch.float16, memory_budget_bytes: Optional[int] = None,
                 channels_last: bool = False) -> None:
        roi_size = tuple(int(size) for size in roi_size)
        if len(roi_size) != 3 or min(roi_size) < 1:
            raise InputError(f"roi_size must be three positive sizes (k, j, i); got {roi_size}.")
        if not 0 <= overlap < 1:
            raise InputError(f"overlap must be in [0, 1); got {overlap}.")
        if sw_batch_size < 1:
            raise InputError(f"sw_batch_size must be at least 1; got {sw_batch_size}.")
        if blend_mode not in ("gaussian", "constant"):
            raise InputError(f"blend_mode must be 'gaussian' or 'constant'; got {blend_mode!r}.")
        self.device = device if isinstance(device, torch.device) else choose_device(device or "auto")
        self.memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
        self.network = network.to(self.device, memory_format=self.memory_format).eval()
        self.roi_size = roi_size
        self.sw_batch_size = int(sw_batch_size)
        self.overlap = float(overlap)
        self.blend_mode = blend_mode
        self.sigma_scale = sigma_scale
        self.amp = bool(amp) and self.device.type == "cuda"
        self.amp_dtype = amp_dtype
        self.memory_budget_bytes = memory_budget_bytes

    def __call__(self, volume, output: str = "labels", activation: str = "softmax",
                 channels: Optional[Sequence[int]] = None, probability_dtype=np.float32,
                 pad_value: Optional[float] = None, memmap: Optional[bool] = None, memmap_dir: Optional[str] = None,
                 progress: Optional[Progress] = None) -> np.ndarray:
        """Predict over ``volume``: (k, j, i) or (C_in, k, j, i), numpy or torch, any real dtype.

        ``output``: "labels" -> (k, j, i) uint8 argmax (uint16 past 256 classes; logit > 0 for a single channel);
        "probabilities" -> (len(channels), k, j, i) softmax or sigmoid as ``probability_dtype``; "logits" ->
        (C_out, k, j, i) float32 blended logits. Dimensions smaller than the ROI are padded with ``pad_value`` (default:
        the volume minimum) and cropped back. ``memmap`` (None = when the result would not fit in RAM) writes the
        result to an anonymous temporary file in ``memmap_dir``. On cancel or error nothing is returned and every
        buffer is released.
        """
        if output not in OUTPUT_MODES:
            raise InputError(f"output must be one of {OUTPUT_MODES}; got {output!r}.")
        if activation not in ACTIVATIONS:
            raise InputError(f"activation must be one of {ACTIVATIONS}; got {activation!r}.")
        progress = as_progress(progress)
        image = _as_channel_first(volume)
        original_shape = image.shape[1:]
        image, leading_pad = _pad_to_roi(image, self.roi_size, pad_value)
        windows = dense_patch_slices(image.shape[1:], self.roi_size,
                                     _scan_interval(image.shape[1:], self.roi_size, self.overlap))
        importance = compute_importance_map(self.roi_size, mode=self.blend_mode, sigma_scale=self.sigma_scale,
                                            device=self.device, dtype=torch.float32)[None]
        progress.report(0.0, f"Sliding window: {len(windows)} windows of {self.roi_size} on {self.device.type}")
        benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = benchmark or self.device.type == "cuda"
        try:
            with torch.inference_mode():
                result = self._predict(image, windows, importance, output, activation, channels, probability_dtype,
                                       original_shape, leading_pad, memmap, memmap_dir, progress)
        except BaseException as error:
            # Whoever holds the error (a Cancelled shown in the UI) holds its traceback, and with it every frame's
            # tensors: drop them now, then give the cached device blocks back to the driver.
            traceback.clear_frames(error.__traceback__)
            importance = image = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise
        finally:
            torch.backends.cudnn.benchmark = benchmark
        progress.report(1.0, "Sliding window done")
        return result

    def _slab_depth(self, channels: int, plane_shape: Tuple[int, int], with_weights: bool) -> int:
        """Planes per accumulator slab: what the budget allows, at least one ROI, at most the padded volume."""
        budget = self.memory_budget_bytes
        if budget is None:
            budget = available_memory_bytes(self.device) // 4
        plane_bytes = (channels + int(with_weights)) * plane_shape[0] * plane_shape[1] * 4
        depth = max(int(budget // plane_bytes), self.roi_size[0])
        if depth * plane_bytes > budget:
            logger.warning("The memory budget (%.2f GB) is below one ROI-deep slab (%.2f GB); using one ROI.",
                           budget / 2 ** 30, depth * plane_bytes / 2 ** 30)
        return depth

    def _predict(self, image, windows, importance, output, activation, channels, probability_dtype, original_shape,
                 leading_pad, memmap, memmap_dir, progress) -> np.ndarray:
        padded_depth = image.shape[1]
        plane_shape = image.shape[2:]
        with_weights = output != "labels"  # argmax of a weighted sum equals argmax of the weighted mean
        stager = _WindowStager(self.sw_batch_size, image.shape[0], self.roi_size, self.device, self.memory_format)
        autocast = torch.autocast("cuda", dtype=self.amp_dtype) if self.amp else contextlib.nullcontext()
        slab = writer = result = None
        for first in range(0, len(windows), self.sw_batch_size):
            batch_windows = windows[first:first + self.sw_batch_size]
            batch = stager.stage(image, batch_windows)
            with autocast:
                prediction = self.network(batch)
            prediction = self._checked(prediction, len(batch_windows), self.roi_size)
            if slab is None:
                out_channels = prediction.shape[1]
                depth = min(self._slab_depth(out_channels, plane_shape, with_weights), padded_depth)
                slab = _SlabAccumulator(out_channels, depth, plane_shape, self.device, with_weights)
                writer = _ResultWriter(output, activation, channels, probability_dtype, out_channels,
                                       original_shape, leading_pad)
                result = writer.allocate(memmap, memmap_dir)
            for window, window_prediction in zip(batch_windows, prediction):
                start = window[0].start
                if start + self.roi_size[0] > slab.base + slab.depth:
                    writer.write(result, slab, start)
                    slab.shift(start)
                slab.add(window, window_prediction.float(), importance)
            done = first + len(batch_windows)
            progress.report(done / len(windows), f"Sliding window: {done}/{len(windows)} windows")
        writer.write(result, slab, padded_depth)
        return result

    @staticmethod
    def _checked(prediction, count: int, roi_size: Tuple[int, int, int]) -> torch.Tensor:
        if not isinstance(prediction, torch.Tensor):
            raise ModelError(f"The network returned {type(prediction).__name__}; a tensor of logits is needed.")
        if prediction.ndim != 5 or prediction.shape[0] != count or tuple(prediction.shape[2:]) != roi_size:
            raise ModelError(f"The network returned shape {tuple(prediction.shape)} for {count} windows of "
                             f"{roi_size}; ({count}, channels, *roi_size) is needed.")
        return prediction


class _ResultWriter:
    """Turns finalised accumulator planes into the requested output and writes them, cropped, into the result."""

    def __init__(self, output: str, activation: str, channels: Optional[Sequence[int]], probability_dtype,
                 out_channels: int, original_shape: Tuple[int, int, int], leading_pad: Tuple[int, int, int]) -> None:
        self.output = output
        self.activation = activation
        self.out_channels = out_channels
        self.channels = list(range(out_channels)) if channels is None else [int(c) for c in channels]
        if output == "probabilities" and (not self.channels or
                                          not all(0 <= c < out_channels for c in self.channels)):
            raise InputError(f"channels {list(channels)} are not among the network's {out_channels} output channels.")
        self.probability_dtype = np.dtype(probability_dtype)
        self.original_shape = original_shape
        self.leading_pad = leading_pad

    def allocate(self, memmap: Optional[bool], memmap_dir: Optional[str]) -> np.ndarray:
        if self.output == "labels":
            dtype = np.uint8 if self.out_channels <= 256 else np.uint16
            return _output_array(self.original_shape, dtype, memmap, memmap_dir)
        if self.output == "probabilities":
            return _output_array((len(self.channels), *self.original_shape), self.probability_dtype, memmap,
                                 memmap_dir)
        return _output_array((self.out_channels, *self.original_shape), np.float32, memmap, memmap_dir)

    def write(self, result: np.ndarray, slab: _SlabAccumulator, end: int) -> None:
        """Finalise padded planes [slab.base, end) and store those that belong to the original volume."""
        pad_k, pad_j, pad_i = self.leading_pad
        depth, rows, columns = self.original_shape
        for start in range(slab.base, end, _FLUSH_PLANES):
            stop = min(start + _FLUSH_PLANES, end)
            first, last = max(start - pad_k, 0), min(stop - pad_k, depth)
            if first >= last:
                continue
            local = slice(first + pad_k - slab.base, last + pad_k - slab.base)
            crop = (slice(None), local, slice(pad_j, pad_j + rows), slice(pad_i, pad_i + columns))
            planes = self._finalise(slab.values[crop], None if slab.weights is None else slab.weights[crop])
            result[..., first:last, :, :] = planes.cpu().numpy()

    def _finalise(self, values: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
        if self.output == "labels":
            if self.out_channels == 1:
                return (values[0] > 0).to(torch.uint8)
            labels = values.max(dim=0).indices  # same first-maximum rule as argmax, ~20x faster over dim 0 on CPU
            return labels.to(torch.uint8 if self.out_channels <= 256 else torch.int32)
        logits = values / weights
        if self.output == "logits":
            return logits
        if self.activation == "softmax":
            probabilities = torch.softmax(logits, dim=0)[self.channels]
        else:
            probabilities = torch.sigmoid(logits[self.channels])
        return probabilities.to(torch.float16 if self.probability_dtype == np.float16 else torch.float32)
