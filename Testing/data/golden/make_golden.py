"""Rewrite the demo model's golden outputs (Testing/data/golden/*.npy) that Testing/test_golden.py checks.

Run from the repository root, only after a deliberate change to the demo model or to sampling:
    python Testing/data/golden/make_golden.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # Testing/, for test_golden and conftest

from test_golden import GOLDEN, golden_outputs  # noqa: E402


def main() -> None:
    for name, array in golden_outputs().items():
        np.save(GOLDEN / f"{name}.npy", array)
        print(f"{GOLDEN / name}.npy: {array.shape} {array.dtype}")


if __name__ == "__main__":
    main()
