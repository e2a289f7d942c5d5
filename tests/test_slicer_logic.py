"""The Slicer module's Logic on Slicer's real MRML (the slicer-core wheel), headless: no Qt, no slicer.app.

Scenes are built by hand: the shipped chest CT becomes a vtkMRMLScalarVolumeNode (cropped to a few slices inside
both lungs, so that the LiteMedSAM embeddings stay few on 2 CPU cores), prompts are markups ROI / point-list nodes,
and the result is read back from the vtkMRMLSegmentationNode on the volume's voxel grid.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from conftest import LUNG_WINDOW, bounding_box_ijk  # noqa: E402
from segmote_core.metrics import dice  # noqa: E402

MODULE_DIR = Path(__file__).resolve().parents[1] / "SegMoTESlicer"
sys.path.insert(0, str(MODULE_DIR))

from SegMoTESlicerLib import segments as mrml  # noqa: E402
from SegMoTESlicerLib.logic import SegMoTESlicerLogic  # noqa: E402
from segmote_core.errors import Cancelled, SegMoTEError  # noqa: E402

K0, K1 = 15, 20  # slices of the chest CT kept for these tests: 5 slices through both lungs
OBLIQUE_K = (16, 19)  # the rotated copy keeps 3 (each new grid costs new embeddings)
TIMINGS: dict[str, float] = {}


# ---- scene building -------------------------------------------------------------------------------------------
def rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    a, b = [i for i in range(3) if i != axis]
    matrix = np.eye(4)
    matrix[a, a], matrix[a, b], matrix[b, a], matrix[b, b] = c, -s, s, c
    return matrix


def crop(volume, k0, k1):
    """A slice range of a segmote Volume, as (array, IJK-to-RAS)."""
    ijk_to_ras = volume.ijk_to_ras.copy()
    ijk_to_ras[:3, 3] = ijk_to_ras[:3, :3] @ np.array([0, 0, k0]) + ijk_to_ras[:3, 3]
    return volume.array[k0:k1].copy(), ijk_to_ras


def add_volume(scene, array, ijk_to_ras, name="chest", parent=None, window=LUNG_WINDOW):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, array)
    node.SetIJKToRASMatrix(mrml.matrixFromArray(ijk_to_ras))
    node.CreateDefaultDisplayNodes()
    if window is not None:
        display = node.GetDisplayNode()
        display.AutoWindowLevelOff()
        display.SetWindowLevel(window[1], window[0])
    if parent is not None:
        node.SetAndObserveTransformNodeID(parent.GetID())
    return node


def add_transform(scene, matrix, name="transform"):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(mrml.matrixFromArray(matrix))
    return node


def add_roi(scene, ijk_to_world, box_ijk, parent=None, name="box"):
    """A markups ROI whose (oriented) box is exactly the voxel box, placed under `parent`."""
    low, high = np.array(box_ijk[:3], float), np.array(box_ijk[3:], float)
    columns = ijk_to_world[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    axes = columns / spacing
    if np.linalg.det(axes) < 0:
        axes[:, 0] *= -1  # the box is symmetric: any proper rotation with the same axes describes it
    object_to_world = np.eye(4)
    object_to_world[:3, :3] = axes
    object_to_world[:3, 3] = mrml.transformPoints(ijk_to_world, (low + high) / 2)[0]
    parent_to_world = np.eye(4) if parent is None else transform_to_world(parent)
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    node.SetSize(*((high - low) * spacing))
    node.SetAndObserveObjectToNodeMatrix(mrml.matrixFromArray(np.linalg.inv(parent_to_world) @ object_to_world))
    if parent is not None:
        node.SetAndObserveTransformNodeID(parent.GetID())
    return node


def add_points(scene, ijk_to_world, points_ijk, parent=None, name="points"):
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    to_local = np.linalg.inv(np.eye(4) if parent is None else transform_to_world(parent)) @ ijk_to_world
    for point in mrml.transformPoints(to_local, points_ijk):
        node.AddControlPoint(*point)
    if parent is not None:
        node.SetAndObserveTransformNodeID(parent.GetID())
    return node


def transform_to_world(transform_node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    transform_node.GetMatrixTransformToWorld(matrix)
    return mrml.arrayFromMatrix(matrix)


def chest_volume(chest_ct):
    """The same crop as a segmote Volume (what the Logic hands the engine)."""
    from segmote_core.volume import Volume

    return Volume.from_ijk_to_ras(*crop(chest_ct, K0, K1))


def segment_array(volume_node, segmentation_node, segment_id) -> np.ndarray:
    grid = mrml.VolumeGrid.fromNodes(volume_node, segmentation_node)
    return grid.readSegment(segmentation_node, segment_id, grid.fullExtent)


def add_segment(volume_node, segmentation_node, name, mask, color=(0.2, 0.8, 0.2)) -> str:
    if not mrml.referenceGeometryImage(segmentation_node):
        grid = mrml.VolumeGrid.fromNodes(volume_node, segmentation_node)
        segmentation_node.GetSegmentation().SetConversionParameter(
            slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(), mrml.serializeGeometry(grid))
    segment_id = segmentation_node.GetSegmentation().AddEmptySegment("", name, list(color))
    grid = mrml.VolumeGrid.fromNodes(volume_node, segmentation_node)
    grid.writeSegment(segmentation_node, segment_id, grid.fullExtent, mask)
    return segment_id


def snapshot(volume_node, segmentation_node) -> dict:
    """Everything an edit may change: segment IDs, names, colours and voxels, and the reference geometry."""
    segmentation = segmentation_node.GetSegmentation()
    state = {"geometry": segmentation.GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())}
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segment_id)
        state[segment_id] = (segment.GetName(), tuple(segment.GetColor()),
                             segment_array(volume_node, segmentation_node, segment_id).tobytes())
    return state


def one_line(error) -> str:
    message = str(error.value if hasattr(error, "value") else error)
    assert message and "\n" not in message
    return message


# ---- fixtures -------------------------------------------------------------------------------------------------------
@pytest.fixture()
def scene():
    scene = slicer.vtkMRMLScene()
    segmentations_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations_logic.SetMRMLScene(scene)
    yield scene
    segmentations_logic.SetMRMLScene(None)
    scene.Clear(1)


@pytest.fixture(scope="module")
def logic(lite_engine):
    logic = SegMoTESlicerLogic(engine=lite_engine)
    logic.setIntensityMode("display")  # these tests set the lung window on the display; the default is "auto"
    logic.sliceOnly = True  # the prompted slice with its prompts (the 3-D default: tests/test_slicer_gestures.py)
    yield logic
    logic.shutdown()


@pytest.fixture(scope="module", autouse=True)
def fresh_embeddings(lite_engine):
    """Embeddings cached by other test modules may come from another torch thread count (last-bit differences)
    and would hide what these tests count (prefetching): start this module with an empty cache."""
    lite_engine.cache.clear()


@pytest.fixture(scope="module")
def chest(chest_ct, chest_truth):
    array, ijk_to_ras = crop(chest_ct, K0, K1)
    truth = {name: mask[K0:K1].copy() for name, mask in chest_truth.items()}
    return array, ijk_to_ras, truth


@pytest.fixture()
def chest_scene(scene, chest):
    """Chest CT crop + an empty segmentation + a 'left lung' segment that must never change."""
    array, ijk_to_ras, truth = chest
    volume = add_volume(scene, array, ijk_to_ras)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    segmentation.CreateDefaultDisplayNodes()
    left = add_segment(volume, segmentation, "left lung (manual)", truth["left lung"])
    return volume, segmentation, left


# ---- the main cases ------------------------------------------------------------------------------------------------
def test_roi_around_a_lung_lands_on_the_ground_truth(logic, scene, chest, chest_scene, monkeypatch):
    import threading

    from segmote_core.engine import Engine

    model_threads = set()  # the threads that prompted the engine: one, and not Slicer's (this test's) thread
    open_session = Engine.open

    def recording(self, *args, **kwargs):
        model_threads.add(threading.get_ident())
        return open_session(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "open", recording)
    array, ijk_to_ras, truth = chest
    volume, segmentation, left = chest_scene
    before_left = segment_array(volume, segmentation, left).copy()
    box = bounding_box_ijk(truth["right lung"])
    roi = add_roi(scene, ijk_to_ras, box)
    start = time.perf_counter()
    segment_id = logic.segmentWithPrompts(volume, segmentation, roiNode=roi)
    TIMINGS["3-D box, 5 slices, cold"] = time.perf_counter() - start
    result = segment_array(volume, segmentation, segment_id)
    score = dice(result, truth["right lung"])
    print(f"\nright lung, 3-D ROI: Dice {score:.3f}")
    assert score >= 0.90
    assert np.array_equal(segment_array(volume, segmentation, left), before_left), "another segment changed"
    assert segmentation.GetSegmentation().GetSegment(segment_id).GetName() == "SegMoTE 1"
    # Nothing outside the box's slices and the box (grown to the result) was written.
    assert not result[:, :, : box[0] - 3].any() and not result[:, :, box[3] + 4:].any()
    assert len(model_threads) == 1 and threading.get_ident() not in model_threads


def test_oblique_volume_and_rotated_box(logic, scene, chest_ct, chest_truth):
    """A volume whose voxel axes are rotated 20 degrees in RAS; the ROI is the rotated voxel box."""
    array, ijk_to_ras = crop(chest_ct, *OBLIQUE_K)
    oblique = rotation(0, 20.0) @ ijk_to_ras  # tilt about R-L
    truth = chest_truth["right lung"][OBLIQUE_K[0]:OBLIQUE_K[1]]
    volume = add_volume(scene, array, oblique)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    roi = add_roi(scene, oblique, bounding_box_ijk(truth))
    assert logic.resolveAxis(volume) == 2
    start = time.perf_counter()
    segment_id = logic.segmentWithPrompts(volume, segmentation, roiNode=roi)
    TIMINGS["3-D box on an oblique volume, 3 slices, cold"] = time.perf_counter() - start
    score = dice(segment_array(volume, segmentation, segment_id), truth)
    print(f"\nright lung, oblique volume: Dice {score:.3f}")
    assert score >= 0.90
    # The segmentation took the oblique grid: its labelmap is not resampled to RAS axes.
    reference = mrml.referenceGeometryImage(segmentation)
    assert mrml.VolumeGrid.fromNodes(volume, segmentation).imageGeometryAligned(reference)


def test_parent_transforms_on_volume_roi_and_points(logic, lite_engine, scene, chest, chest_ct):
    """Volume and prompts under different linear transforms; the segmentation under none."""
    array, ijk_to_ras, truth = chest
    to_volume = rotation(1, 15.0)
    to_volume[:3, 3] = [40.0, -25.0, 12.0]
    volume_transform = add_transform(scene, to_volume, "volume transform")
    prompt_transform = add_transform(scene, rotation(2, -30.0) @ rotation(0, 10.0), "prompt transform")
    volume = add_volume(scene, array, ijk_to_ras, parent=volume_transform)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    ijk_to_world = to_volume @ ijk_to_ras
    roi = add_roi(scene, ijk_to_world, bounding_box_ijk(truth["left lung"]), parent=prompt_transform)
    start = time.perf_counter()
    segment_id = logic.segmentWithPrompts(volume, segmentation, roiNode=roi)
    TIMINGS["3-D box under transforms (embeddings cached)"] = time.perf_counter() - start
    score = dice(segment_array(volume, segmentation, segment_id), truth["left lung"])
    print(f"\nleft lung, volume and ROI under transforms: Dice {score:.3f}")
    assert score >= 0.90

    # A point prompt under the prompt transform lands on its slice of the transformed volume.
    k = 2
    ys, xs = np.nonzero(truth["left lung"][k])
    inside = [float(xs[len(xs) // 2]), float(ys[len(ys) // 2]), float(k)]
    positives = add_points(scene, ijk_to_world, [inside], parent=prompt_transform, name="positive")
    flat = bounding_box_ijk(truth["left lung"][k:k + 1])
    flat_roi = add_roi(scene, ijk_to_world, [flat[0], flat[1], k, flat[3], flat[4], k], parent=prompt_transform)
    slice_segment = logic.segmentWithPrompts(volume, segmentation, roiNode=flat_roi, positivePointsNode=positives)
    result = segment_array(volume, segmentation, slice_segment)
    assert result[k].any() and not np.delete(result, k, axis=0).any()
    # Exactly what the engine gives for the same prompt in voxel indices on the untransformed volume: the
    # transforms were undone exactly. (Its Dice is the model's business: LiteMedSAM was trained on boxes only,
    # and a point inside the box lowers its Dice on this slice from 0.93 to 0.75.)
    direct = lite_engine.segment(chest_volume(chest_ct), box_ijk=[flat[0], flat[1], k, flat[3], flat[4], k],
                                 points_ijk=[inside], point_labels=[1], window=LUNG_WINDOW)
    assert np.array_equal(result, direct)


def test_point_prompt_replaces_only_its_slice_and_undo_restores(logic, lite_engine, scene, chest, chest_scene,
                                                                chest_ct):
    array, ijk_to_ras, truth = chest
    volume, segmentation, left = chest_scene
    right = truth["right lung"]
    # The target segment already holds the right lung on every slice; slice k is then re-done by the AI.
    target = add_segment(volume, segmentation, "right lung", right)
    k = 3
    ys, xs = np.nonzero(right[k])
    flat = bounding_box_ijk(right[k:k + 1])
    roi = add_roi(scene, ijk_to_ras, [flat[0], flat[1], k, flat[3], flat[4], k])
    inside, air = [xs[len(xs) // 2], ys[len(ys) // 2], k], [5.0, 5.0, k]
    positives = add_points(scene, ijk_to_ras, [inside], name="positive")
    negatives = add_points(scene, ijk_to_ras, [air], name="negative")  # outside the body
    before = snapshot(volume, segmentation)
    start = time.perf_counter()
    returned = logic.segmentWithPrompts(volume, segmentation, target, roiNode=roi, positivePointsNode=positives,
                                        negativePointsNode=negatives, activePoint=(positives, 0))
    TIMINGS["2-D box + points on one slice (embedding cached)"] = time.perf_counter() - start
    assert returned == target
    after = segment_array(volume, segmentation, target)
    untouched = [i for i in range(after.shape[0]) if i != k]
    assert np.array_equal(after[untouched], right[untouched]), "slices without prompts changed"
    direct = lite_engine.segment(chest_volume(chest_ct), box_ijk=[flat[0], flat[1], k, flat[3], flat[4], k],
                                 points_ijk=[inside, air], point_labels=[1, 0], window=LUNG_WINDOW)
    assert np.array_equal(after[k], direct[k])
    print(f"\nright lung, 2-D box + positive and negative point on one slice: Dice {dice(after[k], right[k]):.3f}")
    assert dice(after[k], right[k]) >= 0.80
    assert snapshot(volume, segmentation)[left] == before[left], "another segment changed"
    assert logic.canUndo(segmentation)
    assert logic.undo(segmentation) is True
    assert snapshot(volume, segmentation) == before
    assert logic.undo(segmentation) is False  # chest_scene's own segments were not AI edits


def test_propagation_from_one_slice(logic, scene, chest, chest_scene):
    array, ijk_to_ras, truth = chest
    volume, segmentation, _ = chest_scene
    k = 2
    flat = bounding_box_ijk(truth["right lung"][k:k + 1])
    roi = add_roi(scene, ijk_to_ras, [flat[0], flat[1], k, flat[3], flat[4], k])
    segment_id = logic.segmentWithPrompts(volume, segmentation, roiNode=roi, propagate=True, axis="Red")
    result = segment_array(volume, segmentation, segment_id)
    score = dice(result, truth["right lung"])
    print(f"\nright lung, 2-D box on one slice + propagation: Dice {score:.3f}")
    assert result.any(axis=(1, 2)).sum() >= 4 and score >= 0.85


def test_prefetch_embeds_the_neighbouring_slices_for_the_next_prompt(logic, lite_engine, scene, chest):
    """On a GPU the logic embeds the slices around a prompted one in the background (here forced on the CPU)."""
    array, ijk_to_ras, truth = chest
    volume = add_volume(scene, array, ijk_to_ras, window=(-650.0, 700.0))  # its own cache entries
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    boxes = {k: bounding_box_ijk(truth["right lung"][k:k + 1]) for k in (2, 4)}
    logic.prefetchNeighbours = True
    try:
        misses = lite_engine.cache.misses
        roi = add_roi(scene, ijk_to_ras, [boxes[2][0], boxes[2][1], 2, boxes[2][3], boxes[2][4], 2])
        logic.segmentWithPrompts(volume, segmentation, roiNode=roi)
        lite_engine.wait_prefetch()
        assert lite_engine.cache.misses - misses == array.shape[0]  # the prompted slice + its 4 neighbours
        logic.prefetchNeighbours = False
        roi = add_roi(scene, ijk_to_ras, [boxes[4][0], boxes[4][1], 4, boxes[4][3], boxes[4][4], 4], name="next")
        segment_id = logic.segmentWithPrompts(volume, segmentation, roiNode=roi)
        assert lite_engine.cache.misses - misses == array.shape[0]  # the next slice was ready
        assert dice(segment_array(volume, segmentation, segment_id)[4], truth["right lung"][4]) >= 0.8
    finally:
        logic.prefetchNeighbours = None
        lite_engine.stop_prefetch()


def test_overwrite_masks_other_segments_and_undo_gives_them_back(logic, scene, chest, chest_scene):
    array, ijk_to_ras, truth = chest
    volume, segmentation, left = chest_scene
    # A sloppy manual segment covering the right lung's area on one slice.
    k = 1
    sloppy = np.zeros_like(truth["right lung"])
    sloppy[k] = truth["right lung"][k] | np.roll(truth["right lung"][k], 3, axis=1)
    other = add_segment(volume, segmentation, "sloppy", sloppy)
    before = snapshot(volume, segmentation)
    flat = bounding_box_ijk(truth["right lung"][k:k + 1])
    roi = add_roi(scene, ijk_to_ras, [flat[0], flat[1], k, flat[3], flat[4], k])
    new_id = logic.segmentWithPrompts(volume, segmentation, roiNode=roi, overwrite=True)
    new = segment_array(volume, segmentation, new_id)
    after_other = segment_array(volume, segmentation, other)
    assert new[k].any() and not (new & after_other).any()
    assert np.array_equal(after_other, sloppy & ~new)
    # the left lung loses exactly the voxels the new segment took (at the lungs' junction the box's answer can take
    # a few voxels labelled left lung), and keeps its name and colour
    assert np.array_equal(segment_array(volume, segmentation, left), truth["left lung"] & ~new)
    assert snapshot(volume, segmentation)[left][:2] == before[left][:2]
    assert logic.undo(segmentation)
    assert snapshot(volume, segmentation) == before


def test_async_job_is_polled_on_the_calling_thread(logic, scene, chest, chest_scene):
    array, ijk_to_ras, truth = chest
    volume, segmentation, _ = chest_scene
    k = 4
    flat = bounding_box_ijk(truth["left lung"][k:k + 1])
    roi = add_roi(scene, ijk_to_ras, [flat[0], flat[1], k, flat[3], flat[4], k])
    seen = []
    job = logic.startSegmentWithPrompts(volume, segmentation, roiNode=roi, onDone=seen.append)
    deadline = time.monotonic() + 120
    while not job.poll():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert job.error is None and seen == [job.result]
    assert segment_array(volume, segmentation, job.result)[k].any()
    assert job.summary  # "1 slice(s) in 0.12 s (lite_medsam on cpu)"


def test_cancel_leaves_everything_unchanged(logic, scene, chest, chest_scene):
    array, ijk_to_ras, truth = chest
    volume, segmentation, _ = chest_scene
    target = add_segment(volume, segmentation, "right lung", truth["right lung"])
    roi = add_roi(scene, ijk_to_ras, bounding_box_ijk(truth["right lung"]))
    before = snapshot(volume, segmentation)
    flag = {"cancel": False, "progress": 0}

    def progress(done, total):
        flag["progress"] += 1
        flag["cancel"] = True  # the user presses Cancel once work has started

    with pytest.raises(Cancelled) as error:
        logic.segmentWithPrompts(volume, segmentation, target, roiNode=roi, progress=progress,
                                 cancel=lambda: flag["cancel"])
    one_line(error)
    assert flag["progress"] >= 1
    assert snapshot(volume, segmentation) == before
    assert not logic.canUndo(segmentation)


def test_saved_segmentation_reads_back_with_slicerio(logic, scene, chest, chest_scene, tmp_path):
    import slicerio

    array, ijk_to_ras, truth = chest
    volume, segmentation, left = chest_scene
    roi = add_roi(scene, ijk_to_ras, bounding_box_ijk(truth["right lung"]))
    segment_id = logic.segmentWithPrompts(volume, segmentation, roiNode=roi)
    in_memory = segment_array(volume, segmentation, segment_id)
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    path = tmp_path / "lungs.seg.nrrd"
    storage.SetFileName(str(path))
    assert storage.WriteData(segmentation)
    saved = slicerio.read_segmentation(str(path))
    names = {s["name"]: s["id"] for s in saved["segments"]}
    assert set(names) == {"SegMoTE 1", "left lung (manual)"}
    # slicerio gives IJK-ordered voxels on the saved grid, which must be the volume's grid.
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    assert np.allclose(lps_to_ras @ np.asarray(saved["ijkToLPS"]), ijk_to_ras, atol=1e-4)
    read = np.transpose(slicerio.segment_mask(saved, names["SegMoTE 1"]), (2, 1, 0)).astype(bool)
    assert read.shape == in_memory.shape
    assert dice(read, in_memory) == 1.0 and in_memory.any()
    read_left = np.transpose(slicerio.segment_mask(saved, names["left lung (manual)"]), (2, 1, 0)).astype(bool)
    assert np.array_equal(read_left, truth["left lung"])


# ---- bad input: one line, scene untouched -------------------------------------------------------------------------
def bad_input_cases():
    def no_volume(ctx):
        return ctx["logic"].segmentWithPrompts(None, ctx["segmentation"], roiNode=ctx["roi"])

    def two_d(ctx):
        node = add_volume(ctx["scene"], ctx["array"][:1], ctx["ijk_to_ras"], name="one slice")
        return ctx["logic"].segmentWithPrompts(node, ctx["segmentation"], roiNode=ctx["roi"])

    def four_d(ctx):
        node = ctx["scene"].AddNewNodeByClass("vtkMRMLVectorVolumeNode", "colour")
        slicer.util.updateVolumeFromArray(node, np.zeros(ctx["array"].shape + (3,), np.uint8))
        node.SetIJKToRASMatrix(mrml.matrixFromArray(ctx["ijk_to_ras"]))
        return ctx["logic"].segmentWithPrompts(node, ctx["segmentation"], roiNode=ctx["roi"])

    def no_prompt(ctx):
        empty = ctx["scene"].AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "no points")
        return ctx["logic"].segmentWithPrompts(ctx["volume"], ctx["segmentation"], positivePointsNode=empty)

    def point_outside(ctx):
        points = add_points(ctx["scene"], ctx["ijk_to_ras"], [[300.0, 10.0, 1.0]], name="outside")
        return ctx["logic"].segmentWithPrompts(ctx["volume"], ctx["segmentation"], positivePointsNode=points)

    def box_outside(ctx):
        far = add_roi(ctx["scene"], ctx["ijk_to_ras"], [400, 400, 1, 450, 450, 3], name="far box")
        return ctx["logic"].segmentWithPrompts(ctx["volume"], ctx["segmentation"], roiNode=far)

    def other_grid(ctx):
        coarse = ctx["ijk_to_ras"].copy()
        coarse[:3, :3] *= 2.0
        node = add_volume(ctx["scene"], ctx["array"][:, ::2, ::2].copy(), coarse, name="downsampled")
        return ctx["logic"].segmentWithPrompts(node, ctx["segmentation"], roiNode=ctx["roi"])

    def missing_segment(ctx):
        return ctx["logic"].segmentWithPrompts(ctx["volume"], ctx["segmentation"], "no-such-id", roiNode=ctx["roi"])

    def adapter_for_another_backbone(ctx):
        return ctx["logic"].autoSegment(ctx["volume"], ctx["segmentation"], ctx["tiny_adapter"])

    def out_of_gpu_memory(ctx, monkeypatch):
        import torch

        def explode(*args, **kwargs):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.8 GiB "
                                              "total capacity)\nsee the PyTorch docs")

        monkeypatch.setattr(ctx["logic"]._engine, "open", explode)  # every prompt goes through a session
        return ctx["logic"].segmentWithPrompts(ctx["volume"], ctx["segmentation"], roiNode=ctx["roi"])

    return {
        "no volume": (no_volume, "select an input volume"),
        "2-D volume": (two_d, "2-D"),
        "4-D / vector volume": (four_d, "values per voxel"),
        "no prompt": (no_prompt, "no prompt"),
        "point outside the volume": (point_outside, "outside volume"),
        "box outside the volume": (box_outside, "outside volume"),
        "segmentation on another grid": (other_grid, "another voxel grid"),
        "missing target segment": (missing_segment, "no segment"),
        "adapter for another backbone": (adapter_for_another_backbone, "trained for sam_vit_tiny"),
        "CUDA out of memory": (out_of_gpu_memory, "out of GPU memory"),
    }


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory):
    from segmote_core.adapters import save_adapter
    from segmote_core.models.backbones import build_tiny_sam_vit
    from segmote_core.models.segmote import SegMoTE, SegMoTEConfig

    model = SegMoTE(build_tiny_sam_vit(), SegMoTEConfig(num_classes=1, expert_rank=4))
    return save_adapter(tmp_path_factory.mktemp("adapter") / "tiny.safetensors", model, ["lesion"],
                        {"kind": "window", "level": 40.0, "width": 400.0}, backbone_sha256=None)


@pytest.mark.parametrize("case", list(bad_input_cases()))
def test_bad_input_raises_one_line_and_leaves_the_scene_alone(case, logic, scene, chest, chest_scene, tiny_adapter,
                                                              monkeypatch):
    array, ijk_to_ras, truth = chest
    volume, segmentation, _ = chest_scene
    roi = add_roi(scene, ijk_to_ras, bounding_box_ijk(truth["right lung"]))
    ctx = {"logic": logic, "scene": scene, "array": array, "ijk_to_ras": ijk_to_ras, "volume": volume,
           "segmentation": segmentation, "roi": roi, "tiny_adapter": tiny_adapter}
    run, expected = bad_input_cases()[case]
    before = snapshot(volume, segmentation)
    undo_before = logic.canUndo(segmentation)
    with pytest.raises(SegMoTEError) as error:
        run(ctx, monkeypatch) if run.__code__.co_argcount == 2 else run(ctx)
    message = one_line(error)
    assert expected in message, message
    assert snapshot(volume, segmentation) == before
    assert logic.canUndo(segmentation) == undo_before
    assert logic.adapterPath is None  # a refused adapter is not kept


def test_only_negative_points_do_nothing(logic, scene, chest, chest_scene):
    array, ijk_to_ras, truth = chest
    volume, segmentation, _ = chest_scene
    negatives = add_points(scene, ijk_to_ras, [[60.0, 60.0, 2.0]], name="negative")
    before = snapshot(volume, segmentation)
    with pytest.raises(SegMoTEError, match="no prompt"):
        logic.segmentWithPrompts(volume, segmentation, negativePointsNode=negatives)
    assert snapshot(volume, segmentation) == before


def test_failed_write_is_rolled_back(logic, scene, chest, chest_scene, monkeypatch):
    """If Slicer refuses a write half-way (here: the second segment), the first one is restored."""
    array, ijk_to_ras, truth = chest
    volume, segmentation, left = chest_scene
    k = 1
    sloppy = np.zeros_like(truth["right lung"])
    sloppy[k] = truth["right lung"][k]
    add_segment(volume, segmentation, "sloppy", sloppy)
    before = snapshot(volume, segmentation)
    flat = bounding_box_ijk(truth["right lung"][k:k + 1])
    roi = add_roi(scene, ijk_to_ras, [flat[0], flat[1], k, flat[3], flat[4], k])
    original = mrml.VolumeGrid.writeSegment
    calls = {"n": 0}

    def flaky(self, *args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk full")
        return original(self, *args)

    monkeypatch.setattr(mrml.VolumeGrid, "writeSegment", flaky)
    with pytest.raises(SegMoTEError) as error:
        logic.segmentWithPrompts(volume, segmentation, roiNode=roi, overwrite=True)
    assert "disk full" in one_line(error)
    monkeypatch.setattr(mrml.VolumeGrid, "writeSegment", original)
    assert snapshot(volume, segmentation) == before
    assert not logic.canUndo(segmentation)


def test_failed_first_write_leaves_a_new_segmentation_without_geometry(logic, scene, chest, monkeypatch):
    array, ijk_to_ras, truth = chest
    volume = add_volume(scene, array, ijk_to_ras)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "fresh")
    k = 2
    flat = bounding_box_ijk(truth["left lung"][k:k + 1])
    roi = add_roi(scene, ijk_to_ras, [flat[0], flat[1], k, flat[3], flat[4], k])
    monkeypatch.setattr(mrml.VolumeGrid, "writeSegment", lambda self, *args: (_ for _ in ()).throw(OSError("no")))
    with pytest.raises(SegMoTEError):
        logic.segmentWithPrompts(volume, segmentation, roiNode=roi)
    assert snapshot(volume, segmentation) == {"geometry": ""}


# ---- automatic segmentation ------------------------------------------------------------------------------------------
def test_auto_segment_writes_one_segment_per_class_and_undo_removes_them(scene, chest, lite_engine, tmp_path,
                                                                          monkeypatch):
    """Write path of automatic segmentation (the engine's class masks are stubbed: a random adapter finds nothing).

    Uses its own Logic: loading an adapter changes the engine, and the shared session engine must stay plain."""
    from segmote_core.adapters import save_adapter
    from segmote_core.models.segmote import SegMoTE, SegMoTEConfig
    from segmote_core.segmentation_io import Segment

    array, ijk_to_ras, truth = chest
    model = SegMoTE(lite_engine.backbone, SegMoTEConfig(num_classes=2, expert_rank=4))
    adapter = save_adapter(tmp_path / "lungs.safetensors", model, ["right lung", ("left lung", (0.1, 0.2, 0.9))],
                           {"kind": "window", "level": -700.0, "width": 600.0},
                           backbone_sha256=lite_engine.backbone.weights_sha256)
    own = SegMoTESlicerLogic()
    own.setDevice("cpu")
    volume = add_volume(scene, array, ijk_to_ras)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    existing = add_segment(volume, segmentation, "left lung", np.zeros_like(truth["left lung"]))
    before = snapshot(volume, segmentation)
    users_tag = vtk.reference("")
    segmentation.GetSegmentation().GetSegment(existing).GetTag("TerminologyEntry", users_tag)
    calls = {}

    def fake_auto(self, vol, classes=None, axis=None, window=None, progress=None, cancel=None, **kwargs):
        calls.update(classes=classes, axis=axis, window=window, adapter=self.adapter_header["classes"])
        return [Segment("right lung", truth["right lung"], (0.9, 0.3, 0.25)),
                Segment("left lung", truth["left lung"], (0.1, 0.2, 0.9)),
                ]

    from segmote_core.engine import Engine

    monkeypatch.setattr(Engine, "auto", fake_auto)
    try:
        written = own.autoSegment(volume, segmentation, adapter)
    finally:
        own.shutdown()
    names = [segmentation.GetSegmentation().GetSegment(i).GetName() for i in written]
    assert names == ["right lung", "left lung"]
    assert written[1] == existing  # same name: replaced, not duplicated
    assert calls["window"] is None  # the adapter's own normalisation rule wins over the display window
    assert calls["axis"] == 2
    assert np.array_equal(segment_array(volume, segmentation, written[0]), truth["right lung"])
    assert np.array_equal(segment_array(volume, segmentation, written[1]), truth["left lung"])
    # The new segment carries its SNOMED CT codes (lung, right), as the CLI's files do; the user's segment keeps its own.
    tag, kept = vtk.reference(""), vtk.reference("")
    assert segmentation.GetSegmentation().GetSegment(written[0]).GetTag("TerminologyEntry", tag)
    assert "SCT^39607008^Lung" in str(tag) and "SCT^24028007^Right" in str(tag)
    segmentation.GetSegmentation().GetSegment(written[1]).GetTag("TerminologyEntry", kept)
    assert str(kept) == str(users_tag)
    assert own.undo(segmentation)
    assert snapshot(volume, segmentation) == before


def test_resolve_axis_follows_views_and_world_directions(logic, scene, chest):
    array, ijk_to_ras, _ = chest
    volume = add_volume(scene, array, ijk_to_ras)
    assert [logic.resolveAxis(volume, a) for a in ("Red", "Yellow", "Green", None, 1)] == [2, 0, 1, 2, 1]
    # A sagittal acquisition stored with K along R: the red (axial) view slices along J.
    sagittal = ijk_to_ras[:, [1, 2, 0, 3]]
    node = add_volume(scene, array, sagittal, name="sagittal")
    assert [logic.resolveAxis(node, a) for a in ("S", "R", "A")] == [1, 2, 0]


def test_timings_report():
    """Not a check: prints the timings measured above (pytest -s shows them)."""
    for name, seconds in TIMINGS.items():
        print(f"{name}: {seconds:.2f} s")


def test_the_view_a_prompt_is_placed_in_decides_the_axis(logic, scene, chest):
    array, ijk_to_ras, _ = chest
    volume = add_volume(scene, array, ijk_to_ras)
    views = {}
    for name, columns, offset in (("Red", [[1, 0, 0], [0, 1, 0], [0, 0, 1]], [0, 0, -300.0]),
                                  ("Yellow", [[0, 1, 0], [0, 0, 1], [1, 0, 0]], [-30.0, 0, 0]),
                                  ("Green", [[1, 0, 0], [0, 0, 1], [0, 1, 0]], [0, 12.0, 0])):
        node = scene.AddNewNodeByClass("vtkMRMLSliceNode", name)
        node.SetLayoutName(name)
        matrix = np.eye(4)
        matrix[:3, :3] = np.array(columns, float).T  # columns: in-plane x, in-plane y, normal
        matrix[:3, 3] = offset
        node.GetSliceToRAS().DeepCopy(mrml.matrixFromArray(matrix))
        node.UpdateMatrices()
        views[name] = node
    assert logic.sliceViewOfPoint(scene, [5.0, 7.0, -300.0]) is views["Red"]
    assert logic.sliceViewOfPoint(scene, [-30.0, 7.0, -290.0]) is views["Yellow"]
    assert logic.sliceViewOfPoint(scene, [4.0, 12.0, -250.0]) is views["Green"]
    assert logic.sliceViewOfPoint(scene, [4.0, 40.0, -250.0]) is None
    assert [logic.resolveAxis(volume, views[n]) for n in ("Red", "Yellow", "Green")] == [2, 0, 1]
    # The view's actual orientation counts, not its name: a yellow view turned axial slices along K.
    views["Yellow"].GetSliceToRAS().DeepCopy(views["Red"].GetSliceToRAS())
    assert logic.resolveAxis(volume, "Yellow") == 2


def test_the_model_window_is_automatic_by_default_and_the_panel_says_which(lite_engine, scene, chest, chest_scene):
    """Automatic: the CT window the backbone declares, whatever the display shows; as displayed and custom: what
    the user chose. The job's summary (the panel's status line) names the rule and the predicted IoU."""
    array, ijk_to_ras, truth = chest
    volume, segmentation, _ = chest_scene
    roi = add_roi(scene, ijk_to_ras, bounding_box_ijk(truth["right lung"] & (np.arange(array.shape[0]) == 2)[:, None,
                                                                                                            None]))
    logic = SegMoTESlicerLogic(engine=lite_engine)
    try:
        assert logic.intensityMode == "auto"
        summaries = {}
        for mode, window in (("auto", None), ("display", None), ("custom", (40.0, 400.0))):
            logic.setIntensityMode(mode, window)
            job = logic.startSegmentWithPrompts(volume, segmentation, roiNode=roi)
            job.wait(600)
            summaries[mode] = job.summary
            assert "predicted IoU" in job.summary
        assert "automatic: CT" in summaries["auto"], summaries["auto"]
        assert f"L{LUNG_WINDOW[0]:g} W{LUNG_WINDOW[1]:g}" in summaries["display"], summaries["display"]
        assert "L40 W400" in summaries["custom"], summaries["custom"]
        with pytest.raises(SegMoTEError):
            logic.setIntensityMode("custom", (40.0, 0.0))
    finally:
        logic.shutdown()
