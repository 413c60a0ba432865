"""SurgeryPlan benchmark: time and peak RSS of the resection analysis on the TotalSegmentator example (liver, portal
vein, inferior vena cava, a placed 30 mm tumour) and on a 512 x 512 x 300 copy of it, in one run.

    .venv/bin/python bench/surgery_plan.py [--ct PATH --reference PATH]

Rows: the steps of a margin plan on plain masks (inner vessels, tumour report with the vessel distances, margin
resection, volumetry) and their total as ``plan_resection`` runs them (goal <= 5 s on 2 cores); the whole Logic run
with the scene outputs and 3D surfaces; a plane update as the panel does it while the surgeon drags (the Logic's
``updatePlane`` without segments: re-cut, volumes, table; goal <= 0.2 s) and when the drag pauses (with the
resection and remnant segments and their 3D surfaces replaced); the vascular territories. The large grid
is the example resampled (masks by nearest neighbour, the CT linearly), so both sizes show the same anatomy. Each
size runs in its own process so that its peak RSS is its own.
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
sys.path[:0] = [str(REPO), str(REPO / "SurgeryPlan")]

EXAMPLE = REPO.parent / "shared" / "data" / "totalsegmentator"
LABELS = {"liver": 5, "inferior_vena_cava": 63, "portal_vein_and_splenic_vein": 64}  # labels_total.csv
TUMOUR_CENTRE_LPS_MM, TUMOUR_DIAMETER_MM = (-98.0, -164.3, 394.3), 30.0  # deepest point of the right liver
PLANE_UPDATES = 5
GOALS = {"plan_resection (margin) total": 5.0, "plane drag: re-cut, volumes, table": 0.2}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def load(ct_path: str, reference_path: str, large: bool):
    """(CT, {structure: mask}, tumour mask) on the example's grid or resampled to 512 x 512 x 300."""
    import SimpleITK as sitk

    from organ_segmentation import large_grid
    from RecognitionCore.io import read_image
    from RecognitionCore.preprocessing import ball_mask

    image = sitk.Cast(read_image(ct_path), sitk.sitkInt16)
    labels = sitk.ReadImage(reference_path)
    if large:
        grid = large_grid(image)
        image = sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, -1024)
        labels = sitk.Resample(labels, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    masks = {name: sitk.Cast(labels == value, sitk.sitkUInt8) for name, value in LABELS.items()}
    return image, masks, ball_mask(image, TUMOUR_CENTRE_LPS_MM, TUMOUR_DIAMETER_MM)


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def measure(ct_path: str, reference_path: str, large: bool) -> dict:
    import numpy as np
    import SimpleITK as sitk

    from RecognitionCore import scene
    from RecognitionCore.headless import create_app
    from RecognitionCore.volumes import sitk_to_volume_node
    from SurgeryPlanLib import geometry, plan, territories

    image, masks, tumour = load(ct_path, reference_path, large)
    liver = masks["liver"]
    vessels = {"Portal vein": masks["portal_vein_and_splenic_vein"], "IVC": masks["inferior_vena_cava"]}
    rows = {"RSS before (MB)": peak_rss_mb()}
    whole, rows["inner vessels"] = timed(geometry.organ_with_inner_vessels,
                                         sitk.Cast(liver | tumour, sitk.sitkUInt8), list(vessels.values()))
    _, rows["tumour report (distances)"] = timed(geometry.tumour_report, tumour, whole, vessels)
    resected, rows["margin resection"] = timed(geometry.margin_resection, tumour, whole, 10.0)
    _, rows["volumetry"] = timed(geometry.volumetry, whole, tumour, resected)
    _, rows["plan_resection (margin) total"] = timed(plan.plan_resection, liver, {"Tumour": tumour}, vessels)

    app = create_app()
    volume = sitk_to_volume_node(image, "CT", scene=app.scene)
    labels = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8)
    for value, mask in enumerate([liver, vessels["Portal vein"], vessels["IVC"], tumour], start=1):
        labels[sitk.GetArrayViewFromImage(mask) != 0] = value
    segmentation = scene.add_segmentation_from_labelmap(labels, volume, {1: "liver", 2: "portal_vein",
                                                                         3: "inferior_vena_cava", 4: "tumour"}, "Input")
    segments = segmentation.GetSegmentation()
    ids = [segments.GetNthSegmentID(index) for index in range(4)]
    import SurgeryPlan
    logic = SurgeryPlan.SurgeryPlanLogic()
    outputs, rows["Logic: plane plan + scene + surfaces"] = timed(logic.process, volume, segmentation, ids[0],
                                                                 [ids[3]], ids[1:3], method="plane")
    origin = np.array(outputs.plane.GetOriginWorld())
    normal = np.array(outputs.plane.GetNormalWorld())
    for key, segments in (("plane drag: re-cut, volumes, table", False),
                          ("plane pause: + segments, 3D surfaces", True)):
        seconds = []
        for step in range(PLANE_UPDATES):
            outputs.plane.SetOriginWorld(origin - (step + 1) * normal)  # 1 mm steps away from the tumour
            seconds.append(timed(logic.updatePlane, outputs, updateSegments=segments)[1])
        rows[key] = float(np.median(seconds))
    result, rows["vascular territories (portal vein, generation 2)"] = timed(
        territories.vascular_territories, whole, vessels["Portal vein"], 2)
    rows["territories found"] = len(result.territories)
    rows["grid"] = "x".join(map(str, image.GetSize()))
    rows["peak RSS (MB)"] = peak_rss_mb()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ct", default=str(EXAMPLE / "example_ct.nii.gz"))
    parser.add_argument("--reference", default=str(EXAMPLE / "example_seg_fast_force_split.nii.gz"))
    parser.add_argument("--one", choices=("example", "large"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.ct, args.reference, args.one == "large")))
        return 0
    results = {}
    for size in ("example", "large"):
        run = subprocess.run([sys.executable, __file__, "--ct", args.ct, "--reference", args.reference, "--one", size],
                             capture_output=True, text=True, check=True)
        results[size] = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"{'step (seconds unless named)':52s} {'example ' + results['example']['grid']:>18s} "
          f"{'large ' + results['large']['grid']:>18s}  goal")
    for key in results["example"]:
        if key == "grid":
            continue
        values = [results[size][key] for size in ("example", "large")]
        cells = [f"{value:18.3f}" if isinstance(value, float) else f"{value:>18}" for value in values]
        goal = f"  <= {GOALS[key]:g} s" if key in GOALS else ""
        print(f"{key:52s} {cells[0]} {cells[1]}{goal}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
