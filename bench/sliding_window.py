"""Throughput and peak memory: plain ``monai.inferers.sliding_window_inference`` versus ``SlidingWindowRunner``.

Both run the same seeded MONAI 3D UNet with the same ROI, overlap, batch size and Gaussian blending, start from the
same float32 numpy volume on the host and produce the same thing, a uint8 label map on the host (plain: upload,
whole-volume logits, argmax, copy back; every step is timed), as a Slicer module does. Importable (the foundation
benchmark calls ``measure_throughput`` on a real CT) and runnable:

    python bench/sliding_window.py                  # synthetic 256x256x128 volume on the best device
    python bench/sliding_window.py CT.nrrd --device cpu --repeats 2
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from RecognitionCore.device import choose_device, describe_device  # noqa: E402
from RecognitionCore.inference import SlidingWindowRunner  # noqa: E402


def benchmark_network(seed: int = 0, out_channels: int = 2) -> torch.nn.Module:
    """A mid-sized, seeded MONAI 3D UNet (weights do not matter for speed)."""
    torch.manual_seed(seed)
    return UNet(spatial_dims=3, in_channels=1, out_channels=out_channels, channels=(16, 32, 64, 128),
                strides=(2, 2, 2), num_res_units=2).eval()


def synthetic_ct(shape_kji: Sequence[int] = (128, 256, 256), seed: int = 0) -> np.ndarray:
    """A float32 volume in [0, 1] shaped like a normalised chest CT: air outside, a noisy body, brighter blobs."""
    rng = np.random.default_rng(seed)
    k, j, i = np.ogrid[:shape_kji[0], :shape_kji[1], :shape_kji[2]]
    rows, columns = shape_kji[1], shape_kji[2]
    radius = ((j - rows / 2) / (0.42 * rows)) ** 2 + ((i - columns / 2) / (0.46 * columns)) ** 2
    body = np.where(radius < 1, 0.5, 0.0).astype(np.float32)
    volume = np.broadcast_to(body, tuple(shape_kji)).copy()
    volume += rng.normal(0, 0.05, size=volume.shape).astype(np.float32)
    for _ in range(12):
        center = [rng.integers(0, size) for size in shape_kji]
        blob = ((k - center[0]) ** 2 + (j - center[1]) ** 2 + (i - center[2]) ** 2) < rng.integers(4, 15) ** 2
        volume[blob] = 0.9
    return np.clip(volume, 0, 1)


class _PeakHostMemory:
    """Peak resident memory of this process while the block runs (sampled from /proc, else ru_maxrss)."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()

    @staticmethod
    def current_bytes() -> int:
        try:
            with open("/proc/self/statm") as statm:
                return int(statm.read().split()[1]) * resource.getpagesize()
        except OSError:
            return _max_rss_bytes()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_bytes = max(self.peak_bytes, self.current_bytes())

    def __enter__(self) -> "_PeakHostMemory":
        self.start_bytes = self.peak_bytes = self.current_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self.current_bytes())


def _max_rss_bytes() -> int:
    """Lifetime peak RSS of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _plain_monai_labels(network, volume, device, roi_size, sw_batch_size, overlap, amp, argmax_seconds: list):
    """What a user would write with MONAI: host volume to the device, no_grad, optional autocast, argmax, to host.

    The time of the final argmax is appended to ``argmax_seconds`` (on CPU it is a visible share of the total).
    """
    autocast = torch.autocast("cuda", dtype=torch.float16) if amp else contextlib.nullcontext()
    inputs = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None].to(device)
    with torch.no_grad(), autocast:
        logits = sliding_window_inference(inputs, roi_size, sw_batch_size, network, overlap=overlap, mode="gaussian")
    _synchronize(device)
    start = time.perf_counter()
    labels = logits.argmax(1)[0].to(torch.uint8).cpu().numpy()
    argmax_seconds.append(time.perf_counter() - start)
    return labels


def _timed(function, device: torch.device):
    """Run once; return (result, wall seconds, process CPU seconds, peak memory above the level at the start).

    Memory is host RSS on CPU and allocated GPU memory on CUDA. CPU seconds are less disturbed than wall time by other
    processes sharing the cores.
    """
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    _synchronize(device)
    with _PeakHostMemory() as host:
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        result = function()
        _synchronize(device)
        wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - baseline
    else:
        peak = host.peak_bytes - host.start_bytes
    return result, wall, cpu, peak


def measure_throughput(volume_kji: np.ndarray, device="auto", roi_size: Sequence[int] = (96, 96, 96),
                       sw_batch_size: int = 4, overlap: float = 0.25, repeats: int = 1, amp: bool = True,
                       channels_last: bool = False, network: Optional[torch.nn.Module] = None) -> Dict[str, object]:
    """Voxels/s and peak memory of plain MONAI and of the runner on ``volume_kji`` (intensities as the net expects).

    Every path starts from the same host float32 array and ends with a host uint8 label map, both inside the timing.
    On CUDA the plain path is timed in float32 and with autocast float16 (``plain_amp_*``), and the runner also with
    its windows staged from the host (``runner_staged_*``, as for a volume too large for the device); the runner uses
    AMP when ``amp``. Each path runs ``repeats`` times, interleaved, after a warm-up (one window; on CUDA a whole
    runner pass); the best time counts. The ``ratio`` is runner / plain float32 throughput (``cpu_time_ratio`` the
    same from process CPU time); ``*_peak_bytes`` is the peak memory above the level before the run (host RSS on
    CPU, allocated on CUDA); ``plain_argmax_seconds`` is the share of the plain time spent in the final ``argmax``
    (slow over the channel axis on CPU; the runner uses ``max(dim).indices``); ``label_agreement`` is the fraction of
    runner labels equal to plain float32 labels (``label_agreement_amp``: to plain AMP labels).
    """
    device = choose_device(device) if isinstance(device, str) else torch.device(device)
    volume = np.ascontiguousarray(volume_kji, dtype=np.float32)
    network = (network or benchmark_network()).to(device).eval()
    runner = SlidingWindowRunner(copy.deepcopy(network), roi_size, sw_batch_size=sw_batch_size, overlap=overlap,
                                 blend_mode="gaussian", device=device, amp=amp, channels_last=channels_last)
    argmax_seconds: list = []
    paths = {"plain": lambda: _plain_monai_labels(network, volume, device, roi_size, sw_batch_size, overlap, False,
                                                  argmax_seconds),
             "runner": lambda: runner(volume, output="labels")}
    if device.type == "cuda":
        paths["plain_amp"] = lambda: _plain_monai_labels(network, volume, device, roi_size, sw_batch_size, overlap,
                                                         True, [])
        staged = SlidingWindowRunner(runner.network, roi_size, sw_batch_size=sw_batch_size, overlap=overlap,
                                     blend_mode="gaussian", device=device, amp=amp, input_on_device=False,
                                     channels_last=channels_last)
        paths["runner_staged"] = lambda: staged(volume, output="labels")
    window = np.zeros(tuple(roi_size), np.float32)
    runner(volume if device.type == "cuda" else window)  # CUDA: a whole pass, so cudnn.benchmark's search is not timed
    with torch.no_grad():
        network(torch.from_numpy(window)[None, None].to(device))
    best: Dict[str, float] = {}
    best_cpu: Dict[str, float] = {}
    peaks: Dict[str, int] = {}
    labels: Dict[str, np.ndarray] = {}
    for _ in range(max(int(repeats), 1)):
        for name, run in paths.items():
            labels[name], seconds, cpu_seconds, peak = _timed(run, device)
            best[name] = min(best.get(name, float("inf")), seconds)
            best_cpu[name] = min(best_cpu.get(name, float("inf")), cpu_seconds)
            peaks[name] = max(peaks.get(name, 0), peak)
    voxels = int(volume.size)
    result: Dict[str, object] = {"device": describe_device(device), "shape_kji": tuple(volume.shape),
                                 "voxels": voxels, "roi_size": tuple(roi_size), "sw_batch_size": sw_batch_size,
                                 "overlap": overlap, "amp": bool(amp and device.type == "cuda"),
                                 "channels_last": channels_last, "repeats": max(int(repeats), 1)}
    for name in paths:
        result[f"{name}_seconds"] = best[name]
        result[f"{name}_cpu_seconds"] = best_cpu[name]
        result[f"{name}_voxels_per_s"] = voxels / best[name]
        result[f"{name}_peak_bytes"] = peaks[name]
    result["ratio"] = best["plain"] / best["runner"]
    result["cpu_time_ratio"] = best_cpu["plain"] / best_cpu["runner"]
    if "plain_amp" in paths:
        result["ratio_vs_plain_amp"] = best["plain_amp"] / best["runner"]
        result["label_agreement_amp"] = float(np.mean(labels["runner"] == labels["plain_amp"]))
        result["staged_label_agreement"] = float(np.mean(labels["runner_staged"] == labels["runner"]))
    result["plain_argmax_seconds"] = min(argmax_seconds)
    result["label_agreement"] = float(np.mean(labels["runner"] == labels["plain"]))
    result["process_max_rss_bytes"] = _max_rss_bytes()
    return result


def format_table(result: Dict[str, object]) -> str:
    """The result as a small fixed-width table."""
    lines = [f"device {result['device']}, volume {result['shape_kji']} (k, j, i), roi {result['roi_size']}, "
             f"batch {result['sw_batch_size']}, overlap {result['overlap']}, best of {result['repeats']}; "
             f"every path: host float32 numpy in, host uint8 labels out (transfers timed)",
             f"{'path':<12}{'wall s':>9}{'CPU s':>9}{'Mvoxels/s':>11}{'+peak MB':>10}"]
    for name in ("plain", "plain_amp", "runner", "runner_staged"):
        if f"{name}_seconds" in result:
            megavoxels_per_s, peak_mb = result[f"{name}_voxels_per_s"] / 1e6, result[f"{name}_peak_bytes"] / 2 ** 20
            lines.append(f"{name:<12}{result[f'{name}_seconds']:>9.2f}{result[f'{name}_cpu_seconds']:>9.2f}"
                         f"{megavoxels_per_s:>11.3f}{peak_mb:>10.0f}")
    lines.append(f"process max RSS {result['process_max_rss_bytes'] / 2 ** 20:.0f} MB; runner / plain throughput "
                 f"ratio {result['ratio']:.3f} (CPU time ratio {result['cpu_time_ratio']:.3f})"
                 + f"; plain argmax {result['plain_argmax_seconds']:.2f} s"
                 + (f" (vs plain AMP: {result['ratio_vs_plain_amp']:.3f})" if "ratio_vs_plain_amp" in result else "")
                 + f"; label agreement {result['label_agreement']:.5f}"
                 + (f" (with plain AMP {result['label_agreement_amp']:.5f}, staged runner with runner "
                    f"{result['staged_label_agreement']:.5f})" if "label_agreement_amp" in result else ""))
    return "\n".join(lines)


def _load_volume(path: str) -> np.ndarray:
    """A CT from any SimpleITK-readable file or DICOM folder, or .npy, scaled from HU [-1000, 1000] to [0, 1]."""
    if path.endswith(".npy"):
        hu = np.load(path)
    else:
        import SimpleITK as sitk
        if Path(path).is_dir():
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(path))
            image = reader.Execute()
        else:
            image = sitk.ReadImage(path)
        hu = sitk.GetArrayFromImage(image)
    return ((np.clip(hu.astype(np.float32), -1000, 1000) + 1000) / 2000).astype(np.float32)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", help="CT image file, DICOM folder or .npy; default: synthetic volume")
    parser.add_argument("--shape", type=int, nargs=3, default=(128, 256, 256), help="synthetic volume (k, j, i)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--roi", type=int, nargs=3, default=(96, 96, 96))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--no-amp", action="store_true")
    args = parser.parse_args(argv)
    volume = _load_volume(args.path) if args.path else synthetic_ct(args.shape)
    result = measure_throughput(volume, args.device, args.roi, args.batch, args.overlap, args.repeats,
                                amp=not args.no_amp, channels_last=args.channels_last)
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
