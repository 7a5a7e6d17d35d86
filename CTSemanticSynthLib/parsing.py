"""Command-line parsing shared by ``ctsynth`` and the training scripts: usage errors as one ``error:`` line."""

from __future__ import annotations

import argparse
from typing import NoReturn

from .errors import InputError


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors raise InputError, so the caller prints them as one ``error:`` line (exit 2)."""

    def error(self, message: str) -> NoReturn:
        raise InputError(f"{message} (see '{self.prog} --help')")
