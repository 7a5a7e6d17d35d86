"""Many cases x samples: per-job seeds, resumable outputs and manifest, nnU-Net export, variance maps, sharding.

A job is (case, sample k) with a seed derived from (batch seed, case name, k), so any job re-run alone gives the
same volume. A job is done when its files exist, are complete, and its sidecar records what decides the volume:
the input's content, the label convention (a mapping file's content), the model, the options and seed, the precision,
the device type and the nnU-Net labels (:class:`Recipe`); done jobs are skipped, so a killed batch continues where it
stopped, and a job made otherwise (an edited label map) is never taken as done. Under torchrun job i runs on rank
i mod world size; rank 0 writes the manifest, variance maps and dataset.json after all ranks finish.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import LoadedModel
from .device import select_precision
from .batch_layout import DATASET_JSON, Job, JobResult, Layout, check_listings, nnunet_labels, write_listings
from .errors import CTSynthError, InputError
from .io import READ_SUFFIXES, Volume, atomic_outputs, read_image, read_labelmap, save_volume, verify_complete
from .labels import mapping_file
from .paths import file_digest
from .provenance import provenance_header, read_record, write_record
from .synthesis import (MAX_SEED, NEUTRAL_OPTIONS, ProgressCallback, SamplingOptions, prepare_classes, synthesize,
                        used_options)

logger = logging.getLogger(__name__)


def job_seed(seed: int, case: str, sample: int) -> int:
    """The seed of sample ``sample`` of ``case`` in a batch with seed ``seed`` (0..2**32-1, stable everywhere)."""
    digest = hashlib.sha256(f"{seed}\0{case}\0{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (MAX_SEED + 1)


def case_name(path: Path) -> str:
    """``liver_001.seg.nrrd`` -> ``liver_001``."""
    name = path.name
    for suffix in (".seg.nrrd", *READ_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def list_cases(segs: Path) -> list[tuple[str, Path]]:
    """(case name, label map) from a folder of label maps or a text file of paths (one a line, ``#`` comments,
    relative to the file's folder); InputError for none, a missing file or two cases with one name."""
    if segs.is_dir():
        paths = sorted(p for p in segs.iterdir() if p.is_file() and not p.name.startswith(".")
                       and p.name.lower().endswith(READ_SUFFIXES))
        if not paths:
            raise InputError(f"--segs {segs} holds no label maps ({', '.join(READ_SUFFIXES)})")
    elif segs.is_file():
        try:
            lines = segs.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read --segs {segs}: {exc}") from None
        paths = [segs.parent / Path(line.strip()).expanduser() for line in lines
                 if line.strip() and not line.lstrip().startswith("#")]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise InputError(f"--segs {segs} lists {len(missing)} missing file(s), e.g. {missing[0]}")
        if not paths:
            raise InputError(f"--segs {segs} lists no files")
    else:
        raise InputError(f"--segs {segs} does not exist; give a folder of label maps or a text file of paths")
    cases = [(case_name(p), p) for p in paths]
    seen: dict[str, Path] = {}
    for name, path in cases:
        if name in seen:
            raise InputError(f"--segs: {seen[name]} and {path} are both case '{name}'; rename one")
        seen[name] = path
    return cases


def plan_jobs(cases: Sequence[tuple[str, Path]], samples: int, seed: int, layout: Layout) -> list[Job]:
    """Every (case, sample) job in case-major order."""
    if samples < 1:
        raise InputError(f"--samples {samples} must be at least 1")
    jobs = []
    for name, path in cases:
        for k in range(samples):
            outputs = tuple(p for p in (layout.image(name, k), layout.label(name, k), layout.sidecar(name, k))
                            if p is not None)
            jobs.append(Job(len(jobs), name, path, k, job_seed(seed, name, k), outputs))
    return jobs


def original_labels(cases: Sequence[tuple[str, Path]]) -> dict[int, str]:
    """``{value: name}`` of every label value in the cases (segment names where a .seg.nrrd has them, else
    ``label_<value>``), without 0; unreadable cases are left out (their jobs fail with the reason)."""
    found: dict[int, str] = {}
    for _, path in cases:
        try:
            seg, names = read_labelmap(path)
        except CTSynthError:
            continue
        for value in np.unique(seg.array)[1:].tolist():
            found.setdefault(int(value), names.get(int(value), f"label_{value}"))
    taken: dict[str, int] = {}
    for value, name in sorted(found.items()):
        taken[name if name not in taken and name != "background" else f"{name}_{value}"] = value
    return {value: name for name, value in taken.items()}


def _label_record(label_names: dict[int, str] | None) -> dict[str, str] | None:
    return None if label_names is None else {str(v): name for v, name in sorted(label_names.items())}


HOW_NOT_WHAT = {"batch_size": None, "compile": None}
"""Options that change how a volume is computed, not what it is (up to float rounding): ignored when resuming."""


@dataclass(frozen=True)
class Recipe:
    """Everything besides a job's seed and input that decides its volumes; a finished job's sidecar must record the
    same, and the same input content, for the job to count as done."""

    model_sha256: str
    options: SamplingOptions
    """As the model uses them (:func:`~.synthesis.used_options`), the precision resolved for the device."""
    device_type: str
    """cpu, cuda or mps: each draws other random numbers from the same seed."""
    labels: str
    """The label convention, or ``sha256:<digest>`` of a JSON mapping file (see :func:`labels_identity`)."""
    label_names: dict[int, str] | None = None

    def difference(self, job: Job, input_sha256: str | None) -> str | None:
        """Why the job's sidecar does not record this recipe, this input content and the job's seed (None when it
        does). Records from before an option existed ran with it off (:data:`NEUTRAL_OPTIONS`); those from before the
        precision was an option record it beside them (fp32 when not at all); the batch size and --compile may
        differ."""
        record = read_record(job.outputs[-1])
        if record is None or not isinstance(record.get("options"), dict):
            return "it has no readable ctsynth record"
        inputs = record.get("inputs") if isinstance(record.get("inputs"), dict) else {}
        batch = record.get("batch") if isinstance(record.get("batch"), dict) else {}
        expected = dataclasses.asdict(dataclasses.replace(self.options, seed=job.seed))
        recorded = {**NEUTRAL_OPTIONS, "precision": record.get("precision", "fp32"), **record["options"]}
        checks = (
            (record.get("model_sha256") == self.model_sha256, "another model"),
            (recorded["precision"] == self.options.precision, "another precision"),
            ({**recorded, **HOW_NOT_WHAT} == {**expected, **HOW_NOT_WHAT}, "other sampling options or seed"),
            (_device_type(record.get("device")) == self.device_type, "another device type"),
            (labels_identity(str(inputs.get("labels")), inputs.get("labels_sha256")) == self.labels,
             "another label convention or mapping"),
            (batch.get("labels") == _label_record(self.label_names), "other nnU-Net labels"),
            (input_sha256 is not None and inputs.get("segmentation_sha256") == input_sha256,
             f"another content of {job.segmentation.name} (changed since, or not recorded)"),
        )
        return next((reason for same, reason in checks if not same), None)


def labels_identity(labels: str, mapping_sha256: str | None = None) -> str:
    """A label convention's name, or for a JSON mapping file ``sha256:<digest of its content>`` (``mapping_sha256``
    when known, else read from the file; '' when it cannot be read)."""
    if mapping_file(labels) is None:
        return labels
    if mapping_sha256 is None:
        mapping_sha256 = _digest(Path(labels))
    return f"sha256:{mapping_sha256}" if mapping_sha256 else ""


def _digest(path: Path) -> str | None:
    """sha256 of a file, None when it cannot be read (its job then fails with the reason)."""
    try:
        return file_digest(path)
    except OSError:
        return None


def _device_type(device: object) -> str | None:
    try:
        return torch.device(str(device)).type
    except RuntimeError:
        return None


def _complete(job: Job) -> bool:
    """Whether the job's volumes exist and hold all their data."""
    try:
        for path in job.outputs[:-1]:
            verify_complete(path)
    except InputError:
        return False
    return True


def job_states(jobs: Sequence[Job], recipe: Recipe, overwrite: bool) -> list[bool]:
    """Which jobs are done (complete files whose sidecar records ``recipe``, the job's seed and the current content
    of its input); InputError naming the file and the difference when a job still to run would replace a file made
    otherwise and ``overwrite`` is not set."""
    digests = {path: _digest(path) for path in dict.fromkeys(job.segmentation for job in jobs)}
    done = []
    for job in jobs:
        difference = recipe.difference(job, digests[job.segmentation])
        done.append(difference is None and _complete(job))
        existing = [p for p in job.outputs if os.path.lexists(p)]
        if existing and difference is not None and not overwrite:
            raise InputError(f"{existing[0]} exists and was made otherwise ({difference}); choose another --out or "
                             "use --overwrite to make it again")
    return done


@dataclass(frozen=True)
class Shard:
    """This process's place under torchrun (rank 0 of 1 without it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def owns(self, job: Job) -> bool:
        return job.index % self.world_size == self.rank


def shard_from_environment() -> Shard:
    """The torchrun rank (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); with several ranks the process group is started
    (NCCL on CUDA, else gloo). On CUDA each rank is bound to ``cuda:<LOCAL_RANK>`` first: NCCL and
    ``all_gather_object`` use the current device, which would otherwise be cuda:0 on every rank."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    shard = Shard(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if world_size > 1 and not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(torch.device("cuda", shard.local_rank))
            torch.distributed.init_process_group("nccl")
        else:
            torch.distributed.init_process_group("gloo")
    return shard


def rank_device(device: torch.device, shard: Shard) -> torch.device:
    """Each rank on its own GPU: a bare ``cuda`` becomes ``cuda:<local rank>``."""
    if device.type == "cuda" and device.index is None and shard.world_size > 1:
        return torch.device("cuda", shard.local_rank)
    return device


JobCallback = Callable[[JobResult, int, int], None]
"""Called after each job of this rank with (result, jobs finished, jobs of this rank)."""


@dataclass(frozen=True)
class BatchSettings:
    """What every job shares."""

    layout: Layout
    labels: str = "auto"
    variance: bool = False
    overwrite: bool = False
    label_names: dict[int, str] | None = None
    """nnU-Net labelsTr: None for the model classes, else the input's own values (from :func:`original_labels`),
    renumbered 1..N in value order."""


def run_batch(jobs: Sequence[Job], model: LoadedModel, options: SamplingOptions, settings: BatchSettings, *,
              device: torch.device, shard: Shard = Shard(),
              on_job: JobCallback | None = None, progress: ProgressCallback | None = None) -> list[JobResult]:
    """Run this rank's jobs that are not done; returns every job's result (all ranks', gathered under torchrun).

    A job that fails (a bad label map, out of memory, ...) is recorded with its one-line error and the batch goes
    on. In a single process the manifest is rewritten after every job; under torchrun rank 0 writes it, the
    variance maps and dataset.json once every rank has finished.
    """
    layout = settings.layout
    options = dataclasses.replace(options, precision=select_precision(options.precision, device))  # as recorded
    recipe = Recipe(model.sha256, used_options(options, model.kind), device.type, labels_identity(settings.labels),
                    settings.label_names)
    done = job_states(jobs, recipe, settings.overwrite)
    labels = nnunet_labels(settings.label_names, model.class_set)
    check_listings(layout, jobs, labels, settings.overwrite)
    if settings.variance and not settings.overwrite:
        _check_std_maps(layout, jobs, done)
    for folder in layout.folders():
        folder.mkdir(parents=True, exist_ok=True)
    results = [JobResult(job, "ok" if finished else "pending", _recorded_seconds(job) if finished else None,
                         model.sha256 if finished else "") for job, finished in zip(jobs, done)]
    mine = [r for r in results if shard.owns(r.job)]
    if shard.world_size > 1 and shard.rank == 0 and not all(done):  # rank 0 lists the others' files at the end:
        (layout.root / DATASET_JSON).unlink(missing_ok=True)           # no count that new files would contradict
    cache: dict[str, tuple[Volume, Volume, str]] = {}
    result: JobResult | None = None
    try:
        for count, result in enumerate(mine, start=1):
            if result.status == "pending":
                _run_job(result, model, options, settings, device, recipe, cache, progress)
                if shard.world_size == 1:
                    write_listings(layout, results, labels)
            if on_job is not None:
                on_job(result, count, len(mine))
    except KeyboardInterrupt:  # the listings say what is on disk, even for a job whose files just went in
        if result is not None and result.status == "pending" and job_states([result.job], recipe, True)[0]:
            result.status, result.model_sha256 = "ok", model.sha256
        if shard.world_size == 1:
            write_listings(layout, results, labels)
        raise
    if shard.world_size > 1:
        results = _gather(results, shard)
    if shard.rank == 0:
        if settings.variance:
            _write_std_maps(layout, results)
        write_listings(layout, results, labels)
    if shard.world_size > 1:
        torch.distributed.barrier()
    return results


def _run_job(result: JobResult, model: LoadedModel, options: SamplingOptions, settings: BatchSettings,
             device: torch.device, recipe: Recipe, cache: dict[str, tuple[Volume, Volume, str]],
             progress: ProgressCallback | None) -> None:
    job = result.job
    start = time.perf_counter()
    try:
        if job.case not in cache:  # a case's samples run one after another: keep only the current case's classes
            cache.clear()
            digest = file_digest(job.segmentation)  # before reading: a later edit makes the job stale, not done
            seg, names = read_labelmap(job.segmentation)
            cache[job.case] = seg, prepare_classes(seg, names, settings.labels, classes=model.class_set)[0], digest
        seg, classes, digest = cache[job.case]
        synthesis = synthesize(classes, model, dataclasses.replace(options, seed=job.seed), device=device,
                               progress=progress)
        result.seconds = time.perf_counter() - start
        record = synthesis.provenance
        record["inputs"] = {"segmentation": str(job.segmentation), "segmentation_sha256": digest,
                            "labels": settings.labels}
        if recipe.labels.startswith("sha256:"):  # a mapping file: its content decides the classes
            record["inputs"]["labels_sha256"] = recipe.labels.removeprefix("sha256:")
        record["batch"] = {"case": job.case, "sample": job.sample, "seed": job.seed, "seconds": result.seconds,
                           "labels": _label_record(settings.label_names)}
        with atomic_outputs(*job.outputs, overwrite=True) as temps:  # job_states refused others' files
            save_volume(synthesis.volume, temps[0], metadata=provenance_header(record))
            if len(temps) == 3:
                save_volume(classes if settings.label_names is None else _renumbered(seg, settings.label_names),
                            temps[1])
            write_record(record, temps[-1])
        result.status, result.model_sha256, result.error = "ok", model.sha256, ""
    except CTSynthError as exc:
        _failed(result, str(exc))
    except (RuntimeError, ValueError, OSError) as exc:  # one broken case must not end a batch of hundreds
        logger.debug("case %s sample %d failed", job.case, job.sample, exc_info=True)
        _failed(result, f"{type(exc).__name__}: {exc}")


def _renumbered(seg: Volume, label_names: dict[int, str]) -> Volume:
    """The label map with its values numbered 1..N as in :func:`nnunet_labels` (nnU-Net wants consecutive labels)."""
    lookup = np.zeros(max(int(seg.array.max()), max(label_names)) + 1, dtype=np.int16)
    for number, value in enumerate(sorted(label_names), start=1):
        lookup[value] = number
    return Volume(lookup[seg.array], seg.affine)


def _failed(result: JobResult, message: str) -> None:
    result.status, result.error = "failed", " ".join(message.split())
    logger.info("%s sample %d failed: %s", result.job.case, result.job.sample, result.error)


def _recorded_seconds(job: Job) -> float | None:
    record = read_record(job.outputs[-1]) or {}
    seconds = record.get("batch", {}).get("seconds")
    return float(seconds) if isinstance(seconds, (int, float)) else None


def _gather(results: list[JobResult], shard: Shard) -> list[JobResult]:
    """Every rank's version of the jobs it owns, merged on all ranks (after a barrier)."""
    gathered: list[Any] = [None] * shard.world_size
    torch.distributed.all_gather_object(gathered, [(r.status, r.seconds, r.model_sha256, r.error) for r in results])
    merged = []
    for result in results:
        owner = gathered[result.job.index % shard.world_size]
        status, seconds, sha, error = owner[result.job.index]
        merged.append(JobResult(result.job, status, seconds, sha, error))
    return merged


def std_map(volumes: Sequence[Volume]) -> Volume:
    """Per-voxel standard deviation (HU, float32) of samples on one grid: where the model is unsure."""
    if len(volumes) < 2:
        raise InputError(f"a variance map needs at least 2 samples, got {len(volumes)}")
    if not all(v.same_grid(volumes[0]) for v in volumes[1:]):
        raise InputError("the samples of a variance map are not on one grid")
    stack = np.stack([v.array.astype(np.float32) for v in volumes])
    return Volume(stack.std(axis=0).astype(np.float32), volumes[0].affine)


def std_header(samples: int) -> dict[str, str]:
    """Header fields of a variance map."""
    return {"descrip": f"SYNTHETIC CT per-voxel std (HU) of {samples} samples, CTSemanticSynth",
            "ctsynth_synthetic": "true", "ctsynth_std_samples": str(samples)}


def _write_std_maps(layout: Layout, results: Sequence[JobResult]) -> None:
    by_case: dict[str, list[JobResult]] = {}
    for result in results:
        by_case.setdefault(result.job.case, []).append(result)
    for case, rows in by_case.items():
        path = layout.std_map(case)
        if len(rows) < 2 or any(r.status != "ok" for r in rows):
            continue
        volumes = [read_image(r.job.image) for r in rows]
        with atomic_outputs(path, overwrite=True) as (tmp,):
            save_volume(std_map(volumes), tmp, metadata=std_header(len(volumes)))


def _check_std_maps(layout: Layout, jobs: Sequence[Job], done: Sequence[bool]) -> None:
    """InputError when a case still to sample already has a variance map (another run's)."""
    for job, finished in zip(jobs, done):
        if not finished and os.path.lexists(layout.std_map(job.case)):
            raise InputError(f"{layout.std_map(job.case)} exists and was made otherwise; choose another --out or "
                             "use --overwrite")
