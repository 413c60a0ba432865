"""The ``evaluate`` command: detection FROC tables on LUNA16 CSVs (hand-made and the real LIDC annotations), the
segmentation table on labelmap files, learning curves from a log, and its errors for mismatched grids."""

import contextlib
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from RecognitionCore import cli, evaluation
from RecognitionCore.evaluation import Annotation, Detection


def run_cli(*arguments):
    """Exit status, standard output and standard error of one command."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main([str(argument) for argument in arguments])
    return status, out.getvalue(), err.getvalue()


def write_annotations(annotations, path):
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"))
        writer.writerows((a.seriesuid, *a.center_lps_mm, a.diameter_mm) for a in annotations)
    return path


def test_detection_on_hand_made_csvs(tmp_path):
    nodules = [Annotation("A", (0.0, 0.0, 0.0), 10.0), Annotation("B", (5.0, 5.0, 5.0), 8.0)]
    detections = [Detection("A", (1.0, 0.0, 0.0), 0.9), Detection("A", (30.0, 0.0, 0.0), 0.8),
                  Detection("B", (5.0, 5.0, 8.0), 0.3), Detection("C", (0.0, 0.0, 0.0), 0.95),
                  Detection("C", (50.0, 0.0, 0.0), 0.99)]
    excluded = [Annotation("C", (50.0, 0.0, 0.0), 6.0)]
    (tmp_path / "seriesuids.csv").write_text("seriesuid\nA\nB\nC\nD\n")
    status, out, _ = run_cli(
        "evaluate", "detection", "--annotations", write_annotations(nodules, tmp_path / "annotations.csv"),
        "--detections", evaluation.write_detections_csv(detections, tmp_path / "detections.csv"),
        "--excluded", write_annotations(excluded, tmp_path / "excluded.csv"),
        "--seriesuids", tmp_path / "seriesuids.csv", "--threshold", "0.5", "--output", tmp_path / "out")
    assert status == 0, out
    # 4 scans; thresholds 0.95 (FP), 0.9 (A), 0.8 (FP), 0.3 (B): points (1/4, 0), (1/4, 1/2), (1/2, 1/2), (1/2, 1)
    metrics = json.loads((tmp_path / "out" / "detection_metrics.json").read_text())
    assert [row["sensitivity"] for row in metrics["froc"]] == [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 5.5 / 7]
    assert metrics["at_threshold"]["precision"] == 1 / 3 and metrics["at_threshold"]["recall"] == 0.5
    assert "4 scans, 2 nodules, 5 detections: 2 false positives, 1 on irrelevant findings" in out
    assert "2 of 2 nodules have a detection at some threshold" in out and metrics["nodules_detected"] == 2
    assert "precision 0.333, recall 0.500, F1 0.400" in out
    assert "CPM" in out and "0.786" in out
    assert (tmp_path / "out" / "froc.png").stat().st_size > 10_000
    with open(tmp_path / "out" / "froc.csv") as stream:
        assert [row["fps_per_scan"] for row in csv.DictReader(stream)][-1] == "CPM"


def test_detection_says_how_many_nodules_any_threshold_can_reach(tmp_path):
    nodules = [Annotation("A", (0.0, 0.0, 0.0), 10.0), Annotation("A", (40.0, 0.0, 0.0), 6.0)]
    detections = [Detection("A", (1.0, 0.0, 0.0), 0.2), Detection("A", (40.0, 9.0, 0.0), 0.9)]  # the second misses
    status, out, _ = run_cli(
        "evaluate", "detection", "--annotations", write_annotations(nodules, tmp_path / "annotations.csv"),
        "--detections", evaluation.write_detections_csv(detections, tmp_path / "detections.csv"),
        "--output", tmp_path / "out")
    assert status == 0, out
    assert "1 of 2 nodules have a detection at some threshold: no threshold or ranking of these detections gets " \
           "past sensitivity 0.500" in out
    assert json.loads((tmp_path / "out" / "detection_metrics.json").read_text())["nodules_detected"] == 1


def test_detection_on_the_real_lidc_annotations(tmp_path, shared_data):
    annotations_csv = shared_data / "lidc" / "annotations.csv"
    annotations = evaluation.read_annotations_csv(annotations_csv)
    assert len(annotations) == 5
    exact = [Detection(a.seriesuid, a.center_lps_mm, 0.9) for a in annotations]
    # shifted by a whole diameter along x: out of its own nodule and, here, of every other one
    shifted = [Detection(a.seriesuid, (a.center_lps_mm[0] + a.diameter_mm, *a.center_lps_mm[1:]), 0.9)
               for a in annotations]
    for name, detections, expected_cpm in (("exact", exact, 1.0), ("shifted", shifted, 0.0)):
        path = evaluation.write_detections_csv(detections, tmp_path / f"{name}.csv")
        status, out, err = run_cli("evaluate", "detection", "--annotations", annotations_csv, "--detections", path,
                                   "--bootstrap", "100", "--output", tmp_path / name)
        assert status == 0, err
        metrics = json.loads((tmp_path / name / "detection_metrics.json").read_text())
        assert metrics["cpm"] == expected_cpm and metrics["nodules"] == 5 and metrics["scans"] == 2, (name, out)
        assert (tmp_path / name / "froc.png").is_file()


def labelmap(array, spacing=(1.5, 1.5, 3.0), origin=(0.0, 0.0, 0.0)):
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def test_segmentation_table_and_grid_mismatch(tmp_path):
    truth = np.zeros((12, 24, 24), np.uint8)
    truth[3:9, 4:12, 4:12] = 1
    truth[3:9, 14:20, 14:20] = 2
    prediction = truth.copy()
    prediction[3:9, 4:12, 4:8] = 0
    sitk.WriteImage(labelmap(truth), str(tmp_path / "truth.nii.gz"))
    sitk.WriteImage(labelmap(prediction), str(tmp_path / "prediction.nrrd"))
    (tmp_path / "labels.csv").write_text("value,name\n1,liver\n2,spleen\n")
    status, out, err = run_cli("evaluate", "segmentation", "--truth", tmp_path / "truth.nii.gz", "--prediction",
                               tmp_path / "prediction.nrrd", "--labels", tmp_path / "labels.csv",
                               "--output", tmp_path / "out")
    assert status == 0, err
    with open(tmp_path / "out" / "segmentation.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert [row["name"] for row in rows] == ["liver", "spleen"]
    assert np.isclose(float(rows[0]["dice"]), 2 * 192 / (384 + 192)) and float(rows[1]["dice"]) == 1.0
    assert np.isclose(float(rows[0]["volume_truth_ml"]), 384 * 1.5 * 1.5 * 3.0 / 1000)
    assert "liver" in out and "mean Dice over the 2 labels" in out

    sitk.WriteImage(labelmap(prediction, origin=(0.0, 0.0, 6.0)), str(tmp_path / "moved.nrrd"))
    status, out, err = run_cli("evaluate", "segmentation", "--truth", tmp_path / "truth.nii.gz", "--prediction",
                               tmp_path / "moved.nrrd", "--output", tmp_path / "moved")
    assert status == 2 and "not on the truth's grid" in err and "origin (0, 0, 6)" in err, err
    assert not (tmp_path / "moved").exists()


def test_learning_curves_from_a_log(tmp_path):
    log = [{"epoch": epoch, "train_loss": 2.0 / epoch, "val_dice": 0.5 + epoch / 40} for epoch in range(1, 9)]
    (tmp_path / "log.json").write_text(json.dumps({"epochs": log}))
    status, out, err = run_cli("evaluate", "curves", "--log", tmp_path / "log.json", "--output", tmp_path)
    assert status == 0, err
    assert "train_loss" in out and (tmp_path / "learning_curves.png").stat().st_size > 10_000


def test_synthetic_measurements_compare_findings_with_the_phantom_truth(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dev"))
    import evaluate_nodule_detection as script

    phantom = script.first_synthetic_case()
    uid = f"synthetic_{script.SYNTHETIC_FIRST_SEED:05d}"
    phantom.write_lesion_truth(tmp_path / f"{uid}_lesions.csv")
    truth = phantom.nodules[0]
    r, a, s = -truth.center_lps_mm[0], -truth.center_lps_mm[1], truth.center_lps_mm[2]
    assert truth.type == "part-solid" and truth.diameter_mm < 6.0  # Lung-RADS band 2 whatever its solid part
    header = ("nodule,confidence,type,mean_axial_diameter_mm,volume_mm3,solid_mean_axial_diameter_mm,"
              "lung_rads_size_band,center_r_mm,center_a_mm,center_s_mm\n")
    rows = [f"N1,0.9,part-solid,{truth.diameter_mm + 1.0},{truth.volume_ml * 2000.0},"
            f"{truth.solid_diameter_mm + 0.5},3,{r},{a},{s}\n",
            f"N2,0.4,{truth.type},{truth.diameter_mm},{truth.volume_ml * 1000.0},0,2,{r},{a},{s}\n",  # below 0.5
            f"N3,0.95,{truth.type},5.0,1.0,0,2,{r + truth.diameter_mm},{a},{s}\n"]  # outside the radius
    (tmp_path / f"{uid}_nodules.csv").write_text(header + "".join(rows))
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        path = script.synthetic_measurements(tmp_path, tmp_path)
    measured = list(csv.DictReader(open(path)))
    assert [row["nodule"] for row in measured] == ["N1"] and measured[0]["type"] == truth.type
    assert float(measured[0]["measured_mean_axial_diameter_mm"]) - truth.diameter_mm == 1.0
    assert float(measured[0]["measured_volume_mm3"]) / float(measured[0]["volume_mm3"]) == pytest.approx(2.0, rel=0.01)
    assert "+1.0 (+1.0..+1.0)" in printed.getvalue() and "+100 (+100..+100)" in printed.getvalue()
    assert measured[0]["lung_rads_band"] == "2" and measured[0]["measured_lung_rads_band"] == "3"
    assert "Lung-RADS size band (truth -> measured): 2 -> 3: 1" in printed.getvalue()
    assert "solid part of the 1 part-solid nodules typed part-solid: mean axial diameter error +0.5" in \
        printed.getvalue()


def test_lidc_types_set_the_readers_texture_beside_each_finding(tmp_path, shared_data, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "dev"))
    import evaluate_nodule_detection as script

    with open(shared_data / "lidc" / "annotations.csv") as file:
        clusters = list(csv.DictReader(file))
    first = clusters[0]  # LIDC-IDRI-0001's nodule: its DICOM folder names the findings
    assert first["seriesuid"] == script.LIDC_0001_UID
    r, a, s = -float(first["coordX"]), -float(first["coordY"]), float(first["coordZ"])
    header = ("nodule,confidence,type,mean_axial_diameter_mm,solid_mean_axial_diameter_mm,lung_rads_size_band,"
              "center_r_mm,center_a_mm,center_s_mm\n")
    (tmp_path / "LIDC-IDRI-0001_nodules.csv").write_text(header + f"N1,0.9,solid,24.4,24.1,4B,{r},{a},{s}\n")
    (tmp_path / f"{clusters[1]['seriesuid']}_nodules.csv").write_text(header + f"N1,0.4,solid,5,5,2,{r},{a},{s}\n")
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        script.lidc_types(shared_data, tmp_path)
    lines = printed.getvalue().splitlines()[1:]
    assert len(lines) == len(clusters) == 5
    assert lines[0].strip() == ("LIDC-IDRI-0001, 33 mm, 4 readers, texture [4, 5, 5, 5]: solid, 24.4 mm (solid part "
                                "24.1 mm), band 4B, confidence 0.9")
    assert all(line.startswith("  LIDC-IDRI-0003") and line.endswith("no finding") for line in lines[1:])
    assert "texture [5, 5, 5, 5]" in printed.getvalue() and "1 readers, texture [1]" in printed.getvalue()


def test_the_nodule_evaluation_says_when_it_finds_no_lidc_cases(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "dev"))
    import evaluate_nodule_detection as script

    assert script.main(["--synthetic", "0", "--shared", str(tmp_path), "--output", str(tmp_path / "out")]) == 1
    assert f"No LIDC cases in {tmp_path / 'lidc'}" in capsys.readouterr().err
