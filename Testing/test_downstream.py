"""The downstream nnU-Net study (training/downstream): datasets, resume markers, scoring, report, bad inputs.

The default tests run the real synthesis and dataset building on a tiny generated set and stand in for nnU-Net's
three console scripts with a fake that writes what each would (its predictions are known, so the table is too);
nnU-Net's own dataset check runs on a built dataset. The slow test runs the whole study with nnU-Net itself.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_model_folder
from data_builders.tiny_abdomen import build_tiny_abdomen
from CTSemanticSynthLib.batch import job_seed
from CTSemanticSynthLib.errors import InputError
from CTSemanticSynthLib.io import Volume, read_image, read_labelmap, write_volume
from CTSemanticSynthLib.labels import MODEL_CLASSES
from training.downstream import datasets, nnunet, report
from training.downstream.cli import main
from training.downstream.datasets import StudyPaths
from training.downstream.nnunet import NnUNet, StepFailed
from training.downstream.study import StudySettings, run_study

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN, TEST = ["case_00", "case_01", "case_02", "case_03"], ["case_04", "case_05"]
ORGANS_PRESENT = ["spleen", "kidney_right", "kidney_left", "liver", "aorta"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("downstream")
    cts, segs = build_tiny_abdomen(root / "data", cases=6)
    ct = read_image(cts / "case_03.nii.gz")  # one CT in another format: converted once
    write_volume(Volume(ct.array.astype(np.int16), ct.affine), cts / "case_03.nrrd")
    (cts / "case_03.nii.gz").unlink()
    (root / "test.txt").write_text("# held out\ncase_04\ncase_05\n")
    model = make_model_folder(root / "model", class_means=[0.0] + [0.55] * 15 + [0.45])
    return {"root": root, "cts": cts, "segs": segs, "test": root / "test.txt", "model": model}


class FakeNnUNet:
    """Stands in for nnU-Net's console scripts: writes each one's outputs. Predictions: the reference labels for
    the real-only model, the reference without the liver for real + synthetic, nothing for synthetic only."""

    def __init__(self, interrupt: str | None = None) -> None:
        self.calls: list[tuple[str, list[str], dict[str, str]]] = []
        self.interrupt = interrupt

    def __call__(self, script, args, env, log, echo) -> None:
        args = list(args)
        self.calls.append((script, args, dict(env)))
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"{script} {args}\n", encoding="utf-8")
        raw, pre = Path(env["nnUNet_raw"]), Path(env["nnUNet_preprocessed"])
        if script == "nnUNetv2_plan_and_preprocess":
            name = next(raw.glob(f"Dataset{int(args[1]):03d}_*")).name
            (pre / name / f"nnUNetPlans_{args[3]}").mkdir(parents=True)
            plans = {"configurations": {args[3]: {}, "3d_fullres": {}}}
            (pre / name / "nnUNetPlans.json").write_text(json.dumps(plans))
        elif script == "nnUNetv2_train":
            name = next(raw.glob(f"Dataset{int(args[0]):03d}_*")).name
            fold = Path(env["nnUNet_results"]) / name / f"{args[4]}__nnUNetPlans__{args[1]}" / f"fold_{args[2]}"
            fold.mkdir(parents=True, exist_ok=True)
            (fold / "checkpoint_final.pth").write_bytes(b"weights")
        else:
            images, out, dataset = Path(args[1]), Path(args[3]), int(args[5])
            labels = Path(env["nnUNet_raw"]).parent / "labels"
            for n, image in enumerate(sorted(images.iterdir())):
                case = image.name[: -len("_0000.nii.gz")]
                seg, _ = read_labelmap(labels / f"{case}.nii.gz")
                array = seg.array.copy()
                if dataset == 502:  # real + synthetic
                    array[array == MODEL_CLASSES.index("liver")] = 0
                elif dataset == 503:  # synthetic only
                    array[:] = 0
                write_volume(Volume(array, seg.affine), out / f"{case}.nii.gz")
                if self.interrupt == script and n == 0:
                    raise KeyboardInterrupt


def settings(inputs: dict[str, Path], **changes) -> StudySettings:
    return StudySettings(**{"cts": (inputs["cts"],), "segs": inputs["segs"], "test": inputs["test"],
                            "model": str(inputs["model"]), "samples": 2, "labels": "amos", "seed": 3,
                            "device": torch.device("cpu"), **changes})


def study(folder: Path, fake: FakeNnUNet, tta: bool = False) -> NnUNet:
    return NnUNet(StudyPaths(folder), "2d", "nnUNetTrainer_1epoch", "all", "cpu", 1, tta, threads=1, launch=fake)


@pytest.fixture(scope="module")
def done(inputs) -> dict:
    """One whole study with the fake nnU-Net."""
    fake = FakeNnUNet()
    messages: list[str] = []
    nn = study(inputs["root"] / "study", fake)
    md = run_study(settings(inputs), nn, messages.append)
    return {"fake": fake, "report": md, "nn": nn, "paths": nn.paths, "messages": messages}


def _dataset(paths: StudyPaths, kind: str) -> Path:
    return paths.raw / datasets.dataset_name(501, kind)


def _identifiers(folder: Path) -> list[str]:
    return sorted(p.name[: -len(".nii.gz")] for p in folder.iterdir())


def test_the_three_datasets_differ_as_they_should(done, inputs):
    paths = done["paths"]
    synthetic = [f"{c}_s{k}" for c in TRAIN for k in range(2)]
    expected = {"real": TRAIN, "real+synthetic": sorted(TRAIN + synthetic), "synthetic": synthetic}
    tables = []
    for kind, identifiers in expected.items():
        folder = _dataset(paths, kind)
        assert _identifiers(folder / "imagesTr") == [f"{i}_0000" for i in identifiers]
        assert _identifiers(folder / "labelsTr") == identifiers
        meta = json.loads((folder / "dataset.json").read_text())
        assert meta["numTraining"] == len(identifiers)
        assert meta["ctsynth"]["real_cases"] + meta["ctsynth"]["synthetic_cases"] == len(identifiers)
        tables.append(meta["labels"])
        assert not any(i.startswith(tuple(TEST)) for i in identifiers)
    assert tables[0] == tables[1] == tables[2] == {name: i for i, name in enumerate(MODEL_CLASSES[:16])}
    assert _identifiers(paths.test_images) == [f"{c}_0000" for c in TEST]



def test_the_datasets_are_described_by_the_batchs_dataset_json_builder(done):
    """One dataset.json builder (``batch_layout.nnunet_dataset``): nnU-Net's keys in its order, then the record."""
    from CTSemanticSynthLib.batch_layout import nnunet_dataset

    for kind in datasets.KINDS:
        meta = json.loads((_dataset(done["paths"], kind) / "dataset.json").read_text())
        assert list(meta) == [*nnunet_dataset("name", "description", {}, 0), "ctsynth"]
        assert meta == nnunet_dataset(datasets.dataset_name(501, kind), meta["description"], meta["labels"],
                                      meta["numTraining"], ctsynth=meta["ctsynth"])

def test_real_images_are_linked_not_copied_and_samples_share_their_case_label(done, inputs):
    paths = done["paths"]
    for kind in ("real", "real+synthetic"):
        linked = _dataset(paths, kind) / "imagesTr" / "case_01_0000.nii.gz"
        assert os.path.samefile(linked, inputs["cts"] / "case_01.nii.gz")
    assert os.path.samefile(paths.test_images / "case_05_0000.nii.gz", inputs["cts"] / "case_05.nii.gz")
    converted = paths.converted / "case_03.nii.gz"  # the .nrrd CT, once as .nii.gz, linked from both datasets
    assert [p.name for p in paths.converted.iterdir()] == ["case_03.nii.gz"]
    for kind in ("real", "real+synthetic"):
        assert os.path.samefile(_dataset(paths, kind) / "imagesTr" / "case_03_0000.nii.gz", converted)
    original, copy = read_image(inputs["cts"] / "case_03.nrrd"), read_image(converted)
    assert copy.same_grid(original) and np.array_equal(copy.array, original.array)
    labels = _dataset(paths, "synthetic") / "labelsTr"
    assert os.path.samefile(labels / "case_02_s1.nii.gz", paths.label("case_02"))
    assert os.path.samefile(_dataset(paths, "real") / "labelsTr" / "case_02.nii.gz", paths.label("case_02"))


def test_labels_are_the_organs_with_body_as_background(done, inputs):
    label, _ = read_labelmap(done["paths"].label("case_03"))
    source, _ = read_labelmap(inputs["segs"] / "case_03.nii.gz")
    assert label.same_grid(source)
    np.testing.assert_array_equal(label.array, source.array)  # AMOS ids in, no body class out
    assert MODEL_CLASSES.index("body") not in np.unique(label.array)


def test_provenance_names_the_model_and_each_samples_seed(done, inputs):
    from CTSemanticSynthLib.checkpoint import load_model

    sha = load_model(str(inputs["model"])).sha256
    for kind in ("real+synthetic", "synthetic"):
        record = json.loads((_dataset(done["paths"], kind) / "dataset.json").read_text())["ctsynth"]
        assert record["model"]["sha256"] == sha and record["samples_per_label_map"] == 2
        assert record["seeds"] == {f"{c}_s{k}": job_seed(3, c, k) for c in TRAIN for k in range(2)}
    real = json.loads((_dataset(done["paths"], "real") / "dataset.json").read_text())["ctsynth"]
    assert "model" not in real and real["synthetic_cases"] == 0


def test_nnunet_accepts_a_built_dataset(done, monkeypatch):
    paths = done["paths"]
    for var, folder in (("nnUNet_raw", paths.raw), ("nnUNet_preprocessed", paths.preprocessed),
                        ("nnUNet_results", paths.results)):
        monkeypatch.setenv(var, str(folder))
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(str(_dataset(paths, "real+synthetic")), 1)


def test_nnunet_runs_with_its_folders_in_the_study_and_cpu_settings(done):
    calls, paths = done["fake"].calls, done["paths"]
    assert [c[0] for c in calls] == ["nnUNetv2_plan_and_preprocess", "nnUNetv2_train", "nnUNetv2_predict"] * 3
    plan, train, predict = calls[:3]
    assert plan[1][:4] == ["-d", "501", "-c", "2d"] and "--verify_dataset_integrity" in plan[1]
    assert train[1] == ["501", "2d", "all", "-tr", "nnUNetTrainer_1epoch", "-device", "cpu", "--c"]
    assert "--disable_tta" in predict[1] and predict[1][predict[1].index("-i") + 1] == str(paths.test_images)
    for _, _, env in calls:
        assert env["nnUNet_raw"] == str(paths.raw) and env["nnUNet_results"] == str(paths.results)
        assert env["nnUNet_compile"] == "f" and env["PYTHONIOENCODING"] == "utf-8"
        assert env["CTSYNTH_NNUNET_THREADS"] == "1"
    assert plan[2]["nnUNet_n_proc_DA"] == "1" and train[2]["nnUNet_n_proc_DA"] == "0"


def _summary(report_md: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(report_md.parent / "dice_summary.csv", newline="") as f:
        return {(row["organ"], row["dataset"]): row for row in csv.DictReader(f)}


def test_report_table_scores_each_model_on_the_test_cases(done):
    rows = _summary(done["report"])
    assert {organ for organ, _ in rows} == set(ORGANS_PRESENT) | {"mean"}
    assert {kind for _, kind in rows} == {"real", "real+synthetic", "synthetic"}
    for organ in ORGANS_PRESENT:
        assert float(rows[organ, "real"]["mean_dice"]) == 1.0 and rows[organ, "real"]["cases"] == "2"
        assert float(rows[organ, "synthetic"]["mean_dice"]) == 0.0
        assert float(rows[organ, "real+synthetic"]["mean_dice"]) == (0.0 if organ == "liver" else 1.0)
    assert float(rows["mean", "real+synthetic"]["mean_dice"]) == pytest.approx(0.8)
    assert float(rows["mean", "real"]["ci95_low"]) == 1.0 == float(rows["mean", "real"]["ci95_high"])
    text = done["report"].read_text()
    assert "| organ | real | real+synthetic | synthetic |" in text
    assert "| Liver | 1.000 [1.000, 1.000] (n=2) | 0.000 [0.000, 0.000] (n=2) |" in text
    assert "MedSegFactory" in text and "MAISI-v2" in text and "not comparable" in text
    assert "smoke run" in text  # a short trainer is named as such
    assert (done["report"].parent / "dice_per_organ.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(done["report"].parent / "dice_per_case.csv", newline="") as f:
        assert sum(1 for _ in csv.DictReader(f)) == 3 * len(TEST) * 16  # 15 organs + mean


def test_a_finished_study_runs_no_step_again(done, inputs):
    fake = FakeNnUNet()
    messages: list[str] = []
    md = run_study(settings(inputs), study(inputs["root"] / "study", fake), messages.append)
    assert fake.calls == [] and md == done["report"]
    assert all(m.endswith("done earlier, skipped") for m in messages)


def test_an_interrupted_step_runs_again_cleanly_and_only_it(done, inputs, tmp_path):
    folder = tmp_path / "study"
    shutil.copytree(inputs["root"] / "study", folder, symlinks=True)
    paths = StudyPaths(folder)
    predict = f"predict-{datasets.dataset_name(501, 'synthetic')}-2d_nnUNetTrainer_1epoch_foldall_notta"
    (paths.steps / f"{predict}.json").unlink()
    shutil.rmtree(paths.predictions / datasets.dataset_name(501, "synthetic"))
    with pytest.raises(KeyboardInterrupt):
        run_study(settings(inputs), study(folder, FakeNnUNet(interrupt="nnUNetv2_predict")))
    target = paths.predictions / datasets.dataset_name(501, "synthetic")
    assert not (target / "2d_nnUNetTrainer_1epoch_foldall_notta").exists()
    assert [p.name for p in target.iterdir()] == []  # the half-written folder is gone
    fake = FakeNnUNet()
    run_study(settings(inputs), study(folder, fake))
    assert [c[0] for c in fake.calls] == ["nnUNetv2_predict"]
    train = f"train-{datasets.dataset_name(501, 'real')}-2d_nnUNetTrainer_1epoch_foldall_notta"
    (paths.steps / f"{train}.json").unlink()
    fake = FakeNnUNet()
    run_study(settings(inputs), study(folder, fake))
    assert fake.calls[0][0] == "nnUNetv2_train" and fake.calls[0][1][-1] == "--c"  # nnU-Net resumes its checkpoint
    assert [c[0] for c in fake.calls[1:]] == ["nnUNetv2_predict"]  # a model trained again is tested again


def test_a_study_folder_refuses_other_inputs(done, inputs):
    with pytest.raises(InputError, match=r"other inputs \(samples differ\)"):
        run_study(settings(inputs, samples=3), study(inputs["root"] / "study", FakeNnUNet()))


def test_summarise_is_the_student_t_interval_over_cases():
    s = report.summarise([0.6, 0.7, 0.8, math.nan])
    half = 4.302653 * 0.1 / math.sqrt(3)  # t(0.975, 2 dof) from a table
    assert (s.cases, s.mean) == (3, pytest.approx(0.7))
    assert (s.low, s.high) == (pytest.approx(0.7 - half, abs=1e-6), pytest.approx(0.7 + half, abs=1e-6))
    wide = report.summarise([0.1, 0.95])  # t interval beyond Dice's range: clipped
    assert (wide.low, wide.high) == (0.0, 1.0)
    one = report.summarise([0.7])
    assert one.cases == 1 and one.mean == 0.7 and math.isnan(one.low)
    assert report.summarise([math.nan]).cases == 0


def test_score_predictions_uses_the_projects_dice(tmp_path):
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    ref = np.zeros((4, 4, 2), np.uint8)
    ref[:2, :, 0] = 6  # 8 liver voxels
    pred = np.zeros_like(ref)
    pred[:1, :, 0] = 6  # 4 of them
    pred[3, 3, 1] = 1  # a spleen the reference does not have
    for folder, array in (("labels", ref), ("pred", pred)):
        (tmp_path / folder).mkdir()
        write_volume(Volume(array, affine), tmp_path / folder / "a.nii.gz")
    scores = report.score_predictions(tmp_path / "pred", tmp_path / "labels", ["a"])["a"]
    assert scores["liver"] == pytest.approx(2 * 4 / 12) and scores["spleen"] == 0.0 and math.isnan(scores["aorta"])
    assert scores["mean"] == pytest.approx((2 * 4 / 12) / 2)
    with pytest.raises(InputError, match="no prediction for test case 'b'"):
        report.score_predictions(tmp_path / "pred", tmp_path / "labels", ["b"])


def test_link_falls_back_to_a_symlink_then_a_copy(tmp_path, monkeypatch):
    source = tmp_path / "a.txt"
    source.write_text("x")
    assert datasets.link(source, tmp_path / "hard") == "hardlink"

    def refuse(*args):
        raise OSError("not here")

    monkeypatch.setattr(os, "link", refuse)
    assert datasets.link(source, tmp_path / "soft") == "symlink" and (tmp_path / "soft").is_symlink()
    monkeypatch.setattr(os, "symlink", refuse)
    assert datasets.link(source, tmp_path / "copy") == "copy" and (tmp_path / "copy").read_text() == "x"


def test_a_failed_nnunet_child_is_one_line_naming_its_log(tmp_path):
    log = tmp_path / "logs" / "x.log"
    expected = r"nnUNetv2_train exited with status 2: .*arguments are required.*\(full log: .*x\.log\)"
    with pytest.raises(StepFailed, match=expected):
        nnunet.run_child("nnUNetv2_train", ["--trainer"], os.environ, log)
    assert log.read_text(encoding="utf-8").startswith("$ nnUNetv2_train --trainer")


def test_the_launcher_caps_nnunets_cpu_count_when_asked():
    import subprocess
    import sys

    probe = nnunet._LAUNCH.replace("sys.exit(entry.load()())", "print(multiprocessing.cpu_count())")
    for threads, expected in (("3", "3"), (None, str(os.cpu_count()))):
        env = {k: v for k, v in os.environ.items() if k != nnunet.THREADS_VARIABLE}
        env.update({} if threads is None else {nnunet.THREADS_VARIABLE: threads})
        out = subprocess.run([sys.executable, "-c", probe, "nnUNetv2_train"], env=env, capture_output=True, check=True)
        assert out.stdout.decode().strip() == expected


def _run_main(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


def _args(inputs, folder, *extra):
    return ["--cts", inputs["cts"], "--segs", inputs["segs"], "--labels", "amos", "--test", inputs["test"],
            "--model", inputs["model"], "--samples", "1", "--study", folder, "--device", "cpu",
            "--trainer", "nnUNetTrainer_1epoch", *extra]


@pytest.mark.parametrize("case, message", [
    ("in_train", "case 'case_04' is in --train and in --test; a test case must be held out of training"),
    ("unknown_test", "--test case 'case_09' has no label map in --segs"),
    ("no_ct", "--test case 'case_05' has no CT in --cts"),
    ("same_file", "test case 'case_04' uses"),
    ("trainer", "--trainer nnUNetTrainer_2epochs: nnU-Net 2.6.0 has no such trainer"),
    ("off_grid", "case 'case_01': its label map"),
    ("not_a_study", "is not empty and holds no study.json"),
    ("ct_is_labels", "case 'case_01': its CT"),
    ("study_uncreatable", "cannot be created"),
    ("fold", "--fold 0 needs 5 or more real training cases (there are 4); use --fold all"),
])
def test_bad_inputs_are_one_line_and_write_nothing(inputs, tmp_path, capsys, monkeypatch, case, message):
    def no_nnunet(*args):
        raise AssertionError("nnU-Net was reached")

    monkeypatch.setattr(nnunet, "run_child", no_nnunet)
    cts, segs = tmp_path / "cts", tmp_path / "segs"
    shutil.copytree(inputs["cts"], cts)
    shutil.copytree(inputs["segs"], segs)
    extra: list = []
    folder = tmp_path / "study"
    test = tmp_path / "test.txt"
    test.write_text("case_04\ncase_05\n")
    if case == "in_train":
        (tmp_path / "train.txt").write_text("case_00\ncase_04\n")
        extra = ["--train", tmp_path / "train.txt"]
    elif case == "unknown_test":
        test.write_text("case_09\n")
    elif case == "no_ct":
        (cts / "case_05.nii.gz").unlink()
    elif case == "same_file":
        (cts / "case_04.nii.gz").unlink()
        os.link(cts / "case_00.nii.gz", cts / "case_04.nii.gz")
    elif case == "trainer":
        extra = ["--trainer", "nnUNetTrainer_2epochs"]
    elif case == "study_uncreatable":
        (tmp_path / "file").write_text("")
        folder = tmp_path / "file" / "study"
    elif case == "ct_is_labels":
        shutil.copy(segs / "case_01.nii.gz", cts / "case_01.nii.gz")
    elif case == "fold":
        extra = ["--fold", "0"]
    elif case == "off_grid":
        seg, _ = read_labelmap(segs / "case_01.nii.gz")
        write_volume(Volume(seg.array, np.diag([3.0, 3.0, 5.0, 1.0])), segs / "case_01.nii.gz", overwrite=True)
    elif case == "not_a_study":
        (tmp_path / "study").mkdir()
        (tmp_path / "study" / "notes.txt").write_text("mine")
    args = _args({**inputs, "cts": cts, "segs": segs, "test": test}, folder, *extra)
    code, err = _run_main(capsys, *args)
    lines = err.splitlines()
    assert code == 2 and "Traceback" not in err and sum("error" in line for line in lines) == 1
    assert lines[-1].startswith("downstream: error: ") and message in lines[-1]
    if case == "not_a_study":
        assert [p.name for p in (tmp_path / "study").iterdir()] == ["notes.txt"]
    elif case not in ("off_grid", "ct_is_labels"):  # found before anything is written
        assert not (tmp_path / "study").exists()


@pytest.mark.slow
def test_whole_study_with_nnunet_on_the_cpu(inputs, tmp_path, capsys):
    """The real thing: nnU-Net plans, trains one epoch and predicts for each dataset (tens of minutes on 2 busy
    cores); the numbers mean nothing, the pipeline working end to end does."""
    folder = tmp_path / "study"
    args = _args(inputs, folder, "--no-tta", "--processes", "1", "--threads", "1")
    assert main([str(a) for a in args]) == 0
    out = capsys.readouterr().out
    assert "| organ | real | real+synthetic | synthetic |" in out and "| Mean over organs |" in out
    rows = _summary(folder / "report" / "2d_nnUNetTrainer_1epoch_foldall_notta" / "downstream.md")
    assert {kind for _, kind in rows} == {"real", "real+synthetic", "synthetic"}
    assert all(0.0 <= float(r["mean_dice"]) <= 1.0 for r in rows.values() if r["mean_dice"])
    counts = {kind: json.loads((_dataset(StudyPaths(folder), kind) / "dataset.json").read_text())["numTraining"]
              for kind in ("real", "real+synthetic", "synthetic")}
    assert counts == {"real": 4, "real+synthetic": 8, "synthetic": 4}
    assert main([str(a) for a in args]) == 0  # resumed: every step skipped
    steps = capsys.readouterr().err.splitlines()[:-1]
    assert len(steps) == 3 + 3 * 3 and all(line.endswith("done earlier, skipped") for line in steps)


def test_cts_come_from_several_folders_in_either_naming(tmp_path):
    for folder, name in (("a", "case_a.nii.gz"), ("b", "case_b_0000.nii.gz")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_bytes(b"")
    found = datasets.find_cts([tmp_path / "a", tmp_path / "b"])
    assert found == {"case_a": tmp_path / "a" / "case_a.nii.gz", "case_b": tmp_path / "b" / "case_b_0000.nii.gz"}
    (tmp_path / "b" / "case_a_0000.nii.gz").write_bytes(b"")
    with pytest.raises(InputError, match="are both case 'case_a'"):
        datasets.find_cts([tmp_path / "a", tmp_path / "b"])
