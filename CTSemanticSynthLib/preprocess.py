"""Intensity window, body class, axial slice stacks at the model's size and back, semantic edge maps.

Slice stacks are ``(N, H, W)`` arrays in one display orientation whatever the file's voxel order: axis 0 runs
inferior -> superior, rows anterior -> posterior, columns patient right -> left (radiological view).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .labels import BACKGROUND, BODY, NUM_CLASSES

WINDOW_LEVEL = 40.0
WINDOW_WIDTH = 400.0
AIR_HU = -1000
BODY_THRESHOLD_HU = -500.0


def hu_to_unit(hu: np.ndarray, level: float = WINDOW_LEVEL, width: float = WINDOW_WIDTH) -> np.ndarray:
    """Window HU to [0, 1] (L40/W400: -160 HU -> 0, 240 HU -> 1), clipping outside the window."""
    return np.clip((np.asarray(hu, dtype=np.float32) - (level - width / 2)) / width, 0.0, 1.0)


def unit_to_hu(x: np.ndarray, level: float = WINDOW_LEVEL, width: float = WINDOW_WIDTH) -> np.ndarray:
    """Inverse of :func:`hu_to_unit` on [0, 1]; inputs are clipped to [0, 1] first."""
    return np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0) * width + (level - width / 2)


@dataclass(frozen=True)
class AxialOrientation:
    """How a volume's (I, J, K) axes map to the slice stack: ``stack = flip(transpose(volume, axes), flips)``."""

    axes: tuple[int, int, int]
    flips: tuple[bool, bool, bool]

    @classmethod
    def from_affine(cls, affine: np.ndarray) -> AxialOrientation:
        """Nearest axis permutation for the affine; works for oblique and left-handed grids (no resampling)."""
        direction = np.asarray(affine, dtype=np.float64)[:3, :3]
        direction = direction / np.linalg.norm(direction, axis=0, keepdims=True)
        # stack axis 0 <- RAS z (S), axis 1 <- RAS y (rows go A -> P), axis 2 <- RAS x (columns go R -> L)
        wanted = ((2, 1.0), (1, -1.0), (0, -1.0))
        best, best_score = None, -np.inf
        for perm in ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)):
            score = sum(abs(direction[ras, vox]) for (ras, _), vox in zip(wanted, perm))
            if score > best_score:
                best, best_score = perm, score
        assert best is not None
        flips = tuple(bool(np.sign(direction[ras, vox]) != sign) for (ras, sign), vox in zip(wanted, best))
        return cls(axes=best, flips=flips)  # type: ignore[arg-type]

    def to_stack(self, volume: np.ndarray) -> np.ndarray:
        """Volume (I, J, K) -> stack (slices, rows, columns)."""
        stack = np.transpose(volume, self.axes)
        return stack[tuple(slice(None, None, -1) if f else slice(None) for f in self.flips)]

    def from_stack(self, stack: np.ndarray) -> np.ndarray:
        """Exact inverse of :meth:`to_stack`."""
        unflipped = stack[tuple(slice(None, None, -1) if f else slice(None) for f in self.flips)]
        return np.ascontiguousarray(np.transpose(unflipped, np.argsort(self.axes)))


@dataclass(frozen=True)
class PlaneResize:
    """Centre-pad an (H, W) slice to a square, then resize it to ``size`` x ``size``; and the inverse."""

    height: int
    width: int
    size: int

    @property
    def padding(self) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) padding that makes the slice square."""
        side = max(self.height, self.width)
        dh, dw = side - self.height, side - self.width
        return dh // 2, dh - dh // 2, dw // 2, dw - dw // 2

    def to_model(self, slices: torch.Tensor, *, labels: bool) -> torch.Tensor:
        """(N, H, W) -> (N, size, size); labels use nearest neighbour, images antialiased bilinear. Pads with 0."""
        top, bottom, left, right = self.padding
        x = F.pad(slices[:, None].float(), (left, right, top, bottom))
        if labels:
            out = F.interpolate(x, size=(self.size, self.size), mode="nearest-exact")
            return out[:, 0].round().to(slices.dtype)
        out = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return out[:, 0]

    def from_model(self, slices: torch.Tensor, *, labels: bool) -> torch.Tensor:
        """(N, size, size) -> (N, H, W), the inverse resize followed by the crop."""
        top, bottom, left, right = self.padding
        side = max(self.height, self.width)
        x = slices[:, None].float()
        if labels:
            x = F.interpolate(x, size=(side, side), mode="nearest-exact").round()
        else:
            x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
        out = x[:, 0, top : side - bottom, left : side - right]
        return out.to(slices.dtype) if labels else out


def hu_to_model(resize: PlaneResize, hu: torch.Tensor, hu_range: tuple[float, float]) -> torch.Tensor:
    """Full-resolution HU slices (N, H, W) -> model-size HU slices, clipped to ``hu_range`` and padded with its lowest
    value. Images are resized in HU because partial volume mixes attenuation linearly: a coarse pixel on a bone or air
    boundary holds the HU mean of what it covers. Resized after a companding mapping, the mean of cortical bone and
    marrow would map back far below it (and bowel gas next to its wall far above)."""
    low, high = hu_range
    return resize.to_model(hu.float().clamp(low, high) - low, labels=False) + low


def hu_from_model(resize: PlaneResize, hu: torch.Tensor, hu_range: tuple[float, float]) -> torch.Tensor:
    """Model-size HU slices -> full-resolution HU slices clipped to ``hu_range``: the inverse of :func:`hu_to_model`."""
    low, high = hu_range
    return (resize.from_model(hu.float() - low, labels=False) + low).clamp(low, high)


def _per_slice(mask: np.ndarray, fn) -> np.ndarray:
    return np.stack([fn(s) if s.any() else s for s in mask]) if mask.size else mask


def _largest_component(mask2d: np.ndarray) -> np.ndarray:
    labelled, n = ndimage.label(mask2d)
    if n <= 1:
        return mask2d
    sizes = ndimage.sum_labels(mask2d, labelled, index=np.arange(1, n + 1))
    return labelled == (int(np.argmax(sizes)) + 1)


def body_mask_from_ct(stack_hu: np.ndarray, threshold_hu: float = BODY_THRESHOLD_HU) -> np.ndarray:
    """Patient body per axial slice: threshold, opening (drops the table), largest component, holes filled."""
    structure = ndimage.generate_binary_structure(2, 1)

    def one(s: np.ndarray) -> np.ndarray:
        s = ndimage.binary_opening(s, structure=structure, iterations=2)
        return ndimage.binary_fill_holes(_largest_component(s))

    return _per_slice(np.asarray(stack_hu) > threshold_hu, one)


def body_mask_from_labels(stack_labels: np.ndarray, *, has_outline: bool, margin_px: float = 0,
                          bridge_px: float = 0) -> np.ndarray:
    """Body estimated from a segmentation alone, per axial slice.

    With an outline label (body/skin) the filled union of all labels is exact. Without one the outline is
    unknown: labelled structures closer than ``2 * bridge_px`` to each other form one group (the trunk's organs,
    bones and muscles), each group is replaced by its convex hull grown by ``margin_px`` (subcutaneous fat is
    usually not labelled), and enclosed gaps are filled. Separate limbs (a humerus, a femur with its muscles) stay
    separate groups, so the air between them and the trunk is not made body. Give a real body mask where one exists.
    """
    union = np.not_equal(stack_labels, 0, order="C")  # contiguous slices, whatever the stack's strides
    if has_outline:
        return _per_slice(union, ndimage.binary_fill_holes)
    factor, coarse = _groups(union, bridge_px)
    out = np.zeros_like(union)
    for k in range(len(union)):
        if not union[k].any():
            continue
        rows, cols = np.arange(union.shape[1]) // factor, np.arange(union.shape[2]) // factor
        groups = coarse[k][np.ix_(rows, cols)]
        ids = np.unique(coarse[k][coarse[k] > 0]) if coarse[k].any() else np.ones(1, np.int32)
        for group in ids:
            out[k] |= _grown_hull(union[k] & (groups == group) if len(ids) > 1 else union[k], margin_px)
        if len(ids) > 1:
            out[k] = ndimage.binary_fill_holes(out[k])
        out[k] |= union[k]
    return out


def _groups(union: np.ndarray, bridge_px: float) -> tuple[int, np.ndarray]:
    """(factor, groups): ``groups`` (N, H / factor, W / factor) numbers, per slice, the groups of labelled structures
    within ``2 * bridge_px`` of each other, on a grid coarsened by ``factor`` so that the bridge is about 3 cells
    (cheap on large slices); one group per slice when ``bridge_px`` is 0."""
    n, h, w = union.shape
    if bridge_px <= 0:
        return max(h, w, 1), np.ones((n, 1, 1), np.int32)
    factor = min(max(1, int(bridge_px // 3)), max(h, w))
    ph, pw = -h % factor, -w % factor
    coarse = np.pad(union, ((0, 0), (0, ph), (0, pw))).reshape(n, (h + ph) // factor, factor, (w + pw) // factor,
                                                               factor).any(axis=(2, 4))
    radius = min(int(np.ceil(bridge_px / factor)), max(coarse.shape[1:]))  # wider joins nothing more
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    disk = (yy**2 + xx**2 <= radius**2)[None]
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[1] = True  # 8-connected within a slice, never across slices
    groups, _ = ndimage.label(ndimage.binary_dilation(coarse, structure=disk), structure=in_plane)
    return factor, groups


def _grown_hull(mask2d: np.ndarray, margin_px: float) -> np.ndarray:
    """The filled convex hull of ``mask2d``'s pixels (all of them if they span no area: fewer than three, or in a
    line), grown by ``round(margin_px)`` 4-connected steps within its bounding box plus the margin."""
    from scipy.spatial import ConvexHull, QhullError

    rows = np.flatnonzero(mask2d.any(axis=1))
    first = mask2d[rows].argmax(axis=1)
    last = mask2d.shape[1] - 1 - mask2d[rows, ::-1].argmax(axis=1)
    points = np.concatenate([np.stack([rows, first], 1), np.stack([rows, last], 1)])  # the hull's candidates
    try:
        eq = ConvexHull(points).equations
    except (QhullError, ValueError):  # fewer than 3 points or collinear
        hull = mask2d.copy()
    else:  # inside: a * row + b * col + c <= 0 (unit normals); per row, each edge bounds the columns from one side
        y = np.arange(mask2d.shape[0], dtype=np.float64)[:, None]
        a, b, c = eq[:, 0], eq[:, 1], eq[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            bound = (-c - a * y) / b
        tol = 1e-9
        low = np.where(b < -tol, bound, -np.inf).max(axis=1)
        high = np.where(b > tol, bound, np.inf).min(axis=1)
        rows_ok = np.all((np.abs(b) > tol) | (a * y + c <= tol), axis=1)
        cols = np.arange(mask2d.shape[1])
        hull = rows_ok[:, None] & (cols >= low[:, None] - tol) & (cols <= high[:, None] + tol)
    steps = int(round(margin_px))
    if steps > 0:  # the dilation only where it can reach: the hull's bounding box grown by the steps
        r, c = np.flatnonzero(hull.any(axis=1)), np.flatnonzero(hull.any(axis=0))
        box = (slice(max(r[0] - steps, 0), r[-1] + steps + 1), slice(max(c[0] - steps, 0), c[-1] + steps + 1))
        hull[box] = ndimage.binary_dilation(hull[box], iterations=steps)
    return hull


def add_body_class(classes: np.ndarray, body: np.ndarray) -> np.ndarray:
    """Model classes with BODY wherever the body mask is set and no other class is (BODY is the same index in every
    class set)."""
    out = classes.copy()
    out[(out == BACKGROUND) & body] = BODY
    return out


def one_hot(classes: torch.Tensor, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """(N, H, W) integer classes -> (N, C, H, W) float one-hot."""
    return F.one_hot(classes.long(), num_classes).permute(0, 3, 1, 2).float()


def semantic_edges(classes: torch.Tensor) -> torch.Tensor:
    """(N, H, W) classes -> (N, 1, H, W) float map, 1 where a 4-neighbour has another class."""
    c = classes.long()
    edge = torch.zeros_like(c, dtype=torch.bool)
    vertical = c[:, 1:, :] != c[:, :-1, :]
    horizontal = c[:, :, 1:] != c[:, :, :-1]
    edge[:, 1:, :] |= vertical
    edge[:, :-1, :] |= vertical
    edge[:, :, 1:] |= horizontal
    edge[:, :, :-1] |= horizontal
    return edge[:, None].float()


def condition_inputs(classes: torch.Tensor, conditioning: str, num_classes: int = NUM_CLASSES) -> dict[str, torch.Tensor]:
    """Model keyword inputs for (N, H, W) class slices: one-hot ``mask`` (``num_classes`` channels: the model's
    ``num_classes``), plus ``edge`` for edge-guided models.

    (N, 1 + 2k, H, W) classes (a slice and its neighbours, for 2.5D models) give their one-hot masks side by side
    and the edges of channel 0, the slice itself."""
    stack = classes if classes.ndim == 4 else classes[:, None]
    inputs = {"mask": one_hot(stack.flatten(0, 1), num_classes).unflatten(0, stack.shape[:2]).flatten(1, 2)}
    if conditioning == "edge":
        inputs["edge"] = semantic_edges(stack[:, 0])
    return inputs


def network_classes(network: torch.nn.Module) -> int:
    """The ``num_classes`` of a network's config (the paper's 17 for networks without a config)."""
    return int(getattr(network, "config", {}).get("num_classes", NUM_CLASSES))


def drop_condition(inputs: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """:func:`condition_inputs` with the samples where the (B,) bool ``keep`` is False set to the "no label" input
    (zeros), which classifier-free guidance trains (label dropout) and samples with."""
    return {k: v * keep.to(v.dtype).view(-1, *[1] * (v.ndim - 1)) for k, v in inputs.items()}
