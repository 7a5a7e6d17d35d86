import pathlib
import random
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

from CTSemanticSynthSlicerLib.logic import SynthesisLogic
from CTSemanticSynthSlicerLib.process import State, formatDuration
from CTSemanticSynthSlicerLib.segments import CONVENTIONS

PRESETS = ("fast", "balanced", "paper")
DEVICES = ("auto", "cuda", "cpu", "mps")


#
# CTSemanticSynth
#


class CTSemanticSynth(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("CT Semantic Synthesis")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["CTSemanticSynth contributors"]
        self.parent.helpText = _("""
Turn an abdominal segmentation (15 AMOS organs, from TotalSegmentator, AMOS label maps or named segments) into a
<b>synthetic CT</b> with a conditional diffusion model, on the segmentation's exact grid. The result is marked
SYNTHETIC and carries its provenance (model sha256, sampler, steps, seed) as node attributes. Review it side by
side with the real CT, and score it by running TotalSegmentator on it (Dice per organ).
See the <a href="https://github.com/ctsemanticsynth/CTSemanticSynth#3d-slicer-extension">documentation</a>.
""")
        self.parent.acknowledgementText = _("""
Method: Y. Zhuang et al., <i>Semantic Image Synthesis for Abdominal CT</i>, arXiv:2312.06453 (2023).
Module layout after the Slicer scripted-module template and SlicerMONAIAuto3DSeg (background processing).
""")


#
# CTSemanticSynthParameterNode
#


@parameterNodeWrapper
class CTSemanticSynthParameterNode:
    """
    inputSegmentation - the organs to synthesize from; referenceVolume - optional real CT (grid, review, Dice
    ceiling); outputVolume - where the synthetic CT goes (None: a new node). Sampling: preset, steps (0 = the
    preset's), seed (randomSeed draws one on Apply and stores it here), device, batchSize.
    """

    inputSegmentation: vtkMRMLSegmentationNode
    referenceVolume: vtkMRMLScalarVolumeNode
    outputVolume: vtkMRMLScalarVolumeNode
    useBundledModel: bool = True
    modelFolder: pathlib.Path
    labelConvention: Annotated[str, Choice(list(CONVENTIONS))] = "auto"
    mappingFile: pathlib.Path
    allowUnknownSegments: bool = True
    preset: Annotated[str, Choice(list(PRESETS))] = "fast"
    steps: Annotated[int, WithinRange(0, 1000)] = 0
    seed: Annotated[int, WithinRange(0, 2147483647)] = 0
    randomSeed: bool = False
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    batchSize: Annotated[int, WithinRange(1, 256)] = 8
    blindReview: bool = False
    fastDice: bool = True


#
# CTSemanticSynthWidget
#


class CTSemanticSynthWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._task = None
        self._swapped = False
        self._shownModel = ()
        self._timer = qt.QTimer()
        self._timer.setInterval(500)
        self._timer.timeout.connect(self.onTimer)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CTSemanticSynth.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CTSemanticSynthLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.reviewButton.connect("clicked(bool)", self.onReviewButton)
        self.ui.swapButton.connect("clicked(bool)", self.onSwapButton)
        self.ui.revealButton.connect("clicked(bool)", self.onRevealButton)
        self.ui.diceButton.connect("clicked(bool)", self.onDiceButton)
        self.ui.progressBar.hide()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        if self._task is not None:
            self._task.cancel()
            self._endTask(_("Cancelled: the scene was closed."))
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
        self.ui.applyButton.enabled = busy and self._task.kind == "synthesis" or (not busy and bool(p and p.inputSegmentation))
        self.ui.applyButton.text = _("Cancel") if busy and self._task.kind == "synthesis" else _("Apply")
        self.ui.applyButton.toolTip = _("Synthesize a CT from the segmentation") if p and p.inputSegmentation else _("Select a segmentation")
        hasOutput = bool(p and self.logic.isSynthetic(p.outputVolume))
        for button in (self.ui.reviewButton, self.ui.swapButton):
            button.enabled = hasOutput and not busy
        self.ui.revealButton.enabled = hasOutput and bool(p and p.blindReview)
        self.ui.diceButton.enabled = busy and self._task.kind == "dice" or (hasOutput and not busy)
        self.ui.diceButton.text = _("Cancel Dice") if busy and self._task.kind == "dice" else _("Dice with TotalSegmentator")
        self.ui.modelFolderPathLineEdit.enabled = bool(p and not p.useBundledModel)
        self.ui.mappingFilePathLineEdit.enabled = bool(p and p.labelConvention == "json")
        self.ui.seedSpinBox.enabled = bool(p and not p.randomSeed)
        if p and self._shownModel != (p.useBundledModel, str(p.modelFolder)):
            self._shownModel = (p.useBundledModel, str(p.modelFolder))
            self.updateModelInfo()

    def _modelSpec(self):
        p = self._parameterNode
        if p.useBundledModel:
            return None
        if str(p.modelFolder) in ("", "."):
            raise ValueError(_("Choose a model folder, or tick 'Bundled demo model'."))
        return str(p.modelFolder)

    def updateModelInfo(self) -> None:
        from CTSemanticSynthSlicerLib.models import findModel, readModelCard

        try:
            card = readModelCard(findModel(self._modelSpec()))
            self.ui.modelInfoLabel.text = card.summary()
            self.ui.modelInfoLabel.toolTip = _("{path}\nclasses: {classes}\nsha256 {sha}").format(
                path=card.path, classes=", ".join(card.classes[1:]), sha=card.sha256)
        except (OSError, ValueError) as exc:
            self.ui.modelInfoLabel.text = str(exc)
            self.ui.modelInfoLabel.toolTip = ""

    # --- apply / cancel and the background task ------------------------------------------------------------
    def onApplyButton(self) -> None:
        if self._task is not None:
            self._task.cancel()
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
                mappingFile=str(p.mappingFile) if p.labelConvention == "json" else None,
                strictLabels=not p.allowUnknownSegments, preset=p.preset, steps=p.steps, seed=p.seed, device=p.device,
                batchSize=p.batchSize)
            self._startTask(task, _("Synthesizing..."))

    def _startTask(self, task, message: str) -> None:
        self._task = task
        self.ui.logTextEdit.setPlainText("\n".join(task.warnings))
        self.ui.statusLabel.text = message
        self.ui.progressBar.value = 0
        self.ui.progressBar.show()
        self._timer.start()
        self._checkCanApply()

    def _endTask(self, message: str) -> None:
        self._timer.stop()
        self._task = None
        self.ui.progressBar.hide()
        self.ui.statusLabel.text = message
        self._checkCanApply()

    def onTimer(self) -> None:
        task = self._task
        if task is None:
            return
        state = task.poll()
        process = task.process
        self.ui.progressBar.value = int(round(100 * process.fraction))
        self.ui.statusLabel.text = process.statusText("slices" if task.kind == "synthesis" else "steps")
        text = "\n".join(task.warnings + process.lines[-200:])
        if self.ui.logTextEdit.toPlainText() != text:
            self.ui.logTextEdit.setPlainText(text)
        if not state.finished:
            return
        message = _("Failed; see the details below.")
        try:
            with slicer.util.tryWithErrorDisplay(_("Synthesis failed.") if task.kind == "synthesis" else _("Dice evaluation failed.")):
                if task.kind == "synthesis":
                    node = self.logic.finishSynthesis(task)
                    self._parameterNode.outputVolume = node
                    slicer.util.setSliceViewerLayers(background=node, fit=True)
                    message = _("Done: '{name}' in {time}.").format(name=node.GetName(), time=formatDuration(process.elapsed))
                else:
                    tableNode, segNode = self.logic.finishDice(task)
                    self.ui.diceTableView.setMRMLTableNode(tableNode)
                    message = _("Dice table: '{name}'.").format(name=tableNode.GetName())
        finally:
            self._endTask(message)

    # --- review ---------------------------------------------------------------------------------------------
    def onReviewButton(self) -> None:
        self._swapped = random.random() < 0.5 if self._parameterNode.blindReview else False
        self._showReview()

    def onSwapButton(self) -> None:
        self._swapped = not self._swapped
        self._showReview()

    def onRevealButton(self) -> None:
        self._setBlind(False)
        side = _("right") if not self._swapped else _("left")
        self.ui.statusLabel.text = _("The synthetic CT is on the {side}.").format(side=side)

    def _showReview(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Could not set up the review layout.")):
            self.logic.setupReviewLayout(p.outputVolume, p.inputSegmentation, p.referenceVolume, swap=self._swapped)
            slicer.util.resetSliceViews()
            self._setBlind(p.blindReview)
            if p.blindReview:
                self.ui.statusLabel.text = _("Blind review: which side is synthetic? Click Reveal to see.")
            else:
                real = _("real CT") if p.referenceVolume else _("segmentation")
                left, right = (_("synthetic"), real) if self._swapped else (real, _("synthetic"))
                self.ui.statusLabel.text = _("Left: {left}, right: {right}.").format(left=left, right=right)

    @staticmethod
    def _setBlind(blind: bool) -> None:
        """Hide what names the volumes: the view controllers and the slice views' corner annotations."""
        slicer.util.setViewControllersVisible(not blind)
        layoutManager = slicer.app.layoutManager()
        for name in layoutManager.sliceViewNames():
            view = layoutManager.sliceWidget(name).sliceView()
            view.cornerAnnotation().SetVisibility(not blind)
            view.scheduleRender()

    # --- Dice -----------------------------------------------------------------------------------------------
    def onDiceButton(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._endTask(_("Dice evaluation cancelled."))
            return
        with slicer.util.tryWithErrorDisplay(_("Could not start the Dice evaluation."), waitCursor=True):
            from CTSemanticSynthSlicerLib.dependencies import ensureTotalSegmentator

            ensureTotalSegmentator()
            p = self._parameterNode
            task = self.logic.startDice(p.outputVolume, p.inputSegmentation, p.referenceVolume, labels=p.labelConvention,
                                        mappingFile=str(p.mappingFile) if p.labelConvention == "json" else None,
                                        device=p.device, fast=p.fastDice)
            self._startTask(task, _("Running TotalSegmentator..."))


#
# CTSemanticSynthLogic
#


class CTSemanticSynthLogic(ScriptedLoadableModuleLogic, SynthesisLogic):
    """All computation, usable without the GUI (see CTSemanticSynthSlicerLib/logic.py, which tests run headless):
    ``startSynthesis``/``finishSynthesis`` (or the blocking ``synthesize``), ``setupReviewLayout``,
    ``startDice``/``finishDice``."""

    def __init__(self, **kwargs) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        SynthesisLogic.__init__(self, **kwargs)

    def getParameterNode(self):
        return CTSemanticSynthParameterNode(super().getParameterNode())


#
# CTSemanticSynthTest
#


class CTSemanticSynthTest(ScriptedLoadableModuleTest):
    """Drives the Logic on a small generated case with the bundled demo model (skipped when it is not installed)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_UnknownSegmentNames()
        self.setUp()
        self.test_SynthesisAndCancel()

    def _segmentation(self, names=("liver", "spleen", "right kidney")):
        import numpy as np

        labels = np.zeros((24, 48, 48), dtype=np.int16)  # K, J, I
        labels[4:20, 8:30, 6:26] = 1
        labels[6:16, 10:22, 30:42] = 2
        labels[8:14, 30:40, 10:20] = 3
        ijkToRAS = np.array([[-1.5, 0, 0, 40], [0, -1.5, 0, 30], [0, 0, 2.5, -20], [0, 0, 0, 1]])
        labelmap = slicer.util.addVolumeFromArray(labels, ijkToRAS, "labels", "vtkMRMLLabelMapVolumeNode")
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "organs")
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(labelmap)
        slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelmap, segmentation)
        for i, name in enumerate(names):
            segmentation.GetSegmentation().GetNthSegment(i).SetName(name)
        slicer.mrmlScene.RemoveNode(labelmap)
        return segmentation, ijkToRAS

    def test_UnknownSegmentNames(self):
        segmentation, _ = self._segmentation(names=("Segment_1", "Segment_2", "Segment_3"))
        with self.assertRaises(ValueError) as raised:
            CTSemanticSynthLogic().startSynthesis(segmentation)
        self.assertIn("Segment_1", str(raised.exception))
        self.delayDisplay("Unknown segment names are refused with a clear message")

    def test_SynthesisAndCancel(self):
        import numpy as np

        from CTSemanticSynthSlicerLib.models import findModel

        try:
            findModel(None)
        except FileNotFoundError as exc:
            self.delayDisplay(f"Synthesis test skipped: {exc}")
            return
        segmentation, ijkToRAS = self._segmentation()
        logic = CTSemanticSynthLogic()
        before = slicer.mrmlScene.GetNumberOfNodes()
        task = logic.startSynthesis(segmentation, steps=2, seed=1, device="cpu")
        task.cancel()
        self.assertEqual(task.poll(), State.CANCELLED)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)
        self.delayDisplay("Cancel leaves the scene unchanged")

        output = logic.synthesize(segmentation, timeout=600, steps=2, seed=1, device="cpu")
        self.assertEqual(output.GetImageData().GetDimensions(), (48, 48, 24))
        matrix = vtk.vtkMatrix4x4()
        output.GetIJKToRASMatrix(matrix)
        self.assertTrue(np.allclose(slicer.util.arrayFromVTKMatrix(matrix), ijkToRAS))
        self.assertEqual(output.GetAttribute("CTSemanticSynth.Synthetic"), "true")
        self.assertEqual(output.GetAttribute("CTSemanticSynth.Seed"), "1")
        self.delayDisplay("Synthetic CT on the segmentation's grid, with provenance")
