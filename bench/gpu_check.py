"""One-shot check of device choice and the sliding-window runner on a CUDA GPU (about a minute on an H100).

    python bench/gpu_check.py              # on the lent GPU machine: checks + 512x512x300 throughput table
    python bench/gpu_check.py --cpu-smoke  # same code paths on CPU with small volumes (no GPU-only checks)

Checks, for both input paths (windows staged from the host, and the input uploaded in chunks on a side stream and
sliced on the device): slab result == whole-volume MONAI (float32, and within AMP tolerance under autocast), AMP labels
agree with float32 MONAI labels on >= 99.9% of voxels (or differ only where the float32 top-two logits are closer than
the AMP tolerance: an untrained network has many near-ties), the two paths agree exactly in float32, a NaN in the last
planes is reported, cancel raises ``Cancelled`` and leaves GPU memory where it was. Then the throughput table: plain
MONAI (float32, AMP) and the runner (input on the device, and staged), all from the same host numpy volume to a host
label map.
Then NoduleDetect on the first synthetic evaluation case (a coarse copy with --cpu-smoke): the candidate CNN's
probabilities, the centre map and the findings of the whole pipeline (classical and deep) on the GPU are those of the
CPU.
Exits 1 when a check fails, 2 when no working CUDA device was found without --cpu-smoke.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(Path(__file__).resolve().parent), str(REPO), str(REPO / "NoduleDetect"), str(REPO / "dev")]
from evaluate_nodule_detection import first_synthetic_case  # noqa: E402
from sliding_window import format_table, measure_throughput, synthetic_ct  # noqa: E402

from RecognitionCore.device import choose_device, describe_device  # noqa: E402
from RecognitionCore.errors import Cancelled, InputError  # noqa: E402
from RecognitionCore.inference import SlidingWindowRunner  # noqa: E402
from RecognitionCore.progress import CancelToken, Progress  # noqa: E402

ROI = (32, 48, 48)
FLOAT32_TOLERANCE = 1e-3  # TF32 off for this check; cuDNN may still pick other algorithms: close, not bitwise
AMP_TOLERANCE = 0.1  # float16 windows: ~1e-2 on logits of ~10; a misplaced window would differ by ~1
MIN_AMP_LABEL_AGREEMENT = 0.999
NODULE_PROBABILITY_TOLERANCE = 0.01  # TF32 convolutions: ~1e-3 on a probability; another patch would differ by more
MAP_PROBABILITY_TOLERANCE = 0.02  # float16 (AMP) windows: ~1e-3 on a probability; a shifted map would differ by ~1
NODULE_CENTER_TOLERANCE_MM = 0.5

failures = []


def check(name: str, passed: bool, detail: str) -> None:
    print(f"{'PASS' if passed else 'FAIL'}  {name}: {detail}", flush=True)
    if not passed:
        failures.append(name)


def small_network(device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(8, 16, 32), strides=(2, 2),
                num_res_units=1).to(device).eval()


def monai_logits(network, volume: np.ndarray, device: torch.device, amp: bool) -> np.ndarray:
    inputs = torch.from_numpy(volume)[None, None].to(device)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=amp and device.type == "cuda"):
        logits = sliding_window_inference(inputs, ROI, 4, network, overlap=0.25, mode="gaussian")
    return logits[0].float().cpu().numpy()


def check_runner(device: torch.device, shape) -> None:
    allow_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # TF32 convolutions round like float16: "float32" must mean float32 here
    try:
        compare_with_monai(device, shape)
    finally:
        torch.backends.cudnn.allow_tf32 = allow_tf32


def compare_with_monai(device: torch.device, shape) -> None:
    network = small_network(device)
    volume = synthetic_ct(shape, seed=1)
    expected = monai_logits(network, volume, device, amp=False)
    expected_amp = monai_logits(network, volume, device, amp=True)
    float32_logits = {}
    for amp, on_device in ((False, False), (False, True), (True, False), (True, True)):
        runner = SlidingWindowRunner(network, ROI, sw_batch_size=4, overlap=0.25, device=device, amp=amp,
                                     memory_budget_bytes=1, input_on_device=on_device)
        name = f"{'AMP' if runner.amp else 'float32'}, input {'on the device' if on_device else 'staged'}"
        logits = runner(volume, output="logits")
        reference, tolerance = (expected_amp, AMP_TOLERANCE) if amp else (expected, FLOAT32_TOLERANCE)
        difference = float(np.abs(logits - reference).max())
        largest = float(np.abs(reference).max())
        check(f"slabs == whole-volume MONAI ({name})", difference < tolerance,
              f"max |difference| {difference:.2e} (tolerance {tolerance:g}, |logits| up to {largest:.1f})")
        if not amp:
            float32_logits[on_device] = logits
        labels = runner(volume, output="labels")
        disagreeing = labels != expected.argmax(0)
        agreement = 1 - float(np.mean(disagreeing))
        ranked = np.sort(expected, axis=0)
        margins = (ranked[-1] - ranked[-2])[disagreeing]  # float32 gap between the two best classes
        widest = float(margins.max()) if margins.size else 0.0
        required = MIN_AMP_LABEL_AGREEMENT if runner.amp else 1 - 1e-5
        check(f"labels ({name}) == argmax of float32 MONAI",
              agreement >= required or (runner.amp and widest < AMP_TOLERANCE),
              f"{agreement:.6f} of voxels agree (required {required}, or only near-ties differ); "
              f"widest float32 margin among differing voxels {widest:.2e}")
    difference = float(np.abs(float32_logits[True] - float32_logits[False]).max())
    check("input on the device == staged input (float32 logits)", difference < FLOAT32_TOLERANCE,
          f"max |difference| {difference:.2e}")
    whole = SlidingWindowRunner(network, ROI, sw_batch_size=4, overlap=0.25, device=device, amp=False)
    difference = float(np.abs(whole(volume, output="logits") - expected).max())
    check("default budget and input placement (on a GPU: one slab, input on the device) == MONAI",
          difference < FLOAT32_TOLERANCE,
          f"max |difference| {difference:.2e}")
    broken = volume.copy()
    broken[-2, 5, 7] = np.nan
    message = ""
    try:
        whole(broken)
    except InputError as error:
        message = str(error)
    check("NaN in the last planes is reported (default input placement)", "1 NaN" in message, repr(message))
    for on_device in (False, True):
        check_cancel(network, volume, device, on_device)


def check_cancel(network, volume: np.ndarray, device: torch.device, on_device: bool) -> None:
    runner = SlidingWindowRunner(network, ROI, sw_batch_size=2, device=device, memory_budget_bytes=1,
                                 input_on_device=on_device)
    runner(volume)  # warm-up: persistent library workspaces belong to the baseline
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    token = CancelToken()
    reports = []

    def cancel_after_second(fraction, message):
        reports.append(fraction)
        if len(reports) == 2:
            token.cancel()

    cancelled = None
    try:
        runner(volume, output="probabilities", probability_dtype=np.float16,
               progress=Progress(cancel_after_second, token))
    except Cancelled as error:
        cancelled = error
    path = f"input {'on the device' if on_device else 'staged'}"
    check(f"cancel raises Cancelled ({path})", cancelled is not None, f"after {len(reports)} reports")
    if device.type != "cuda":
        return
    while_alive = torch.cuda.memory_allocated(device) - baseline
    cancelled = None
    gc.collect()
    after = torch.cuda.memory_allocated(device) - baseline
    check(f"cancel frees GPU memory ({path})", while_alive == 0 and after == 0,
          f"{while_alive} bytes above baseline while the error is held, {after} after it is dropped")


def check_nodule_detection(device: torch.device, coarse: bool) -> None:
    """The candidate CNN, the nodule centre map and ``detect_nodules`` (method "both": the networks and the deep
    detector) on ``device`` against the CPU, on the first synthetic evaluation case."""
    from NoduleDetectLib import detection
    from NoduleDetectLib.patch_classifier import candidate_patches

    coarse_grid = dict(size_ijk=(128, 128, 48), spacing_mm=(2.75, 2.75, 6.25))
    image = first_synthetic_case(coarse_grid if coarse else None).image
    lungs = detection.lung_mask(detection.segment_lungs(image))
    patches = candidate_patches(image, [c.center_lps_mm for c in detection.blob_candidates(image, lungs)])
    models = detection.CandidateClassifier.load()
    network = models.network
    seconds, probabilities = {}, {}
    for name in ("cpu", str(device)):
        network.predict_proba(patches[:1], device=name)  # warm-up: CUDA context, cuDNN's choice of kernels
        started = time.perf_counter()
        probabilities[name] = network.predict_proba(patches, device=name)
        seconds[name] = time.perf_counter() - started
    difference = float(np.abs(probabilities["cpu"] - probabilities[str(device)]).max())
    check(f"candidate CNN on {device} = on the CPU", difference <= NODULE_PROBABILITY_TOLERANCE,
          f"{len(patches)} candidates, largest probability difference {difference:.1e}; "
          f"{seconds['cpu']:.2f} s on the CPU, {seconds[str(device)]:.2f} s on {device}")
    maps = {name: models.centre_map.predict(image, lungs, name)[0] for name in ("cpu", str(device))}
    difference = float(np.abs(maps["cpu"] - maps[str(device)]).max())
    check(f"nodule centre map on {device} = on the CPU", difference <= MAP_PROBABILITY_TOLERANCE,
          f"{maps['cpu'].size} voxels, largest difference {difference:.1e} (AMP on a GPU)")
    results = {}
    for name in ("cpu", str(device)):
        started = time.perf_counter()
        results[name] = detection.detect_nodules(image, "both", min_confidence=0.5, device=name)
        print(f"detect_nodules(method='both', device='{name}'): {time.perf_counter() - started:.1f} s, steps "
              f"{ {step: round(value, 1) for step, value in results[name].seconds.items()} }, "
              f"{len(results[name].nodules)} findings", flush=True)
    expected, found = results["cpu"].nodules, results[str(device)].nodules
    pairs = [(a, min(found, key=lambda b: np.linalg.norm(np.subtract(a.center_lps_mm, b.center_lps_mm))))
             for a in expected] if found else []
    distance = max((float(np.linalg.norm(np.subtract(a.center_lps_mm, b.center_lps_mm))) for a, b in pairs),
                   default=0.0)
    confidence = max((abs(a.confidence - b.confidence) for a, b in pairs), default=0.0)
    check(f"findings on {device} = on the CPU", len(expected) == len(found) and len(pairs) == len(expected)
          and distance <= NODULE_CENTER_TOLERANCE_MM and confidence <= NODULE_PROBABILITY_TOLERANCE,
          f"{len(expected)} vs {len(found)} findings; centres within {distance:.2f} mm, confidences within "
          f"{confidence:.1e}; found by {dict(Counter('+'.join(a.methods) for a in expected))}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="run every code path on CPU with small volumes")
    args = parser.parse_args()
    started = time.perf_counter()
    device = choose_device("auto")
    print(f"choose_device('auto') = {device}; describe_device = {describe_device(device)}; torch {torch.__version__}")
    if args.cpu_smoke:
        device = choose_device("cpu")
    elif device.type != "cuda":
        print("No working CUDA device; run with --cpu-smoke for the CPU code paths.")
        return 2
    check_runner(device, (40, 96, 80) if args.cpu_smoke else (96, 160, 144))
    shape = (64, 128, 128) if args.cpu_smoke else (300, 512, 512)
    result = measure_throughput(synthetic_ct(shape), device, roi_size=(96, 96, 96), sw_batch_size=4, overlap=0.25,
                                repeats=1 if args.cpu_smoke else 2, amp=True)
    print(format_table(result))
    print(f"(label agreement of the AMP runner with float32 plain MONAI is informative only: an untrained network "
          f"has many near-tied voxels; {result['label_agreement']:.6f})")
    if device.type == "cuda":
        check("runner (input on the device) at least as fast as plain MONAI AMP", result["ratio_vs_plain_amp"] >= 1.0,
              f"throughput ratio {result['ratio_vs_plain_amp']:.3f}")
        print(f"(labels of the runner vs plain MONAI AMP {result['label_agreement_amp']:.6f}, vs the staged runner "
              f"{result['staged_label_agreement']:.6f}: expect >= 0.999 and 1.0, near-ties aside)")
    check_nodule_detection(device, coarse=args.cpu_smoke)
    print(f"{len(failures)} check(s) failed{': ' + ', '.join(failures) if failures else ''}; "
          f"{time.perf_counter() - started:.0f} s in all")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
