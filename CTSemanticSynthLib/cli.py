"""The ``ctsynth`` command: synthesize a CT from a segmentation, inspect models, list classes."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from . import __version__
from .errors import CTSynthError, InputError
from .provenance import sidecar_path

if TYPE_CHECKING:
    import torch

    from .batch import JobResult
    from .checkpoint import LoadedModel
    from .io import Volume
    from .synthesis import SamplingOptions

EXAMPLES = """\
examples:
  ctsynth synth --seg amos_0001_labels.nii.gz --labels amos --out amos_0001_synthetic.nii.gz
  ctsynth synth --seg totalseg_output.nii.gz --labels totalseg --out syn.nii.gz --preset balanced --seed 7
  ctsynth synth --seg case.seg.nrrd --out syn.nrrd --model ~/models/mask_guided_150k --device cuda
  ctsynth synth --seg edited.nii.gz --keep-ct syn.nii.gz --previous-seg case.nii.gz --out syn_edited.nii.gz
  ctsynth info demo

The segmentation must hold the abdominal organs (AMOS22 ids 1-15, TotalSegmentator ids, Slicer segment names,
or any ids with a JSON mapping file). The synthetic CT is written on the segmentation's exact grid, in HU,
with a .json provenance file beside it. Nothing is overwritten without --overwrite.
"""

BATCH_EXAMPLES = """\
examples:
  ctsynth batch --segs labels/ --out synthetic/ --samples 3 --labels amos --seed 1
  ctsynth batch --segs cases.txt --out $nnUNet_raw --nnunet Dataset501_SynthCT --samples 2 --device cuda
  torchrun --nproc_per_node 4 -m CTSemanticSynthLib.cli batch --segs labels/ --out synthetic/ --samples 4

Job (case, k) uses a seed derived from (--seed, case name, k), so any job re-run alone gives the same CT. Finished
jobs (complete files whose .json records the same model, options and seed) are skipped: run the same command
again to continue a stopped batch. manifest.csv lists every job (case, sample, seed, output, model sha256,
seconds, status, error). A failing case is recorded and the batch goes on; the exit code is 1 if any failed.
Under torchrun job i runs on rank i mod world size, each rank on its own GPU.
"""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors raise InputError, so the caller prints them as one ``error:`` line (exit 2)."""

    def error(self, message: str) -> NoReturn:
        raise InputError(f"{message} (see '{self.prog} --help')")


def _build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="ctsynth",
        description="Turn an abdominal CT segmentation into a synthetic CT with a conditional diffusion model.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ctsynth {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details (label detection, timings)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
                       help="the real CT, shown beside the synthetic one in --preview; on another grid it is "
                            "reordered or resampled (linear) onto the segmentation's")
    synth.add_argument("--progress-lines", action="store_true",
                       help="instead of a bar, print 'PROGRESS <slices done> <total>' lines on stdout (for Slicer)")
    add_region_options(synth)

    batch = sub.add_parser("batch", help="synthesize several CTs for each of many segmentations (resumable; "
                           "nnU-Net export; torchrun for several devices)", epilog=BATCH_EXAMPLES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    batch.add_argument("--segs", required=True, type=Path, metavar="DIR|LIST.txt",
                       help="a folder of label maps, or a text file with one label map path a line")
    batch.add_argument("--out", required=True, type=Path, metavar="DIR",
                       help="output folder (created): <case>_s<k>.nii.gz with .json sidecars, and manifest.csv")
    batch.add_argument("--samples", type=int, default=1, metavar="N", help="synthetic CTs per case (default 1)")
    batch.add_argument("--nnunet", default=None, metavar="DatasetNNN_Name",
                       help="write an nnU-Net v2 raw dataset DIR/DatasetNNN_Name (imagesTr, labelsTr with the model "
                            "classes, dataset.json)")
    batch.add_argument("--nnunet-labels", choices=("model", "original"), default="model",
                       help="labelsTr holds the model classes (default: 0 background, 1-15 organs, 16 body) or the "
                            "input's own label values, numbered 1..N in value order (named after .seg.nrrd segments)")
    batch.add_argument("--variance", action="store_true",
                       help="with --samples 2 or more: also write <case>_std.nii.gz, the per-voxel std in HU")
    add_sampling_options(batch)

    info = sub.add_parser("info", help="show a model's config, classes and sha256")
    info.add_argument("model", nargs="?", default=None, metavar="DIR|NAME", help="model folder or name (default: demo)")
    info.add_argument("--json", action="store_true", help="print the full config.json")

    sub.add_parser("classes", help="list the model classes and the accepted label conventions")

    from .evaluate_cli import add_arguments as add_evaluate_arguments

    add_evaluate_arguments(sub.add_parser("evaluate", help="score a synthetic CT: HU per organ, PSNR/SSIM, "
                                          "TotalSegmentator Dice (--totalseg), FID per plane (--fid)"))
    return parser


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """The labelling, model and sampling options shared by ``synth`` and ``batch`` (checked by
    :func:`_sampling_setup`)."""
    parser.add_argument("--model", default=None, metavar="DIR|NAME",
                        help="model folder or name (default: the bundled 'demo' model)")
    parser.add_argument("--labels", default="auto", metavar="CONVENTION",
                        help="label convention: auto (default), amos, totalseg (v2 ids), totalseg_v1, or FILE.json "
                             "mapping {value or name: class}; auto refuses ids 5-15 without higher ids, which mean "
                             "different organs in AMOS and TotalSegmentator (see 'ctsynth classes')")
    parser.add_argument("--preset", default="fast", metavar="NAME",
                        help="sampler preset: fast (default), balanced, paper (1000 ancestral steps, GPU)")
    parser.add_argument("--sampler", choices=("ddim", "ancestral", "dpmsolver++"), default=None,
                        help="override the preset's sampler (dpmsolver++: DPM-Solver++(2M), deterministic)")
    parser.add_argument("--steps", type=int, default=None, metavar="N", help="override the preset's number of steps")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    parser.add_argument("--device", default="auto", metavar="DEV", help="auto (default), cpu, cuda, cuda:N or mps")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                        help="network arithmetic: auto (default: bf16 on CUDA and on CPUs with AMX/AVX512-BF16, "
                             "else fp32), fp32, bf16 or fp16 (autocast)")
    parser.add_argument("--batch-size", type=_batch_size, default="auto", metavar="B|auto",
                        help="slices the network evaluates together: auto (default: on CUDA as many as fit the free "
                             "memory, measured; elsewhere 8) or a number; out of memory halves it and retries")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the network (for CUDA: on a CPU the first step compiles for minutes and "
                             "later steps are not faster; needs a C++ compiler, see docs/benchmarks.md)")
    parser.add_argument("--slice-correlation", type=float, default=None, metavar="RHO",
                        help="share this fraction (0..1) of the noise with the neighbouring slices, for volumes "
                             "that agree from slice to slice (default 0; see docs/consistency.md)")
    parser.add_argument("--guidance", type=float, default=None, metavar="S",
                        help="classifier-free guidance scale s (models trained with label dropout, e.g. SDM; default: "
                             "the model's; 0: plain conditional; each step then evaluates the network twice)")
    parser.add_argument("--slice-agreement", type=float, default=None, metavar="W",
                        help="blend every step's prediction with the neighbouring slices' where their labels agree, "
                             "with this strength (0..1; default: the preset's, see docs/consistency.md)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs (and their .json)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress display")


def add_region_options(parser: argparse.ArgumentParser) -> None:
    """Options that regenerate only a region of a kept CT (checked by :func:`_region_checks`)."""
    from .regenerate import DEFAULT_JUMP_N_SAMPLE, REGION_MARGIN_MM

    group = parser.add_argument_group(
        "region regeneration", "keep a CT and resample only an edited region; outside it the output has the kept "
        "CT's values (see docs/regenerate.md)")
    group.add_argument("--keep-ct", type=Path, default=None, metavar="CT",
                       help="the CT to keep outside the region (a synthetic CT or a real CT on the segmentation's "
                            "grid; the same voxels in another axis order are reordered, another grid is refused)")
    group.add_argument("--previous-seg", type=Path, default=None, metavar="OLD_SEG",
                       help="the segmentation before the edit: the region is where its organ classes differ from "
                            "--seg's, grown by --region-margin")
    group.add_argument("--previous-labels", default=None, metavar="CONVENTION",
                       help="label convention of --previous-seg (default: --labels)")
    group.add_argument("--region", type=Path, default=None, metavar="MASK",
                       help="instead of --previous-seg: regenerate the nonzero voxels of this mask")
    group.add_argument("--region-margin", type=float, default=None, metavar="MM",
                       help=f"grow the changed voxels by this distance in mm (default {REGION_MARGIN_MM:g})")
    group.add_argument("--jump-length", type=int, default=None, metavar="N",
                       help="RePaint: steps to jump back (default: 4%% of the steps, at least 1)")
    group.add_argument("--jump-n-sample", type=int, default=None, metavar="R",
                       help=f"RePaint: times each stretch is sampled (default {DEFAULT_JUMP_N_SAMPLE}; 1: no jumps)")


def _region_checks(args: argparse.Namespace) -> None:
    """One-line errors for region options that do not go together (before any file is read)."""
    from .labels import check_convention

    if args.keep_ct is None:
        given = [o for o, v in (("--previous-seg", args.previous_seg), ("--region", args.region),
                                ("--previous-labels", args.previous_labels), ("--region-margin", args.region_margin),
                                ("--jump-length", args.jump_length), ("--jump-n-sample", args.jump_n_sample))
                 if v is not None]
        if given:
            raise InputError(f"{given[0]} needs --keep-ct (the CT to keep outside the region)")
        return
    if (args.previous_seg is None) == (args.region is None):
        raise InputError("--keep-ct needs exactly one of --previous-seg (regenerate what changed) or --region MASK")
    if args.previous_seg is None and (args.region_margin is not None or args.previous_labels is not None):
        raise InputError(f"{'--region-margin' if args.region_margin is not None else '--previous-labels'} needs "
                         "--previous-seg")
    if args.region_margin is not None and not 0 <= args.region_margin <= 1000:
        raise InputError(f"--region-margin {args.region_margin} is out of range: use 0..1000 mm")
    for option, value in (("--jump-length", args.jump_length), ("--jump-n-sample", args.jump_n_sample)):
        if value is not None and value < 1:
            raise InputError(f"{option} {value} must be at least 1")
    if args.previous_labels is not None:
        check_convention(args.previous_labels)


def _region(args: argparse.Namespace, seg: Volume, names: dict[int, str]) -> tuple[Volume, Volume, dict[str, Any]]:
    """(kept CT, region mask, the provenance of both) on ``seg``'s grid, from the region options."""
    import numpy as np

    from .grid import onto_grid
    from .io import Volume, read_image, read_labelmap
    from .regenerate import REGION_MARGIN_MM, changed_region, organ_classes

    keep = onto_grid(read_image(args.keep_ct), seg, "image", f"--keep-ct {args.keep_ct}", _note, resample=False)
    record: dict[str, Any] = {"keep_ct": str(args.keep_ct), "keep_sha256": _input_digest(args.keep_ct)}
    if args.region is not None:
        mask = onto_grid(read_labelmap(args.region)[0], seg, "mask", f"--region {args.region}", _note, resample=False)
        if not mask.array.any():
            raise InputError(f"--region {args.region} is empty (no nonzero voxel): nothing to regenerate")
        record["region_mask"] = str(args.region)
        return keep, Volume((mask.array != 0).astype(np.uint8), seg.affine), record
    previous, previous_names = read_labelmap(args.previous_seg)
    previous = onto_grid(previous, seg, "mask", f"--previous-seg {args.previous_seg}", _note, resample=False)
    margin = REGION_MARGIN_MM if args.region_margin is None else args.region_margin
    labels = args.labels if args.previous_labels is None else args.previous_labels
    changed = changed_region(organ_classes(previous, previous_names, labels), organ_classes(seg, names, args.labels),
                             seg.spacing, margin)
    record.update(previous_segmentation=str(args.previous_seg), margin_mm=margin)
    return keep, Volume(changed.astype(np.uint8), seg.affine), record


def _input_digest(path: Path) -> str:
    """sha256 of a file; of a DICOM folder, sha256 of its files' names and digests in name order."""
    import hashlib

    from .paths import file_digest

    if not path.is_dir():
        return file_digest(path)
    lines = "".join(f"{p.name}:{file_digest(p)}\n" for p in sorted(path.iterdir()) if p.is_file())
    return hashlib.sha256(lines.encode()).hexdigest()


def _sampling_setup(args: argparse.Namespace) -> tuple[torch.device, str, Path, SamplingOptions]:
    """(device, precision, model folder, sampling options) from :func:`add_sampling_options`'s options, all checked
    before
    any volume or weight is read."""
    from .checkpoint import read_config, resolve_model_path
    from .device import select_device, select_precision
    from .labels import check_convention
    from .synthesis import preset_options

    device = select_device(args.device)
    precision = select_precision(args.precision, device)
    model_folder = resolve_model_path(args.model)
    options = preset_options(read_config(model_folder), args.preset, sampler=args.sampler, steps=args.steps,
                             seed=args.seed, batch_size=args.batch_size, slice_correlation=args.slice_correlation,
                             guidance=args.guidance, slice_agreement=args.slice_agreement,
                             compile=args.compile)
    check_convention(args.labels)
    return device, precision, model_folder, options


def _batch_size(text: str) -> int | str:
    """``--batch-size``: 'auto' or a whole number (checked against 1 by preset_options)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is neither a whole number nor auto") from None


def _note(message: str) -> None:
    print(f"ctsynth: note: {message}", file=sys.stderr)


PROGRESS_LINE_PERCENT = 5
"""When stderr is not a terminal (a log file, a pipe), progress is one line per this many percent."""


@contextlib.contextmanager
def _progress(quiet: bool) -> Iterator[Callable[[float, int], None]]:
    """A progress display for (slices done, total): a tqdm bar on a terminal, else a line every few percent."""
    if quiet:
        yield lambda done, total: None
    elif sys.stderr.isatty():
        from tqdm import tqdm

        with tqdm(total=None, unit="slice", desc="synthesizing", bar_format="{desc}: {percentage:3.0f}%|{bar}| "
                  "{n:.1f}/{total} slices [{elapsed}<{remaining}]") as bar:

            def update(done: float, total: int) -> None:
                bar.total, bar.n = total, done
                bar.refresh()

            yield update
    else:
        shown = [-1]

        def line(done: float, total: int) -> None:
            percent = int(100 * done / max(total, 1)) // PROGRESS_LINE_PERCENT * PROGRESS_LINE_PERCENT
            if percent > shown[0]:
                shown[0] = percent
                print(f"ctsynth: synthesizing {percent}% ({done:.0f}/{total} slices)", file=sys.stderr, flush=True)

        yield line


def _synth(args: argparse.Namespace) -> int:
    from .batch import std_header, std_map
    from .checkpoint import load_model, read_config
    from .evaluate_cli import labels_file
    from .grid import onto_grid
    from .io import (WRITE_SUFFIXES, atomic_outputs, check_distinct_paths, check_output_path, read_image,
                     read_labelmap, save_volume)
    from .preview import preview_png
    from .provenance import provenance_header, write_record
    from .diffusion.samplers.repaint import Jumps
    from .regenerate import DEFAULT_JUMP_N_SAMPLE
    from .synthesis import MAX_SEED, prepare_classes, synthesize

    for option, path in (("--out", args.out), ("--variance-map", args.variance_map)):
        if path is not None and not path.name.endswith(WRITE_SUFFIXES):
            raise InputError(f"{option} {path}: use one of {', '.join(WRITE_SUFFIXES)}")
    if args.samples < 1:
        raise InputError(f"--samples {args.samples} must be at least 1")
    if args.variance_map is not None and args.samples < 2:
        raise InputError("--variance-map needs --samples 2 or more")
    # every option is checked before any volume or weight is read
    device, precision, model_folder, options = _sampling_setup(args)
    if args.seed + args.samples - 1 > MAX_SEED:
        raise InputError(f"--seed {args.seed} with --samples {args.samples} goes past the largest seed {MAX_SEED}")
    if args.progress_lines and sys.stdout is None:
        raise InputError("--progress-lines writes to stdout, which is closed")
    _region_checks(args)
    if args.keep_ct is not None and read_config(model_folder).get("kind", "diffusion") != "diffusion":
        raise InputError(f"--keep-ct: the model in {model_folder} is a one-pass generator, which cannot regenerate "
                         "a region (it has no steps to hold the kept CT in); use a diffusion model")
    volumes = [args.out] if args.samples == 1 else [_numbered(args.out, k) for k in range(args.samples)]
    outputs: dict[str, Path | None] = {}
    for k, path in enumerate(volumes):
        which = "" if args.samples == 1 else f" (sample {k})"
        outputs[f"--out{which}"], outputs[f"its sidecar{which}"] = path, sidecar_path(path)
    outputs.update({"--preview": args.preview, "--variance-map": args.variance_map})
    check_distinct_paths(outputs, {"--seg": args.seg, "--labels": labels_file(args.labels), "--body-mask":
                                   args.body_mask, "--reference-ct": args.reference_ct, "--model": model_folder,
                                   "--keep-ct": args.keep_ct, "--previous-seg": args.previous_seg,
                                   "--region": args.region})
    for path in outputs.values():
        if path is not None:
            check_output_path(path, args.overwrite)
    seg, names = read_labelmap(args.seg)
    body = reference = None
    if args.body_mask is not None:
        body = onto_grid(read_labelmap(args.body_mask)[0], seg, "mask", f"--body-mask {args.body_mask}", _note)
    if args.reference_ct is not None:
        reference = onto_grid(read_image(args.reference_ct), seg, "image", f"--reference-ct {args.reference_ct}",
                              _note)
    keep = region = jumps = None
    if args.keep_ct is not None:
        keep, region, region_record = _region(args, seg, names)
        scaled = Jumps.scaled(options.steps, DEFAULT_JUMP_N_SAMPLE)
        jumps = Jumps(args.jump_length or scaled.length, args.jump_n_sample or scaled.n_sample)
    classes, report = prepare_classes(seg, names, args.labels, body)
    if report.unknown:
        print(f"ctsynth: warning: {report.unknown_message()}", file=sys.stderr)
    model = load_model(model_folder, device=device)
    how = _sampling_summary(model, options)
    if not args.quiet:
        print(f"ctsynth: {model.name} ({model.conditioning}, sha256 {model.sha256[:12]}), {how}, "
              f"labels '{report.adapter}', organs: {', '.join(report.organs_present)}, "
              f"device {device} ({precision})", file=sys.stderr)
    results = []
    with _progress(args.quiet or args.progress_lines) as bar:
        for k in range(args.samples):

            def progress(done: float, total: int, k: int = k) -> None:
                done, total = done + k * total, total * args.samples
                if args.progress_lines:
                    print(f"PROGRESS {done:.2f} {total}", flush=True)
                bar(done, total)

            result = synthesize(classes, model, dataclasses.replace(options, seed=args.seed + k), device=device,
                                precision=precision, progress=progress, keep=keep, region=region, jumps=jumps)
            result.provenance["inputs"] = {"segmentation": str(args.seg), "labels": report.adapter,
                                           "unknown_labels": {str(k): v for k, v in report.unknown.items()}}
            if keep is not None:
                result.provenance["region"].update(region_record)
            results.append(result)
    writers: dict[Path, Callable[[Path], None]] = {}
    for path, result in zip(volumes, results):
        writers[path] = functools.partial(save_volume, result.volume, metadata=provenance_header(result.provenance))
        writers[sidecar_path(path)] = functools.partial(write_record, result.provenance)
    if args.preview is not None:
        writers[args.preview] = lambda tmp: tmp.write_bytes(preview_png(classes, results[0].volume, reference))
    if args.variance_map is not None:
        writers[args.variance_map] = functools.partial(save_volume, std_map([r.volume for r in results]),
                                                       metadata=std_header(len(results)))
    with atomic_outputs(*writers, overwrite=args.overwrite) as temps:  # every file, or none
        for write, tmp in zip(writers.values(), temps):
            write(tmp)
    print(f"ctsynth: wrote {', '.join(map(str, writers))}", file=sys.stderr)
    return 0


def _sampling_summary(model: LoadedModel, options: SamplingOptions) -> str:
    """'ddim 25 steps', or 'one pass' for a one-pass generator (with a note that the sampler options are ignored)."""
    if model.kind == "generator":
        _note(f"{model.name} is a one-pass {model.conditioning} generator: --preset, --sampler, --steps and "
              "--slice-correlation are ignored")
        return "one pass"
    return f"{options.sampler} {options.steps} steps"


def _numbered(out: Path, sample: int) -> Path:
    """``syn.nii.gz`` -> ``syn_s<sample>.nii.gz``."""
    from .io import WRITE_SUFFIXES

    suffix = next(s for s in WRITE_SUFFIXES if out.name.endswith(s))
    return out.with_name(f"{out.name[: -len(suffix)]}_s{sample}{suffix}")


def _batch(args: argparse.Namespace) -> int:
    from .batch import (BatchSettings, Layout, list_cases, original_labels, plan_jobs, rank_device, run_batch,
                        shard_from_environment)
    from .checkpoint import load_model
    from .evaluate_cli import labels_file
    from .io import check_distinct_paths

    if args.variance and args.samples < 2:
        raise InputError("--variance needs --samples 2 or more")
    if args.nnunet_labels != "model" and args.nnunet is None:
        raise InputError("--nnunet-labels needs --nnunet")
    device, precision, model_folder, options = _sampling_setup(args)
    layout = Layout(args.out, args.nnunet)
    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out {args.out} is a file; give a folder")
    cases = list_cases(args.segs)
    check_distinct_paths({"--out": args.out}, {"--segs": args.segs, "--labels": labels_file(args.labels),
                                               "--model": model_folder})
    jobs = plan_jobs(cases, args.samples, args.seed, layout)
    shard = shard_from_environment()
    device = rank_device(device, shard)
    model = load_model(model_folder, device=device)
    how = _sampling_summary(model, options) if shard.rank == 0 else ""
    if not args.quiet and shard.rank == 0:
        print(f"ctsynth: {len(cases)} case(s) x {args.samples} sample(s) with {model.name} (sha256 "
              f"{model.sha256[:12]}), {how}, device {device}"
              + (f", {shard.world_size} ranks" if shard.world_size > 1 else ""), file=sys.stderr)
    label_names = original_labels(cases) if args.nnunet_labels == "original" else None
    settings = BatchSettings(layout, args.labels, args.variance, args.overwrite, label_names)
    with _batch_progress(args.quiet, shard.rank) as (on_job, progress):
        results = run_batch(jobs, model, options, settings, device=device, precision=precision, shard=shard,
                            on_job=on_job, progress=progress)
    failed = [r for r in results if r.status == "failed"]
    if shard.rank == 0:
        for r in failed:
            print(f"ctsynth: failed: {r.job.case} sample {r.job.sample}: {r.error}", file=sys.stderr)
        print(f"ctsynth: {len(results) - len(failed)} of {len(results)} job(s) done, {len(failed)} failed; "
              f"manifest {layout.manifest}", file=sys.stderr)
    return 1 if failed else 0


@contextlib.contextmanager
def _batch_progress(quiet: bool, rank: int) -> Iterator[tuple[Callable[[JobResult, int, int], None],
                                                              Callable[[float, int], None]]]:
    """(after each job, within a volume) displays: on a terminal an overall bar (jobs, ETA) over a bar for the
    current volume, else one line per job; only rank 0 shows bars."""
    if quiet:
        yield (lambda result, done, total: None), (lambda done, total: None)
    elif sys.stderr.isatty() and rank == 0:
        from tqdm import tqdm

        with tqdm(unit="CT", desc="batch", position=0) as jobs, tqdm(unit="slice", desc="volume", position=1,
                                                                     leave=False) as volume:

            def job_done(result: JobResult, done: int, total: int) -> None:
                jobs.total, jobs.n = total, done
                jobs.set_postfix_str(f"{result.job.case} s{result.job.sample} {result.status}")

            def update(done: float, total: int) -> None:
                volume.total, volume.n = total, round(done, 1)
                volume.refresh()

            yield job_done, update
    else:
        start = time.monotonic()

        def line(result: JobResult, done: int, total: int) -> None:
            eta = (time.monotonic() - start) / done * (total - done)
            detail = result.error or ("" if result.seconds is None else f"{result.seconds:.1f} s")
            prefix = f"ctsynth: [rank {rank}]" if rank else "ctsynth:"
            print(f"{prefix} {done}/{total} {result.job.case} sample {result.job.sample}: {result.status} ({detail}), "
                  f"ETA {eta:.0f} s", file=sys.stderr, flush=True)

        yield line, (lambda done, total: None)


def _info(args: argparse.Namespace) -> int:
    from .checkpoint import load_model
    from .synthesis import evaluation_flops, model_presets

    model = load_model(args.model)
    if args.json:
        print(json.dumps(model.config, indent=2))
        return 0
    cfg = model.config
    params = sum(p.numel() for p in model.model.parameters())
    net = cfg["model"]
    if model.kind == "generator":
        print(f"model:        {model.name}  ({model.path})\nsha256:       {model.sha256}\n"
              f"network:      one-pass {net['method']} generator, {params / 1e6:.1f} M parameters, "
              f"{net['image_size']}x{net['image_size']}")
        return 0
    architecture = {"unet": "U-Net", "sdm": "SDM U-Net (SPADE decoder)"}[net.get("architecture", "unet")]
    guidance = float(net.get("guidance_scale", 0.0))  # classifier-free guidance: two evaluations per step
    cost = evaluation_flops(model) * (2 if guidance else 1) / 1e9
    lines = [
        f"model:        {model.name}  ({model.path})",
        f"sha256:       {model.sha256}",
        f"conditioning: {net['conditioning']}",
        f"network:      {architecture} {params / 1e6:.1f} M parameters, {net['image_size']}x{net['image_size']}, "
        f"channels {net['model_channels']} x {net['channel_mult']}",
        f"cost:         {cost:.2f} GFLOP per slice per sampling step"
        + (f" (2 evaluations: guidance {guidance:g} by default)" if guidance else ""),
        f"presets:      {'; '.join(_preset_summary(name, preset) for name, preset in model_presets(cfg).items())}",
        f"diffusion:    T={cfg['diffusion']['num_timesteps']} {cfg['diffusion']['schedule']} schedule, "
        f"predicts {cfg['diffusion']['prediction']}, {cfg['diffusion']['loss']} loss",
        f"window:       L{cfg['window']['level']:g} / W{cfg['window']['width']:g}",
        f"classes:      {', '.join(cfg['classes'])}",
    ]
    if "description" in cfg:
        lines.append(f"description:  {cfg['description']}")
    if "training" in cfg:
        lines.append(f"training:     {json.dumps(cfg['training'])}")
    print("\n".join(lines))
    return 0


def _preset_summary(name: str, preset: Mapping[str, Any]) -> str:
    """'fast: ddim 7 steps from t=300, slice agreement 0.3'."""
    text = f"{name}: {preset['sampler']} {preset['steps']} steps"
    if preset.get("start_timestep") is not None:
        text += f" from t={preset['start_timestep']}"
    extras = {"eta": "eta", "slice_correlation": "slice correlation", "slice_agreement": "slice agreement"}
    return ", ".join([text, *(f"{label} {preset[key]:g}" for key, label in extras.items() if preset.get(key))])


def _classes(_: argparse.Namespace) -> int:
    from .labels import AUTO_RULE, DISPLAY_NAMES, LABEL_CHOICES, MODEL_CLASSES

    for index, (name, display) in enumerate(zip(MODEL_CLASSES, DISPLAY_NAMES)):
        print(f"{index:3d}  {name:22s} {display}")
    print(f"label conventions: {', '.join(LABEL_CHOICES)}, or a JSON file {{\"7\": \"liver\", \"Spleen\": \"spleen\"}}")
    print(AUTO_RULE)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluate_cli import run

    print(run(args, progress=lambda message: print(f"ctsynth: {message}", file=sys.stderr)))
    if args.json is not None:
        print(f"ctsynth: wrote {args.json}", file=sys.stderr)
    return 0


class _Diagnostics:
    """stderr that goes quiet, instead of raising, when it is closed or its reader has gone (a closed pipe)."""

    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream if stream is not None else open(os.devnull, "w")

    def _quiet(self) -> None:
        self._stream = open(os.devnull, "w")

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError:
            self._quiet()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError:
            self._quiet()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...
        return getattr(self._stream, name)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for usage and input errors, 130 when interrupted)."""
    stderr, sys.stderr = sys.stderr, _Diagnostics(sys.stderr)
    try:
        return _run(argv)
    finally:
        sys.stderr = stderr


def _run(argv: Sequence[str] | None) -> int:
    try:
        args = _build_parser().parse_args(argv)
    except InputError as exc:
        print(f"ctsynth: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="ctsynth: %(levelname)s: %(message)s")
    handler = {"synth": _synth, "batch": _batch, "info": _info, "classes": _classes,
               "evaluate": _evaluate}[args.command]
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if on_main_thread else None
    try:
        return handler(args)
    except CTSynthError as exc:
        print(f"ctsynth: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        kept = "finished jobs are kept: run the same command to continue" if args.command == "batch" else \
            "nothing was written"
        print(f"ctsynth: interrupted; {kept}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early: fine for `ctsynth info | head`, an error when it is the channel
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if args.command != "synth":
            return 0
        print("ctsynth: error: stdout was closed while progress lines were written to it; nothing was written",
              file=sys.stderr)
        return 2
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM (a cancelled job) ends a run like Ctrl-C: temp files removed, nothing written, exit 130."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
