"""Scene writers on a real MRML scene: segments, markups, tables, subject hierarchy, and all-or-nothing on errors."""

import csv
import hashlib
import math

import numpy as np
import slicer
import vtk

from RecognitionCore import scene as rc_scene
from RecognitionCore.errors import Cancelled, InputError
from RecognitionCore.headless import module_logic
from RecognitionCore.progress import CancelToken, Progress
from RecognitionCore.scene import Finding, NewNodes, SegmentSpec
from RecognitionCore.testing import assert_raises

SHAPE_KJI = (6, 7, 8)


def _ijk_to_ras(oblique: bool, left_handed: bool = False) -> np.ndarray:
    """Anisotropic spacing; oblique: rotated about a tilted axis; left_handed: K axis reversed (det < 0)."""
    rotation = np.eye(3)
    if oblique:
        axis = np.array([1.0, 2.0, 3.0]) / math.sqrt(14.0)
        angle = 0.5
        cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        rotation = np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross
    matrix = np.eye(4)
    matrix[:3, :3] = rotation @ np.diag([0.7, 0.9, -2.5 if left_handed else 2.5])
    matrix[:3, 3] = [-100.0, 50.0, 30.0]
    return matrix


def _volume(oblique: bool = True, name: str = "CT", left_handed: bool = False):
    values = np.arange(np.prod(SHAPE_KJI), dtype=np.int16).reshape(SHAPE_KJI) - 100
    return slicer.util.addVolumeFromArray(values, ijkToRAS=_ijk_to_ras(oblique, left_handed), name=name)


def _labels() -> np.ndarray:
    """Labels 1, 2 and 300 (needs 16 bits) in asymmetric blocks; no label 7."""
    labels = np.zeros(SHAPE_KJI, np.int32)
    labels[1:3, 2:5, 1:4] = 1
    labels[4, 0:3, 5:8] = 2
    labels[0, 6, 7] = 300
    return labels


def _segments():
    return {1: "liver", 2: SegmentSpec("My organ", (0.1, 0.2, 0.3)), 300: "Left lung", 7: "spleen"}


def _fingerprint(volume_node):
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    array = slicer.util.arrayFromVolume(volume_node)
    return (hashlib.sha256(array.tobytes()).hexdigest(), slicer.util.arrayFromVTKMatrix(matrix).tolist(),
            volume_node.GetMTime(), volume_node.GetImageData().GetMTime())


def _scene_state(scene):
    node_ids = [scene.GetNthNode(index).GetID() for index in range(scene.GetNumberOfNodes())]
    return node_ids, rc_scene._item_parents(scene)


def _segment_by_name(segmentation_node, name):
    segmentation = segmentation_node.GetSegmentation()
    return segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(name))


def test_segmentation_names_colors_terminology(app):
    reference = _volume()
    node = rc_scene.add_segmentation_from_labelmap(_labels(), reference, _segments(), "Organs")
    segmentation = node.GetSegmentation()
    names = [segmentation.GetSegment(sid).GetName() for sid in segmentation.GetSegmentIDs()]
    assert names == ["Liver", "My organ", "Left lung"]
    assert rc_scene.absent_segment_names(node) == ["Spleen"]

    liver = _segment_by_name(node, "Liver")
    assert np.allclose(liver.GetColor(), np.array([221, 130, 101]) / 255.0)
    assert np.allclose(_segment_by_name(node, "My organ").GetColor(), (0.1, 0.2, 0.3))
    assert [liver.GetLabelValue(), _segment_by_name(node, "Left lung").GetLabelValue()] == [1, 300]

    liver_entry = slicer.vtkSlicerTerminologyEntry()
    assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(liver.GetTerminology(), liver_entry)
    assert liver_entry.GetCategoryObject().GetCodeValue() == "123037004"
    assert (liver_entry.GetTypeObject().GetCodeValue(), liver_entry.GetTypeObject().GetCodeMeaning()) == \
        ("10200004", "Liver")
    lung_entry = slicer.vtkSlicerTerminologyEntry()
    slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(
        _segment_by_name(node, "Left lung").GetTerminology(), lung_entry)
    assert lung_entry.GetTypeObject().GetCodeValue() == "39607008"
    assert lung_entry.GetTypeModifierObject().GetCodeValue() == "7771000"
    # No code of ours for a custom segment: it keeps Slicer's default terminology.
    assert _segment_by_name(node, "My organ").GetTerminology() == slicer.vtkSegment().GetTerminology()

    assert node.GetSegmentation().GetConversionParameter("Reference image geometry")
    assert node.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()) is reference
    assert node.GetDisplayNode() is not None


def test_lung_nodule_terminology_has_lung_region():
    serialized = rc_scene.SegmentSpec.for_structure("lung_nodule", name="Nodule 1").terminology.serialized()
    entry = slicer.vtkSlicerTerminologyEntry()
    assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(serialized, entry)
    assert entry.GetTypeObject().GetCodeValue() == "27925004"
    assert entry.GetRegionObject().GetCodeValue() == "39607008"
    assert rc_scene.segment_spec("Soft tissue").terminology is None
    assert_raises(InputError, rc_scene.SegmentSpec.for_structure, "spleeen", match="Unknown structure")


def test_segment_masks_equal_labels_on_every_grid(app):
    labels = _labels()
    for oblique, left_handed in ((False, False), (True, False), (True, True)):
        reference = _volume(oblique, left_handed=left_handed)
        node = rc_scene.add_segmentation_from_labelmap(labels, reference, _segments(), "Organs")
        for name, label in (("Liver", 1), ("My organ", 2), ("Left lung", 300)):
            segment_id = node.GetSegmentation().GetSegmentIdBySegmentName(name)
            mask = rc_scene.segment_mask(node, segment_id, reference)
            assert mask.dtype == np.uint8 and mask.shape == SHAPE_KJI
            assert np.array_equal(mask, (labels == label).astype(np.uint8)), (oblique, name)

        nodule = np.zeros(SHAPE_KJI, bool)
        nodule[1:5, 3:6, 2:4] = True  # overlaps the liver
        nodule_id = rc_scene.add_segment_from_mask(node, nodule, reference,
                                                   SegmentSpec.for_structure("lung_nodule", name="Nodule 1"))
        assert node.GetSegmentation().GetSegment(nodule_id).GetName() == "Nodule 1"
        assert np.array_equal(rc_scene.segment_mask(node, nodule_id, reference), nodule.astype(np.uint8))
        liver_id = node.GetSegmentation().GetSegmentIdBySegmentName("Liver")
        assert np.array_equal(rc_scene.segment_mask(node, liver_id, reference), (labels == 1).astype(np.uint8))
        empty_id = node.GetSegmentation().AddEmptySegment("", "Emptied in the editor")
        assert not rc_scene.segment_mask(node, empty_id, reference).any()


def test_closed_surfaces_and_seg_nrrd_round_trip(app, tmp_path):
    reference = _volume()
    node = rc_scene.add_segmentation_from_labelmap(_labels(), reference, _segments(), "Organs", show_3d=True)
    closed_surface = slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName()
    assert node.GetSegmentation().ContainsRepresentation(closed_surface)
    for segment_id in node.GetSegmentation().GetSegmentIDs():
        surface = node.GetClosedSurfaceInternalRepresentation(segment_id)
        assert surface is not None and surface.GetNumberOfPoints() > 0

    path = str(tmp_path / "organs.seg.nrrd")
    storage = node.CreateDefaultStorageNode()
    storage.SetFileName(path)
    assert storage.WriteData(node)
    reloaded = module_logic("Segmentations").LoadSegmentationFromFile(path, False, "reloaded")
    segmentation = reloaded.GetSegmentation()
    assert [segmentation.GetSegment(s).GetName() for s in segmentation.GetSegmentIDs()] == \
        ["Liver", "My organ", "Left lung"]
    liver = _segment_by_name(reloaded, "Liver")
    assert "SCT^10200004^Liver" in liver.GetTerminology()
    liver_id = segmentation.GetSegmentIdBySegmentName("Liver")
    assert np.array_equal(rc_scene.segment_mask(reloaded, liver_id, reference), (_labels() == 1).astype(np.uint8))


def test_point_list_is_converted_from_lps_to_ras(app):
    points_lps = np.array([[10.0, -20.0, 30.0], [-1.5, 2.5, -3.5]])
    node = rc_scene.add_point_list(points_lps, "Nodules", labels=["N1", "N2"], descriptions=["p=0.9", "p=0.4"])
    assert np.allclose(slicer.util.arrayFromMarkupsControlPoints(node), points_lps @ np.diag([-1.0, -1.0, 1.0]))
    assert [node.GetNthControlPointLabel(i) for i in range(2)] == ["N1", "N2"]
    assert [node.GetNthControlPointDescription(i) for i in range(2)] == ["p=0.9", "p=0.4"]
    assert node.GetLocked()
    assert rc_scene.add_point_list([], "None found").GetNumberOfControlPoints() == 0


def test_roi_line_and_plane(app):
    roi = rc_scene.add_roi([10.0, 20.0, 30.0], [4.0, 5.0, 6.0], "Box", description="nodule box")
    center = [0.0, 0.0, 0.0]
    roi.GetCenter(center)
    assert np.allclose(center, [-10.0, -20.0, 30.0])
    assert np.allclose(roi.GetSize(), [4.0, 5.0, 6.0])
    assert roi.GetNthControlPointDescription(0) == "nodule box"

    start, end = np.array([1.0, 2.0, 3.0]), np.array([4.0, -2.0, 15.0])
    line = rc_scene.add_line(start, end, "Diameter")
    assert math.isclose(line.GetLineLengthWorld(), float(np.linalg.norm(end - start)), rel_tol=1e-9)
    assert np.allclose(slicer.util.arrayFromMarkupsControlPoints(line), [[-1, -2, 3], [-4, 2, 15]])

    plane = rc_scene.add_plane([1.0, 2.0, 3.0], [0.0, 3.0, 4.0], "Cut")
    origin, normal = [0.0] * 3, [0.0] * 3
    plane.GetOriginWorld(origin)
    plane.GetNormalWorld(normal)
    assert np.allclose(origin, [-1.0, -2.0, 3.0])
    assert np.allclose(normal, [0.0, -0.6, 0.8])
    assert_raises(InputError, rc_scene.add_roi, [0, 0, 0], [1, 0, 1], "Flat", match="positive")
    assert_raises(InputError, rc_scene.add_plane, [0, 0, 0], [0, 0, 0], "Bad", match="zero vector")


def test_findings_are_grouped_in_a_folder(app):
    findings = [Finding("N1", [10.0, 20.0, 30.0], "6.1 mm", box_size_mm=[8, 8, 6],
                        diameter_endpoints_lps_mm=([7.0, 20.0, 30.0], [13.1, 20.0, 30.0])),
                Finding("N2", [0.0, 0.0, 0.0], "3.0 mm")]
    result = rc_scene.add_findings(findings, "Nodules")
    hierarchy = app.scene.GetSubjectHierarchyNode()
    assert hierarchy.GetItemName(result.folder_item_id) == "Nodules"
    assert result.points.GetNumberOfControlPoints() == 2 and len(result.rois) == 1 and len(result.lines) == 1
    assert math.isclose(result.lines[0].GetLineLengthWorld(), 6.1, rel_tol=1e-9)
    assert [result.rois[0].GetName(), result.lines[0].GetName()] == ["N1 box", "N1 diameter"]
    for node in result.nodes:
        assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == result.folder_item_id


def test_table_column_types_units_and_csv(app, tmp_path):
    rows = [{"Segment": "Liver", "Voxels": 9200, "Volume": 12.88},
            {"Segment": "Spleen", "Voxels": 15, "Volume": None}]
    table_node = rc_scene.add_table(rows, "Results", units={"Volume": "mL"},
                                    descriptions={"Volume": "segment volume"})
    table = table_node.GetTable()
    assert [table.GetColumn(i).GetClassName() for i in range(3)] == ["vtkStringArray", "vtkIntArray",
                                                                     "vtkDoubleArray"]
    assert table_node.GetColumnUnitLabel("Volume") == "mL"
    assert table_node.GetColumnDescription("Volume") == "segment volume"
    assert math.isnan(table.GetColumnByName("Volume").GetValue(1))

    path = rc_scene.write_table_csv(table_node, tmp_path / "results.csv")
    with open(path, newline="") as file:
        content = list(csv.reader(file))
    assert content[0] == ["Segment", "Voxels", "Volume"]
    assert content[1][:2] == ["Liver", "9200"] and float(content[1][2]) == 12.88
    assert "mL" in (tmp_path / "results.schema.csv").read_text()

    by_columns = rc_scene.add_table({"Label": [1, 2], "Name": ["a", "b"]}, "Columns")
    assert by_columns.GetTable().GetColumnByName("Label").GetClassName() == "vtkIntArray"
    assert_raises(InputError, rc_scene.write_table_csv, table_node, tmp_path / "results.txt", match=".csv")


def test_outputs_are_placed_under_the_input_study(app):
    hierarchy = app.scene.GetSubjectHierarchyNode()
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Patient")
    study = hierarchy.CreateStudyItem(patient, "CT study")
    volume = _volume()
    volume_item = hierarchy.GetItemByDataNode(volume) or hierarchy.CreateItem(study, volume)
    hierarchy.SetItemParent(volume_item, study)

    segmentation = rc_scene.add_segmentation_from_labelmap(_labels(), volume, _segments(), "Organs")
    table = rc_scene.add_table([{"a": 1}], "Results")
    findings = rc_scene.add_findings([Finding("N1", [0, 0, 0], box_size_mm=[1, 1, 1])], "Nodules")
    folder = rc_scene.place_under_study([segmentation, table, findings.folder_item_id], volume, "NoduleDetect")

    assert hierarchy.GetItemParent(folder) == study and hierarchy.GetItemName(folder) == "NoduleDetect"
    for node in (segmentation, table):
        assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == folder
        assert node.GetNodeReference(rc_scene.INPUT_VOLUME_REFERENCE_ROLE) is volume
    assert hierarchy.GetItemParent(findings.folder_item_id) == folder
    assert_raises(InputError, rc_scene.place_under_study, [study], volume, match="holds the input volume")
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(findings.rois[0])) == findings.folder_item_id
    assert findings.rois[0].GetNodeReference(rc_scene.INPUT_VOLUME_REFERENCE_ROLE) is volume

    loose_volume = _volume(name="No study")
    points = rc_scene.add_point_list([[1, 2, 3]], "Points")
    parent = rc_scene.place_under_study([points], loose_volume)
    loose_item = hierarchy.GetItemByDataNode(loose_volume)  # headless volumes have no item; in Slicer they do
    assert parent == (hierarchy.GetItemParent(loose_item) if loose_item else hierarchy.GetSceneItemID())
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(points)) == parent


def test_outputs_follow_the_input_transform(app):
    volume = _volume()
    transform = app.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "Registration")
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(_ijk_to_ras(True)))
    volume.SetAndObserveTransformNodeID(transform.GetID())
    segmentation = rc_scene.add_segmentation_from_labelmap(_labels(), volume, {1: "liver", 2: "a", 300: "b"}, "S")
    assert segmentation.GetTransformNodeID() == transform.GetID()
    liver_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName("Liver")
    assert np.array_equal(rc_scene.segment_mask(segmentation, liver_id, volume), (_labels() == 1).astype(np.uint8))
    line = rc_scene.add_line([0, 0, 0], [1, 0, 0], "Diameter")
    rc_scene.place_under_study([line], volume)
    assert line.GetTransformNodeID() == transform.GetID()
    assert_raises(InputError, rc_scene.segment_mask, segmentation, liver_id, _volume(), match="different transforms")


def test_writers_do_not_modify_the_input_volume(app, tmp_path):
    volume = _volume()
    before = _fingerprint(volume)
    segmentation = rc_scene.add_segmentation_from_labelmap(_labels(), volume, _segments(), "Organs", show_3d=True)
    rc_scene.add_segment_from_mask(segmentation, _labels() == 2, volume, "nodule")
    rc_scene.segment_mask(segmentation, segmentation.GetSegmentation().GetNthSegmentID(0), volume)
    findings = rc_scene.add_findings([Finding("N1", [0, 0, 0], "", [2, 2, 2], ([0, 0, 0], [1, 1, 1]))], "Nodules")
    plane = rc_scene.add_plane([0, 0, 0], [0, 0, 1], "Cut")
    table = rc_scene.add_table([{"a": 1.5}], "Results")
    rc_scene.write_table_csv(table, tmp_path / "t.csv")
    rc_scene.place_under_study([segmentation, plane, table, findings.folder_item_id], volume, "Results")
    assert _fingerprint(volume) == before
    assert volume.GetNodeReference(rc_scene.INPUT_VOLUME_REFERENCE_ROLE) is None


def test_failing_writers_leave_the_scene_unchanged(app):
    volume = _volume()
    segmentation = rc_scene.add_segmentation_from_labelmap(_labels(), volume, _segments(), "Organs")
    before = _scene_state(app.scene)
    segment_ids = segmentation.GetSegmentation().GetSegmentIDs()
    failures = [
        (rc_scene.add_segmentation_from_labelmap, (np.zeros((6, 7, 9), np.uint8), volume, {1: "liver"}, "X"), "shape"),
        (rc_scene.add_segmentation_from_labelmap, (_labels(), volume, {1: "liver"}, "X"), "[2, 300]"),
        (rc_scene.add_segmentation_from_labelmap, (_labels() * 0.5, volume, {1: "liver"}, "X"), "integer"),
        (rc_scene.add_segment_from_mask, (segmentation, _labels(), volume, "nodule"), "binary"),
        (rc_scene.add_segment_from_mask, (segmentation, np.zeros(SHAPE_KJI, bool), volume, "nodule"), "empty"),
        (rc_scene.add_point_list, ([[1, 2]], "P"), "shape"),
        (rc_scene.add_point_list, ([[1, 2, 3]], "P", ["a", "b"]), "2 labels"),
        (rc_scene.add_findings, ([Finding("N1", [0, 0, 0], box_size_mm=[1, -1, 1])], "F"), "positive"),
        (rc_scene.add_table, ([{"a": 1}], "T", {"b": "mm"}), "['b']"),
        (rc_scene.place_under_study, ([segmentation, 987654], volume, "Folder"), "987654"),
    ]
    for function, args, message in failures:
        assert_raises(InputError, function, *args, match=message)
        assert _scene_state(app.scene) == before, function.__name__
    assert segmentation.GetSegmentation().GetSegmentIDs() == segment_ids
    assert segmentation.GetNodeReference(rc_scene.INPUT_VOLUME_REFERENCE_ROLE) is None


def _run(app, volume, fail):
    """A logic's run: segmentation, findings, table, placement; then ``fail()`` (raise, cancel, or nothing)."""
    with NewNodes(app.scene) as new:
        segmentation = rc_scene.add_segmentation_from_labelmap(_labels(), volume, _segments(), "Organs")
        findings = rc_scene.add_findings([Finding("N1", [0, 0, 0], "", [2, 2, 2], ([0, 0, 0], [1, 1, 1]))], "F")
        table = rc_scene.add_table([{"a": 1}], "Results")
        rc_scene.place_under_study([segmentation, table, findings.folder_item_id], volume, "Run")
        hierarchy = app.scene.GetSubjectHierarchyNode()
        hierarchy.SetItemParent(hierarchy.GetItemByDataNode(volume), findings.folder_item_id)  # moves the input
        fail()
    return new


def test_new_nodes_removes_a_failed_or_cancelled_run(app):
    volume = _volume()
    hierarchy = app.scene.GetSubjectHierarchyNode()
    if not hierarchy.GetItemByDataNode(volume):  # headless volumes have no item; the run moves it
        hierarchy.CreateItem(hierarchy.GetSceneItemID(), volume)
    before = _scene_state(app.scene)

    def raise_error():
        raise RuntimeError("model crashed")

    token = CancelToken()
    token.cancel()
    assert_raises(RuntimeError, _run, app, volume, raise_error, match="model crashed")
    assert _scene_state(app.scene) == before
    assert_raises(Cancelled, _run, app, volume, lambda: Progress(cancel_token=token).report(0.5, "Writing"))
    assert _scene_state(app.scene) == before

    new = _run(app, volume, lambda: None)
    assert {"vtkMRMLSegmentationNode", "vtkMRMLTableNode", "vtkMRMLMarkupsFiducialNode", "vtkMRMLMarkupsROINode",
            "vtkMRMLMarkupsLineNode"} <= {node.GetClassName() for node in new.nodes}
    assert len(_scene_state(app.scene)[0]) == len(before[0]) + len(new.nodes)
