"""Render the Extensions Index figures (docs/images/slicer_*.png) from the bundled sample with the bundled demo model.

    OMP_NUM_THREADS=2 python docs/images/make_slicer_figures.py [--work DIR]

``--work DIR`` keeps the synthesized volumes there and reuses them on the next run (only the pictures are redrawn).

They are not screenshots of Slicer: they are made with the library and matplotlib, showing what the module puts in
the views (the synthetic CT beside the real one, the variance overlay as the module displays it, a blinded pair).
The demo model was trained on this very patient, so the synthetic CT looks better here than on any other case.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from CTSemanticSynthLib.io import read_image, read_labelmap  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "Resources" / "sample"
OUT = Path(__file__).resolve().parent
SEED, SAMPLES = 0, 4
VARIANCE_THRESHOLD_HU = 10.0  # as CTSemanticSynthSlicerLib.synthesis shows the overlay
WINDOW = (-160, 240)  # the abdomen window (L40/W400) both review sides use


def axial(volume: np.ndarray, affine: np.ndarray, k: int) -> np.ndarray:
    """Slice k of an axis-aligned (i, j, k) volume as Slicer's axial view shows it: anterior up, the patient's right
    on the left of the screen."""
    plane = volume[:, :, k]
    if affine[0, 0] > 0:  # i toward the patient's right: reverse, so that screen x runs toward the left
        plane = plane[::-1, :]
    if affine[1, 1] < 0:  # j toward posterior: reverse, so that it runs toward anterior
        plane = plane[:, ::-1]
    return plane.T[::-1, :]


def synthesize(work: Path) -> None:
    """The bundled sample with the demo model: SAMPLES synthetic CTs, their std, and the library's own preview."""
    if (work / "std.nii.gz").is_file():
        return
    subprocess.run([sys.executable, "-m", "CTSemanticSynthLib.cli", "synth", "--seg", str(SAMPLE / "seg_total.nii.gz"),
                    "--labels", "totalseg", "--out", str(work / "synthetic.nii.gz"), "--seed", str(SEED),
                    "--samples", str(SAMPLES), "--variance-map", str(work / "std.nii.gz"),
                    "--reference-ct", str(SAMPLE / "ct.nii.gz"), "--preview", str(OUT / "slicer_synthesis.png"),
                    "--overwrite"],
                   check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="keep (and reuse) the synthesized volumes here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        work = args.work or Path(temp)
        work.mkdir(parents=True, exist_ok=True)
        synthesize(work)
        synthetic = read_image(work / "synthetic_s0.nii.gz")
        synth, std = synthetic.array, read_image(work / "std.nii.gz").array
    real = read_image(SAMPLE / "ct.nii.gz").array
    labels, _ = read_labelmap(SAMPLE / "seg_total.nii.gz")
    affine = synthetic.affine
    k = int(np.argmax((labels.array == 5).sum(axis=(0, 1))))  # the axial slice with the most liver

    fig, ax = plt.subplots(figsize=(5.2, 4.6), dpi=110)
    ax.imshow(axial(synth, affine, k), cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1])
    shown = np.ma.masked_less(axial(std, affine, k), VARIANCE_THRESHOLD_HU)
    overlay = ax.imshow(shown, cmap="rainbow", alpha=0.5, vmin=VARIANCE_THRESHOLD_HU, vmax=max(float(std.max()), 20))
    fig.colorbar(overlay, ax=ax, fraction=0.046, label="std (HU)")
    ax.set_title(f"std of {SAMPLES} samples over the first (transparent below {VARIANCE_THRESHOLD_HU:g} HU)", fontsize=8)
    ax.axis("off")
    fig.savefig(OUT / "slicer_variance.png", bbox_inches="tight")
    plt.close(fig)

    sides = [real, synth] if np.random.default_rng(SEED).random() < 0.5 else [synth, real]
    fig, axes = plt.subplots(1, 2, figsize=(8, 4), dpi=110)
    for ax, volume, name in zip(axes, sides, ("Left volume", "Right volume")):
        ax.imshow(axial(volume, affine, k), cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1])
        ax.contour(axial(labels.array, affine, k) > 0, levels=[0.5], colors="yellow", linewidths=0.5)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.savefig(OUT / "slicer_blind_review.png", bbox_inches="tight")
    plt.close(fig)
    print(f"synthetic on the {'right' if sides[1] is synth else 'left'} in slicer_blind_review.png")


if __name__ == "__main__":
    main()
