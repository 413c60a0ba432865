"""pytest fixtures for the tests of RecognitionCore and the modules (inside Slicer, RecognitionCore.testing builds them)."""

import sys
from pathlib import Path

import pytest
import vtk

# The modules' own packages (NoduleDetectLib ...) import as they do inside Slicer, where each module folder is on sys.path.
for module_folder in ("NoduleDetect", "OrganSegment", "SurgeryPlan"):
    sys.path.insert(0, str(Path(__file__).parent / module_folder))

from RecognitionCore.headless import create_app
from RecognitionCore.testing import shared_data_dir

vtk.vtkObject.GlobalWarningDisplayOff()  # bad-input tests provoke VTK error logs by design


@pytest.fixture
def app():
    application = create_app()
    yield application
    application.scene.Clear(1)


@pytest.fixture
def shared_data():
    return shared_data_dir()
