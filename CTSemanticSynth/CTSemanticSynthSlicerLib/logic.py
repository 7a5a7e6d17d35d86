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

from .dice import DiceEvaluation, TotalSegmentatorWeightsMissing
from .export import SegmentationExport
from .nodes import SynthesisError
from .regeneration import Regeneration
from .study_scene import ReviewAndStudy
from .synthesis import Synthesis
from .review import Blinding
from .tasks import TaskRunner

__all__ = ["SynthesisError", "SynthesisLogic", "TotalSegmentatorWeightsMissing"]


class SynthesisLogic(TaskRunner, SegmentationExport, Synthesis, Regeneration, ReviewAndStudy, DiceEvaluation):
    """Headless logic. ``pythonExecutable`` runs ``ctsynth`` (default: PythonSlicer inside Slicer, else
    ``sys.executable``); ``environment`` adds variables for the child process (e.g. ``OMP_NUM_THREADS``)."""

    def __init__(self, pythonExecutable: str | None = None, environment: dict[str, str] | None = None,
                 tempRoot: str | None = None, keepFiles: bool = False):
        self.pythonExecutable = pythonExecutable
        self.environment = dict(environment or {})
        self.tempRoot = tempRoot
        self.keepFiles = keepFiles
        self.blinding = Blinding()
