"""TotalSegmentator runner: weight lookup and the missing-weights message, label mapping, and (slow) a real run
of TotalSegmentator's loading and inference path on a tiny random-weight nnU-Net built in its layout."""

from pathlib import Path

import numpy as np
import pytest

from CTSemanticSynthLib.errors import CTSynthError, InputError
from CTSemanticSynthLib.io import Volume
from CTSemanticSynthLib.labels import BODY, MODEL_CLASSES
from CTSemanticSynthLib.totalseg import (
    TOTAL_MODELS,
    check_totalsegmentator,
    run_totalsegmentator,
    totalseg_device,
    totalseg_dice,
    totalseg_organs,
    totalseg_weights_dir,
)

from data_builders.tiny_totalseg import build_tiny_totalseg

try:
    import totalsegmentator  # noqa: F401
    import nnunetv2  # noqa: F401

    HAVE_TS = True
except ImportError:
    HAVE_TS = False
needs_ts = pytest.mark.skipif(not HAVE_TS, reason="totalsegmentator / nnunetv2 not installed (the [eval] extra)")


def test_weights_folder_follows_totalsegmentator_rules(tmp_path, monkeypatch):
    env = {"TOTALSEG_WEIGHTS_PATH": str(tmp_path / "w"), "TOTALSEG_HOME_DIR": str(tmp_path / "h")}
    assert totalseg_weights_dir(env) == tmp_path / "w"
    assert totalseg_weights_dir({"TOTALSEG_HOME_DIR": str(tmp_path / "h")}) == tmp_path / "h" / "nnunet" / "results"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert totalseg_weights_dir({}) == tmp_path / ".totalsegmentator" / "nnunet" / "results"
    if HAVE_TS:  # the same answer as TotalSegmentator's own resolver
        from totalsegmentator.config import get_weights_dir

        monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(tmp_path / "w"))
        assert Path(get_weights_dir()) == totalseg_weights_dir()


@needs_ts
def test_model_table_matches_installed_totalsegmentator():
    from totalsegmentator.map_tasks_config import TASK_CONFIGS, TASK_ID_WEIGHTS_CONFIGS

    modes = TASK_CONFIGS["total"]["sub_modes"]
    for mode, key in (("fast", "fast"), ("full", "default")):
        ids = modes[key]["task_id"]
        folders = [TASK_ID_WEIGHTS_CONFIGS[i]["foldername"] for i in (ids if isinstance(ids, list) else [ids])]
        assert [m.dataset for m in TOTAL_MODELS[mode]] == folders
        assert {m.trainer for m in TOTAL_MODELS[mode]} == {modes[key]["trainer"]}


@needs_ts
def test_missing_weights_message_names_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(tmp_path / "weights"))
    with pytest.raises(CTSynthError) as err:
        check_totalsegmentator(fast=True)
    message = str(err.value)
    assert "Dataset297_TotalSegmentator_total_3mm_1559subj" in message and str(tmp_path / "weights") in message
    assert "TOTALSEG_WEIGHTS_PATH" in message and "totalseg_download_weights -t total_fast" in message
    ct = Volume(np.full((8, 8, 8), -1000, np.int16), np.eye(4))
    with pytest.raises(CTSynthError, match="Dataset297"):  # checked before anything runs: never a download
        run_totalsegmentator(ct, fast=True, device="cpu")


@needs_ts
def test_tiny_weights_pass_the_check_and_full_mode_lists_what_is_missing(tmp_path, monkeypatch):
    build_tiny_totalseg(tmp_path)
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(tmp_path))
    assert check_totalsegmentator(fast=True) == tmp_path
    with pytest.raises(CTSynthError) as err:
        check_totalsegmentator(fast=False)
    assert all(m.dataset in str(err.value) for m in TOTAL_MODELS["full"])
    (TOTAL_MODELS["fast"][0].folder(tmp_path) / "fold_0" / "checkpoint_final.pth").unlink()
    with pytest.raises(CTSynthError, match="checkpoint_final.pth"):
        check_totalsegmentator(fast=True)


def test_totalseg_v2_ids_map_to_amos_organs():
    ts = np.array([5, 15, 52, 63, 19, 21, 22, 1, 2, 3, 4, 6, 7, 8, 9, 26, 90, 0])
    expected = ["liver", "esophagus", "aorta", "inferior_vena_cava", "duodenum", "urinary_bladder",
                "prostate_uterus", "spleen", "kidney_right", "kidney_left", "gallbladder", "stomach", "pancreas",
                "adrenal_gland_right", "adrenal_gland_left"]
    out = totalseg_organs(ts)
    assert [MODEL_CLASSES[c] for c in out[:15]] == expected
    assert out[15] == BODY and out[16] == BODY and out[17] == 0  # vertebra, brain -> body; background stays


def test_device_names():
    assert totalseg_device("cpu") == "cpu"
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(InputError):
            totalseg_device("cuda")


def _case() -> tuple[Volume, Volume]:
    """A 36 x 32 x 24 CT at 3 mm with a liver and a spleen in the reference labels."""
    ct = np.full((36, 32, 24), -1000, dtype=np.int16)
    ct[6:30, 6:26, 4:20] = 40
    ref = np.zeros(ct.shape, dtype=np.uint8)
    ref[8:28, 8:20, 6:18] = MODEL_CLASSES.index("liver")
    ref[10:16, 21:25, 8:14] = MODEL_CLASSES.index("spleen")
    affine = np.diag([-3.0, -3.0, 3.0, 1.0])
    return Volume(ct, affine), Volume(ref, affine)


@needs_ts
def test_random_weight_totalsegmentator_runs_end_to_end(tmp_path, monkeypatch):
    """The real TotalSegmentator + nnU-Net loading and inference path (about 35 s on 2 busy CPU cores)."""
    build_tiny_totalseg(tmp_path / "weights", constant_label=5)  # every voxel -> TotalSegmentator 'liver'
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(tmp_path / "weights"))
    ct, ref = _case()
    result = totalseg_dice(ct, ref, fast=True, device="cpu")
    liver = np.count_nonzero(ref.array == MODEL_CLASSES.index("liver"))
    assert result.synthetic["liver"] == pytest.approx(2 * liver / (liver + ref.array.size))
    assert result.synthetic["spleen"] == 0.0 and np.isnan(result.synthetic["pancreas"])
    assert result.real is None and result.mode == "fast" and result.device == "cpu"
    assert result.to_dict()["synthetic"]["pancreas"] is None
    assert result.predicted_synthetic.shape == ref.array.shape
    assert (result.predicted_synthetic == MODEL_CLASSES.index("liver")).all()
    assert "predicted_synthetic" not in result.to_dict()


@needs_ts
@pytest.mark.slow
def test_totalsegmentator_failure_is_reported_with_its_last_lines(tmp_path, monkeypatch):
    build_tiny_totalseg(tmp_path)
    (TOTAL_MODELS["fast"][0].folder(tmp_path) / "fold_0" / "checkpoint_final.pth").write_bytes(b"not a checkpoint")
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(tmp_path))
    with pytest.raises(CTSynthError, match="TotalSegmentator failed") as err:
        run_totalsegmentator(_case()[0], fast=True, device="cpu", log_path=tmp_path / "ts.log")
    assert "ts.log" in str(err.value) and (tmp_path / "ts.log").stat().st_size > 0


def test_dice_in_the_anatomy_set_scores_totalsegmentators_bones_and_muscles(monkeypatch):
    """TotalSegmentator's structures mapped onto the anatomy set (vertebra levels -> vertebrae, left/right ribs ->
    ribs, ...): Dice for every class but background and body; in the paper set the same run scores the organs only."""
    import CTSemanticSynthLib.totalseg as totalseg
    from CTSemanticSynthLib.labels import class_set, totalsegmentator_names

    anatomy = class_set("anatomy")
    ts_id = {name: value for value, name in totalsegmentator_names(2).items()}
    ct, _ = _case()
    ref = np.zeros(ct.shape, np.uint8)
    ref[8:28, 8:20, 6:18] = anatomy.classes.index("liver")
    ref[4:12, 4:8, 4:8] = anatomy.classes.index("vertebrae")  # 128 voxels
    ref[20:24, 26:30, 4:8] = anatomy.classes.index("ribs")  # 64 voxels
    ref[0:2, 0:2, 0:2] = anatomy.body
    found = np.zeros(ct.shape, np.int16)
    found[8:28, 8:20, 6:18] = ts_id["liver"]
    found[4:8, 4:8, 4:8] = ts_id["vertebrae_L1"]
    found[8:12, 4:8, 4:8] = ts_id["vertebrae_L2"]  # two levels, one class: all 128 voxels
    found[20:24, 26:30, 4:6] = ts_id["rib_left_3"]  # half the ribs
    found[24:28, 26:30, 4:8] = ts_id["rib_right_4"]  # and 64 voxels beside them
    found[0:2, 0:2, 0:2] = ts_id["spleen"]
    monkeypatch.setattr(totalseg, "run_totalsegmentator", lambda volume, **kwargs: Volume(found, volume.affine))
    result = totalseg_dice(ct, Volume(ref, ct.affine), fast=True, device="cpu", class_set=anatomy)
    assert list(result.synthetic) == [anatomy.classes[c] for c in anatomy.labelled]  # body is not scored
    assert result.synthetic["vertebrae"] == 1.0 and result.synthetic["liver"] == 1.0
    assert result.synthetic["ribs"] == pytest.approx(2 * 32 / (96 + 64))
    assert result.synthetic["spleen"] == 0.0 and np.isnan(result.synthetic["lung"])
    assert result.reference_voxels["vertebrae"] == 128 and result.reference_voxels["ribs"] == 64
    assert result.mean_synthetic == pytest.approx((1 + 1 + 0.4 + 0) / 4)
    assert result.predicted_synthetic[5, 5, 5] == anatomy.classes.index("vertebrae")
    paper = totalseg_dice(ct, Volume(np.where(ref > BODY, BODY, ref), ct.affine), fast=True, device="cpu")
    assert list(paper.synthetic) == list(MODEL_CLASSES[1:BODY]) and paper.synthetic["liver"] == 1.0
    assert paper.predicted_synthetic[5, 5, 5] == BODY  # the paper set has no vertebrae


def test_dice_leaves_out_the_classes_the_labels_convention_cannot_hold(monkeypatch):
    """AMOS labels hold only the 15 organs: scored in the anatomy set, TotalSegmentator's vertebrae, ribs and lungs
    are left out and named (not scored 0 against labels that can never hold them); the organs are kept, a spleen
    TotalSegmentator found where the labels have none still scores 0. TotalSegmentator labels hold every class."""
    import CTSemanticSynthLib.totalseg as totalseg
    from CTSemanticSynthLib.labels import PAPER, amos_adapter, class_set, totalsegmentator_adapter, \
        totalsegmentator_names

    anatomy = class_set("anatomy")
    ts_id = {name: value for value, name in totalsegmentator_names(2).items()}
    ct, _ = _case()
    amos = np.zeros(ct.shape, np.uint8)
    amos[8:28, 8:20, 6:18] = MODEL_CLASSES.index("liver")
    reference, mapping = amos_adapter(anatomy).classes(amos)
    reference[0:12, 0:8, 0:8] = anatomy.body  # vertebrae, ribs and a spleen are body tissue in AMOS labels
    found = np.zeros(ct.shape, np.int16)
    found[8:28, 8:20, 6:18] = ts_id["liver"]
    found[4:8, 4:8, 4:8] = ts_id["vertebrae_L1"]
    found[0:4, 0:4, 0:4] = ts_id["rib_left_3"]
    found[8:12, 0:4, 0:4] = ts_id["spleen"]
    found[30:34, 0:4, 0:4] = ts_id["lung_upper_lobe_left"]
    monkeypatch.setattr(totalseg, "run_totalsegmentator", lambda volume, **kwargs: Volume(found, volume.affine))
    result = totalseg_dice(ct, Volume(reference, ct.affine), fast=True, device="cpu", class_set=anatomy,
                           classes=mapping.expressible)
    assert list(result.synthetic) == list(MODEL_CLASSES[1:BODY])  # the 15 organs, in order
    assert result.synthetic["liver"] == 1.0 and result.synthetic["spleen"] == 0.0
    assert result.mean_synthetic == 0.5  # not dragged down by vertebrae, ribs and lung at 0
    assert {"vertebrae", "ribs", "lung", "autochthon"} <= set(result.not_expressible)
    assert set(result.not_expressible) | set(result.synthetic) == {anatomy.classes[c] for c in anatomy.labelled}
    assert result.to_dict()["not_expressible"] == list(result.not_expressible)
    assert "ribs" not in result.reference_voxels
    assert totalsegmentator_adapter(2, anatomy).expressible == anatomy.labelled
    assert amos_adapter().expressible == totalsegmentator_adapter(1).expressible == PAPER.labelled
    everything = totalseg_dice(ct, Volume(reference, ct.affine), fast=True, device="cpu", class_set=anatomy)
    assert everything.synthetic["ribs"] == 0.0 and everything.not_expressible == ()  # the default: every class
