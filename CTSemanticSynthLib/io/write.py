"""Write volumes (NIfTI, NRRD, MetaImage) through :func:`~.atomic.atomic_outputs`, reading each file back to
verify it."""

from __future__ import annotations

import errno
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import SimpleITK as sitk

from ..errors import InputError
from .atomic import atomic_outputs, check_output_path
from .complete import _image_information, verify_complete
from .read import _itk_reason
from .volume import Volume, describe_geometry, volume_to_sitk

logger = logging.getLogger(__name__)

WRITE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
_NIFTI_DESCRIP_BYTES = 79  # ITK refuses longer (the field is char[80] with a terminating NUL)


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
