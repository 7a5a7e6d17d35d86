"""PNG preview of a synthesis: axial, coronal and sagittal rows of segmentation | synthetic CT (| real CT), per
display window."""

from __future__ import annotations

from io import BytesIO

import numpy as np
from PIL import Image, ImageDraw

from .io import Volume
from .labels import ORGANS, PAPER, ClassSet
from .preprocess import WINDOW_LEVEL, WINDOW_WIDTH, AxialOrientation, hu_to_unit

PANEL_HEIGHT = 320
MAX_SIDE = 2048
ROW_GAP = 2
"""Black pixels between the rows (planes), so that views whose content reaches their edge stay apart."""
ABDOMEN = (WINDOW_LEVEL, WINDOW_WIDTH)
BONE = (400.0, 1800.0)
"""Display windows (level, width): the paper's abdomen window, and a bone window (air, fat, bone and gas apart)."""


def preview_windows(full_range: bool) -> tuple[tuple[float, float], ...]:
    """The windows a preview shows: the abdomen window, and the bone window too for a model with full-range HU."""
    return (ABDOMEN, BONE) if full_range else (ABDOMEN,)


def _colour(classes: np.ndarray, colors: ClassSet) -> np.ndarray:
    return np.asarray(colors.colors, dtype=np.uint8)[classes]


def _grey(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    g = (hu_to_unit(hu, *window) * 255).round().astype(np.uint8)
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


def render_preview(classes: Volume, synthetic: Volume, real: Volume | None = None, *, class_set: ClassSet = PAPER,
                   windows: tuple[tuple[float, float], ...] = (ABDOMEN,)) -> Image.Image:
    """Axial slice with the most organ voxels and the coronal and sagittal planes through the organs' centre (where
    stripes from slice-to-slice disagreement show), each view in its physical proportions; no side is longer than
    MAX_SIDE pixels. The segmentation is drawn in ``class_set``'s colours, then the synthetic (and real) CT in each
    of ``windows`` (level, width)."""
    orientation = AxialOrientation.from_affine(classes.affine)
    cls = orientation.to_stack(classes.array)
    views: list[tuple[str, np.ndarray, tuple[float, float] | None]] = [("segmentation", cls, None)]
    for window in windows:
        name = f"L{window[0]:g}/W{window[1]:g}"
        views.append((f"synthetic {name}", orientation.to_stack(synthetic.array), window))
        if real is not None:
            views.append((f"real {name}", orientation.to_stack(real.array), window))
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
        panels.append([_panel(_colour(take(a), class_set) if window is None else _grey(take(a), window), size,
                              f"{plane} {name}", window is None) for name, a, window in views])
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


def preview_png(classes: Volume, synthetic: Volume, real: Volume | None = None, *, class_set: ClassSet = PAPER,
                windows: tuple[tuple[float, float], ...] = (ABDOMEN,)) -> bytes:
    """:func:`render_preview` encoded as PNG, for the caller to write with the volume (see ``io.atomic_outputs``)."""
    buffer = BytesIO()
    render_preview(classes, synthetic, real, class_set=class_set, windows=windows).save(buffer, format="PNG")
    return buffer.getvalue()
