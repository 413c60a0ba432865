"""Training and fine-tuning: one loop for the segmenter and the detector, with transfer learning and honest numbers.

``Trainer`` runs epochs of a task's training step, validates after each epoch, keeps the best and the last
checkpoint (so a run can resume), stops early when the validation metric has not improved for ``patience_epochs``,
and writes a per-epoch log (CSV) and learning curves (PNG). Transfer learning freezes the first backbone stages
(frozen BatchNorm layers stay in eval mode) and gives the backbone a lower learning rate; the metric of the starting
model on the same validation cases is measured before training, so a user sees whether fine-tuning helped.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterable, List, Optional

import torch

from .errors import InputError
from .progress import Progress, as_progress

logger = logging.getLogger(__name__)

CHECKPOINT_LAST = "checkpoint_last.pt"
CHECKPOINT_BEST = "checkpoint_best.pt"
LOG_CSV = "training_log.csv"
CURVES_PNG = "learning_curves.png"


@dataclasses.dataclass
class TrainingConfig:
    """Settings of a run; stored in checkpoints and model cards."""

    max_epochs: int = 30
    iterations_per_epoch: int = 20
    batch_size: int = 2
    learning_rate: float = 1e-3
    backbone_lr_factor: float = 0.1      # backbone learning rate = learning_rate * factor (transfer learning)
    freeze_stages: int = 2               # the stem and the first stage of the backbone stay as they were
    unfreeze_at_epoch: Optional[int] = None  # train the frozen stages too from this epoch on
    patience_epochs: int = 8             # early stopping on the validation metric
    seed: int = 0
    amp: bool = True                     # mixed precision, on CUDA only
    device: str = "auto"
    min_free_disk_mb: float = 200.0      # refuse to start (or to save) with less free space in the output folder

    def __post_init__(self):
        for name in ("max_epochs", "iterations_per_epoch", "batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"Training setting {name} must be at least 1; got {getattr(self, name)}.")
        if not self.learning_rate > 0 or not self.backbone_lr_factor >= 0:
            raise InputError("The learning rate must be positive and the backbone factor non-negative.")
        if self.freeze_stages < 0 or self.patience_epochs < 1:
            raise InputError("freeze_stages must be >= 0 and patience_epochs >= 1.")


@dataclasses.dataclass
class TrainingResult:
    start_metric: float
    best_metric: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    log: List[dict]
    output_dir: Path
    frozen_parameters: List[str]

    @property
    def best_checkpoint(self) -> Path:
        return self.output_dir / CHECKPOINT_BEST


def check_free_disk(folder: Path, min_free_mb: float) -> None:
    """Raise InputError when ``folder`` has less free space than a checkpoint needs."""
    free_mb = shutil.disk_usage(folder).free / 2 ** 20
    if free_mb < min_free_mb:
        raise InputError(f"Not enough free disk space for checkpoints in {folder}: {free_mb:.0f} MB free, "
                         f"{min_free_mb:.0f} MB needed. Free some space or choose another output folder.")


def save_atomically(state: dict, path: Path, min_free_mb: float) -> None:
    """torch.save to a temporary file, then rename: a full disk or a crash never leaves a broken checkpoint."""
    check_free_disk(path.parent, min_free_mb)
    temporary = path.with_suffix(".part")
    try:
        torch.save(state, temporary)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        if error.errno == errno.ENOSPC:
            raise InputError(f"The disk holding {path.parent} is full: the checkpoint could not be written.") from None
        raise


class Trainer:
    """The loop. ``training_step(network, batch) -> loss`` and ``validate(network) -> metric`` (higher is better)
    come from the task; ``batches()`` yields training batches without end (sampled patches)."""

    def __init__(self, network: torch.nn.Module, training_step: Callable, validate: Callable[[torch.nn.Module], float],
                 batches: Callable[[], Iterable], config: TrainingConfig, output_dir, device: torch.device,
                 parameter_groups: Optional[list] = None, frozen_parameters: Optional[List[str]] = None,
                 unfreeze: Optional[Callable[[], None]] = None, progress: Optional[Progress] = None) -> None:
        self.network = network.to(device)
        self.training_step = training_step
        self.validate = validate
        self.batches = batches
        self.config = config
        self.output_dir = Path(output_dir)
        self.device = device
        self.frozen_parameters = list(frozen_parameters or [])
        self.unfreeze = unfreeze
        self.progress = as_progress(progress)
        groups = parameter_groups or [{"params": list(network.parameters()), "lr": config.learning_rate}]
        self.optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=1e-5)
        self.use_amp = config.amp and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)

    def run(self, resume: bool = False) -> TrainingResult:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        check_free_disk(self.output_dir, self.config.min_free_disk_mb)
        torch.manual_seed(self.config.seed)
        log, first_epoch, best_metric, best_epoch, start_metric = [], 1, float("-inf"), 0, None
        if resume and (self.output_dir / CHECKPOINT_LAST).is_file():
            state = torch.load(self.output_dir / CHECKPOINT_LAST, map_location=self.device, weights_only=True)
            self.network.load_state_dict(state["network"])
            self._apply_freezing_at(state["epoch"])  # the optimizer's groups as they were when it was saved
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            torch.set_rng_state(state["rng"])
            log, best_metric, best_epoch = state["log"], state["best_metric"], state["best_epoch"]
            start_metric, first_epoch = state["start_metric"], state["epoch"] + 1
            logger.info("Resuming at epoch %d (best %.4f at epoch %d)", first_epoch, best_metric, best_epoch)
        if start_metric is None:
            self.progress.report(0.0, "Measuring the starting model on the validation cases")
            start_metric = float(self._validate())
        stopped_early = False
        epoch = first_epoch - 1
        for epoch in range(first_epoch, self.config.max_epochs + 1):
            self._apply_freezing_at(epoch)
            started = time.perf_counter()
            train_loss = self._train_epoch(epoch)
            metric = float(self._validate())
            improved = metric > best_metric
            if improved:
                best_metric, best_epoch = metric, epoch
            log.append({"epoch": epoch, "train_loss": round(train_loss, 6), "val_metric": round(metric, 6),
                        "seconds": round(time.perf_counter() - started, 2),
                        "learning_rate": self.optimizer.param_groups[-1]["lr"]})
            self._save(epoch, log, best_metric, best_epoch, start_metric, improved)
            if epoch - best_epoch >= self.config.patience_epochs:
                stopped_early = True
                break
        return TrainingResult(start_metric, best_metric, best_epoch, epoch, stopped_early, log, self.output_dir,
                              self.frozen_parameters)

    def _apply_freezing_at(self, epoch: int) -> None:
        """From ``unfreeze_at_epoch`` on, the frozen stages train too, at the backbone learning rate."""
        if self.unfreeze is None or self.config.unfreeze_at_epoch is None or not self.frozen_parameters \
                or epoch < self.config.unfreeze_at_epoch:
            return
        self.unfreeze()
        parameters = dict(self.network.named_parameters())
        self.optimizer.add_param_group({"name": "unfrozen", "params": [parameters[n] for n in self.frozen_parameters],
                                        "lr": self.config.learning_rate * self.config.backbone_lr_factor})
        self.frozen_parameters = []

    def _train_epoch(self, epoch: int) -> float:
        self.network.train()
        losses = []
        batches = iter(self.batches())
        total = self.config.max_epochs * self.config.iterations_per_epoch
        for iteration in range(self.config.iterations_per_epoch):
            done = (epoch - 1) * self.config.iterations_per_epoch + iteration
            self.progress.report(done / total, f"Epoch {epoch}/{self.config.max_epochs}, iteration {iteration + 1}")
            batch = next(batches)
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", enabled=self.use_amp):
                loss = self.training_step(self.network, batch)
            if not torch.isfinite(loss):
                raise InputError(f"The training loss became {loss.item()} at epoch {epoch}: lower the learning rate "
                                 "or check the dataset (intensities, labels).")
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            losses.append(float(loss.detach()))
        return sum(losses) / len(losses)

    def _validate(self) -> float:
        self.network.eval()
        with torch.inference_mode():
            return self.validate(self.network)

    def _save(self, epoch, log, best_metric, best_epoch, start_metric, improved) -> None:
        state = {"network": self.network.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict(), "rng": torch.get_rng_state(), "epoch": epoch, "log": log,
                 "best_metric": best_metric, "best_epoch": best_epoch, "start_metric": start_metric,
                 "config": dataclasses.asdict(self.config)}
        save_atomically(state, self.output_dir / CHECKPOINT_LAST, self.config.min_free_disk_mb)
        if improved:
            save_atomically({"network": state["network"], "epoch": epoch, "metric": best_metric},
                            self.output_dir / CHECKPOINT_BEST, self.config.min_free_disk_mb)
        write_log(log, self.output_dir)


def write_log(log: List[dict], output_dir: Path) -> None:
    """The per-epoch log as CSV and the learning curves as PNG."""
    from .evaluation import plot_learning_curves

    with open(output_dir / LOG_CSV, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(log[0]))
        writer.writeheader()
        writer.writerows(log)
    plot_learning_curves(log, output_dir / CURVES_PNG)


def load_best_weights(network: torch.nn.Module, output_dir) -> torch.nn.Module:
    state = torch.load(Path(output_dir) / CHECKPOINT_BEST, map_location="cpu", weights_only=True)
    network.load_state_dict(state["network"])
    return network



# ---------------------------------------------------------------------------------------------------------------------
# Tasks: what is trained, on which samples, judged by which metric


def _prepared_cases(cases, load, prepare, progress: Progress, what: str) -> list:
    """Load, check and preprocess every case; a corrupt case is skipped with a warning, never a crash."""
    from .datasets import iter_valid

    prepared = [prepare(*loaded) for _, loaded in iter_valid(cases, load, progress=progress)]
    if not prepared:
        raise InputError(f"None of the {len(cases)} {what} cases could be used (see the warnings above).")
    return prepared


def _sample_stream(prepared: list, transforms, batch_size: int, seed: int):
    """Endless batches: a random case, augmented into ``batch_size`` patches, stacked."""
    import numpy as np

    rng = np.random.default_rng(seed)
    while True:
        samples = transforms(prepared[int(rng.integers(len(prepared)))])
        yield {key: torch.stack([torch.as_tensor(np.asarray(sample[key])) for sample in samples])
               for key in ("image", "label")}


def mean_foreground_dice(network, prepared_cases: list, label_values, roi_size, device) -> float:
    """Mean Dice over the card's labels (present in the truth) on whole preprocessed validation volumes."""
    from .evaluation import dice_per_label
    from .inference import SlidingWindowRunner

    runner = SlidingWindowRunner(network, roi_size=roi_size, sw_batch_size=2, device=device)
    scores = []
    for case in prepared_cases:
        predicted = runner(case["image"], output="labels")
        truth = case["label"][0]
        scores += [score for label, score in dice_per_label(truth, predicted, label_values).items()
                   if (truth == label).any()]
    return float(sum(scores) / len(scores)) if scores else 0.0


def relabel_by_name(labels, source_names: dict, task_names: dict):
    """Labels renumbered from a dataset's label map to the task's, matched by name (case-insensitive); structures
    the task does not segment become background."""
    import numpy as np
    import SimpleITK as sitk

    by_name = {name.lower(): value for value, name in task_names.items()}
    lookup = np.zeros(max(max(source_names, default=0), 255) + 1, dtype=np.uint8)
    for value, name in source_names.items():
        lookup[value] = by_name.get(name.lower(), 0)
    relabelled = sitk.GetImageFromArray(lookup[sitk.GetArrayViewFromImage(labels)])
    relabelled.CopyInformation(labels)
    return relabelled


def load_matching_weights(network: torch.nn.Module, state_dict: dict) -> List[str]:
    """Copy the starting model's weights wherever the shapes match (transfer learning to another label set);
    returns the names left at their new initialisation (e.g. the output layer for new labels)."""
    own = network.state_dict()
    matching = {name: value for name, value in state_dict.items()
                if name in own and tuple(own[name].shape) == tuple(value.shape)}
    network.load_state_dict(matching, strict=False)
    return sorted(set(own) - set(matching))


@dataclasses.dataclass
class SegmentationTask:
    """What a segmentation model is trained to do: labels, and the input its card declares."""

    label_names: dict            # {value: name}, 0 is background
    spacing_mm: tuple
    intensity: dict
    roi_size: tuple              # (I, J, K) patch size, in the network's voxels

    @property
    def out_channels(self) -> int:
        return max(self.label_names) + 1


def load_task_case(case, task: SegmentationTask):
    """(image, labels) of a case, checked against its own label map, renumbered to the task's labels by name."""
    from .datasets import load_segmentation_case

    image, labels = load_segmentation_case(case, allowed_labels=case.label_names or task.label_names)
    return image, relabel_by_name(labels, case.label_names or task.label_names, task.label_names)


def augmentation_settings(label_names: dict):
    """No left-right flips when labels tell left from right (a flip would swap their meaning)."""
    from .augmentation import AugmentationSettings

    lateral = any(side in name.lower() for name in label_names.values() for side in ("left", "right"))
    return AugmentationSettings(flip_axes=(1, 2)) if lateral else AugmentationSettings()


def train_segmenter(task: SegmentationTask, train_cases, validation_cases, output_dir, config: TrainingConfig,
                    start=None, architecture: Optional[dict] = None, resume: bool = False,
                    progress: Optional[Progress] = None):
    """Train or fine-tune a segmenter; returns (network with the best weights, TrainingResult, skipped weights).

    ``start`` is a ModelCard (catalogue entry or MONAI bundle) to fine-tune, or None to train ``architecture``
    (default: the small MONAI UNet) from scratch.
    """
    from functools import partial

    from monai.losses import DiceCELoss

    from . import networks
    from .augmentation import training_transforms
    from .datasets import prepare_segmentation_pair
    from .device import choose_device
    from .models import build_architecture, load_network

    progress = as_progress(progress)
    device = choose_device(config.device)
    architecture = architecture or networks.segmenter_architecture("unet", out_channels=task.out_channels)
    network = build_architecture(architecture)
    reinitialised: List[str] = []
    if start is not None:
        reinitialised = load_matching_weights(network, load_network(start, device="cpu").state_dict())
    load = partial(load_task_case, task=task)
    prepare = partial(prepare_segmentation_pair, spacing_mm=task.spacing_mm, intensity=task.intensity)
    train = _prepared_cases(train_cases, load, prepare, progress.sub(0.0, 0.05), "training")
    validation = _prepared_cases(validation_cases, load, prepare, progress.sub(0.05, 0.1), "validation")
    if not any(case["label"].any() for case in train):
        raise InputError("The training cases hold no labelled voxel: there is nothing to learn.")
    frozen = networks.freeze_stages(network, config.freeze_stages) if start is not None else []
    groups = networks.parameter_groups(network, config.learning_rate * config.backbone_lr_factor,
                                       config.learning_rate) if start is not None else None
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    transforms = training_transforms(task.roi_size, num_samples=config.batch_size, seed=config.seed,
                                     settings=augmentation_settings(task.label_names))

    def step(model, batch):
        return loss_function(model(batch["image"].to(device)), batch["label"].to(device))

    def validate(model):
        return mean_foreground_dice(model, validation, sorted(task.label_names), task.roi_size, device)

    trainer = Trainer(network, step, validate, lambda: _sample_stream(train, transforms, config.batch_size, config.seed),
                      config, Path(output_dir) / "training", device, groups, frozen,
                      lambda: networks.unfreeze_stages(network), progress.sub(0.1, 1.0))
    result = trainer.run(resume)
    return load_best_weights(network, result.output_dir), result, reinitialised


@dataclasses.dataclass
class DetectionTask:
    """What a nodule detector is trained on: the input its card declares and the patch size."""

    spacing_mm: tuple
    intensity: dict
    roi_size: tuple              # (I, J, K) training patch, a multiple of the detector's size_divisible
    positive_fraction: float = 0.7   # patches centred near a nodule; the rest anywhere
    dense_pretraining_iterations: int = 0  # from scratch: first train backbone + FPN densely (see pretrain_features)


def _sphere_masks(shape, boxes) -> "np.ndarray":
    """Foreground of the ellipsoids inscribed in the nodule boxes (the mask head's target; truth is centre + size)."""
    import numpy as np

    grid = np.indices(shape, dtype=np.float32)
    mask = np.zeros(shape, dtype=bool)
    for box in boxes:
        centre, semi = (box[:3] + box[3:]) / 2, np.maximum((box[3:] - box[:3]) / 2, 0.5)
        mask |= sum(((grid[axis] - centre[axis]) / semi[axis]) ** 2 for axis in range(3)) <= 1.0
    return mask


def _detection_patch(case: dict, roi_size, rng, positive_fraction: float) -> dict:
    """A random ``roi_size`` patch (centred near a nodule with ``positive_fraction``), randomly flipped, with the
    boxes whose centre falls inside it, shifted (and flipped) with it."""
    import numpy as np

    image, boxes = case["image"][0], case["boxes"]
    shape, roi = np.array(image.shape), np.array(roi_size)
    if len(boxes) and rng.random() < positive_fraction:
        centre = (boxes[rng.integers(len(boxes))].reshape(2, 3).mean(axis=0) + rng.uniform(-0.3, 0.3, 3) * roi)
    else:
        centre = rng.uniform(0, shape)
    start = np.clip(np.round(centre - roi / 2).astype(int), 0, np.maximum(shape - roi, 0))
    patch = np.full(roi, image.min(), dtype=np.float32)
    region = tuple(slice(s, s + min(r, n)) for s, r, n in zip(start, roi, shape))
    patch[tuple(slice(0, r.stop - r.start) for r in region)] = image[region]
    shifted = boxes - np.tile(start, 2)
    centres = shifted.reshape(-1, 2, 3).mean(axis=1)
    kept = shifted[np.all((centres >= 0) & (centres <= roi - 1), axis=1)]
    for axis in range(3):
        if rng.random() < 0.5:
            patch = np.flip(patch, axis)
            kept[:, [axis, axis + 3]] = roi[axis] - 1 - kept[:, [axis + 3, axis]]
    patch = patch * rng.uniform(0.9, 1.1) + rng.uniform(-0.05, 0.05)
    return {"image": np.ascontiguousarray(patch)[None], "boxes": kept.astype(np.float32),
            "masks": _sphere_masks(tuple(roi), kept)}


def _detection_batches(prepared: list, task: DetectionTask, batch_size: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    while True:
        patches = [_detection_patch(prepared[int(rng.integers(len(prepared)))], task.roi_size, rng,
                                    task.positive_fraction) for _ in range(batch_size)]
        yield patches


def _cells_with_nodule(masks: torch.Tensor, shape) -> torch.Tensor:
    """(B, 1, I, J, K) nodule masks -> (B, 1, *shape): 1 where a feature-map cell holds any nodule voxel."""
    import torch.nn.functional as F

    return F.adaptive_max_pool3d(masks, tuple(shape))


def pretrain_features(network, prepared: list, task: DetectionTask, iterations: int, learning_rate: float,
                      batch_size: int, seed: int, device, progress: Optional[Progress] = None) -> List[float]:
    """Dense pre-training of a detector's backbone + FPN from scratch; returns the loss of every iteration.

    A 1x1x1 convolution on every FPN level predicts which cells hold nodule voxels (Dice + BCE): every cell of every
    patch is a training signal, where the anchor heads see a few matched anchors and sampled negatives. The anchor
    heads then start from features that already tell nodules from vessels and pleura. The probe is discarded.
    """
    import torch.nn.functional as F
    from monai.losses import DiceLoss

    progress = as_progress(progress)
    network.to(device).train()
    probe = torch.nn.Conv3d(network.feature_extractor.out_channels, 1, kernel_size=1).to(device)
    optimizer = torch.optim.AdamW([*network.feature_extractor.parameters(), *probe.parameters()], lr=learning_rate,
                                  weight_decay=1e-5)
    dice = DiceLoss(sigmoid=True, batch=True)
    batches = _detection_batches(prepared, task, batch_size, seed)
    losses = []
    for iteration in range(iterations):
        progress.report(iteration / iterations, f"Dense pre-training, iteration {iteration + 1}/{iterations}")
        patches = next(batches)
        images = torch.stack([torch.as_tensor(patch["image"]) for patch in patches]).to(device)
        masks = torch.stack([torch.as_tensor(patch["masks"][None], dtype=torch.float32)
                             for patch in patches]).to(device)
        levels = list(network.feature_extractor(images).values())
        loss = 0.0
        for features in levels:
            logits, truth = probe(features), _cells_with_nodule(masks, features.shape[2:])
            loss = loss + (dice(logits, truth) + F.binary_cross_entropy_with_logits(logits, truth)) / len(levels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if (iteration + 1) % 100 == 0:
            logger.info("Dense pre-training iteration %d: loss %.4f", iteration + 1, sum(losses[-100:]) / 100)
    return losses


def detection_loss(model, patches: list, device) -> torch.Tensor:
    """The detector's training loss on a batch of patches: classification + box regression + mask."""
    images = [torch.as_tensor(patch["image"], device=device) for patch in patches]
    targets = [{"boxes": torch.as_tensor(patch["boxes"], device=device),
                "labels": torch.zeros(len(patch["boxes"]), dtype=torch.long, device=device),
                "masks": torch.as_tensor(patch["masks"], device=device)} for patch in patches]
    return sum(model(images, targets).values())


def detection_cpm(network, prepared_cases: list, spacing_mm, device) -> float:
    """CPM (LUNA16 FROC) of the detector on whole preprocessed validation volumes; distances in mm on the model grid
    (index x spacing: exact for axis-aligned CTs, which the network arrays of CT scans are)."""
    import numpy as np

    from .evaluation import Annotation, Detection, cpm, froc

    spacing = np.asarray(spacing_mm, dtype=float)
    detections, annotations = [], []
    for index, case in enumerate(prepared_cases):
        image = torch.as_tensor(case["image"]).to(device)
        use_inferer = any(n > r for n, r in zip(case["image"].shape[1:], network.detector.inferer.roi_size)) \
            if getattr(network.detector, "inferer", None) is not None else False
        result = network([image], use_inferer=use_inferer, masks=False)[0]
        boxes = result["boxes"].detach().cpu().numpy().reshape(-1, 2, 3)
        for centre, score in zip(boxes.mean(axis=1), result["scores"].detach().cpu().numpy()):
            detections.append(Detection(str(index), tuple(centre * spacing), float(score)))
        for box in case["boxes"].reshape(-1, 2, 3):
            annotations.append(Annotation(str(index), tuple(box.mean(axis=0) * spacing),
                                          float((box[1, 0] - box[0, 0]) * spacing[0])))
    if not annotations:
        raise InputError("The validation cases hold no nodule: the detector cannot be judged on them.")
    return cpm(froc(detections, annotations, [str(index) for index in range(len(prepared_cases))]))


def train_detector(task: DetectionTask, train_cases, validation_cases, output_dir, config: TrainingConfig,
                   start=None, architecture: Optional[dict] = None, resume: bool = False,
                   progress: Optional[Progress] = None):
    """Train or fine-tune the nodule detector (with its mask head); returns (network with the best weights,
    TrainingResult, weights left at their initialisation). ``start``: a ModelCard to fine-tune, or None.

    From scratch with ``task.dense_pretraining_iterations``, the backbone + FPN are first trained densely
    (:func:`pretrain_features`); then, as when fine-tuning, the first ``config.freeze_stages`` backbone stages stay
    frozen while the rest learns the boxes."""
    from functools import partial

    from . import networks
    from .datasets import load_detection_case, prepare_detection_case
    from .device import choose_device
    from .models import build_architecture, load_network

    progress = as_progress(progress)
    device = choose_device(config.device)
    network = build_architecture(architecture or networks.detector_architecture("small"))
    reinitialised: List[str] = []
    if start is not None:
        reinitialised = load_matching_weights(network, load_network(start, device="cpu").state_dict())
    prepare = partial(prepare_detection_case, spacing_mm=task.spacing_mm, intensity=task.intensity)
    train = _prepared_cases(train_cases, load_detection_case, prepare, progress.sub(0.0, 0.05), "training")
    validation = _prepared_cases(validation_cases, load_detection_case, prepare, progress.sub(0.05, 0.1),
                                 "validation")
    if not any(len(case["boxes"]) for case in train):
        raise InputError("The training cases hold no nodule: a detector needs positive examples.")
    network.set_sliding_window(task.roi_size, overlap=0.25, sw_batch_size=1, device=device)
    training_progress = progress.sub(0.1, 1.0)
    pretrained = start is None and task.dense_pretraining_iterations > 0
    if pretrained and not (resume and (Path(output_dir) / "training" / CHECKPOINT_LAST).is_file()):
        torch.manual_seed(config.seed)
        pretrain_features(network, train, task, task.dense_pretraining_iterations, config.learning_rate,
                          config.batch_size, config.seed, device, progress.sub(0.1, 0.4))
        training_progress = progress.sub(0.4, 1.0)
    transfer = start is not None or pretrained
    frozen = networks.freeze_stages(network, config.freeze_stages) if transfer else []
    groups = networks.parameter_groups(network, config.learning_rate * config.backbone_lr_factor,
                                       config.learning_rate) if transfer else None

    trainer = Trainer(network, partial(detection_loss, device=device),
                      lambda model: detection_cpm(model, validation, task.spacing_mm, device),
                      lambda: _detection_batches(train, task, config.batch_size, config.seed), config,
                      Path(output_dir) / "training", device, groups, frozen,
                      lambda: networks.unfreeze_stages(network), training_progress)
    result = trainer.run(resume)
    return load_best_weights(network, result.output_dir), result, reinitialised


def write_model(network: torch.nn.Module, output_dir, card_fields: dict, architecture: dict,
                result: TrainingResult, training_description: dict):
    """Save the weights as ``<id>.pt`` and a one-card manifest ``<id>.json`` beside them (a catalogue folder the
    modules and ``cli models --manifest-dir`` read at once); returns the ModelCard."""
    from .models import ModelCard, add_to_manifest, sha256_of_file

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model_id = card_fields["id"]
    weights = output_dir / f"{model_id}.pt"
    save_atomically(network.state_dict(), weights, min_free_mb=1.0)
    training = {**training_description, "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
                "stopped_early": result.stopped_early, "frozen_parameters": len(result.frozen_parameters)}
    metrics = {"validation (start)": result.start_metric, "validation (best)": result.best_metric,
               **card_fields.pop("metrics", {})}
    card = ModelCard.from_dict({**card_fields, "architecture": architecture, "training": training,
                                "metrics": metrics,
                                "weights": {"file": weights.name, "sha256": sha256_of_file(weights),
                                            "size_bytes": weights.stat().st_size}}, base_dir=output_dir)
    add_to_manifest(output_dir / f"{model_id}.json", card)
    return card
