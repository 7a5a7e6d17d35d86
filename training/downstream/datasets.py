"""The study's cases and its three nnU-Net v2 raw datasets (real only, real + synthetic, synthetic only).

Every case's label map becomes one organ label file (``labels/<case>.nii.gz``: the model's classes with the body
class folded into background, so the task is the 15 AMOS22 organs), written once on the CT's grid. A synthetic CT
is made from its case's label map, so it shares that label file. The datasets hold links, not copies: each real CT
and label file is hard-linked (else symlinked, else copied once) into every dataset that uses it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from CTSemanticSynthLib.batch import case_name, list_cases
from CTSemanticSynthLib.batch_layout import Job, nnunet_dataset
from CTSemanticSynthLib.errors import CTSynthError, InputError
from CTSemanticSynthLib.io import (READ_SUFFIXES, Volume, atomic_folder, read_ct, read_labelmap, write_bytes,
                                   write_volume)
from CTSemanticSynthLib.labels import BODY, MODEL_CLASSES
from CTSemanticSynthLib.synthesis import prepare_classes

logger = logging.getLogger(__name__)

NIFTI = ".nii.gz"
KINDS = ("real", "real+synthetic", "synthetic")
"""The three training sets, in dataset-id order."""
_NAMES = {"real": "Real", "real+synthetic": "RealSynth", "synthetic": "Synth"}
ORGAN_LABELS: dict[str, int] = {name: value for value, name in enumerate(MODEL_CLASSES[:BODY])}
"""The one label table of all three datasets: background and the 15 AMOS22 organs (body is background)."""


@dataclass(frozen=True)
class Case:
    """A real CT and its label map."""

    name: str
    ct: Path
    seg: Path


@dataclass(frozen=True)
class Cases:
    """The training and the held-out test cases."""

    train: tuple[Case, ...]
    test: tuple[Case, ...]


class StudyPaths:
    """Where a study's files go, all under one folder (docs/downstream.md lists them)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.record = root / "study.json"
        self.labels = root / "labels"
        self.converted = root / "real"  # real CTs given in another format than .nii.gz, converted once
        self.synthetic = root / "synthetic"
        self.raw, self.preprocessed, self.results = (root / f"nnUNet_{n}" for n in ("raw", "preprocessed", "results"))
        self.test_images = root / "test" / "imagesTs"
        self.predictions = root / "predictions"
        self.steps = root / "steps"
        self.logs = root / "logs"
        self.reports = root / "report"

    def label(self, case: str) -> Path:
        return self.labels / f"{case}{NIFTI}"

    def real_image(self, case: Case) -> Path:
        """The .nii.gz the datasets link to: the CT itself, or its converted copy."""
        return case.ct if case.ct.name.lower().endswith(NIFTI) else self.converted / f"{case.name}{NIFTI}"


def dataset_name(dataset_id: int, kind: str) -> str:
    """``Dataset501_Real``, ``Dataset502_RealSynth``, ``Dataset503_Synth`` for base id 501."""
    return f"Dataset{dataset_id + KINDS.index(kind):03d}_{_NAMES[kind]}"


def read_case_names(path: Path, option: str) -> list[str]:
    """Case names from a text file, one a line (``#`` comments; a file name stands for its case)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {option} {path}: {exc.strerror if isinstance(exc, OSError) else exc}") from None
    names = [_bare(case_name(Path(line.strip()))) for line in lines
             if line.strip() and not line.lstrip().startswith("#")]
    if not names:
        raise InputError(f"{option} {path} lists no cases")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(f"{option} {path} lists case '{repeated[0]}' twice")
    return names


def _bare(name: str) -> str:
    """nnU-Net's channel suffix dropped: ``amos_0001_0000`` -> ``amos_0001``."""
    return name[:-5] if name.endswith("_0000") else name


def find_cts(folders: Sequence[Path]) -> dict[str, Path]:
    """``{case: CT file}`` of some folders (``<case>.nii.gz`` or nnU-Net's ``<case>_0000.nii.gz``, any readable
    format)."""
    found: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            raise InputError(f"--cts {folder} is not a folder of CT volumes")
        for path in sorted(folder.iterdir()):
            if path.is_file() and not path.name.startswith(".") and path.name.lower().endswith(READ_SUFFIXES):
                name = _bare(case_name(path))
                if name in found:
                    raise InputError(f"--cts: {found[name]} and {path} are both case '{name}'; keep one")
                found[name] = path
    if not found:
        raise InputError(f"--cts {' '.join(map(str, folders))} holds no CT volumes ({', '.join(READ_SUFFIXES)})")
    return found


def select_cases(cts: Sequence[Path], segs: Path, test: Path, train: Path | None) -> Cases:
    """Pair CTs with label maps and split them; InputError for a case without its CT or label map, an empty
    split, or a test case that is also a training case (by name or by file)."""
    images = find_cts(cts)
    labels = {_bare(name): path for name, path in list_cases(segs)}
    test_names = read_case_names(test, "--test")
    train_names = read_case_names(train, "--train") if train is not None else [n for n in labels if n not in test_names]
    both = [n for n in train_names if n in test_names]
    if both:
        raise InputError(f"case '{both[0]}' is in --train and in --test; a test case must be held out of training")
    if not train_names:
        raise InputError(f"every label map in --segs {segs} is a --test case; nothing is left to train on")
    for option, names in (("--test", test_names), ("--train", train_names)):
        for name in names:
            if name not in labels:
                raise InputError(f"{option} case '{name}' has no label map in --segs {segs}")
            if name not in images:
                raise InputError(f"{option} case '{name}' has no CT in --cts (looked for {name}{NIFTI} or "
                                 f"{name}_0000{NIFTI})")
    split = Cases(tuple(Case(n, images[n], labels[n]) for n in train_names),
                  tuple(Case(n, images[n], labels[n]) for n in test_names))
    _refuse_shared_files(split)
    return split


def _refuse_shared_files(cases: Cases) -> None:
    """A test CT or label map that is also a training one under another name (same file, link or copy by path)."""
    def identity(path: Path) -> tuple[int, int]:
        stat = path.stat()
        return stat.st_dev, stat.st_ino

    seen = {identity(p): (c.name, p) for c in cases.train for p in (c.ct, c.seg)}
    for case in cases.test:
        for path in (case.ct, case.seg):
            if identity(path) in seen:
                name, other = seen[identity(path)]
                raise InputError(f"test case '{case.name}' uses {path}, the same file as training case '{name}' "
                                 f"({other}); a test case must be held out of training")


def write_organ_labels(cases: Sequence[Case], paths: StudyPaths, convention: str) -> None:
    """``labels/<case>.nii.gz`` for every case (organs as model classes, body -> 0) on the CT's exact grid, and
    a .nii.gz copy of each CT in another format; InputError naming the case for a bad label map or grid."""
    paths.labels.mkdir(parents=True, exist_ok=True)
    for case in cases:
        try:
            ct = read_ct(case.ct, f"its CT {case.ct}")
            seg, names = read_labelmap(case.seg)
            if not seg.same_grid(ct):
                raise InputError(f"its label map {case.seg} is not on the grid of its CT {case.ct} (shape, spacing, "
                                 "origin or direction differ)")
            classes, _ = prepare_classes(seg, names, convention)
        except CTSynthError as exc:
            raise InputError(f"case '{case.name}': {exc}") from None
        organs = np.where(classes.array == BODY, 0, classes.array).astype(np.uint8)
        write_volume(Volume(organs, ct.affine), paths.label(case.name), overwrite=True)
        if paths.real_image(case) != case.ct:
            paths.converted.mkdir(parents=True, exist_ok=True)
            write_volume(_compact(ct), paths.real_image(case), overwrite=True)


def _compact(ct: Volume) -> Volume:
    """int16 when every voxel is a whole number in int16's range (CT in HU), else float32 as read."""
    values = ct.array
    if np.all(np.round(values) == values) and values.min(initial=0) >= -32768 and values.max(initial=0) <= 32767:
        return Volume(values.astype(np.int16), ct.affine)
    return ct


def link(source: Path, target: Path) -> str:
    """Put ``source`` at ``target`` as a hard link, else a symbolic link, else a copy; returns which."""
    try:
        os.link(source, target)
        return "hardlink"
    except OSError:
        pass
    try:
        os.symlink(source.resolve(), target)
        return "symlink"
    except OSError:
        shutil.copy2(source, target)
        logger.warning("%s copied to %s: this file system allows neither hard nor symbolic links", source, target)
        return "copy"


@dataclass(frozen=True)
class Entry:
    """One training case of a dataset: its nnU-Net identifier, image and label file, and for a synthetic CT the seed
    it was sampled with."""

    identifier: str
    image: Path
    label: Path
    seed: int | None = None


def dataset_entries(cases: Cases, samples: Sequence[Job], paths: StudyPaths) -> dict[str, list[Entry]]:
    """The training cases of each kind of dataset; InputError when a real case's name is a sample's name."""
    real = [Entry(c.name, paths.real_image(c), paths.label(c.name)) for c in cases.train]
    synthetic = [Entry(f"{j.case}_s{j.sample}", j.image, paths.label(j.case), j.seed) for j in samples]
    clash = sorted({e.identifier for e in real} & {e.identifier for e in synthetic})
    if clash:
        raise InputError(f"real case '{clash[0]}' has the name of a synthetic sample (<case>_s<k>); rename it")
    return {"real": real, "real+synthetic": real + synthetic, "synthetic": synthetic}


def build_datasets(entries: dict[str, list[Entry]], test: Sequence[Case], paths: StudyPaths, dataset_id: int,
                   provenance: dict[str, Any]) -> dict[str, str]:
    """Write the three raw datasets and the test images folder (each replaced as a whole); returns
    ``{kind: dataset name}``. ``provenance`` (model, sampling) and the seeds go into the dataset.json of the datasets
    that hold synthetic CTs."""
    names = {}
    for kind in KINDS:
        name = names[kind] = dataset_name(dataset_id, kind)
        with atomic_folder(paths.raw / name) as folder:
            for sub in ("imagesTr", "labelsTr"):
                (folder / sub).mkdir()
            methods = {link(e.image, folder / "imagesTr" / f"{e.identifier}_0000{NIFTI}") for e in entries[kind]}
            for e in entries[kind]:
                link(e.label, folder / "labelsTr" / f"{e.identifier}{NIFTI}")
            seeds = {e.identifier: e.seed for e in entries[kind] if e.seed is not None}
            record = {"kind": kind, "real_cases": len(entries[kind]) - len(seeds), "synthetic_cases": len(seeds),
                      "images_linked_as": sorted(methods)}
            if seeds:
                record.update(provenance, seeds=seeds)
            write_bytes(folder / "dataset.json", _dataset_json(name, kind, len(entries[kind]), record), overwrite=True)
    with atomic_folder(paths.test_images) as folder:
        for case in test:
            link(paths.real_image(case), folder / f"{case.name}_0000{NIFTI}")
    return names


def _dataset_json(name: str, kind: str, cases: int, record: dict[str, Any]) -> bytes:
    description = {"real": "real CTs only",
                   "real+synthetic": "real CTs and synthetic CTs (SYNTHETIC, not patient images) from the same "
                                     "label maps",
                   "synthetic": "synthetic CTs only (SYNTHETIC, not patient images)"}[kind]
    dataset = nnunet_dataset(name, f"CTSemanticSynth downstream study: {description}", ORGAN_LABELS, cases,
                             ctsynth=record)
    return (json.dumps(dataset, indent=2) + "\n").encode()
