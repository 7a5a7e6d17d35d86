"""Label table and adapters: AMOS, TotalSegmentator v1/v2, segment names, JSON files, unknown labels."""

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from CTSemanticSynthLib.errors import InputError
from CTSemanticSynthLib.labels import (
    BODY,
    COLORS,
    DISPLAY_NAMES,
    MODEL_CLASSES,
    NUM_CLASSES,
    class_from_name,
    json_adapter,
    resolve_adapter,
    segment_names_adapter,
    totalsegmentator_adapter,
    totalsegmentator_names,
)

AMOS_ORDER = [
    "spleen", "kidney_right", "kidney_left", "gallbladder", "esophagus", "liver", "stomach", "aorta",
    "inferior_vena_cava", "pancreas", "adrenal_gland_right", "adrenal_gland_left", "duodenum", "urinary_bladder",
    "prostate_uterus",
]


def test_class_table_is_amos_order_plus_body():
    assert MODEL_CLASSES == ("background", *AMOS_ORDER, "body")
    assert NUM_CLASSES == 17 and BODY == 16
    assert len(COLORS) == len(DISPLAY_NAMES) == NUM_CLASSES
    assert len(set(COLORS)) == NUM_CLASSES


def test_totalsegmentator_tables_match_known_ids():
    v2, v1 = totalsegmentator_names(2), totalsegmentator_names(1)
    assert len(v2) == 117 and len(v1) == 104
    assert (v2[15], v2[52], v2[63], v2[22], v2[19], v2[21]) == (
        "esophagus", "aorta", "inferior_vena_cava", "prostate", "duodenum", "urinary_bladder")
    assert (v1[42], v1[7], v1[8], v1[10], v1[56], v1[104]) == (
        "esophagus", "aorta", "inferior_vena_cava", "pancreas", "duodenum", "urinary_bladder")


@pytest.mark.parametrize("version, ids", [
    (2, {1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver", 6: "stomach",
         7: "pancreas", 8: "adrenal_gland_right", 9: "adrenal_gland_left", 15: "esophagus", 19: "duodenum",
         21: "urinary_bladder", 22: "prostate_uterus", 52: "aorta", 63: "inferior_vena_cava"}),
    (1, {1: "spleen", 7: "aorta", 8: "inferior_vena_cava", 10: "pancreas", 11: "adrenal_gland_right",
         12: "adrenal_gland_left", 42: "esophagus", 56: "duodenum", 104: "urinary_bladder"}),
])
def test_totalsegmentator_adapter_maps_organs_and_other_structures_to_body(version, ids):
    adapter = totalsegmentator_adapter(version)
    for source, name in ids.items():
        assert MODEL_CLASSES[adapter.table[source]] == name
    organ_targets = [c for c in adapter.table.values() if c != BODY]
    assert len(organ_targets) == (15 if version == 2 else 14)  # v1 has no prostate
    assert adapter.table[25 if version == 2 else 92] == BODY  # sacrum


def test_unknown_labels_become_body_and_are_reported():
    labels = np.zeros((4, 4, 2), dtype=np.int32)
    labels[0, :, 0] = 6   # liver (AMOS)
    labels[1, :2, 0] = 40  # not an AMOS id
    labels[2, :, 1] = 99
    mapped, report = resolve_adapter("amos", labels).classes(labels)
    assert mapped.dtype == np.uint8
    assert (mapped[0, :, 0] == 6).all()
    assert (mapped[1, :2, 0] == BODY).all() and (mapped[2, :, 1] == BODY).all()
    assert report.unknown == {40: 2, 99: 4}
    assert report.organs_present == ("liver",)
    assert "40 (2 voxels)" in report.unknown_message() and "99 (4 voxels)" in report.unknown_message()


def test_auto_detects_totalsegmentator_ids_and_segment_names():
    labels = np.array([[[0, 5, 52]]])
    assert resolve_adapter("auto", labels).name == "totalseg"
    assert resolve_adapter("auto", np.array([[[0, 4, 1, 2, 3]]])).name == "amos"  # the same organs everywhere
    names = {1: "Liver", 2: "Right Kidney", 3: "Body", 4: "vertebrae_L1", 5: "arota"}
    adapter = resolve_adapter("auto", np.array([[[0, 1, 2, 3, 4]]]), names)
    assert adapter.name == "segment names"
    assert [MODEL_CLASSES[adapter.table[v]] for v in (1, 2, 3, 4, 5)] == [
        "liver", "kidney_right", "body", "body", "aorta"]
    assert adapter.outline_values == frozenset({3})


@pytest.mark.parametrize("ids", [[1, 6], [5], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]])
def test_auto_refuses_ids_that_mean_different_organs(ids):
    """Ids 5..15 alone (AMOS, or TotalSegmentator --roi_subset) are refused, naming what each reading gives."""
    labels = np.array([[[0, *ids]]], dtype=np.uint8)
    with pytest.raises(InputError, match="--labels amos, totalseg") as error:
        resolve_adapter("auto", labels)
    message = str(error.value)
    assert "as AMOS: " in message and "as TotalSegmentator v2: " in message and "\n" not in message
    if ids == [1, 6]:
        assert "as AMOS: spleen, liver" in message and "as TotalSegmentator v2: spleen, stomach" in message
    assert resolve_adapter("amos", labels).name == "amos"  # an explicit convention is taken as given
    # the same ids with segment names are not ambiguous (the Slicer path)
    assert resolve_adapter("auto", labels, {v: "liver" for v in ids}).name == "segment names"


@pytest.mark.parametrize("dtype, offset", [(np.uint16, 1024), (np.int32, 1024), (np.float32, 1024)])
def test_a_ct_given_as_segmentation_is_refused_in_any_type(dtype, offset):
    ct = (np.random.default_rng(0).normal(0, 300, (16, 16, 8)).clip(-1000, 2000) + offset).astype(dtype)
    for spec in ("auto", "amos", "totalseg"):
        with pytest.raises(InputError, match="looks like an intensity image"):
            resolve_adapter(spec, ct).classes(ct)



@pytest.mark.parametrize("count", [255, 256])
def test_one_rule_tells_a_label_map_from_an_intensity_image_both_ways(tmp_path, count):
    """The segmentation check and the CT check agree at the limit: 255 values besides 0 are a label map for both
    (accepted as a segmentation, refused as a CT), 256 an intensity image for both."""
    from CTSemanticSynthLib.io import Volume, read_ct, write_volume

    array = np.zeros(8 * 8 * 5, np.int16)
    array[:count] = np.arange(1, count + 1) * 3
    array = array.reshape(8, 8, 5)
    write_volume(Volume(array, np.eye(4)), tmp_path / "x.nii.gz")
    adapter = resolve_adapter("totalseg", array)
    if count == 255:
        adapter.classes(array)
        with pytest.raises(InputError, match="looks like a label map, not a CT: it holds 256 distinct whole numbers"):
            read_ct(tmp_path / "x.nii.gz", "--ct x.nii.gz")
    else:
        with pytest.raises(InputError, match="has 256 distinct values .* looks like an intensity image"):
            adapter.classes(array)
        np.testing.assert_array_equal(read_ct(tmp_path / "x.nii.gz", "--ct x.nii.gz").array, array)

def test_huge_label_values_map_without_a_huge_table():
    labels = np.zeros((3, 4, 5), dtype=np.int32)
    labels[0] = 6
    labels[1, 0] = np.iinfo(np.int32).max
    labels[2, 1] = 1
    tracemalloc.start()
    mapped, report = resolve_adapter("amos", labels).classes(labels)  # a lookup table would need 2 GiB
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 10 * 2**20
    assert (mapped[0] == 6).all() and (mapped[1, 0] == BODY).all() and (mapped[2, 1] == 1).all()
    assert (mapped[2, 0] == 0).all() and report.unknown == {np.iinfo(np.int32).max: 5}
    assert report.organs_present == ("spleen", "liver")


def test_class_from_name_synonyms():
    assert MODEL_CLASSES[class_from_name("Gall bladder")] == "gallbladder"
    assert MODEL_CLASSES[class_from_name("postcava")] == "inferior_vena_cava"
    assert MODEL_CLASSES[class_from_name("prostate/uterus")] == "prostate_uterus"
    assert class_from_name("femur_left") is None


def test_json_adapter_values_and_names(tmp_path: Path):
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"7": "liver", "Milz": "spleen", "9": "background", "12": "body"}))
    adapter = json_adapter(mapping, {3: "Milz"})
    assert adapter.table == {7: 6, 3: 1, 9: 0, 12: BODY}
    labels = np.array([[[7, 3, 9, 12, 55]]])
    mapped, report = adapter.classes(labels)
    assert mapped.ravel().tolist() == [6, 1, 0, BODY, BODY]
    assert report.unknown == {55: 1}


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ("[]", "non-empty JSON object"),
    ('{"1": "kidney"}', "is not a class"),
])
def test_json_adapter_errors(tmp_path: Path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        json_adapter(path)


def test_unknown_convention_and_missing_file():
    with pytest.raises(InputError, match="unknown label convention"):
        resolve_adapter("nnunet", np.zeros((1, 1, 1), dtype=np.int32))
    with pytest.raises(InputError, match="not found"):
        resolve_adapter("/nonexistent/map.json", np.zeros((1, 1, 1), dtype=np.int32))


def test_segment_names_adapter_on_unnamed_structure():
    adapter = segment_names_adapter({1: "spleen", 2: "tumour"})
    assert adapter.table == {1: 1, 2: BODY}


def test_mapping_file_with_non_ascii_names_reads_under_an_ascii_locale(tmp_path: Path):
    """CI runs with an ASCII locale (and a DICOM read can switch a process to it): a user's mapping file and the
    bundled tables are UTF-8 whatever the locale says."""
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"7": "liver", "Milz (ü)": "spleen"}, ensure_ascii=False), encoding="utf-8")
    code = ("import sys, locale; from CTSemanticSynthLib.labels import json_adapter; "
            "assert locale.getpreferredencoding(False).lower() != 'utf-8'; "
            "print(json_adapter(sys.argv[1], {3: 'Milz (\\u00fc)'}).table)")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0"}
    result = subprocess.run([sys.executable, "-X", "utf8=0", "-c", code, str(mapping)], capture_output=True,
                            text=True, encoding="utf-8", env=env, cwd=Path(__file__).resolve().parent.parent,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "{7: 6, 3: 1}"
