"""Build a slice cache for training: windowed CT slices + model-class label slices, memory-mappable.

    python -m training.prepare --amos /data/amos22 --out cache/amos256
    python -m training.prepare --images cts/ --labels segs/ --convention totalseg --holdout-every 8 --out cache/demo
    python -m training.prepare ... --class-set anatomy --intensity full_range --out cache/anatomy96

``--class-set`` picks the classes (``paper``: 15 AMOS organs + body; ``anatomy``: also bones, lungs, bowel,
muscles, ...), ``--intensity`` the HU mapping (``paper_window``: L40/W400; ``full_range``: -1024..2000 HU companded).
Each case becomes ``OUT/cases/<id>/{images.npy (float16, [0,1]), classes.npy (uint8)}`` of shape (N, S, S),
written atomically, so an interrupted run resumes where it stopped. ``OUT/manifest.csv`` lists every slice
(case, slice index, split, source spacing) and ``OUT/cache.json`` the settings. Bad cases (unreadable, grid
mismatch, no organ) are reported and skipped.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from CTSemanticSynthLib import __version__
from CTSemanticSynthLib.errors import CTSynthError, InputError
from CTSemanticSynthLib.io import atomic_folder, atomic_outputs, read_ct, read_labelmap, write_bytes
from CTSemanticSynthLib.intensity import MAPPINGS, named_mapping
from CTSemanticSynthLib.labels import CLASS_SETS, class_set, check_convention, resolve_adapter
from CTSemanticSynthLib.parsing import OneLineParser
from CTSemanticSynthLib.preprocess import (AxialOrientation, PlaneResize, add_body_class, body_mask_from_ct,
                                          hu_to_model)
from CTSemanticSynthLib.progress import ProgressDisplay

from .dataset import RESIZED_IN, cache_resized_in

logger = logging.getLogger("training.prepare")
AMOS_MAX_CT_ID = 500
NIFTI = re.compile(r"(.+?)\.nii(\.gz)?$")


@dataclass(frozen=True)
class Case:
    """One CT/label pair and the split its slices go to ("train", "test", or "holdout" per slice)."""

    case_id: str
    image: Path
    labels: Path
    split: str


def amos_cases(root: Path) -> list[Case]:
    """AMOS22 CT cases (ids <= 500): training -> train, validation -> test, as in the paper."""
    meta = root / "dataset.json"
    if not meta.is_file():
        raise InputError(f"{root} is not an AMOS22 folder: dataset.json is missing")
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{meta} is not valid JSON ({exc})") from None
    cases = []
    for key, split in (("training", "train"), ("validation", "test")):
        for entry in data.get(key, []):
            image, labels = root / entry["image"], root / entry["label"]
            match = re.search(r"(\d+)", image.name)
            if match is None or int(match.group(1)) > AMOS_MAX_CT_ID:
                continue  # MRI cases (ids > 500) are not CT
            cases.append(Case(NIFTI.match(image.name).group(1) if NIFTI.match(image.name) else image.stem,
                              image, labels, split))
    if not cases:
        raise InputError(f"{meta} lists no CT cases (AMOS ids <= {AMOS_MAX_CT_ID}) under training/validation")
    return cases


def paired_cases(images: Path, labels: Path, split: str) -> list[Case]:
    """CT/label NIfTI pairs matched by file name."""
    for folder in (images, labels):
        if not folder.is_dir():
            raise InputError(f"{folder} is not a folder")
    cases = []
    for image in sorted(images.iterdir()):
        match = NIFTI.match(image.name)
        if match is None:
            continue
        label = labels / image.name
        if not label.exists():
            logger.warning("skipping %s: no label file %s", image.name, label)
            continue
        cases.append(Case(match.group(1), image, label, split))
    if not cases:
        raise InputError(f"no CT/label NIfTI pairs with matching names in {images} and {labels}")
    return cases


def prepare_case(case: Case, out: Path, size: int, convention: str, classes: str = "paper",
                 intensity: str = "paper_window") -> dict:
    """Map the labels to ``classes``, add the body class, reorient, resize (the CT in HU) and map the HU to [0, 1]
    (``intensity``) for one case; write its arrays atomically."""
    ct = read_ct(case.image, f"CT {case.image}")
    seg, names = read_labelmap(case.labels)
    if not ct.same_grid(seg, atol=1e-3):
        raise InputError(f"label map {case.labels} is not on the grid of CT {case.image}")
    mapped, report = resolve_adapter(convention, seg.array, names, class_set(classes)).classes(seg.array)
    if not report.organs_present:
        raise InputError(f"{case.labels.name} holds no structure of the '{classes}' classes with the '{convention}' "
                         "convention")
    orientation = AxialOrientation.from_affine(ct.affine)
    hu = orientation.to_stack(ct.array)
    cls = add_body_class(orientation.to_stack(mapped), body_mask_from_ct(hu))
    resize = PlaneResize(hu.shape[1], hu.shape[2], size)
    mapping = named_mapping(intensity)
    low_hu = hu_to_model(resize, torch.from_numpy(hu.astype(np.float32)), mapping.hu_range).numpy()
    images = mapping.to_unit(low_hu).astype(np.float16)
    small = resize.to_model(torch.from_numpy(cls.astype(np.int64)), labels=True).numpy().astype(np.uint8)
    with atomic_folder(out / "cases" / case.case_id) as tmp:
        np.save(tmp / "images.npy", images)
        np.save(tmp / "classes.npy", small)
        spacing = [ct.spacing[a] for a in orientation.axes]
        info = {"case": case.case_id, "split": case.split, "slices": len(images), "spacing": spacing,
                "unknown_labels": {str(k): v for k, v in report.unknown.items()}}
        (tmp / "case.json").write_text(json.dumps(info))
    return info


def is_holdout(index: int, every: int) -> bool:
    """Whether axial slice ``index`` is held out when every ``every``-th slice is (0 = none)."""
    return every > 0 and index % every == every // 2


def write_manifest(out: Path, infos: list[dict], holdout_every: int) -> int:
    """manifest.csv with one row per slice; with ``holdout_every`` k, every k-th slice of each case is 'test'."""
    rows = 0
    with atomic_outputs(out / "manifest.csv", overwrite=True) as (tmp,), open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case", "slice", "split", "spacing_slice", "spacing_row", "spacing_col"])
        for info in sorted(infos, key=lambda i: i["case"]):
            for index in range(info["slices"]):
                split = info["split"]
                if is_holdout(index, holdout_every):
                    split = "test"
                writer.writerow([info["case"], index, split, *info["spacing"]])
                rows += 1
    return rows


def prepare(cases: list[Case], out: Path, *, size: int, convention: str, workers: int, holdout_every: int,
            classes: str = "paper", intensity: str = "paper_window") -> dict:
    """Prepare every case not already in the cache (in parallel); returns the cache summary."""
    previous = out / "cache.json"
    mapping = named_mapping(intensity)
    if previous.is_file():
        settings = json.loads(previous.read_text(encoding="utf-8"))
        settings["resized_in"] = cache_resized_in(settings)
        settings.setdefault("class_set", "paper")  # caches from before class sets and mappings
        settings.setdefault("intensity", {"name": "paper_window"})
        settings["intensity"] = settings["intensity"]["name"]
        for key, value in (("image_size", size), ("label_convention", convention), ("class_set", classes),
                           ("intensity", intensity), ("resized_in", RESIZED_IN)):
            if settings.get(key) != value:
                raise InputError(f"{out} was prepared with {key} {settings.get(key)!r}, not {value!r}: "
                                 "use another --out (or delete it to start over)")
    try:
        (out / "cases").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the slice cache {out}: {exc.strerror}; choose another --out") from None
    done, todo = [], []
    for case in cases:
        info_path = out / "cases" / case.case_id / "case.json"
        (done.append(json.loads(info_path.read_text(encoding="utf-8"))) if info_path.is_file() else todo.append(case))
    failed: dict[str, str] = {}
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool, \
            ProgressDisplay("prepare:", "preparing", "case", total=len(cases), done=len(done)) as display:
        futures = {pool.submit(prepare_case, case, out, size, convention, classes, intensity): case for case in todo}
        for future in as_completed(futures):
            case = futures[future]
            try:
                done.append(future.result())
            except CTSynthError as exc:
                failed[case.case_id] = str(exc)
                display.write(f"prepare: skipped {case.case_id}: {exc}")
            display.update(len(done) + len(failed))
    slices = write_manifest(out, done, holdout_every)
    summary = {"format": "ctsynth-slice-cache", "library_version": __version__, "image_size": size,
               "resized_in": RESIZED_IN, "intensity": mapping.config(), "class_set": classes,
               "classes": list(class_set(classes).classes),
               "label_convention": convention, "holdout_every": holdout_every, "cases": len(done),
               "slices": slices, "skipped": failed}
    write_bytes(out / "cache.json", (json.dumps(summary, indent=2) + "\n").encode(), overwrite=True)
    return summary


SPLITS = ("train", "test")


def check_options(args: argparse.Namespace) -> None:
    """InputError naming the first flag that cannot work; run before any file is read or folder made."""
    for flag, value, low in (("--size", args.size, 8), ("--workers", args.workers, 1),
                             ("--holdout-every", args.holdout_every, 0)):
        if value < low:
            raise InputError(f"{flag} {value} must be at least {low}")
    if args.split not in SPLITS:
        raise InputError(f"--split {args.split!r} is not one of {', '.join(SPLITS)}")
    if args.images is not None and args.labels is None:
        raise InputError("--images needs --labels")
    if args.class_set not in CLASS_SETS:
        raise InputError(f"--class-set {args.class_set!r} is not one of {', '.join(CLASS_SETS)}")
    if args.intensity not in MAPPINGS:
        raise InputError(f"--intensity {args.intensity!r} is not one of {', '.join(MAPPINGS)}")
    check_convention(args.convention, class_set(args.class_set))
    existing = next(p for p in (args.out, *args.out.parents) if p.exists())
    if not existing.is_dir():
        raise InputError(f"--out {args.out}: {existing} is a file; give a folder for the slice cache")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--amos", type=Path, help="AMOS22 folder (dataset.json, imagesTr/, labelsTr/, ...)")
    source.add_argument("--images", type=Path, help="folder of CT NIfTI files (with --labels)")
    parser.add_argument("--labels", type=Path, help="folder of label NIfTI files named like the CTs")
    parser.add_argument("--convention", default="amos", help="label convention of the labels (default amos)")
    parser.add_argument("--class-set", default="paper",
                        help=f"model classes: {' or '.join(CLASS_SETS)} (default paper, the paper's 17)")
    parser.add_argument("--intensity", default="paper_window",
                        help=f"HU mapping: {' or '.join(MAPPINGS)} (default paper_window, L40/W400)")
    parser.add_argument("--split", default="train", help=f"split for --images cases: {' or '.join(SPLITS)} "
                        "(default train)")
    parser.add_argument("--holdout-every", type=int, default=0,
                        help="put every k-th slice of each case in 'test' (single-patient demo); 0 = off")
    parser.add_argument("--size", type=int, default=256, help="slice size (default 256, the paper's; at least 8)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, required=True, help="cache folder (resumed when it exists)")
    logging.basicConfig(level=logging.WARNING, format="prepare: %(message)s")
    try:
        args = parser.parse_args(argv)
        check_options(args)
        cases = amos_cases(args.amos) if args.amos is not None else paired_cases(args.images, args.labels, args.split)
        summary = prepare(cases, args.out, size=args.size, convention=args.convention, workers=args.workers,
                          holdout_every=args.holdout_every, classes=args.class_set, intensity=args.intensity)
        if not summary["cases"]:
            raise InputError(f"all {len(summary['skipped'])} cases were skipped (reasons above): nothing to train on")
    except CTSynthError as exc:
        print(f"prepare: error: {exc}", file=sys.stderr)
        return 2
    print(f"prepare: {summary['cases']} cases, {summary['slices']} slices in {args.out}"
          + (f"; skipped {len(summary['skipped'])}" if summary["skipped"] else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
