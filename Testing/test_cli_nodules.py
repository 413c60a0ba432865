"""`cli nodules`: NoduleDetect from the command line on a phantom and in a batch with a bad case; the scene it writes
reloads with the findings, and the LUNA16 rows point at the findings in world (LPS) millimetres."""

import csv

import numpy as np
import SimpleITK as sitk

from RecognitionCore import cli, io
from RecognitionCore.headless import create_app
from RecognitionCore.phantoms import NoduleSpec, make_chest_ct

PHANTOM = ["--phantom-size", "192", "192", "72", "--phantom-spacing", "1.6", "1.6", "3.0", "--phantom-seed", "11"]


def test_nodules_on_the_default_phantom_writes_scene_csv_png_and_luna16_rows(tmp_path):
    assert cli.main(["nodules", "--quiet", "--output", str(tmp_path), *PHANTOM]) == 0
    name = "chest_phantom_11"
    assert (tmp_path / f"{name}.png").stat().st_size > 10_000
    findings = list(csv.DictReader(open(tmp_path / f"{name}_nodules.csv")))
    luna16 = list(csv.DictReader(open(tmp_path / "detections.csv")))
    assert len(findings) == len(luna16) >= 1
    for finding, row in zip(findings, luna16):  # the table shows RAS, LUNA16 wants LPS
        assert row["seriesuid"] == name
        np.testing.assert_allclose([float(row["coordX"]), float(row["coordY"])],
                                   [-float(finding["center_r_mm"]), -float(finding["center_a_mm"])], atol=0.06)
    truth = make_chest_ct((192, 192, 72), (1.6, 1.6, 3.0), seed=11).nodules
    hits = [any(np.linalg.norm(np.subtract(n.center_lps_mm, [float(r["coordX"]), float(r["coordY"]),
                                                              float(r["coordZ"])])) < n.diameter_mm / 2
                for r in luna16) for n in truth if n.diameter_mm >= 6]
    assert hits and all(hits), [(n.diameter_mm, n.type) for n in truth]
    app = create_app()
    io.load_scene(tmp_path / f"{name}.mrb", app.scene)
    points = app.scene.GetFirstNodeByName("Chest phantom 11 nodules")
    assert points.GetNumberOfControlPoints() == len(findings)
    assert app.scene.GetFirstNodeByName("Ground-truth nodules") is not None


def test_nodules_batch_goes_on_after_a_bad_case(tmp_path, shared_data):
    good = tmp_path / "small.nrrd"
    sitk.WriteImage(make_chest_ct((128, 128, 48), (2.4, 2.4, 4.5), seed=2, nodules=[NoduleSpec(12.0)]).image,
                    str(good))
    status = cli.main(["nodules", "--quiet", "--output", str(tmp_path / "out"), "--input",
                       str(shared_data / "single_slice" / "lidc_slice.dcm"), "--input", str(good)])
    assert status == 1
    assert (tmp_path / "out" / "small.mrb").is_file() and not (tmp_path / "out" / "lidc_slice.mrb").exists()
    assert (tmp_path / "out" / "detections.csv").is_file()
