"""Whole-volume synthesis speed and peak memory: what `ctsynth synth` / `make demo` cost on this machine.

    .venv/bin/python benchmarks/synthesis.py --model demo --preset fast --threads 2 --repeats 2

Maps the bundled sample segmentation (Resources/sample, 122 x 101 x 112, TotalSegmentator labels; or ``--seg``),
loads the model, then times ``synthesize`` (all slices with body, the preset's sampler and steps, ``--precision``,
``--batch-size`` a number or auto) ``--repeats`` times. Prints slices/s, model forward passes/s, the achieved
TFLOP/s (``ctsynth info``'s FLOPs per slice evaluation x evaluations / time), wall time per volume, the batch
size used and peak memory (RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA), with the command, machine,
torch version and thread count.
"""

from __future__ import annotations

import argparse
import platform
import resource
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from CTSemanticSynthLib.checkpoint import load_model  # noqa: E402
from CTSemanticSynthLib.device import select_device  # noqa: E402
from CTSemanticSynthLib.io import read_labelmap  # noqa: E402
from CTSemanticSynthLib.synthesis import evaluation_flops, prepare_classes, preset_options, synthesize  # noqa: E402

SAMPLE = REPO / "Resources" / "sample" / "seg_total.nii.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seg", type=Path, default=SAMPLE, help="a TotalSegmentator label map (default: the sample)")
    parser.add_argument("--batch-size", type=lambda v: v if v == "auto" else int(v), default=8)
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = select_device(args.device)
    seg, names = read_labelmap(args.seg)
    classes, _ = prepare_classes(seg, names, "totalseg")
    model = load_model(args.model, device=device)
    options = preset_options(model.config, args.preset, steps=args.steps, batch_size=args.batch_size,
                             precision=args.precision)
    times = []
    for _ in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        tic = time.perf_counter()
        result = synthesize(classes, model, options, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tic)
    slices = result.provenance["slices_sampled"]
    steps = result.provenance["sampler"]["num_steps"]
    best = min(times)
    tflops = evaluation_flops(model) * slices * steps / best / 1e12
    memory = (f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB allocated" if device.type == "cuda"
              else f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB peak RSS")
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"machine: {platform.processor() or platform.machine()}, {platform.system()} {platform.release()}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}")
    print(f"model: {model.name} ({model.conditioning}, {model.image_size} px, "
          f"{sum(p.numel() for p in model.model.parameters()) / 1e6:.2f} M params), "
          f"{options.sampler} {steps} steps from t={options.start_timestep or 'T'}, batch {options.batch_size} "
          f"(used {result.provenance['batch_size_used']}), precision {result.provenance['precision']}")
    print("| slices | steps | wall s (best of %d) | all runs s | slices/s | forwards/s | TFLOP/s | memory |"
          % args.repeats)
    print("|---:|---:|---:|---|---:|---:|---:|---|")
    print(f"| {slices} | {steps} | {best:.1f} | {', '.join(f'{t:.1f}' for t in times)} | {slices / best:.2f} | "
          f"{slices * steps / best:.1f} | {tflops:.3g} | {memory} |")


if __name__ == "__main__":
    main()
