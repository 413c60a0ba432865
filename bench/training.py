"""Training throughput (samples/s) and peak memory on CPU for both tasks, with the settings of the default models.

    python bench/training.py [--iterations 10] [--device cpu]

A sample is one training patch (the organ segmenter: 64^3 voxels at 3 mm; the nodule detector: 96 x 96 x 64 voxels
at 1.4 x 1.4 x 2 mm), with augmentation, forward, backward and optimizer step included. Prints a table.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dev"))
from RecognitionCore import datasets, networks, training  # noqa: E402
from RecognitionCore.device import choose_device  # noqa: E402
from train_default_models import (ABDOMEN_GRID, CHEST_GRID, NODULE_ANCHORS_VOXELS, NODULE_TASK,  # noqa: E402
                                  ORGAN_TASK)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure(network, batches, step, iterations: int, batch_size: int) -> dict:
    """Seconds per iteration (after one warm-up) and samples per second of ``step`` over ``batches``."""
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    network.train()
    for index in range(iterations + 1):
        if index == 1:
            started = time.perf_counter()
        batch = next(batches)
        optimizer.zero_grad(set_to_none=True)
        step(network, batch).backward()
        optimizer.step()
    seconds = (time.perf_counter() - started) / iterations
    return {"s/iteration": seconds, "samples/s": batch_size / seconds, "peak RSS MB": peak_rss_mb()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = choose_device(args.device)
    work = Path(tempfile.mkdtemp(prefix="mir-bench-training-"))
    rows = []

    cases = datasets.write_synthetic_segmentation_dataset(work / "abdomen", 2, seed=1000, kind="abdomen", **ABDOMEN_GRID)
    from monai.losses import DiceCELoss

    from RecognitionCore.augmentation import training_transforms

    prepared = [datasets.prepare_segmentation_pair(*training.load_task_case(case, ORGAN_TASK), ORGAN_TASK.spacing_mm,
                                                   ORGAN_TASK.intensity) for case in cases]
    transforms = training_transforms(ORGAN_TASK.roi_size, num_samples=args.batch_size, seed=0,
                                     settings=training.augmentation_settings(ORGAN_TASK.label_names))
    network = networks.build_segmenter("unet", out_channels=ORGAN_TASK.out_channels, size="small").to(device)
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    rows.append(("organ segmenter (UNet small, 64^3)", measure(
        network, training._sample_stream(prepared, transforms, args.batch_size, 0),
        lambda model, batch: loss(model(batch["image"].to(device)), batch["label"].to(device)),
        args.iterations, args.batch_size)))

    cases = datasets.write_synthetic_detection_dataset(work / "chest", 2, seed=2000, nodules_per_case=4, **CHEST_GRID)
    prepared = [datasets.prepare_detection_case(*datasets.load_detection_case(case), NODULE_TASK.spacing_mm,
                                                NODULE_TASK.intensity) for case in cases]
    detector = networks.NoduleDetector("small", base_anchor_shapes=NODULE_ANCHORS_VOXELS).to(device)
    rows.append(("nodule detector (RetinaNet small + masks, 96x96x64)", measure(
        detector, training._detection_batches(prepared, NODULE_TASK, args.batch_size, 0),
        lambda model, patches: training.detection_loss(model, patches, device), args.iterations, args.batch_size)))

    print(f"device {device}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"{args.iterations} timed iterations")
    print(f"{'task':55s} {'s/iteration':>12s} {'samples/s':>10s} {'peak RSS MB':>12s}")
    for name, result in rows:
        print(f"{name:55s} {result['s/iteration']:12.2f} {result['samples/s']:10.2f} {result['peak RSS MB']:12.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
