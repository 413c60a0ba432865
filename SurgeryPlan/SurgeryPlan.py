"""SurgeryPlan: tumour resection planning on CT (3D Slicer scripted module).

From a segmentation holding the organ (e.g. the liver), one or more tumours and optional vessels, one click reports
each tumour (volume, longest diameter, distance to the organ surface and to each vessel, with the closest points as a
line and a risk flag within the safety margin), proposes a resection (the tumours grown by the margin, a plane the
surgeon drags, or the vascular territories feeding the tumours) and gives the volumetry: resected and remnant volume
and the future remnant in percent of the functional organ, with a warning below a threshold. Everything goes into new
nodes (a plan segmentation shown in 3D, a table, lines, the plane); the plan exports to STL and to a one-page report.
The computations are in SurgeryPlanLib (plain images, no MRML); Logic and Test are Qt-free, so they also run outside
the Slicer application.
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
from RecognitionCore.errors import InputError  # noqa: E402
from RecognitionCore.progress import as_progress  # noqa: E402

METHODS = ("margin", "plane", "territory")
# 3D opacity per part: the organ parts see-through so tumours and vessels show inside them.
REMNANT_OPACITY_3D, RESECTION_OPACITY_3D, TERRITORY_OPACITY_3D = 0.25, 0.45, 0.3
AT_RISK_COLOR_RGB, CLEAR_COLOR_RGB = (1.0, 0.15, 0.1), (0.2, 0.8, 0.2)
# Surface nets with their own smoothing: 3-4x faster than flying edges, so the 3D parts follow a moved plane quickly.
SURFACE_CONVERSION = {"Conversion method": "1", "SurfaceNets smoothing": "1"}
PLAN_TABLE_DESCRIPTIONS = {"flag": "why the value needs attention (empty when it does not)"}


#
# SurgeryPlan
#

class SurgeryPlan(module_base.RecognitionModule):
    def __init__(self, parent):
        module_base.RecognitionModule.__init__(self, parent)
        self.parent.title = "Surgery Plan"
        self.parent.helpText = """
Plans a tumour resection (liver, kidney, any organ) on a CT and a segmentation with the organ, the tumour(s) and
optional vessels (for example from Organ Segment or drawn in Segment Editor). Map the segments to their roles, choose
the safety margin and the method:
margin (the tumours grown by the margin, clipped to the organ), plane (a cutting plane, proposed so that it just clears
the margin: drag it in the views and the volumes follow) or territory (the organ parts supplied by the vessel branches
that feed the tumours: a Couinaud-like resection when the portal vein is given).
Results: a new segmentation (remnant, resection, tumours, vessels; shown in 3D), a table with every number
(tumour size, distances to the organ surface and to each vessel, volumes, future remnant), lines between each tumour
and its closest vessel points (red within the margin), and warnings. Export the plan's surfaces (STL for 3D
printing, or OBJ) or a one-page report (PNG or PDF).
For planning review by a qualified clinician, not a medical device.
"""


#
# SurgeryPlanWidget
#

class SurgeryPlanWidget(module_base.RecognitionModuleWidget):
    """The panel: CT, segmentation and segment roles, method and margin, Apply/Cancel, results, exports. A moved
    plane re-cuts the organ (the Logic's ``updatePlane``) shortly after the drag pauses."""

    PLANE_UPDATE_DELAY_MS = 150

    def setup(self):
        import qt

        module_base.RecognitionModuleWidget.setup(self)
        self._outputs = None
        self._observedPlane = None
        self._planeTimer = qt.QTimer()
        self._planeTimer.setSingleShot(True)
        self._planeTimer.setInterval(self.PLANE_UPDATE_DELAY_MS)
        self._planeTimer.connect("timeout()", self.onPlaneMoved)
        self.ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSegmentationChanged)
        self.ui.organSegmentSelector.connect("currentSegmentChanged(QString)", self.updateParameterNodeFromGUI)
        self.ui.tumourSegmentsSelector.connect("segmentSelectionChanged(QStringList)", self.updateParameterNodeFromGUI)
        self.ui.vesselSegmentsSelector.connect("segmentSelectionChanged(QStringList)", self.updateParameterNodeFromGUI)
        self.ui.methodComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.marginSpinBox.connect("valueChanged(double)", self.updateParameterNodeFromGUI)
        self.ui.planeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.territoryGenerationSpinBox.connect("valueChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.flrWarningSpinBox.connect("valueChanged(double)", self.updateParameterNodeFromGUI)
        self.ui.saveReportButton.connect("clicked(bool)", self.onSaveReportButton)

    def cleanup(self):
        self._observePlane(None)
        module_base.RecognitionModuleWidget.cleanup(self)

    def onSegmentationChanged(self, node):
        for selector in (self.ui.organSegmentSelector, self.ui.tumourSegmentsSelector, self.ui.vesselSegmentsSelector):
            selector.setCurrentNode(node)
        self.updateParameterNodeFromGUI()

    def updateExtraGUIFromParameterNode(self, parameterNode):
        segmentation = parameterNode.GetNodeReference("InputSegmentation")
        self.ui.segmentationSelector.setCurrentNode(segmentation)
        for selector in (self.ui.organSegmentSelector, self.ui.tumourSegmentsSelector, self.ui.vesselSegmentsSelector):
            selector.setCurrentNode(segmentation)
        self.ui.organSegmentSelector.setCurrentSegmentID(parameterNode.GetParameter("OrganSegmentID"))
        self.ui.tumourSegmentsSelector.setSelectedSegmentIDs(split_ids(parameterNode.GetParameter("TumourSegmentIDs")))
        self.ui.vesselSegmentsSelector.setSelectedSegmentIDs(split_ids(parameterNode.GetParameter("VesselSegmentIDs")))
        self.ui.methodComboBox.setCurrentText(parameterNode.GetParameter("Method"))
        self.ui.marginSpinBox.value = float(parameterNode.GetParameter("MarginMm"))
        self.ui.planeSelector.setCurrentNode(parameterNode.GetNodeReference("ResectionPlane"))
        self.ui.territoryGenerationSpinBox.value = int(parameterNode.GetParameter("TerritoryGeneration"))
        self.ui.flrWarningSpinBox.value = float(parameterNode.GetParameter("FlrWarningPercent"))
        self.ui.saveReportButton.enabled = self._outputs is not None and not self.isRunning()

    def readyToApply(self, parameterNode) -> bool:
        return (module_base.RecognitionModuleWidget.readyToApply(self, parameterNode)
                and parameterNode.GetNodeReference("InputSegmentation") is not None)

    def updateExtraParameterNodeFromGUI(self, parameterNode):
        parameterNode.SetNodeReferenceID("InputSegmentation", self.ui.segmentationSelector.currentNodeID)
        parameterNode.SetParameter("OrganSegmentID", self.ui.organSegmentSelector.currentSegmentID() or "")
        parameterNode.SetParameter("TumourSegmentIDs", ",".join(self.ui.tumourSegmentsSelector.selectedSegmentIDs()))
        parameterNode.SetParameter("VesselSegmentIDs", ",".join(self.ui.vesselSegmentsSelector.selectedSegmentIDs()))
        parameterNode.SetParameter("Method", self.ui.methodComboBox.currentText)
        parameterNode.SetParameter("MarginMm", str(self.ui.marginSpinBox.value))
        parameterNode.SetNodeReferenceID("ResectionPlane", self.ui.planeSelector.currentNodeID)
        parameterNode.SetParameter("TerritoryGeneration", str(self.ui.territoryGenerationSpinBox.value))
        parameterNode.SetParameter("FlrWarningPercent", str(self.ui.flrWarningSpinBox.value))

    def onApplyButton(self):
        parameterNode = self._parameterNode

        def plan(progress):
            outputs = self.logic.process(
                parameterNode.GetNodeReference("InputVolume"), parameterNode.GetNodeReference("InputSegmentation"),
                parameterNode.GetParameter("OrganSegmentID"), split_ids(parameterNode.GetParameter("TumourSegmentIDs")),
                split_ids(parameterNode.GetParameter("VesselSegmentIDs")), method=parameterNode.GetParameter("Method"),
                marginMm=float(parameterNode.GetParameter("MarginMm")),
                planeNode=parameterNode.GetNodeReference("ResectionPlane"),
                territoryGeneration=int(parameterNode.GetParameter("TerritoryGeneration")),
                flrWarningPercent=float(parameterNode.GetParameter("FlrWarningPercent")), progress=progress)
            self._outputs = outputs
            parameterNode.SetNodeReferenceID("ResultsTable", outputs.table.GetID())
            parameterNode.SetNodeReferenceID("OutputSegmentation", outputs.segmentation.GetID())
            self._observePlane(outputs.plane)
            return outputs.summary
        self.runWithProgress(plan)

    def _observePlane(self, planeNode):
        import slicer

        if self._observedPlane is not None:
            self.removeObserver(self._observedPlane, slicer.vtkMRMLMarkupsNode.PointModifiedEvent,
                                self.onPlaneModified)
        self._observedPlane = planeNode
        if planeNode is not None:
            self.addObserver(planeNode, slicer.vtkMRMLMarkupsNode.PointModifiedEvent, self.onPlaneModified)

    def onPlaneModified(self, caller=None, event=None):
        """While dragging: the numbers follow at once; the segments and 3D surfaces when the drag pauses."""
        self._updatePlane(updateSegments=False)
        self._planeTimer.start()  # restarted at every move

    def onPlaneMoved(self):
        self._updatePlane(updateSegments=True)

    def _updatePlane(self, updateSegments):
        if self._outputs is None or self._cancelToken is not None:
            return
        try:
            self.ui.statusTextEdit.setPlainText(
                self.logic.updatePlane(self._outputs, self._observedPlane, updateSegments=updateSegments))
        except InputError as error:  # e.g. the plane was dragged off the organ: keep the last valid cut
            self.ui.statusTextEdit.setPlainText(str(error))

    def onSaveReportButton(self):
        import qt

        path = qt.QFileDialog.getSaveFileName(None, "Save the plan report", "resection_plan.png",
                                              "Images (*.png);;PDF (*.pdf)")
        if path:
            self.ui.statusTextEdit.setPlainText(f"Report saved: {self.logic.saveReport(self._outputs, path)}")


def split_ids(text: str) -> list:
    """Segment IDs from the parameter node's comma-separated text."""
    return [segmentId for segmentId in (text or "").split(",") if segmentId]


#
# SurgeryPlanLogic
#

@dataclass
class SurgeryPlanOutputs:
    """The nodes one run added (under the input's study, in a "Resection plan" folder) and the plan behind them."""

    segmentation: object
    table: object
    lines: list        # markups: a line per tumour and vessel between their closest points; curves of feeding branches
    plane: object      # the plane the plan cuts with (plane method), else None
    plan: object       # SurgeryPlanLib.plan.ResectionPlan
    inputVolume: object
    summary: str


class SurgeryPlanLogic(module_base.RecognitionModuleLogic):
    """Resection planning, free of Qt: ``process`` takes plain arguments (usable from the Python console and the
    command line) and adds new nodes only; the input volume and segmentation are never changed."""

    def setDefaultParameters(self, parameterNode):
        module_base.RecognitionModuleLogic.setDefaultParameters(self, parameterNode)
        for name, value in (("Method", "margin"), ("MarginMm", "10.0"), ("TerritoryGeneration", "2"),
                            ("FlrWarningPercent", "30.0")):
            if not parameterNode.GetParameter(name):
                parameterNode.SetParameter(name, value)

    def process(self, inputVolume, segmentationNode, organSegmentId, tumourSegmentIds, vesselSegmentIds=(),
                method="margin", marginMm=10.0, planeNode=None, territoryVesselSegmentId=None, territoryGeneration=2,
                flrWarningPercent=30.0, progress=None) -> SurgeryPlanOutputs:
        """Plan the resection of the tumour segments in the organ segment of ``segmentationNode`` (segment IDs) on
        ``inputVolume``'s grid and add the plan to the scene. All or nothing: an error or cancel leaves the scene as
        it was.

        ``method``: margin, plane (``planeNode``, a markups plane; without one a plane clearing ``marginMm`` is
        proposed and added, unlocked, for the surgeon to drag) or territory (the branches of
        ``territoryVesselSegmentId``, default the vessel named portal or else the first, at ``territoryGeneration``).
        """
        from RecognitionCore.preprocessing import validate_ct
        from RecognitionCore.volumes import volume_node_to_sitk
        from SurgeryPlanLib.plan import plan_resection

        progress = as_progress(progress)
        if inputVolume is None:
            raise InputError("No input volume is selected.")
        if segmentationNode is None:
            raise InputError("No segmentation is selected: it must hold the organ and tumour segments.")
        if method not in METHODS:
            raise InputError(f"Unknown method {method!r}; expected one of {', '.join(METHODS)}.")
        image = volume_node_to_sitk(inputVolume)
        try:
            validate_ct(image)
            progress.report(0.0, "Reading the segments")
            roles = [organSegmentId, *tumourSegmentIds, *vesselSegmentIds]
            if len(set(roles)) < len(roles):
                raise InputError("a segment has two roles: the organ, tumour and vessel segments must differ")
            organ = self._segmentImage(segmentationNode, organSegmentId, inputVolume, image, "organ")
            tumours, colors = self._segmentImages(segmentationNode, tumourSegmentIds, inputVolume, image, "tumour")
            vessels, vesselColors = self._segmentImages(segmentationNode, vesselSegmentIds, inputVolume, image,
                                                        "vessel")
            colors.update(vesselColors)
            plane = plane_lps(planeNode) if method == "plane" and planeNode is not None else None
            territoryVessel = None
            if territoryVesselSegmentId:
                territoryVessel = segmentationNode.GetSegmentation().GetSegment(territoryVesselSegmentId).GetName()
            plan = plan_resection(organ, tumours, vessels, method, marginMm, plane, territoryVessel,
                                  territoryGeneration, flrWarningPercent, progress.sub(0.05, 0.85))
        except InputError as error:
            raise InputError(f"Segmentation '{segmentationNode.GetName()}' on '{inputVolume.GetName()}': "
                             f"{error}") from error
        progress.report(0.85, "Adding the plan to the scene")
        with scene.NewNodes(inputVolume.GetScene()):
            outputs = self._addNodes(inputVolume, plan, colors, planeNode)
        progress.report(1.0, outputs.summary)
        return outputs

    @staticmethod
    def _segmentImage(segmentationNode, segmentId, inputVolume, image, role):
        """The segment on the volume's grid as a uint8 image; a segment stored on another grid is resampled to it
        (as Slicer does), one that misses the volume or is empty is an error."""
        from RecognitionCore.volumes import array_to_sitk

        if not segmentId:
            raise InputError(f"no {role} segment is selected")
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        if segment is None:
            raise InputError(f"there is no segment with ID {segmentId!r} (selected as {role})")
        mask = scene.segment_mask(segmentationNode, segmentId, inputVolume)
        if not mask.any():
            raise InputError(f"the {role} segment '{segment.GetName()}' is empty (or lies outside the volume)")
        return array_to_sitk(mask, image)

    def _segmentImages(self, segmentationNode, segmentIds, inputVolume, image, role):
        """({unique segment name: image}, {unique segment name: the segment's colour}) for segments of one role."""
        images, colors = {}, {}
        for segmentId in segmentIds:
            mask = self._segmentImage(segmentationNode, segmentId, inputVolume, image, role)
            segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
            name, count = segment.GetName(), 2
            while name in images:
                name, count = f"{segment.GetName()} ({count})", count + 1
            images[name], colors[name] = mask, tuple(segment.GetColor())
        return images, colors

    def _addNodes(self, inputVolume, plan, colors, planeNode) -> SurgeryPlanOutputs:
        from SurgeryPlanLib.plan import plan_rows

        volumeName, mrmlScene = inputVolume.GetName(), inputVolume.GetScene()
        parts = {1: scene.SegmentSpec.for_structure("remnant"), 2: scene.SegmentSpec.for_structure("resection")}
        labels = sitk.GetArrayFromImage(plan.remnant) + 2 * sitk.GetArrayFromImage(plan.resected)
        segmentation = scene.add_segmentation_from_labelmap(labels.astype(np.uint8), inputVolume, parts,
                                                            f"{volumeName} resection plan")
        for name, value in SURFACE_CONVERSION.items():
            segmentation.GetSegmentation().SetConversionParameter(name, value)
        segmentation.CreateClosedSurfaceRepresentation()
        display = segmentation.GetDisplayNode()
        for spec, opacity in ((parts[1], REMNANT_OPACITY_3D), (parts[2], RESECTION_OPACITY_3D)):
            segmentId = segmentation.GetSegmentation().GetSegmentIdBySegmentName(spec.name)
            if segmentId:
                display.SetSegmentOpacity3D(segmentId, opacity)
        for role, masks in (("tumor", plan.tumours), ("vessel", plan.vessels)):
            for name, mask in masks.items():
                spec = scene.SegmentSpec(name, colors[name], scene.segment_spec(role).terminology)
                scene.add_segment_from_mask(segmentation, sitk.GetArrayFromImage(mask), inputVolume, spec)
        if plan.territories is not None:
            self._addTerritories(segmentation, plan, inputVolume)
        lines = self._addDistanceLines(plan, mrmlScene) + self._addFeedingBranches(plan, mrmlScene)
        plane = planeNode
        if plan.plane is not None and planeNode is None:
            plane = scene.add_plane(plan.plane.point_lps_mm, plan.plane.normal_lps, f"{volumeName} resection plane",
                                    description="drag to move the cut", locked=False, scene=mrmlScene)
            plane.SetSizeMode(plane.SizeModeAbsolute)
            plane.SetSize(*[float(organ_size_mm(plan.organ).max())] * 2)
        table = scene.add_table(plan_rows(plan), f"{volumeName} resection plan table",
                                descriptions=PLAN_TABLE_DESCRIPTIONS)
        made = [segmentation, table] + lines + ([plane] if plane is not None and planeNode is None else [])
        scene.place_under_study(made, inputVolume, "Resection plan")
        outputs = SurgeryPlanOutputs(segmentation, table, lines, plane, plan, inputVolume, "")
        outputs.summary = describe_plan(plan)
        return outputs

    @staticmethod
    def _addTerritories(segmentation, plan, inputVolume):
        territoryLabels = sitk.GetArrayViewFromImage(plan.territories.labels)
        display = segmentation.GetDisplayNode()
        for index, territory in enumerate(plan.territories.territories):
            segmentId = scene.add_segment_from_mask(
                segmentation, (territoryLabels == territory.id).astype(np.uint8), inputVolume,
                scene.segment_spec(f"Territory {territory.id}", fallback_index=index))
            display.SetSegmentOpacity3D(segmentId, TERRITORY_OPACITY_3D)
            display.SetSegmentVisibility3D(segmentId, False)  # the resection and remnant already show them in 3D

    @staticmethod
    def _addDistanceLines(plan, mrmlScene) -> list:
        lines = []
        for tumour, report in plan.tumour_reports.items():
            for vessel, entry in report["vessels"].items():
                line = scene.add_line(entry["tumour_point_lps_mm"], entry["vessel_point_lps_mm"],
                                      f"{tumour} to {vessel}",
                                      description=f"{entry['distance_mm']:.1f} mm"
                                                  + (" (within the margin)" if entry["at_risk"] else ""),
                                      scene=mrmlScene)
                line.GetDisplayNode().SetSelectedColor(*(AT_RISK_COLOR_RGB if entry["at_risk"] else CLEAR_COLOR_RGB))
                lines.append(line)
        return lines

    @staticmethod
    def _addFeedingBranches(plan, mrmlScene) -> list:
        """Territory method: the centreline of each vessel branch that feeds a resected territory, from the
        bifurcation it leaves (where it would be divided) to its end, as a curve."""
        if plan.territories is None:
            return []
        tree = plan.territories.tree
        curves = []
        for territory in plan.territories.territories:
            if territory.id not in plan.resected_territory_ids:
                continue
            branch = tree.branch(territory.supplying_branch_id)
            points = np.vstack([branch.start_lps_mm, branch.centreline_lps_mm])
            description = f"{branch.length_mm:.0f} mm, mean radius {branch.mean_radius_mm:.1f} mm"
            curve = scene.add_curve(points, f"Branch feeding territory {territory.id}", description=description,
                                    scene=mrmlScene)
            curve.GetDisplayNode().SetSelectedColor(*AT_RISK_COLOR_RGB)
            curves.append(curve)
        return curves

    def updatePlane(self, outputs: SurgeryPlanOutputs, planeNode=None, updateSegments=True) -> str:
        """Re-cut a plane plan after the plane moved (``planeNode``, default the plan's plane) and refill the table;
        returns the new summary. The numbers alone take a fraction of a second, so the panel shows them while the
        plane is dragged; ``updateSegments`` also replaces the resection and remnant segments and their 3D
        surfaces (slower on a large CT: the panel does it when the drag pauses)."""
        from SurgeryPlanLib.plan import plan_rows

        planeNode = planeNode or outputs.plane
        if planeNode is None:
            raise InputError(f"this plan has no plane to move (it was made with the {outputs.plan.method} method)")
        outputs.plan.move_plane(*plane_lps(planeNode))
        fill_table(outputs.table, plan_rows(outputs.plan))
        outputs.summary = describe_plan(outputs.plan)
        if updateSegments:
            segmentation = outputs.segmentation.GetSegmentation()
            for name, mask in (("remnant", outputs.plan.remnant), ("resection", outputs.plan.resected)):
                segmentId = segmentation.GetSegmentIdBySegmentName(scene.structure(name).name)
                scene.replace_segment_mask(outputs.segmentation, segmentId, sitk.GetArrayViewFromImage(mask),
                                           outputs.inputVolume)
        return outputs.summary

    def saveReport(self, outputs: SurgeryPlanOutputs, path):
        """A one-page report (PNG or PDF by ``path``'s suffix): the plan in 3D (anterior and superior views) and
        its numbers and warnings."""
        from SurgeryPlanLib.plan import plan_rows
        from SurgeryPlanLib.report import ReportSection, SurfaceMesh, render_plan_report

        segmentation = outputs.segmentation.GetSegmentation()
        display = outputs.segmentation.GetDisplayNode()
        meshes = []
        for index in range(segmentation.GetNumberOfSegments()):
            segmentId = segmentation.GetNthSegmentID(index)
            if not display.GetSegmentVisibility3D(segmentId):
                continue
            points, triangles = scene.segment_surface_mesh(outputs.segmentation, segmentId)
            segment = segmentation.GetSegment(segmentId)
            meshes.append(SurfaceMesh(segment.GetName(), points, triangles, tuple(segment.GetColor()),
                                      display.GetSegmentOpacity3D(segmentId)))
        sections = {}
        for row in plan_rows(outputs.plan):
            value = f"{row['value']:.1f} {row['unit']}" + (f"  ({row['flag']})" if row["flag"] else "")
            sections.setdefault(row["section"], []).append((row["measure"], value))
        return render_plan_report(path, f"Resection plan: {outputs.inputVolume.GetName()}", meshes,
                                  [ReportSection(heading, rows) for heading, rows in sections.items()],
                                  outputs.plan.warnings)


def plane_lps(planeNode):
    """(origin LPS mm, normal LPS) of a markups plane, in world coordinates."""
    origin, normal = [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]
    planeNode.GetOriginWorld(origin)
    planeNode.GetNormalWorld(normal)
    return (-origin[0], -origin[1], origin[2]), (-normal[0], -normal[1], normal[2])


def organ_size_mm(organ) -> np.ndarray:
    """The organ's bounding box size along its grid axes (mm): the plane is drawn about that large."""
    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.Execute(organ)
    return np.array(shape.GetBoundingBox(1)[3:]) * np.array(organ.GetSpacing())


def fill_table(table, rows) -> None:
    """Rewrite a plan table's values in place (same rows, new numbers)."""
    for rowIndex, row in enumerate(rows):
        for column, value in row.items():
            table.SetCellText(rowIndex, table.GetColumnIndex(column), str(value))


def describe_plan(plan) -> str:
    """The summary for the status box: volumes, future remnant and every warning."""
    volumes = plan.volumetry
    margin = f" ({plan.margin_mm:g} mm margin)" if plan.method != "territory" else ""
    lines = [f"{plan.method.capitalize()} resection{margin}: resected "
             f"{volumes['resected_ml']:.0f} mL, remnant {volumes['remnant_ml']:.0f} mL = "
             f"{volumes['flr_percent']:.1f} % of the functional organ."]
    for tumour, report in plan.tumour_reports.items():
        closest = min(report["vessels"].items(), key=lambda item: item[1]["distance_mm"], default=None)
        lines.append(f"{tumour}: {report['volume_ml']:.1f} mL, {report['longest_diameter_mm']:.0f} mm, "
                     f"{report['organ_surface_distance_mm']:.1f} mm from the organ surface"
                     + (f", {closest[1]['distance_mm']:.1f} mm from {closest[0]}" if closest else "") + ".")
    lines += [f"Warning: {warning}." for warning in plan.warnings]
    return "\n".join(lines)


#
# SurgeryPlanTest
#

class SurgeryPlanTest(module_base.RecognitionModuleTest):
    """Run by Slicer's self-test (and by ctest); outside the app by unittest or pytest."""
