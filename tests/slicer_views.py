"""Slicer's own slice views, headless: the interaction code a clinician's mouse goes through in 3D Slicer.

Red, Yellow and Green slice views are built from slicer-core's real classes: vtkMRMLSliceLogic for each view,
vtkMRMLSliceViewInteractorStyle turning VTK mouse events into MRML interaction events, and the displayable managers
(crosshair, markups, segmentations) that react to them, in offscreen EGL render windows. Mouse events are sent to
each view's vtkRenderWindowInteractor exactly as Qt's VTK widget would send them, so a box or a point is placed by
Slicer's markups widgets, not built in code.

Coordinates are VTK display pixels: origin bottom-left, y up. ``View.xyOf(ras)`` maps a world point to pixels.
"""

from __future__ import annotations

import os

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

import numpy as np  # noqa: E402
import slicer  # noqa: E402
import vtk  # noqa: E402

VIEW_ORIENTATIONS = {"Red": "Axial", "Yellow": "Sagittal", "Green": "Coronal"}
DISPLAYABLE_MANAGERS = ("vtkMRMLCrosshairDisplayableManager", "vtkMRMLSegmentationsDisplayableManager2D",
                        "vtkMRMLMarkupsDisplayableManager")


class View:
    """One slice view: its slice node, render window and interactor."""

    def __init__(self, views: "SliceViews", name: str, size: int):
        self.name, self.size = name, size
        self.renderWindow = vtk.vtkRenderWindow()
        self.renderWindow.SetOffScreenRendering(1)
        self.renderWindow.SetSize(size, size)
        self.renderer = vtk.vtkRenderer()
        self.renderer.GetActiveCamera().ParallelProjectionOn()
        self.renderWindow.AddRenderer(self.renderer)
        self.interactor = vtk.vtkRenderWindowInteractor()
        self.interactor.SetRenderWindow(self.renderWindow)
        # VTK's default style grabs the mouse on press, so the release would never reach Slicer's style.
        self.interactor.SetInteractorStyle(vtk.vtkInteractorStyleUser())
        self.interactor.Initialize()

        self.displayableManagers = slicer.vtkMRMLDisplayableManagerGroup()
        self.displayableManagers.Initialize(views.factory, self.renderer)
        self.sliceLogic = slicer.vtkMRMLSliceLogic()
        self.sliceLogic.SetMRMLApplicationLogic(views.applicationLogic)
        views.applicationLogic.GetSliceLogics().AddItem(self.sliceLogic)
        self.sliceLogic.SetMRMLScene(views.scene)
        self.sliceNode = self.sliceLogic.AddSliceNode(name)
        self.sliceNode.SetOrientation(VIEW_ORIENTATIONS[name])
        self.displayableManagers.SetMRMLDisplayableNode(self.sliceNode)
        self.style = slicer.vtkMRMLSliceViewInteractorStyle()
        self.style.SetSliceLogic(self.sliceLogic)
        self.style.SetDisplayableManagers(self.displayableManagers)
        self.style.SetInteractor(self.interactor)

        # The image layer, as Slicer's slice widget draws it (needed only for what a screenshot shows).
        self.imageMapper = vtk.vtkImageMapper()
        self.imageMapper.SetColorWindow(255)
        self.imageMapper.SetColorLevel(127.5)
        actor = vtk.vtkActor2D()
        actor.SetMapper(self.imageMapper)
        actor.GetProperty().SetDisplayLocationToBackground()
        self.renderer.AddViewProp(actor)

    # ---- geometry ------------------------------------------------------------------------------------------
    def show(self, volumeNode) -> None:
        """The volume as background, the view fitted to it and its slice offset snapped to voxel centres."""
        self.sliceLogic.GetSliceCompositeNode().SetBackgroundVolumeID(volumeNode.GetID())
        self.sliceLogic.ResizeSliceNode(self.size, self.size)  # slice node pixels = window pixels
        self.sliceLogic.FitSliceToBackground()
        self.sliceLogic.SnapSliceOffsetToIJK()
        self.imageMapper.SetInputConnection(self.sliceLogic.GetImageDataConnection())
        self.render()

    def jumpTo(self, ras) -> None:
        """Move this view's plane through a world point (the slice offset slider), snapped to voxel centres."""
        self.sliceNode.JumpSliceByOffsetting(*[float(v) for v in ras])
        self.sliceLogic.SnapSliceOffsetToIJK()
        self.render()

    def rasOf(self, x: float, y: float) -> np.ndarray:
        return np.array(self.sliceNode.GetXYToRAS().MultiplyPoint((float(x), float(y), 0.0, 1.0))[:3])

    def xyOf(self, ras) -> tuple[int, int]:
        """The pixel showing a world point (its projection onto this view's plane)."""
        rasToXy = vtk.vtkMatrix4x4()
        vtk.vtkMatrix4x4.Invert(self.sliceNode.GetXYToRAS(), rasToXy)
        x, y = rasToXy.MultiplyPoint((*[float(v) for v in ras], 1.0))[:2]
        return int(round(x)), int(round(y))

    # ---- the mouse -------------------------------------------------------------------------------------------
    def _event(self, x, y, send) -> None:
        self.interactor.SetEventInformation(int(x), int(y), 0, 0, "\0", 0)
        send()

    def move(self, x, y) -> None:
        self._event(x, y, self.interactor.MouseMoveEvent)

    def press(self, x, y) -> None:
        self._event(x, y, self.interactor.LeftButtonPressEvent)

    def release(self, x, y) -> None:
        self._event(x, y, self.interactor.LeftButtonReleaseEvent)

    def click(self, x, y) -> None:
        """A real click: the pointer arrives at the spot, then press and release without moving."""
        self.move(x, y)
        self.press(x, y)
        self.release(x, y)
        self.render()

    def moveAlong(self, start, end, steps: int = 6) -> None:
        for t in np.linspace(0.0, 1.0, steps + 1)[1:]:
            self.move(*np.round(np.add(start, t * np.subtract(end, start))))

    def drag(self, start, end, steps: int = 6) -> None:
        """Press at start, move in steps, release at end (dragging a point or a handle)."""
        self.move(*start)
        self.render()  # hover: the widget under the pointer becomes active
        self.move(*start)
        self.press(*start)
        self.moveAlong(start, end, steps)
        self.release(*end)
        self.render()

    def render(self) -> None:
        self.renderWindow.Render()

    def screenshot(self, path) -> None:
        self.render()
        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(self.renderWindow)
        grab.ReadFrontBufferOff()
        grab.Update()
        writer = vtk.vtkPNGWriter()
        writer.SetFileName(str(path))
        writer.SetInputConnection(grab.GetOutputPort())
        writer.Write()


def moduleLogics(scene, applicationLogic) -> dict:
    """Slicer's markups, data and segmentations module logics on `scene`, registered by name with the application
    logic (displayable managers and the panel look them up there)."""
    logics = {}
    for name, cls in (("Markups", slicer.vtkSlicerMarkupsLogic), ("Data", slicer.vtkSlicerDataModuleLogic),
                      ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic)):
        logic = cls()
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(applicationLogic)
        applicationLogic.SetModuleLogic(name, logic)
        logics[name] = logic
    return logics


class SliceViews:
    """A scene with Slicer's application, markups and segmentations logics, and Red/Yellow/Green views."""

    def __init__(self, size: int = 400, names=("Red", "Yellow", "Green")):
        self.scene = slicer.vtkMRMLScene()
        crosshair = slicer.vtkMRMLCrosshairNode()
        crosshair.SetCrosshairName("default")
        self.scene.AddNode(crosshair)
        self.applicationLogic = slicer.vtkSlicerApplicationLogic()
        self.applicationLogic.SetMRMLScene(self.scene)  # creates the selection and interaction singletons
        self.applicationLogic.GetColorLogic().SetMRMLScene(self.scene)
        self.applicationLogic.GetColorLogic().AddDefaultColorNodes()
        self.applicationLogic.SetSliceLogics(vtk.vtkCollection())
        self.applicationLogic.SetViewLogics(vtk.vtkCollection())
        self.logics = moduleLogics(self.scene, self.applicationLogic)
        self.markupsLogic = self.logics["Markups"]
        self.selectionNode = self.applicationLogic.GetSelectionNode()
        self.interactionNode = self.applicationLogic.GetInteractionNode()
        self.crosshairNode = crosshair
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(self.scene, True)
        self.factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
        self.factory.SetMRMLApplicationLogic(self.applicationLogic)
        for manager in DISPLAYABLE_MANAGERS:
            if not self.factory.IsDisplayableManagerRegistered(manager):
                self.factory.RegisterDisplayableManager(manager)
        self.views = {name: View(self, name, size) for name in names}

    def __getitem__(self, name: str) -> View:
        return self.views[name]

    def show(self, volumeNode, segmentationNode=None) -> None:
        for view in self.views.values():
            view.show(volumeNode)
        if segmentationNode is not None:
            segmentationNode.CreateDefaultDisplayNodes()

    def renderAll(self) -> None:
        for view in self.views.values():
            view.render()

    def close(self) -> None:
        self.interactionNode.SetCurrentInteractionMode(self.interactionNode.ViewTransform)
        for view in self.views.values():
            view.style.SetInteractor(None)
            view.displayableManagers.SetMRMLDisplayableNode(None)
            view.renderWindow.Finalize()
        self.scene.Clear(1)
