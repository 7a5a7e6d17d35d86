"""The progress display of the commands (``ctsynth``, ``training.prepare``, ``training.train``).

The library reports progress through callbacks and prints nothing; a command turns them into this display on
stderr: a tqdm bar on a terminal, else one line every :data:`LINE_PERCENT` percent (a log file or a pipe gets no
carriage returns and at most 100 / LINE_PERCENT + 1 lines). tqdm is imported only when a bar is drawn.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO

LINE_PERCENT = 5
"""Off a terminal, progress is one line per this many percent."""

BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total_fmt} {unit}s [{elapsed}<{remaining}{postfix}]"


class ProgressDisplay:
    """How far a count (``done`` of ``total`` ``unit``\\ s) has come, as ``<prefix> <desc> 45% (9/20 cases, ...)``.

    ``bar``: draw a tqdm bar (default: when the stream is a terminal); ``lines``: without a bar, print the lines
    (False: show nothing); ``position`` and ``leave`` place a bar under another and clear it when done.
    """

    def __init__(self, prefix: str, desc: str, unit: str, *, total: float | None = None, done: float = 0,
                 quiet: bool = False, bar: bool | None = None, lines: bool = True, position: int = 0,
                 leave: bool = True, stream: TextIO | None = None) -> None:
        self.prefix, self.desc, self.unit = prefix, desc, unit
        self.total, self.done = total, done
        self._stream = stream if stream is not None else sys.stderr
        self._postfix = ""
        self._shown = -1  # the last percentage printed
        self._start = (time.monotonic(), done)
        self._bar = None
        self._lines = lines and not quiet
        if not quiet and (self._stream.isatty() if bar is None else bar):
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=done, unit=unit, desc=desc, position=position, leave=leave,
                             file=self._stream, dynamic_ncols=True, bar_format=BAR_FORMAT)
            self._lines = False

    def update(self, done: float, total: float | None = None) -> None:
        """The count is now ``done`` (of ``total``, when given: it may become known late)."""
        if total is not None:
            self.total = total
        if self._bar is not None:
            self._bar.total = self.total
            self._bar.update(done - self._bar.n)
        self.done = done
        if self._lines and self.total is not None:
            percent = min(100, int(100 * done / max(self.total, 1))) // LINE_PERCENT * LINE_PERCENT
            if percent > self._shown:
                self._shown = percent
                self.write(self._line(percent))

    def postfix(self, text: str) -> None:
        """A short status shown after the count (the bar's postfix; the next line's)."""
        self._postfix = text
        if self._bar is not None:
            self._bar.set_postfix_str(text)

    def write(self, text: str) -> None:
        """A whole line (a message, not progress) that does not break the bar."""
        if self._bar is not None:
            self._bar.write(text, file=self._stream)
        else:
            print(text, file=self._stream, flush=True)

    def _line(self, percent: int) -> str:
        parts = [f"{self.done:.0f}/{self.total:.0f} {self.unit}s"] + ([self._postfix] if self._postfix else [])
        started, first = self._start
        if first < self.done < self.total:
            eta = (time.monotonic() - started) / (self.done - first) * (self.total - self.done)
            parts.append(f"ETA {eta:.0f} s")
        return f"{self.prefix} {self.desc} {percent}% ({', '.join(parts)})"

    def close(self) -> None:
        """End the bar (a line stays where ``leave``)."""
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> ProgressDisplay:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()
