"""Region regeneration (inpainting) around an edited segmentation: the region, its checks, and the border blend.

The region is where the organ classes of two segmentations differ, grown by a margin in mm (physical, so
anisotropic voxels are respected), or an explicit mask. :func:`~.synthesis.synthesize` samples the slices that
cross it with the rest held to the kept CT (RePaint); :func:`blend` then mixes the sample into the kept CT over a
thin band inside the region's border, so every voxel outside the region keeps the kept CT's int16 value.
No torch here (the Slicer module may import it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from .errors import InputError
from .io import Volume
from .labels import PAPER, ClassSet, resolve_adapter

REGION_MARGIN_MM = 10.0
"""Default growth of the changed voxels: context the sampler repaints so the new anatomy meets the old smoothly."""

DEFAULT_JUMP_N_SAMPLE = 2
"""RePaint resamplings per jump point: the paper's 10 costs about 10x the evaluations of plain sampling, 2 twice."""

FEATHER_MM = 6.0
"""Width of the band inside the region's border over which the sample fades into the kept CT (two voxels at 3 mm:
weights 0.5 and 1)."""

INT16 = np.iinfo(np.int16)


def organ_classes(segmentation: Volume, names: Mapping[int, str] | None, labels: str,
                  classes: ClassSet = PAPER) -> np.ndarray:
    """A label map's classes in ``classes``, the model's set (its structures; other labels body tissue; no body
    outline added)."""
    return resolve_adapter(labels, segmentation.array, names, classes).classes(segmentation.array)[0]


def grow(mask: np.ndarray, spacing: tuple[float, ...], margin_mm: float) -> np.ndarray:
    """``mask`` grown by every voxel whose centre lies within ``margin_mm`` of it (Euclidean, in mm)."""
    if margin_mm <= 0 or not mask.any():
        return mask.copy()
    return ndimage.distance_transform_edt(~mask, sampling=spacing) <= margin_mm


def changed_region(previous: np.ndarray, current: np.ndarray, spacing: tuple[float, ...],
                   margin_mm: float = REGION_MARGIN_MM) -> np.ndarray:
    """Voxels whose class differs between two class arrays, grown by ``margin_mm``; InputError when none differs."""
    changed = previous != current
    if not changed.any():
        raise InputError("nothing to regenerate: the previous and the new segmentation have the same organ classes "
                         "everywhere")
    return grow(changed, spacing, margin_mm)


def keep_values(keep: Volume) -> np.ndarray:
    """The kept CT as int16 (rounded and clipped: identical for an int16 CT, as ctsynth writes)."""
    return np.clip(np.rint(keep.array), INT16.min, INT16.max).astype(np.int16)


@dataclass(frozen=True)
class RegionEdit:
    """A checked edit: the kept CT (int16) and the region (bool) on the class volume's grid."""

    keep: np.ndarray
    region: np.ndarray
    spacing: tuple[float, float, float]

    @classmethod
    def checked(cls, classes: Volume, keep: Volume, region: Volume) -> RegionEdit:
        """InputError when the kept CT or the region is on another grid than ``classes`` or the region is empty."""
        for what, volume in (("the kept CT", keep), ("the region", region)):
            if not volume.same_grid(classes):
                raise InputError(f"{what} is not on the segmentation's grid (shape, spacing, origin, direction)")
        mask = region.array != 0
        if not mask.any():
            raise InputError("the region is empty (no nonzero voxel): nothing to regenerate")
        return cls(keep_values(keep), mask, classes.spacing)

    def feather(self, width_mm: float = FEATHER_MM) -> np.ndarray:
        """Weight of the sample: 0 outside the region, rising over ``width_mm`` inside its border to 1 (float32).

        A voxel's depth is the distance from its centre to the nearest voxel outside the region (at least one voxel
        size); the volume's border is not outside (nothing there to blend with)."""
        if self.region.all():
            return np.ones(self.region.shape, np.float32)
        depth = ndimage.distance_transform_edt(self.region, sampling=self.spacing)
        return np.clip(depth / width_mm, 0.0, 1.0).astype(np.float32)

    def blend(self, sampled: np.ndarray, width_mm: float = FEATHER_MM) -> np.ndarray:
        """``sampled`` (HU) inside the region faded into the kept CT at its border; the kept CT's values outside."""
        weight = self.feather(width_mm)
        mixed = weight * sampled.astype(np.float32) + (1.0 - weight) * self.keep
        return np.where(self.region, np.rint(mixed), self.keep).astype(np.int16)

    def record(self, jumps: Mapping[str, Any], width_mm: float = FEATHER_MM) -> dict[str, Any]:
        """The provenance entry: region size, feather width, RePaint jumps."""
        voxels = int(self.region.sum())
        return {"voxels": voxels, "volume_mm3": round(voxels * float(np.prod(self.spacing)), 3),
                "feather_mm": width_mm, "jumps": dict(jumps)}
