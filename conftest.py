"""pytest fixtures for the tests of RecognitionCore and the modules (inside Slicer, RecognitionCore.testing builds them)."""

import pytest
import vtk

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
