"""Train the scorers of NoduleDetect's classical candidates, on generated chest phantoms only (fixed seeds), and write
them beside the module (NoduleDetect/Resources/Models/): the two candidate CNNs (.pt) and the random forest (JSON).

    .venv/bin/python dev/train_nodule_classifier.py [--network-cases 48] [--small-nodule-cases 48] [--cases 48]
                                                    [--small-nodule-forest-cases 48] [--network FILE FILE]

Stage 1 (the candidate CNNs, on the CT around each candidate) learns from every candidate of its phantoms: the
first network from phantoms with nodules of every size, the second from the same plus phantoms with many 3-8 mm
nodules (the pipeline averages the two); stage 2 (the forest, on the features of each segmented candidate) learns
from the candidates the two networks keep on other phantoms of both kinds, as the pipeline sees them (without the
small-nodule ones it scored most nodules under 5 mm low). A candidate is a positive when its centre lies within the
radius of a true nodule (the LUNA16 hit rule). The training description is stored in each file, and the forest's
out-of-bag metrics. ``--network`` skips stage 1 and uses trained CNNs (to retrain the forest after a change to
segmentation or features).
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
from RecognitionCore.phantoms import (NODULE_LOCATIONS, NODULE_TYPES, NoduleSpec, log_uniform_diameter_mm,  # noqa: E402
                                      make_chest_ct)
from NoduleDetectLib import detection  # noqa: E402
from NoduleDetectLib.classifier import train_forest  # noqa: E402
from NoduleDetectLib.patch_classifier import PatchEnsemble, candidate_patches, train_patch_network  # noqa: E402
from evaluate_nodule_detection import SYNTHETIC_FIRST_SEED  # noqa: E402  (this folder is on the path of a script)

# Phantoms on a grid like a clinical chest CT's in-plane resolution, with thick slices, 3-30 mm nodules of every
# type and location (make_chest_ct cycles them).
PHANTOM_GRID = dict(size_ijk=(320, 320, 120), spacing_mm=(1.1, 1.1, 2.5))
NODULES_PER_CASE = 6
# Phantoms for the second network: many small nodules, which are few among the first network's positives (about 40%
# of 3-30 mm log-uniform sizes, and the blob filter reaches fewer of them).
SMALL_NODULES_PER_CASE = 14
SMALL_NODULE_RANGE_MM = (3.0, 8.0)
NETWORK_FIRST_SEED, FOREST_FIRST_SEED = 5000, 5100
SMALL_NODULE_FIRST_SEED, SMALL_NODULE_FOREST_FIRST_SEED = 6000, 6100  # evaluation: SYNTHETIC_FIRST_SEED


def small_nodule_specs(seed: int):
    """SMALL_NODULES_PER_CASE nodules, log-uniform in SMALL_NODULE_RANGE_MM, every type and location in turn."""
    rng = np.random.default_rng(seed)
    return [NoduleSpec(log_uniform_diameter_mm(rng, *SMALL_NODULE_RANGE_MM), NODULE_TYPES[k % 3],
                       NODULE_LOCATIONS[(k + k // 3) % 3]) for k in range(SMALL_NODULES_PER_CASE)]


def small_nodule_phantoms(cases: int, first_seed: int) -> str:
    """How ``cases`` phantoms of ``small_nodule_specs`` from ``first_seed`` on are described in the model files."""
    low, high = SMALL_NODULE_RANGE_MM
    return f"{cases} with {SMALL_NODULES_PER_CASE} nodules of {low:g}-{high:g} mm each (seeds {first_seed}+)"


def phantom_candidates(seed: int, nodules=NODULES_PER_CASE):
    """(phantom, lung mask, candidates, labels) with the pipeline's candidate settings."""
    phantom = make_chest_ct(seed=seed, nodules=nodules, **PHANTOM_GRID)
    lungs = detection.lung_mask(segment_lungs(phantom.image))
    candidates = detection.blob_candidates(phantom.image, lungs)
    truth = [(np.asarray(n.center_lps_mm), n.diameter_mm / 2) for n in phantom.nodules]
    hits = np.array([[np.linalg.norm(np.asarray(c.center_lps_mm) - t) < r for t, r in truth] for c in candidates])
    return phantom, lungs, candidates, hits


def describe(hits) -> str:
    return f"{int(hits.any(axis=1).sum())} on nodules, {int(hits.any(axis=0).sum())} nodules reached"


def network_patches(seeds, nodules_of, started: float):
    """(patches, labels) of every candidate of the phantoms of ``seeds`` (``nodules_of(seed)``: their nodules)."""
    patches, labels = [], []
    for seed in seeds:
        phantom, _, candidates, hits = phantom_candidates(seed, nodules_of(seed))
        patches.append(candidate_patches(phantom.image, [c.center_lps_mm for c in candidates]))
        labels += hits.any(axis=1).tolist()
        print(f"network seed {seed}: {len(candidates)} candidates, {describe(hits)} ({time.time() - started:.0f} s)",
              flush=True)
    return np.concatenate(patches), labels


def train_networks(args, grid: str, started: float) -> PatchEnsemble:
    """Stage 1: the two candidate CNNs, saved beside the module (``detection.DEFAULT_PATCH_CLASSIFIERS``)."""
    every_size = f"{args.network_cases} generated chest phantoms (seeds {NETWORK_FIRST_SEED}+, {grid})"
    patches, labels = network_patches(range(NETWORK_FIRST_SEED, NETWORK_FIRST_SEED + args.network_cases),
                                      lambda seed: NODULES_PER_CASE, started)
    first = train_patch_network(patches, labels, iterations=args.iterations,
                                description=f"{every_size}; every candidate of the blob filter")
    small_patches, small_labels = network_patches(
        range(SMALL_NODULE_FIRST_SEED, SMALL_NODULE_FIRST_SEED + args.small_nodule_cases), small_nodule_specs,
        started)
    small = small_nodule_phantoms(args.small_nodule_cases, SMALL_NODULE_FIRST_SEED)
    second = train_patch_network(np.concatenate([patches, small_patches]), labels + small_labels,
                                 iterations=2 * args.iterations,
                                 description=f"{every_size} and {small}; every candidate of the blob filter")
    for network, path in zip((first, second), detection.DEFAULT_PATCH_CLASSIFIERS):
        network.save(args.output_dir / path.name)
    print(f"networks trained ({time.time() - started:.0f} s)", flush=True)
    return PatchEnsemble([first, second])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--network-cases", type=int, default=48)
    parser.add_argument("--small-nodule-cases", type=int, default=48)
    parser.add_argument("--iterations", type=int, default=1500,
                        help="training steps of 64 patches of the first CNN (the second: twice as many)")
    parser.add_argument("--cases", type=int, default=48, help="phantoms for the forest")
    parser.add_argument("--small-nodule-forest-cases", type=int, default=48,
                        help="phantoms with small nodules for the forest")
    parser.add_argument("--network", type=Path, nargs="+", help="trained candidate CNNs: train the forest only")
    parser.add_argument("--output-dir", type=Path, default=detection.MODELS_DIR)
    args = parser.parse_args(argv)
    # (option, its count, its first seed, the next set's first seed and name; the CNNs' counts matter only when
    # they are trained): each set of phantoms keeps to its own seeds
    phantom_sets = (
        ("--network-cases", args.network_cases if not args.network else 0, NETWORK_FIRST_SEED, FOREST_FIRST_SEED,
         "the forest's"),
        ("--cases", args.cases, FOREST_FIRST_SEED, SMALL_NODULE_FIRST_SEED, "the small-nodule CNN's"),
        ("--small-nodule-cases", args.small_nodule_cases if not args.network else 0, SMALL_NODULE_FIRST_SEED,
         SMALL_NODULE_FOREST_FIRST_SEED, "the small-nodule forest's"),
        ("--small-nodule-forest-cases", args.small_nodule_forest_cases, SMALL_NODULE_FOREST_FIRST_SEED,
         SYNTHETIC_FIRST_SEED, "the evaluation's"))
    for option, count, first_seed, next_seed, next_set in phantom_sets:
        if first_seed + count > next_seed:
            parser.error(f"{option} over {next_seed - first_seed} would train on {next_set} phantoms")
    started = time.time()
    grid = f"{NODULES_PER_CASE} nodules of 3-30 mm each, {PHANTOM_GRID}"
    network = PatchEnsemble.load(args.network) if args.network else train_networks(args, grid, started)

    features, labels, reached, total = [], [], 0, 0
    phantoms = [(seed, NODULES_PER_CASE) for seed in range(FOREST_FIRST_SEED, FOREST_FIRST_SEED + args.cases)]
    phantoms += [(seed, small_nodule_specs(seed)) for seed in
                 range(SMALL_NODULE_FOREST_FIRST_SEED, SMALL_NODULE_FOREST_FIRST_SEED + args.small_nodule_forest_cases)]
    for seed, nodules in phantoms:
        phantom, lungs, candidates, hits = phantom_candidates(seed, nodules)
        kept, _ = detection.rank_by_network(phantom.image, candidates, network)
        described = detection.describe_candidates(phantom.image, lungs, [candidates[i] for i in kept])
        features += [row.features for row in described]
        labels += hits[kept].any(axis=1).astype(int).tolist()
        reached += int(hits[kept].any(axis=0).sum())
        total += len(phantom.nodules)
        print(f"forest seed {seed}: {len(candidates)} candidates, kept {len(kept)}: {describe(hits[kept])} "
              f"({time.time() - started:.0f} s)", flush=True)
    small = small_nodule_phantoms(args.small_nodule_forest_cases, SMALL_NODULE_FOREST_FIRST_SEED)
    forest = train_forest(np.stack(features), np.array(labels),
                          description=f"{args.cases} generated chest phantoms (seeds {FOREST_FIRST_SEED}+, {grid}) and "
                                      f"{small}; the candidates the CNNs keep ({reached} of {total} nodules reached)")
    forest.to_json(args.output_dir / detection.DEFAULT_CLASSIFIER.name)
    print(f"forest: {forest.metadata['metrics']}")
    print(f"done in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
