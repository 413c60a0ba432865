"""SurgeryPlan: liver resection planning on CT (3D Slicer scripted module).

This version holds the panel, its parameter node and the input check, shared by the modules in
RecognitionCore/module_base.py; resection planning comes in a later version. The Logic and Test classes are Qt-free,
so they also run outside the Slicer application (see RecognitionCore/slicer_module.py).
"""

import importlib.util
import os
import sys

if importlib.util.find_spec("RecognitionCore") is None:
    # a source checkout: "Additional module paths" lists this folder, not the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Imported as a module, not by class name: a unittest loader (Slicer's ctest) runs every TestCase class it finds in
# this file's namespace, and the shared Test class is not one of this module's tests.
from RecognitionCore import module_base  # noqa: E402


#
# SurgeryPlan
#

class SurgeryPlan(module_base.RecognitionModule):
    def __init__(self, parent):
        module_base.RecognitionModule.__init__(self, parent)
        self.parent.title = "Surgery Plan"
        self.parent.helpText = """
Plans a liver resection on a CT volume and the liver segmentation (for example from Organ Segment).
This version stores the selected segmentation and checks the input: it reads the selected CT volume, validates it
(3D, CT intensities in Hounsfield units, usable voxel spacing) and reports its size, spacing, intensity range and the
compute device that would be used.
Resection planning will be added in a later version.
"""


#
# SurgeryPlanWidget
#

class SurgeryPlanWidget(module_base.RecognitionModuleWidget):
    """The panel: the CT volume and its liver segmentation, the compute device and the input check."""

    def setup(self):
        module_base.RecognitionModuleWidget.setup(self)
        self.ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)

    def updateExtraGUIFromParameterNode(self, parameterNode):
        self.ui.segmentationSelector.setCurrentNode(parameterNode.GetNodeReference("InputSegmentation"))

    def updateExtraParameterNodeFromGUI(self, parameterNode):
        parameterNode.SetNodeReferenceID("InputSegmentation", self.ui.segmentationSelector.currentNodeID)


#
# SurgeryPlanLogic
#

class SurgeryPlanLogic(module_base.RecognitionModuleLogic):
    """Liver resection planning on CT, free of Qt (the input check is shared by all modules)."""


#
# SurgeryPlanTest
#

class SurgeryPlanTest(module_base.RecognitionModuleTest):
    """Run by Slicer's self-test (and by ctest); outside the app by unittest or pytest."""
