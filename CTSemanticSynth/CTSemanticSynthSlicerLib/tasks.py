"""A ``ctsynth`` command run in the background for the Logic: the interpreter and environment it runs with, its
temporary folder, and :class:`BackgroundTask`, which keeps what is needed to finish it."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import slicer
import CTSemanticSynthLib

from .process import BackgroundProcess, State

ATTRIBUTE_PREFIX = "CTSemanticSynth."
CLI_MODULE = "CTSemanticSynthLib.cli"


def isSynthetic(node) -> bool:
    """Whether ``node`` is a synthetic CT this module made (it carries the SYNTHETIC attribute)."""
    return node is not None and node.GetAttribute(ATTRIBUTE_PREFIX + "Synthetic") == "true"


def provenanceOf(node) -> dict:
    """The provenance record synthesis stored on a synthetic CT node (``ctsynth synth``'s sidecar: class set,
    intensity mapping, ...); {} for None or a node without one. ValueError when the stored record is not readable."""
    text = node.GetAttribute(ATTRIBUTE_PREFIX + "Provenance") if node is not None else None
    if not text:
        return {}
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        record = None
    if not isinstance(record, dict):
        raise ValueError(f"the provenance stored on '{node.GetName()}' is not readable: make the synthetic CT again")
    return record


@dataclass
class BackgroundTask:
    """A running ``ctsynth`` command and what is needed to finish it; ``poll()``/``cancel()`` for the caller's timer."""

    process: BackgroundProcess
    workDir: Path
    kind: str
    inputs: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    keepFiles: bool = False
    nodes: dict = field(default_factory=dict)

    def poll(self) -> State:
        state = self.process.poll()
        if state is State.CANCELLED and self.process.stopped:
            self.cleanup()  # once the process has removed its own temporary files
        return state

    def cancel(self) -> None:
        """Ask the process to stop; keep polling (or :meth:`wait`) until ``process.stopped``, which removes the
        temporary folder."""
        self.process.cancel()

    def wait(self, timeout: float | None = None) -> State:
        state = self.process.wait(timeout)
        return self.poll() if state is State.CANCELLED else state

    def cleanup(self) -> None:
        if not self.keepFiles:
            shutil.rmtree(self.workDir, ignore_errors=True)


class TaskRunner:
    """Where and how background commands run (``pythonExecutable``, ``environment``, ``tempRoot``, ``keepFiles`` are
    set by :class:`~CTSemanticSynthSlicerLib.logic.SynthesisLogic`)."""

    # --- process environment ---------------------------------------------------------------------------------
    @staticmethod
    def _insideSlicerApp() -> bool:
        return getattr(slicer, "app", None) is not None

    def python(self) -> str:
        if self.pythonExecutable:
            return self.pythonExecutable
        if self._insideSlicerApp():
            found = shutil.which("PythonSlicer")
            if found:
                return found
        return sys.executable

    def childEnvironment(self) -> dict[str, str]:
        """The environment Slicer was started with (inside Slicer), with the library and the helpers on PYTHONPATH."""
        env = dict(slicer.util.startupEnvironment()) if self._insideSlicerApp() else dict(os.environ)
        libraryParent = str(Path(CTSemanticSynthLib.__file__).resolve().parent.parent)
        moduleFolder = str(Path(__file__).resolve().parent.parent)  # CTSemanticSynthSlicerLib's (for .weights)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (libraryParent, moduleFolder, env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.environment)
        return env

    def _workDir(self, kind: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"CTSemanticSynth-{kind}-", dir=self.tempRoot))

