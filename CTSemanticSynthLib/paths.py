"""Where user files live (the cache dir) and how a file is identified (its digest); no heavy imports."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_dir() -> Path:
    """``$CTSYNTH_HOME`` or ``~/.cache/ctsynth``: where user models (``models/<name>/``) and the Inception file live."""
    return Path(os.environ.get("CTSYNTH_HOME", Path.home() / ".cache" / "ctsynth"))


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
