"""The model's classes (background, 15 AMOS22 organs, body) and adapters from other label conventions.

An adapter maps source label values (AMOS ids, TotalSegmentator v1/v2 ids, Slicer segment names, a user JSON
file) to model class indices. Values an adapter does not know become "body" and are reported, never dropped.
"""

from __future__ import annotations

import functools
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

@dataclass(frozen=True)
class ClassSet:
    """A model's classes, read from ``label_tables/classes_<name>.json``: names, display names, the group each
    belongs to in reports (organs first, then groups as in docs/anatomy.md), colours, and the source structure names
    (``members``, lower case, a trailing ``*`` matches any ending) each class stands for.

    Every set starts with the paper's 17 classes at the same indices (background 0, AMOS organs 1..15, body 16),
    so AMOS ids and a paper-set class volume mean the same in every set.
    """

    name: str
    classes: tuple[str, ...]
    display_names: tuple[str, ...]
    groups: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    members: Mapping[str, int]

    @property
    def body(self) -> int:
        """Index of the class for tissue inside the patient outline that no other class describes."""
        return self.classes.index("body")

    @property
    def labelled(self) -> tuple[int, ...]:
        """Every class but background and body (the structures a segmentation names)."""
        return tuple(c for c in range(len(self.classes)) if c not in (BACKGROUND, self.body))

    def index(self, name: str) -> int | None:
        """Class index for a normalized source name: the class itself, an exact member, then a wildcard member."""
        if name in self.classes:
            return self.classes.index(name)
        if name in self.members:
            return self.members[name]
        for pattern, cls in self.members.items():
            if pattern.endswith("*") and name.startswith(pattern[:-1]):
                return cls
        return None


CLASS_SETS = ("paper", "anatomy")


@functools.cache
def class_set(name: str = "paper") -> ClassSet:
    """The class set ``name`` (one of CLASS_SETS); InputError for another name."""
    if name not in CLASS_SETS:
        raise InputError(f"unknown class set '{name}': use one of {', '.join(CLASS_SETS)}")
    table = resources.files(__package__).joinpath(f"label_tables/classes_{name}.json")
    data = json.loads(table.read_text(encoding="utf-8"))
    entries = data["classes"]
    members = {m: i for i, e in enumerate(entries) for m in e.get("members", [])}
    return ClassSet(name, *(tuple(e[key] for e in entries) for key in ("name", "display", "group")),
                    tuple(tuple(e["color"]) for e in entries), members)  # type: ignore[misc]


PAPER = class_set("paper")
MODEL_CLASSES: tuple[str, ...] = PAPER.classes
"""The paper set's class index -> name. Indices 1..15 are the AMOS22 ids, so the AMOS adapter is the identity."""

BACKGROUND = 0
BODY = PAPER.body
NUM_CLASSES = len(MODEL_CLASSES)
ORGANS: tuple[int, ...] = tuple(range(1, BODY))
DISPLAY_NAMES: tuple[str, ...] = PAPER.display_names
COLORS: tuple[tuple[int, int, int], ...] = PAPER.colors
"""One colour table for Slicer segments and PNG previews (RGB 0..255), after the paper's Fig. 4 legend."""

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
    # MAISI (label_tables/maisi_ct.json): lesions and vessels inside an organ take the organ's class
    "hepatic_tumor": "liver",
    "hepatic_vessel": "liver",
    "pancreatic_tumor": "pancreas",
    "colon_cancer_primaries": "colon",
    "lung_tumor": "lung",
}

_VERTEBRA = re.compile(r"^([cltsCLTS]\d{1,2})_vertebra$")


@functools.cache
def _slicer_names() -> dict[str, str]:
    """Slicer TotalSegmentator-extension segment names (normalized) -> TotalSegmentator names."""
    text = resources.files(__package__).joinpath("label_tables/slicer_totalseg_names.json").read_text(encoding="utf-8")
    return {normalize_name(k): v.lower() for k, v in json.loads(text)["names"].items()}


def _spellings(key: str) -> list[str]:
    """A normalized name and the other spellings it may stand for: synonyms, Slicer segment names, the side moved to
    the end ("left_rib_1" -> "rib_1_left", as TotalSegmentator writes sides) and "l1_vertebra" -> "vertebrae_l1"."""
    out = [key]
    for side in ("left_", "right_"):
        if key.startswith(side):
            out.append(f"{key[len(side):]}_{side[:-1]}")
    match = _VERTEBRA.match(key)
    if match:
        out.append(f"vertebrae_{match.group(1)}")
    return [k for each in out for k in (_SYNONYMS.get(each, each), _slicer_names().get(each, each))]


def normalize_name(name: str) -> str:
    """Lower-case, trim, and join words with underscores ("Right Kidney" -> "right_kidney")."""
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def class_from_name(name: str, classes: ClassSet = PAPER) -> int | None:
    """Class index in ``classes`` for a structure name, or None when the set has no class for it."""
    for key in _spellings(normalize_name(name)):
        if key in BODY_OUTLINE_NAMES:
            return classes.body
        cls = classes.index(key)
        if cls is not None:
            return cls
    return None


@dataclass(frozen=True)
class LabelAdapter:
    """Maps source label values to model classes.

    ``table`` lists every source value the adapter knows (structures to their class in ``class_set``, other
    known structures to its body class); ``outline_values`` are source values that describe the patient outline
    (a body/skin label).
    """

    name: str
    table: Mapping[int, int]
    outline_values: frozenset[int] = frozenset()
    class_set: ClassSet = PAPER

    @property
    def expressible(self) -> tuple[int, ...]:
        """The labelled classes of the set that labels in this convention can hold, the ones Dice scores: the 15
        organs (every convention names them) and each class a source value maps to. AMOS labels hold no ribs, so
        TotalSegmentator's ribs on a CT can never match them."""
        held = set(self.table.values()) | set(ORGANS)
        return tuple(c for c in self.class_set.labelled if c in held)

    def classes(self, labels: np.ndarray) -> tuple[np.ndarray, MappingReport]:
        """Map a label array to model classes (uint8); unknown non-zero values become BODY and are reported.

        Values are looked up by ``searchsorted`` in the sorted distinct values, so a huge label (2**31-1) costs
        nothing extra. An intensity image (more than MAX_DISTINCT_LABELS distinct values) is refused.
        """
        values, counts = np.unique(labels, return_counts=True)
        _refuse_intensity_image(values)
        body = self.class_set.body
        targets = np.array([BACKGROUND if v == 0 else self.table.get(v, body) for v in values.tolist()], np.uint8)
        mapped = np.zeros(labels.shape, np.uint8)
        for i in range(len(labels)):  # slice by slice: searchsorted's index array is 8 bytes a voxel
            mapped[i] = targets[np.searchsorted(values, labels[i])]
        unknown = {v: n for v, n in zip(values.tolist(), counts.tolist()) if v != 0 and v not in self.table}
        present = sorted(set(targets.tolist()) - {BACKGROUND, body})
        report = MappingReport(
            adapter=self.name,
            organs_present=tuple(self.class_set.classes[c] for c in present),
            unknown=unknown,
            has_outline=bool(self.outline_values & set(values.tolist())),
            expressible=self.expressible,
        )
        if unknown:
            logger.info(report.unknown_message())
        return mapped, report


MAX_DISTINCT_LABELS = 255
"""More distinct values than this and a file is an intensity image, not a label map (TotalSegmentator's largest
task has 117 labels; any real CT, in whatever integer type, has hundreds to thousands of distinct values)."""


def few_enough_for_labels(values: np.ndarray) -> bool:
    """Whether an array with these distinct values can be a label map rather than an intensity image: at most
    MAX_DISTINCT_LABELS of them besides 0. The one rule for both directions (a CT given as a segmentation, a
    segmentation given as a CT)."""
    return int(np.count_nonzero(values)) <= MAX_DISTINCT_LABELS


def _refuse_intensity_image(values: np.ndarray) -> None:
    if not few_enough_for_labels(values):
        nonzero = values[values != 0]
        raise InputError(
            f"the segmentation has {nonzero.size} distinct values ({nonzero.min()} to {nonzero.max()}), so it looks "
            f"like an intensity image (a CT?) rather than a label map (at most {MAX_DISTINCT_LABELS} labels); "
            "give the segmentation file"
        )


@dataclass(frozen=True)
class MappingReport:
    """What a mapping found: the structures present (class names other than background and body) and the source
    values the adapter did not know."""

    adapter: str
    organs_present: tuple[str, ...]
    expressible: tuple[int, ...]
    """The adapter's :attr:`LabelAdapter.expressible` classes."""
    unknown: dict[int, int] = field(default_factory=dict)
    has_outline: bool = False
    body_source: str = ""
    """Where the body outline came from (set by ``synthesis.prepare_classes``)."""

    def unknown_message(self) -> str:
        """One line naming each unknown value and its voxel count, or '' when there were none."""
        if not self.unknown:
            return ""
        items = ", ".join(f"{v} ({n} voxels)" for v, n in sorted(self.unknown.items()))
        return f"labels not known to the '{self.adapter}' mapping were treated as body tissue: {items}"


def amos_adapter(classes: ClassSet = PAPER) -> LabelAdapter:
    """AMOS22 ids 1..15 (identical to the organ indices of every class set)."""
    return LabelAdapter("amos", {c: c for c in ORGANS}, class_set=classes)


def _adapter_from_names(name: str, names: Mapping[int, str], classes: ClassSet) -> LabelAdapter:
    table: dict[int, int] = {}
    outline: set[int] = set()
    for value, label_name in names.items():
        cls = class_from_name(label_name, classes)
        table[value] = classes.body if cls is None else cls
        if normalize_name(label_name) in BODY_OUTLINE_NAMES:
            outline.add(value)
    return LabelAdapter(name, table, frozenset(outline), classes)


def totalsegmentator_names(version: int = 2) -> dict[int, str]:
    """TotalSegmentator ``total`` task id -> name (v2: 117 classes, v1: 104 classes)."""
    if version not in (1, 2):
        raise ValueError(f"TotalSegmentator version must be 1 or 2, not {version}")
    table = resources.files(__package__).joinpath(f"label_tables/totalseg_v{version}_total.json")
    text = table.read_text(encoding="utf-8")
    return {int(k): v for k, v in json.loads(text)["labels"].items()}


def totalsegmentator_adapter(version: int = 2, classes: ClassSet = PAPER) -> LabelAdapter:
    """TotalSegmentator ``total`` ids; structures the class set has no class for (in the paper set: bones,
    muscles, bowel, ...) become body."""
    return _adapter_from_names("totalseg" if version == 2 else "totalseg_v1", totalsegmentator_names(version), classes)


def maisi_names() -> dict[int, str]:
    """MAISI (NV-Generate-CTMR ``configs/label_dict.json``) id -> name: 132 labels and body (200)."""
    text = resources.files(__package__).joinpath("label_tables/maisi_ct.json").read_text(encoding="utf-8")
    return {int(k): v for k, v in json.loads(text)["labels"].items()}


MAISI_BODY = 200
"""MAISI's body label: every voxel inside the body outline that no other label covers."""


def maisi_adapter(classes: ClassSet = PAPER) -> LabelAdapter:
    """MAISI ids; the body label (200) is the body outline, structures without a class of their own become body."""
    return _adapter_from_names("maisi", maisi_names(), classes)


def segment_names_adapter(names: Mapping[int, str], classes: ClassSet = PAPER) -> LabelAdapter:
    """Adapter from segment names (e.g. a Slicer .seg.nrrd): names of classes (or their members) map to them, the
    rest to body."""
    return _adapter_from_names("segment names", names, classes)


def read_label_mapping(path: str | Path, classes: ClassSet = PAPER) -> dict[str, int]:
    """A user mapping file ``{source value or name: target class name}`` as ``{key: model class}``.

    Keys are label values ("7") or source names (returned normalized); targets are model class names or
    synonyms in ``classes`` ("liver", "right kidney", "body", "background"; "ribs" in the anatomy set).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"label mapping file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"label mapping file {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not data:
        raise InputError(f"label mapping file {path} must be a non-empty JSON object {{source: target class}}")
    table: dict[str, int] = {}
    for key, target in data.items():
        cls = BACKGROUND if normalize_name(str(target)) == "background" else class_from_name(str(target), classes)
        if cls is None:
            raise InputError(
                f"label mapping file {path}: target '{target}' for '{key}' is not a class of the '{classes.name}' "
                f"set; use one of {', '.join(classes.classes)}"
            )
        key = str(key).strip()
        table[key if key.isdigit() else normalize_name(key)] = cls
    return table


def json_adapter(path: str | Path, segment_names: Mapping[int, str] | None = None,
                 classes: ClassSet = PAPER) -> LabelAdapter:
    """Adapter from a mapping file (:func:`read_label_mapping`); name keys match the input's segment names."""
    values_by_name = {normalize_name(n): v for v, n in (segment_names or {}).items()}
    table: dict[int, int] = {}
    for key, cls in read_label_mapping(path, classes).items():
        if key.isdigit():
            table[int(key)] = cls
        elif key in values_by_name:
            table[values_by_name[key]] = cls
    return LabelAdapter(f"json:{Path(path).name}", table, class_set=classes)


LABEL_CHOICES = ("auto", "amos", "totalseg", "totalseg_v1", "maisi")

AUTO_RULE = (
    "'auto' reads segment names when the file has them (Slicer .seg.nrrd); otherwise a file with label 200 (MAISI's "
    "body) as MAISI, ids above 15 as TotalSegmentator v2, and ids 1-4 (the same organs in every convention) as AMOS. Ids 5-15 with nothing above "
    "mean different organs in AMOS and TotalSegmentator (e.g. its --roi_subset output), so auto refuses them: "
    "pass --labels amos, totalseg, totalseg_v1 or maisi"
)


def check_convention(spec: str, classes: ClassSet = PAPER) -> None:
    """InputError unless ``spec`` is a known convention or a readable JSON mapping file (cheap: no volume)."""
    if spec in LABEL_CHOICES:
        return
    if not spec.lower().endswith(".json"):
        raise InputError(f"unknown label convention '{spec}': use one of {', '.join(LABEL_CHOICES)} or a .json file")
    read_label_mapping(spec, classes)


def mapping_file(spec: str) -> Path | None:
    """The JSON mapping file a label convention ``spec`` names, if it names one."""
    return Path(spec) if spec.lower().endswith(".json") else None


def resolve_adapter(spec: str, labels: np.ndarray, segment_names: Mapping[int, str] | None = None,
                    classes: ClassSet = PAPER) -> LabelAdapter:
    """Adapter onto ``classes`` for ``spec`` ('auto', 'amos', 'totalseg', 'totalseg_v1', 'maisi' or a JSON file path);
    see AUTO_RULE."""
    check_convention(spec, classes)
    if spec == "amos":
        return amos_adapter(classes)
    if spec == "totalseg":
        return totalsegmentator_adapter(2, classes)
    if spec == "totalseg_v1":
        return totalsegmentator_adapter(1, classes)
    if spec == "maisi":
        return maisi_adapter(classes)
    if spec != "auto":
        return json_adapter(spec, segment_names, classes)
    top = int(labels.max()) if labels.size else 0
    if segment_names:
        adapter = segment_names_adapter(segment_names, classes)
    elif top == MAISI_BODY:
        adapter = maisi_adapter(classes)
    elif top > max(ORGANS):
        adapter = totalsegmentator_adapter(2, classes)
    else:
        adapter = _unambiguous_small_ids(labels, top, classes)
    logger.info("label convention detected: %s", adapter.name)
    return adapter


def _unambiguous_small_ids(labels: np.ndarray, top: int, classes: ClassSet) -> LabelAdapter:
    """The AMOS adapter for ids 0..15 that every convention reads alike; InputError naming each reading otherwise."""
    present = [v for v in range(1, top + 1) if np.any(labels == v)]  # no int64 copy of a large volume
    readings = {"AMOS": [MODEL_CLASSES[v] for v in present]}
    for version in (2, 1):
        table = totalsegmentator_names(version)
        readings[f"TotalSegmentator v{version}"] = [table.get(v, f"unknown {v}") for v in present]
    if all(names == readings["AMOS"] for names in readings.values()):
        return amos_adapter(classes)
    shown = "; ".join(f"as {name}: {', '.join(names)}" for name, names in readings.items())
    raise InputError(
        f"label ids {', '.join(map(str, present))} fit more than one convention ({shown}): pass --labels amos, "
        "totalseg or totalseg_v1 (or a JSON mapping file)"
    )
