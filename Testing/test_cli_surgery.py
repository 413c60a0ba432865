"""`cli surgery`: SurgeryPlan from the command line on the default abdominal phantom (its liver, tumours and vessels as
the segmentation) and on the real TotalSegmentator example with a placed tumour; the files it writes (scene, table,
STL, report) agree with each other and reload."""

import csv
import math

import numpy as np
import SimpleITK as sitk

from RecognitionCore import cli, io
from RecognitionCore.headless import create_app

PHANTOM = ["--phantom-size", "96", "96", "64", "--phantom-spacing", "4.0", "4.0", "4.5", "--phantom-seed", "4"]
TOTALSEGMENTATOR_TUMOUR = ["-98", "-164.3", "394.3", "30"]  # LPS mm, diameter: deepest point of the right liver


def _rows(path):
    return {(row["section"], row["measure"]): row for row in csv.DictReader(open(path))}


def test_surgery_on_the_default_phantom_writes_scene_table_stl_and_report(tmp_path):
    assert cli.main(["surgery", "--quiet", "--output", str(tmp_path), "--method", "plane", *PHANTOM]) == 0
    name = "abdomen_phantom_4"
    rows = _rows(tmp_path / f"{name}_plan.csv")
    total = float(rows[("Volumetry", "organ (with tumours)")]["value"])
    resected = float(rows[("Volumetry", "resected")]["value"])
    remnant = float(rows[("Volumetry", "remnant")]["value"])
    assert abs(resected + remnant - total) < 0.05, (resected, remnant, total)
    assert abs(float(rows[("Plane resection", "tumour clearance to the plane")]["value"]) - 10.0) < 0.01
    stl = sorted(path.name for path in (tmp_path / f"{name}_stl").iterdir())
    assert any(path.endswith("_Remnant.stl") for path in stl) and any(path.endswith("_Tumour 1.stl") for path in stl)
    assert (tmp_path / f"{name}_report.png").stat().st_size > 50_000
    app = create_app()
    io.load_scene(tmp_path / f"{name}.mrb", app.scene)
    plan = app.scene.GetFirstNodeByName("Abdomen phantom 4 resection plan")
    assert plan is not None and plan.GetSegmentation().GetSegmentIdBySegmentName("Resection")
    assert app.scene.GetFirstNodeByName("Abdomen phantom 4 resection plane") is not None


def test_surgery_on_the_totalsegmentator_example_with_a_placed_tumour(tmp_path, shared_data):
    example = shared_data / "totalsegmentator"
    status = cli.main(["surgery", "--quiet", "--output", str(tmp_path),
                       "--input", str(example / "example_ct.nii.gz"),
                       "--segmentation", str(example / "example_seg_fast_force_split.nii.gz"),
                       "--label-names", str(example / "labels_total.csv"), "--organ", "liver",
                       "--vessel", "portal_vein_and_splenic_vein", "--vessel", "inferior_vena_cava",
                       "--place-tumour", *TOTALSEGMENTATOR_TUMOUR])
    assert status == 0
    rows = _rows(tmp_path / "example_ct_plan.csv")
    tumour_ml = float(rows[("Placed tumour 1", "volume")]["value"])
    assert abs(tumour_ml - math.pi * 30.0 ** 3 / 6000.0) / tumour_ml < 0.1, tumour_ml  # a 30 mm ball on 3 mm voxels
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(example / "example_seg_fast_force_split.nii.gz")))
    liver_ml = np.count_nonzero(labels == 5) * 27.0 / 1000.0
    total_ml = float(rows[("Volumetry", "organ (with tumours)")]["value"])
    assert liver_ml <= total_ml < liver_ml * 1.1, (liver_ml, total_ml)  # the liver, its inner vessels and the tumour
    flr = float(rows[("Volumetry", "future remnant (of the functional volume)")]["value"])
    assert 80.0 < flr < 100.0, flr  # a 30 mm tumour with a 10 mm margin in a 1.1 L liver
    assert (tmp_path / "example_ct_report.png").is_file()
