"""Progress displays: a tqdm bar on a terminal, else a line every few percent (or one per batch job)."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..batch import JobResult


PROGRESS_LINE_PERCENT = 5
"""When stderr is not a terminal (a log file, a pipe), progress is one line per this many percent."""


@contextlib.contextmanager
def _progress(quiet: bool) -> Iterator[Callable[[float, int], None]]:
    """A progress display for (slices done, total): a tqdm bar on a terminal, else a line every few percent."""
    if quiet:
        yield lambda done, total: None
    elif sys.stderr.isatty():
        from tqdm import tqdm

        with tqdm(total=None, unit="slice", desc="synthesizing", bar_format="{desc}: {percentage:3.0f}%|{bar}| "
                  "{n:.1f}/{total} slices [{elapsed}<{remaining}]") as bar:

            def update(done: float, total: int) -> None:
                bar.total, bar.n = total, done
                bar.refresh()

            yield update
    else:
        shown = [-1]

        def line(done: float, total: int) -> None:
            percent = int(100 * done / max(total, 1)) // PROGRESS_LINE_PERCENT * PROGRESS_LINE_PERCENT
            if percent > shown[0]:
                shown[0] = percent
                print(f"ctsynth: synthesizing {percent}% ({done:.0f}/{total} slices)", file=sys.stderr, flush=True)

        yield line


@contextlib.contextmanager
def _batch_progress(quiet: bool, rank: int) -> Iterator[tuple[Callable[[JobResult, int, int], None],
                                                              Callable[[float, int], None]]]:
    """(after each job, within a volume) displays: on a terminal an overall bar (jobs, ETA) over a bar for the
    current volume, else one line per job; only rank 0 shows bars."""
    if quiet:
        yield (lambda result, done, total: None), (lambda done, total: None)
    elif sys.stderr.isatty() and rank == 0:
        from tqdm import tqdm

        with tqdm(unit="CT", desc="batch", position=0) as jobs, tqdm(unit="slice", desc="volume", position=1,
                                                                     leave=False) as volume:

            def job_done(result: JobResult, done: int, total: int) -> None:
                jobs.total, jobs.n = total, done
                jobs.set_postfix_str(f"{result.job.case} s{result.job.sample} {result.status}")

            def update(done: float, total: int) -> None:
                volume.total, volume.n = total, round(done, 1)
                volume.refresh()

            yield job_done, update
    else:
        start = time.monotonic()

        def line(result: JobResult, done: int, total: int) -> None:
            eta = (time.monotonic() - start) / done * (total - done)
            detail = result.error or ("" if result.seconds is None else f"{result.seconds:.1f} s")
            prefix = f"ctsynth: [rank {rank}]" if rank else "ctsynth:"
            print(f"{prefix} {done}/{total} {result.job.case} sample {result.job.sample}: {result.status} ({detail}), "
                  f"ETA {eta:.0f} s", file=sys.stderr, flush=True)

        yield line, (lambda done, total: None)
