"""Sampling a volume: our whole-volume pipeline vs a diffusers UNet2DModel with its own schedulers, side by side.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sampling_peer.py --slices 16 --steps 10 --batch-size 8 --threads 2

- **ours**: ``synthesize`` with the bundled demo model (3.30 M parameters, 96 x 96, concat conditioning) on
  ``--slices`` axial slices of the bundled sample segmentation: class slices resized to the model's size, the
  whole (N, 1, S, S) state walks the timesteps, the network runs ``--batch-size`` slices at a time, the result is
  resized back and written into an int16 HU volume. Samplers ``ddim`` (eta 0) and ``dpmsolver++`` (2M), from pure
  noise at t = T-1 (not the demo presets' prior start, which diffusers has no counterpart for).
- **diffusers**: ``UNet2DModel`` with the demo model's block layout (widths, residual blocks, attention level and
  head width, scale-shift time conditioning; random weights: speed does not depend on them) and the same 18 input
  channels (noisy slice + one-hot mask), driven by ``DDIMScheduler`` / ``DPMSolverMultistepScheduler``
  (``dpmsolver++``, order 2) over the same linear betas, the same number of steps, slices, batch size and
  precision, with the same resizing in and out (our ``PlaneResize``), so only the sampling loop and the network
  differ.

Each (model, sampler) pair runs in its own child process, so peak memory is its own: on CPU the peak resident
set size (``resource.getrusage``, the torch runtime included), on CUDA ``torch.cuda.max_memory_allocated``. The
time is one whole volume after an untimed warm-up forward. ``diffusers`` is optional (``pip install '.[bench]'``):
without it the script says so in one line and stops.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the network

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from CTSemanticSynthLib.checkpoint import load_model  # noqa: E402
from CTSemanticSynthLib.device import autocast_dtype, select_device, select_precision  # noqa: E402
from CTSemanticSynthLib.io import Volume, read_labelmap  # noqa: E402
from CTSemanticSynthLib.preprocess import AxialOrientation, PlaneResize, condition_inputs, unit_to_hu  # noqa: E402
from CTSemanticSynthLib.synthesis import SamplingOptions, prepare_classes, synthesize  # noqa: E402

SAMPLE = REPO / "Resources" / "sample" / "seg_total.nii.gz"
SAMPLERS = ("ddim", "dpmsolver++")
FIRST_SLICE = 30
"""The slab starts here (all of the sample's slices hold body)."""


def slab(slices: int) -> Volume:
    """``slices`` axial slices of the sample's model classes."""
    seg, names = read_labelmap(SAMPLE)
    classes, _ = prepare_classes(seg, names, "totalseg")
    return Volume(np.ascontiguousarray(classes.array[:, :, FIRST_SLICE : FIRST_SLICE + slices]), classes.affine)


def ours(classes: Volume, args: argparse.Namespace, device: torch.device, precision: str) -> None:
    model = load_model("demo", device=device)
    options = SamplingOptions(sampler=args.sampler, steps=args.steps, batch_size=args.batch_size, precision=precision)
    synthesize(classes, model, options, device=device)


def diffusers_peer_run(classes: Volume, args: argparse.Namespace, device: torch.device, precision: str) -> None:
    """The same volume the diffusers way: resize in, the scheduler's loop over the whole state, resize out."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
    from train_step import ARCHS, diffusers_peer

    model = load_model("demo", device="cpu")
    torch.manual_seed(0)
    unet = diffusers_peer({**ARCHS["demo"], "image_size": model.image_size}).to(device).eval()
    betas = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
    scheduler = (DDIMScheduler(**betas, clip_sample=False) if args.sampler == "ddim" else
                 DPMSolverMultistepScheduler(**betas, algorithm_type="dpmsolver++", solver_order=2))
    scheduler.set_timesteps(args.steps, device=device)
    orientation = AxialOrientation.from_affine(classes.affine)
    stack = orientation.to_stack(classes.array)
    resize = PlaneResize(stack.shape[1], stack.shape[2], model.image_size)
    small = resize.to_model(torch.from_numpy(np.ascontiguousarray(stack)), labels=True)
    dtype = autocast_dtype(precision)
    autocast = contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
    generator = torch.Generator(device).manual_seed(0)
    with torch.inference_mode(), autocast:
        x = torch.randn((len(small), 1, model.image_size, model.image_size), generator=generator, device=device)
        for t in scheduler.timesteps:
            eps = []
            for first in range(0, len(small), args.batch_size):
                mask = condition_inputs(small[first : first + args.batch_size].long(), "concat")["mask"].to(device)
                eps.append(unet(torch.cat([x[first : first + args.batch_size], mask], dim=1), t).sample.float())
            x = scheduler.step(torch.cat(eps), t, x).prev_sample
    unit = resize.from_model(((x[:, 0].float().clamp(-1, 1) + 1) / 2).cpu(), labels=False).numpy()
    orientation.from_stack(np.rint(unit_to_hu(unit)).astype(np.int16))


RUNNERS = {"ours": ours, "diffusers": diffusers_peer_run}


def measure(args: argparse.Namespace) -> dict:
    """One (model, sampler) pair in this process: seconds for one volume and peak memory."""
    torch.set_num_threads(args.threads)
    device = select_device(args.device)
    precision = select_precision(args.precision, device)
    classes = slab(args.slices)
    run = RUNNERS[args.only]
    warm = argparse.Namespace(**{**vars(args), "steps": 1, "slices": 1})
    run(Volume(classes.array[:, :, :1], classes.affine), warm, device, precision)  # untimed: first-call costs
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    tic = time.perf_counter()
    run(classes, args, device, precision)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - tic
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"seconds": seconds, "peak_mib": peak / 2**20, "precision": precision, "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--samplers", default=",".join(SAMPLERS), help="comma-separated, of ddim, dpmsolver++")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--only", choices=sorted(RUNNERS), help=argparse.SUPPRESS)  # child: one pair, JSON out
    parser.add_argument("--sampler", choices=SAMPLERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.only:
        print(json.dumps(measure(args)))
        return 0
    if importlib.util.find_spec("diffusers") is None:
        print("sampling_peer: diffusers is not installed (pip install '.[bench]'): nothing to compare, skipped")
        return 0
    from train_step import machine

    rows = []
    for sampler in args.samplers.split(","):
        pair = {}
        for name in RUNNERS:  # one child each: peak memory is per process
            proc = subprocess.run([sys.executable, __file__, *argv, "--only", name, "--sampler", sampler],
                                  capture_output=True, text=True, encoding="utf-8")
            if proc.returncode:
                print(proc.stderr, file=sys.stderr)
                return proc.returncode
            pair[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append((sampler, pair))
    first = rows[0][1]["ours"]
    print(f"command: HF_HUB_OFFLINE=1 python benchmarks/sampling_peer.py {' '.join(argv)}")
    print("machine: " + ", ".join(f"{k} {v}" for k, v in machine(args).items())
          + f", capability {torch.backends.cpu.get_cpu_capability()}; threads {first['threads']}, device {args.device}, "
          f"precision {first['precision']}; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} (after)")
    print(f"setting: {args.slices} slices, {args.steps} steps, batch {args.batch_size}, demo layout at 96 x 96\n")
    memory = "peak MiB allocated" if args.device.startswith("cuda") else "peak RSS MiB"
    print(f"| sampler | ours s/volume | diffusers s/volume | diffusers / ours | ours {memory} | diffusers {memory} |")
    print("|---|---:|---:|---:|---:|---:|")
    for sampler, pair in rows:
        a, b = pair["ours"], pair["diffusers"]
        print(f"| {sampler} | {a['seconds']:.1f} | {b['seconds']:.1f} | {b['seconds'] / a['seconds']:.2f} | "
              f"{a['peak_mib']:.0f} | {b['peak_mib']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
