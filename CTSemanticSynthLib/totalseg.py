"""TotalSegmentator on a (synthetic) CT, its ``total`` labels mapped onto a model's class set (the paper's: the 15
AMOS organs; the anatomy set: also bones, lungs, bowel, muscles, ...), and Dice per class.

TotalSegmentator (``totalsegmentator==2.18.0`` with ``nnunetv2==2.6.0``, the ``[eval]`` extra) runs in a child
process (``python -m CTSemanticSynthLib.totalseg IN OUT``) with its own error capture, so a crash or a hang never
takes the caller down. Nothing is downloaded: the weights are checked first and a missing folder is a
:class:`CTSynthError` that names it. TotalSegmentator finds its weights in ``$TOTALSEG_WEIGHTS_PATH``, else in
``$TOTALSEG_HOME_DIR/nnunet/results``, else in ``~/.totalsegmentator/nnunet/results``. The child gets a
private, temporary ``TOTALSEG_HOME_DIR`` (its config and counters) and never sends usage statistics.

The ``total`` task's ``fast`` mode is one 3 mm model (Dataset297); the full mode is five 1.5 mm part models
(Dataset291..295), about 10x slower and best on a GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CTSynthError, InputError
from .io import Volume, read_labelmap, write_volume
from .labels import PAPER, ClassSet, LabelAdapter, totalsegmentator_adapter
from .metrics.dice import dice_per_organ, mean_dice, voxel_counts

logger = logging.getLogger(__name__)

TOTALSEG_REQUIREMENT = "totalsegmentator==2.18.0 nnunetv2==2.6.0"
WEIGHTS_RELEASE = "https://github.com/wasserth/TotalSegmentator/releases/download/v2.0.0-weights"


@dataclass(frozen=True)
class NnUNetModel:
    """One nnU-Net results folder that TotalSegmentator 2.18 loads for the ``total`` task."""

    dataset: str
    trainer: str
    plans: str = "nnUNetPlans"
    configuration: str = "3d_fullres"

    def folder(self, weights_dir: Path) -> Path:
        return weights_dir / self.dataset / f"{self.trainer}__{self.plans}__{self.configuration}"

    def missing(self, weights_dir: Path) -> list[str]:
        """Files of this model that are absent under ``weights_dir`` (relative paths)."""
        folder = self.folder(weights_dir)
        needed = ("plans.json", "dataset.json", "fold_0/checkpoint_final.pth")
        return [str((folder / f).relative_to(weights_dir)) for f in needed if not (folder / f).is_file()]


_PARTS = ("part1_organs_1559subj", "part2_vertebrae_1532subj", "part3_cardiac_1559subj",
          "part4_muscles_1559subj", "part5_ribs_1559subj")
TOTAL_MODELS: dict[str, tuple[NnUNetModel, ...]] = {
    "fast": (NnUNetModel("Dataset297_TotalSegmentator_total_3mm_1559subj", "nnUNetTrainer_4000epochs_NoMirroring"),),
    "full": tuple(NnUNetModel(f"Dataset{291 + i}_TotalSegmentator_{part}", "nnUNetTrainerNoMirroring")
                  for i, part in enumerate(_PARTS)),
}
"""The folders TotalSegmentator 2.18's ``total`` task loads (``map_tasks_config.TASK_CONFIGS["total"]``)."""


def totalseg_weights_dir(env: Mapping[str, str] | None = None) -> Path:
    """The folder TotalSegmentator 2.18 reads weights from (same rule as its ``config.get_weights_dir``)."""
    env = os.environ if env is None else env
    if env.get("TOTALSEG_WEIGHTS_PATH"):
        return Path(env["TOTALSEG_WEIGHTS_PATH"]).expanduser()
    if env.get("TOTALSEG_HOME_DIR"):
        return Path(env["TOTALSEG_HOME_DIR"]).expanduser() / "nnunet" / "results"
    home = Path.home()
    return (Path("/tmp") if str(home) == "/" else home) / ".totalsegmentator" / "nnunet" / "results"


def check_totalsegmentator(fast: bool = True, env: Mapping[str, str] | None = None) -> Path:
    """Check that TotalSegmentator is installed and the ``total`` weights are present; return the weights folder.

    Raises :class:`CTSynthError` naming the missing package or each missing folder and where it must go.
    """
    for module in ("totalsegmentator", "nnunetv2"):
        if importlib.util.find_spec(module) is None:
            raise CTSynthError(f"TotalSegmentator is not installed ({module} is missing): "
                               f"pip install {TOTALSEG_REQUIREMENT} (or the ctsemanticsynth[eval] extra)")
    weights = totalseg_weights_dir(env)
    mode = "fast" if fast else "full"
    missing = [m for m in TOTAL_MODELS[mode] if m.missing(weights)]
    if missing:
        names = ", ".join(m.dataset for m in missing)
        urls = " ".join(f"{WEIGHTS_RELEASE}/{m.dataset}.zip" for m in missing)
        first = missing[0].missing(weights)[0]
        raise CTSynthError(
            f"TotalSegmentator weights for the 'total' task ({mode} mode) are missing: put the folder(s) {names} "
            f"into {weights} (e.g. {weights / first} is missing; the folder is set by TOTALSEG_WEIGHTS_PATH, else "
            f"TOTALSEG_HOME_DIR/nnunet/results). Get them with `totalseg_download_weights -t "
            f"{'total_fast' if fast else 'total'}` on a machine with internet access and copy that folder, or "
            f"unzip {urls} there. Nothing is downloaded at run time."
        )
    return weights


def totalseg_device(device: str = "auto") -> str:
    """TotalSegmentator's device name ('gpu', 'gpu:N', 'mps', 'cpu') for ours ('auto', 'cuda', 'cuda:N', ...)."""
    from .device import select_device

    dev = select_device(device)
    if dev.type == "cuda":
        return "gpu" if dev.index is None else f"gpu:{dev.index}"
    return dev.type if dev.type in ("mps", "cpu") else "cpu"


def run_totalsegmentator(ct: Volume, *, fast: bool = True, device: str = "auto", timeout: float | None = None,
                         log_path: Path | None = None) -> Volume:
    """TotalSegmentator ``total`` label map (v2 ids) of an HU volume, on the volume's grid.

    ``log_path`` keeps the child's output; on failure the error message quotes its last lines.
    """
    weights = check_totalsegmentator(fast)
    ts_device = totalseg_device(device)
    with tempfile.TemporaryDirectory(prefix="ctsynth-totalseg-") as tmp:
        tmp_dir = Path(tmp)
        home = tmp_dir / "home"
        home.mkdir()
        (home / "config.json").write_text(json.dumps({"totalseg_id": "ctsynth", "send_usage_stats": False,
                                                      "prediction_counter": 0, "statistics_disclaimer_shown": True}))
        image, labels = tmp_dir / "ct.nii.gz", tmp_dir / "total.nii.gz"
        write_volume(ct, image)
        env = {**os.environ, "TOTALSEG_WEIGHTS_PATH": str(weights), "TOTALSEG_HOME_DIR": str(home)}
        cmd = [sys.executable, "-m", __name__, str(image), str(labels), "--device", ts_device]
        cmd += ["--fast"] if fast else []
        logger.info("running TotalSegmentator (%s, device %s): %s", "fast" if fast else "full", ts_device, " ".join(cmd))
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace",
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            raise CTSynthError(f"TotalSegmentator did not finish within {timeout:g} s; use a GPU (--device cuda) "
                               "or the fast mode") from None
        output = (proc.stdout or "") + (proc.stderr or "")
        if log_path is not None:
            log_path.write_text(output, encoding="utf-8")
        if proc.returncode != 0 or not labels.is_file():
            logger.info("TotalSegmentator output:\n%s", output)
            raise CTSynthError(f"TotalSegmentator failed (exit code {proc.returncode}): {_last_lines(output)}"
                               + (f"; full log in {log_path}" if log_path is not None else "; -v shows its output"))
        result, _ = read_labelmap(labels)
    if not result.same_grid(ct, atol=1e-3):
        raise CTSynthError(f"TotalSegmentator returned a label map on another grid ({result.shape} vs {ct.shape})")
    return result


def _last_lines(text: str, n: int = 2) -> str:
    """The last ``n`` meaningful lines of a child's output (traceback markers dropped)."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not set(line.strip()) <= set("^~ ")]
    return " | ".join(lines[-n:]) if lines else "no output"


def totalseg_organs(ts_labels: Volume | np.ndarray, adapter: LabelAdapter | None = None) -> np.ndarray:
    """Model classes of a TotalSegmentator v2 ``total`` label map, in the adapter's class set (default the paper's:
    the organs; every structure the set has no class for becomes body)."""
    array = ts_labels.array if isinstance(ts_labels, Volume) else np.asarray(ts_labels)
    return (adapter or totalsegmentator_adapter(2)).classes(array)[0]


@dataclass
class TotalSegDice:
    """Per-class Dice of TotalSegmentator on the synthetic CT (and on the real CT: the ceiling) vs the input labels."""

    synthetic: dict[str, float]
    real: dict[str, float] | None = None
    reference_voxels: dict[str, int] = field(default_factory=dict)
    mode: str = "fast"
    device: str = "cpu"
    not_expressible: tuple[str, ...] = ()
    """Labelled classes of the set left out: the input labels' convention cannot hold them."""
    predicted_synthetic: np.ndarray | None = field(default=None, repr=False)
    """TotalSegmentator's structures on the synthetic CT as model classes (not part of ``to_dict``)."""

    @property
    def mean_synthetic(self) -> float:
        return mean_dice(self.synthetic)

    @property
    def mean_real(self) -> float:
        return mean_dice(self.real) if self.real is not None else math.nan

    def to_dict(self) -> dict[str, Any]:
        def clean(d: Mapping[str, float] | None) -> dict[str, float | None] | None:
            return None if d is None else {k: (None if math.isnan(v) else v) for k, v in d.items()}

        means = {"mean_synthetic": self.mean_synthetic, "mean_real": self.mean_real}
        return {"mode": self.mode, "device": self.device, "synthetic": clean(self.synthetic), "real": clean(self.real),
                "reference_voxels": self.reference_voxels, **{k: (None if math.isnan(v) else v) for k, v in means.items()},
                "mean_excludes": "organs absent from both the input labels and the prediction",
                "not_expressible": list(self.not_expressible)}


def totalseg_dice(synthetic: Volume, reference_classes: Volume, real: Volume | None = None, *, fast: bool = True,
                  device: str = "auto", progress: Callable[[str], None] | None = None,
                  timeout: float | None = None, class_set: ClassSet = PAPER,
                  classes: Iterable[int] | None = None) -> TotalSegDice:
    """Run TotalSegmentator on ``synthetic`` (and ``real``) and score its structures against ``reference_classes``.

    ``reference_classes`` holds classes of ``class_set`` (e.g. from ``synthesis.prepare_classes``) on the CT's grid;
    TotalSegmentator's structures are mapped onto the same set, and ``classes`` are scored: by default every class
    but background and body (for the paper's set: the 15 organs); give the labels' :attr:`.LabelAdapter.expressible`
    (``MappingReport.expressible``) so that a class their convention cannot hold is left out, not scored 0.
    """
    scored = class_set.labelled if classes is None else tuple(c for c in class_set.labelled if c in set(classes))
    for name, vol in (("synthetic", synthetic), ("real", real)):
        if vol is not None and not vol.same_grid(reference_classes, atol=1e-3):
            raise InputError(f"the {name} CT is not on the segmentation's grid")
    scores: dict[str, dict[str, float]] = {}
    predictions: dict[str, np.ndarray] = {}
    for name, vol in (("synthetic", synthetic), ("real", real)):
        if vol is None:
            continue
        if progress is not None:
            progress(f"TotalSegmentator on the {name} CT ({'fast' if fast else 'full'} mode)")
        predictions[name] = totalseg_organs(run_totalsegmentator(vol, fast=fast, device=device, timeout=timeout),
                                            totalsegmentator_adapter(2, class_set))
        scores[name] = dice_per_organ(predictions[name], reference_classes.array, scored, class_set)
    return TotalSegDice(synthetic=scores["synthetic"], real=scores.get("real"),
                        reference_voxels=voxel_counts(reference_classes.array, scored, class_set),
                        mode="fast" if fast else "full", device=totalseg_device(device),
                        not_expressible=tuple(class_set.classes[c] for c in class_set.labelled if c not in scored),
                        predicted_synthetic=predictions["synthetic"])


def _worker(argv: list[str] | None = None) -> int:
    """Child-process entry: run TotalSegmentator's Python API on one NIfTI file (no statistics are sent)."""
    parser = argparse.ArgumentParser(prog="python -m CTSemanticSynthLib.totalseg")
    parser.add_argument("image")
    parser.add_argument("output")
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    from totalsegmentator import python_api

    python_api.send_usage_stats = lambda *a, **k: None  # offline: never post usage statistics
    python_api.totalsegmentator(args.image, args.output, ml=True, fast=args.fast, task="total", device=args.device,
                                quiet=True, nr_thr_saving=1)
    return 0


if __name__ == "__main__":
    sys.exit(_worker())
