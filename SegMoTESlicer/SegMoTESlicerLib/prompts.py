"""PromptController: markups placed with the mouse in Slicer's views -> one model run per completed prompt.

What a clinician does, and what it must mean (Slicer's markups widgets fire node events for each of these):

* **Box**: Slicer places an ROI with click - move - click. After the first click the box is a single point of size 0;
  while the mouse moves a preview corner follows it (a PointModifiedEvent per move); the second click collapses it to
  its centre. Only then is the box complete. Slicer pads the box's size along the view's normal to its smallest
  in-plane size, so a box drawn in one view is geometrically thick; it is still a **2-D box on the slice it was
  drawn on**. It becomes a 3-D box only when the user changes that thickness on purpose (dragging its handles in
  another view). Once a box is complete, the next placement goes into a new ROI node; that node becomes the box
  prompt and the old box is removed (one box at a time).
* **Points**: persistent place mode; each click (PointPositionDefinedEvent) is one run on that point's slice, in the
  view it was clicked in.
* **Dragging** a point or a box handle fires a PointModifiedEvent per mouse move between PointStartInteractionEvent
  and PointEndInteractionEvent: it runs once, when the drag ends.

PointModifiedEvent alone never starts a run. Each completed prompt is one run and one undo step; prompts completed
while a run is busy wait in a queue. Nothing here imports Qt: the panel forwards its buttons, shortcuts and timer
here, and the tests drive this class through Slicer's real interaction code.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import slicer
import vtk

from segmote_core.errors import SegMoTEError

from . import segments as mrml

PROMPT_KINDS = ("positive", "negative", "box")
PROMPT_NAMES = {"positive": "SegMoTE include", "negative": "SegMoTE exclude", "box": "SegMoTE box"}
PROMPT_COLORS = {"positive": (0.25, 0.85, 0.3), "negative": (0.95, 0.25, 0.2), "box": (0.95, 0.8, 0.2)}
PLANE_TOLERANCE_MM = 0.05  # a placed markup lies on its view's plane to ~1e-3 mm
THICKNESS_TOLERANCE_MM = 0.01

log = logging.getLogger("SegMoTE")


@dataclass
class Trigger:
    """A completed prompt: which node (and control point) it was, and the view it was placed in."""

    node: object
    index: int
    viewNode: object | None = None  # vtkMRMLSliceNode; None: decided from the volume (closest to axial)
    flatBox: bool = False  # the box is a 2-D box on the slice of viewNode


class PromptController:
    """Owns the three prompt nodes (include points, exclude points, box), observes them and runs the Logic.

    scene, markupsLogic, interactionNode, selectionNode: Slicer's (``slicer.mrmlScene``,
    ``slicer.modules.markups.logic()``, ``slicer.app.applicationLogic().GetInteractionNode()`` /
    ``.GetSelectionNode()``), or a headless scene's. ``target()`` returns (volumeNode, segmentationNode) for the
    next run; ``segmentId`` is the segment runs write into (None: a new one, which then becomes the target).
    """

    def __init__(self, logic, scene, markupsLogic, interactionNode, selectionNode, *,
                 target: Callable[[], tuple] | None = None, onNodesChanged: Callable[[dict], None] | None = None,
                 onRunStarted: Callable[[object], None] | None = None,
                 onRunFinished: Callable[[object], None] | None = None,
                 beforeApply: Callable[[], None] | None = None):
        self.logic = logic
        self.scene = scene
        self.markupsLogic = markupsLogic
        self.interactionNode = interactionNode
        self.selectionNode = selectionNode
        self.target = target
        self.onNodesChanged = onNodesChanged
        self.onRunStarted = onRunStarted
        self.onRunFinished = onRunFinished
        self.beforeApply = beforeApply
        self.autoUpdate = True
        self.segmentId: str | None = None
        self.nodes: dict[str, object] = {kind: None for kind in PROMPT_KINDS}
        self.job = None
        self.queue: list[Trigger] = []
        self.promptsCompleted = 0  # prompts finished by the user (each is queued for one run)
        self.runsStarted = 0
        self.lastError: SegMoTEError | None = None
        self._boxView = None  # slice node the current box was drawn in (None: 3-D or not drawn by mouse)
        self._boxThickness = None  # its size along that view's normal when drawn
        self._replacedBoxes: list = []  # earlier box nodes, removed once the new box is complete
        self._dragging: dict = {}  # node being dragged -> index of the control point it moves
        self._observations: list[tuple[object, int]] = []
        self._sceneObservation = None
        self._selectionObservation = None
        self._activePlaceNode = self._previousActive = None  # IDs, to tell where a new ROI node came from
        self.active = False

    # ---- nodes -----------------------------------------------------------------------------------------------
    def setNodes(self, positive=None, negative=None, box=None) -> None:
        """Use these nodes as prompts (from the parameter node); observers follow when active."""
        nodes = {"positive": positive, "negative": negative, "box": box}
        if nodes["box"] is not self.nodes["box"]:
            self._boxView = self._boxThickness = None
        self.nodes = nodes
        if self.active:
            self._observeNodes()

    def ensureNodes(self) -> dict:
        """Create whichever prompt node is missing (coloured, named) and observe it."""
        created = False
        for kind in PROMPT_KINDS:
            node = self.nodes[kind]
            if node is not None and node.GetScene() is self.scene:
                continue
            className = "vtkMRMLMarkupsROINode" if kind == "box" else "vtkMRMLMarkupsFiducialNode"
            node = self.scene.AddNewNodeByClass(className, PROMPT_NAMES[kind])
            node.CreateDefaultDisplayNodes()
            display = node.GetDisplayNode()
            display.SetSelectedColor(*PROMPT_COLORS[kind])
            display.SetColor(*PROMPT_COLORS[kind])
            if kind != "box":
                display.SetPointLabelsVisibility(False)
                node.SetControlPointLabelFormat("+" if kind == "positive" else "-")
            self.nodes[kind] = node
            created = True
        if self.active:
            self._observeNodes()
        if created and self.onNodesChanged is not None:
            self.onNodesChanged(dict(self.nodes))
        return dict(self.nodes)

    # ---- placing (buttons and shortcuts) ------------------------------------------------------------------
    def startPlacing(self, kind: str) -> None:
        """Place include/exclude points (one run per click, place mode stays on) or one box."""
        if kind not in PROMPT_KINDS:
            raise ValueError(f"unknown prompt kind {kind!r}")
        node = self.ensureNodes()[kind]
        if kind == "box" and node.GetNumberOfControlPoints():
            node.RemoveAllControlPoints()  # a new box replaces the old one, in the same node
            self._boxView = self._boxThickness = None
        self.markupsLogic.SetActiveList(node)
        self.interactionNode.SetPlaceModePersistence(0 if kind == "box" else 1)
        self.interactionNode.SetCurrentInteractionMode(self.interactionNode.Place)

    def stopPlacing(self) -> None:
        if self.interactionNode.GetCurrentInteractionMode() == self.interactionNode.Place:
            self.interactionNode.SetCurrentInteractionMode(self.interactionNode.ViewTransform)

    def clearPrompts(self) -> None:
        for node in self.nodes.values():
            if node is not None:
                node.RemoveAllControlPoints()
        self._boxView = self._boxThickness = None

    def cancel(self) -> None:
        """Esc: leave place mode, drop waiting prompts and cancel the running job (the scene stays as it was)."""
        self.stopPlacing()
        self.queue.clear()
        if self.job is not None:
            self.job.cancel()

    # ---- activation (module enter / exit) -------------------------------------------------------------------
    def activate(self) -> None:
        self.active = True
        self._observeNodes()
        if self._sceneObservation is None:
            self._sceneObservation = self.scene.AddObserver(self.scene.NodeAddedEvent, self._onNodeAdded)
            self._activePlaceNode = self.selectionNode.GetActivePlaceNodeID()
            self._selectionObservation = self.selectionNode.AddObserver(
                self.selectionNode.ActivePlaceNodeIDChangedEvent, self._onActivePlaceNodeChanged)

    def deactivate(self) -> None:
        """Stop reacting to markups (observers removed); a running job still finishes."""
        self.active = False
        self.stopPlacing()
        self._removeNodeObservers()
        if self._sceneObservation is not None:
            self.scene.RemoveObserver(self._sceneObservation)
            self.selectionNode.RemoveObserver(self._selectionObservation)
            self._sceneObservation = self._selectionObservation = None

    def _removeNodeObservers(self) -> None:
        for node, tag in self._observations:
            node.RemoveObserver(tag)
        self._observations = []

    def _observeNodes(self) -> None:
        self._removeNodeObservers()
        Markups = slicer.vtkMRMLMarkupsNode
        for node in {id(n): n for n in self.nodes.values() if n is not None}.values():
            for event, callback in ((Markups.PointPositionDefinedEvent, self._onPointDefined),
                                    (Markups.PointStartInteractionEvent, self._onStartInteraction),
                                    (Markups.PointModifiedEvent, self._onPointModified),
                                    (Markups.PointEndInteractionEvent, self._onEndInteraction)):
                self._observations.append((node, node.AddObserver(event, callback)))

    @property
    def observing(self) -> bool:
        return bool(self._observations) or self._sceneObservation is not None

    # ---- markups events ---------------------------------------------------------------------------------------
    @vtk.calldata_type(vtk.VTK_INT)
    def _onPointDefined(self, node, event, index=None):
        if node is self.nodes["box"]:
            if self.boxComplete():
                self._boxDrawn()
                self._promptCompleted(self._boxTrigger())
            return
        if index is None or not 0 <= int(index) < node.GetNumberOfControlPoints():
            return
        self._promptCompleted(self._pointTrigger(node, int(index)))

    def _onStartInteraction(self, node, event):
        self._dragging[node] = None

    @vtk.calldata_type(vtk.VTK_INT)
    def _onPointModified(self, node, event, index=None):
        if node in self._dragging and index is not None:
            self._dragging[node] = int(index)  # the interaction events do not say which point moves

    def _onEndInteraction(self, node, event):
        index = self._dragging.pop(node, None)
        if node is self.nodes["box"]:
            if self.boxComplete():
                self._boxMoved()
                self._promptCompleted(self._boxTrigger())
            return
        if index is None or not 0 <= index < node.GetNumberOfControlPoints():
            return  # clicked without moving
        if node.GetNthControlPointPositionStatus(index) == node.PositionDefined:
            self._promptCompleted(self._pointTrigger(node, index))

    def _onActivePlaceNodeChanged(self, selectionNode, event):
        active = selectionNode.GetActivePlaceNodeID()
        if active != self._activePlaceNode:  # the event repeats for one change
            self._previousActive, self._activePlaceNode = self._activePlaceNode, active

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def _onNodeAdded(self, scene, event, node=None):
        """Slicer puts a second box into a new ROI node: adopt it as the box prompt."""
        box = self.nodes["box"]
        if node is None or box is None or node is box or not node.IsA("vtkMRMLMarkupsROINode"):
            return
        if self.interactionNode.GetCurrentInteractionMode() != self.interactionNode.Place:
            return
        active = self.selectionNode.GetActivePlaceNodeID()
        placingIntoBox = active == box.GetID() or (active == node.GetID() and self._previousActive == box.GetID())
        if not placingIntoBox:
            return  # the user is placing some other ROI
        self._replacedBoxes.append(box)
        node.SetName(box.GetName())
        display = node.GetDisplayNode()
        if display is None:
            node.CreateDefaultDisplayNodes()
            display = node.GetDisplayNode()
        display.SetSelectedColor(*PROMPT_COLORS["box"])
        display.SetColor(*PROMPT_COLORS["box"])
        self.nodes["box"] = node
        self._boxView = self._boxThickness = None
        self._observeNodes()
        if self.onNodesChanged is not None:
            self.onNodesChanged(dict(self.nodes))

    # ---- box geometry ------------------------------------------------------------------------------------------
    def boxComplete(self) -> bool:
        """Placed and not being drawn: one defined centre point and a non-zero size."""
        box = self.nodes["box"]
        if box is None or box.GetNumberOfControlPoints() != 1:
            return False
        if box.GetNthControlPointPositionStatus(0) != box.PositionDefined:
            return False
        return bool(np.all(np.asarray(box.GetSize(), float) > 0))

    def _boxAxes(self) -> np.ndarray:
        return mrml.arrayFromMatrix(self.nodes["box"].GetObjectToWorldMatrix())[:3, :3]

    def _boxDrawn(self) -> None:
        """Just placed: find the view it was drawn in and remember its (padded) thickness there."""
        for old in self._replacedBoxes:
            if old.GetScene() is not None:
                self.scene.RemoveNode(old)
        self._replacedBoxes = []
        box = self.nodes["box"]
        centre = np.asarray(box.GetCenterWorld(), float)
        view = self.viewOfPoint(centre)
        self._boxView, self._boxThickness = None, None
        if view is not None:
            thickness = self._thicknessAlong(view)
            if thickness is not None:
                self._boxView, self._boxThickness = view, thickness

    def _boxMoved(self) -> None:
        """After a handle drag: still flat unless its thickness along the drawing view's normal changed."""
        if self._boxView is None:
            return
        thickness = self._thicknessAlong(self._boxView)
        if thickness is None or abs(thickness - self._boxThickness) > THICKNESS_TOLERANCE_MM:
            self._boxView = self._boxThickness = None  # made thick on purpose: a 3-D box

    def _thicknessAlong(self, sliceNode) -> float | None:
        """The box's size along the view's normal, if one of the box's axes is that normal."""
        normal = mrml.sliceNormal(sliceNode)
        axes = self._boxAxes()
        axes = axes / np.maximum(np.linalg.norm(axes, axis=0), 1e-12)
        alignment = np.abs(normal @ axes)
        axis = int(np.argmax(alignment))
        if alignment[axis] < 1 - 1e-6:
            return None
        return float(self.nodes["box"].GetSize()[axis])

    @property
    def boxIsFlat(self) -> bool:
        return self._boxView is not None

    def _boxTrigger(self) -> Trigger:
        return Trigger(self.nodes["box"], 0, self._boxView, flatBox=self._boxView is not None)

    def _pointTrigger(self, node, index: int) -> Trigger:
        return Trigger(node, index, self.viewOfPoint(node.GetNthControlPointPositionWorld(index)))

    def viewOfPoint(self, pointWorld):
        """The slice view whose plane holds a placed point (markups lie on the plane they were placed in)."""
        return self.logic.sliceViewOfPoint(self.scene, pointWorld, tolerance=PLANE_TOLERANCE_MM)

    # ---- running -------------------------------------------------------------------------------------------
    def _promptCompleted(self, trigger: Trigger) -> None:
        if not self.autoUpdate:
            return
        self.promptsCompleted += 1
        self.queue.append(trigger)
        self._startNext()

    def runNow(self, propagate: bool = False) -> bool:
        """The panel's Segment / Propagate buttons: run every placed prompt (propagate: follow the object)."""
        box = self.nodes["box"]
        node = box if box is not None and self.boxComplete() else None
        for kind in ("positive", "negative"):
            points = self.nodes[kind]
            if node is None and points is not None and points.GetNumberOfDefinedControlPoints():
                node = points
        if node is None:
            raise SegMoTEError("no prompt yet: place a point (P) or a box (Shift+B) on the image first")
        index = 0 if node is box else node.GetNumberOfControlPoints() - 1
        trigger = self._boxTrigger() if node is box else self._pointTrigger(node, index)
        return self._start(trigger, propagate=propagate, activeOnly=propagate)

    def _startNext(self) -> None:
        while self.job is None and self.queue:
            trigger = self.queue.pop(0)
            if trigger.node.GetScene() is None or trigger.index >= trigger.node.GetNumberOfControlPoints():
                continue  # deleted while waiting
            self._start(trigger)

    def _start(self, trigger: Trigger, propagate: bool = False, activeOnly: bool = True) -> bool:
        if self.job is not None or self.target is None:
            return False
        volumeNode, segmentationNode = self.target()
        if volumeNode is None or segmentationNode is None:
            return False
        try:
            self.job = self.logic.startSegmentWithPrompts(
                volumeNode, segmentationNode, self.segmentId, self.nodes["box"], self.nodes["positive"],
                self.nodes["negative"], propagate=propagate, axis=trigger.viewNode,
                activePoint=(trigger.node, trigger.index) if activeOnly else None,
                boxView=self._boxView, beforeApply=self.beforeApply)
        except SegMoTEError as error:
            self.lastError = error
            if self.onRunFinished is not None:
                self.onRunFinished(error)
            return False
        self.runsStarted += 1
        self.lastError = None
        if self.onRunStarted is not None:
            self.onRunStarted(self.job)
        return True

    @property
    def busy(self) -> bool:
        return self.job is not None or bool(self.queue)

    def poll(self, wait: float = 0.0) -> bool:
        """Call from the main thread (the panel's timer): finishes a done job, starts the next waiting prompt.

        wait: seconds to wait for the running job, releasing the GIL meanwhile (inside Slicer the main thread
        holds the GIL whenever Qt is idle, so the engine thread only runs while the main thread waits here).
        Returns True while a job runs or prompts wait."""
        job = self.job
        if job is not None and job.poll(wait):
            self.job = None
            if job.error is None:
                self.segmentId = job.result
            else:
                self.lastError = job.error
            if self.onRunFinished is not None:
                self.onRunFinished(job)
        self._startNext()
        return self.busy

    def waitIdle(self, timeout: float = 600.0) -> None:
        """Block until every completed prompt has run (scripts and tests)."""
        deadline = time.monotonic() + timeout
        while self.poll(0.05):
            if time.monotonic() > deadline:
                raise SegMoTEError(f"prompts still running after {timeout:g} s")
