"""Does synthetic data help a segmentation model? Train nnU-Net v2 on real CTs only, on real + synthetic CTs and
on synthetic CTs only (all from the same training label maps) and compare the three on held-out real CTs.

    python -m training.downstream --cts amos22/imagesTr --segs amos22/labelsTr --labels amos \\
        --test test_cases.txt --model paper-amos --samples 2 --study studies/amos --device cuda

    # CPU smoke run (pipeline check only): shortest trainer, 2d
    python -m training.downstream --cts cts/ --segs segs/ --test test.txt --model demo --samples 1 \\
        --study studies/smoke --device cpu --trainer nnUNetTrainer_1epoch --no-tta

Run the same command again to resume: finished steps are skipped. Outputs (docs/downstream.md): STUDY/report/
<configuration>_<trainer>_fold<fold>/{downstream.md, dice_summary.csv, dice_per_case.csv, dice_per_organ.png}.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from CTSemanticSynthLib.device import select_device, select_precision
from CTSemanticSynthLib.errors import CTSynthError, InputError
from CTSemanticSynthLib.labels import check_convention
from CTSemanticSynthLib.parsing import OneLineParser

from .datasets import StudyPaths
from .nnunet import CONFIGURATIONS, NnUNet
from .study import StudySettings, run_study


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m training.downstream", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--cts", type=Path, nargs="+", required=True, metavar="DIR",
                      help="folder(s) of real CTs (<case>.nii.gz or <case>_0000.nii.gz)")
    data.add_argument("--segs", type=Path, required=True,
                      help="folder of their label maps (<case>.nii.gz, .nrrd, .seg.nrrd) or a text file of paths")
    data.add_argument("--labels", default="auto", metavar="CONVENTION",
                      help="label convention of --segs: auto, amos, totalseg, totalseg_v1 or a JSON mapping file")
    data.add_argument("--test", type=Path, required=True, help="text file: the held-out test cases, one name a line")
    data.add_argument("--train", type=Path, default=None,
                      help="text file: the training cases (default: every other case of --segs)")
    synth = parser.add_argument_group("synthetic CTs")
    synth.add_argument("--model", required=True, help="model name or folder (see ctsynth info)")
    synth.add_argument("--samples", type=int, required=True, metavar="N", help="synthetic CTs per training label map")
    synth.add_argument("--preset", default="fast", help="sampler preset of the model (default fast)")
    synth.add_argument("--seed", type=int, default=0, help="batch seed: sample k of case c gets a seed derived from it")
    synth.add_argument("--precision", default="auto", help="synthesis precision: auto, fp32, bf16, fp16")
    nnunet = parser.add_argument_group("nnU-Net")
    nnunet.add_argument("--configuration", default="2d", choices=CONFIGURATIONS)
    nnunet.add_argument("--trainer", default="nnUNetTrainer",
                        help="nnU-Net trainer class (default nnUNetTrainer, 1000 epochs; nnUNetTrainer_1epoch or "
                             "_5epochs for smoke runs)")
    nnunet.add_argument("--fold", default="all", help="all (train on every case; default) or a CV fold 0..4")
    nnunet.add_argument("--no-tta", action="store_true", help="predict without test-time mirroring (faster)")
    nnunet.add_argument("--dataset-id", type=int, default=501, metavar="ID",
                        help="nnU-Net ids ID, ID+1, ID+2 for real, real+synthetic, synthetic (default 501)")
    nnunet.add_argument("--processes", type=int, default=min(8, os.cpu_count() or 1), metavar="N",
                        help="nnU-Net worker processes for preprocessing and export (default min(8, CPUs))")
    nnunet.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch threads of nnU-Net on the CPU (default: every core, nnU-Net's choice; on a "
                             "shared machine 1 can be much faster)")
    parser.add_argument("--study", type=Path, required=True, help="the study folder (new, or one to resume)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps: synthesis and nnU-Net")
    parser.add_argument("--verbose", action="store_true", help="show nnU-Net's output (always in STUDY/logs/)")
    return parser


def main(argv: list[str] | None = None) -> int:
    def say(message: str) -> None:
        print(f"downstream: {message}", file=sys.stderr, flush=True)

    try:
        args = build_parser().parse_args(argv)
        if not 1 <= args.dataset_id <= 997:
            raise InputError(f"--dataset-id {args.dataset_id}: use 1..997 (the study uses three consecutive ids)")
        for option, value in (("--processes", args.processes), ("--threads", args.threads)):
            if value is not None and value < 1:
                raise InputError(f"{option} {value} must be at least 1")
        check_convention(args.labels)
        device = select_device(args.device)
        settings = StudySettings(tuple(args.cts), args.segs, args.test, args.model, args.samples, args.train,
                                 args.labels, args.preset, args.seed, args.dataset_id, device,
                                 select_precision(args.precision, device))
        nnunet = NnUNet(StudyPaths(args.study), args.configuration, args.trainer, args.fold, device.type,
                        args.processes, not args.no_tta, args.threads, echo=(lambda line: print(line, file=sys.stderr))
                        if args.verbose else None)
        report = run_study(settings, nnunet, say)
    except CTSynthError as exc:
        say(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        say("interrupted; run the same command again to continue")
        return 130
    say(f"report {report}")
    print(report.read_text(encoding="utf-8"))
    return 0
