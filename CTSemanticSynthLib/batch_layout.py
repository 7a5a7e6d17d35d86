"""A batch's jobs and where their files go (a plain folder or an nnU-Net v2 raw dataset), and the listings kept
beside them: manifest.csv and dataset.json."""

from __future__ import annotations

import csv
import io as text_io
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError
from .io import write_bytes
from .labels import PAPER, ClassSet
from .provenance import read_record, sidecar_path

OUTPUT_SUFFIX = ".nii.gz"
MANIFEST_NAME = "manifest.csv"
MANIFEST_COLUMNS = ("case", "sample", "seed", "output", "model_sha256", "seconds", "status", "error")
NNUNET_NAME = re.compile(r"Dataset\d{3}_[A-Za-z0-9_-]+")
DATASET_JSON = "dataset.json"
DATASET_DESCRIPTION = ("Synthetic CTs from CTSemanticSynth (SYNTHETIC, not patient images) with the labels they were "
                       "made from")


@dataclass(frozen=True)
class Layout:
    """Where a batch's files go: plain (``OUT/<case>_s<k>.nii.gz`` + sidecar) or an nnU-Net v2 raw dataset
    (``OUT/DatasetNNN_Name/imagesTr/<case>_s<k>_0000.nii.gz``, ``labelsTr/<case>_s<k>.nii.gz``, sidecars in
    ``provenance/``)."""

    out: Path
    nnunet: str | None = None

    def __post_init__(self) -> None:
        if self.nnunet is not None and not NNUNET_NAME.fullmatch(self.nnunet):
            raise InputError(f"--nnunet {self.nnunet}: use DatasetNNN_Name (three digits, e.g. Dataset501_SynthCT)")

    @property
    def root(self) -> Path:
        """The folder holding the manifest (the dataset folder for nnU-Net)."""
        return self.out if self.nnunet is None else self.out / self.nnunet

    def folders(self) -> list[Path]:
        """Folders to create before writing."""
        if self.nnunet is None:
            return [self.root]
        return [self.root / sub for sub in ("imagesTr", "labelsTr", "provenance")]

    def image(self, case: str, sample: int) -> Path:
        if self.nnunet is None:
            return self.root / f"{case}_s{sample}{OUTPUT_SUFFIX}"
        return self.root / "imagesTr" / f"{case}_s{sample}_0000{OUTPUT_SUFFIX}"

    def label(self, case: str, sample: int) -> Path | None:
        return None if self.nnunet is None else self.root / "labelsTr" / f"{case}_s{sample}{OUTPUT_SUFFIX}"

    def sidecar(self, case: str, sample: int) -> Path:
        if self.nnunet is None:
            return sidecar_path(self.image(case, sample))
        return self.root / "provenance" / f"{case}_s{sample}.json"

    def std_map(self, case: str) -> Path:
        return self.root / f"{case}_std{OUTPUT_SUFFIX}"

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST_NAME


@dataclass(frozen=True)
class Job:
    """Sample ``sample`` of ``case``, with its own seed and output files."""

    index: int
    case: str
    segmentation: Path
    sample: int
    seed: int
    outputs: tuple[Path, ...]  # image, [label,] sidecar

    @property
    def image(self) -> Path:
        return self.outputs[0]


@dataclass
class JobResult:
    """One manifest row."""

    job: Job
    status: str = "pending"  # pending, ok, failed
    seconds: float | None = None
    model_sha256: str = ""
    error: str = ""

    def row(self, root: Path) -> dict[str, str]:
        return {"case": self.job.case, "sample": str(self.job.sample), "seed": str(self.job.seed),
                "output": self.job.image.relative_to(root).as_posix(), "model_sha256": self.model_sha256,
                "seconds": "" if self.seconds is None else f"{self.seconds:.2f}", "status": self.status,
                "error": self.error}


def nnunet_labels(label_names: dict[int, str] | None, classes: ClassSet = PAPER) -> dict[str, int]:
    """dataset.json's ``labels``: the model's classes (``classes``, the set the exported label maps hold: name ->
    class index), or the original values' names numbered 1..N in value order."""
    if label_names is None:
        return {name: value for value, name in enumerate(classes.classes)}
    return {"background": 0, **{label_names[v]: i for i, v in enumerate(sorted(label_names), start=1)}}


def write_manifest(layout: Layout, results: Sequence[JobResult]) -> None:
    """Rewrite ``manifest.csv`` atomically: one row per job."""
    buffer = text_io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(r.row(layout.root) for r in results)
    write_bytes(layout.manifest, buffer.getvalue().encode("utf-8"), overwrite=True)


def write_listings(layout: Layout, results: Sequence[JobResult], labels: dict[str, int]) -> None:
    """The manifest and, for nnU-Net, dataset.json with ``labels`` (:func:`nnunet_labels`)."""
    write_manifest(layout, results)
    if layout.nnunet is not None:
        write_dataset_json(layout, results, labels)


def nnunet_dataset(name: str, description: str, labels: dict[str, int], cases: int,
                   **extra: Any) -> dict[str, Any]:
    """nnU-Net v2's ``dataset.json`` for one CT channel in .nii.gz files; ``extra`` keys follow nnU-Net's."""
    return {"name": name, "description": description, "channel_names": {"0": "CT"}, "labels": labels,
            "numTraining": cases, "file_ending": OUTPUT_SUFFIX, **extra}


def _dataset(layout: Layout, labels: dict[str, int], cases: int) -> dict[str, Any]:
    return nnunet_dataset(str(layout.nnunet), DATASET_DESCRIPTION, labels, cases)


def write_dataset_json(layout: Layout, results: Sequence[JobResult], labels: dict[str, int]) -> None:
    """nnU-Net v2's ``dataset.json``; ``numTraining`` counts the jobs' label files on disk, as nnU-Net does (none
    written while there are none)."""
    cases = sum(os.path.lexists(r.job.outputs[1]) for r in results)
    if cases:
        data = json.dumps(_dataset(layout, labels, cases), indent=2) + "\n"
        write_bytes(layout.root / DATASET_JSON, data.encode(), overwrite=True)


def check_listings(layout: Layout, jobs: Sequence[Job], labels: dict[str, int], overwrite: bool) -> None:
    """InputError when the batch would replace a manifest.csv or a dataset.json it did not write (or one for other
    labels) without ``overwrite``, or when an nnU-Net dataset already holds cases this batch does not make (its
    ``numTraining`` would disagree with its files)."""
    manifest_header = ",".join(MANIFEST_COLUMNS)
    if layout.manifest.is_file() and not overwrite and _first_line(layout.manifest) != manifest_header:
        raise InputError(f"{layout.manifest} exists and was not written by ctsynth batch; choose another --out or "
                         "use --overwrite")
    if layout.nnunet is None:
        return
    dataset = layout.root / DATASET_JSON
    if os.path.lexists(dataset) and not overwrite:
        found, expected = read_record(dataset) or {}, _dataset(layout, labels, 0)
        if any(found.get(key) != expected[key] for key in ("name", "description", "labels")):
            raise InputError(f"{dataset} exists and describes another dataset (another name or label table, or not "
                             "written by ctsynth); choose another --nnunet name or --out, or use --overwrite")
    ours = {path for job in jobs for path in job.outputs}
    for folder in layout.folders()[:2]:  # imagesTr, labelsTr
        others = sorted(p.name for p in folder.glob("*") if p not in ours and not p.name.startswith("."))
        if others:
            raise InputError(f"{folder} holds {len(others)} file(s) this batch does not make (e.g. {others[0]}): "
                             "nnU-Net would train on them too; choose another --nnunet name or --out")


def _first_line(path: Path) -> str:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError):
        return ""
