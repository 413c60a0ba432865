"""The base classes of the module files: Slicer's own inside the app, small headless stand-ins outside it.

Why this exists: a module file (``NoduleDetect.py`` ...) derives from ``slicer.ScriptedLoadableModule``, which imports
Qt and exists only in the Slicer application. slicer-core (pip) has MRML but neither Qt nor that module. With the
stand-ins below, the same module file imports outside the app, its Logic runs on ``slicer.mrmlScene`` and its Test
class runs under unittest or pytest. Module and Widget need the application and say so when created.
"""

import logging
import unittest

import slicer

from .headless import create_app, inside_slicer_app

__all__ = ["ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
           "ScriptedLoadableModuleTest"]

if inside_slicer_app():
    from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,  # noqa: F401
                                               ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
else:
    class _NeedsSlicerApp:
        def __init__(self, *args, **kwargs):
            raise RuntimeError(f"{type(self).__name__} needs the 3D Slicer application; outside it, use the "
                               "module's Logic and Test classes.")

    class ScriptedLoadableModule(_NeedsSlicerApp):
        """Module registration (title, icon, help) exists only in the application."""

    class ScriptedLoadableModuleWidget(_NeedsSlicerApp):
        """The Qt panel exists only in the application."""

    class ScriptedLoadableModuleLogic:
        """Parameter-node handling as in Slicer: one vtkMRMLScriptedModuleNode per module, tagged with its name."""

        def __init__(self, parent=None):
            self.moduleName = type(self).__name__.removesuffix("Logic")
            self.isSingletonParameterNode = True

        def getParameterNode(self):
            """The module's parameter node in ``slicer.mrmlScene``, created on first use."""
            if self.isSingletonParameterNode:
                node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
                if node:
                    node.SetAttribute("ModuleName", self.moduleName)  # closing the scene may have removed it
                    return node
            else:
                nodes = self.getAllParameterNodes()
                if nodes:
                    return nodes[0]
            return slicer.mrmlScene.AddNode(self.createParameterNode())

        def getAllParameterNodes(self):
            scene = slicer.mrmlScene
            nodes = (scene.GetNthNodeByClass(index, "vtkMRMLScriptedModuleNode")
                     for index in range(scene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode")))
            return [node for node in nodes if node.GetAttribute("ModuleName") == self.moduleName]

        def createParameterNode(self):
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)  # the Python variable owns it now
            if self.isSingletonParameterNode:
                node.SetSingletonTag(self.moduleName)
            node.SetAttribute("ModuleName", self.moduleName)
            node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
            return node

    class ScriptedLoadableModuleTest(unittest.TestCase):
        """A unittest.TestCase on a headless scene; ``delayDisplay`` prints instead of showing a message box."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if getattr(slicer, "mrmlScene", None) is None:
                create_app()  # the scene and module logics that the application would provide

        def delayDisplay(self, message, requestedDelay=None, msec=None):
            print(message)

        def runTest(self):
            logging.warning("No test is defined in %s", type(self).__name__)
