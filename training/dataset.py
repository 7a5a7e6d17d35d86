"""Memory-mapped access to a slice cache written by ``training.prepare``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

from CTSemanticSynthLib.errors import InputError
from CTSemanticSynthLib.intensity import IntensityMapping, mapping_from_config
from CTSemanticSynthLib.labels import BACKGROUND, ClassSet, class_set
from CTSemanticSynthLib.slice_context import context_offsets


RESIZED_IN = "hu"
"""How cache images are resized, recorded in cache.json: in HU, then mapped (``preprocess.hu_to_model``)."""


def cache_resized_in(meta: dict) -> str:
    """A cache's ``resized_in``. Caches from before resized the mapped images ("model units"): the same as in HU for a
    window, not for a companding mapping."""
    return meta.get("resized_in") or ("hu" if mapping_from_config(meta).is_window else "model units")


class SliceCache:
    """The slices of one split: ``batch(indices)`` -> (images [B,1,S,S] in [-1,1], classes [B,S,S] long).

    ``class_set`` and ``intensity`` are the classes and HU mapping the cache was prepared with."""

    def __init__(self, root: str | Path, split: str) -> None:
        root = Path(root)
        meta_path = root / "cache.json"
        if not meta_path.is_file():
            raise InputError(f"{root} is not a slice cache (no cache.json): run python -m training.prepare first")
        self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        self.class_set: ClassSet = class_set(self.meta.get("class_set", "paper"))
        if self.meta.get("classes") != list(self.class_set.classes):
            raise InputError(f"{root} was prepared for other classes; prepare it again with this version")
        self.intensity: IntensityMapping = mapping_from_config(self.meta)
        if cache_resized_in(self.meta) != RESIZED_IN:
            raise InputError(f"{root} was prepared by an earlier version (its full-range images were resized after the "
                             "intensity mapping): prepare it again with this version")
        self.image_size = int(self.meta["image_size"])
        self._images: dict[str, np.ndarray] = {}
        self._classes: dict[str, np.ndarray] = {}
        self.rows: list[tuple[str, int]] = []
        with open(root / "manifest.csv", newline="") as f:
            for row in csv.DictReader(f):
                if row["split"] == split:
                    self.rows.append((row["case"], int(row["slice"])))
        if not self.rows:
            raise InputError(f"{root} has no slices in split '{split}'")
        for case in {c for c, _ in self.rows}:
            folder = root / "cases" / case
            self._images[case] = np.load(folder / "images.npy", mmap_mode="r")
            self._classes[case] = np.load(folder / "classes.npy", mmap_mode="r")

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, indices: torch.Tensor | list[int], pin: bool = False,
             context_slices: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored arrays for the given row indices: images [B, S, S] float16 in [0, 1], classes [B, S, S]
        uint8 (what a training step copies to its device; ``pin`` puts them in page-locked memory). With
        ``context_slices`` k > 0 (2.5D models) classes are [B, 1 + 2k, S, S]: the slice's, then its neighbours' in
        the case (``slice_context.context_offsets``; background beyond the case's ends)."""
        picks = [self.rows[int(i)] for i in indices]
        images = torch.from_numpy(np.stack([self._images[c][s] for c, s in picks]))
        if context_slices:
            classes = torch.from_numpy(np.stack([np.stack([self._neighbour(c, s + d) for d in
                                                           context_offsets(context_slices)]) for c, s in picks]))
        else:
            classes = torch.from_numpy(np.stack([self._classes[c][s] for c, s in picks]))
        return (images.pin_memory(), classes.pin_memory()) if pin else (images, classes)

    def case_classes(self, case: str) -> np.ndarray:
        """The classes [slices, S, S] (uint8, memory-mapped) of every slice of ``case``."""
        return self._classes[case]

    def _neighbour(self, case: str, index: int) -> np.ndarray:
        """Classes of slice ``index`` of ``case``, background when the case has no such slice."""
        stack = self._classes[case]
        return stack[index] if 0 <= index < len(stack) else np.full_like(stack[0], BACKGROUND)

    def batch(self, indices: torch.Tensor | list[int], context_slices: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Images scaled to [-1, 1] (float32) and classes (int64) for the given row indices (see ``load``)."""
        return model_batch(*self.load(indices, context_slices=context_slices))

    def class_means(self, max_slices: int = 2000) -> list[float]:
        """Mean [0,1] intensity per model class over (up to ``max_slices`` of) the split. A class absent from it gets
        the body class's mean (tissue inside the body is the best guess for the sampler's prior; 0 would be air)."""
        step = max(1, len(self) // max_slices)
        images, classes = self.batch(list(range(0, len(self), step)))
        unit = (images[:, 0] + 1) / 2
        num_classes = len(self.class_set.classes)
        sums = torch.zeros(num_classes).index_add_(0, classes.flatten(), unit.flatten())
        counts = torch.bincount(classes.flatten(), minlength=num_classes).float()
        body = self.class_set.body
        fallback = float(sums[body] / counts[body]) if counts[body] > 0 else 0.0
        return [float(s / c) if c > 0 else fallback for s, c in zip(sums, counts)]


def model_batch(images: torch.Tensor, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored arrays (from ``SliceCache.load``, on any device) -> images [B, 1, S, S] float32 in [-1, 1] and
    classes [B, S, S] int64."""
    return images.float()[:, None] * 2 - 1, classes.long()
