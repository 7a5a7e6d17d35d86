"""The options ``synth`` and ``batch`` share, their checks, and the notes every command prints."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError
from ..parsing import boolean

if TYPE_CHECKING:
    import torch

    from ..checkpoint import LoadedModel
    from ..labels import ClassSet
    from ..synthesis import SamplingOptions


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """The labelling, model and sampling options shared by ``synth`` and ``batch`` (checked by
    :func:`sampling_setup`)."""
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
    parser.add_argument("--boundary-correction", type=boolean, default=None, metavar="true|false",
                        help="restore the class boundaries that the model's coarser slice grid blurs (thin bones, "
                             "small organs, lung and bowel walls), from the segmentation (default: the preset's; "
                             "see docs/anatomy.md)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs (and their .json)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress display")


def add_region_options(parser: argparse.ArgumentParser) -> None:
    """Options that regenerate only a region of a kept CT (checked by :func:`check_region_options`)."""
    from ..regenerate import DEFAULT_JUMP_N_SAMPLE, REGION_MARGIN_MM

    group = parser.add_argument_group(
        "region regeneration", "keep a CT and resample only an edited region; outside it the output has the kept "
        "CT's values (see docs/regenerate.md)")
    group.add_argument("--keep-ct", type=Path, default=None, metavar="CT",
                       help="the CT to keep outside the region (a synthetic CT or a real CT on the segmentation's "
                            "grid; the same voxels in another axis order, or a larger grid holding them, are "
                            "reordered or cropped; another grid is refused)")
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


def check_region_options(args: argparse.Namespace, classes: ClassSet) -> None:
    """One-line errors for region options that do not go together (before any file is read); a --previous-labels
    mapping file names classes of ``classes``, the model's set."""
    from ..labels import check_convention

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
        check_convention(args.previous_labels, classes)


def sampling_setup(args: argparse.Namespace) -> tuple[torch.device, Path, SamplingOptions]:
    """(device, model folder, sampling options with the precision resolved for the device) from
    :func:`add_sampling_options`'s options, all checked before any volume or weight is read."""
    from ..checkpoint import read_config, resolve_model_path
    from ..device import select_device, select_precision
    from ..labels import check_convention, class_set
    from ..synthesis import preset_options

    device = select_device(args.device)
    model_folder = resolve_model_path(args.model)
    config = read_config(model_folder)
    options = preset_options(config, args.preset, sampler=args.sampler, steps=args.steps,
                             seed=args.seed, batch_size=args.batch_size, slice_correlation=args.slice_correlation,
                             guidance=args.guidance, slice_agreement=args.slice_agreement,
                             compile=args.compile, precision=select_precision(args.precision, device),
                             boundary_correction=args.boundary_correction)
    check_convention(args.labels, class_set(config.get("class_set", "paper")))
    return device, model_folder, options


def _batch_size(text: str) -> int | str:
    """``--batch-size``: 'auto' or a whole number (checked against 1 by preset_options)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is neither a whole number nor auto") from None


def note(message: str) -> None:
    """A ``ctsynth: note:`` line on stderr."""
    print(f"ctsynth: note: {message}", file=sys.stderr)


def sampling_summary(model: LoadedModel, options: SamplingOptions) -> str:
    """'ddim 25 steps', or 'one pass' for a one-pass generator (with a note that the sampler options are ignored)."""
    if model.kind == "generator":
        note(f"{model.name} is a one-pass {model.conditioning} generator: --preset, --sampler, --steps, "
             "--slice-correlation and --slice-agreement are ignored")
        return "one pass"
    return f"{options.sampler} {options.steps} steps"
