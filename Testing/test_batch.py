"""`ctsynth batch`: per-job seeds, resume after an interrupt, failing cases, nnU-Net export, variance maps, torchrun."""

import contextlib
import csv
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from CTSemanticSynthLib import batch
from CTSemanticSynthLib.batch import Layout, job_seed, list_cases, plan_jobs, std_map
from CTSemanticSynthLib.checkpoint import load_model
from CTSemanticSynthLib.cli import main
from CTSemanticSynthLib.io import Volume
from CTSemanticSynthLib.synthesis import SamplingOptions

from conftest import REPO, SAMPLE_SEG, make_anatomy_model_folder

pytestmark = pytest.mark.usefixtures("one_thread")

LIVER_SLICE = 106  # an axial slice of the sample case through the liver


def _crop(folder: Path, name: str, first_slice: int, slices: int = 3) -> Path:
    """A small label map cut from the sample case (60 x 60 x ``slices`` voxels at 3 mm)."""
    image = nib.load(SAMPLE_SEG)
    labels = np.asarray(image.dataobj)[30:90, 20:80, first_slice : first_slice + slices].astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(labels, image.affine), path)
    return path


@pytest.fixture(scope="module")
def segs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("segs")
    _crop(folder, "caseA", LIVER_SLICE - 1)
    _crop(folder, "caseB", LIVER_SLICE - 6, slices=2)
    return folder


def run_batch(capsys, segs: Path, out: Path, model: Path, *extra) -> tuple[int, str]:
    code = main(["batch", "--segs", str(segs), "--out", str(out), "--model", str(model), "--steps", "2",
                 "--labels", "totalseg", "--device", "cpu", "--batch-size", "4", *map(str, extra)])
    return code, capsys.readouterr().err


def manifest(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def voxels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def test_job_seeds_are_stable_distinct_and_in_range():
    seeds = {job_seed(s, case, k) for s in (0, 1) for case in ("a", "b", "a0") for k in range(3)}
    assert len(seeds) == 18 and all(0 <= seed < 2**32 for seed in seeds)


def test_cases_from_a_folder_or_a_list(tmp_path, segs):
    (segs / "notes.txt").write_text("not a label map")
    assert [name for name, _ in list_cases(segs)] == ["caseA", "caseB"]
    listing = tmp_path / "cases.txt"
    relative = os.path.relpath(segs / "caseA.nii.gz", tmp_path)
    listing.write_text(f"# training cases\n{segs / 'caseB.nii.gz'}\n\n{relative}\n")
    assert list_cases(listing) == [("caseB", segs / "caseB.nii.gz"), ("caseA", tmp_path / relative)]
    listing.write_text(f"{segs / 'caseA.nii.gz'}\n{tmp_path / 'missing.nii.gz'}\n")
    with pytest.raises(batch.InputError, match="missing"):
        list_cases(listing)
    listing.write_text(f"{segs / 'caseA.nii.gz'}\n{segs / 'caseA.nii.gz'}\n")
    with pytest.raises(batch.InputError, match="both case 'caseA'"):
        list_cases(listing)


@pytest.fixture(scope="module")
def first_batch(tmp_path_factory, segs, tiny_model):
    """A single-process batch on one thread, like each torchrun process below (thread counts change roundings)."""
    out = tmp_path_factory.mktemp("batch") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    code = main(["batch", "--segs", str(segs), "--out", str(out), "--model", str(tiny_model), "--steps", "2",
                 "--labels", "totalseg", "--device", "cpu", "--samples", "2", "--seed", "5", "--variance", "-q"])
    torch.set_num_threads(threads)
    return code, out


def test_batch_writes_every_job_and_a_manifest(first_batch, tiny_model):
    code, out = first_batch
    assert code == 0
    rows = manifest(out / "manifest.csv")
    assert [(r["case"], r["sample"], r["status"]) for r in rows] == [
        ("caseA", "0", "ok"), ("caseA", "1", "ok"), ("caseB", "0", "ok"), ("caseB", "1", "ok")]
    for row in rows:
        assert int(row["seed"]) == job_seed(5, row["case"], int(row["sample"]))
        assert row["output"] == f"{row['case']}_s{row['sample']}.nii.gz" and float(row["seconds"]) > 0
        record = json.loads((out / f"{row['case']}_s{row['sample']}.json").read_text())
        assert record["options"]["seed"] == int(row["seed"]) and record["model_sha256"] == row["model_sha256"]
    assert not np.array_equal(voxels(out / "caseA_s0.nii.gz"), voxels(out / "caseA_s1.nii.gz"))


def test_any_job_rerun_alone_gives_the_same_volume(capsys, first_batch, tiny_model, segs, tmp_path):
    _, out = first_batch
    row = manifest(out / "manifest.csv")[3]  # caseB sample 1
    alone = tmp_path / "alone.nii.gz"
    assert main(["synth", "--seg", str(segs / "caseB.nii.gz"), "--out", str(alone), "--model", str(tiny_model),
                 "--steps", "2", "--labels", "totalseg", "--device", "cpu", "--seed", row["seed"], "-q"]) == 0
    np.testing.assert_array_equal(voxels(alone), voxels(out / row["output"]))


def test_variance_map_is_the_samples_spread(first_batch):
    _, out = first_batch
    samples = np.stack([voxels(out / f"caseA_s{k}.nii.gz").astype(np.float32) for k in range(2)])
    std = voxels(out / "caseA_std.nii.gz")
    np.testing.assert_allclose(std, samples.std(axis=0), atol=1e-3)
    assert std.max() > 0 and (std[samples[0] == -1000] == 0).all()
    np.testing.assert_allclose(nib.load(out / "caseA_std.nii.gz").affine, nib.load(out / "caseA_s0.nii.gz").affine)


def test_std_map_zero_for_identical_samples_positive_for_different():
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    same = Volume(np.full((3, 3, 2), 40, np.int16), affine)
    assert not std_map([same, same, same]).array.any()
    other = Volume(np.full((3, 3, 2), 50, np.int16), affine)
    np.testing.assert_allclose(std_map([same, other]).array, 5.0)
    with pytest.raises(batch.InputError, match="at least 2"):
        std_map([same])


def test_resume_after_an_interrupt_runs_only_the_missing_jobs(capsys, monkeypatch, segs, tiny_model, tmp_path):
    out = tmp_path / "out"
    real = batch.synthesize
    calls: list[int] = []
    interrupt_at = [3]

    def interrupted_at_third(classes, model, options, **kwargs):
        calls.append(options.seed)
        if len(calls) == interrupt_at[0]:
            interrupt_at[0] = 0
            raise KeyboardInterrupt
        return real(classes, model, options, **kwargs)

    monkeypatch.setattr(batch, "synthesize", interrupted_at_third)
    code, err = run_batch(capsys, segs, out, tiny_model, "--samples", 2, "-q")
    assert code == 130 and "interrupted; finished jobs are kept: run the same command to continue" in err
    assert [r["status"] for r in manifest(out / "manifest.csv")] == ["ok", "ok", "pending", "pending"]
    assert sorted(p.name for p in out.iterdir()) == ["caseA_s0.json", "caseA_s0.nii.gz", "caseA_s1.json",
                                                      "caseA_s1.nii.gz", "manifest.csv"]
    first = (out / "caseA_s0.nii.gz").read_bytes()
    (out / "caseA_s1.nii.gz").write_bytes((out / "caseA_s1.nii.gz").read_bytes()[:-100])  # damaged: made again

    calls.clear()
    code, err = run_batch(capsys, segs, out, tiny_model, "--samples", 2)
    assert code == 0, err
    assert "\r" not in err and "ctsynth: batch 100% (4/4 CTs, caseB sample 1: ok (" in err  # a log gets lines
    assert calls == [job_seed(0, "caseA", 1), job_seed(0, "caseB", 0), job_seed(0, "caseB", 1)]
    assert (out / "caseA_s0.nii.gz").read_bytes() == first
    assert [r["status"] for r in manifest(out / "manifest.csv")] == ["ok"] * 4
    calls.clear()
    assert run_batch(capsys, segs, out, tiny_model, "--samples", 2, "--batch-size", 16, "-q")[0] == 0
    assert calls == []  # everything done; the batch size does not change a result


def test_a_failing_case_is_recorded_and_the_batch_goes_on(capsys, segs, tiny_model, tmp_path):
    folder = tmp_path / "segs"
    folder.mkdir()
    for name in ("caseA", "caseB"):
        (folder / f"{name}.nii.gz").symlink_to(segs / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 2), np.uint8), np.eye(4)), folder / "empty.nii.gz")
    out = tmp_path / "out"
    code, err = run_batch(capsys, folder, out, tiny_model, "-q")
    assert code == 1
    rows = {r["case"]: r for r in manifest(out / "manifest.csv")}
    assert rows["caseA"]["status"] == rows["caseB"]["status"] == "ok"
    assert rows["empty"]["status"] == "failed" and "segmentation is empty" in rows["empty"]["error"]
    assert "ctsynth: failed: empty sample 0: the segmentation is empty" in err
    assert "2 of 3 job(s) done, 1 failed" in err and "Traceback" not in err
    assert not (out / "empty_s0.nii.gz").exists()


def test_files_made_otherwise_are_not_replaced(capsys, segs, tiny_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "caseB_s0.nii.gz").write_bytes(b"someone else's file")
    code, err = run_batch(capsys, segs, out, tiny_model, "-q")
    assert code == 2 and err.count("\n") == 1
    assert "caseB_s0.nii.gz exists and was made otherwise" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["caseB_s0.nii.gz"]
    assert (out / "caseB_s0.nii.gz").read_bytes() == b"someone else's file"
    assert run_batch(capsys, segs, out, tiny_model, "-q", "--overwrite")[0] == 0
    assert voxels(out / "caseB_s0.nii.gz").shape == (60, 60, 2)


def test_records_from_before_newer_options_still_count_as_done(capsys, monkeypatch, segs, tiny_model, tmp_path):
    out = tmp_path / "out"
    assert run_batch(capsys, segs, out, tiny_model, "-q")[0] == 0
    for sidecar in out.glob("*.json"):
        record = json.loads(sidecar.read_text())
        for key in batch.NEUTRAL_OPTIONS:  # as written before these options existed
            del record["options"][key]
        sidecar.write_text(json.dumps(record))
    calls = []
    monkeypatch.setattr(batch, "synthesize", lambda *a, **k: calls.append(1))
    assert run_batch(capsys, segs, out, tiny_model, "-q")[0] == 0
    assert calls == []
    code, err = run_batch(capsys, segs, out, tiny_model, "-q", "--slice-agreement", "0.5")
    assert code == 2 and "was made otherwise" in err


def test_files_made_in_another_precision_are_not_taken_as_done(capsys, segs, tiny_model, tmp_path):
    out = tmp_path / "out"
    assert run_batch(capsys, segs, out, tiny_model, "-q", "--precision", "fp32")[0] == 0
    first = (out / "caseA_s0.nii.gz").read_bytes()
    code, err = run_batch(capsys, segs, out, tiny_model, "-q", "--precision", "bf16")
    assert code == 2 and "caseA_s0.nii.gz exists and was made otherwise (another precision)" in err
    assert (out / "caseA_s0.nii.gz").read_bytes() == first


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_records_from_before_precision_was_an_option_still_count_as_done(capsys, monkeypatch, segs, tiny_model,
                                                                         tmp_path, precision):
    """Records whose options lack the precision: it stood beside them, or (fp32) was not recorded at all."""
    out = tmp_path / "out"
    assert run_batch(capsys, segs, out, tiny_model, "-q", "--precision", precision)[0] == 0
    for sidecar in out.glob("*.json"):
        record = json.loads(sidecar.read_text())
        assert record["options"].pop("precision") == record["precision"] == precision
        if precision == "fp32":
            del record["precision"]
        sidecar.write_text(json.dumps(record))
    calls = []
    monkeypatch.setattr(batch, "synthesize", lambda *a, **k: calls.append(1))
    assert run_batch(capsys, segs, out, tiny_model, "-q", "--precision", precision)[0] == 0
    assert calls == []
    code, err = run_batch(capsys, segs, out, tiny_model, "-q", "--precision", "fp16" if precision == "fp32" else "fp32")
    assert code == 2 and "was made otherwise (another precision)" in err


def test_a_library_batch_in_auto_precision_finds_its_own_files_done(monkeypatch, segs, tiny_model, tmp_path):
    """``precision`` "auto" is resolved for the device before the done-check, as it is recorded."""
    layout = Layout(tmp_path / "out", None)
    jobs = plan_jobs(list_cases(segs), 1, 0, layout)
    model = load_model(tiny_model)
    options = SamplingOptions(steps=2, batch_size=4, precision="auto")
    settings = batch.BatchSettings(layout, "totalseg")
    first = batch.run_batch(jobs, model, options, settings, device=torch.device("cpu"))
    assert [r.status for r in first] == ["ok"] * len(jobs)
    calls = []
    monkeypatch.setattr(batch, "synthesize", lambda *a, **k: calls.append(1))
    again = batch.run_batch(jobs, model, options, settings, device=torch.device("cpu"))
    assert calls == [] and [r.status for r in again] == ["ok"] * len(jobs)


@pytest.mark.parametrize("extra, message", [
    (["--variance"], "--variance needs --samples 2 or more"),
    (["--samples", "0"], "--samples 0 must be at least 1"),
    (["--nnunet", "Dataset1_X"], "--nnunet Dataset1_X: use DatasetNNN_Name"),
    (["--steps", "0"], "--steps 0"),
])
def test_bad_options_give_one_line(capsys, segs, tiny_model, tmp_path, extra, message):
    code, err = run_batch(capsys, segs, tmp_path / "out", tiny_model, *extra)
    assert code == 2 and err.startswith("ctsynth: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_output_inside_the_input_folder_is_refused(capsys, segs, tiny_model):
    code, err = run_batch(capsys, segs, segs / "out", tiny_model)
    assert code == 2 and "would overwrite --segs" in err


def test_nnunet_dataset_passes_nnunets_own_check(capsys, monkeypatch, segs, tiny_model, tmp_path):
    integrity = pytest.importorskip("nnunetv2.experiment_planning.verify_dataset_integrity")
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(name, str(tmp_path / name))
    code, err = run_batch(capsys, segs, tmp_path / "raw", tiny_model, "--samples", 2, "--nnunet", "Dataset501_Syn",
                          "-q")
    assert code == 0, err
    dataset = tmp_path / "raw" / "Dataset501_Syn"
    integrity.verify_dataset_integrity(str(dataset), 1)  # raises on any problem
    description = json.loads((dataset / "dataset.json").read_text())
    assert description["numTraining"] == 4 and description["channel_names"] == {"0": "CT"}
    assert description["labels"]["background"] == 0 and description["labels"]["body"] == 16
    assert sorted(p.name for p in (dataset / "imagesTr").iterdir()) == [
        "caseA_s0_0000.nii.gz", "caseA_s1_0000.nii.gz", "caseB_s0_0000.nii.gz", "caseB_s1_0000.nii.gz"]
    labels, image = voxels(dataset / "labelsTr" / "caseA_s1.nii.gz"), voxels(dataset / "imagesTr" /
                                                                              "caseA_s1_0000.nii.gz")
    liver = description["labels"]["liver"]
    source = voxels(segs / "caseA.nii.gz")
    assert ((labels == liver) == (source == 5)).all()  # TotalSegmentator liver 5 -> model class liver
    assert (image[labels == 0] == -1000).all() and (image[labels == liver] >= -160).all()


def test_torchrun_two_processes_equal_one(segs, tiny_model, tmp_path, first_batch):
    _, single = first_batch
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "CTSemanticSynthLib.cli", "batch", "--segs", str(segs), "--out", str(out), "--model",
               str(tiny_model), "--steps", "2", "--labels", "totalseg", "--device", "cpu", "--samples", "2",
               "--seed", "5", "--variance"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, encoding="utf-8", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # rank 1 ran jobs 1 and 3, and only those
    assert "ctsynth: [rank 1] batch 50% (1/2 CTs, caseA sample 1: ok (" in done.stderr
    assert "ctsynth: [rank 1] batch 100% (2/2 CTs, caseB sample 1: ok (" in done.stderr
    names = sorted(p.name for p in single.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names
    for name in names:
        if name.endswith(".nii.gz"):
            np.testing.assert_array_equal(voxels(out / name), voxels(single / name), err_msg=name)
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in manifest(single / "manifest.csv")]
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in manifest(out / "manifest.csv")] == strip


def test_synth_samples_and_variance_map(capsys, segs, tiny_model, tmp_path):
    out, std = tmp_path / "syn.nii.gz", tmp_path / "std.nii.gz"
    argv = ["synth", "--seg", str(segs / "caseA.nii.gz"), "--out", str(out), "--model", str(tiny_model), "--steps",
            "2", "--labels", "totalseg", "--device", "cpu", "--seed", "3", "-q"]
    assert main([*argv, "--samples", "3", "--variance-map", str(std)]) == 0
    samples = [voxels(tmp_path / f"syn_s{k}.nii.gz") for k in range(3)]
    assert [json.loads((tmp_path / f"syn_s{k}.json").read_text())["options"]["seed"] for k in range(3)] == [3, 4, 5]
    np.testing.assert_allclose(voxels(std), np.std(np.stack(samples).astype(np.float32), axis=0), atol=1e-3)
    assert voxels(std).max() > 0 and not out.exists()
    single = tmp_path / "one.nii.gz"
    assert main([*argv[:4], str(single), *argv[5:], "--seed", "4"]) == 0
    np.testing.assert_array_equal(voxels(single), samples[1])  # sample k is the plain run with seed S + k
    code = main([*argv[:4], str(tmp_path / "x.nii.gz"), *argv[5:], "--variance-map", str(tmp_path / "s.nii.gz")])
    assert code == 2 and "--variance-map needs --samples 2 or more" in capsys.readouterr().err


def test_plan_orders_jobs_case_major(tmp_path):
    cases = [("a", tmp_path / "a.nii.gz"), ("b", tmp_path / "b.nii.gz")]
    jobs = plan_jobs(cases, 2, 9, Layout(tmp_path, "Dataset002_X"))
    assert [(j.index, j.case, j.sample) for j in jobs] == [(0, "a", 0), (1, "a", 1), (2, "b", 0), (3, "b", 1)]
    assert [p.relative_to(tmp_path).as_posix() for p in jobs[1].outputs] == [
        "Dataset002_X/imagesTr/a_s1_0000.nii.gz", "Dataset002_X/labelsTr/a_s1.nii.gz",
        "Dataset002_X/provenance/a_s1.json"]


def test_nnunet_original_labels_are_renumbered_consecutively(capsys, monkeypatch, segs, tiny_model, tmp_path):
    integrity = pytest.importorskip("nnunetv2.experiment_planning.verify_dataset_integrity")
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(name, str(tmp_path / name))
    code, err = run_batch(capsys, segs, tmp_path / "raw", tiny_model, "--nnunet", "Dataset502_Own", "--nnunet-labels",
                          "original", "-q")
    assert code == 0, err
    dataset = tmp_path / "raw" / "Dataset502_Own"
    integrity.verify_dataset_integrity(str(dataset), 1)  # nnU-Net wants labels 0..N without gaps
    labels = json.loads((dataset / "dataset.json").read_text())["labels"]
    values = sorted(set(np.unique(voxels(segs / "caseA.nii.gz"))) | set(np.unique(voxels(segs / "caseB.nii.gz"))))[1:]
    assert labels == {f"label_{v}": i for i, v in enumerate(values, start=1)} | {"background": 0}
    for case in ("caseA", "caseB"):
        source, written = voxels(segs / f"{case}.nii.gz"), voxels(dataset / "labelsTr" / f"{case}_s0.nii.gz")
        for i, value in enumerate(values, start=1):
            assert ((written == i) == (source == value)).all()
    # the same batch with the model classes is another dataset: its files are not taken as done
    code, err = run_batch(capsys, segs, tmp_path / "raw", tiny_model, "--nnunet", "Dataset502_Own", "-q")
    assert code == 2 and "was made otherwise" in err
    code, err = run_batch(capsys, segs, tmp_path / "other", tiny_model, "--nnunet-labels", "original")
    assert code == 2 and "--nnunet-labels needs --nnunet" in err



def test_nnunet_dataset_of_an_anatomy_model_lists_its_classes(capsys, monkeypatch, segs, tmp_path):
    """An anatomy model's labelsTr hold its own 36 classes, and dataset.json names them with their indices."""
    from CTSemanticSynthLib.labels import class_set, totalsegmentator_names

    anatomy = class_set("anatomy")
    model = make_anatomy_model_folder(tmp_path / "anatomy")
    code, err = run_batch(capsys, segs, tmp_path / "raw", model, "--nnunet", "Dataset506_Anat", "-q")
    assert code == 0, err
    dataset = tmp_path / "raw" / "Dataset506_Anat"
    description = json.loads((dataset / "dataset.json").read_text())
    labels = description["labels"]
    assert len(labels) == 36 and sorted(labels.values()) == list(range(36))  # contiguous, as nnU-Net wants
    assert labels["background"] == 0 and labels["liver"] == 6 and labels["body"] == 16
    assert list(labels) == list(anatomy.classes)
    assert description["channel_names"] == {"0": "CT"} and description["file_ending"] == ".nii.gz"
    written, source = voxels(dataset / "labelsTr" / "caseA_s0.nii.gz"), voxels(segs / "caseA.nii.gz")
    names = totalsegmentator_names(2)
    for structure, prefix in (("vertebrae", "vertebrae_"), ("ribs", "rib_"), ("autochthon", "autochthon_"),
                              ("liver", "liver")):
        expected = np.isin(source, [v for v, n in names.items() if n.startswith(prefix)])
        assert expected.any() and ((written == labels[structure]) == expected).all(), structure
    assert set(np.unique(written).tolist()) <= set(labels.values())
    try:
        from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    except ImportError:
        return
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(name, str(tmp_path / name))
    verify_dataset_integrity(str(dataset), 1)  # raises on any problem

# --- the done check: what decides a volume --------------------------------------------------------------------

def _counting(monkeypatch) -> list[int]:
    """Patch batch.synthesize to record each job's seed and run it."""
    calls: list[int] = []
    real = batch.synthesize
    monkeypatch.setattr(batch, "synthesize", lambda classes, model, options, **kw: calls.append(options.seed)
                        or real(classes, model, options, **kw))
    return calls


def test_an_edited_label_map_is_not_taken_as_done(capsys, monkeypatch, segs, tiny_model, tmp_path):
    folder = tmp_path / "segs"
    folder.mkdir()
    for name in ("caseA", "caseB"):
        (folder / f"{name}.nii.gz").write_bytes((segs / f"{name}.nii.gz").read_bytes())
    out = tmp_path / "out"
    assert run_batch(capsys, folder, out, tiny_model, "-q")[0] == 0
    kept = {p.name: p.read_bytes() for p in out.iterdir()}
    image = nib.load(folder / "caseA.nii.gz")
    labels = np.asarray(image.dataobj)
    nib.save(nib.Nifti1Image(np.where(labels == 5, 0, labels).astype(np.uint8), image.affine),
             folder / "caseA.nii.gz")  # the liver removed
    calls = _counting(monkeypatch)
    code, err = run_batch(capsys, folder, out, tiny_model, "-q")
    assert code == 2 and err.count("\n") == 1 and calls == []
    assert "caseA_s0.nii.gz exists and was made otherwise (another content of caseA.nii.gz" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == kept  # nothing replaced without --overwrite
    assert run_batch(capsys, folder, out, tiny_model, "-q", "--overwrite")[0] == 0
    assert calls == [job_seed(0, "caseA", 0)]  # only the stale job is made again
    assert (out / "caseB_s0.nii.gz").read_bytes() == kept["caseB_s0.nii.gz"]
    before = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(kept["caseA_s0.nii.gz"])).dataobj)
    assert not np.array_equal(voxels(out / "caseA_s0.nii.gz"), before)  # made from the edited map
    record = json.loads((out / "caseA_s0.json").read_text())
    assert record["inputs"]["segmentation_sha256"] == batch.file_digest(folder / "caseA.nii.gz")
    calls.clear()
    assert run_batch(capsys, folder, out, tiny_model, "-q")[0] == 0 and calls == []  # now done


def test_another_label_convention_or_mapping_is_not_taken_as_done(capsys, monkeypatch, segs, tiny_model, tmp_path):
    out = tmp_path / "out"
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"5": "liver", "1": "spleen"}))
    assert run_batch(capsys, segs, out, tiny_model, "-q", "--labels", mapping)[0] == 0
    calls = _counting(monkeypatch)
    assert run_batch(capsys, segs, out, tiny_model, "-q", "--labels", mapping)[0] == 0 and calls == []
    mapping.write_text(json.dumps({"5": "liver"}))  # the spleen now body tissue: other classes
    code, err = run_batch(capsys, segs, out, tiny_model, "-q", "--labels", mapping)
    assert code == 2 and "(another label convention or mapping)" in err and calls == []
    code, err = run_batch(capsys, segs, out, tiny_model, "-q")  # --labels totalseg
    assert code == 2 and "(another label convention or mapping)" in err and calls == []


def test_another_device_type_is_not_taken_as_done(capsys, monkeypatch, segs, tiny_model, tmp_path):
    out = tmp_path / "out"
    assert run_batch(capsys, segs, out, tiny_model, "-q")[0] == 0
    record = json.loads((out / "caseB_s0.json").read_text())
    assert record["device"] == "cpu"
    (out / "caseB_s0.json").write_text(json.dumps(record | {"device": "cuda:1"}))  # as made on a GPU
    calls = _counting(monkeypatch)
    code, err = run_batch(capsys, segs, out, tiny_model, "-q")
    assert code == 2 and "caseB_s0.nii.gz exists and was made otherwise (another device type)" in err
    assert calls == []


def test_a_generator_batch_resumes(capsys, monkeypatch, segs, tmp_path):
    from CTSemanticSynthLib.checkpoint import save_model
    from CTSemanticSynthLib.factory import create_generator

    folder = tmp_path / "pix2pix"
    save_model(folder, create_generator({"method": "pix2pix", "image_size": 32, "channels": 2}), None,
               name="tiny-pix2pix")
    out = tmp_path / "out"
    assert run_batch(capsys, segs, out, folder, "-q", "--slice-agreement", "0.5")[0] == 0
    options = json.loads((out / "caseA_s0.json").read_text())["options"]
    assert options["sampler"] == "one-pass" and options["slice_agreement"] == 0.0  # ignored, so not recorded
    calls = _counting(monkeypatch)
    code, err = run_batch(capsys, segs, out, folder, "-q", "--slice-agreement", "0.5")
    assert code == 0, err
    assert calls == []  # both jobs done: the options a generator ignores do not make them stale


# --- files of the user's ------------------------------------------------------------------------------------------

def test_a_manifest_the_tool_did_not_write_is_kept(capsys, segs, tiny_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.csv").write_text("patient,notes\n1,my own list\n")
    code, err = run_batch(capsys, segs, out, tiny_model, "-q")
    assert code == 2 and err.count("\n") == 1 and "manifest.csv exists and was not written by ctsynth batch" in err
    assert sorted(p.name for p in out.iterdir()) == ["manifest.csv"]
    assert (out / "manifest.csv").read_text() == "patient,notes\n1,my own list\n"
    assert run_batch(capsys, segs, out, tiny_model, "-q", "--overwrite")[0] == 0
    assert [r["case"] for r in manifest(out / "manifest.csv")] == ["caseA", "caseB"]


def test_another_nnunet_dataset_is_not_rewritten(capsys, segs, tiny_model, tmp_path):
    dataset = tmp_path / "raw" / "Dataset503_Real"
    (dataset / "imagesTr").mkdir(parents=True)
    (dataset / "labelsTr").mkdir()
    theirs = {"name": "Dataset503_Real", "channel_names": {"0": "CT"}, "labels": {"background": 0, "tumor": 1},
              "numTraining": 1, "file_ending": ".nii.gz"}
    (dataset / "dataset.json").write_text(json.dumps(theirs))
    (dataset / "imagesTr" / "real_001_0000.nii.gz").write_bytes(b"a real case")
    (dataset / "labelsTr" / "real_001.nii.gz").write_bytes(b"its labels")
    before = {p: p.read_bytes() for p in dataset.rglob("*") if p.is_file()}
    for extra in ([], ["--overwrite"]):
        code, err = run_batch(capsys, segs, tmp_path / "raw", tiny_model, "--nnunet", "Dataset503_Real", "-q", *extra)
        assert code == 2 and err.count("\n") == 1, err
        assert {p: p.read_bytes() for p in dataset.rglob("*") if p.is_file()} == before
    assert "dataset.json exists and describes another dataset" in run_batch(
        capsys, segs, tmp_path / "raw", tiny_model, "--nnunet", "Dataset503_Real", "-q")[1]
    (dataset / "imagesTr" / "real_001_0000.nii.gz").unlink()
    (dataset / "labelsTr" / "real_001.nii.gz").unlink()
    code, err = run_batch(capsys, segs, tmp_path / "raw", tiny_model, "--nnunet", "Dataset503_Real", "-q",
                          "--overwrite")  # its own files gone: with --overwrite its dataset.json may be replaced
    assert code == 0, err
    assert json.loads((dataset / "dataset.json").read_text())["numTraining"] == 2


def test_a_dataset_holding_other_cases_is_refused(capsys, segs, tiny_model, tmp_path):
    code, err = run_batch(capsys, segs, tmp_path / "raw", tiny_model, "--nnunet", "Dataset504_Syn", "-q")
    assert code == 0, err
    dataset = tmp_path / "raw" / "Dataset504_Syn"
    only_a = tmp_path / "only_a"
    only_a.mkdir()
    (only_a / "caseA.nii.gz").symlink_to(segs / "caseA.nii.gz")
    code, err = run_batch(capsys, only_a, tmp_path / "raw", tiny_model, "--nnunet", "Dataset504_Syn", "-q",
                          "--overwrite")
    assert code == 2 and "imagesTr holds 1 file(s) this batch does not make (e.g. caseB_s0_0000.nii.gz)" in err
    assert json.loads((dataset / "dataset.json").read_text())["numTraining"] == 2


def test_an_interrupt_right_after_a_jobs_files_went_in_is_listed_as_done(capsys, monkeypatch, segs, tiny_model,
                                                                          tmp_path):
    real, blocks = batch.atomic_outputs, []

    @contextlib.contextmanager
    def interrupted_after_second(*targets, **kwargs):
        with real(*targets, **kwargs) as temps:
            yield temps
        blocks.append(targets)
        if len(blocks) == 2:
            raise KeyboardInterrupt  # as a Ctrl-C held during the renames arrives: after the files went in

    monkeypatch.setattr(batch, "atomic_outputs", interrupted_after_second)
    code, err = run_batch(capsys, segs, tmp_path / "raw", tiny_model, "--nnunet", "Dataset505_Syn", "--samples", 2,
                          "-q")
    assert code == 130 and "interrupted; finished jobs are kept" in err
    dataset = tmp_path / "raw" / "Dataset505_Syn"
    assert sorted(p.name for p in (dataset / "labelsTr").iterdir()) == ["caseA_s0.nii.gz", "caseA_s1.nii.gz"]
    assert json.loads((dataset / "dataset.json").read_text())["numTraining"] == 2
    assert [r["status"] for r in manifest(dataset / "manifest.csv")] == ["ok", "ok", "pending", "pending"]


def test_torchrun_on_gpus_binds_each_rank_to_its_gpu_before_the_process_group(monkeypatch):
    """NCCL and ``all_gather_object`` use the current CUDA device: without ``set_device(LOCAL_RANK)`` first, every
    rank gathers on cuda:0 and the batch hangs or crashes after its last job. The CUDA calls are recorded, not made."""
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", torch.device(device))))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend, **kwargs: calls.append(("init_process_group", backend)))
    shard = batch.shard_from_environment()
    assert (shard.rank, shard.world_size, shard.local_rank) == (1, 2, 1)
    assert calls == [("set_device", torch.device("cuda", 1)), ("init_process_group", "nccl")]
    assert batch.rank_device(torch.device("cuda"), shard) == torch.device("cuda", 1)
