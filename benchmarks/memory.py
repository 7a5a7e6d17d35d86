"""Peak memory of `ctsynth synth` on a large segmentation: is it the output volume plus a bounded working set?

    .venv/bin/python benchmarks/memory.py --shape 512 512 300 --steps 1 --threads 2

Builds a synthetic label volume of ``--shape`` (the bundled sample segmentation stretched by nearest neighbour,
so every slice holds body and organs), then runs ``ctsynth synth`` on it in a child process and reads that
child's peak resident set size (``resource.getrusage(RUSAGE_CHILDREN)``, Linux: KiB). The same command on a
64 x 64 x 4 volume, run first, gives the fixed cost (torch, ITK, the model), so the table separates that runtime,
the input label map (uint8), the output volume (int16) and the rest: the working set. Memory does not depend on
the number of sampling steps (the sampler keeps one (N, 1, S, S) state at the model's size), so ``--steps 1``
keeps it short.
``--pythonpath`` measures another checkout (e.g. an older commit exported with ``git archive``).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "Resources" / "sample" / "seg_total.nii.gz"
SMALL = (64, 64, 4)


def stretched_labels(shape: tuple[int, int, int], path: Path) -> None:
    """The sample segmentation resampled (nearest neighbour) onto ``shape`` voxels of the same extent."""
    image = nib.load(SAMPLE)
    labels = np.asarray(image.dataobj).astype(np.uint8)
    index = [np.minimum(np.arange(n) * size // n, size - 1) for n, size in zip(shape, labels.shape)]
    affine = image.affine.copy()
    affine[:3, :3] = affine[:3, :3] @ np.diag([size / n for n, size in zip(shape, labels.shape)])
    nib.save(nib.Nifti1Image(labels[np.ix_(*index)], affine), path)


def synth_peak_mib(shape: tuple[int, int, int], args: argparse.Namespace, work: Path) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of ``ctsynth synth`` on a stretched segmentation of ``shape``, in a child
    (children run one after the other, largest last: RUSAGE_CHILDREN gives the largest child's peak)."""
    seg, out = work / f"seg{shape[2]}.nii.gz", work / f"syn{shape[2]}.nii.gz"
    stretched_labels(shape, seg)
    env = {**os.environ, "PYTHONPATH": str(args.pythonpath), "OMP_NUM_THREADS": str(args.threads)}
    tic = time.perf_counter()
    subprocess.run([sys.executable, "-m", "CTSemanticSynthLib.cli", "synth", "--seg", str(seg), "--out", str(out),
                    "--model", args.model, "--labels", "totalseg", "--steps", str(args.steps), "--device", "cpu",
                    "-q"], env=env, check=True, stdout=subprocess.DEVNULL, cwd=work)  # not this checkout's cwd:
    # python -m puts the working folder first on sys.path, ahead of --pythonpath
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, time.perf_counter() - tic


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 300), metavar=("I", "J", "K"))
    parser.add_argument("--model", default="demo")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pythonpath", type=Path, default=REPO, help="the checkout to measure (default: this one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        runtime, _ = synth_peak_mib(SMALL, args, Path(work))
        peak, seconds = synth_peak_mib(tuple(args.shape), args, Path(work))
    voxels = int(np.prod(args.shape))
    labels, output = voxels / 2**20, 2 * voxels / 2**20
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print(f"checkout: {args.pythonpath}; machine: {platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; threads {args.threads}")
    print("| shape | steps | wall s | peak RSS MiB | runtime (64x64x4 run) MiB | labels (uint8) MiB "
          "| output (int16) MiB | working set MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {'x'.join(map(str, args.shape))} | {args.steps} | {seconds:.0f} | {peak:.0f} | {runtime:.0f} | "
          f"{labels:.0f} | {output:.0f} | {peak - runtime - labels - output:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
