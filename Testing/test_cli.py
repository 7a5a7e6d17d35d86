"""End-to-end `ctsynth` runs on the bundled sample with a tiny model, and every bad input it must refuse."""

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from CTSemanticSynthLib.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from CTSemanticSynthLib.cli import main
from CTSemanticSynthLib.io import read_metadata
from CTSemanticSynthLib.provenance import sidecar_path

from conftest import SAMPLE_CT, SAMPLE_SEG, make_model_folder
from test_io import one_bit_nifti


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def synth(capsys, model: Path, out: Path, *extra, seg: Path = SAMPLE_SEG) -> tuple[int, str]:
    return run(capsys, "synth", "--seg", seg, "--out", out, "--model", model, "--steps", 2, "--batch-size", 64,
               "--labels", "totalseg", "--device", "cpu", "-q", *extra)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_model):
    out = tmp_path_factory.mktemp("cli") / "syn.nii.gz"
    code = main(["synth", "--seg", str(SAMPLE_SEG), "--out", str(out), "--model", str(tiny_model), "--steps", "2",
                 "--batch-size", "64", "--seed", "11", "--device", "cpu", "-q", "--preview",
                 str(out.with_name("syn.png"))])
    return code, out


def test_synth_keeps_geometry_and_writes_provenance(first_run, tiny_model):
    code, out = first_run
    assert code == 0
    seg, syn = nib.load(SAMPLE_SEG), nib.load(out)
    assert syn.shape == seg.shape
    np.testing.assert_allclose(syn.affine, seg.affine, atol=1e-5)
    data = np.asarray(syn.dataobj)
    assert data.dtype == np.int16 and data.min() >= -1000 and data.max() <= 240
    assert (data[np.asarray(seg.dataobj) == 5] >= -160).all()  # liver voxels are inside the window
    descrip = nib.load(out).header["descrip"].tobytes().decode().rstrip("\x00")
    assert descrip.startswith("SYNTHETIC CT") and "seed11" in descrip
    sidecar = json.loads(sidecar_path(out).read_text())
    model_sha = json.loads((tiny_model / CONFIG_NAME).read_text())["sha256"]
    assert sidecar["model_sha256"] == model_sha and sidecar["synthetic"] is True
    assert sidecar["options"]["seed"] == 11 and sidecar["inputs"]["labels"] == "totalseg"  # auto-detected
    assert out.with_name("syn.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_seed_same_volume_and_nrrd_output(capsys, first_run, tiny_model, tmp_path):
    _, first = first_run
    code, _ = synth(capsys, tiny_model, tmp_path / "again.nrrd", "--seed", 11)
    assert code == 0
    again = read_metadata(tmp_path / "again.nrrd")
    assert again["ctsynth_synthetic"] == "true" and again["ctsynth_model_sha256"]
    import SimpleITK as sitk

    a = sitk.GetArrayFromImage(sitk.ReadImage(str(first)))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "again.nrrd")))
    assert np.array_equal(a, b)


def test_existing_output_is_kept_without_overwrite(capsys, tiny_model, tmp_path):
    out = tmp_path / "syn.nii.gz"
    out.write_bytes(b"precious")
    code, err = synth(capsys, tiny_model, out)
    assert code == 2 and "exists" in err and "--overwrite" in err and err.count("\n") == 1
    assert out.read_bytes() == b"precious"
    code, _ = synth(capsys, tiny_model, out, "--overwrite")
    assert code == 0 and nib.load(out).shape == nib.load(SAMPLE_SEG).shape


def _four_d(tmp_path: Path) -> Path:
    path = tmp_path / "four_d.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4, 2), np.uint8), np.eye(4)), path)
    return path


def _float_ct(tmp_path: Path) -> Path:
    path = tmp_path / "float_ct.nii.gz"
    ct = nib.load(SAMPLE_CT)
    nib.save(nib.Nifti1Image(np.asarray(ct.dataobj, np.float32) * 0.73 + 0.5, ct.affine), path)
    return path


def _empty(tmp_path: Path) -> Path:
    path = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)), path)
    return path


def _unknown(tmp_path: Path) -> Path:
    path = tmp_path / "unknown.nii.gz"
    nib.save(nib.Nifti1Image(np.full((8, 8, 8), 250, np.uint8), np.eye(4)), path)
    return path


@pytest.mark.parametrize("make_seg, message", [
    (lambda tmp: tmp / "missing.nii.gz", "does not exist"),
    (lambda tmp: SAMPLE_CT, "is this a CT rather than a segmentation?"),
    (_float_ct, "intensity image"),
    (_empty, "empty"),
    (_four_d, "4-D"),
    (_unknown, "label convention knows none of the label values (250): no organ the model knows"),
    (lambda tmp: one_bit_nifti(tmp, "bits.nii"), "its NIfTI header is not supported (data code 1 not supported)"),
])
def test_bad_segmentations_give_one_line(capsys, caplog, tiny_model, tmp_path, make_seg, message):
    out = tmp_path / "syn.nii.gz"
    code, err = synth(capsys, tiny_model, out, seg=make_seg(tmp_path))
    assert code == 2
    assert err.startswith("ctsynth: error:") and message in err and err.count("\n") == 1
    # pytest takes the log records off stderr; ctsynth prints each as one more line (nibabel's header ERROR, twice)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert "Traceback" not in err
    assert list(tmp_path.glob("syn*")) == [] and list(tmp_path.glob(".ctsynth-*")) == []


def test_mismatched_checkpoint_is_refused(capsys, tmp_path):
    a = make_model_folder(tmp_path / "a", "concat")
    b = make_model_folder(tmp_path / "b", "edge")
    shutil.copy(b / WEIGHTS_NAME, a / WEIGHTS_NAME)
    config = json.loads((a / CONFIG_NAME).read_text())
    config["sha256"] = json.loads((b / CONFIG_NAME).read_text())["sha256"]
    (a / CONFIG_NAME).write_text(json.dumps(config))
    code, err = synth(capsys, a, tmp_path / "syn.nii.gz")
    assert code == 2 and "do not match its config.json" in err
    assert not (tmp_path / "syn.nii.gz").exists()


def test_bad_options(capsys, tiny_model, tmp_path):
    code, err = synth(capsys, tiny_model, tmp_path / "syn.png")
    assert code == 2 and "use one of" in err
    code, err = synth(capsys, tiny_model, tmp_path / "nofolder" / "syn.nii.gz")
    assert code == 2 and "does not exist" in err
    code, err = run(capsys, "synth", "--seg", SAMPLE_SEG, "--out", tmp_path / "s.nii.gz", "--model", tiny_model,
                    "--labels", "weird")
    assert code == 2 and "unknown label convention" in err


def test_unknown_labels_are_reported(capsys, tiny_model, tmp_path):
    seg = nib.load(SAMPLE_SEG)
    data = np.asarray(seg.dataobj).copy()
    data[data == 25] = 200  # sacrum -> a value TotalSegmentator v2 does not have
    path = tmp_path / "odd.nii.gz"
    nib.save(nib.Nifti1Image(data, seg.affine), path)
    code, err = synth(capsys, tiny_model, tmp_path / "syn.nii.gz", seg=path)
    assert code == 0
    assert "200 (" in err and "treated as body" in err and err.count("200 (") == 1


def test_progress_lines_for_slicer(capsys, tiny_model, tmp_path):
    code = main(["synth", "--seg", str(SAMPLE_SEG), "--out", str(tmp_path / "s.nii.gz"), "--model", str(tiny_model),
                 "--steps", "2", "--batch-size", "64", "--device", "cpu", "--progress-lines"])
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert code == 0 and lines and all(parts[0] == "PROGRESS" for parts in lines)
    done = [float(parts[1]) for parts in lines]
    assert done == sorted(done) and done[-1] == pytest.approx(float(lines[-1][2]))


def test_info_and_classes(capsys, tiny_model):
    code = main(["info", str(tiny_model)])
    out = capsys.readouterr().out
    assert code == 0 and "sha256:" in out and "concat" in out and "prostate_uterus" in out
    assert "network:      U-Net" in out and "presets:      fast: ddim 25 steps; balanced: ddim 100 steps" in out
    assert main(["info", str(tiny_model), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["conditioning"] == "concat"
    assert main(["classes"]) == 0 and "16  body" in capsys.readouterr().out


def test_console_script_help():
    exe = Path(sys.executable).with_name("ctsynth")
    result = subprocess.run([str(exe), "synth", "--help"], capture_output=True, text=True, encoding="utf-8", timeout=60)
    assert result.returncode == 0 and "--seg SEG" in result.stdout and "examples:" in result.stdout
    result = subprocess.run([str(exe), "synth"], capture_output=True, text=True, encoding="utf-8", timeout=60)
    assert result.returncode == 2 and "--seg" in result.stderr
