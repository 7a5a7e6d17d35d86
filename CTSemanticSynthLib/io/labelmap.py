"""Read label maps: integer and sign checks, the smallest label dtype, and Slicer .seg.nrrd segment tables merged
into one label map with ``{label value: segment name}``."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from .complete import _refuse_nonfinite
from .read import _read_layers, _read_sitk, _shape_ijkl
from .volume import Volume

logger = logging.getLogger(__name__)

_SEGMENT_KEY = re.compile(r"Segment(\d+)_\w+$")


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
