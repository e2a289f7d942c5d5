"""The module's panel as Slicer runs it: SegMoTESlicer.py and its .ui, driven through tests/slicer_panel_harness.py.

Real Qt widgets, slicer-core's real MRML scene and logics, strict stand-ins for what only Slicer provides (their
members are Slicer 5.10's and CTK's, by name). One prompt runs LiteMedSAM on a small synthetic volume.
"""

from __future__ import annotations

import gc
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("PyQt5")
slicer = pytest.importorskip("slicer")

import slicer_panel_harness as harness  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SegMoTESlicer"))

from SegMoTESlicerLib import catalogue, dependencies, segments  # noqa: E402
from SegMoTESlicerLib.logic import SegMoTESlicerLogic  # noqa: E402

UI_FILE = harness.MODULE_DIR / "Resources" / "UI" / "SegMoTESlicer.ui"


@pytest.fixture
def session(tmp_path):
    with harness.PanelSession(tmp_path / "settings") as running:
        yield running
    assert not harness.slotErrors, f"a slot raised: {harness.slotErrors[0]!r}"


@pytest.fixture
def sharedEngineLogic(lite_engine):
    class SharedEngineLogic(SegMoTESlicerLogic):
        def __init__(self, **kwargs):
            super().__init__(engine=lite_engine, **kwargs)

        def setDevice(self, device):  # keep the session's CPU engine
            pass
    return SharedEngineLogic


def add_ellipsoid_volume(scene, name="ellipsoid"):
    """The module self-test's volume: a bright ellipsoid in a dark 64x64x5 volume, 2.5 mm slices."""
    k, j, i = np.mgrid[0:5, 0:64, 0:64]
    inside = ((i - 30) / 16.0) ** 2 + ((j - 34) / 11.0) ** 2 + ((k - 2.0) / 1.6) ** 2 <= 1.0
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(volume, np.where(inside, 300, -100).astype(np.int16))
    volume.SetIJKToRASMatrix(segments.matrixFromArray(np.diag([1.0, 1.0, 2.5, 1.0])))
    volume.CreateDefaultDisplayNodes()
    return volume


def wait_until_idle(widget, timeout=120.0):
    deadline = time.monotonic() + timeout
    while (widget.controller.busy or widget._job is not None) and time.monotonic() < deadline:
        harness.processEvents(0.05)
    assert not widget.controller.busy and widget._job is None, "the run did not finish"


# ---- the harness itself ----------------------------------------------------------------------------------------
def test_a_member_slicer_510_lacks_makes_the_harness_fail(session):
    with pytest.raises(harness.StandInError, match="setSourceVolumeSelectorVisible"):
        class EditorWithAnInventedMember(harness.qMRMLSegmentEditorWidget):  # noqa: F841
            def setSourceVolumeSelectorVisible(self, visible):  # the real name has "Node" in it
                pass
    widget = session.loadModule()
    with pytest.raises(AttributeError):
        widget.ui.segmentEditorWidget.setMasterVolumeSelectorVisible(False)  # not a qMRMLSegmentEditorWidget member
    with pytest.raises(AttributeError, match="Slicer 5.10"):
        slicer.util.loadUi  # noqa: B018  (loadUI is the name)
    with pytest.raises(AttributeError, match="Slicer 5.10"):
        slicer.app.layoutManagers  # noqa: B018
    with pytest.raises(AttributeError, match="Slicer 5.10"):
        session.moduleParent.helptext = "misspelled"
    with pytest.raises(AttributeError, match="no signal"):
        widget.ui.segmentSelector.connect("currentSegmentIDChanged(QString)", print)


def test_a_ui_naming_a_widget_that_does_not_exist_fails_to_load(tmp_path):
    broken = tmp_path / "broken.ui"
    broken.write_text(UI_FILE.read_text(encoding="utf-8").replace(
        "<receiver>segmentSelector</receiver>", "<receiver>positivePlaceWidget</receiver>", 1), encoding="utf-8")
    with pytest.raises(harness.StandInError, match="positivePlaceWidget"):
        harness.loadUI(broken)


# ---- set-up, keys, the embedded Segment Editor -------------------------------------------------------------------
def test_every_key_the_panel_promises_is_bound_exactly_once_while_shown(session):
    widget = session.loadModule()
    session.enter(widget)
    texts = [session.moduleParent.helpText, widget.ui.statusLabel.text]
    texts += [w.toolTip for w in vars(widget.ui).values()]
    texts += [w.property("text") for w in vars(widget.ui).values() if isinstance(w.property("text"), str)]
    promised = set()
    for text in texts:
        promised |= set(re.findall(r"\((Shift\+B|Ctrl\+Z|P|N|B|Esc)\)", text))
        promised |= set(re.findall(r"\b(Ctrl\+Z|Shift\+B|Esc)\b", text))
    assert {"Shift+B", "P", "N", "Ctrl+Z", "Esc"} <= promised
    counts = session.shortcutCounts()
    for key in promised:
        assert counts.get(key) == 1, f"{key} is promised but bound {counts.get(key, 0)} times"
    assert all(count == 1 for count in counts.values()), counts
    # the editor's own keys (Esc, z, Ctrl+Z, ...) would collide: the panel does not install them
    assert ("installKeyboardShortcuts", None) not in widget.ui.segmentEditorWidget._calls
    session.exit(widget)
    assert session.shortcutCounts() == {}


def test_exit_shuts_the_embedded_segment_editor_down(session):
    widget = session.loadModule()
    session.enter(widget)
    editor = widget.ui.segmentEditorWidget
    editor._calls.clear()
    session.exit(widget)
    assert ("setActiveEffect", None) in editor._calls
    assert ("uninstallKeyboardShortcuts", None) in editor._calls
    assert ("removeViewObservations", None) in editor._calls and not editor._viewsObserved


def test_the_editor_shows_no_second_selection_and_follows_the_panel(session):
    widget = session.loadModule()
    volume = add_ellipsoid_volume(session.scene)
    first = session.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "first")
    second = session.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "second")
    session.enter(widget)
    editor = widget.ui.segmentEditorWidget
    assert editor.segmentationNodeSelectorVisible is False and editor.sourceVolumeNodeSelectorVisible is False
    assert editor.maximumNumberOfUndoStates() == 10  # Slicer's Segment Editor module sets 10; the default is 5
    widget.ui.segmentationSelector.setCurrentNode(first)
    assert editor.segmentationNode() is first and editor.sourceVolumeNode() is volume
    # chosen through the editor (its node changed by another module or a script): SegMoTE writes there too
    editor.setSegmentationNode(second)
    assert widget._parameterNode.segmentation is second
    assert widget.ui.segmentationSelector.currentNode() is second


def test_the_input_is_the_volume_shown_not_the_first_one_loaded(session):
    labels = session.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    slicer.util.updateVolumeFromArray(labels, np.zeros((5, 64, 64), dtype=np.int16))
    other = add_ellipsoid_volume(session.scene, "other")
    shown = add_ellipsoid_volume(session.scene, "shown")
    session.sliceLogic.GetSliceCompositeNode().SetBackgroundVolumeID(shown.GetID())
    widget = session.loadModule()
    session.enter(widget)
    assert widget._parameterNode.inputVolume is shown
    assert widget.ui.inputVolumeSelector.currentNode() is shown
    assert other is not shown


def test_leaving_the_module_restores_slicers_place_mode_settings(session):
    userList = session.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "F")
    session.selectionNode.SetActivePlaceNodeID(userList.GetID())
    session.interactionNode.SetPlaceModePersistence(0)
    widget = session.loadModule()
    session.enter(widget)
    widget.ui.positivePlaceButton.click()
    assert session.interactionNode.GetPlaceModePersistence() == 1
    assert session.selectionNode.GetActivePlaceNodeID() == widget.controller.nodes["positive"].GetID()
    session.exit(widget)
    assert session.interactionNode.GetPlaceModePersistence() == 0
    assert session.selectionNode.GetActivePlaceNodeID() == userList.GetID()
    assert session.interactionNode.GetCurrentInteractionMode() != session.interactionNode.Place


# ---- a prompt, its undo, Esc --------------------------------------------------------------------------------------
def test_a_box_gives_a_segment_new_gives_another_ctrl_z_undoes_them_and_esc_keeps_the_status(session,
                                                                                        sharedEngineLogic):
    volume = add_ellipsoid_volume(session.scene)
    session.sliceLogic.GetSliceCompositeNode().SetBackgroundVolumeID(volume.GetID())
    widget = session.loadModule(sharedEngineLogic)
    session.enter(widget)
    box = widget.controller.nodes["box"]
    box.SetCenter(30.0, 34.0, 5.0)
    box.SetSize(36.0, 26.0, 5.0)  # slices 1-3, where the ellipsoid is
    widget.ui.segmentButton.click()
    wait_until_idle(widget)
    segmentation = widget._parameterNode.segmentation
    assert segmentation is not None and segmentation.GetSegmentation().GetNumberOfSegments() == 1
    segmentId = segmentation.GetSegmentation().GetNthSegmentID(0)
    assert widget.ui.segmentSelector.currentSegmentID() == segmentId
    assert widget.ui.statusLabel.text.startswith("Done")
    assert ("saveStateForUndo", None) in widget.ui.segmentEditorWidget._calls
    assert widget.ui.segmentEditorWidget.segmentationNode() is segmentation

    status, style = widget.ui.statusLabel.text, widget.ui.statusLabel.styleSheet
    session.press("Esc")  # nothing runs: the result's line (and a low-confidence colour) stays
    assert (widget.ui.statusLabel.text, widget.ui.statusLabel.styleSheet) == (status, style)

    widget.ui.newSegmentButton.checked = True  # New: the next result becomes a second segment, a new object
    assert not widget.controller.boxComplete(), "New kept the previous object's box"
    box = widget.controller.nodes["box"]
    box.SetCenter(30.0, 34.0, 5.0)
    box.SetSize(36.0, 26.0, 5.0)
    widget.ui.segmentButton.click()
    wait_until_idle(widget)
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 2
    secondId = widget.ui.segmentSelector.currentSegmentID()
    assert secondId != segmentId and not widget.ui.newSegmentButton.checked

    nodeId = segmentation.GetID()
    del segmentation
    gc.collect()  # Python held the segmentation node's wrapper only through the parameter node read above
    assert widget.ui.undoButton.enabled
    session.press("Ctrl+Z")
    remaining = session.scene.GetNodeByID(nodeId).GetSegmentation()
    assert remaining.GetNumberOfSegments() == 1 and remaining.GetSegment(segmentId) is not None
    assert widget.ui.statusLabel.text == "Last AI edit undone."
    session.press("Ctrl+Z")
    assert remaining.GetNumberOfSegments() == 0


# ---- installs ---------------------------------------------------------------------------------------------------
def test_a_failing_pytorch_install_stays_in_the_panel_as_one_line(session, monkeypatch):
    widget = session.loadModule()
    session.enter(widget)
    fakeUtils = types.ModuleType("PyTorchUtils")

    class FailingTorchLogic:
        def installTorch(self, **kwargs):
            raise subprocess.CalledProcessError(1, ["PythonSlicer", "-m", "pip", "install", "torch"])

    fakeUtils.PyTorchUtilsLogic = FailingTorchLogic
    monkeypatch.setitem(sys.modules, "PyTorchUtils", fakeUtils)
    monkeypatch.setattr(dependencies, "torchMissing", lambda: True)
    monkeypatch.setattr(dependencies, "missingPackages", lambda: [])
    widget._dependenciesReady = False
    widget.ui.positivePlaceButton.click()
    assert len(session.confirmations) == 1 and "PyTorch" in session.confirmations[0]
    assert "installing PyTorch failed" in widget.ui.statusLabel.text and "\n" not in widget.ui.statusLabel.text
    assert "c0392b" in widget.ui.statusLabel.styleSheet  # shown as an error
    assert session.interactionNode.GetCurrentInteractionMode() != session.interactionNode.Place
    assert not dependencies.installing() and widget.ui.cancelButton.enabled is False


# ---- what is remembered ------------------------------------------------------------------------------------------
def test_model_device_intensities_adapter_and_paths_are_remembered_across_sessions(session):
    widget = session.loadModule()
    session.enter(widget)
    shipped = catalogue.shippedAdapters()
    assert "chest_ct_lungs" in shipped
    names = [widget.ui.adapterComboBox.itemData(i) for i in range(widget.ui.adapterComboBox.count)]
    assert names[0] == "" and "chest_ct_lungs" in names and names[-1] == "file"
    widget.ui.adapterComboBox.currentIndex = names.index("chest_ct_lungs")
    assert widget.adapterPath() == shipped["chest_ct_lungs"]
    widget.ui.modelComboBox.currentIndex = widget.ui.modelComboBox.findData("sam_vit_b")
    widget.ui.deviceComboBox.currentIndex = widget.ui.deviceComboBox.findText("cpu")
    widget.ui.intensityComboBox.currentIndex = widget.ui.intensityComboBox.findData("display")
    widget.ui.checkpointPathLineEdit.currentPath = "/data/models/my_vit_b.pth"
    widget.applySettings()
    assert widget.logic.settings().adapter == shipped["chest_ct_lungs"]
    assert not widget.logic.sliceOnly  # by default a prompt gives the whole object in 3-D
    widget.ui.sliceOnlyCheckBox.checked = True
    widget.applySettings()
    assert widget.logic.sliceOnly

    # Slicer restarted: a new scene and a new panel
    session.scene.Clear(0)
    again = session.reload(widget)
    session.enter(again)
    assert again.ui.modelComboBox.currentData == "sam_vit_b" and again._parameterNode.model == "sam_vit_b"
    assert again.ui.deviceComboBox.currentText == "cpu"
    assert again.ui.intensityComboBox.currentData == "display"
    assert again.adapterPath() == shipped["chest_ct_lungs"]
    assert again.ui.checkpointPathLineEdit.currentPath == "/data/models/my_vit_b.pth"  # its path history


# ---- scene close, scene import, reload -------------------------------------------------------------------------------
def test_closing_the_scene_leaves_working_prompt_nodes_and_no_stale_editor_state(session):
    widget = session.loadModule()
    session.enter(widget)
    widget.controller.nodes["positive"].AddControlPoint(1.0, 2.0, 3.0)
    session.scene.Clear(0)
    assert all(node.GetScene() is session.scene for node in widget.controller.nodes.values())
    assert widget._parameterNode.positivePoints is widget.controller.nodes["positive"]
    assert widget.ui.segmentEditorWidget.segmentationNode() is None
    widget.ui.boxPlaceButton.click()
    assert session.selectionNode.GetActivePlaceNodeID() == widget.controller.nodes["box"].GetID()


def test_a_loaded_scene_brings_its_prompt_nodes_and_the_panel_follows_them(session):
    widget = session.loadModule()
    session.enter(widget)
    before = widget.controller.nodes["positive"]
    scene = session.scene
    # what importing an .mrb does: its nodes are added, its SegMoTE parameter node merged into the singleton
    scene.StartState(scene.ImportState)
    imported = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "include (from the .mrb)")
    widget.moduleLogic.getParameterNode().positivePoints = imported
    scene.EndState(scene.ImportState)
    assert widget.controller.nodes["positive"] is imported and before is not imported
    imported.AddControlPoint(1.0, 2.0, 3.0)
    assert widget.controller.observing


def test_reloading_the_module_leaves_nothing_of_the_old_panel_running(session):
    widget = session.loadModule()
    session.enter(widget)
    again = session.reload(widget)
    session.enter(again)
    assert widget.Observations == [] and not widget._timer.isActive()
    assert not widget.controller.observing
    assert all(count == 1 for count in session.shortcutCounts().values())
    assert again.ui.segmentEditorWidget.mrmlSegmentEditorNode() is not None


def test_the_self_test_checks_the_shipped_files_and_place_mode_without_torch(session, monkeypatch):
    """The model-free part of the module's own self-test (what Slicer's build farm runs), in the harness."""
    session.loadModule()
    selfTest = session.module.SegMoTESlicerTest("test_ShippedFilesWithoutTorch")
    monkeypatch.setattr(catalogue, "shippedAdapters", lambda: {})
    with pytest.raises(AssertionError):
        selfTest.test_ShippedFilesWithoutTorch()  # an extension built without its adapter fails the self-test
    monkeypatch.undo()
    selfTest.test_ShippedFilesWithoutTorch()
    selfTest.test_PromptNodesAndPlaceMode()
