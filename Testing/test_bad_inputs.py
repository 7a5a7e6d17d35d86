"""Every user mistake is one ``ctsynth: error:`` line, exit 2, no traceback and no output file.

A table of bad options, model folders and label files run in-process through ``cli.main`` on a small crop of the
bundled sample; grids that differ from the segmentation's (reordered, resampled or refused); progress and closed
streams (subprocesses, where the stream really has to be closed).
"""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from CTSemanticSynthLib.checkpoint import CONFIG_NAME, load_model, save_model
from CTSemanticSynthLib.cli import main
from CTSemanticSynthLib.device import select_device
from CTSemanticSynthLib.errors import InputError
from CTSemanticSynthLib.io import Volume
from CTSemanticSynthLib.progress import ProgressDisplay

from conftest import REPO, SAMPLE_CT, SAMPLE_SEG, make_model_folder
from test_grid import flipped_permuted

CROP = (slice(20, 110), slice(10, 90), slice(88, 94))
"""Six axial slices through liver, kidneys and spleen: a few seconds to synthesize with the tiny model."""


def _save(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def _cropped(source: Path, dtype) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(source)
    affine = img.affine.copy()
    affine[:3, 3] += affine[:3, :3] @ np.array([s.start for s in CROP])
    return np.asarray(img.dataobj)[CROP].astype(dtype), affine


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict[str, Path]:
    """A cropped segmentation (TotalSegmentator ids), its CT, and variants of both."""
    root = tmp_path_factory.mktemp("case")
    seg, affine = _cropped(SAMPLE_SEG, np.uint8)
    ct, _ = _cropped(SAMPLE_CT, np.int16)
    files = {"seg": _save(root / "seg.nii.gz", seg, affine), "ct": _save(root / "ct.nii.gz", ct, affine)}
    files["ct_uint16"] = _save(root / "ct_uint16.nii.gz", (ct.astype(np.int32) + 1024).clip(0).astype(np.uint16), affine)
    files["ct_int16"] = _save(root / "ct_int16.nii.gz", ct, affine)
    amos = np.select([seg == 5, seg == 1, seg == 6], [6, 1, 7], 0).astype(np.uint8)  # liver, spleen, stomach in AMOS ids
    files["amos"] = _save(root / "amos.nii.gz", amos, affine)
    huge = seg.astype(np.int32)
    huge[seg == 20] = np.iinfo(np.int32).max  # a TotalSegmentator structure becomes an unknown id
    files["huge"] = _save(root / "huge.nii.gz", huge, affine)
    return files


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error(code: int, err: str, needle: str, folder: Path) -> None:
    """Exit 2, exactly one line ``ctsynth: error: ...`` holding ``needle``, and nothing written to ``folder``."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ctsynth: error: "), err
    assert needle in lines[0], err
    assert "Traceback" not in err
    assert [p.name for p in folder.iterdir() if p.name.startswith(("syn", ".ctsynth-"))] == []


def synth_args(case: dict[str, Path], model_folder: Path, out: Path, **options) -> list:
    """``ctsynth synth`` arguments; ``options`` (underscores for dashes) replace or add flags, None drops one."""
    flags = {"seg": case["seg"], "out": out, "model": model_folder, "steps": 2, "device": "cpu", "labels": "totalseg",
             **options}
    args = ["synth", "-q"]
    for key, value in flags.items():
        if value is not None:
            args += [f"--{key.replace('_', '-')}", value]
    return args


# --- options: refused before any volume or weight is read ---------------------------------------------------

BAD_OPTIONS = [
    ({"steps": 0}, "--steps 0"),
    ({"steps": -3}, "--steps -3"),
    ({"steps": 5000}, "--steps 5000"),
    ({"steps": "many"}, "--steps"),
    ({"seed": -1}, "--seed -1"),
    ({"seed": 2**64}, f"--seed {2**64}"),
    ({"seed": 10**40}, "--seed"),
    ({"device": "meta"}, "device 'meta'"),
    ({"device": "banana"}, "unknown device 'banana'"),
    ({"device": "cuda"}, "no CUDA GPU"),
    ({"device": "cuda:7"}, "cuda:7"),
    ({"device": "cpu:3"}, "cpu:3"),
    ({"device": "xla"}, "unknown device 'xla'"),
    ({"batch_size": 0}, "--batch-size 0"),
    ({"batch_size": -8}, "--batch-size -8"),
    ({"preset": "turbo"}, "unknown preset 'turbo'"),
    ({"sampler": "dpm"}, "--sampler"),
    ({"labels": "nnunet"}, "unknown label convention 'nnunet'"),
    ({"labels": "/nonexistent/map.json"}, "not found"),
    ({"model": "no-such-model"}, "model 'no-such-model' not found"),
    ({"seg": None}, "--seg"),
]


@pytest.mark.parametrize("options, needle", BAD_OPTIONS, ids=[n for _, n in BAD_OPTIONS])
def test_bad_option_is_one_line(capsys, case, tiny_model, tmp_path, monkeypatch, options, needle):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    code, _, err = run(capsys, *synth_args(case, tiny_model, tmp_path / "syn.nii.gz", **options))
    assert_one_error(code, err, needle, tmp_path)


def test_cuda_index_beyond_the_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert select_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(InputError, match="has 1 CUDA GPU"):
        select_device("cuda:7")


def test_options_are_checked_before_the_segmentation_is_read(capsys, tiny_model, tmp_path):
    """A bad option wins over a missing segmentation: nothing is read before the options are checked."""
    code, _, err = run(capsys, "synth", "--seg", tmp_path / "missing.nii.gz", "--out", tmp_path / "syn.nii.gz",
                       "--model", tiny_model, "--steps", 0, "-q")
    assert_one_error(code, err, "--steps 0", tmp_path)


@pytest.mark.parametrize("flags, needle", [
    (["--device", "meta"], "device 'meta'"),
    (["--labels", "weird"], "unknown label convention"),
    (["--bogus"], "unrecognized arguments"),
    (["--fid", "--real", SAMPLE_CT, "--inception", "/nonexistent/inception.pt"], "/nonexistent/inception.pt"),
])
def test_bad_evaluate_option_is_one_line(capsys, case, tmp_path, flags, needle):
    code, _, err = run(capsys, "evaluate", "--synthetic", tmp_path / "missing.nii.gz", "--seg", case["seg"], *flags,
                       "--json", tmp_path / "syn.json")
    assert_one_error(code, err, needle, tmp_path)


# --- models ---------------------------------------------------------------------------------------------------

BAD_MODELS = [
    (lambda c: c.update(format_version="one"), "field 'format_version'"),
    (lambda c: c.update(format_version=2), "field 'format_version' is 2"),
    (lambda c: c["model"].pop("conditioning"), "field 'model.conditioning' is missing"),
    (lambda c: c["model"].update(channel_mult="1,2"), "channel_mult"),
    (lambda c: c["diffusion"].update(num_timesteps=None), "field 'diffusion.num_timesteps'"),
    (lambda c: c.update(sampling_presets={"fast": {"sampler": "ddim", "turbo": True}}), "sampling_presets.fast"),
    (lambda c: c.update(window="L40/W400"), "field 'window'"),
]


@pytest.mark.parametrize("command", ["synth", "info"])
@pytest.mark.parametrize("mutate, needle", BAD_MODELS, ids=[n for _, n in BAD_MODELS])
def test_malformed_config_is_one_line_naming_the_field(capsys, case, tiny_model, tmp_path, command, mutate, needle):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / CONFIG_NAME).read_text())
    mutate(config)
    (model / CONFIG_NAME).write_text(json.dumps(config))
    argv = synth_args(case, model, tmp_path / "syn.nii.gz") if command == "synth" else ["info", model]
    code, out, err = run(capsys, *argv)
    assert_one_error(code, err, needle, tmp_path)
    assert out == ""


def test_preset_with_negative_eta_is_refused_before_sampling(capsys, case, tiny_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / CONFIG_NAME).read_text())
    config["sampling_presets"] = {"fast": {"sampler": "ddim", "steps": 4, "eta": -1}}
    (model / CONFIG_NAME).write_text(json.dumps(config))
    code, _, err = run(capsys, *synth_args(case, model, tmp_path / "syn.nii.gz", steps=None))
    assert_one_error(code, err, "eta must be >= 0", tmp_path)


@pytest.fixture(scope="module")
def overflowing_model(tmp_path_factory) -> Path:
    """Finite weights whose output overflows to inf: the failure only shows while sampling."""
    root = tmp_path_factory.mktemp("overflow")
    model = load_model(make_model_folder(root / "good"))
    last = [m for m in model.model.out.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last.weight.fill_(3e38)
        last.bias.fill_(3e38)
    save_model(root / "overflow", model.model, model.diffusion, name="overflow")
    return root / "overflow"


def test_non_finite_model_output_stops_the_run(capsys, case, overflowing_model, tmp_path):
    code, _, err = run(capsys, *synth_args(case, overflowing_model, tmp_path / "syn.nii.gz"))
    assert_one_error(code, err, "NaN or infinite while sampling", tmp_path)


def test_nan_weights_are_refused_at_load(capsys, case, tmp_path):
    model = load_model(make_model_folder(tmp_path / "good"))
    with torch.no_grad():
        next(model.model.parameters()).view(-1)[0] = float("nan")
    save_model(tmp_path / "nan", model.model, model.diffusion, name="nan")
    for argv in (synth_args(case, tmp_path / "nan", tmp_path / "syn.nii.gz"), ["info", tmp_path / "nan"]):
        code, _, err = run(capsys, *argv)
        assert_one_error(code, err, "NaN or infinite weights", tmp_path)


# --- labels ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seg, labels, needle", [
    ("ct_uint16", "auto", "looks like an intensity image"),
    ("ct_uint16", "amos", "looks like an intensity image"),
    ("ct_int16", "auto", "is this a CT rather than a segmentation?"),
    ("amos", "auto", "as AMOS: spleen, liver, stomach; as TotalSegmentator v2: spleen, stomach, pancreas"),
])
def test_bad_label_file_is_one_line(capsys, case, tiny_model, tmp_path, seg, labels, needle):
    code, _, err = run(capsys, *synth_args(case, tiny_model, tmp_path / "syn.nii.gz", seg=case[seg], labels=labels))
    assert_one_error(code, err, needle, tmp_path)


@pytest.mark.parametrize("option, extra", [("keep_ct", {"region": "seg"}), ("reference_ct", {"preview": None})])
def test_a_label_map_given_as_a_ct_is_one_line(capsys, case, tiny_model, tmp_path, option, extra):
    """Its label values would be kept, or shown, as HU: refused like a CT given as --seg."""
    extra = {k: case[v] if v else tmp_path / "syn.png" for k, v in extra.items()}
    code, _, err = run(capsys, *synth_args(case, tiny_model, tmp_path / "syn.nii.gz", **{option: case["seg"]},
                                           **extra))
    flag = "--" + option.replace("_", "-")
    assert_one_error(code, err, f"{flag} {case['seg']} looks like a label map, not a CT: it holds ", tmp_path)


def test_a_region_of_body_tissue_only_is_synthesized_with_a_note(capsys, case, tiny_model, tmp_path):
    """A pelvis-like crop: TotalSegmentator's small bowel (18), colon (20) and hip (77), no organ of the model."""
    seg = nib.load(case["seg"])
    labels = np.zeros(seg.shape, np.uint8)
    labels[10:40, 10:40] = 18
    labels[45:70, 10:40] = 20
    labels[30:50, 50:70, :3] = 77
    path = _save(tmp_path / "pelvis.nii.gz", labels, seg.affine)
    out = tmp_path / "syn.nii.gz"
    code, _, err = run(capsys, *[a for a in synth_args(case, tiny_model, out, seg=path) if a != "-q"])
    assert code == 0, err
    assert ("ctsynth: note: " + str(path) + " holds none of the model's organs (only structures the 'totalseg' "
            "convention takes as body tissue): synthesizing body tissue only") in err
    assert "organs: none (body only)" in err
    volume = np.asarray(nib.load(out).dataobj)
    assert (volume[labels > 0] >= -160).all() and (volume[labels > 0] <= 240).all()  # body tissue, in the window


def test_ambiguous_ids_work_with_an_explicit_convention_and_huge_labels_map(capsys, case, tiny_model, tmp_path):
    code, _, err = run(capsys, *synth_args(case, tiny_model, tmp_path / "amos.nii.gz", seg=case["amos"],
                                           labels="amos"))
    assert code == 0, err
    code, _, err = run(capsys, *synth_args(case, tiny_model, tmp_path / "huge.nii.gz", seg=case["huge"]))
    assert code == 0 and "2147483647 (" in err  # an unknown value, reported as body, without a 2**31 table


# --- reference CT and body mask on another grid ---------------------------------------------------------------

def test_synth_takes_reference_and_body_mask_on_other_grids(capsys, case, tiny_model, tmp_path):
    ct = nib.load(case["ct"])
    flipped = flipped_permuted(Volume(np.asarray(ct.dataobj), ct.affine))
    reference = _save(tmp_path / "ct_flipped.nii.gz", flipped.array, flipped.affine)
    seg = nib.load(case["seg"])
    body = (np.asarray(seg.dataobj) > 0).astype(np.uint8)
    shifted = seg.affine.copy()
    shifted[:3, 3] += 0.5 * seg.affine[:3, 1]
    body_mask = _save(tmp_path / "body_shifted.nii.gz", body, shifted)
    code, _, err = run(capsys, *synth_args(case, tiny_model, tmp_path / "syn.nii.gz", reference_ct=reference,
                                           body_mask=body_mask, preview=tmp_path / "syn.png"))
    assert code == 0, err
    assert "ctsynth: note: --reference-ct" in err and "reordered losslessly" in err
    assert "ctsynth: note: --body-mask" in err and "resampled (nearest-neighbour)" in err
    far = seg.affine.copy()
    far[:3, 3] += 5000
    code, _, err = run(capsys, *synth_args(case, tiny_model, tmp_path / "syn2.nii.gz",
                                           body_mask=_save(tmp_path / "far.nii.gz", body, far)))
    assert code == 2 and "--body-mask" in err and "does not overlap" in err and err.count("\n") == 1
    assert not (tmp_path / "syn2.nii.gz").exists()


# --- progress and streams -------------------------------------------------------------------------------------

def test_progress_off_a_terminal_is_a_line_every_few_percent(capsys, case, tiny_model, tmp_path):
    args = [a for a in synth_args(case, tiny_model, tmp_path / "syn.nii.gz", batch_size=1) if a != "-q"]
    code, _, err = run(capsys, *args)
    progress = [line for line in err.splitlines() if line.startswith("ctsynth: synthesizing")]
    assert code == 0 and "\r" not in err
    assert 2 <= len(progress) <= 21 and progress[-1].startswith("ctsynth: synthesizing 100%")


def test_progress_lines_every_five_percent_however_many_updates(capsys):
    with ProgressDisplay("ctsynth:", "synthesizing", "slice") as display:  # capsys: stderr is not a terminal
        for tenth in range(1001):
            display.update(tenth / 10, 100)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split()[2] for line in lines] == [f"{p}%" for p in range(0, 101, 5)]
    assert lines[-1] == "ctsynth: synthesizing 100% (100/100 slices)" and "ETA" in lines[10]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_messages_do_not_break_it():
    stream = _Terminal()
    with ProgressDisplay("prepare:", "preparing", "case", total=4, stream=stream) as display:
        display.update(1)
        display.write("prepare: skipped case_b: no label")
        display.postfix("case_c")
        display.update(4)
    text = stream.getvalue()
    assert "\r" in text and "preparing: 100%|" in text and "4/4 cases" in text and "case_c" in text
    assert "\rprepare: skipped case_b: no label\n" in text and "preparing 100%" not in text  # a bar, not lines


def test_progress_off_a_terminal_never_imports_tqdm():
    code = ("import io, sys\nfrom CTSemanticSynthLib.progress import ProgressDisplay\n"
            "with ProgressDisplay('train:', 'training', 'step', total=10, stream=io.StringIO()) as d:\n"
            "    [d.update(i) for i in range(11)]\n"
            "with ProgressDisplay('train:', 'training', 'step', quiet=True, bar=True) as d:\n    d.update(1, 2)\n"
            "print('tqdm' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.stdout.strip() == "False"


def _ctsynth(*argv, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "CTSemanticSynthLib.cli", *map(str, argv)], cwd=REPO, env=env,
                            **popen)


def test_closed_stdout_in_progress_lines_mode_is_an_error(case, tiny_model, tmp_path):
    out = tmp_path / "syn.nii.gz"
    args = [a for a in synth_args(case, tiny_model, out, batch_size=1) if a != "-q"] + ["--progress-lines"]
    child = _ctsynth(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()  # the reader (Slicer) went away
    err = child.stderr.read().decode("utf-8")
    assert child.wait(timeout=300) == 2, err
    assert "ctsynth: error: stdout was closed" in err and "Traceback" not in err
    assert not out.exists() and not out.with_suffix("").with_suffix(".json").exists()


@pytest.mark.parametrize("how", ["closed", "reader gone"])
def test_closed_stderr_does_not_crash(case, tiny_model, tmp_path, how):
    out = tmp_path / "syn.nii.gz"
    args = [a for a in synth_args(case, tiny_model, out) if a != "-q"]  # progress lines go to stderr
    if how == "closed":
        child = _ctsynth(*args, stdout=subprocess.PIPE, preexec_fn=lambda: os.close(2))
    else:
        child = _ctsynth(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        child.stderr.close()
    stdout = child.stdout.read().decode("utf-8")
    assert child.wait(timeout=300) == 0 and stdout == ""
    assert nib.load(out).shape == nib.load(case["seg"]).shape
