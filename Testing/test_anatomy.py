"""The anatomy class set and its adapters (TotalSegmentator v1/v2, AMOS, MAISI, JSON, Slicer segment names), and the
intensity mappings (paper window, full range)."""

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import SAMPLE_CT, SAMPLE_SEG

from CTSemanticSynthLib.errors import InputError
from CTSemanticSynthLib.intensity import FULL_RANGE, PAPER_WINDOW, IntensityMapping, mapping_from_config, named_mapping
from CTSemanticSynthLib.labels import (
    MODEL_CLASSES,
    amos_adapter,
    class_from_name,
    class_set,
    json_adapter,
    maisi_names,
    resolve_adapter,
    segment_names_adapter,
    totalsegmentator_adapter,
    totalsegmentator_names,
)
from CTSemanticSynthLib.io import Volume
from CTSemanticSynthLib.preprocess import (
    AxialOrientation,
    body_mask_from_ct,
    body_mask_from_labels,
    hu_to_unit,
    unit_to_hu,
)
from CTSemanticSynthLib.synthesis import prepare_classes

ANATOMY = class_set("anatomy")


def names_of(adapter, source: dict[int, str]) -> dict[str, str]:
    """Source name -> class name for every value the adapter knows."""
    return {source[v]: ANATOMY.classes[c] for v, c in adapter.table.items()}


def test_anatomy_set_extends_the_paper_set_at_the_same_indices():
    assert ANATOMY.classes[: len(MODEL_CLASSES)] == MODEL_CLASSES
    assert ANATOMY.body == 16 and 30 <= len(ANATOMY.classes) <= 40
    assert len(set(ANATOMY.classes)) == len(ANATOMY.classes) == len(ANATOMY.colors) == len(ANATOMY.display_names)
    assert len(set(ANATOMY.colors)) == len(ANATOMY.colors)
    assert class_set("paper").classes == MODEL_CLASSES


def test_unknown_class_set_is_refused():
    with pytest.raises(InputError, match="unknown class set 'organs': use one of paper, anatomy"):
        class_set("organs")


@pytest.mark.parametrize("version", [2, 1])
def test_totalsegmentator_onto_anatomy_groups_bones_muscles_bowel_and_lungs(version):
    names = names_of(totalsegmentator_adapter(version, ANATOMY), totalsegmentator_names(version))
    expected = {
        "vertebrae_L3": "vertebrae", "vertebrae_C1": "vertebrae", "rib_left_1": "ribs", "rib_right_12": "ribs",
        "sacrum": "pelvis", "hip_left": "pelvis", "femur_right": "femur", "humerus_left": "shoulder_arm_bones",
        "lung_upper_lobe_left": "lung", "trachea": "lung", "colon": "colon", "small_bowel": "small_bowel",
        "autochthon_left": "autochthon", "iliopsoas_right": "iliopsoas", "gluteus_maximus_left": "gluteus",
        "gluteus_minimus_right": "gluteus", "iliac_artery_left": "other_vessels",
        "portal_vein_and_splenic_vein": "other_vessels", "liver": "liver", "kidney_right": "kidney_right",
        "aorta": "aorta", "urinary_bladder": "urinary_bladder", "brain": "brain",
    }
    if version == 2:
        expected |= {"vertebrae_S1": "pelvis", "spinal_cord": "spinal_cord", "kidney_cyst_left": "kidney_cyst", "sternum": "sternum_cartilage",
                     "costal_cartilages": "sternum_cartilage", "heart": "heart", "prostate": "prostate_uterus",
                     "thyroid_gland": "thyroid_gland", "superior_vena_cava": "other_vessels"}
    else:
        expected |= {"heart_myocardium": "heart", "heart_ventricle_left": "heart", "pulmonary_artery": "other_vessels",
                     "face": "body"}
    assert {k: names[k] for k in expected} == expected
    # every structure has a class of its own except what the set leaves to body (v1's face only)
    assert [n for n, c in names.items() if c == "body"] == ([] if version == 2 else ["face"])


def test_paper_set_is_unchanged_by_the_anatomy_tables():
    adapter = totalsegmentator_adapter(2)
    assert MODEL_CLASSES[adapter.table[28]] == "body" and MODEL_CLASSES[adapter.table[5]] == "liver"
    assert class_from_name("left rib 3") is None and class_from_name("left rib 3", ANATOMY) == ANATOMY.index("ribs")


def test_amos_onto_anatomy_keeps_organs_and_makes_the_rest_body():
    labels = np.array([[[0, 1, 6, 15, 16, 40]]], dtype=np.int16)
    mapped, report = amos_adapter(ANATOMY).classes(labels)
    assert mapped.tolist() == [[[0, 1, 6, 15, 16, 16]]]
    assert report.unknown == {16: 1, 40: 1} and report.organs_present == ("spleen", "liver", "prostate_uterus")


def test_maisi_table_and_adapter():
    names = maisi_names()
    assert len(names) == 133 and names[200] == "body" and names[1] == "liver" and names[62] == "colon"
    labels = np.array([[[0, 1, 5, 14, 33, 63, 97, 62, 19, 28, 122, 200, 2]]], dtype=np.uint8)
    for classes, expected in ((ANATOMY, ["background", "liver", "kidney_right", "kidney_left", "vertebrae", "ribs",
                                         "pelvis", "colon", "small_bowel", "lung", "sternum_cartilage", "body", "body"]),
                              (class_set("paper"), ["background", "liver", "kidney_right", "kidney_left"] + ["body"] * 9)):
        adapter = resolve_adapter("maisi", labels, classes=classes)
        mapped, report = adapter.classes(labels)
        assert [classes.classes[c] for c in mapped.ravel()] == expected
        assert report.has_outline and report.unknown == {}
    assert resolve_adapter("auto", labels, classes=ANATOMY).name == "maisi"  # label 200 is MAISI's body


def test_slicer_segment_names_as_the_totalsegmentator_extension_writes_them():
    slicer = {1: "Right kidney", 2: "superior lobe of left lung", 3: "L3 vertebra", 4: "left rib 3",
              5: "left deep back muscle", 6: "costal cartilage", 7: "left atrial appendage", 8: "right hip",
              9: "S1 vertebra", 10: "right common iliac vein", 11: "left iliopsoas muscle", 12: "urinary bladder",
              13: "left gluteus maximus", 14: "small intestine", 15: "left femur", 16: "spinal cord", 17: "Body"}
    adapter = segment_names_adapter(slicer, ANATOMY)
    assert list(names_of(adapter, slicer).values()) == [
        "kidney_right", "lung", "vertebrae", "ribs", "autochthon", "sternum_cartilage", "heart", "pelvis", "pelvis",
        "other_vessels", "iliopsoas", "urinary_bladder", "gluteus", "small_bowel", "femur", "spinal_cord", "body"]
    assert adapter.outline_values == frozenset({17})
    assert resolve_adapter("auto", np.array([[[0, 1, 3]]]), slicer, ANATOMY).name == "segment names"


def test_json_mapping_onto_anatomy_classes(tmp_path: Path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"3": "ribs", "bone": "vertebrae", "9": "liver", "7": "background"}))
    adapter = json_adapter(path, {4: "Bone"}, ANATOMY)
    assert {v: ANATOMY.classes[c] for v, c in adapter.table.items()} == {
        3: "ribs", 4: "vertebrae", 9: "liver", 7: "background"}
    with pytest.raises(InputError, match="'ribs' for '3' is not a class of the 'paper' set"):
        json_adapter(path)


def test_full_range_keeps_soft_tissue_precision_and_the_bone_and_air_range():
    hu = np.array([-1024, -1000, -850, -160, 40, 240, 1000, 2000, 3000], dtype=np.float32)
    unit = FULL_RANGE.to_unit(hu)
    assert unit[0] == 0 and unit[-2] == unit[-1] == 1 and np.all(np.diff(unit[:-1]) > 0)
    assert unit[5] - unit[3] == pytest.approx(0.6)  # soft tissue -160..240 HU gets 60 % of [0, 1]
    grid = np.linspace(-1024, 2000, 3025, dtype=np.float32)
    assert np.abs(FULL_RANGE.to_hu(FULL_RANGE.to_unit(grid)) - grid).max() < 0.01
    assert FULL_RANGE.hu_range == (-1024.0, 2000.0)


def test_paper_window_mapping_is_the_paper_window_exactly():
    hu = np.random.default_rng(0).uniform(-1500, 2500, 10_000).astype(np.float32)
    assert np.array_equal(PAPER_WINDOW.to_unit(hu), hu_to_unit(hu))
    unit = np.random.default_rng(1).uniform(-0.5, 1.5, 10_000).astype(np.float32)
    assert np.array_equal(PAPER_WINDOW.to_hu(unit), unit_to_hu(unit))


def test_mapping_configs_round_trip_and_old_configs_read_as_the_window():
    assert mapping_from_config({"intensity": FULL_RANGE.config()}) == FULL_RANGE
    assert mapping_from_config({"window": {"level": 40, "width": 400}}) == PAPER_WINDOW
    assert mapping_from_config({"window": {"level": 50, "width": 350}}).hu_range == (-125.0, 225.0)
    with pytest.raises(ValueError, match="field 'intensity'"):
        mapping_from_config({"intensity": {"name": "x", "hu": [0, -1], "unit": [0, 1]}})
    with pytest.raises(ValueError, match="knots must run from unit 0 to 1"):
        IntensityMapping("bad", ((0.0, 0.0), (10.0, 0.5)))
    with pytest.raises(InputError, match="unknown intensity mapping 'wide'"):
        named_mapping("wide")


def test_body_from_labels_does_not_bridge_a_separate_limb():
    labels = np.zeros((1, 60, 90), np.int32)
    labels[0, 20:40, 10:40] = 5  # trunk structures
    labels[0, 22:38, 42:46] = 86  # a muscle 2 px from them: same group
    labels[0, 10:14, 75:79] = 69  # a humerus 29 px away
    grouped = body_mask_from_labels(labels, has_outline=False, margin_px=2, bridge_px=5)[0]
    single = body_mask_from_labels(labels, has_outline=False, margin_px=2)[0]
    assert grouped[30, 41] and grouped[30, 47]  # the gap inside the trunk group is body
    assert not grouped[20, 60] and single[20, 60]  # the air between trunk and arm is body only in one hull
    assert grouped[12, 77] and grouped[8, 77] and not grouped[5, 77]  # the arm: its own hull, grown by 2 px
    assert grouped.sum() < single.sum()


def test_prepare_classes_takes_the_body_from_the_reference_ct():
    labels = np.zeros((40, 40, 4), np.uint8)
    labels[15:25, 15:25, :] = 5  # a liver (TotalSegmentator 5)
    hu = np.full(labels.shape, -1000, np.int16)
    hu[5:35, 8:30, :] = 30  # the patient: larger than any hull of the labels, and off-centre
    seg, ct = Volume(labels, np.eye(4)), Volume(hu, np.eye(4))
    classes, report = prepare_classes(seg, labels="totalseg", reference=ct, classes=ANATOMY)
    orientation = AxialOrientation.from_affine(ct.affine)
    expected = orientation.from_stack(body_mask_from_ct(orientation.to_stack(hu)))
    np.testing.assert_array_equal(classes.array != 0, expected)
    assert (classes.array[6:34, 9:29] == ANATOMY.body).sum() > 0.9 * (28 * 20 * 4 - labels.astype(bool).sum())
    assert report.body_source.startswith("reference CT")
    _, from_labels = prepare_classes(seg, labels="totalseg")
    assert from_labels.body_source.startswith("labelled structures")
    with pytest.raises(InputError, match="the reference CT is not on the segmentation's grid"):
        prepare_classes(seg, labels="totalseg", reference=Volume(hu[:-1], np.eye(4)))


def _sample_cut(folder: Path, slices: slice) -> tuple[Path, Path]:
    """A CT/label pair cut from the bundled sample (every 2nd voxel in-plane, ``slices`` axially), named alike."""
    import nibabel as nib

    paths = folder / "ct" / "case.nii.gz", folder / "seg" / "case.nii.gz"
    for source, target, dtype in ((SAMPLE_CT, paths[0], np.int16), (SAMPLE_SEG, paths[1], np.uint8)):
        img = nib.load(source)
        affine = img.affine.copy()
        affine[:3, 3] = affine[:3, :3] @ np.array([0, 0, slices.start]) + affine[:3, 3]
        affine[:3, :2] *= 2
        target.parent.mkdir(parents=True)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[::2, ::2, slices].astype(dtype), affine), target)
    return paths


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("classes, intensity", [("paper", "full_range"), ("anatomy", "paper_window"),
                                                ("anatomy", "full_range")])
def test_class_sets_and_mappings_end_to_end(tmp_path, capsys, classes, intensity):
    """prepare -> train a few iterations -> export -> ctsynth info / synth (body from the real CT) -> evaluate
    (the paper set with the paper window is test_training's)."""
    from CTSemanticSynthLib.checkpoint import load_model
    from CTSemanticSynthLib.cli import main as ctsynth
    from CTSemanticSynthLib.io import read_image
    from training import prepare, train

    ct, seg = _sample_cut(tmp_path, slice(70, 82))
    cache, run = tmp_path / "cache", tmp_path / "run"
    assert prepare.main(["--images", str(ct.parent), "--labels", str(seg.parent), "--out", str(cache), "--size", "16",
                         "--workers", "1", "--convention", "totalseg", "--class-set", classes,
                         "--intensity", intensity]) == 0
    assert train.main(["--data", str(cache), "--out", str(run), "--model-channels", "8", "--channel-mult", "1,2",
                       "--num-res-blocks", "1", "--attention-resolutions", "2", "--num-heads", "1", "--batch-size",
                       "2", "--iterations", "2", "--sample-every", "2", "--sample-steps", "2", "--threads", "1",
                       "--device", "cpu"]) == 0
    model = load_model(run / "model")
    set_size = len(class_set(classes).classes)
    assert model.class_set.name == classes and model.config["model"]["num_classes"] == set_size
    assert model.intensity == named_mapping(intensity) and len(model.config["class_means"]) == set_size
    present = set(np.unique(np.load(cache / "cases" / "case" / "classes.npy")).tolist())
    means = model.config["class_means"]
    assert len(present) < set_size and all(means[c] == means[16] for c in range(set_size) if c not in present)
    assert means[6] != means[16]  # liver: its own mean; absent classes take the body's (0 would be air)
    capsys.readouterr()
    assert ctsynth(["info", str(run / "model")]) == 0
    shown = capsys.readouterr().out
    assert f"class set:    {classes} ({set_size} classes)" in shown and f"intensity:    {intensity} (" in shown
    out, preview = tmp_path / "syn.nii.gz", tmp_path / "preview.png"
    assert ctsynth(["synth", "--seg", str(seg), "--labels", "totalseg", "--model", str(run / "model"), "--out",
                    str(out), "--steps", "3", "--reference-ct", str(ct), "--preview", str(preview), "--device", "cpu",
                    "-q"]) == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "syn.json").read_text())
    assert record["class_set"] == classes and record["intensity"]["name"] == intensity
    assert record["inputs"]["body_outline"].startswith("reference CT")
    synthetic = read_image(out).array
    body = synthetic[synthetic > -1000]
    low, high = named_mapping(intensity).hu_range
    assert body.min() >= low and body.max() <= high
    if intensity == "full_range":  # an untrained model's values spread over the whole range, past the window
        assert body.min() < -160 or body.max() > 240
    from PIL import Image

    assert Image.open(preview).width > (5 if intensity == "full_range" else 3) * 16  # the bone window too
    report = tmp_path / "report.json"
    assert ctsynth(["evaluate", "--synthetic", str(out), "--seg", str(seg), "--labels", "totalseg", "--real", str(ct),
                    "--json", str(report)]) == 0
    # the real CT is clipped to the synthetic's recorded mapping: the left kidney here has voxels above 240 HU
    real_kidney = json.loads(report.read_text())["hu_real"]["kidney_left"]["mean"]
    labels, hu = read_image(seg).array, read_image(ct).array
    assert real_kidney == pytest.approx(np.clip(hu[labels == 3], low, high).mean(), abs=0.01)
    assert (real_kidney > 25) == (intensity == "full_range")


def test_warm_start_copies_a_paper_model_into_an_anatomy_network(tmp_path):
    """--init-from: equal tensors copied; the input convolution's 19 new class channels start at zero, so the
    anatomy network computes what the paper model computes on a paper-set class map."""
    import torch

    from conftest import make_model_folder, tiny_model_config
    from CTSemanticSynthLib.checkpoint import load_model
    from CTSemanticSynthLib.models import UNetModel
    from CTSemanticSynthLib.preprocess import condition_inputs
    from training.train import warm_start

    source = load_model(make_model_folder(tmp_path / "paper")).model
    target = UNetModel(**tiny_model_config() | {"num_classes": len(ANATOMY.classes)})
    warm_start(target, str(tmp_path / "paper"))
    weight = target.input_conv.weight
    assert torch.equal(weight[:, : 1 + len(MODEL_CLASSES)], source.input_conv.weight) and not weight[:, 18:].any()
    classes = torch.randint(0, len(MODEL_CLASSES), (2, 32, 32))
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([10, 200])
    with torch.no_grad():
        theirs = source(x, t, **condition_inputs(classes, "concat"))
        ours = target(x, t, **condition_inputs(classes, "concat", len(ANATOMY.classes)))
    torch.testing.assert_close(ours, theirs)
    other = UNetModel(**tiny_model_config() | {"model_channels": 16})
    with pytest.raises(InputError, match="--init-from .* has shape"):
        warm_start(other, str(tmp_path / "paper"))


def test_bundled_anatomy_model_names_its_classes_and_mapping():
    from CTSemanticSynthLib.checkpoint import load_model

    model = load_model("anatomy")
    assert model.class_set is ANATOMY and model.intensity == FULL_RANGE
    assert model.config["model"]["num_classes"] == len(ANATOMY.classes) == len(model.config["class_means"])
    means = dict(zip(ANATOMY.classes, model.config["class_means"]))
    # the class-mean prior already separates air, fat, soft tissue and bone in the full range
    assert means["lung"] < FULL_RANGE.to_unit(-500) < means["body"] < means["liver"] < means["femur"]
    assert load_model("demo").class_set.name == "paper" and load_model("demo").intensity == PAPER_WINDOW


@pytest.mark.usefixtures("one_thread")
def test_gan_baselines_refuse_an_anatomy_cache(tmp_path, capsys):
    from training import prepare, train_gan

    ct, seg = _sample_cut(tmp_path, slice(70, 74))
    cache = tmp_path / "cache"
    assert prepare.main(["--images", str(ct.parent), "--labels", str(seg.parent), "--out", str(cache), "--size", "16",
                         "--workers", "1", "--convention", "totalseg", "--class-set", "anatomy"]) == 0
    capsys.readouterr()
    assert train_gan.main(["--data", str(cache), "--out", str(tmp_path / "run"), "--method", "pix2pix",
                           "--device", "cpu"]) == 2
    assert "the GAN baselines train on the paper's classes only" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.usefixtures("one_thread")
def test_prepare_resizes_the_ct_in_hu_before_the_mapping(tmp_path, capsys):
    """The full-range cache holds the HU mean of what each model pixel covers: four 2-voxel cortical bars (1500 HU)
    and gas pockets (-1000 HU) in soft tissue keep the slice's mean attenuation, 123 HU (resized after the
    companding, it falls to 57 HU)."""
    import nibabel as nib

    from training import prepare

    hu = np.full((90, 90, 3), 40, np.int16)
    for col in (20, 35, 50, 65):
        hu[15:75, col : col + 2] = 1500
        hu[col : col + 3, 80:82] = -1000
    labels = np.zeros(hu.shape, np.uint8)
    labels[30:60, 30:60] = 6  # AMOS liver
    for folder, data in (("ct", hu), ("seg", labels)):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / folder / "case.nii.gz")
    assert prepare.main(["--images", str(tmp_path / "ct"), "--labels", str(tmp_path / "seg"), "--out",
                         str(tmp_path / "cache"), "--size", "30", "--workers", "1", "--convention", "amos",
                         "--intensity", "full_range"]) == 0
    images = np.load(tmp_path / "cache" / "cases" / "case" / "images.npy").astype(np.float32)
    assert images.shape == (3, 30, 30)
    np.testing.assert_allclose(FULL_RANGE.to_hu(images).mean(axis=(1, 2)), hu.mean(axis=(0, 1)), atol=2.0)
    # a full-range cache from before (resized after the mapping) is neither extended nor trained on
    meta = tmp_path / "cache" / "cache.json"
    meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "resized_in"}))
    capsys.readouterr()
    assert prepare.main(["--images", str(tmp_path / "ct"), "--labels", str(tmp_path / "seg"), "--out",
                         str(tmp_path / "cache"), "--size", "30", "--workers", "1", "--convention", "amos",
                         "--intensity", "full_range"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "resized_in 'model units', not 'hu'" in err, err
    from training.dataset import SliceCache

    with pytest.raises(InputError, match="prepared by an earlier version .* prepare it again"):
        SliceCache(tmp_path / "cache", "train")
