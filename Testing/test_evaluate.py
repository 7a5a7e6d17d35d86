"""`ctsynth evaluate` on the bundled sample and `training.evaluate` on a tiny slice cache: report files produced,
parseable and right; resumable sampling; the errors a user can make."""

import csv
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from CTSemanticSynthLib.cli import main
from CTSemanticSynthLib.io import Volume, read_image, read_labelmap, write_volume
from CTSemanticSynthLib.labels import MODEL_CLASSES, class_set as class_set_named
from CTSemanticSynthLib.metrics import axial_unit_slices, psnr, ssim, to_model_slices
from CTSemanticSynthLib.metrics.paper import PAPER_RESULTS
from CTSemanticSynthLib.preprocess import AxialOrientation
from CTSemanticSynthLib.synthesis import prepare_classes

from conftest import SAMPLE_CT, SAMPLE_SEG, make_anatomy_model_folder, single_thread, tiny_model_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def noisy_synthetic(tmp_path_factory) -> Path:
    """Stand-in for a synthetic CT: the real one, clipped to the window, plus noise (no model needed)."""
    ct = read_image(SAMPLE_CT)
    noise = np.random.default_rng(0).normal(0, 25, ct.shape)
    path = tmp_path_factory.mktemp("eval") / "syn.nii.gz"
    write_volume(Volume(np.clip(ct.array + noise, -1000, 240).astype(np.int16), ct.affine), path)
    return path


def evaluate(capsys, *argv) -> tuple[int, str, str]:
    code = main(["evaluate", *[str(a) for a in argv]])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_report_table_and_json(capsys, tmp_path, noisy_synthetic):
    report_path = tmp_path / "report.json"
    code, out, err = evaluate(capsys, "--real", SAMPLE_CT, "--synthetic", noisy_synthetic, "--seg", SAMPLE_SEG,
                              "--labels", "totalseg", "--json", report_path)
    assert code == 0, err
    assert "Liver" in out and "HU real" in out and "PSNR" in out and "Esophagus" not in out  # absent organ
    report = json.loads(report_path.read_text())
    seg, names = read_labelmap(SAMPLE_SEG)
    ct, syn = read_image(SAMPLE_CT), read_image(noisy_synthetic)
    liver = seg.array == 5  # TotalSegmentator v2 liver
    windowed = np.clip(ct.array, -160, 240)  # the real CT as the model could reproduce it
    assert report["hu_real"]["liver"]["mean"] == pytest.approx(float(windowed[liver].mean()), rel=1e-5)
    assert report["hu_real"]["stomach"]["mean"] > float(ct.array[seg.array == 6].mean())  # gas clipped at -160
    assert report["hu_synthetic"]["liver"]["mean"] == pytest.approx(float(syn.array[liver].mean()), rel=1e-5)
    assert report["voxels"]["liver"] == int(liver.sum()) and report["voxels"]["esophagus"] == 0
    classes, _ = prepare_classes(seg, names, "totalseg")
    stack = AxialOrientation.from_affine(seg.affine).to_stack(classes.array)
    active = np.flatnonzero(stack.reshape(len(stack), -1).any(axis=1))
    a = axial_unit_slices(ct.array, ct.affine, active)
    b = axial_unit_slices(syn.array, syn.affine, active)
    assert a.shape[1:] == (256, 256) and report["image"]["slices"] == len(active)
    assert report["image"]["psnr"]["mean"] == pytest.approx(float(np.mean(psnr(a, b))))
    assert report["image"]["ssim"]["mean"] == pytest.approx(float(np.mean(ssim(a, b))))
    assert 15 < report["image"]["psnr"]["mean"] < 40 and 0 < report["image"]["ssim"]["mean"] < 1
    assert report["inputs"]["labels"] == "totalseg" and "totalseg" not in report
    # the paper set's layout: the 15 organs (no body, no difference, no air means), headed 'organ', no group lines
    assert list(report["voxels"]) == list(MODEL_CLASSES[1:16]) and "hu_difference" not in report
    assert out.startswith("organ ") and "difference" not in out and "AMOS organs:" not in out


def test_cli_fid_per_plane_with_a_stand_in_feature_extractor(capsys, tmp_path, monkeypatch):
    import CTSemanticSynthLib.metrics.inception as inception

    class Means:  # cheap stand-in for Inception: the plumbing is under test, not the network
        path, sha1 = Path("stand-in.pt"), "0"

        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, slices):
            s = slices.double()
            return torch.stack([s.mean((1, 2)), s.std((1, 2))], 1).numpy()

    monkeypatch.setattr(inception, "InceptionFeatures", Means)
    code, out, err = evaluate(capsys, "--real", SAMPLE_CT, "--synthetic", SAMPLE_CT, "--seg", SAMPLE_SEG, "--fid",
                              "--json", tmp_path / "r.json")
    assert code == 0, err
    planes = json.loads((tmp_path / "r.json").read_text())["fid_per_plane"]
    assert set(planes) == {"axial", "coronal", "sagittal"}
    assert all(v["fid"] == pytest.approx(0.0, abs=1e-9) and v["n_real"] > 50 for v in planes.values())
    assert "FID coronal" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["image"]["psnr"]["mean"] is None  # identical volumes: infinite PSNR is written as null


def test_cli_refuses_bad_inputs_in_one_line(capsys, tmp_path, noisy_synthetic, monkeypatch):
    existing = tmp_path / "exists.json"
    existing.write_text("{}")
    code, _, err = evaluate(capsys, "--synthetic", noisy_synthetic, "--seg", SAMPLE_SEG, "--json", existing)
    assert code == 2 and "--overwrite" in err and err.count("\n") == 1
    shifted = read_image(noisy_synthetic)
    moved = tmp_path / "moved.nii.gz"
    affine = shifted.affine.copy()
    affine[0, 3] += 5000  # a grid that overlaps is resampled (Testing/test_bad_inputs.py); one that does not is refused
    write_volume(Volume(shifted.array, affine), moved)
    code, _, err = evaluate(capsys, "--synthetic", moved, "--seg", SAMPLE_SEG)
    assert code == 2 and "does not overlap the segmentation" in err and err.count("\n") == 1
    code, _, err = evaluate(capsys, "--synthetic", noisy_synthetic, "--seg", SAMPLE_SEG, "--fid")
    assert code == 2 and "--fid needs --real" in err
    for flag in ("--synthetic", "--real"):  # a label map where a CT is expected: its values would be taken as HU
        given = {"--synthetic": noisy_synthetic, "--real": SAMPLE_CT, flag: SAMPLE_SEG}
        code, _, err = evaluate(capsys, "--synthetic", given["--synthetic"], "--real", given["--real"], "--seg",
                                SAMPLE_SEG, "--json", tmp_path / "labels.json")
        assert code == 2 and err.count("\n") == 1, err
        assert f"{flag} {SAMPLE_SEG} looks like a label map, not a CT: it holds " in err and "give the CT file" in err
        assert not (tmp_path / "labels.json").exists()
    pytest.importorskip("totalsegmentator")
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(tmp_path / "no-weights"))
    code, _, err = evaluate(capsys, "--synthetic", noisy_synthetic, "--seg", SAMPLE_SEG, "--totalseg")
    assert code == 2 and "Dataset297_TotalSegmentator_total_3mm_1559subj" in err and str(tmp_path) in err


def test_an_interrupt_after_the_report_went_in_names_it(capsys, tmp_path, noisy_synthetic, monkeypatch):
    from CTSemanticSynthLib.io import atomic

    real_fsync = atomic._fsync

    def interrupted_after_the_renames(path):
        real_fsync(path)
        if path == tmp_path:  # the folder, flushed once the report is in place
            raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "_fsync", interrupted_after_the_renames)
    code, out, err = evaluate(capsys, "--synthetic", noisy_synthetic, "--seg", SAMPLE_SEG, "--labels", "totalseg",
                              "--json", tmp_path / "r.json")
    assert code == 130 and out == ""  # the table was not printed
    assert err.endswith(f"ctsynth: interrupted after writing {tmp_path / 'r.json'} (complete); the run did not "
                        "finish\n"), err
    assert json.loads((tmp_path / "r.json").read_text())["inputs"]["labels"] == "totalseg"


# --- ctsynth evaluate of an anatomy-set synthetic CT ---------------------------------------------------

VERTEBRAE_OFFSET, LIVER_OFFSET, COLON_GAS_HU = 50, -30, -300


def _members(class_name: str) -> np.ndarray:
    """TotalSegmentator v2 ids of the anatomy class ``class_name`` (from its names, not through the adapter)."""
    from CTSemanticSynthLib.labels import class_from_name, class_set, totalsegmentator_names

    anatomy = class_set("anatomy")
    return np.array([v for v, n in totalsegmentator_names(2).items()
                     if class_from_name(n, anatomy) == anatomy.classes.index(class_name)])


@pytest.fixture(scope="module")
def anatomy_evaluation(tmp_path_factory) -> tuple[str, dict, list]:
    """`ctsynth evaluate --real --totalseg --json` of a stand-in anatomy-model synthetic CT: the real CT within
    -1024..2000 HU, +50 HU in the vertebrae, -30 HU in the liver, -300 HU where the colon holds gas, with a sidecar
    naming the anatomy set and the full-range mapping. TotalSegmentator stands in: on the synthetic CT it finds the
    input labels, on the real CT the same without the ribs. Returns (stdout, JSON report, TotalSegmentator's inputs)."""
    import contextlib
    import io

    import CTSemanticSynthLib.totalseg as totalseg
    from CTSemanticSynthLib.intensity import FULL_RANGE
    from CTSemanticSynthLib.labels import class_set

    folder = tmp_path_factory.mktemp("anatomy_eval")
    ct, (seg, _) = read_image(SAMPLE_CT), read_labelmap(SAMPLE_SEG)
    hu = np.clip(ct.array, -1024, 2000)
    hu = np.where(np.isin(seg.array, _members("vertebrae")), hu + VERTEBRAE_OFFSET, hu)
    hu = np.where(np.isin(seg.array, _members("liver")), hu + LIVER_OFFSET, hu)
    hu = np.where(np.isin(seg.array, _members("colon")) & (ct.array < -500), COLON_GAS_HU, hu)
    write_volume(Volume(hu.astype(np.int16), ct.affine), folder / "syn.nii.gz")
    anatomy = class_set("anatomy")
    (folder / "syn.json").write_text(json.dumps({"synthetic": True, "class_set": "anatomy",
                                                 "classes": list(anatomy.classes), "intensity": FULL_RANGE.config()}))
    no_ribs = np.where(np.isin(seg.array, _members("ribs")), 0, seg.array)
    found, seen = [seg.array, no_ribs], []
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()) as out:
        patch.setattr(totalseg, "check_totalsegmentator", lambda fast=True, env=None: folder)
        patch.setattr(totalseg, "run_totalsegmentator",
                      lambda volume, **kwargs: seen.append(volume) or Volume(found[len(seen) - 1], volume.affine))
        code = main(["evaluate", "--synthetic", str(folder / "syn.nii.gz"), "--seg", str(SAMPLE_SEG), "--real",
                     str(SAMPLE_CT), "--labels", "totalseg", "--totalseg", "--json", str(folder / "r.json"),
                     "--save-totalseg", str(folder / "ts.nii.gz")])
    assert code == 0
    return out.getvalue(), json.loads((folder / "r.json").read_text()), seen


def test_an_anatomy_synthetic_is_scored_per_class_of_its_set_in_its_range(anatomy_evaluation):
    """Every anatomy class present has its HU, synthetic vs real clipped to the recorded mapping, the difference, and
    for lung/colon/small bowel the means where the real CT is air."""
    _, report, _ = anatomy_evaluation
    ct, (seg, names) = read_image(SAMPLE_CT), read_labelmap(SAMPLE_SEG)
    present = {"liver", "spleen", "vertebrae", "ribs", "pelvis", "femur", "autochthon", "iliopsoas", "gluteus",
               "colon", "small_bowel", "lung", "sternum_cartilage", "spinal_cord", "other_vessels", "body"}
    assert present <= {name for name, n in report["voxels"].items() if n}
    assert report["voxels"]["heart"] == 0 and report["hu_real"]["heart"]["mean"] is None  # absent: no mean
    real = np.clip(ct.array.astype(np.float64), -1024, 2000)  # full range: femur and lung beyond the paper window
    for name in ("femur", "lung", "ribs", "autochthon"):
        mask = np.isin(seg.array, _members(name))
        assert report["voxels"][name] == int(mask.sum())
        assert report["hu_real"][name]["mean"] == pytest.approx(real[mask].mean(), abs=0.01)
    assert report["hu_real"]["femur"]["mean"] > 240 and report["hu_real"]["lung"]["mean"] < -500
    assert report["hu_difference"]["vertebrae"] == pytest.approx(VERTEBRAE_OFFSET, abs=0.05)
    assert report["hu_difference"]["liver"] == pytest.approx(LIVER_OFFSET, abs=0.05)
    assert abs(report["hu_difference"]["femur"]) < 0.05 and abs(report["hu_difference"]["body"]) < 0.05
    anatomy = class_set_named("anatomy")
    body = prepare_classes(seg, names, "totalseg", reference=ct, classes=anatomy)[0].array == 16
    hull = prepare_classes(seg, names, "totalseg", classes=anatomy)[0].array == 16
    assert report["voxels"]["body"] == int(body.sum()) != int(hull.sum())  # inside the real CT's outline, with --real
    assert report["hu_real"]["body"]["mean"] == pytest.approx(real[body].mean(), abs=0.01)
    colon_air = np.isin(seg.array, _members("colon")) & (ct.array < -500)
    assert report["hu_where_air"]["colon"] == pytest.approx({"voxels": int(colon_air.sum()),
                                                             "real": float(real[colon_air].mean()),
                                                             "synthetic": COLON_GAS_HU}, abs=0.01)
    assert report["hu_where_air"]["colon"]["real"] < -500 and report["hu_where_air"]["lung"]["real"] < -500
    assert set(report["hu_where_air"]) == {"lung", "small_bowel", "colon"}
    assert report["synthetic_provenance"]["class_set"] == "anatomy"


def test_totalsegmentator_dice_of_an_anatomy_synthetic_covers_its_classes(anatomy_evaluation, tmp_path):
    """TotalSegmentator's structures are mapped onto the anatomy set: Dice for bones, muscles, bowel, lung, ...,
    not for body; the saved label map holds anatomy class ids."""
    out, report, seen = anatomy_evaluation
    ts = report["totalseg"]
    for name in ("liver", "vertebrae", "ribs", "femur", "gluteus", "colon", "lung", "spinal_cord"):
        assert ts["synthetic"][name] == 1.0, name
    assert ts["real"]["ribs"] == 0.0 and ts["real"]["vertebrae"] == 1.0  # the real CT's run found no ribs
    assert ts["synthetic"]["heart"] is None and "body" not in ts["synthetic"]  # absent on both sides; body unscored
    assert ts["mean_synthetic"] == 1.0 and ts["mean_real"] < 1.0
    assert ts["reference_voxels"]["ribs"] == report["voxels"]["ribs"] > 0
    assert "clipped to -1024..2000 HU (full_range)" in ts["intensity"] and len(seen) == 2
    saved, _ = read_labelmap(Path(report["inputs"]["synthetic"]).with_name("ts.nii.gz"))
    seg, _ = read_labelmap(SAMPLE_SEG)
    vertebrae = class_set_named("anatomy").classes.index("vertebrae")
    np.testing.assert_array_equal(saved.array == vertebrae, np.isin(seg.array, _members("vertebrae")))
    assert re.search(r"^Ribs +\d+ .* 1\.000 +0\.000$", out, re.M), out
    assert ts["not_expressible"] == [] and "not scored" not in out  # TotalSegmentator labels hold every class


def test_totalsegmentator_dice_against_amos_labels_leaves_out_what_they_cannot_hold(anatomy_evaluation, tmp_path,
                                                                                    monkeypatch, capsys):
    """The anatomy synthetic scored against AMOS labels (the 15 organs; all else is body): TotalSegmentator's bones,
    lungs and muscles are left out, named in the JSON and in one line of the text, not scored 0; the organs keep
    their Dice."""
    import CTSemanticSynthLib.totalseg as totalseg
    from CTSemanticSynthLib.labels import totalsegmentator_adapter

    _, tseg_report, _ = anatomy_evaluation
    seg, _ = read_labelmap(SAMPLE_SEG)
    organs = totalsegmentator_adapter(2).classes(seg.array)[0]  # the paper set's classes are AMOS ids
    write_volume(Volume(np.where(organs < 16, organs, 0).astype(np.uint8), seg.affine), tmp_path / "amos.nii.gz")
    monkeypatch.setattr(totalseg, "check_totalsegmentator", lambda fast=True, env=None: tmp_path)
    monkeypatch.setattr(totalseg, "run_totalsegmentator", lambda volume, **kwargs: Volume(seg.array, volume.affine))
    code, out, _ = evaluate(capsys, "--synthetic", tseg_report["inputs"]["synthetic"], "--seg",
                            tmp_path / "amos.nii.gz", "--labels", "amos", "--totalseg", "--json", tmp_path / "r.json")
    assert code == 0
    ts = json.loads((tmp_path / "r.json").read_text())["totalseg"]
    anatomy = class_set_named("anatomy")
    assert list(ts["synthetic"]) == list(MODEL_CLASSES[1:16])  # the 15 organs only
    assert ts["synthetic"]["liver"] == ts["synthetic"]["spleen"] == 1.0 and ts["mean_synthetic"] == 1.0
    assert {"ribs", "vertebrae", "lung", "femur", "autochthon"} <= set(ts["not_expressible"])
    assert set(ts["not_expressible"]) | set(ts["synthetic"]) == {anatomy.classes[c] for c in anatomy.labelled}
    assert tseg_report["totalseg"]["synthetic"]["ribs"] == 1.0  # TotalSegmentator labels: ribs scored
    note = [line for line in out.splitlines() if line.startswith("not scored")]
    assert len(note) == 1 and "ribs" in note[0] and "vertebrae" in note[0], out
    assert not re.search(r"^Ribs ", out, re.M)  # no row of a class that is neither labelled nor scored


def test_the_anatomy_table_lists_organs_then_the_groups_of_docs_anatomy(anatomy_evaluation):
    out, report, _ = anatomy_evaluation
    lines = out.splitlines()
    assert lines[0].split() == ["class", "voxels", "HU", "real", "HU", "synthetic", "difference", "Dice", "syn",
                                "Dice", "real"]
    headings = [line for line in lines if line.endswith(":") and not line[0].isspace()]
    assert headings[:7] == ["AMOS organs:", "Chest:", "Bowel:", "Bones:", "Brain and spinal cord:", "Muscles:",
                            "Vessels, cysts, glands:"]
    assert headings[7] == "Body: fat and unlabelled tissue:"
    first = [line.split("  ")[0].strip() for line in lines]
    order = ["Spleen", "Liver", "Prostate/uterus", "Lungs and airways", "Small bowel", "Colon", "Vertebrae", "Ribs",
             "Femurs", "Spinal cord", "Autochthonous back muscles", "Gluteal muscles", "Other large vessels", "Body"]
    assert [first.index(name) for name in order] == sorted(first.index(name) for name in order)
    assert first.index("Body") < first.index("mean Dice")
    assert re.search(rf"^Vertebrae +{report['voxels']['vertebrae']} .* \+50 ", out, re.M)
    assert "Heart" not in out and "Esophagus" not in out  # absent classes are not listed
    air = lines.index("mean HU where the real CT is air (below -500 HU):")
    colon = report["hu_where_air"]["colon"]
    assert lines[air + 1].split()[:4] == ["Lungs", "and", "airways", str(report["hu_where_air"]["lung"]["voxels"])]
    assert lines[air + 3].split() == ["Colon", str(colon["voxels"]), f"{colon['real']:.0f}", "-300"]


def test_a_provenance_naming_an_unknown_class_set_is_refused_in_one_line(capsys, tmp_path, noisy_synthetic):
    (tmp_path / "syn.nii.gz").write_bytes(noisy_synthetic.read_bytes())
    (tmp_path / "syn.json").write_text(json.dumps({"synthetic": True, "class_set": "organs-and-more"}))
    code, out, err = evaluate(capsys, "--synthetic", tmp_path / "syn.nii.gz", "--seg", SAMPLE_SEG)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert f"the provenance of --synthetic ({tmp_path / 'syn.json'}): unknown class set 'organs-and-more'" in err


def test_a_json_mapping_is_checked_against_the_synthetics_class_set(capsys, tmp_path, noisy_synthetic):
    """A mapping that names 'ribs' suits an anatomy synthetic and is refused for a paper one, before any volume is
    read (here the existing --json is what stops the accepted one)."""
    (tmp_path / "map.json").write_text(json.dumps({"5": "liver", "92": "ribs"}))
    (tmp_path / "exists.json").write_text("{}")
    (tmp_path / "syn.nii.gz").write_bytes(noisy_synthetic.read_bytes())
    argv = ("--synthetic", tmp_path / "syn.nii.gz", "--seg", SAMPLE_SEG, "--labels", tmp_path / "map.json", "--json",
            tmp_path / "exists.json")
    code, _, err = evaluate(capsys, *argv)
    assert code == 2 and "target 'ribs' for '92' is not a class of the 'paper' set" in err
    (tmp_path / "syn.json").write_text(json.dumps({"synthetic": True, "class_set": "anatomy"}))
    code, _, err = evaluate(capsys, *argv)
    assert code == 2 and "ribs" not in err and "--overwrite" in err



# --- training/holdout_check.py ------------------------------------------------------------------------

def test_holdout_rows_follow_the_class_set_and_the_intensity_mapping():
    """The real CT is clipped to the model's range, as `ctsynth evaluate` takes it; the rows are the set's classes."""
    from CTSemanticSynthLib.intensity import FULL_RANGE
    from CTSemanticSynthLib.labels import class_set
    from training.holdout_check import organ_means

    anatomy = class_set("anatomy")
    vertebrae = anatomy.classes.index("vertebrae")
    classes = np.array([6, 6, vertebrae, vertebrae, 16, 0])  # liver, vertebrae, body, background
    real = np.array([300.0, 100.0, 1500.0, 2500.0, -100.0, -1000.0])
    synthetic = np.array([150.0, 150.0, 900.0, 1100.0, -90.0, -1000.0])
    paper = organ_means(np.where(classes == vertebrae, 16, classes), real, synthetic)
    assert paper == [{"organ": "Liver", "voxels": 2, "real_hu": 170.0, "synthetic_hu": 150.0, "difference_hu": -20.0,
                      "is_organ": True}]  # 300 HU seen as 240: the paper's window
    rows = {r["organ"]: r for r in organ_means(classes, real, synthetic, anatomy, FULL_RANGE)}
    assert list(rows) == ["Liver", anatomy.display_names[vertebrae]]
    assert rows["Liver"]["real_hu"] == 200.0 and rows["Liver"]["is_organ"]
    vertebra_row = rows[anatomy.display_names[vertebrae]]
    assert vertebra_row["real_hu"] == pytest.approx(1750.0) and vertebra_row["difference_hu"] == pytest.approx(-750.0)
    assert not vertebra_row["is_organ"]


def test_holdout_check_of_an_anatomy_model_scores_its_classes_in_its_range(tmp_path, capsys):
    from training.holdout_check import main as holdout_main

    model = make_anatomy_model_folder(tmp_path / "anatomy")
    code = holdout_main(["--model", str(model), "--ct", str(SAMPLE_CT), "--seg", str(SAMPLE_SEG), "--labels",
                         "totalseg", "--preset", "fast", "--json", str(tmp_path / "rows.json"), "--tolerance", "1e9"])
    out = capsys.readouterr().out
    assert code == 0 and "| organ | voxels | real HU (-1024..2000) |" in out
    rows = {r["organ"]: r for r in json.loads((tmp_path / "rows.json").read_text())["rows"]}
    assert {"Liver", "Vertebrae", "Ribs"} <= set(rows) and not rows["Vertebrae"]["is_organ"]
    assert rows["Femurs"]["real_hu"] > 240 and rows["Lungs and airways"]["real_hu"] < -500  # beyond the window

# --- training/evaluate.py -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory) -> Path:
    from training.prepare import Case, prepare

    out = tmp_path_factory.mktemp("cache") / "c32"
    with single_thread():  # prepare forks workers
        prepare([Case("sample", SAMPLE_CT, SAMPLE_SEG, "train")], out, size=32, convention="totalseg", workers=0,
                holdout_every=8)
    return out


def _run_evaluate(out: Path, model: Path, cache: Path, *extra) -> int:
    from training.evaluate import main as evaluate_main

    return evaluate_main(["--model", f"tiny={model}", "--data", str(cache), "--out", str(out), "--max-slices", "4",
                          "--batch-size", "3", "--steps", "2", "--device", "cpu", *map(str, extra)])


def test_training_evaluate_writes_parseable_reports_and_resumes(tmp_path, tiny_cache, tiny_model, capsys):
    fid_flags = [] if _have_inception() else ["--no-fid"]
    out = tmp_path / "eval"
    assert _run_evaluate(out, tiny_model, tiny_cache, *fid_flags) == 0
    err = capsys.readouterr().err  # off a terminal: the progress display's lines, no bar
    assert "evaluate: sampling tiny 100% (4/4 slices" in err and "evaluate: metrics 100% (2/2 chunks" in err
    assert "\r" not in err
    results = json.loads((out / "results.json").read_text())
    model = results["models"][0]
    assert model["name"] == "tiny" and model["n_slices"] == 4 and results["settings"]["slices"] == 4
    assert 0 < model["ssim"] < 1 and math.isfinite(model["psnr"])
    if not fid_flags:
        assert model["fid"] > 0 and "kid" in model
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert rows[0]["source"] == "measured" and rows[0]["paper_method"] == "Conditional DDPM"
    assert rows[0]["fid_paper"] == "10.56" and rows[0]["psnr_paper"] == "16.26" and rows[0]["ssim_paper"] == "0.646"
    assert [r["method"] for r in rows[1:]] == list(PAPER_RESULTS)
    md = (out / "results.md").read_text()
    assert "| tiny | Conditional DDPM | 4 |" in md and "78.86" in md  # measured row + published Table 2
    figure = out / "figure.png"
    assert not figure.exists() or figure.read_bytes()[:4] == b"\x89PNG"

    # the metric wiring: PSNR from the cached chunks and the cache itself
    from training.dataset import SliceCache
    from training.evaluate import select_rows

    (sample_dir,) = (out / "samples").iterdir()
    chunks = sorted(sample_dir.glob("chunk_*.npy"))
    assert [np.load(c).shape[0] for c in chunks] == [3, 1]
    cache = SliceCache(tiny_cache, "test")
    images, _ = cache.batch(select_rows(len(cache), 4).tolist())
    synthetic = np.concatenate([np.load(c) for c in chunks]).astype(np.float32)
    expected = psnr(to_model_slices((images[:, 0] + 1) / 2), to_model_slices(torch.from_numpy(synthetic)))
    assert model["psnr"] == pytest.approx(float(np.mean(expected)), rel=1e-6)

    # resumable: existing chunks are kept, a missing one is sampled again, identically
    stamps = {c.name: c.stat().st_mtime_ns for c in chunks}
    first = np.load(chunks[1])
    chunks[1].unlink()
    assert _run_evaluate(out, tiny_model, tiny_cache, *fid_flags) == 0
    assert chunks[0].stat().st_mtime_ns == stamps[chunks[0].name]
    np.testing.assert_array_equal(np.load(chunks[1]), first)
    assert json.loads((out / "results.json").read_text())["models"][0]["psnr"] == pytest.approx(model["psnr"])


class _TwoCases:
    """Stands in for a SliceCache: case "a" has 8 slices valued 10..17, case "b" 3 slices valued 20..22."""

    def case_classes(self, case: str) -> np.ndarray:
        first, n = {"a": (10, 8), "b": (20, 3)}[case]
        return np.arange(first, first + n, dtype=np.uint8)[:, None, None].repeat(2, 1).repeat(2, 2)


@pytest.mark.parametrize("margin", [0, 1, 2])
def test_pseudo_volume_gives_each_pick_its_own_cases_neighbours(margin):
    from training.evaluate import pseudo_volume

    picks = [("a", 1), ("a", 2), ("b", 0), ("a", 6)]
    stack, at = pseudo_volume(_TwoCases(), picks, margin)
    values = stack[:, 0, 0].astype(int)
    expected = {("a", k): 10 + k for k in range(8)} | {("b", k): 20 + k for k in range(3)}
    assert [values[i] for i in at] == [expected[p] for p in picks]
    if margin == 0:
        assert values.tolist() == [11, 12, 20, 16]  # the picks side by side, in order, as before
        return
    for (case, index), i in zip(picks, at):
        for d in range(-margin, margin + 1):
            j, neighbour = i + d, expected.get((case, index + d), 0)  # 0: the case has no such slice
            assert (values[j] if 0 <= j < len(values) else 0) == neighbour, (case, index, d)


def test_evaluation_gives_a_2p5d_model_the_neighbours_the_trainer_gave_it(tiny_cache):
    """With --max-slices the test slices are spread out: a 2.5D model must still see each one's real neighbours."""
    from CTSemanticSynthLib.slice_context import with_neighbours
    from training.dataset import SliceCache
    from training.evaluate import pseudo_volume, select_rows

    cache = SliceCache(tiny_cache, "test")
    rows = select_rows(len(cache), 4)
    stack, at = pseudo_volume(cache, [cache.rows[i] for i in rows], margin=2)
    active = np.flatnonzero(stack.any(axis=(1, 2)))
    seen = with_neighbours(torch.from_numpy(stack[active]).long(), active.tolist(), 2)
    _, trained = cache.load(rows.tolist(), context_slices=2)
    picked = [active.tolist().index(i) for i in at]
    np.testing.assert_array_equal(seen[picked].numpy(), trained.numpy())


def test_neighbour_margin_follows_the_network_and_the_agreement(tiny_model):
    from CTSemanticSynthLib.checkpoint import load_model
    from CTSemanticSynthLib.synthesis import SamplingOptions
    from training.evaluate import neighbour_margin

    model = load_model(tiny_model)
    assert neighbour_margin(model, SamplingOptions()) == 0
    assert neighbour_margin(model, SamplingOptions(slice_agreement=0.3)) == 4  # reach 2, and the neighbours' reach
    model.model.config["context_slices"] = 3
    assert neighbour_margin(model, SamplingOptions()) == 3


def test_a_chunk_sampled_with_agreement_is_the_picks_only(tiny_cache, tiny_model, tmp_path):
    from CTSemanticSynthLib.checkpoint import load_model
    from CTSemanticSynthLib.synthesis import SamplingOptions
    from training.dataset import SliceCache
    from training.evaluate import Entry, sample_chunk, select_rows

    cache = SliceCache(tiny_cache, "test")
    picks = [cache.rows[i] for i in select_rows(len(cache), 3)]
    options = SamplingOptions(sampler="ddim", steps=2, slice_agreement=0.5)
    entry = Entry("tiny", load_model(tiny_model), options, tmp_path, tmp_path)
    with_agreement = sample_chunk(entry, cache, picks, 0, torch.device("cpu")).astype(np.float32)
    entry.options = SamplingOptions(sampler="ddim", steps=2)
    alone = sample_chunk(entry, cache, picks, 0, torch.device("cpu")).astype(np.float32)
    assert with_agreement.shape == alone.shape == (3, 32, 32) and np.isfinite(with_agreement).all()
    assert 0 <= with_agreement.min() and with_agreement.max() <= 1 and with_agreement.std() > 0.01
    assert not np.array_equal(with_agreement, alone)  # sampled among its neighbours


def test_training_evaluate_refuses_a_model_of_another_size(tmp_path, tiny_cache, capsys):
    from CTSemanticSynthLib.checkpoint import save_model
    from CTSemanticSynthLib.diffusion import GaussianDiffusion, diffusion_defaults
    from CTSemanticSynthLib.models import UNetModel

    save_model(tmp_path / "m16", UNetModel(**tiny_model_config(image_size=16)), GaussianDiffusion(**diffusion_defaults()),
               name="m16")
    assert _run_evaluate(tmp_path / "out", tmp_path / "m16", tiny_cache, "--no-fid") == 2
    assert "16 px" in capsys.readouterr().err



@pytest.fixture(scope="module")
def anatomy_cache(tmp_path_factory) -> Path:
    from training.prepare import Case, prepare

    out = tmp_path_factory.mktemp("cache") / "anatomy32"
    with single_thread():  # prepare forks workers
        prepare([Case("sample", SAMPLE_CT, SAMPLE_SEG, "train")], out, size=32, convention="totalseg", workers=0,
                holdout_every=8, classes="anatomy", intensity="full_range")
    return out


def test_training_evaluate_scores_an_anatomy_model_in_its_classes_and_mapping(tmp_path, anatomy_cache, tiny_model,
                                                                               monkeypatch, capsys):
    """Slices and volumes in the model's own class set and intensity mapping (the cache's); a model of another set
    or mapping than the cache is refused."""
    import training.evaluate as evaluate
    from CTSemanticSynthLib.intensity import FULL_RANGE
    from CTSemanticSynthLib.labels import class_set
    from CTSemanticSynthLib.metrics.consistency import stripe_index
    from training.dataset import SliceCache

    assert _run_evaluate(tmp_path / "paper", tiny_model, anatomy_cache, "--no-fid") == 2
    assert "works in the 'paper' class set and the paper_window mapping but" in capsys.readouterr().err
    model = make_anatomy_model_folder(tmp_path / "anatomy")
    images, labels = tmp_path / "images", tmp_path / "labels"
    for folder, source in ((images, SAMPLE_CT), (labels, SAMPLE_SEG)):
        folder.mkdir()
        os.symlink(source, folder / "sample.nii.gz")
    given = []
    real_synthesize = evaluate.synthesize
    monkeypatch.setattr(evaluate, "synthesize", lambda classes, *a, **k: given.append(int(classes.array.max()))
                        or real_synthesize(classes, *a, **k))
    out = tmp_path / "eval"
    assert _run_evaluate(out, model, anatomy_cache, "--no-fid", "--volumes-images", images, "--volumes-labels",
                         labels, "--convention", "totalseg") == 0
    assert given[0] > 16 and given[-1] > 16  # the anatomy classes beyond the paper's reach the model: slices, volume
    (sample_dir,) = (out / "samples").iterdir()
    synthetic = np.concatenate([np.load(c) for c in sorted(sample_dir.glob("chunk_*.npy"))]).astype(np.float32)
    cache = SliceCache(anatomy_cache, "test")
    _, classes = cache.batch(evaluate.select_rows(len(cache), 4).tolist())
    air = FULL_RANGE.to_unit(np.array(-1000.0))  # outside the body, in the cache's full-range units
    np.testing.assert_allclose(synthetic[classes.numpy() == 0], air, atol=1e-3)
    assert air > 0.005
    results = json.loads((out / "results.json").read_text())["models"][0]
    ct, (seg, names) = read_image(SAMPLE_CT), read_labelmap(SAMPLE_SEG)
    volume_classes = evaluate._case_classes(ct, seg, names, "totalseg", class_set("anatomy"))[0]
    (volume_dir,) = (out / "volumes").glob("tiny-*")
    syn = read_image(volume_dir / "sample.nii.gz")
    assert results["stripe_index"] == pytest.approx(stripe_index(syn, ct, volume_classes, FULL_RANGE)["stripe_index"])
    assert figure_ok(out / "figure.png")


def test_training_evaluate_scores_totalsegmentator_dice_in_every_class_of_an_anatomy_cache(
        tmp_path, anatomy_cache, monkeypatch):
    """TotalSegmentator stands in: on the real CT it finds the case's own labels, on the synthetic CT the same
    without the ribs. Every anatomy class is scored, for the model and the ceiling (results.json and a results.md
    table), the paper's mean stays over its 14 organs; a per-case score file of the 15 organs only (written by an
    earlier version) is scored again, a current one is reused."""
    import CTSemanticSynthLib.totalseg as totalseg
    import training.evaluate as evaluate

    seg, _ = read_labelmap(SAMPLE_SEG)
    no_ribs = np.where(np.isin(seg.array, _members("ribs")), 0, seg.array)
    calls = []

    def fake_run(volume, **kwargs):
        calls.append(kwargs)
        return Volume(seg.array if len(calls) == 1 else no_ribs, volume.affine)

    monkeypatch.setattr(evaluate, "check_totalsegmentator", lambda fast=True: tmp_path)
    monkeypatch.setattr(totalseg, "run_totalsegmentator", fake_run)
    model = make_anatomy_model_folder(tmp_path / "anatomy")
    images, labels = tmp_path / "images", tmp_path / "labels"
    for folder, source in ((images, SAMPLE_CT), (labels, SAMPLE_SEG)):
        folder.mkdir()
        os.symlink(source, folder / "sample.nii.gz")
    out = tmp_path / "eval"
    argv = ["--no-fid", "--volumes-images", images, "--volumes-labels", labels, "--convention", "totalseg",
            "--totalseg", "--figure-rows", "1"]
    assert _run_evaluate(out, model, anatomy_cache, *argv) == 0
    assert len(calls) == 2
    results = json.loads((out / "results.json").read_text())
    dice, ceiling = results["models"][0]["dice"], results["totalseg_real_ceiling"]
    anatomy = class_set_named("anatomy")
    assert set(dice) == set(ceiling) == {anatomy.classes[c] for c in anatomy.labelled}
    assert ceiling["ribs"] == ceiling["vertebrae"] == ceiling["lung"] == ceiling["autochthon"] == 1.0
    assert dice["ribs"] == 0.0 and dice["vertebrae"] == dice["lung"] == dice["iliopsoas"] == 1.0
    model_result = results["models"][0]
    assert model_result["dice_mean"] == 1.0  # the paper's 14 organs: found alike on both CTs
    assert model_result["dice_mean_all"] == pytest.approx(1 - 1 / sum(v is not None for v in dice.values()))
    md = (out / "results.md").read_text()
    table = md.split("## Dice per class beyond the paper's organs (%)")[1].split("## Published")[0]
    assert "| Class | tiny | real CT (ceiling) |" in table
    assert "| ribs | 0.0 | 100.0 |" in table and "| vertebrae | 100.0 | 100.0 |" in table
    assert f"| mean, all classes | {100 * model_result['dice_mean_all']:.1f} | 100.0 |" in table

    real_scores = out / "volumes" / "real" / "sample.totalseg-fast.json"
    assert _run_evaluate(out, model, anatomy_cache, *argv) == 0
    assert len(calls) == 2  # the score files of this set are reused
    old = {o: 0.5 for o in MODEL_CLASSES[1:16]}  # an earlier version's file: the 15 organs only
    real_scores.write_text(json.dumps(old))
    calls.clear()
    assert _run_evaluate(out, model, anatomy_cache, *argv) == 0
    assert len(calls) == 1
    assert json.loads((out / "results.json").read_text())["totalseg_real_ceiling"]["liver"] == 1.0
    assert json.loads(real_scores.read_text())["ribs"] == 1.0


def test_training_evaluate_leaves_out_of_dice_the_classes_amos_labels_cannot_hold(tmp_path, anatomy_cache,
                                                                                   monkeypatch):
    """An anatomy cache evaluated against AMOS labels (--convention amos): TotalSegmentator finds bones, lungs and
    muscles on both CTs, but the labels can never hold them, so Dice scores the organs only (model and ceiling),
    dice_mean_all is their mean, and results.json's settings and results.md's notes name the classes left out once;
    a per-case score file of every anatomy class (an earlier version's, ribs at 0) is scored again."""
    import CTSemanticSynthLib.totalseg as totalseg
    import training.evaluate as evaluate
    from CTSemanticSynthLib.labels import totalsegmentator_adapter

    seg, _ = read_labelmap(SAMPLE_SEG)
    calls = []
    monkeypatch.setattr(evaluate, "check_totalsegmentator", lambda fast=True: tmp_path)
    monkeypatch.setattr(totalseg, "run_totalsegmentator",
                        lambda volume, **kwargs: calls.append(kwargs) or Volume(seg.array, volume.affine))
    model = make_anatomy_model_folder(tmp_path / "anatomy")
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir(), labels.mkdir()
    os.symlink(SAMPLE_CT, images / "sample.nii.gz")
    organs = totalsegmentator_adapter(2).classes(seg.array)[0]  # the paper set's classes are AMOS ids
    write_volume(Volume(np.where(organs < 16, organs, 0).astype(np.uint8), seg.affine), labels / "sample.nii.gz")
    out = tmp_path / "eval"
    argv = ["--no-fid", "--volumes-images", images, "--volumes-labels", labels, "--convention", "amos",
            "--totalseg", "--figure-rows", "1"]
    assert _run_evaluate(out, model, anatomy_cache, *argv) == 0
    results = json.loads((out / "results.json").read_text())
    dice, ceiling = results["models"][0]["dice"], results["totalseg_real_ceiling"]
    assert list(dice) == list(ceiling) == list(MODEL_CLASSES[1:16])  # ribs, vertebrae, lung: left out, not 0
    assert results["models"][0]["dice_mean_all"] == results["models"][0]["dice_mean"] == 1.0
    left_out = results["settings"]["dice_not_expressible"]
    assert "ribs, " in left_out and "vertebrae" in left_out and "--convention amos" in left_out
    md = (out / "results.md").read_text()
    assert md.count("dice_not_expressible: ") == 1 and "| ribs |" not in md
    real_scores = out / "volumes" / "real" / "sample.totalseg-fast.json"
    anatomy = class_set_named("anatomy")
    real_scores.write_text(json.dumps({anatomy.classes[c]: 0.0 for c in anatomy.labelled}))
    calls.clear()
    assert _run_evaluate(out, model, anatomy_cache, *argv) == 0
    assert len(calls) == 1 and set(json.loads(real_scores.read_text())) == set(MODEL_CLASSES[1:16])


def test_dice_means_average_each_class_over_the_cases_that_scored_it():
    """A case whose labels cannot hold ribs has no ribs score: the mean is over the other cases; a NaN (absent on
    both sides) is left out; a class no case scored as a number is NaN."""
    from training.evaluate import dice_means

    means = dice_means([{"liver": 0.5, "heart": math.nan}, {"liver": 1.0, "heart": math.nan, "ribs": 0.25},
                        {"liver": math.nan, "ribs": 0.75}])
    assert list(means) == ["liver", "heart", "ribs"]
    assert means["liver"] == 0.75 and means["ribs"] == 0.5 and math.isnan(means["heart"])


def test_results_md_adds_a_table_for_classes_beyond_the_paper_and_keeps_the_paper_tables():
    from CTSemanticSynthLib.metrics.paper import to_markdown

    organs = {name: 0.5 for name in MODEL_CLASSES[1:16]}  # the paper's set: 15 organs (prostate/uterus not in Table 2)
    paper_md = to_markdown([{"name": "m", "conditioning": "concat", "dice": organs}], organs)
    assert "beyond the paper's organs" not in paper_md
    anatomy = {**organs, "ribs": 0.25, "femur": math.nan}
    md = to_markdown([{"name": "m", "conditioning": "concat", "dice": anatomy}], {**organs, "ribs": 1.0, "femur": 1.0})
    head, table = md.split("## Dice per class beyond the paper's organs (%)")
    table, tail = table.split("\n## Published")
    assert paper_md == head + "## Published" + tail  # the paper's tables unchanged
    assert table.splitlines()[2:] == ["| Class | m | real CT (ceiling) |", "|---|---|---|",
                                      "| prostate_uterus | 50.0 | 50.0 |", "| ribs | 25.0 | 100.0 |",
                                      "| femur | - | 100.0 |", "| mean, all classes | 48.4 | 55.9 |"]


def figure_ok(path: Path) -> bool:
    """figure.png is a PNG, or absent where matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return not path.exists()
    return path.read_bytes()[:4] == b"\x89PNG"

def _have_inception() -> bool:
    from CTSemanticSynthLib.errors import CheckpointError
    from CTSemanticSynthLib.metrics import resolve_inception_path

    try:
        resolve_inception_path()
    except CheckpointError:
        return False
    return True


@pytest.mark.slow
def test_evaluate_with_random_weight_totalsegmentator(capsys, tmp_path, monkeypatch, tiny_cache, tiny_model):
    """`ctsynth evaluate --totalseg` and `training.evaluate --totalseg` through the real TotalSegmentator path
    (three TotalSegmentator runs on the sample volume: about 2 minutes on 2 CPU cores)."""
    pytest.importorskip("totalsegmentator")
    from data_builders.tiny_totalseg import build_tiny_totalseg

    build_tiny_totalseg(tmp_path / "weights", constant_label=5)  # every voxel -> liver
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(tmp_path / "weights"))
    code, out, err = evaluate(capsys, "--synthetic", SAMPLE_CT, "--seg", SAMPLE_SEG, "--totalseg", "--device", "cpu",
                              "--json", tmp_path / "r.json", "--save-totalseg", tmp_path / "ts.nii.gz")
    assert code == 0, err
    saved, _ = read_labelmap(tmp_path / "ts.nii.gz")
    assert saved.same_grid(read_labelmap(SAMPLE_SEG)[0]) and (saved.array == 6).all()
    ts = json.loads((tmp_path / "r.json").read_text())["totalseg"]
    seg = read_labelmap(SAMPLE_SEG)[0].array
    liver = np.count_nonzero(seg == 5)
    assert ts["synthetic"]["liver"] == pytest.approx(2 * liver / (liver + seg.size))
    assert ts["real"] is None and ts["synthetic"]["spleen"] == 0.0
    assert "Dice syn" in out

    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    os.symlink(SAMPLE_CT, images / "sample.nii.gz")
    os.symlink(SAMPLE_SEG, labels / "sample.nii.gz")
    assert _run_evaluate(tmp_path / "eval", tiny_model, tiny_cache, "--no-fid", "--volumes-images", images,
                         "--volumes-labels", labels, "--convention", "totalseg", "--totalseg") == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["models"][0]["dice"]["liver"] > 0 and results["totalseg_real_ceiling"]["liver"] > 0
    assert "real CT (ceiling)" in (tmp_path / "eval" / "results.md").read_text()
    assert results["models"][0]["stripe_index"] > 0  # a random model's volume against the real CT
    assert f"stripe index {results['models'][0]['stripe_index']:.3f}" in (tmp_path / "eval" / "results.md").read_text()


def test_totalsegmentator_sees_the_real_ct_handled_like_the_synthetic_one(monkeypatch):
    """The Dice ceiling compares like with like: TotalSegmentator gets the real CT as synthesis would write it (body
    clipped to the model's window, air outside), and the report says so."""
    import CTSemanticSynthLib.totalseg as totalseg
    from CTSemanticSynthLib.evaluation import evaluate_case

    seen = []

    def fake_run(volume, **kwargs):
        seen.append(volume.array.copy())
        return Volume(np.zeros(volume.array.shape, dtype=np.uint8), volume.affine)

    monkeypatch.setattr(totalseg, "run_totalsegmentator", fake_run)
    classes = np.zeros((6, 6, 4), dtype=np.int16)
    classes[1:5, 1:5] = 16  # body
    classes[2:4, 2:4] = 6  # liver
    real = np.full(classes.shape, 900, dtype=np.int16)  # bone-bright everywhere, air included
    real[2:4, 2:4] = -500
    synthetic = np.where(classes == 0, -1000, 100).astype(np.int16)
    report = evaluate_case(Volume(synthetic, np.eye(4)), Volume(classes, np.eye(4)), Volume(real, np.eye(4)),
                           totalseg=True)
    np.testing.assert_array_equal(seen[0], synthetic)
    expected = np.where(classes == 0, -1000, np.where(real > 240, 240, -160))
    np.testing.assert_array_equal(seen[1], expected)
    assert "clipped to -160..240 HU" in report["totalseg"]["intensity"]
    from CTSemanticSynthLib.intensity import FULL_RANGE  # a full-range model's: the real CT within -1024..2000 HU

    report = evaluate_case(Volume(synthetic, np.eye(4)), Volume(classes, np.eye(4)), Volume(real, np.eye(4)),
                           totalseg=True, intensity=FULL_RANGE)
    np.testing.assert_array_equal(seen[3], np.where(classes == 0, -1000, real))
    assert "clipped to -1024..2000 HU (full_range)" in report["totalseg"]["intensity"]
