"""Dice per organ between two model-class label maps (same grid), and the mean over organs.

Convention: an organ absent from both maps has no Dice (NaN) and is left out of the mean; an organ present in
only one of them scores 0. Keys are the model's class names (``labels.MODEL_CLASSES``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

from ..labels import MODEL_CLASSES, ORGANS


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """2|P & R| / (|P| + |R|) of two boolean masks; NaN when both are empty."""
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"masks differ in shape: {pred.shape} vs {ref.shape}")
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(ref))
    if total == 0:
        return math.nan
    return 2.0 * int(np.count_nonzero(pred & ref)) / total


def dice_per_organ(pred: np.ndarray, ref: np.ndarray, classes: Iterable[int] = ORGANS) -> dict[str, float]:
    """Dice for each class index in ``classes`` (default the 15 AMOS organs), keyed by class name."""
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"label maps differ in shape: {pred.shape} vs {ref.shape}")
    return {MODEL_CLASSES[c]: dice(pred == c, ref == c) for c in classes}


def mean_dice(scores: Mapping[str, float], exclude: Iterable[str] = ()) -> float:
    """Mean of the non-NaN scores, leaving out ``exclude`` names; NaN when none is left."""
    skip = set(exclude)
    values = [v for k, v in scores.items() if k not in skip and not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def voxel_counts(classes: np.ndarray, classes_of_interest: Iterable[int] = ORGANS) -> dict[str, int]:
    """Voxels per class, keyed by class name."""
    counts = np.bincount(np.asarray(classes).ravel().astype(np.int64), minlength=len(MODEL_CLASSES))
    return {MODEL_CLASSES[c]: int(counts[c]) for c in classes_of_interest}
