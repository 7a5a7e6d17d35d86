"""A headless MRML scene as Slicer sets it up at startup (``slicer-core``), and the bundled sample segmentation
loaded into it the way Slicer's Add Data does. Used by the Slicer logic tests and the Slicer-shaped scenarios."""

from __future__ import annotations

from pathlib import Path

import slicer

SAMPLE_SEG = Path(__file__).resolve().parents[2] / "Resources" / "sample" / "seg_total.nii.gz"


def headless_scene():
    """A fresh scene with the logics Slicer registers at startup (colours, segmentations, subject hierarchy), made
    ``slicer.mrmlScene``; returns (scene, application logic). Keep the application logic alive while the scene is
    used."""
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLScene(scene)
    colors.AddDefaultColorNodes()
    app.SetModuleLogic("Colors", colors)
    for name, logic in (("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic()),
                        ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic())):
        logic.SetMRMLScene(scene)
        app.SetModuleLogic(name, logic)
    slicer.mrmlScene = scene
    return scene, app


def load_sample_segmentation(scene, name: str = "case01 organs", path: Path = SAMPLE_SEG):
    """The sample label map as a segmentation node (segments named Segment_N, as Slicer names them)."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        raise RuntimeError(f"could not read {path}")
    node.SetAndObserveStorageNodeID(storage.GetID())
    return node
