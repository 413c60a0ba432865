"""NoduleDetect: lung nodule detection on chest CT (3D Slicer scripted module).

One click finds nodules: each becomes a labelled point (N1..Nk), a box, a 3D segment and a row of the results table
(size, volume, mean HU, type, lung, Lung-RADS size band, confidence). Methods: classical (lungs from HU, multi-scale
Hessian blob candidates scored by two small 3D CNNs and a random forest on hand-made features, plus the peaks of a
dense nodule centre map for the small nodules the blob filter misses; all shipped: works offline on any CT), deep (a
RetinaNet-style detection model of the catalogue) or both. The pipeline is in
NoduleDetectLib (plain images, no MRML); the Logic writes its result into the scene. Logic and Test are Qt-free, so
they also run outside the Slicer application.
"""

import importlib.util
import os
import sys
from dataclasses import dataclass

if importlib.util.find_spec("RecognitionCore") is None:
    # a source checkout: "Additional module paths" lists this folder, not the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import slicer  # noqa: E402

# Imported as modules, not by class name: a unittest loader (Slicer's ctest) runs every TestCase class it finds in
# this file's namespace, and the shared Test class is not one of this module's tests.
from RecognitionCore import module_base, scene  # noqa: E402
from RecognitionCore.errors import InputError  # noqa: E402
from RecognitionCore.progress import as_progress  # noqa: E402

#
# NoduleDetect
#

class NoduleDetect(module_base.RecognitionModule):
    def __init__(self, parent):
        module_base.RecognitionModule.__init__(self, parent)
        self.parent.title = "Nodule Detect"
        self.parent.helpText = """
Finds lung nodules on a chest CT volume. Each nodule appears as a labelled point (N1, N2, ...), a box and a 3D
segment, with a row in the results table: diameters, volume, mean HU, solid / part-solid / ground-glass type, lung
side, Lung-RADS size band (from size only: not a diagnosis) and the detector's confidence. Click a row to centre the
views on that nodule.
Methods: classical (shipped models only, works offline), deep (a detection model from the catalogue, e.g. the MONAI
model zoo's lung_nodule_ct_detection bundle) or both. For research and review, not a medical device.
"""


#
# NoduleDetectWidget
#

class NoduleDetectWidget(module_base.RecognitionModuleWidget):
    """The panel: input, method, confidence threshold, minimum diameter, device, Apply/Cancel, results table."""

    def setup(self):
        module_base.RecognitionModuleWidget.setup(self)
        self.ui.methodComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.confidenceSliderWidget.connect("valueChanged(double)", self.updateParameterNodeFromGUI)
        self.ui.minDiameterSpinBox.connect("valueChanged(double)", self.updateParameterNodeFromGUI)
        self.ui.resultsTableView.connect("clicked(QModelIndex)", self.onResultClicked)
        self._outputs = None

    def updateExtraGUIFromParameterNode(self, parameterNode):
        self.ui.methodComboBox.setCurrentText(parameterNode.GetParameter("Method"))
        self.ui.confidenceSliderWidget.value = float(parameterNode.GetParameter("MinConfidence"))
        self.ui.minDiameterSpinBox.value = float(parameterNode.GetParameter("MinDiameterMm"))

    def updateExtraParameterNodeFromGUI(self, parameterNode):
        parameterNode.SetParameter("Method", self.ui.methodComboBox.currentText)
        parameterNode.SetParameter("MinConfidence", str(self.ui.confidenceSliderWidget.value))
        parameterNode.SetParameter("MinDiameterMm", str(self.ui.minDiameterSpinBox.value))

    def onApplyButton(self):
        parameterNode = self._parameterNode

        def detect(progress):
            outputs = self.logic.process(
                parameterNode.GetNodeReference("InputVolume"), parameterNode.GetParameter("Method"),
                float(parameterNode.GetParameter("MinConfidence")), float(parameterNode.GetParameter("MinDiameterMm")),
                parameterNode.GetParameter("Device"), progress)
            parameterNode.SetNodeReferenceID("ResultsTable", outputs.table.GetID())
            parameterNode.SetNodeReferenceID("Findings", outputs.findings.points.GetID())
            parameterNode.SetNodeReferenceID("OutputSegmentation", outputs.segmentation.GetID())
            return outputs.summary
        self.runWithProgress(detect)

    def onResultClicked(self, index):
        """Centre the slice views on the nodule of the clicked row, found by its label (N1..Nk) in the first column,
        so that sorting the table does not matter."""
        points = self._parameterNode.GetNodeReference("Findings") if self._parameterNode else None
        if points is None:
            return
        label = index.sibling(index.row(), 0).data()
        for pointIndex in range(points.GetNumberOfControlPoints()):
            if points.GetNthControlPointLabel(pointIndex) == label:
                slicer.modules.markups.logic().JumpSlicesToNthPointInMarkup(points.GetID(), pointIndex, True)
                return


#
# NoduleDetectLogic
#

@dataclass
class NoduleDetectOutputs:
    """The nodes one run added (all under the input's study, in a "Nodules" folder) and the pipeline's result."""

    segmentation: object
    findings: object  # scene.FindingNodes: point list N1..Nk and a box per nodule
    table: object
    result: object    # NoduleDetectLib.detection.NoduleDetectionResult
    summary: str


class NoduleDetectLogic(module_base.RecognitionModuleLogic):
    """Lung nodule detection on chest CT, free of Qt: ``process`` takes plain arguments (usable from the Python
    console and the command line) and adds new nodes only; the input volume is never changed."""

    def setDefaultParameters(self, parameterNode):
        module_base.RecognitionModuleLogic.setDefaultParameters(self, parameterNode)
        for name, value in (("Method", "classical"), ("MinConfidence", "0.5"), ("MinDiameterMm", "3.0")):
            if not parameterNode.GetParameter(name):
                parameterNode.SetParameter(name, value)

    def process(self, inputVolume, method="classical", minConfidence=0.5, minDiameterMm=3.0, device="auto",
                progress=None, detectorId=None, manifestDirs=()) -> NoduleDetectOutputs:
        """Detect nodules on ``inputVolume`` and add the findings, a segmentation (lungs + one segment per
        nodule) and a results table to its scene. All or nothing: an error or cancel leaves the scene as it was.
        ``detectorId``: the catalogue's detection model for the deep method (default: the zoo bundle if installed,
        else the extension's own); ``manifestDirs``: folders of user catalogue manifests (trained models)."""
        from NoduleDetectLib import detection
        from RecognitionCore.volumes import volume_node_to_sitk

        progress = as_progress(progress)
        if inputVolume is None:
            raise InputError("No input volume is selected.")
        image = volume_node_to_sitk(inputVolume)
        try:
            result = detection.detect_nodules(image, method, minConfidence, minDiameterMm, device, detectorId,
                                              manifestDirs, progress=progress.sub(0.0, 0.9))
        except InputError as error:
            raise InputError(f"Volume '{inputVolume.GetName()}': {error}") from error
        progress.report(0.9, "Adding the findings to the scene")
        with scene.NewNodes(inputVolume.GetScene()):
            outputs = self._add_nodes(inputVolume, image, result)
        progress.report(1.0, outputs.summary)
        return outputs

    def _add_nodes(self, inputVolume, image, result) -> NoduleDetectOutputs:
        from NoduleDetectLib import detection

        name = inputVolume.GetName()
        rows = detection.finding_rows(result)
        lungs = np.zeros(image.GetSize()[::-1], dtype=np.uint8)
        lungs[detection.mask_on_grid(result.lungs.right, image)] = 1
        lungs[detection.mask_on_grid(result.lungs.left, image)] = 2
        segmentation = scene.add_segmentation_from_labelmap(lungs, inputVolume, {1: "lung_right", 2: "lung_left"},
                                                            f"{name} lungs and nodules", show_3d=True)
        for row, nodule in zip(rows, result.nodules):
            scene.add_segment_from_mask(segmentation, detection.mask_on_grid(nodule.mask, image), inputVolume,
                                        scene.SegmentSpec.for_structure("lung_nodule", name=row["nodule"]))
        findings = scene.add_findings(
            [scene.Finding(row["nodule"], nodule.center_lps_mm, detection.finding_description(row),
                           box_size_mm=nodule.box_lps_mm()[1]) for row, nodule in zip(rows, result.nodules)],
            f"{name} nodules")
        table = scene.add_table(rows or {column: [] for column in detection.FINDING_COLUMNS},
                                f"{name} nodule table", units=detection.FINDING_UNITS)
        scene.place_under_study([findings.folder_item_id, segmentation, table], inputVolume, "Nodules")
        summary = (f"{len(rows)} nodule(s) at confidence >= {result.min_confidence:.2f} ({result.method} method, "
                   f"{result.candidate_count} candidates); lungs {result.lungs.right_volume_ml:.0f} mL right, "
                   f"{result.lungs.left_volume_ml:.0f} mL left.")
        summary += "".join(f"\nWarning: {warning}" for warning in result.warnings)
        return NoduleDetectOutputs(segmentation, findings, table, result, summary)


#
# NoduleDetectTest
#

class NoduleDetectTest(module_base.RecognitionModuleTest):
    """Run by Slicer's self-test (and by ctest); outside the app by unittest or pytest."""
