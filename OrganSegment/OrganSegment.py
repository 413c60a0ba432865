"""OrganSegment: abdominal organ segmentation on CT (3D Slicer scripted module).

This version holds the panel, its parameter node and the input check, shared by the modules in
RecognitionCore/module_base.py; segmentation itself comes in a later version. The Logic and Test classes are Qt-free,
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
# OrganSegment
#

class OrganSegment(module_base.RecognitionModule):
    def __init__(self, parent):
        module_base.RecognitionModule.__init__(self, parent)
        self.parent.title = "Organ Segment"
        self.parent.helpText = """
Segments abdominal organs (liver, spleen, kidneys, ...) on a CT volume.
This version checks the input: it reads the selected CT volume, validates it (3D, CT intensities in Hounsfield
units, usable voxel spacing) and reports its size, spacing, intensity range and the compute device that would be used.
Organ segmentation will be added in a later version.
"""


#
# OrganSegmentWidget
#

class OrganSegmentWidget(module_base.RecognitionModuleWidget):
    """The panel: the abdominal CT volume, the compute device and the input check."""


#
# OrganSegmentLogic
#

class OrganSegmentLogic(module_base.RecognitionModuleLogic):
    """Abdominal organ segmentation on CT, free of Qt (the input check is shared by all modules)."""


#
# OrganSegmentTest
#

class OrganSegmentTest(module_base.RecognitionModuleTest):
    """Run by Slicer's self-test (and by ctest); outside the app by unittest or pytest."""
