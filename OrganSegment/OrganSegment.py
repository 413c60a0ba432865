"""OrganSegment: organ segmentation on CT (3D Slicer scripted module).

One click segments organs: each becomes a segment (standard name, colour and terminology where known, shown in 3D)
and a row of the results table (volume, HU statistics, surface area, centroid and bounding box). Methods: classical
(body, lungs, airways, bones, fat and soft tissue from HU), threshold (a HU range), region growing (from a point
list), grow from seeds (from painted scribbles, one segment per label) or deep (a segmentation model of the
catalogue, e.g. the liver, spleen and kidneys). The methods are in OrganSegmentLib and RecognitionCore (plain images,
no MRML); the Logic writes their result into the scene. Logic and Test are Qt-free, so they also run outside the
Slicer application.
"""

import importlib.util
import os
import sys
from dataclasses import dataclass

if importlib.util.find_spec("RecognitionCore") is None:
    # a source checkout: "Additional module paths" lists this folder, not the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

# Imported as modules, not by class name: a unittest loader (Slicer's ctest) runs every TestCase class it finds in
# this file's namespace, and the shared Test class is not one of this module's tests.
from RecognitionCore import module_base, scene  # noqa: E402
from RecognitionCore.errors import InputError, ModelError  # noqa: E402
from RecognitionCore.progress import as_progress  # noqa: E402

METHODS = ("classical", "threshold", "region growing", "grow from seeds", "deep")
DEFAULT_MODEL_ID = "mir_abdomen_organs_unet"
# Classical structures made of many parts by nature (ribs, subcutaneous and visceral fat): no largest-component step.
MULTI_PART_STRUCTURES = ("body", "bones", "fat", "soft_tissue", "airways")
STATISTICS_UNITS = {"volume_ml": "mL", "mean_hu": "HU", "std_hu": "HU", "min_hu": "HU", "max_hu": "HU",
                    "surface_area_mm2": "mm2", **{f"{what}_{axis}_mm": "mm" for what in ("centroid", "bbox_min",
                                                                                        "bbox_max")
                                                  for axis in "ras"}}


#
# OrganSegment
#

class OrganSegment(module_base.RecognitionModule):
    def __init__(self, parent):
        module_base.RecognitionModule.__init__(self, parent)
        self.parent.title = "Organ Segment"
        self.parent.helpText = """
Segments organs on a CT volume into a new segmentation (shown in 3D) with a results table: volume, mean / std /
min / max HU, surface area, centroid and bounding box (RAS) per organ.
Methods: classical (body, lungs, airways, bones, fat, soft tissue from HU; no network needed), threshold (a HU range),
region growing (from the points of a point list placed in the organ), grow from seeds (from a segmentation with two
or more painted segments: the organ(s) and their surroundings) or deep (a segmentation model of the catalogue, e.g.
liver, spleen and kidneys). Structures: a comma-separated subset (classical and deep) or the name of the region.
For research and review, not a medical device.
"""


#
# OrganSegmentWidget
#

class OrganSegmentWidget(module_base.RecognitionModuleWidget):
    """The panel: input, method and its inputs, post-processing, device, Apply/Cancel, results table."""

    def setup(self):
        module_base.RecognitionModuleWidget.setup(self)
        from RecognitionCore.models import Catalogue

        self.ui.modelComboBox.addItems(Catalogue().ids("segmentation"))
        self.ui.methodComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.structuresLineEdit.connect("editingFinished()", self.updateParameterNodeFromGUI)
        self.ui.seedsSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.scribblesSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.thresholdLowerSpinBox.connect("valueChanged(double)", self.updateParameterNodeFromGUI)
        self.ui.thresholdUpperSpinBox.connect("valueChanged(double)", self.updateParameterNodeFromGUI)
        self.ui.largestComponentCheckBox.connect("toggled(bool)", self.updateParameterNodeFromGUI)
        self.ui.fillHolesCheckBox.connect("toggled(bool)", self.updateParameterNodeFromGUI)
        self.ui.smoothingSpinBox.connect("valueChanged(double)", self.updateParameterNodeFromGUI)

    def updateExtraGUIFromParameterNode(self, parameterNode):
        self.ui.methodComboBox.setCurrentText(parameterNode.GetParameter("Method"))
        self.ui.structuresLineEdit.text = parameterNode.GetParameter("Structures")
        self.ui.seedsSelector.setCurrentNode(parameterNode.GetNodeReference("Seeds"))
        self.ui.scribblesSelector.setCurrentNode(parameterNode.GetNodeReference("Scribbles"))
        self.ui.modelComboBox.setCurrentText(parameterNode.GetParameter("ModelId"))
        self.ui.thresholdLowerSpinBox.value = float(parameterNode.GetParameter("ThresholdLowerHu"))
        self.ui.thresholdUpperSpinBox.value = float(parameterNode.GetParameter("ThresholdUpperHu"))
        self.ui.largestComponentCheckBox.checked = parameterNode.GetParameter("LargestComponent") == "true"
        self.ui.fillHolesCheckBox.checked = parameterNode.GetParameter("FillHoles") == "true"
        self.ui.smoothingSpinBox.value = float(parameterNode.GetParameter("SmoothingMm"))

    def updateExtraParameterNodeFromGUI(self, parameterNode):
        parameterNode.SetParameter("Method", self.ui.methodComboBox.currentText)
        parameterNode.SetParameter("Structures", self.ui.structuresLineEdit.text)
        parameterNode.SetNodeReferenceID("Seeds", self.ui.seedsSelector.currentNodeID)
        parameterNode.SetNodeReferenceID("Scribbles", self.ui.scribblesSelector.currentNodeID)
        parameterNode.SetParameter("ModelId", self.ui.modelComboBox.currentText)
        parameterNode.SetParameter("ThresholdLowerHu", str(self.ui.thresholdLowerSpinBox.value))
        parameterNode.SetParameter("ThresholdUpperHu", str(self.ui.thresholdUpperSpinBox.value))
        parameterNode.SetParameter("LargestComponent", "true" if self.ui.largestComponentCheckBox.checked else "false")
        parameterNode.SetParameter("FillHoles", "true" if self.ui.fillHolesCheckBox.checked else "false")
        parameterNode.SetParameter("SmoothingMm", str(self.ui.smoothingSpinBox.value))

    def onApplyButton(self):
        parameterNode = self._parameterNode

        def segment(progress):
            outputs = self.logic.process(
                parameterNode.GetNodeReference("InputVolume"), parameterNode.GetParameter("Method"),
                parse_structures(parameterNode.GetParameter("Structures")),
                seedsNode=parameterNode.GetNodeReference("Seeds"),
                scribblesNode=parameterNode.GetNodeReference("Scribbles"),
                modelId=parameterNode.GetParameter("ModelId") or None,
                thresholdLowerHu=float(parameterNode.GetParameter("ThresholdLowerHu")),
                thresholdUpperHu=float(parameterNode.GetParameter("ThresholdUpperHu")),
                largestComponent=parameterNode.GetParameter("LargestComponent") == "true",
                fillHoles=parameterNode.GetParameter("FillHoles") == "true",
                smoothingMm=float(parameterNode.GetParameter("SmoothingMm")),
                device=parameterNode.GetParameter("Device"), progress=progress)
            parameterNode.SetNodeReferenceID("ResultsTable", outputs.table.GetID())
            parameterNode.SetNodeReferenceID("OutputSegmentation", outputs.segmentation.GetID())
            return outputs.summary
        self.runWithProgress(segment)


def parse_structures(text: str):
    """Structure names from a comma-separated text; None when it names none (the method's default)."""
    names = [name.strip() for name in (text or "").split(",") if name.strip()]
    return names or None


#
# OrganSegmentLogic
#

@dataclass
class OrganSegmentOutputs:
    """The nodes one run added (under the input's study, in an "Organs" folder) and what they show."""

    segmentation: object
    table: object
    labels: sitk.Image  # uint8 on the input grid; values are the keys of ``label_names``
    label_names: dict
    statistics: list    # OrganSegmentLib.statistics.organ_statistics rows (LPS)
    summary: str


class OrganSegmentLogic(module_base.RecognitionModuleLogic):
    """Organ segmentation on CT, free of Qt: ``process`` takes plain arguments (usable from the Python console and the
    command line) and adds new nodes only; the input volume is never changed."""

    def setDefaultParameters(self, parameterNode):
        module_base.RecognitionModuleLogic.setDefaultParameters(self, parameterNode)
        for name, value in (("Method", "classical"), ("ModelId", DEFAULT_MODEL_ID), ("ThresholdLowerHu", "100.0"),
                            ("ThresholdUpperHu", "3000.0"), ("LargestComponent", "true"), ("FillHoles", "true"),
                            ("SmoothingMm", "0.0")):
            if not parameterNode.GetParameter(name):
                parameterNode.SetParameter(name, value)

    def process(self, inputVolume, method="classical", structures=None, seedsNode=None, scribblesNode=None,
                modelId=None, manifestDirs=(), thresholdLowerHu=100.0, thresholdUpperHu=3000.0,
                largestComponent=True, fillHoles=True, smoothingMm=0.0, device="auto",
                progress=None) -> OrganSegmentOutputs:
        """Segment ``inputVolume`` by ``method`` (one of ``METHODS``) and add a new segmentation and a statistics
        table to its scene. All or nothing: an error or cancel leaves the scene as it was.

        ``structures``: classical: a subset of the trunk structures (default all); deep: a subset of the model's
        labels (default all); threshold and region growing: the region's name (first entry). ``seedsNode``: a point
        list in the organ (region growing; optional for threshold: keeps the components holding a point).
        ``scribblesNode``: a segmentation with two or more painted segments (grow from seeds; label k is the k-th
        segment). ``modelId`` and ``manifestDirs``: the catalogue segmentation model (deep). Post-processing per
        organ label: largest component, hole filling, smoothing by ``smoothingMm`` (0: none)."""
        from OrganSegmentLib import postprocess, statistics
        from RecognitionCore.preprocessing import validate_ct
        from RecognitionCore.volumes import volume_node_to_sitk

        progress = as_progress(progress)
        if inputVolume is None:
            raise InputError("No input volume is selected.")
        if method not in METHODS:
            raise InputError(f"Unknown method {method!r}; expected one of {', '.join(METHODS)}.")
        image = volume_node_to_sitk(inputVolume)
        try:
            validate_ct(image)
            labels, names, only = self._segment(inputVolume, image, method, structures, seedsNode, scribblesNode,
                                                modelId, manifestDirs, thresholdLowerHu, thresholdUpperHu, device,
                                                progress.sub(0.0, 0.7))
            progress.report(0.7, "Post-processing the labels")
            if only:
                labels = postprocess.postprocess_labels(labels, largestComponent, fillHoles, smoothingMm, only=only)
            if not sitk.GetArrayViewFromImage(labels).any():
                raise InputError(f"the {method} method found nothing to segment")
            progress.report(0.8, "Measuring the organs")
            rows = statistics.organ_statistics(image, labels, names, progress.sub(0.8, 0.9))
        except InputError as error:
            raise InputError(f"Volume '{inputVolume.GetName()}': {error}") from error
        progress.report(0.9, "Adding the segmentation to the scene")
        with scene.NewNodes(inputVolume.GetScene()):
            outputs = self._add_nodes(inputVolume, labels, names, rows, method)
        progress.report(1.0, outputs.summary)
        return outputs

    def _segment(self, inputVolume, image, method, structures, seedsNode, scribblesNode, modelId, manifestDirs, lowerHu,
                 upperHu, device, progress):
        """(labels uint8 on the input grid, {value: structure name}, values to post-process)."""
        from OrganSegmentLib import interactive

        if method == "classical":
            return classical_labels(image, structures, progress)
        if method == "deep":
            return deep_labels(image, modelId or DEFAULT_MODEL_ID, manifestDirs, structures, device, progress)
        if method == "grow from seeds":
            seedLabels, names = scribble_labels(scribblesNode, inputVolume, image)
            labels = interactive.grow_from_seeds(image, seedLabels, progress=progress).labels
            return labels, names, list(names)
        name = structures[0] if structures else ("thresholded" if method == "threshold" else "region")
        if method == "threshold":
            seeds = seed_points_lps(seedsNode) if seedsNode is not None else None
            mask = interactive.threshold_segment(image, lowerHu, upperHu, seeds)
        else:
            if seedsNode is None:
                raise InputError("region growing needs seed points: select a point list with points in the organ")
            mask = interactive.region_grow(image, seed_points_lps(seedsNode), progress=progress)
        return mask, {1: name}, [1]

    def _add_nodes(self, inputVolume, labels, names, rows, method) -> OrganSegmentOutputs:
        volumeName = inputVolume.GetName()
        specs = {value: scene.segment_spec(name, fallback_index=index)
                 for index, (value, name) in enumerate(sorted(names.items()))}
        segmentation = scene.add_segmentation_from_labelmap(sitk.GetArrayFromImage(labels), inputVolume, specs,
                                                            f"{volumeName} organs", show_3d=True)
        tableRows = [table_row(row, specs[row["label"]].name) for row in rows if row["voxel_count"]]
        table = scene.add_table(tableRows, f"{volumeName} organ statistics", units=STATISTICS_UNITS)
        scene.place_under_study([segmentation, table], inputVolume, "Organs")
        summary = f"{len(tableRows)} structure(s) segmented ({method} method): " + ", ".join(
            f"{row['organ']} {row['volume_ml']:.0f} mL" for row in tableRows) + "."
        absent = [specs[row["label"]].name for row in rows if not row["voxel_count"]]
        if absent:
            summary += f"\nNot found: {', '.join(absent)}."
        return OrganSegmentOutputs(segmentation, table, labels, dict(names), rows, summary)


def table_row(row: dict, organ: str) -> dict:
    """A statistics row for Slicer users: the organ's display name, rounded values, centroid and bounding box in RAS
    (R = -L, A = -P, so an LPS box's minimum becomes the RAS box's maximum on the first two axes)."""
    centroid = _ras(row["centroid_lps_mm"])
    low, high = _ras(row["bbox_min_lps_mm"]), _ras(row["bbox_max_lps_mm"])
    box_min, box_max = np.minimum(low, high), np.maximum(low, high)
    out = {"organ": organ, "volume_ml": round(row["volume_ml"], 2)}
    out.update({key: round(row[key], 1) for key in ("mean_hu", "std_hu", "min_hu", "max_hu")})
    out["surface_area_mm2"] = round(row["surface_area_mm2"], 1)
    for what, values in (("centroid", centroid), ("bbox_min", box_min), ("bbox_max", box_max)):
        out.update({f"{what}_{axis}_mm": round(float(value), 1) for axis, value in zip("ras", values)})
    return out


def _ras(point_lps):
    return np.array([-point_lps[0], -point_lps[1], point_lps[2]], dtype=float)


def classical_labels(image, structures, progress):
    """Trunk anatomy from HU (RecognitionCore.anatomy); only the organs (lungs) are post-processed."""
    from RecognitionCore import anatomy

    labels, names = anatomy.segment_trunk_labelmap(image, structures, progress)
    return labels, names, [v for v, n in names.items() if n not in MULTI_PART_STRUCTURES]


def deep_labels(image, modelId, manifestDirs, structures, device, progress):
    """A catalogue segmentation model's labels, restricted to ``structures`` (names of its labels)."""
    from RecognitionCore.models import Catalogue, load_network, resolve_card
    from RecognitionCore.predict import predict_labels

    catalogue = Catalogue.with_user_manifests(manifestDirs)
    available = catalogue.ids("segmentation")
    if modelId not in available:
        raise ModelError(f"No segmentation model '{modelId}' in the catalogue; available: "
                         f"{', '.join(available) or 'none'}.")
    card = resolve_card(catalogue.get(modelId))
    modelNames = {int(value): name for value, name in card.labels.items()}
    wanted = list(modelNames.values()) if not structures else list(structures)
    unknown = [name for name in wanted if name not in modelNames.values()]
    if unknown:
        raise InputError(f"model '{modelId}' does not segment {', '.join(unknown)}; its labels are "
                         f"{', '.join(modelNames.values())}")
    progress.report(0.0, f"Loading {card.title}")
    network = load_network(card, device="cpu")
    labels = predict_labels(image, card, network, device, progress=progress.sub(0.05, 1.0))
    names = {value: name for value, name in modelNames.items() if name in wanted}
    array = sitk.GetArrayFromImage(labels).astype(np.uint8)
    array[~np.isin(array, list(names))] = 0
    result = sitk.GetImageFromArray(array)
    result.CopyInformation(image)
    return result, names, list(names)


def seed_points_lps(pointsNode) -> list:
    """Every control point of a point list, world position, RAS converted to LPS millimetres."""
    count = pointsNode.GetNumberOfControlPoints()
    if count == 0:
        raise InputError(f"the point list '{pointsNode.GetName()}' has no points: place seeds in the organ")
    points = []
    for index in range(count):
        ras = [0.0, 0.0, 0.0]
        pointsNode.GetNthControlPointPositionWorld(index, ras)
        points.append((-ras[0], -ras[1], ras[2]))
    return points


def scribble_labels(segmentationNode, inputVolume, image):
    """The scribbles as a uint8 label image on the input grid (label k: the k-th segment; a later segment wins where
    two overlap) and {k: segment name}."""
    if segmentationNode is None:
        raise InputError("grow from seeds needs scribbles: select a segmentation with the organ and its surroundings "
                         "painted as two or more segments")
    segmentation = segmentationNode.GetSegmentation()
    count = segmentation.GetNumberOfSegments()
    if count < 2:
        raise InputError(f"grow from seeds needs two or more scribble segments (the organ and what surrounds it); "
                         f"'{segmentationNode.GetName()}' has {count}")
    if count > 255:
        raise InputError(f"at most 255 scribble segments are supported ('{segmentationNode.GetName()}' has {count})")
    array = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8)
    names = {}
    for index in range(count):
        segmentId = segmentation.GetNthSegmentID(index)
        array[scene.segment_mask(segmentationNode, segmentId, inputVolume) != 0] = index + 1
        names[index + 1] = segmentation.GetSegment(segmentId).GetName()
    seedLabels = sitk.GetImageFromArray(array)
    seedLabels.CopyInformation(image)
    return seedLabels, names


#
# OrganSegmentTest
#

class OrganSegmentTest(module_base.RecognitionModuleTest):
    """Run by Slicer's self-test (and by ctest); outside the app by unittest or pytest."""
