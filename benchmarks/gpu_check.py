"""The GPU check's stages in one process (run by ``benchmarks/gpu_check.sh``, which installs the carried wheels).

Each stage prints one line, ``PASS``/``FAIL``/``SKIP`` name (seconds): what it measured [its threshold], to stdout
and the log; everything else (tracebacks, warnings, progress bars, the trainer's output) goes to the log only. The
exit status is 1 when any stage failed. Sampling first, then the memory plan and sweep, then training and resume
(under deterministic algorithms), then ``torch.compile`` if the time left allows.

    python benchmarks/gpu_check.py --log check.log [--dry-run] [--prepare-pid PID]

``--dry-run``: the same stages with tiny sizes on the CPU (checks the check; GPU-only measurements say so).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import logging
import math
import os
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from CTSemanticSynthLib import denoiser as denoiser_module  # noqa: E402
from CTSemanticSynthLib.checkpoint import LoadedModel  # noqa: E402
from CTSemanticSynthLib.denoiser import VolumeDenoiser  # noqa: E402
from CTSemanticSynthLib.diffusion import GaussianDiffusion, diffusion_defaults, make_sampler  # noqa: E402
from CTSemanticSynthLib.factory import create_model  # noqa: E402
from CTSemanticSynthLib.io import read_labelmap  # noqa: E402
from CTSemanticSynthLib.labels import NUM_CLASSES  # noqa: E402
from CTSemanticSynthLib.models import model_defaults  # noqa: E402
from CTSemanticSynthLib.preprocess import AxialOrientation, PlaneResize  # noqa: E402
from CTSemanticSynthLib.synthesis import evaluation_flops, prepare_classes, sample_slices  # noqa: E402

BUDGET_S = {"cuda": 480, "cpu": 540}
"""Wall time the whole check may take (the GPU node's command limit is 10 minutes; imports included)."""
COMPILE_S = {"cuda": 150, "cpu": 240}
"""Time the compile stage is given: it is skipped when less than that is left of the budget."""
BF16_PEAK_TFLOPS = (("H200 NVL", 835.0), ("H200", 989.4), ("H100 NVL", 835.0), ("H100 PCIe", 756.0),
                    ("H100", 989.4), ("A100", 312.0))
"""Dense bf16 tensor-core peaks (NVIDIA's data sheets), by the first name part the device name contains (an H100
without PCIe or NVL in its name, e.g. 'NVIDIA H100 80GB HBM3', is the SXM part)."""
TINY_NET = {"model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [2],
            "num_heads": 1}
HU_PER_UNIT = 400.0
"""Window width: a difference of 1 in [0, 1] intensities is 400 HU."""


@dataclass(frozen=True)
class Sizes:
    """How big each stage is: the paper's network at 256 px on a GPU, a tiny one on the CPU (--dry-run)."""

    image: int
    net: dict[str, Any]
    slices: int  # the sampling volume for speed
    steps: int
    plan_slices: int  # the volume whose chunk 'auto' plans (more slices than fit at once on an 80 GB GPU)
    train_batch: int
    sweep_batches: tuple[int, ...]
    sweep_steps: tuple[int, int]  # (warm-up, timed) training steps per memory-sweep configuration
    speed_steps: tuple[int, int]  # the same for the training speed
    half: int  # resume: train 2 x half in one run, half + half with a resume in another
    workers: int


GPU = Sizes(256, {}, 128, 10, 1000, 16, (16, 32, 64), (2, 3), (3, 10), 15, 8)
CPU = Sizes(32, TINY_NET, 12, 2, 12, 4, (2,), (1, 2), (1, 3), 2, 1)


@dataclass
class Check:
    """The run's state: where to log, what is done, the stages' verdicts."""

    log: Any
    dry: bool
    work: Path
    prepare: subprocess.Popen | None
    started: float = field(default_factory=lambda: float(os.environ.get("GPU_CHECK_START") or time.time()))
    """Wall-clock start: when gpu_check.sh started (installs and imports included), else now."""
    failed: list[str] = field(default_factory=list)
    device: torch.device = field(init=False)
    sizes: Sizes = field(init=False)

    def __post_init__(self) -> None:
        self.device = torch.device("cpu" if self.dry else "cuda")
        self.sizes = CPU if self.dry else GPU

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def say(self, line: str) -> None:
        """One line to stdout and the log."""
        print(line, flush=True)
        self.detail(line)

    def detail(self, line: str) -> None:
        self.log.write(line + "\n")
        self.log.flush()

    def elapsed(self) -> float:
        return time.time() - self.started

    def stage(self, name: str, threshold: str, body: Callable[[], tuple[bool | None, str]]) -> None:
        """Run ``body`` -> (ok, what it measured); ok None is SKIP. An exception is a FAIL with its last line."""
        self.detail(f"\n== {name} ({self.elapsed():.0f} s into the check)")
        tic = time.perf_counter()
        try:
            ok, summary = body()
        except Exception as exc:  # a broken stage must not hide the others' results
            self.detail(traceback.format_exc())
            ok, summary = False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        finally:
            if self.cuda:
                torch.cuda.set_sync_debug_mode(0)
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()
        verdict = "SKIP" if ok is None else "PASS" if ok else "FAIL"
        if ok is False:
            self.failed.append(name)
        self.say(f"{verdict} {name} ({time.perf_counter() - tic:.0f} s): {summary} [{threshold}]")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


# --- models and data ----------------------------------------------------------------------------------------------


def randomised_network(check: Check, config_extra: dict[str, Any] | None = None) -> LoadedModel:
    """The paper's U-Net (tiny on --dry-run) with random weights, its zero-initialised layers included, so that its
    output is not trivially zero; with the paper's diffusion."""
    torch.manual_seed(0)
    config = model_defaults() | check.sizes.net | {"image_size": check.sizes.image} | (config_extra or {})
    model = create_model(config)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                torch.nn.init.normal_(p, std=0.05)
    model = model.eval().to(check.device)
    diffusion = GaussianDiffusion(**diffusion_defaults())
    return LoadedModel(model, diffusion, {"name": "random paper-size U-Net", "model": config}, "", Path("random"))


def class_slices(check: Check, slices: int) -> torch.Tensor:
    """``slices`` (N, S, S) uint8 model-class slices: the bundled sample's slices that hold the body, resized to the
    model's size and repeated (read with nibabel: the carried wheels)."""
    seg, names = read_labelmap(REPO / "Resources" / "sample" / "seg_total.nii.gz")
    classes, _ = prepare_classes(seg, names, "totalseg")
    stack = AxialOrientation.from_affine(classes.affine).to_stack(classes.array)
    stack = stack[np.flatnonzero(stack.any(axis=(1, 2)))]
    resize = PlaneResize(stack.shape[1], stack.shape[2], check.sizes.image)
    small = resize.to_model(torch.from_numpy(stack.astype(np.int64)), labels=True).to(torch.uint8)
    return small.repeat(math.ceil(slices / len(small)), 1, 1)[:slices].contiguous()


def bf16_peak(check: Check) -> tuple[str, float | None]:
    """The chip's name and its dense bf16 peak (TFLOP/s), None when the name is not in the table."""
    if not check.cuda:
        return "CPU", None
    name = torch.cuda.get_device_name(check.device)
    return name, next((peak for part, peak in BF16_PEAK_TFLOPS if part in name), None)


@contextlib.contextmanager
def channels_last_on_cuda(model: torch.nn.Module) -> Iterator[None]:
    """Sampling with channels_last inputs and weights on CUDA too, for the layout comparison."""
    saved = denoiser_module.CHANNELS_LAST_DEVICES
    denoiser_module.CHANNELS_LAST_DEVICES = (*saved, "cuda")
    model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        denoiser_module.CHANNELS_LAST_DEVICES = saved
        model.to(memory_format=torch.contiguous_format)


# --- sampling stages ------------------------------------------------------------------------------------------------


def sample(check: Check, model: LoadedModel, classes: torch.Tensor, steps: int, precision: str, *,
           batch_size: int | str = "auto", guidance: float = 0.0, seed: int = 7, sampler: str = "ddim",
           **options: Any) -> tuple[torch.Tensor, float, int]:
    """(intensities in [0, 1] on the host, seconds, the batch size used) of one whole-volume sampling run."""
    chain = make_sampler(sampler, model.diffusion, steps, **({"start_timestep": 600} if "prior" in options else {}))
    used: list[int] = []
    check.sync()
    tic = time.perf_counter()
    out = sample_slices(model.model, model.conditioning, chain, classes, range(len(classes)), seed=seed,
                        device=check.device, batch_size=batch_size, precision=precision, guidance=guidance,
                        on_batch_size=used.append, **options)
    check.sync()
    return out, time.perf_counter() - tic, used[-1]


def stage_syncs(check: Check, model: LoadedModel, classes: torch.Tensor) -> tuple[bool | None, str]:
    """Host syncs counted with torch.cuda.set_sync_debug_mode from the second step on (the first copies the
    schedule's tables), with guidance, neighbour agreement (with a threshold), correlated noise and a prior start."""
    if not check.cuda:
        sample(check, model, classes[:4], 2, "fp32", batch_size=2, guidance=0.5, sampler="ancestral",
               slice_agreement=(0.5, 0.5), slice_correlation=0.5, prior=torch.zeros(NUM_CLASSES))
        return None, "ran on the CPU; syncs are counted on CUDA only (Testing/test_denoiser.py counts them on 'meta')"
    marks: list[int] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

        def on_step(fraction: float) -> None:
            marks.append(sum("synchroniz" in str(w.message) for w in caught))

        sample(check, model, classes[:16], 4, "bf16", batch_size=8, guidance=0.5, sampler="ancestral",
               slice_agreement=(0.5, 0.5), slice_correlation=0.5, prior=torch.zeros(NUM_CLASSES), on_step=on_step)
        torch.cuda.set_sync_debug_mode(0)
    for w in caught:
        check.detail(f"sync warning: {w.message}")
    in_loop = marks[-1] - marks[2]
    return in_loop == 0, (f"{in_loop} host syncs from the second step on ({marks[-1]} up to the last chunk, "
                          f"{len(caught)} in all with the final read-back)")


def stage_speed(check: Check, model: LoadedModel, classes: torch.Tensor) -> tuple[bool | None, str]:
    """Slices/s and achieved TFLOP/s of DDIM on the whole volume with the batch 'auto' picks, fp32 and bf16, and bf16
    with channels_last on CUDA (switched on by default only where it pays)."""
    flops = evaluation_flops(model)
    name, peak = bf16_peak(check)
    steps, results = check.sizes.steps, {}
    runs = [("fp32", False), ("bf16", False)] + ([("bf16", True)] if check.cuda else [])
    for precision, channels_last in runs:
        with channels_last_on_cuda(model.model) if channels_last else contextlib.nullcontext():
            sample(check, model, classes, 1, precision)  # warm-up: kernels, autocast, the probes
            out, seconds, batch = sample(check, model, classes, steps, precision)
        rate = len(classes) * steps / seconds
        tflops = flops * len(classes) * steps / seconds / 1e12
        key = precision + (" channels_last" if channels_last else "")
        results[key] = rate
        share = f", {100 * tflops / peak:.1f} % of the {name} bf16 peak {peak:.0f}" if peak and precision == "bf16" else ""
        check.say(f"  {key}: {rate:.3g} slices/s ({len(classes)} slices x {steps} DDIM steps in {seconds:.2f} s, "
                  f"batch auto = {batch}), {tflops:.3g} TFLOP/s at {flops / 1e9:.3g} GFLOP per slice{share}")
        if not torch.isfinite(out).all():
            return False, f"{key}: non-finite output"
    speedup = results["bf16"] / results["fp32"]
    layout = ""
    if "bf16 channels_last" in results:
        layout = f"; channels_last {results['bf16 channels_last'] / results['bf16']:.2f}x NCHW in bf16"
    if not check.cuda:
        return True, f"bf16 {speedup:.2f}x fp32 on the CPU (not judged){layout}"
    return speedup >= 1.3, f"bf16 {speedup:.2f}x fp32{layout}"


def stage_batch_independence(check: Check, model: LoadedModel, classes: torch.Tensor) -> tuple[bool | None, str]:
    """The same seed twice at the batch 'auto' picks, and at batch 5, fp32 (differences in HU, before rounding)."""
    volume = classes[: 12 if check.dry else 24]
    first, _, batch = sample(check, model, volume, 4, "fp32")
    again, _, _ = sample(check, model, volume, 4, "fp32")
    other, _, _ = sample(check, model, volume, 4, "fp32", batch_size=5)
    repeat = float((first - again).abs().max()) * HU_PER_UNIT
    across = ((first - other).abs() * HU_PER_UNIT).flatten()
    p999, worst = float(torch.quantile(across[:1_000_000], 0.999)), float(across.max())
    ok = repeat <= (1.0 if check.cuda else 0.0) and p999 <= 1.0 and worst <= 25.0
    return ok, (f"repeat at batch {batch}: max {repeat:.3g} HU; batch {batch} vs 5: 99.9th percentile "
                f"{p999:.3g} HU, max {worst:.3g} HU")


def stage_bf16_vs_fp32(check: Check, model: LoadedModel, classes: torch.Tensor) -> tuple[bool | None, str]:
    """The network's output in bf16 against fp32 on the same inputs, at t = 10, 500, 999 (relative L2)."""
    generator = torch.Generator().manual_seed(3)
    n = 8 if check.dry else 16
    denoiser = {p: VolumeDenoiser(model.model, model.conditioning, classes[:n], batch_size=8, device=check.device,
                                  precision=p) for p in ("fp32", "bf16")}
    worst, scale = 0.0, float("inf")
    for t in (10, 500, 999):
        x = torch.randn((n, 1, check.sizes.image, check.sizes.image), generator=generator).to(check.device)
        timesteps = torch.full((n,), t, device=check.device)
        with torch.inference_mode():
            reference = denoiser["fp32"](x, timesteps)
            reduced = denoiser["bf16"](x, timesteps)
        relative = float((reduced - reference).norm() / reference.norm())
        scale = min(scale, float(reference[:, :1].std()))
        check.detail(f"t={t}: relative L2 difference {relative:.4g}, fp32 output std {float(reference.std()):.4g}")
        worst = max(worst, relative)
    ok = 0 < worst <= 0.05 and scale >= 0.05  # 0 would mean bf16 never ran
    return ok, f"largest relative L2 difference {100 * worst:.2f} % (fp32 eps output std >= {scale:.3g})"


class _PlanRecords(logging.Handler):
    """Keeps the denoiser's 'batch size auto' log records."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("batch size auto"):
            self.records.append(record)


def stage_plan(check: Check, model: LoadedModel, classes: torch.Tensor) -> tuple[bool | None, str]:
    """'auto' on a volume larger than one chunk: the planned peak against the measured one, for fp32 and bf16 with
    guidance."""
    if not check.cuda:
        return None, f"free memory cannot be asked on the CPU: auto is {denoiser_module.FIXED_AUTO_BATCH}"
    handler, lines, ok = _PlanRecords(), [], True
    logging.getLogger("CTSemanticSynthLib.denoiser").addHandler(handler)
    try:
        for precision, guidance in (("fp32", 0.0), ("bf16", 1.0)):
            denoiser = VolumeDenoiser(model.model, model.conditioning, classes, batch_size="auto",
                                      device=check.device, precision=precision, guidance=guidance)
            x = torch.randn((len(classes), 1, check.sizes.image, check.sizes.image), device=check.device)
            t = torch.full((len(classes),), 500, device=check.device)
            with torch.inference_mode():
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                denoiser(x, t)  # plans (the probes), then one step
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                denoiser(x, t)
                torch.cuda.synchronize()
            measured = torch.cuda.max_memory_allocated() - base
            batch, _, free_mib, _, once, per_slice, cache, outputs = handler.records[-1].args
            planned = (once + batch * per_slice + cache + outputs) * 2**20
            ratio = measured / planned
            ok = ok and 0.5 <= ratio <= 1.05
            lines.append(f"{precision}{' + guidance' if guidance else ''}: {batch} of {len(classes)} slices, "
                         f"measured peak {measured / 2**30:.1f} GiB = {ratio:.2f} x plan")
            del denoiser, x
            gc.collect()
            torch.cuda.empty_cache()
    finally:
        logging.getLogger("CTSemanticSynthLib.denoiser").removeHandler(handler)
    return ok, "; ".join(lines)


def stage_out_of_memory(check: Check, model: LoadedModel, classes: torch.Tensor) -> tuple[bool | None, str]:
    """All slices in one chunk with the process capped at 5 % of the GPU: halved and retried, the same output as
    an uncapped run at the batch size it settled on."""
    if not check.cuda:
        return None, "no out-of-memory error to provoke on the CPU (Testing/test_denoiser.py fakes one)"
    volume = classes[:300]
    x = torch.randn((len(volume), 1, check.sizes.image, check.sizes.image), device=check.device,
                    generator=torch.Generator(check.device).manual_seed(0))
    t = torch.full((len(volume),), 500, device=check.device)
    sizes: list[int] = []
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(0.05)
    try:
        with torch.inference_mode():
            capped = VolumeDenoiser(model.model, model.conditioning, volume, batch_size=len(volume),
                                    device=check.device, on_batch_size=sizes.append)(x, t)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    with torch.inference_mode():
        free = VolumeDenoiser(model.model, model.conditioning, volume, batch_size=sizes[-1], device=check.device)(x, t)
    difference = float((capped - free).abs().max())
    ok = sizes[-1] < len(volume) and bool(torch.isfinite(capped).all()) and difference <= 1e-3
    return ok, (f"batch sizes {' -> '.join(map(str, sizes))}; max |difference| to an uncapped run at "
                f"{sizes[-1]}: {difference:.3g}")


# --- training stages ------------------------------------------------------------------------------------------------


def stage_train_sweep(check: Check, flops_per_slice: float) -> tuple[bool | None, str]:
    """Training steps (benchmarks/train_step.py's) at each batch, with and without activation checkpointing: peak
    memory in one process (reset between configurations), and it/s at the training batch."""
    import train_step

    name, peak = bf16_peak(check)
    precision = "bf16" if check.cuda else "fp32"
    peaks, parts = {}, []
    for batch in check.sizes.sweep_batches:
        for checkpointing in (False, True):
            warmup, timed = check.sizes.sweep_steps
            args = argparse.Namespace(
                image_size=check.sizes.image, batch_size=batch, iterations=timed, warmup=warmup, threads=0,
                device=check.device.type, arch="paper", use_checkpoint=checkpointing, channels_last=False,
                compile=False, precision=precision)
            key = f"{batch}{' ckpt' if checkpointing else ''}"
            try:
                with tiny_arch(check):
                    result = train_step.measure("ours", args)
                peaks[key] = result["peak_mib"]
                parts.append(f"{key}: {result['peak_mib'] / 1024:.2f} GiB, {result['it_per_s']:.3g} it/s")
            except torch.OutOfMemoryError:
                parts.append(f"{key}: out of memory")
            gc.collect()
            if check.cuda:
                torch.cuda.empty_cache()
    check.say("  training peak memory " + "; ".join(parts))
    batch = check.sizes.sweep_batches[0]
    warmup, timed = check.sizes.speed_steps
    args = argparse.Namespace(image_size=check.sizes.image, batch_size=check.sizes.train_batch, iterations=timed,
                              warmup=warmup, threads=0, device=check.device.type, arch="paper", use_checkpoint=False,
                              channels_last=False, compile=False, precision=precision)
    with tiny_arch(check):
        speed = train_step.measure("ours", args)
    tflops = 3 * flops_per_slice * check.sizes.train_batch * speed["it_per_s"] / 1e12
    share = f" = {100 * tflops / peak:.1f} % of the {name} bf16 peak" if peak else ""
    summary = (f"{speed['it_per_s']:.3g} it/s at batch {check.sizes.train_batch} {precision}, ~{tflops:.3g} TFLOP/s "
               f"(3 x forward){share}")
    if not check.cuda:
        return str(batch) in peaks, summary + "; memory not judged on the CPU (process peak RSS)"
    fits = str(batch) in peaks and f"{batch} ckpt" in peaks
    saving = 1 - peaks.get(f"{batch} ckpt", 0) / peaks.get(str(batch), 1)
    return fits and saving >= 0.3, summary + f"; checkpointing saves {100 * saving:.0f} % at batch {batch}"


@contextlib.contextmanager
def tiny_arch(check: Check) -> Iterator[None]:
    """train_step's 'paper' layout, tiny on --dry-run."""
    import train_step

    saved = train_step.ARCHS["paper"]
    if check.dry:
        train_step.ARCHS["paper"] = TINY_NET
    try:
        yield
    finally:
        train_step.ARCHS["paper"] = saved


def stage_resume(check: Check) -> tuple[bool | None, str]:
    """The paper-size trainer (bf16, loss-aware timesteps, so that pending losses cross the checkpoint) trained 2h
    steps in one run and h + h with a resume in another, under deterministic algorithms: the resumed weights' distance
    to the uninterrupted ones, relative to how far the last h steps moved them."""
    from training import train

    if check.prepare is not None and check.prepare.wait() != 0:
        return False, f"training.prepare failed (exit {check.prepare.returncode}): see the log"
    half = check.sizes.half
    flags = ["--data", str(check.work / "cache"), "--device", check.device.type, "--batch-size",
             str(check.sizes.train_batch), "--precision", "bf16" if check.cuda else "fp32", "--timestep-sampler",
             "loss-aware", "--checkpoint-every", str(half), "--log-every", "1", "--sample-every", "0"]
    for key, value in check.sizes.net.items():
        flags += [f"--{key.replace('_', '-')}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    torch.use_deterministic_algorithms(True, warn_only=True)
    weights = {}
    try:
        for run, iterations, resume in (("whole", 2 * half, False), ("parts", half, False), ("parts", 2 * half, True)):
            config, _ = train.parse_config(flags + ["--out", str(check.work / run), "--iterations", str(iterations)])
            train.Trainer(config, resume=resume).run()
            state = torch.load(check.work / run / "checkpoint.pt", map_location="cpu", weights_only=True)
            weights[(run, iterations)] = state["model"]
    finally:
        torch.use_deterministic_algorithms(False)
    whole, resumed, middle = weights[("whole", 2 * half)], weights[("parts", 2 * half)], weights[("parts", half)]
    distance = max(float((whole[k].float() - resumed[k].float()).abs().max()) for k in whole)
    moved = max(float((whole[k].float() - middle[k].float()).abs().max()) for k in whole)
    losses = {run: [float(r["loss"]) for r in csv.DictReader(open(check.work / run / "log.csv"))]
              for run in ("whole", "parts")}
    finite = all(math.isfinite(v) for values in losses.values() for v in values)
    loss_gap = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(losses["whole"], losses["parts"]))
    ratio = distance / max(moved, 1e-30)
    return finite and ratio <= 1e-2, (f"after {2 * half} steps max |weights whole - resumed| {distance:.3g} = "
                                      f"{ratio:.2g} x the last {half} steps' change; losses finite {finite}, "
                                      f"largest relative loss difference {loss_gap:.2g}")


def stage_compile(check: Check, model: LoadedModel, classes: torch.Tensor) -> tuple[bool | None, str]:
    """torch.compile of the sampling network (bf16): its output against eager, and its speed."""
    left = BUDGET_S[check.device.type] - check.elapsed()
    if left < COMPILE_S[check.device.type]:
        return None, f"{left:.0f} s of the budget left, the compile stage needs {COMPILE_S[check.device.type]} s"
    precision = "bf16" if check.cuda else "fp32"
    eager, eager_s, _ = sample(check, model, classes, check.sizes.steps, precision)
    compiled = LoadedModel(torch.compile(model.model), model.diffusion, model.config, "", model.path)
    tic = time.perf_counter()
    sample(check, compiled, classes, 1, precision)
    compile_s = time.perf_counter() - tic
    out, seconds, _ = sample(check, compiled, classes, check.sizes.steps, precision)
    relative = float((out - eager).norm() / eager.norm())
    return relative <= 2e-2, (f"compiled in {compile_s:.0f} s; {eager_s / seconds:.2f}x eager {precision} speed, "
                              f"relative L2 difference {relative:.2g}")


# --- the run --------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    with open(args.log, "a", encoding="utf-8") as log:
        sys.stderr = log  # progress bars, warnings, the trainer's lines: the log only
        logging.basicConfig(stream=log, level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        check = Check(log, args.dry_run, args.work, None)
        if check.cuda and not torch.cuda.is_available():
            check.say("FAIL environment: torch sees no CUDA GPU (use --dry-run on a CPU)")
            return 1
        check.prepare = start_prepare(check)
        name, peak = bf16_peak(check)
        check.say(f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), "
                  f"Python {sys.version.split()[0]}, {name}" + (f", bf16 peak {peak:.0f} TFLOP/s" if peak else ""))
        model = randomised_network(check)
        check.say(f"network: {sum(p.numel() for p in model.model.parameters()) / 1e6:.3g} M parameters at "
                  f"{check.sizes.image} px ({'tiny, --dry-run' if check.dry else 'the paper layout'})")
        classes = class_slices(check, max(check.sizes.slices, 24))
        check.stage("host syncs while sampling", "0 from the second step on", lambda: stage_syncs(check, model, classes))
        check.stage("sampling speed", "bf16 >= 1.3x fp32 slices/s, finite",
                    lambda: stage_speed(check, model, classes[: check.sizes.slices]))
        check.stage("batch-size independence", "repeat within 1 HU (0 on the CPU); other batch: 99.9 % within 1 HU, "
                    "max 25 HU",
                    lambda: stage_batch_independence(check, model, classes))
        check.stage("bf16 vs fp32 output", "0 < relative L2 <= 5 %, fp32 output std >= 0.05",
                    lambda: stage_bf16_vs_fp32(check, model, classes))
        plan_classes = class_slices(check, check.sizes.plan_slices)
        check.stage("batch size auto plan", "measured peak 0.5-1.05x the plan",
                    lambda: stage_plan(check, model, plan_classes))
        check.stage("out of memory while sampling", "halved, finite, within 1e-3 of an uncapped run",
                    lambda: stage_out_of_memory(check, model, plan_classes))
        flops = evaluation_flops(model)
        check.stage("training speed and memory", "batch fits; checkpointing saves >= 30 % (CUDA)",
                    lambda: stage_train_sweep(check, flops))
        check.stage("resume (deterministic algorithms)", "resumed - whole <= 1 % of the last half's change",
                    lambda: stage_resume(check))
        check.stage("torch.compile", "relative L2 to eager <= 2 %", lambda: stage_compile(check, model, classes))
        total, budget = check.elapsed(), BUDGET_S[check.device.type]
        check.stage("total time", f"<= {budget} s", lambda: (total <= budget, f"{total:.0f} s, installs and imports "
                                                             "included"))
        check.say(f"{'FAILED: ' + ', '.join(check.failed) if check.failed else 'all stages passed'}; log {args.log}")
        return 1 if check.failed else 0


def start_prepare(check: Check) -> subprocess.Popen:
    """The bundled sample prepared for training (``training.prepare``) in the background while sampling runs."""
    sources = check.work / "src"
    for kind, name in (("images", "ct.nii.gz"), ("labels", "seg_total.nii.gz")):
        (sources / kind).mkdir(parents=True, exist_ok=True)
        link = sources / kind / "sample.nii.gz"
        if not link.exists():
            link.symlink_to(REPO / "Resources" / "sample" / name)
    command = [sys.executable, "-m", "training.prepare", "--images", str(sources / "images"), "--labels",
               str(sources / "labels"), "--convention", "totalseg", "--holdout-every", "8", "--size",
               str(check.sizes.image), "--workers", str(check.sizes.workers), "--out", str(check.work / "cache")]
    check.detail("$ " + " ".join(command))
    return subprocess.Popen(command, cwd=REPO, stdout=check.log, stderr=subprocess.STDOUT,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


if __name__ == "__main__":
    sys.exit(main())
