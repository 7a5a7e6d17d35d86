"""The headless part of the module's Logic: MRML export/import, the background ``ctsynth`` process, review layout
and the Dice table. Needs only ``slicer`` (MRML) and ``vtk``: no Qt, no dialogs, no ``processEvents``, so it runs
in Slicer, in ``PythonSlicer`` and under pytest with the ``slicer-core`` package. Errors are raised as exceptions
whose message is meant for the user.

Synthesis never touches the scene until it has succeeded: inputs are exported to a temporary folder (the
temporary export nodes are removed at once), ``ctsynth synth`` runs in its own process, and only
:meth:`SynthesisLogic.finishSynthesis` adds or changes nodes. Cancelling kills the process tree and deletes the
folder, so the scene stays exactly as it was.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import vtk

import slicer
import CTSemanticSynthLib
from CTSemanticSynthLib.labels import COLORS, DISPLAY_NAMES, MODEL_CLASSES, normalize_name
from CTSemanticSynthLib.provenance import sidecar_path

from .nodes import (
    SynthesisError,
    nodeIJKToRAS,
    loadVolumeFile,
    readArray,
    removeNodes,
    segmentationFromArray,
    temporaryNodes,
    vtkMatrix,
    writeVolume,
)
from .process import BackgroundProcess, State, pythonCommand
from .reader_study import StudyCase, StudySummary
from .review import Blinding, setupReviewLayout, showAbdomenWindow
from .segments import Segment, SegmentClasses, classifySegments, exportOrder, mappingJson

logger = logging.getLogger(__name__)

ATTRIBUTE_PREFIX = "CTSemanticSynth."
STATE_ROLE = "CTSemanticSynthSegmentationState"  # synthetic CT -> hidden label map of its segmentation when made
UNDO_ROLE = "CTSemanticSynthPreviousVersion"  # synthetic CT -> hidden copy of it before the last regeneration
GEOMETRY_TOLERANCE_MM = 1e-3
CLI_MODULE = "CTSemanticSynthLib.cli"
TOTALSEG_DOWNLOAD_MODULE = "totalsegmentator.bin.totalseg_download_weights"  # TotalSegmentator 2.x's own command
VARIANCE_COLORS = "vtkMRMLPETProceduralColorNodePET-Heat"
WEIGHTS_MISSING = "TotalSegmentator weights for the"  # how `ctsynth evaluate --totalseg` says they are missing


class TotalSegmentatorWeightsMissing(SynthesisError):
    """TotalSegmentator's weights are not on this computer (the message says where they go)."""


@dataclass
class BackgroundTask:
    """A running ``ctsynth`` command and what is needed to finish it; ``poll()``/``cancel()`` for the caller's timer."""

    process: BackgroundProcess
    workDir: Path
    kind: str
    inputs: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    keepFiles: bool = False
    nodes: dict = field(default_factory=dict)

    def poll(self) -> State:
        return self.process.poll()

    def cancel(self) -> None:
        self.process.cancel()
        self.cleanup()

    def wait(self, timeout: float | None = None) -> State:
        return self.process.wait(timeout)

    def cleanup(self) -> None:
        if not self.keepFiles:
            shutil.rmtree(self.workDir, ignore_errors=True)


class SynthesisLogic:
    """Headless logic. ``pythonExecutable`` runs ``ctsynth`` (default: PythonSlicer inside Slicer, else
    ``sys.executable``); ``environment`` adds variables for the child process (e.g. ``OMP_NUM_THREADS``)."""

    def __init__(self, pythonExecutable: str | None = None, environment: dict[str, str] | None = None,
                 tempRoot: str | None = None, keepFiles: bool = False):
        self.pythonExecutable = pythonExecutable
        self.environment = dict(environment or {})
        self.tempRoot = tempRoot
        self.keepFiles = keepFiles
        self.blinding = Blinding()

    # --- process environment ---------------------------------------------------------------------------------
    @staticmethod
    def _insideSlicerApp() -> bool:
        return getattr(slicer, "app", None) is not None

    def python(self) -> str:
        if self.pythonExecutable:
            return self.pythonExecutable
        if self._insideSlicerApp():
            found = shutil.which("PythonSlicer")
            if found:
                return found
        return sys.executable

    def childEnvironment(self) -> dict[str, str]:
        """The environment Slicer was started with (inside Slicer), with the library on PYTHONPATH."""
        env = dict(slicer.util.startupEnvironment()) if self._insideSlicerApp() else dict(os.environ)
        libraryParent = str(Path(CTSemanticSynthLib.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (libraryParent, env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.environment)
        return env

    def _workDir(self, kind: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"CTSemanticSynth-{kind}-", dir=self.tempRoot))

    # --- segments and geometry -------------------------------------------------------------------------------
    @staticmethod
    def segments(segmentationNode) -> list[Segment]:
        segmentation = segmentationNode.GetSegmentation()
        result = []
        for i in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(i)
            result.append(Segment(segmentation.GetNthSegmentID(i), segment.GetName(), int(segment.GetLabelValue())))
        return result

    def classifySegments(self, segmentationNode, labels: str = "auto", mappingFile: str | None = None,
                         strict: bool = False) -> SegmentClasses:
        if segmentationNode is None:
            raise ValueError("select a segmentation")
        return classifySegments(self.segments(segmentationNode), labels, mappingFile, strict)

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

    # --- synthesis ---------------------------------------------------------------------------------------------
    def startSynthesis(self, segmentationNode, outputVolumeNode=None, referenceVolumeNode=None, model: str | None = None,
                       labels: str = "auto", mappingFile: str | None = None, strictLabels: bool = False,
                       preset: str = "fast", steps: int = 0, seed: int = 0, device: str = "auto", batchSize: int = 0,
                       outputName: str | None = None, samples: int = 1, sampler: str | None = None,
                       precision: str = "auto", regionMarginMm: float | None = None) -> BackgroundTask:
        """Export the inputs and start ``ctsynth synth`` in the background; the scene is not changed.

        ``steps`` 0 and ``sampler`` None keep the preset's; ``batchSize`` 0 is ``--batch-size auto``; ``precision``
        is ``ctsynth --precision``. ``samples`` N >= 2 makes N CTs (seeds seed..seed+N-1) and their per-voxel
        standard deviation. ``regionMarginMm`` regenerates only what was edited: the synthetic CT
        ``outputVolumeNode`` is kept outside the voxels whose class changed since it was made (see
        :meth:`regionArguments`), grown by that margin. Finish with :meth:`finishSynthesis` once ``task.poll()`` says
        SUCCEEDED.
        """
        regenerating = regionMarginMm is not None
        if outputVolumeNode is not None and (outputVolumeNode is referenceVolumeNode
                                             or outputVolumeNode.IsA("vtkMRMLLabelMapVolumeNode")):
            raise ValueError(f"'{outputVolumeNode.GetName()}' cannot receive the synthetic CT (it is the reference CT or "
                             "a label map): choose 'Create new volume' or another volume")
        if regenerating and samples != 1:
            raise ValueError("regenerate an edited region with one sample")
        classes = self.classifySegments(segmentationNode, labels, mappingFile, strictLabels)
        if regenerating:
            state = self.segmentationState(outputVolumeNode)
            geometryNode = outputVolumeNode  # the kept CT's grid
        else:
            self.checkGeometry(segmentationNode, referenceVolumeNode)
            geometryNode = self.geometrySource(segmentationNode, referenceVolumeNode)
        order = exportOrder(classes)
        workDir = self._workDir("synth")
        try:
            labelsPath, mappingPath = workDir / "labels.nrrd", workDir / "labels.json"
            ijkToRAS, dims = self.exportLabelmap(segmentationNode, [s.segmentId for s, _ in order], geometryNode, labelsPath)
            mappingPath.write_text(mappingJson(order))
            args = ["synth", "--seg", labelsPath, "--out", workDir / "synthetic.nrrd", "--labels", mappingPath,
                    "--preset", preset, "--seed", int(seed), "--device", device, "--batch-size", int(batchSize) or "auto",
                    "--precision", precision, "--progress-lines"]
            outputs = [workDir / "synthetic.nrrd"]
            if samples > 1:
                outputs = [workDir / f"synthetic_s{k}.nrrd" for k in range(samples)]
                args += ["--samples", int(samples), "--variance-map", workDir / "std.nrrd"]
            if classes.bodyOutline:
                bodyPath = workDir / "body.nrrd"
                bodyMatrix, bodyDims = self.exportLabelmap(
                    segmentationNode, [s.segmentId for s in classes.bodyOutline], geometryNode, bodyPath)
                if bodyDims != dims or not np.allclose(bodyMatrix, ijkToRAS, atol=GEOMETRY_TOLERANCE_MM):
                    raise SynthesisError("the body outline segment could not be exported on the segmentation's grid")
                args += ["--body-mask", bodyPath]
            if steps:
                args += ["--steps", int(steps)]
            if sampler:
                args += ["--sampler", sampler]
            if model:
                args += ["--model", model]
            if regenerating:
                args += self.regionArguments(outputVolumeNode, state, workDir, regionMarginMm)
            process = BackgroundProcess(pythonCommand(self.python(), CLI_MODULE, *map(str, args)),
                                        env=self.childEnvironment(), cwd=str(workDir))
        except BaseException:
            shutil.rmtree(workDir, ignore_errors=True)
            raise
        transformNode = (geometryNode or segmentationNode).GetParentTransformNode()
        task = BackgroundTask(process, workDir, "synthesis", keepFiles=self.keepFiles, inputs={
            "regenerating": regenerating, "labels": labelsPath, "mapping": mappingPath.read_text(encoding="utf-8"),
            "segmentationID": segmentationNode.GetID(),
            "referenceID": referenceVolumeNode.GetID() if referenceVolumeNode else None,
            "outputID": outputVolumeNode.GetID() if outputVolumeNode else None,
            "outputName": outputName or f"{segmentationNode.GetName()} synthetic CT",
            "ijkToRAS": ijkToRAS, "dimensions": dims, "outputs": outputs,
            "variance": workDir / "std.nrrd" if samples > 1 else None,
            "transformID": transformNode.GetID() if transformNode else None,
            "unknownSegments": [s.name for s in classes.unknown]})
        if classes.warning():
            task.warnings.append(classes.warning())
        process.start()
        logger.info("CTSemanticSynth: %s", " ".join(process.args))
        return task

    def finishSynthesis(self, task: BackgroundTask):
        """Load the finished synthesis into the output node (new, or the one chosen); returns the node. With several
        samples the others become new nodes, and ``task.nodes`` holds ``{"samples": [...], "variance": node}``."""
        try:
            state = task.poll()
            if state is State.CANCELLED:
                raise SynthesisError("synthesis was cancelled")
            if state is not State.SUCCEEDED:
                raise SynthesisError(f"synthesis failed: {task.process.errorMessage()}"
                                     if state is State.FAILED else "synthesis is still running")
            inputs = task.inputs
            nodes = []
            for k, output in enumerate(inputs["outputs"]):
                name = inputs["outputName"] if k == 0 else f"{inputs['outputName']} sample {k + 1}"
                nodes.append(self._loadSynthetic({**inputs, "outputID": inputs["outputID"] if k == 0 else None,
                                                  "outputName": name}, output))
            variance = self._loadVariance(inputs, nodes[0]) if inputs["variance"] else None
            task.nodes = {"samples": nodes, "variance": variance}
            self._storeSegmentationState(nodes[0], inputs)
            return nodes[0]
        finally:
            if task.poll().finished:
                task.cleanup()

    @staticmethod
    def _readOnGrid(inputs: dict, path: Path) -> np.ndarray:
        voxels, ijkToRAS = readArray(path)
        dims = voxels.shape[::-1]
        if dims != tuple(inputs["dimensions"]) or not np.allclose(ijkToRAS, inputs["ijkToRAS"], atol=GEOMETRY_TOLERANCE_MM):
            raise SynthesisError(f"the synthetic CT came back on another grid ({dims} vs {inputs['dimensions']}); "
                                 "nothing was loaded")
        return voxels

    def _loadSynthetic(self, inputs: dict, output: Path):
        scene = slicer.mrmlScene
        voxels = self._readOnGrid(inputs, output)
        provenance = json.loads(sidecar_path(output).read_text(encoding="utf-8"))
        node = scene.GetNodeByID(inputs["outputID"]) if inputs["outputID"] else None
        if node is None:
            node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(inputs["outputName"]))
        if inputs.get("regenerating"):
            self._keepPreviousVersion(node)
        else:
            self._dropPreviousVersion(node)
        wasModifying = node.StartModify()
        slicer.util.updateVolumeFromArray(node, voxels)
        node.SetIJKToRASMatrix(vtkMatrix(inputs["ijkToRAS"]))  # exactly the segmentation's grid
        node.SetAndObserveTransformNodeID(inputs["transformID"])
        self._setProvenance(node, provenance, inputs)
        node.EndModify(wasModifying)
        showAbdomenWindow(node)
        segmentation = scene.GetNodeByID(inputs["segmentationID"])
        self.placeBeside(node, scene.GetNodeByID(inputs["referenceID"]) if inputs["referenceID"] else segmentation)
        return node

    def _loadVariance(self, inputs: dict, synthetic):
        """The samples' per-voxel standard deviation (HU) as a heat-coloured volume to overlay on ``synthetic``."""
        scene = slicer.mrmlScene
        voxels = self._readOnGrid(inputs, inputs["variance"])
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode",
                                       scene.GenerateUniqueName(f"{inputs['outputName']} std (HU)"))
        slicer.util.updateVolumeFromArray(node, voxels)
        node.SetIJKToRASMatrix(vtkMatrix(inputs["ijkToRAS"]))
        node.SetAndObserveTransformNodeID(inputs["transformID"])
        node.SetAttribute(ATTRIBUTE_PREFIX + "VarianceOf", synthetic.GetID())
        node.SetAttribute(ATTRIBUTE_PREFIX + "Samples", str(len(inputs["outputs"])))
        node.SetDescription(f"Per-voxel standard deviation (HU) of {len(inputs['outputs'])} synthetic CTs: where the "
                            "model is unsure")
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        display.AutoWindowLevelOff()
        top = max(float(voxels.max()), 1.0)
        display.SetWindowLevel(top, top / 2)
        display.SetAndObserveColorNodeID(VARIANCE_COLORS)
        self.placeBeside(node, synthetic)
        return node

    @staticmethod
    def _setProvenance(node, provenance: dict, inputs: dict) -> None:
        options = provenance.get("options", {})
        segmentation = slicer.mrmlScene.GetNodeByID(inputs["segmentationID"])
        values = {
            "Synthetic": "true",
            "Note": provenance.get("note", "SYNTHETIC CT; not a patient image"),
            "Generator": provenance.get("generator", ""),
            "Model": provenance.get("model", ""),
            "ModelSha256": provenance.get("model_sha256", ""),
            "Sampler": options.get("sampler", ""),
            "Steps": options.get("steps", ""),
            "Seed": options.get("seed", ""),
            "Device": provenance.get("device", ""),
            "Created": provenance.get("created", ""),
            "SourceSegmentation": segmentation.GetName() if segmentation else "",
            "SourceSegmentationID": inputs["segmentationID"],
            "ReferenceVolumeID": inputs["referenceID"] or "",
            "UnknownSegments": ", ".join(inputs.get("unknownSegments", [])),
            "Provenance": json.dumps(provenance, sort_keys=True),
        }
        for key, value in values.items():
            node.SetAttribute(ATTRIBUTE_PREFIX + key, str(value))
        node.SetDescription(f"SYNTHETIC CT - not a patient image. {values['Generator']}, model {values['Model']} "
                            f"(sha256 {values['ModelSha256'][:12]}), {values['Sampler']} {values['Steps']} steps, "
                            f"seed {values['Seed']}")

    @staticmethod
    def isSynthetic(node) -> bool:
        return node is not None and node.GetAttribute(ATTRIBUTE_PREFIX + "Synthetic") == "true"

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
        SynthesisLogic._dropPreviousVersion(node)
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

    @staticmethod
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

    def synthesize(self, segmentationNode, timeout: float | None = None, **kwargs):
        """Blocking convenience for scripts and tests: start, wait, finish."""
        task = self.startSynthesis(segmentationNode, **kwargs)
        try:
            task.wait(timeout)
        except BaseException:
            task.cancel()
            raise
        return self.finishSynthesis(task)

    # --- review ------------------------------------------------------------------------------------------------
    def showReview(self, syntheticVolumeNode, segmentationNode=None, realVolumeNode=None, swap: bool = False,
                   orientation: str = "Axial", blind: bool = False) -> dict[str, str | None]:
        """Side-by-side review (see :func:`review.setupReviewLayout`); ``blind`` also hides the volumes' names and
        Data module entries until :meth:`reveal` (refused without a real CT: an empty side gives the answer away)."""
        if blind and realVolumeNode is None:
            raise ValueError("blind review needs the real CT: select it as 'Reference CT'")
        shown = setupReviewLayout(syntheticVolumeNode, segmentationNode, realVolumeNode, swap, orientation)
        if blind:  # (ends an earlier blinding first)
            scene = syntheticVolumeNode.GetScene()
            self.blinding.blind(scene.GetNodeByID(shown["Red"]), scene.GetNodeByID(shown["Yellow"]))
        else:
            self.blinding.restore()
        return shown

    def reveal(self) -> None:
        """End blinding: the volumes get their names back and reappear in the Data module."""
        self.blinding.restore()

    # --- model card (read by the library in the background process: Slicer's own process never imports torch) ----
    def startModelInfo(self, model: str | None = None) -> BackgroundTask:
        """Start ``ctsynth info [MODEL] --json``: the library finds the model (path, bundled or cache) and checks it."""
        args = ["info"] + ([model] if model else []) + ["--json"]
        process = BackgroundProcess(pythonCommand(self.python(), CLI_MODULE, *args), env=self.childEnvironment())
        return BackgroundTask(process.start(), self._workDir("info"), "info", keepFiles=self.keepFiles)

    @staticmethod
    def finishModelInfo(task: BackgroundTask) -> dict:
        """The model's config (name, model, classes, sha256, ...); raises SynthesisError with the library's message."""
        try:
            if task.poll() is not State.SUCCEEDED:
                raise SynthesisError(task.process.errorMessage() if task.poll() is State.FAILED
                                     else f"the model check is {task.poll().value}")
            text = "\n".join(task.process.lines)
            try:
                return json.loads(text[text.index("{"):text.rindex("}") + 1])
            except ValueError:
                raise SynthesisError(f"unexpected output of ctsynth info: {text[-300:]}") from None
        finally:
            task.cleanup()

    @staticmethod
    def modelSummary(config: dict) -> str:
        """Two lines for the panel: name, conditioning, size, classes; sha256."""
        net = config["model"]
        kind = net["conditioning"] if "conditioning" in net else net["method"]  # a diffusion model or a generator
        return (f"{config.get('name', '?')} ({kind}, {net['image_size']}x{net['image_size']}), "
                f"{len(config['classes']) - 1} classes\nsha256 {config['sha256'][:16]}...")

    # --- reader study ------------------------------------------------------------------------------------------
    @classmethod
    def casesFromScene(cls, scene) -> list[StudyCase]:
        """A reader-study case for each synthetic CT in the scene whose reference (real) CT is still there."""
        cases = []
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
            node = scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
            real = scene.GetNodeByID(node.GetAttribute(ATTRIBUTE_PREFIX + "ReferenceVolumeID") or "")
            if cls.isSynthetic(node) and real is not None:
                segmentation = scene.GetNodeByID(node.GetAttribute(ATTRIBUTE_PREFIX + "SourceSegmentationID") or "")
                cases.append(StudyCase(node.GetName(), real.GetID(), node.GetID(),
                                       segmentation.GetID() if segmentation else ""))
        if not cases:
            raise ValueError("the scene has no synthetic CT made with a reference CT: synthesize with 'Reference CT' "
                             "set, or choose a study folder")
        return cases

    @classmethod
    def loadStudyCase(cls, case: StudyCase) -> tuple[list, tuple]:
        """(nodes added to the scene, (real, synthetic, segmentation or None)) for a case given as files or node IDs."""
        scene = slicer.mrmlScene
        if scene.GetNodeByID(case.real) is not None:
            nodes = tuple(scene.GetNodeByID(i) if i else None for i in (case.real, case.synthetic, case.segmentation))
            return [], nodes
        added = []
        try:
            added += [loadVolumeFile(Path(case.real), "Study volume"),
                      loadVolumeFile(Path(case.synthetic), "Study volume")]
            added.append(cls.loadClassLabelmap(Path(case.segmentation), "Study segmentation")
                         if case.segmentation else None)
        except BaseException:
            removeNodes(added)
            raise
        return [n for n in added if n is not None], tuple(added)

    def showStudyCase(self, case: StudyCase, syntheticSide: str, orientation: str = "Axial") -> list:
        """Load a reader-study case (files) or take it from the scene (node IDs) and show it blinded, the synthetic
        CT on ``syntheticSide``; returns the nodes added (for :meth:`endStudyCase`)."""
        added, (real, synthetic, segmentation) = self.loadStudyCase(case)
        try:
            self.showReview(synthetic, segmentation, real, swap=syntheticSide == "left", orientation=orientation,
                            blind=True)
        except BaseException:
            removeNodes(added)
            raise
        return added

    def endStudyCase(self, added: list) -> None:
        """Unblind and remove the nodes :meth:`showStudyCase` added."""
        self.reveal()
        removeNodes(added)

    @staticmethod
    def studyTable(summary: StudySummary, tableNode=None):
        """The reader study's summary (quantity, value) in ``tableNode``, else in the scene's "Reader study summary"
        table (made once)."""
        scene = slicer.mrmlScene
        name = "Reader study summary"
        tableNode = (tableNode or scene.GetFirstNode(name, "vtkMRMLTableNode")
                     or scene.AddNewNodeByClass("vtkMRMLTableNode", name))
        wasModifying = tableNode.StartModify()
        tableNode.RemoveAllColumns()
        for index, title in enumerate(("Quantity", "Value")):
            column = vtk.vtkStringArray()
            column.SetName(title)
            for row in summary.rows():
                column.InsertNextValue(row[index])
            tableNode.AddColumn(column)
        tableNode.SetUseColumnTitleAsColumnHeader(True)
        tableNode.EndModify(wasModifying)
        return tableNode

    # --- Dice with TotalSegmentator ----------------------------------------------------------------------------
    def startDice(self, syntheticVolumeNode, segmentationNode, realVolumeNode=None, labels: str = "auto",
                  mappingFile: str | None = None, device: str = "auto", fast: bool = True) -> BackgroundTask:
        """Run TotalSegmentator on the synthetic CT (and the real one, as the ceiling) in the background and score
        it against the input segmentation. Finish with :meth:`finishDice`."""
        classes = self.classifySegments(segmentationNode, labels, mappingFile)
        order = exportOrder(classes)
        workDir = self._workDir("dice")
        try:
            synthetic = workDir / "synthetic.nii.gz"
            writeVolume(syntheticVolumeNode, synthetic)
            seg = workDir / "labels.nrrd"
            self.exportLabelmap(segmentationNode, [s.segmentId for s, _ in order], syntheticVolumeNode, seg)
            (workDir / "labels.json").write_text(mappingJson(order))
            real = None
            if realVolumeNode is not None:
                real = workDir / "real.nii.gz"
                writeVolume(realVolumeNode, real)
            args = self.diceCommand(synthetic, seg, workDir / "labels.json", real, workDir / "dice.json",
                                    workDir / "totalseg_synthetic.nii.gz", device, fast)
            process = BackgroundProcess(pythonCommand(self.python(), CLI_MODULE, *map(str, args)),
                                        env=self.childEnvironment(), cwd=str(workDir))
        except BaseException:
            shutil.rmtree(workDir, ignore_errors=True)
            raise
        task = BackgroundTask(process, workDir, "dice", keepFiles=self.keepFiles, inputs={
            "syntheticID": syntheticVolumeNode.GetID(), "json": workDir / "dice.json",
            "totalseg": workDir / "totalseg_synthetic.nii.gz"})
        process.start()
        return task

    @staticmethod
    def diceCommand(synthetic: Path, seg: Path, labels: Path, real: Path | None, jsonOut: Path, segOut: Path,
                    device: str, fast: bool) -> list:
        """``ctsynth evaluate --totalseg`` (CTSemanticSynthLib/cli/evaluate.py), keeping TotalSegmentator's label map."""
        args = ["evaluate", "--synthetic", synthetic, "--seg", seg, "--labels", labels, "--totalseg",
                "--json", jsonOut, "--device", device, "--overwrite", "--save-totalseg", segOut]
        if real is not None:
            args += ["--real", real]
        if not fast:
            args.append("--full")
        return args

    def finishDice(self, task: BackgroundTask, tableNode=None):
        """Load the Dice results into a table node (new if None) and the TotalSegmentator segmentation; returns
        (tableNode, segmentationNode or None)."""
        try:
            state = task.poll()
            if state is State.FAILED and task.process.errorMessage().startswith(WEIGHTS_MISSING):
                raise TotalSegmentatorWeightsMissing(task.process.errorMessage())
            if state is not State.SUCCEEDED:
                raise SynthesisError(f"Dice evaluation failed: {task.process.errorMessage()}"
                                     if state is State.FAILED else f"Dice evaluation is {state.value}")
            results = json.loads(Path(task.inputs["json"]).read_text(encoding="utf-8"))
            scene = slicer.mrmlScene
            synthetic = scene.GetNodeByID(task.inputs["syntheticID"])
            name = synthetic.GetName() if synthetic else "synthetic CT"
            if tableNode is None:
                tableNode = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(f"{name} Dice"))
            self.fillDiceTable(tableNode, results)
            segNode = None
            if Path(task.inputs["totalseg"]).is_file():
                segNode = self.loadClassLabelmap(Path(task.inputs["totalseg"]), f"{name} TotalSegmentator")
                if synthetic is not None:
                    self.placeBeside(segNode, synthetic)
            return tableNode, segNode
        finally:
            if task.poll().finished:
                task.cleanup()

    def weightsDownloadCommand(self, fast: bool = True) -> list[str]:
        """TotalSegmentator's own download command (any 2.x version) for the weights of its 'total' task."""
        return pythonCommand(self.python(), TOTALSEG_DOWNLOAD_MODULE, "-t", "total_fast" if fast else "total")

    def startWeightsDownload(self, fast: bool = True) -> BackgroundTask:
        """Let TotalSegmentator download its weights; only after the user agreed, and only when :meth:`isOnline`."""
        process = BackgroundProcess(self.weightsDownloadCommand(fast), env=self.childEnvironment())
        return BackgroundTask(process.start(), self._workDir("weights"), "weights", keepFiles=self.keepFiles)

    @staticmethod
    def finishWeightsDownload(task: BackgroundTask) -> None:
        """Raise SynthesisError with TotalSegmentator's message unless the download succeeded."""
        try:
            if task.poll() is not State.SUCCEEDED:
                raise SynthesisError(f"TotalSegmentator's weight download {task.poll().value}: "
                                     f"{task.process.errorMessage()}")
        finally:
            task.cleanup()

    @staticmethod
    def isOnline(host: str = "github.com", timeout: float = 3.0) -> bool:
        """Whether a connection to ``host`` (where TotalSegmentator's weights are) can be opened."""
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            return True
        except OSError:
            return False

    @staticmethod
    def _diceColumns(results: dict) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
        """({column title: {class name: dice}}, {column title: mean}) from ``ctsynth evaluate --json``
        (its "totalseg" part: {"synthetic": {organ: dice or null}, "real": ..., "mean_synthetic": ...})."""
        results = results.get("totalseg", results)
        columns, means = {}, {}
        for key, title in (("synthetic", "Dice synthetic CT"), ("real", "Dice real CT")):
            part = results.get(key)
            if isinstance(part, dict):
                part = part.get("dice", part)
                columns[title] = {normalize_name(k): float(v) for k, v in part.items() if isinstance(v, (int, float))}
                if isinstance(results.get(f"mean_{key}"), (int, float)):
                    means[title] = float(results[f"mean_{key}"])
        if not columns:
            raise SynthesisError("the Dice results file has no per-organ values")
        return columns, means

    @classmethod
    def fillDiceTable(cls, tableNode, results: dict) -> None:
        """Organ | Dice synthetic CT | [Dice real CT], one row per organ scored plus the mean."""
        columns, means = cls._diceColumns(results)
        organs = [c for c in MODEL_CLASSES if any(c in col for col in columns.values())]
        wasModifying = tableNode.StartModify()
        tableNode.RemoveAllColumns()
        names = vtk.vtkStringArray()
        names.SetName("Organ")
        for organ in organs:
            names.InsertNextValue(DISPLAY_NAMES[MODEL_CLASSES.index(organ)])
        names.InsertNextValue("Mean")
        tableNode.AddColumn(names)
        for title, values in columns.items():
            array = vtk.vtkDoubleArray()
            array.SetName(title)
            scored = [values.get(organ, float("nan")) for organ in organs]
            for value in scored:
                array.InsertNextValue(value)
            mean = means.get(title, float(np.nanmean(scored)) if np.isfinite(scored).any() else float("nan"))
            array.InsertNextValue(mean)
            tableNode.AddColumn(array)
        tableNode.SetUseColumnTitleAsColumnHeader(True)
        tableNode.SetAttribute(ATTRIBUTE_PREFIX + "DiceResults", json.dumps(results, sort_keys=True))
        tableNode.EndModify(wasModifying)

    @staticmethod
    def loadClassLabelmap(path: Path, name: str):
        """A segmentation node from a label map in model class ids, with the model's names and colours."""
        voxels, ijkToRAS = readArray(path)
        segNode = segmentationFromArray(voxels, ijkToRAS, slicer.mrmlScene.GenerateUniqueName(name))
        segmentation = segNode.GetSegmentation()
        for i in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(i)
            value = int(segment.GetLabelValue())
            if 0 < value < len(MODEL_CLASSES):
                segment.SetName(DISPLAY_NAMES[value])
                segment.SetColor(*(c / 255.0 for c in COLORS[value]))
        return segNode
