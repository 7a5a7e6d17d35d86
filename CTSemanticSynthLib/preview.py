"""PNG preview of a synthesis: axial, coronal and sagittal rows of segmentation | synthetic CT (| real CT)."""

from __future__ import annotations

from io import BytesIO

import numpy as np
from PIL import Image, ImageDraw

from .io import Volume
from .labels import COLORS, ORGANS
from .preprocess import AxialOrientation, hu_to_unit

PANEL_HEIGHT = 320
MAX_SIDE = 2048
ROW_GAP = 2
"""Black pixels between the rows (planes), so that views whose content reaches their edge stay apart."""


def _colour(classes: np.ndarray) -> np.ndarray:
    return np.asarray(COLORS, dtype=np.uint8)[classes]


def _grey(hu: np.ndarray) -> np.ndarray:
    g = (hu_to_unit(hu) * 255).round().astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)


def _panel(rgb: np.ndarray, size: tuple[int, int], label: str, nearest: bool) -> Image.Image:
    img = Image.fromarray(rgb).resize(size, Image.NEAREST if nearest else Image.BILINEAR)
    ImageDraw.Draw(img).text((4, 4), label, fill=(255, 255, 0))
    return img


def _panel_size(extent_mm: tuple[float, float], panels: int) -> tuple[int, int]:
    """(width, height) in pixels of one of ``panels`` side-by-side views of ``extent_mm`` (height, width): the
    physical aspect kept, PANEL_HEIGHT high unless the row would be wider than MAX_SIDE."""
    height_mm, width_mm = extent_mm
    height = min(float(PANEL_HEIGHT), MAX_SIDE / (panels * width_mm / height_mm))
    return max(1, int(height * width_mm / height_mm)), max(1, int(round(height)))


def render_preview(classes: Volume, synthetic: Volume, real: Volume | None = None) -> Image.Image:
    """Axial slice with the most organ voxels and the coronal and sagittal planes through the organs' centre (where
    stripes from slice-to-slice disagreement show), each view in its physical proportions; no side is longer than
    MAX_SIDE pixels."""
    orientation = AxialOrientation.from_affine(classes.affine)
    cls = orientation.to_stack(classes.array)
    views = [("segmentation", cls, True), ("synthetic CT", orientation.to_stack(synthetic.array), False)]
    if real is not None:
        views.append(("real CT", orientation.to_stack(real.array), False))
    spacing = [classes.spacing[a] for a in orientation.axes]  # slice, row, column spacing
    extent = [n * s for n, s in zip(cls.shape, spacing)]
    organs = np.isin(cls, ORGANS)
    axial = int(np.argmax(organs.reshape(len(cls), -1).sum(axis=1)))
    rows = np.flatnonzero(organs.any(axis=(0, 2)))
    coronal = int(rows.mean()) if rows.size else cls.shape[1] // 2
    columns = np.flatnonzero(organs.any(axis=(0, 1)))
    sagittal = int(columns.mean()) if columns.size else cls.shape[2] // 2
    panels = []
    for plane, take, extent_mm in (
        ("axial", lambda a: a[axial], (extent[1], extent[2])),
        ("coronal", lambda a: a[::-1, coronal, :], (extent[0], extent[2])),
        ("sagittal", lambda a: a[::-1, :, sagittal], (extent[0], extent[1])),
    ):
        size = _panel_size(extent_mm, len(views))
        panels.append([_panel(_colour(take(a)) if is_seg else _grey(take(a)), size, f"{plane} {name}", is_seg)
                       for name, a, is_seg in views])
    canvas = Image.new("RGB", (max(sum(p.width for p in row) for row in panels),
                               sum(row[0].height for row in panels) + ROW_GAP * (len(panels) - 1)))
    y = 0
    for row in panels:
        x = 0
        for p in row:
            canvas.paste(p, (x, y))
            x += p.width
        y += row[0].height + ROW_GAP
    return canvas


def preview_png(classes: Volume, synthetic: Volume, real: Volume | None = None) -> bytes:
    """:func:`render_preview` encoded as PNG, for the caller to write with the volume (see ``io.atomic_outputs``)."""
    buffer = BytesIO()
    render_preview(classes, synthetic, real).save(buffer, format="PNG")
    return buffer.getvalue()
