"""Outputs are complete or absent: a full disk, a killed run, leftovers, read-only folders, outputs that are inputs.

Every failing run below starts from old outputs and checks that they are byte-identical afterwards and that no
temp file is left (except after SIGKILL, where the next run removes them).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from CTSemanticSynthLib import io, preview
from CTSemanticSynthLib.cli import main
from CTSemanticSynthLib.errors import InputError

from conftest import SAMPLE_CT, SAMPLE_SEG

REPO = Path(__file__).resolve().parent.parent
OLD = {"syn.nii.gz": b"old volume", "syn.json": b"old record", "syn.png": b"old preview"}


def _old_outputs(folder: Path) -> Path:
    for name, data in OLD.items():
        (folder / name).write_bytes(data)
    return folder


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _old_intact(folder: Path) -> bool:
    return all((folder / name).is_file() and (folder / name).read_bytes() == data for name, data in OLD.items())


def _synth_args(model: Path, folder: Path, out: str = "syn.nii.gz", *extra) -> list[str]:
    return [str(a) for a in ("synth", "--seg", SAMPLE_SEG, "--out", folder / out, "--preview", folder / "syn.png",
                             "--model", model, "--labels", "totalseg", "--steps", 2, "--batch-size", 64,
                             "--device", "cpu", "-q", "--overwrite", *extra)]


def _one_error_line(err: str, *words: str) -> None:
    assert err.startswith("ctsynth: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err


def _mount_tmpfs(folder: Path, options: str) -> None:
    """Mount a tmpfs (needs root), or skip: the fake-writer tests cover the same paths without one."""
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the fake-writer tests cover this path")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB file system holding the old outputs: the new volume (~750 KB) cannot fit."""
    folder = tmp_path / "full"
    _mount_tmpfs(folder, "size=64k")
    yield _old_outputs(folder)
    subprocess.run(["umount", str(folder)], check=True)


# --- a full disk --------------------------------------------------------------------------------------


@pytest.mark.parametrize("out", ["syn.nii.gz", "syn.nrrd"])
def test_full_disk_keeps_old_outputs(capsys, full_disk, tiny_model, out):
    """ITK's writers report a full disk only on stderr; the written temp file is checked before any rename."""
    code = main(_synth_args(tiny_model, full_disk, out))
    _one_error_line(capsys.readouterr().err, "cannot write", out, "space")
    assert code == 2
    assert _contents(full_disk) == OLD and sorted(os.listdir(full_disk)) == sorted(OLD)


def test_writer_failing_halfway_like_itk_on_a_full_disk(capsys, tmp_path, tiny_model, monkeypatch):
    """Where no tmpfs can be mounted: a writer that stops halfway and only prints, as ITK's NIfTI writer does."""
    folder = _old_outputs(tmp_path)
    real_write = sitk.WriteImage

    def write_half(image, filename, *args, **kwargs):
        real_write(image, filename, *args, **kwargs)
        size = os.path.getsize(filename)
        os.truncate(filename, size // 2)
        os.write(2, f"** ERROR: NWAD: wrote only {size // 2} of {size} bytes to file\n".encode())

    monkeypatch.setattr(sitk, "WriteImage", write_half)
    code = main(_synth_args(tiny_model, folder))
    _one_error_line(capsys.readouterr().err, "cannot write", "syn.nii.gz", "wrote only")
    assert code == 2 and _contents(folder) == OLD and sorted(os.listdir(folder)) == sorted(OLD)


def test_preview_failing_after_the_volume_leaves_no_file(capsys, tmp_path, tiny_model, monkeypatch):
    """The volume, its sidecar and the preview are one unit: the first two are written when the third fails."""
    folder = _old_outputs(tmp_path)

    def disk_full(*args, **kwargs):
        assert sum(name.startswith(".ctsynth-tmp-") for name in os.listdir(folder)) == 2  # volume + sidecar
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(preview, "preview_png", disk_full)
    code = main(_synth_args(tiny_model, folder))
    _one_error_line(capsys.readouterr().err, "cannot write", "No space left on device")
    assert code == 2 and _contents(folder) == OLD and sorted(os.listdir(folder)) == sorted(OLD)


def test_rename_failing_midway_restores_the_replaced_outputs(tmp_path, monkeypatch):
    folder = _old_outputs(tmp_path)
    targets = [folder / name for name in OLD]
    real_rename = os.rename
    renamed_in = []

    def rename(src, dst):
        if Path(src).name.startswith(".ctsynth-tmp-"):
            if renamed_in:  # the second new file cannot be moved in
                raise OSError(errno.EIO, os.strerror(errno.EIO), str(src))
            renamed_in.append(dst)
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(InputError, match="cannot write .*syn.json"):
        with io.atomic_outputs(*targets, overwrite=True) as temps:
            for tmp in temps:
                tmp.write_bytes(b"new")
    assert renamed_in == [targets[0]]  # the first target had been replaced, and is back
    assert _contents(folder) == OLD and sorted(os.listdir(folder)) == sorted(OLD)


def test_interrupt_inside_the_unit_removes_every_temp(tmp_path):
    folder = _old_outputs(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with io.atomic_outputs(*(folder / n for n in OLD), overwrite=True) as temps:
            temps[0].write_bytes(b"new")
            raise KeyboardInterrupt
    assert _contents(folder) == OLD and sorted(os.listdir(folder)) == sorted(OLD)


def test_atomic_folder_keeps_the_old_folder_until_the_new_one_is_complete(tmp_path):
    target = tmp_path / "model"
    with io.atomic_folder(target) as tmp:
        (tmp / "weights").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with io.atomic_folder(target) as tmp:
            (tmp / "weights").write_bytes(b"half")
            raise RuntimeError("export failed")
    assert _contents(target) == {"weights": b"old"} and os.listdir(tmp_path) == ["model"]
    with io.atomic_folder(target) as tmp:
        (tmp / "weights").write_bytes(b"new")
        assert _contents(target) == {"weights": b"old"}  # still in place while the new one is written
    assert _contents(target) == {"weights": b"new"} and os.listdir(tmp_path) == ["model"]


# --- killed runs ----------------------------------------------------------------------------------------


def _start_and_signal(args: list[str], folder: Path, ready, sig: int, attempts: int = 5) -> subprocess.Popen:
    """Start ``ctsynth`` and stop it (SIGSTOP) once ``ready(temp names)``; then send ``sig``; retried when the
    run finished before it was caught."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for _ in range(attempts):
        proc = subprocess.Popen([sys.executable, "-m", "CTSemanticSynthLib.cli", *args], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        while proc.poll() is None:
            temps = [n for n in os.listdir(folder) if n.startswith(".ctsynth-tmp-")]
            if ready(temps):
                proc.send_signal(signal.SIGSTOP)
                break
            time.sleep(0.0005)
        if proc.poll() is None and _old_intact(folder):  # caught while writing, before any rename
            proc.send_signal(sig)
            proc.send_signal(signal.SIGCONT)
            proc.wait(timeout=60)
            return proc
        proc.kill()
        proc.wait()
        _old_outputs(folder)
    pytest.fail(f"the run was never caught while writing in {attempts} attempts")


def test_sigterm_while_the_preview_is_drawn_leaves_no_file(tmp_path, tiny_model):
    folder = _old_outputs(tmp_path)

    def drawing_preview(temps: list[str]) -> bool:  # volume and sidecar written, preview not yet
        return any(t.endswith(".syn.json") for t in temps) and not any(t.endswith(".png") for t in temps)

    proc = _start_and_signal(_synth_args(tiny_model, folder), folder, drawing_preview, signal.SIGTERM)
    err = proc.stderr.read().decode()
    assert proc.returncode == 130 and err.strip() == "ctsynth: interrupted; nothing was written", err
    assert _contents(folder) == OLD and sorted(os.listdir(folder)) == sorted(OLD)


def test_sigkill_while_writing_leaves_temps_that_the_next_run_removes(tmp_path, tiny_model):
    folder = _old_outputs(tmp_path)
    args = _synth_args(tiny_model, folder)
    proc = _start_and_signal(args, folder, lambda temps: bool(temps) and len(temps) < len(OLD), signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    left = sorted(set(os.listdir(folder)) - set(OLD))
    assert left and all(n.startswith(f".ctsynth-tmp-{proc.pid}-") for n in left)
    assert _old_intact(folder)
    assert main(args) == 0
    assert sorted(os.listdir(folder)) == sorted(OLD)
    assert json.loads((folder / "syn.json").read_text())["synthetic"] is True
    assert nib.load(folder / "syn.nii.gz").shape == nib.load(SAMPLE_SEG).shape


def test_leftovers_of_dead_runs_are_cleaned_and_moved_aside_outputs_restored(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / f".ctsynth-tmp-{dead.pid}-0123abcd.a.nii.gz").write_bytes(b"half")
        (tmp_path / f".ctsynth-tmp-{dead.pid}-0123abce.cases").mkdir()
        (tmp_path / f".ctsynth-old-{dead.pid}-0123abcf.b.json").write_bytes(b"b moved aside")
        (tmp_path / f".ctsynth-old-{dead.pid}-0123abd0.c.json").write_bytes(b"c replaced")
        (tmp_path / "c.json").write_bytes(b"c new")
        busy = tmp_path / f".ctsynth-tmp-{alive.pid}-0123abd1.d.json"
        busy.write_bytes(b"another run is writing this")
        (tmp_path / ".ctsynth-tmp-notapid.e.json").write_bytes(b"not ours")
        io.write_bytes(tmp_path / "new.json", b"{}")
        assert _contents(tmp_path) == {"b.json": b"b moved aside", "c.json": b"c new", "new.json": b"{}",
                                       busy.name: b"another run is writing this",
                                       ".ctsynth-tmp-notapid.e.json": b"not ours"}
        assert sorted(os.listdir(tmp_path)) == sorted(_contents(tmp_path))
    finally:
        alive.kill()
        alive.wait()


# --- refusals before any work ------------------------------------------------------------------------------


def test_read_only_folder_is_one_line(capsys, tmp_path, tiny_model):
    folder = tmp_path / "ro"
    if os.geteuid() == 0:
        _mount_tmpfs(folder, "ro,size=64k")
    else:
        folder.mkdir()
        folder.chmod(0o555)
    try:
        code = main(_synth_args(tiny_model, folder))
        _one_error_line(capsys.readouterr().err, "read-only", str(folder))
        assert code == 2 and os.listdir(folder) == []
        with pytest.raises(InputError, match="read-only"):
            io.write_bytes(folder / "x.json", b"{}")
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(folder)], check=True)
        else:
            folder.chmod(0o755)


@pytest.fixture
def inputs(tmp_path) -> Path:
    """Copies of the sample segmentation and CT, a labels JSON, and links to the segmentation."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "seg.nii.gz").write_bytes(SAMPLE_SEG.read_bytes())
    (folder / "ct.nii.gz").write_bytes(SAMPLE_CT.read_bytes())
    (folder / "map.json").write_text(json.dumps({"5": "liver", "1": "spleen"}))
    os.link(folder / "seg.nii.gz", folder / "hardlink.nii.gz")
    (folder / "symlink.nii.gz").symlink_to(folder / "seg.nii.gz")
    return folder


@pytest.mark.parametrize("extra, culprit", [
    (["--out", "{in}/seg.nii.gz"], "--out"),
    (["--out", "{in}/hardlink.nii.gz"], "--out"),
    (["--out", "{in}/symlink.nii.gz"], "--out"),
    (["--out", "{in}/map.nii.gz", "--labels", "{in}/map.json"], "its sidecar"),
    (["--out", "{in}/syn.nii.gz", "--reference-ct", "{in}/ct.nii.gz", "--preview", "{in}/ct.nii.gz"], "--preview"),
    (["--out", "{in}/syn.nii.gz", "--preview", "{in}/syn.json"], "--preview"),
    (["--out", "{in}/syn.nii.gz", "--preview", "{in}/syn.nii.gz"], "--preview"),
    (["--out", "{in}/syn.nii.gz", "--body-mask", "{in}/syn.nii.gz"], "--out"),
    (["--out", "{model}/config.nii.gz"], "--out"),  # its sidecar would be the model's config.json
    (["--out", "{model}/weights.nii.gz"], "--out"),
])
def test_output_that_is_an_input_is_refused_before_any_work(capsys, inputs, tiny_model, extra, culprit):
    (inputs / "syn.nii.gz").write_bytes(b"an existing body mask")
    before = {folder: _contents(folder) for folder in (inputs, tiny_model)}
    argv = ["synth", "--seg", str(inputs / "seg.nii.gz"), "--model", str(tiny_model), "--overwrite", "--device",
            "cpu", "-q"]
    argv += [a.format(**{"in": inputs, "model": tiny_model}) for a in extra]
    started = time.perf_counter()
    code = main(argv)
    _one_error_line(capsys.readouterr().err, f"{culprit} ", "would overwrite")
    assert code == 2 and time.perf_counter() - started < 5  # refused before the model is loaded or anything sampled
    assert {folder: _contents(folder) for folder in (inputs, tiny_model)} == before


def test_evaluate_json_that_is_an_input_is_refused(capsys, inputs):
    before = _contents(inputs)
    code = main(["evaluate", "--synthetic", str(inputs / "ct.nii.gz"), "--seg", str(inputs / "seg.nii.gz"),
                 "--json", str(inputs / "hardlink.nii.gz"), "--overwrite"])
    _one_error_line(capsys.readouterr().err, "--json", "would overwrite --seg")
    assert code == 2 and _contents(inputs) == before


def test_one_target_twice_is_a_programming_error(tmp_path):
    with pytest.raises(ValueError, match="same target twice"):
        with io.atomic_outputs(tmp_path / "a.json", tmp_path / "." / "a.json"):
            pass
    assert os.listdir(tmp_path) == []


def test_signal_during_the_renames_waits_until_all_are_in_place(tmp_path, monkeypatch):
    """SIGTERM while the temps are renamed: the unit completes, then the run stops (in the CLI: exit 0, see below)."""
    folder = _old_outputs(tmp_path)
    real_rename = os.rename

    def rename_and_get_signalled(src, dst):
        real_rename(src, dst)
        os.kill(os.getpid(), signal.SIGTERM)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    monkeypatch.setattr(os, "rename", rename_and_get_signalled)
    try:
        with pytest.raises(KeyboardInterrupt):
            with io.atomic_outputs(*(folder / n for n in OLD), overwrite=True) as temps:
                for tmp in temps:
                    tmp.write_bytes(b"new")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert _contents(folder) == dict.fromkeys(OLD, b"new") and sorted(os.listdir(folder)) == sorted(OLD)


RENAMES = 2 * len(OLD)  # each old output moved aside, then its new version moved in


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler during the test, as in a terminal: a shell's background job starts with SIGINT
    ignored, and then a raised SIGINT is (rightly) ignored too."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("python_sigint")
@pytest.mark.parametrize("at", range(RENAMES))
@pytest.mark.parametrize("how", ["signal", "raise"])
def test_the_commit_log_says_what_is_on_disk_after_an_interrupt_at_any_rename(tmp_path, monkeypatch, at, how):
    """SIGINT at rename ``at`` is held until every output is in place, and the log lists them; a KeyboardInterrupt
    raised by the rename itself rolls the unit back, and the log stays empty."""
    folder = _old_outputs(tmp_path)
    real_rename, calls = os.rename, []

    def interrupted_rename(src, dst):
        calls.append(dst)
        if len(calls) == at + 1:
            if how == "raise":
                raise KeyboardInterrupt
            signal.raise_signal(signal.SIGINT)
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", interrupted_rename)
    targets = [folder / n for n in OLD]
    with io.commit_log() as written, pytest.raises(KeyboardInterrupt):
        with io.atomic_outputs(*targets, overwrite=True) as temps:
            for tmp in temps:
                tmp.write_bytes(b"new")
    monkeypatch.undo()
    assert len(calls) >= at + 1
    if how == "signal":
        assert written == targets and _contents(folder) == dict.fromkeys(OLD, b"new")
    else:
        assert written == [] and _contents(folder) == OLD
    assert sorted(os.listdir(folder)) == sorted(OLD)


@pytest.fixture(scope="module")
def small_seg(tmp_path_factory) -> Path:
    """Three axial slices of the sample segmentation: a synth run of the tiny model takes a fraction of a second."""
    image = nib.load(SAMPLE_SEG)
    path = tmp_path_factory.mktemp("seg") / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[30:90, 20:80, 105:108], image.affine), path)
    return path


@pytest.mark.usefixtures("python_sigint")
@pytest.mark.parametrize("where", [*(f"rename {k}" for k in range(RENAMES)), "folder flush"])
@pytest.mark.parametrize("how", ["signal", "raise"])
def test_synth_interrupted_while_its_outputs_go_in_says_what_is_on_disk(capsys, monkeypatch, tmp_path, tiny_model,
                                                                        small_seg, where, how):
    """Ctrl-C at each rename of the final unit (three outputs replacing old ones: six renames) or while the folder
    is flushed after them. A signal is held until every output is in place: the run has succeeded (exit 0, 'wrote').
    A KeyboardInterrupt raised by a rename itself rolls the unit back: exit 130, 'nothing was written', the old
    outputs byte-identical."""
    folder = _old_outputs(tmp_path)
    real_rename, real_fsync, renames = os.rename, io.atomic._fsync, []

    def interrupt() -> None:
        if how == "raise":
            raise KeyboardInterrupt
        signal.raise_signal(signal.SIGINT)

    def rename(src, dst):
        if Path(src).name.startswith(".ctsynth-tmp-") or Path(dst).name.startswith(".ctsynth-old-"):  # not a rollback
            renames.append(dst)
            if where == f"rename {len(renames) - 1}":
                interrupt()
        real_rename(src, dst)

    def fsync(path):
        if where == "folder flush" and path == folder:
            interrupt()
        real_fsync(path)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(io.atomic, "_fsync", fsync)
    argv = _synth_args(tiny_model, folder)
    argv[argv.index("--seg") + 1] = str(small_seg)
    code = main(argv)
    err = capsys.readouterr().err
    monkeypatch.undo()
    written = how == "signal" or where == "folder flush"  # a flush comes after every rename: all are in place
    assert len(renames) == (RENAMES if written else int(where.split()[-1]) + 1) and "Traceback" not in err
    if written:
        assert code == 0 and err == f"ctsynth: wrote {folder / 'syn.nii.gz'}, {folder / 'syn.json'}, " \
                                     f"{folder / 'syn.png'}\n", err
        assert all(_contents(folder)[name] != OLD[name] for name in OLD)
        assert json.loads((folder / "syn.json").read_text())["synthetic"] is True
        assert nib.load(folder / "syn.nii.gz").shape == (60, 60, 3)
    else:
        assert code == 130 and err == "ctsynth: interrupted; nothing was written\n", err
        assert _contents(folder) == OLD
    assert sorted(os.listdir(folder)) == sorted(OLD)
