"""Train the default models the extension ships, on generated phantoms only, reproducibly (fixed seeds), on CPU.

    .venv/bin/python dev/train_default_models.py [--device cpu|cuda] [--work DIR] [--shared ../shared/data]

Writes the weights and their cards into RecognitionCore/Resources/Models (catalogue.json), then measures each model
on a fresh synthetic test set and on the real cases in ../shared/data, and records those numbers in the card.
``--train-only`` and ``--evaluate-only`` split the two steps (e.g. train on a GPU machine, evaluate where the data is).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from RecognitionCore import datasets, evaluation, networks, training  # noqa: E402
from RecognitionCore.models import SHIPPED_CATALOGUE, Catalogue, add_to_manifest, load_network  # noqa: E402
from RecognitionCore.predict import predict_labels, predict_nodules  # noqa: E402

ORGANS = {1: "liver", 2: "spleen", 3: "kidney_right", 4: "kidney_left"}
ORGAN_TASK = training.SegmentationTask(ORGANS, (3.0, 3.0, 3.0), {"type": "window", "hu_min": -200, "hu_max": 300},
                                       (64, 64, 64))
ORGAN_CONFIG = training.TrainingConfig(max_epochs=40, iterations_per_epoch=25, batch_size=2, learning_rate=2e-3,
                                       patience_epochs=10, seed=0, device="cpu")
# From scratch, the anchor heads' sparse signal (a few matched anchors and 64 sampled ones per patch) gave validation
# CPM 0 after 2400 CPU iterations: so the backbone + FPN are first trained densely (every feature-map cell says
# whether it holds a nodule), then frozen while the FPN and the heads learn the boxes.
NODULE_TASK = training.DetectionTask((1.4, 1.4, 2.0), {"type": "window", "hu_min": -1024, "hu_max": 300},
                                     (64, 64, 32), dense_pretraining_iterations=6000)
NODULE_CONFIG = training.TrainingConfig(max_epochs=5, iterations_per_epoch=300, batch_size=2, learning_rate=1e-3,
                                        freeze_stages=3, patience_epochs=8, seed=0, device="cpu")
NODULE_CASES, NODULE_TEST_CASES = 36, 4
# The zoo's anchors (6x8x4 voxels and up) are sized for 0.7 mm voxels; at 1.4 mm nodules of 3-30 mm span 2-21
# voxels, so the anchors are halved to match them.
NODULE_ANCHORS_VOXELS = [[3, 4, 2], [4, 3, 3], [5, 5, 3]]
ABDOMEN_GRID = dict(size_ijk=(128, 128, 96), spacing_mm=(3.1, 3.1, 3.1))
CHEST_GRID = dict(size_ijk=(224, 224, 128), spacing_mm=(1.5, 1.5, 2.5))
# TotalSegmentator example labels (labels_total.csv) of our organs
TOTALSEGMENTATOR_ORGANS = {5: "liver", 1: "spleen", 2: "kidney_right", 3: "kidney_left"}


def organ_metrics(card, network, test_cases, shared: Path) -> dict:
    from RecognitionCore.io import read_image

    metrics = {}
    scores = {name: [] for name in ORGANS.values()}
    for case in test_cases:
        image, truth = training.load_task_case(case, ORGAN_TASK)
        predicted = predict_labels(image, card, network, device="cpu")
        dice = evaluation.dice_per_label(sitk.GetArrayFromImage(truth), sitk.GetArrayFromImage(predicted), ORGANS)
        for value, name in ORGANS.items():
            scores[name].append(dice[value])
    metrics[f"synthetic abdomen test set ({len(test_cases)} phantoms): Dice"] = {
        name: round(float(np.mean(values)), 3) for name, values in scores.items()}
    example = shared / "totalsegmentator"
    if (example / "example_ct.nii.gz").is_file():
        image = read_image(example / "example_ct.nii.gz")
        reference = sitk.GetArrayFromImage(read_image(example / "example_seg_fast_force_split.nii.gz"))
        truth = np.zeros_like(reference, dtype=np.uint8)
        ours = {name: value for value, name in ORGANS.items()}
        for value, name in TOTALSEGMENTATOR_ORGANS.items():
            truth[reference == value] = ours[name]
        predicted = sitk.GetArrayFromImage(predict_labels(image, card, network, device="cpu"))
        dice = evaluation.dice_per_label(truth, predicted, ORGANS)
        metrics["TotalSegmentator example CT (model labels as reference): Dice"] = {
            ORGANS[value]: round(float(score), 3) for value, score in dice.items()}
    return metrics


def nodule_metrics(card, network, test_cases, shared: Path) -> dict:
    from RecognitionCore.io import read_image

    def cpm_of(cases_with_images):
        detections, annotations, uids = [], [], []
        for uid, image, nodules in cases_with_images:
            uids.append(uid)
            for center, diameter in nodules:
                annotations.append(evaluation.Annotation(uid, tuple(center), float(diameter)))
            for center, _, score in predict_nodules(image, card, network, device="cpu"):
                detections.append(evaluation.Detection(uid, center, score))
        curve = evaluation.froc(detections, annotations, uids)
        sensitivities = evaluation.sensitivity_at_fps(curve)
        return {"CPM": round(float(evaluation.cpm(curve)), 3),
                "sensitivity at 1/8..8 FP/scan": [round(float(s), 3) for s in sensitivities]}

    metrics = {}
    synthetic = [(case.case_id, *datasets.load_detection_case(case)) for case in test_cases]
    metrics[f"synthetic chest test set ({len(test_cases)} phantoms)"] = cpm_of(synthetic)
    lidc = shared / "lidc"
    if (lidc / "annotations.csv").is_file():
        nodules, _ = datasets.read_annotations(lidc / "annotations.csv")
        uid_0001 = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
        real = []
        for uid, path in ((uid_0001, lidc / "LIDC-IDRI-0001"), (None, lidc / "LIDC-IDRI-0003.nrrd")):
            uid = uid or next(u for u in nodules if u != uid_0001)
            real.append((uid, read_image(path), nodules[uid]))
        metrics["LIDC-IDRI-0001 and -0003 (nodules >= 3 mm, reader clusters)"] = cpm_of(real)
    return metrics


def train_and_record(card_fields: dict, train_function, task, config, cases, architecture, work: Path, data: str,
                     args, validation_fraction: float = 0.2) -> None:
    """Train on the cases (split by patient), write the weights and put the card into the shipped catalogue."""
    started = time.time()
    train, validation = datasets.split_by_patient(cases, validation_fraction, seed=0)
    config = dataclasses.replace(config, device=args.device)
    network, result, _ = train_function(task, train, validation, work / card_fields["id"], config,
                                        architecture=architecture)
    description = {"data": f"{len(train)} training / {len(validation)} validation {data}",
                   "task": dataclasses.asdict(task), "config": dataclasses.asdict(config),
                   "seconds": round(time.time() - started),
                   "device": str(network.parameters().__next__().device), "threads": torch.get_num_threads()}
    card = training.write_model(network.cpu(), SHIPPED_CATALOGUE.parent, card_fields, architecture, result,
                                description)
    add_to_manifest(SHIPPED_CATALOGUE, card)
    (SHIPPED_CATALOGUE.parent / f"{card.id}.json").unlink()
    print(f"{card.id}: validation {result.start_metric:.3f} -> {result.best_metric:.3f} "
          f"(epoch {result.best_epoch} of {result.epochs_run}), {description['seconds']} s", flush=True)


def evaluate(model_id: str, test_cases, shared: Path, measure) -> None:
    """Measure a shipped model on held-out phantoms and the real cases; record the numbers in its card."""
    card = Catalogue().get(model_id)
    network = load_network(card, device="cpu")
    metrics = {key: value for key, value in (card.metrics or {}).items() if key.startswith("validation")}
    metrics.update(measure(card, network, test_cases, shared))
    add_to_manifest(SHIPPED_CATALOGUE, dataclasses.replace(card, metrics=metrics))
    print(f"{model_id}: {json.dumps(metrics, indent=1)}", flush=True)


ORGAN_CARD = {"id": "mir_abdomen_organs_unet", "title": "Abdominal organs (liver, spleen, kidneys), synthetic",
              "task": "segmentation", "labels": {str(k): v for k, v in ORGANS.items()},
              "spacing_mm": list(ORGAN_TASK.spacing_mm), "intensity": ORGAN_TASK.intensity,
              "roi_size": list(ORGAN_TASK.roi_size), "licence": "Apache-2.0",
              "description": "Small MONAI UNet trained only on generated abdominal phantoms: a default that runs "
                             "offline; fine-tune it on local cases before trusting it on patients.",
              "source": "dev/train_default_models.py"}
NODULE_CARD = {"id": "mir_lung_nodule_retinanet", "title": "Lung nodules (RetinaNet + mask head), synthetic",
               "task": "detection", "labels": {"0": "nodule"}, "spacing_mm": list(NODULE_TASK.spacing_mm),
               "intensity": NODULE_TASK.intensity, "roi_size": list(NODULE_TASK.roi_size), "licence": "Apache-2.0",
               "description": "Small 3D RetinaNet (ResNet + FPN, MONAI detection) with a per-box mask head, trained "
                              "only on generated chest phantoms with 3-30 mm nodules, on CPU: the backbone + FPN "
                              "were first trained densely (which feature-map cells hold nodule voxels), then frozen "
                              "while the FPN and the anchor heads learned the boxes. Low sensitivity, mostly for "
                              "large nodules (see the metrics): a default that runs offline and a starting point "
                              "for fine-tuning on local cases, not a clinical detector.",
               "source": "dev/train_default_models.py"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/mir-default-models")
    parser.add_argument("--shared", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--only", choices=("organs", "nodules"))
    parser.add_argument("--device", default="cpu", help="training device (recorded in the card)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (recorded in the card)")
    steps = parser.add_mutually_exclusive_group()
    steps.add_argument("--train-only", action="store_true")
    steps.add_argument("--evaluate-only", action="store_true", help="measure the shipped models again")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger(training.__name__).setLevel(logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    work, shared = Path(args.work), Path(args.shared)

    if args.only in (None, "organs"):
        cases = datasets.write_synthetic_segmentation_dataset(work / "abdomen", 30, seed=1000, kind="abdomen",
                                                              **ABDOMEN_GRID)
        if not args.evaluate_only:
            architecture = networks.segmenter_architecture("unet", out_channels=ORGAN_TASK.out_channels, size="small")
            train_and_record(dict(ORGAN_CARD), training.train_segmenter, ORGAN_TASK, ORGAN_CONFIG, cases[:24],
                             architecture, work, f"generated abdomen phantoms (seeds 1000-1023, {ABDOMEN_GRID})",
                             args)
        if not args.train_only:
            evaluate(ORGAN_CARD["id"], cases[24:], shared, organ_metrics)

    if args.only in (None, "nodules"):
        cases = datasets.write_synthetic_detection_dataset(work / "chest", NODULE_CASES, seed=2000,
                                                           nodules_per_case=4, **CHEST_GRID)
        training_cases = cases[:NODULE_CASES - NODULE_TEST_CASES]
        if not args.evaluate_only:
            train_and_record(dict(NODULE_CARD), training.train_detector, NODULE_TASK, NODULE_CONFIG, training_cases,
                             networks.detector_architecture("small", base_anchor_shapes=NODULE_ANCHORS_VOXELS), work,
                             f"generated chest phantoms (seeds 2000-{2000 + len(training_cases) - 1}, 4 nodules "
                             f"each, {CHEST_GRID})", args, validation_fraction=0.1)
        if not args.train_only:
            evaluate(NODULE_CARD["id"], cases[len(training_cases):], shared, nodule_metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
