"""The ``ctsynth`` command: synthesize a CT from a segmentation, inspect models, list classes.

One module per command (:mod:`.synth`, :mod:`.batch`, :mod:`.info`, :mod:`.classes`, :mod:`.evaluate`), each with
``add_parser`` and ``run``; :mod:`.options` holds the options they share, :mod:`.progress` the progress displays.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from .. import __version__
from ..errors import CTSynthError, InputError
from ..io import commit_log
from ..parsing import OneLineParser
from . import batch, classes, evaluate, info, synth

NEEDED = ("torch", "safetensors", "nibabel", "tqdm")  # imported by the commands beyond numpy, scipy, SimpleITK, pillow
PIP_NAMES = {"yaml": "pyyaml", "skimage": "scikit-image", "PIL": "pillow"}


def _build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="ctsynth",
        description="Turn an abdominal CT segmentation into a synthetic CT with a conditional diffusion model.",
        epilog=synth.EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ctsynth {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details (label detection, timings)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    synth.add_parser(sub)
    batch.add_parser(sub)
    info.add_parser(sub)
    classes.add_parser(sub)
    evaluate.add_parser(sub)
    return parser


class _Diagnostics:
    """stderr that goes quiet, instead of raising, when it is closed or its reader has gone (a closed pipe)."""

    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream if stream is not None else open(os.devnull, "w")

    def _quiet(self) -> None:
        self._stream = open(os.devnull, "w")

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError:
            self._quiet()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError:
            self._quiet()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...
        return getattr(self._stream, name)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for usage and input errors, 130 when interrupted before the outputs
    were in place)."""
    stderr, sys.stderr = sys.stderr, _Diagnostics(sys.stderr)
    try:
        return _run(argv)
    finally:
        sys.stderr = stderr


def _run(argv: Sequence[str] | None) -> int:
    try:
        args = _build_parser().parse_args(argv)
    except InputError as exc:
        print(f"ctsynth: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="ctsynth: %(levelname)s: %(message)s")
    handler = {"synth": synth.run, "batch": batch.run, "info": info.run, "classes": classes.run,
               "evaluate": evaluate.run}[args.command]
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if on_main_thread else None
    try:
        with commit_log() as written:
            try:
                return handler(args)
            except KeyboardInterrupt:
                message, code = _interrupted(args.command, [p for p in written if os.path.lexists(p)])
                print(f"ctsynth: {message}", file=sys.stderr)
                return code
    except CTSynthError as exc:
        print(f"ctsynth: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # a fresh Slicer (or venv) before the install: one line, not a traceback
        missing = _missing_packages(exc)
        if not missing:
            raise
        print(f"ctsynth: error: the Python packages {', '.join(missing)} are not installed: pip install "
              f"{' '.join(missing)} (in 3D Slicer, Apply in CT Semantic Synthesis offers to install them)",
              file=sys.stderr)
        return 2
    except BrokenPipeError:  # stdout closed early: fine for `ctsynth info | head`, an error when it is the channel
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if args.command != "synth":
            return 0
        print("ctsynth: error: stdout was closed while progress lines were written to it; nothing was written",
              file=sys.stderr)
        return 2
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _interrupted(command: str, written: list[Path]) -> tuple[str, int]:
    """(message, exit code) after Ctrl-C or SIGTERM, from the outputs that went in before it (complete files, see
    :func:`~..io.commit_log`): a synth whose outputs went in had only its last line left, so it has succeeded."""
    if command == "batch":
        return "interrupted; finished jobs are kept: run the same command to continue", 130
    if not written:
        return "interrupted; nothing was written", 130
    if command == "synth":  # all its files are one unit, written last
        return f"wrote {', '.join(map(str, written))}", 0
    return f"interrupted after writing {', '.join(map(str, written))} (complete); the run did not finish", 130


def _missing_packages(exc: ModuleNotFoundError) -> list[str]:
    """The pip names of the third-party packages ctsynth needs that cannot be imported, the one that failed first;
    [] when the missing module is one of the library's own (a bug, not an install)."""
    name = (exc.name or "").split(".")[0]
    if not name or name == __name__.split(".")[0]:
        return []

    def importable(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except ImportError:
            return False

    return [PIP_NAMES.get(m, m) for m in dict.fromkeys([name, *NEEDED]) if m == name or not importable(m)]


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM (a cancelled job) ends a run like Ctrl-C: temp files removed, exit 130 unless the outputs were in
    place (:func:`_interrupted`)."""
    raise KeyboardInterrupt

