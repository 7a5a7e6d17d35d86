"""Dice per organ between two model-class label maps (same grid), and the mean over organs.

Convention: an organ absent from both maps has no Dice (NaN) and is left out of the mean; an organ present in
only one of them scores 0. Keys are the class names of the model's class set (the paper's by default).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

from ..labels import ORGANS, PAPER, ClassSet


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """2|P & R| / (|P| + |R|) of two boolean masks; NaN when both are empty."""
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"masks differ in shape: {pred.shape} vs {ref.shape}")
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(ref))
    if total == 0:
        return math.nan
    return 2.0 * int(np.count_nonzero(pred & ref)) / total


def dice_per_organ(pred: np.ndarray, ref: np.ndarray, classes: Iterable[int] = ORGANS,
                   class_set: ClassSet = PAPER) -> dict[str, float]:
    """Dice for each class index in ``classes`` (default the 15 AMOS organs), keyed by its name in ``class_set``."""
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"label maps differ in shape: {pred.shape} vs {ref.shape}")
    return {class_set.classes[c]: dice(pred == c, ref == c) for c in classes}


def mean_dice(scores: Mapping[str, float], exclude: Iterable[str] = ()) -> float:
    """Mean of the non-NaN scores, leaving out ``exclude`` names; NaN when none is left."""
    skip = set(exclude)
    values = [v for k, v in scores.items() if k not in skip and not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def voxel_counts(classes: np.ndarray, classes_of_interest: Iterable[int] = ORGANS,
                 class_set: ClassSet = PAPER) -> dict[str, int]:
    """Voxels per class, keyed by its name in ``class_set``."""
    counts = np.bincount(np.asarray(classes).ravel().astype(np.int64), minlength=len(class_set.classes))
    return {class_set.classes[c]: int(counts[c]) for c in classes_of_interest}
