"""Side-by-side review with blinding, and the reader study's cases in the scene: taken from it or loaded from files,
shown blinded, removed afterwards, and the summary table."""

from __future__ import annotations

from pathlib import Path

import vtk

import slicer
from CTSemanticSynthLib.intensity import mapping_from_config

from .nodes import loadClassLabelmap, loadVolumeFile, removeNodes
from .reader_study import StudyCase, StudySummary
from .regeneration import UNDO_ROLE
from .review import setupReviewLayout, showWindow, windowPresets
from .tasks import ATTRIBUTE_PREFIX, isSynthetic, provenanceOf


class ReviewAndStudy:
    # --- review ------------------------------------------------------------------------------------------------
    @staticmethod
    def reviewWindows(syntheticVolumeNode) -> tuple[str, ...]:
        """The window presets a synthetic CT can be reviewed in beside the real CT: those inside the HU range of its
        model's intensity mapping (recorded in its provenance; the paper's window when none is recorded), so only
        the abdomen window for a paper-window model, and bone and lung windows too for a full-range one."""
        return windowPresets(mapping_from_config(provenanceOf(syntheticVolumeNode)).hu_range)

    def _checkWindow(self, syntheticVolumeNode, window: str) -> None:
        allowed = self.reviewWindows(syntheticVolumeNode)
        if window not in allowed:
            raise ValueError(f"the {window} window shows HU outside the range the synthetic CT's model represents, "
                             "where it is clipped and the real CT is not, so the two sides would differ: use "
                             f"{' or '.join(allowed)}")

    def showReview(self, syntheticVolumeNode, segmentationNode=None, realVolumeNode=None, swap: bool = False,
                   orientation: str = "Axial", blind: bool = False, parameterNode=None,
                   window: str = "Abdomen") -> dict[str, str | None]:
        """Side-by-side review (see :func:`review.setupReviewLayout`), both volumes in the ``window`` preset (one of
        :meth:`reviewWindows`); ``blind`` also hides the volumes' names and Data module entries and locks their
        window/level until :meth:`reveal`, which also gives ``parameterNode`` (the panel's) its node selections back.
        Refused without a real CT: an empty side gives the answer away."""
        if blind and realVolumeNode is None:
            raise ValueError("blind review needs the real CT: select it as 'Reference CT'")
        self._checkWindow(syntheticVolumeNode, window)
        if blind:  # (ends an earlier blinding first)
            self.blinding.remember((realVolumeNode, syntheticVolumeNode), parameterNode)
        else:
            self.blinding.restore()
        try:
            shown = setupReviewLayout(syntheticVolumeNode, segmentationNode, realVolumeNode, swap, orientation, window)
            if blind:
                scene = syntheticVolumeNode.GetScene()
                self.blinding.blind(scene.GetNodeByID(shown["Red"]), scene.GetNodeByID(shown["Yellow"]))
        except BaseException:
            self.blinding.restore()
            raise
        self.reviewVolumes = (syntheticVolumeNode, realVolumeNode)
        return shown

    def setReviewWindow(self, window: str) -> None:
        """Show both volumes of the review (:meth:`showReview`) in the ``window`` preset, blinded or not: the two sides
        never differ in window."""
        if not self.reviewVolumes or self.reviewVolumes[0].GetScene() is None:  # none shown, or its scene closed
            self.reviewVolumes = ()
            return
        synthetic, real = self.reviewVolumes
        self._checkWindow(synthetic, window)
        if self.blinding.active:
            self.blinding.change(lambda node: showWindow(node, window))
        else:
            for node in (real, synthetic):
                if node is not None:
                    showWindow(node, window)

    def reveal(self) -> None:
        """End blinding: the volumes get their names, Data module entries and display back, the panel its
        selections."""
        self.blinding.restore()

    # --- reader study ------------------------------------------------------------------------------------------
    @staticmethod
    def casesFromScene(scene, samplesPerCase: int = 1) -> list[StudyCase]:
        """Reader-study cases from the synthetic CTs in the scene whose reference (real) CT is still there: at most
        ``samplesPerCase`` synthetic CTs of each real CT (the first made), so a reader does not see the same real CT
        again unless asked. The hidden copies kept for undoing a regeneration are not cases."""
        if samplesPerCase < 1:
            raise ValueError("samples per case must be 1 or more")
        volumes = [scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
                   for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))]
        previousVersions = {node.GetNodeReferenceID(UNDO_ROLE) for node in volumes} - {None}
        cases, perReal = [], {}
        for node in volumes:
            real = scene.GetNodeByID(node.GetAttribute(ATTRIBUTE_PREFIX + "ReferenceVolumeID") or "")
            if not isSynthetic(node) or real is None or node.GetID() in previousVersions:
                continue
            perReal[real.GetID()] = perReal.get(real.GetID(), 0) + 1
            if perReal[real.GetID()] > samplesPerCase:
                continue
            segmentation = scene.GetNodeByID(node.GetAttribute(ATTRIBUTE_PREFIX + "SourceSegmentationID") or "")
            cases.append(StudyCase(node.GetName(), real.GetID(), node.GetID(),
                                   segmentation.GetID() if segmentation else ""))
        if not cases:
            raise ValueError("the scene has no synthetic CT made with a reference CT: synthesize with 'Reference CT' "
                             "set, or choose a study folder")
        return cases

    @staticmethod
    def loadStudyCase(case: StudyCase) -> tuple[list, tuple]:
        """(nodes added to the scene, (real, synthetic, segmentation or None)) for a case given as files or node IDs."""
        scene = slicer.mrmlScene
        if scene.GetNodeByID(case.real) is not None:
            nodes = tuple(scene.GetNodeByID(i) if i else None for i in (case.real, case.synthetic, case.segmentation))
            return [], nodes
        added = []
        try:
            added += [loadVolumeFile(Path(case.real), "Study volume"),
                      loadVolumeFile(Path(case.synthetic), "Study volume")]
            added.append(loadClassLabelmap(Path(case.segmentation), "Study segmentation")
                         if case.segmentation else None)
        except BaseException:
            removeNodes(added)
            raise
        return [n for n in added if n is not None], tuple(added)

    def showStudyCase(self, case: StudyCase, syntheticSide: str, orientation: str = "Axial",
                      parameterNode=None, window: str = "Abdomen") -> list:
        """Load a reader-study case (files) or take it from the scene (node IDs) and show it blinded, the synthetic
        CT on ``syntheticSide``, both sides in ``window`` where the case allows it (else the abdomen window); returns
        the nodes added (for :meth:`endStudyCase`)."""
        added, (real, synthetic, segmentation) = self.loadStudyCase(case)
        try:
            self.showReview(synthetic, segmentation, real, swap=syntheticSide == "left", orientation=orientation,
                            blind=True, parameterNode=parameterNode,
                            window=window if window in self.reviewWindows(synthetic) else "Abdomen")
        except BaseException:
            removeNodes(added)
            raise
        return added

    def endStudyCase(self, added: list) -> None:
        """Unblind and remove the nodes :meth:`showStudyCase` added."""
        self.reveal()
        if any(node in added for node in self.reviewVolumes):
            self.reviewVolumes = ()
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

