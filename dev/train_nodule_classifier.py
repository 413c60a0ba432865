"""Train the two random forests that score NoduleDetect's classical candidates, on generated chest phantoms only
(fixed seeds), and write them as JSON beside the module (NoduleDetect/Resources/Models/).

    .venv/bin/python dev/train_nodule_classifier.py [--prefilter-cases 12] [--cases 16]

Stage 1 (the prefilter, on the blob filter's own measures) learns from every candidate of its phantoms; stage 2 (the
forest, on the features of each segmented candidate) learns from the candidates the trained prefilter keeps on other
phantoms, as the pipeline sees them. A candidate is a positive when its centre lies within the radius of a true
nodule (the LUNA16 hit rule). Out-of-bag metrics and the training description are stored in each JSON.
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

# Phantoms on a grid like a clinical chest CT's in-plane resolution, with thick slices, 3-30 mm nodules of every
# type and location (make_chest_ct cycles them).
PHANTOM_GRID = dict(size_ijk=(320, 320, 120), spacing_mm=(1.1, 1.1, 2.5))
NODULES_PER_CASE = 6
PREFILTER_FIRST_SEED, FOREST_FIRST_SEED = 5000, 5100  # the evaluation set starts at 7000


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefilter-cases", type=int, default=12)
    parser.add_argument("--cases", type=int, default=16, help="phantoms for the second forest")
    parser.add_argument("--output-dir", type=Path, default=detection.MODELS_DIR)
    args = parser.parse_args(argv)
    started = time.time()
    grid = f"{NODULES_PER_CASE} nodules of 3-30 mm each, {PHANTOM_GRID}"

    rows, labels = [], []
    for seed in range(PREFILTER_FIRST_SEED, PREFILTER_FIRST_SEED + args.prefilter_cases):
        _, _, candidates, hits = phantom_candidates(seed)
        rows.append(detection.prefilter_rows(candidates))
        labels += hits.any(axis=1).astype(int).tolist()
        print(f"prefilter seed {seed}: {len(candidates)} candidates, {describe(hits)} ({time.time() - started:.0f} s)",
              flush=True)
    prefilter = train_forest(np.concatenate(rows), np.array(labels), detection.PREFILTER_FEATURES,
                             description=f"{args.prefilter_cases} generated chest phantoms (seeds "
                                         f"{PREFILTER_FIRST_SEED}+, {grid}); every candidate of the blob filter")
    prefilter.to_json(args.output_dir / detection.DEFAULT_PREFILTER.name)

    features, labels, reached, total = [], [], 0, 0
    for seed in range(FOREST_FIRST_SEED, FOREST_FIRST_SEED + args.cases):
        phantom, lungs, candidates, hits = phantom_candidates(seed)
        kept = np.argsort(-prefilter.predict_proba(detection.prefilter_rows(candidates)),
                          kind="stable")[:detection.MAX_SEGMENTED_CANDIDATES]
        described = detection.describe_candidates(phantom.image, lungs, [candidates[i] for i in kept])
        features += [row.features for row in described]
        labels += hits[kept].any(axis=1).astype(int).tolist()
        reached += int(hits[kept].any(axis=0).sum())
        total += len(phantom.nodules)
        print(f"forest seed {seed}: {len(candidates)} candidates, kept {len(kept)}: {describe(hits[kept])} "
              f"({time.time() - started:.0f} s)", flush=True)
    forest = train_forest(np.stack(features), np.array(labels),
                          description=f"{args.cases} generated chest phantoms (seeds {FOREST_FIRST_SEED}+, {grid}); "
                                      f"the candidates the prefilter keeps ({reached} of {total} nodules reached)")
    forest.to_json(args.output_dir / detection.DEFAULT_CLASSIFIER.name)
    for name, model in (("prefilter", prefilter), ("forest", forest)):
        print(f"{name}: {model.metadata['metrics']}")
    print(f"done in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
