"""Read CT volumes and header metadata from image files and DICOM series folders; ITK failures become one-line
:class:`~CTSemanticSynthLib.errors.InputError` messages."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..labels import few_enough_for_labels
from .complete import _refuse_nonfinite, verify_complete
from .volume import Volume, lps_to_ras_affine, sitk_to_volume

logger = logging.getLogger(__name__)

READ_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
_UNPRINTABLE = "[UNKNOWN_PRINT_CHARACTERISTICS]"  # SimpleITK's value for non-string metadata
_LABEL_RANGE = 2**16
"""Label maps given where a CT is expected are looked for among arrays of whole numbers below this."""


def read_image(path: str | Path) -> Volume:
    """Read a CT volume (NIfTI, NRRD, MetaImage or a DICOM series folder) as float32."""
    path = Path(path)
    layers, affine = _read_layers(_read_sitk(path), path)
    if len(layers) != 1:
        raise InputError(f"{path} is 4-D (shape {_shape_ijkl(layers)}); give one 3-D volume")
    array = layers[0].astype(np.float32, copy=False)
    _refuse_nonfinite(path, array)
    return Volume(array, affine)


def read_ct(path: str | Path, name: str) -> Volume:
    """:func:`read_image` for an input that must be a CT (``name``, e.g. "--keep-ct ct.nii.gz", starts the message):
    InputError when it looks like a label map: whole numbers >= 0, few enough for one
    (:func:`~CTSemanticSynthLib.labels.few_enough_for_labels`, the rule that refuses a CT given as a segmentation)."""
    volume = read_image(path)
    values = _label_values(volume.array)
    if values is not None and few_enough_for_labels(np.asarray(values)):
        raise InputError(f"{name} looks like a label map, not a CT: it holds {len(values)} distinct whole numbers "
                         f"from {values[0]} to {values[-1]} (a CT in HU has many values, air near -1000); give the "
                         "CT file")
    return volume


def _label_values(array: np.ndarray) -> list[int] | None:
    """The sorted distinct values of an array of whole numbers in 0..65535, else None (slab by slab: no copy of the
    whole volume)."""
    if not array.size or array.min() < 0 or array.max() > _LABEL_RANGE - 1:
        return None
    counts = np.zeros(_LABEL_RANGE, np.int64)
    for slab in array:
        whole = slab.astype(np.int32)
        if not np.array_equal(whole, slab):
            return None
        counts += np.bincount(whole.ravel(), minlength=_LABEL_RANGE)
    return np.flatnonzero(counts).tolist()


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


def _itk_reason(exc: RuntimeError) -> str:
    """The last meaningful line of an ITK exception message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = lines[-1] if lines else "unknown error"
    return reason.split("): ", 1)[-1]
