import logging
import random
import sys
from typing import Annotated

import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from CTSemanticSynthSlicerLib.choices import (BUNDLED_MODELS, CONVENTIONS, DEVICES, ORIENTATIONS, PRECISIONS, PRESETS,
                                              REVIEW_WINDOWS, SAMPLERS)

# Slicer 5.10+ ship Python 3.12; older Slicer (3.9) gets one message, no traceback: nothing above may need Python > 3.9.
SUPPORTED = sys.version_info >= (3, 12)
TOO_OLD = _("CT Semantic Synthesis needs 3D Slicer 5.10 or newer (Python 3.12); this Slicer runs Python {version}. "
            "Install the current Slicer release.").format(version=sys.version.split()[0])

if SUPPORTED:
    from CTSemanticSynthSlicerLib.dependencies import installedVersion, missingForSynthesis
    from CTSemanticSynthSlicerLib.gui import setBlindGui, waitFor  # also binds path fields to str parameters
    from CTSemanticSynthSlicerLib.logic import SynthesisError, SynthesisLogic, TotalSegmentatorWeightsMissing
    from CTSemanticSynthSlicerLib.nodes import exampleSegmentation, nodeIJKToRAS
    from CTSemanticSynthSlicerLib.process import State, formatDuration
    from CTSemanticSynthSlicerLib.reader_study import ReaderStudy, casesFromFolder
else:  # a placeholder so that the classes below can be defined; the Widget shows TOO_OLD instead of the panel
    SynthesisLogic = object


class CTSemanticSynth(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("CT Semantic Synthesis")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.contributors = ["CTSemanticSynth contributors (CTSemanticSynth project)"]
        self.parent.helpText = _("""
Turn a segmentation (every structure the model's class set knows: the 15 AMOS organs, or TotalSegmentator's anatomy)
into a <b>synthetic CT</b> with a conditional diffusion model, on the segmentation's exact grid. The result is marked
SYNTHETIC and carries its provenance (model sha256, sampler, steps, seed) as node attributes. Review it side by side
with the real CT in one window (blinded if wished), run a blinded reader study, and score it by running
TotalSegmentator on it (Dice per class). Needs 3D Slicer 5.10 or newer (Python 3.12) and the PyTorch extension.
See the <a href="https://github.com/ctsemanticsynth/CTSemanticSynth#3d-slicer-extension">documentation</a>.
""")
        self.parent.acknowledgementText = _("""Method: Y. Zhuang et al., <i>Semantic Image Synthesis for Abdominal CT</i>,
arXiv:2312.06453 (2023). Module layout after the Slicer scripted-module template and SlicerMONAIAuto3DSeg.""")
        if not SUPPORTED:
            logging.error(TOO_OLD)


@parameterNodeWrapper
class CTSemanticSynthParameterNode:
    """inputSegmentation - the structures to synthesize from; referenceVolume - optional real CT (grid, body outline,
    review, Dice ceiling); outputVolume - where the synthetic CT goes (None: a new node); bundledModel or modelFolder:
    the model (its class set maps the segments). Sampling: preset, sampler/steps ("preset"/0: the preset's), precision,
    seed (randomSeed: drawn on Apply), device, batchSize (0: auto), samples; regionMargin (mm) grows the edited voxels
    that "Regenerate edited region" resamples in outputVolume. Review: blindReview, reviewOrientation, reviewWindow
    (both sides). Reader study: studyFromScene (studySamplesPerCase) or studyFolder, studyCsv, readerName, studySeed
    (0: a random plan per reader). Paths are strings: "" is no path."""

    inputSegmentation: vtkMRMLSegmentationNode
    referenceVolume: vtkMRMLScalarVolumeNode
    outputVolume: vtkMRMLScalarVolumeNode
    useBundledModel: bool = True
    bundledModel: Annotated[str, Choice(list(BUNDLED_MODELS))] = "demo"
    modelFolder: str = ""
    labelConvention: Annotated[str, Choice(list(CONVENTIONS))] = "auto"
    mappingFile: str = ""
    allowUnknownSegments: bool = True
    preset: Annotated[str, Choice(list(PRESETS))] = "fast"
    sampler: Annotated[str, Choice(list(SAMPLERS))] = "preset"
    steps: Annotated[int, WithinRange(0, 1000)] = 0
    precision: Annotated[str, Choice(list(PRECISIONS))] = "auto"
    seed: Annotated[int, WithinRange(0, 2147483647)] = 0
    randomSeed: bool = False
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    batchSize: Annotated[int, WithinRange(0, 256)] = 0  # 0: auto
    samples: Annotated[int, WithinRange(1, 16)] = 1
    regionMargin: Annotated[float, WithinRange(0.0, 100.0)] = 10.0
    blindReview: bool = False
    reviewOrientation: Annotated[str, Choice(list(ORIENTATIONS))] = "Axial"
    reviewWindow: Annotated[str, Choice(list(REVIEW_WINDOWS))] = "Abdomen"
    fastDice: bool = True
    studyFromScene: bool = False
    studySamplesPerCase: Annotated[int, WithinRange(1, 16)] = 1
    studyFolder: str = ""
    studyCsv: str = ""
    readerName: str = ""
    studySeed: Annotated[int, WithinRange(0, 2147483647)] = 0  # 0: random


class CTSemanticSynthWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._task, self._infoTask, self._stopping = None, None, []  # _stopping: cancelled, still cleaning up
        self._swapped, self._shownModel = False, ()
        self._study, self._studyNodes = None, []
        self._timer = qt.QTimer()  # started with a 500 ms interval
        self._timer.timeout.connect(self.onTimer)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        if not SUPPORTED:
            self.layout.addWidget(qt.QLabel(TOO_OLD))
            return
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CTSemanticSynth.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CTSemanticSynthLogic()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.regenerateButton.connect("clicked()", lambda: self.onApplyButton(regenerate=True))
        self.ui.undoRegenerationButton.connect("clicked()", self.onUndoRegeneration)
        self.ui.reviewButton.connect("clicked(bool)", self.onReviewButton)
        self.ui.swapButton.connect("clicked(bool)", self.onSwapButton)
        self.ui.revealButton.connect("clicked(bool)", self.onRevealButton)
        self.ui.reviewWindowComboBox.connect("currentTextChanged(QString)", self.onReviewWindow)
        self.ui.diceButton.connect("clicked(bool)", self.onDiceButton)
        self.ui.startStudyButton.connect("clicked(bool)", self.onStartStudy)
        self.ui.submitAnswerButton.connect("clicked(bool)", self.onSubmitAnswer)
        self.ui.progressBar.hide()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        for task in (t for t in (self._task, self._infoTask) if t is not None):
            task.cancel()
        self._timer.stop()
        self.removeObservers()
        if self.logic is not None:
            self.logic.reveal()

    def enter(self) -> None:
        if SUPPORTED:
            self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        if self._task is not None:
            self._cancel(self._task)
            self._endTask(_("Cancelled: the scene was closed."))
        self.logic.reveal()  # the scene and its nodes go; the study's answers are in the CSV already
        self._study, self._studyNodes = None, []
        setBlindGui(False)
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputSegmentation:
            self._parameterNode.inputSegmentation = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # each widget in the .ui that has a "SlicerParameterName" property is bound to that field
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        p = self._parameterNode
        busy = self._task is not None
        kind = self._task.kind if busy else None
        free = not busy and not self.logic.blinding.active  # blinded, the selectors may not show the real choice
        self.ui.applyButton.enabled = kind == "synthesis" or (free and bool(p and p.inputSegmentation))
        self.ui.applyButton.text = _("Cancel") if kind == "synthesis" else _("Apply")
        self.ui.applyButton.toolTip = _("Synthesize a CT from the segmentation") if p and p.inputSegmentation else _("Select a segmentation")
        hasOutput = bool(p and self.logic.isSynthetic(p.outputVolume))
        self.ui.regenerateButton.enabled = kind == "synthesis" or (free and hasOutput and bool(p.inputSegmentation))
        self.ui.regenerateButton.text = _("Cancel") if kind == "synthesis" else _("Regenerate edited region")
        self.ui.undoRegenerationButton.enabled = free and bool(p) and self.logic.canUndoRegeneration(p.outputVolume)
        for button in (self.ui.reviewButton, self.ui.swapButton):
            button.enabled = hasOutput and not busy and self._study is None
        self.ui.revealButton.enabled = self.logic.blinding.active and self._study is None
        self.ui.diceButton.enabled = kind in ("dice", "weights") or (hasOutput and free)
        self.ui.diceButton.text = _("Cancel Dice") if kind in ("dice", "weights") else _("Dice with TotalSegmentator")
        self.ui.modelFolderPathLineEdit.enabled = bool(p and not p.useBundledModel)
        self.ui.bundledModelComboBox.enabled = bool(p and p.useBundledModel)
        self.ui.mappingFilePathLineEdit.enabled = bool(p and p.labelConvention == "json")
        self.ui.seedSpinBox.enabled = bool(p and not p.randomSeed)
        self.ui.studyFolderPathLineEdit.enabled = bool(p and not p.studyFromScene)
        self.ui.studySamplesPerCaseSpinBox.enabled = bool(p and p.studyFromScene)
        self.ui.submitAnswerButton.enabled = self._study is not None
        if p:  # in the model's class set once its card is read (the paper's set before)
            self.ui.bodyTissueLabel.text = self.logic.bodyTissueText(p.inputSegmentation, p.labelConvention, p.mappingFile,
                                                                     self.logic.knownClassSet(self._modelSpec(False)))
        if p and self._shownModel != (p.useBundledModel, p.bundledModel, p.modelFolder):
            self._shownModel = (p.useBundledModel, p.bundledModel, p.modelFolder)
            self.updateModelInfo()

    def _modelSpec(self, required: bool = True) -> str:
        p = self._parameterNode
        if required and not p.useBundledModel and not p.modelFolder:
            raise ValueError(_("Choose a model folder, or tick 'Bundled model'."))
        return p.bundledModel if p.useBundledModel else p.modelFolder

    def updateModelInfo(self) -> None:
        """Ask the library (in the background process) for the model's card; onTimer shows it."""
        if self._infoTask is not None:
            self._cancel(self._infoTask)
            self._infoTask = None
        missing = missingForSynthesis(self.resourcePath("requirements.txt"))
        if missing:  # the check runs the library, which needs them: say so instead of showing its failure
            self.ui.modelInfoLabel.text = _("Checked once {packages} are installed (the first Apply offers to install "
                                            "them).").format(packages=", ".join(missing))
            return
        try:
            self._infoTask = self.logic.startModelInfo(self._modelSpec())
            self.ui.modelInfoLabel.text = _("checking the model...")
            self._timer.start(500)
        except (OSError, ValueError) as exc:
            self._infoTask = None
            self.ui.modelInfoLabel.text = str(exc)

    def _pollModelInfo(self) -> None:
        task = self._infoTask
        if task is None or not task.poll().finished:
            return
        self._infoTask = None
        try:
            self.ui.modelInfoLabel.text = self.logic.modelSummary(self.logic.finishModelInfo(task))
            self._checkCanApply()  # the segments' classes in the model's class set
        except SynthesisError as exc:  # the library's message (model not found, torch not installed yet, ...)
            self.ui.modelInfoLabel.text = str(exc)

    # --- apply / cancel and the background task ------------------------------------------------------------
    def onApplyButton(self, checked: bool = False, regenerate: bool = False) -> None:
        if self._task is not None:
            self._cancel(self._task)
            self._endTask(_("Cancelled; the scene was not changed."))
            return
        with slicer.util.tryWithErrorDisplay(_("Could not start the synthesis."), waitCursor=True):
            from CTSemanticSynthSlicerLib.dependencies import ensureSynthesisDependencies

            ensureSynthesisDependencies(self.resourcePath("requirements.txt"))
            p = self._parameterNode
            if p.randomSeed:
                p.seed = random.randrange(2147483647)  # recorded, so the result can be reproduced
            task = self.logic.startSynthesis(
                p.inputSegmentation, outputVolumeNode=p.outputVolume, referenceVolumeNode=p.referenceVolume,
                model=self._modelSpec(), labels=p.labelConvention,
                mappingFile=p.mappingFile if p.labelConvention == "json" else None,
                strictLabels=not p.allowUnknownSegments, preset=p.preset, steps=p.steps, seed=p.seed, device=p.device,
                batchSize=p.batchSize, samples=p.samples, sampler=None if p.sampler == "preset" else p.sampler,
                precision=p.precision, regionMarginMm=p.regionMargin if regenerate else None)
            self._startTask(task, _("Regenerating the edited region...") if regenerate else _("Synthesizing..."))
            self.ui.runSummaryLabel.text = ""
            self.ui.modelInfoLabel.text = self.logic.modelSummary(self.logic.modelConfigs[self._modelSpec()])  # its card

    def onUndoRegeneration(self) -> None:
        self.logic.undoRegeneration(self._parameterNode.outputVolume)
        self._endTask(_("The last regeneration was undone."))

    def _cancel(self, task) -> None:
        """Ask the task's process to stop; the timer polls it until it has (killed after a grace period)."""
        task.cancel()
        self._stopping.append(task)
        self._timer.start(500)

    def _startTask(self, task, message: str) -> None:
        self._task = task
        self.ui.logTextEdit.setPlainText("\n".join(task.warnings))
        self.ui.statusLabel.text = message
        self.ui.progressBar.value = 0
        self.ui.progressBar.show()
        self._timer.start(500)
        self._checkCanApply()

    def _endTask(self, message: str) -> None:
        self._task = None
        self.ui.progressBar.hide()
        self.ui.statusLabel.text = message
        self._checkCanApply()

    def onTimer(self) -> None:
        self._pollModelInfo()
        for stopping in self._stopping:
            stopping.poll()  # kills after the grace period; removes its folder once stopped
        self._stopping = [t for t in self._stopping if not t.process.stopped]
        task = self._task
        if task is None:
            if self._infoTask is None and not self._stopping:
                self._timer.stop()
            return
        state = task.poll()
        process = task.process
        self.ui.progressBar.value = int(round(100 * process.fraction))
        self.ui.statusLabel.text = process.statusText("slices" if task.kind == "synthesis" else "steps")
        text = "\n".join(task.warnings + process.lines[-200:])
        if self.ui.logTextEdit.toPlainText() != text:
            self.ui.logTextEdit.setPlainText(text)
        if state.finished:
            self._finishTask(task)

    def _finishTask(self, task) -> None:
        self._endTask(_("Failed; see the details below."))
        with slicer.util.tryWithErrorDisplay(_("{what} failed.").format(what=task.kind.capitalize())):
            if task.kind == "synthesis":
                node = self.logic.finishSynthesis(task)
                self._parameterNode.outputVolume = node
                slicer.util.setSliceViewerLayers(background=node, foreground=task.nodes["variance"], foregroundOpacity=0.5, fit=True)
                self.ui.statusLabel.text = _("Done: '{name}' in {time}.").format(name=node.GetName(), time=formatDuration(task.process.elapsed))
                self.ui.runSummaryLabel.text = self.logic.synthesisSummary(node)
            elif task.kind == "weights":
                self.logic.finishWeightsDownload(task)
                self.onDiceButton()
            else:
                try:
                    tableNode, _segmentation = self.logic.finishDice(task)
                except TotalSegmentatorWeightsMissing as exc:  # declined: the message says where they go
                    if not slicer.util.confirmOkCancelDisplay(_("TotalSegmentator's weights are not on this computer. Let "
                            "TotalSegmentator download them now (several hundred MB, once; needs the internet)?"), detailedText=str(exc)):
                        raise
                    self._startTask(self.logic.startWeightsDownload(self._parameterNode.fastDice),
                                    _("TotalSegmentator is downloading its weights..."))
                    return
                self.ui.diceTableView.setMRMLTableNode(tableNode)
                self.ui.statusLabel.text = _("Dice table: '{name}'.").format(name=tableNode.GetName())

    # --- review ---------------------------------------------------------------------------------------------
    def onReviewButton(self) -> None:
        self._swapped = random.random() < 0.5 if self._parameterNode.blindReview else False
        self._showReview()

    def onSwapButton(self) -> None:
        self._swapped = not self._swapped
        self._showReview()

    def onRevealButton(self) -> None:
        self.logic.reveal()
        setBlindGui(False)
        self.ui.statusLabel.text = _("The synthetic CT is on the {side}.").format(side=_("left") if self._swapped else _("right"))
        self._checkCanApply()

    def onReviewWindow(self, window: str) -> None:  # both sides, or the reason why not (nothing changes then)
        try:
            self.logic.setReviewWindow(window)
        except ValueError as exc:
            self.ui.statusLabel.text = str(exc)

    def _showReview(self) -> None:
        p = self._parameterNode
        if p.reviewWindow not in self.logic.reviewWindows(p.outputVolume):
            p.reviewWindow = "Abdomen"  # a paper-window model: the synthetic CT is clipped outside the abdomen window
        with slicer.util.tryWithErrorDisplay(_("Could not set up the review layout.")):
            self.logic.showReview(p.outputVolume, p.inputSegmentation, p.referenceVolume, swap=self._swapped,
                                  orientation=p.reviewOrientation, blind=p.blindReview, parameterNode=p.parameterNode,
                                  window=p.reviewWindow)
            slicer.util.resetSliceViews()
            setBlindGui(p.blindReview)
            if p.blindReview:
                self.ui.statusLabel.text = _("Blind review: which side is synthetic? Click Reveal to see.")
            else:
                real = _("real CT") if p.referenceVolume else _("segmentation")
                left, right = (_("synthetic"), real) if self._swapped else (real, _("synthetic"))
                self.ui.statusLabel.text = _("Left: {left}, right: {right}.").format(left=left, right=right)
        self._checkCanApply()

    # --- Dice -----------------------------------------------------------------------------------------------
    def onDiceButton(self) -> None:
        if self._task is not None:
            self._cancel(self._task)
            self._endTask(_("Dice evaluation cancelled."))
            return
        with slicer.util.tryWithErrorDisplay(_("Could not start the Dice evaluation."), waitCursor=True):
            from CTSemanticSynthSlicerLib.dependencies import ensureTotalSegmentator

            ensureTotalSegmentator()
            p = self._parameterNode
            task = self.logic.startDice(p.outputVolume, p.inputSegmentation, p.referenceVolume, labels=p.labelConvention,
                                        mappingFile=p.mappingFile if p.labelConvention == "json" else None,
                                        device=p.device, fast=p.fastDice)
            self._startTask(task, _("Running TotalSegmentator..."))

    # --- reader study ---------------------------------------------------------------------------------------
    def onStartStudy(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Could not start the reader study.")):
            if not p.studyCsv or not (p.studyFromScene or p.studyFolder):
                raise ValueError(_("Choose the case folder (or 'Cases from the scene') and the answers file (CSV)."))
            cases = self.logic.casesFromScene(slicer.mrmlScene, p.studySamplesPerCase) if p.studyFromScene \
                else casesFromFolder(p.studyFolder)
            self._study = ReaderStudy(p.studyCsv, cases, p.readerName, p.studySeed or None)
            self._showStudyCase()

    def onSubmitAnswer(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not save the answer.")):
            self._study.answer(self.ui.syntheticSideComboBox.currentText, self.ui.scoreLeftSpinBox.value,
                               self.ui.scoreRightSpinBox.value, self.ui.noteLineEdit.text)
            self._showStudyCase()

    def _showStudyCase(self) -> None:
        """Show the next case blinded, or, when all are answered, the summary (also written beside the CSV): no
        running score before."""
        self.logic.endStudyCase(self._studyNodes)
        self._studyNodes = []
        self.ui.syntheticSideComboBox.currentIndex = 0
        self.ui.scoreLeftSpinBox.value = self.ui.scoreRightSpinBox.value = 3
        self.ui.noteLineEdit.text = ""
        current = self._study.current()
        if current is None:
            self.ui.studySummaryTableView.setMRMLTableNode(self.logic.studyTable(self._study.summary()))
            path = self._study.writeSummary()
            self._study = None
            setBlindGui(False)
            self.ui.studyCaseLabel.text = _("All cases answered; summary saved to {path}.").format(path=path)
            self._checkCanApply()
            return
        position, case, side = current
        self._studyNodes = self.logic.showStudyCase(case, side, self._parameterNode.reviewOrientation,
                                                    self._parameterNode.parameterNode, self._parameterNode.reviewWindow)
        self._study.markShown(case.caseId)
        slicer.util.resetSliceViews()
        setBlindGui(True)
        self.ui.studyCaseLabel.text = _("Case {position} of {total}").format(position=position, total=len(self._study.plan))
        self._checkCanApply()


class CTSemanticSynthLogic(ScriptedLoadableModuleLogic, SynthesisLogic):
    """All computation, usable without the GUI (see CTSemanticSynthSlicerLib/logic.py, which tests run headless):
    ``startSynthesis``/``finishSynthesis`` (or the blocking ``synthesize``), ``showReview``/``reveal``,
    ``startDice``/``finishDice``, reader-study case loading."""

    def __init__(self, **kwargs) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        SynthesisLogic.__init__(self, **kwargs)

    def getParameterNode(self):
        return CTSemanticSynthParameterNode(super().getParameterNode())


class CTSemanticSynthTest(ScriptedLoadableModuleTest):
    """Drives the Logic on a small generated case with the bundled demo model; skips with a message when torch or
    the model is missing. Background work is awaited with a QTimer in a local event loop, so the GUI stays live."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        if not SUPPORTED:
            self.delayDisplay(TOO_OLD)
            return
        self.setUp()
        self.test_SynthesisAndCancel()

    def test_SynthesisAndCancel(self):
        if installedVersion("torch") is None:
            self.delayDisplay("Synthesis test skipped: PyTorch is not installed (install it with the PyTorch extension)")
            return
        logic = CTSemanticSynthLogic()
        info = logic.startModelInfo()
        waitFor(info, 300)
        try:
            logic.finishModelInfo(info)
        except SynthesisError as exc:
            self.delayDisplay(f"Synthesis test skipped: {exc}")
            return
        segmentation, ijkToRAS = exampleSegmentation()
        before = slicer.mrmlScene.GetNumberOfNodes()
        task = logic.startSynthesis(segmentation, steps=2, seed=1, device="cpu")
        task.cancel()
        self.assertEqual(task.poll(), State.CANCELLED)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)
        self.delayDisplay("Cancel leaves the scene unchanged")
        task = logic.startSynthesis(segmentation, steps=2, seed=1, device="cpu")
        self.assertEqual(waitFor(task), State.SUCCEEDED, task.process.errorMessage())
        output = logic.finishSynthesis(task)
        self.assertEqual(output.GetImageData().GetDimensions(), (48, 48, 24))
        self.assertTrue((abs(nodeIJKToRAS(output) - ijkToRAS) < 1e-6).all())
        self.assertEqual([output.GetAttribute(f"CTSemanticSynth.{k}") for k in ("Synthetic", "Seed")], ["true", "1"])
        self.delayDisplay("Synthetic CT on the segmentation's grid, with provenance")
