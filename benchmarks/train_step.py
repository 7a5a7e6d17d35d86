"""Training-step speed and peak memory: our U-Net (hybrid loss) vs a diffusers UNet2DModel peer (MSE eps loss).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train_step.py --image-size 64 --batch-size 4 --iterations 10 --threads 1

Each step does what a step of ``training/train.py`` does: the uint8 class map and float16 image are copied to the
device (from pinned memory on CUDA) and the one-hot mask is built there, the loss runs under autocast in the
trainer's precision (``--precision``, resolved as the trainer does; fp16 with a grad scaler), then backward,
clipping, AdamW and the EMA update; nothing is read back to the host inside the timed loop. Both models see
the same batch: a noisy image (1 channel) and the 17-channel one-hot mask, i.e. 18 input channels (ours: the "concat" conditioning; the peer: the mask concatenated to its input), the same image size,
the same linear-schedule forward process, AdamW (lr 1e-4) and gradient clipping at 1.0 as ``training/train.py``.
The peer copies our architecture (block widths, residual blocks per level, attention levels and head width,
scale-shift time conditioning), so the parameter counts are close; both counts are printed.

Each model runs in its own child process so that peak memory is its own: on CPU the peak resident set size
(``resource.getrusage``, which includes the torch runtime), on CUDA ``torch.cuda.max_memory_allocated``.
Timing covers ``--iterations`` full steps (forward, loss, backward, optimizer) after ``--warmup`` untimed ones.
``diffusers`` is optional: without it only our model is measured and the table says so.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the network

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from CTSemanticSynthLib.diffusion import diffusion_defaults  # noqa: E402
from CTSemanticSynthLib.factory import create_diffusion, create_model  # noqa: E402
from CTSemanticSynthLib.labels import NUM_CLASSES  # noqa: E402
from CTSemanticSynthLib.preprocess import condition_inputs  # noqa: E402
from training.dataset import model_batch  # noqa: E402
from training.ema import update_ema  # noqa: E402
from training.train import AUTOCAST, resolve_precision  # noqa: E402

# Architectures of our U-Net: the bundled demo model's (training/configs/demo.yaml) and the paper's.
ARCHS = {
    "demo": {"model_channels": 32, "channel_mult": [1, 2, 2, 4], "num_res_blocks": 1, "attention_resolutions": [8],
             "num_heads": 2},
    "paper": {"model_channels": 128, "channel_mult": [1, 1, 2, 2, 4, 4], "num_res_blocks": 2,
              "attention_resolutions": [16, 32], "num_heads": 4},
}
MODELS = ("ours", "diffusers")


def our_config(args: argparse.Namespace) -> dict:
    return {**ARCHS[args.arch], "image_size": args.image_size, "conditioning": "concat",
            "use_checkpoint": args.use_checkpoint}


def diffusers_peer(config: dict):
    """A UNet2DModel with our block layout: 18 input channels, 1 output (eps), attention at the same levels."""
    from diffusers import UNet2DModel

    widths = [config["model_channels"] * m for m in config["channel_mult"]]
    attn = [2**level in config["attention_resolutions"] for level in range(len(widths))]
    head_dim = widths[-1] // config["num_heads"]
    return UNet2DModel(
        sample_size=config["image_size"], in_channels=1 + NUM_CLASSES, out_channels=1,
        block_out_channels=tuple(widths), layers_per_block=config["num_res_blocks"],
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        attention_head_dim=head_dim, resnet_time_scale_shift="scale_shift", norm_num_groups=32,
    )


def fake_batch(batch: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored arrays as a slice cache holds them: images [B, S, S] float16 in [0, 1] and blocky uint8 class maps
    (speed does not depend on the content)."""
    coarse = torch.randint(0, NUM_CLASSES, (batch, 1, size // 8, size // 8), generator=generator)
    classes = torch.nn.functional.interpolate(coarse.float(), size=(size, size), mode="nearest")[:, 0]
    return torch.rand((batch, size, size), generator=generator).half(), classes.to(torch.uint8)


def measure(name: str, args: argparse.Namespace) -> dict:
    """Run warmup + timed training steps of one model in this process; returns params, it/s and memory."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if name == "diffusers":
        import diffusers  # noqa: F401  (imported before the baseline so that it counts as runtime)
    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux: torch (+ diffusers) loaded
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    config = our_config(args)
    diffusion = create_diffusion(diffusion_defaults())  # the paper's: linear schedule, learned range, hybrid loss
    if name == "ours":
        model = create_model(config)
    else:
        model = diffusers_peer(config)
    model = model.to(device).train()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).requires_grad_(False)
    net = torch.compile(model) if args.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    precision = resolve_precision(args.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    stored = fake_batch(args.batch_size, args.image_size, generator)
    if device.type == "cuda":
        stored = tuple(a.pin_memory() for a in stored)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    device_generator = torch.Generator(device).manual_seed(0)

    def step() -> torch.Tensor:
        images, classes = model_batch(*(a.to(device, non_blocking=True) for a in stored))
        mask = condition_inputs(classes, "concat")["mask"]
        if args.channels_last:
            images, mask = (a.contiguous(memory_format=torch.channels_last) for a in (images, mask))
        t = torch.randint(0, diffusion.num_timesteps, (args.batch_size,), generator=device_generator, device=device)
        noise = torch.randn(images.shape, generator=device_generator, device=device)
        autocast = (torch.autocast(device.type, dtype=AUTOCAST[precision]) if AUTOCAST[precision] is not None
                    else contextlib.nullcontext())
        with autocast:
            if name == "ours":
                loss = diffusion.training_losses(net, images, t, {"mask": mask}, noise)["loss"].float().mean()
            else:
                x_t = diffusion.q_sample(images, t, noise)
                eps = net(torch.cat([x_t, mask], dim=1), t).sample
                loss = torch.nn.functional.mse_loss(eps.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        update_ema(ema, model, 0.9999)
        return loss.detach()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    tic = time.perf_counter()
    for _ in range(args.iterations):
        loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - tic
    result = {"model": name, "params": sum(p.numel() for p in model.parameters()),
              "it_per_s": args.iterations / seconds, "s_per_it": seconds / args.iterations, "last_loss": float(loss),
              "threads": torch.get_num_threads(), "precision": precision}
    if device.type == "cuda":
        result["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["memory"] = "torch.cuda.max_memory_allocated (MiB, timed loop)"
    else:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result["peak_mib"] = peak_kib / 1024
        result["above_runtime_mib"] = (peak_kib - baseline_kib) / 1024
        result["memory"] = "peak RSS (MiB, getrusage)"
    return result


def machine(args: argparse.Namespace) -> dict:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "os": f"{platform.system()} {platform.release()}"}
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        info["diffusers"] = None
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=20, help="timed training steps (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--arch", choices=sorted(ARCHS), default="demo", help="our U-Net's layout (default demo)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                        help="autocast as the trainer's --precision (default auto: fp32 on CPU)")
    parser.add_argument("--use-checkpoint", action="store_true", help="activation checkpointing (ours only)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--no-peer", action="store_true", help="measure our model only")
    parser.add_argument("--only", choices=MODELS, help=argparse.SUPPRESS)  # child process: one model, JSON out
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch has no CUDA GPU")
    if args.image_size % 2 ** (len(ARCHS[args.arch]["channel_mult"]) - 1):
        parser.error(f"--image-size must be divisible by {2 ** (len(ARCHS[args.arch]['channel_mult']) - 1)}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.only:
        print(json.dumps(measure(args.only, args)))
        return 0
    info = machine(args)
    models = ["ours"] + (["diffusers"] if info["diffusers"] and not args.no_peer else [])
    results = []
    for name in models:  # one child per model: peak memory is per process
        proc = subprocess.run([sys.executable, __file__, *argv, "--only", name], capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    command = "HF_HUB_OFFLINE=1 python benchmarks/train_step.py " + " ".join(shlex.quote(a) for a in argv)
    memory = results[0]["memory"]
    print(f"command: `{command}`")
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items() if v is not None)
          + f"; torch threads {results[0]['threads']}; device {args.device}; precision {results[0]['precision']}")
    print(f"setting: {args.arch} layout, {args.image_size} x {args.image_size}, batch {args.batch_size}, "
          f"{1 + NUM_CLASSES} input channels, {args.warmup} warm-up + {args.iterations} timed iterations\n")
    growth = "above_runtime_mib" in results[0]
    print(f"| model | loss | params (M) | it/s | s/it | {memory} |"
          + (" peak RSS above the loaded runtime (MiB) |" if growth else ""))
    print("|---|---|---:|---:|---:|---:|" + ("---:|" if growth else ""))
    for r in results:
        label = ("CTSemanticSynthLib UNetModel (concat)" if r["model"] == "ours"
                 else f"diffusers {info['diffusers']} UNet2DModel")
        loss = "hybrid (eps MSE + 1e-3 VLB)" if r["model"] == "ours" else "eps MSE"
        print(f"| {label} | {loss} | {r['params'] / 1e6:.3f} | {r['it_per_s']:.3g} | {r['s_per_it']:.3g} "
              f"| {r['peak_mib']:.0f} |" + (f" {r['above_runtime_mib']:.0f} |" if growth else ""))
    if not info["diffusers"] and not args.no_peer:
        print("\nnote: diffusers is not installed, so only our model was measured "
              "(pip install diffusers, without torchvision, for the side-by-side row)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
