"""The module's Logic, headless: :class:`SynthesisLogic` is the one object the module file (and scripts, tests) use.
It combines one helper per feature, each in its own file:

- ``tasks``: the background ``ctsynth`` process's interpreter, environment and temporary folder;
- ``export``: segments -> model classes, the output grid, the label map written for ``ctsynth``;
- ``synthesis``: ``ctsynth synth`` in the background, its result loaded with provenance, the model card;
- ``regeneration``: the stored segmentation state, regenerate-what-changed and its undo;
- ``study_scene``: side-by-side review with blinding, reader-study cases in the scene;
- ``dice``: TotalSegmentator Dice in the background, its table, TotalSegmentator's weight download.

Needs only ``slicer`` (MRML) and ``vtk``: no Qt, no dialogs, no ``processEvents``, so it runs in Slicer, in
``PythonSlicer`` and under pytest with the ``slicer-core`` package. Errors are raised as exceptions whose message is
meant for the user. Synthesis never touches the scene until it has succeeded, and Cancel leaves it as it was.
"""

from __future__ import annotations

from .dice import DiceEvaluation, TotalSegmentatorWeightsMissing
from .export import SegmentationExport
from .nodes import SynthesisError
from .regeneration import Regeneration
from .study_scene import ReviewAndStudy
from .review import Blinding
from .synthesis import Synthesis
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
        self.modelConfigs: dict[str | None, dict] = {}  # model spec -> its card, as ctsynth info read it last
        self.reviewVolumes: tuple = ()  # (synthetic, real or None) of the review shown last
