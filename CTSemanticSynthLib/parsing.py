"""Command-line parsing shared by ``ctsynth`` and the training scripts: usage errors as one ``error:`` line."""

from __future__ import annotations

import argparse
from typing import NoReturn

from .errors import InputError


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors raise InputError, so the caller prints them as one ``error:`` line (exit 2)."""

    def error(self, message: str) -> NoReturn:
        raise InputError(f"{message} (see '{self.prog} --help')")


def boolean(text: str) -> bool:
    """A true/false option value (1/0, true/false, yes/no, any case)."""
    if text.lower() not in ("1", "true", "yes", "0", "false", "no"):
        raise argparse.ArgumentTypeError(f"{text!r} is not true or false")
    return text.lower() in ("1", "true", "yes")
