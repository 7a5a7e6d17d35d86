"""The ``ctsynth`` command: synthesize a CT from a segmentation, inspect models, list classes."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

from . import __version__
from .errors import CTSynthError, InputError
from .provenance import sidecar_path

EXAMPLES = """\
examples:
  ctsynth synth --seg amos_0001_labels.nii.gz --labels amos --out amos_0001_synthetic.nii.gz
  ctsynth synth --seg totalseg_output.nii.gz --labels totalseg --out syn.nii.gz --preset balanced --seed 7
  ctsynth synth --seg case.seg.nrrd --out syn.nrrd --model ~/models/mask_guided_150k --device cuda
  ctsynth info demo

The segmentation must hold the abdominal organs (AMOS22 ids 1-15, TotalSegmentator ids, Slicer segment names,
or any ids with a JSON mapping file). The synthetic CT is written on the segmentation's exact grid, in HU,
with a .json provenance file beside it. Nothing is overwritten without --overwrite.
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
    synth.add_argument("--model", default=None, metavar="DIR|NAME",
                       help="model folder or name (default: the bundled 'demo' model)")
    synth.add_argument("--labels", default="auto", metavar="CONVENTION",
                       help="label convention: auto (default), amos, totalseg (v2 ids), totalseg_v1, or FILE.json "
                            "mapping {value or name: class}; auto refuses ids 5-15 without higher ids, which mean "
                            "different organs in AMOS and TotalSegmentator (see 'ctsynth classes')")
    synth.add_argument("--body-mask", type=Path, default=None, metavar="FILE",
                       help="patient body mask (e.g. TotalSegmentator 'body' task); on another grid it is reordered "
                            "or resampled (nearest) onto the segmentation's; default: estimated from the segmentation")
    synth.add_argument("--preset", default="fast", metavar="NAME",
                       help="sampler preset: fast (default), balanced, paper (1000 ancestral steps, GPU)")
    synth.add_argument("--sampler", choices=("ddim", "ancestral", "dpmsolver++"), default=None,
                       help="override the preset's sampler (dpmsolver++: DPM-Solver++(2M), deterministic)")
    synth.add_argument("--steps", type=int, default=None, metavar="N", help="override the preset's number of steps")
    synth.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    synth.add_argument("--device", default="auto", metavar="DEV", help="auto (default), cpu, cuda, cuda:N or mps")
    synth.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                       help="network arithmetic: auto (default: bf16 on CUDA and on CPUs with AMX/AVX512-BF16, "
                            "else fp32), fp32, bf16 or fp16 (autocast)")
    synth.add_argument("--batch-size", type=int, default=8, metavar="B", help="slices sampled together (default 8)")
    synth.add_argument("--preview", type=Path, default=None, metavar="PNG",
                       help="also write a PNG preview (axial and coronal: segmentation | synthetic | real CT)")
    synth.add_argument("--reference-ct", type=Path, default=None, metavar="CT",
                       help="the real CT, shown beside the synthetic one in --preview; on another grid it is "
                            "reordered or resampled (linear) onto the segmentation's")
    synth.add_argument("--overwrite", action="store_true", help="replace OUT (and its .json) if they exist")
    synth.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    synth.add_argument("--progress-lines", action="store_true",
                       help="instead of a bar, print 'PROGRESS <slices done> <total>' lines on stdout (for Slicer)")

    info = sub.add_parser("info", help="show a model's config, classes and sha256")
    info.add_argument("model", nargs="?", default=None, metavar="DIR|NAME", help="model folder or name (default: demo)")
    info.add_argument("--json", action="store_true", help="print the full config.json")

    sub.add_parser("classes", help="list the model classes and the accepted label conventions")

    from .evaluate_cli import add_arguments as add_evaluate_arguments

    add_evaluate_arguments(sub.add_parser("evaluate", help="score a synthetic CT: HU per organ, PSNR/SSIM, "
                                          "TotalSegmentator Dice (--totalseg), FID per plane (--fid)"))
    return parser


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
    from .checkpoint import load_model, read_config, resolve_model_path
    from .device import select_device, select_precision
    from .evaluate_cli import labels_file
    from .grid import onto_grid
    from .io import (WRITE_SUFFIXES, atomic_outputs, check_distinct_paths, check_output_path, read_image,
                     read_labelmap, save_volume)
    from .labels import check_convention
    from .preview import preview_png
    from .provenance import provenance_header
    from .synthesis import prepare_classes, preset_options, synthesize

    if not args.out.name.endswith(WRITE_SUFFIXES):
        raise InputError(f"--out {args.out}: use one of {', '.join(WRITE_SUFFIXES)}")
    # every option is checked before any volume or weight is read
    device = select_device(args.device)
    precision = select_precision(args.precision, device)
    model_folder = resolve_model_path(args.model)
    options = preset_options(read_config(model_folder), args.preset, sampler=args.sampler, steps=args.steps,
                             seed=args.seed, batch_size=args.batch_size)
    check_convention(args.labels)
    if args.progress_lines and sys.stdout is None:
        raise InputError("--progress-lines writes to stdout, which is closed")
    outputs = {"--out": args.out, "its sidecar": sidecar_path(args.out), "--preview": args.preview}
    check_distinct_paths(outputs, {"--seg": args.seg, "--labels": labels_file(args.labels), "--body-mask":
                                   args.body_mask, "--reference-ct": args.reference_ct, "--model": model_folder})
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
    classes, report = prepare_classes(seg, names, args.labels, body)
    if report.unknown:
        print(f"ctsynth: warning: {report.unknown_message()}", file=sys.stderr)
    model = load_model(model_folder, device=device)
    if not args.quiet:
        print(f"ctsynth: {model.name} ({model.conditioning}, sha256 {model.sha256[:12]}), {options.sampler} "
              f"{options.steps} steps, labels '{report.adapter}', organs: {', '.join(report.organs_present)}, "
              f"device {device} ({precision})", file=sys.stderr)
    with _progress(args.quiet or args.progress_lines) as bar:

        def progress(done: float, total: int) -> None:
            if args.progress_lines:
                print(f"PROGRESS {done:.2f} {total}", flush=True)
            bar(done, total)

        result = synthesize(classes, model, options, device=device, precision=precision, progress=progress)
    result.provenance["inputs"] = {"segmentation": str(args.seg), "labels": report.adapter,
                                   "unknown_labels": {str(k): v for k, v in report.unknown.items()}}
    targets = [path for path in outputs.values() if path is not None]
    with atomic_outputs(*targets, overwrite=args.overwrite) as temps:  # all three files, or none
        save_volume(result.volume, temps[0], metadata=provenance_header(result.provenance))
        temps[1].write_text(json.dumps(result.provenance, indent=2) + "\n")
        if args.preview is not None:
            temps[2].write_bytes(preview_png(classes, result.volume, reference))
    print(f"ctsynth: wrote {', '.join(map(str, targets))}", file=sys.stderr)
    return 0


def _info(args: argparse.Namespace) -> int:
    from .checkpoint import load_model
    from .synthesis import evaluation_flops

    model = load_model(args.model)
    if args.json:
        print(json.dumps(model.config, indent=2))
        return 0
    cfg = model.config
    params = sum(p.numel() for p in model.model.parameters())
    net = cfg["model"]
    lines = [
        f"model:        {model.name}  ({model.path})",
        f"sha256:       {model.sha256}",
        f"conditioning: {net['conditioning']}",
        f"network:      U-Net {params / 1e6:.1f} M parameters, {net['image_size']}x{net['image_size']}, "
        f"channels {net['model_channels']} x {net['channel_mult']}",
        f"cost:         {evaluation_flops(model) / 1e9:.2f} GFLOP per slice per sampling step",
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
    handler = {"synth": _synth, "info": _info, "classes": _classes, "evaluate": _evaluate}[args.command]
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if on_main_thread else None
    try:
        return handler(args)
    except CTSynthError as exc:
        print(f"ctsynth: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ctsynth: interrupted; nothing was written", file=sys.stderr)
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
