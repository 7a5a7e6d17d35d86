"""Train a conditional diffusion model on a slice cache (single GPU, torchrun DDP, or CPU).

    python -m training.train --data cache/amos256 --out runs/mask_guided --conditioning mask_encoder
    python -m training.train --config training/configs/demo.yaml --resume
    torchrun --nproc_per_node 4 -m training.train --data cache/amos256 --out runs/concat

Every option has a default in ``train_defaults()`` (the paper's protocol); a YAML file sets any of them and
flags override both. ``--batch-size`` is the global batch, split evenly across the torchrun ranks. Each rank
draws its slices, timesteps and noise from a stream derived from (seed, rank, step), so ranks differ and a
resumed run continues exactly as an uninterrupted one. The run folder gets ``config.json`` (resolved), ``checkpoint.pt`` (written atomically
every ``checkpoint_every`` iterations, with model, EMA, optimizer, scaler, step and timestep-sampler states), ``log.csv``,
TensorBoard scalars (when ``tensorboard`` is installed), ``samples/`` grids and, at the end, ``model/`` — the
EMA weights as a ``ctsynth`` model folder.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from CTSemanticSynthLib.checkpoint import load_model, save_model
from CTSemanticSynthLib.device import cuda_native_bf16, select_device
from CTSemanticSynthLib.diffusion import diffusion_defaults
from CTSemanticSynthLib.errors import CTSynthError, InputError
from CTSemanticSynthLib.factory import create_diffusion, create_model
from CTSemanticSynthLib.io import atomic_outputs
from CTSemanticSynthLib.labels import NUM_CLASSES
from CTSemanticSynthLib.models import model_defaults
from CTSemanticSynthLib.models.config import resolve_config
from CTSemanticSynthLib.parsing import OneLineParser, boolean
from CTSemanticSynthLib.preprocess import condition_inputs, drop_condition
from CTSemanticSynthLib.progress import ProgressDisplay
from CTSemanticSynthLib.synthesis import DEFAULT_PRESETS, MAX_SEED

from .dataset import SliceCache, model_batch
from .ema import ema_rate, update_ema
from .sample_grid import write_sample_grid
from .timestep_sampler import make_timestep_sampler

CHECKPOINT = "checkpoint.pt"


MODEL_FIXED = ("image_size", "in_channels", "out_channels", "num_classes")
"""Network settings that are no flags: the slice cache fixes the size and classes, the loss the output channels."""
DIFFUSION_FIXED = ("learn_sigma", "timestep_respacing")
"""Diffusion settings that are no flags: 'hybrid' loss learns the variance, 'mse' does not; respacing is for
sampling."""
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
RESUME_FIXED = ("conditioning", "model_channels", "channel_mult", "num_res_blocks", "context_slices", "schedule",
                "prediction", "data", "batch_size")
"""Options a resumed run must share with the saved one (the global batch too: it sets the optimisation)."""
TIMESTEP_SAMPLERS = ("uniform", "loss-aware")


def trainer_defaults() -> dict[str, Any]:
    """The settings every trainer has (this one and ``training.train_gan``): data, run folder, optimisation
    length, EMA, precision, checkpoint/log/sample cadence, seed, device."""
    return {
        "data": "", "out": "", "name": "", "batch_size": 16, "lr": 1e-4, "iterations": 150_000, "ema_rate": 0.9999,
        "precision": "auto", "compile": False, "channels_last": False, "checkpoint_every": 1000, "sample_every": 5000,
        "log_every": 50, "seed": 0, "device": "auto", "threads": 0, "half_export": False,
    }


def train_defaults() -> dict[str, Any]:
    """The paper's protocol (AMOS22, 256 px, batch 16, Adam 1e-4, 150k iterations) plus trainer settings.

    Every network and diffusion setting of ``model_defaults()`` / ``diffusion_defaults()`` is an option, except
    MODEL_FIXED and DIFFUSION_FIXED; ``encoder_channels`` 0 means the library's default (half the width).
    """
    network = {k: (0 if v is None else v) for k, v in model_defaults().items() if k not in MODEL_FIXED}
    diffusion = {k: v for k, v in diffusion_defaults().items() if k not in DIFFUSION_FIXED}
    return trainer_defaults() | network | diffusion | {
        "weight_decay": 0.0, "grad_clip": 1.0, "timestep_sampler": "uniform", "max_timestep": 0, "sample_steps": 25,
        "sample_start_timestep": 0, "init_from": "", "sample_slice_agreement": 0.0, "boundary_correction": False,
    }


def parse_config(argv: list[str] | None = None, defaults_for: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 check: Callable[[dict[str, Any]], None] | None = None, prog: str = "train",
                 description: str | None = __doc__) -> tuple[dict[str, Any], argparse.Namespace]:
    """Defaults <- YAML file (--config) <- flags, checked; returns (config, parsed flags).

    ``defaults_for(explicit)`` gives the defaults given the options set in the YAML file and flags (the GAN trainer's
    depend on ``method``; every call must return the same keys and types); ``check`` validates the result.
    """
    defaults_for = defaults_for or (lambda explicit: train_defaults())
    check = check or check_config
    defaults = defaults_for({})
    parser = OneLineParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="YAML file with any of the options below")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--export-only", action="store_true",
                        help="write OUT/model from OUT/checkpoint.pt without training (e.g. after stopping early)")
    for key, value in defaults.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, type=boolean, default=None, metavar="BOOL")
        elif isinstance(value, list):
            parser.add_argument(flag, type=_int_list, default=None, metavar="A,B,..")
        else:
            parser.add_argument(flag, type=type(value), default=None)
    args = parser.parse_args(argv)
    explicit = _read_yaml(args.config, defaults) if args.config is not None else {}
    explicit.update({k: v for k, v in vars(args).items() if k in defaults and v is not None})
    config = defaults_for(explicit) | explicit
    check(config)
    return config, args


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 on a CUDA GPU with native bf16 (emulated bf16 does not count), fp16 (+ grad scaler) on
    other CUDA GPUs, fp32 elsewhere; other values are kept."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if cuda_native_bf16() else "fp16"


def rank_batch_size(batch_size: int, world: int) -> int:
    """The per-rank share of the global ``batch_size``; InputError unless it divides evenly."""
    if batch_size % world:
        raise InputError(f"--batch-size {batch_size} is the global batch and must be divisible by the "
                         f"{world} processes (e.g. {max(1, batch_size // world) * world})")
    return batch_size // world


def stream_seed(seed: int, rank: int, step: int, stream: str) -> int:
    """A 63-bit seed for one random stream ('data' or 'noise') of one rank at one step."""
    digest = hashlib.blake2b(f"{seed}:{rank}:{step}:{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def draw_indices(rows: int, batch: int, seed: int, rank: int, step: int) -> torch.Tensor:
    """The training-slice indices rank ``rank`` trains on at ``step`` (a pure function: resumes need no state)."""
    generator = torch.Generator().manual_seed(stream_seed(seed, rank, step, "data"))
    return torch.randint(rows, (batch,), generator=generator)


def check_options(config: dict[str, Any], at_least: dict[str, float], positive: tuple[str, ...],
                  choices: dict[str, tuple[str, ...]]) -> None:
    """InputError for the first option below its minimum, not greater than 0, or not one of its choices."""
    for key, low in at_least.items():
        if config[key] < low:
            raise InputError(f"--{_flag(key)} {config[key]} must be at least {low}")
    for key in positive:
        if not config[key] > 0:
            raise InputError(f"--{_flag(key)} {config[key]} must be greater than 0")
    for key, allowed in choices.items():
        if config[key] not in allowed:
            raise InputError(f"--{_flag(key)} {config[key]!r} is not one of {', '.join(allowed)}")


def check_trainer_config(config: dict[str, Any]) -> None:
    """InputError naming the first of the ``trainer_defaults()`` options that cannot work."""
    for key in ("data", "out"):
        if not config[key]:
            raise InputError(f"--{key} is required (or set it in the --config file)")
    check_options(config, {"batch_size": 1, "iterations": 1, "checkpoint_every": 1, "log_every": 1,
                           "sample_every": 0, "threads": 0, "seed": 0}, ("lr",), {"precision": PRECISIONS})
    if config["seed"] > MAX_SEED:
        raise InputError(f"--seed {config['seed']} is out of range: use 0..{MAX_SEED}")
    if not 0 <= config["ema_rate"] < 1:
        raise InputError(f"--ema-rate {config['ema_rate']} must lie in [0, 1)")
    select_device(config["device"])


def check_config(config: dict[str, Any]) -> None:
    """InputError naming the first option that cannot work; run before anything is read or created."""
    check_trainer_config(config)
    check_options(config, {"sample_steps": 1, "max_timestep": 0, "sample_start_timestep": 0, "weight_decay": 0.0,
                           "encoder_channels": 0}, ("grad_clip",), {"timestep_sampler": TIMESTEP_SAMPLERS})
    try:  # the network at its smallest valid size: the slice cache's size is checked when it is read
        resolve_config(**model_config(config, 2 ** max(len(config["channel_mult"]) - 1, 0), NUM_CLASSES))
    except (TypeError, ValueError) as exc:
        raise InputError(f"network options: {exc}") from None
    try:
        create_diffusion(diffusion_config(config))
    except (TypeError, ValueError) as exc:
        raise InputError(f"diffusion options: {exc}") from None


def _flag(key: str) -> str:
    return key.replace("_", "-")


def _read_yaml(path: Path, defaults: dict[str, Any]) -> dict[str, Any]:
    """Options from a YAML file, each converted to its default's type (YAML reads ``1e-4`` as a string)."""
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise InputError(f"--config {path}: cannot read it ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise InputError(f"--config {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise InputError(f"--config {path} must be a mapping of option: value")
    unknown = sorted(set(loaded) - set(defaults))
    if unknown:
        raise InputError(f"--config {path}: unknown option(s) {', '.join(unknown)}")
    out = {}
    for key, value in loaded.items():
        kind = type(defaults[key])
        try:
            if kind is list:
                out[key] = [int(v) for v in (value if isinstance(value, list) else str(value).split(","))]
            elif kind is bool:
                if not isinstance(value, bool):
                    raise ValueError
                out[key] = value
            else:
                out[key] = kind(value)
        except (TypeError, ValueError):
            raise InputError(f"--config {path}: {key}: {value!r} is not a {kind.__name__}") from None
    return out


def model_config(config: dict[str, Any], image_size: int, num_classes: int) -> dict[str, Any]:
    """The network's config: every model option, the slice size and class count (from the slice cache), and one
    output channel more for 'hybrid'."""
    out = {k: config[k] for k in model_defaults() if k not in MODEL_FIXED}
    out["encoder_channels"] = out["encoder_channels"] or None
    return out | {"image_size": image_size, "num_classes": num_classes,
                  "out_channels": 2 if config["loss"] == "hybrid" else 1}


def diffusion_config(config: dict[str, Any]) -> dict[str, Any]:
    """The diffusion's config: every diffusion option; the variance is learned exactly when the loss is 'hybrid'."""
    return diffusion_defaults() | {k: config[k] for k in diffusion_defaults() if k not in DIFFUSION_FIXED} | {
        "learn_sigma": config["loss"] == "hybrid"}


def warm_start(model: torch.nn.Module, source: str) -> None:
    """Start ``model`` from the weights of the model folder (or name) ``source``: tensors of equal shape are copied;
    a tensor that has more input channels here (a class set that extends the source's, as the anatomy set extends
    the paper's at the same indices) gets the source's channels first and zeros for the new ones, so the new classes
    start out ignored. InputError when any other tensor differs."""
    try:
        found = load_model(source).model.state_dict()
    except CTSynthError as exc:
        raise InputError(f"--init-from: {exc}") from None
    state = model.state_dict()
    for key, value in state.items():
        other = found.get(key)
        if other is not None and other.shape == value.shape:
            value.copy_(other)
        elif other is not None and other.ndim == value.ndim >= 2 and other.shape[0] == value.shape[0] and \
                other.shape[2:] == value.shape[2:] and other.shape[1] < value.shape[1]:
            value.zero_()[:, : other.shape[1]] = other
        else:
            raise InputError(f"--init-from {source}: its weight {key} "
                             f"{'is missing' if other is None else f'has shape {tuple(other.shape)}'}, this network's "
                             f"{tuple(value.shape)}: give a model with the same architecture")


class Trainer:
    """Holds the state of one run; ``run()`` trains to ``iterations`` and exports the EMA model.

    A subclass (``training.train_gan.GANTrainer``) replaces the hooks ``_build`` (networks, optimisers),
    ``_stateful`` (what a checkpoint holds), ``train_step``, ``write_samples`` and ``export``, and the class
    attributes below; the run folder, data, devices, DDP, precision, checkpoints, resume and logging are shared.
    """

    RESUME_FIXED: tuple[str, ...] = RESUME_FIXED
    LOG_KEYS: tuple[str, ...] = ("loss", "mse", "vb", "grad_norm")
    """The metrics ``train_step`` returns, in log.csv's column order."""

    def __init__(self, config: dict[str, Any], resume: bool) -> None:
        self.config = config
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank_batch = rank_batch_size(config["batch_size"], self.world)
        self.device = select_device(config["device"])
        if self.world > 1:
            if self.device.type == "cuda":  # before the process group, so NCCL binds this rank's GPU
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            # cuDNN autotuning picks kernels by timing: not when deterministic algorithms were asked for
            torch.backends.cudnn.benchmark = not torch.are_deterministic_algorithms_enabled()
        if config["threads"]:
            torch.set_num_threads(int(config["threads"]))
        self.out = Path(config["out"])
        self.train_data = SliceCache(config["data"], "train")
        try:
            self.test_data: SliceCache | None = SliceCache(config["data"], "test")
        except InputError:
            self.test_data = None
        self.class_means = self.train_data.class_means()
        self.precision = resolve_precision(config["precision"], self.device)
        self.dtype = AUTOCAST[self.precision]
        # on the device's type: a CPU fp16 run keeps a real scaler state, which a CUDA fp16 resume can load
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        torch.manual_seed(config["seed"])
        self._build()
        self.generator = torch.Generator(self.device)  # timesteps and noise, reseeded every step
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="slices")
        self._prefetched: tuple[int, Future] | None = None
        self.step = 0
        self.wall = 0.0
        self.net = self._wrap(self.model)
        if resume:
            self._load()
        elif (self.out / CHECKPOINT).exists():
            raise InputError(f"{self.out} already holds a run: pass --resume to continue it or choose another --out")

    def _build(self) -> None:
        """The network, its EMA copy, the optimiser, the diffusion and the timestep sampler."""
        config = self.config
        self.model = self._place(lambda: create_model(model_config(config, self.train_data.image_size,
                                                                   len(self.train_data.class_set.classes))), "network")
        if config["init_from"]:
            warm_start(self.model, config["init_from"])
        self.diffusion = create_diffusion(diffusion_config(config))
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config["lr"],
                                           weight_decay=config["weight_decay"])
        limit = config["max_timestep"] or self.diffusion.num_timesteps
        if not 0 < limit <= self.diffusion.num_timesteps or config["sample_start_timestep"] >= limit:
            raise InputError(f"max_timestep {config['max_timestep']} must lie in 1..{self.diffusion.num_timesteps} "
                             f"and exceed sample_start_timestep {config['sample_start_timestep']}")
        self.timesteps = make_timestep_sampler(config["timestep_sampler"], limit)

    def _place(self, build: Callable[[], torch.nn.Module], what: str) -> torch.nn.Module:
        """``build()`` on the device (channels_last if asked); InputError when its options do not fit the slices."""
        try:
            module = build().to(self.device)
        except ValueError as exc:
            raise InputError(f"{what} options do not fit the {self.train_data.image_size} px slices of "
                             f"{self.config['data']}: {exc}") from None
        return module.to(memory_format=torch.channels_last) if self.config["channels_last"] else module

    def _wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """The module as the training step calls it: in DistributedDataParallel under torchrun, compiled if asked."""
        net = module
        if self.world > 1:
            net = DistributedDataParallel(module, device_ids=[self.device] if self.device.type == "cuda" else None)
        return torch.compile(net) if self.config["compile"] else net

    # --- checkpoints ------------------------------------------------------------------------------------

    def _stateful(self) -> dict[str, Any]:
        """The objects (with ``state_dict``/``load_state_dict``) a checkpoint holds, by key."""
        return {"model": self.model, "ema": self.ema, "optimizer": self.optimizer, "scaler": self.scaler,
                "timesteps": self.timesteps}

    def _state(self) -> dict[str, Any]:
        return {key: value.state_dict() for key, value in self._stateful().items()} | {
            "step": self.step, "wall": self.wall, "precision": self.precision, "world_size": self.world,
            "config": json.dumps(self.config)}

    def save_checkpoint(self) -> None:
        """Write checkpoint.pt atomically (temp file + rename); rank 0 only."""
        if self.rank != 0:
            return
        with atomic_outputs(self.out / CHECKPOINT, overwrite=True) as (tmp,):
            torch.save(self._state(), tmp)

    def _load(self) -> None:
        path = self.out / CHECKPOINT
        if not path.is_file():
            raise InputError(f"{path} does not exist: nothing to resume or export; train first")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a damaged file
            raise InputError(f"--resume: {path} cannot be read ({type(exc).__name__}); it may be damaged") from None
        saved = json.loads(state["config"])
        changed = [k for k in self.RESUME_FIXED if saved.get(k) != self.config[k]]
        if changed:
            raise InputError(f"--resume: {', '.join(changed)} differ from the saved run in {path}")
        if state.get("precision") != self.precision:  # the grad-scaler state exists for fp16 only
            raise InputError(f"--resume: the run in {path} trained in {state.get('precision')}, this one would use "
                             f"{self.precision}: pass --precision {state.get('precision')}")
        for key, value in self._stateful().items():
            if key == "scaler" and not state[key]:  # from a scaler without state (fp32/bf16, or an older CPU fp16
                continue                            # run): an fp16 scaler starts from its initial scale
            value.load_state_dict(state[key])
        self.step, self.wall = int(state["step"]), float(state["wall"])

    # --- training ---------------------------------------------------------------------------------------

    @property
    def context_slices(self) -> int:
        """Neighbouring slices per side a 2.5D model sees (0: none; the GAN configs have no such key)."""
        return int(self.config.get("context_slices", 0))

    def _load_slices(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        indices = draw_indices(len(self.train_data), self.rank_batch, self.config["seed"], self.rank, step)
        return self.train_data.load(indices, pin=self.device.type == "cuda", context_slices=self.context_slices)

    def _slices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's stored slices (uint8 classes, float16 images) on the device; the next step's are read from
        the cache in a background thread meanwhile."""
        if self._prefetched is not None and self._prefetched[0] == self.step:
            images, classes = self._prefetched[1].result()
        else:
            images, classes = self._load_slices(self.step)
        self._prefetched = (self.step + 1, self._loader.submit(self._load_slices, self.step + 1))
        return images.to(self.device, non_blocking=True), classes.to(self.device, non_blocking=True)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Autocast to the run's precision, or nothing for fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def train_step(self) -> dict[str, torch.Tensor]:
        """One optimisation step on this rank's batch; returns the batch-mean losses (device tensors: reading them
        waits for the GPU, so the loop does that on logging steps only)."""
        cfg = self.config
        images, classes = model_batch(*self._slices())  # one-hot and edges are built here, on the device
        inputs = condition_inputs(classes, cfg["conditioning"], len(self.train_data.class_set.classes))
        if cfg["channels_last"]:
            images = images.contiguous(memory_format=torch.channels_last)
            inputs = {k: v.contiguous(memory_format=torch.channels_last) for k, v in inputs.items()}
        seed = stream_seed(cfg["seed"], self.rank, self.step, "noise")
        torch.manual_seed(seed)  # dropout
        self.generator.manual_seed(seed)
        t, weights = self.timesteps.sample(len(images), self.generator)
        noise = torch.randn(images.shape, generator=self.generator, device=self.device)
        if cfg["label_dropout"]:  # drawn after the noise, so runs without label dropout keep their streams
            keep = torch.rand(len(images), generator=self.generator, device=self.device) >= cfg["label_dropout"]
            inputs = drop_condition(inputs, keep)
        with self._autocast():
            losses = self.diffusion.training_losses(self.net, images, t, inputs, noise)
        self.timesteps.update(t, losses["loss"])
        loss = (losses["loss"].float() * weights).mean()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg["grad_clip"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        update_ema(self.ema, self.model, ema_rate(self.step, self.config["ema_rate"]))
        self.step += 1
        return {"loss": loss.detach(), "mse": losses["mse"].detach().mean(), "vb": losses["vb"].detach().mean(),
                "grad_norm": grad_norm.detach()}

    def run(self) -> Path:
        """Train to ``iterations`` (checkpointing, logging, sampling), then export ``OUT/model``."""
        cfg = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        main = self.rank == 0
        if main:
            run = {"world_size": self.world, "batch_per_rank": self.rank_batch, "precision": self.precision}
            (self.out / "config.json").write_text(json.dumps(cfg | {"run": run}, indent=2) + "\n")
        writer = _tensorboard(self.out) if main else None
        log_path = self.out / "log.csv" if main else Path(os.devnull)  # one log, written by rank 0
        new_log = main and not log_path.exists()
        with open(log_path, "a", newline="") as log_file, ProgressDisplay(
            "train:", "training", "step", total=cfg["iterations"], done=self.step, quiet=not main,
        ) as display:
            log = csv.writer(log_file)
            if new_log:
                log.writerow(["step", *self.LOG_KEYS, "lr", "it_per_s", "wall_s"])
            tic, since = time.perf_counter(), self.step
            while self.step < cfg["iterations"]:
                metrics = self.train_step()
                if self.step % cfg["log_every"] == 0 and main:
                    metrics = {k: float(v) for k, v in metrics.items()}
                    now = time.perf_counter()
                    self.wall += now - tic
                    rate = (self.step - since) / max(now - tic, 1e-9)
                    tic, since = now, self.step
                    log.writerow([self.step, *(f"{metrics[k]:.6g}" for k in self.LOG_KEYS),
                                  cfg["lr"], f"{rate:.4g}", f"{self.wall:.1f}"])
                    log_file.flush()
                    display.postfix(", ".join(f"{k} {metrics[k]:.4f}" for k in self.LOG_KEYS[:2]))
                    if writer is not None:
                        for key, value in metrics.items():
                            writer.add_scalar(f"train/{key}", value, self.step)
                display.update(self.step)
                if self.step % cfg["checkpoint_every"] == 0 or self.step == cfg["iterations"]:
                    self.save_checkpoint()
                if main and cfg["sample_every"] and self.step % cfg["sample_every"] == 0:
                    self.write_samples()
        self._loader.shutdown(cancel_futures=True)
        if writer is not None:
            writer.close()
        return self.export() if main else self.out / "model"

    def write_samples(self) -> Path:
        """A grid mask | real | synthetic (EMA model) for fixed held-out (or training) slices."""
        data = self.test_data or self.train_data
        index = torch.linspace(0, len(data) - 1, steps=min(4, len(data))).long()
        images, classes = data.batch(index, context_slices=self.context_slices)
        path = self.out / "samples" / f"step_{self.step:07d}.png"
        write_sample_grid(path, self.ema, self.diffusion, images, classes, self.config["conditioning"],
                          steps=self.config["sample_steps"], start_timestep=self.config["sample_start_timestep"] or None,
                          class_means=self.class_means, device=self.device, colors=self.train_data.class_set.colors)
        return path

    def training_summary(self) -> dict[str, Any]:
        """The model card's ``training`` record: length, batch, precision, data, hardware, time."""
        hardware = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.processor() or "cpu"
        return {"iterations": self.step, "batch_size": self.config["batch_size"], "batch_per_rank": self.rank_batch,
                "precision": self.precision, "lr": self.config["lr"], "data": str(self.config["data"]),
                "train_slices": len(self.train_data), "hardware": f"{hardware} x{self.world}",
                "wall_time_s": round(self.wall, 1), "ema_rate": self.config["ema_rate"]}

    def export(self) -> Path:
        """EMA weights -> OUT/model (safetensors + config.json), with the training summary and class means."""
        target = self.out / "model"
        extra = {
            "description": f"{self.config['conditioning']} model trained with CTSemanticSynth training/train.py",
            "class_means": self.class_means,
            "training": self.training_summary() | {"timesteps_trained": self.timesteps.num_timesteps},
        }
        start, steps = self.config["sample_start_timestep"], self.config["sample_steps"]
        presets: dict[str, dict[str, Any]] = {name: dict(preset) for name, preset in DEFAULT_PRESETS.items()}
        if start:  # the model was made to sample from the noised class-mean prior: every preset starts there
            presets = {
                "fast": {"sampler": "ddim", "steps": steps, "start_timestep": start},
                "balanced": {"sampler": "ddim", "steps": min(start + 1, 4 * steps), "start_timestep": start},
                "paper": {"sampler": "ancestral", "steps": start + 1, "start_timestep": start},
            }
        if self.config["sample_slice_agreement"]:
            presets["fast"]["slice_agreement"] = self.config["sample_slice_agreement"]
        if self.config["boundary_correction"]:
            presets = {name: preset | {"boundary_correction": True} for name, preset in presets.items()}
        if presets != DEFAULT_PRESETS:
            extra["sampling_presets"] = presets
        save_model(target, self.ema, self.diffusion, name=self.config["name"] or self.out.name, extra=extra,
                   half=self.config["half_export"], overwrite=True, classes=self.train_data.class_set,
                   intensity=self.train_data.intensity)
        return target


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


def main(argv: list[str] | None = None, parse: Callable[[list[str] | None], tuple[dict[str, Any], Any]] = parse_config,
         trainer_class: type[Trainer] = Trainer, prog: str = "train") -> int:
    """Parse, train (or ``--export-only``) and export; ``prog: error: ...`` and exit 2 for a user mistake."""
    try:
        config, args = parse(argv)
        trainer = trainer_class(config, resume=args.resume or args.export_only)
        model_dir = trainer.export() if args.export_only else trainer.run()
    except CTSynthError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; continue with --resume from the last checkpoint", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if trainer.rank == 0:
        print(f"{prog}: exported {model_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
