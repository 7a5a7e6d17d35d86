"""Class boundaries back at full resolution: region-based partial-volume correction of the upsampled model output.

The model sees a slice at its own size (96 px for the bundled models: 4-5 mm pixels on most CT grids), so every
pixel on a class boundary mixes the classes it covers, and the upsampled output blurs each boundary over a few
voxels. That lowers thin bright structures (ribs, vertebrae, small contrast-filled vessels), raises thin dark ones
(lung, bowel gas) and pulls small organs (adrenals, pancreas) towards the fat around them, although the class volume
says exactly where each boundary is. The correction is the one PET uses for the same problem: the geometric transfer
matrix (GTM, Rousset et al. 1998) estimates one value per class from the low-resolution image and the class
fractions each low-resolution pixel covers; the region-based voxel-wise correction (RBV, Thomas et al. 2011) then
adds back what the down/up resize removes from the piecewise-constant class image,

    full = up(low) + (template - up(down(template))),  template = value[class],

which is zero inside a class away from its boundary (the model's texture is kept as it is) and restores the step at
each boundary. Mixing is linear in HU (attenuation), so both steps work in HU; ``down``/``up`` are exactly the
model's resize in HU (:func:`~.preprocess.hu_to_model`, as training prepares its slices). What it cannot restore is
structure inside a class that the model's grid never resolved (a femur's cortical rim brighter than its marrow): see
docs/anatomy.md for measurements.
"""

from __future__ import annotations

import numpy as np
import torch

from .preprocess import PlaneResize, hu_from_model, hu_to_model

RIDGE = 0.01
"""Weight pulling each class value towards its fraction-weighted mean: keeps classes of a few mixed pixels stable."""


class ClassValues:
    """Accumulates the GTM system over slice parts, then solves for one HU value per class."""

    def __init__(self, num_classes: int, resize: PlaneResize) -> None:
        self.resize = resize
        self.gram = np.zeros((num_classes, num_classes))
        self.moment = np.zeros(num_classes)

    def add(self, classes: np.ndarray, low_hu: torch.Tensor) -> None:
        """Add slices: ``classes`` (N, H, W) class indices at full resolution, ``low_hu`` (N, size, size) the model's
        output for them in HU."""
        present = np.unique(classes)
        fractions = torch.stack([self.resize.to_model(torch.from_numpy(classes == c).float(), labels=False)
                                 for c in present], dim=1).flatten(2).double()  # (N, K, pixels)
        self.gram[np.ix_(present, present)] += torch.einsum("nkp,nlp->kl", fractions, fractions).numpy()
        self.moment[present] += torch.einsum("nkp,np->k", fractions, low_hu.flatten(1).double()).numpy()

    def solve(self, hu_range: tuple[float, float]) -> np.ndarray:
        """Per-class HU values within ``hu_range`` (0 for classes never seen: their template is never used)."""
        seen = np.flatnonzero(np.diag(self.gram) > 0)
        gram = self.gram[np.ix_(seen, seen)]
        mixed = self.moment[seen] / gram.sum(axis=1)  # fraction-weighted means
        ridge = RIDGE * np.diag(np.diag(gram))
        values = np.zeros(len(self.moment))
        values[seen] = np.clip(np.linalg.solve(gram + ridge, self.moment[seen] + ridge @ mixed), *hu_range)
        return values


def restore_boundaries(classes: np.ndarray, low_hu: torch.Tensor, resize: PlaneResize, values: np.ndarray,
                       hu_range: tuple[float, float]) -> np.ndarray:
    """Full-resolution HU slices (float32): ``up(low_hu)`` plus the boundary detail of the template
    ``values[classes]``, clipped to ``hu_range``."""
    template = torch.from_numpy(values.astype(np.float32)[classes])
    detail = template - hu_from_model(resize, hu_to_model(resize, template, hu_range), hu_range)
    return (hu_from_model(resize, low_hu, hu_range) + detail).clamp(*hu_range).numpy()
