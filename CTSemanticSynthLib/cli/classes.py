"""``ctsynth classes``: the model classes and the accepted label conventions."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``classes`` subcommand."""
    sub.add_parser("classes", help="list the model classes and the accepted label conventions")


def run(_: argparse.Namespace) -> int:
    from ..labels import AUTO_RULE, DISPLAY_NAMES, LABEL_CHOICES, MODEL_CLASSES

    for index, (name, display) in enumerate(zip(MODEL_CLASSES, DISPLAY_NAMES)):
        print(f"{index:3d}  {name:22s} {display}")
    print(f"label conventions: {', '.join(LABEL_CHOICES)}, or a JSON file {{\"7\": \"liver\", \"Spleen\": \"spleen\"}}")
    print(AUTO_RULE)
    return 0
