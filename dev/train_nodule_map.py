"""Train NoduleDetect's nodule centre map (``NoduleDetectLib/nodule_map.py``) on generated chest phantoms only (fixed
seeds), and write it beside the module (NoduleDetect/Resources/Models/nodule_centre_map.pt).

    .venv/bin/python dev/train_nodule_map.py [--cases 48] [--small-nodule-cases 48] [--iterations 4000]
        [--batch-size 16] [--max-minutes M] [--device auto] [--workers N] [--validation-cases 12] [--output FILE]

The shipped file: ``--iterations 30000 --max-minutes 6 --workers 16`` on one NVIDIA H200 (11,669 steps fitted in the
6 minutes; a GPU run does not repeat bit for bit). The phantoms are those the candidate CNNs learn from
(``train_nodule_classifier.py``: nodules of every size, and fourteen 3-8 mm nodules each); they are generated in
parallel, ``--workers`` at a time. The map is then checked on phantoms of the forest's seeds: per size band, the
nodules with a map peak within their radius, and the peaks elsewhere per scan, at scores 0.1, 0.3 and 0.5. A GPU
takes minutes; two CPU cores take about 5 s a step.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "NoduleDetect")]
from RecognitionCore.anatomy import segment_lungs  # noqa: E402
from RecognitionCore.phantoms import make_chest_ct  # noqa: E402
from RecognitionCore.progress import Progress  # noqa: E402
from NoduleDetectLib import detection, nodule_map  # noqa: E402
from train_nodule_classifier import (FOREST_FIRST_SEED, NETWORK_FIRST_SEED, NODULES_PER_CASE,  # noqa: E402
                                     PHANTOM_GRID, SMALL_NODULE_FIRST_SEED, small_nodule_phantoms, small_nodule_specs)

MODEL_PATH = detection.MODELS_DIR / "nodule_centre_map.pt"
SIZE_BANDS_MM = (3, 5, 8, 12, 30.5)
CHECK_SCORES = (0.1, 0.3, 0.5)


def phantom_case(seed_and_kind):
    """(phantom, the pipeline's searched lung mask): the map is predicted, and checked, where the pipeline uses it."""
    seed, small = seed_and_kind
    phantom = make_chest_ct(seed=seed, nodules=small_nodule_specs(seed) if small else NODULES_PER_CASE,
                            **PHANTOM_GRID)
    return phantom, detection.lung_mask(segment_lungs(phantom.image))


def training_case(seed_and_kind):
    """(scaled CT, centre map, log-diameter map, centre voxels) of one phantom, float16, on its map grid."""
    phantom, lungs = phantom_case(seed_and_kind)
    geometry = nodule_map.map_geometry(phantom.image, lungs)
    nodules = [(n.center_lps_mm, n.diameter_mm) for n in phantom.nodules]
    heat, log_diameter = nodule_map.centre_targets(geometry, nodules)
    centres = np.array([np.rint((np.asarray(c) - geometry.origin_lps_mm) / geometry.spacing_mm)[::-1]
                        for c, _ in nodules], dtype=int).reshape(-1, 3)
    return (nodule_map.scaled_ct(phantom.image, geometry).astype(np.float16), heat.astype(np.float16),
            log_diameter.astype(np.float16), centres)


def check(model: nodule_map.NoduleMap, phantoms, device: str) -> None:
    """Print per size band how many nodules of ``phantoms`` ((phantom, lungs) pairs) have a peak within their radius,
    and the other peaks per scan."""
    found = {score: np.zeros(len(SIZE_BANDS_MM) - 1, int) for score in CHECK_SCORES}
    totals = np.zeros(len(SIZE_BANDS_MM) - 1, int)
    false_peaks = dict.fromkeys(CHECK_SCORES, 0)
    for phantom, lungs in phantoms:
        peaks = model.peaks(phantom.image, lungs, min(CHECK_SCORES), 500, device)
        centres = np.array([p.center_lps_mm for p in peaks]).reshape(-1, 3)
        scores = np.array([p.score for p in peaks])
        on_nodule = np.zeros(len(peaks), bool)
        for nodule in phantom.nodules:
            band = np.searchsorted(SIZE_BANDS_MM, nodule.diameter_mm, side="right") - 1
            totals[band] += 1
            near = np.linalg.norm(centres - nodule.center_lps_mm, axis=1) < nodule.diameter_mm / 2
            on_nodule |= near
            for score in CHECK_SCORES:
                found[score][band] += bool(np.any(near & (scores >= score)))
        for score in CHECK_SCORES:
            false_peaks[score] += int(np.count_nonzero(~on_nodule & (scores >= score)))
    bands = ", ".join(f"{a}-{b:g} mm" for a, b in zip(SIZE_BANDS_MM, SIZE_BANDS_MM[1:]))
    seeds = [phantom.seed for phantom, _ in phantoms]
    print(f"check on {len(seeds)} phantoms (seeds {seeds[0]}-{seeds[-1]}); nodules per band ({bands}): "
          f"{totals.tolist()}")
    for score in CHECK_SCORES:
        print(f"  score >= {score}: found {found[score].tolist()}, other peaks "
              f"{false_peaks[score] / len(phantoms):.1f} per scan", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=48, help="phantoms with 3-30 mm nodules")
    parser.add_argument("--small-nodule-cases", type=int, default=48, help="phantoms with 3-8 mm nodules")
    parser.add_argument("--iterations", type=int, default=4000, help="training steps of --batch-size windows")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-minutes", type=float, help="fewer steps when the iterations would take longer")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--validation-cases", type=int, default=12)
    parser.add_argument("--output", type=Path, default=MODEL_PATH)
    args = parser.parse_args(argv)
    started = time.time()
    jobs = [(seed, False) for seed in range(NETWORK_FIRST_SEED, NETWORK_FIRST_SEED + args.cases)]
    jobs += [(seed, True) for seed in range(SMALL_NODULE_FIRST_SEED, SMALL_NODULE_FIRST_SEED + args.small_nodule_cases)]
    checks = [(seed, False) for seed in range(FOREST_FIRST_SEED, FOREST_FIRST_SEED + args.validation_cases)]
    with multiprocessing.get_context("fork").Pool(args.workers) as pool:
        cases = pool.map(training_case, jobs)
        check_phantoms = pool.map(phantom_case, checks) if checks else []
    print(f"{len(cases)} phantoms prepared ({time.time() - started:.0f} s)", flush=True)
    description = (f"{args.cases} generated chest phantoms (seeds {NETWORK_FIRST_SEED}+, {NODULES_PER_CASE} nodules of "
                   f"3-30 mm each, {PHANTOM_GRID}) and "
                   f"{small_nodule_phantoms(args.small_nodule_cases, SMALL_NODULE_FIRST_SEED)}")
    model = nodule_map.train_nodule_map(cases, args.iterations, args.batch_size, device=args.device,
                                        max_seconds=None if args.max_minutes is None else 60 * args.max_minutes,
                                        description=description,
                                        progress=Progress(lambda fraction, message: print(
                                            f"{message} ({time.time() - started:.0f} s)", flush=True)))
    model.save(args.output)
    print(f"saved {args.output} ({time.time() - started:.0f} s)", flush=True)
    if check_phantoms:
        check(model, check_phantoms, args.device)
    print(f"done in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
