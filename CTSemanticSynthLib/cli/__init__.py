"""The ``ctsynth`` command: synthesize a CT from a segmentation, inspect models, list classes.

One module per command (:mod:`.synth`, :mod:`.batch`, :mod:`.info`, :mod:`.classes`, :mod:`.evaluate`), each with
``add_parser`` and ``run``; :mod:`.options` holds the options they share, :mod:`.progress` the progress displays.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any, TextIO

from .. import __version__
from ..errors import CTSynthError, InputError
from ..parsing import OneLineParser
from . import batch, classes, evaluate, info, synth


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
    """Entry point; returns the exit code (2 for usage and input errors, 130 when interrupted)."""
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
        return handler(args)
    except CTSynthError as exc:
        print(f"ctsynth: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        kept = "finished jobs are kept: run the same command to continue" if args.command == "batch" else \
            "nothing was written"
        print(f"ctsynth: interrupted; {kept}", file=sys.stderr)
        return 130
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


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM (a cancelled job) ends a run like Ctrl-C: temp files removed, nothing written, exit 130."""
    raise KeyboardInterrupt

