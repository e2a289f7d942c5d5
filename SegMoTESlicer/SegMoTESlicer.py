"""SegMoTE for 3D Slicer: Segment-Anything-based interactive and automatic segmentation.

This file holds the Slicer-facing parts only: the module description, the parameter node, the panel (thin: it
turns clicks into calls of the GUI-free ``SegMoTESlicerLib.logic.SegMoTESlicerLogic``) and the self-test.
It is about 650 lines because a Qt panel is long to build by hand (Slicer's scripted modules keep the widget in
the module file); no logic is decided here.
"""

from __future__ import annotations

import logging

import ctk  # noqa: F401  (loads the CTK widgets the .ui file uses)
import qt
import slicer
import vtk
from slicer import (
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLMarkupsROINode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
)
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from SegMoTESlicerLib import catalogue, dependencies
from SegMoTESlicerLib.logic import SegMoTESlicerLogic
from SegMoTESlicerLib.prompts import PromptController
from SegMoTESlicerLib.worker import POLL_INTERVAL_MS, POLL_WAIT_S
from segmote_core.errors import Cancelled, SegMoTEError
from segmote_core.toolbox import one_line

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer before 5.4
    def _(text):
        return text

# Keys while the module is shown. None of them is a slice-view key (b/f browse slices, v, r, g, t, [ ] { }). The
# embedded Segment Editor's own keys (its Esc, z, Ctrl+Z, 1-9, ...) are not installed here: two shortcuts on one
# key are ambiguous and Qt fires neither.
SHORTCUTS = (("P", ("place", "positive")), ("N", ("place", "negative")), ("Shift+B", ("place", "box")),
             ("Esc", "onCancel"), ("Ctrl+Z", "onUndo"))
SETTINGS_GROUP = "SegMoTE"  # QSettings keys: what the user chose last time (model, device, intensities, adapter)
UNDO_STATES = 10  # the Segment Editor's undo depth, as Slicer's Segment Editor module sets it
ADAPTER_NONE, ADAPTER_FILE = "", "file"  # the adapter list's first and last entries; shipped adapters by name


#
# Module
#
class SegMoTESlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SegMoTE")
        self.parent.categories = [_("Segmentation")]
        self.parent.dependencies = ["Markups", "Segmentations"]
        self.parent.contributors = ["SegMoTE contributors"]
        self.parent.helpText = _(
            "Segment with Segment-Anything models (LiteMedSAM, SAM ViT-B/L/H) and SegMoTE adapters: draw a box "
            "(Shift+B) or place include/exclude points (P/N) in any slice view and the segment updates on that slice; "
            "Propagate 3D follows the object through the volume; Auto segment makes one segment per adapter class; "
            "Ctrl+Z undoes the last AI edit; Esc ends place mode or cancels a run. See the "
            "<a href='https://github.com/segmote/SegMoTE/blob/main/docs/slicer.md'>documentation</a>.")
        self.parent.acknowledgementText = _(
            "Built on Segment Anything (Meta AI), MedSAM / LiteMedSAM (Bo Wang lab) and 3D Slicer.")


#
# Parameter node
#
@parameterNodeWrapper
class SegMoTESlicerParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    positivePoints: vtkMRMLMarkupsFiducialNode
    negativePoints: vtkMRMLMarkupsFiducialNode
    box: vtkMRMLMarkupsROINode
    autoUpdate: bool = True
    overwriteOtherSegments: bool = False
    sliceOnly: bool = False
    model: str = catalogue.SHIPPED_MODEL
    device: str = "auto"


class SegMoTESlicerModuleLogic(ScriptedLoadableModuleLogic):
    """Only the parameter node; all the work is in the GUI-free SegMoTESlicerLib.logic.SegMoTESlicerLogic."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.moduleName = "SegMoTESlicer"

    def getParameterNode(self):
        return SegMoTESlicerParameterNode(super().getParameterNode())

    def segmentEditorNode(self):
        """The module's own Segment Editor state (so the Segment Editor module's choices stay its own)."""
        node = slicer.mrmlScene.GetSingletonNode("SegMoTE", "vtkMRMLSegmentEditorNode")
        if node is None:
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLSegmentEditorNode")
            node.UnRegister(None)
            node.SetSingletonTag("SegMoTE")
            node = slicer.mrmlScene.AddNode(node)
        return node


#
# Widget
#
class SegMoTESlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Thin: buttons, shortcuts and the timer are forwarded to the GUI-free PromptController and Logic."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: SegMoTESlicerLogic | None = None
        self.controller: PromptController | None = None
        self.moduleLogic: SegMoTESlicerModuleLogic | None = None
        self._parameterNode: SegMoTESlicerParameterNode | None = None
        self._parameterNodeGuiTag = None
        self._job = None  # automatic segmentation (prompt jobs belong to the controller)
        self._downloadJob = None
        self._shortcuts = []
        self._dependenciesReady = False
        self._installCancelled = False
        self._timer = None
        self._markupsStateOnEnter = None  # Slicer's place-mode state when the module was entered, restored on exit

    # ---- set-up -----------------------------------------------------------------------------------------
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SegMoTESlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SegMoTESlicerLogic(tuneAllocator=False)
        self.moduleLogic = SegMoTESlicerModuleLogic()
        applicationLogic = slicer.app.applicationLogic()
        self.controller = PromptController(
            self.logic, slicer.mrmlScene, slicer.modules.markups.logic(), applicationLogic.GetInteractionNode(),
            applicationLogic.GetSelectionNode(), target=self.promptTarget, onNodesChanged=self.onPromptNodesChanged,
            onRunStarted=self.onPromptRunStarted, onRunFinished=self.onPromptRunFinished,
            beforeApply=self.saveEditorUndoState)

        for name, label in catalogue.MODELS.items():
            self.ui.modelComboBox.addItem(label, name)
        for mode, label in catalogue.INTENSITY_MODES.items():
            self.ui.intensityComboBox.addItem(label, mode)
        self.ui.adapterComboBox.addItem(_("None (base model)"), ADAPTER_NONE)
        for name in catalogue.shippedAdapters():
            self.ui.adapterComboBox.addItem(name + _(" (shipped)"), name)
        self.ui.adapterComboBox.addItem(_("Adapter file…"), ADAPTER_FILE)
        self.ui.adapterComboBox.connect("currentIndexChanged(int)", self.onAdapterChoiceChanged)
        self.ui.intensityComboBox.connect("currentIndexChanged(int)", self.onIntensityModeChanged)
        self.onIntensityModeChanged()
        self.refreshDevices()
        self.restoreSettings()
        self.onAdapterChoiceChanged()
        self.ui.progressBar.hide()
        self.ui.cancelButton.enabled = False
        editor = self.ui.segmentEditorWidget
        editor.setMRMLScene(slicer.mrmlScene)
        editor.setMRMLSegmentEditorNode(self.moduleLogic.segmentEditorNode())
        editor.setMaximumNumberOfUndoStates(UNDO_STATES)
        # One selection: the panel's volume and segmentation selectors drive the editor (as MONAI Label does).
        editor.setSegmentationNodeSelectorVisible(False)
        editor.setSourceVolumeNodeSelectorVisible(False)
        editor.setSwitchToSegmentationsButtonVisible(False)
        editor.connect("segmentationNodeChanged(vtkMRMLSegmentationNode*)", self.onEditorSegmentationChanged)
        editor.connect("sourceVolumeNodeChanged(vtkMRMLVolumeNode*)", self.onEditorSourceVolumeChanged)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)

        self.ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSegmentationChanged)
        self.ui.segmentSelector.connect("currentSegmentChanged(QString)", self.onTargetSegmentChanged)
        self.ui.newSegmentButton.connect("toggled(bool)", self.onTargetSegmentChanged)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.intensityComboBox.connect("currentIndexChanged(int)", self.saveSettings)
        self.ui.autoUpdateCheckBox.connect("toggled(bool)", self.onAutoUpdateToggled)
        self.ui.positivePlaceButton.connect("clicked()", lambda: self.startPlacing("positive"))
        self.ui.negativePlaceButton.connect("clicked()", lambda: self.startPlacing("negative"))
        self.ui.boxPlaceButton.connect("clicked()", lambda: self.startPlacing("box"))
        self.ui.segmentButton.connect("clicked(bool)", self.onSegment)
        self.ui.propagateButton.connect("clicked(bool)", self.onPropagate)
        self.ui.undoButton.connect("clicked(bool)", self.onUndo)
        self.ui.clearPromptsButton.connect("clicked(bool)", self.onClearPrompts)
        self.ui.autoSegmentButton.connect("clicked(bool)", self.onAutoSegment)
        self.ui.downloadButton.connect("clicked(bool)", self.onDownload)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)

        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onTimer)

        self.initializeParameterNode()

    def cleanup(self):
        """Module reload or Slicer closing: nothing of this widget may keep running or observing."""
        self.removeShortcuts()
        self.removeObservers()
        if self._timer is not None:
            self._timer.stop()
        if self.controller is not None:
            self.controller.deactivate()
        self.shutDownEditor()
        self.restoreMarkupsState()
        if self.logic is not None:
            self.logic.shutdown()

    def enter(self):
        self.saveMarkupsState()
        self.initializeParameterNode()
        self.controller.ensureNodes()  # the place buttons work from the start
        self.controller.activate()
        self.installShortcuts()

    def exit(self):
        self.removeShortcuts()
        self.controller.deactivate()
        self.shutDownEditor()
        self.restoreMarkupsState()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def shutDownEditor(self):
        """What Slicer's Segment Editor module does on exit: no effect left active, no keys, no view observers."""
        editor = self.ui.segmentEditorWidget
        editor.setActiveEffect(None)
        editor.uninstallKeyboardShortcuts()
        editor.removeViewObservations()

    def saveMarkupsState(self):
        """Place-mode persistence and the active place list are application-wide: remember them on enter."""
        applicationLogic = slicer.app.applicationLogic()
        interaction, selection = applicationLogic.GetInteractionNode(), applicationLogic.GetSelectionNode()
        self._markupsStateOnEnter = (interaction.GetPlaceModePersistence(), selection.GetActivePlaceNodeID(),
                                     selection.GetActivePlaceNodeClassName())

    def restoreMarkupsState(self):
        if self._markupsStateOnEnter is None:
            return
        persistence, activeId, activeClass = self._markupsStateOnEnter
        self._markupsStateOnEnter = None
        applicationLogic = slicer.app.applicationLogic()
        interaction, selection = applicationLogic.GetInteractionNode(), applicationLogic.GetSelectionNode()
        interaction.SetPlaceModePersistence(persistence)
        if activeId and slicer.mrmlScene.GetNodeByID(activeId) is None:
            activeId = None  # the list the user had active was deleted meanwhile
        selection.SetActivePlaceNodeID(activeId)
        if activeClass:
            selection.SetActivePlaceNodeClassName(activeClass)

    def onSceneStartClose(self, caller, event):
        self.controller.cancel()
        if self._job is not None:
            self._job.cancel()
        self.controller.setNodes()
        self.logic.clearUndo()
        self.setParameterNode(None)
        editor = self.ui.segmentEditorWidget
        editor.setSegmentationNode(None)
        editor.removeViewObservations()

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()
            self.controller.ensureNodes()

    def onSceneEndImport(self, caller, event):
        """A loaded scene (.mrb) brings its own SegMoTE parameter node, merged into ours: follow its prompt
        nodes, not the ones from before the load (while hidden, enter() reads them)."""
        if self.parent.isEntered:
            self.setParameterNode(self.moduleLogic.getParameterNode())
            self.controller.ensureNodes()

    # ---- parameter node -----------------------------------------------------------------------------------
    def initializeParameterNode(self):
        # New scene (a closed scene's singleton parameter node is reset, not removed): no model stored yet.
        rawNode = ScriptedLoadableModuleLogic.getParameterNode(self.moduleLogic)
        fresh = not rawNode.GetParameter("model")
        parameterNode = SegMoTESlicerParameterNode(rawNode)
        if fresh:  # a new scene starts with the model and device chosen last time (before the GUI shows the node)
            settings = qt.QSettings()
            model = settings.value(f"{SETTINGS_GROUP}/model", "")
            if model in catalogue.MODELS:
                parameterNode.model = model
            device = settings.value(f"{SETTINGS_GROUP}/device", "")
            if device and self.ui.deviceComboBox.findText(device) >= 0:
                parameterNode.device = device
        self.setParameterNode(parameterNode)
        if not self._parameterNode.inputVolume:
            volume = self.shownVolume()
            if volume:
                self._parameterNode.inputVolume = volume

    @staticmethod
    def shownVolume():
        """The volume the user looks at: a slice view's background, else the first scalar volume that is not a
        label map (a label map is a vtkMRMLScalarVolumeNode too)."""
        scene = slicer.mrmlScene
        composites = [scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
                      for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))]
        for composite in sorted(composites, key=lambda node: node.GetLayoutName() != "Red"):
            volume = scene.GetNodeByID(composite.GetBackgroundVolumeID() or "")
            if volume is not None and volume.IsA("vtkMRMLScalarVolumeNode") and \
                    not volume.IsA("vtkMRMLLabelMapVolumeNode"):
                return volume
        for index in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
            volume = scene.GetNthNodeByClass(index, "vtkMRMLScalarVolumeNode")
            if not volume.IsA("vtkMRMLLabelMapVolumeNode"):
                return volume
        return None

    def setParameterNode(self, parameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
            p = self._parameterNode
            self.controller.setNodes(p.positivePoints, p.negativePoints, p.box)
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None):
        p = self._parameterNode
        if p is None:
            return
        index = self.ui.modelComboBox.findData(p.model)
        if index >= 0 and index != self.ui.modelComboBox.currentIndex:
            self.ui.modelComboBox.currentIndex = index
        index = self.ui.deviceComboBox.findText(p.device)
        if index >= 0 and index != self.ui.deviceComboBox.currentIndex:
            self.ui.deviceComboBox.currentIndex = index
        self.ui.segmentSelector.setCurrentNode(p.segmentation)
        self.ui.show3DButton.setSegmentationNode(p.segmentation)
        editor = self.ui.segmentEditorWidget
        if editor.segmentationNode() is not p.segmentation:
            editor.setSegmentationNode(p.segmentation)
        if editor.sourceVolumeNode() is not p.inputVolume:
            editor.setSourceVolumeNode(p.inputVolume)
        self.controller.autoUpdate = bool(p.autoUpdate)
        self.updateButtons()

    def updateButtons(self):
        p = self._parameterNode
        busy = self._job is not None or self.controller.busy
        ready = p is not None and p.inputVolume is not None
        for button in (self.ui.segmentButton, self.ui.propagateButton, self.ui.autoSegmentButton):
            button.enabled = ready and not busy
        self.ui.undoButton.enabled = p is not None and self.logic.canUndo(p.segmentation) and not busy
        self.ui.cancelButton.enabled = busy or self._downloadJob is not None
        model = self.ui.modelComboBox.currentData
        downloaded = catalogue.weightsAvailable(model)
        self.ui.downloadButton.enabled = not downloaded and self._downloadJob is None
        if self._downloadJob is None:
            shipped = not catalogue.needsDownload(model)
            self.ui.downloadButton.text = _("Downloaded") if downloaded and not shipped else _("Download")

    def onSegmentationChanged(self, node):
        self.ui.segmentSelector.setCurrentNode(node)
        self.ui.show3DButton.setSegmentationNode(node)
        self.onTargetSegmentChanged()

    def onTargetSegmentChanged(self, *args):
        target = None if self.ui.newSegmentButton.checked else (self.ui.segmentSelector.currentSegmentID() or None)
        if target != self.controller.segmentId:
            # New, or another segment chosen: a new object, so the previous object's prompts go (after a result
            # the controller already holds the segment it wrote, and nothing is cleared)
            self.controller.clearPrompts()
        self.controller.segmentId = target
        editor = self.ui.segmentEditorWidget
        if self.controller.segmentId and editor.segmentationNode() is not None:
            editor.setCurrentSegmentID(self.controller.segmentId)  # paint corrects the segment SegMoTE writes
        self.updateButtons()

    def onEditorSegmentationChanged(self, node):
        """The editor's segmentation changed elsewhere (e.g. its node was edited by a script): SegMoTE follows,
        so the panel never writes into another segmentation than the one the editor edits."""
        p = self._parameterNode
        if p is not None and node is not None and p.segmentation is not node:
            p.segmentation = node

    def onEditorSourceVolumeChanged(self, node):
        p = self._parameterNode
        if p is not None and node is not None and p.inputVolume is not node and \
                node.IsA("vtkMRMLScalarVolumeNode") and not node.IsA("vtkMRMLLabelMapVolumeNode"):
            p.inputVolume = node

    def onIntensityModeChanged(self, index=None):
        custom = self.ui.intensityComboBox.currentData == "custom"
        self.ui.customLevelSpinBox.enabled = self.ui.customWidthSpinBox.enabled = custom

    def onAutoUpdateToggled(self, checked):
        self.controller.autoUpdate = bool(checked)

    def onModelChanged(self, index=None):
        if self._parameterNode is not None:
            self._parameterNode.model = self.ui.modelComboBox.currentData
        self.saveSettings()
        self.updateButtons()

    def onDeviceChanged(self, index=None):
        if self._parameterNode is not None:
            self._parameterNode.device = self.ui.deviceComboBox.currentText
        self.saveSettings()

    def onAdapterChoiceChanged(self, index=None):
        choice = self.ui.adapterComboBox.currentData
        self.ui.adapterPathLineEdit.enabled = self.ui.adapterFileLabel.enabled = choice == ADAPTER_FILE
        self.saveSettings()

    def adapterPath(self):
        """The chosen adapter: a shipped adapter's file, the file typed in, or None."""
        choice = self.ui.adapterComboBox.currentData
        if choice == ADAPTER_FILE:
            return self.ui.adapterPathLineEdit.currentPath or None
        return catalogue.shippedAdapters().get(choice) if choice else None

    # ---- remembered choices (QSettings, as Slicer's other AI modules keep theirs) ---------------------------------
    def restoreSettings(self):
        settings = qt.QSettings()
        self._restoringSettings = True
        try:
            for combo, key in ((self.ui.modelComboBox, "model"), (self.ui.intensityComboBox, "intensityMode"),
                               (self.ui.adapterComboBox, "adapter")):
                index = combo.findData(settings.value(f"{SETTINGS_GROUP}/{key}", ""))
                if index >= 0:
                    combo.currentIndex = index
            index = self.ui.deviceComboBox.findText(settings.value(f"{SETTINGS_GROUP}/device", ""))
            if index >= 0:
                self.ui.deviceComboBox.currentIndex = index
        finally:
            self._restoringSettings = False

    def saveSettings(self, *args):
        if getattr(self, "_restoringSettings", False):
            return
        settings = qt.QSettings()
        settings.setValue(f"{SETTINGS_GROUP}/model", self.ui.modelComboBox.currentData or "")
        settings.setValue(f"{SETTINGS_GROUP}/device", self.ui.deviceComboBox.currentText or "")
        settings.setValue(f"{SETTINGS_GROUP}/intensityMode", self.ui.intensityComboBox.currentData or "")
        settings.setValue(f"{SETTINGS_GROUP}/adapter", self.ui.adapterComboBox.currentData or "")

    def refreshDevices(self):
        current = self.ui.deviceComboBox.currentText or "auto"
        self.ui.deviceComboBox.clear()
        for device in catalogue.availableDevices():
            self.ui.deviceComboBox.addItem(device)
        index = self.ui.deviceComboBox.findText(current)
        self.ui.deviceComboBox.currentIndex = max(index, 0)

    # ---- prompts (forwarded to the controller) -------------------------------------------------------------
    def onPromptNodesChanged(self, nodes):
        p = self._parameterNode
        if p is None:
            return
        p.positivePoints, p.negativePoints, p.box = nodes["positive"], nodes["negative"], nodes["box"]

    def startPlacing(self, kind):
        if self._parameterNode is None or not self.ensureDependencies():
            return
        self.applySettings()
        self.controller.startPlacing(kind)

    def promptTarget(self):
        """(volume, segmentation) for the next prompt run; None, None when a run may not start now."""
        p = self._parameterNode
        if p is None or self._job is not None or not self.ensureDependencies():
            return None, None
        self.applySettings()
        if p.inputVolume is None:
            self.showStatus(_("Select an input volume first."))
            return None, None
        return p.inputVolume, self.ensureSegmentation()

    def onPromptRunStarted(self, job):
        self.startedJob(_("Segmenting…"))

    def onPromptRunFinished(self, jobOrError):
        error = getattr(jobOrError, "error", jobOrError)
        if error is not None and not hasattr(jobOrError, "summary"):
            self.showError(error)
        elif error is not None:
            self.onJobError(error)
        else:
            self.ui.newSegmentButton.checked = False
            self.ui.segmentSelector.setCurrentSegmentID(jobOrError.result)
            self.showStatus(_("Done: ") + jobOrError.summary + self.engineNotice())
            if jobOrError.lowConfidence:  # the model doubts this result: say so in colour
                self.ui.statusLabel.setStyleSheet("color: #d35400")
        self.updateButtons()

    def saveEditorUndoState(self):
        """AI edits go onto the Segment Editor's undo stack too, so its Undo steps back through AI and manual
        edits in the order they were made."""
        editor = self.ui.segmentEditorWidget
        if editor.segmentationNode() is not None:
            editor.saveStateForUndo()

    def onClearPrompts(self):
        self.controller.clearPrompts()

    # ---- shortcuts (only while the module is shown; none shadows a slice-view key) ---------------------------
    def installShortcuts(self):
        if self._shortcuts:
            return
        mainWindow = slicer.util.mainWindow()
        if mainWindow is None:
            return
        for keys, callback in SHORTCUTS:
            shortcut = qt.QShortcut(qt.QKeySequence(keys), mainWindow)
            shortcut.connect("activated()", getattr(self, callback) if isinstance(callback, str)
                             else (lambda kind=callback[1]: self.startPlacing(kind)))
            self._shortcuts.append(shortcut)

    def removeShortcuts(self):
        for shortcut in self._shortcuts:
            shortcut.setEnabled(False)
            shortcut.setParent(None)
            shortcut.deleteLater()
        self._shortcuts = []

    # ---- running ---------------------------------------------------------------------------------------------
    def ensureDependencies(self) -> bool:
        if self._dependenciesReady:
            return True
        unsupported = dependencies.unsupportedSlicer()
        if unsupported:
            self.showError(unsupported)
            return False
        if dependencies.installing():  # a click that arrived while the install handles events
            self.showStatus(_("SegMoTE's Python packages are being installed; wait for that to finish."))
            return False
        self._installCancelled = False
        self.ui.cancelButton.enabled = True  # pip's output is shown line by line; Cancel (or Esc) stops it
        try:
            ready = dependencies.ensureDependencies(confirm=self.confirmInstall, progress=self.showStatus,
                                                    cancelled=lambda: self._installCancelled,
                                                    idle=slicer.app.processEvents)
        except SegMoTEError as error:
            self.onJobError(error)
            return False
        except Exception as error:  # whatever an installer raises stays in the panel, as one line
            logging.exception("SegMoTE: installing the Python packages failed")
            self.showError(f"installing SegMoTE's Python packages failed: {one_line(error, 250, named=True)}")
            return False
        finally:
            self._installCancelled = False
            self.updateButtons()
        if not ready:
            self.showStatus(_("SegMoTE needs its Python packages to run; nothing was installed."))
            return False
        self._dependenciesReady = True
        self.refreshDevices()
        return True

    @staticmethod
    def confirmInstall(packages) -> bool:
        """Ask once before installing Python packages (the library only lists them)."""
        return slicer.util.confirmOkCancelDisplay(
            _("SegMoTE needs these Python packages, installed once into Slicer's Python:") + "\n\n  "
            + "\n  ".join(packages) + "\n\n"
            + _("This needs a network connection and may take several minutes. Install now?"),
            _("SegMoTE: install Python packages"))

    def applySettings(self):
        self.logic.setModel(self.ui.modelComboBox.currentData, self.ui.checkpointPathLineEdit.currentPath or None)
        self.logic.setDevice(self.ui.deviceComboBox.currentText or "auto")
        self.logic.setAdapter(self.adapterPath())
        for pathEdit in (self.ui.checkpointPathLineEdit, self.ui.adapterPathLineEdit):
            if pathEdit.currentPath and pathEdit.enabled:
                pathEdit.addCurrentPathToHistory()  # offered again next time (ctkPathLineEdit's history)
        self.logic.setIntensityMode(self.ui.intensityComboBox.currentData or "auto",
                                    (self.ui.customLevelSpinBox.value, self.ui.customWidthSpinBox.value))
        self.logic.overwriteOtherSegments = bool(self.ui.overwriteCheckBox.checked)
        self.logic.sliceOnly = bool(self.ui.sliceOnlyCheckBox.checked)

    def ensureSegmentation(self):
        p = self._parameterNode
        if p.segmentation is None:
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                      f"{p.inputVolume.GetName()} segmentation")
            node.CreateDefaultDisplayNodes()
            p.segmentation = node
        elif p.segmentation.GetDisplayNode() is None:
            p.segmentation.CreateDefaultDisplayNodes()
        return p.segmentation

    def runPrompts(self, propagate):
        try:
            self.controller.runNow(propagate=propagate)
        except SegMoTEError as error:
            self.showError(error)

    def onSegment(self):
        self.runPrompts(propagate=False)

    def onPropagate(self):
        self.runPrompts(propagate=True)

    def onAutoSegment(self):
        volume, segmentation = self.promptTarget()
        if volume is None or self.controller.busy:
            return
        try:
            self._job = self.logic.startAutoSegment(volume, segmentation, self.adapterPath(),
                                                    onDone=self.onAutoDone, onError=self.onJobError,
                                                    beforeApply=self.saveEditorUndoState)
        except SegMoTEError as error:
            self.showError(error)
            return
        self.startedJob(_("Automatic segmentation…"))

    def onUndo(self):
        p = self._parameterNode
        if p is None or self._job is not None or self.controller.busy:
            return
        try:
            undone = self.logic.undo(p.segmentation)
        except SegMoTEError as error:
            self.showError(error)
        else:
            self.showStatus(_("Last AI edit undone.") if undone else _("No AI edit to undo."))
        self.updateButtons()

    def onCancel(self):
        """Cancel button and Esc: leave place mode, stop the running job; the segmentation stays as it was."""
        self._installCancelled = True
        self.controller.cancel()
        if self._job is not None:
            self._job.cancel()
        if self._downloadJob is not None:
            self._downloadJob.cancel()
        self.ui.segmentEditorWidget.setActiveEffect(None)
        if self._job or self.controller.busy:
            self.showStatus(_("Cancelling…"))
        # otherwise the status line keeps what it says (a result's low-confidence warning stays readable)

    def onDownload(self):
        if self._downloadJob is not None or not self.ensureDependencies():
            return
        model = self.ui.modelComboBox.currentData
        try:
            self._downloadJob = self.logic.startWeightsDownload(model, onDone=self.onDownloadDone,
                                                                onError=self.onDownloadError)
        except SegMoTEError as error:
            self.showError(error)
            return
        self.ui.downloadButton.enabled = False
        self.ui.cancelButton.enabled = True
        self._timer.start()

    # ---- job bookkeeping (main thread, from the timer) ---------------------------------------------------------
    def startedJob(self, message):
        self.ui.progressBar.setRange(0, 0)
        self.ui.progressBar.show()
        self.showStatus(message)
        self.updateButtons()
        self._timer.start()

    def onTimer(self):
        # Each tick waits a little for the running job: that releases the GIL the engine thread needs.
        if self._downloadJob is not None:
            done, total = self._downloadJob.progress
            if total:
                self.ui.downloadButton.text = f"{100.0 * done / total:.0f} %"
            if self._downloadJob.poll(POLL_WAIT_S if self._job is None and not self.controller.busy else 0.0):
                self._downloadJob = None
                self.updateButtons()
        job = self._job or self.controller.job
        if job is not None:
            done, total = job.progress
            if total:
                self.ui.progressBar.setRange(0, total)
                self.ui.progressBar.value = done
        if self._job is not None and self._job.poll(POLL_WAIT_S):
            self._job = None
        if self.controller.busy:
            self.controller.poll(POLL_WAIT_S)
        if self._job is None and not self.controller.busy:
            self.ui.progressBar.hide()
            self.updateButtons()
            if self._downloadJob is None:
                self._timer.stop()

    def engineNotice(self) -> str:
        notice = self.logic.engineNotice
        return f" ({notice})" if notice else ""

    def onAutoDone(self, segmentIds):
        if segmentIds:
            self.ui.segmentSelector.setCurrentSegmentID(segmentIds[0])
        summary = self._job.summary if self._job is not None else ""
        self.showStatus(_("Automatic segmentation: ") + summary + self.engineNotice())

    def onJobError(self, error):
        if isinstance(error, Cancelled):
            self.showStatus(_("Cancelled; the segmentation was not changed."))
        else:
            self.showError(error)

    def onDownloadDone(self, path):
        self.showStatus(_("Weights downloaded and verified: ") + str(path))

    def onDownloadError(self, error):
        self.onJobError(error)

    # ---- messages -------------------------------------------------------------------------------------------
    def showStatus(self, text):
        self.ui.statusLabel.setStyleSheet("")
        self.ui.statusLabel.text = text
        slicer.app.processEvents()  # shown at once, also during a dependency install

    def showError(self, error):
        """One line in the panel (red); the scene was not changed."""
        logging.info("SegMoTE: %s", error)
        self.ui.statusLabel.setStyleSheet("color: #c0392b")
        self.ui.statusLabel.text = str(error)


def modelTestsRunnable() -> bool:
    """The self-test's model part runs only where the packages are already installed (never downloads)."""
    return not dependencies.unsupportedSlicer() and dependencies.dependenciesSatisfied()


#
# Test (runs inside Slicer: Reload and Test, or the generic module tests)
#
class SegMoTESlicerTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ShippedFilesWithoutTorch()
        self.setUp()
        self.test_PromptNodesAndPlaceMode()
        self.setUp()
        self.test_PromptsOnASyntheticVolume()

    def test_ShippedFilesWithoutTorch(self):
        """What the build farm can check without PyTorch: the engine package and its shipped adapter were
        installed with the module and read, and a structure's name resolves to its SNOMED CT codes."""
        import json
        import struct

        from segmote_core.terminology import resolve

        adapters = catalogue.shippedAdapters()
        self.assertIn("chest_ct_lungs", adapters)
        with open(adapters["chest_ct_lungs"], "rb") as file:  # a safetensors file: 8-byte length, JSON header
            headerLength = struct.unpack("<Q", file.read(8))[0]
            header = json.loads(file.read(headerLength))
        self.assertTrue(any(isinstance(entry, dict) and "shape" in entry for entry in header.values()))
        resolution = resolve("right lung")
        self.assertIsNone(resolution.notice)

    def test_PromptNodesAndPlaceMode(self):
        """No model needed: the place buttons' nodes, place mode and Esc, on Slicer's own interaction node."""
        applicationLogic = slicer.app.applicationLogic()
        interaction = applicationLogic.GetInteractionNode()
        controller = PromptController(SegMoTESlicerLogic(), slicer.mrmlScene, slicer.modules.markups.logic(),
                                      interaction, applicationLogic.GetSelectionNode())
        controller.activate()
        try:
            nodes = controller.ensureNodes()
            self.assertEqual(sorted(nodes), ["box", "negative", "positive"])
            controller.startPlacing("box")
            self.assertEqual(interaction.GetCurrentInteractionMode(), interaction.Place)
            self.assertEqual(applicationLogic.GetSelectionNode().GetActivePlaceNodeID(), nodes["box"].GetID())
            controller.cancel()
            self.assertNotEqual(interaction.GetCurrentInteractionMode(), interaction.Place)
        finally:
            controller.deactivate()

    def test_PromptsOnASyntheticVolume(self):
        """A bright ellipsoid in a dark 64x64x5 volume: a box segments it, a point re-does one slice, undo works.

        Needs the model's Python packages. The test never installs them (a build machine would download
        gigabytes): where they are missing it says so and checks only the model-free parts above; run it by hand
        after the first segmentation has installed them."""
        import numpy as np

        from SegMoTESlicerLib import segments

        if not modelTestsRunnable():
            self.delayDisplay("SegMoTE's model packages are not installed: model checks not run")
            return

        k, j, i = np.mgrid[0:5, 0:64, 0:64]
        inside = ((i - 30) / 16.0) ** 2 + ((j - 34) / 11.0) ** 2 + ((k - 2.0) / 1.6) ** 2 <= 1.0
        volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "SegMoTE test volume")
        slicer.util.updateVolumeFromArray(volume, np.where(inside, 300, -100).astype(np.int16))
        volume.SetIJKToRASMatrix(segments.matrixFromArray(np.diag([1.0, 1.0, 2.5, 1.0])))
        volume.CreateDefaultDisplayNodes()
        volume.GetDisplayNode().AutoWindowLevelOff()
        volume.GetDisplayNode().SetWindowLevel(600, 100)
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "SegMoTE test segmentation")
        segmentation.CreateDefaultDisplayNodes()
        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "SegMoTE test box")
        roi.SetSize(36.0, 26.0, 2.5 * 2)  # slices 1-3, where the ellipsoid is
        roi.SetCenter(30.0, 34.0, 2.5 * 2)

        logic = SegMoTESlicerLogic()
        logic.setDevice("auto")
        try:
            self.delayDisplay("3-D box around the ellipsoid")
            segmentId = logic.segmentWithPrompts(volume, segmentation, roiNode=roi)
            grid = segments.VolumeGrid.fromNodes(volume, segmentation)
            mask = grid.readSegment(segmentation, segmentId, grid.fullExtent)
            dice = 2.0 * (mask & inside).sum() / (mask.sum() + inside.sum())
            self.assertGreater(dice, 0.8, f"Dice {dice:.3f}")

            self.delayDisplay("With 'this slice only', a point on one slice replaces only that slice")
            logic.sliceOnly = True
            points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "SegMoTE test points")
            points.AddControlPoint(30.0, 34.0, 2.5 * 2)
            roi.SetSize(36.0, 26.0, 0.0)
            roi.SetCenter(30.0, 34.0, 2.5 * 2)
            logic.segmentWithPrompts(volume, segmentation, segmentId, roiNode=roi, positivePointsNode=points,
                                     activePoint=(points, 0))
            after = grid.readSegment(segmentation, segmentId, grid.fullExtent)
            others = [s for s in range(5) if s != 2]
            self.assertTrue(np.array_equal(after[others], mask[others]))
            self.assertTrue(after[2].any())

            self.delayDisplay("Undo twice: back to an empty segmentation")
            self.assertTrue(logic.undo(segmentation))
            self.assertTrue(np.array_equal(grid.readSegment(segmentation, segmentId, grid.fullExtent), mask))
            self.assertTrue(logic.undo(segmentation))
            self.assertEqual(segmentation.GetSegmentation().GetNumberOfSegments(), 0)

            self.delayDisplay("A prompt outside the image is refused with one line")
            points.SetNthControlPointPosition(0, 500.0, 0.0, 0.0)
            with self.assertRaises(SegMoTEError) as raised:
                logic.segmentWithPrompts(volume, segmentation, positivePointsNode=points)
            self.assertNotIn("\n", str(raised.exception))
        finally:
            logic.shutdown()
        self.delayDisplay("SegMoTE test passed")
