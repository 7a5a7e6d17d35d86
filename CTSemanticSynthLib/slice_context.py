"""2.5D conditioning: a slice's classes together with its neighbours' (the ``context_slices`` model option).

A model with ``context_slices`` k sees, besides its own one-hot mask, the masks of the slices at offsets
-1, +1, ..., -k, +k (:func:`context_offsets`; the slice itself is channel 0). A neighbour that is not in the volume
(beyond its ends, or a slice that holds no body and so is not sampled) counts as background, in training and in
sampling alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .labels import BACKGROUND


def context_offsets(context_slices: int) -> list[int]:
    """Slice offsets of the class channels: 0 (the slice), then -1, +1, ..., -k, +k."""
    return [0] + [sign * d for d in range(1, context_slices + 1) for sign in (-1, 1)]


def network_context(network: torch.nn.Module) -> int:
    """The ``context_slices`` of a network (0 for networks without a config)."""
    return int(getattr(network, "config", {}).get("context_slices", 0))


def with_neighbours(classes: Tensor, slice_index: Sequence[int], context_slices: int) -> Tensor:
    """(N, S, S) classes of the slices numbered ``slice_index`` -> (N, 1 + 2k, S, S) with the neighbours' classes
    (background where a neighbour is not among them); unchanged for k = 0 or classes that have the channels already."""
    if context_slices == 0 or classes.ndim == 4:
        return classes
    position = {int(k): i for i, k in enumerate(slice_index)}
    background = torch.full_like(classes[0], BACKGROUND)
    return torch.stack([torch.stack([classes[position[k + d]] if k + d in position else background
                                     for d in context_offsets(context_slices)]) for k in map(int, slice_index)])
