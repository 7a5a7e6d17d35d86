"""From a segmentation node to the files ``ctsynth`` reads: its segments, their model classes, the grid of the
synthetic CT, and the label map exported on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import vtk

import slicer
from CTSemanticSynthLib.labels import class_set

from .nodes import SynthesisError, nodeIJKToRAS, temporaryNodes, writeVolume
from .segments import Segment, SegmentClasses, classifySegments

GEOMETRY_TOLERANCE_MM = 1e-3


class SegmentationExport:
    @staticmethod
    def segments(segmentationNode) -> list[Segment]:
        segmentation = segmentationNode.GetSegmentation()
        result = []
        for i in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(i)
            result.append(Segment(segmentation.GetNthSegmentID(i), segment.GetName(), int(segment.GetLabelValue())))
        return result

    def classifySegments(self, segmentationNode, labels: str = "auto", mappingFile: str | None = None,
                         strict: bool = False, classSet: str = "paper") -> SegmentClasses:
        """The segments mapped onto the class set named ``classSet`` (the model's: ``config["class_set"]``)."""
        if segmentationNode is None:
            raise ValueError("select a segmentation")
        return classifySegments(self.segments(segmentationNode), labels, mappingFile, strict, class_set(classSet))

    def bodyTissueText(self, segmentationNode, labels: str = "auto", mappingFile: str | None = None,
                       classSet: str = "paper") -> str:
        """For the panel: which segments become body tissue in the model's class set, or why the segments cannot be
        used ('' without a segmentation)."""
        if segmentationNode is None:
            return ""
        try:
            return self.classifySegments(segmentationNode, labels, mappingFile or None, classSet=classSet).bodyTissue()
        except (OSError, ValueError) as exc:
            return str(exc)

    @staticmethod
    def geometrySource(segmentationNode, referenceVolumeNode=None):
        """The volume whose grid the synthetic CT gets: the reference CT if given, else the segmentation's own
        reference geometry volume (None then means the segmentation's stored reference geometry)."""
        if referenceVolumeNode is not None:
            return referenceVolumeNode
        role = segmentationNode.GetReferenceImageGeometryReferenceRole()
        node = segmentationNode.GetNodeReference(role)
        if node is not None and node.IsA("vtkMRMLVolumeNode") and node.GetImageData() is not None:
            return node
        name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
        if not segmentationNode.GetSegmentation().GetConversionParameter(name):
            raise ValueError(
                f"segmentation '{segmentationNode.GetName()}' has no reference geometry, so the grid of the synthetic "
                "CT is undefined: select the reference CT volume, or set the geometry in the Segmentations module "
                "(Specify geometry)")
        return None

    @staticmethod
    def segmentationGeometry(segmentationNode) -> tuple[np.ndarray, tuple] | None:
        """(IJKToRAS, dimensions) of the segmentation's stored reference geometry, or None when it has none."""
        name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
        serialized = segmentationNode.GetSegmentation().GetConversionParameter(name)
        if not serialized:
            return None
        image = slicer.vtkOrientedImageData()
        slicer.vtkSegmentationConverter.DeserializeImageGeometry(serialized, image)
        m = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(m)
        extent = image.GetExtent()
        ijkToRAS = np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])
        ijkToRAS[:3, 3] = ijkToRAS[:3, :3] @ np.array(extent[::2], dtype=float) + ijkToRAS[:3, 3]  # extent start
        return ijkToRAS, tuple(extent[2 * i + 1] - extent[2 * i] + 1 for i in range(3))

    def checkGeometry(self, segmentationNode, referenceVolumeNode) -> None:
        """Refuse a reference CT whose grid differs from the segmentation's own (resampling the organs silently would
        move their borders)."""
        if referenceVolumeNode is None:
            return
        if referenceVolumeNode.GetImageData() is None:
            raise ValueError(f"reference CT '{referenceVolumeNode.GetName()}' has no image data")
        own = self.segmentationGeometry(segmentationNode)
        reference = (nodeIJKToRAS(referenceVolumeNode), tuple(referenceVolumeNode.GetImageData().GetDimensions()))
        if own is not None and (own[1] != reference[1]
                                or not np.allclose(own[0], reference[0], atol=GEOMETRY_TOLERANCE_MM)):
            raise ValueError(
                f"segmentation '{segmentationNode.GetName()}' is on another grid than reference CT "
                f"'{referenceVolumeNode.GetName()}' (size {own[1]} vs {reference[1]}, or spacing, origin or "
                "direction differ): select the CT the segmentation was made on, clear 'Reference CT' to synthesize "
                "on the segmentation's own grid, or resample the segmentation to this CT (Segment Editor: "
                "Specify geometry)")

    def exportLabelmap(self, segmentationNode, segmentIds: list[str], referenceVolumeNode, path: Path) -> tuple[np.ndarray, tuple]:
        """Write segments ``segmentIds`` as values 1..N on the reference grid; returns (IJKToRAS, dimensions).
        Raises ValueError when the segments hold no voxel there."""
        scene = segmentationNode.GetScene()
        with temporaryNodes(scene):
            labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
            ids = vtk.vtkStringArray()
            for segmentId in segmentIds:
                ids.InsertNextValue(segmentId)
            ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentationNode, ids, labelmap, referenceVolumeNode, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
            if not ok or labelmap.GetImageData() is None:
                raise SynthesisError(f"could not export the segments of '{segmentationNode.GetName()}' to a label map")
            if not slicer.util.arrayFromVolume(labelmap).any():
                raise ValueError(f"segmentation '{segmentationNode.GetName()}' is empty (its organ segments have no "
                                 "voxels on the output grid): paint or load the organs first")
            writeVolume(labelmap, path)
            return nodeIJKToRAS(labelmap), tuple(labelmap.GetImageData().GetDimensions())

