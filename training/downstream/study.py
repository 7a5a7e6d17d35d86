"""The study from inputs to report, one resumable step at a time.

A step is done when its marker (``steps/<step>.json``) and its outputs exist; done steps are skipped, unless a step
they use ran again (a model trained anew is tested anew; datasets link to the files just written). A step that
was interrupted has no marker and runs again from a clean state: its outputs are written atomically (label files,
dataset folders, predictions), resumed by the library (synthetic CTs: finished jobs are kept) or by nnU-Net
(training continues from its latest checkpoint). ``study.json`` records what defines the datasets (cases, model,
sampling, seeds); a later run with other inputs is refused rather than mixed in.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from CTSemanticSynthLib.batch import BatchSettings, plan_jobs, run_batch
from CTSemanticSynthLib.batch_layout import Job, JobResult, Layout
from CTSemanticSynthLib.checkpoint import LoadedModel, load_model, resolve_model_path
from CTSemanticSynthLib.errors import InputError
from CTSemanticSynthLib.io import check_distinct_paths, write_bytes
from CTSemanticSynthLib.synthesis import SamplingOptions, preset_options

from .datasets import (KINDS, Cases, StudyPaths, build_datasets, dataset_entries, dataset_name, select_cases,
                       write_organ_labels)
from .nnunet import NnUNet, check_settings, nnunet_version
from .report import score_predictions, write_report

FORMAT = "ctsynth-downstream-study"
Say = Callable[[str], None]


@dataclass(frozen=True)
class StudySettings:
    """What defines the study's datasets."""

    cts: tuple[Path, ...]
    segs: Path
    test: Path
    model: str
    samples: int
    train: Path | None = None
    labels: str = "auto"
    preset: str = "fast"
    seed: int = 0
    dataset_id: int = 501
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"


class Steps:
    """Markers of finished steps."""

    def __init__(self, folder: Path, say: Say) -> None:
        self.folder, self.say = folder, say

    def run(self, name: str, outputs: Sequence[Path], action: Callable[[], Any], force: bool = False) -> bool:
        """Run ``action`` unless step ``name`` has its marker and every output (and ``force`` is off: an input of
        the step was just remade); then write the marker. Returns whether it ran."""
        marker = self.folder / f"{name}.json"
        if not force and marker.is_file() and all(os.path.lexists(p) for p in outputs):
            self.say(f"{name}: done earlier, skipped")
            return False
        marker.unlink(missing_ok=True)
        self.say(f"{name} ...")
        start = time.monotonic()
        action()
        seconds = time.monotonic() - start
        self.folder.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        write_bytes(marker, json.dumps({"step": name, "seconds": round(seconds, 1), "finished": stamp}).encode(),
                    overwrite=True)
        self.say(f"{name}: done in {seconds:.0f} s")
        return True


def study_record(settings: StudySettings, cases: Cases, model: LoadedModel, options: SamplingOptions) -> dict:
    """What makes two runs the same study (JSON-ready)."""
    def inputs(group: Sequence) -> dict[str, dict[str, str]]:
        return {c.name: {"ct": str(c.ct.resolve()), "segmentation": str(c.seg.resolve())} for c in group}

    how = {k: v for k, v in dataclasses.asdict(options).items() if k not in ("seed", "batch_size", "compile")}
    record = {"format": FORMAT, "version": 1, "train": inputs(cases.train), "test": inputs(cases.test),
              "labels": settings.labels, "model": {"name": model.name, "sha256": model.sha256}, "sampling": how,
              "precision": settings.precision, "seed": settings.seed, "samples": settings.samples,
              "dataset_id": settings.dataset_id}
    return json.loads(json.dumps(record))


def claim(paths: StudyPaths, record: dict) -> None:
    """Write ``study.json`` in a new or empty folder, or check that the folder's study is this one."""
    if paths.record.is_file():
        try:
            earlier = json.loads(paths.record.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise InputError(f"--study {paths.root}: {paths.record} is unreadable; give a new --study folder") from None
        differ = [key for key in record if not isinstance(earlier, dict) or earlier.get(key) != record[key]]
        if differ:
            raise InputError(f"--study {paths.root} holds a study made with other inputs ({', '.join(differ)} "
                             "differ); give a new --study folder, or delete that one to start over")
        return
    if paths.root.is_dir() and any(paths.root.iterdir()):
        raise InputError(f"--study {paths.root} is not empty and holds no study.json; give a new or empty folder")
    if paths.root.exists() and not paths.root.is_dir():
        raise InputError(f"--study {paths.root} is a file; give a folder")
    try:
        paths.root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--study {paths.root} cannot be created: {exc.strerror}") from None
    write_bytes(paths.record, (json.dumps(record, indent=2) + "\n").encode())


def synthesize_samples(jobs: Sequence[Job], model: LoadedModel, options: SamplingOptions, settings: StudySettings,
                       layout: Layout, say: Say) -> None:
    """The synthetic CTs, with the library's resumable batch; InputError when any sample failed."""
    def progress(result: JobResult, done: int, total: int) -> None:
        detail = result.error or ("" if result.seconds is None else f"{result.seconds:.1f} s")
        say(f"  synthetic {done}/{total}: {result.job.case} sample {result.job.sample} {result.status} ({detail})")

    results = run_batch(jobs, model, options, BatchSettings(layout, settings.labels), device=settings.device,
                        on_job=progress)
    failed = [r for r in results if r.status != "ok"]
    if failed:
        raise InputError(f"{len(failed)} of {len(results)} synthetic CT(s) failed, e.g. {failed[0].job.case} sample "
                         f"{failed[0].job.sample}: {failed[0].error} (manifest {layout.manifest})")


def run_study(settings: StudySettings, nnunet: NnUNet, say: Say = lambda message: None) -> Path:
    """Build the datasets, train and test one model on each, and write the report; returns its markdown path."""
    paths = nnunet.paths
    cases = select_cases(settings.cts, settings.segs, settings.test, settings.train)
    folders = {"--cts" if len(settings.cts) == 1 else f"--cts folder {n}": p for n, p in enumerate(settings.cts, 1)}
    check_distinct_paths({"--study": paths.root}, {**folders, "--segs": settings.segs, "--test": settings.test,
                                                   "--train": settings.train,
                                                   "--model": resolve_model_path(settings.model)})
    model = load_model(settings.model, device=settings.device)
    options = preset_options(model.config, settings.preset, seed=settings.seed, precision=settings.precision)
    layout = Layout(paths.synthetic)
    jobs = plan_jobs([(c.name, c.seg) for c in cases.train], settings.samples, settings.seed, layout)
    check_settings(nnunet.trainer, nnunet.configuration, nnunet.fold, len(cases.train))
    claim(paths, study_record(settings, cases, model, options))

    steps = Steps(paths.steps, say)
    everyone = cases.train + cases.test
    remade = steps.run("labels", [paths.label(c.name) for c in everyone] + [paths.real_image(c) for c in everyone],
                       functools.partial(write_organ_labels, everyone, paths, settings.labels))
    remade |= steps.run("synthetic", [j.image for j in jobs],
                        functools.partial(synthesize_samples, jobs, model, options, settings, layout, say))
    entries = dataset_entries(cases, jobs, paths)
    names = {kind: dataset_name(settings.dataset_id, kind) for kind in KINDS}
    provenance = {"model": {"name": model.name, "sha256": model.sha256}, "sampling": dataclasses.asdict(options),
                  "precision": settings.precision, "batch_seed": settings.seed,
                  "samples_per_label_map": settings.samples, "synthetic_folder": str(paths.synthetic)}
    steps.run("datasets", [paths.raw / name for name in names.values()] + [paths.test_images],
              functools.partial(build_datasets, entries, cases.test, paths, settings.dataset_id, provenance),
              force=remade)  # links to the files just written
    test_names = [c.name for c in cases.test]
    for name in names.values():
        steps.run(f"plan-{name}-{nnunet.configuration}", [nnunet.plan_output(name)],
                  functools.partial(nnunet.plan, name))
        trained = steps.run(f"train-{name}-{nnunet.tag}", [nnunet.train_output(name)],
                            functools.partial(nnunet.train, name))
        steps.run(f"predict-{name}-{nnunet.tag}", [nnunet.prediction_folder(name)],
                  functools.partial(nnunet.predict, name, paths.test_images, test_names), force=trained)
    scores = {kind: score_predictions(nnunet.prediction_folder(name), paths.labels, test_names)
              for kind, name in names.items()}
    counts = {kind: (sum(e.seed is None for e in entries[kind]), sum(e.seed is not None for e in entries[kind]))
              for kind in KINDS}
    return write_report(paths.reports / nnunet.tag, scores, report_settings(settings, nnunet, model, options, cases),
                        counts)


def report_settings(settings: StudySettings, nnunet: NnUNet, model: LoadedModel, options: SamplingOptions,
                    cases: Cases) -> dict[str, str]:
    """The lines above the report's table."""
    lines = {
        "synthetic CTs": f"model {model.name} (sha256 {model.sha256[:12]}), {settings.samples} per training label "
                         f"map, sampler {options.sampler} with {options.steps} steps (preset {settings.preset}), "
                         f"batch seed {settings.seed}, {settings.precision}",
        "labels": f"the 15 AMOS22 organs (body is background); label convention of the inputs: {settings.labels}",
        "nnU-Net": f"v{nnunet_version()}, configuration {nnunet.configuration}, trainer {nnunet.trainer}, fold "
                   f"{nnunet.fold}, test-time mirroring {'on' if nnunet.tta else 'off'}, device {nnunet.device}",
        "test set": f"{len(cases.test)} held-out real CTs with their label maps",
        "study folder": str(nnunet.paths.root),
    }
    if nnunet.trainer != "nnUNetTrainer":
        lines["note"] = (f"trainer {nnunet.trainer} is not nnU-Net's default (1000 epochs); a short trainer is a "
                         "smoke run that shows the pipeline works and says nothing about synthetic data")
    return lines
