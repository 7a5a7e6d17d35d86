"""Checks that a volume file is whole: all the voxel data its header promises, intact, and no NaN or infinite
voxels. nibabel is imported only here, inside the functions that look at NIfTI files."""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError

_GZIP, _ZLIB = 16 + zlib.MAX_WBITS, zlib.MAX_WBITS  # zlib wbits for a gzip stream / a zlib stream


def _refuse_nonfinite(path: Path, array: np.ndarray) -> None:
    """InputError for NaN/inf voxels. ITK's NIfTI reader silently turns them into 0, so NIfTI files are
    checked on disk with nibabel."""
    if path.name.lower().endswith((".nii", ".nii.gz")):
        img = _load_nifti(path)
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
            expected = _nifti_data_end(path)
        else:
            info = _image_information(path)
            voxels = int(np.prod(info.GetSize())) * info.GetNumberOfComponents()
            expected = offset * (wbits is None) + voxels * sitk.Image([1] * info.GetDimension(),
                                                                      info.GetPixelID()).GetSizeOfPixelComponent()
        found = source.stat().st_size if wbits is None else _decompressed_size(source, offset, wbits)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise InputError(f"cannot read {path}: the file is damaged ({str(exc).replace(str(path), 'file')}); "
                         "copy or export it again") from None
    if found < expected:
        raise InputError(f"cannot read {path}: the file is truncated ({found} of the {expected} bytes its header "
                         "promises); copy or export it again")


def _nifti_data_end(path: Path) -> int:
    """Byte offset at which a NIfTI file's voxel data ends, from its header; ValueError for an unreadable header,
    InputError for a header nibabel reads but does not support."""
    import nibabel as nib  # NIfTI only, so that the rest of io runs without nibabel

    try:
        image = _load_nifti(path)  # reads the header only
    except nib.filebasedimages.ImageFileError as exc:
        raise ValueError(str(exc)) from None
    except nib.spatialimages.HeaderDataError as exc:  # e.g. datatype 1 (1 bit a voxel), which ITK cannot read either
        raise InputError(f"cannot read {path}: its NIfTI header is not supported ({exc}); save it again with a "
                         "standard voxel type (uint8 or int16 for a label map)") from None
    return int(image.dataobj.offset) + int(np.prod(image.shape)) * image.get_data_dtype().itemsize


def _load_nifti(path: Path):  # -> nibabel's image (nibabel is imported here only)
    """nibabel's image of a NIfTI file, read without nibabel's log record of a header problem it raises.

    nibabel logs such a problem at ERROR before raising it, both to the root logger (``ctsynth: ERROR: ...``) and to
    a stderr handler of its own, bound to the ``sys.stderr`` of the moment nibabel was imported (a closed stream
    there prints a "--- Logging error ---" traceback); the caller turns the exception into one message.
    """
    import nibabel as nib  # NIfTI only, so that the rest of io runs without nibabel

    logger = logging.getLogger("nibabel.global")
    logger.addFilter(_below_error)
    try:
        return nib.load(str(path))
    finally:
        logger.removeFilter(_below_error)


def _below_error(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR


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
