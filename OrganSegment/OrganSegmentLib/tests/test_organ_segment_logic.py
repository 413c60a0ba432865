"""OrganSegmentLogic on a real MRML scene: each method on a phantom (Dice against its labels), the segmentation and
statistics table it adds; bad input leaves the scene and the input as they were."""

import functools
import hashlib

import numpy as np
import SimpleITK as sitk

import slicer

from OrganSegmentLib import interactive
from RecognitionCore import scene
from RecognitionCore.errors import Cancelled, InputError, ModelError
from RecognitionCore.phantoms import make_abdomen_ct, make_chest_ct
from RecognitionCore.progress import CancelToken, Progress
from RecognitionCore.testing import assert_raises, ct_like_volume_node
from RecognitionCore.volumes import sitk_to_volume_node

LIVER = 2  # ABDOMEN_LABELS


@functools.lru_cache(maxsize=1)
def abdomen_phantom():
    """The grid the shipped organ model was trained on (about 3 mm), small enough for a few seconds per method."""
    return make_abdomen_ct((128, 128, 96), (3.1, 3.1, 3.1), seed=3)


@functools.lru_cache(maxsize=1)
def chest_phantom():
    return make_chest_ct((128, 128, 48), (2.8, 2.8, 6.0), seed=5, nodules=0)


def _logic():
    import OrganSegment
    return OrganSegment.OrganSegmentLogic()


def _fingerprint(node) -> str:
    return hashlib.sha256(slicer.util.arrayFromVolume(node).tobytes()).hexdigest()


def _dice(first: np.ndarray, second: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(first & second) / (np.count_nonzero(first) + np.count_nonzero(second))


def _label_of(outputs, name: str) -> np.ndarray:
    value = next(value for value, label_name in outputs.label_names.items() if label_name == name)
    return sitk.GetArrayViewFromImage(outputs.labels) == value


def _liver_truth() -> np.ndarray:
    return sitk.GetArrayViewFromImage(abdomen_phantom().labels) == LIVER


def _segment_names(segmentation) -> list:
    segments = segmentation.GetSegmentation()
    return [segments.GetNthSegment(n).GetName() for n in range(segments.GetNumberOfSegments())]


def test_classical_segments_the_lungs_with_a_table_row_each_and_closed_surfaces(app):
    phantom = chest_phantom()
    volume = sitk_to_volume_node(phantom.image, "Chest", scene=app.scene)
    before = _fingerprint(volume)
    outputs = _logic().process(volume, "classical", ["lung_right", "lung_left", "bones"], device="cpu")
    assert _fingerprint(volume) == before
    truth = sitk.GetArrayViewFromImage(phantom.labels)
    for name, value in (("lung_right", 2), ("lung_left", 3)):
        dice = _dice(_label_of(outputs, name), truth == value)
        assert dice > 0.9, (name, dice)
    names = _segment_names(outputs.segmentation)
    assert sorted(names) == ["Bone", "Left lung", "Right lung"], names
    representation = slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName()
    assert outputs.segmentation.GetSegmentation().ContainsRepresentation(representation)
    table = outputs.table
    assert table.GetNumberOfRows() == 3
    assert [table.GetCellText(row, 0) for row in range(3)] == names  # one row per segment, in label order
    assert table.GetColumnUnitLabel("volume_ml") == "mL" and table.GetColumnUnitLabel("centroid_r_mm") == "mm"
    right = names.index("Right lung")
    assert float(table.GetCellText(right, table.GetColumnIndex("centroid_r_mm"))) > 0  # the patient's right is +R
    volume_ml = float(table.GetCellText(right, table.GetColumnIndex("volume_ml")))
    assert abs(volume_ml - outputs.statistics[right]["volume_ml"]) < 0.01
    hierarchy = app.scene.GetSubjectHierarchyNode()
    folder = hierarchy.GetItemParent(hierarchy.GetItemByDataNode(outputs.table))
    assert hierarchy.GetItemName(folder) == "Organs"


def test_region_growing_from_a_point_list_finds_the_liver(app):
    phantom = abdomen_phantom()
    volume = sitk_to_volume_node(phantom.image, "Abdomen", scene=app.scene)
    liver = sitk.Cast(phantom.labels == LIVER, sitk.sitkUInt8)
    seeds = scene.add_point_list(interactive.seeds_from_reference(liver, 3), "Liver seeds", scene=app.scene)
    outputs = _logic().process(volume, "region growing", ["liver"], seedsNode=seeds)
    dice = _dice(_label_of(outputs, "liver"), _liver_truth())
    assert dice >= 0.9, dice
    assert _segment_names(outputs.segmentation) == ["Liver"]
    assert outputs.table.GetNumberOfRows() == 1


def test_grow_from_seeds_uses_one_label_per_scribble_segment(app):
    phantom = abdomen_phantom()
    volume = sitk_to_volume_node(phantom.image, "Abdomen", scene=app.scene)
    liver = sitk.Cast(phantom.labels == LIVER, sitk.sitkUInt8)
    painted = sitk.GetArrayFromImage(interactive.scribbles_from_reference(liver, 1, 2))
    scribbles = scene.add_segmentation_from_labelmap(painted, volume, {1: "liver", 2: "Surroundings"}, "Scribbles")
    outputs = _logic().process(volume, "grow from seeds", scribblesNode=scribbles)
    assert outputs.label_names == {1: "Liver", 2: "Surroundings"}
    dice = _dice(_label_of(outputs, "Liver"), _liver_truth())
    assert dice >= 0.9, dice
    assert _segment_names(outputs.segmentation) == ["Liver", "Surroundings"]


def test_deep_segments_the_requested_organs_with_the_shipped_model(app):
    volume = sitk_to_volume_node(abdomen_phantom().image, "Abdomen", scene=app.scene)
    outputs = _logic().process(volume, "deep", ["liver", "spleen"], device="cpu")
    assert sorted(outputs.label_names.values()) == ["liver", "spleen"]
    dice = _dice(_label_of(outputs, "liver"), _liver_truth())
    assert dice >= 0.85, dice
    assert _segment_names(outputs.segmentation) == ["Liver", "Spleen"]
    assert outputs.table.GetNumberOfRows() == 2


def test_bad_input_and_cancel_leave_no_nodes_and_the_input_untouched(app):
    phantom = abdomen_phantom()
    volume = sitk_to_volume_node(phantom.image, "Abdomen", scene=app.scene)
    mr = sitk_to_volume_node(sitk.Cast(sitk.RescaleIntensity(phantom.image, 0, 800), sitk.sitkInt16), "MR",
                             scene=app.scene)
    single_slice = ct_like_volume_node("SingleSlice", slices=1)
    constant = slicer.util.addVolumeFromArray(np.zeros((24, 48, 48), np.int16), name="Constant")
    no_points = app.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "No points")
    outside = scene.add_point_list([phantom.image.TransformIndexToPhysicalPoint((1, 1, 1))], "Outside",
                                   scene=app.scene)
    liver = sitk.GetArrayFromImage(phantom.labels == LIVER).astype(np.uint8)
    one_scribble = scene.add_segmentation_from_labelmap(liver, volume, {1: "liver"}, "One scribble")
    before, count = _fingerprint(volume), app.scene.GetNumberOfNodes()
    logic = _logic()
    token = CancelToken()
    token.cancel()
    assert_raises(Cancelled, logic.process, volume, "classical", progress=Progress(cancel_token=token))
    assert_raises(InputError, logic.process, volume, "region growing", match="seed points")
    assert_raises(InputError, logic.process, volume, "region growing", seedsNode=no_points, match="no points")
    assert_raises(InputError, logic.process, volume, "region growing", seedsNode=outside, match="outside")
    assert_raises(InputError, logic.process, volume, "grow from seeds", scribblesNode=one_scribble,
                  match="two or more")
    assert_raises(InputError, logic.process, volume, "deep", ["heart"], match="does not segment heart")
    assert_raises(ModelError, logic.process, volume, "deep", modelId="no_such_model", match="no_such_model")
    assert_raises(InputError, logic.process, volume, "threshold", thresholdLowerHu=2500.0, thresholdUpperHu=2600.0,
                  match="found nothing")
    assert_raises(InputError, logic.process, volume, "nonsense", match="method")
    assert_raises(InputError, logic.process, mr, "deep", match="MR")
    assert_raises(InputError, logic.process, single_slice, match="SingleSlice")
    assert_raises(InputError, logic.process, constant, match="Constant")
    assert_raises(InputError, logic.process, None, match="No input volume")
    assert app.scene.GetNumberOfNodes() == count
    assert _fingerprint(volume) == before
