"""PNG preview of a synthesis: axial and coronal rows of segmentation | synthetic CT (| real CT)."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .io import Volume, write_bytes
from .labels import COLORS, ORGANS
from .preprocess import AxialOrientation, hu_to_unit

PANEL_HEIGHT = 320


def _colour(classes: np.ndarray) -> np.ndarray:
    return np.asarray(COLORS, dtype=np.uint8)[classes]


def _grey(hu: np.ndarray) -> np.ndarray:
    g = (hu_to_unit(hu) * 255).round().astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)


def _panel(rgb: np.ndarray, aspect: float, label: str, nearest: bool) -> Image.Image:
    """Scale an (H, W, 3) view to PANEL_HEIGHT keeping the physical aspect (row / column spacing)."""
    h, w = rgb.shape[:2]
    width = max(1, int(round(PANEL_HEIGHT * w / (h * aspect))))
    img = Image.fromarray(rgb).resize((width, PANEL_HEIGHT), Image.NEAREST if nearest else Image.BILINEAR)
    ImageDraw.Draw(img).text((4, 4), label, fill=(255, 255, 0))
    return img


def render_preview(classes: Volume, synthetic: Volume, real: Volume | None = None) -> Image.Image:
    """Axial slice with the most organ voxels and the coronal plane through the organs' centre."""
    orientation = AxialOrientation.from_affine(classes.affine)
    cls = orientation.to_stack(classes.array)
    views = [("segmentation", cls, True), ("synthetic CT", orientation.to_stack(synthetic.array), False)]
    if real is not None:
        views.append(("real CT", orientation.to_stack(real.array), False))
    spacing = [classes.spacing[a] for a in orientation.axes]  # slice, row, column spacing
    organs = np.isin(cls, ORGANS)
    axial = int(np.argmax(organs.reshape(len(cls), -1).sum(axis=1)))
    rows = np.flatnonzero(organs.any(axis=(0, 2)))
    coronal = int(rows.mean()) if rows.size else cls.shape[1] // 2
    panels = []
    for plane, take, aspect in (
        ("axial", lambda a: a[axial], spacing[1] / spacing[2]),
        ("coronal", lambda a: a[::-1, coronal, :], spacing[0] / spacing[2]),
    ):
        row = [_panel(_colour(take(a)) if is_seg else _grey(take(a)), aspect, f"{plane} {name}", is_seg)
               for name, a, is_seg in views]
        panels.append(row)
    width = max(sum(p.width for p in row) for row in panels)
    canvas = Image.new("RGB", (width, PANEL_HEIGHT * len(panels)))
    for r, row in enumerate(panels):
        x = 0
        for p in row:
            canvas.paste(p, (x, r * PANEL_HEIGHT))
            x += p.width
    return canvas


def write_preview(path: str | Path, classes: Volume, synthetic: Volume, real: Volume | None = None,
                  *, overwrite: bool = False) -> None:
    """Render :func:`render_preview` and write it as PNG atomically."""
    buffer = BytesIO()
    render_preview(classes, synthetic, real).save(buffer, format="PNG")
    write_bytes(Path(path), buffer.getvalue(), overwrite=overwrite)
