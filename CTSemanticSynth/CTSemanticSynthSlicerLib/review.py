"""Side-by-side review on real slice nodes and blinding of what names the volumes. MRML only (no Qt): the Widget
adds the GUI parts (view controllers, corner annotations, Data Probe).

Slicer's side-by-side layout keeps each view's own orientation (Red axial, Yellow sagittal by default) and linked
views only follow each other when their orientations match, so both views get the same orientation here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import slicer

from .choices import ORIENTATIONS

VIEWS = ("Red", "Yellow")  # left, right in the side-by-side layout
WINDOW, LEVEL = 400.0, 40.0  # abdomen window, the model's L40/W400


def showAbdomenWindow(volumeNode) -> None:
    """Grey colour map and the abdomen window (fixed, not automatic)."""
    if volumeNode.GetDisplayNode() is None:
        volumeNode.CreateDefaultDisplayNodes()
    display = volumeNode.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevel(WINDOW, LEVEL)
    display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")


def _viewNode(scene, className: str, viewName: str):
    for i in range(scene.GetNumberOfNodesByClass(className)):
        node = scene.GetNthNodeByClass(i, className)
        if node.GetLayoutName() == viewName:
            return node
    return None


def setupReviewLayout(syntheticVolumeNode, segmentationNode=None, realVolumeNode=None, swap: bool = False,
                      orientation: str = "Axial") -> dict[str, str | None]:
    """Side-by-side layout: real CT (or nothing, the segmentation alone) left, synthetic right (``swap`` exchanges
    them); both views in ``orientation`` and linked, both volumes in the abdomen window, segmentation outlines in
    both. Returns ``{"Red": volumeID or None, "Yellow": ...}`` (Red is left, Yellow right)."""
    if orientation not in ORIENTATIONS:
        raise ValueError(f"unknown orientation '{orientation}': use one of {', '.join(ORIENTATIONS)}")
    scene = syntheticVolumeNode.GetScene()
    sides = [realVolumeNode, syntheticVolumeNode]
    if swap:
        sides.reverse()
    layout = scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
    if layout is not None:
        layout.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)
    shown = {}
    for viewName, volume in zip(VIEWS, sides):
        sliceNode = _viewNode(scene, "vtkMRMLSliceNode", viewName)
        if sliceNode is not None and not sliceNode.SetOrientation(orientation):
            raise RuntimeError(f"the {viewName} view has no '{orientation}' orientation")
        composite = _viewNode(scene, "vtkMRMLSliceCompositeNode", viewName)
        if composite is not None:
            composite.SetBackgroundVolumeID(volume.GetID() if volume else None)
            composite.SetForegroundVolumeID(None)
            composite.SetLabelVolumeID(None)
            composite.SetLinkedControl(True)
        shown[viewName] = volume.GetID() if volume else None
    for volume in (realVolumeNode, syntheticVolumeNode):
        if volume is not None:
            showAbdomenWindow(volume)
    if segmentationNode is not None:
        if segmentationNode.GetDisplayNode() is None:
            segmentationNode.CreateDefaultDisplayNodes()
        display = segmentationNode.GetDisplayNode()
        display.SetVisibility(True)
        display.SetVisibility2DFill(False)
        display.SetVisibility2DOutline(True)
        display.RemoveAllViewNodeIDs()  # all views
    return shown


@dataclass
class Blinding:
    """Hides what tells the two volumes apart in the scene: their names (view controllers, Data Probe and
    annotations show node names) become neutral, and they leave the Data module's tree and the node selectors
    (HideFromEditors). :meth:`restore` puts everything back as it was."""

    _saved: list[tuple[object, str, int]] = field(default_factory=list)  # (node, name, HideFromEditors)

    @property
    def active(self) -> bool:
        return bool(self._saved)

    def blind(self, leftVolumeNode, rightVolumeNode) -> None:
        """Blind the two volumes shown left and right; refuses when either side is empty."""
        if leftVolumeNode is None or rightVolumeNode is None:
            raise ValueError("blind review needs a volume on both sides: select the real CT as reference CT "
                             "(otherwise the empty side gives the answer away)")
        self.restore()
        for node, name in ((leftVolumeNode, "Left volume"), (rightVolumeNode, "Right volume")):
            self._saved.append((node, node.GetName(), node.GetHideFromEditors()))
            node.SetName(name)
            node.SetHideFromEditors(True)

    def restore(self) -> None:
        """Give the blinded volumes their names back and show them in the Data module again."""
        for node, name, hidden in self._saved:
            node.SetName(name)
            node.SetHideFromEditors(hidden)
        self._saved.clear()
