"""Slices of a CT volume along the three planes, as [0, 1] model-size images, and a per-plane FID.

A slice-wise (axial) generator can look right axially and still be inconsistent from slice to slice; coronal and
sagittal slices of its volumes show that as stripes, so their FID against the real volumes' slices rises. Views
follow the radiological convention of :class:`AxialOrientation` stacks: axial (rows A -> P, columns R -> L),
coronal (superior up, columns R -> L), sagittal (superior up, columns A -> P). Each view is first resampled to
square pixels (physical aspect), then centre-padded and resized to ``size`` x ``size``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..intensity import PAPER_WINDOW, IntensityMapping
from ..io import Volume
from ..preprocess import AxialOrientation
from .fid import fid
from .image import SLICE_SIZE, to_model_slices

PLANES = ("axial", "coronal", "sagittal")


def _views(stack: np.ndarray, plane: str) -> np.ndarray:
    """(S, R, C) stack -> (N, H, W) views along ``plane`` (superior up for coronal/sagittal)."""
    if plane == "axial":
        return stack
    if plane == "coronal":
        return np.ascontiguousarray(stack[::-1].transpose(1, 0, 2))  # (R, S, C)
    if plane == "sagittal":
        return np.ascontiguousarray(stack[::-1].transpose(2, 0, 1))  # (C, S, R)
    raise ValueError(f"unknown plane '{plane}': use one of {', '.join(PLANES)}")


def _spacing_hw(spacing: Sequence[float], plane: str) -> tuple[float, float]:
    s, r, c = spacing
    return {"axial": (r, c), "coronal": (s, c), "sagittal": (s, r)}[plane]


def plane_slices(ct: Volume, plane: str, *, mask: Volume | None = None, size: int = SLICE_SIZE,
                 intensity: IntensityMapping = PAPER_WINDOW) -> torch.Tensor:
    """(N, size, size) [0, 1] views of an HU volume along ``plane``, through ``intensity`` (default: L40/W400).

    With ``mask`` (same grid, e.g. the segmentation) only views that cut a non-zero mask voxel are kept, so real
    and synthetic volumes give matching view sets.
    """
    orientation = AxialOrientation.from_affine(ct.affine)
    stack = orientation.to_stack(ct.array)
    spacing = [ct.spacing[a] for a in orientation.axes]
    views = _views(stack, plane)
    if mask is not None:
        if not mask.same_grid(ct, atol=1e-3):
            raise ValueError("the mask is not on the CT's grid")
        keep = _views(orientation.to_stack(mask.array != 0), plane).reshape(len(views), -1).any(axis=1)
        views = views[keep]
    unit = torch.from_numpy(intensity.to_unit(views))
    if len(unit) == 0:
        return torch.zeros((0, size, size))
    sh, sw = _spacing_hw(spacing, plane)
    height = max(1, int(round(unit.shape[1] * sh / sw)))
    if height != unit.shape[1]:
        unit = F.interpolate(unit[:, None], size=(height, unit.shape[2]), mode="bilinear", align_corners=False,
                             antialias=True)[:, 0]
    return to_model_slices(unit, size)


def per_plane_fid(
    real: Sequence[Volume],
    synthetic: Sequence[Volume],
    features: Callable[[torch.Tensor], np.ndarray],
    *,
    masks: Sequence[Volume] | None = None,
    size: int = SLICE_SIZE,
    planes: Sequence[str] = PLANES,
) -> dict[str, dict[str, float]]:
    """``{plane: {"fid": value, "n_real": N, "n_synthetic": M}}`` over all views of paired volume lists.

    ``features`` maps (N, H, W) [0, 1] slices to (N, D) features (e.g. :class:`InceptionFeatures`).
    """
    if len(real) != len(synthetic) or (masks is not None and len(masks) != len(real)):
        raise ValueError("real, synthetic (and masks) must be lists of the same length")
    out: dict[str, dict[str, float]] = {}
    for plane in planes:
        feats_real, feats_syn = [], []
        for i, (r, s) in enumerate(zip(real, synthetic)):
            if not r.same_grid(s, atol=1e-3):
                raise ValueError(f"real and synthetic volume {i} are not on the same grid")
            mask = masks[i] if masks is not None else None
            feats_real.append(features(plane_slices(r, plane, mask=mask, size=size)))
            feats_syn.append(features(plane_slices(s, plane, mask=mask, size=size)))
        fr, fs = np.concatenate(feats_real), np.concatenate(feats_syn)
        value = fid(fr, fs) if min(len(fr), len(fs)) >= 2 else math.nan  # FID needs 2+ views per set
        out[plane] = {"fid": value, "n_real": int(len(fr)), "n_synthetic": int(len(fs))}
    return out
