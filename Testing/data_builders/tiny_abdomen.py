"""Tiny CT + label-map cases for whole-pipeline tests (the downstream nnU-Net study).

``build_tiny_abdomen(root, cases=8)`` writes ``root/images/case_NN.nii.gz`` (int16 HU) and
``root/labels/case_NN.nii.gz`` (AMOS ids): an elliptic body of soft tissue in air with a liver (6), spleen (1),
two kidneys (2, 3) and the aorta (8), each organ with its own HU and shifted by a few voxels per case, so that the
cases differ and a segmentation network has something to learn. Same ``seed``, same files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from CTSemanticSynthLib.io import Volume, write_volume

SHAPE = (40, 40, 6)
SPACING = (2.0, 2.0, 5.0)
ORGANS = {  # AMOS id: (centre i, centre j, radius i, radius j, HU)
    6: (14, 15, 8, 7, 60.0),   # liver
    1: (27, 14, 4, 4, 45.0),   # spleen
    2: (13, 27, 3, 3, 160.0),  # right kidney
    3: (27, 27, 3, 3, 160.0),  # left kidney
    8: (20, 24, 2, 2, 220.0),  # aorta
}


def _ellipse(shape: tuple[int, int], ci: float, cj: float, ri: float, rj: float) -> np.ndarray:
    i, j = np.mgrid[: shape[0], : shape[1]]
    return ((i - ci) / ri) ** 2 + ((j - cj) / rj) ** 2 <= 1.0


def tiny_case(seed: int) -> tuple[Volume, Volume]:
    """(CT in HU as int16, AMOS label map) of one case."""
    rng = np.random.default_rng(seed)
    affine = np.diag([*SPACING, 1.0])
    ct = np.full(SHAPE, -1000.0, dtype=np.float32)
    labels = np.zeros(SHAPE, dtype=np.uint8)
    body = _ellipse(SHAPE[:2], 20, 20, 17, 15)
    shift = rng.integers(-2, 3, size=2)
    for k in range(SHAPE[2]):
        ct[..., k][body] = -80.0
        for organ, (ci, cj, ri, rj, hu) in ORGANS.items():
            grow = 1 - abs(k - SHAPE[2] / 2) / SHAPE[2]  # organs shrink towards the ends
            mask = _ellipse(SHAPE[:2], ci + shift[0], cj + shift[1], max(ri * grow, 1), max(rj * grow, 1)) & body
            ct[..., k][mask] = hu
            labels[..., k][mask] = organ
    ct += rng.normal(0.0, 15.0, size=SHAPE).astype(np.float32) * body[..., None]
    return Volume(np.round(ct).astype(np.int16), affine), Volume(labels, affine)


def build_tiny_abdomen(root: str | Path, cases: int = 8, seed: int = 0) -> tuple[Path, Path]:
    """Write ``cases`` tiny cases; returns (images folder, labels folder)."""
    root = Path(root)
    images, labels = root / "images", root / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    for n in range(cases):
        ct, seg = tiny_case(seed * 1000 + n)
        write_volume(ct, images / f"case_{n:02d}.nii.gz", overwrite=True)
        write_volume(seg, labels / f"case_{n:02d}.nii.gz", overwrite=True)
    return images, labels
