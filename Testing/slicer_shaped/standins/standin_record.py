"""What the stand-ins of Slicer's installers and dialogs were asked to do: one JSON line a call in $CTSYNTH_RECORD.
An installer "installs" by adding the import names to $CTSYNTH_INSTALLED, which lifts their block (sitecustomize)."""

import json
import os


def record(call: str, **details) -> None:
    with open(os.environ["CTSYNTH_RECORD"], "a", encoding="utf-8") as f:
        f.write(json.dumps({"call": call, **details}) + "\n")


def install(*names: str) -> None:
    installed = [n for n in os.environ.get("CTSYNTH_INSTALLED", "").split(",") if n]
    os.environ["CTSYNTH_INSTALLED"] = ",".join(installed + [n for n in names if n not in installed])


def importName(requirement: str) -> str:
    from packaging.requirements import Requirement

    return Requirement(requirement).name.replace("-", "_")
