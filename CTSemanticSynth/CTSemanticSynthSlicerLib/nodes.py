"""Volumes and segmentations between files, arrays and the MRML scene, with their geometry kept exactly, and their
place in the subject hierarchy. Needs only ``slicer`` (MRML) and ``vtk``; files are read with the library's one
LPS -> RAS conversion."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import vtk

import slicer
from CTSemanticSynthLib.labels import PAPER, ClassSet


class SynthesisError(RuntimeError):
    """Synthesis or evaluation failed; the message is the command's own error line or says what to do."""


def nodeIJKToRAS(node) -> np.ndarray:
    """The IJKToRAS matrix of a volume node as a 4 x 4 array."""
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])


def vtkMatrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    """A 4 x 4 array as a vtkMatrix4x4."""
    m = vtk.vtkMatrix4x4()
    for i in range(4):
        for j in range(4):
            m.SetElement(i, j, float(array[i, j]))
    return m


@contextlib.contextmanager
def temporaryNodes(scene):
    """Remove every node added to ``scene`` inside the block (export helpers add colour tables, display nodes)."""
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    try:
        yield
    finally:
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in reversed([n for n in added if n.GetID() not in before]):
            scene.RemoveNode(node)


def writeVolume(node, path: Path) -> None:
    """Write a volume node's image with its geometry (a storage node outside the scene: nothing is added). Runs on
    Slicer's GUI thread, so uncompressed (a compressed 512 x 512 x 300 CT takes seconds; the background process
    reads the raw file and compresses what it writes)."""
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(False)
    if not storage.WriteData(node):
        raise SynthesisError(f"could not write {node.GetName()} to {path}")


def readArray(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(voxels in Slicer's K, J, I order, IJKToRAS) of an image file, read with the library's one LPS -> RAS
    conversion. Slicer's own reader would flip a left-handed grid to a right-handed one (and the voxels with it)."""
    import SimpleITK as sitk

    from CTSemanticSynthLib.io import sitk_to_volume

    try:
        volume = sitk_to_volume(sitk.ReadImage(str(path)))
    except RuntimeError as exc:
        raise SynthesisError(f"could not read {path} ({str(exc).strip().splitlines()[-1]})") from None
    return np.ascontiguousarray(volume.array.transpose(2, 1, 0)), volume.affine


def loadVolumeFile(path: Path, name: str):
    """A scalar volume node from a file, its geometry kept exactly (the library's LPS -> RAS conversion)."""
    scene = slicer.mrmlScene
    voxels, ijkToRAS = readArray(path)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name))
    slicer.util.updateVolumeFromArray(node, voxels)
    node.SetIJKToRASMatrix(vtkMatrix(ijkToRAS))
    return node


def segmentationFromArray(labels: np.ndarray, ijkToRAS: np.ndarray, name: str, segmentNames=()):
    """A segmentation node from a label array (K, J, I) on the grid ``ijkToRAS``; segments in label order get
    ``segmentNames``."""
    scene = slicer.mrmlScene
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    segmentation.CreateDefaultDisplayNodes()
    with temporaryNodes(scene):
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        slicer.util.updateVolumeFromArray(labelmap, labels)
        labelmap.SetIJKToRASMatrix(vtkMatrix(ijkToRAS))
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(labelmap)
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    if not ok:
        scene.RemoveNode(segmentation)
        raise SynthesisError(f"could not import the labels of '{name}' as a segmentation")
    for i, segmentName in enumerate(segmentNames):
        segmentation.GetSegmentation().GetNthSegment(i).SetName(segmentName)
    return segmentation


def exampleSegmentation() -> tuple[object, np.ndarray]:
    """(segmentation, IJKToRAS): three organs (liver, spleen, right kidney) on a small oblique-free 48 x 48 x 24 grid
    with Slicer's LPS-flipped axes, for the module's self-test."""
    labels = np.zeros((24, 48, 48), dtype=np.int16)  # K, J, I
    labels[4:20, 8:30, 6:26], labels[6:16, 10:22, 30:42], labels[8:14, 30:40, 10:20] = 1, 2, 3
    ijkToRAS = np.array([[-1.5, 0, 0, 40], [0, -1.5, 0, 30], [0, 0, 2.5, -20], [0, 0, 0, 1]])
    return segmentationFromArray(labels, ijkToRAS, "organs", ("liver", "spleen", "right kidney")), ijkToRAS


def removeNodes(nodes) -> None:
    """Remove nodes from their scene together with their display and storage nodes."""
    for node in (n for n in nodes if n is not None and n.GetScene() is not None):
        scene = node.GetScene()
        helpers = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())] + [node.GetStorageNode()]
        for helper in (h for h in helpers if h is not None):
            scene.RemoveNode(helper)
        scene.RemoveNode(node)


def placeBeside(node, original) -> None:
    """Put ``node`` in the subject hierarchy folder/study of ``original`` (the scene root if it has none)."""
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(node.GetScene())
    parent = shNode.GetSceneItemID()
    if original is not None and shNode.GetItemByDataNode(original):
        parent = shNode.GetItemParent(shNode.GetItemByDataNode(original))
    item = shNode.GetItemByDataNode(node)
    if item:
        shNode.SetItemParent(item, parent)
    else:
        shNode.CreateItem(parent, node)


def loadClassLabelmap(path: Path, name: str, classes: ClassSet = PAPER):
    """A segmentation node from a label map in class ids of ``classes`` (the model's set), with its names and
    colours."""
    voxels, ijkToRAS = readArray(path)
    segNode = segmentationFromArray(voxels, ijkToRAS, slicer.mrmlScene.GenerateUniqueName(name))
    segmentation = segNode.GetSegmentation()
    for i in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(i)
        value = int(segment.GetLabelValue())
        if 0 < value < len(classes.classes):
            segment.SetName(classes.display_names[value])
            segment.SetColor(*(c / 255.0 for c in classes.colors[value]))
    return segNode
