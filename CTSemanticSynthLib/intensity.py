"""Intensity mappings between HU and the model's [0, 1]: the paper's window, or full-range piecewise-linear companding.

A mapping is a list of knots (HU, unit) with both columns strictly increasing, from unit 0 to unit 1; HU below the
first knot or above the last is clipped. The paper's window is the two-knot mapping -160 -> 0, 240 -> 1 (L40/W400).
``full_range`` covers -1024..2000 HU and gives soft tissue (-160..240 HU) 60 % of [0, 1], so a unit of model error
costs 667 HU there (400 in the paper's window) and more in air/lung and bone, where precision matters less.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InputError


@dataclass(frozen=True)
class IntensityMapping:
    """Piecewise-linear HU <-> [0, 1] mapping through ``knots`` ((HU, unit), increasing in both)."""

    name: str
    knots: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        hu, unit = zip(*self.knots) if len(self.knots) >= 2 else ((), ())
        if len(self.knots) < 2 or unit[0] != 0.0 or unit[-1] != 1.0 or any(
                b <= a for col in (hu, unit) for a, b in zip(col, col[1:])):
            raise ValueError(f"intensity mapping {self.name!r}: knots must run from unit 0 to 1, increasing in HU and "
                             f"unit, not {self.knots}")

    @property
    def hu_range(self) -> tuple[float, float]:
        """The HU the mapping represents; values outside are clipped."""
        return self.knots[0][0], self.knots[-1][0]

    @property
    def is_window(self) -> bool:
        """Whether this is a plain window (two knots)."""
        return len(self.knots) == 2

    def to_unit(self, hu: np.ndarray) -> np.ndarray:
        """HU -> [0, 1] (float32), clipped to the mapping's range."""
        return _through(np.asarray(hu, dtype=np.float32), self.knots, 0, 1)

    def to_hu(self, unit: np.ndarray) -> np.ndarray:
        """[0, 1] -> HU (float32), the inverse of :meth:`to_unit` on its range; inputs are clipped to [0, 1]."""
        return _through(np.asarray(unit, dtype=np.float32), self.knots, 1, 0)

    def clipped(self, hu: np.ndarray) -> np.ndarray:
        """HU as a model with this mapping can give them (float32): clipped to its range, through the mapping and
        back. A real CT compared with a synthetic one is taken this way, since no synthetic value can leave it."""
        return self.to_hu(self.to_unit(hu))

    def config(self) -> dict[str, Any]:
        """The model config's ``intensity`` field."""
        return {"name": self.name, "hu": [h for h, _ in self.knots], "unit": [u for _, u in self.knots]}

    def describe(self) -> str:
        """One line for ``ctsynth info`` and the provenance."""
        knots = ", ".join(f"{h:g} HU -> {u:g}" for h, u in self.knots)
        return f"{self.name} ({knots}; clipped outside {self.hu_range[0]:g}..{self.hu_range[1]:g} HU)"


def _through(x: np.ndarray, knots: tuple[tuple[float, float], ...], src: int, dst: int) -> np.ndarray:
    """Piecewise-linear map from column ``src`` to column ``dst`` of ``knots`` in float32, one segment at a time (no
    float64 temporaries as ``np.interp`` would make for a large volume)."""
    out = np.full(x.shape, knots[0][dst], dtype=np.float32)
    for a, b in zip(knots, knots[1:]):
        width = np.float32(b[src] - a[src])
        out += np.clip(x - np.float32(a[src]), 0, width) / width * np.float32(b[dst] - a[dst])
    return out


PAPER_WINDOW = IntensityMapping("paper_window", ((-160.0, 0.0), (240.0, 1.0)))
FULL_RANGE = IntensityMapping("full_range", ((-1024.0, 0.0), (-160.0, 0.2), (240.0, 0.8), (2000.0, 1.0)))
MAPPINGS = {m.name: m for m in (PAPER_WINDOW, FULL_RANGE)}


def named_mapping(name: str) -> IntensityMapping:
    """The mapping called ``name`` (one of MAPPINGS); InputError for another name."""
    if name not in MAPPINGS:
        raise InputError(f"unknown intensity mapping '{name}': use one of {', '.join(MAPPINGS)}")
    return MAPPINGS[name]


def mapping_from_config(config: Mapping[str, Any]) -> IntensityMapping:
    """A model's or slice cache's mapping: its ``intensity`` field, else its ``window`` {level, width} (the paper's
    models name only that). ValueError for a malformed field."""
    if "intensity" in config:
        field = config["intensity"]
        try:
            knots = tuple((float(h), float(u)) for h, u in zip(field["hu"], field["unit"], strict=True))
            return IntensityMapping(str(field["name"]), knots)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"field 'intensity' is not a mapping {{name, hu: [...], unit: [...]}} ({exc})") from None
    window = config.get("window", {"level": 40.0, "width": 400.0})
    low = float(window["level"]) - float(window["width"]) / 2
    if (low, low + float(window["width"])) == PAPER_WINDOW.hu_range:
        return PAPER_WINDOW
    return IntensityMapping("window", ((low, 0.0), (low + float(window["width"]), 1.0)))
