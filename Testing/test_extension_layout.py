"""Static checks of the extension (no Slicer application): what CMake ships, what the panels use, the metadata.

A file that exists but is not listed in a CMakeLists.txt would be missing from the installed extension, and a listed
file that does not exist breaks the build; both are caught here, long before a Slicer build would.
"""

import ast
import json
import py_compile
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parent.parent
MODULE_BASE = REPO / "RecognitionCore" / "module_base.py"  # the base classes that the modules' classes share
MODULES = ("NoduleDetect", "OrganSegment", "SurgeryPlan")
SHIPPED_DIRECTORIES = ("RecognitionCore",) + MODULES
EXTENSION_FIELDS = ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS")
CATALOG_REQUIRED = {"$schema", "category", "scm_url"}
CATALOG_ALLOWED = CATALOG_REQUIRED | {"scm_revision", "scm_type", "build_dependencies", "build_subdirectory",
                                      "enabled", "tier"}
FILE_TOKEN = re.compile(r"[\w${}./-]+\.(?:py|ui|png|svg|json|txt|csv|md|pt)\b")


def cmake_text(directory: Path) -> str:
    """The CMakeLists.txt of ``directory`` without comments, with ``${MODULE_NAME}`` resolved."""
    text = (directory / "CMakeLists.txt").read_text()
    text = re.sub(r"#.*", "", text)
    return text.replace("${MODULE_NAME}", directory.name)


def listed_files(directory: Path) -> set:
    """Every file path a subdirectory's CMakeLists.txt names, relative to that directory."""
    return {directory / token for token in FILE_TOKEN.findall(cmake_text(directory))}


def shipped_files(directory: Path) -> set:
    """The files that belong in the installed extension: all but build files, caches and module-level tests."""
    files = set()
    for path in directory.rglob("*"):
        relative = path.relative_to(directory)
        if (path.is_dir() or path.name == "CMakeLists.txt" or "__pycache__" in relative.parts
                or relative.parts[0] == "Testing" or path.suffix == ".pyc"):
            continue
        files.add(path)
    return files


def extension_metadata() -> dict:
    return dict(re.findall(r'set\(EXTENSION_(\w+)\s+"([^"]*)"\)', cmake_text(REPO)))


def class_bases(path: Path) -> dict:
    """Each class a Python file defines, with the names of its base classes as written."""
    return {node.name: [ast.unparse(base) for base in node.bases]
            for node in ast.parse(path.read_text()).body if isinstance(node, ast.ClassDef)}


def ancestor_names(class_name: str, classes: dict) -> set:
    """The names of ``class_name``'s bases, followed through the shared base classes in MODULE_BASE."""
    shared = class_bases(MODULE_BASE)
    names, pending = set(), list(classes[class_name])
    while pending:
        base = pending.pop().rsplit(".", 1)[-1]  # "module_base.RecognitionModuleWidget" -> its class name
        names.add(base)
        pending += shared.get(base, [])
    return names


def widget_ui_names(path: Path) -> set:
    """The ``self.ui.<name>`` widgets that a Python file uses."""
    return set(re.findall(r"self\.ui\.(\w+)", path.read_text()))


def ui_object_names(module: str) -> set:
    root = ElementTree.parse(REPO / module / "Resources" / "UI" / f"{module}.ui").getroot()
    return {element.get("name") for element in root.iter() if element.tag in ("widget", "layout", "spacer")}


def test_module_files_compile_and_define_the_four_classes():
    for module in MODULES:
        path = REPO / module / f"{module}.py"
        py_compile.compile(str(path), doraise=True)
        classes = class_bases(path)
        expected = {module: "ScriptedLoadableModule", f"{module}Widget": "ScriptedLoadableModuleWidget",
                    f"{module}Logic": "ScriptedLoadableModuleLogic", f"{module}Test": "ScriptedLoadableModuleTest"}
        for class_name, base in expected.items():
            assert class_name in classes, f"{path.name} does not define {class_name}"
            assert base in ancestor_names(class_name, classes), f"{class_name} does not derive from {base}"
        assert "VTKObservationMixin" in ancestor_names(f"{module}Widget", classes)


def test_every_ui_name_used_by_a_widget_exists_in_its_ui_file():
    """Each module's .ui has the widgets its own Widget class uses and those the shared base class uses."""
    shared = widget_ui_names(MODULE_BASE)
    assert shared, f"{MODULE_BASE.name} uses no widget of the .ui files"
    for module in MODULES:
        used = shared | widget_ui_names(REPO / module / f"{module}.py")
        assert used, f"{module}.py uses no widget of its .ui file"
        missing = used - ui_object_names(module)
        assert not missing, f"{module}.ui lacks {sorted(missing)}"


def test_ui_files_are_slicer_panels_with_their_scene_connected():
    for module in MODULES:
        root = ElementTree.parse(REPO / module / "Resources" / "UI" / f"{module}.ui").getroot()
        assert root.tag == "ui" and root.get("version") == "4.0"
        top = root.find("widget")
        assert top.get("class") == "qMRMLWidget" and top.get("name") == module
        selectors = [widget for widget in root.iter("widget") if widget.get("class") == "qMRMLNodeComboBox"]
        assert selectors, f"{module}.ui has no node selector"
        connected = {(connection.findtext("receiver"), connection.findtext("signal"), connection.findtext("slot"))
                     for connection in root.iter("connection") if connection.findtext("sender") == module}
        for selector in selectors:
            name = selector.get("name")
            assert (name, "mrmlSceneChanged(vtkMRMLScene*)", "setMRMLScene(vtkMRMLScene*)") in connected, name
            node_types = selector.find("property[@name='nodeTypes']/stringlist")
            assert node_types is not None and [s.text for s in node_types], f"{name} has no nodeTypes"
        classes = {widget.get("class") for widget in root.iter("widget")}
        for needed in ("ctkCollapsibleButton", "QComboBox", "QPushButton", "QProgressBar"):
            assert needed in classes, f"{module}.ui has no {needed}"


def test_every_file_listed_in_cmake_exists():
    for directory in SHIPPED_DIRECTORIES:
        missing = [str(path.relative_to(REPO)) for path in listed_files(REPO / directory) if not path.is_file()]
        assert not missing, f"{directory}/CMakeLists.txt lists files that do not exist: {sorted(missing)}"


def test_every_shipped_file_is_listed_in_cmake():
    for directory in SHIPPED_DIRECTORIES:
        unlisted = shipped_files(REPO / directory) - listed_files(REPO / directory)
        names = sorted(str(path.relative_to(REPO)) for path in unlisted)
        assert not names, f"{directory}/CMakeLists.txt does not list (so would not install): {names}"


def test_top_cmakelists_declares_the_extension():
    metadata = extension_metadata()
    for field in EXTENSION_FIELDS:
        assert metadata.get(field, "").strip(), f"EXTENSION_{field} is missing or empty"
    assert "PyTorch" in metadata["DEPENDS"].split(";")
    subdirectories = re.findall(r"add_subdirectory\((\w+)\)", cmake_text(REPO))
    assert sorted(subdirectories) == sorted(SHIPPED_DIRECTORIES)
    for include in ("${Slicer_USE_FILE}", "${Slicer_EXTENSION_GENERATE_CONFIG}", "${Slicer_EXTENSION_CPACK}"):
        assert f"include({include})" in cmake_text(REPO)


def test_catalog_entry_follows_the_extensions_index_schema():
    entry = json.loads((REPO / "MedicalImageRecognition.json").read_text())
    assert CATALOG_REQUIRED <= set(entry), f"missing {CATALOG_REQUIRED - set(entry)}"
    assert set(entry) <= CATALOG_ALLOWED, f"not allowed by the schema: {set(entry) - CATALOG_ALLOWED}"
    assert "slicer-extension-catalog-entry-schema" in entry["$schema"]
    assert entry["category"] == extension_metadata()["CATEGORY"]
    assert entry["build_dependencies"] == ["PyTorch"]
    assert entry["tier"] in (1, 3, 5)
    assert all(isinstance(entry[key], str) for key in ("scm_url", "scm_revision", "build_subdirectory"))


def test_icons_are_128_pixel_pngs():
    icons = [REPO / "Resources" / "Icons" / "MedicalImageRecognition.png"]
    icons += [REPO / module / "Resources" / "Icons" / f"{module}.png" for module in MODULES]
    for icon in icons:
        with Image.open(icon) as image:
            assert image.format == "PNG" and image.size == (128, 128), f"{icon.name}: {image.format} {image.size}"
