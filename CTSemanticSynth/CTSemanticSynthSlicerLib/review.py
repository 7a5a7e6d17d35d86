"""Side-by-side review on real slice nodes and blinding of what names the volumes. MRML only (no Qt): the Widget
adds the GUI parts (view controllers, corner annotations, Data Probe).

Slicer's side-by-side layout keeps each view's own orientation (Red axial, Yellow sagittal by default) and linked
views only follow each other when their orientations match, so both views get the same orientation here. Both
volumes always share one display window (a preset): a side shown in another window, or in a window reaching past the
HU range the model represents (where the synthetic CT is clipped and the real one is not), gives the answer away.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import vtk

import slicer

from .choices import ORIENTATIONS, REVIEW_WINDOWS

VIEWS = ("Red", "Yellow")  # left, right in the side-by-side layout
WINDOW_PRESETS = {"Abdomen": (400.0, 40.0), "Bone": (1800.0, 400.0), "Lung": (1000.0, -500.0)}
"""(window, level) of each REVIEW_WINDOWS preset: the paper's L40/W400 (-160..240 HU), a bone window (-500..1300 HU,
as ``ctsynth --preview``'s) and a lung/gas window (-1000..0 HU: air and lung dark to grey, soft tissue white)."""


def windowPresets(huRange: tuple[float, float]) -> tuple[str, ...]:
    """The presets whose window lies inside ``huRange`` (the HU a model's intensity mapping represents): only in
    those do a synthetic CT and the real one look alike where the real CT is outside that range."""
    low, high = huRange
    return tuple(name for name, (width, level) in WINDOW_PRESETS.items()
                 if low <= level - width / 2 and level + width / 2 <= high)


def showWindow(volumeNode, preset: str = "Abdomen") -> None:
    """Grey colour map and the window ``preset`` (fixed, not automatic)."""
    if preset not in REVIEW_WINDOWS:
        raise ValueError(f"unknown window '{preset}': use one of {', '.join(REVIEW_WINDOWS)}")
    if volumeNode.GetDisplayNode() is None:
        volumeNode.CreateDefaultDisplayNodes()
    display = volumeNode.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevel(*WINDOW_PRESETS[preset])
    display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")


def _viewNode(scene, className: str, viewName: str):
    for i in range(scene.GetNumberOfNodesByClass(className)):
        node = scene.GetNthNodeByClass(i, className)
        if node.GetLayoutName() == viewName:
            return node
    return None


def setupReviewLayout(syntheticVolumeNode, segmentationNode=None, realVolumeNode=None, swap: bool = False,
                      orientation: str = "Axial", window: str = "Abdomen") -> dict[str, str | None]:
    """Side-by-side layout: real CT (or nothing, the segmentation alone) left, synthetic right (``swap`` exchanges
    them); both views in ``orientation`` and linked, both volumes in the ``window`` preset, segmentation outlines in
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
            showWindow(volume, window)
    if segmentationNode is not None:
        if segmentationNode.GetDisplayNode() is None:
            segmentationNode.CreateDefaultDisplayNodes()
        display = segmentationNode.GetDisplayNode()
        display.SetVisibility(True)
        display.SetVisibility2DFill(False)
        display.SetVisibility2DOutline(True)
        display.RemoveAllViewNodeIDs()  # all views
    return shown


DISPLAY_PROPERTIES = ("Window", "Level", "AutoWindowLevel", "ColorNodeID")


def _displayState(volumeNode) -> dict | None:
    display = volumeNode.GetDisplayNode()
    return None if display is None else {key: getattr(display, f"Get{key}")() for key in DISPLAY_PROPERTIES}


def _setDisplayState(volumeNode, state: dict) -> None:
    display = volumeNode.GetDisplayNode()
    if display is None:
        return
    if _displayState(volumeNode) == state:
        return
    wasModifying = display.StartModify()
    display.SetAutoWindowLevel(state["AutoWindowLevel"])
    if not state["AutoWindowLevel"]:
        display.SetWindowLevel(state["Window"], state["Level"])
    display.SetAndObserveColorNodeID(state["ColorNodeID"])
    display.EndModify(wasModifying)


def _references(node) -> dict[str, list[str]]:
    roles = [node.GetNthNodeReferenceRole(i) for i in range(node.GetNumberOfNodeReferenceRoles())]
    return {role: [node.GetNthNodeReferenceID(role, i) for i in range(node.GetNumberOfNodeReferences(role))]
            for role in roles}


@dataclass
class Blinding:
    """Hides what tells the two volumes apart: their names (view controllers, Data Probe and annotations show node
    names) become neutral, they leave the Data module's tree and the node selectors (HideFromEditors), and their
    window/level is locked (a drag would show the synthetic CT's clipped intensities). :meth:`restore` puts back
    every property it changed, and the node references of ``parameterNode``: node selectors drop hidden nodes and
    write that into the parameter node, so without this the panel would point at other volumes after Reveal."""

    _saved: list[tuple[object, str, int, dict | None]] = field(default_factory=list)  # (node, name, hidden, display)
    _parameterNode: object = None
    _references: dict[str, list[str]] = field(default_factory=dict)
    _holds: list[tuple[object, int]] = field(default_factory=list)  # (display node, observer tag)

    @property
    def active(self) -> bool:
        return bool(self._saved)

    def remember(self, volumeNodes, parameterNode=None) -> None:
        """Save what :meth:`blind` and the review layout will change (call before either; ends an earlier
        blinding)."""
        self.restore()
        self._saved = [(node, node.GetName(), node.GetHideFromEditors(), _displayState(node)) for node in volumeNodes]
        self._parameterNode = parameterNode
        self._references = _references(parameterNode) if parameterNode is not None else {}

    def blind(self, leftVolumeNode, rightVolumeNode) -> None:
        """Blind the two volumes shown left and right (saved with :meth:`remember` first); refuses when either side
        is empty."""
        if leftVolumeNode is None or rightVolumeNode is None:
            self.restore()
            raise ValueError("blind review needs a volume on both sides: select the real CT as reference CT "
                             "(otherwise the empty side gives the answer away)")
        if {id(n) for n, *_ in self._saved} != {id(leftVolumeNode), id(rightVolumeNode)}:
            self.remember((leftVolumeNode, rightVolumeNode))
        for node, name in ((leftVolumeNode, "Left volume"), (rightVolumeNode, "Right volume")):
            node.SetName(name)
            node.SetHideFromEditors(True)
            self._hold(node)

    def _hold(self, volumeNode) -> None:
        """Put the volume's window/level and colours back whenever something changes them."""
        display, held = volumeNode.GetDisplayNode(), _displayState(volumeNode)
        if display is not None:
            tag = display.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda caller, event: _setDisplayState(volumeNode, held))
            self._holds.append((display, tag))

    def change(self, apply) -> None:
        """Call ``apply(volumeNode)`` on both blinded volumes (e.g. a window preset for both sides) and hold what it
        set instead."""
        for display, tag in self._holds:
            display.RemoveObserver(tag)
        self._holds = []
        for node, *_ in self._saved:
            apply(node)
        for node, *_ in self._saved:
            self._hold(node)

    def restore(self) -> None:
        """Give the blinded volumes back their names, Data module entries and display, and the parameter node its
        selections."""
        for display, tag in self._holds:
            display.RemoveObserver(tag)
        self._holds = []
        for node, name, hidden, display in self._saved:
            node.SetName(name)
            node.SetHideFromEditors(hidden)
            if display is not None:
                _setDisplayState(node, display)
        parameterNode, references = self._parameterNode, self._references
        if parameterNode is not None:
            wasModifying = parameterNode.StartModify()
            for role in set(_references(parameterNode)) | set(references):
                ids = references.get(role, [])
                if _references(parameterNode).get(role, []) != ids:
                    parameterNode.RemoveNodeReferenceIDs(role)
                    for index, nodeId in enumerate(ids):
                        parameterNode.SetNthNodeReferenceID(role, index, nodeId)
            parameterNode.EndModify(wasModifying)
        self._saved, self._parameterNode, self._references = [], None, {}
