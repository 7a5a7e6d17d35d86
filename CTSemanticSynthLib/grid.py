"""Bring a volume (reference CT, body mask, synthetic CT to score) onto a segmentation's voxel grid.

Same physical voxels in another voxel order (axes flipped or permuted, as a DICOM series and its NIfTI
segmentation often are), or a larger grid that holds the segmentation's voxels: reordered or cropped losslessly.
Another grid that overlaps: resampled (linear for intensities, nearest neighbour for masks) with a note. No overlap:
an InputError. No file is read or written here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .io import Volume, describe_geometry, ras_affine_to_lps, volume_to_sitk
from .preprocess import AIR_HU

Kind = Literal["image", "mask"]

_TOLERANCE = 1e-3
"""Voxels: how far from a signed permutation with whole-voxel offsets a grid may be and still be reordered."""


def onto_grid(volume: Volume, target: Volume, kind: Kind, name: str,
              note: Callable[[str], None] | None = None, resample: bool = True) -> Volume:
    """``volume`` on ``target``'s grid; ``note`` gets one line saying what was done (nothing when it already was).

    Reordering or cropping keeps the values as they are. ``kind`` "image" resamples linearly (float32; uncovered
    voxels are air, -1000 HU), "mask" takes the nearest voxel's (0/1: nonzero is 1; uncovered voxels 0). ``name``
    (e.g. "--reference-ct ct.nii.gz") starts every message.
    ``resample`` False refuses (InputError) a volume that only resampling would bring onto the grid.
    """
    if volume.same_grid(target):
        return volume
    reordered = _reordered(volume, target)
    if reordered is not None:
        array, how = reordered
        if note is not None:
            note(f"{name}: {how}")
        return Volume(array, target.affine)
    if not resample:
        raise InputError(f"{name} is on another grid than the segmentation ({describe_geometry(volume)} vs "
                         f"{describe_geometry(target)}) and would need resampling: give it on the segmentation's grid")
    resampled, covered = _resampled(volume, target, kind, name)
    if covered == 0:
        raise InputError(f"{name} does not overlap the segmentation ({describe_geometry(volume)} vs "
                         f"{describe_geometry(target)}): give the file that belongs to this segmentation")
    if note is not None:
        method = "linear" if kind == "image" else "nearest-neighbour"
        note(f"{name} is on another grid ({describe_geometry(volume)}); resampled ({method}) onto the "
             f"segmentation's grid, covering {100 * covered:.0f}% of it")
    return resampled


def _reordered(volume: Volume, target: Volume) -> tuple[np.ndarray, str] | None:
    """(``volume``'s voxels in ``target``'s order, what that took) when every target voxel centre is a volume voxel
    centre, else None."""
    index = np.linalg.solve(volume.affine, target.affine)  # target (i, j, k, 1) -> volume (i, j, k, 1)
    linear, offset = index[:3, :3], index[:3, 3]
    if np.abs(linear - np.round(linear)).max() > _TOLERANCE or np.abs(offset - np.round(offset)).max() > _TOLERANCE:
        return None
    linear, offset = np.round(linear).astype(int), np.round(offset).astype(int)
    if not (np.abs(linear).sum(axis=0) == 1).all() or sorted(np.abs(linear).argmax(axis=0)) != [0, 1, 2]:
        return None  # not a signed permutation: another voxel size or an oblique rotation
    axes = np.abs(linear).argmax(axis=0)  # volume axis behind each target axis
    picks = []
    for t, a in enumerate(axes):
        idx = linear[a, t] * np.arange(target.shape[t]) + offset[a]
        if idx.min() < 0 or idx.max() >= volume.shape[a]:
            return None  # only part of the target is covered: resampling fills the rest
        picks.append(idx)
    array = np.ascontiguousarray(np.transpose(volume.array, axes)[np.ix_(*picks)])
    reordered = not np.array_equal(linear, np.eye(3, dtype=int))
    if array.size < volume.array.size:
        order = " in another axis order" if reordered else ""
        return array, (f"a larger grid holding the segmentation's voxels{order}; "
                       f"{'reordered and ' if reordered else ''}cropped losslessly to the segmentation's grid "
                       f"({100 * array.size / volume.array.size:.0f}% of its voxels kept)")
    if reordered:
        return array, "same voxels in another axis order; reordered losslessly"
    return array, "the same grid within 0.001 voxel; taken as it is"


def _resampled(volume: Volume, target: Volume, kind: Kind, name: str) -> tuple[Volume, float]:
    """(``volume`` resampled onto ``target``'s grid, fraction of target voxels it covers)."""
    origin, spacing, direction = ras_affine_to_lps(target.affine)

    def resample(image: sitk.Image, interpolator: int, default: float) -> np.ndarray:
        out = sitk.Resample(image, [int(n) for n in target.shape], sitk.Transform(), interpolator, origin,
                            spacing, direction, default, image.GetPixelID())
        return sitk.GetArrayFromImage(out).transpose(2, 1, 0)

    try:
        array = volume.array.astype(np.float32) if kind == "image" else (volume.array != 0).astype(np.uint8)
        source = volume_to_sitk(Volume(array, volume.affine))
        coverage = volume_to_sitk(Volume(np.ones(volume.shape, np.uint8), volume.affine))
        values = (resample(source, sitk.sitkLinear, AIR_HU) if kind == "image"
                  else resample(source, sitk.sitkNearestNeighbor, 0))
        covered = float(resample(coverage, sitk.sitkNearestNeighbor, 0).mean())
    except RuntimeError as exc:
        raise InputError(f"{name} cannot be resampled onto the segmentation's grid ({exc})") from None
    return Volume(np.array(values, order="C"), target.affine), covered
