"""The base classes the three modules share: input volume, compute device, input check, progress and cancel.

Each module file (``NoduleDetect.py`` ...) subclasses them with its own metadata and clinical logic. They follow
Slicer's naming conventions: the panel is ``Resources/UI/<ModuleName>.ui`` beside the module file, and
``<ModuleName>Widget`` and ``<ModuleName>Test`` find ``<ModuleName>Logic`` by name, as Slicer finds
``<ModuleName>Test``. Module and Widget exist only inside the application (see slicer_module.py); Logic and Test run
outside it too. torch is imported only when ``check_input`` runs: Slicer's PyTorch extension may install it after the
modules have loaded.
"""

import importlib
import importlib.util
import re
import shlex

import numpy as np
import vtk

import slicer
from slicer.util import VTKObservationMixin

from . import tests as core_tests
from .errors import Cancelled, InputError, RecognitionError
from .models import Catalogue
from .preprocessing import validate_ct
from .progress import CancelToken, Progress, as_progress
from .slicer_module import (ScriptedLoadableModule, ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest,
                            ScriptedLoadableModuleWidget)
from .testing import assert_raises, ct_like_volume_node, run_test_functions
from .training_job import TrainingJob, training_arguments
from .volumes import volume_node_to_sitk

TRAINING_POLL_INTERVAL_MS = 500

# What the modules need beyond Slicer's own Python (which has numpy and SimpleITK); the panel offers to install them.
PYTHON_REQUIREMENTS = {"torch": "torch>=2.8", "monai": "monai==1.6.1", "matplotlib": "matplotlib>=3.8"}

__all__ = ["RecognitionModule", "RecognitionModuleWidget", "RecognitionModuleLogic", "RecognitionModuleTest",
           "module_logic_class"]


def module_logic_class(owner):
    """The ``<ModuleName>Logic`` class of the module file that defines ``owner``'s ``<ModuleName>Widget`` or
    ``<ModuleName>Test`` class."""
    owner_class = type(owner)
    module_name = re.sub(r"(Widget|Test)$", "", owner_class.__name__)
    return getattr(importlib.import_module(owner_class.__module__), f"{module_name}Logic")


def module_test_modules(owner) -> list:
    """The test modules of ``<ModuleName>Lib.tests`` for ``owner``'s module (none while the module has no Lib)."""
    package_name = re.sub(r"(Widget|Test|Logic)$", "", type(owner).__name__) + "Lib.tests"
    if importlib.util.find_spec(package_name.split(".")[0]) is None or importlib.util.find_spec(package_name) is None:
        return []
    return list(importlib.import_module(package_name).TEST_MODULES)


class RecognitionModule(ScriptedLoadableModule):
    """Registration shared by the modules; a module sets its own title and help text."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.categories = ["Medical Image Recognition"]
        self.parent.dependencies = []
        self.parent.contributors = ["MedicalImageRecognition contributors"]
        self.parent.acknowledgementText = """
Part of the MedicalImageRecognition extension (Apache-2.0). Uses PyTorch (through Slicer's PyTorch extension),
MONAI and SimpleITK. No patient data is shipped with the extension.
"""


class RecognitionModuleWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: shows and edits the parameter node and calls the Logic; no computation here.

    A module with inputs of its own connects their widgets after ``setup`` and shows and stores them in
    ``updateExtraGUIFromParameterNode`` and ``updateExtraParameterNodeFromGUI``.
    """

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._updatingGUIFromParameterNode = False
        self._cancelToken = None
        self._trainingJob = None
        self._trainingTimer = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath(f"UI/{self.moduleName}.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = module_logic_class(self)()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.inputSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.checkInputButton.connect("clicked(bool)", self.onCheckInputButton)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.exportSurfacesButton.connect("clicked(bool)", self.onExportSurfacesButton)
        self.setupTraining()

        self.initializeParameterNode()

    def setupTraining(self):
        """The Advanced section: training runs in a subprocess (TrainingJob) that a timer polls, so the
        application stays responsive for the minutes or hours it takes."""
        import qt  # the Widget exists only inside the application

        self._trainingTimer = qt.QTimer()
        self._trainingTimer.setInterval(TRAINING_POLL_INTERVAL_MS)
        self._trainingTimer.connect("timeout()", self.onTrainingTimer)
        self.ui.trainTaskComboBox.connect("currentIndexChanged(int)", self.updateTrainingStartModels)
        self.ui.trainButton.connect("clicked(bool)", self.onTrainButton)
        self.updateTrainingStartModels()

    def cleanup(self):
        if self._trainingJob is not None:
            self._trainingJob.cancel()  # no training process outlives the panel
        if self._trainingTimer is not None:
            self._trainingTimer.stop()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.GetNodeReference("InputVolume"):
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.SetNodeReferenceID("InputVolume", firstVolumeNode.GetID())

    def setParameterNode(self, inputParameterNode):
        if inputParameterNode:
            self.logic.setDefaultParameters(inputParameterNode)
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode is not None:
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None):
        if self._parameterNode is None or self._updatingGUIFromParameterNode:
            return
        self._updatingGUIFromParameterNode = True
        inputVolume = self._parameterNode.GetNodeReference("InputVolume")
        self.ui.inputSelector.setCurrentNode(inputVolume)
        self.ui.deviceComboBox.setCurrentText(self._parameterNode.GetParameter("Device"))
        self.updateExtraGUIFromParameterNode(self._parameterNode)
        running = self.isRunning()
        self.ui.applyButton.enabled = self.readyToApply(self._parameterNode) and not running
        self.ui.resultsTableView.setMRMLTableNode(self._parameterNode.GetNodeReference("ResultsTable"))
        self.ui.exportSurfacesButton.enabled = (self._parameterNode.GetNodeReference("OutputSegmentation") is not None
                                                and not running)
        self.ui.checkInputButton.enabled = inputVolume is not None and not running
        self.ui.trainButton.enabled = not running
        self.ui.checkInputButton.toolTip = "Check the input volume." if inputVolume else "Select an input volume."
        self.ui.cancelButton.enabled = running
        self._updatingGUIFromParameterNode = False

    def updateParameterNodeFromGUI(self, caller=None, event=None):
        if self._parameterNode is None or self._updatingGUIFromParameterNode:
            return
        wasModified = self._parameterNode.StartModify()
        self._parameterNode.SetNodeReferenceID("InputVolume", self.ui.inputSelector.currentNodeID)
        self._parameterNode.SetParameter("Device", self.ui.deviceComboBox.currentText)
        self.updateExtraParameterNodeFromGUI(self._parameterNode)
        self._parameterNode.EndModify(wasModified)

    def isRunning(self) -> bool:
        """A run or a training job is under way (the buttons that start work are disabled meanwhile)."""
        return self._cancelToken is not None or self._trainingJob is not None

    def readyToApply(self, parameterNode) -> bool:
        """The module's inputs are selected: an input volume by default."""
        return parameterNode.GetNodeReference("InputVolume") is not None

    def onApplyButton(self):
        """Run the module's Logic on the parameter node's inputs (each module defines it)."""
        raise NotImplementedError

    def updateExtraGUIFromParameterNode(self, parameterNode):
        """Show the module's own parameters (their widgets' signals are ignored meanwhile); none by default."""

    def updateExtraParameterNodeFromGUI(self, parameterNode):
        """Store the module's own widgets' values (within one parameter node modification); none by default."""

    def showProgress(self, fraction, message):
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.progressBar.setFormat(f"{message} (%p%)")

    def onProgress(self, fraction, message):
        self.showProgress(fraction, message)
        slicer.app.processEvents()  # lets the Cancel button be clicked

    def ensurePythonPackages(self) -> bool:
        """Offer to install what is missing (torch through Slicer's PyTorch extension, which picks the CUDA build
        that fits the GPU); True when everything is importable."""
        missing = self.logic.missing_python_packages()
        if not missing:
            return True
        if not slicer.util.confirmOkCancelDisplay(
                f"This module needs {', '.join(missing)}, which is not installed yet. Install now? It downloads up "
                "to a few GB and can take several minutes."):
            return False
        progressDialog = slicer.util.createProgressDialog(maximum=0, labelText="Installing Python packages")
        try:
            for requirement in missing:
                progressDialog.labelText = f"Installing {requirement}"
                slicer.app.processEvents()
                if requirement.startswith("torch"):
                    try:
                        import PyTorchUtils
                        PyTorchUtils.PyTorchUtilsLogic().installTorch(torchVersionRequirement=requirement[5:])
                        continue
                    except ImportError:  # the PyTorch extension is not installed: plain pip (CPU or default CUDA)
                        pass
                slicer.util.pip_install(requirement)
        finally:
            progressDialog.close()
        return not self.logic.missing_python_packages()

    def runWithProgress(self, work) -> None:
        """Run ``work(progress)`` with the progress bar and the Cancel button; it returns the text for the status
        box. A cancel or an error message is shown instead; the buttons are restored in every case."""
        if not self.ensurePythonPackages():
            return
        self._cancelToken = CancelToken()
        self.updateGUIFromParameterNode()
        try:
            self.ui.statusTextEdit.setPlainText(work(Progress(self.onProgress, self._cancelToken)))
        except Cancelled as error:
            self.ui.statusTextEdit.setPlainText(str(error))
        except RecognitionError as error:
            self.ui.statusTextEdit.setPlainText(str(error))
            slicer.util.errorDisplay(str(error))
        finally:
            self._cancelToken = None
            self.updateGUIFromParameterNode()

    def onCheckInputButton(self):
        def checkInput(progress):
            report = self.logic.check_input(self._parameterNode.GetNodeReference("InputVolume"),
                                            self._parameterNode.GetParameter("Device"), progress)
            return self.logic.describe_input_check(report)
        self.runWithProgress(checkInput)

    def onExportSurfacesButton(self):
        """Export the last result's segments (the parameter node's OutputSegmentation) as STL or OBJ files."""
        import qt

        directory = qt.QFileDialog.getExistingDirectory(None, "Folder for the surface files")
        if not directory:
            return
        fileFormat = "OBJ" if self.ui.surfaceFormatComboBox.currentText == "OBJ" else "STL"
        try:
            files = self.logic.exportSurfaces(self._parameterNode.GetNodeReference("OutputSegmentation"), directory,
                                              fileFormat)
        except RecognitionError as error:
            slicer.util.errorDisplay(str(error))
            return
        self.ui.statusTextEdit.setPlainText(f"{len(files)} {fileFormat} file(s) written to {directory}.")

    def onCancelButton(self):
        if self._cancelToken is not None:
            self._cancelToken.cancel()
        if self._trainingJob is not None:
            self._trainingJob.cancel()
            self.finishTraining("Training cancelled; what it had written was removed.")

    def updateTrainingStartModels(self):
        """The catalogue's models for the chosen task, to fine-tune; "none" trains from scratch."""
        self.ui.trainStartModelComboBox.clear()
        self.ui.trainStartModelComboBox.addItems(["none"] + Catalogue().ids(self.ui.trainTaskComboBox.currentText))

    def onTrainButton(self):
        startModel = self.ui.trainStartModelComboBox.currentText
        try:
            arguments = training_arguments(
                self.ui.trainTaskComboBox.currentText, self.ui.trainDataPathLineEdit.currentPath,
                self.ui.trainOutputPathLineEdit.currentPath, self.ui.trainModelIdLineEdit.text,
                start=None if startModel == "none" else startModel, epochs=self.ui.trainEpochsSpinBox.value,
                device=self._parameterNode.GetParameter("Device"),
                extra=shlex.split(self.ui.trainExtraArgumentsLineEdit.text))
            job = TrainingJob(arguments)
            job.start()
        except (RecognitionError, ValueError) as error:  # ValueError: unbalanced quotes in the extra options
            slicer.util.errorDisplay(str(error))
            return
        self._trainingJob = job
        self.showProgress(0.0, "Training started")
        self.ui.statusTextEdit.setPlainText("Training: " + shlex.join(job.command))
        self._trainingTimer.start()
        self.updateGUIFromParameterNode()

    def onTrainingTimer(self):
        try:
            report = self._trainingJob.poll()
            if report is not None:
                self.showProgress(*report)
            if self._trainingJob.finished:
                self.finishTraining(self._trainingJob.result_summary())
        except RecognitionError as error:
            self.finishTraining(str(error))
            slicer.util.errorDisplay(str(error))

    def finishTraining(self, text):
        self._trainingTimer.stop()
        self._trainingJob = None
        self.ui.statusTextEdit.setPlainText(text)
        self.updateGUIFromParameterNode()


class RecognitionModuleLogic(ScriptedLoadableModuleLogic):
    """The computation, free of Qt so that it runs in the application, on the command line and in tests."""

    def createParameterNode(self):
        """A new parameter node, already holding the defaults."""
        parameterNode = ScriptedLoadableModuleLogic.createParameterNode(self)
        self.setDefaultParameters(parameterNode)
        return parameterNode

    def setDefaultParameters(self, parameterNode):
        """Fill in what is unset (a parameter node from an older scene may lack newer parameters)."""
        if not parameterNode.GetParameter("Device"):
            parameterNode.SetParameter("Device", "auto")

    @staticmethod
    def missing_python_packages() -> list:
        """The requirements of ``PYTHON_REQUIREMENTS`` whose package cannot be imported."""
        return [requirement for package, requirement in PYTHON_REQUIREMENTS.items()
                if importlib.util.find_spec(package) is None]

    def check_input(self, volume_node, device_preference="auto", progress=None) -> dict:
        """Check that ``volume_node`` is a CT this module can process; return what the user should know about it.

        Raises InputError, with a message for the user, for a missing, 2D, empty or non-CT volume.
        """
        from .device import choose_device, describe_device  # needs torch: see the module docstring

        progress = as_progress(progress)
        if volume_node is None:
            raise InputError("No input volume is selected.")
        progress.report(0.0, f"Reading {volume_node.GetName()}")
        image = volume_node_to_sitk(volume_node)
        progress.report(0.3, "Checking the CT")
        try:
            ct_report = validate_ct(image)
        except InputError as error:
            raise InputError(f"Volume '{volume_node.GetName()}': {error}") from error
        progress.report(0.7, "Choosing the compute device")
        device = describe_device(choose_device(device_preference))
        progress.report(1.0, "Input check done")
        return {
            "volume": volume_node.GetName(),
            "size": tuple(ct_report.size),
            "spacing_mm": tuple(ct_report.spacing_mm),
            "hu_range": (ct_report.hu_min, ct_report.hu_max),
            "warnings": list(ct_report.warnings),
            "device": device,
        }

    @staticmethod
    def exportSurfaces(segmentationNode, directory, fileFormat="STL") -> list:
        """The 3D surface of each segment as files for 3D printing or other software (STL: one per segment, OBJ: one
        file), in LPS millimetres; returns the files written."""
        from . import scene

        if segmentationNode is None:
            raise InputError("There is no result segmentation to export yet.")
        return scene.export_segment_surfaces(segmentationNode, directory, fileFormat)

    @staticmethod
    def describe_input_check(report: dict) -> str:
        """The report of ``check_input`` as lines of text for the panel."""
        lines = [
            f"Volume: {report['volume']}",
            "Size (voxels): " + " x ".join(str(count) for count in report["size"]),
            "Spacing (mm): " + " x ".join(f"{spacing:.2f}" for spacing in report["spacing_mm"]),
            "Intensity range (HU): {:.0f} to {:.0f}".format(*report["hu_range"]),
            f"Device: {report['device']}",
        ]
        lines += [f"Warning: {warning}" for warning in report["warnings"]]
        return "\n".join(lines)


class RecognitionModuleTest(ScriptedLoadableModuleTest):
    """Run by Slicer's self-test (and by ctest); outside the app by unittest or pytest."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_shared_core()
        self.setUp()
        self.test_module()
        self.setUp()
        self.test_check_input()

    def test_shared_core(self):
        """The RecognitionCore tests, so that they also run inside the Slicer application."""
        counts = run_test_functions(core_tests.CORE_TEST_MODULES, log=self.delayDisplay)
        self.assertEqual(counts["failed"], 0, f"{counts['failed']} RecognitionCore tests failed")
        self.assertGreater(counts["passed"], 0)

    def test_module(self):
        """The module's own tests (``<ModuleName>Lib/tests``, shipped with the module), as pytest runs them."""
        counts = run_test_functions(module_test_modules(self), log=self.delayDisplay)
        self.assertEqual(counts["failed"], 0, f"{counts['failed']} module tests failed")

    def test_check_input(self):
        logic = module_logic_class(self)()
        report = logic.check_input(ct_like_volume_node("SyntheticCT"), "cpu")
        self.assertEqual(report["size"], (48, 48, 24))
        np.testing.assert_allclose(report["spacing_mm"], (0.8, 0.8, 2.5))
        np.testing.assert_allclose(report["hu_range"], (-1000, 700))
        self.assertIn("cpu", report["device"].lower())
        self.assertIn("Spacing (mm): 0.80 x 0.80 x 2.50", logic.describe_input_check(report))

        constant = slicer.util.addVolumeFromArray(np.zeros((24, 48, 48), np.int16), name="Constant")
        single_slice = ct_like_volume_node("SingleSlice", slices=1)
        for node in (constant, single_slice, None):
            assert_raises(InputError, logic.check_input, node)
