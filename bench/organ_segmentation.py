"""OrganSegment benchmark: time and peak RSS of each method (classical, threshold, region growing, grow from seeds,
deep) on the TotalSegmentator example CT and on a 512 x 512 x 300 copy of it (linear resampling), in one run.

    .venv/bin/python bench/organ_segmentation.py [--ct PATH --reference PATH] [--skip-deep]

The large volume is the TotalSegmentator example resampled (not a chest CT), so that every method, the liver ones
included, runs on the same anatomy at both sizes. Each method is timed as the module's Logic runs it, on plain
images: the segmentation, then the Logic's default post-processing (largest component and filled holes for organs);
the deep model's time includes loading the network. Region growing starts from 5 seed points and grow from seeds from
scribbles on 3 planes, both made from the reference liver as a user would place them (not timed). Each measurement
runs in its own process so that its peak RSS is its own (it includes reading and resampling the CT: see
"RSS before"). Goals (2 CPU cores): classical <= 5 s, region growing and grow from seeds <= 10 s, deep <= 60 s, peak
RSS <= 4 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "OrganSegment")]

EXAMPLE = REPO.parent / "shared" / "data" / "totalsegmentator"
TOTALSEGMENTATOR_LIVER = 5  # labels_total.csv
LARGE_SIZE_IJK = (512, 512, 300)
MODEL_ID = "mir_abdomen_organs_unet"
THRESHOLD_HU = (100.0, 3000.0)  # the module's default threshold range
SEED_POINTS = 5
METHODS = ("classical", "threshold", "region growing", "grow from seeds", "deep")
GOAL_SECONDS = {"classical": 5.0, "threshold": 5.0, "region growing": 10.0, "grow from seeds": 10.0, "deep": 60.0}
GOAL_PEAK_RSS_MB = 4096


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def large_grid(image):
    """An empty image of ``LARGE_SIZE_IJK`` voxels over ``image``'s field of view (also used by the SurgeryPlan
    benchmark)."""
    import SimpleITK as sitk

    grid = sitk.Image(list(LARGE_SIZE_IJK), sitk.sitkInt16)
    grid.SetSpacing([spacing * size / new for spacing, size, new in
                     zip(image.GetSpacing(), image.GetSize(), LARGE_SIZE_IJK)])
    # the same field of view: voxel centres move by half the change of spacing
    grid.SetOrigin(image.TransformContinuousIndexToPhysicalPoint(
        [0.5 * new_spacing / spacing - 0.5 for spacing, new_spacing in zip(image.GetSpacing(), grid.GetSpacing())]))
    grid.SetDirection(image.GetDirection())
    return grid


def load(ct: str, reference: str, large: bool):
    """(CT in HU as int16, reference liver mask) on the CT's own grid or resampled to ``LARGE_SIZE_IJK``."""
    import SimpleITK as sitk

    from RecognitionCore.io import read_image
    from RecognitionCore.preprocessing import resample_to_reference

    image = sitk.Cast(read_image(ct), sitk.sitkInt16)
    liver = sitk.Cast(sitk.ReadImage(reference) == TOTALSEGMENTATOR_LIVER, sitk.sitkUInt8)
    if large:
        grid = large_grid(image)
        image = sitk.Cast(resample_to_reference(image, grid, "linear"), sitk.sitkInt16)
        liver = resample_to_reference(liver, grid, "nearest", default_value=0)
    return image, liver


def segment(method: str, image, liver) -> dict:
    """Run ``method`` as the Logic does (segmentation + default post-processing): {"labels": labelmap, "names":
    {value: name}} and, for the interactive methods, "started" (the time after placing their seeds)."""
    import SimpleITK as sitk
    from OrganSegmentLib import interactive, postprocess

    from RecognitionCore import anatomy

    if method == "classical":
        labels, names = anatomy.segment_trunk_labelmap(image)
        organs = [value for value, name in names.items() if name in ("lung_right", "lung_left")]
        return {"labels": postprocess.postprocess_labels(labels, only=organs), "names": names}
    if method == "threshold":
        mask = postprocess.postprocess_labels(interactive.threshold_segment(image, *THRESHOLD_HU))
        return {"labels": mask, "names": {1: "thresholded"}}
    if method == "region growing":
        seeds = interactive.seeds_from_reference(liver, SEED_POINTS, seed=0)
        started = time.perf_counter()
        mask = postprocess.postprocess_labels(interactive.region_grow(image, seeds))
        return {"labels": mask, "names": {1: "liver"}, "started": started}
    if method == "grow from seeds":
        scribbles = interactive.scribbles_from_reference(liver)
        started = time.perf_counter()
        labels = postprocess.postprocess_labels(interactive.grow_from_seeds(image, scribbles).labels, only=[1])
        return {"labels": labels, "names": {1: "liver"}, "started": started}
    from RecognitionCore.models import Catalogue, load_network, resolve_card
    from RecognitionCore.predict import predict_labels

    card = resolve_card(Catalogue().get(MODEL_ID))
    labels = predict_labels(image, card, load_network(card, device="cpu"), device="cpu")
    labels = postprocess.postprocess_labels(sitk.Cast(labels, sitk.sitkUInt8), only=[int(k) for k in card.labels])
    return {"labels": labels, "names": {int(value): name for value, name in card.labels.items()}}


def volumes_ml(labels, names: dict) -> dict:
    """{name: volume in mL, rounded} of each named label value (not timed)."""
    import numpy as np
    import SimpleITK as sitk

    counts = np.bincount(sitk.GetArrayFromImage(labels).ravel(), minlength=max(names) + 1)
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    return {name: round(float(counts[value]) * voxel_ml) for value, name in names.items()}


def child(ct: str, reference: str, large: bool, method: str) -> dict:
    """One measurement in this process."""
    image, liver = load(ct, reference, large)
    before = peak_rss_mb()
    started = time.perf_counter()
    result = segment(method, image, liver)
    seconds = time.perf_counter() - result.pop("started", started)
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(peak_rss_mb()), "rss_before_mb": round(before),
            "size": list(image.GetSize()), "spacing_mm": [round(s, 3) for s in image.GetSpacing()],
            "found": volumes_ml(result["labels"], result["names"])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ct", default=str(EXAMPLE / "example_ct.nii.gz"))
    parser.add_argument("--reference", default=str(EXAMPLE / "example_seg_fast_force_split.nii.gz"),
                        help="TotalSegmentator labels of the CT (liver = 5): where seeds and scribbles are placed")
    parser.add_argument("--skip-deep", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("LARGE", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.ct, args.reference, args.child[0] == "1", args.child[1])))
        return 0
    methods = [method for method in METHODS if not (args.skip_deep and method == "deep")]
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())} ({os.cpu_count()} CPUs)")
    rows = []
    for large in (False, True):
        for method in methods:
            output = subprocess.run([sys.executable, __file__, "--ct", args.ct, "--reference", args.reference,
                                     "--child", "1" if large else "0", method], capture_output=True, text=True)
            if output.returncode:
                rows.append((method, large, f"failed: {output.stderr.strip().splitlines()[-1]}"))
                continue
            rows.append((method, large, json.loads(output.stdout.strip().splitlines()[-1])))
    print(f"{'method':<16} {'volume':<12} {'seconds':>8} {'goal s':>7} {'peak RSS MB':>12} {'RSS before MB':>14} "
          f"{'goals':>6}  found (mL)")
    for method, large, result in rows:
        if isinstance(result, str):
            print(f"{method:<16} {'512x512x300' if large else 'original':<12} {result}")
            continue
        size = "x".join(map(str, result["size"]))
        met = result["seconds"] <= GOAL_SECONDS[method] and result["peak_rss_mb"] <= GOAL_PEAK_RSS_MB
        print(f"{method:<16} {size:<12} {result['seconds']:>8} {GOAL_SECONDS[method]:>7g} {result['peak_rss_mb']:>12} "
              f"{result['rss_before_mb']:>14} {'met' if met else 'NOT':>6}  {result['found']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
