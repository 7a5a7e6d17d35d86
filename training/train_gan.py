"""Train a GAN baseline of the paper's Table 2 (Pix2Pix, SPADE, OASIS) on a slice cache, like training.train.

    python -m training.train_gan --config training/configs/pix2pix.yaml --data cache/amos256 --out runs/pix2pix
    python -m training.train_gan --method oasis --data cache/amos256 --out runs/oasis --resume
    torchrun --nproc_per_node 4 -m training.train_gan --method spade --data cache/amos256 --out runs/spade

The run machinery is training.train's (slice cache, per-step random streams, EMA, AMP, atomic checkpoint.pt and exact
--resume, log.csv, sample grids, torchrun DDP); this file adds the generator, the method's discriminator and one
discriminator + one generator update per iteration. Defaults are each method's published hyper-parameters
(training/baselines/methods.py); ``iterations`` 0 means ``epochs`` passes over the training slices (the paper
trains the GANs for 300 epochs). ``OUT/model`` holds the generator (its EMA for OASIS) as a ``ctsynth`` model folder
(``kind: generator``): ``ctsynth synth --model OUT/model`` runs it, one forward pass per slice.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from CTSemanticSynthLib.checkpoint import save_model
from CTSemanticSynthLib.errors import InputError
from CTSemanticSynthLib.labels import NUM_CLASSES
from CTSemanticSynthLib.factory import create_generator
from CTSemanticSynthLib.models.generators import GENERATORS, generator_defaults
from CTSemanticSynthLib.preprocess import one_hot
from CTSemanticSynthLib.synthesis import generate_slices

from . import train
from .baselines import METHODS, make_method
from .baselines.methods import init_weights
from .dataset import model_batch
from .ema import ema_rate, update_ema
from .sample_grid import save_grid

GENERATOR_OPTIONS = {"gen_channels": "channels", "hidden_channels": "hidden_channels",
                     "noise_channels": "noise_channels", "dropout": "dropout"}
"""Trainer option -> generator config key (each method uses the keys its generator has)."""


def gan_defaults(method: str = "pix2pix") -> dict[str, Any]:
    """The shared trainer settings, the generator/discriminator widths and the method's published
    hyper-parameters (``training.baselines.methods``); 300 epochs at batch 16 (``iterations`` 0)."""
    if method not in METHODS:
        raise InputError(f"--method {method!r} is not one of {', '.join(GENERATORS)}")
    generator = generator_defaults(method)
    return train.trainer_defaults() | {
        "method": method, "gen_channels": generator["channels"], "disc_channels": 64,
        "hidden_channels": generator_defaults("spade")["hidden_channels"], "noise_channels":
        generator.get("noise_channels", 0), "dropout": generator_defaults("pix2pix")["dropout"],
        "iterations": 0, "epochs": 300.0, "lambda_l1": 100.0, "lambda_fm": 10.0, "lambda_labelmix": 10.0,
        **METHODS[method].defaults,
    }


def check_gan_config(config: dict[str, Any]) -> None:
    """InputError naming the first option that cannot work; run before anything is read or created."""
    train.check_trainer_config(config | {"iterations": config["iterations"] or 1})  # 0: from epochs
    train.check_options(config, {"iterations": 0, "gen_channels": 1, "disc_channels": 1, "hidden_channels": 1,
                                 "noise_channels": 0, "dropout": 0.0, "beta1": 0.0, "beta2": 0.0, "lambda_l1": 0.0,
                                 "lambda_fm": 0.0, "lambda_labelmix": 0.0},
                        ("lr_d", "epochs"), {"method": GENERATORS})
    for key in ("dropout", "beta1", "beta2"):
        if not config[key] < 1:
            raise InputError(f"--{key.replace('_', '-')} {config[key]} must be below 1")
    if config["noise_channels"] and config["method"] != "oasis":
        raise InputError(f"--noise-channels is for oasis; {config['method']} takes no noise")
    if config["method"] == "oasis" and not config["noise_channels"]:
        raise InputError("--noise-channels 0: OASIS's generator needs noise (the paper's 64 channels)")


def parse_gan_config(argv: list[str] | None = None) -> tuple[dict[str, Any], Any]:
    """Defaults of the chosen method <- YAML file (--config) <- flags, checked."""
    return train.parse_config(argv, lambda explicit: gan_defaults(explicit.get("method", "pix2pix")),
                              check_gan_config, prog="train_gan", description=__doc__)


def generator_config(config: dict[str, Any], image_size: int) -> dict[str, Any]:
    """The generator's config from the trainer options (the keys this method's generator has) and the slice size."""
    keys = generator_defaults(config["method"])
    return {"method": config["method"], "image_size": image_size} | {
        key: config[option] for option, key in GENERATOR_OPTIONS.items() if key in keys}


class GANTrainer(train.Trainer):
    """training.train's run machinery with a generator (``model``, ``ema``) and the method's discriminator."""

    RESUME_FIXED = ("method", "gen_channels", "disc_channels", "hidden_channels", "noise_channels", "data",
                    "batch_size")

    def _build(self) -> None:
        cfg = self.config
        size = self.train_data.image_size
        if self.train_data.class_set.name != "paper":
            raise InputError(f"{cfg['data']} holds the '{self.train_data.class_set.name}' class set; the GAN baselines "
                             "train on the paper's classes only: prepare a cache without --class-set")
        if not cfg["iterations"]:
            cfg["iterations"] = max(1, math.ceil(cfg["epochs"] * len(self.train_data) / cfg["batch_size"]))
        self.method = make_method(cfg)
        self.LOG_KEYS = ("g_loss", "d_loss", *self.method.LOG_KEYS)
        self.model = self._place(lambda: self._init(create_generator(generator_config(cfg, size))), "generator")
        self.disc = self._place(lambda: self._init(self.method.discriminator(NUM_CLASSES, size)), "discriminator")
        if self.world > 1 and self.device.type == "cuda":  # batch statistics over all ranks, as the authors' SyncBN
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        betas = (cfg["beta1"], cfg["beta2"])
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg["lr"], betas=betas)
        self.optimizer_d = torch.optim.Adam(self.disc.parameters(), lr=cfg["lr_d"], betas=betas)
        self.disc_net = self._wrap(self.disc)

    def _init(self, module: nn.Module) -> nn.Module:
        init_weights(module, self.method.init)
        return module

    def _stateful(self) -> dict[str, Any]:
        return {"model": self.model, "ema": self.ema, "disc": self.disc, "optimizer": self.optimizer,
                "optimizer_d": self.optimizer_d, "scaler": self.scaler}

    def train_step(self) -> dict[str, torch.Tensor]:
        """One discriminator update on (real, detached fake), then one generator update against the updated
        discriminator (Pix2Pix's order); one gradient scaler for both under fp16."""
        cfg = self.config
        real, classes = model_batch(*self._slices())
        mask = one_hot(classes)
        if cfg["channels_last"]:
            real, mask = (t.contiguous(memory_format=torch.channels_last) for t in (real, mask))
        seed = train.stream_seed(cfg["seed"], self.rank, self.step, "noise")
        torch.manual_seed(seed)  # dropout, LabelMix coins
        self.generator.manual_seed(seed)
        noise = None
        if self.model.noise_channels:
            noise = torch.randn((len(real), self.model.noise_channels), generator=self.generator, device=self.device)
        with self._autocast():
            fake = self.net(mask, noise)
            d_loss, d_metrics = self.method.d_loss(self.disc_net, mask, classes, real, fake.detach())
        self.optimizer_d.zero_grad(set_to_none=True)
        self.scaler.scale(d_loss).backward()
        self.scaler.step(self.optimizer_d)
        self.disc.requires_grad_(False)
        try:
            with self._autocast():
                g_loss, g_metrics = self.method.g_loss(self.disc, mask, classes, real, fake)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(g_loss).backward()
        finally:
            self.disc.requires_grad_(True)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        update_ema(self.ema, self.model, ema_rate(self.step, cfg["ema_rate"]))
        self.step += 1
        return {"g_loss": g_loss.detach(), "d_loss": d_loss.detach(), **d_metrics, **g_metrics}

    def write_samples(self) -> Path:
        """A grid mask | real | synthetic (the exported generator) for fixed held-out (or training) slices."""
        data = self.test_data or self.train_data
        index = torch.linspace(0, len(data) - 1, steps=min(4, len(data))).long()
        images, classes = data.batch(index)
        path = self.out / "samples" / f"step_{self.step:07d}.png"
        self.ema.eval()
        try:
            synthetic = generate_slices(self.ema, classes, index.tolist(), seed=0, device=self.device)
        finally:
            self.ema.train()
        save_grid(path, images, classes, synthetic, self.train_data.class_set.colors)
        return path

    def export(self) -> Path:
        """The generator (EMA weights) -> OUT/model, ``kind: generator``, with the training summary."""
        target = self.out / "model"
        cfg = self.config
        extra = {
            "description": f"{cfg['method']} baseline trained with CTSemanticSynth training/train_gan.py",
            "class_means": self.class_means,
            "training": self.training_summary() | {k: cfg[k] for k in ("method", "lr_d", "beta1", "beta2", "epochs")},
        }
        save_model(target, self.ema, None, name=cfg["name"] or self.out.name, extra=extra, half=cfg["half_export"],
                   overwrite=True)
        return target


def main(argv: list[str] | None = None) -> int:
    return train.main(argv, parse_gan_config, GANTrainer, prog="train_gan")


if __name__ == "__main__":
    sys.exit(main())
