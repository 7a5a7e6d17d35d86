"""The :class:`Volume` type (a 3-D (I, J, K) array with its voxel -> RAS mm affine), a one-line geometry summary,
and the one LPS <-> RAS conversion to and from SimpleITK images."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from ..errors import InputError

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])  # its own inverse


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3-D array in (I, J, K) order with its voxel -> RAS mm affine."""

    array: np.ndarray
    affine: np.ndarray

    def __post_init__(self) -> None:
        affine = np.asarray(self.affine, dtype=np.float64)
        if self.array.ndim != 3:
            raise ValueError(f"Volume array must be 3-D, got shape {self.array.shape}")
        if affine.shape != (4, 4) or not np.isfinite(affine).all():
            raise ValueError(f"Volume affine must be a finite 4x4 matrix, got {affine!r}")
        if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise ValueError("Volume affine is singular (a zero or degenerate voxel axis)")
        object.__setattr__(self, "affine", affine)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Voxel counts along I, J, K."""
        return tuple(int(n) for n in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along I, J, K (norms of the affine's columns)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    def same_grid(self, other: Volume, atol: float = 1e-4) -> bool:
        """True when both volumes have the same shape and (within ``atol`` mm) the same affine."""
        return self.shape == other.shape and np.allclose(self.affine, other.affine, rtol=0.0, atol=atol)


def describe_geometry(vol: Volume) -> str:
    """One-line summary of a volume's grid for messages, e.g. ``shape (512, 512, 90), spacing ...``."""
    linear = vol.affine[:3, :3] / np.array(vol.spacing)
    codes = ""
    for column in linear.T:
        axis = int(np.argmax(np.abs(column)))
        codes += ("LR", "PA", "IS")[axis][int(column[axis] > 0)]
    oblique = ", oblique" if np.abs(np.abs(linear) - np.round(np.abs(linear))).max() > 1e-3 else ""
    spacing = ", ".join(f"{s:.4g}" for s in vol.spacing)
    origin = ", ".join(f"{o:.4g}" for o in vol.affine[:3, 3])
    return f"shape {vol.shape}, spacing ({spacing}) mm, origin ({origin}) RAS, axes {codes}{oblique}"


def lps_to_ras_affine(origin: tuple[float, ...], spacing: tuple[float, ...],
                      direction: tuple[float, ...]) -> np.ndarray:
    """Voxel (i, j, k, 1) -> RAS mm affine from SimpleITK's LPS origin, spacing and row-major 3x3 direction."""
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ np.reshape(np.asarray(direction, dtype=np.float64), (3, 3)) @ np.diag(spacing)
    affine[:3, 3] = _LPS_TO_RAS @ np.asarray(origin, dtype=np.float64)
    return affine


def ras_affine_to_lps(affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """Inverse of :func:`lps_to_ras_affine`: (origin, spacing, row-major direction) in SimpleITK's LPS."""
    linear = _LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    direction = linear / spacing
    origin = _LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)[:3, 3]
    return tuple(origin.tolist()), tuple(spacing.tolist()), tuple(direction.ravel().tolist())


def sitk_to_volume(img: sitk.Image) -> Volume:
    """Convert a 3-D scalar SimpleITK image (array (k, j, i), LPS) to a :class:`Volume`."""
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"expected a 3-D scalar image, got {img.GetDimension()}-D with "
                         f"{img.GetNumberOfComponentsPerPixel()} components")
    array = np.array(sitk.GetArrayViewFromImage(img).transpose(2, 1, 0), order="C")
    return Volume(array, lps_to_ras_affine(img.GetOrigin(), img.GetSpacing(), img.GetDirection()))


def volume_to_sitk(vol: Volume) -> sitk.Image:
    """Convert a :class:`Volume` to a SimpleITK image with the same voxels and LPS geometry."""
    origin, spacing, direction = ras_affine_to_lps(vol.affine)
    if not np.allclose(np.reshape(direction, (3, 3)) @ np.reshape(direction, (3, 3)).T, np.eye(3), atol=1e-4):
        raise InputError(f"the volume's affine has shear ({describe_geometry(vol)}); "
                         "resample it to a grid with perpendicular axes first")
    img = sitk.GetImageFromArray(vol.array.transpose(2, 1, 0), isVector=False)
    img.SetOrigin(origin)
    img.SetSpacing(spacing)
    img.SetDirection(direction)
    return img
