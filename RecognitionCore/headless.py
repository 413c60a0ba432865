"""The Slicer application context: the real one inside Slicer, or one built from slicer-core outside it.

Inside the Slicer app, ``slicer.mrmlScene`` and ``slicer.modules.<name>.logic()`` exist. Outside it (tests, the command
line), ``create_app()`` builds the same two names from slicer-core's MRML and module logics, so code written against
``slicer.mrmlScene`` and ``module_logic("Segmentations")`` runs unchanged in both places.
"""

from __future__ import annotations

import tempfile
import types

import slicer

# The module logics the core uses, by their Slicer module names.
MODULE_LOGIC_CLASSES = {
    "Volumes": "vtkSlicerVolumesLogic",
    "Segmentations": "vtkSlicerSegmentationsModuleLogic",
    "Markups": "vtkSlicerMarkupsLogic",
    "Tables": "vtkSlicerTablesLogic",
    "Models": "vtkSlicerModelsLogic",
    "SubjectHierarchy": "vtkSlicerSubjectHierarchyModuleLogic",
    "Data": "vtkSlicerDataModuleLogic",
}


def inside_slicer_app() -> bool:
    return hasattr(slicer, "app")


def module_logic(name: str):
    """The logic of a Slicer module by name ('Segmentations', 'Markups', ...), in the app or headless."""
    return getattr(slicer.modules, name.lower()).logic()


def create_app(cache_dir: str | None = None) -> types.SimpleNamespace:
    """A headless application: a new scene with the application logic, default colours and the module logics.

    Sets ``slicer.mrmlScene`` and ``slicer.modules`` (so ``slicer.util`` helpers work) and the remote-IO/cache
    managers that reading ``.mrb`` files needs. Returns a namespace with ``scene``, ``app_logic`` and one attribute per
    module logic (``app.Segmentations`` ...).
    """
    if inside_slicer_app():
        raise RuntimeError("create_app() is for use outside the Slicer application; use current_app() instead.")
    from vtkmodules.vtkCommonCore import vtkCollection

    scene = slicer.vtkMRMLScene()
    crosshair = slicer.vtkMRMLCrosshairNode()
    crosshair.SetCrosshairName("default")
    scene.AddNode(crosshair)
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    color_logic = app_logic.GetColorLogic()
    color_logic.SetMRMLScene(scene)
    color_logic.AddDefaultColorNodes()
    app_logic.SetSliceLogics(vtkCollection())
    app_logic.SetViewLogics(vtkCollection())
    # vtkSlicerVolumesLogic looks up a module logic called "Colors" to colour new volumes.
    app_logic.SetModuleLogic("Colors", color_logic)
    logics = {"Colors": color_logic}
    for name, class_name in MODULE_LOGIC_CLASSES.items():
        logic = getattr(slicer, class_name)()
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app_logic)
        app_logic.SetModuleLogic(name, logic)
        logics[name] = logic

    remote_io = slicer.vtkMRMLRemoteIOLogic()
    remote_io.SetMRMLScene(scene)
    remote_io.SetMRMLApplicationLogic(app_logic)
    remote_io.GetCacheManager().SetRemoteCacheDirectory(cache_dir or tempfile.mkdtemp(prefix="mir-slicer-cache-"))
    data_io_logic = slicer.vtkDataIOManagerLogic()
    data_io_logic.SetMRMLScene(scene)
    data_io_logic.SetMRMLApplicationLogic(app_logic)
    data_io_logic.SetAndObserveDataIOManager(remote_io.GetDataIOManager())
    remote_io.AddDataIOToScene()

    slicer.mrmlScene = scene
    slicer.modules = types.SimpleNamespace(
        **{name.lower(): types.SimpleNamespace(logic=(lambda logic=logic: logic)) for name, logic in logics.items()})
    return types.SimpleNamespace(scene=scene, app_logic=app_logic, remote_io=remote_io,
                                 data_io_logic=data_io_logic, **logics)


def current_app() -> types.SimpleNamespace:
    """The running Slicer application as the same namespace ``create_app()`` returns, or a new headless one."""
    if not inside_slicer_app():
        return create_app()
    return types.SimpleNamespace(scene=slicer.mrmlScene, app_logic=slicer.app.applicationLogic(),
                                 Colors=slicer.modules.colors.logic(),
                                 **{name: module_logic(name) for name in MODULE_LOGIC_CLASSES})
