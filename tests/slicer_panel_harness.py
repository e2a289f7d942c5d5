"""Runs the module's panel (SegMoTESlicer/SegMoTESlicer.py and its .ui) outside Slicer.

What is real: Qt's widgets (PyQt5, offscreen), slicer-core's MRML scene, application, markups and segment editor
logic, slicer-core's copy of slicer.util for its non-GUI functions, and the module's own code, imported unchanged.
What stands in: PythonQt's way of exposing Qt objects (a property is an attribute, ``obj.connect("sig(int)", fn)``),
the CTK and qMRML widgets the .ui names, ``slicer.app``, ``slicer.modules``, ``slicer.ScriptedLoadableModule``,
``slicer.parameterNodeWrapper`` and the GUI half of ``slicer.util``. Each stand-in is STRICT: it may define only
members that Slicer 5.10's or CTK's headers (or Slicer 5.10's Python) declare, listed below by name, and a member a
stand-in lacks is an AttributeError, so a misspelled or missing call fails here as it would in Slicer.

The lists below were written from Slicer v5.10.0 (Libs/MRML/Widgets, Modules/Loadable/Segmentations/Widgets,
Base/QTGUI, Base/Python/slicer) and CTK (Libs/Widgets) headers: names only, public methods, slots, signals and
Q_PROPERTYs.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import sys
import types
import typing
import unittest
import xml.etree.ElementTree as ElementTree
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PyQt5 import QtCore, QtGui, QtTest, QtWidgets  # noqa: E402

import slicer  # noqa: E402  (slicer-core: the real MRML classes)
import slicer.util as slicerCoreUtil  # noqa: E402
from slicer_views import moduleLogics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "SegMoTESlicer"


class StandInError(AssertionError):
    """A stand-in was given a member Slicer 5.10 / CTK does not declare."""


# ---- what Slicer 5.10 and CTK declare (names only) -------------------------------------------------------------
QMRML_WIDGET = {"mrmlScene", "setMRMLScene", "mrmlSceneChanged"}
DECLARED = {
    "qMRMLWidget": QMRML_WIDGET,
    "ctkCollapsibleButton": {
        "buttonTextAlignment", "collapsed", "collapsedHeight", "contentsFrameShadow", "contentsFrameShape",
        "contentsLineWidth", "contentsMidLineWidth", "flat", "indicatorAlignment", "isFlat", "setButtonTextAlignment",
        "setCollapsed", "setCollapsedHeight", "setContentsFrameShadow", "setContentsFrameShape",
        "setContentsLineWidth", "setContentsMidLineWidth", "setFlat", "setIndicatorAlignment", "contentsCollapsed",
        "minimumSizeHint", "sizeHint", "event", "eventFilter", "setVisible"},
    "ctkMenuButton": {"minimumSizeHint", "sizeHint"},
    "ctkPathLineEdit": {
        "currentPath", "setCurrentPath", "filters", "setFilters", "nameFilters", "setNameFilters", "settingKey",
        "setSettingKey", "label", "setLabel", "options", "setOptions", "showBrowseButton", "setShowBrowseButton",
        "showHistoryButton", "setShowHistoryButton", "sizeAdjustPolicy", "setSizeAdjustPolicy", "minimumContentsLength",
        "setMinimumContentsLength", "comboBox", "addCurrentPathToHistory", "browse", "retrieveHistory",
        "currentPathChanged", "validInputChanged", "setCurrentFileExtension", "showFiles", "setShowFiles",
        "minimumSizeHint", "sizeHint"},
    "qMRMLNodeComboBox": QMRML_WIDGET | {
        "addEnabled", "setAddEnabled", "baseName", "setBaseName", "currentNodeID", "currentNodeId", "editEnabled",
        "setEditEnabled", "hideChildNodeTypes", "setHideChildNodeTypes", "nodeTypes", "setNodeTypes", "noneDisplay",
        "setNoneDisplay", "noneEnabled", "setNoneEnabled", "removeEnabled", "setRemoveEnabled", "renameEnabled",
        "setRenameEnabled", "selectNodeUponCreation", "setSelectNodeUponCreation", "showChildNodeTypes",
        "setShowChildNodeTypes", "showHidden", "setShowHidden", "currentNode", "setCurrentNode", "setCurrentNodeID",
        "setCurrentNodeIndex", "nodeCount", "nodeFromIndex", "nodes", "addAttribute", "removeAttribute", "addNode",
        "removeCurrentNode", "renameCurrentNode", "editCurrentNode", "currentNodeChanged", "currentNodeIDChanged",
        "nodeAdded", "nodeAddedByUser", "nodeAboutToBeRemoved", "nodeActivated", "currentNodeRenamed",
        "nodeAboutToBeEdited", "interactionNodeSingletonTag", "setInteractionNodeSingletonTag", "sizeAdjustPolicy",
        "setSizeAdjustPolicy", "nodeTypeLabel", "setNodeTypeLabel", "addMenuAction", "model", "sceneModel",
        "sortFilterProxyModel", "nodeFactory"},
    "qMRMLSegmentSelectorWidget": QMRML_WIDGET | {
        "currentNode", "currentNodeID", "setCurrentNode", "setCurrentNodeID", "currentSegmentID",
        "setCurrentSegmentID", "segmentIDs", "selectedSegmentIDs", "setSelectedSegmentIDs", "editEnabled",
        "setEditEnabled", "noneEnabled", "setNoneEnabled", "multiSelection", "setMultiSelection",
        "horizontalLayout", "setHorizontalLayout", "segmentationNodeSelectorVisible",
        "setSegmentationNodeSelectorVisible", "selectNodeUponCreation", "setSelectNodeUponCreation",
        "currentNodeChanged", "currentSegmentChanged", "segmentSelectionChanged", "nodeAboutToBeEdited"},
    "qMRMLSegmentationShow3DButton": {"locked", "setLocked", "segmentationNode", "setSegmentationNode"},
    "qMRMLSegmentEditorWidget": QMRML_WIDGET | {
        "activeEffect", "setActiveEffect", "setActiveEffectByName", "availableEffectNames", "effectByName",
        "effectByIndex", "effectCount", "segmentationNode", "segmentationNodeID", "setSegmentationNode",
        "setSegmentationNodeID", "sourceVolumeNode", "sourceVolumeNodeID", "setSourceVolumeNode",
        "setSourceVolumeNodeID", "currentSegmentID", "setCurrentSegmentID", "mrmlSegmentEditorNode",
        "setMRMLSegmentEditorNode", "interactionNode", "setInteractionNode", "saveStateForUndo", "undo", "redo",
        "installKeyboardShortcuts", "uninstallKeyboardShortcuts", "setupViewObservations", "removeViewObservations",
        "updateWidgetFromMRML", "updateEffectList", "maximumNumberOfUndoStates", "setMaximumNumberOfUndoStates",
        "segmentationNodeSelectorVisible", "setSegmentationNodeSelectorVisible", "sourceVolumeNodeSelectorVisible",
        "setSourceVolumeNodeSelectorVisible", "switchToSegmentationsButtonVisible",
        "setSwitchToSegmentationsButtonVisible", "show3DButtonVisible", "setShow3DButtonVisible",
        "addRemoveSegmentButtonsVisible", "setAddRemoveSegmentButtonsVisible", "maskingSectionVisible",
        "setMaskingSectionVisible", "undoEnabled", "setUndoEnabled", "readOnly", "setReadOnly",
        "jumpToSelectedSegmentEnabled", "setJumpToSelectedSegmentEnabled", "specifyGeometryButtonVisible",
        "setSpecifyGeometryButtonVisible", "unorderedEffectsVisible", "setUnorderedEffectsVisible",
        "effectColumnCount", "setEffectColumnCount", "effectButtonStyle", "setEffectButtonStyle",
        "currentSegmentIDChanged", "sourceVolumeNodeChanged", "segmentationNodeChanged", "selectNextSegment",
        "selectPreviousSegment", "selectSegmentAtOffset", "rotateSliceViewsToSegmentation", "jumpSlices",
        "showSourceVolumeInSliceViewers", "toggleSourceVolumeIntensityMaskEnabled", "updateVolume",
        "turnOffLightboxes", "hideLabelLayer", "setEffectNameOrder", "effectNameOrder", "setEffectCursor",
        "defaultTerminologyEntry", "setDefaultTerminologyEntry", "autoShowSourceVolumeNode",
        "setAutoShowSourceVolumeNode"},
    # qSlicerScriptedLoadableModule (what a ScriptedLoadableModule's `parent` is) and qSlicerAbstractCoreModule
    "qSlicerScriptedLoadableModule": {
        "title", "categories", "contributors", "helpText", "acknowledgementText", "dependencies", "hidden", "icon",
        "index", "associatedNodeTypes", "extensions", "defaultDocumentationLink", "name", "path", "isBuiltIn",
        "isInstalled", "slicerWikiUrl", "widgetRepresentation", "logic", "mrmlScene"},
    # qSlicerScriptedLoadableModuleWidget / qSlicerAbstractModuleWidget (the widget's `parent`), plus QWidget
    "qSlicerScriptedLoadableModuleWidget": {"isEntered", "moduleName", "enter", "exit", "setMRMLScene",
                                            "mrmlScene", "mrmlSceneChanged", "module"},
    # qSlicerApplication and qSlicerCoreApplication (slicer.app), plus QApplication
    "qSlicerApplication": {"applicationLogic", "mainWindow", "layoutManager", "mrmlScene", "settings",
                           "userSettings", "revisionUserSettings", "slicerHome", "temporaryPath", "majorVersion",
                           "minorVersion", "pauseRender", "resumeRender", "pythonManager", "ioManager",
                           "moduleManager", "processEvents", "commandOptions", "testingUtility"},
}
# Slicer 5.10's Base/Python/slicer/util.py, top-level names
SLICER_UTIL_510 = set("""
quit exit restart sourceDir startupEnvironment importVTKClassesFromDirectory importQtClassesFromDirectory
importClassesFromDirectory importModuleObjects lookupTopLevelWidget mainWindow pythonShell showStatusMessage
findChildren findChild loadUI startQtDesigner childWidgetVariables addParameterEditWidgetConnections
removeParameterEditWidgetConnections updateParameterEditWidgetsFromNode updateNodeFromParameterEditWidgets
setSliceViewerLayers setToolbarsVisible setMenuBarsVisible setPythonConsoleVisible setErrorLogVisible
setStatusBarVisible setViewControllersVisible forceRenderAllViews loadNodeFromFile loadNodesFromFile loadColorTable
loadMarkups loadModel loadSegmentation loadTransform loadTable loadLabelVolume loadText loadVolume loadSequence
loadScene openAddDataDialog saveNode saveScene exportNode moduleSelector selectModule selectedModule moduleNames
getModule getModuleGui getNewModuleGui getModuleWidget getNewModuleWidget getModuleLogic modulePath
reloadScriptedModule setModulePanelTitleVisible setApplicationLogoVisible setModuleHelpSectionVisible
setDataProbeVisible resetThreeDViews resetSliceViews MRMLNodeNotFoundException getNodes getNode getNodesByClass
getFirstNodeByClassByName getFirstNodeByName NodeModify RenderBlocker getSubjectHierarchyItemChildren array
arrayFromVolume arrayFromVolumeModified arrayFromModelPoints arrayFromModelPointsModified arrayFromModelPointData
arrayFromModelCellData arrayFromMarkupsControlPointData arrayFromModelPolyIds arrayFromGridTransform
arrayFromVTKMatrix vtkMatrixFromArray updateVTKMatrixFromArray arrayFromTransformMatrix
updateTransformMatrixFromArray arrayFromSegment arrayFromSegmentInternalBinaryLabelmap arrayFromSegmentBinaryLabelmap
updateSegmentBinaryLabelmapFromArray arrayFromMarkupsControlPoints updateMarkupsControlPointsFromArray
arrayFromMarkupsCurvePoints arrayFromMarkupsCurveData updateVolumeFromArray addVolumeFromArray arrayFromTableColumn
updateTableFromArray dataframeFromTable dataframeFromMarkups itkImageFromVolume addVolumeFromITKImage
updateVolumeFromITKImage VTKObservationMixin toVTKString toLatin1String tempDirectory delayDisplay infoDisplay
warningDisplay errorDisplay confirmOkCancelDisplay confirmYesNoDisplay confirmRetryCloseDisplay messageBox
createProgressDialog displayPythonShell WaitCursor MessageDialog tryWithErrorDisplay toBool settingsValue
clickAndDrag downloadFile extractArchive computeChecksum extractAlgoAndDigest downloadAndExtractArchive
getFilesInDirectory chdir plot launchConsoleProcess logProcessOutput pip_install pip_uninstall longPath
EXIT_SUCCESS EXIT_FAILURE TESTING_DATA_URL DATA_STORE_URL""".split())
# What slicer.ScriptedLoadableModule (5.10) offers each class; the parameter node wrapper's reserved members.
SCRIPTED_MODULE_510 = {
    "ScriptedLoadableModule": {"parent", "moduleName", "resourcePath", "getDefaultModuleDocumentationLink",
                               "runTest"},
    "ScriptedLoadableModuleWidget": {"parent", "moduleName", "developerMode", "layout", "resourcePath", "cleanup",
                                     "setup", "setupDeveloperSection", "onReload", "onTest", "onReloadAndTest",
                                     "onEditSource"},
    "ScriptedLoadableModuleLogic": {"moduleName", "isSingletonParameterNode", "getParameterNode",
                                    "getAllParameterNodes", "createParameterNode"},
}
PARAMETER_WRAPPER_510 = {"parameterNode", "allParameters", "default", "isCached", "dataType", "getValue", "setValue",
                         "connectGui", "connectParametersToGui", "disconnectGui", "StartModify", "EndModify",
                         "AddObserver", "RemoveObserver", "Modified"}


# ---- PythonQt's view of Qt objects, on PyQt5 -------------------------------------------------------------------
CPP_TO_PY = {"int": int, "bool": bool, "double": float, "QString": str, "const QString&": str}
_getattribute = QtCore.QObject.__getattribute__
slotErrors: list[BaseException] = []  # exceptions raised inside a slot (PythonQt prints them; tests fail on them)


def _qobjectGetattribute(self, name):
    # PythonQt: a Qt property reads as an attribute (label.text, combo.currentData), shadowing a method of that name
    if name[:1] != "_":
        metaObject = _getattribute(self, "metaObject")()
        if metaObject.indexOfProperty(name) >= 0:
            return _getattribute(self, "property")(name)
    return _getattribute(self, name)


def _qobjectSetattr(self, name, value):
    if name[:1] != "_" and self.metaObject().indexOfProperty(name) >= 0:
        if not self.setProperty(name, value):
            raise AttributeError(f"{type(self).__name__}.{name} cannot be set to {value!r}")
        return
    object.__setattr__(self, name, value)


def _signature(signature: str) -> tuple[str, list[str]]:
    match = re.fullmatch(r"(\w+)\((.*)\)", signature.replace(" ", ""))
    if not match:
        raise TypeError(f"not a Qt signature: {signature!r}")
    return match.group(1), [a for a in match.group(2).split(",") if a]


def _declaresSignal(obj, signature: str) -> bool:
    for cls in type(obj).__mro__:
        if signature in getattr(cls, "cppSignals", ()):
            return True
    normalized = QtCore.QMetaObject.normalizedSignature(signature).data().decode()
    return obj.metaObject().indexOfSignal(normalized) >= 0


def _pythonQtSlot(callable_):
    """PythonQt calls a Python slot with as many of the signal's arguments as it takes."""
    try:
        parameters = inspect.signature(callable_).parameters.values()
        if any(p.kind == p.VAR_POSITIONAL for p in parameters):
            count = None
        else:
            count = sum(1 for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
    except (TypeError, ValueError):
        count = None

    def slot(*args):
        try:
            callable_(*(args if count is None else args[:count]))
        except BaseException as error:  # noqa: BLE001  PythonQt prints it and goes on; the tests fail on it
            slotErrors.append(error)
    return slot


def _boundSignal(obj, signature):
    name, arguments = _signature(signature)
    if not _declaresSignal(obj, signature):
        raise AttributeError(f"{type(obj).__name__} has no signal {signature}")
    bound = _getattribute(obj, name)
    pythonTypes = tuple(CPP_TO_PY.get(a, object) for a in arguments)
    if pythonTypes and all(t is not object for t in pythonTypes):
        try:
            return bound[pythonTypes if len(pythonTypes) > 1 else pythonTypes[0]]
        except (KeyError, TypeError):
            pass
    return bound


def _connect(self, signature, receiver, slotSignature=None):
    """PythonQt: obj.connect("clicked(bool)", callable)."""
    slot = _pythonQtSlot(receiver)
    connections = self.__dict__.setdefault("_pythonQtConnections", {})
    connections.setdefault((signature, receiver), []).append(slot)
    _boundSignal(self, signature).connect(slot)
    return True


def _disconnect(self, signature, receiver=None):
    connections = self.__dict__.get("_pythonQtConnections", {})
    for slot in connections.pop((signature, receiver), []):
        _boundSignal(self, signature).disconnect(slot)
    return True


QtCore.QObject.__getattribute__ = _qobjectGetattribute
QtCore.QObject.__setattr__ = _qobjectSetattr
QtCore.QObject.connect = _connect
QtCore.QObject.disconnect = _disconnect


def qtModule() -> types.ModuleType:
    """PythonQt's `qt`: every Qt class in one namespace."""
    qt = types.ModuleType("qt")
    for source in (QtCore, QtGui, QtWidgets):
        for name in dir(source):
            if name.startswith("Q") or name == "Qt":
                setattr(qt, name, getattr(source, name))
    return qt


# ---- strict stand-ins ------------------------------------------------------------------------------------------
class StrictStandIn:
    """Base of every stand-in: a public member not in DECLARED[its Slicer class] is refused when the class is made."""

    slicerClass = ""
    cppSignals: tuple = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        declared = set()
        for klass in cls.__mro__:
            if "slicerClass" in vars(klass):
                declared |= DECLARED.get(klass.slicerClass, set())
        qtBases = [klass for klass in cls.__mro__ if klass.__module__.startswith("PyQt5")]
        own = {name for name in vars(cls) if not name.startswith("_") and name not in ("slicerClass", "cppSignals")
               and not any(hasattr(base, name) for base in qtBases)}  # overriding a Qt virtual is not a new member
        undeclared = own - declared
        if undeclared:
            raise StandInError(f"{cls.__name__}: {sorted(undeclared)} not declared by Slicer 5.10 / CTK "
                               f"({cls.slicerClass})")


def _qtProperty(kind, name, default=None, notify=None):
    attribute = "_" + name

    def read(self):
        return getattr(self, attribute, default)

    def write(self, value):
        object.__setattr__(self, attribute, value)
    return QtCore.pyqtProperty(kind, read, write) if notify is None else QtCore.pyqtProperty(kind, read, write,
                                                                                              notify=notify)


class qMRMLWidget(QtWidgets.QWidget, StrictStandIn):
    slicerClass = "qMRMLWidget"
    cppSignals = ("mrmlSceneChanged(vtkMRMLScene*)",)
    mrmlSceneChanged = QtCore.pyqtSignal(object)

    def mrmlScene(self):
        return getattr(self, "_scene", None)

    def setMRMLScene(self, scene):
        object.__setattr__(self, "_scene", scene)
        self.mrmlSceneChanged.emit(scene)


class ctkCollapsibleButton(QtWidgets.QAbstractButton, StrictStandIn):
    slicerClass = "ctkCollapsibleButton"
    cppSignals = ("contentsCollapsed(bool)",)
    contentsCollapsed = QtCore.pyqtSignal(bool)
    collapsed = _qtProperty(bool, "collapsed", False)

    def paintEvent(self, event):  # noqa: N802  (QAbstractButton's pure virtual)
        pass

    def setCollapsed(self, collapsed):
        self.setProperty("collapsed", bool(collapsed))


class ctkMenuButton(QtWidgets.QPushButton, StrictStandIn):
    slicerClass = "ctkMenuButton"


class ctkPathLineEdit(QtWidgets.QWidget, StrictStandIn):
    """Keeps its history in QSettings under settingKey, as CTK does (most recent first; shown when none is set)."""

    slicerClass = "ctkPathLineEdit"
    cppSignals = ("currentPathChanged(QString)", "validInputChanged(bool)")
    currentPathChanged = QtCore.pyqtSignal(str)
    validInputChanged = QtCore.pyqtSignal(bool)
    filters = _qtProperty(str, "filters", "")
    nameFilters = _qtProperty("QStringList", "nameFilters", [])

    def _getPath(self):
        return getattr(self, "_path", "")

    def _setPath(self, path):
        if path != self._getPath():
            object.__setattr__(self, "_path", path)
            self.currentPathChanged.emit(path)

    currentPath = QtCore.pyqtProperty(str, _getPath, _setPath)

    def _getKey(self):
        return getattr(self, "_settingKey", "")

    def _setKey(self, key):
        object.__setattr__(self, "_settingKey", key)
        self.retrieveHistory()

    settingKey = QtCore.pyqtProperty(str, _getKey, _setKey)

    def _history(self):
        return list(QtCore.QSettings().value(self._getKey(), []) or []) if self._getKey() else []

    def setCurrentPath(self, path):
        self._setPath(path)

    def retrieveHistory(self):
        history = self._history()
        if history and not self._getPath():
            self._setPath(history[0])

    def addCurrentPathToHistory(self):
        path = self._getPath()
        if not path or not self._getKey():
            return
        history = [path] + [p for p in self._history() if p != path]
        QtCore.QSettings().setValue(self._getKey(), history[:5])


class qMRMLNodeComboBox(qMRMLWidget):
    """Lists the scene's nodes of nodeTypes (and their subclasses only with showChildNodeTypes)."""

    slicerClass = "qMRMLNodeComboBox"
    cppSignals = ("currentNodeChanged(vtkMRMLNode*)", "currentNodeIDChanged(QString)")
    currentNodeChanged = QtCore.pyqtSignal(object)
    currentNodeIDChanged = QtCore.pyqtSignal(str)
    nodeTypes = _qtProperty("QStringList", "nodeTypes", [])
    showChildNodeTypes = _qtProperty(bool, "showChildNodeTypes", True)
    addEnabled = _qtProperty(bool, "addEnabled", True)
    removeEnabled = _qtProperty(bool, "removeEnabled", True)
    renameEnabled = _qtProperty(bool, "renameEnabled", False)
    noneEnabled = _qtProperty(bool, "noneEnabled", False)
    baseName = _qtProperty(str, "baseName", "")

    def nodes(self):
        scene = self.mrmlScene()
        if scene is None:
            return []
        found = []
        for index in range(scene.GetNumberOfNodes()):
            node = scene.GetNthNode(index)
            for nodeType in self.nodeTypes:
                exact = node.GetClassName() == nodeType
                if exact or (self.showChildNodeTypes and node.IsA(nodeType)):
                    found.append(node)
                    break
        return found

    def currentNode(self):
        node = getattr(self, "_current", None)
        if node is not None and (node.GetScene() is None or node.GetScene() is not self.mrmlScene()):
            return None
        return node

    def currentNodeID(self):
        node = self.currentNode()
        return node.GetID() if node is not None else ""

    def setCurrentNode(self, node):
        if node is not None and not any(node is n for n in self.nodes()):
            raise StandInError(f"{node.GetClassName()} is not a node this combo box lists ({self.nodeTypes})")
        if node is not self.currentNode():
            object.__setattr__(self, "_current", node)
            self.currentNodeChanged.emit(node)
            self.currentNodeIDChanged.emit(node.GetID() if node is not None else "")

    def setCurrentNodeID(self, nodeId):
        self.setCurrentNode(self.mrmlScene().GetNodeByID(nodeId) if nodeId else None)


class qMRMLSegmentSelectorWidget(qMRMLWidget):
    slicerClass = "qMRMLSegmentSelectorWidget"
    cppSignals = ("currentNodeChanged(vtkMRMLNode*)", "currentSegmentChanged(QString)")
    currentNodeChanged = QtCore.pyqtSignal(object)
    currentSegmentChanged = QtCore.pyqtSignal(str)
    segmentationNodeSelectorVisible = _qtProperty(bool, "segmentationNodeSelectorVisible", True)
    noneEnabled = _qtProperty(bool, "noneEnabled", False)

    def currentNode(self):
        return getattr(self, "_node", None)

    def setCurrentNode(self, node):
        if node is not self.currentNode():
            object.__setattr__(self, "_node", node)
            self.currentNodeChanged.emit(node)
            self.setCurrentSegmentID(self.segmentIDs()[0] if self.segmentIDs() else "")

    def segmentIDs(self):
        node = self.currentNode()
        if node is None:
            return []
        segmentation = node.GetSegmentation()
        return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]

    def currentSegmentID(self):
        segmentId = getattr(self, "_segment", "")
        return segmentId if segmentId in self.segmentIDs() else ""

    def setCurrentSegmentID(self, segmentId):
        if segmentId and segmentId not in self.segmentIDs():
            raise StandInError(f"no segment {segmentId!r} in the selected segmentation")
        if segmentId != getattr(self, "_segment", ""):
            object.__setattr__(self, "_segment", segmentId)
            self.currentSegmentChanged.emit(segmentId)


class qMRMLSegmentationShow3DButton(ctkMenuButton):
    slicerClass = "qMRMLSegmentationShow3DButton"

    def segmentationNode(self):
        return getattr(self, "_node", None)

    def setSegmentationNode(self, node):
        object.__setattr__(self, "_node", node)


class qMRMLSegmentEditorWidget(qMRMLWidget):
    """Segmentation, source volume, undo states and the segment editor node go through Slicer's real
    vtkSlicerSegmentEditorLogic (slicer-core); records the calls the panel makes on effects, shortcuts, views."""

    slicerClass = "qMRMLSegmentEditorWidget"
    cppSignals = ("segmentationNodeChanged(vtkMRMLSegmentationNode*)", "sourceVolumeNodeChanged(vtkMRMLVolumeNode*)",
                  "currentSegmentIDChanged(QString)")
    segmentationNodeChanged = QtCore.pyqtSignal(object)
    sourceVolumeNodeChanged = QtCore.pyqtSignal(object)
    currentSegmentIDChanged = QtCore.pyqtSignal(str)
    segmentationNodeSelectorVisible = _qtProperty(bool, "segmentationNodeSelectorVisible", True)
    sourceVolumeNodeSelectorVisible = _qtProperty(bool, "sourceVolumeNodeSelectorVisible", True)
    switchToSegmentationsButtonVisible = _qtProperty(bool, "switchToSegmentationsButtonVisible", True)

    def __init__(self, parent=None):
        super().__init__(parent)
        object.__setattr__(self, "_logic", slicer.vtkSlicerSegmentEditorLogic())
        object.__setattr__(self, "_calls", [])  # (member, argument) the panel called, in order
        object.__setattr__(self, "_shortcutsInstalled", False)
        object.__setattr__(self, "_viewsObserved", True)

    def _record(self, member, argument=None):
        self._calls.append((member, argument))

    def setMRMLScene(self, scene):
        self._logic.SetMRMLScene(scene)
        super().setMRMLScene(scene)

    def setMRMLSegmentEditorNode(self, node):
        self._logic.SetSegmentEditorNode(node)
        object.__setattr__(self, "_editorNode", node)

    def mrmlSegmentEditorNode(self):
        return getattr(self, "_editorNode", None)

    def segmentationNode(self):
        node = self.mrmlSegmentEditorNode()
        return node.GetSegmentationNode() if node is not None else None

    def setSegmentationNode(self, node):
        editorNode = self.mrmlSegmentEditorNode()
        if editorNode is None:
            raise StandInError("setSegmentationNode before setMRMLSegmentEditorNode")
        if node is not self.segmentationNode():
            editorNode.SetAndObserveSegmentationNode(node)
            self._logic.SetSegmentationNode(node)
            self.segmentationNodeChanged.emit(node)

    def sourceVolumeNode(self):
        node = self.mrmlSegmentEditorNode()
        return node.GetSourceVolumeNode() if node is not None else None

    def setSourceVolumeNode(self, node):
        editorNode = self.mrmlSegmentEditorNode()
        if node is not self.sourceVolumeNode():
            editorNode.SetAndObserveSourceVolumeNode(node)
            self.sourceVolumeNodeChanged.emit(node)

    def currentSegmentID(self):
        node = self.mrmlSegmentEditorNode()
        return node.GetSelectedSegmentID() or "" if node is not None else ""

    def setCurrentSegmentID(self, segmentId):
        self.mrmlSegmentEditorNode().SetSelectedSegmentID(segmentId or None)
        self.currentSegmentIDChanged.emit(segmentId or "")

    def maximumNumberOfUndoStates(self):
        return self._logic.GetMaximumNumberOfUndoStates()

    def setMaximumNumberOfUndoStates(self, count):
        self._logic.SetMaximumNumberOfUndoStates(int(count))

    def saveStateForUndo(self):
        self._record("saveStateForUndo")
        self._logic.SaveStateForUndo()

    def setActiveEffect(self, effect):
        self._record("setActiveEffect", effect)

    def activeEffect(self):
        return None

    def installKeyboardShortcuts(self, parent=None):
        self._record("installKeyboardShortcuts")
        object.__setattr__(self, "_shortcutsInstalled", True)

    def uninstallKeyboardShortcuts(self):
        self._record("uninstallKeyboardShortcuts")
        object.__setattr__(self, "_shortcutsInstalled", False)

    def setupViewObservations(self):
        self._record("setupViewObservations")
        object.__setattr__(self, "_viewsObserved", True)

    def removeViewObservations(self):
        self._record("removeViewObservations")
        object.__setattr__(self, "_viewsObserved", False)

    def updateWidgetFromMRML(self):
        self._record("updateWidgetFromMRML")

    def setSegmentationNodeSelectorVisible(self, visible):
        self.setProperty("segmentationNodeSelectorVisible", bool(visible))

    def setSourceVolumeNodeSelectorVisible(self, visible):
        self.setProperty("sourceVolumeNodeSelectorVisible", bool(visible))

    def setSwitchToSegmentationsButtonVisible(self, visible):
        self.setProperty("switchToSegmentationsButtonVisible", bool(visible))


STAND_IN_WIDGETS = {cls.__name__: cls for cls in (qMRMLWidget, ctkCollapsibleButton, ctkMenuButton, ctkPathLineEdit,
                                                   qMRMLNodeComboBox, qMRMLSegmentSelectorWidget,
                                                   qMRMLSegmentationShow3DButton, qMRMLSegmentEditorWidget)}


class StrictObject:
    """A non-widget stand-in: only the names given may be read or written."""

    def __init__(self, what: str, allowed: set, **values):
        object.__setattr__(self, "_what", what)
        object.__setattr__(self, "_allowed", set(allowed))
        object.__setattr__(self, "_values", {})
        for name, value in values.items():
            setattr(self, name, value)

    def __getattr__(self, name):
        values = object.__getattribute__(self, "_values")
        if name in values:
            return values[name]
        raise AttributeError(f"{object.__getattribute__(self, '_what')} has no member {name!r}"
                             + ("" if name in object.__getattribute__(self, "_allowed") else
                                " (Slicer 5.10 does not declare it)"))

    def __setattr__(self, name, value):
        if name not in self._allowed:
            raise AttributeError(f"{self._what} has no member {name!r} (Slicer 5.10 does not declare it)")
        self._values[name] = value


# ---- .ui loading (what slicer.util.loadUI does with Qt's QUiLoader and Slicer's widget plugins) ------------------
def _uiValue(element):
    kind = element.tag
    if kind == "string":
        return element.text or ""
    if kind == "bool":
        return element.text == "true"
    if kind == "number":
        return int(element.text)
    if kind == "double":
        return float(element.text)
    if kind == "stringlist":
        return [s.text or "" for s in element.findall("string")]
    if kind in ("enum", "set"):
        return element.text
    if kind == "size":
        return QtCore.QSize(int(element.findtext("width")), int(element.findtext("height")))
    if kind == "rect":
        return QtCore.QRect(*(int(element.findtext(k)) for k in ("x", "y", "width", "height")))
    raise StandInError(f"unhandled .ui property type {kind}")


def _qtEnum(text):
    value = 0
    for part in text.split("|"):
        scope, _, name = part.partition("::")
        owner = QtCore.Qt if scope == "Qt" else None
        if owner is None or not hasattr(owner, name):
            return None
        value |= int(getattr(owner, name))
    return value


def _setUiProperty(widget, element):
    name = element.get("name")
    valueElement = next(iter(element))
    value = _uiValue(valueElement)
    dynamic = element.get("stdset") == "0"
    if dynamic:
        widget.setProperty(name, value)
        return
    if widget.metaObject().indexOfProperty(name) < 0:
        raise StandInError(f"{type(widget).__name__} '{widget.property('objectName')}' has no property {name!r}")
    if valueElement.tag in ("enum", "set"):
        converted = _qtEnum(value)
        if converted is None and isinstance(widget, StrictStandIn):
            widget.setProperty(name, value)  # a CTK flags value kept as written
            return
        value = converted
    if valueElement.tag == "string" and name == "textInteractionFlags":
        value = _qtEnum(value)
    if not widget.setProperty(name, value):
        raise StandInError(f"{type(widget).__name__}.{name} refused {value!r}")


def _buildLayout(element, parent, widgets):
    cls = element.get("class")
    layout = getattr(QtWidgets, cls)()
    layout.setObjectName(element.get("name") or "")
    for item in element.findall("item"):
        child = next(iter(item))
        if child.tag == "widget":
            made = _buildWidget(child, None, widgets)
            if isinstance(layout, QtWidgets.QFormLayout):
                row, column = int(item.get("row")), int(item.get("column"))
                role = QtWidgets.QFormLayout.LabelRole if column == 0 else QtWidgets.QFormLayout.FieldRole
                if item.get("colspan") == "2":
                    role = QtWidgets.QFormLayout.SpanningRole
                layout.setWidget(row, role, made)
            else:
                layout.addWidget(made)
        elif child.tag == "layout":
            inner = _buildLayout(child, None, widgets)
            if isinstance(layout, QtWidgets.QFormLayout):
                row, column = int(item.get("row")), int(item.get("column"))
                role = QtWidgets.QFormLayout.LabelRole if column == 0 else QtWidgets.QFormLayout.FieldRole
                if item.get("colspan") == "2":
                    role = QtWidgets.QFormLayout.SpanningRole
                layout.setLayout(row, role, inner)
            else:
                layout.addLayout(inner)
        elif child.tag == "spacer":
            layout.addStretch(1) if hasattr(layout, "addStretch") else None
    if parent is not None:
        parent.setLayout(layout)
    return layout


def _buildWidget(element, parent, widgets):
    cls = element.get("class")
    if cls in STAND_IN_WIDGETS:
        widget = STAND_IN_WIDGETS[cls](parent)
    elif hasattr(QtWidgets, cls):
        widget = getattr(QtWidgets, cls)(parent)
    else:
        raise StandInError(f"the .ui uses {cls}, which neither Qt nor the harness's Slicer/CTK stand-ins provide")
    name = element.get("name")
    widget.setObjectName(name)
    if name in widgets:
        raise StandInError(f"two widgets named {name}")
    widgets[name] = widget
    for child in element:
        if child.tag == "property":
            _setUiProperty(widget, child)
        elif child.tag == "layout":
            _buildLayout(child, widget, widgets)
        elif child.tag == "widget":
            _buildWidget(child, widget, widgets)
    return widget


_APPLICATION = []  # the one QApplication of the test process, kept alive for every later widget


def qtApplication():
    """Qt aborts the process when a widget is built before a QApplication exists: make sure one does."""
    if not _APPLICATION:
        _APPLICATION.append(QtWidgets.QApplication.instance() or QtWidgets.QApplication(["Slicer"]))
    return _APPLICATION[0]


def loadUI(path):
    qtApplication()
    root = ElementTree.parse(path).getroot()
    widgets: dict[str, QtWidgets.QWidget] = {}
    top = _buildWidget(root.find("widget"), None, widgets)
    for connection in root.iter("connection"):
        sender, receiver = widgets.get(connection.findtext("sender")), widgets.get(connection.findtext("receiver"))
        if sender is None or receiver is None:
            raise StandInError(f".ui connection names a widget that does not exist: {connection.findtext('sender')} "
                               f"-> {connection.findtext('receiver')}")
        slotName, _ = _signature(connection.findtext("slot"))
        if not hasattr(receiver, slotName):
            raise StandInError(f"{type(receiver).__name__} has no slot {connection.findtext('slot')}")
        _boundSignal(sender, connection.findtext("signal")).connect(getattr(receiver, slotName))
    object.__setattr__(top, "_uiWidgets", widgets)
    return top


def childWidgetVariables(widget):
    ui = types.SimpleNamespace()
    for name, child in widget._uiWidgets.items():
        setattr(ui, name, child)
    return ui


# ---- parameterNodeWrapper (Slicer 5.10's members; values kept in the real vtkMRMLScriptedModuleNode) ---------------
def parameterNodeWrapper(cls):
    hints = typing.get_type_hints(cls)
    defaults = {name: getattr(cls, name) for name in hints if hasattr(cls, name)}
    reserved = PARAMETER_WRAPPER_510 & set(vars(cls))
    if reserved:
        raise ValueError(f"Cannot use reserved name {sorted(reserved)} in a parameterNodeWrapper")

    class Wrapper:
        __slots__ = ("parameterNode", "_guis", "_nextTag")
        allParameters = hints

        def __init__(self, parameterNode):
            object.__setattr__(self, "parameterNode", parameterNode)
            object.__setattr__(self, "_guis", {})
            object.__setattr__(self, "_nextTag", 0)
            for name, kind in hints.items():
                if not _isNodeType(kind) and not parameterNode.GetParameter(name):
                    self._write(name, defaults.get(name, kind()))

        def _write(self, name, value):
            kind = hints[name]
            if _isNodeType(kind):
                if value is not None and not value.IsA(kind.__name__):
                    raise ValueError(f"{name} must be a {kind.__name__}, not {value.GetClassName()}")
                self.parameterNode.SetNodeReferenceID(name, value.GetID() if value is not None else None)
            else:
                self.parameterNode.SetParameter(name, repr(kind(value)) if kind is not str else str(value))

        def _read(self, name):
            kind = hints[name]
            if _isNodeType(kind):
                return self.parameterNode.GetNodeReference(name)
            text = self.parameterNode.GetParameter(name)
            return text if kind is str else kind(eval(text))  # noqa: S307  (values this wrapper wrote)

        def __getattr__(self, name):
            if name in hints:
                return self._read(name)
            raise AttributeError(f"parameter node wrapper has no member {name!r}")

        def __setattr__(self, name, value):
            if name not in hints:
                raise AttributeError(f"parameter node wrapper has no parameter {name!r}")
            self._write(name, value)
            for connectors in self._guis.values():
                if name in connectors:
                    connectors[name][0](value)

        def StartModify(self):  # noqa: N802
            return self.parameterNode.StartModify()

        def EndModify(self, wasModifying):  # noqa: N802
            return self.parameterNode.EndModify(wasModifying)

        def AddObserver(self, event, callback, priority=0.0):  # noqa: N802
            return self.parameterNode.AddObserver(event, callback, priority)

        def RemoveObserver(self, tag):  # noqa: N802
            return self.parameterNode.RemoveObserver(tag)

        def Modified(self):  # noqa: N802
            return self.parameterNode.Modified()

        def getValue(self, name):
            return self._read(name)

        def setValue(self, name, value):
            setattr(self, name, value)

        def connectGui(self, gui):
            widgets = {}
            for widget in vars(gui).values():
                name = widget.property("SlicerParameterName")
                if name:
                    widgets[name] = widget
            return self.connectParametersToGui(widgets)

        def connectParametersToGui(self, mapping):
            tag = self._nextTag
            object.__setattr__(self, "_nextTag", tag + 1)
            connectors = {}
            for name, widget in mapping.items():
                if name not in hints:
                    raise ValueError(f"the GUI names an unknown parameter {name!r}")
                connectors[name] = _connector(self, name, widget)
                connectors[name][0](self._read(name))
            self._guis[tag] = connectors
            return tag

        def disconnectGui(self, tag):
            for name, (_, disconnect) in self._guis.pop(tag, {}).items():
                disconnect()

    Wrapper.__name__ = cls.__name__
    return Wrapper


def _isNodeType(kind):
    return isinstance(kind, type) and kind.__name__.startswith("vtkMRML")


def _connector(wrapper, name, widget):
    """(write value to widget, disconnect): the node combo box and check box connectors Slicer 5.10 has."""
    if isinstance(widget, qMRMLNodeComboBox):
        def toParameter(node):
            if wrapper._read(name) is not node:
                wrapper._write(name, node)
        widget.currentNodeChanged.connect(toParameter)
        return (lambda node: widget.setCurrentNode(node)), (lambda: widget.currentNodeChanged.disconnect(toParameter))
    if isinstance(widget, QtWidgets.QCheckBox):
        def toParameter(checked):
            if wrapper._read(name) != checked:
                wrapper._write(name, bool(checked))
        widget.toggled.connect(toParameter)
        return (lambda value: widget.setChecked(bool(value))), (lambda: widget.toggled.disconnect(toParameter))
    raise StandInError(f"no parameter connector for {type(widget).__name__}")


# ---- slicer.ScriptedLoadableModule -----------------------------------------------------------------------------
def scriptedLoadableModuleModule(session: "PanelSession") -> types.ModuleType:
    module = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent
            self.moduleName = self.__class__.__name__

        def resourcePath(self, filename):
            return str(session.moduleFile.parent / "Resources" / filename)

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.moduleName = self.__class__.__name__
            if self.moduleName.endswith("Widget"):
                self.moduleName = self.moduleName[:-6]
            self.developerMode = False
            self.parent = parent
            self.layout = self.parent.layout()

        def resourcePath(self, filename):
            return str(session.moduleFile.parent / "Resources" / filename)

        def setup(self):
            pass

        def cleanup(self):
            pass

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.moduleName = self.__class__.__name__
            if self.moduleName.endswith("Logic"):
                self.moduleName = self.moduleName[:-5]
            self.isSingletonParameterNode = True

        def getParameterNode(self):
            scene = slicer.mrmlScene
            node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node is None:
                node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
                node.UnRegister(None)
                node.SetSingletonTag(self.moduleName)
                node.SetAttribute("ModuleName", self.moduleName)
                node.SetName(scene.GenerateUniqueName(self.moduleName))
                node = scene.AddNode(node)
            return node

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, requestedDelay=None, msec=None):
            session.messages.append(message)

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic):
        extra = {n for n in vars(cls) if not n.startswith("_")} - SCRIPTED_MODULE_510[cls.__name__]
        assert not extra, (cls.__name__, extra)
        setattr(module, cls.__name__, cls)
    module.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
    return module


# ---- a Slicer session ----------------------------------------------------------------------------------------------
class PanelSession:
    """Slicer's application as far as the module sees it: scene, logics, main window, slicer.* stand-ins.

    ``with PanelSession(tmp_path) as session: widget = session.loadModule()`` imports SegMoTESlicer.py the way
    Slicer does (a fresh module object each load, so loading twice is a module reload)."""

    def __init__(self, settingsFolder, confirmInstall=True):
        self.settingsFolder = str(settingsFolder)
        self.confirmInstall = confirmInstall
        self.messages: list[str] = []
        self.confirmations: list[str] = []
        self.errors: list[str] = []
        self.moduleFile = MODULE_DIR / "SegMoTESlicer.py"
        self._saved: dict[str, object] = {}
        self._savedAttributes: dict[str, object] = {}

    # -- set-up / tear-down
    def __enter__(self):
        self.application = qtApplication()
        QtCore.QCoreApplication.setOrganizationName("SegMoTE harness")
        QtCore.QCoreApplication.setApplicationName("Slicer")
        QtCore.QSettings.setDefaultFormat(QtCore.QSettings.IniFormat)
        QtCore.QSettings.setPath(QtCore.QSettings.IniFormat, QtCore.QSettings.UserScope, self.settingsFolder)
        self.mainWindow = QtWidgets.QMainWindow()
        self.mainWindow.setObjectName("qSlicerMainWindow")
        self.scene = slicer.vtkMRMLScene()
        self.applicationLogic = slicer.vtkSlicerApplicationLogic()
        self.applicationLogic.SetMRMLScene(self.scene)
        self.logics = moduleLogics(self.scene, self.applicationLogic)
        self.markupsLogic = self.logics["Markups"]
        self.interactionNode = self.applicationLogic.GetInteractionNode()
        self.selectionNode = self.applicationLogic.GetSelectionNode()
        self.sliceLogic = slicer.vtkMRMLSliceLogic()
        self.sliceLogic.SetMRMLApplicationLogic(self.applicationLogic)
        self.sliceLogic.SetMRMLScene(self.scene)
        self.redSliceNode = self.sliceLogic.AddSliceNode("Red")
        self._installModules()
        slotErrors.clear()
        return self

    def __exit__(self, *exc):
        for widget in getattr(self, "widgets", []):
            if not getattr(widget, "_cleanedUp", False):
                widget.cleanup()
        for name, module in self._saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        for name, value in self._savedAttributes.items():
            if value is _MISSING:
                if hasattr(slicer, name):
                    delattr(slicer, name)
            else:
                setattr(slicer, name, value)
        self.mainWindow.deleteLater()
        self.sliceLogic.SetMRMLScene(None)
        for logic in self.logics.values():
            logic.SetMRMLScene(None)
        self.scene.Clear(1)
        return False

    def _setModule(self, name, module):
        self._saved.setdefault(name, sys.modules.get(name))
        sys.modules[name] = module

    def _setSlicer(self, name, value):
        self._savedAttributes.setdefault(name, getattr(slicer, name, _MISSING))
        setattr(slicer, name, value)

    def _installModules(self):
        self._setModule("qt", qtModule())
        ctk = types.ModuleType("ctk")
        for name in ("ctkCollapsibleButton", "ctkPathLineEdit", "ctkMenuButton"):
            setattr(ctk, name, STAND_IN_WIDGETS[name])
        self._setModule("ctk", ctk)
        self._setModule("slicer.util", self._utilModule())
        self._setModule("slicer.ScriptedLoadableModule", scriptedLoadableModuleModule(self))
        wrapperModule = types.ModuleType("slicer.parameterNodeWrapper")
        wrapperModule.parameterNodeWrapper = parameterNodeWrapper
        self._setModule("slicer.parameterNodeWrapper", wrapperModule)
        i18n = types.ModuleType("slicer.i18n")
        i18n.tr = lambda text: text
        i18n.translate = lambda context, text: text
        self._setModule("slicer.i18n", i18n)
        self._setSlicer("util", sys.modules["slicer.util"])
        self._setSlicer("mrmlScene", self.scene)
        self._setSlicer("app", StrictObject("slicer.app (qSlicerApplication)", DECLARED["qSlicerApplication"],
                                            applicationLogic=lambda: self.applicationLogic,
                                            processEvents=QtWidgets.QApplication.processEvents,
                                            mainWindow=lambda: self.mainWindow, majorVersion=5, minorVersion=10))
        markups = StrictObject("slicer.modules.markups", {"logic", "name", "title"},
                               logic=lambda: self.markupsLogic, name="Markups", title="Markups")
        self._setSlicer("modules", StrictObject("slicer.modules", {"markups", "segmentations", "segmoteslicer"},
                                                markups=markups))

    def _utilModule(self):
        session = self
        util = types.ModuleType("slicer.util")
        overrides = {
            "loadUI": loadUI,
            "childWidgetVariables": childWidgetVariables,
            "mainWindow": lambda verbose=True: session.mainWindow,
            "confirmOkCancelDisplay": lambda text, windowTitle=None, parent=None, **kw:
                session.confirmations.append(text) or session.confirmInstall,
            "errorDisplay": lambda text, windowTitle=None, parent=None, standardButtons=None, **kw:
                session.errors.append(text),
            "settingsValue": lambda key, default, converter=lambda v: v, settings=None:
                converter(QtCore.QSettings().value(key, default)),
        }

        def __getattr__(name):
            if name not in SLICER_UTIL_510:
                raise AttributeError(f"slicer.util has no {name!r} in Slicer 5.10")
            if name in overrides:
                return overrides[name]
            if name in ("launchConsoleProcess", "pip_install", "logProcessOutput", "delayDisplay", "messageBox",
                        "infoDisplay", "warningDisplay", "confirmYesNoDisplay", "createProgressDialog"):
                raise AttributeError(f"the harness does not run slicer.util.{name} (it needs Slicer's application)")
            return getattr(slicerCoreUtil, name)

        util.__getattr__ = __getattr__
        return util

    # -- the module
    def loadModule(self, logicFactory=None):
        """Import SegMoTESlicer.py as Slicer does (module, then widget: setup()); returns the widget."""
        spec = importlib.util.spec_from_file_location("SegMoTESlicer", self.moduleFile)
        module = importlib.util.module_from_spec(spec)
        if str(MODULE_DIR) not in sys.path:
            sys.path.insert(0, str(MODULE_DIR))
        self._setModule("SegMoTESlicer", module)
        spec.loader.exec_module(module)
        if logicFactory is not None:
            module.SegMoTESlicerLogic = logicFactory
        moduleParent = StrictObject("qSlicerScriptedLoadableModule", DECLARED["qSlicerScriptedLoadableModule"])
        self.module = module
        self.moduleObject = module.SegMoTESlicer(moduleParent)
        self.moduleParent = moduleParent
        panel = ModulePanel()
        self.panel = panel
        widget = module.SegMoTESlicerWidget(panel)
        widget.setup()
        self.widgets = getattr(self, "widgets", []) + [widget]
        return widget

    def enter(self, widget):
        self.panel.setProperty("isEntered", True)
        widget.enter()

    def exit(self, widget):
        widget.exit()
        self.panel.setProperty("isEntered", False)

    def reload(self, widget, logicFactory=None):
        """Slicer's Reload: cleanup() of the old widget, then the file is imported again and a new widget set up."""
        self.exit(widget)
        widget.cleanup()
        widget._cleanedUp = True
        return self.loadModule(logicFactory)

    def shortcuts(self):
        return {s.property("key").toString(): s for s in self.mainWindow.findChildren(QtWidgets.QShortcut)
                if s.isEnabled()}

    def shortcutCounts(self):
        counts: dict[str, int] = {}
        for shortcut in self.mainWindow.findChildren(QtWidgets.QShortcut):
            if shortcut.isEnabled() and shortcut.parent() is self.mainWindow:
                key = shortcut.property("key").toString()
                counts[key] = counts.get(key, 0) + 1
        return counts

    def press(self, keys: str):
        """A key sequence as the main window's QShortcut delivers it (activated())."""
        matching = [s for s in self.mainWindow.findChildren(QtWidgets.QShortcut)
                    if s.isEnabled() and s.parent() is self.mainWindow
                    and s.property("key") == QtGui.QKeySequence(keys)]
        if len(matching) != 1:
            raise AssertionError(f"{keys}: {len(matching)} shortcuts bound (Qt fires none unless exactly one is)")
        matching[0].activated.emit()


class ModulePanel(QtWidgets.QWidget, StrictStandIn):
    """The widget Slicer gives a scripted module's widget as `parent` (qSlicerScriptedLoadableModuleWidget)."""

    slicerClass = "qSlicerScriptedLoadableModuleWidget"
    isEntered = _qtProperty(bool, "isEntered", False)

    def __init__(self):
        super().__init__()
        self.setLayout(QtWidgets.QVBoxLayout())


_MISSING = object()


def processEvents(seconds: float = 0.0):
    """Let Qt deliver timers and queued events for `seconds` (the panel polls jobs from a QTimer)."""
    QtTest.QTest.qWait(int(seconds * 1000)) if seconds else QtWidgets.QApplication.processEvents()
