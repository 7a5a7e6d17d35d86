"""nnU-Net v2's own planning/preprocessing, training and prediction, each run as its console entry point in a child
process with ``nnUNet_raw``/``nnUNet_preprocessed``/``nnUNet_results`` inside the study folder.

The child's output (decoded as UTF-8 whatever the locale) goes to ``logs/<step>.log`` and, when asked, to the
console. A failed child is one line: the last line it printed (for a crash, the exception) and the log's path.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from CTSemanticSynthLib.errors import CTSynthError, InputError
from CTSemanticSynthLib.io import atomic_folder

from .datasets import NIFTI, StudyPaths

CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres")
FOLDS = ("all", "0", "1", "2", "3", "4")
PLANS = "nnUNetPlans"
THREADS_VARIABLE = "CTSYNTH_NNUNET_THREADS"
_LAUNCH = ("import multiprocessing, os, sys; from importlib.metadata import entry_points; "
           f"threads = os.environ.get('{THREADS_VARIABLE}'); "
           "multiprocessing.cpu_count = (lambda: int(threads)) if threads else multiprocessing.cpu_count; "
           "(entry,) = entry_points(group='console_scripts', name=sys.argv[1]); "
           "sys.argv = sys.argv[1:]; sys.exit(entry.load()())")
"""Runs an nnU-Net console script by name with the current interpreter (no PATH lookup, same venv). nnU-Net's
training and prediction with ``-device cpu`` give torch ``multiprocessing.cpu_count()`` threads; with
``CTSYNTH_NNUNET_THREADS`` set, the child's count is that number (on a shared machine fewer threads are faster)."""

Launcher = Callable[[str, Sequence[str], Mapping[str, str], Path, "Callable[[str], None] | None"], None]
"""(console script, arguments, environment, log file, echo) -> None; raises StepFailed."""


class StepFailed(CTSynthError):
    """An nnU-Net child process exited with an error."""


def nnunet_version() -> str:
    """The installed nnunetv2 version; InputError when it is missing."""
    try:
        return importlib.metadata.version("nnunetv2")
    except importlib.metadata.PackageNotFoundError:
        raise InputError("nnU-Net v2 is not installed: pip install 'nnunetv2==2.6.0' (or the project's [eval] "
                         "extra)") from None


def trainers() -> set[str]:
    """Names of the trainer classes nnU-Net can find (classes in its ``training/nnUNetTrainer`` package), read from
    the source without importing it."""
    nnunet_version()
    spec = importlib.util.find_spec("nnunetv2")
    root = Path(next(iter(spec.submodule_search_locations or ()))) / "training" / "nnUNetTrainer"
    pattern = re.compile(r"^class\s+(\w+)\s*[(:]", re.MULTILINE)
    return {name for path in root.rglob("*.py") for name in pattern.findall(path.read_text(encoding="utf-8"))}


def check_settings(trainer: str, configuration: str, fold: str, training_cases: int) -> None:
    """InputError for a trainer nnU-Net does not have, an unknown configuration or fold, or a cross-validation
    fold with fewer than 5 training cases."""
    if configuration not in CONFIGURATIONS:
        raise InputError(f"--configuration {configuration}: use one of {', '.join(CONFIGURATIONS)}")
    if fold not in FOLDS:
        raise InputError(f"--fold {fold}: use all or 0..4")
    if fold != "all" and training_cases < 5:
        raise InputError(f"--fold {fold} needs 5 or more real training cases (there are {training_cases}); use "
                         "--fold all")
    known = trainers()
    if trainer not in known:
        short = sorted((t for t in known if re.fullmatch(r"nnUNetTrainer_\d+epochs?", t)),
                       key=lambda t: int(re.sub(r"\D", "", t)))
        raise InputError(f"--trainer {trainer}: nnU-Net {nnunet_version()} has no such trainer (the default is "
                         f"nnUNetTrainer; short ones: {', '.join(short)})")


def run_child(script: str, args: Sequence[str], env: Mapping[str, str], log: Path,
              echo: Callable[[str], None] | None = None) -> None:
    """Run nnU-Net console script ``script`` in a child process, its output (UTF-8) to ``log`` and ``echo``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    last = ""
    with open(log, "w", encoding="utf-8") as out:
        out.write(f"$ {shlex.join([script, *args])}\n")
        out.flush()
        child = subprocess.Popen([sys.executable, "-c", _LAUNCH, script, *args], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, env=dict(env))
        try:
            for raw in child.stdout:
                line = raw.decode("utf-8", errors="replace")
                out.write(line)
                out.flush()
                last = line.strip() or last
                if echo is not None:
                    echo(line.rstrip("\n"))
            code = child.wait()
        finally:
            if child.poll() is None:  # interrupted: the child goes too
                child.terminate()
                child.wait()
    if code != 0:
        raise StepFailed(f"{script} exited with status {code}: {last or 'no output'} (full log: {log})")


@dataclass(frozen=True)
class NnUNet:
    """How to plan, train and predict: one configuration, trainer and fold for every dataset."""

    paths: StudyPaths
    configuration: str = "2d"
    trainer: str = "nnUNetTrainer"
    fold: str = "all"
    device: str = "cuda"
    """nnU-Net's -device: cuda, cpu or mps."""
    processes: int = 4
    tta: bool = True
    threads: int | None = None
    """torch threads of nnU-Net on the CPU (None: nnU-Net's choice, every core)."""
    launch: Launcher | None = field(default=None, compare=False)
    """Runs a console script (default :func:`run_child`)."""
    echo: Callable[[str], None] | None = field(default=None, compare=False)

    @property
    def tag(self) -> str:
        """Names this setting's predictions and report: ``2d_nnUNetTrainer_foldall`` (``_notta`` without TTA)."""
        return f"{self.configuration}_{self.trainer}_fold{self.fold}" + ("" if self.tta else "_notta")

    def environment(self, stage: str) -> dict[str, str]:
        """The child's environment: nnU-Net's folders in the study; on the CPU no compilation, augmentation in the
        main process (1 worker for planning, which cannot take 0), and ``processes`` export workers."""
        env = dict(os.environ, nnUNet_raw=str(self.paths.raw), nnUNet_preprocessed=str(self.paths.preprocessed),
                   nnUNet_results=str(self.paths.results), PYTHONIOENCODING="utf-8", PYTHONUNBUFFERED="1",
                   nnUNet_def_n_proc=str(self.processes))
        if self.device == "cpu":
            env.update(nnUNet_compile="f", nnUNet_n_proc_DA="1" if stage == "plan" else "0")
        if self.threads is not None:
            env[THREADS_VARIABLE] = str(self.threads)
        return env

    def plan_output(self, dataset: str) -> Path:
        """The preprocessed data of this configuration."""
        return self.paths.preprocessed / dataset / f"{PLANS}_{self.configuration}"

    def train_output(self, dataset: str) -> Path:
        fold = "fold_all" if self.fold == "all" else f"fold_{self.fold}"
        return (self.paths.results / dataset / f"{self.trainer}__{PLANS}__{self.configuration}" / fold
                / "checkpoint_final.pth")

    def prediction_folder(self, dataset: str) -> Path:
        return self.paths.predictions / dataset / self.tag

    def _run(self, step: str, script: str, args: list[str], stage: str) -> None:
        launch = self.launch or run_child
        launch(script, args, self.environment(stage), self.paths.logs / f"{step}.log", self.echo)

    def plan(self, dataset: str) -> None:
        """Fingerprint, plan and preprocess (with nnU-Net's dataset check); this configuration's preprocessed data
        is removed first, so an interrupted run starts over."""
        shutil.rmtree(self.plan_output(dataset), ignore_errors=True)
        self._run(f"plan-{dataset}-{self.configuration}", "nnUNetv2_plan_and_preprocess",
                  ["-d", _dataset_id(dataset), "-c", self.configuration, "-np", str(self.processes),
                   "-npfp", str(self.processes), "--verify_dataset_integrity"], "plan")
        planned = _planned_configurations(self.paths.preprocessed / dataset / f"{PLANS}.json")
        if self.configuration not in planned:
            raise StepFailed(f"nnU-Net did not plan configuration '{self.configuration}' for {dataset} (it planned "
                             f"{', '.join(planned) or 'none'}); choose one of those with --configuration")
        if not self.plan_output(dataset).is_dir():
            raise StepFailed(f"nnU-Net wrote no preprocessed data to {self.plan_output(dataset)} (see "
                             f"{self.paths.logs})")

    def train(self, dataset: str) -> None:
        """Train (``--c``: an interrupted training continues from nnU-Net's latest checkpoint, or starts anew)."""
        self._run(f"train-{dataset}-{self.tag}", "nnUNetv2_train",
                  [_dataset_id(dataset), self.configuration, self.fold, "-tr", self.trainer, "-device", self.device,
                   "--c"], "train")

    def predict(self, dataset: str, images: Path, cases: Sequence[str]) -> None:
        """Predict the test images into :meth:`prediction_folder` (replaced as a whole when every case is there)."""
        target = self.prediction_folder(dataset)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_folder(target) as folder:
            self._run(f"predict-{dataset}-{self.tag}", "nnUNetv2_predict",
                      ["-i", str(images), "-o", str(folder), "-d", _dataset_id(dataset), "-c", self.configuration,
                       "-f", self.fold, "-tr", self.trainer, "-device", self.device, "-npp", str(self.processes),
                       "-nps", str(self.processes), *([] if self.tta else ["--disable_tta"])], "predict")
            missing = [c for c in cases if not (folder / f"{c}{NIFTI}").is_file()]
            if missing:
                raise StepFailed(f"nnU-Net predicted no segmentation for test case '{missing[0]}' with {dataset} "
                                 f"(see {self.paths.logs})")


def _dataset_id(dataset: str) -> str:
    return str(int(dataset[len("Dataset"):len("Dataset") + 3]))


def _planned_configurations(plans: Path) -> list[str]:
    try:
        return sorted(json.loads(plans.read_text(encoding="utf-8"))["configurations"])
    except (OSError, ValueError, KeyError, TypeError):
        return []
