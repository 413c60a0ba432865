"""A small 3D CNN that scores every blob candidate from the CT around it: the false-positive reduction step of
LUNA16-era detection systems, here in front of the hand-made features.

Why: a 3-5 mm nodule on 2.5 mm slices and a vessel cut across are both a small bright blob; what tells them apart is
whether the structure goes on beyond the blob, which hand-made features of the blob's own mask hardly see. The
network sees a cube of CT around the candidate: ``PATCH_MM`` mm on an axis-aligned LPS grid of ``PATCH_SPACING_MM``
mm (whatever the input's grid and orientation), HU mapped from ``HU_RANGE`` to 0..1. It is trained on generated
phantoms only (``train_patch_network``, called by ``dev/train_nodule_classifier.py``) with random shifts of up to
``SHIFT_MM`` mm, flips of every axis and swaps of the two in-plane axes; it scores the centred cube. The pipeline
averages two such networks (``PatchEnsemble``) trained on different phantom mixes.

The weights file is a ``torch.save`` dictionary of plain types and tensors (loaded with ``weights_only``, no pickle
code): ``format``, ``format_version``, the patch geometry it was trained for, ``metadata`` and ``state_dict``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk

from RecognitionCore.errors import InputError, ModelError
from RecognitionCore.preprocessing import ImageGeometry, resample_to_reference
from RecognitionCore.progress import Progress, as_progress

FORMAT_NAME = "mir-candidate-patch-cnn"
FORMAT_VERSION = 1
PATCH_MM = 24            # the cube cut around each candidate (training shifts the network's view inside it)
INPUT_MM = 20            # the cube the network sees
SHIFT_MM = (PATCH_MM - INPUT_MM) // 2
PATCH_SPACING_MM = 1.0
HU_RANGE = (-1000.0, 400.0)
BATCH_SIZE = 256


def patch_network():
    """Three convolution stages (16, 32, 64 channels, each halving the cube) and a two-layer head: ~130 k weights,
    a few milliseconds per candidate on a CPU."""
    from torch import nn

    def stage(inputs: int, outputs: int):
        return [nn.Conv3d(inputs, outputs, 3, padding=1, bias=False), nn.BatchNorm3d(outputs), nn.ReLU(inplace=True)]

    side = INPUT_MM // 8
    return nn.Sequential(*stage(1, 16), nn.MaxPool3d(2), *stage(16, 32), *stage(32, 32), nn.MaxPool3d(2),
                         *stage(32, 64), nn.MaxPool3d(2), nn.Flatten(), nn.Dropout(0.3),
                         nn.Linear(64 * side ** 3, 64), nn.ReLU(inplace=True), nn.Linear(64, 1))


def candidate_patches(image: sitk.Image, centers_lps_mm: Sequence[Sequence[float]]) -> np.ndarray:
    """(N, PATCH_MM, PATCH_MM, PATCH_MM) float16 cubes in 0..1 around each centre, (z, y, x) = (S, P, L) order.

    The region holding all centres is resampled once (linear) onto an axis-aligned LPS grid of PATCH_SPACING_MM;
    beyond the image counts as air."""
    centers = np.asarray(centers_lps_mm, dtype=np.float64).reshape(-1, 3)
    patches = np.empty((len(centers),) + (PATCH_MM,) * 3, dtype=np.float16)
    if not len(centers):
        return patches
    half = PATCH_MM / 2 * PATCH_SPACING_MM
    low = np.floor(centers.min(axis=0) - half) - PATCH_SPACING_MM
    size = np.ceil((centers.max(axis=0) + half - low) / PATCH_SPACING_MM).astype(int) + 2
    geometry = ImageGeometry(tuple(int(v) for v in size), (PATCH_SPACING_MM,) * 3, tuple(float(v) for v in low),
                             (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    region = sitk.GetArrayFromImage(resample_to_reference(image, geometry, "linear", default_value=HU_RANGE[0]))
    scaled = np.clip((region - HU_RANGE[0]) / (HU_RANGE[1] - HU_RANGE[0]), 0.0, 1.0).astype(np.float16)
    first = np.rint((centers - low) / PATCH_SPACING_MM - PATCH_MM / 2).astype(int)  # x, y, z of each cube's corner
    for n, (x, y, z) in enumerate(first):
        patches[n] = scaled[z:z + PATCH_MM, y:y + PATCH_MM, x:x + PATCH_MM]
    return patches


def _file_header() -> dict:
    return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "patch_mm": PATCH_MM, "input_mm": INPUT_MM,
            "patch_spacing_mm": PATCH_SPACING_MM, "hu_range": list(HU_RANGE)}


def load_weights_file(path: Union[str, Path], header: dict, network, what: str, script: str) -> dict:
    """Load the weights file at ``path`` (a ``torch.save`` dictionary of ``header``, ``metadata`` and
    ``state_dict``, read with ``weights_only``: no pickle code) into ``network``; returns its metadata. ``what`` names
    the model in the errors, ``script`` is what retrains it. A missing, damaged, foreign or mismatched file is a
    ``ModelError`` that says which."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"The {what} {path} is missing; reinstall the extension or retrain it with {script}.")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged file
        raise ModelError(f"The {what} {path} cannot be read ({type(error).__name__}: {error}); the file is "
                         "damaged.") from error
    found = {key: saved.get(key) for key in header} if isinstance(saved, dict) else {}
    if found != header:
        raise ModelError(f"{path} is not a {what} of this version: expected {header}, found {found}.")
    try:
        network.load_state_dict(saved["state_dict"])
    except (KeyError, RuntimeError) as error:
        raise ModelError(f"The weights in {path} do not fit the {what}: {error}") from error
    return dict(saved.get("metadata") or {})


def save_weights_file(path: Union[str, Path], header: dict, network, metadata: dict) -> Path:
    """Write what ``load_weights_file`` reads: ``header``, ``metadata`` and the weights. The same network and
    metadata give the same bytes (no time stamp), so a shipped file can be checked against a rerun."""
    import torch

    path = Path(path)
    torch.save({**header, "metadata": metadata, "state_dict": network.state_dict()}, path)
    return path


class PatchClassifier:
    """The trained network and its description; ``predict_proba`` gives each patch's probability of a nodule."""

    def __init__(self, network, metadata: Optional[Dict] = None):
        self.network = network.eval()
        self.metadata = dict(metadata or {})

    @classmethod
    def load(cls, path: Union[str, Path]) -> "PatchClassifier":
        network = patch_network()
        metadata = load_weights_file(path, _file_header(), network, "nodule candidate network",
                                     "dev/train_nodule_classifier.py")
        return cls(network, metadata)

    def save(self, path: Union[str, Path]) -> Path:
        return save_weights_file(path, _file_header(), self.network, self.metadata)

    def predict_proba(self, patches: np.ndarray, progress: Optional[Progress] = None,
                      device: str = "cpu") -> np.ndarray:
        """Probabilities (float64, one per patch) of ``candidate_patches`` cubes, ``BATCH_SIZE`` per pass on
        ``device`` ("auto": a working GPU, else the CPU; see ``RecognitionCore.device``)."""
        import torch

        from RecognitionCore.device import choose_device

        progress = as_progress(progress)
        patches = np.asarray(patches)
        if patches.ndim != 4 or patches.shape[1:] != (PATCH_MM,) * 3:
            raise InputError(f"candidate patches must be (N, {PATCH_MM}, {PATCH_MM}, {PATCH_MM}), got {patches.shape}")
        device = choose_device(device)
        network = self.network.to(device)
        inner = slice(SHIFT_MM, SHIFT_MM + INPUT_MM)
        probabilities = []
        with torch.inference_mode():
            for start in range(0, len(patches), BATCH_SIZE):
                progress.report(start / len(patches), f"Scoring candidates {start + 1}-"
                                                      f"{min(start + BATCH_SIZE, len(patches))} of {len(patches)}")
                batch = torch.from_numpy(patches[start:start + BATCH_SIZE, inner, inner, inner].astype(np.float32))
                logits = network(batch[:, None].to(device))[:, 0]
                probabilities.append(torch.sigmoid(logits).double().cpu().numpy())
        return np.concatenate(probabilities) if probabilities else np.empty(0)


class PatchEnsemble:
    """Several trained networks whose mean probability scores each patch. The shipped pair: one trained on phantoms
    with nodules of every size, one with many 3-8 mm nodules more; their mean ranks small nodules higher without
    the second network's lower scores of large ones, and each one's errors weigh half."""

    def __init__(self, members: Sequence[PatchClassifier]):
        if not members:
            raise InputError("a candidate network ensemble needs at least one network")
        self.members = tuple(members)

    @classmethod
    def load(cls, paths: Sequence[Union[str, Path]]) -> "PatchEnsemble":
        return cls([PatchClassifier.load(path) for path in paths])

    def predict_proba(self, patches: np.ndarray, progress: Optional[Progress] = None,
                      device: str = "cpu") -> np.ndarray:
        """The members' mean probability of each patch (see ``PatchClassifier.predict_proba``)."""
        progress = as_progress(progress)
        count = len(self.members)
        return np.mean(np.stack([member.predict_proba(patches, progress.sub(n / count, (n + 1) / count), device)
                                 for n, member in enumerate(self.members)]), axis=0)


def train_patch_network(patches: np.ndarray, labels: Sequence, iterations: int = 1500, batch_size: int = 64,
                        positive_share: float = 0.25, seed: int = 0, description: str = "") -> PatchClassifier:
    """A ``PatchClassifier`` trained with AdamW and a one-cycle schedule; each batch holds ``positive_share``
    positives (nodules are a few hundred among tens of thousands of candidates), augmented by random shifts, flips and
    in-plane swaps. Deterministic for a given seed on one machine, and so is the saved file (no training time in it)."""
    import torch
    from torch import nn

    labels = np.asarray(labels, dtype=bool)
    if patches.shape[0] != labels.size or not labels.any() or labels.all():
        raise InputError(f"training needs one label per patch and both classes; got {patches.shape[0]} patches, "
                         f"{int(labels.sum())} of {labels.size} positive")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    network = patch_network()
    optimiser = torch.optim.AdamW(network.parameters(), lr=1e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=2e-3, total_steps=iterations)
    loss_function = nn.BCEWithLogitsLoss()
    positives, negatives = np.flatnonzero(labels), np.flatnonzero(~labels)
    n_positive = max(1, int(round(batch_size * positive_share)))
    network.train()
    for _ in range(iterations):
        chosen = np.concatenate([rng.choice(positives, n_positive), rng.choice(negatives, batch_size - n_positive)])
        batch = torch.from_numpy(np.stack([_augmented(patches[i], rng) for i in chosen]).astype(np.float32))
        loss = loss_function(network(batch[:, None])[:, 0], torch.from_numpy(labels[chosen].astype(np.float32)))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
    metadata = {"description": description, "training": {
        "library": f"torch {torch.__version__}", "n_samples": int(labels.size), "n_positive": int(labels.sum()),
        "iterations": iterations, "batch_size": batch_size, "positive_share": positive_share, "seed": seed}}
    return PatchClassifier(network, metadata)


def _augmented(patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    z, y, x = rng.integers(0, 2 * SHIFT_MM + 1, 3)
    view = patch[z:z + INPUT_MM, y:y + INPUT_MM, x:x + INPUT_MM]
    for axis in range(3):
        if rng.random() < 0.5:
            view = np.flip(view, axis)
    if rng.random() < 0.5:
        view = view.transpose(0, 2, 1)
    return np.ascontiguousarray(view)
