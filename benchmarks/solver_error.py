"""Solver error on a model: RMSE (HU, inside the body) of few-step samples against a many-step DDIM reference.

    .venv/bin/python benchmarks/solver_error.py --model demo --slices 8 --threads 2

Maps the bundled sample segmentation, keeps ``--slices`` axial slices spread evenly over the body, and samples
them with the same seed (same starting noise, same prior start as the model's ``fast`` preset) with DDIM
``--reference-steps`` steps (the reference) and with each sampler at each of ``--steps``. Prints a markdown table:
RMSE and 99th percentile of |difference| in HU over the body voxels, model evaluations and wall seconds.
Deterministic samplers only (DDIM eta 0, DPM-Solver++), so the differences are solver error, not noise.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from CTSemanticSynthLib.checkpoint import load_model  # noqa: E402
from CTSemanticSynthLib.device import select_device  # noqa: E402
from CTSemanticSynthLib.io import Volume, read_labelmap  # noqa: E402
from CTSemanticSynthLib.labels import BACKGROUND  # noqa: E402
from CTSemanticSynthLib.preprocess import AxialOrientation  # noqa: E402
from CTSemanticSynthLib.synthesis import prepare_classes, preset_options, synthesize  # noqa: E402

SAMPLE = REPO / "Resources" / "sample" / "seg_total.nii.gz"


def spread_slices(classes: Volume, count: int) -> Volume:
    """``count`` axial slices with body, evenly spread, as a volume (other slices cleared to background)."""
    orientation = AxialOrientation.from_affine(classes.affine)
    stack = orientation.to_stack(classes.array)
    active = np.flatnonzero(stack.reshape(len(stack), -1).any(axis=1))
    keep = active[np.linspace(0, len(active) - 1, count).round().astype(int)]
    cleared = np.full_like(stack, BACKGROUND)
    cleared[keep] = stack[keep]
    return Volume(orientation.from_stack(cleared), classes.affine)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--preset", default="fast", help="preset whose start timestep and seed are used")
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--samplers", default="ddim,dpmsolver++")
    parser.add_argument("--steps", default="4,6,8,10,15,25")
    parser.add_argument("--reference-steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = select_device(args.device)
    seg, names = read_labelmap(SAMPLE)
    classes, _ = prepare_classes(seg, names, "totalseg")
    classes = spread_slices(classes, args.slices)
    body = classes.array != BACKGROUND
    model = load_model(args.model, device=device)
    base = preset_options(model.config, args.preset, seed=args.seed, eta=0.0)

    def run(sampler: str, steps: int) -> tuple[np.ndarray, float]:
        tic = time.perf_counter()
        result = synthesize(classes, model, replace(base, sampler=sampler, steps=steps), device=device)
        return result.volume.array[body].astype(np.float64), time.perf_counter() - tic

    reference, reference_s = run("ddim", args.reference_steps)
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {device}")
    print(f"model: {model.name}, prior start t={base.start_timestep or 'T'}, seed {base.seed}, {args.slices} slices, "
          f"{body.sum()} body voxels; reference: DDIM {args.reference_steps} steps ({reference_s:.1f} s)")
    print("| sampler | steps | RMSE HU | p99 abs HU | s |")
    print("|---|---:|---:|---:|---:|")
    for sampler in args.samplers.split(","):
        for steps in (int(s) for s in args.steps.split(",")):
            volume, seconds = run(sampler, steps)
            diff = volume - reference
            print(f"| {sampler} | {steps} | {np.sqrt(np.mean(diff**2)):.2f} | {np.percentile(np.abs(diff), 99):.1f} | "
                  f"{seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
