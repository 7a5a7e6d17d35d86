"""Synthesis in the background (``ctsynth synth``), loading its result into the scene with its provenance, and the
model card (``ctsynth info``). Synthesis never touches the scene until it has succeeded: inputs are exported to a
temporary folder, and only :meth:`Synthesis.finishSynthesis` adds or changes nodes."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np

import slicer
from CTSemanticSynthLib.intensity import mapping_from_config
from CTSemanticSynthLib.provenance import sidecar_path

from .export import GEOMETRY_TOLERANCE_MM
from .nodes import SynthesisError, nodeIJKToRAS, placeBeside, readArray, vtkMatrix, writeVolume
from .process import BackgroundProcess, State, pythonCommand
from .review import showWindow
from .segments import exportOrder, mappingJson
from .tasks import ATTRIBUTE_PREFIX, CLI_MODULE, BackgroundTask, isSynthetic

logger = logging.getLogger(__name__)

VARIANCE_COLORS = "vtkMRMLColorTableNodeRainbow"  # no black end: nothing darkens the CT under the overlay
ONE_PATIENT = re.compile(r"\b(one|1|a single|single) patient\b", re.IGNORECASE)  # in a model card's description
VARIANCE_THRESHOLD_HU = 10.0  # standard deviations below this are transparent (sampling noise, not doubt)


class Synthesis:
    # --- synthesis ---------------------------------------------------------------------------------------------
    def startSynthesis(self, segmentationNode, outputVolumeNode=None, referenceVolumeNode=None, model: str | None = None,
                       labels: str = "auto", mappingFile: str | None = None, strictLabels: bool = False,
                       preset: str = "fast", steps: int = 0, seed: int = 0, device: str = "auto", batchSize: int = 0,
                       outputName: str | None = None, samples: int = 1, sampler: str | None = None,
                       precision: str = "auto", regionMarginMm: float | None = None,
                       classSet: str | None = None) -> BackgroundTask:
        """Export the inputs and start ``ctsynth synth`` in the background; the scene is not changed.

        The segments are mapped onto the model's class set (``classSet`` names it; None: the one the model's card
        names, see :meth:`modelClassSet`). ``referenceVolumeNode`` (the real CT) gives the grid and, unless a body
        outline segment does, the body outline (``--reference-ct``).

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
        classSet = classSet or self.modelClassSet(model)
        classes = self.classifySegments(segmentationNode, labels, mappingFile, strictLabels, classSet)
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
            mappingPath.write_text(mappingJson(order, classes.classSet))
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
            if referenceVolumeNode is not None:
                args += ["--reference-ct", self._exportReference(referenceVolumeNode, ijkToRAS, dims, workDir)]
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
            "transformID": transformNode.GetID() if transformNode else None, "classSet": classSet,
            "unknownSegments": [s.name for s in classes.unknown],
            "notInModel": [s.name for s in classes.notInModel]})
        if classes.warning():
            task.warnings.append(classes.warning())
        process.start()
        logger.info("CTSemanticSynth: %s", " ".join(process.args))
        return task

    @staticmethod
    def _exportReference(referenceVolumeNode, ijkToRAS: np.ndarray, dims: tuple, workDir: Path) -> Path:
        """Write the reference CT for ``--reference-ct``; refuses it unless it is on the exported labels' grid (the
        library would resample it, and a body outline from another grid is not this patient's)."""
        shape = tuple(referenceVolumeNode.GetImageData().GetDimensions())
        if shape != tuple(dims) or not np.allclose(nodeIJKToRAS(referenceVolumeNode), ijkToRAS,
                                                   atol=GEOMETRY_TOLERANCE_MM):
            raise ValueError(f"reference CT '{referenceVolumeNode.GetName()}' is not on the segmentation's grid (size "
                             f"{shape} vs {tuple(dims)}, or spacing, origin or direction differ), so the body outline "
                             "cannot be taken from it: select the CT the segmentation was made on, or clear "
                             "'Reference CT'")
        path = workDir / "reference.nrrd"
        writeVolume(referenceVolumeNode, path)
        return path

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

    def _checkClassSet(self, provenance: dict, inputs: dict) -> None:
        """Refuse a result whose model has another class set than the segments were mapped onto (the model folder
        changed after its card was read): its classes would be silently wrong."""
        used = provenance.get("class_set", "paper")
        if used != inputs["classSet"]:
            self.modelConfigs.clear()  # read the cards again on the next Apply
            raise SynthesisError(f"the model's class set is '{used}', but the segments were mapped onto "
                                 f"'{inputs['classSet']}' (the model changed after it was checked); nothing was "
                                 "loaded: Apply again")

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
        self._checkClassSet(provenance, inputs)  # before the scene changes
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
        showWindow(node)
        segmentation = scene.GetNodeByID(inputs["segmentationID"])
        placeBeside(node, scene.GetNodeByID(inputs["referenceID"]) if inputs["referenceID"] else segmentation)
        return node

    def _loadVariance(self, inputs: dict, synthetic):
        """The samples' per-voxel standard deviation (HU) as a colour overlay for ``synthetic``: transparent below
        VARIANCE_THRESHOLD_HU, so the CT shows through where the samples agree, with a colour legend."""
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
                            f"model is unsure (transparent below {VARIANCE_THRESHOLD_HU:g} HU)")
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        display.AutoWindowLevelOff()
        top = max(float(voxels.max()), 2 * VARIANCE_THRESHOLD_HU)
        display.SetWindowLevel(top - VARIANCE_THRESHOLD_HU, (top + VARIANCE_THRESHOLD_HU) / 2)
        display.SetAndObserveColorNodeID(VARIANCE_COLORS)
        display.AutoThresholdOff()
        display.SetThreshold(VARIANCE_THRESHOLD_HU, max(top, float(voxels.max())))
        display.ApplyThresholdOn()
        legend = slicer.vtkSlicerColorLogic.AddDefaultColorLegendDisplayNode(node)
        if legend is not None:
            legend.SetTitleText("std (HU)")
        placeBeside(node, synthetic)
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
            "SegmentsNotInModel": json.dumps(inputs.get("notInModel", [])),
            "ClassSet": provenance.get("class_set", "paper"),
            "Classes": len(provenance.get("classes", [])),
            "Intensity": mapping_from_config(provenance).describe(),
            "BodyOutline": provenance.get("inputs", {}).get("body_outline", ""),
            "Provenance": json.dumps(provenance, sort_keys=True),
        }
        for key, value in values.items():
            node.SetAttribute(ATTRIBUTE_PREFIX + key, str(value))
        node.SetDescription(f"SYNTHETIC CT - not a patient image. {values['Generator']}, model {values['Model']} "
                            f"(sha256 {values['ModelSha256'][:12]}), {values['Sampler']} {values['Steps']} steps, "
                            f"seed {values['Seed']}")

    isSynthetic = staticmethod(isSynthetic)

    @staticmethod
    def synthesisSummary(node, limit: int = 12) -> str:
        """For the panel after a run: the model's class set and intensity mapping, where the body outline came from,
        and the segments the model does not know (synthesized as body tissue), by name with their count."""
        if not isSynthetic(node):
            return ""
        value = lambda key: node.GetAttribute(ATTRIBUTE_PREFIX + key) or ""  # noqa: E731
        lines = [f"Class set: {value('ClassSet')} ({value('Classes')} classes); intensity: {value('Intensity')}",
                 f"Body outline: {value('BodyOutline') or 'not recorded'}"]
        names = json.loads(value("SegmentsNotInModel") or "[]")
        if names:
            shown = ", ".join(f"'{n}'" for n in names[:limit]) + (f" and {len(names) - limit} more"
                                                                   if len(names) > limit else "")
            lines.append(f"Segments the model does not know ({len(names)}, synthesized as body tissue): {shown}")
        else:
            lines.append("Segments the model does not know: none")
        return "\n".join(lines)

    def synthesize(self, segmentationNode, timeout: float | None = None, **kwargs):
        """Blocking convenience for scripts and tests: start, wait, finish."""
        task = self.startSynthesis(segmentationNode, **kwargs)
        try:
            task.wait(timeout)
        except BaseException:
            task.cancel()
            task.wait()  # until it has stopped (killed after the grace period)
            raise
        return self.finishSynthesis(task)

    # --- model card (read by the library in the background process: Slicer's own process never imports torch) ----
    def startModelInfo(self, model: str | None = None) -> BackgroundTask:
        """Start ``ctsynth info [MODEL] --json``: the library finds the model (path, bundled or cache) and checks it."""
        args = ["info"] + ([model] if model else []) + ["--json"]
        process = BackgroundProcess(pythonCommand(self.python(), CLI_MODULE, *args), env=self.childEnvironment())
        return BackgroundTask(process.start(), self._workDir("info"), "info", keepFiles=self.keepFiles,
                              inputs={"model": model})

    def finishModelInfo(self, task: BackgroundTask) -> dict:
        """The model's config (name, model, class set, intensity, sha256, ...), also kept in ``modelConfigs`` for
        :meth:`modelClassSet`; raises SynthesisError with the library's message."""
        try:
            if task.poll() is not State.SUCCEEDED:
                raise SynthesisError(task.process.errorMessage() if task.poll() is State.FAILED
                                     else f"the model check is {task.poll().value}")
            text = "\n".join(task.process.lines)
            try:
                config = json.loads(text[text.index("{"):text.rindex("}") + 1])
            except ValueError:
                raise SynthesisError(f"unexpected output of ctsynth info: {text[-300:]}") from None
            self.modelConfigs[task.inputs.get("model")] = config
            return config
        finally:
            task.cleanup()

    def knownClassSet(self, model: str | None = None) -> str:
        """The class set of ``model`` once its card has been read (:meth:`finishModelInfo`), else the paper's."""
        return self.modelConfigs.get(model, {}).get("class_set", "paper")

    def modelClassSet(self, model: str | None = None, timeout: float = 300) -> str:
        """The class set the model's card names: from the card read last for ``model``, else read now (blocking
        until ``ctsynth info`` has finished)."""
        config = self.modelConfigs.get(model)
        if config is None:
            task = self.startModelInfo(model)
            try:
                task.wait(timeout)
            except BaseException:
                task.cancel()
                task.wait()
                raise
            config = self.finishModelInfo(task)
        return config.get("class_set", "paper")

    @staticmethod
    def modelSummary(config: dict) -> str:
        """Lines for the panel: name, conditioning, size; class set and intensity mapping; sha256; then the model
        card's warning, if any (a model trained on one patient)."""
        net = config["model"]
        kind = net["conditioning"] if "conditioning" in net else net["method"]  # a diffusion model or a generator
        patients = config.get("training", {}).get("patients")
        onePatient = patients == 1 or (patients is None and ONE_PATIENT.search(config.get("description", "")))
        warning = ("\nWarning: trained on one patient. It paints that patient's appearance into any layout: for "
                   "trying the pipeline, not for research or for training other models.") if onePatient else ""
        return (f"{config.get('name', '?')} ({kind}, {net['image_size']}x{net['image_size']})\n"
                f"class set: {config.get('class_set', 'paper')} ({len(config['classes'])} classes)\n"
                f"intensity: {mapping_from_config(config).describe()}\n"
                f"sha256 {config['sha256'][:16]}...{warning}")

