"""Sample grids during training: one row per slice, columns mask | real | synthetic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from CTSemanticSynthLib.diffusion import GaussianDiffusion, make_sampler, sample_loop
from CTSemanticSynthLib.labels import COLORS
from CTSemanticSynthLib.preprocess import condition_inputs


@torch.no_grad()
def sample_slices(model: torch.nn.Module, diffusion: GaussianDiffusion, classes: torch.Tensor, conditioning: str,
                  *, steps: int, start_timestep: int | None, class_means: list[float] | None,
                  device: torch.device, seed: int = 0) -> torch.Tensor:
    """DDIM samples [B, S, S] in [0, 1] for class slices [B, S, S]; from the noised class-mean prior if asked."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    sampler = make_sampler("ddim", diffusion, steps, start_timestep=start_timestep)
    kwargs = {k: v.to(device) for k, v in condition_inputs(classes, conditioning).items()}
    x = torch.randn((len(classes), 1, *classes.shape[1:]), generator=generator).to(device)
    if start_timestep is not None:
        if class_means is None:
            raise ValueError("a start timestep needs the class means")
        prior = (torch.tensor(class_means)[classes] * 2 - 1)[:, None].to(device)
        x = sampler.add_noise(prior, 0, x)
    for _, _, x, _ in sample_loop(model, sampler, x, kwargs, generator):
        pass
    model.train()
    return ((x[:, 0].float().clamp(-1, 1) + 1) / 2).cpu()


def write_sample_grid(path: Path, model: torch.nn.Module, diffusion: GaussianDiffusion, images: torch.Tensor,
                      classes: torch.Tensor, conditioning: str, *, steps: int, start_timestep: int | None,
                      class_means: list[float] | None, device: torch.device) -> None:
    """PNG grid for real images [B, 1, S, S] in [-1, 1] and their classes [B, S, S]."""
    synthetic = sample_slices(model, diffusion, classes, conditioning, steps=steps, start_timestep=start_timestep,
                              class_means=class_means, device=device)
    real = (images[:, 0] + 1) / 2
    colours = np.asarray(COLORS, dtype=np.uint8)
    rows = []
    for c, r, s in zip(classes.numpy(), real.numpy(), synthetic.numpy()):
        grey = [np.repeat((np.clip(a, 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=-1) for a in (r, s)]
        rows.append(np.concatenate([colours[c], *grey], axis=1))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    Image.fromarray(np.concatenate(rows, axis=0)).save(tmp)
    tmp.replace(path)
