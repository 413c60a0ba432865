"""Sliding-window inference of a 3D network over a whole CT, in bounded memory, with progress and cancel.

The windows, their blending weights and the order in which they are summed are exactly those of
``monai.inferers.sliding_window_inference``, so the result equals MONAI's up to float rounding, everywhere (not only in
the interior). What differs is memory: MONAI keeps a float32 accumulator for every output channel of the whole volume;
here the accumulator covers only a slab of planes along k (at least one ROI deep, deeper when the memory budget
allows). Windows come in k-major order, so once a window starting at plane z is reached, no later window touches the
planes below z: those are finalised (averaged, then argmax/softmax) into the output and the slab moves on. Every
window is computed once, as in MONAI.

On a GPU the input volume is uploaded once, chunk by chunk as the windows reach it (on a side stream, overlapping the
network), when it fits in half the memory budget; windows are then sliced on the device. Finalised planes come back
through pinned host buffers without stalling the GPU. Otherwise (and on CPU) batches of windows are staged from the
host array.
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
_CHUNK_VOXELS = 2 ** 21  # voxels uploaded or finalised at once: bounds upload buffers and argmax/softmax temporaries


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
    return array


def _raise_if_not_finite(count: int) -> None:
    if count:
        raise InputError(f"The volume contains {count} NaN or infinite voxel(s); fix or mask them first.")


def _check_finite_on_host(image: np.ndarray) -> None:
    """Raise InputError for NaN/inf voxels, 16 planes at a time (no volume-sized temporary)."""
    if np.issubdtype(image.dtype, np.floating):
        _raise_if_not_finite(sum(int(np.count_nonzero(~np.isfinite(image[:, z:z + 16])))
                                 for z in range(0, image.shape[1], 16)))


def _roi_padding(shape: Sequence[int], roi_size: Tuple[int, int, int]) -> List[Tuple[int, int]]:
    """(leading, trailing) pad per spatial axis, so that every axis is at least one ROI long (as MONAI pads)."""
    shortfall = [max(roi - size, 0) for roi, size in zip(roi_size, shape)]
    return [(diff // 2, diff - diff // 2) for diff in shortfall]


def _pad_value(image: np.ndarray, pad_value: Optional[float]) -> float:
    return float(image.min()) if pad_value is None else float(pad_value)


def _chunk_planes(plane_shape: Sequence[int]) -> int:
    return max(_CHUNK_VOXELS // (int(plane_shape[0]) * int(plane_shape[1])), 1)


def window_slices(image_size: Sequence[int], roi_size: Sequence[int], overlap: float) -> List[Tuple[slice, ...]]:
    """The windows of MONAI's ``sliding_window_inference`` over an image of ``image_size`` (at least ``roi_size``):
    MONAI's step between windows (a whole-axis ROI does not slide) and its ``dense_patch_slices``."""
    interval = tuple(roi if roi == size else max(int(roi * (1 - overlap)), 1)
                     for size, roi in zip(image_size, roi_size))
    return list(dense_patch_slices(tuple(image_size), tuple(roi_size), interval))


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


class _HostWindows:
    """Batches of windows copied from the padded host array (any dtype) into a reused float32 buffer, then sent on.

    On CUDA the host buffers are pinned and the copy is asynchronous; two buffers alternate and an event guards
    each one, so a buffer is not refilled while its previous copy is still in flight.
    """

    def __init__(self, image: np.ndarray, batch_size: int, roi_size: Tuple[int, int, int], device: torch.device,
                 memory_format: torch.memory_format) -> None:
        self.image = image
        self.device = device
        self.memory_format = memory_format
        pinned = device.type == "cuda"
        self.buffers = [torch.empty((batch_size, image.shape[0], *roi_size), dtype=torch.float32, pin_memory=pinned)
                        for _ in range(2 if pinned else 1)]
        self.events: List[Optional[torch.cuda.Event]] = [None] * len(self.buffers)
        self.turn = 0

    def batch(self, windows: Sequence[Tuple[slice, ...]]) -> torch.Tensor:
        index, self.turn = self.turn, (self.turn + 1) % len(self.buffers)
        if self.events[index] is not None:
            self.events[index].synchronize()
        host = self.buffers[index][:len(windows)]
        host_array = host.numpy()
        for position, window in enumerate(windows):
            host_array[position] = self.image[(slice(None),) + window]
        batch = host.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            self.events[index] = torch.cuda.current_stream(self.device).record_event()
        return batch.contiguous(memory_format=self.memory_format)

    def check_finite(self) -> None:
        """Nothing left to check: the host array was checked before any window was computed."""


class _DeviceWindows:
    """The padded input as one float32 tensor on the device, filled chunk by chunk as the windows reach it.

    On CUDA each chunk goes through one of two pinned buffers on a side stream, so the upload overlaps the network
    still running on earlier windows; the compute stream waits for a chunk's event before any window can read it.
    NaN/inf voxels are counted on the device as chunks arrive and reported by ``check_finite`` (one sync, at the end).
    """

    def __init__(self, image: np.ndarray, padding: Sequence[Tuple[int, int]], pad_value: Optional[float],
                 device: torch.device, memory_format: torch.memory_format) -> None:
        self.image = image
        self.device = device
        self.memory_format = memory_format
        self.leading = tuple(lead for lead, _ in padding)
        padded_shape = [size + lead + trail for size, (lead, trail) in zip(image.shape[1:], padding)]
        if any(self.leading) or any(trail for _, trail in padding):
            self.volume = torch.full((image.shape[0], *padded_shape), _pad_value(image, pad_value),
                                     dtype=torch.float32, device=device)
        else:
            self.volume = torch.empty((image.shape[0], *padded_shape), dtype=torch.float32, device=device)
        self.chunk = _chunk_planes(image.shape[2:])
        self.uploaded = 0  # planes of ``image`` already on the device
        self.non_finite = torch.zeros((), dtype=torch.int64, device=device)
        self.counts_non_finite = np.issubdtype(image.dtype, np.floating)
        if device.type == "cuda":
            self.compute_stream = torch.cuda.current_stream(device)
            self.copy_stream = torch.cuda.Stream(device)
            self.copy_stream.wait_stream(self.compute_stream)  # the pad fill (and any earlier use of the memory) first
            self.volume.record_stream(self.copy_stream)  # freed early (cancel): not reused before its uploads end
            chunk_numel = image.shape[0] * self.chunk * image.shape[2] * image.shape[3]
            self.buffers = [torch.empty(chunk_numel, dtype=torch.float32, pin_memory=True) for _ in range(2)]
            self.events: List[Optional[torch.cuda.Event]] = [None, None]
            self.turn = 0

    def batch(self, windows: Sequence[Tuple[slice, ...]]) -> torch.Tensor:
        needed = min(max(window[0].stop for window in windows) - self.leading[0], self.image.shape[1])
        while self.uploaded < needed:
            stop = min(self.uploaded + self.chunk, self.image.shape[1])
            self._upload(self.uploaded, stop)
            self.uploaded = stop
        batch = torch.stack([self.volume[(slice(None),) + window] for window in windows])
        return batch.contiguous(memory_format=self.memory_format)

    def _upload(self, start: int, stop: int) -> None:
        lead_k, lead_j, lead_i = self.leading
        rows, columns = self.image.shape[2:]
        target = self.volume[:, lead_k + start:lead_k + stop, lead_j:lead_j + rows, lead_i:lead_i + columns]
        source = self.image[:, start:stop]
        if self.device.type != "cuda":
            target.copy_(torch.from_numpy(np.ascontiguousarray(source, dtype=np.float32)))
        else:
            index, self.turn = self.turn, 1 - self.turn
            if self.events[index] is not None:
                self.events[index].synchronize()  # its previous chunk has left the buffer
            host = self.buffers[index][:source.size].view(source.shape)  # contiguous: one true async copy
            np.copyto(host.numpy(), source, casting="unsafe")  # any dtype to float32, as the host path does
            with torch.cuda.stream(self.copy_stream):
                target.copy_(host, non_blocking=True)
                self.events[index] = self.copy_stream.record_event()
            self.compute_stream.wait_event(self.events[index])
        if self.counts_non_finite:
            self.non_finite += torch.count_nonzero(~torch.isfinite(target))

    def check_finite(self) -> None:
        _raise_if_not_finite(int(self.non_finite))


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
    ``amp_dtype`` on CUDA only. ``memory_budget_bytes`` bounds what the run keeps on the device (default: a quarter
    of the memory available there): the input, when it lives there, and the accumulator slab, which is never
    shallower than one ROI. ``input_on_device``: None keeps the padded float32 input on the device when it takes at
    most half the budget (never on CPU, where the host array is used as it is); True or False forces the choice.
    ``channels_last`` stores activations as NDHWC (faster with oneDNN/cuDNN on some machines; default off).
    """

    def __init__(self, network: torch.nn.Module, roi_size: Sequence[int] = (96, 96, 96), sw_batch_size: int = 4,
                 overlap: float = 0.25, blend_mode: str = "gaussian", sigma_scale: float = 0.125,
                 device: Union[str, torch.device, None] = None, amp: bool = True,
                 amp_dtype: torch.dtype = torch.float16, memory_budget_bytes: Optional[int] = None,
                 input_on_device: Optional[bool] = None, channels_last: bool = False) -> None:
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
        self.input_on_device = input_on_device

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
        padding = _roi_padding(image.shape[1:], self.roi_size)
        padded_shape = tuple(size + lead + trail for size, (lead, trail) in zip(image.shape[1:], padding))
        windows = window_slices(padded_shape, self.roi_size, self.overlap)
        importance = compute_importance_map(self.roi_size, mode=self.blend_mode, sigma_scale=self.sigma_scale,
                                            device=self.device, dtype=torch.float32)[None]
        progress.report(0.0, f"Sliding window: {len(windows)} windows of {self.roi_size} on {self.device.type}")
        benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = benchmark or self.device.type == "cuda"
        try:
            with torch.inference_mode():
                budget = self._memory_budget()
                source, budget = self._window_source(image, padding, padded_shape, pad_value, budget)
                writer = _ResultWriter(output, activation, channels, probability_dtype, image.shape[1:],
                                       tuple(lead for lead, _ in padding))
                result = self._predict(source, windows, importance, writer, budget, padded_shape, memmap,
                                       memmap_dir, progress)
        except BaseException as error:
            # Whoever holds the error (a Cancelled shown in the UI) holds its traceback, and with it every frame's
            # tensors: drop them now, then give the cached device blocks back to the driver.
            traceback.clear_frames(error.__traceback__)
            importance = image = source = writer = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise
        finally:
            torch.backends.cudnn.benchmark = benchmark
        progress.report(1.0, "Sliding window done")
        return result

    def _memory_budget(self) -> int:
        if self.memory_budget_bytes is not None:
            return int(self.memory_budget_bytes)
        return available_memory_bytes(self.device) // 4

    def _window_source(self, image: np.ndarray, padding: List[Tuple[int, int]], padded_shape: Tuple[int, ...],
                       pad_value: Optional[float], budget: int):
        """Where batches of windows come from, and the budget left for the slab: the input on the device, or staging."""
        padded_bytes = image.shape[0] * int(np.prod(padded_shape)) * 4
        on_device = self.input_on_device
        if on_device is None:
            on_device = self.device.type != "cpu" and padded_bytes <= budget // 2
        if on_device:
            return _DeviceWindows(image, padding, pad_value, self.device, self.memory_format), budget - padded_bytes
        _check_finite_on_host(image)
        if any(lead or trail for lead, trail in padding):
            image = np.pad(image, [(0, 0)] + list(padding), mode="constant",
                           constant_values=_pad_value(image, pad_value))
        return _HostWindows(image, self.sw_batch_size, self.roi_size, self.device, self.memory_format), budget

    def _slab_depth(self, budget: int, channels: int, plane_shape: Tuple[int, int], with_weights: bool) -> int:
        """Planes per accumulator slab: what the budget allows, at least one ROI."""
        plane_bytes = (channels + int(with_weights)) * plane_shape[0] * plane_shape[1] * 4
        depth = max(int(budget // plane_bytes), self.roi_size[0])
        if depth * plane_bytes > budget:
            logger.warning("The memory budget left for the slab (%.2f GB) is below one ROI-deep slab (%.2f GB); "
                           "using one ROI.", max(budget, 0) / 2 ** 30, depth * plane_bytes / 2 ** 30)
        return depth

    def _predict(self, source, windows, importance, writer, budget, padded_shape, memmap, memmap_dir,
                 progress) -> np.ndarray:
        padded_depth, plane_shape = padded_shape[0], padded_shape[1:]
        with_weights = writer.output != "labels"  # argmax of a weighted sum equals argmax of the weighted mean
        autocast = torch.autocast("cuda", dtype=self.amp_dtype) if self.amp else contextlib.nullcontext()
        slab = result = None
        for first in range(0, len(windows), self.sw_batch_size):
            batch_windows = windows[first:first + self.sw_batch_size]
            batch = source.batch(batch_windows)
            with autocast:
                prediction = self.network(batch)
            prediction = self._checked(prediction, len(batch_windows), self.roi_size)
            if slab is None:
                depth = min(self._slab_depth(budget, prediction.shape[1], plane_shape, with_weights), padded_depth)
                slab = _SlabAccumulator(prediction.shape[1], depth, plane_shape, self.device, with_weights)
                result = writer.allocate(prediction.shape[1], memmap, memmap_dir)
            for window, window_prediction in zip(batch_windows, prediction):
                start = window[0].start
                if start + self.roi_size[0] > slab.base + slab.depth:
                    writer.write(result, slab, start)
                    slab.shift(start)
                slab.add(window, window_prediction.float(), importance)
            done = first + len(batch_windows)
            progress.report(done / len(windows), f"Sliding window: {done}/{len(windows)} windows")
        source.check_finite()
        writer.write(result, slab, padded_depth)
        writer.finish(result)
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
    """Turns finalised accumulator planes into the requested output and writes them, cropped, into the result.

    Planes are finalised on the accumulator's device a chunk at a time. From CUDA each chunk is copied without
    blocking into one of two pinned host buffers; a buffer is moved into the result only when it is needed again
    (or at ``finish``), after its copy's event, so the GPU keeps running while the host waits for nothing.
    """

    def __init__(self, output: str, activation: str, channels: Optional[Sequence[int]], probability_dtype,
                 original_shape: Tuple[int, int, int], leading_pad: Tuple[int, int, int]) -> None:
        self.output = output
        self.activation = activation
        self.requested_channels = channels
        self.probability_dtype = np.dtype(probability_dtype)
        self.original_shape = original_shape
        self.leading_pad = leading_pad
        self.chunk = _chunk_planes(original_shape[1:])
        self.pinned: List[Optional[torch.Tensor]] = [None, None]
        self.pending: List[Optional[Tuple[torch.cuda.Event, torch.Tensor, slice]]] = [None, None]
        self.turn = 0

    def allocate(self, out_channels: int, memmap: Optional[bool], memmap_dir: Optional[str]) -> np.ndarray:
        self.out_channels = out_channels
        channels = self.requested_channels
        self.channels = list(range(out_channels)) if channels is None else [int(c) for c in channels]
        if self.output == "labels":
            dtype = np.uint8 if out_channels <= 256 else np.uint16
            return _output_array(self.original_shape, dtype, memmap, memmap_dir)
        if self.output == "probabilities":
            if not self.channels or not all(0 <= c < out_channels for c in self.channels):
                raise InputError(f"channels {list(channels)} are not among the network's {out_channels} output "
                                 f"channels.")
            return _output_array((len(self.channels), *self.original_shape), self.probability_dtype, memmap,
                                 memmap_dir)
        return _output_array((out_channels, *self.original_shape), np.float32, memmap, memmap_dir)

    def write(self, result: np.ndarray, slab: _SlabAccumulator, end: int) -> None:
        """Finalise padded planes [slab.base, end) and store those that belong to the original volume."""
        pad_k, pad_j, pad_i = self.leading_pad
        depth, rows, columns = self.original_shape
        for start in range(slab.base, end, self.chunk):
            stop = min(start + self.chunk, end)
            first, last = max(start - pad_k, 0), min(stop - pad_k, depth)
            if first >= last:
                continue
            local = slice(first + pad_k - slab.base, last + pad_k - slab.base)
            crop = (slice(None), local, slice(pad_j, pad_j + rows), slice(pad_i, pad_i + columns))
            planes = self._finalise(slab.values[crop], None if slab.weights is None else slab.weights[crop])
            if planes.device.type == "cuda":
                self._copy_back(result, planes, slice(first, last))
            else:
                result[..., first:last, :, :] = planes.cpu().numpy()

    def finish(self, result: np.ndarray) -> None:
        """Move the chunks still in flight into the result."""
        for index in range(len(self.pending)):
            self._land(result, index)

    def _copy_back(self, result: np.ndarray, planes: torch.Tensor, planes_range: slice) -> None:
        index, self.turn = self.turn, 1 - self.turn
        self._land(result, index)
        if self.pinned[index] is None:
            largest = planes.numel() // planes.shape[-3] * self.chunk
            self.pinned[index] = torch.empty(largest, dtype=planes.dtype, pin_memory=True)
        host = self.pinned[index][:planes.numel()].view(planes.shape)
        host.copy_(planes, non_blocking=True)
        self.pending[index] = (torch.cuda.current_stream(planes.device).record_event(), host, planes_range)

    def _land(self, result: np.ndarray, index: int) -> None:
        if self.pending[index] is None:
            return
        event, host, planes_range = self.pending[index]
        event.synchronize()  # the device-to-host copy has finished: the pinned buffer holds the planes
        result[..., planes_range, :, :] = host.numpy()
        self.pending[index] = None

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
