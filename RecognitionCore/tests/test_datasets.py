"""Dataset tests: LUNA16 and labelmap-pair case lists (synthetic and real), split by patient, the JSON description,
checked loading with every bad input, and the exact nodule centre -> network array box conversion."""

import csv
import json

import numpy as np
import SimpleITK as sitk

from RecognitionCore import datasets
from RecognitionCore.datasets import DetectionCase, SegmentationCase
from RecognitionCore.errors import InputError
from RecognitionCore.phantoms import make_chest_ct
from RecognitionCore.predict import to_network_array
from RecognitionCore.preprocessing import resample_to_reference
from RecognitionCore.testing import assert_raises

WINDOW = {"type": "window", "hu_min": -1000.0, "hu_max": 400.0}
LIDC_0001 = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
LIDC_0003 = "1.3.6.1.4.1.14519.5.2.1.6279.6001.170706757615202213033480003264"


def _labelmap(array, spacing=(2.0, 2.0, 3.0), origin=(0.0, 0.0, 0.0)):
    image = sitk.GetImageFromArray(np.asarray(array, dtype=np.uint8))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def _write_pair(folder, case_id, labels_array, label_spacing=(2.0, 2.0, 3.0)):
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.Cast(_labelmap(np.zeros_like(labels_array)), sitk.sitkInt16)
    sitk.WriteImage(image, str(folder / f"{case_id}.nrrd"))
    sitk.WriteImage(_labelmap(labels_array, label_spacing), str(folder / f"{case_id}_seg.nrrd"))
    return SegmentationCase(case_id, case_id, str(folder / f"{case_id}.nrrd"), str(folder / f"{case_id}_seg.nrrd"),
                            {1: "liver", 2: "spleen"})


def test_synthetic_detection_dataset_is_luna16_and_deterministic(tmp_path):
    cases = datasets.write_synthetic_detection_dataset(tmp_path / "a", count=2, seed=5, nodules_per_case=2)
    again = datasets.write_synthetic_detection_dataset(tmp_path / "b", count=2, seed=5, nodules_per_case=2)
    assert [case.case_id for case in cases] == ["synthetic_00005", "synthetic_00006"]
    assert [case.nodules for case in cases] == [case.nodules for case in again]
    assert all(len(case.nodules) == 2 for case in cases)
    assert (tmp_path / "a" / "annotations.csv").read_text() == (tmp_path / "b" / "annotations.csv").read_text()
    with open(tmp_path / "a" / "synthetic_00005_lesions.csv") as stream:
        truth = list(csv.DictReader(stream))
    assert [(float(row["coordX"]), float(row["diameter_mm"])) for row in truth] == \
        [(center[0], diameter) for center, diameter in cases[0].nodules]
    assert all(row["kind"] == "nodule" and row["type"] in ("solid", "part-solid", "ground-glass") for row in truth)
    solid_part = {"solid": (1.0, 1.0), "part-solid": (0.35, 0.6), "ground-glass": (0.0, 0.0)}
    for row in truth:  # the solid part's diameter, as a fraction of the nodule's
        low, high = solid_part[row["type"]]
        assert low <= float(row["solid_diameter_mm"]) / float(row["diameter_mm"]) <= high, row
    reread = datasets.luna16_cases(tmp_path / "a", tmp_path / "a" / "annotations.csv")
    assert reread == cases
    image, nodules = datasets.load_detection_case(cases[0])
    assert image.GetSize() == (64, 64, 32) and nodules == cases[0].nodules


def test_luna16_negatives_patient_column_and_extent_column(tmp_path):
    cases = datasets.write_synthetic_detection_dataset(tmp_path, count=2, seed=0, nodules_per_case=1)
    sitk.WriteImage(sitk.ReadImage(cases[0].image_path), str(tmp_path / "negative_series.mha"))
    with open(tmp_path / "extent.csv", "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["seriesuid", "coordX", "coordY", "coordZ", "approx_max_extent_mm", "patient_id"])
        for case in cases:
            (x, y, z), diameter = case.nodules[0]
            writer.writerow([case.case_id, x, y, z, diameter, "patient_A"])
        writer.writerow(["series_without_image", 0, 0, 0, 5, "patient_B"])
    reread = datasets.luna16_cases(tmp_path, tmp_path / "extent.csv")
    by_id = {case.case_id: case for case in reread}
    assert set(by_id) == {"negative_series", *(case.case_id for case in cases)}
    assert by_id["negative_series"].nodules == () and by_id["negative_series"].patient_id == "negative_series"
    assert by_id[cases[1].case_id].nodules == cases[1].nodules
    assert {by_id[case.case_id].patient_id for case in cases} == {"patient_A"}
    assert len(datasets.luna16_cases(tmp_path, tmp_path / "extent.csv", keep_unannotated=False)) == 2
    (tmp_path / "bad.csv").write_text("seriesuid,coordX,coordY,coordZ\nx,1,2,3\n")
    assert_raises(InputError, datasets.luna16_cases, tmp_path, tmp_path / "bad.csv", match="diameter_mm")


def test_real_lidc_folder_with_and_without_a_mapping(shared_data):
    lidc = shared_data / "lidc"
    annotations = lidc / "annotations.csv"
    unmapped = {case.case_id: case for case in datasets.luna16_cases(lidc, annotations)}
    # The DICOM folder is named by patient but found by its series UID; the NRRD named by patient is not.
    assert unmapped[LIDC_0001].image_path.endswith("LIDC-IDRI-0001") and len(unmapped[LIDC_0001].nodules) == 1
    assert LIDC_0003 not in unmapped and unmapped["LIDC-IDRI-0003"].nodules == ()
    with open(lidc / "reads.csv", newline="") as stream:
        patients = {row["seriesuid"]: row["patient"] for row in csv.DictReader(stream)}
    cases = datasets.luna16_cases(lidc, annotations, image_paths={LIDC_0003: "LIDC-IDRI-0003.nrrd"},
                                  patient_ids=patients)
    assert [(case.patient_id, len(case.nodules)) for case in cases] == [("LIDC-IDRI-0003", 4), ("LIDC-IDRI-0001", 1)]
    assert abs(cases[0].nodules[0][1] - 29.33) < 1e-9  # approx_max_extent_mm used as the diameter
    image, nodules = datasets.load_detection_case(cases[0])
    assert image.GetSize() == (512, 512, 140) and len(nodules) == 4


def test_split_by_patient_keeps_patients_together_and_is_deterministic():
    cases = [DetectionCase(f"case{n}", "patient_A" if n < 2 else f"patient_{n}", f"/data/case{n}.nrrd")
             for n in range(10)]
    train, validation = datasets.split_by_patient(cases, 0.2, seed=3)
    assert len(train) + len(validation) == 10 and train and validation
    assert not {case.patient_id for case in train} & {case.patient_id for case in validation}
    assert ({case.case_id for case in train} >= {"case0", "case1"}
            or {case.case_id for case in validation} >= {"case0", "case1"})
    assert (train, validation) == datasets.split_by_patient(cases, 0.2, seed=3)
    assert len({tuple(c.case_id for c in datasets.split_by_patient(cases, 0.2, seed)[1]) for seed in range(6)}) > 1
    two = datasets.split_by_patient(cases[1:3], 0.01)
    assert len(two[0]) == 1 and len(two[1]) == 1
    assert_raises(InputError, datasets.split_by_patient, cases[:2], match="at least 2 patients")
    assert_raises(InputError, datasets.split_by_patient, cases, 1.0, match="validation_fraction")


def test_dataset_json_round_trip_with_relative_paths(tmp_path):
    inside = DetectionCase("s1", "p1", str(tmp_path / "images" / "s1.nrrd"), (((1.5, -2.0, 3.25), 6.0),))
    outside = DetectionCase("s2", "p2", "/elsewhere/s2.mhd", ())
    path = datasets.write_dataset_json(tmp_path / "dataset.json", [inside], [outside], {"name": "demo", "seed": 4})
    document = json.loads(path.read_text())
    assert document["training"][0]["image"] == "images/s1.nrrd"
    assert document["validation"][0]["image"] == "/elsewhere/s2.mhd"
    assert (document["task"], document["numTraining"], document["numValidation"]) == ("detection", 1, 1)
    train, validation, description = datasets.read_dataset_json(path)
    assert train == [inside] and validation == [outside] and description["seed"] == 4
    segmentation = SegmentationCase("c", "p", str(tmp_path / "c.nii.gz"), str(tmp_path / "c_seg.nii.gz"), {1: "liver"})
    path = datasets.write_dataset_json(tmp_path / "seg.json", [segmentation], [], {})
    train, validation, description = datasets.read_dataset_json(path)
    assert train == [segmentation] and validation == [] and description["labels"] == {"0": "background", "1": "liver"}
    (tmp_path / "broken.json").write_text('{"task": "classification"}')
    assert_raises(InputError, datasets.read_dataset_json, tmp_path / "broken.json", match="not a dataset description")


def test_synthetic_segmentation_dataset_and_folder_conventions(tmp_path):
    cases = datasets.write_synthetic_segmentation_dataset(tmp_path / "flat", count=2, seed=1, kind="abdomen")
    assert [case.case_id for case in cases] == ["abdomen_00001", "abdomen_00002"]
    assert cases[0].label_names[2] == "liver" and cases[0].label_path.endswith("abdomen_00001_seg.nrrd")
    image, labels = datasets.load_segmentation_case(cases[0], cases[0].label_names)
    assert labels.GetPixelID() == sitk.sitkUInt8 and sitk.GetArrayViewFromImage(labels).max() > 0
    for images_name, labels_name in (("images", "labels"), ("imagesTr", "labelsTr")):
        folder = tmp_path / images_name
        (folder / images_name).mkdir(parents=True)
        (folder / labels_name).mkdir()
        sitk.WriteImage(image, str(folder / images_name / "case.nii.gz"))
        sitk.WriteImage(labels, str(folder / labels_name / "case.nii.gz"))
        (found,) = datasets.segmentation_cases(folder, {2: "liver"})
        assert found.case_id == "case" and found.label_path.endswith(f"{labels_name}/case.nii.gz")
    pairs = datasets.segmentation_cases([(cases[1].image_path, cases[1].label_path)], cases[1].label_names,
                                        patient_ids={"abdomen_00002": "P7"})
    assert pairs[0].patient_id == "P7" and pairs[0].label_names == cases[1].label_names
    assert_raises(InputError, datasets.segmentation_cases, tmp_path / "images" / "images", match="No image")
    assert_raises(InputError, datasets.write_synthetic_segmentation_dataset, tmp_path, 1, kind="head",
                  match="head")


def test_slicer_seg_nrrd_is_cropped_renumbered_and_layers_merged(tmp_path):
    image = sitk.Cast(_labelmap(np.zeros((6, 8, 8))), sitk.sitkInt16)
    sitk.WriteImage(image, str(tmp_path / "case.nrrd"))
    cropped = np.zeros((2, 3, 4), np.uint8)
    cropped[0, 0, 0], cropped[1, 2, 3] = 1, 2
    segmentation = _labelmap(cropped, origin=(2.0, 4.0, 3.0))  # voxel offset (1, 2, 1): Slicer crops to the extent
    for key, value in {"Segment0_Name": "Liver", "Segment0_LabelValue": "1", "Segment0_Layer": "0",
                       "Segment1_Name": "spleen", "Segment1_LabelValue": "2", "Segment1_Layer": "0"}.items():
        segmentation.SetMetaData(key, value)
    sitk.WriteImage(segmentation, str(tmp_path / "case.seg.nrrd"))
    (case,) = datasets.segmentation_cases(tmp_path)
    assert case.label_names == {1: "Liver", 2: "spleen"}
    _, labels = datasets.load_segmentation_case(case, {5: "liver", 7: "spleen"})
    array = sitk.GetArrayFromImage(labels)
    assert labels.GetSize() == image.GetSize() and array[1, 2, 1] == 5 and array[2, 4, 4] == 7
    assert np.count_nonzero(array) == 2
    assert_raises(InputError, datasets.load_segmentation_case, case, {5: "liver"}, match="spleen (2)")

    layers = np.zeros((6, 8, 8, 2), np.uint8)
    layers[0, 0, 0, 0], layers[0, 0, 1, 1] = 1, 2
    multi = sitk.GetImageFromArray(layers, isVector=True)
    multi.CopyInformation(image)
    for key, value in {"Segment0_Name": "liver", "Segment0_LabelValue": "1", "Segment0_Layer": "0",
                       "Segment1_Name": "spleen", "Segment1_LabelValue": "2", "Segment1_Layer": "1"}.items():
        multi.SetMetaData(key, value)
    sitk.WriteImage(multi, str(tmp_path / "case.seg.nrrd"))
    _, labels = datasets.load_segmentation_case(case, {1: "liver", 2: "spleen"})
    assert sitk.GetArrayViewFromImage(labels)[0, 0, :2].tolist() == [1, 2]
    layers[0, 0, 0, 1] = 2
    multi = sitk.GetImageFromArray(layers, isVector=True)
    for key in ("Segment0_Name", "Segment1_Name"):
        multi.SetMetaData(key, key)
    sitk.WriteImage(multi, str(tmp_path / "case.seg.nrrd"))
    assert_raises(InputError, datasets.load_segmentation_case, case, {1: "x"}, match="several segments")


def test_bad_segmentation_cases_name_the_problem(tmp_path):
    labels = np.zeros((6, 8, 8), np.uint8)
    labels[2, 3, 3] = 1
    mismatched = _write_pair(tmp_path, "mismatched", labels, label_spacing=(2.0, 2.5, 3.0))
    error = assert_raises(InputError, datasets.load_segmentation_case, mismatched, {1: "liver"}, match="mismatched")
    assert "spacing (2.0, 2.0, 3.0) vs (2.0, 2.5, 3.0)" in str(error)
    labels[1, 1, 1] = 9
    outside = _write_pair(tmp_path, "outside", labels)
    assert_raises(InputError, datasets.load_segmentation_case, outside, [1, 2], match="values [9]")
    missing = SegmentationCase("missing", "p", str(tmp_path / "nothing.nrrd"), str(tmp_path / "nothing_seg.nrrd"))
    assert_raises(InputError, datasets.load_segmentation_case, missing, [1], match="not found")


def test_corrupt_case_in_the_middle_is_skipped_with_a_warning(tmp_path):
    labels = np.zeros((6, 8, 8), np.uint8)
    labels[2, 3, 3] = 1
    cases = [_write_pair(tmp_path, f"case{n}", labels) for n in range(3)]
    (tmp_path / "case1.nrrd").write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 8 8\n\ngarbage")
    warnings = []
    loaded = list(datasets.iter_valid(cases, lambda case: datasets.load_segmentation_case(case, [1]),
                                      warn=warnings.append))
    assert [case.case_id for case, _ in loaded] == ["case0", "case2"]
    assert len(warnings) == 1 and "case1" in warnings[0]
    summary = datasets.check_dataset(cases, {1: "liver"}, warn=warnings.append)
    assert summary.valid_case_ids == ("case0", "case2") and summary.skipped[0][0] == "case1"
    assert summary.label_voxel_counts == {1: 2} and summary.positive_case_count == 2


def test_datasets_without_positives_are_refused(tmp_path):
    empty = [_write_pair(tmp_path, f"empty{n}", np.zeros((6, 8, 8), np.uint8)) for n in range(2)]
    assert_raises(InputError, datasets.check_dataset, empty, [1, 2], match="no non-zero label in any case")
    image = sitk.Cast(_labelmap(np.zeros((6, 8, 8))), sitk.sitkInt16)
    sitk.WriteImage(image, str(tmp_path / "series.nrrd"))
    negatives = [DetectionCase("series", "p", str(tmp_path / "series.nrrd"))]
    assert_raises(InputError, datasets.check_dataset, negatives, match="no nodule in any case")
    assert_raises(InputError, datasets.check_dataset, [], match="no cases")


def test_nodule_outside_the_image_is_refused(tmp_path):
    image = sitk.Cast(_labelmap(np.zeros((6, 8, 8))), sitk.sitkInt16)  # x, y in [0, 14] mm, z in [0, 15] mm
    sitk.WriteImage(image, str(tmp_path / "series.nrrd"))
    inside = DetectionCase("series", "p", str(tmp_path / "series.nrrd"), (((14.9, 0.0, 7.0), 4.0),))
    assert datasets.load_detection_case(inside)[1] == inside.nodules
    outside = DetectionCase("series", "p", str(tmp_path / "series.nrrd"), (((7.0, 7.0, 40.0), 4.0),))
    assert_raises(InputError, datasets.load_detection_case, outside, match="outside the image")
    warnings = []
    assert list(datasets.iter_valid([outside], datasets.load_detection_case, warn=warnings.append)) == []
    assert "series" in warnings[0] and "outside" in warnings[0]


def test_detection_boxes_are_centred_exactly_on_the_nodules():
    for spacing_mm, direction in ((None, None), ((4.0, 4.0, 4.0), (-1, 0, 0, 0, 0, 1, 0, 1, 0))):
        phantom = make_chest_ct((64, 64, 32), (5.6, 4.0, 10.0), seed=2, nodules=3, direction=direction)
        nodules = [(nodule.center_lps_mm, nodule.diameter_mm) for nodule in phantom.nodules]
        sample = datasets.prepare_detection_case(phantom.image, nodules, spacing_mm, WINDOW)
        lesions = resample_to_reference(phantom.lesion_labels, _network_grid(phantom.image, spacing_mm), "nearest")
        lesion_array = to_network_array(lesions)
        assert lesion_array.shape == sample["image"].shape[1:]
        assert sample["boxes"].shape == (3, 6) and sample["labels"].tolist() == [0, 0, 0]
        for row, nodule in enumerate(phantom.nodules):
            box = sample["boxes"][row]
            centre = (box[:3] + box[3:]) / 2
            assert lesion_array[tuple(np.round(centre).astype(int))] == nodule.id
            oriented_spacing = sitk.DICOMOrient(lesions, "RAS").GetSpacing()
            assert np.allclose((box[3:] - box[:3]) * oriented_spacing, nodule.diameter_mm, rtol=1e-5)
        if spacing_mm is None:  # identity LPS -> RAS flips i and j: index = size - 1 - LPS index
            lps_index = np.array(phantom.image.TransformPhysicalPointToContinuousIndex(nodules[0][0]))
            expected = [63 - lps_index[0], 63 - lps_index[1], lps_index[2]]
            assert np.allclose((sample["boxes"][0, :3] + sample["boxes"][0, 3:]) / 2, expected, atol=1e-4)


def _network_grid(image, spacing_mm):
    from RecognitionCore.preprocessing import resample_to_spacing

    return image if spacing_mm is None else resample_to_spacing(image, spacing_mm, "nearest")


def test_segmentation_pair_is_aligned_in_the_network_convention(tmp_path):
    (case,) = datasets.write_synthetic_segmentation_dataset(tmp_path, count=1, seed=0, kind="chest")
    image, labels = datasets.load_segmentation_case(case, case.label_names)
    same_grid = datasets.prepare_segmentation_pair(image, labels, None, WINDOW)
    assert same_grid["image"].shape == (1, 64, 64, 32) and same_grid["image"].dtype == np.float32
    assert same_grid["label"].dtype == np.uint8
    assert np.array_equal(same_grid["label"][0], to_network_array(labels))
    resampled = datasets.prepare_segmentation_pair(image, labels, (8.0, 8.0, 8.0), WINDOW)
    expected_shape = tuple(int(round(n * s / 8.0)) for n, s in zip((64, 64, 32), (5.6, 4.0, 10.0)))
    assert resampled["image"].shape == resampled["label"].shape == (1, *expected_shape)
    assert set(np.unique(resampled["label"])) <= set(np.unique(same_grid["label"]))
