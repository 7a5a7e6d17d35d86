"""Dice with TotalSegmentator (``ctsynth evaluate --totalseg``) in the background, its table and segmentation in the
scene, and TotalSegmentator's own weight download (in the background) when the user agreed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import vtk

import slicer
from CTSemanticSynthLib.evaluation import beyond_organs
from CTSemanticSynthLib.labels import ClassSet, class_set, normalize_name
from CTSemanticSynthLib.provenance import sidecar_path, write_record

from .nodes import SynthesisError, loadClassLabelmap, placeBeside, writeVolume
from .process import BackgroundProcess, State, pythonCommand
from .segments import exportOrder, mappingJson
from .tasks import ATTRIBUTE_PREFIX, CLI_MODULE, BackgroundTask, provenanceOf

TOTALSEG_DOWNLOAD_MODULE = "totalsegmentator.bin.totalseg_download_weights"  # TotalSegmentator 2.x's own command
WEIGHTS_MODULE = "CTSemanticSynthSlicerLib.weights"
WEIGHTS_MISSING = "TotalSegmentator weights for the"  # how `ctsynth evaluate --totalseg` says they are missing


class TotalSegmentatorWeightsMissing(SynthesisError):
    """TotalSegmentator's weights are not on this computer (the message says where they go)."""



class DiceEvaluation:
    # --- Dice with TotalSegmentator ----------------------------------------------------------------------------
    def startDice(self, syntheticVolumeNode, segmentationNode, realVolumeNode=None, labels: str = "auto",
                  mappingFile: str | None = None, device: str = "auto", fast: bool = True) -> BackgroundTask:
        """Run TotalSegmentator on the synthetic CT (and the real one, as the ceiling) in the background and score
        it against the input segmentation, in the class set and intensity mapping of the synthetic CT's model (its
        provenance, written beside it for ``ctsynth evaluate``; the paper's without one). Finish with
        :meth:`finishDice`."""
        provenance = provenanceOf(syntheticVolumeNode)
        classes = self.classifySegments(segmentationNode, labels, mappingFile,
                                        classSet=str(provenance.get("class_set", "paper")))
        order = exportOrder(classes)
        workDir = self._workDir("dice")
        try:
            synthetic = workDir / "synthetic.nrrd"
            writeVolume(syntheticVolumeNode, synthetic)
            if provenance:
                write_record(provenance, sidecar_path(synthetic))
            seg = workDir / "labels.nrrd"
            self.exportLabelmap(segmentationNode, [s.segmentId for s, _ in order], syntheticVolumeNode, seg)
            (workDir / "labels.json").write_text(mappingJson(order, classes.classSet))
            real = None
            if realVolumeNode is not None:
                real = workDir / "real.nrrd"
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
                segNode = loadClassLabelmap(Path(task.inputs["totalseg"]), f"{name} TotalSegmentator",
                                            self.reportClassSet(results))
                if synthetic is not None:
                    placeBeside(segNode, synthetic)
            return tableNode, segNode
        finally:
            if task.poll().finished:
                task.cleanup()

    def weightsDownloadCommand(self, fast: bool = True) -> list[str]:
        """The background download (:mod:`.weights`: connection check, then TotalSegmentator's own command for its
        'total' task, any 2.x version, redone when cut short)."""
        download = pythonCommand(self.python(), TOTALSEG_DOWNLOAD_MODULE, "-t", "total_fast" if fast else "total")
        return pythonCommand(self.python(), WEIGHTS_MODULE, *([] if fast else ["--full"]), "--", *download)

    def startWeightsDownload(self, fast: bool = True) -> BackgroundTask:
        """Let TotalSegmentator download its weights in the background; only after the user agreed."""
        process = BackgroundProcess(self.weightsDownloadCommand(fast), env=self.childEnvironment())
        return BackgroundTask(process.start(), self._workDir("weights"), "weights", keepFiles=self.keepFiles)

    @staticmethod
    def finishWeightsDownload(task: BackgroundTask) -> None:
        """Raise SynthesisError with the download's message unless it succeeded."""
        try:
            if task.poll() is not State.SUCCEEDED:
                raise SynthesisError(f"TotalSegmentator's weight download {task.poll().value}: "
                                     f"{task.process.errorMessage()}")
        finally:
            task.cleanup()

    @staticmethod
    def reportClassSet(results: dict) -> ClassSet:
        """The class set a ``ctsynth evaluate`` report was made in: its synthetic CT's provenance's (the paper's
        when it records none)."""
        return class_set(str((results.get("synthetic_provenance") or {}).get("class_set", "paper")))

    @staticmethod
    def _diceColumns(results: dict) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
        """({column title: {class name: dice}}, {column title: mean}) from ``ctsynth evaluate --json``
        (its "totalseg" part: {"synthetic": {class: dice or null}, "real": ..., "mean_synthetic": ...})."""
        results = results.get("totalseg", results)
        real = "Dice real CT (clipped like the synthetic)" if results.get("intensity") else "Dice real CT (unclipped)"
        columns, means = {}, {}
        for key, title in (("synthetic", "Dice synthetic CT"), ("real", real)):
            part = results.get(key)
            if isinstance(part, dict):
                part = part.get("dice", part)
                columns[title] = {normalize_name(k): float(v) for k, v in part.items() if isinstance(v, (int, float))}
                if isinstance(results.get(f"mean_{key}"), (int, float)):
                    means[title] = float(results[f"mean_{key}"])
        if not columns:
            raise SynthesisError("the Dice results file has no per-class values")
        return columns, means

    @classmethod
    def fillDiceTable(cls, tableNode, results: dict) -> None:
        """Organ (or Class) | Dice synthetic CT | [Dice real CT]: one row per class scored, in the class set the
        report was made in (its synthetic CT's provenance; the paper's without one): the organs first, then the
        set's other classes in its order; then the mean. The real CT's column title and description say how
        TotalSegmentator saw it."""
        columns, means = cls._diceColumns(results)
        classSet = cls.reportClassSet(results)
        rows = [c for c in classSet.labelled if any(classSet.classes[c] in col for col in columns.values())]
        wasModifying = tableNode.StartModify()
        tableNode.RemoveAllColumns()
        names = vtk.vtkStringArray()
        names.SetName("Class" if beyond_organs(classSet) else "Organ")
        for c in rows:
            names.InsertNextValue(classSet.display_names[c])
        names.InsertNextValue("Mean")
        tableNode.AddColumn(names)
        for title, values in columns.items():
            array = vtk.vtkDoubleArray()
            array.SetName(title)
            scored = [values.get(classSet.classes[c], float("nan")) for c in rows]
            for value in scored:
                array.InsertNextValue(value)
            mean = means.get(title, float(np.nanmean(scored)) if np.isfinite(scored).any() else float("nan"))
            array.InsertNextValue(mean)
            tableNode.AddColumn(array)
        intensity = results.get("totalseg", results).get("intensity")
        for title in columns:
            tableNode.SetColumnDescription(title, intensity or "as loaded (a report without intensity handling)")
        tableNode.SetUseColumnTitleAsColumnHeader(True)
        tableNode.SetAttribute(ATTRIBUTE_PREFIX + "DiceResults", json.dumps(results, sort_keys=True))
        tableNode.EndModify(wasModifying)
