"""NoduleDetect benchmark: end-to-end time and peak RSS of the default (classical) pipeline on LIDC-IDRI-0001 and on a
512 x 512 x 300 resampled copy, and the deep detector inside the lung box against plain MONAI sliding-window
inference of the same network over the whole volume, in one run (and against our own windows over the whole volume,
several per pass as the deep path runs them, which tells the gain of batching from that of the lung windows).

    .venv/bin/python bench/nodule_detection.py [--ct PATH | --ct phantom] [--device cpu|cuda] [--skip-deep]

``--ct phantom``: the first synthetic evaluation case (dev/evaluate_nodule_detection.py), generated in each process;
it needs neither ../shared nor slicer-core (for a GPU machine). Each measurement runs in its own process so that its
peak RSS is its own. Goals (2 CPU cores): <= 30 s end to end, peak RSS <= 3 GB, deep detector >= 5x faster than
plain MONAI over the whole volume.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "NoduleDetect")]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def load(ct: str, slices: int):
    import SimpleITK as sitk

    from RecognitionCore.preprocessing import resample_to_reference

    if ct == "phantom":
        sys.path.insert(0, str(REPO / "dev"))
        from evaluate_nodule_detection import first_synthetic_case

        image = first_synthetic_case().image
    else:
        from RecognitionCore.io import read_image  # needs slicer-core, which a GPU machine may lack

        image = read_image(ct)
    if slices and slices != image.GetSize()[2]:
        spacing = list(image.GetSpacing())
        spacing[2] *= image.GetSize()[2] / slices
        reference = sitk.Image([image.GetSize()[0], image.GetSize()[1], slices], image.GetPixelID())
        reference.SetSpacing(spacing)
        reference.SetOrigin(image.GetOrigin())
        reference.SetDirection(image.GetDirection())
        image = sitk.Cast(resample_to_reference(image, reference, "linear"), sitk.sitkInt16)
    return image


def detector():
    """The installed default detector, else the shipped architecture untrained (speed does not depend on the
    weights; the number of boxes found then means nothing)."""
    from NoduleDetectLib import detection
    from RecognitionCore.errors import ModelError
    from RecognitionCore.models import ModelCard
    from RecognitionCore.networks import NoduleDetector

    try:
        return detection.load_detector()
    except ModelError:
        network = NoduleDetector.build("small").eval()
        card = ModelCard.from_dict({"id": "untrained small detector", "title": "untrained", "task": "detection",
                                    "labels": {"0": "nodule"}, "spacing_mm": [1.4, 1.4, 2.0],
                                    "intensity": {"type": "window", "hu_min": -1024, "hu_max": 300},
                                    "roi_size": [96, 96, 64], "licence": "Apache-2.0",
                                    "architecture": network.architecture(),
                                    "weights": {"file": "untrained.pt", "sha256": "0" * 64}})
        return card, network


def child(ct: str, slices: int, what: str, device: str) -> dict:
    """One measurement in this process: 'pipeline', 'deep_lung_box' (the deep path: lungs, the detector on the
    lung box's windows that hold lung, each kept box segmented), 'deep_whole_volume' (plain MONAI: RetinaNetDetector
    with its SlidingWindowInferer at MONAI's defaults over the whole volume, boxes only) or 'deep_whole_volume_batched'
    (our windows over the whole volume, boxes only: the same windows as MONAI, several per pass)."""
    from NoduleDetectLib import detection
    from RecognitionCore.predict import predict_nodules, predict_nodules_monai
    from RecognitionCore.progress import Progress

    image = load(ct, slices)
    before = peak_rss_mb()
    started = time.perf_counter()
    if what == "pipeline":
        result = detection.detect_nodules(image, "classical", min_confidence=0.5, device=device)
        found = len(result.nodules)
        steps = {k: round(v, 1) for k, v in result.seconds.items()}
    else:
        card, network = detector()
        steps = {"model": card.id}
        if what == "deep_lung_box":
            loaded = time.perf_counter()
            lungs = detection.lung_mask(detection.segment_lungs(image))
            lungs_done = time.perf_counter()
            first_mask = []  # when the first box is segmented: the detector's part ends there

            def mark(fraction, message):
                if message.startswith("Segmenting") and not first_mask:
                    first_mask.append(time.perf_counter())

            found = len(detection.deep_candidates(image, lungs, card, network, device, Progress(mark)))
            masks_start = first_mask[0] if first_mask else time.perf_counter()
            steps.update(lungs=round(lungs_done - loaded, 1), detector=round(masks_start - lungs_done, 1),
                         masks=round(time.perf_counter() - masks_start, 1))
        elif what == "deep_whole_volume":
            found = len(predict_nodules_monai(image, card, network, device=device))
        else:
            found = len(predict_nodules(image, card, network, device=device))
    return {"seconds": round(time.perf_counter() - started, 1), "peak_rss_mb": round(peak_rss_mb()),
            "rss_before_mb": round(before), "found": found, "steps": steps, "size": list(image.GetSize())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ct", default=str(REPO.parent / "shared" / "data" / "lidc" / "LIDC-IDRI-0001"))
    parser.add_argument("--device", default="cpu", help="cpu (the goals' setting), cuda or auto")
    parser.add_argument("--skip-deep", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("SLICES", "WHAT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.ct, int(args.child[0]), args.child[1], args.device)))
        return 0
    runs = [(0, "pipeline"), (300, "pipeline")]
    if not args.skip_deep:
        runs += [(0, "deep_lung_box"), (0, "deep_whole_volume"), (0, "deep_whole_volume_batched")]
    rows = []
    for slices, what in runs:
        output = subprocess.run([sys.executable, __file__, "--ct", args.ct, "--device", args.device,
                                 "--child", str(slices), what],
                                capture_output=True, text=True)
        if output.returncode:
            rows.append((what, slices, f"failed: {output.stderr.strip().splitlines()[-1]}"))
            continue
        rows.append((what, slices, json.loads(output.stdout.strip().splitlines()[-1])))
    print(f"CT: {args.ct}; device: {args.device}")
    print(f"{'measurement':<26} {'volume':<16} {'seconds':>8} {'peak RSS MB':>12} {'found':>6}  steps")
    for what, slices, result in rows:
        if isinstance(result, str):
            print(f"{what:<26} {slices or 'original':<16} {result}")
            continue
        size = "x".join(map(str, result["size"]))
        print(f"{what:<26} {size:<16} {result['seconds']:>8} {result['peak_rss_mb']:>12} {result['found']:>6}  "
              f"{result['steps']}")
    deep = {what: result for what, _, result in rows if what.startswith("deep") and not isinstance(result, str)}
    if "deep_lung_box" in deep:
        path = deep["deep_lung_box"]
        for baseline, name in (("deep_whole_volume", "plain MONAI"), ("deep_whole_volume_batched", "our windows")):
            if baseline in deep:
                print(f"{name} over the whole volume vs the deep path: boxes {deep[baseline]['seconds']:.1f} s vs "
                      f"{path['steps']['detector']:.1f} s in the lung box "
                      f"({deep[baseline]['seconds'] / path['steps']['detector']:.1f}x faster); with the lungs and "
                      f"the masks {path['seconds']:.1f} s ({deep[baseline]['seconds'] / path['seconds']:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
