"""Model folders: ``model.safetensors`` + ``config.json`` (kind, architecture, diffusion, class set and classes,
intensity mapping (``intensity``, or the paper models' ``window``), sha256).

``kind`` is ``diffusion`` (the default: a U-Net sampled by a diffusion process) or ``generator`` (a one-pass
baseline generator, :mod:`.models.generators`, which has no ``diffusion`` field).

A model is found by path, by name in the bundled ``Resources/models/`` or in the cache dir
(``$CTSYNTH_HOME/models/<name>``, default ``~/.cache/ctsynth/models/<name>``). Nothing is downloaded, and
pickled checkpoints (``.pt``) are never loaded.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .diffusion import GaussianDiffusion, diffusion_defaults
from .errors import CheckpointError, OutputExistsError
from .io import atomic_folder
from .factory import create_diffusion, create_generator, create_model
from .intensity import PAPER_WINDOW, IntensityMapping, mapping_from_config
from .labels import CLASS_SETS, ClassSet, class_set
from .models.config import ADDED_KEYS, model_defaults, resolve_config
from .models.generators import generator_defaults, resolve_generator_config
from .paths import cache_dir, file_digest

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "ctsynth-model"
FORMAT_VERSION = 1
DEFAULT_MODEL = "demo"
BUNDLED_MODELS = Path(__file__).resolve().parent.parent / "Resources" / "models"
KINDS = ("diffusion", "generator")


@dataclass
class LoadedModel:
    """A network in eval mode with its diffusion process (None for a one-pass generator), config and weight hash."""

    model: torch.nn.Module
    diffusion: GaussianDiffusion | None
    config: dict[str, Any]
    sha256: str
    path: Path

    @property
    def name(self) -> str:
        return str(self.config.get("name", self.path.name))

    @property
    def image_size(self) -> int:
        return int(self.config["model"]["image_size"])

    @property
    def kind(self) -> str:
        return str(self.config.get("kind", "diffusion"))

    @property
    def conditioning(self) -> str:
        """The diffusion model's mask conditioning, or the generator's method (pix2pix, spade, oasis)."""
        model = self.config["model"]
        return str(model["conditioning"] if self.kind == "diffusion" else model["method"])

    @property
    def class_set(self) -> ClassSet:
        """The classes the model was trained on (the paper's set for models that name none)."""
        return class_set(self.config.get("class_set", "paper"))

    @property
    def intensity(self) -> IntensityMapping:
        """How the model's [0, 1] maps to HU."""
        return mapping_from_config(self.config)


def resolve_model_path(spec: str | Path | None) -> Path:
    """Folder for a model given as a path or a name (bundled, then cache dir); None means the demo model."""
    spec = DEFAULT_MODEL if spec is None else spec
    path = Path(spec).expanduser()
    if path.suffix in {".pt", ".pth", ".ckpt", ".pkl", ".bin"}:
        raise CheckpointError(
            f"{path} is a pickled checkpoint, which is never loaded (it can run code); "
            "give a model folder with model.safetensors + config.json (training/export writes one)"
        )
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; give the model folder that holds {WEIGHTS_NAME} and {CONFIG_NAME}")
    if len(path.parts) == 1:
        for root in (BUNDLED_MODELS, cache_dir() / "models"):
            if (root / str(spec)).is_dir():
                return root / str(spec)
    raise CheckpointError(
        f"model '{spec}' not found: pass a model folder, or put it in {cache_dir() / 'models' / path.name} "
        f"(or set CTSYNTH_HOME); bundled models: {', '.join(list_models()) or 'none'}"
    )


def list_models() -> list[str]:
    """Names of models in the bundled folder and the cache dir."""
    names = set()
    for root in (BUNDLED_MODELS, cache_dir() / "models"):
        if root.is_dir():
            names.update(p.name for p in root.iterdir() if (p / CONFIG_NAME).is_file())
    return sorted(names)


def read_config(folder: Path) -> dict[str, Any]:
    """The validated ``config.json`` of a model folder (cheap: no weights are read).

    Every field the library uses is checked for presence and type; a bad one is a CheckpointError naming it.
    """
    config_path = folder / CONFIG_NAME
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{folder} is not a model folder: {CONFIG_NAME} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{config_path} is not a CTSemanticSynth model config (no \"format\": \"{FORMAT}\")")
    try:
        _check_config(config)
    except _FieldError as exc:
        raise CheckpointError(f"{config_path}: {exc}") from None
    return config


class _FieldError(Exception):
    """A config.json field that is missing or has the wrong type or value (message starts with its name)."""


def _field(config: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str = "") -> Any:
    """``config[key]`` when present and of ``kind`` (bool is never a number)."""
    name = f"{where}{key}"
    if key not in config:
        raise _FieldError(f"field '{name}' is missing")
    value = config[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds and object not in kinds) or not isinstance(value, kinds):
        names = " or ".join("number" if k in (int, float) else _JSON_NAMES.get(k, k.__name__) for k in kinds)
        raise _FieldError(f"field '{name}' must be a {names}, not {json.dumps(value)[:40]}")
    return value


_JSON_NAMES = {str: "string", dict: "JSON object", list: "list", bool: "true/false", type(None): "null"}
_PRESET_FIELDS = {"sampler": str, "steps": int, "start_timestep": (int, type(None)), "eta": (int, float),
                  "slice_correlation": (int, float), "slice_agreement": (int, float),
                  "slice_agreement_below": (int, float), "boundary_correction": bool}


def _check_config(config: dict[str, Any]) -> None:
    version = _field(config, "format_version", int)
    if not 1 <= version <= FORMAT_VERSION:
        raise _FieldError(f"field 'format_version' is {version}; this ctsynth {__version__} reads versions 1.."
                          f"{FORMAT_VERSION}{': upgrade ctsynth' if version > FORMAT_VERSION else ''}")
    if not isinstance(config.get("name", ""), str):
        raise _FieldError("field 'name' must be a string")
    name = _field(config, "class_set", str) if "class_set" in config else "paper"
    if name not in CLASS_SETS:
        raise _FieldError(f"field 'class_set' is {json.dumps(name)[:40]}, not one of {', '.join(CLASS_SETS)}")
    classes = _field(config, "classes", list)
    expected = list(class_set(name).classes)
    if classes != expected:
        raise _FieldError(f"field 'classes' is {classes}, not this version's '{name}' set {expected}")
    sha = _field(config, "sha256", str)
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise _FieldError("field 'sha256' must be 64 lower-case hex digits")
    if "intensity" in config:
        _field(config, "intensity", dict)
    if "window" in config or "intensity" not in config:  # models before full range name only their window
        window = _field(config, "window", dict)
        for key in ("level", "width"):
            value = _field(window, key, (int, float), "window.")
            if not math.isfinite(value) or (key == "width" and value <= 0):
                raise _FieldError(f"field 'window.{key}' must be a finite number{' > 0' if key == 'width' else ''}, "
                                  f"not {json.dumps(value)}")
    try:
        mapping_from_config(config)
    except ValueError as exc:
        raise _FieldError(str(exc)) from None
    kind = config.get("kind", "diffusion")
    if kind not in KINDS:
        raise _FieldError(f"field 'kind' must be one of {', '.join(KINDS)}, not {json.dumps(kind)[:40]}")
    if kind == "generator":
        _check_generator(_field(config, "model", dict))
    else:
        _check_diffusion_model(config)
    if config["model"]["num_classes"] != len(classes):  # the network's one-hot input: one channel a class
        raise _FieldError(f"field 'model.num_classes' is {config['model']['num_classes']}, but the model's classes are "
                          f"{len(classes)}: this folder's network was made for another class set")
    means = config.get("class_means")
    if means is not None and (not isinstance(means, list) or len(means) != len(expected) or not all(
            isinstance(m, (int, float)) and not isinstance(m, bool) and 0 <= m <= 1 for m in means)):
        raise _FieldError(f"field 'class_means' must be a list of {len(expected)} numbers in 0..1")
    presets = config.get("sampling_presets", {})
    if not isinstance(presets, dict):
        raise _FieldError("field 'sampling_presets' must be a JSON object {preset name: options}")
    for preset, options in presets.items():
        where = f"sampling_presets.{preset}."
        if not isinstance(options, dict):
            raise _FieldError(f"field '{where[:-1]}' must be a JSON object")
        unknown = sorted(set(options) - set(_PRESET_FIELDS))
        if unknown:
            raise _FieldError(f"field '{where[:-1]}' has unknown key(s) {', '.join(unknown)}; "
                              f"known: {', '.join(_PRESET_FIELDS)}")
        for key, kind in _PRESET_FIELDS.items():
            if key in options:
                _field(options, key, kind, where)


def _check_diffusion_model(config: dict[str, Any]) -> None:
    model = _field(config, "model", dict)
    for key in model_defaults():  # save_model writes every key: a missing one would silently become a default
        if key not in ADDED_KEYS:
            _field(model, key, object, "model.")
    try:
        resolve_config(**model)
    except (TypeError, ValueError) as exc:
        raise _FieldError(f"field 'model': {exc}") from None
    diffusion = _field(config, "diffusion", dict)
    unknown = sorted(set(diffusion) - set(diffusion_defaults()) - {"betas"})
    if unknown:
        raise _FieldError(f"field 'diffusion' has unknown key(s) {', '.join(unknown)}")
    for key, default in diffusion_defaults().items():
        _field(diffusion, key, (int, float) if isinstance(default, float) else type(default), "diffusion.")
    try:
        create_diffusion(diffusion)
    except (TypeError, ValueError) as exc:
        raise _FieldError(f"field 'diffusion': {exc}") from None


def _check_generator(model: dict[str, Any]) -> None:
    method = _field(model, "method", str, "model.")
    try:
        keys = generator_defaults(method)
    except ValueError as exc:
        raise _FieldError(f"field 'model.method': {exc}") from None
    for key in keys:  # save_model writes every key: a missing one would silently become a default
        _field(model, key, object, "model.")
    try:
        resolve_generator_config(**model)
    except (TypeError, ValueError) as exc:
        raise _FieldError(f"field 'model': {exc}") from None


def load_model(spec: str | Path | None, device: str | torch.device = "cpu") -> LoadedModel:
    """Load and verify a model folder (hash, config, weight names and shapes) onto ``device``."""
    folder = resolve_model_path(spec)
    config = read_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{folder} has no {WEIGHTS_NAME}")
    digest = file_digest(weights)
    if digest != config["sha256"]:
        raise CheckpointError(
            f"{weights} is corrupt or was replaced: sha256 {digest[:12]}... but config.json says "
            f"{str(config['sha256'])[:12]}...; re-copy the model folder"
        )
    try:
        if config.get("kind", "diffusion") == "generator":
            model, diffusion = create_generator(config["model"]), None
        else:
            model, diffusion = create_model(config["model"]), create_diffusion(config["diffusion"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{folder / CONFIG_NAME} describes an invalid model: {exc}") from None
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights} cannot be read as safetensors ({exc})") from None
    _check_state(model.state_dict(), state, folder)
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{weights} holds NaN or infinite weights ({len(bad)} tensor(s), e.g. {bad[0]}): "
                              "the model is broken; re-export it from a good training checkpoint")
    model.load_state_dict(state)
    model.to(device).eval()
    return LoadedModel(model=model, diffusion=diffusion, config=config, sha256=digest, path=folder)


def _check_state(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], folder: Path) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [k for k in expected if k in found and tuple(found[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} with other shapes (e.g. {k}: {tuple(found[k].shape)} vs config {tuple(expected[k].shape)})")
        raise CheckpointError(f"weights in {folder} do not match its config.json: {'; '.join(parts)}")


def save_model(
    folder: str | Path,
    model: torch.nn.Module,
    diffusion: GaussianDiffusion | None,
    *,
    name: str,
    extra: dict[str, Any] | None = None,
    half: bool = False,
    overwrite: bool = False,
    classes: ClassSet | None = None,
    intensity: IntensityMapping = PAPER_WINDOW,
) -> str:
    """Write a model folder atomically and return the weights' sha256.

    ``model`` and ``diffusion`` must carry a JSON ``config`` dict; ``diffusion`` None saves a one-pass generator
    (``kind: generator``, no ``diffusion`` field). ``extra`` adds keys such as ``training``,
    ``sampling`` (recommended sampler preset) or ``description``. ``half`` stores float16 weights. ``classes``
    (default: the paper's set) and ``intensity`` are what the model was trained on; a window mapping is also
    written as ``window`` {level, width}, as the paper's models have it.
    """
    classes = classes or class_set("paper")
    low, high = intensity.hu_range
    window = {"window": {"level": (low + high) / 2, "width": high - low}} if intensity.is_window else {}
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise OutputExistsError(f"model folder {folder} exists; choose another name or pass --overwrite")
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_folder(folder) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME))
        digest = file_digest(tmp / WEIGHTS_NAME)
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": name,
            "library_version": __version__,
            "kind": "diffusion" if diffusion is not None else "generator",
            "class_set": classes.name,
            "classes": list(classes.classes),
            "intensity": intensity.config(),
            **window,
            "model": model.config,
            **({"diffusion": diffusion.config} if diffusion is not None else {}),
            **(extra or {}),
            "sha256": digest,
        }
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return digest
