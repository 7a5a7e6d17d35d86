"""The model's classes (background, 15 AMOS22 organs, body) and adapters from other label conventions.

An adapter maps source label values (AMOS ids, TotalSegmentator v1/v2 ids, Slicer segment names, a user JSON
file) to model class indices. Values an adapter does not know become "body" and are reported, never dropped.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from .errors import InputError

logger = logging.getLogger(__name__)

MODEL_CLASSES: tuple[str, ...] = (
    "background",
    "spleen",
    "kidney_right",
    "kidney_left",
    "gallbladder",
    "esophagus",
    "liver",
    "stomach",
    "aorta",
    "inferior_vena_cava",
    "pancreas",
    "adrenal_gland_right",
    "adrenal_gland_left",
    "duodenum",
    "urinary_bladder",
    "prostate_uterus",
    "body",
)
"""Model class index -> name. Indices 1..15 are the AMOS22 ids, so the AMOS adapter is the identity."""

BACKGROUND = 0
BODY = MODEL_CLASSES.index("body")
NUM_CLASSES = len(MODEL_CLASSES)
ORGANS: tuple[int, ...] = tuple(range(1, BODY))

DISPLAY_NAMES: tuple[str, ...] = (
    "Background",
    "Spleen",
    "Right kidney",
    "Left kidney",
    "Gallbladder",
    "Esophagus",
    "Liver",
    "Stomach",
    "Aorta",
    "Inferior vena cava",
    "Pancreas",
    "Right adrenal gland",
    "Left adrenal gland",
    "Duodenum",
    "Urinary bladder",
    "Prostate/uterus",
    "Body",
)

# One colour table for Slicer segments and PNG previews (RGB 0..255), after the paper's Fig. 4 legend.
COLORS: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),
    (0, 160, 60),  # spleen: green
    (40, 80, 220),  # right kidney: blue
    (240, 220, 40),  # left kidney: yellow
    (110, 200, 90),  # gallbladder
    (230, 140, 180),  # esophagus
    (140, 20, 20),  # liver: dark red
    (75, 0, 130),  # stomach: indigo
    (200, 150, 90),  # aorta: light brown
    (60, 190, 170),  # inferior vena cava: aqua blue-green
    (150, 150, 150),  # pancreas: grey
    (0, 100, 40),  # right adrenal: dark green
    (150, 230, 150),  # left adrenal: light green
    (190, 160, 220),  # duodenum: light purple
    (190, 140, 100),  # bladder: light brown
    (130, 40, 160),  # prostate/uterus: purple
    (235, 215, 180),  # body: beige
)

# Source names that describe the whole patient outline rather than a tissue inside it.
BODY_OUTLINE_NAMES = frozenset({"body", "skin", "body_trunc", "body_trunk", "body_extremities", "external", "patient"})

# Extra spellings seen in AMOS dataset.json, Slicer terminology and common datasets.
_SYNONYMS: dict[str, str] = {
    "right_kidney": "kidney_right",
    "kidney_r": "kidney_right",
    "left_kidney": "kidney_left",
    "kidney_l": "kidney_left",
    "gall_bladder": "gallbladder",
    "oesophagus": "esophagus",
    "arota": "aorta",  # sic, AMOS22 dataset.json
    "postcava": "inferior_vena_cava",
    "ivc": "inferior_vena_cava",
    "vena_cava_inferior": "inferior_vena_cava",
    "right_adrenal_gland": "adrenal_gland_right",
    "left_adrenal_gland": "adrenal_gland_left",
    "adrenal_right": "adrenal_gland_right",
    "adrenal_left": "adrenal_gland_left",
    "bladder": "urinary_bladder",
    "prostate": "prostate_uterus",
    "uterus": "prostate_uterus",
    "prostate_or_uterus": "prostate_uterus",
    "prostate/uterus": "prostate_uterus",
}


def normalize_name(name: str) -> str:
    """Lower-case, trim, and join words with underscores ("Right Kidney" -> "right_kidney")."""
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def class_from_name(name: str) -> int | None:
    """Model class index for a structure name, or None when the name is not one of the model's classes."""
    key = normalize_name(name)
    key = _SYNONYMS.get(key, key)
    if key in BODY_OUTLINE_NAMES:
        return BODY
    return MODEL_CLASSES.index(key) if key in MODEL_CLASSES else None


@dataclass(frozen=True)
class LabelAdapter:
    """Maps source label values to model classes.

    ``table`` lists every source value the adapter knows (organs to their class, other known structures to
    BODY); ``outline_values`` are source values that describe the patient outline (a body/skin label).
    """

    name: str
    table: Mapping[int, int]
    outline_values: frozenset[int] = frozenset()

    def classes(self, labels: np.ndarray) -> tuple[np.ndarray, MappingReport]:
        """Map a label array to model classes (uint8); unknown non-zero values become BODY and are reported.

        Values are looked up by ``searchsorted`` in the sorted distinct values, so a huge label (2**31-1) costs
        nothing extra. An intensity image (more than MAX_DISTINCT_LABELS distinct values) is refused.
        """
        values, counts = np.unique(labels, return_counts=True)
        _refuse_intensity_image(values)
        targets = np.array([BACKGROUND if v == 0 else self.table.get(v, BODY) for v in values.tolist()], np.uint8)
        mapped = np.zeros(labels.shape, np.uint8)
        for i in range(len(labels)):  # slice by slice: searchsorted's index array is 8 bytes a voxel
            mapped[i] = targets[np.searchsorted(values, labels[i])]
        unknown = {v: n for v, n in zip(values.tolist(), counts.tolist()) if v != 0 and v not in self.table}
        present = sorted(set(targets.tolist()) - {BACKGROUND, BODY})
        report = MappingReport(
            adapter=self.name,
            organs_present=tuple(MODEL_CLASSES[c] for c in present),
            unknown=unknown,
            has_outline=bool(self.outline_values & set(values.tolist())),
        )
        if unknown:
            logger.info(report.unknown_message())
        return mapped, report


MAX_DISTINCT_LABELS = 255
"""More distinct values than this and a file is an intensity image, not a label map (TotalSegmentator's largest
task has 117 labels; any real CT, in whatever integer type, has hundreds to thousands of distinct values)."""


def _refuse_intensity_image(values: np.ndarray) -> None:
    nonzero = values[values != 0]
    if nonzero.size > MAX_DISTINCT_LABELS:
        raise InputError(
            f"the segmentation has {nonzero.size} distinct values ({nonzero.min()} to {nonzero.max()}), so it looks "
            f"like an intensity image (a CT?) rather than a label map (at most {MAX_DISTINCT_LABELS} labels); "
            "give the segmentation file"
        )


@dataclass(frozen=True)
class MappingReport:
    """What a mapping found: the organs present and the source values the adapter did not know."""

    adapter: str
    organs_present: tuple[str, ...]
    unknown: dict[int, int] = field(default_factory=dict)
    has_outline: bool = False

    def unknown_message(self) -> str:
        """One line naming each unknown value and its voxel count, or '' when there were none."""
        if not self.unknown:
            return ""
        items = ", ".join(f"{v} ({n} voxels)" for v, n in sorted(self.unknown.items()))
        return f"labels not known to the '{self.adapter}' mapping were treated as body tissue: {items}"


def amos_adapter() -> LabelAdapter:
    """AMOS22 ids 1..15 (identical to the model's organ indices)."""
    return LabelAdapter("amos", {c: c for c in ORGANS})


def _adapter_from_names(name: str, names: Mapping[int, str]) -> LabelAdapter:
    table: dict[int, int] = {}
    outline: set[int] = set()
    for value, label_name in names.items():
        cls = class_from_name(label_name)
        table[value] = BODY if cls is None else cls
        if normalize_name(label_name) in BODY_OUTLINE_NAMES:
            outline.add(value)
    return LabelAdapter(name, table, frozenset(outline))


def totalsegmentator_names(version: int = 2) -> dict[int, str]:
    """TotalSegmentator ``total`` task id -> name (v2: 117 classes, v1: 104 classes)."""
    if version not in (1, 2):
        raise ValueError(f"TotalSegmentator version must be 1 or 2, not {version}")
    text = resources.files(__package__).joinpath(f"label_tables/totalseg_v{version}_total.json").read_text()
    return {int(k): v for k, v in json.loads(text)["labels"].items()}


def totalsegmentator_adapter(version: int = 2) -> LabelAdapter:
    """TotalSegmentator ``total`` ids; its non-AMOS structures (bones, muscles, bowel, ...) become body."""
    return _adapter_from_names("totalseg" if version == 2 else "totalseg_v1", totalsegmentator_names(version))


def segment_names_adapter(names: Mapping[int, str]) -> LabelAdapter:
    """Adapter from segment names (e.g. a Slicer .seg.nrrd): organ names map to organs, the rest to body."""
    return _adapter_from_names("segment names", names)


def read_label_mapping(path: str | Path) -> dict[str, int]:
    """A user mapping file ``{source value or name: target class name}`` as ``{key: model class}``.

    Keys are label values ("7") or source names (returned normalized); targets are model class names or
    synonyms ("liver", "right kidney", "body", "background").
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"label mapping file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"label mapping file {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not data:
        raise InputError(f"label mapping file {path} must be a non-empty JSON object {{source: target class}}")
    table: dict[str, int] = {}
    for key, target in data.items():
        cls = BACKGROUND if normalize_name(str(target)) == "background" else class_from_name(str(target))
        if cls is None:
            raise InputError(
                f"label mapping file {path}: target '{target}' for '{key}' is not a class; "
                f"use one of {', '.join(MODEL_CLASSES)}"
            )
        key = str(key).strip()
        table[key if key.isdigit() else normalize_name(key)] = cls
    return table


def json_adapter(path: str | Path, segment_names: Mapping[int, str] | None = None) -> LabelAdapter:
    """Adapter from a mapping file (:func:`read_label_mapping`); name keys match the input's segment names."""
    values_by_name = {normalize_name(n): v for v, n in (segment_names or {}).items()}
    table: dict[int, int] = {}
    for key, cls in read_label_mapping(path).items():
        if key.isdigit():
            table[int(key)] = cls
        elif key in values_by_name:
            table[values_by_name[key]] = cls
    return LabelAdapter(f"json:{Path(path).name}", table)


LABEL_CHOICES = ("auto", "amos", "totalseg", "totalseg_v1")

AUTO_RULE = (
    "'auto' reads segment names when the file has them (Slicer .seg.nrrd); otherwise ids above 15 as "
    "TotalSegmentator v2, and ids 1-4 (the same organs in every convention) as AMOS. Ids 5-15 with nothing above "
    "mean different organs in AMOS and TotalSegmentator (e.g. its --roi_subset output), so auto refuses them: "
    "pass --labels amos, totalseg or totalseg_v1"
)


def check_convention(spec: str) -> None:
    """InputError unless ``spec`` is a known convention or a readable JSON mapping file (cheap: no volume)."""
    if spec in LABEL_CHOICES:
        return
    if not spec.lower().endswith(".json"):
        raise InputError(f"unknown label convention '{spec}': use one of {', '.join(LABEL_CHOICES)} or a .json file")
    read_label_mapping(spec)


def mapping_file(spec: str) -> Path | None:
    """The JSON mapping file a label convention ``spec`` names, if it names one."""
    return Path(spec) if spec.lower().endswith(".json") else None


def resolve_adapter(spec: str, labels: np.ndarray, segment_names: Mapping[int, str] | None = None) -> LabelAdapter:
    """Adapter for ``spec`` ('auto', 'amos', 'totalseg', 'totalseg_v1' or a JSON file path); see AUTO_RULE."""
    check_convention(spec)
    if spec == "amos":
        return amos_adapter()
    if spec == "totalseg":
        return totalsegmentator_adapter(2)
    if spec == "totalseg_v1":
        return totalsegmentator_adapter(1)
    if spec != "auto":
        return json_adapter(spec, segment_names)
    top = int(labels.max()) if labels.size else 0
    if segment_names:
        adapter = segment_names_adapter(segment_names)
    elif top > max(ORGANS):
        adapter = totalsegmentator_adapter(2)
    else:
        adapter = _unambiguous_small_ids(labels, top)
    logger.info("label convention detected: %s", adapter.name)
    return adapter


def _unambiguous_small_ids(labels: np.ndarray, top: int) -> LabelAdapter:
    """The AMOS adapter for ids 0..15 that every convention reads alike; InputError naming each reading otherwise."""
    present = [v for v in range(1, top + 1) if np.any(labels == v)]  # no int64 copy of a large volume
    readings = {"AMOS": [MODEL_CLASSES[v] for v in present]}
    for version in (2, 1):
        table = totalsegmentator_names(version)
        readings[f"TotalSegmentator v{version}"] = [table.get(v, f"unknown {v}") for v in present]
    if all(names == readings["AMOS"] for names in readings.values()):
        return amos_adapter()
    shown = "; ".join(f"as {name}: {', '.join(names)}" for name, names in readings.items())
    raise InputError(
        f"label ids {', '.join(map(str, present))} fit more than one convention ({shown}): pass --labels amos, "
        "totalseg or totalseg_v1 (or a JSON mapping file)"
    )
