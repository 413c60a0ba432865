"""The module files outside the Slicer application: they import, their Logic works on a real scene, their Test runs.

Each module file is imported the way Slicer imports it (its folder on sys.path, its name as the module name), with
slicer-core instead of the application. Module and Widget need the application; Logic and Test must not.
"""

import importlib
import subprocess
import sys
import types
from pathlib import Path

import numpy as np

import slicer
from slicer.util import VTKObservationMixin

import RecognitionCore.module_base as module_base  # as a module: pytest would collect its TestCase class by name
import RecognitionCore.tests
from RecognitionCore.errors import Cancelled, InputError
from RecognitionCore.progress import CancelToken, Progress
from RecognitionCore.testing import assert_raises

REPO = Path(__file__).resolve().parent.parent
MODULES = ("NoduleDetect", "OrganSegment", "SurgeryPlan")


def import_module_file(name: str):
    folder = str(REPO / name)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)


def ct_like_array():
    """Air around a soft-tissue cylinder with a bone block, in HU, (k, j, i) = (20, 40, 40)."""
    _, j, i = np.indices((20, 40, 40))
    array = np.where((j - 20) ** 2 + (i - 20) ** 2 < 16 ** 2, 30, -1000).astype(np.int16)
    array[:, 22:28, 17:23] = 900
    return array


def ct_like_node(array=None, name="CT"):
    """A volume node with 0.7 x 0.7 x 2 mm voxels."""
    node = slicer.util.addVolumeFromArray(ct_like_array() if array is None else array, name=name)
    node.SetSpacing(0.7, 0.7, 2.0)
    return node


def probe_test_module(name: str, fail: bool, calls: list) -> str:
    """A stand-in for a RecognitionCore test module with one test that records its call (and fails if asked)."""
    def test_probe(app):
        calls.append(app.scene)
        assert not fail, "probe failure"

    module = types.ModuleType(name)
    test_probe.__module__ = name
    module.test_probe = test_probe
    sys.modules[name] = module
    return name


def test_module_and_widget_need_the_application(app):
    for name in MODULES:
        module = import_module_file(name)
        for class_name in (name, f"{name}Widget"):
            assert_raises(RuntimeError, getattr(module, class_name), None, match="Slicer application")


def test_module_classes_derive_from_the_shared_base_classes():
    shared = {"": module_base.RecognitionModule, "Widget": module_base.RecognitionModuleWidget,
              "Logic": module_base.RecognitionModuleLogic, "Test": module_base.RecognitionModuleTest}
    for name in MODULES:
        module = import_module_file(name)
        for suffix, base in shared.items():
            assert issubclass(getattr(module, name + suffix), base), f"{name}{suffix} does not derive from {base}"
        assert issubclass(getattr(module, f"{name}Widget"), VTKObservationMixin)
        assert module_base.module_logic_class(getattr(module, f"{name}Test")()) is getattr(module, f"{name}Logic")


def test_module_files_load_without_torch():
    """Slicer's PyTorch extension may install torch only after the modules have loaded, so loading must not need it."""
    hide_torch = ("import importlib, sys\n"
                  "class HideTorch:\n"
                  "    def find_spec(self, name, path=None, target=None):\n"
                  "        if name.split('.')[0] in ('torch', 'monai'):\n"
                  "            raise ImportError(name + ' is hidden')\n"
                  "sys.meta_path.insert(0, HideTorch())\n"
                  f"for name in {MODULES!r}:\n"
                  f"    sys.path.insert(0, {str(REPO)!r} + '/' + name)\n"
                  "    importlib.import_module(name)\n")
    result = subprocess.run([sys.executable, "-c", hide_torch], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_logic_parameter_node_is_a_tagged_singleton_with_defaults(app):
    for name in MODULES:
        logic = getattr(import_module_file(name), f"{name}Logic")()
        node = logic.getParameterNode()
        assert node.IsA("vtkMRMLScriptedModuleNode")
        assert node.GetSingletonTag() == name and node.GetAttribute("ModuleName") == name
        assert node.GetParameter("Device") == "auto"
        assert logic.getParameterNode() is node
        assert app.scene.GetNodeByID(node.GetID()) is node


def test_check_input_reports_a_ct_volume(app):
    for name in MODULES:
        logic = getattr(import_module_file(name), f"{name}Logic")()
        messages = []
        progress = Progress(lambda fraction, message: messages.append((fraction, message)))
        report = logic.check_input(ct_like_node(), "cpu", progress)
        assert report["size"] == (40, 40, 20)
        np.testing.assert_allclose(report["spacing_mm"], (0.7, 0.7, 2.0))
        np.testing.assert_allclose(report["hu_range"], (-1000, 900))
        assert report["device"].startswith("CPU")
        assert messages[-1][0] == 1.0
        text = logic.describe_input_check(report)
        assert "Size (voxels): 40 x 40 x 20" in text and "-1000 to 900" in text


def test_check_input_rejects_what_is_not_a_3d_ct(app):
    constant = ct_like_node(np.full((20, 40, 40), 40, np.int16), "Constant")
    single_slice = ct_like_node(ct_like_array()[10:11], "SingleSlice")
    for name in MODULES:
        logic = getattr(import_module_file(name), f"{name}Logic")()
        for node in (constant, single_slice, None):
            assert_raises(InputError, logic.check_input, node)
        assert_raises(InputError, logic.check_input, ct_like_node(), "no-such-device")


def test_check_input_honours_cancel(app):
    token = CancelToken()
    token.cancel()
    logic = import_module_file("NoduleDetect").NoduleDetectLogic()
    assert_raises(Cancelled, logic.check_input, ct_like_node(), "cpu", Progress(cancel_token=token))


def test_module_test_classes_run_the_core_tests(app):
    """runTest() runs RecognitionCore.tests.CORE_TEST_MODULES (a probe here, not the suite) and fails on a failure."""
    all_core_tests = RecognitionCore.tests.CORE_TEST_MODULES
    module_tests = module_base.module_test_modules
    module_base.module_test_modules = lambda owner: []  # pytest runs the modules' own tests by themselves
    calls = []
    try:
        for name in MODULES:
            test_class = getattr(import_module_file(name), f"{name}Test")
            RecognitionCore.tests.CORE_TEST_MODULES = [probe_test_module("mir_probe_passes", False, calls)]
            test_class().runTest()
            RecognitionCore.tests.CORE_TEST_MODULES = [probe_test_module("mir_probe_fails", True, calls)]
            assert_raises(AssertionError, test_class().runTest, match="RecognitionCore tests failed")
    finally:
        RecognitionCore.tests.CORE_TEST_MODULES = all_core_tests
        module_base.module_test_modules = module_tests
        for probe in ("mir_probe_passes", "mir_probe_fails"):
            sys.modules.pop(probe, None)
    assert len(calls) == 2 * len(MODULES)


def test_module_test_classes_find_their_own_tests():
    names = module_base.module_test_modules(import_module_file("NoduleDetect").NoduleDetectTest())
    assert "NoduleDetectLib.tests.test_nodule_detect_logic" in names, names


def test_missing_python_packages_are_named_with_their_requirement():
    logic_class = module_base.RecognitionModuleLogic
    assert logic_class.missing_python_packages() == []  # torch and MONAI are installed here
    requirements = dict(module_base.PYTHON_REQUIREMENTS)
    try:
        module_base.PYTHON_REQUIREMENTS["no_such_package_here"] = "no_such_package_here>=1.0"
        assert logic_class.missing_python_packages() == ["no_such_package_here>=1.0"]
    finally:
        module_base.PYTHON_REQUIREMENTS.clear()
        module_base.PYTHON_REQUIREMENTS.update(requirements)
