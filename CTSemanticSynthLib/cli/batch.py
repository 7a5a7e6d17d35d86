"""``ctsynth batch``: several synthetic CTs for each of many segmentations (resumable, nnU-Net export, torchrun)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError
from ..labels import mapping_file
from ..progress import ProgressDisplay
from .options import add_sampling_options, sampling_setup, sampling_summary

if TYPE_CHECKING:
    from ..batch import JobResult


BATCH_EXAMPLES = """\
examples:
  ctsynth batch --segs labels/ --out synthetic/ --samples 3 --labels amos --seed 1
  ctsynth batch --segs cases.txt --out $nnUNet_raw --nnunet Dataset501_SynthCT --samples 2 --device cuda
  torchrun --nproc_per_node 4 -m CTSemanticSynthLib.cli batch --segs labels/ --out synthetic/ --samples 4

Job (case, k) uses a seed derived from (--seed, case name, k), so any job re-run alone gives the same CT. Finished
jobs (complete files whose .json records the same input content, label convention, model, options, seed,
precision and device type) are skipped: run the same command again to continue a stopped batch. A file made
otherwise (an edited label map, other options) or not by ctsynth is never replaced without --overwrite.
manifest.csv lists every job (case, sample, seed, output, model sha256, seconds, status, error). A failing case is
recorded and the batch goes on; the exit code is 1 if any failed. Under torchrun job i runs on rank i mod world
size, each rank on its own GPU.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``batch`` subcommand and its options."""
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
                       help="labelsTr holds the model's classes (default; a paper-set model: 0 background, 1-15 "
                            "organs, 16 body; an anatomy model: its 36 classes) or the input's own label values, numbered 1..N in value order (named after .seg.nrrd segments)")
    batch.add_argument("--variance", action="store_true",
                       help="with --samples 2 or more: also write <case>_std.nii.gz, the per-voxel std in HU")
    add_sampling_options(batch)


def run(args: argparse.Namespace) -> int:
    from ..batch import (BatchSettings, Layout, list_cases, original_labels, plan_jobs, rank_device, run_batch,
                        shard_from_environment)
    from ..checkpoint import load_model
    from ..io import check_distinct_paths

    if args.variance and args.samples < 2:
        raise InputError("--variance needs --samples 2 or more")
    if args.nnunet_labels != "model" and args.nnunet is None:
        raise InputError("--nnunet-labels needs --nnunet")
    device, model_folder, options = sampling_setup(args)
    layout = Layout(args.out, args.nnunet)
    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out {args.out} is a file; give a folder")
    cases = list_cases(args.segs)
    check_distinct_paths({"--out": args.out}, {"--segs": args.segs, "--labels": mapping_file(args.labels),
                                               "--model": model_folder})
    jobs = plan_jobs(cases, args.samples, args.seed, layout)
    shard = shard_from_environment()
    device = rank_device(device, shard)
    model = load_model(model_folder, device=device)
    how = sampling_summary(model, options) if shard.rank == 0 else ""
    if not args.quiet and shard.rank == 0:
        print(f"ctsynth: {len(cases)} case(s) x {args.samples} sample(s) with {model.name} (sha256 "
              f"{model.sha256[:12]}), {how}, device {device}"
              + (f", {shard.world_size} ranks" if shard.world_size > 1 else ""), file=sys.stderr)
    label_names = original_labels(cases) if args.nnunet_labels == "original" else None
    settings = BatchSettings(layout, args.labels, args.variance, args.overwrite, label_names)
    prefix = f"ctsynth: [rank {shard.rank}]" if shard.rank else "ctsynth:"
    # rank 0 draws a bar for the jobs over one for the current volume; other ranks (and logs) print lines
    first = shard.rank == 0
    with ProgressDisplay(prefix, "batch", "CT", quiet=args.quiet, bar=None if first else False) as overall, \
            ProgressDisplay(prefix, "volume", "slice", quiet=args.quiet or not first, lines=False, position=1,
                            leave=False) as volume:

        def on_job(result: JobResult, count: int, total: int) -> None:
            detail = result.error or ("" if result.seconds is None else f"{result.seconds:.1f} s")
            overall.postfix(f"{result.job.case} sample {result.job.sample}: {result.status}"
                         + (f" ({detail})" if detail else ""))
            overall.update(count, total)

        results = run_batch(jobs, model, options, settings, device=device, shard=shard,
                            on_job=on_job, progress=volume.update)
    failed = [r for r in results if r.status == "failed"]
    if shard.rank == 0:
        for r in failed:
            print(f"ctsynth: failed: {r.job.case} sample {r.job.sample}: {r.error}", file=sys.stderr)
        print(f"ctsynth: {len(results) - len(failed)} of {len(results)} job(s) done, {len(failed)} failed; "
              f"manifest {layout.manifest}", file=sys.stderr)
    return 1 if failed else 0
