"""Read and write CT volumes and label maps (NIfTI, NRRD, MetaImage, DICOM series, Slicer .seg.nrrd).

Arrays are in voxel order (I, J, K), i.e. ``array[i, j, k]``, and travel with a 4x4 affine that maps
voxel (i, j, k, 1) to RAS millimetres. SimpleITK (LPS, (k, j, i) arrays) is only used inside this
module; :func:`lps_to_ras_affine` and :func:`ras_affine_to_lps` are the only places that convert.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import zlib
from collections.abc import Iterator, Mapping
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
_GZIP, _ZLIB = 16 + zlib.MAX_WBITS, zlib.MAX_WBITS  # zlib wbits for a gzip stream / a zlib stream


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


def verify_complete(path: str | Path) -> None:
    """InputError unless a file holds all the voxel data its header promises, intact.

    ITK zero-fills a truncated NIfTI file and decodes a damaged gzip/zlib stream without raising, so compressed
    data (.nii.gz, gzip NRRD, compressed MetaImage) is decompressed to the end here (which checks its CRC or
    Adler-32) and the byte count, like an uncompressed NIfTI file's size, is compared with shape x voxel size.
    """
    path = Path(path)
    source, offset, wbits = _data_section(path)
    if source is None:
        return
    name = path.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            image = nib.load(str(path))  # reads the header only
            expected = int(image.dataobj.offset) + int(np.prod(image.shape)) * image.get_data_dtype().itemsize
        else:
            info = _image_information(path)
            voxels = int(np.prod(info.GetSize())) * info.GetNumberOfComponents()
            expected = offset * (wbits is None) + voxels * sitk.Image([1] * info.GetDimension(),
                                                                      info.GetPixelID()).GetSizeOfPixelComponent()
        found = source.stat().st_size if wbits is None else _decompressed_size(source, offset, wbits)
    except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as exc:
        raise InputError(f"cannot read {path}: the file is damaged ({str(exc).replace(str(path), 'file')}); "
                         "copy or export it again") from None
    if found < expected:
        raise InputError(f"cannot read {path}: the file is truncated ({found} of the {expected} bytes its header "
                         "promises); copy or export it again")


def _data_section(path: Path) -> tuple[Path | None, int, int | None]:
    """(file holding the voxel data, offset of the data, zlib ``wbits`` or None when not compressed); no file for
    formats that ITK itself checks (raw NRRD and MetaImage, DICOM)."""
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return path, 0, _GZIP
    if name.endswith(".nii"):
        return path, 0, None
    if not name.endswith((".nrrd", ".nhdr", ".mha", ".mhd")):
        return None, 0, None
    nrrd = name.endswith((".nrrd", ".nhdr"))
    fields: dict[str, str] = {}
    with open(path, "rb") as f:
        for raw in iter(f.readline, b""):
            line = raw.decode("latin-1").strip()
            if nrrd and not line:
                break
            key, sep, value = line.partition(":" if nrrd else "=")
            if sep:
                fields[key.strip().lower()] = value.strip()
            if not nrrd and key.strip().lower() == "elementdatafile":
                break
        offset = f.tell()
    if nrrd:
        data = fields.get("data file", fields.get("datafile"))
        wbits = _GZIP if fields.get("encoding", "").lower() in ("gzip", "gz") else None
    else:
        data = fields.get("elementdatafile")
        data = None if data == "LOCAL" else data
        wbits = _ZLIB if fields.get("compresseddata", "").lower() == "true" else None
    if wbits is None or (data is not None and (" " in data or data.upper() == "LIST")):
        return None, 0, None  # raw data (ITK refuses short files) or a list of data files
    return (path, offset, wbits) if data is None else (path.parent / data, 0, wbits)


def _decompressed_size(path: Path, offset: int, wbits: int) -> int:
    """Bytes in the gzip members (or the zlib stream) from ``offset``; EOFError when the data ends early."""
    total, pending = 0, b""
    stream = zlib.decompressobj(wbits)
    with open(path, "rb") as f:
        f.seek(offset)
        while pending or (pending := f.read(1 << 20)):
            if stream.eof:  # what follows a complete stream: another gzip member, or padding
                if wbits != _GZIP or not pending.strip(b"\0"):
                    return total
                stream = zlib.decompressobj(wbits)
            total += len(stream.decompress(pending, 1 << 24))
            pending = stream.unconsumed_tail or stream.unused_data
    if not stream.eof:
        raise EOFError("the compressed data ends early")
    return total


def _image_information(path: Path) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader


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
        verify_complete(_checked_file(path))
        return sitk.ReadImage(str(path))
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


# --- writing: every file goes through atomic_outputs ---------------------------------------------

_TEMP_NAME = re.compile(r"\.ctsynth-(tmp|old)-(\d+)-[0-9a-f]{8}\.(.+)")
"""``.ctsynth-tmp-<pid>-<random>.<name>``: a file being written; ``.ctsynth-old-...``: an output moved aside."""


def temp_sibling(target: Path, kind: str = "tmp") -> Path:
    """A recognisable hidden name beside ``target`` that ends in ``target``'s name (so its suffix picks the format)."""
    return target.with_name(f".ctsynth-{kind}-{os.getpid()}-{secrets.token_hex(4)}.{target.name}")


def check_output_path(path: Path, overwrite: bool) -> None:
    """Refuse an output file path whose folder is missing or read-only, that is a folder, or that exists without
    ``overwrite``."""
    if path.is_dir():
        raise InputError(f"cannot write {path}: it is a folder; give a file name")
    _check_target(path, overwrite)


def _check_target(path: Path, overwrite: bool) -> None:
    if not path.parent.is_dir():
        raise InputError(f"cannot write {path}: folder {path.parent} does not exist; create it first")
    if not os.access(path.parent, os.W_OK):
        raise InputError(f"cannot write {path}: folder {path.parent} is read-only; choose another output folder")
    if os.path.lexists(path) and not overwrite:
        raise OutputExistsError(f"{path} already exists; choose another name or use --overwrite")


def check_distinct_paths(outputs: Mapping[str, Path | None], inputs: Mapping[str, Path | None]) -> None:
    """InputError when two outputs are one file, or an output is an input or lies inside an input folder.

    Keys name the option (``"--out"``); paths are compared resolved and, where both exist, with ``samefile``
    (hard and symbolic links).
    """
    earlier: list[tuple[str, Path]] = [(name, Path(p)) for name, p in inputs.items() if p is not None]
    for name, path in ((n, Path(p)) for n, p in outputs.items() if p is not None):
        for other_name, other in earlier:
            if _same_or_inside(path, other):
                raise InputError(f"{name} {path} would overwrite {other_name} {other}; choose another output path")
        earlier.append((name, path))


def _same_or_inside(path: Path, other: Path) -> bool:
    resolved, other_resolved = path.resolve(), other.resolve()
    if resolved == other_resolved or (other.is_dir() and other_resolved in resolved.parents):
        return True
    try:
        return path.exists() and other.exists() and os.path.samefile(path, other)
    except OSError:
        return False


def remove_stale_temps(folder: Path) -> None:
    """Remove what a killed run left in ``folder`` (temp names with a dead pid); an output it had moved aside
    whose new version never arrived is put back."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        match = _TEMP_NAME.fullmatch(entry.name)
        if match is None or _pid_alive(int(match.group(2))):
            continue
        target = folder / match.group(3)
        try:
            if match.group(1) == "old" and not os.path.lexists(target):
                os.rename(entry, target)
                logger.warning("restored %s, moved aside by an interrupted run", target)
            else:
                _remove(entry)
                logger.info("removed %s, left by an interrupted run", entry)
        except OSError as exc:
            logger.warning("cannot remove %s left by an interrupted run: %s", entry, exc.strerror)


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs; always True where that cannot be asked safely (Windows: os.kill would
    signal it), so leftovers there stay until removed by hand."""
    if pid == os.getpid() or os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_outputs(*targets: Path, overwrite: bool = False) -> Iterator[tuple[Path, ...]]:
    """Yield a temp path beside each target; the block writes each one (a file, or a folder it creates).

    When the block succeeds, every temp file is flushed to disk and all temps are renamed into place together:
    existing targets are moved aside first and deleted only once every new one is in place. On any failure or
    interrupt (Ctrl-C, SIGTERM) every temp is removed and existing targets are left byte-identical. Leftovers of
    killed runs in the targets' folders are cleaned up first (:func:`remove_stale_temps`).
    """
    targets = tuple(Path(t) for t in targets)
    if len({t.resolve() for t in targets}) != len(targets):
        raise ValueError(f"atomic_outputs got the same target twice: {', '.join(map(str, targets))}")
    for target in targets:
        _check_target(target, overwrite)
    for folder in dict.fromkeys(t.parent for t in targets):
        remove_stale_temps(folder)
    temps = tuple(temp_sibling(t) for t in targets)
    try:
        yield temps
        for tmp in temps:
            if not os.path.lexists(tmp):
                raise InputError(f"{tmp} was not written")
            if tmp.is_file():
                _fsync(tmp)
        _commit(list(zip(temps, targets)))
    except OSError as exc:
        target = next((t for t, tmp in zip(targets, temps) if str(tmp) in (exc.filename, exc.filename2)), targets[0])
        raise InputError(f"cannot write {target}: {exc.strerror or exc}; check the folder is writable and has "
                         "space") from None
    finally:
        for tmp in temps:
            _remove(tmp)


def _commit(pairs: list[tuple[Path, Path]]) -> None:
    """Rename each temp over its target, old targets kept aside until all are in; all or nothing."""
    aside: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    with _interrupts_deferred():
        try:
            for tmp, target in pairs:
                if os.path.lexists(target):
                    old = temp_sibling(target, "old")
                    os.rename(target, old)
                    aside.append((old, target))
                os.rename(tmp, target)
                placed.append(target)
        except BaseException:
            for target in placed:
                _remove(target)
            for old, target in reversed(aside):
                os.rename(old, target)
            raise
        for old, _ in aside:
            _remove(old)
    for folder in dict.fromkeys(target.parent for _, target in pairs):
        _fsync(folder)


@contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM while a rename sequence runs, then deliver them to the usual handlers.

    Python runs signal handlers in the main thread between bytecodes, whichever thread the signal reached
    (blocking it there would not help once torch has started threads), so the handlers are swapped for the
    duration; other threads cannot install handlers and run the block as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {signum: signal.signal(signum, lambda number, frame: caught.append(number))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    for signum in dict.fromkeys(caught):
        signal.raise_signal(signum)


def _fsync(path: Path) -> None:
    """Flush a file's data (a full disk may only show up here) or, on POSIX, a folder's entries to disk."""
    if path.is_file():
        fd = os.open(path, os.O_RDWR)  # Windows cannot flush a read-only handle
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    elif os.name == "posix":
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError as exc:  # some file systems cannot flush a folder; the renames are done either way
            logger.debug("fsync of folder %s: %s", path, exc)
        finally:
            os.close(fd)


@contextmanager
def atomic_folder(target: Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield an empty folder that replaces ``target`` when the block succeeds (see :func:`atomic_outputs`)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_outputs(target, overwrite=overwrite) as (tmp,):
        tmp.mkdir()
        yield tmp


def write_bytes(path: str | Path, data: bytes, *, overwrite: bool = False) -> None:
    """Write a small file (JSON, CSV, PNG) atomically, with the same checks as :func:`write_volume`."""
    path = Path(path)
    check_output_path(path, overwrite)
    with atomic_outputs(path, overwrite=overwrite) as (tmp,):
        tmp.write_bytes(data)


def write_volume(volume: Volume, path: str | Path, *, metadata: Mapping[str, str] | None = None,
                 overwrite: bool = False) -> None:
    """Write ``volume`` atomically in its own dtype to .nii/.nii.gz/.nrrd/.mha (see :func:`save_volume`)."""
    path = Path(path)
    _write_suffix(path)
    check_output_path(path, overwrite)
    with atomic_outputs(path, overwrite=overwrite) as (tmp,):
        save_volume(volume, tmp, metadata=metadata)
    logger.info("wrote %s (%s, %s)", path, volume.array.dtype, describe_geometry(volume))


def save_volume(volume: Volume, path: Path, *, metadata: Mapping[str, str] | None = None) -> None:
    """Write ``volume`` to ``path``, a temp path from :func:`atomic_outputs`, and read it back to verify it.

    ``metadata`` becomes header key/values in NRRD and MetaImage; NIfTI keeps only ``metadata["descrip"]``
    (truncated to the field's 79 bytes). ITK reports some failures (a full disk) only on stderr, so its stderr is
    captured and the file's header and full data length are checked; a failure is an OSError naming ``path``,
    which :func:`atomic_outputs` turns into one line about the target.
    """
    suffix = _write_suffix(path)
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
    itk_said: list[str] = []
    try:
        with _stderr_captured(itk_said):
            sitk.WriteImage(img, str(path), useCompression=suffix != ".nii")
        written = _image_information(path)
        if tuple(written.GetSize()) != volume.shape or written.GetPixelID() != img.GetPixelID():
            raise InputError("its header does not match the volume")
        verify_complete(path)
    except (RuntimeError, InputError) as exc:
        reason = " ".join(itk_said) or (_itk_reason(exc) if isinstance(exc, RuntimeError) else str(exc))
        raise OSError(errno.EIO, f"the file written is incomplete or unreadable ({reason})", str(path)) from None


@contextmanager
def _stderr_captured(lines: list[str]) -> Iterator[None]:
    """Collect what C libraries print on file descriptor 2 (ITK's only report of some failures) into ``lines``."""
    try:
        saved = os.dup(2)
    except OSError:  # stderr is closed: nothing to capture
        yield
        return
    try:
        capture = tempfile.TemporaryFile()
    except OSError:  # e.g. a full temp folder: let the messages through
        os.close(saved)
        yield
        return
    sys.stderr.flush()
    os.dup2(capture.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        with capture:
            capture.seek(0)
            lines.extend(line.strip() for line in capture.read().decode(errors="replace").splitlines() if line.strip())
        for line in lines:
            logger.debug("ITK: %s", line)


def _write_suffix(path: Path) -> str:
    suffix = next((s for s in WRITE_SUFFIXES if path.name.lower().endswith(s)), None)
    if suffix is None:
        raise InputError(f"cannot write {path}: unsupported format; use one of {', '.join(WRITE_SUFFIXES)}")
    return suffix


def _itk_reason(exc: RuntimeError) -> str:
    """The last meaningful line of an ITK exception message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = lines[-1] if lines else "unknown error"
    return reason.split("): ", 1)[-1]
