"""Wall time of the downstream study's CPU smoke run, per step, on the tiny generated set of the tests.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/downstream_cpu.py --out /tmp/downstream_bench --threads 1

Builds the six tiny cases (``Testing/data_builders/tiny_abdomen.py``) and a tiny random-weight model in ``--out``,
runs ``python -m training.downstream`` (2d, nnUNetTrainer_1epoch, -device cpu, no TTA, 1 sample per label map,
``--threads``) as a user would, and prints a markdown table of every step's seconds (from the study's step markers)
with the total wall time. Measures the pipeline's cost only: the Dice of a one-epoch model means nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "Testing")]

from conftest import make_model_folder  # noqa: E402
from data_builders.tiny_abdomen import build_tiny_abdomen  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="work folder (emptied first)")
    parser.add_argument("--threads", type=int, default=None, help="nnU-Net's CPU torch threads (default: every core)")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    cts, segs = build_tiny_abdomen(args.out / "data", cases=6)
    (args.out / "test.txt").write_text("case_04\ncase_05\n")
    model = make_model_folder(args.out / "model", class_means=[0.0] + [0.55] * 15 + [0.45])
    study = args.out / "study"
    command = [sys.executable, "-m", "training.downstream", "--cts", str(cts), "--segs", str(segs), "--labels", "amos",
               "--test", str(args.out / "test.txt"), "--model", str(model), "--samples", "1", "--study", str(study),
               "--device", "cpu", "--precision", "fp32", "--trainer", "nnUNetTrainer_1epoch", "--no-tta",
               "--processes", "1", *([] if args.threads is None else ["--threads", str(args.threads)])]
    start = time.monotonic()
    subprocess.run(command, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), check=True,
                   stdout=subprocess.DEVNULL)
    wall = time.monotonic() - start
    steps = sorted((json.loads(p.read_text()) for p in (study / "steps").glob("*.json")), key=lambda s: s["finished"])
    print(f"threads {args.threads or os.cpu_count()} (of {os.cpu_count()} CPUs), load average before the end "
          f"{os.getloadavg()[0]:.1f}\n\n| step | seconds |\n|---|---:|")
    for step in steps:
        print(f"| {step['step']} | {step['seconds']:.0f} |")
    print(f"| **whole command (wall)** | **{wall:.0f}** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
