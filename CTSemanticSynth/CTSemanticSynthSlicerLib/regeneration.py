"""Regenerating an edited region: the segmentation as it was when a synthetic CT was made (a hidden label map), the
``ctsynth synth`` options that resample only what changed, and one level of undo."""

from __future__ import annotations

from pathlib import Path

import vtk

import slicer

from .nodes import nodeIJKToRAS, readArray, removeNodes, vtkMatrix, writeVolume
from .tasks import ATTRIBUTE_PREFIX

STATE_ROLE = "CTSemanticSynthSegmentationState"  # synthetic CT -> hidden label map of its segmentation when made
UNDO_ROLE = "CTSemanticSynthPreviousVersion"  # synthetic CT -> hidden copy of it before the last regeneration


class Regeneration:
    # --- regenerating an edited region -------------------------------------------------------------------------
    @staticmethod
    def segmentationState(syntheticVolumeNode):
        """The hidden label map of the segmentation as it was when ``syntheticVolumeNode`` was made (ValueError when
        it has none)."""
        state = syntheticVolumeNode.GetNodeReference(STATE_ROLE) if syntheticVolumeNode is not None else None
        if state is None or state.GetImageData() is None:
            name = syntheticVolumeNode.GetName() if syntheticVolumeNode is not None else "the output"
            raise ValueError(f"'{name}' has no stored segmentation to compare with (it was not made with Apply in "
                             "this module): synthesize it with Apply first, then edit the segments and regenerate")
        return state

    def regionArguments(self, syntheticVolumeNode, state, workDir: Path, marginMm: float) -> list:
        """Write the synthetic CT (kept outside the region) and the stored segmentation with its label mapping to
        ``workDir``; returns the ``ctsynth synth`` options that regenerate what changed since."""
        keep, previous, previousMapping = workDir / "keep.nrrd", workDir / "previous.nrrd", workDir / "previous.json"
        writeVolume(syntheticVolumeNode, keep)
        writeVolume(state, previous)
        previousMapping.write_text(state.GetAttribute(ATTRIBUTE_PREFIX + "LabelMapping") or "{}", encoding="utf-8")
        return ["--keep-ct", keep, "--previous-seg", previous, "--previous-labels", previousMapping,
                "--region-margin", float(marginMm)]

    def _storeSegmentationState(self, node, inputs: dict) -> None:
        """Keep the exported label map and its mapping as a hidden node referenced by ``node`` (replacing an earlier
        one unless the undo copy still needs it)."""
        scene = node.GetScene()
        voxels, ijkToRAS = readArray(Path(inputs["labels"]))
        state = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode",
                                        scene.GenerateUniqueName(f"{node.GetName()} segmentation state"))
        slicer.util.updateVolumeFromArray(state, voxels)
        state.SetIJKToRASMatrix(vtkMatrix(ijkToRAS))
        state.SetAttribute(ATTRIBUTE_PREFIX + "LabelMapping", inputs["mapping"])
        state.SetHideFromEditors(True)
        old = node.GetNodeReference(STATE_ROLE)
        node.SetNodeReferenceID(STATE_ROLE, state.GetID())
        undo = node.GetNodeReference(UNDO_ROLE)
        if old is not None and (undo is None or undo.GetNodeReference(STATE_ROLE) is not old):
            removeNodes([old])

    @staticmethod
    def _keepPreviousVersion(node) -> None:
        """Copy ``node`` (voxels, grid, attributes, segmentation state) into a hidden node it references, replacing
        the copy of the edit before."""
        Regeneration._dropPreviousVersion(node)
        scene = node.GetScene()
        undo = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode",
                                       scene.GenerateUniqueName(f"{node.GetName()} before regeneration"))
        undo.SetAndObserveImageData(vtk.vtkImageData())
        undo.GetImageData().DeepCopy(node.GetImageData())
        undo.SetIJKToRASMatrix(vtkMatrix(nodeIJKToRAS(node)))
        for key in node.GetAttributeNames() or ():
            undo.SetAttribute(key, node.GetAttribute(key))
        undo.SetDescription(node.GetDescription())
        undo.SetHideFromEditors(True)
        undo.SetNodeReferenceID(STATE_ROLE, node.GetNodeReferenceID(STATE_ROLE))
        node.SetNodeReferenceID(UNDO_ROLE, undo.GetID())

    @staticmethod
    def _dropPreviousVersion(node) -> None:
        """Remove the undo copy of ``node`` and the segmentation state only it uses."""
        undo = node.GetNodeReference(UNDO_ROLE)
        if undo is not None:
            state = undo.GetNodeReference(STATE_ROLE)
            removeNodes([undo] + ([state] if state is not node.GetNodeReference(STATE_ROLE) else []))
            node.SetNodeReferenceID(UNDO_ROLE, None)

    @staticmethod
    def canUndoRegeneration(node) -> bool:
        return node is not None and node.GetNodeReference(UNDO_ROLE) is not None

    def undoRegeneration(self, node) -> None:
        """Put back the synthetic CT (voxels, provenance, segmentation state) from before its last regeneration."""
        undo = node.GetNodeReference(UNDO_ROLE) if node is not None else None
        if undo is None:
            raise ValueError("there is no regeneration to undo")
        state = node.GetNodeReference(STATE_ROLE)
        wasModifying = node.StartModify()
        node.GetImageData().DeepCopy(undo.GetImageData())
        for key in undo.GetAttributeNames() or ():
            node.SetAttribute(key, undo.GetAttribute(key))
        node.SetDescription(undo.GetDescription())
        node.SetNodeReferenceID(STATE_ROLE, undo.GetNodeReferenceID(STATE_ROLE))
        node.SetNodeReferenceID(UNDO_ROLE, None)
        node.Modified()
        node.EndModify(wasModifying)
        removeNodes([undo, state])

