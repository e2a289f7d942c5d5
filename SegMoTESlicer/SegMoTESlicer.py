"""SegMoTE for 3D Slicer: Segment-Anything-based interactive and automatic segmentation.

This file holds the Slicer-facing parts only: the module description, the parameter node, the panel (thin: it
turns clicks into calls of the GUI-free ``SegMoTESlicerLib.logic.SegMoTESlicerLogic``) and the self-test.
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

from SegMoTESlicerLib import dependencies
from SegMoTESlicerLib.logic import MODELS, SegMoTESlicerLogic
from segmote_core.errors import Cancelled, SegMoTEError

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer before 5.4
    def _(text):
        return text

PROMPT_NAMES = {"positivePoints": "SegMoTE include", "negativePoints": "SegMoTE exclude", "box": "SegMoTE box"}
PROMPT_COLORS = {"positivePoints": (0.25, 0.85, 0.3), "negativePoints": (0.95, 0.25, 0.2), "box": (0.95, 0.8, 0.2)}
POLL_INTERVAL_MS = 50


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
            "Segment with Segment-Anything models (LiteMedSAM, SAM ViT-B/L/H) and SegMoTE adapters: place a box (B) "
            "or include/exclude points (P/N) in any slice view and the segment updates on that slice; "
            "Propagate 3D follows the object through the volume; Auto segment makes one segment per adapter class; "
            "Ctrl+Z undoes the last AI edit. See the <a href='https://github.com/segmote/SegMoTE/blob/main/docs/"
            "slicer.md'>documentation</a>.")
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
    model: str = "lite_medsam"
    device: str = "auto"


class SegMoTESlicerModuleLogic(ScriptedLoadableModuleLogic):
    """Only the parameter node; all the work is in the GUI-free SegMoTESlicerLib.logic.SegMoTESlicerLogic."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.moduleName = "SegMoTESlicer"

    def getParameterNode(self):
        return SegMoTESlicerParameterNode(super().getParameterNode())


#
# Widget
#
class SegMoTESlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: SegMoTESlicerLogic | None = None
        self.moduleLogic: SegMoTESlicerModuleLogic | None = None
        self._parameterNode: SegMoTESlicerParameterNode | None = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._downloadJob = None
        self._pendingUpdate = False
        self._activePoint = None
        self._lastSignature = None
        self._observedPromptNodes = []
        self._shortcuts = []
        self._dependenciesReady = False
        self._timer = None

    # ---- set-up -----------------------------------------------------------------------------------------
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SegMoTESlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SegMoTESlicerLogic()
        self.moduleLogic = SegMoTESlicerModuleLogic()

        for name, label in MODELS.items():
            self.ui.modelComboBox.addItem(label, name)
        for placeWidget in (self.ui.positivePlaceWidget, self.ui.negativePlaceWidget, self.ui.boxPlaceWidget):
            placeWidget.buttonsVisible = False  # compact: only the place and delete buttons
            placeWidget.placeButton().show()
            placeWidget.deleteButton().show()
        self.refreshDevices()
        self.ui.progressBar.hide()
        self.ui.cancelButton.enabled = False

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSegmentationChanged)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
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
        self.removeShortcuts()
        self.removeObservers()
        if self._timer is not None:
            self._timer.stop()
        if self.logic is not None:
            self.logic.shutdown()

    def enter(self):
        self.initializeParameterNode()
        self.installShortcuts()

    def exit(self):
        self.removeShortcuts()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event):
        if self._job is not None:
            self._job.cancel()
        self.observePromptNodes([])
        self.logic.clearUndo()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ---- parameter node -----------------------------------------------------------------------------------
    def initializeParameterNode(self):
        self.setParameterNode(self.moduleLogic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume:
                self._parameterNode.inputVolume = firstVolume

    def setParameterNode(self, parameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
            self.observePromptNodes(self.promptNodes())
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
        for attribute, widget in (("positivePoints", self.ui.positivePlaceWidget),
                                  ("negativePoints", self.ui.negativePlaceWidget), ("box", self.ui.boxPlaceWidget)):
            node = getattr(p, attribute)
            if widget.currentNode() is not node:
                widget.setCurrentNode(node)
        self.updateButtons()

    def updateButtons(self):
        p = self._parameterNode
        busy = self._job is not None
        ready = p is not None and p.inputVolume is not None
        for button in (self.ui.segmentButton, self.ui.propagateButton, self.ui.autoSegmentButton):
            button.enabled = ready and not busy
        self.ui.undoButton.enabled = p is not None and self.logic.canUndo(p.segmentation) and not busy
        self.ui.cancelButton.enabled = busy
        model = self.ui.modelComboBox.currentData
        try:
            downloaded = self.logic.weightsAvailable(model)
        except ImportError:  # engine packages not installed yet: a download will install them first
            downloaded = model == "lite_medsam"
        self.ui.downloadButton.enabled = not downloaded and self._downloadJob is None
        if self._downloadJob is None:
            self.ui.downloadButton.text = _("Downloaded") if downloaded and model != "lite_medsam" else _("Download")

    def onSegmentationChanged(self, node):
        self.ui.segmentSelector.setCurrentNode(node)
        self.ui.show3DButton.setSegmentationNode(node)
        self.updateButtons()

    def onModelChanged(self, index=None):
        if self._parameterNode is not None:
            self._parameterNode.model = self.ui.modelComboBox.currentData
        self.updateButtons()

    def onDeviceChanged(self, index=None):
        if self._parameterNode is not None:
            self._parameterNode.device = self.ui.deviceComboBox.currentText

    def refreshDevices(self):
        current = self.ui.deviceComboBox.currentText or "auto"
        self.ui.deviceComboBox.clear()
        for device in self.logic.availableDevices():
            self.ui.deviceComboBox.addItem(device)
        index = self.ui.deviceComboBox.findText(current)
        self.ui.deviceComboBox.currentIndex = max(index, 0)

    # ---- prompt nodes -----------------------------------------------------------------------------------------
    def promptNodes(self):
        p = self._parameterNode
        return [] if p is None else [n for n in (p.positivePoints, p.negativePoints, p.box) if n is not None]

    def ensurePromptNodes(self):
        p = self._parameterNode
        for attribute, name in PROMPT_NAMES.items():
            if getattr(p, attribute) is not None:
                continue
            className = "vtkMRMLMarkupsROINode" if attribute == "box" else "vtkMRMLMarkupsFiducialNode"
            node = slicer.mrmlScene.AddNewNodeByClass(className, name)
            node.CreateDefaultDisplayNodes()
            display = node.GetDisplayNode()
            display.SetSelectedColor(*PROMPT_COLORS[attribute])
            display.SetColor(*PROMPT_COLORS[attribute])
            if attribute != "box":
                display.SetPointLabelsVisibility(False)
                node.SetControlPointLabelFormat("+" if attribute == "positivePoints" else "-")
            setattr(p, attribute, node)
        self.observePromptNodes(self.promptNodes())

    def observePromptNodes(self, nodes):
        events = (slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, slicer.vtkMRMLMarkupsNode.PointModifiedEvent,
                  slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent)
        for node in self._observedPromptNodes:
            for event in events:
                self.removeObserver(node, event, self.onPromptModified)
        self._observedPromptNodes = list(nodes)
        for node in self._observedPromptNodes:
            for event in events:
                self.addObserver(node, event, self.onPromptModified)

    @vtk.calldata_type(vtk.VTK_INT)
    def onPromptModified(self, caller, event, index=None):
        p = self._parameterNode
        if p is None or not p.autoUpdate or p.inputVolume is None:
            return
        if caller is p.box:
            index = 0
        if index is None or index < 0 or index >= caller.GetNumberOfControlPoints():
            return
        if caller.GetNthControlPointPositionStatus(index) != caller.PositionDefined:
            return  # still being placed
        self._activePoint = (caller, int(index))
        self.requestUpdate()

    def promptSignature(self):
        """Positions of all placed prompts: an update runs only when they changed."""
        signature = []
        for node in self.promptNodes():
            for i in range(node.GetNumberOfControlPoints()):
                signature.append(tuple(round(v, 3) for v in node.GetNthControlPointPositionWorld(i)))
            if node.IsA("vtkMRMLMarkupsROINode"):
                signature.append(tuple(round(v, 3) for v in node.GetSize()))
        return tuple(signature)

    def requestUpdate(self):
        if self.promptSignature() == self._lastSignature:
            return
        if self._job is not None:
            self._pendingUpdate = True  # run again with the latest prompts once this job is done
            return
        self.runPrompts(propagate=False, activeOnly=True)

    def startPlacing(self, placeWidget):
        if self._parameterNode is None:
            return
        self.ensurePromptNodes()
        self.updateGUIFromParameterNode()
        placeWidget.setPlaceModeEnabled(True)

    def onClearPrompts(self):
        for node in self.promptNodes():
            node.RemoveAllControlPoints()
        self._activePoint = None
        self._lastSignature = None

    # ---- shortcuts --------------------------------------------------------------------------------------------
    def installShortcuts(self):
        if self._shortcuts:
            return
        mainWindow = slicer.util.mainWindow()
        if mainWindow is None:
            return
        bindings = (("P", lambda: self.startPlacing(self.ui.positivePlaceWidget)),
                    ("N", lambda: self.startPlacing(self.ui.negativePlaceWidget)),
                    ("B", lambda: self.startPlacing(self.ui.boxPlaceWidget)),
                    ("Ctrl+Z", self.onUndo))
        for keys, callback in bindings:
            shortcut = qt.QShortcut(qt.QKeySequence(keys), mainWindow)
            shortcut.connect("activated()", callback)
            shortcut.connect("activatedAmbiguously()", callback)
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
        try:
            ready = dependencies.ensureDependencies(confirm=True)
        except SegMoTEError as error:
            self.showError(error)
            return False
        if not ready:
            self.showStatus(_("SegMoTE needs its Python packages to run; nothing was installed."))
            return False
        self._dependenciesReady = True
        self.refreshDevices()
        return True

    def applySettings(self):
        self.logic.setModel(self.ui.modelComboBox.currentData, self.ui.checkpointPathLineEdit.currentPath or None)
        self.logic.setDevice(self.ui.deviceComboBox.currentText or "auto")
        self.logic.setAdapter(self.ui.adapterPathLineEdit.currentPath or None)
        self.logic.overwriteOtherSegments = bool(self.ui.overwriteCheckBox.checked)

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

    def targetSegmentId(self):
        if self.ui.newSegmentButton.checked:
            return None
        return self.ui.segmentSelector.currentSegmentID() or None

    def viewOfActivePrompt(self):
        """The slice node the active prompt was placed in (its view decides the slicing axis)."""
        if self._activePoint is None:
            return None
        node, index = self._activePoint
        if node.GetScene() is None or index >= node.GetNumberOfControlPoints():
            return None
        return self.logic.sliceViewOfPoint(slicer.mrmlScene, node.GetNthControlPointPositionWorld(index))

    def readyToRun(self):
        """The parameter node when a job may start (no job running, dependencies present, a volume chosen), with
        the panel's settings applied to the logic; None otherwise (the panel says why)."""
        p = self._parameterNode
        if p is None or self._job is not None or not self.ensureDependencies():
            return None
        self.applySettings()
        if p.inputVolume is None:
            self.showStatus(_("Select an input volume first."))
            return None
        return p

    def runPrompts(self, propagate=False, activeOnly=True):
        p = self.readyToRun()
        if p is None:
            return
        segmentation = self.ensureSegmentation()
        active = self._activePoint if (activeOnly or propagate) else None
        if active is not None and (active[0].GetScene() is None or active[1] >= active[0].GetNumberOfControlPoints()):
            active = None
        try:
            job = self.logic.startSegmentWithPrompts(
                p.inputVolume, segmentation, self.targetSegmentId(), p.box, p.positivePoints, p.negativePoints,
                propagate=propagate, axis=self.viewOfActivePrompt() if active else None, activePoint=active,
                onDone=self.onPromptsDone, onError=self.onJobError)
        except SegMoTEError as error:
            self.showError(error)
            return
        self._lastSignature = self.promptSignature()
        self.startedJob(job, _("Propagating…") if propagate else _("Segmenting…"))

    def onSegment(self):
        self.runPrompts(propagate=False, activeOnly=False)

    def onPropagate(self):
        self.runPrompts(propagate=True, activeOnly=True)

    def onAutoSegment(self):
        p = self.readyToRun()
        if p is None:
            return
        try:
            job = self.logic.startAutoSegment(p.inputVolume, self.ensureSegmentation(),
                                              self.ui.adapterPathLineEdit.currentPath or None,
                                              onDone=self.onAutoDone, onError=self.onJobError)
        except SegMoTEError as error:
            self.showError(error)
            return
        self.startedJob(job, _("Automatic segmentation…"))

    def onUndo(self):
        p = self._parameterNode
        if p is None or self._job is not None:
            return
        try:
            undone = self.logic.undo(p.segmentation)
        except SegMoTEError as error:
            self.showError(error)
        else:
            self.showStatus(_("Last AI edit undone.") if undone else _("No AI edit to undo."))
        self.updateButtons()

    def onCancel(self):
        if self._job is not None:
            self._job.cancel()
            self.showStatus(_("Cancelling…"))

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
        self._timer.start()

    # ---- job bookkeeping (main thread, from the timer) ---------------------------------------------------------
    def startedJob(self, job, message):
        self._job = job
        self.ui.progressBar.setRange(0, 0)
        self.ui.progressBar.show()
        self.showStatus(message)
        self.updateButtons()
        self._timer.start()

    def onTimer(self):
        if self._downloadJob is not None:
            done, total = self._downloadJob.progress
            if total:
                self.ui.downloadButton.text = f"{100.0 * done / total:.0f} %"
            if self._downloadJob.poll():
                self._downloadJob = None
                self.updateButtons()
        if self._job is not None:
            done, total = self._job.progress
            if total:
                self.ui.progressBar.setRange(0, total)
                self.ui.progressBar.value = done
            if self._job.poll():
                self._job = None
                self.ui.progressBar.hide()
                self.updateButtons()
                if self._pendingUpdate:
                    self._pendingUpdate = False
                    self.requestUpdate()
        if self._job is None and self._downloadJob is None:
            self._timer.stop()

    def onPromptsDone(self, segmentId):
        self.ui.newSegmentButton.checked = False
        self.ui.segmentSelector.setCurrentSegmentID(segmentId)
        self.showStatus(_("Done: ") + self._job.summary if self._job is not None else _("Done."))

    def onAutoDone(self, segmentIds):
        if segmentIds:
            self.ui.segmentSelector.setCurrentSegmentID(segmentIds[0])
        self.showStatus(_("Automatic segmentation: ") + (self._job.summary if self._job is not None else ""))

    def onJobError(self, error):
        if isinstance(error, Cancelled):
            self.showStatus(_("Cancelled; the segmentation was not changed."))
        else:
            self.showError(error)

    def onDownloadDone(self, path):
        self.showStatus(_("Weights downloaded and verified: ") + str(path))

    def onDownloadError(self, error):
        self.showError(error)

    # ---- messages -------------------------------------------------------------------------------------------
    def showStatus(self, text):
        self.ui.statusLabel.setStyleSheet("")
        self.ui.statusLabel.text = text

    def showError(self, error):
        """One line in the panel (red); the scene was not changed."""
        logging.info("SegMoTE: %s", error)
        self.ui.statusLabel.setStyleSheet("color: #c0392b")
        self.ui.statusLabel.text = str(error)


#
# Test (runs inside Slicer: Reload and Test, or the generic module tests)
#
class SegMoTESlicerTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_PromptsOnASyntheticVolume()

    def test_PromptsOnASyntheticVolume(self):
        """A bright ellipsoid in a dark 64x64x5 volume: a box segments it, a point re-does one slice, undo works."""
        import numpy as np

        from SegMoTESlicerLib import segments

        self.delayDisplay("Checking SegMoTE's Python packages (installs them on first run)")
        self.assertTrue(dependencies.ensureDependencies(confirm=False))

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

            self.delayDisplay("A point on one slice replaces only that slice")
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
