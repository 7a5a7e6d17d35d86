"""Frechet Inception Distance and Kernel Inception Distance between two feature sets (rows = images).

FID = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2) with unbiased (N - 1) covariances, as in the TF
reference and pytorch-fid. tr((S_a S_b)^1/2) is computed as the sum of square roots of the eigenvalues of
S_a^1/2 S_b S_a^1/2 (symmetric positive semi-definite), which stays real and exact for the rank-deficient
covariances of small sets, so FID of a set against itself is 0 up to rounding. Sets smaller than the feature size
take an equivalent route through the (N_a x N_b) Gram matrix (same value, far cheaper for 2048-d features).

KID is the unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random
subsets (Binkowski et al. 2018; 100 subsets of up to 1000 images as in torch-fidelity and clean-fid).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000


@dataclass(frozen=True)
class FeatureStats:
    """Mean and covariance of a feature set; enough for FID (save these instead of the features)."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    @classmethod
    def from_features(cls, features: np.ndarray) -> FeatureStats:
        f = _check(features, "features")
        if len(f) < 2:
            raise ValueError(f"FID needs at least 2 images per set, got {len(f)}")
        return cls(mu=f.mean(axis=0), sigma=np.cov(f, rowvar=False), n=len(f))


def _check(features: np.ndarray, name: str) -> np.ndarray:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"{name} must be (N, D), got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return f


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """Frechet distance between two Gaussians given by their :class:`FeatureStats`."""
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature sizes differ: {a.mu.shape} vs {b.mu.shape}")
    root_a = _psd_sqrt(a.sigma)
    middle = root_a @ b.sigma @ root_a
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    value = float(np.sum((a.mu - b.mu) ** 2) + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * trace_sqrt)
    return max(value, 0.0)


def _frechet_from_features(x: np.ndarray, y: np.ndarray) -> float:
    """Same value as :func:`frechet_distance`, via the (N_a x N_b) Gram matrix when sets are smaller than D.

    With centred features X, Y: S_a S_b = X^T X Y^T Y / c has the non-zero eigenvalues of (X Y^T)(X Y^T)^T / c.
    """
    xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)
    c = (len(x) - 1) * (len(y) - 1)
    gram = xc @ yc.T
    small = gram @ gram.T if len(x) <= len(y) else gram.T @ gram
    trace_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh((small + small.T) / 2), 0.0, None)).sum() / np.sqrt(c))
    value = (np.sum((x.mean(axis=0) - y.mean(axis=0)) ** 2) + np.sum(xc**2) / (len(x) - 1)
             + np.sum(yc**2) / (len(y) - 1) - 2.0 * trace_sqrt)
    return max(float(value), 0.0)


def fid(real: np.ndarray | FeatureStats, fake: np.ndarray | FeatureStats) -> float:
    """FID between two feature sets (arrays (N, D)) or their precomputed :class:`FeatureStats`."""
    if not isinstance(real, FeatureStats) and not isinstance(fake, FeatureStats):
        x, y = _check(real, "real features"), _check(fake, "fake features")
        if min(len(x), len(y)) < 2:
            raise ValueError(f"FID needs at least 2 images per set, got {len(x)} and {len(y)}")
        if x.shape[1] != y.shape[1]:
            raise ValueError(f"feature sizes differ: {x.shape[1]} vs {y.shape[1]}")
        if min(len(x), len(y)) < x.shape[1]:
            return _frechet_from_features(x, y)
    a = real if isinstance(real, FeatureStats) else FeatureStats.from_features(real)
    b = fake if isinstance(fake, FeatureStats) else FeatureStats.from_features(fake)
    return frechet_distance(a, b)


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    m = len(x)
    k_xx = (x @ x.T / d + 1.0) ** 3
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    sum_xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    sum_yy = (k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(sum_xx + sum_yy - 2.0 * k_xy.mean())


def kid(real: np.ndarray, fake: np.ndarray, *, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE,
        seed: int = 0) -> tuple[float, float]:
    """(mean, std) of the unbiased MMD^2 over ``subsets`` random subsets of min(subset_size, N_real, N_fake)."""
    x, y = _check(real, "real features"), _check(fake, "fake features")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sizes differ: {x.shape[1]} vs {y.shape[1]}")
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise ValueError(f"KID needs at least 2 images per set, got {len(x)} and {len(y)}")
    rng = np.random.default_rng(seed)
    values = np.array([
        _mmd2_unbiased(x[rng.choice(len(x), m, replace=False)], y[rng.choice(len(y), m, replace=False)])
        for _ in range(max(1, subsets))
    ])
    return float(values.mean()), float(values.std())
