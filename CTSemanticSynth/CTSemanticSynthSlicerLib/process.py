"""A command run in the background: output read on a thread, progress parsed, the whole process tree stoppable.

Nothing here imports Slicer or Qt, and nothing blocks: the owner calls :meth:`BackgroundProcess.poll` from a timer
on the main thread (the Slicer Widget uses a ``QTimer``; tests and scripts call :meth:`BackgroundProcess.wait`).
Cancel first asks the process to stop (SIGTERM: ``ctsynth`` then removes its temporary files) and kills the whole
process tree only if it is still running ``stopGrace`` seconds later.
"""

from __future__ import annotations

import enum
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

# "PROGRESS 12.5 87" (`ctsynth synth --progress-lines`; "PROGRESS 12/87" too).
_PROGRESS = re.compile(r"^PROGRESS\s+(\d+(?:\.\d+)?)(?:\s*/\s*|\s+)(\d+)\s*$")
_ERROR_PREFIXES = ("ctsynth: error:", "error:")
KEEP_LINES = 400
STOP_GRACE_S = 10.0


def parseProgress(line: str) -> tuple[float, int] | None:
    """(done, total) from one output line, or None when the line carries no progress."""
    match = _PROGRESS.match(line.strip())
    if not match:
        return None
    done, total = float(match.group(1)), int(match.group(2))
    return (done, total) if total > 0 else None


def formatDuration(seconds: float) -> str:
    """``75`` -> ``'1 min 15 s'``."""
    seconds = int(round(max(0.0, seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class State(enum.Enum):
    NOT_STARTED = "not started"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (State.SUCCEEDED, State.FAILED, State.CANCELLED)


class BackgroundProcess:
    """Runs ``args``; keeps the last output lines, the latest progress and an ETA.

    ``onLine`` (optional) is called on the polling thread with each new output line.
    """

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None, cwd: str | None = None,
                 onLine: Callable[[str], None] | None = None, stopGrace: float = STOP_GRACE_S):
        self.args = [str(a) for a in args]
        self.stopGrace = stopGrace
        self._killAt: float | None = None  # after Cancel: when the process tree is killed if still running
        self.env = env
        self.cwd = cwd
        self.onLine = onLine
        self.state = State.NOT_STARTED
        self.returncode: int | None = None
        self.lines: list[str] = []
        self.done = 0.0
        self.total = 0
        self._proc: subprocess.Popen | None = None
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._startTime = 0.0
        self._progressStart: tuple[float, float] | None = None  # (time, done) of the first progress line

    # --- running ---------------------------------------------------------------------------------------
    def start(self) -> BackgroundProcess:
        kwargs: dict = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True  # own process group: cancel kills workers too
        self._proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env=self.env, cwd=self.cwd, **kwargs)
        self._startTime = time.monotonic()
        self.state = State.RUNNING
        self._thread = threading.Thread(target=self._read, name="CTSemanticSynth output", daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        """Reader thread: split the raw stream on CR and LF (tqdm redraws with CR) and queue the lines."""
        stream = self._proc.stdout
        pending = b""
        while True:
            chunk = stream.read1(4096) if hasattr(stream, "read1") else stream.read(1)
            if not chunk:
                break
            pending += chunk
            parts = re.split(rb"[\r\n]", pending)
            pending = parts.pop()
            for part in parts:
                if part.strip():
                    self._queue.put(part.decode("utf-8", errors="replace").rstrip())
        if pending.strip():
            self._queue.put(pending.decode("utf-8", errors="replace").rstrip())
        self._queue.put(None)  # end of output

    def poll(self) -> State:
        """Take the output that arrived since the last call; returns the state (call from one thread only). After
        :meth:`cancel` it kills the process tree once the grace period is over."""
        if self.state is State.CANCELLED:
            if self.stopped:
                self.returncode = self._proc.returncode
            elif self._killAt is not None and time.monotonic() >= self._killAt:
                killProcessTree(self._proc)
                self._killAt = None
            return self.state
        if self.state is not State.RUNNING:
            return self.state
        ended = False
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                ended = True
                break
            self._addLine(line)
        if ended:
            self.returncode = self._proc.wait()
            self.state = State.SUCCEEDED if self.returncode == 0 else State.FAILED
        return self.state

    @property
    def stopped(self) -> bool:
        """Whether the operating-system process has ended (after Cancel it may still be cleaning up)."""
        return self._proc is None or self._proc.poll() is not None

    def _addLine(self, line: str) -> None:
        progress = parseProgress(line)
        if progress is not None:
            self.done, self.total = progress
            if self._progressStart is None or self.done < self._progressStart[1]:
                self._progressStart = (time.monotonic(), self.done)
            if self.lines and parseProgress(self.lines[-1]) is not None:
                self.lines[-1] = line  # keep one line per progress bar, like a terminal
                return
        self.lines.append(line)
        del self.lines[:-KEEP_LINES]
        if self.onLine is not None:
            self.onLine(line)

    def wait(self, timeout: float | None = None, interval: float = 0.1) -> State:
        """Poll until the process ends (or ``timeout`` seconds pass; then it is cancelled and TimeoutError raised);
        after :meth:`cancel`, until it has stopped."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not (self.poll().finished and self.stopped):
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                killProcessTree(self._proc)
                raise TimeoutError(f"{self.args[0]} did not finish within {timeout:g} s and was stopped")
            time.sleep(interval)
        return self.state

    def cancel(self) -> None:
        """Ask the process to stop and return at once; the state becomes CANCELLED. :meth:`poll` kills the process
        and everything it started if it has not ended ``stopGrace`` seconds later."""
        if self.state is not State.RUNNING:
            return
        self.state = State.CANCELLED
        self._killAt = time.monotonic() + self.stopGrace
        requestStop(self._proc)

    # --- reporting ---------------------------------------------------------------------------------------
    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._startTime if self._startTime else 0.0

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left, from the rate since the first progress line; None until it can be estimated."""
        if self._progressStart is None or not self.total:
            return None
        t0, done0 = self._progressStart
        rate = (self.done - done0) / max(1e-6, time.monotonic() - t0)
        return (self.total - self.done) / rate if rate > 0 else None

    def statusText(self, unit: str = "slices") -> str:
        """E.g. ``'12.0/87 slices, 2 min 03 s left'``."""
        if not self.total:
            message = self.lastMessage()
            message = message[:77] + "..." if len(message) > 80 else message
            return f"{message or 'starting'} ({formatDuration(self.elapsed)})"
        eta = self.eta
        left = f", {formatDuration(eta)} left" if eta is not None else ""
        return f"{self.done:.0f}/{self.total} {unit}{left}"

    def lastMessage(self) -> str:
        """The latest output line that is not a progress bar, without the ``ctsynth:`` prefix."""
        for line in reversed(self.lines):
            if parseProgress(line) is None and "%|" not in line:
                return line.strip().removeprefix("ctsynth:").strip()
        return ""

    def errorMessage(self) -> str:
        """The command's own error line (``ctsynth: error: ...``), else its last output lines."""
        for line in reversed(self.lines):
            text = line.strip()
            for prefix in _ERROR_PREFIXES:
                if text.startswith(prefix):
                    return text[len(prefix):].strip()
        tail = [line for line in self.lines[-5:] if parseProgress(line) is None]
        return "\n".join(tail) or f"{os.path.basename(self.args[0])} exited with code {self.returncode}"


def requestStop(proc: subprocess.Popen) -> None:
    """Ask ``proc`` and its process group to stop (SIGTERM on POSIX; CTRL_BREAK on Windows)."""
    if proc.poll() is not None:
        return
    try:
        if os.name == "nt":
            proc.send_signal(signal.CTRL_BREAK_EVENT)
        else:
            os.killpg(os.getpgid(proc.pid), signal.SIGTERM)
    except (ProcessLookupError, PermissionError, OSError):
        pass


def killProcessTree(proc: subprocess.Popen) -> None:
    """Kill ``proc`` and its descendants (its own process group on POSIX; ``taskkill /T`` on Windows)."""
    if proc.poll() is not None:
        return
    if os.name == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)], capture_output=True, check=False)
    else:
        try:
            os.killpg(os.getpgid(proc.pid), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()


def pythonCommand(python: str | None, module: str, *args: str) -> list[str]:
    """``[python, '-m', module, *args]`` with ``sys.executable`` as the default interpreter."""
    return [python or sys.executable, "-m", module, *args]
