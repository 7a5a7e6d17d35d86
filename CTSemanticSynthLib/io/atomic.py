"""Write safety: every output file or folder goes through :func:`atomic_outputs` (a temp beside the target, flushed,
then all renamed into place or none), after the output-path checks; leftovers of killed runs are cleaned up."""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import signal
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from ..errors import InputError, OutputExistsError

logger = logging.getLogger(__name__)

_TEMP_NAME = re.compile(r"\.ctsynth-(tmp|old)-(\d+)-[0-9a-f]{8}\.(.+)")
"""``.ctsynth-tmp-<pid>-<random>.<name>``: a file being written; ``.ctsynth-old-...``: an output moved aside."""


def temp_sibling(target: Path, kind: str = "tmp") -> Path:
    """A recognisable hidden name beside ``target`` that ends in ``target``'s name (so its suffix picks the format)."""
    return target.with_name(f".ctsynth-{kind}-{os.getpid()}-{secrets.token_hex(4)}.{target.name}")


def check_output_path(path: Path, overwrite: bool) -> None:
    """Refuse an output file path whose folder is missing or read-only, that is a folder, or that exists without
    ``overwrite``."""
    if path.is_dir():
        raise InputError(f"cannot write {path}: it is a folder; give a file name")
    _check_target(path, overwrite)


def _check_target(path: Path, overwrite: bool) -> None:
    if not path.parent.is_dir():
        raise InputError(f"cannot write {path}: folder {path.parent} does not exist; create it first")
    if not os.access(path.parent, os.W_OK):
        raise InputError(f"cannot write {path}: folder {path.parent} is read-only; choose another output folder")
    if os.path.lexists(path) and not overwrite:
        raise OutputExistsError(f"{path} already exists; choose another name or use --overwrite")


def check_distinct_paths(outputs: Mapping[str, Path | None], inputs: Mapping[str, Path | None]) -> None:
    """InputError when two outputs are one file, or an output is an input or lies inside an input folder.

    Keys name the option (``"--out"``); paths are compared resolved and, where both exist, with ``samefile``
    (hard and symbolic links).
    """
    earlier: list[tuple[str, Path]] = [(name, Path(p)) for name, p in inputs.items() if p is not None]
    for name, path in ((n, Path(p)) for n, p in outputs.items() if p is not None):
        for other_name, other in earlier:
            if _same_or_inside(path, other):
                raise InputError(f"{name} {path} would overwrite {other_name} {other}; choose another output path")
        earlier.append((name, path))


def _same_or_inside(path: Path, other: Path) -> bool:
    resolved, other_resolved = path.resolve(), other.resolve()
    if resolved == other_resolved or (other.is_dir() and other_resolved in resolved.parents):
        return True
    try:
        return path.exists() and other.exists() and os.path.samefile(path, other)
    except OSError:
        return False


def remove_stale_temps(folder: Path) -> None:
    """Remove what a killed run left in ``folder`` (temp names with a dead pid); an output it had moved aside
    whose new version never arrived is put back."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        match = _TEMP_NAME.fullmatch(entry.name)
        if match is None or _pid_alive(int(match.group(2))):
            continue
        target = folder / match.group(3)
        try:
            if match.group(1) == "old" and not os.path.lexists(target):
                os.rename(entry, target)
                logger.warning("restored %s, moved aside by an interrupted run", target)
            else:
                _remove(entry)
                logger.info("removed %s, left by an interrupted run", entry)
        except OSError as exc:
            logger.warning("cannot remove %s left by an interrupted run: %s", entry, exc.strerror)


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs; always True where that cannot be asked safely (Windows: os.kill would
    signal it), so leftovers there stay until removed by hand."""
    if pid == os.getpid() or os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_outputs(*targets: Path, overwrite: bool = False) -> Iterator[tuple[Path, ...]]:
    """Yield a temp path beside each target; the block writes each one (a file, or a folder it creates).

    When the block succeeds, every temp file is flushed to disk and all temps are renamed into place together:
    existing targets are moved aside first and deleted only once every new one is in place. On any failure or
    interrupt (Ctrl-C, SIGTERM) every temp is removed and existing targets are left byte-identical. Leftovers of
    killed runs in the targets' folders are cleaned up first (:func:`remove_stale_temps`).
    """
    targets = tuple(Path(t) for t in targets)
    if len({t.resolve() for t in targets}) != len(targets):
        raise ValueError(f"atomic_outputs got the same target twice: {', '.join(map(str, targets))}")
    for target in targets:
        _check_target(target, overwrite)
    for folder in dict.fromkeys(t.parent for t in targets):
        remove_stale_temps(folder)
    temps = tuple(temp_sibling(t) for t in targets)
    try:
        yield temps
        for tmp in temps:
            if not os.path.lexists(tmp):
                raise InputError(f"{tmp} was not written")
            if tmp.is_file():
                _fsync(tmp)
        _commit(list(zip(temps, targets)))
    except OSError as exc:
        target = next((t for t, tmp in zip(targets, temps) if str(tmp) in (exc.filename, exc.filename2)), targets[0])
        raise InputError(f"cannot write {target}: {exc.strerror or exc}; check the folder is writable and has "
                         "space") from None
    finally:
        for tmp in temps:
            _remove(tmp)


_COMMIT_LOGS: list[list[Path]] = []
"""The lists of :func:`commit_log` blocks now open."""


@contextmanager
def commit_log() -> Iterator[list[Path]]:
    """Yield a list that gets every target :func:`atomic_outputs` puts in place while the block runs, recorded in
    the same step as the renames, before a Ctrl-C or SIGTERM held during them is delivered: after an interrupt it
    says exactly which outputs are complete on disk."""
    log: list[Path] = []
    _COMMIT_LOGS.append(log)
    try:
        yield log
    finally:
        _COMMIT_LOGS.remove(log)


def _commit(pairs: list[tuple[Path, Path]]) -> None:
    """Rename each temp over its target, old targets kept aside until all are in; all or nothing."""
    aside: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    with _interrupts_deferred():
        try:
            for tmp, target in pairs:
                if os.path.lexists(target):
                    old = temp_sibling(target, "old")
                    os.rename(target, old)
                    aside.append((old, target))
                os.rename(tmp, target)
                placed.append(target)
        except BaseException:
            for target in placed:
                _remove(target)
            for old, target in reversed(aside):
                os.rename(old, target)
            raise
        for log in _COMMIT_LOGS:
            log.extend(target for _, target in pairs)
        for old, _ in aside:
            _remove(old)
    for folder in dict.fromkeys(target.parent for _, target in pairs):
        _fsync(folder)


@contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM while a rename sequence runs, then deliver them to the usual handlers.

    Python runs signal handlers in the main thread between bytecodes, whichever thread the signal reached
    (blocking it there would not help once torch has started threads), so the handlers are swapped for the
    duration; other threads cannot install handlers and run the block as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {signum: signal.signal(signum, lambda number, frame: caught.append(number))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    for signum in dict.fromkeys(caught):
        signal.raise_signal(signum)


def _fsync(path: Path) -> None:
    """Flush a file's data (a full disk may only show up here) or, on POSIX, a folder's entries to disk."""
    if path.is_file():
        fd = os.open(path, os.O_RDWR)  # Windows cannot flush a read-only handle
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    elif os.name == "posix":
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError as exc:  # some file systems cannot flush a folder; the renames are done either way
            logger.debug("fsync of folder %s: %s", path, exc)
        finally:
            os.close(fd)


@contextmanager
def atomic_folder(target: Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield an empty folder that replaces ``target`` when the block succeeds (see :func:`atomic_outputs`)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_outputs(target, overwrite=overwrite) as (tmp,):
        tmp.mkdir()
        yield tmp


def write_bytes(path: str | Path, data: bytes, *, overwrite: bool = False) -> None:
    """Write a small file (JSON, CSV, PNG) atomically, with the same checks as :func:`write_volume`."""
    path = Path(path)
    check_output_path(path, overwrite)
    with atomic_outputs(path, overwrite=overwrite) as (tmp,):
        tmp.write_bytes(data)
