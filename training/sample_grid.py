"""Sample grids during training: one row per slice, columns mask | real | synthetic."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from CTSemanticSynthLib.diffusion import GaussianDiffusion, make_sampler
from CTSemanticSynthLib.io import atomic_outputs
from CTSemanticSynthLib.synthesis import class_prior, sample_slices


def sample_grid_slices(model: torch.nn.Module, diffusion: GaussianDiffusion, classes: torch.Tensor,
                       conditioning: str, *, steps: int, start_timestep: int | None,
                       class_means: list[float] | None, device: torch.device, seed: int = 0) -> torch.Tensor:
    """DDIM samples [B, S, S] in [0, 1] for class slices [B, S, S] (with a 2.5D model's neighbours: [B, 1 + 2k, S, S]);
    from the noised class-mean prior if asked, with the model's own guidance scale (as ``ctsynth`` samples it)."""
    if start_timestep is not None and class_means is None:
        raise ValueError("a start timestep needs the class means")
    sampler = make_sampler("ddim", diffusion, steps, start_timestep=start_timestep)
    prior = class_prior(class_means) if start_timestep is not None else None
    guidance = float(model.config.get("guidance_scale", 0.0))
    model.eval()
    try:
        return sample_slices(model, conditioning, sampler, classes, range(len(classes)), seed=seed, device=device,
                             prior=prior, guidance=guidance)
    finally:
        model.train()


def write_sample_grid(path: Path, model: torch.nn.Module, diffusion: GaussianDiffusion, images: torch.Tensor,
                      classes: torch.Tensor, conditioning: str, *, steps: int, start_timestep: int | None,
                      class_means: list[float] | None, device: torch.device,
                      colors: Sequence[tuple[int, int, int]]) -> None:
    """PNG grid for real images [B, 1, S, S] in [-1, 1] and their classes [B, S, S] (or [B, 1 + 2k, S, S]), the
    classes drawn in their class set's ``colors``."""
    synthetic = sample_grid_slices(model, diffusion, classes, conditioning, steps=steps, start_timestep=start_timestep,
                              class_means=class_means, device=device)
    save_grid(path, images, classes, synthetic, colors)


def save_grid(path: Path, images: torch.Tensor, classes: torch.Tensor, synthetic: torch.Tensor,
              colors: Sequence[tuple[int, int, int]]) -> None:
    """PNG rows mask | real | synthetic for real images [B, 1, S, S] in [-1, 1], classes [B, S, S] and synthetic
    slices [B, S, S] in [0, 1]."""
    real = (images[:, 0] + 1) / 2
    colours = np.asarray(colors, dtype=np.uint8)
    rows = []
    for c, r, s in zip((classes if classes.ndim == 3 else classes[:, 0]).numpy(), real.numpy(), synthetic.numpy()):
        grey = [np.repeat((np.clip(a, 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=-1) for a in (r, s)]
        rows.append(np.concatenate([colours[c], *grey], axis=1))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_outputs(path, overwrite=True) as (tmp,):
        Image.fromarray(np.concatenate(rows, axis=0)).save(tmp, format="PNG")
