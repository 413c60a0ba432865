"""Detection metrics by LUNA16's rules on hand-made cases with known answers; Dice, HD95 and volumes on known masks;
the PNG plots; bad input."""

import math

import numpy as np
import SimpleITK as sitk
from scipy.spatial import cKDTree

from RecognitionCore import evaluation
from RecognitionCore.errors import InputError
from RecognitionCore.evaluation import Annotation, Detection
from RecognitionCore.testing import assert_raises

# Scan A: nodules A1 (10 mm) and A2 (6 mm); scan B: nodule B1 (20 mm); scan C: no nodule.
NODULES = [Annotation("A", (0.0, 0.0, 0.0), 10.0), Annotation("A", (50.0, 0.0, 0.0), 6.0),
           Annotation("B", (0.0, 0.0, 0.0), 20.0)]
DETECTIONS = [
    Detection("A", (1.0, 1.0, 1.0), 0.9),     # hits A1
    Detection("A", (0.0, 0.0, 4.0), 0.4),     # hits A1 again: counts neither way
    Detection("A", (50.0, 0.0, 2.9), 0.3),    # hits A2, just inside its 3 mm radius
    Detection("A", (50.0, 0.0, 3.0), 0.95),   # on A2's radius, not within it: false positive
    Detection("B", (0.0, 9.0, 0.0), 0.8),     # hits B1
    Detection("B", (30.0, 0.0, 0.0), 0.7),    # false positive
    Detection("C", (0.0, 0.0, 0.0), 0.6),     # false positive on a scan without nodules
    Detection("C", (10.0, 0.0, 0.0), 0.2),    # false positive
]
SCANS = ["A", "B", "C"]


def test_froc_of_a_hand_made_case_has_the_known_points_and_sensitivities():
    curve = evaluation.froc(DETECTIONS, NODULES, SCANS)
    # thresholds 0.95 (FP), 0.9 (A1), 0.8 (B1), 0.7 (FP), 0.6 (FP), 0.3 (A2), 0.2 (FP); 3 scans, 3 nodules
    np.testing.assert_allclose(curve.fps_per_scan, [0, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 1, 1, 4 / 3])
    np.testing.assert_allclose(curve.sensitivity, [0, 0, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 1, 1])
    np.testing.assert_allclose(curve.thresholds[1:], [0.95, 0.9, 0.8, 0.7, 0.6, 0.3, 0.2])
    # at 1 FP/scan the curve steps from 2/3 to 1: the sensitivity reached with one FP per scan is the top
    np.testing.assert_allclose(evaluation.sensitivity_at_fps(curve), [0, 0, 2 / 3, 1, 1, 1, 1])
    assert math.isclose(evaluation.cpm(curve), 2 / 3)
    assert (curve.match.duplicates, curve.match.ignored, len(curve.match.false_positive_probability)) == (1, 0, 4)


def test_a_scan_without_annotations_or_detections_still_counts_in_the_rate():
    with_empty_scan = evaluation.froc(DETECTIONS, NODULES, SCANS + ["D"])
    np.testing.assert_allclose(with_empty_scan.fps_per_scan[-1], 4 / 4)
    # the default scan list is every scan the CSVs name: D is unknown then, and C only through its detections
    assert evaluation.match_detections(DETECTIONS, NODULES).seriesuids == ("A", "B", "C")


def test_perfect_detector_scores_one_and_a_shifted_one_zero():
    perfect = [Detection(n.seriesuid, n.center_lps_mm, 1.0) for n in NODULES]
    assert evaluation.cpm(evaluation.froc(perfect, NODULES, SCANS)) == 1.0
    for shift_mm in (5.0, 10.0):  # A1's radius is 5 mm: a centre on the radius is outside
        shifted = [Detection(n.seriesuid, (n.center_lps_mm[0] + max(shift_mm, n.diameter_mm / 2), *n.center_lps_mm[1:]),
                             1.0) for n in NODULES]
        curve = evaluation.froc(shifted, NODULES, SCANS)
        assert evaluation.cpm(curve) == 0.0 and len(curve.match.false_positive_probability) == 3


def test_hits_on_excluded_findings_are_neither_true_nor_false_positives():
    excluded = [Annotation("C", (0.0, 0.0, 0.0), 4.0), Annotation("A", (50.0, 0.0, 3.0), -1.0)]  # -1: LUNA16's 10 mm
    match = evaluation.match_detections(DETECTIONS, NODULES, SCANS, excluded)
    assert match.ignored == 2  # the 0.6 on C and the 0.95 next to A2; the 0.3 hits A2 and stays a true positive
    np.testing.assert_allclose(sorted(match.false_positive_probability), [0.2, 0.7])
    np.testing.assert_allclose(match.nodule_probability, [0.9, 0.3, 0.8])
    curve = evaluation.froc_from_match(match)
    np.testing.assert_allclose(evaluation.sensitivity_at_fps(curve, [0.125, 1 / 3, 2 / 3]), [2 / 3, 1, 1])


def test_tied_probabilities_interpolate_linearly_between_operating_points():
    # one scan: a nodule and a false positive at the same probability, a second false positive lower
    nodules = [Annotation("S", (0.0, 0.0, 0.0), 10.0), Annotation("S", (40.0, 0.0, 0.0), 10.0)]
    detections = [Detection("S", (0.0, 0.0, 0.0), 0.5), Detection("S", (20.0, 0.0, 0.0), 0.5),
                  Detection("S", (-20.0, 0.0, 0.0), 0.1)]
    curve = evaluation.froc(detections, nodules)
    np.testing.assert_allclose(curve.fps_per_scan, [0, 1, 2])
    np.testing.assert_allclose(curve.sensitivity, [0, 0.5, 0.5])
    # by hand: on the segment (0, 0)-(1, 0.5), sensitivity = fps / 2; flat at 0.5 after; the missed nodule caps it
    np.testing.assert_allclose(evaluation.sensitivity_at_fps(curve), [0.0625, 0.125, 0.25, 0.5, 0.5, 0.5, 0.5])
    assert math.isclose(evaluation.cpm(curve), (0.0625 + 0.125 + 0.25 + 2.0) / 7)


def test_precision_recall_f1_count_like_the_froc():
    counts = evaluation.precision_recall_f1(DETECTIONS, NODULES, 0.5, SCANS)
    # kept (>= 0.5): hits on A1 and B1, false positives 0.95, 0.7 and 0.6
    assert (counts.true_positives, counts.false_positives, counts.false_negatives) == (2, 3, 1)
    assert math.isclose(counts.precision, 0.4) and math.isclose(counts.recall, 2 / 3) and math.isclose(counts.f1, 0.5)
    counts = evaluation.precision_recall_f1(DETECTIONS, NODULES, 0.3, SCANS)  # the duplicate 0.4 is kept, not counted
    assert (counts.true_positives, counts.false_positives) == (3, 3) and math.isclose(counts.precision, 0.5)
    nothing_kept = evaluation.precision_recall_f1(DETECTIONS, NODULES, 0.99, SCANS)
    assert math.isnan(nothing_kept.precision) and nothing_kept.recall == 0.0 and nothing_kept.f1 == 0.0


def test_bootstrap_gives_an_interval_around_the_cpm():
    curve = evaluation.froc(DETECTIONS, NODULES, SCANS, bootstrap=200, seed=1)
    bounds = curve.confidence
    assert bounds.cpm_low <= evaluation.cpm(curve) <= bounds.cpm_high and bounds.cpm_low < bounds.cpm_high
    assert np.all(bounds.sensitivity_low <= bounds.sensitivity_high)
    rows = evaluation.froc_rows(curve)
    assert [row["fps_per_scan"] for row in rows] == ["1/8", "1/4", "1/2", "1", "2", "4", "8", "CPM"]
    assert rows[-1]["ci_low"] == bounds.cpm_low
    again = evaluation.froc(DETECTIONS, NODULES, SCANS, bootstrap=200, seed=1).confidence
    assert again.cpm_low == bounds.cpm_low and again.cpm_high == bounds.cpm_high


def test_luna16_csv_round_trip_and_bad_rows(tmp_path):
    path = evaluation.write_detections_csv(DETECTIONS, tmp_path / "detections.csv")
    assert evaluation.read_detections_csv(path) == DETECTIONS
    rows = [{"seriesuid": "A", "coordX": 1.5, "coordY": 2.0, "coordZ": -3.0, "diameter_mm": 8.0}]
    assert evaluation.as_annotations(rows) == [Annotation("A", (1.5, 2.0, -3.0), 8.0)]
    (tmp_path / "bad.csv").write_text("seriesuid,coordX,coordY,coordZ,probability\nA,1,2,x,0.5\n")
    assert_raises(InputError, evaluation.read_detections_csv, tmp_path / "bad.csv", match="line 2: coordZ")
    (tmp_path / "short.csv").write_text("seriesuid,coordX,coordY\nA,1,2\n")
    assert_raises(InputError, evaluation.read_annotations_csv, tmp_path / "short.csv", match="coordZ")
    assert_raises(InputError, evaluation.read_detections_csv, tmp_path / "missing.csv", match="not found")
    assert_raises(InputError, evaluation.froc, DETECTIONS, [], SCANS, match="No annotated nodules")
    assert_raises(InputError, evaluation.as_detections, [Detection("A", (0, 0, 0), math.nan)], match="finite")


def test_dice_on_known_masks():
    truth = np.zeros((4, 10, 10), np.uint8)
    truth[:, :5] = 1                                   # 200 voxels
    prediction = np.zeros_like(truth)
    prediction[:, 2:7] = 1                             # 200 voxels, 120 shared
    assert math.isclose(evaluation.dice(truth, prediction), 0.6)
    assert evaluation.dice(np.zeros((3, 3, 3)), np.zeros((3, 3, 3))) == 1.0
    assert evaluation.dice(truth, np.zeros_like(truth)) == 0.0
    labels_truth, labels_prediction = truth * 3, prediction * 3
    labels_truth[:, 8:] = 7
    scores = evaluation.dice_per_label(labels_truth, labels_prediction, [3, 7, 9])
    assert math.isclose(scores[3], 0.6) and scores[7] == 0.0 and scores[9] == 1.0
    assert_raises(InputError, evaluation.dice, truth, truth[:2], match="shape")


def sphere(shape_zyx, spacing_xyz, center_xyz_mm, radius_mm):
    z, y, x = np.indices(shape_zyx)
    coordinates = (x * spacing_xyz[0], y * spacing_xyz[1], z * spacing_xyz[2])
    return sum((c - c0) ** 2 for c, c0 in zip(coordinates, center_xyz_mm)) <= radius_mm ** 2


def brute_force_hd95(a, b, spacing_xyz):
    """The same surfaces, distances by a k-d tree on physical points: a reference for the anisotropic spacing."""
    def surface_points(mask):
        from scipy import ndimage
        surface = mask & ~ndimage.binary_erosion(mask, border_value=0)
        return np.argwhere(surface)[:, ::-1] * np.asarray(spacing_xyz)
    points_a, points_b = surface_points(a), surface_points(b)
    return max(np.percentile(cKDTree(points_b).query(points_a)[0], 95),
               np.percentile(cKDTree(points_a).query(points_b)[0], 95))


def test_hd95_on_spheres_with_anisotropic_voxels():
    spacing = (0.6, 0.9, 2.0)                     # x, y, z
    shape = (24, 50, 70)                          # z, y, x
    center = (20.0, 22.0, 23.0)
    inner, outer = sphere(shape, spacing, center, 8.0), sphere(shape, spacing, center, 12.0)
    hd95 = evaluation.hausdorff95_mm(inner, outer, spacing)
    assert abs(hd95 - 4.0) <= max(spacing) / 2, hd95     # concentric: every surface point is 4 mm from the other
    assert math.isclose(hd95, brute_force_hd95(inner, outer, spacing), rel_tol=1e-9)
    shifted = sphere(shape, spacing, (center[0] + 5.0, center[1], center[2]), 12.0)
    assert math.isclose(evaluation.hausdorff95_mm(outer, shifted, spacing), brute_force_hd95(outer, shifted, spacing),
                        rel_tol=1e-9)
    assert 3.5 < evaluation.hausdorff95_mm(outer, shifted, spacing) <= 5.0 + spacing[0] / 2
    assert evaluation.hausdorff95_mm(outer, outer, spacing) == 0.0
    # SimpleITK images bring their spacing; an image-edge mask is bounded by the edge
    images = [sitk.GetImageFromArray(mask.astype(np.uint8)) for mask in (inner, outer)]
    for image in images:
        image.SetSpacing(spacing)
    assert evaluation.hausdorff95_mm(*images) == hd95
    empty = np.zeros(shape, bool)
    assert evaluation.hausdorff95_mm(empty, empty, spacing) == 0.0
    assert evaluation.hausdorff95_mm(inner, empty, spacing) == math.inf
    assert_raises(InputError, evaluation.hausdorff95_mm, inner, outer, match="spacing_mm")
    assert_raises(InputError, evaluation.hausdorff95_mm, inner, outer, (1.0, 1.0), match="spacing_mm")


def test_segmentation_table_and_grid_check():
    spacing = (1.0, 2.0, 2.5)
    truth = np.zeros((10, 20, 20), np.int16)
    truth[2:6, 5:10, 5:15] = 1                         # 200 voxels of 5 mm^3: 1 mL
    truth[7:9, 12:18, 2:8] = 2
    prediction = truth.copy()
    prediction[2:6, 5:10, 5:10] = 0                    # half of label 1 missed
    rows = evaluation.segmentation_table(truth, prediction, {1: "liver", 2: "spleen", 3: "absent"}, spacing)
    assert [row["name"] for row in rows] == ["liver", "spleen", "absent"]
    assert math.isclose(rows[0]["dice"], 2 * 100 / 300) and math.isclose(rows[0]["volume_truth_ml"], 1.0)
    assert math.isclose(rows[0]["volume_pred_ml"], 0.5) and rows[0]["hd95_mm"] >= 1.0
    assert rows[1]["dice"] == 1.0 and rows[1]["hd95_mm"] == 0.0 and rows[2]["dice"] == 1.0
    truth_image, prediction_image = sitk.GetImageFromArray(truth), sitk.GetImageFromArray(prediction)
    for image in (truth_image, prediction_image):
        image.SetSpacing(spacing)
    assert evaluation.segmentation_table(truth_image, prediction_image, {1: "liver"})[0] == rows[0]
    prediction_image.SetOrigin((0.0, 0.0, 5.0))
    error = assert_raises(InputError, evaluation.segmentation_table, truth_image, prediction_image, {1: "liver"},
                          match="not on the truth's grid")
    assert "origin (0, 0, 5)" in str(error) and "origin (0, 0, 0)" in str(error)
    assert_raises(InputError, evaluation.dice_per_label, truth + 0.5, truth, [1], match="non-integer")


def test_format_table_aligns_columns():
    text = evaluation.format_table([{"label": 1, "name": "liver", "dice": 0.91234},
                                    {"label": 12, "name": "kidney_left", "dice": math.inf}])
    lines = text.splitlines()
    assert lines[0].split() == ["label", "name", "dice"] and lines[2].split() == ["1", "liver", "0.912"]
    assert len({len(line) for line in lines}) == 1 and lines[3].endswith("inf")


def test_plots_are_written(tmp_path):
    curve = evaluation.froc(DETECTIONS, NODULES, SCANS, bootstrap=50)
    froc_png = evaluation.plot_froc(curve, tmp_path / "froc.png", title="hand-made")
    log = [{"epoch": epoch, "train_loss": 1.0 / epoch, "val_loss": 1.2 / epoch, "lr": 1e-3,
            "val_metric": (1 - 1 / (epoch + 1)) if epoch % 2 == 0 else None} for epoch in range(1, 11)]
    curves_png = evaluation.plot_learning_curves(log, tmp_path / "curves.png")
    assert evaluation._curve_columns(log, None) == (["train_loss", "val_loss"], ["val_metric"])
    log_csv = evaluation.write_rows_csv(log, tmp_path / "log.csv")
    from_csv = evaluation.plot_learning_curves(log_csv, tmp_path / "curves_from_csv.png")
    for path in (froc_png, curves_png, from_csv):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000, path
    assert_raises(InputError, evaluation.plot_learning_curves, [], tmp_path / "none.png", match="no epochs")
