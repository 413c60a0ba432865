"""Train the two scorers of NoduleDetect's classical candidates, on generated chest phantoms only (fixed seeds), and
write them beside the module (NoduleDetect/Resources/Models/): the candidate CNN (.pt) and the random forest (JSON).

    .venv/bin/python dev/train_nodule_classifier.py [--network-cases 48] [--cases 32] [--network FILE]

Stage 1 (the CNN, on the CT around each candidate) learns from every candidate of its phantoms; stage 2 (the
forest, on the features of each segmented candidate) learns from the candidates the trained CNN keeps on other
phantoms, as the pipeline sees them. A candidate is a positive when its centre lies within the radius of a true
nodule (the LUNA16 hit rule). The training description is stored in each file, and the forest's out-of-bag metrics.
``--network`` skips stage 1 and uses a trained CNN (to retrain the forest after a change to segmentation or
features).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "NoduleDetect")]
from RecognitionCore.anatomy import segment_lungs  # noqa: E402
from RecognitionCore.phantoms import make_chest_ct  # noqa: E402
from NoduleDetectLib import detection  # noqa: E402
from NoduleDetectLib.classifier import train_forest  # noqa: E402
from NoduleDetectLib.patch_classifier import PatchClassifier, candidate_patches, train_patch_network  # noqa: E402

# Phantoms on a grid like a clinical chest CT's in-plane resolution, with thick slices, 3-30 mm nodules of every
# type and location (make_chest_ct cycles them).
PHANTOM_GRID = dict(size_ijk=(320, 320, 120), spacing_mm=(1.1, 1.1, 2.5))
NODULES_PER_CASE = 6
NETWORK_FIRST_SEED, FOREST_FIRST_SEED = 5000, 5100  # the evaluation set starts at 7000


def phantom_candidates(seed: int):
    """(phantom, lung mask, candidates, labels) with the pipeline's candidate settings."""
    phantom = make_chest_ct(seed=seed, nodules=NODULES_PER_CASE, **PHANTOM_GRID)
    lungs = detection.lung_mask(segment_lungs(phantom.image))
    candidates = detection.blob_candidates(phantom.image, lungs)
    truth = [(np.asarray(n.center_lps_mm), n.diameter_mm / 2) for n in phantom.nodules]
    hits = np.array([[np.linalg.norm(np.asarray(c.center_lps_mm) - t) < r for t, r in truth] for c in candidates])
    return phantom, lungs, candidates, hits


def describe(hits) -> str:
    return f"{int(hits.any(axis=1).sum())} on nodules, {int(hits.any(axis=0).sum())} nodules reached"


def train_network(args, grid: str, started: float) -> PatchClassifier:
    """Stage 1: the CNN on every candidate of ``args.network_cases`` phantoms, saved beside the module."""
    patches, labels = [], []
    for seed in range(NETWORK_FIRST_SEED, NETWORK_FIRST_SEED + args.network_cases):
        phantom, _, candidates, hits = phantom_candidates(seed)
        patches.append(candidate_patches(phantom.image, [c.center_lps_mm for c in candidates]))
        labels += hits.any(axis=1).tolist()
        print(f"network seed {seed}: {len(candidates)} candidates, {describe(hits)} ({time.time() - started:.0f} s)",
              flush=True)
    network = train_patch_network(np.concatenate(patches), labels, iterations=args.iterations,
                                  description=f"{args.network_cases} generated chest phantoms (seeds "
                                              f"{NETWORK_FIRST_SEED}+, {grid}); every candidate of the blob filter")
    network.save(args.output_dir / detection.DEFAULT_PATCH_CLASSIFIER.name)
    print(f"network trained ({time.time() - started:.0f} s)", flush=True)
    return network


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--network-cases", type=int, default=48)
    parser.add_argument("--iterations", type=int, default=1500, help="CNN training steps of 64 patches")
    parser.add_argument("--cases", type=int, default=32, help="phantoms for the forest")
    parser.add_argument("--network", type=Path, help="a trained candidate CNN: train the forest only")
    parser.add_argument("--output-dir", type=Path, default=detection.MODELS_DIR)
    args = parser.parse_args(argv)
    if not args.network and NETWORK_FIRST_SEED + args.network_cases > FOREST_FIRST_SEED:
        parser.error(f"--network-cases over {FOREST_FIRST_SEED - NETWORK_FIRST_SEED} would train the CNN on the "
                     "forest's phantoms")
    started = time.time()
    grid = f"{NODULES_PER_CASE} nodules of 3-30 mm each, {PHANTOM_GRID}"
    network = PatchClassifier.load(args.network) if args.network else train_network(args, grid, started)

    features, labels, reached, total = [], [], 0, 0
    for seed in range(FOREST_FIRST_SEED, FOREST_FIRST_SEED + args.cases):
        phantom, lungs, candidates, hits = phantom_candidates(seed)
        kept, _ = detection.rank_by_network(phantom.image, candidates, network)
        described = detection.describe_candidates(phantom.image, lungs, [candidates[i] for i in kept])
        features += [row.features for row in described]
        labels += hits[kept].any(axis=1).astype(int).tolist()
        reached += int(hits[kept].any(axis=0).sum())
        total += len(phantom.nodules)
        print(f"forest seed {seed}: {len(candidates)} candidates, kept {len(kept)}: {describe(hits[kept])} "
              f"({time.time() - started:.0f} s)", flush=True)
    forest = train_forest(np.stack(features), np.array(labels),
                          description=f"{args.cases} generated chest phantoms (seeds {FOREST_FIRST_SEED}+, {grid}); "
                                      f"the candidates the CNN keeps ({reached} of {total} nodules reached)")
    forest.to_json(args.output_dir / detection.DEFAULT_CLASSIFIER.name)
    print(f"forest: {forest.metadata['metrics']}")
    print(f"done in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
