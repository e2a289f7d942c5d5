"""MRML geometry and segment labelmaps, as numpy, on the input volume's voxel grid (no Qt, no slicer.app).

Frames: a node's *local* coordinates are mapped to *world* (what the views show) by its parent transforms. The
volume's voxel grid is expressed in the segmentation node's local frame (``VolumeGrid.ijkToSeg``), because
segment labelmaps are stored in that frame. Extents are VTK-style inclusive voxel boxes ``(i0, i1, j0, j1, k0, k1)``
of that grid; numpy arrays are in (K, J, I) order, as ``slicer.util.arrayFromVolume`` returns them.

Segments are read and written exactly (no resampling) whenever the segment's labelmap lies on the volume's lattice
(same directions and spacing, origin shifted by whole voxels), which is what Slicer produces for a segmentation whose
reference geometry is the volume; other lattices are refused before anything is written (see ``checkGeometry``).
"""

from __future__ import annotations

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from segmote_core.errors import InputError
from segmote_core.toolbox import mask_extent

Extent = tuple  # (i0, i1, j0, j1, k0, k1), inclusive
LATTICE_TOLERANCE = 1e-3  # voxels


# ---- matrices ------------------------------------------------------------------------------------------------
def arrayFromMatrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def sliceNormal(sliceNode) -> np.ndarray:
    """Unit normal of a slice view's plane, in world coordinates."""
    normal = arrayFromMatrix(sliceNode.GetSliceToRAS())[:3, 2]
    return normal / max(float(np.linalg.norm(normal)), 1e-12)


def matrixFromArray(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def nodeToWorld(node, what: str) -> np.ndarray:
    """4x4 from a node's local frame to world; refuses non-linear parent transforms with one line."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise InputError(f"{what} '{node.GetName()}' is under the non-linear transform '{parent.GetName()}'; "
                         "harden it first (Data module: right-click the node, Harden transform)")
    matrix = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(matrix)
    return arrayFromMatrix(matrix)


def volumeIjkToRas(volumeNode) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return arrayFromMatrix(matrix)


def volumeIjkToWorld(volumeNode) -> np.ndarray:
    return nodeToWorld(volumeNode, "volume") @ volumeIjkToRas(volumeNode)


def transformPoints(matrix: np.ndarray, points) -> np.ndarray:
    points = np.atleast_2d(np.asarray(points, dtype=float))
    return points @ matrix[:3, :3].T + matrix[:3, 3]


# ---- slice views and markups -----------------------------------------------------------------------------------
def sliceNodes(scene) -> list:
    nodes = scene.GetNodesByClass("vtkMRMLSliceNode")
    try:
        return [nodes.GetItemAsObject(index) for index in range(nodes.GetNumberOfItems())]
    finally:
        if hasattr(nodes, "UnRegister"):
            nodes.UnRegister(None)


def sliceNodeByViewName(scene, viewName: str):
    if scene is None:
        return None
    return next((node for node in sliceNodes(scene) if (node.GetLayoutName() or "").lower() == viewName.lower()),
                None)


def sliceViewOfPoint(scene, pointWorld, tolerance: float = 0.5):
    """The slice node whose plane holds a world point (the view a prompt was placed in), or None."""
    best, bestDistance = None, tolerance
    for node in sliceNodes(scene):
        origin = arrayFromMatrix(node.GetSliceToRAS())[:3, 3]
        distance = abs(float((np.asarray(pointWorld, float) - origin) @ sliceNormal(node)))
        if distance <= bestDistance:
            best, bestDistance = node, distance
    return best


def definedPointsWorld(pointsNode) -> list[tuple[int, np.ndarray]]:
    """(control point index, world position) of each placed point (not those being placed or skipped)."""
    if pointsNode is None:
        return []
    return [(index, np.asarray(pointsNode.GetNthControlPointPositionWorld(index), dtype=float))
            for index in range(pointsNode.GetNumberOfControlPoints())
            if pointsNode.GetNthControlPointPositionStatus(index) == pointsNode.PositionDefined]


def roiCornersWorld(roiNode) -> np.ndarray | None:
    """The 8 corners (world) of a placed ROI box; None if there is no box or it is still being placed."""
    if roiNode is None or roiNode.GetNumberOfControlPoints() == 0:
        return None
    if roiNode.GetNthControlPointPositionStatus(0) != roiNode.PositionDefined:
        return None
    half = np.asarray(roiNode.GetSize(), dtype=float) / 2
    corners = np.array([[x, y, z] for x in (-half[0], half[0]) for y in (-half[1], half[1])
                        for z in (-half[2], half[2])])
    return transformPoints(arrayFromMatrix(roiNode.GetObjectToWorldMatrix()), corners)


# ---- extents ---------------------------------------------------------------------------------------------------
def extentIsEmpty(extent) -> bool:
    return extent is None or extent[0] > extent[1] or extent[2] > extent[3] or extent[4] > extent[5]


def extentUnion(a, b):
    if extentIsEmpty(a):
        return b
    if extentIsEmpty(b):
        return a
    return tuple(min(a[i], b[i]) if i % 2 == 0 else max(a[i], b[i]) for i in range(6))


def extentIntersection(a, b):
    if extentIsEmpty(a) or extentIsEmpty(b):
        return None
    out = tuple(max(a[i], b[i]) if i % 2 == 0 else min(a[i], b[i]) for i in range(6))
    return None if extentIsEmpty(out) else out


def extentShape(extent) -> tuple[int, int, int]:
    """(K, J, I) shape of an extent."""
    return (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)


def extentSlices(extent, within) -> tuple[slice, slice, slice]:
    """numpy (K, J, I) slices of `extent` inside an array that covers `within`."""
    return (slice(extent[4] - within[4], extent[5] - within[4] + 1),
            slice(extent[2] - within[2], extent[3] - within[2] + 1),
            slice(extent[0] - within[0], extent[1] - within[0] + 1))


def maskExtent(mask: np.ndarray, origin=(0, 0, 0)):
    """Tight extent of the True voxels of a (K, J, I) array whose voxel (0, 0, 0) is grid voxel `origin` (IJK)."""
    extent = mask_extent(mask)
    if extent is None:
        return None
    ranges = []
    for axis in (2, 1, 0):  # I, J, K
        ranges += [extent[axis].start + origin[2 - axis], extent[axis].stop - 1 + origin[2 - axis]]
    return tuple(ranges)


def arrayFromImage(image) -> np.ndarray:
    dims = image.GetDimensions()
    scalars = image.GetPointData().GetScalars()
    return numpy_support.vtk_to_numpy(scalars).reshape(dims[2], dims[1], dims[0])


# ---- the volume's grid in the segmentation's frame -------------------------------------------------------------
class VolumeGrid:
    """The volume's voxel lattice in the segmentation node's local frame."""

    def __init__(self, shapeKji, ijkToSeg: np.ndarray):
        self.shapeKji = tuple(int(n) for n in shapeKji)
        self.ijkToSeg = np.asarray(ijkToSeg, dtype=float)
        self.segToIjk = np.linalg.inv(self.ijkToSeg)

    @classmethod
    def fromNodes(cls, volumeNode, segmentationNode) -> "VolumeGrid":
        dims = volumeNode.GetImageData().GetDimensions()
        ijkToWorld = volumeIjkToWorld(volumeNode)
        segToWorld = nodeToWorld(segmentationNode, "segmentation")
        return cls((dims[2], dims[1], dims[0]), np.linalg.inv(segToWorld) @ ijkToWorld)

    @property
    def fullExtent(self) -> Extent:
        k, j, i = self.shapeKji
        return (0, i - 1, 0, j - 1, 0, k - 1)

    def sameAs(self, other: "VolumeGrid") -> bool:
        return self.shapeKji == other.shapeKji and np.allclose(self.ijkToSeg, other.ijkToSeg, atol=1e-6)

    def clip(self, extent):
        return extentIntersection(extent, self.fullExtent)

    def describe(self) -> str:
        spacing = np.linalg.norm(self.ijkToSeg[:3, :3], axis=0)
        k, j, i = self.shapeKji
        return f"{i}x{j}x{k} voxels of {'x'.join(f'{s:.3g}' for s in spacing)} mm"

    # ---- lattice alignment -------------------------------------------------------------------------------
    def latticeOffset(self, imageIjkToSeg: np.ndarray):
        """Integer IJK offset from an image's voxel index to this grid's, or None if the lattices differ."""
        relation = self.segToIjk @ np.asarray(imageIjkToSeg, dtype=float)
        if not np.allclose(relation[:3, :3], np.eye(3), atol=LATTICE_TOLERANCE):
            return None
        offset = relation[:3, 3]
        rounded = np.round(offset)
        if not np.allclose(offset, rounded, atol=LATTICE_TOLERANCE):
            return None
        return rounded.astype(int)

    def imageGeometryAligned(self, image) -> bool:
        matrix = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(matrix)
        return self.latticeOffset(arrayFromMatrix(matrix)) is not None

    # ---- oriented images ------------------------------------------------------------------------------------
    def orientedImage(self, extent: Extent, mask: np.ndarray | None = None):
        """A vtkOrientedImageData on this grid (segmentation frame) covering `extent`, optionally filled."""
        image = slicer.vtkOrientedImageData()
        image.SetImageToWorldMatrix(matrixFromArray(self.ijkToSeg))
        image.SetExtent(*extent)
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        if mask is None:
            image.GetPointData().GetScalars().Fill(0)
        else:
            if tuple(mask.shape) != extentShape(extent):
                raise ValueError(f"mask shape {mask.shape} does not match extent {extent}")
            values = np.ascontiguousarray(mask, dtype=np.uint8).reshape(-1)
            image.GetPointData().SetScalars(
                numpy_support.numpy_to_vtk(values, deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
        return image

    # ---- segments ------------------------------------------------------------------------------------------
    def _segmentImage(self, segmentationNode, segmentId):
        image = slicer.vtkOrientedImageData()
        segmentationNode.GetBinaryLabelmapRepresentation(segmentId, image)
        if image.GetPointData().GetScalars() is None or extentIsEmpty(image.GetExtent()):
            return None
        return image

    def segmentExtent(self, segmentationNode, segmentId):
        """Extent (in this grid, clipped to it) that holds the segment's voxels; None if it is empty."""
        return self.readWholeSegment(segmentationNode, segmentId)[0]

    def readWholeSegment(self, segmentationNode, segmentId):
        """(extent, bool (K, J, I) array) of everything the segment holds inside this grid; (None, None) if empty.

        One copy of the segment's labelmap (this runs for every AI edit, so it matters on big volumes)."""
        image = self._segmentImage(segmentationNode, segmentId)
        if image is None:
            return None, None
        inGrid = self._imageExtentInGrid(image)
        if inGrid is None:  # another lattice: resample onto the whole grid
            extent = self.fullExtent
            return extent, self._resampled(image, extent)
        extent = self.clip(inGrid)
        if extent is None:
            return None, None
        values = arrayFromImage(image)[extentSlices(extent, inGrid)] > 0
        return extent, values

    def readSegment(self, segmentationNode, segmentId, extent: Extent) -> np.ndarray:
        """The segment as a bool (K, J, I) array covering `extent` of this grid."""
        out = np.zeros(extentShape(extent), dtype=bool)
        image = self._segmentImage(segmentationNode, segmentId)
        if image is None:
            return out
        inGrid = self._imageExtentInGrid(image)
        if inGrid is None:
            # Another lattice: nearest-neighbour resampling onto ours (only reached for reading; writing
            # into such a segmentation is refused by checkGeometry).
            return self._resampled(image, extent)
        overlap = extentIntersection(inGrid, extent)
        if overlap is not None:
            out[extentSlices(overlap, extent)] = arrayFromImage(image)[extentSlices(overlap, inGrid)] > 0
        return out

    def _imageExtentInGrid(self, image):
        matrix = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(matrix)
        offset = self.latticeOffset(arrayFromMatrix(matrix))
        if offset is None:
            return None
        e = image.GetExtent()
        return (e[0] + offset[0], e[1] + offset[0], e[2] + offset[1], e[3] + offset[1],
                e[4] + offset[2], e[5] + offset[2])

    def _resampled(self, image, extent) -> np.ndarray:
        out = np.zeros(extentShape(extent), dtype=bool)
        reference = self.orientedImage(extent)
        resampled = slicer.vtkOrientedImageData()
        slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            image, reference, resampled, False, False)
        overlap = extentIntersection(resampled.GetExtent(), extent)
        if overlap is not None:
            values = arrayFromImage(resampled)
            out[extentSlices(overlap, extent)] = values[extentSlices(overlap, resampled.GetExtent())] > 0
        return out

    def writeSegment(self, segmentationNode, segmentId, extent: Extent, mask: np.ndarray) -> None:
        """Replace the whole segment with `mask` (covering `extent`; the segment must be empty outside it)."""
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        image = self.orientedImage(extent, mask)
        if not logic.SetBinaryLabelmapToSegment(image, segmentationNode, segmentId, logic.MODE_REPLACE):
            raise InputError(f"Slicer refused to write segment '{segmentId}' of '{segmentationNode.GetName()}'")


# ---- segmentation checks -----------------------------------------------------------------------------------------
def referenceGeometryImage(segmentationNode):
    """The segmentation's reference image geometry as an (empty) oriented image, or None if it has none."""
    converter = slicer.vtkSegmentationConverter
    text = segmentationNode.GetSegmentation().GetConversionParameter(
        converter.GetReferenceImageGeometryParameterName())
    if not text:
        return None
    image = slicer.vtkOrientedImageData()
    if not converter.DeserializeImageGeometry(text, image, False):
        return None
    return image


def segmentationHasContent(segmentationNode) -> bool:
    """Whether any segment holds a non-empty labelmap (shared layers count as non-empty: conservative)."""
    segmentation = segmentationNode.GetSegmentation()
    name = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    for index in range(segmentation.GetNumberOfSegments()):
        representation = segmentation.GetNthSegment(index).GetRepresentation(name)
        if representation is not None and not extentIsEmpty(representation.GetExtent()):
            return True
    return False


def serializeGeometry(grid: VolumeGrid) -> str:
    image = grid.orientedImage(grid.fullExtent)
    return slicer.vtkSegmentationConverter.SerializeImageGeometry(image)


def checkVolume(volumeNode) -> None:
    """Refuse what cannot be segmented: no volume, no voxels yet, several values per voxel, a 2-D image."""
    if volumeNode is None:
        raise InputError("select an input volume first")
    if volumeNode.GetScene() is None:
        raise InputError(f"volume '{volumeNode.GetName()}' is no longer in the scene")
    image = volumeNode.GetImageData()
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise InputError(f"volume '{volumeNode.GetName()}' has no voxels (is it still loading?)")
    components = image.GetNumberOfScalarComponents()
    if not volumeNode.IsA("vtkMRMLScalarVolumeNode") or components != 1:
        raise InputError(f"volume '{volumeNode.GetName()}' has {components} values per voxel (colour, vector or "
                         "4-D data); choose a scalar 3-D volume")
    dims = image.GetDimensions()
    if min(dims) < 2:
        raise InputError(f"volume '{volumeNode.GetName()}' is 2-D ({dims[0]}x{dims[1]}x{dims[2]} voxels); "
                         "SegMoTE segments 3-D volumes")


def checkSegmentation(segmentationNode, segmentId) -> None:
    """Refuse a missing target, one stored as closed surfaces (a write would convert it), or a missing segment."""
    if segmentationNode is None:
        raise InputError("select or create a target segmentation first")
    if segmentationNode.GetScene() is None:
        raise InputError(f"segmentation '{segmentationNode.GetName()}' is no longer in the scene")
    segmentation = segmentationNode.GetSegmentation()
    source = segmentation.GetSourceRepresentationName() if hasattr(segmentation, "GetSourceRepresentationName") \
        else segmentation.GetMasterRepresentationName()
    labelmap = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    if segmentation.GetNumberOfSegments() and source != labelmap:
        raise InputError(f"segmentation '{segmentationNode.GetName()}' stores {source.lower()}s; switch its "
                         "source representation to binary labelmap (Segmentations module) first")
    if segmentId and segmentation.GetSegment(segmentId) is None:
        raise InputError(f"segmentation '{segmentationNode.GetName()}' has no segment '{segmentId}'")


def checkGeometry(grid: VolumeGrid, volumeNode, segmentationNode) -> None:
    """Refuse a segmentation with content on another voxel lattice (writing would resample its segments)."""
    reference = referenceGeometryImage(segmentationNode)
    if reference is None or grid.imageGeometryAligned(reference):
        return
    if not segmentationHasContent(segmentationNode):
        return  # empty: its geometry is set from the volume when the result is written
    matrix = vtk.vtkMatrix4x4()
    reference.GetImageToWorldMatrix(matrix)
    other = VolumeGrid(extentShape(reference.GetExtent()), arrayFromMatrix(matrix))
    raise InputError(f"segmentation '{segmentationNode.GetName()}' lies on another voxel grid ({other.describe()}) "
                     f"than volume '{volumeNode.GetName()}' ({grid.describe()}); choose the volume it was made "
                     "on, or a new segmentation")
