"""Consistency along the slice axis: the stripe index, and the gap between per-plane FIDs.

A slice-wise generator samples every axial slice on its own, so its volumes can change more from one slice to the
next than real scans do: coronal and sagittal views show stripes. The stripe index measures that within the organs,
in the model's intensity mapping (the paper's L40/W400 window by default), with every difference divided by the
voxel spacing along its axis:

    ratio(CT) = mean |difference between adjacent slices| / mean |difference between adjacent in-plane voxels|
    stripe index = ratio(synthetic) / ratio(real)

so 1.0 is as consistent as the real scan and larger values mean stripes. Only pairs of voxels that both lie in an
organ count.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from ..intensity import PAPER_WINDOW, IntensityMapping
from ..io import Volume
from ..labels import ORGANS
from ..preprocess import AxialOrientation


def slice_ratio(ct: Volume, classes: Volume, intensity: IntensityMapping = PAPER_WINDOW) -> float:
    """Mean |through-slice gradient| / mean |in-plane gradient| (per mm, in ``intensity``'s [0, 1]) of ``ct`` within
    the organs of ``classes`` (model classes, same grid); NaN when no adjacent organ voxels exist along both."""
    if not ct.same_grid(classes, atol=1e-3):
        raise ValueError("the CT is not on the classes' grid")
    orientation = AxialOrientation.from_affine(classes.affine)
    unit = intensity.to_unit(orientation.to_stack(ct.array))
    organs = np.isin(orientation.to_stack(classes.array), ORGANS)
    spacing = [classes.spacing[a] for a in orientation.axes]  # slice, row, column
    per_axis = []
    for axis in range(3):
        first = [slice(None)] * 3
        second = [slice(None)] * 3
        first[axis], second[axis] = slice(None, -1), slice(1, None)
        both = organs[tuple(first)] & organs[tuple(second)]
        per_axis.append(np.abs(unit[tuple(second)] - unit[tuple(first)])[both] / spacing[axis])
    through = per_axis[0]
    in_plane = np.concatenate(per_axis[1:])
    if through.size == 0 or in_plane.size == 0 or not in_plane.any():
        return math.nan
    return float(through.mean() / in_plane.mean())


def stripe_index(synthetic: Volume, real: Volume, classes: Volume,
                 intensity: IntensityMapping = PAPER_WINDOW) -> dict[str, float]:
    """``{"stripe_index", "ratio_synthetic", "ratio_real"}`` in the model's ``intensity`` mapping; see the module
    docstring (1.0 = like the real CT)."""
    ratio_synthetic = slice_ratio(synthetic, classes, intensity)
    ratio_real = slice_ratio(real, classes, intensity)
    index = ratio_synthetic / ratio_real if ratio_real > 0 else math.nan
    return {"stripe_index": index, "ratio_synthetic": ratio_synthetic, "ratio_real": ratio_real}


def plane_fid_gap(fid_per_plane: Mapping[str, float]) -> dict[str, float]:
    """``{plane: FID}`` -> ``{"coronal_minus_axial", "sagittal_minus_axial", "max_gap"}`` (the largest difference
    between any two planes, NaN ignored); a slice-consistent generator has small gaps."""
    values = {plane: float(value) for plane, value in fid_per_plane.items()}
    axial = values.get("axial", math.nan)
    gaps = {f"{plane}_minus_axial": value - axial for plane, value in values.items() if plane != "axial"}
    finite = [v for v in values.values() if math.isfinite(v)]
    gaps["max_gap"] = max(finite) - min(finite) if len(finite) >= 2 else math.nan
    return gaps
