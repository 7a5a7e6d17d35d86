"""``ctsynth synth``: one segmentation -> one or more synthetic CTs (or a region of a kept CT regenerated)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from ..labels import mapping_file
from ..progress import ProgressDisplay
from ..provenance import sidecar_path
from .options import (add_region_options, add_sampling_options, check_region_options, note, sampling_setup,
                      sampling_summary)

if TYPE_CHECKING:
    from ..io import Volume
    from ..labels import ClassSet

EXAMPLES = """\
examples:
  ctsynth synth --seg amos_0001_labels.nii.gz --labels amos --out amos_0001_synthetic.nii.gz
  ctsynth synth --seg totalseg_output.nii.gz --labels totalseg --out syn.nii.gz --preset balanced --seed 7
  ctsynth synth --seg case.seg.nrrd --out syn_mask_guided.nrrd --model ~/models/mask_guided_150k --device cuda
  ctsynth synth --seg edited.nii.gz --keep-ct syn.nii.gz --previous-seg case.nii.gz --out syn_edited.nii.gz
  ctsynth info demo

The segmentation must hold the abdominal organs (AMOS22 ids 1-15, TotalSegmentator ids, Slicer segment names,
or any ids with a JSON mapping file). The synthetic CT is written on the segmentation's exact grid, in HU,
with a .json provenance file beside it. Nothing is overwritten without --overwrite.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``synth`` subcommand and its options."""
    synth = sub.add_parser("synth", help="synthesize a CT from a segmentation", epilog=EXAMPLES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    synth.add_argument("--seg", required=True, type=Path, metavar="SEG",
                       help="segmentation: .nii/.nii.gz, .nrrd or Slicer .seg.nrrd label map")
    synth.add_argument("--out", required=True, type=Path, metavar="OUT",
                       help="synthetic CT to write (.nii.gz, .nii or .nrrd); OUT's .json sidecar gets the provenance")
    add_sampling_options(synth)
    synth.add_argument("--body-mask", type=Path, default=None, metavar="FILE",
                       help="patient body mask (e.g. TotalSegmentator 'body' task); on another grid it is reordered "
                            "or resampled (nearest) onto the segmentation's; default: estimated from the segmentation")
    synth.add_argument("--samples", type=int, default=1, metavar="N",
                       help="make N synthetic CTs with seeds S..S+N-1, written as OUT with _s0.._s<N-1> before its "
                            "suffix (default 1: OUT itself)")
    synth.add_argument("--variance-map", type=Path, default=None, metavar="STD",
                       help="with --samples 2 or more: also write the per-voxel standard deviation in HU (where the "
                            "model is unsure)")
    synth.add_argument("--preview", type=Path, default=None, metavar="PNG",
                       help="also write a PNG preview (axial, coronal, sagittal: segmentation | synthetic | real CT)")
    synth.add_argument("--reference-ct", type=Path, default=None, metavar="CT",
                       help="the real CT: the body outline is taken from it (as training does; unless "
                            "--body-mask), and --preview shows it beside the synthetic one; on another grid it is "
                            "reordered or resampled (linear) onto the segmentation's")
    synth.add_argument("--progress-lines", action="store_true",
                       help="instead of a bar, print 'PROGRESS <slices done> <total>' lines on stdout (for Slicer)")
    add_region_options(synth)


def run(args: argparse.Namespace) -> int:
    from ..batch import std_header, std_map
    from ..checkpoint import load_model, read_config
    from ..grid import onto_grid
    from ..io import (WRITE_SUFFIXES, atomic_outputs, check_distinct_paths, check_output_path, read_ct,
                     read_labelmap, save_volume)
    from ..preview import preview_png, preview_windows
    from ..provenance import provenance_header, write_record
    from ..labels import class_set
    from ..synthesis import MAX_SEED, prepare_classes, synthesize

    for option, path in (("--out", args.out), ("--variance-map", args.variance_map)):
        if path is not None and not path.name.endswith(WRITE_SUFFIXES):
            raise InputError(f"{option} {path}: use one of {', '.join(WRITE_SUFFIXES)}")
    if args.samples < 1:
        raise InputError(f"--samples {args.samples} must be at least 1")
    if args.variance_map is not None and args.samples < 2:
        raise InputError("--variance-map needs --samples 2 or more")
    # every option is checked before any volume or weight is read
    device, model_folder, options = sampling_setup(args)
    model_classes = class_set(read_config(model_folder).get("class_set", "paper"))
    if args.seed + args.samples - 1 > MAX_SEED:
        raise InputError(f"--seed {args.seed} with --samples {args.samples} goes past the largest seed {MAX_SEED}")
    if args.progress_lines and sys.stdout is None:
        raise InputError("--progress-lines writes to stdout, which is closed")
    check_region_options(args, model_classes)
    if args.keep_ct is not None and read_config(model_folder).get("kind", "diffusion") != "diffusion":
        raise InputError(f"--keep-ct: the model in {model_folder} is a one-pass generator, which cannot regenerate "
                         "a region (it has no steps to hold the kept CT in); use a diffusion model")
    volumes = [args.out] if args.samples == 1 else [_numbered(args.out, k) for k in range(args.samples)]
    outputs: dict[str, Path | None] = {}
    for k, path in enumerate(volumes):
        which = "" if args.samples == 1 else f" (sample {k})"
        outputs[f"--out{which}"], outputs[f"its sidecar{which}"] = path, sidecar_path(path)
    outputs.update({"--preview": args.preview, "--variance-map": args.variance_map})
    check_distinct_paths(outputs, {"--seg": args.seg, "--labels": mapping_file(args.labels), "--body-mask":
                                   args.body_mask, "--reference-ct": args.reference_ct, "--model": model_folder,
                                   "--keep-ct": args.keep_ct, "--previous-seg": args.previous_seg,
                                   "--region": args.region})
    for path in outputs.values():
        if path is not None:
            check_output_path(path, args.overwrite)
    seg, names = read_labelmap(args.seg)
    body = reference = None
    if args.body_mask is not None:
        body = onto_grid(read_labelmap(args.body_mask)[0], seg, "mask", f"--body-mask {args.body_mask}", note)
    if args.reference_ct is not None:
        name = f"--reference-ct {args.reference_ct}"
        reference = onto_grid(read_ct(args.reference_ct, name), seg, "image", name, note)
    keep = region = None
    if args.keep_ct is not None:
        keep, region, region_record = _region(args, seg, names, model_classes)
    classes, report = prepare_classes(seg, names, args.labels, body, reference=reference, classes=model_classes)
    if report.unknown:
        print(f"ctsynth: warning: {report.unknown_message()}", file=sys.stderr)
    if not report.organs_present:
        note(f"{args.seg} holds none of the model's organs (only structures the '{report.adapter}' convention "
             "takes as body tissue): synthesizing body tissue only")
    model = load_model(model_folder, device=device)
    how = sampling_summary(model, options)
    if not args.quiet:
        print(f"ctsynth: {model.name} ({model.conditioning}, sha256 {model.sha256[:12]}), {how}, "
              f"labels '{report.adapter}', organs: {', '.join(report.organs_present) or 'none (body only)'}, "
              f"device {device} ({options.precision})", file=sys.stderr)
    results = []
    with ProgressDisplay("ctsynth:", "synthesizing", "slice", quiet=args.quiet or args.progress_lines) as display:
        for k in range(args.samples):

            def progress(done: float, total: int, k: int = k) -> None:
                done, total = done + k * total, total * args.samples
                if args.progress_lines:
                    print(f"PROGRESS {done:.2f} {total}", flush=True)
                display.update(done, total)

            result = synthesize(classes, model, dataclasses.replace(options, seed=args.seed + k), device=device,
                                progress=progress, keep=keep, region=region, jump_length=args.jump_length,
                                jump_n_sample=args.jump_n_sample)
            result.provenance["inputs"] = {"segmentation": str(args.seg), "labels": report.adapter,
                                           "body_outline": report.body_source,
                                           "unknown_labels": {str(k): v for k, v in report.unknown.items()}}
            if keep is not None:
                result.provenance["region"].update(region_record)
            results.append(result)
    writers: dict[Path, Callable[[Path], None]] = {}
    for path, result in zip(volumes, results):
        writers[path] = functools.partial(save_volume, result.volume, metadata=provenance_header(result.provenance))
        writers[sidecar_path(path)] = functools.partial(write_record, result.provenance)
    if args.preview is not None:
        writers[args.preview] = lambda tmp: tmp.write_bytes(preview_png(
            classes, results[0].volume, reference, class_set=model.class_set,
            windows=preview_windows(not model.intensity.is_window)))
    if args.variance_map is not None:
        writers[args.variance_map] = functools.partial(save_volume, std_map([r.volume for r in results]),
                                                       metadata=std_header(len(results)))
    with atomic_outputs(*writers, overwrite=args.overwrite) as temps:  # every file, or none
        for write, tmp in zip(writers.values(), temps):
            write(tmp)
    print(f"ctsynth: wrote {', '.join(map(str, writers))}", file=sys.stderr)
    return 0


def _numbered(out: Path, sample: int) -> Path:
    """``syn.nii.gz`` -> ``syn_s<sample>.nii.gz``."""
    from ..io import WRITE_SUFFIXES

    suffix = next(s for s in WRITE_SUFFIXES if out.name.endswith(s))
    return out.with_name(f"{out.name[: -len(suffix)]}_s{sample}{suffix}")


def _region(args: argparse.Namespace, seg: Volume, names: dict[int, str],
            classes: ClassSet) -> tuple[Volume, Volume, dict[str, Any]]:
    """(kept CT, region mask, the provenance of both) on ``seg``'s grid, from the region options; what changed is
    judged in ``classes``, the model's class set."""
    import numpy as np

    from ..grid import onto_grid
    from ..io import Volume, read_ct, read_labelmap
    from ..regenerate import REGION_MARGIN_MM, changed_region, organ_classes

    name = f"--keep-ct {args.keep_ct}"
    keep = onto_grid(read_ct(args.keep_ct, name), seg, "image", name, note, resample=False)
    record: dict[str, Any] = {"keep_ct": str(args.keep_ct), "keep_sha256": _input_digest(args.keep_ct)}
    if args.region is not None:
        mask = onto_grid(read_labelmap(args.region)[0], seg, "mask", f"--region {args.region}", note, resample=False)
        if not mask.array.any():
            raise InputError(f"--region {args.region} is empty (no nonzero voxel): nothing to regenerate")
        record["region_mask"] = str(args.region)
        return keep, Volume((mask.array != 0).astype(np.uint8), seg.affine), record
    previous, previous_names = read_labelmap(args.previous_seg)
    previous = onto_grid(previous, seg, "mask", f"--previous-seg {args.previous_seg}", note, resample=False)
    margin = REGION_MARGIN_MM if args.region_margin is None else args.region_margin
    labels = args.labels if args.previous_labels is None else args.previous_labels
    changed = changed_region(organ_classes(previous, previous_names, labels, classes),
                             organ_classes(seg, names, args.labels, classes), seg.spacing, margin)
    record.update(previous_segmentation=str(args.previous_seg), margin_mm=margin)
    return keep, Volume(changed.astype(np.uint8), seg.affine), record


def _input_digest(path: Path) -> str:
    """sha256 of a file; of a DICOM folder, sha256 of its files' names and digests in name order."""
    import hashlib

    from ..paths import file_digest

    if not path.is_dir():
        return file_digest(path)
    lines = "".join(f"{p.name}:{file_digest(p)}\n" for p in sorted(path.iterdir()) if p.is_file())
    return hashlib.sha256(lines.encode()).hexdigest()
