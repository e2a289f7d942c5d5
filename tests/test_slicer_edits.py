"""Undo history of AI edits on slicer-core's real MRML scene, without a model: edits are written directly."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SegMoTESlicer"))

from SegMoTESlicerLib import edits  # noqa: E402
from SegMoTESlicerLib import segments as mrml  # noqa: E402
from segmote_core.errors import SegMoTEError  # noqa: E402

SHAPE_KJI = (4, 16, 20)
KEEP_ALIVE = []


def new_scene():
    scene = slicer.vtkMRMLScene()
    logic = slicer.vtkSlicerSegmentationsModuleLogic()  # registers the segment representations' converters
    logic.SetMRMLScene(scene)
    KEEP_ALIVE.append(logic)
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "volume")
    slicer.util.updateVolumeFromArray(volume, np.zeros(SHAPE_KJI, dtype=np.int16))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    return scene, volume, segmentation


def ai_edit_on_slice(history, volume, segmentation, k=1, segmentId=None):
    """What the Logic does for a prompt on slice k: a square on that slice, written as one undoable edit."""
    grid = mrml.VolumeGrid.fromNodes(volume, segmentation)
    mask = np.zeros((1, SHAPE_KJI[1], SHAPE_KJI[2]), dtype=bool)
    mask[0, 4:10, 5:12] = True
    extent = (0, SHAPE_KJI[2] - 1, 0, SHAPE_KJI[1] - 1, k, k)
    target, edit = edits.writePrompted(segmentation, volume, grid, segmentId, [edits.Piece(extent, mask)], False)
    history.push(segmentation, edit)
    return target, grid


def test_undo_history_survives_python_dropping_the_nodes_wrapper():
    history = edits.UndoHistory()
    scene, volume, segmentation = new_scene()
    ai_edit_on_slice(history, volume, segmentation)
    nodeId = segmentation.GetID()
    del segmentation  # the panel keeps no reference between clicks; the node stays in the scene
    gc.collect()
    again = scene.GetNodeByID(nodeId)
    assert history.steps(again) == 1
    assert history.undo(again) and again.GetSegmentation().GetNumberOfSegments() == 0


def test_undo_history_is_dropped_when_the_node_leaves_the_scene_and_on_scene_close():
    history = edits.UndoHistory()
    scene, volume, segmentation = new_scene()
    ai_edit_on_slice(history, volume, segmentation)
    scene.RemoveNode(segmentation)
    assert history.steps(segmentation) == 0 and not history._stacks
    scene.AddNode(segmentation)
    assert history.steps(segmentation) == 0

    ai_edit_on_slice(history, volume, segmentation)
    oldId = segmentation.GetID()
    scene.Clear(0)
    assert history.steps(segmentation) == 0
    # the next scene's first segmentation gets the same ID: it has no history of the old one
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "volume")
    slicer.util.updateVolumeFromArray(volume, np.zeros(SHAPE_KJI, dtype=np.int16))
    fresh = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    assert fresh.GetID() == oldId and history.steps(fresh) == 0


def test_undo_refuses_when_the_user_painted_outside_the_slice_of_the_segment_the_ai_created():
    history = edits.UndoHistory()
    scene, volume, segmentation = new_scene()
    segmentId, grid = ai_edit_on_slice(history, volume, segmentation, k=1)
    # the user paints into that segment on another slice (as the Segment Editor's Paint would)
    extent, values = grid.readWholeSegment(segmentation, segmentId)
    painted = np.zeros(SHAPE_KJI, dtype=bool)
    painted[mrml.extentSlices(extent, grid.fullExtent)] = values
    painted[3, 2:5, 2:5] = True
    grid.writeSegment(segmentation, segmentId, grid.fullExtent, painted)
    with pytest.raises(SegMoTEError, match="edited after the AI edit"):
        history.undo(segmentation)
    segment = segmentation.GetSegmentation().GetSegment(segmentId)
    assert segment is not None
    assert np.array_equal(grid.readSegment(segmentation, segmentId, grid.fullExtent), painted)


def test_undo_of_an_untouched_created_segment_removes_it():
    history = edits.UndoHistory()
    scene, volume, segmentation = new_scene()
    segmentId, _ = ai_edit_on_slice(history, volume, segmentation, k=2)
    assert history.undo(segmentation)
    assert segmentation.GetSegmentation().GetSegment(segmentId) is None
