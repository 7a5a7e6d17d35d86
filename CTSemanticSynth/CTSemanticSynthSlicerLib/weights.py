"""TotalSegmentator's weight download, run in the background process (``python -m CTSemanticSynthSlicerLib.weights
[--full] -- DOWNLOAD COMMAND...``), so that neither the connection check (a DNS lookup can hang) nor the download
blocks Slicer.

TotalSegmentator skips a model whose folder exists, so a download cut short (Cancel, a dropped connection) would
leave a broken folder for good. Before and after downloading, every model folder is checked (the files TotalSegmentator
loads are there, the checkpoint is a whole zip archive); a broken one is removed and downloaded again, once.
Failures end in one ``error:`` line.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

HOST, PORT = "github.com", 443  # where TotalSegmentator's weights are


def incomplete(weightsDir: Path, fast: bool = True) -> list[Path]:
    """The model folders of the 'total' task under ``weightsDir`` that are present but broken (a file missing, or a
    checkpoint that is not a complete zip archive)."""
    from CTSemanticSynthLib.totalseg import TOTAL_MODELS

    broken = []
    for model in TOTAL_MODELS["fast" if fast else "full"]:
        folder = model.folder(weightsDir)
        if not folder.parent.exists():
            continue
        checkpoint = folder / "fold_0" / "checkpoint_final.pth"
        if model.missing(weightsDir) or not _completeZip(checkpoint):
            broken.append(folder.parent)
    return broken


def _completeZip(path: Path) -> bool:
    """Whether a checkpoint is whole: a zip archive (torch's format) whose directory, written last, is there; a legacy
    pickle checkpoint cannot be checked and counts as whole."""
    try:
        with open(path, "rb") as f:
            if f.read(2) == b"\x80\x02":
                return True
        with zipfile.ZipFile(path):
            return True
    except (OSError, zipfile.BadZipFile):
        return False


def _online(host: str, port: int, timeout: float = 5.0) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def download(command: list[str], weightsDir: Path, fast: bool, attempts: int = 2) -> str | None:
    """Run TotalSegmentator's download ``command`` until every model is there and complete; None, or what failed."""
    from CTSemanticSynthLib.totalseg import TOTAL_MODELS

    for _ in range(attempts):
        for folder in incomplete(weightsDir, fast):
            print(f"removing the incomplete download {folder}", flush=True)
            shutil.rmtree(folder, ignore_errors=True)
        if subprocess.run(command).returncode != 0:
            continue
        if not incomplete(weightsDir, fast) and not any(m.missing(weightsDir) for m in TOTAL_MODELS["fast" if fast else "full"]):
            return None
    return f"the weights in {weightsDir} are still incomplete after {attempts} downloads"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="CTSemanticSynthSlicerLib.weights")
    parser.add_argument("--full", action="store_true", help="the full-resolution 'total' models (default: fast)")
    parser.add_argument("--host", default=HOST)
    parser.add_argument("--port", type=int, default=PORT)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- TotalSegmentator's download command")
    args = parser.parse_args(argv)
    from CTSemanticSynthLib.totalseg import totalseg_weights_dir

    weightsDir = totalseg_weights_dir()
    if not _online(args.host, args.port):
        print(f"error: no connection to {args.host}: TotalSegmentator's weights cannot be downloaded now; connect to "
              f"the internet and try again, or copy them into {weightsDir}", flush=True)
        return 2
    failure = download([a for a in args.command if a != "--"], weightsDir, not args.full)
    if failure:
        print(f"error: {failure}; try again, or copy them into {weightsDir}", flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
