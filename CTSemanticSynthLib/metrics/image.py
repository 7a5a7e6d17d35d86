"""PSNR and SSIM on the paper's slices: 256 x 256, window L40/W400 mapped to [0, 1].

SSIM has one fixed configuration: Gaussian window 11 x 11 with sigma 1.5, K1 = 0.01, K2 = 0.03, data range 1,
population (not sample) covariance, and the mean taken over the valid region (5 pixels cropped at each border).
It equals ``skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1)`` (to ~1e-6: the Gaussian filtering runs in float32, the
statistics in float64). PSNR is computed in float64. Both are per slice; aggregate with :func:`summarize`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..preprocess import AxialOrientation, PlaneResize, hu_to_unit

SLICE_SIZE = 256
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
_SSIM_CHUNK = 64

ArrayLike = np.ndarray | torch.Tensor


def _as_batch(a: ArrayLike, b: ArrayLike) -> tuple[torch.Tensor, torch.Tensor, bool]:
    x = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).detach().cpu().double()
    y = torch.as_tensor(np.asarray(b) if not isinstance(b, torch.Tensor) else b).detach().cpu().double()
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.ndim not in (2, 3):
        raise ValueError(f"expected (H, W) or (N, H, W) images, got shape {tuple(x.shape)}")
    single = x.ndim == 2
    return (x[None], y[None], single) if single else (x, y, single)


def psnr(a: ArrayLike, b: ArrayLike, data_range: float = 1.0) -> np.ndarray | float:
    """Peak signal-to-noise ratio in dB per image of (N, H, W) (a float for one (H, W) image); inf if identical."""
    x, y, single = _as_batch(a, b)
    mse = ((x - y) ** 2).flatten(1).mean(1)
    with np.errstate(divide="ignore"):
        out = 10.0 * np.log10(data_range**2 / mse.numpy())
    return float(out[0]) if single else out


def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def _filter_valid(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter of each channel of (N, C, H, W), keeping only the valid region (no padding)."""
    c = x.shape[1]
    x = F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)


def ssim(a: ArrayLike, b: ArrayLike, data_range: float = 1.0) -> np.ndarray | float:
    """Mean structural similarity per image of (N, H, W) (a float for one (H, W) image); see the module doc."""
    x, y, single = _as_batch(a, b)
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"images must be at least {SSIM_WINDOW} x {SSIM_WINDOW} for SSIM, got {tuple(x.shape[-2:])}")
    g = _gaussian_window().float()
    out = []
    for first in range(0, len(x), _SSIM_CHUNK):  # float32 filtering (fast), statistics in float64
        a, b = x[first : first + _SSIM_CHUNK].float(), y[first : first + _SSIM_CHUNK].float()
        out.append(_ssim_map_mean(_filter_valid(torch.stack([a, b, a * a, b * b, a * b], 1), g).double(), data_range))
    values = torch.cat(out).numpy()
    return float(values[0]) if single else values


def _ssim_map_mean(moments: torch.Tensor, data_range: float) -> torch.Tensor:
    mu_x, mu_y, xx, yy, xy = moments.unbind(1)
    var_x = xx - mu_x**2
    var_y = yy - mu_y**2
    cov = xy - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


def summarize(values: np.ndarray) -> dict[str, float]:
    """Mean, standard deviation and count of per-slice values (inf PSNRs of identical slices are kept as inf)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    with np.errstate(invalid="ignore"):
        return {"mean": float(v.mean()), "std": float(v.std()), "n": int(v.size)}


def to_model_slices(unit: ArrayLike, size: int = SLICE_SIZE) -> torch.Tensor:
    """(N, H, W) [0, 1] slices -> (N, size, size): centre-padded square, antialiased bilinear, clipped to [0, 1]."""
    t = torch.as_tensor(np.asarray(unit) if not isinstance(unit, torch.Tensor) else unit).float()
    if t.shape[-2:] == (size, size):
        return t.clamp(0, 1)
    return PlaneResize(t.shape[-2], t.shape[-1], size).to_model(t, labels=False).clamp(0, 1)


def axial_unit_slices(hu: np.ndarray, affine: np.ndarray, index: np.ndarray | None = None,
                      size: int = SLICE_SIZE) -> torch.Tensor:
    """Axial slices of an HU volume (I, J, K) as the paper's [0, 1] ``size`` x ``size`` images.

    ``index`` selects stack slices (inferior -> superior order, see :class:`AxialOrientation`); default all.
    """
    stack = AxialOrientation.from_affine(affine).to_stack(hu)
    if index is not None:
        stack = stack[index]
    return to_model_slices(torch.from_numpy(hu_to_unit(np.ascontiguousarray(stack))), size)
