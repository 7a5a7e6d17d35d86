"""Find a model folder and read its card (name, conditioning, classes, sha256) without importing torch.

Slicer's main process never imports torch: the weights are loaded and their hash verified by ``ctsynth synth``
in the background process. The lookup order is the library's (``CTSemanticSynthLib.checkpoint``): a folder path,
then ``Resources/models/<name>`` beside the library, then ``$CTSYNTH_HOME/models/<name>``
(default ``~/.cache/ctsynth/models``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import CTSemanticSynthLib

DEFAULT_MODEL = "demo"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def bundledModelsDir() -> Path:
    """``Resources/models`` next to the installed library (the extension installs the demo model there)."""
    return Path(CTSemanticSynthLib.__file__).resolve().parent.parent / "Resources" / "models"


def cacheModelsDir() -> Path:
    return Path(os.environ.get("CTSYNTH_HOME", Path.home() / ".cache" / "ctsynth")) / "models"


def availableModels() -> list[str]:
    """Names of the bundled and cached models."""
    names = set()
    for root in (bundledModelsDir(), cacheModelsDir()):
        if root.is_dir():
            names.update(p.name for p in root.iterdir() if (p / CONFIG_NAME).is_file())
    return sorted(names)


def findModel(spec: str | Path | None) -> Path:
    """Folder of a model given as a folder path or a name; None or '' means the bundled demo model."""
    spec = str(spec) if spec not in (None, "", ".") else DEFAULT_MODEL
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if len(path.parts) == 1:
        for root in (bundledModelsDir(), cacheModelsDir()):
            if (root / spec / CONFIG_NAME).is_file():
                return root / spec
    available = ", ".join(availableModels()) or "none installed"
    raise FileNotFoundError(
        f"model '{spec}' not found: choose a model folder (it holds {WEIGHTS_NAME} and {CONFIG_NAME}) or copy it to "
        f"{cacheModelsDir() / path.name}; available models: {available}")


@dataclass(frozen=True)
class ModelCard:
    path: Path
    name: str
    conditioning: str
    imageSize: int
    classes: tuple[str, ...]
    sha256: str
    description: str = ""

    def summary(self) -> str:
        """Two lines for the panel."""
        return (f"{self.name} ({self.conditioning}, {self.imageSize}x{self.imageSize}), {len(self.classes) - 1} classes\n"
                f"sha256 {self.sha256[:16]}...")


def readModelCard(folder: str | Path) -> ModelCard:
    """The card of a model folder, from its config.json (the weights are checked when synthesis loads them)."""
    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
        return ModelCard(path=folder, name=str(config.get("name", folder.name)),
                         conditioning=str(config["model"]["conditioning"]), imageSize=int(config["model"]["image_size"]),
                         classes=tuple(config["classes"]), sha256=str(config["sha256"]),
                         description=str(config.get("description", "")))
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder} is not a model folder: {CONFIG_NAME} is missing") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{folder / CONFIG_NAME} is not a valid CTSemanticSynth model config ({exc})") from None
