"""Read and write CT volumes and label maps (NIfTI, NRRD, MetaImage, DICOM series, Slicer .seg.nrrd).

Arrays are in voxel order (I, J, K), i.e. ``array[i, j, k]``, and travel with a 4x4 affine that maps
voxel (i, j, k, 1) to RAS millimetres. SimpleITK (LPS, (k, j, i) arrays) is only used inside this
module; :func:`lps_to_ras_affine` and :func:`ras_affine_to_lps` are the only places that convert.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from .errors import InputError, OutputExistsError

logger = logging.getLogger(__name__)

READ_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
WRITE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])  # its own inverse
_NIFTI_DESCRIP_BYTES = 79  # ITK refuses longer (the field is char[80] with a terminating NUL)
_SEGMENT_KEY = re.compile(r"Segment(\d+)_\w+$")
_UNPRINTABLE = "[UNKNOWN_PRINT_CHARACTERISTICS]"  # SimpleITK's value for non-string metadata


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


# --- geometry: the one LPS <-> RAS conversion ----------------------------------------------------


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


# --- reading -------------------------------------------------------------------------------------


def read_image(path: str | Path) -> Volume:
    """Read a CT volume (NIfTI, NRRD, MetaImage or a DICOM series folder) as float32."""
    path = Path(path)
    layers, affine = _read_layers(_read_sitk(path), path)
    if len(layers) != 1:
        raise InputError(f"{path} is 4-D (shape {_shape_ijkl(layers)}); give one 3-D volume")
    array = layers[0].astype(np.float32, copy=False)
    _refuse_nonfinite(path, array)
    return Volume(array, affine)


def read_labelmap(path: str | Path) -> tuple[Volume, dict[int, str]]:
    """Read an integer label map; returns it with ``{label value: segment name}`` (empty unless .seg.nrrd).

    A Slicer segmentation with several layers is merged into one label map; labels shared by two
    layers are renumbered and where segments overlap the later one wins (logged as a warning).
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder; label maps from DICOM are not supported, "
                         "give a .nii.gz, .nrrd or .seg.nrrd file")
    img = _read_sitk(path)
    layers, affine = _read_layers(img, path)
    segments = _segment_table(img, len(layers), path)
    if segments:
        labels, names = _merge_segments(layers, segments, path)
    else:
        if len(layers) != 1:
            raise InputError(f"{path} is 4-D (shape {_shape_ijkl(layers)}); give one 3-D label map")
        labels, names = layers[0], {}
        _refuse_nonfinite(path, labels)
        _check_labels(labels, path)
    return Volume(labels.astype(_label_dtype(int(labels.max(initial=0)), path), copy=False), affine), names


def read_metadata(path: str | Path) -> dict[str, str]:
    """Header key/values of an image file (NRRD custom keys, NIfTI fields incl. ``descrip``, DICOM tags)."""
    path = Path(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(_dicom_series_files(path)[0] if path.is_dir() else _checked_file(path)))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"cannot read {path}: {_itk_reason(exc)}") from None
    return {key: reader.GetMetaData(key) for key in reader.GetMetaDataKeys()
            if not reader.GetMetaData(key).startswith(_UNPRINTABLE)}


def _refuse_nonfinite(path: Path, array: np.ndarray) -> None:
    """InputError for NaN/inf voxels. ITK's NIfTI reader silently turns them into 0, so NIfTI files are
    checked on disk with nibabel."""
    if path.name.lower().endswith((".nii", ".nii.gz")):
        img = nib.load(str(path))
        bad = (int(np.count_nonzero(~np.isfinite(np.asanyarray(img.dataobj))))
               if np.issubdtype(img.get_data_dtype(), np.floating) else 0)
    else:
        bad = int(np.count_nonzero(~np.isfinite(array))) if np.issubdtype(array.dtype, np.floating) else 0
    if bad:
        raise InputError(f"{path} has {bad} NaN or infinite voxels; fix or replace them before using it")


def _checked_file(path: Path) -> Path:
    if not path.exists():
        raise InputError(f"{path} does not exist; check the path")
    if not path.name.lower().endswith(READ_SUFFIXES):
        raise InputError(f"{path} has an unsupported format; give {', '.join(READ_SUFFIXES)} or a DICOM folder")
    return path


def _read_sitk(path: Path) -> sitk.Image:
    """Read a file or a DICOM series folder with SimpleITK, turning failures into InputError."""
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames([str(f) for f in _dicom_series_files(path)])
            reader.MetaDataDictionaryArrayUpdateOn()
            img = reader.Execute()
            _check_slice_spacing(reader, img, path)
            return img
        return sitk.ReadImage(str(_checked_file(path)))
    except RuntimeError as exc:
        raise InputError(f"cannot read {path}: {_itk_reason(exc)}") from None


def _dicom_series_files(folder: Path) -> list[str]:
    """Files of the DICOM series with the most files in ``folder`` (sorted by slice position)."""
    series = [(sid, sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid))
              for sid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))]
    if not series:
        raise InputError(f"{folder} holds no DICOM series; give a folder of DICOM slices or an image file")
    sid, files = max(series, key=lambda s: len(s[1]))
    if len(series) > 1:
        logger.info("%s holds %d DICOM series; using %s (%d files)", folder, len(series), sid, len(files))
    return list(files)


def _check_slice_spacing(reader: sitk.ImageSeriesReader, img: sitk.Image, folder: Path) -> None:
    """Refuse DICOM series whose slices are not evenly spaced (missing or duplicated slices)."""
    normal = np.reshape(img.GetDirection(), (3, 3))[:, 2]
    positions = []
    for i in range(len(reader.GetFileNames())):
        if reader.HasMetaDataKey(i, "0020|0032"):
            positions.append([float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")])
    if len(positions) < 3:
        return
    gaps = np.diff(np.asarray(positions) @ normal)
    if np.abs(gaps - img.GetSpacing()[2]).max() > 0.01 * img.GetSpacing()[2] + 1e-3:
        raise InputError(f"{folder}: DICOM slices are unevenly spaced (gaps {gaps.min():.3g} to "
                         f"{gaps.max():.3g} mm); check for missing slices or export the series again")


def _read_layers(img: sitk.Image, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(layers[L, I, J, K], RAS affine) of a 3-D scalar, 3-D vector or 4-D scalar image."""
    dim, components = img.GetDimension(), img.GetNumberOfComponentsPerPixel()
    if dim == 3 and components == 1:
        vol = sitk_to_volume(img)
        return vol.array[None], vol.affine
    array = sitk.GetArrayViewFromImage(img)  # borrows img's buffer: copied below
    if dim == 3:
        layers = array.transpose(3, 2, 1, 0)  # (k, j, i, c): components are layers (Slicer's list axis)
    elif dim == 4 and components == 1:
        layers = array.transpose(0, 3, 2, 1)  # (l, k, j, i)
    else:
        raise InputError(f"{path} is a {dim}-D image with {components} components per voxel; "
                         "give one 3-D volume")
    direction = np.reshape(img.GetDirection(), (dim, dim))[:3, :3]
    affine = lps_to_ras_affine(img.GetOrigin()[:3], img.GetSpacing()[:3], direction)
    return np.array(layers, order="C"), affine


def _shape_ijkl(layers: np.ndarray) -> tuple[int, ...]:
    return (*layers.shape[1:], layers.shape[0])


# --- label maps ----------------------------------------------------------------------------------


def _check_labels(labels: np.ndarray, path: Path) -> None:
    if labels.dtype.kind not in "fiu":
        raise InputError(f"{path} has voxel type {labels.dtype}; a label map needs integer labels")
    if labels.dtype.kind == "f" and not np.array_equal(labels, np.round(labels)):
        raise InputError(f"{path} has non-integer voxel values, so it looks like an intensity image, "
                         "not a label map; give the segmentation file")
    low = labels.min(initial=0)
    if low < 0:
        raise InputError(f"{path} has negative labels (minimum {low:g}); a label map needs values >= 0 "
                         "(is this a CT rather than a segmentation?)")


def _label_dtype(max_label: int, path: Path) -> type[np.integer]:
    """Smallest of uint8 / int16 / int32 holding ``max_label``."""
    for dtype in (np.uint8, np.int16, np.int32):
        if max_label <= np.iinfo(dtype).max:
            return dtype
    raise InputError(f"{path} has label {max_label}, above the supported maximum {np.iinfo(np.int32).max}")


def _segment_table(img: sitk.Image, n_layers: int, path: Path) -> list[tuple[int, int, str]]:
    """(layer, label value, name) per Slicer segment, in segment order; empty for a plain image."""
    meta = {key: img.GetMetaData(key) for key in img.GetMetaDataKeys()}
    indices = sorted({int(m.group(1)) for key in meta if (m := _SEGMENT_KEY.match(key))})
    table = []
    for n in indices:
        # Files without LabelValue/Layer (Slicer < 4.11) store one binary segment per layer.
        layer_default = str(n) if n_layers > 1 else "0"
        try:
            layer = int(meta.get(f"Segment{n}_Layer", layer_default))
            value = int(meta.get(f"Segment{n}_LabelValue", "1"))
        except ValueError:
            raise InputError(f"{path}: Segment{n}_Layer or Segment{n}_LabelValue is not an integer; "
                             "save the segmentation again from Slicer") from None
        if not 0 <= layer < n_layers or value <= 0:
            raise InputError(f"{path}: Segment{n} has layer {layer} and label {value}, but the file has "
                             f"{n_layers} layer(s) and labels must be > 0; save it again from Slicer")
        name = meta.get(f"Segment{n}_Name") or meta.get(f"Segment{n}_ID") or f"Segment_{n}"
        table.append((layer, value, name))
    return table


def _merge_segments(layers: np.ndarray, segments: list[tuple[int, int, str]],
                    path: Path) -> tuple[np.ndarray, dict[int, str]]:
    """One label map from all segments; duplicate values are renumbered, later segments win overlaps."""
    merged = np.zeros(layers.shape[1:], dtype=np.int32)
    names: dict[int, str] = {}
    next_free = max(value for _, value, _ in segments) + 1
    for layer, value, name in segments:
        mask = layers[layer] == value
        if value in names:
            logger.info("%s: segment %r shares label %d with %r; it gets label %d",
                        path, name, value, names[value], next_free)
            value, next_free = next_free, next_free + 1
        overlap = int(np.count_nonzero(merged[mask]))
        if overlap:
            logger.warning("%s: segment %r overlaps %d voxels of earlier segments; %r wins there",
                           path, name, overlap, name)
        merged[mask] = value
        names[value] = name
    return merged, names


# --- writing -------------------------------------------------------------------------------------


def write_volume(volume: Volume, path: str | Path, *, metadata: Mapping[str, str] | None = None,
                 overwrite: bool = False) -> None:
    """Write ``volume`` atomically in its own dtype to .nii/.nii.gz/.nrrd/.mha.

    ``metadata`` becomes header key/values in NRRD and MetaImage; NIfTI keeps only ``metadata["descrip"]``
    (truncated to the field's 79 bytes).
    """
    path = Path(path)
    suffix = next((s for s in WRITE_SUFFIXES if path.name.lower().endswith(s)), None)
    if suffix is None:
        raise InputError(f"cannot write {path}: unsupported format; use one of {', '.join(WRITE_SUFFIXES)}")
    check_output_path(path, overwrite)

    img = volume_to_sitk(volume)
    for key, value in (metadata or {}).items():
        if suffix.startswith(".nii"):
            if key == "descrip":
                descrip = str(value).encode()[:_NIFTI_DESCRIP_BYTES].decode(errors="ignore")
                img.SetMetaData("ITK_FileNotes", descrip)
            else:
                logger.debug("NIfTI has no field for metadata key %r; not written to %s", key, path)
        else:
            img.SetMetaData(key, str(value))

    _write_atomically(path, suffix, lambda tmp: sitk.WriteImage(img, str(tmp), useCompression=suffix != ".nii"))
    logger.info("wrote %s (%s, %s)", path, volume.array.dtype, describe_geometry(volume))


def check_output_path(path: Path, overwrite: bool) -> None:
    """Refuse an output path whose folder is missing, that is a folder, or that exists without ``overwrite``."""
    if not path.parent.is_dir():
        raise InputError(f"cannot write {path}: folder {path.parent} does not exist; create it first")
    if path.is_dir():
        raise InputError(f"cannot write {path}: it is a folder; give a file name")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; choose another name or use --overwrite")


def _write_atomically(path: Path, suffix: str, write: Callable[[Path], None]) -> None:
    """``write`` a temp file beside ``path`` (same suffix), then rename it over ``path``; no temp file survives."""
    tmp = path.parent / f".tmp-{uuid.uuid4().hex[:8]}{suffix}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except (RuntimeError, OSError) as exc:
        reason = _itk_reason(exc) if isinstance(exc, RuntimeError) else exc.strerror
        raise InputError(f"cannot write {path}: {reason}; check the folder is writable and has space") from None
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield an empty temp folder beside ``target``; when the block succeeds it replaces ``target`` (with the
    usual umask permissions), and on any failure it is removed and ``target`` is left as it was."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes a private folder
        for path in tmp.iterdir():
            os.chmod(path, 0o666 & ~umask)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes(path: str | Path, data: bytes, *, overwrite: bool = False) -> None:
    """Write a small file (JSON sidecar, PNG preview) atomically, with the same checks as :func:`write_volume`."""
    path = Path(path)
    check_output_path(path, overwrite)
    _write_atomically(path, "".join(path.suffixes[-1:]), lambda tmp: tmp.write_bytes(data))


def _itk_reason(exc: RuntimeError) -> str:
    """The last meaningful line of an ITK exception message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = lines[-1] if lines else "unknown error"
    return reason.split("): ", 1)[-1]
