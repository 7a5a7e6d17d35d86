"""The Widget's Qt helpers, imported by the module file only (the other helpers are headless): the path-field
binding, the blind-review view settings, and waiting for a background task with the GUI live. No logic here."""

from __future__ import annotations

import ctk
import qt

import slicer
from slicer.parameterNodeWrapper import GuiConnector, parameterNodeGuiConnector, unannotatedType


@parameterNodeGuiConnector
class PathLineEditToStrConnector(GuiConnector):
    """A ctkPathLineEdit bound to a ``str`` parameter, so that no path is an empty field (``pathlib.Path``, the
    only type Slicer binds to it, shows an unset path as ".")."""

    @staticmethod
    def canRepresent(widget, datatype) -> bool:
        return type(widget) == ctk.ctkPathLineEdit and unannotatedType(datatype) == str

    @staticmethod
    def create(widget, datatype):
        return PathLineEditToStrConnector(widget) if PathLineEditToStrConnector.canRepresent(widget, datatype) else None

    def __init__(self, widget) -> None:
        super().__init__()
        self._widget = widget

    def _connect(self) -> None:
        self._widget.currentPathChanged.connect(self.changed)

    def _disconnect(self) -> None:
        self._widget.currentPathChanged.disconnect(self.changed)

    def widget(self):
        return self._widget

    def read(self) -> str:
        return self._widget.currentPath

    def write(self, value: str) -> None:
        self._widget.currentPath = value


def setBlindGui(blind: bool) -> None:
    """Hide what the scene does not: view controllers, corner annotations and the Data Probe; no window/level drags
    in the slice views (the Logic also puts any other change back)."""
    slicer.util.setViewControllersVisible(not blind)
    layoutManager = slicer.app.layoutManager()
    for name in layoutManager.sliceViewNames():
        view = layoutManager.sliceWidget(name).sliceView()
        view.cornerAnnotation().SetVisibility(not blind)
        style = view.sliceViewInteractorStyle()
        for action in (style.AdjustWindowLevelBackground, style.AdjustWindowLevelForeground):
            style.SetActionEnabled(action, not blind)
        view.scheduleRender()
    probe = slicer.util.findChild(slicer.util.mainWindow(), "DataProbeCollapsibleWidget")
    if blind:
        probe.collapsed = True
    probe.enabled = not blind


def waitFor(task, timeout: float = 600.0):
    """Poll ``task`` in a local event loop (the GUI stays live) until it ends or ``timeout`` s pass (then it is
    cancelled and waited for); returns its state."""
    loop, timer = qt.QEventLoop(), qt.QTimer()
    timer.timeout.connect(lambda: task.poll().finished and loop.quit())
    qt.QTimer.singleShot(int(1000 * timeout), loop.quit)
    timer.start(200)
    loop.exec_()
    timer.stop()
    if not task.poll().finished:
        task.cancel()
        task.wait()
    return task.poll()
