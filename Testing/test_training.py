"""The trainer on tiny data: slice-cache preparation, a few training steps per conditioning, exact resume,
clear errors for user mistakes, and the loss-aware timestep sampler."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from CTSemanticSynthLib.checkpoint import load_model
from CTSemanticSynthLib.cli import main as ctsynth
from CTSemanticSynthLib.errors import InputError
from CTSemanticSynthLib.labels import BODY, NUM_CLASSES

from conftest import REPO, SAMPLE_CT, SAMPLE_SEG, single_thread
from gpu_like import DeviceTrace


from training import prepare, train  # noqa: E402
from training.ema import ema_rate, update_ema  # noqa: E402
from training.timestep_sampler import LossAwareSampler, UniformSampler, make_timestep_sampler  # noqa: E402

SLICES = 20  # axial slices per fake case (the sample's K axis is superior)


pytestmark = pytest.mark.usefixtures("one_thread")  # a background job shares these CPUs


def _fake_case(image: Path, label: Path, first_slice: int, *, label_rows: int | None = None) -> None:
    """A small CT/label pair cut from the sample: SLICES axial slices from ``first_slice``, every 2nd voxel
    in-plane (spacing doubled); ``label_rows`` crops the label so its grid no longer matches the CT."""
    for source, target, dtype in ((SAMPLE_CT, image, np.int16), (SAMPLE_SEG, label, np.uint8)):
        img = nib.load(source)
        data = np.asarray(img.dataobj)[::2, ::2, first_slice:first_slice + SLICES].astype(dtype)
        affine = img.affine.copy()
        affine[:3, 3] = affine[:3, :3] @ np.array([0, 0, first_slice]) + affine[:3, 3]
        affine[:3, :2] *= 2
        if target == label and label_rows is not None:
            data = data[:, :label_rows]
        target.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, affine), target)


def _amos_folder(root: Path) -> Path:
    """AMOS22 layout: 0001 (training), 0002 (validation), 0003 broken (training), 0600 MRI (training)."""
    def entry(case: str) -> dict:
        return {"image": f"./imagesTr/amos_{case}.nii.gz", "label": f"./labelsTr/amos_{case}.nii.gz"}

    for case, first, rows in (("0001", 80, None), ("0002", 90, None), ("0003", 80, 30), ("0600", 85, None)):
        _fake_case(root / "imagesTr" / f"amos_{case}.nii.gz", root / "labelsTr" / f"amos_{case}.nii.gz", first,
                   label_rows=rows)
    meta = {"name": "AMOS", "training": [entry("0001"), entry("0003"), entry("0600")],
            "validation": [entry("0002")]}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _manifest(cache: Path) -> list[dict]:
    with open(cache / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def _prepare(capsys, *argv) -> tuple[int, str]:
    code = prepare.main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def amos_cache(tmp_path_factory) -> Path:
    """A 32-px cache of the fake AMOS folder (shared by the training tests)."""
    root = tmp_path_factory.mktemp("amos")
    _amos_folder(root / "amos")
    with single_thread():  # prepare forks workers
        code = prepare.main(["--amos", str(root / "amos"), "--out", str(root / "cache"), "--size", "32",
                             "--workers", "1", "--convention", "totalseg"])
    assert code == 0
    return root / "cache"


# --- preparation ------------------------------------------------------------------------------------------


def test_prepare_amos_splits_arrays_and_skips(amos_cache):
    meta = json.loads((amos_cache / "cache.json").read_text())
    assert meta["image_size"] == 32 and meta["label_convention"] == "totalseg"
    assert meta["cases"] == 2 and meta["slices"] == 2 * SLICES
    assert list(meta["skipped"]) == ["amos_0003"] and "grid" in meta["skipped"]["amos_0003"]
    rows = _manifest(amos_cache)
    assert len(rows) == 2 * SLICES
    splits = {(r["case"], r["split"]) for r in rows}
    assert splits == {("amos_0001", "train"), ("amos_0002", "test")}  # training -> train, validation -> test
    assert sorted(int(r["slice"]) for r in rows if r["case"] == "amos_0001") == list(range(SLICES))
    assert {float(r["spacing_slice"]) for r in rows} == {3.0} and {float(r["spacing_row"]) for r in rows} == {6.0}
    assert sorted(p.name for p in (amos_cache / "cases").iterdir()) == ["amos_0001", "amos_0002"]  # no MRI, no temp
    for case in ("amos_0001", "amos_0002"):
        images = np.load(amos_cache / "cases" / case / "images.npy")
        classes = np.load(amos_cache / "cases" / case / "classes.npy")
        assert images.shape == classes.shape == (SLICES, 32, 32)
        assert images.dtype == np.float16 and classes.dtype == np.uint8
        assert 0.0 <= images.min() and images.max() <= 1.0 and images.std() > 0.05
        assert classes.max() < NUM_CLASSES and (classes == BODY).any()
        assert len(np.unique(classes)) > 5  # organs survived the resize
        assert images[classes == 0].mean() < images[classes == BODY].mean()  # air is darker than the body


def test_prepare_rerun_resumes(amos_cache, capsys):
    images = amos_cache / "cases" / "amos_0001" / "images.npy"
    before = images.stat().st_mtime_ns
    source = amos_cache.parent / "amos"
    code, err = _prepare(capsys, "--amos", source, "--out", amos_cache, "--size", 32, "--workers", 1,
                         "--convention", "totalseg")
    assert code == 0 and "skipped amos_0003" in err
    assert images.stat().st_mtime_ns == before  # not recomputed
    assert len(_manifest(amos_cache)) == 2 * SLICES
    assert list(json.loads((amos_cache / "cache.json").read_text())["skipped"]) == ["amos_0003"]


def test_prepare_rerun_with_other_size_is_refused(tmp_path, capsys):
    _fake_case(tmp_path / "images" / "case.nii.gz", tmp_path / "labels" / "case.nii.gz", 80)
    argv = ["--images", tmp_path / "images", "--labels", tmp_path / "labels", "--out", tmp_path / "cache",
            "--workers", 1, "--convention", "totalseg"]
    assert _prepare(capsys, *argv, "--size", 32)[0] == 0
    code, err = _prepare(capsys, *argv, "--size", 16)
    assert code == 2 and err.count("\n") == 1 and "image_size 32" in err, err
    assert json.loads((tmp_path / "cache" / "cache.json").read_text())["image_size"] == 32
    assert np.load(tmp_path / "cache" / "cases" / "case" / "images.npy").shape[1:] == (32, 32)


def test_prepare_off_a_terminal_prints_progress_lines_not_carriage_returns(tmp_path, capsys):
    for case in ("a", "b"):
        _fake_case(tmp_path / "images" / f"{case}.nii.gz", tmp_path / "labels" / f"{case}.nii.gz", 80)
    code, err = _prepare(capsys, "--images", tmp_path / "images", "--labels", tmp_path / "labels", "--out",
                         tmp_path / "cache", "--size", 16, "--workers", 1, "--convention", "totalseg")
    assert code == 0 and "\r" not in err
    progress = [line for line in err.splitlines() if line.startswith("prepare: preparing")]
    assert progress[0].startswith("prepare: preparing 50% (1/2 cases, ETA ")
    assert progress[1:] == ["prepare: preparing 100% (2/2 cases)"]


def test_prepare_paired_holdout_every_8(tmp_path, capsys):
    _fake_case(tmp_path / "images" / "case.nii.gz", tmp_path / "labels" / "case.nii.gz", 80)
    code, _ = _prepare(capsys, "--images", tmp_path / "images", "--labels", tmp_path / "labels", "--out",
                       tmp_path / "cache", "--size", 16, "--workers", 1, "--convention", "totalseg",
                       "--holdout-every", 8)
    assert code == 0
    rows = _manifest(tmp_path / "cache")
    assert len(rows) == SLICES
    test = [int(r["slice"]) for r in rows if r["split"] == "test"]
    assert len(test) == SLICES // 8 and np.all(np.diff(test) == 8)
    assert {r["split"] for r in rows} == {"train", "test"}


# --- training -----------------------------------------------------------------------------------------------

TINY = ["--model-channels", "8", "--channel-mult", "1,2", "--num-res-blocks", "1", "--attention-resolutions", "2",
        "--num-heads", "1", "--batch-size", "2", "--sample-steps", "2", "--threads", "1", "--device", "cpu",
        "--log-every", "1", "--checkpoint-every", "1"]


def _train(data: Path, out: Path, *extra) -> int:
    return train.main(["--data", str(data), "--out", str(out), *TINY, *[str(e) for e in extra]])


def _torchrun(data: Path, out: Path, *extra) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",  # a free port
         "-m", "training.train", "--data", str(data), "--out", str(out), *TINY, *[str(e) for e in extra]],
        capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300, cwd=REPO,
    )


def test_torchrun_two_cpu_processes_differ_and_resume_exactly(amos_cache, tmp_path):
    """DistributedDataParallel over gloo: one log and one checkpoint (rank 0), a loadable model, the batch split
    across ranks, ranks drawing different timesteps before and after a resume, loss statistics of both ranks, and
    a run stopped at step 2 and resumed equal to an uninterrupted one."""
    common = ["--sample-every", 0, "--timestep-sampler", "loss-aware", "--dropout", 0.1]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    for out, argv in ((whole, [4]), (parts, [2]), (parts, [4, "--resume"])):
        result = _torchrun(amos_cache, out, *common, "--iterations", *argv)
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stderr.count("train: exported") == 1
    rows = list(csv.reader((whole / "log.csv").read_text().splitlines()))
    assert rows[0][0] == "step" and [r[0] for r in rows[1:]] == ["1", "2", "3", "4"]
    card = load_model(whole / "model").config["training"]
    assert card["hardware"].endswith("x2") and card["batch_size"] == 2 and card["batch_per_rank"] == 1
    run = json.loads((whole / "config.json").read_text())["run"]
    assert run["world_size"] == 2 and run["batch_per_rank"] == 1

    a, b = _weights(whole), _weights(parts)
    for key in ("model", "ema"):
        different = [name for name in a[key] if not torch.equal(a[key][name], b[key][name])]
        assert not different, f"{key}: {different[:3]}"
    for key, value in a["timesteps"].items():
        assert torch.equal(value, b["timesteps"][key]), key
    # 4 steps x 2 ranks x 1 slice, all gathered by every rank, not yet folded into the history
    t = a["timesteps"]["pending_t"].reshape(4, 2)  # [step, rank]
    assert (t[:2, 0] != t[:2, 1]).any() and (t[2:, 0] != t[2:, 1]).any()  # ranks differ before and after resume


def test_batch_size_is_global_and_split_across_ranks():
    assert train.rank_batch_size(16, 4) == 4 and train.rank_batch_size(16, 1) == 16
    with pytest.raises(InputError, match="--batch-size 6 is the global batch .* 4 processes"):
        train.rank_batch_size(6, 4)


def test_ranks_and_steps_draw_different_slices_and_repeat_exactly():
    draws = {(rank, step): train.draw_indices(1000, 8, 0, rank, step) for rank in range(2) for step in range(3)}
    assert all(torch.equal(v, train.draw_indices(1000, 8, 0, *k)) for k, v in draws.items())  # resumable
    values = [tuple(v.tolist()) for v in draws.values()]
    assert len(set(values)) == len(values)
    assert not torch.equal(train.draw_indices(1000, 8, 1, 0, 0), draws[0, 0])  # the seed matters


def test_auto_precision_uses_native_bf16_only(monkeypatch):
    native = {"value": False}

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return including_emulation or native["value"]

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    cuda = torch.device("cuda")
    assert train.resolve_precision("auto", cuda) == "fp16"  # emulated bf16: fp16 with a grad scaler
    native["value"] = True
    assert train.resolve_precision("auto", cuda) == "bf16"
    assert train.resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert train.resolve_precision("fp16", torch.device("cpu")) == "fp16"


@pytest.mark.parametrize("flags, needle", [
    (["--precision", "bf16"], "pass --precision fp32"),
    (["--batch-size", "4"], "batch_size"),
])
def test_error_resume_with_other_precision_or_batch(amos_cache, tmp_path, capsys, flags, needle):
    assert _train(amos_cache, tmp_path / "run", "--iterations", 1, "--sample-every", 0, "--precision", "fp32") == 0
    capsys.readouterr()
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    code = _train(amos_cache, tmp_path / "run", "--iterations", 2, "--sample-every", 0, "--resume",
                  "--precision", "fp32", *flags)
    _one_line_error(capsys, code, "--resume", needle)
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before


def test_training_off_a_terminal_prints_a_line_every_few_percent(amos_cache, tmp_path, capsys):
    code = _train(amos_cache, tmp_path / "run", "--iterations", 40, "--sample-every", 0, "--checkpoint-every", 40)
    err = capsys.readouterr().err
    assert code == 0 and "\r" not in err and len(err.splitlines()) <= 22, err[-2000:]
    progress = [line for line in err.splitlines() if line.startswith("train: training ")]
    assert [line.split()[2] for line in progress] == [f"{p}%" for p in range(0, 101, 5)]
    assert progress[-1].startswith("train: training 100% (40/40 steps, loss ")


def test_fp16_checkpoint_from_a_cpu_resumes_on_a_gpu(amos_cache, tmp_path, monkeypatch):
    """fp16 on the CPU keeps a real gradient-scaler state, which an fp16 run on CUDA can load (an empty one, from a
    scaler disabled for lack of CUDA, made ``GradScaler.load_state_dict`` raise there). The CUDA scaler is built
    with ``torch.cuda.is_available`` answering True; it is only loaded, never run."""
    out = tmp_path / "run"
    assert _train(amos_cache, out, "--iterations", 2, "--sample-every", 0, "--precision", "fp16") == 0
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["scaler"]["scale"] > 0 and state["precision"] == "fp16"
    assert _train(amos_cache, out, "--iterations", 3, "--sample-every", 0, "--precision", "fp16", "--resume") == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    on_gpu = torch.amp.GradScaler("cuda")
    assert on_gpu.is_enabled()
    on_gpu.load_state_dict(state["scaler"])
    assert on_gpu.state_dict()["scale"] == state["scaler"]["scale"]
    monkeypatch.undo()
    torch.save({**state, "scaler": {}}, out / "checkpoint.pt")  # as older CPU fp16 runs saved it
    assert _train(amos_cache, out, "--iterations", 3, "--sample-every", 0, "--precision", "fp16", "--resume") == 0


@pytest.mark.parametrize("conditioning", ["concat", "mask_encoder", "edge"])
def test_train_few_steps_exports_a_usable_model(amos_cache, tmp_path, capsys, conditioning):
    out = tmp_path / "run"
    assert _train(amos_cache, out, "--conditioning", conditioning, "--iterations", 3, "--sample-every", 3) == 0
    with open(out / "log.csv", newline="") as f:
        log = list(csv.DictReader(f))
    assert [int(r["step"]) for r in log] == [1, 2, 3] and all(np.isfinite(float(r["loss"])) for r in log)
    assert [p.name for p in (out / "samples").glob("*.png")] == ["step_0000003.png"]
    assert json.loads((out / "config.json").read_text())["conditioning"] == conditioning
    loaded = load_model(out / "model")
    assert loaded.conditioning == conditioning and loaded.image_size == 32
    assert loaded.config["training"]["iterations"] == 3 and len(loaded.config["class_means"]) == NUM_CLASSES

    seg = amos_cache.parent / "amos" / "labelsTr" / "amos_0001.nii.gz"
    syn = tmp_path / "syn.nii.gz"
    capsys.readouterr()
    code = ctsynth(["synth", "--seg", str(seg), "--out", str(syn), "--model", str(out / "model"), "--steps", "2",
                    "--labels", "totalseg", "--device", "cpu", "--batch-size", "32", "-q"])
    assert code == 0, capsys.readouterr().err
    result = nib.load(syn)
    assert result.shape == nib.load(seg).shape
    np.testing.assert_allclose(result.affine, nib.load(seg).affine, atol=1e-5)


@pytest.mark.parametrize("start", [0, 300])
def test_exported_presets_carry_slice_agreement_and_boundary_correction(amos_cache, tmp_path, start):
    out = tmp_path / "run"
    assert _train(amos_cache, out, "--iterations", 1, "--sample-every", 0, "--sample-start-timestep", start,
                  "--max-timestep", 400, "--sample-slice-agreement", 0.3, "--boundary-correction", "true") == 0
    presets = load_model(out / "model").config["sampling_presets"]
    assert set(presets) == {"fast", "balanced", "paper"} and all(p["boundary_correction"] for p in presets.values())
    assert presets["fast"]["slice_agreement"] == 0.3 and "slice_agreement" not in presets["balanced"]
    assert all(p.get("start_timestep") == (start or None) for p in presets.values())
    assert _train(amos_cache, tmp_path / "plain", "--iterations", 1, "--sample-every", 0) == 0
    assert "sampling_presets" not in load_model(tmp_path / "plain" / "model").config


def _weights(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)


@pytest.mark.parametrize("extra", [
    ["--dropout", "0.1"],
    ["--dropout", "0.1", "--timestep-sampler", "loss-aware", "--conditioning", "mask_encoder"],
], ids=["uniform", "loss-aware"])
def test_resume_is_exact(amos_cache, tmp_path, extra):
    common = [*extra, "--sample-every", 3, "--checkpoint-every", 3]
    assert _train(amos_cache, tmp_path / "a", *common, "--iterations", 6) == 0
    assert _train(amos_cache, tmp_path / "b", *common, "--iterations", 3) == 0
    assert _train(amos_cache, tmp_path / "b", *common, "--iterations", 6, "--resume") == 0
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a["step"] == b["step"] == 6
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        different = [name for name in a[key] if not torch.equal(a[key][name], b[key][name])]
        assert not different, f"{key}: {different[:3]}"
    for key in ("losses", "counts"):
        if key in a["timesteps"]:
            assert torch.equal(a["timesteps"][key], b["timesteps"][key])
    with open(tmp_path / "b" / "log.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4, 5, 6]


# --- clear errors ---------------------------------------------------------------------------------------------


def _one_line_error(capsys, code: int, *needles: str) -> None:
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("flags, needle", [
    (["--batch-size", "0"], "--batch-size 0"),
    (["--iterations", "-5"], "--iterations -5"),
    (["--checkpoint-every", "0"], "--checkpoint-every 0"),
    (["--log-every", "0"], "--log-every 0"),
    (["--sample-steps", "0"], "--sample-steps 0"),
    (["--lr", "0"], "--lr 0"),
    (["--ema-rate", "1.5"], "--ema-rate 1.5"),
    (["--model-channels", "0"], "model_channels"),
    (["--channel-mult", ""], "--channel-mult"),
    (["--channel-mult", "1,x"], "--channel-mult"),
    (["--num-timesteps", "0"], "diffusion options"),
    (["--precision", "fp8"], "--precision 'fp8'"),
    (["--conditioning", "spade"], "conditioning"),
    (["--timestep-sampler", "magic"], "--timestep-sampler 'magic'"),
    (["--prediction", "noise"], "prediction"),
    (["--loss", "l1"], "loss"),
    (["--schedule", "wobbly"], "wobbly"),
    (["--compile", "maybe"], "--compile"),
    (["--device", "meta"], "device 'meta'"),
    (["--batch-size", "two"], "--batch-size"),
    (["--seed", str(2**64)], f"--seed {2**64}"),
    (["--seed", "-1"], "--seed -1"),
])
def test_error_bad_training_flag_is_one_line_and_makes_no_folder(amos_cache, tmp_path, capsys, flags, needle):
    _one_line_error(capsys, _train(amos_cache, tmp_path / "run", *flags), needle)
    assert not (tmp_path / "run").exists()


def test_every_network_and_diffusion_setting_is_a_flag():
    from CTSemanticSynthLib.diffusion import diffusion_defaults
    from CTSemanticSynthLib.models import model_defaults

    options = set(train.train_defaults())
    assert set(model_defaults()) - set(train.MODEL_FIXED) <= options
    assert set(diffusion_defaults()) - set(train.DIFFUSION_FIXED) <= options
    assert {"use_scale_shift_norm", "num_timesteps", "vlb_weight"} <= options  # not in the old hand-copied list


def test_mse_loss_trains_a_fixed_variance_model(amos_cache, tmp_path):
    """'mse' cannot train a learned variance: the network gets one output channel and the diffusion learn_sigma
    false (with the old hand-copied flags this combination could not be expressed)."""
    out = tmp_path / "run"
    assert _train(amos_cache, out, "--loss", "mse", "--iterations", 2, "--sample-every", 0) == 0
    loaded = load_model(out / "model")
    assert loaded.config["diffusion"]["loss"] == "mse" and loaded.config["diffusion"]["learn_sigma"] is False
    assert loaded.config["model"]["out_channels"] == 1


@pytest.mark.parametrize("flags, needle", [
    (["--size", "0"], "--size 0"),
    (["--workers", "0"], "--workers 0"),
    (["--holdout-every", "-1"], "--holdout-every -1"),
    (["--convention", "nnunet"], "nnunet"),
    (["--split", "val"], "--split 'val'"),
    (["--size", "big"], "--size"),
])
def test_error_bad_prepare_flag_is_one_line_and_makes_no_folder(tmp_path, capsys, flags, needle):
    _amos_folder(tmp_path / "amos")
    code = prepare.main(["--amos", str(tmp_path / "amos"), "--out", str(tmp_path / "cache"), *flags])
    _one_line_error(capsys, code, needle)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("out", ["file", "file/cache"])
def test_error_prepare_out_under_a_file_is_one_line(tmp_path, capsys, out):
    _amos_folder(tmp_path / "amos")
    (tmp_path / "file").write_text("a user's file")
    code = prepare.main(["--amos", str(tmp_path / "amos"), "--out", str(tmp_path / out), "--workers", "1"])
    _one_line_error(capsys, code, f"--out {tmp_path / out}: {tmp_path / 'file'} is a file; give a folder")
    assert (tmp_path / "file").read_text() == "a user's file"


def test_error_prepare_out_that_cannot_be_made_is_one_line(tmp_path, capsys, monkeypatch):
    _amos_folder(tmp_path / "amos")

    def refused(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refused)  # as in a read-only folder (root may write anywhere)
    code = prepare.main(["--amos", str(tmp_path / "amos"), "--out", str(tmp_path / "cache"), "--workers", "1"])
    _one_line_error(capsys, code, f"cannot create the slice cache {tmp_path / 'cache'}: Permission denied")


def test_prepare_fails_when_every_case_is_skipped(tmp_path, capsys):
    _fake_case(tmp_path / "images" / "a.nii.gz", tmp_path / "labels" / "a.nii.gz", 80, label_rows=30)
    code = prepare.main(["--images", str(tmp_path / "images"), "--labels", str(tmp_path / "labels"), "--out",
                         str(tmp_path / "cache"), "--size", "32", "--workers", "1", "--convention", "totalseg"])
    err = capsys.readouterr().err
    assert code == 2 and "skipped a" in err and "all 1 cases were skipped" in err


def test_prepare_skips_a_label_map_given_as_the_ct(tmp_path, capsys):
    _fake_case(tmp_path / "images" / "a.nii.gz", tmp_path / "labels" / "a.nii.gz", 80)
    (tmp_path / "images" / "a.nii.gz").write_bytes((tmp_path / "labels" / "a.nii.gz").read_bytes())
    code = prepare.main(["--images", str(tmp_path / "images"), "--labels", str(tmp_path / "labels"), "--out",
                         str(tmp_path / "cache"), "--size", "32", "--workers", "1", "--convention", "totalseg"])
    err = capsys.readouterr().err
    assert code == 2 and "all 1 cases were skipped" in err
    assert f"skipped a: CT {tmp_path / 'images' / 'a.nii.gz'} looks like a label map, not a CT" in err


def test_error_data_without_cache_json(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    _one_line_error(capsys, _train(tmp_path / "data", tmp_path / "run", "--iterations", 1), "cache.json",
                    "training.prepare")
    assert not (tmp_path / "run").exists()


def test_error_amos_without_dataset_json(tmp_path, capsys):
    (tmp_path / "amos").mkdir()
    code = prepare.main(["--amos", str(tmp_path / "amos"), "--out", str(tmp_path / "cache"), "--workers", "1"])
    _one_line_error(capsys, code, "dataset.json")


def test_error_resume_without_checkpoint(amos_cache, tmp_path, capsys):
    _one_line_error(capsys, _train(amos_cache, tmp_path / "run", "--iterations", 1, "--resume"), "checkpoint.pt",
                    "nothing to resume")


def test_error_new_run_into_existing_run(amos_cache, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"precious")
    _one_line_error(capsys, _train(amos_cache, tmp_path / "run", "--iterations", 1), "--resume")
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == b"precious"
    assert not (tmp_path / "run" / "log.csv").exists()


def test_error_unknown_yaml_key(amos_cache, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"data: {amos_cache}\nout: {tmp_path / 'run'}\nlearning_rate: 0.1\n")
    _one_line_error(capsys, train.main(["--config", str(config)]), "learning_rate", str(config))


@pytest.mark.parametrize("text", [None, "data: [unclosed\n", "42\n"], ids=["missing", "syntax", "not-a-mapping"])
def test_error_bad_yaml_file(tmp_path, capsys, text):
    config = tmp_path / "run.yaml"
    if text is not None:
        config.write_text(text)
    _one_line_error(capsys, train.main(["--config", str(config)]), str(config))


def test_yaml_scientific_notation_lr(amos_cache, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"data: {amos_cache}\nout: {tmp_path / 'run'}\nlr: 1e-4\n")
    code = train.main(["--config", str(config), *TINY, "--iterations", "1", "--sample-every", "0"])
    assert code == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["lr"] == pytest.approx(1e-4)


# --- timestep samplers ----------------------------------------------------------------------------------------


def test_uniform_sampler_weights_are_one():
    sampler = make_timestep_sampler("uniform", 50)
    t, w = sampler.sample(1000, torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() < 50 and torch.equal(w, torch.ones(1000))
    with pytest.raises(ValueError, match="loss-aware"):
        make_timestep_sampler("importance", 50)


def _warm(sampler: LossAwareSampler, loss_of_t: torch.Tensor) -> None:
    steps = torch.arange(sampler.num_timesteps)
    for _ in range(sampler.losses.shape[1]):
        sampler.update(steps, loss_of_t)


def test_loss_aware_sampler_is_uniform_until_warm_then_prefers_high_loss():
    T = 20
    loss_of_t = torch.linspace(0.1, 2.0, T)
    sampler = LossAwareSampler(T, history=4)
    assert isinstance(sampler, UniformSampler)
    steps = torch.arange(T)
    for _ in range(3):  # three full histories: still warming up
        sampler.update(steps, loss_of_t)
        assert torch.equal(sampler.probabilities(), torch.full((T,), 1 / T, dtype=torch.float64))
    sampler.update(steps[:-1], loss_of_t[:-1])  # one timestep is one loss short
    assert torch.equal(sampler.probabilities(), torch.full((T,), 1 / T, dtype=torch.float64))
    sampler.update(steps[-1:], loss_of_t[-1:])
    p = sampler.probabilities()
    assert p.sum().item() == pytest.approx(1.0) and (p > 0).all()
    assert (p.diff() > 0).all()  # monotone in the loss
    expected = loss_of_t.double() / loss_of_t.sum() * (1 - sampler.uniform_prob) + sampler.uniform_prob / T
    assert torch.allclose(p, expected)  # sqrt(E[loss^2]) per t, mixed with a little uniform
    t, _ = sampler.sample(4000, torch.Generator().manual_seed(0))
    assert (t >= T // 2).float().mean() > 0.7  # high-loss half drawn far more often than half the time
    state = sampler.state_dict()
    other = LossAwareSampler(T, history=4)
    other.load_state_dict(state)
    assert torch.equal(other.probabilities(), p)
    # the history is a rolling window: new losses replace the oldest ones
    for _ in range(4):
        sampler.update(steps, loss_of_t.flip(0))
    assert (sampler.probabilities().diff() < 0).all()


def test_loss_aware_importance_weights_are_unbiased():
    T = 20
    generator = torch.Generator().manual_seed(1234)
    loss_of_t = torch.rand(T, generator=generator, dtype=torch.float64) ** 3 * 5  # skewed losses
    sampler = LossAwareSampler(T, history=3)
    _warm(sampler, loss_of_t)
    p = sampler.probabilities()
    assert p.max() / p.min() > 10  # far from uniform
    t, w = sampler.sample(200_000, generator)
    assert torch.allclose(w.double() * p[t] * T, torch.ones(len(t), dtype=torch.float64), rtol=1e-5)
    estimate = (w.double() * loss_of_t[t]).mean()
    # measured |relative error| ~1e-3 with this seed; 1% allows for other generators' streams
    assert estimate.item() == pytest.approx(loss_of_t.mean().item(), rel=0.01)
    naive = loss_of_t[t].mean()  # without the weights the estimate is biased toward high losses
    assert naive > 1.5 * loss_of_t.mean()


def test_loss_aware_sampler_ignores_non_finite_losses():
    T = 10
    loss_of_t = torch.linspace(0.1, 1.0, T)
    clean, dirty = LossAwareSampler(T, history=2), LossAwareSampler(T, history=2)
    _warm(clean, loss_of_t)
    _warm(dirty, loss_of_t)
    dirty.update(torch.tensor([3, 4, 5]), torch.tensor([float("nan"), float("inf"), -float("inf")]))
    p = dirty.probabilities()
    assert torch.isfinite(p).all() and torch.equal(p, clean.probabilities())


def test_loss_aware_sampler_reads_losses_back_once_per_fold():
    """Per-step updates leave the losses on their device (here 'meta', which cannot be read back at all):
    only every ``fold_every``-th update copies them to the host."""
    sampler = LossAwareSampler(10, history=2, fold_every=3)
    t, losses = torch.zeros(4, dtype=torch.long, device="meta"), torch.zeros(4, device="meta")
    for _ in range(2):
        sampler.update(t, losses)
        sampler.sample(4, torch.Generator().manual_seed(0))  # sampling does not wait for pending losses
    with pytest.raises(NotImplementedError):
        sampler.update(t, losses)


def test_loss_aware_state_keeps_pending_losses():
    sampler = LossAwareSampler(10, history=2, fold_every=4)
    for step in range(6):
        sampler.update(torch.tensor([step, 9 - step]), torch.tensor([1.0 + step, 2.0]))
    other = LossAwareSampler(10, history=2, fold_every=4)
    other.load_state_dict(sampler.state_dict())
    for s in (sampler, other):
        s.update(torch.tensor([0, 1]), torch.tensor([5.0, 6.0]))
        s.update(torch.tensor([2, 3]), torch.tensor([7.0, 8.0]))  # the second fold, at the same update
    assert torch.equal(other.losses, sampler.losses) and torch.equal(other.counts, sampler.counts)
    assert int(sampler.counts.sum()) == 16



def test_restored_pending_losses_join_the_device_of_the_next_update():
    """A checkpoint is read on the CPU (``map_location='cpu'``) and the run goes on on a GPU ('meta' stands in for
    it): the pending (t, loss) pairs it restores must be folded together with the GPU's, not crash the fold. Meta
    has no data, so the fold's read-back itself is what fails once everything is on one device."""
    saved = LossAwareSampler(10, history=2, fold_every=3)
    saved.update(torch.tensor([1, 2]), torch.tensor([1.0, 2.0]))
    resumed = LossAwareSampler(10, history=2, fold_every=3)
    resumed.load_state_dict(saved.state_dict())
    t, losses = torch.zeros(2, dtype=torch.long, device="meta"), torch.zeros(2, device="meta")
    resumed.update(t, losses)
    with pytest.raises(NotImplementedError, match="meta"):
        resumed.update(t, losses)


def test_drawing_timesteps_never_waits_for_the_gpu():
    """One timestep per rank (a global batch split over many GPUs) must not take torch's one-sample multinomial,
    which checks the distribution on the host (a CUDA sync every step); the draws still follow p(t)."""
    loss_aware = LossAwareSampler(20, history=2)
    _warm(loss_aware, torch.linspace(0.1, 2.0, 20))
    assert loss_aware.probabilities()[10:].sum() > 0.7  # folded: far from uniform
    generator = torch.Generator().manual_seed(0)
    for sampler in (UniformSampler(20), loss_aware):
        sampler.sample(1, generator)  # p(t) from the host-side history, copied to the device once per fold
        for batch in (1, 3):
            with DeviceTrace() as trace:
                t, w = sampler.sample(batch, generator)
            assert trace.syncs == [] and t.shape == w.shape == (batch,) and 0 <= t.min() <= t.max() < 20
    draws = torch.cat([loss_aware.sample(1, generator)[0] for _ in range(2000)])
    assert (draws >= 10).float().mean() > 0.65  # the high-loss half, as p(t) says (~0.74)

# --- EMA ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [0.05, 0.9999], ids=["constant-rate", "warm-up"])
def test_ema_after_n_steps_is_the_closed_form(target):
    """e_N = prod(r) e_0 + sum_s (1 - r_s) prod_{j>s} r_j p_{s+1}, with r_s = min(target, (1 + s) / (10 + s))."""
    model = torch.nn.BatchNorm1d(3)  # parameters and a buffer (running_mean)
    ema = torch.nn.BatchNorm1d(3).requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ema.weight.copy_(torch.randn(3, generator=generator))
    e0 = ema.weight.double().clone()
    history = []
    for step in range(25):
        with torch.no_grad():
            model.weight.copy_(torch.randn(3, generator=generator))
            model.running_mean.copy_(torch.randn(3, generator=generator))
        history.append(model.weight.detach().double().clone())
        update_ema(ema, model, ema_rate(step, target))
    rates = np.array([min(target, (1 + s) / (10 + s)) for s in range(25)])
    after = [np.prod(rates[s + 1:]) for s in range(25)]
    expected = np.prod(rates) * e0.numpy() + sum((1 - rates[s]) * after[s] * history[s].numpy() for s in range(25))
    np.testing.assert_allclose(ema.weight.double().numpy(), expected, rtol=1e-6)
    assert not np.allclose(expected, history[-1].numpy(), atol=1e-3)  # not a copy of the last weights
    assert torch.equal(ema.running_mean, model.running_mean)  # buffers are copied


def test_ema_rate_warms_up_to_its_target():
    assert ema_rate(0, 0.9999) == pytest.approx(0.1)
    assert ema_rate(90, 0.9999) == pytest.approx(91 / 100)
    assert ema_rate(10**6, 0.9999) == 0.9999
