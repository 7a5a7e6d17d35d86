"""Which class of the model's class set each segment of a segmentation is: by name, by label value (AMOS /
TotalSegmentator ids), or by a user JSON mapping. Pure Python (no Slicer), so it is tested without a scene.

The Logic exports the chosen segments as values 1..N and hands ``ctsynth synth`` a JSON mapping
``{"1": "liver", ...}`` (:func:`mappingJson`), so the command line sees exactly what this module decided.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from CTSemanticSynthLib.errors import InputError
from CTSemanticSynthLib.labels import (
    BACKGROUND,
    BODY_OUTLINE_NAMES,
    ORGANS,
    PAPER,
    ClassSet,
    class_from_name,
    class_set,
    normalize_name,
    read_label_mapping,
    totalsegmentator_names,
)

from .choices import CONVENTIONS


class LabelMappingError(ValueError):
    """The segments cannot be mapped to the model's classes; the message says which and what to do."""


@dataclass(frozen=True)
class Segment:
    segmentId: str
    name: str
    labelValue: int = 0


@dataclass(frozen=True)
class SegmentClasses:
    """Segments grouped for export onto ``classSet``: ``organs`` (segment, class) pairs (every structure the set
    has a class for, and known structures it has none for, as body), ``bodyOutline`` segments (a body/skin outline,
    exported as the body mask), ``ignored`` (mapped to background) and ``unknown`` (treated as body)."""

    organs: tuple[tuple[Segment, int], ...]
    bodyOutline: tuple[Segment, ...]
    ignored: tuple[Segment, ...]
    unknown: tuple[Segment, ...]
    classSet: ClassSet = PAPER

    @property
    def organNames(self) -> list[str]:
        """The set's classes (other than body) that some segment is."""
        return sorted({self.classSet.classes[c] for _, c in self.organs if c != self.classSet.body})

    @property
    def notInModel(self) -> tuple[Segment, ...]:
        """Segments the model has no class for (known structures and unrecognised names), synthesized as body."""
        return tuple(s for s, c in self.organs if c == self.classSet.body) + self.unknown

    def warning(self) -> str:
        """One line about segments treated as body tissue because nothing named them, or ''."""
        if not self.unknown:
            return ""
        return f"segments not recognised, treated as body tissue: {_names(self.unknown)}"

    def bodyTissue(self) -> str:
        """For the panel: which segments become body tissue (fat and muscle) rather than an organ."""
        known = [s for s, c in self.organs if c == self.classSet.body]
        if not known and not self.unknown:
            return "Every segment is an organ the model knows (or the body outline)."
        parts = ([f"known structures {_names(known)}"] if known else []) + (
            [f"unrecognised {_names(self.unknown)}"] if self.unknown else [])
        return f"Synthesized as body tissue: {'; '.join(parts)}."


@lru_cache(maxsize=None)
def _totalsegmentatorStructures() -> frozenset[str]:
    """Normalized names of every TotalSegmentator v1/v2 'total' structure (known anatomy, body unless an organ)."""
    return frozenset(normalize_name(n) for v in (1, 2) for n in totalsegmentator_names(v).values())


def _knownStructure(name: str) -> bool:
    """Whether ``name`` is anatomy the project knows: a TotalSegmentator structure, or a name (in any spelling the
    library reads, e.g. the TotalSegmentator extension's "superior lobe of left lung") of the richest class set."""
    return normalize_name(name) in _totalsegmentatorStructures() or class_from_name(name, class_set("anatomy")) is not None


def _valueFromName(name: str) -> int | None:
    """'Segment_5', 'Label 5' or '5' -> 5 (Slicer names segments of an imported label map this way)."""
    match = re.fullmatch(r"(?:segment|label)?[_\s-]*(\d+)", name.strip().lower())
    return int(match.group(1)) if match else None


def _classByName(name: str, classes: ClassSet) -> int | None:
    """The class of ``classes`` a segment name stands for: its own, body for known anatomy without one, else None."""
    cls = class_from_name(name, classes)
    if cls is None and _knownStructure(name):
        return classes.body
    return cls


def _idTable(convention: str, classes: ClassSet) -> dict[int, int]:
    if convention == "amos":
        return {c: c for c in ORGANS}  # the AMOS ids are the organ indices of every class set
    version = 1 if convention == "totalseg_v1" else 2
    table = {v: _classByName(n, classes) for v, n in totalsegmentator_names(version).items()}
    return {v: classes.body if c is None else c for v, c in table.items()}


def _jsonTable(path: str | Path, classes: ClassSet) -> dict[str, int]:
    """{normalized name or decimal value: class} from a mapping file ``{"Tumor": "body", "7": "liver"}``."""
    try:
        return read_label_mapping(path, classes)
    except InputError as exc:
        raise LabelMappingError(str(exc)) from None


def _names(segments, limit: int = 8) -> str:
    names = [f"'{s.name}'" for s in segments]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def classifySegments(segments: list[Segment], convention: str = "auto", mappingFile: str | Path | None = None,
                     strict: bool = False, classes: ClassSet = PAPER) -> SegmentClasses:
    """Assign a class of the model's set ``classes`` to every segment.

    ``auto`` uses names (class names and their members and synonyms, including the TotalSegmentator extension's
    segment names; other known anatomy -> body; 'body'/'skin' -> outline); ``amos``/``totalseg``/``totalseg_v1`` use
    label values (or the number in 'Segment_5'); ``json`` reads ``mappingFile`` (keys: names or values; targets:
    class names of ``classes``) and falls back to names. Unknown segments become body tissue (reported by
    :meth:`SegmentClasses.warning`), or raise with ``strict``. Raises :class:`LabelMappingError` when no segment is
    a structure the model knows.
    """
    if convention not in CONVENTIONS:
        raise LabelMappingError(f"unknown label convention '{convention}': use one of {', '.join(CONVENTIONS)}")
    if not segments:
        raise LabelMappingError("the segmentation has no segments: nothing to synthesize")
    if convention == "json" and not mappingFile:
        raise LabelMappingError("label convention 'json' needs a mapping file {\"segment name or value\": \"class\"}")
    table = _jsonTable(mappingFile, classes) if convention == "json" else None
    ids = _idTable(convention, classes) if convention in ("amos", "totalseg", "totalseg_v1") else None
    organs, outline, ignored, unknown = [], [], [], []
    for segment in segments:
        key = normalize_name(segment.name)
        if table is not None:
            cls = table.get(key, table.get(str(segment.labelValue)))
            cls = _classByName(segment.name, classes) if cls is None else cls
        elif ids is not None:
            value = segment.labelValue or _valueFromName(segment.name)
            cls = ids.get(value) if value else None
        else:
            cls = _classByName(segment.name, classes)
        if cls is None:
            unknown.append(segment)
        elif cls == BACKGROUND:
            ignored.append(segment)
        elif cls == classes.body and key in BODY_OUTLINE_NAMES:
            outline.append(segment)
        else:
            organs.append((segment, cls))
    result = SegmentClasses(tuple(organs), tuple(outline), tuple(ignored), tuple(unknown), classes)
    if not result.organNames:
        how = "names" if convention in ("auto", "json") else f"'{convention}' label values"
        raise LabelMappingError(
            f"no segment is an organ the model knows (by {how}): {_names(segments)}. Rename the segments to organ "
            f"names (e.g. 'liver', 'right kidney'), choose the label values convention (AMOS or TotalSegmentator ids) "
            f"if the segments came from such a label map, or give a JSON mapping file {{\"segment name\": \"liver\"}}")
    if strict and unknown:
        raise LabelMappingError(
            f"segments not recognised: {_names(unknown)}. Rename them, map them in a JSON file "
            f"{{\"{unknown[0].name}\": \"body\"}}, or allow unknown segments (they become body tissue)")
    return result


def exportOrder(classes: SegmentClasses) -> list[tuple[Segment, int]]:
    """Segments to export as values 1..N, in that order: unknown segments (body) first, then known ones, so
    a structure the model knows drawn over another wins where they overlap."""
    body = classes.classSet.body
    return [(s, body) for s in classes.unknown] + sorted(classes.organs, key=lambda sc: sc[1] != body)


def mappingJson(order: list[tuple[Segment, int]], classes: ClassSet = PAPER) -> str:
    """The ``--labels`` file for ``ctsynth synth``: ``{"1": "liver", "2": "body", ...}`` (class names of
    ``classes``, the model's set)."""
    return json.dumps({str(i + 1): classes.classes[cls] for i, (_, cls) in enumerate(order)}, indent=1)
