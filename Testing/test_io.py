"""Tests for CTSemanticSynthLib.io: geometry round-trips, DICOM series, Slicer .seg.nrrd, errors."""

from __future__ import annotations

import errno
import gzip
import logging
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from CTSemanticSynthLib import io
from CTSemanticSynthLib.errors import InputError, OutputExistsError
from CTSemanticSynthLib.io import Volume, atomic

from conftest import SAMPLE as EXAMPLE


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _affine(handed: str) -> np.ndarray:
    """Oblique affine with anisotropic spacing; 'left' flips the first voxel axis (negative determinant)."""
    affine = np.eye(4)
    affine[:3, :3] = _rotation(0.35, -0.6, 0.9) @ np.diag([0.7, 1.3, 2.5])
    if handed == "left":
        affine[:3, 0] *= -1
    affine[:3, 3] = [-12.5, 33.25, 101.75]
    return affine


def _volume(handed: str, dtype=np.int16, shape=(7, 5, 3)) -> Volume:
    # Last axis of length 3 catches any (k, j, i) / vector-pixel confusion.
    rng = np.random.default_rng(0)
    return Volume(rng.integers(-1000, 2000, size=shape).astype(dtype), _affine(handed))


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- geometry conversion ---------------------------------------------------------------------------


def test_lps_to_ras_affine_known_values():
    affine = io.lps_to_ras_affine((1.0, 2.0, 3.0), (0.5, 2.0, 3.0), np.eye(3).ravel())
    expected = np.array([[-0.5, 0, 0, -1], [0, -2, 0, -2], [0, 0, 3, 3], [0, 0, 0, 1]])
    np.testing.assert_allclose(affine, expected)


@pytest.mark.parametrize("handed", ["right", "left"])
def test_ras_affine_to_lps_inverts(handed):
    affine = _affine(handed)
    origin, spacing, direction = io.ras_affine_to_lps(affine)
    np.testing.assert_allclose(spacing, [0.7, 1.3, 2.5])
    assert np.sign(np.linalg.det(np.reshape(direction, (3, 3)))) == (1 if handed == "right" else -1)
    np.testing.assert_allclose(io.lps_to_ras_affine(origin, spacing, direction), affine, atol=1e-12)


def test_sitk_conversion_keeps_ijk_order():
    img = sitk.Image(4, 3, 2, sitk.sitkInt16)  # size (i, j, k)
    img.SetPixel(3, 1, 0, 7)
    vol = io.sitk_to_volume(img)
    assert vol.shape == (4, 3, 2)
    assert vol.array[3, 1, 0] == 7 and vol.array.sum() == 7
    back = io.volume_to_sitk(vol)
    assert back.GetSize() == (4, 3, 2) and back.GetPixel(3, 1, 0) == 7


def test_volume_properties_and_same_grid():
    vol = _volume("left")
    np.testing.assert_allclose(vol.spacing, (0.7, 1.3, 2.5))
    assert vol.shape == (7, 5, 3)
    assert vol.same_grid(Volume(np.zeros(vol.shape), vol.affine + 1e-6))
    assert not vol.same_grid(Volume(np.zeros(vol.shape), vol.affine + 1e-2))
    assert not vol.same_grid(Volume(np.zeros((7, 5, 4)), vol.affine))
    assert "oblique" in io.describe_geometry(vol)


def test_sheared_affine_cannot_be_written(tmp_path):
    affine = np.eye(4)
    affine[0, 1] = 0.5
    with pytest.raises(InputError, match="shear"):
        io.write_volume(Volume(np.zeros((3, 3, 3), np.int16), affine), tmp_path / "x.nii.gz")


# --- example data ------------------------------------------------------------------------------------


def test_read_example_ct_and_labels_match_nibabel():
    ct = io.read_image(EXAMPLE / "ct.nii.gz")
    ref = nib.load(EXAMPLE / "ct.nii.gz")
    assert ct.shape == (122, 101, 112) and ct.array.dtype == np.float32
    np.testing.assert_allclose(ct.affine, ref.affine, atol=1e-5)
    np.testing.assert_array_equal(ct.array, np.asarray(ref.dataobj))

    seg, names = io.read_labelmap(EXAMPLE / "seg_total.nii.gz")
    assert seg.shape == (122, 101, 112) and np.issubdtype(seg.array.dtype, np.integer)
    assert names == {}
    assert seg.same_grid(ct)
    np.testing.assert_array_equal(seg.array, np.asarray(nib.load(EXAMPLE / "seg_total.nii.gz").dataobj))
    assert {1, 2, 3, 5}.issubset(np.unique(seg.array))


# --- round trips ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("handed", ["right", "left"])
def test_round_trip_keeps_geometry_values_and_dtype(tmp_path, suffix, handed):
    vol = _volume(handed)
    path = tmp_path / f"vol{suffix}"
    io.write_volume(vol, path)
    back = io.read_image(path)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-5)
    np.testing.assert_array_equal(back.array, vol.array)
    assert sitk.ReadImage(str(path)).GetPixelID() == sitk.sitkInt16
    if suffix.startswith(".nii"):
        ref = nib.load(path)  # an independent reader must see the same voxels at the same places
        np.testing.assert_allclose(ref.affine, vol.affine, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(ref.dataobj), vol.array)
        assert ref.get_data_dtype() == np.int16
        assert np.sign(np.linalg.det(ref.affine[:3, :3])) == (1 if handed == "right" else -1)


@pytest.mark.parametrize("codes", [(1, 1), (1, 0), (0, 2)], ids=["qform+sform", "qform-only", "sform-only"])
@pytest.mark.parametrize("handed", ["right", "left"])
def test_reads_nibabel_written_nifti_like_nibabel(tmp_path, handed, codes):
    data = _volume(handed).array
    img = nib.Nifti1Image(data, _affine(handed))
    img.set_qform(_affine(handed), code=codes[0])
    img.set_sform(_affine(handed), code=codes[1])
    nib.save(img, tmp_path / "nib.nii.gz")
    ref = nib.load(tmp_path / "nib.nii.gz")
    ours = io.read_image(tmp_path / "nib.nii.gz")
    np.testing.assert_allclose(ours.affine, ref.affine, atol=1e-5)
    np.testing.assert_array_equal(ours.array, np.asarray(ref.dataobj))


def test_labelmap_round_trip_keeps_uint8(tmp_path):
    labels = Volume(np.arange(7 * 5 * 3, dtype=np.uint8).reshape(7, 5, 3) % 4, _affine("left"))
    io.write_volume(labels, tmp_path / "seg.nii.gz")
    back, names = io.read_labelmap(tmp_path / "seg.nii.gz")
    assert back.array.dtype == np.uint8 and names == {}
    np.testing.assert_array_equal(back.array, labels.array)
    np.testing.assert_allclose(back.affine, labels.affine, atol=1e-5)


def test_float_labelmap_with_integer_values_is_accepted(tmp_path):
    labels = Volume(np.array([0, 1, 300], np.float32)[np.arange(27) % 3].reshape(3, 3, 3), np.eye(4))
    io.write_volume(labels, tmp_path / "seg.nrrd")
    back, _ = io.read_labelmap(tmp_path / "seg.nrrd")
    assert back.array.dtype == np.int16
    np.testing.assert_array_equal(back.array, labels.array)


@pytest.mark.parametrize("top, dtype", [(255, np.uint8), (256, np.int16), (32767, np.int16), (32768, np.int32)])
def test_labelmap_gets_the_smallest_type_that_holds_its_labels(tmp_path, top, dtype):
    labels = np.zeros((3, 3, 3), np.int32)
    labels[1, 1, 1] = top
    io.write_volume(Volume(labels, np.eye(4)), tmp_path / "seg.nrrd")
    back, _ = io.read_labelmap(tmp_path / "seg.nrrd")
    assert back.array.dtype == dtype
    np.testing.assert_array_equal(back.array, labels)


# --- metadata ------------------------------------------------------------------------------------------


def test_nifti_descrip_written_and_truncated(tmp_path):
    descrip = "SYNTHETIC CT model=demo sha256=" + "ab" * 40
    path = tmp_path / "ct.nii.gz"
    io.write_volume(_volume("right"), path, metadata={"descrip": descrip, "model": "demo"})
    stored = nib.load(path).header["descrip"].item().decode()
    assert stored == descrip[:79]
    assert io.read_metadata(path)["descrip"] == descrip[:79]


def test_nrrd_metadata_in_header(tmp_path):
    path = tmp_path / "ct.nrrd"
    io.write_volume(_volume("right"), path, metadata={"SYNTHETIC": "1", "model": "demo v1"})
    meta = io.read_metadata(path)
    assert meta["SYNTHETIC"] == "1" and meta["model"] == "demo v1"
    header = path.read_bytes().split(b"\n\n", 1)[0].decode()
    assert "SYNTHETIC:=1" in header and "model:=demo v1" in header


# --- DICOM ---------------------------------------------------------------------------------------------


def _write_dicom_series(folder: Path, vol: Volume, series_uid: str, description: str) -> None:
    img = io.volume_to_sitk(vol)
    direction = np.reshape(img.GetDirection(), (3, 3))
    orientation = "\\".join(f"{v:.10f}" for v in np.concatenate([direction[:, 0], direction[:, 1]]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(img.GetSize()[2]):
        slice_ = img[:, :, k]
        tags = {
            "0008|0060": "CT",
            "0008|103e": description,
            "0010|0020": "TEST",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1.1",
            "0020|000e": series_uid,
            "0008|0018": f"{series_uid}.{k + 1}",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in img.TransformIndexToPhysicalPoint((0, 0, k))),
            "0020|0037": orientation,
            "0018|0050": f"{img.GetSpacing()[2]:.6f}",
        }
        for tag, value in tags.items():
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{description}_{k:03d}.dcm"))
        writer.Execute(slice_)


@pytest.fixture
def dicom_case(tmp_path) -> tuple[Path, Volume]:
    affine = np.eye(4)
    affine[:3, :3] = _rotation(0.0, 0.0, 0.3) @ np.diag([0.8, 0.9, 2.5])
    affine[:3, 3] = [-100.0, 50.5, -20.25]
    rng = np.random.default_rng(1)
    vol = Volume(rng.integers(-1024, 1500, size=(8, 6, 5)).astype(np.int16), affine)
    folder = tmp_path / "dicom"
    folder.mkdir()
    _write_dicom_series(folder, vol, "1.2.826.0.1.3680043.2.1125.1.2", "main")
    _write_dicom_series(folder, Volume(vol.array[:, :, :2], affine), "1.2.826.0.1.3680043.2.1125.1.3", "short")
    return folder, vol


def test_dicom_series_read_picks_largest_series(dicom_case, caplog):
    folder, vol = dicom_case
    with caplog.at_level(logging.INFO, logger="CTSemanticSynthLib.io"):
        ct = io.read_image(folder)
    assert "2 DICOM series" in caplog.text
    assert ct.shape == (8, 6, 5)
    np.testing.assert_allclose(ct.affine, vol.affine, atol=1e-4)
    np.testing.assert_array_equal(ct.array, vol.array.astype(np.float32))
    assert io.read_metadata(folder)["0008|103e"].strip() == "main"


def test_dicom_series_with_missing_slice_is_refused(dicom_case):
    folder, _ = dicom_case
    (folder / "main_002.dcm").unlink()
    with pytest.raises(InputError, match="unevenly spaced"):
        io.read_image(folder)


def test_labelmap_from_dicom_folder_is_refused(dicom_case):
    with pytest.raises(InputError, match="DICOM"):
        io.read_labelmap(dicom_case[0])


# --- Slicer segmentations ------------------------------------------------------------------------------


def _segment_meta(img: sitk.Image, segments: list[tuple[str, int, int]]) -> None:
    img.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    for n, (name, value, layer) in enumerate(segments):
        img.SetMetaData(f"Segment{n}_ID", f"id_{name}")
        img.SetMetaData(f"Segment{n}_Name", name)
        img.SetMetaData(f"Segment{n}_LabelValue", str(value))
        img.SetMetaData(f"Segment{n}_Layer", str(layer))


def test_seg_nrrd_single_layer_names(tmp_path):
    labels = np.zeros((6, 5, 4), np.uint8)
    labels[1:3, 1:3, 1:3] = 1
    labels[4, 3, 2] = 2
    vol = Volume(labels, _affine("right"))
    img = io.volume_to_sitk(vol)
    _segment_meta(img, [("liver", 1, 0), ("spleen", 2, 0), ("empty", 5, 0)])
    sitk.WriteImage(img, str(tmp_path / "a.seg.nrrd"), useCompression=True)

    seg, names = io.read_labelmap(tmp_path / "a.seg.nrrd")
    assert names == {1: "liver", 2: "spleen", 5: "empty"}
    np.testing.assert_array_equal(seg.array, labels)
    np.testing.assert_allclose(seg.affine, vol.affine, atol=1e-5)


@pytest.mark.parametrize("layout", ["list-first", "layers-last"])
def test_seg_nrrd_two_layers_merged(tmp_path, layout, caplog):
    layer0 = np.zeros((6, 5, 4), np.uint8)
    layer0[0:3, :, :] = 1  # liver
    layer0[5, 4, 3] = 2  # spleen
    layer1 = np.zeros_like(layer0)
    layer1[2:4, :, :] = 1  # kidney: same label value as liver, overlaps it on i == 2
    affine = _affine("left")
    path = tmp_path / "b.seg.nrrd"
    if layout == "list-first":  # how Slicer writes overlapping segments: "kinds: list domain domain domain"
        stacked = np.stack([layer0, layer1], axis=-1).transpose(2, 1, 0, 3)  # (k, j, i, layer)
        img = sitk.GetImageFromArray(stacked, isVector=True)
    else:
        img = sitk.JoinSeries([io.volume_to_sitk(Volume(layer, affine)) for layer in (layer0, layer1)])
    origin, spacing, direction = io.ras_affine_to_lps(affine)
    dim = img.GetDimension()
    full_direction = np.eye(dim)
    full_direction[:3, :3] = np.reshape(direction, (3, 3))
    img.SetOrigin(origin + (0.0,) * (dim - 3))
    img.SetSpacing(spacing + (1.0,) * (dim - 3))
    img.SetDirection(full_direction.ravel())
    _segment_meta(img, [("liver", 1, 0), ("spleen", 2, 0), ("kidney", 1, 1)])
    sitk.WriteImage(img, str(path), useCompression=True)
    if layout == "list-first":
        path.write_bytes(path.read_bytes().replace(b"kinds: vector", b"kinds: list", 1))
        assert b"kinds: list domain domain domain" in path.read_bytes()

    with caplog.at_level(logging.WARNING, logger="CTSemanticSynthLib.io"):
        seg, names = io.read_labelmap(path)
    assert names == {1: "liver", 2: "spleen", 3: "kidney"}
    expected = np.zeros_like(layer0)
    expected[0:2] = 1
    expected[5, 4, 3] = 2
    expected[2:4] = 3  # the later segment wins the overlap
    np.testing.assert_array_equal(seg.array, expected)
    np.testing.assert_allclose(seg.affine, affine, atol=1e-5)
    assert "overlaps" in caplog.text and "kidney" in caplog.text

    with pytest.raises(InputError, match="4-D"):
        io.read_image(path)


# --- errors --------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="does not exist") as err:
        io.read_image(tmp_path / "nope.nii.gz")
    assert "nope.nii.gz" in str(err.value) and "\n" not in str(err.value)


def test_unsupported_input_format(tmp_path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG")
    with pytest.raises(InputError, match="unsupported format"):
        io.read_image(tmp_path / "x.png")


def test_corrupt_file(tmp_path):
    (tmp_path / "bad.nii.gz").write_bytes(b"not an image")
    with pytest.raises(InputError, match="cannot read"):
        io.read_image(tmp_path / "bad.nii.gz")


def test_float_ct_given_as_labelmap(tmp_path):
    ct = Volume(np.linspace(-1000.5, 400.25, 60, dtype=np.float32).reshape(5, 4, 3), np.eye(4))
    io.write_volume(ct, tmp_path / "ct.nii.gz")
    with pytest.raises(InputError, match="intensity image, not a label map"):
        io.read_labelmap(tmp_path / "ct.nii.gz")


def test_int_ct_given_as_labelmap():
    with pytest.raises(InputError, match="negative labels"):
        io.read_labelmap(EXAMPLE / "ct.nii.gz")


def test_4d_nifti_refused(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((4, 3, 2, 2), np.float32), np.eye(4)), tmp_path / "x4.nii.gz")
    with pytest.raises(InputError, match=r"is 4-D \(shape \(4, 3, 2, 2\)\); give one 3-D volume"):
        io.read_image(tmp_path / "x4.nii.gz")
    with pytest.raises(InputError, match="4-D"):
        io.read_labelmap(tmp_path / "x4.nii.gz")


def test_singleton_fourth_axis_is_3d(tmp_path):
    data = np.arange(24, dtype=np.int16).reshape(4, 3, 2, 1)
    nib.save(nib.Nifti1Image(data, _affine("right")), tmp_path / "x.nii.gz")
    vol = io.read_image(tmp_path / "x.nii.gz")
    np.testing.assert_array_equal(vol.array, data[..., 0])


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nii.gz", ".nii"])
def test_nan_refused(tmp_path, suffix):
    data = np.zeros((4, 3, 2), np.float32)
    data[1, 2, 0] = np.nan
    data[0, 0, 1] = np.inf
    path = tmp_path / f"nan{suffix}"
    if suffix.startswith(".nii"):  # written by another tool: ITK's own NIfTI reader would hide the NaN as 0
        nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    else:
        io.write_volume(Volume(data, np.eye(4)), path)
    with pytest.raises(InputError, match="2 NaN or infinite voxels"):
        io.read_image(path)
    data[data != 0] = 0
    data[1, 2, 1] = np.nan
    if suffix.startswith(".nii"):
        nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    else:
        io.write_volume(Volume(data, np.eye(4)), path, overwrite=True)
    with pytest.raises(InputError, match="1 NaN or infinite voxels"):
        io.read_labelmap(path)


def test_existing_output_not_overwritten(tmp_path):
    path = tmp_path / "out.nii.gz"
    io.write_volume(_volume("right"), path)
    before = path.read_bytes()
    other = Volume(np.zeros((7, 5, 3), np.int16), _affine("right"))
    with pytest.raises(OutputExistsError, match="--overwrite") as err:
        io.write_volume(other, path)
    assert str(path) in str(err.value)
    assert path.read_bytes() == before
    io.write_volume(other, path, overwrite=True)
    assert not io.read_image(path).array.any()
    assert _files(tmp_path) == ["out.nii.gz"]


def test_write_refusals_leave_folder_unchanged(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="unsupported format"):
        io.write_volume(_volume("right"), tmp_path / "out.png")
    with pytest.raises(InputError, match="does not exist"):
        io.write_volume(_volume("right"), tmp_path / "missing" / "out.nii.gz")
    assert _files(tmp_path) == ["keep.txt"]


def test_failed_write_removes_temp_and_keeps_original(tmp_path, monkeypatch):
    path = tmp_path / "out.nrrd"
    io.write_volume(_volume("right"), path)
    before = path.read_bytes()
    real_write = sitk.WriteImage

    def write_then_fail(image, filename, *args, **kwargs):
        real_write(image, filename, *args, **kwargs)
        assert Path(filename).name.startswith(".ctsynth-tmp-") and Path(filename).parent == tmp_path
        raise RuntimeError("ITK ERROR: NrrdImageIO(0x1): disk full")

    monkeypatch.setattr(sitk, "WriteImage", write_then_fail)
    with pytest.raises(InputError, match="disk full"):
        io.write_volume(_volume("left"), path, overwrite=True)
    assert _files(tmp_path) == ["out.nrrd"]
    assert path.read_bytes() == before


def test_legacy_seg_nrrd_one_binary_segment_per_layer(tmp_path):
    # Before Slicer 4.11 each segment had its own layer with value 1 and no LabelValue/Layer keys.
    layers = np.zeros((2, 4, 3, 2), np.uint8)  # (layer, k, j, i)
    layers[0, :, :, 0] = 1
    layers[1, :, :, 1] = 1
    img = sitk.GetImageFromArray(layers.transpose(1, 2, 3, 0), isVector=True)
    img.SetMetaData("Segment0_Name", "liver")
    img.SetMetaData("Segment1_Name", "spleen")
    sitk.WriteImage(img, str(tmp_path / "old.seg.nrrd"))
    seg, names = io.read_labelmap(tmp_path / "old.seg.nrrd")
    assert names == {1: "liver", 2: "spleen"}
    assert seg.shape == (2, 3, 4)
    np.testing.assert_array_equal(seg.array[0], 1)
    np.testing.assert_array_equal(seg.array[1], 2)


# --- verified reads: truncated or damaged files are refused, never zero-filled -----------------------


@pytest.fixture(scope="module")
def real_files(tmp_path_factory) -> dict[str, Path]:
    """The sample case as int16 labels and float32 CT in every compressed format, and as plain .nii."""
    folder = tmp_path_factory.mktemp("real")
    seg, ct = nib.load(EXAMPLE / "seg_total.nii.gz"), nib.load(EXAMPLE / "ct.nii.gz")
    files = {}
    for name, image, dtype in (("seg", seg, np.int16), ("ct", ct, np.float32)):
        data = np.asarray(image.dataobj).astype(dtype)
        for suffix in (".nii.gz", ".nii"):
            files[name + suffix] = folder / f"{name}{suffix}"
            nib.save(nib.Nifti1Image(data, image.affine), files[name + suffix])
        for suffix in (".nrrd", ".mha"):  # ITK writes gzip NRRD and zlib MetaImage
            files[name + suffix] = folder / f"{name}{suffix}"
            io.write_volume(Volume(data, image.affine), files[name + suffix])
    return files


@pytest.mark.parametrize("key", ["seg.nii.gz", "ct.nii.gz", "seg.nii", "ct.nii", "seg.nrrd", "ct.nrrd",
                                 "seg.mha", "ct.mha"])
@pytest.mark.parametrize("keep", [0.02, 0.5, 0.9, "all but one byte"])
def test_truncated_file_is_refused(real_files, tmp_path, key, keep):
    data = real_files[key].read_bytes()
    cut = tmp_path / f"cut_{key}"
    cut.write_bytes(data[: len(data) - 1 if isinstance(keep, str) else int(len(data) * keep)])
    with pytest.raises(InputError, match=r"cannot read .*(truncated|damaged)"):
        _read(cut)
    assert _read(real_files[key]).shape == (122, 101, 112)  # the whole file reads


def _read(path: Path) -> Volume:
    return io.read_labelmap(path)[0] if "seg" in path.name else io.read_image(path)


@pytest.mark.parametrize("layout", ["two gzip members", "zero padding", "one byte short", "nrrd one byte short"])
def test_gzip_members_and_padding_are_counted(tmp_path, layout):
    # the data of a .nii.gz may span several gzip members and be followed by zeros; only missing bytes are refused
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    header, raw = b"", nib.Nifti1Image(array, np.eye(4)).to_bytes()
    path = tmp_path / "x.nii.gz"
    if layout.startswith("nrrd"):  # a gzip NRRD: the header's byte count is not part of the data
        path = tmp_path / "x.nrrd"
        io.write_volume(Volume(array, np.eye(4)), path)
        header, _, data = path.read_bytes().partition(b"\n\n")
        header, raw = header + b"\n\n", gzip.decompress(data)
    path.write_bytes(header + {"two gzip members": gzip.compress(raw[:200]) + gzip.compress(raw[200:]),
                               "zero padding": gzip.compress(raw) + bytes(64)}.get(layout, gzip.compress(raw[:-1])))
    if layout.endswith("one byte short"):  # an intact stream that holds less than the header promises
        with pytest.raises(InputError, match=rf"truncated \({len(raw) - 1} of the {len(raw)} bytes"):
            io.verify_complete(path)
    else:
        io.verify_complete(path)


def test_label_above_int32_is_refused(tmp_path):
    img = sitk.GetImageFromArray(np.full((2, 2, 2), 2**31, np.uint32))
    sitk.WriteImage(img, str(tmp_path / "seg.nrrd"))
    with pytest.raises(InputError, match=f"seg.nrrd has label {2**31}, above the supported maximum"):
        io.read_labelmap(tmp_path / "seg.nrrd")


@pytest.mark.parametrize("key", ["seg.nii.gz", "ct.nii.gz", "ct.nrrd", "ct.mha"])
@pytest.mark.parametrize("where", [0.3, 0.97])
def test_damaged_compressed_data_is_refused(real_files, tmp_path, key, where):
    data = bytearray(real_files[key].read_bytes())
    data[int(len(data) * where)] ^= 0x5A  # one flipped byte: ITK decodes such data without complaint
    bad = tmp_path / f"bad_{key}"
    bad.write_bytes(bytes(data))
    with pytest.raises(InputError, match="damaged"):
        _read(bad)


def test_truncated_input_is_one_line_for_synth_and_evaluate(real_files, tmp_path, capsys, tiny_model):
    from CTSemanticSynthLib.cli import main

    data = real_files["seg.nii.gz"].read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(data[: len(data) // 2])
    runs = (["synth", "--seg", cut, "--out", tmp_path / "syn.nii.gz", "--model", tiny_model, "--labels", "totalseg"],
            ["evaluate", "--synthetic", real_files["ct.nii.gz"], "--seg", cut],
            ["evaluate", "--synthetic", cut, "--seg", real_files["seg.nii.gz"]])
    for argv in runs:
        assert main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("ctsynth: error: cannot read") and ("truncated" in err or "damaged" in err), err
        assert err.count("\n") == 1 and str(cut) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.nii.gz"]


# --- preview -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, spacing", [
    ((512, 512, 3), (0.7, 0.7, 5.0)),   # thin: three 5 mm slices
    ((64, 200, 40), (2.0, 0.5, 4.0)),   # anisotropic in plane and across
    ((512, 512, 60), (0.8, 0.8, 2.5)),  # a usual 512 x 512 CT
    ((40, 30, 600), (0.8, 0.8, 1.0)),   # tall and narrow
])
def test_preview_keeps_physical_aspect_within_2048_pixels(shape, spacing):
    from scipy import ndimage

    from CTSemanticSynthLib.labels import COLORS
    from CTSemanticSynthLib.preview import MAX_SIDE, render_preview

    stomach = 7
    classes = np.full(shape, len(COLORS) - 1, np.uint8)  # body everywhere
    box = tuple(slice(int(n * 0.4), max(int(n * 0.4) + 1, int(n * 0.9))) for n in shape[:2]) + (slice(None),)
    classes[box] = stomach
    affine = np.diag([*spacing, 1.0])
    image = render_preview(Volume(classes, affine), Volume(np.zeros(shape, np.int16), affine))
    assert max(image.size) <= MAX_SIDE
    found, n = ndimage.label(np.all(np.asarray(image) == COLORS[stomach], axis=-1))
    sizes = ndimage.sum_labels(found > 0, found, range(1, n + 1))
    largest = [ndimage.find_objects(found)[i] for i in np.argsort(sizes)[-3:]]  # the panel labels may cut specks
    axial, coronal, sagittal = sorted(largest, key=lambda s: s[0].start)  # the box in each segmentation panel
    mm = [(s.stop - s.start) * d for s, d in zip(box[:2], spacing)] + [shape[2] * spacing[2]]  # I, J, K extents
    for (rows, cols), (height_mm, width_mm) in ((axial, (mm[1], mm[0])), (coronal, (mm[2], mm[0])),
                                                (sagittal, (mm[2], mm[1]))):
        height, width = rows.stop - rows.start, cols.stop - cols.start
        assert width / height == pytest.approx(width_mm / height_mm, rel=0.05, abs=2 / min(height, width))


# --- details found by mutation testing (docs/testing.md) ----------------------------------------------------


def test_describe_geometry_names_shape_spacing_origin_and_axes():
    lps = np.diag([-0.7, -1.3, 2.5, 1.0])
    lps[:3, 3] = [10.0, -20.5, 3.25]
    assert io.describe_geometry(Volume(np.zeros((7, 5, 3)), lps)) == (
        "shape (7, 5, 3), spacing (0.7, 1.3, 2.5) mm, origin (10, -20.5, 3.25) RAS, axes LPS")
    permuted = np.zeros((4, 4))
    permuted[:3, :3] = [[0, 1.5, 0], [0, 0, 0.8], [2.0, 0, 0]]  # i -> S, j -> R, k -> A
    permuted[3, 3] = 1
    assert io.describe_geometry(Volume(np.zeros((2, 3, 4)), permuted)).endswith("spacing (2, 1.5, 0.8) mm, "
                                                                               "origin (0, 0, 0) RAS, axes SRA")
    tilted = np.eye(4)
    tilted[:3, :3] = _rotation(0.1, 0.0, 0.0) @ np.diag([0.5, 0.5, 3.0])
    assert io.describe_geometry(Volume(np.zeros((2, 2, 2)), tilted)).endswith("axes RAS, oblique")


def test_same_grid_tolerance_is_absolute_in_millimetres():
    affine = np.eye(4)
    affine[:3, 3] = [1000.0, -1000.0, 1000.0]
    shifted = affine.copy()
    shifted[0, 3] += 0.005  # 5 micrometres: far above the 1e-4 mm tolerance, below 1e-5 relative to 1000 mm
    volume = Volume(np.zeros((2, 2, 2)), affine)
    assert not volume.same_grid(Volume(np.zeros((2, 2, 2)), shifted))
    assert volume.same_grid(Volume(np.zeros((2, 2, 2)), affine + 5e-5))


def test_seg_nrrd_labels_shared_by_three_layers_get_the_next_free_values(tmp_path, caplog):
    layers = np.zeros((3, 6, 5, 4), np.uint8)
    layers[0, 0:2] = 1  # liver
    layers[0, 5, 4, 3] = 2  # spleen
    layers[1, 2:3] = 1  # kidney: label 1 again
    layers[2, 1:4] = 1  # adrenal: label 1 a third time, overlapping the liver and the kidney
    img = sitk.JoinSeries([io.volume_to_sitk(Volume(layer, np.eye(4))) for layer in layers])
    _segment_meta(img, [("liver", 1, 0), ("spleen", 2, 0), ("kidney", 1, 1), ("adrenal", 1, 2)])
    path = tmp_path / "three.seg.nrrd"
    sitk.WriteImage(img, str(path), useCompression=True)
    with caplog.at_level(logging.INFO, logger="CTSemanticSynthLib.io"):
        seg, names = io.read_labelmap(path)
    assert names == {1: "liver", 2: "spleen", 3: "kidney", 4: "adrenal"}
    expected = np.zeros((6, 5, 4), np.uint8)
    expected[0:2], expected[5, 4, 3], expected[2], expected[1:4] = 1, 2, 3, 4
    np.testing.assert_array_equal(seg.array, expected)
    assert seg.array.dtype == np.uint8
    messages = [r.getMessage() for r in caplog.records]
    assert f"{path}: segment 'kidney' shares label 1 with 'liver'; it gets label 3" in messages
    assert f"{path}: segment 'adrenal' shares label 1 with 'liver'; it gets label 4" in messages
    assert f"{path}: segment 'adrenal' overlaps 40 voxels of earlier segments; 'adrenal' wins there" in messages


def test_write_volume_logs_what_it_wrote(tmp_path, caplog):
    volume = Volume(np.zeros((2, 3, 4), np.int16), np.eye(4))
    with caplog.at_level(logging.INFO, logger="CTSemanticSynthLib.io"):
        io.write_volume(volume, tmp_path / "v.nrrd")
    assert [r.getMessage() for r in caplog.records] == [
        f"wrote {tmp_path / 'v.nrrd'} (int16, {io.describe_geometry(volume)})"]


def test_nifti_descrip_cut_inside_a_multibyte_character_drops_that_character(tmp_path):
    descrip = "x" * 78 + "é" + "tail"  # "é" takes bytes 79-80: the 79-byte field ends inside it
    io.write_volume(_volume("right"), tmp_path / "d.nii.gz", metadata={"descrip": descrip})
    assert nib.load(tmp_path / "d.nii.gz").header["descrip"].item().decode() == "x" * 78


def test_a_written_file_whose_header_differs_from_the_volume_is_an_error(tmp_path, monkeypatch):
    real_write = sitk.WriteImage
    monkeypatch.setattr(sitk, "WriteImage", lambda img, path, **kw: real_write(sitk.Cast(img, sitk.sitkFloat32),
                                                                              path, **kw))
    with pytest.raises(InputError) as error:
        io.write_volume(_volume("right"), tmp_path / "h.nrrd")
    assert str(error.value) == (f"cannot write {tmp_path / 'h.nrrd'}: the file written is incomplete or unreadable "
                                "(its header does not match the volume); check the folder is writable and has space")
    assert _files(tmp_path) == []


def test_write_bytes_replaces_a_file_only_when_asked(tmp_path):
    path = tmp_path / "r.json"
    io.write_bytes(path, b"one")
    with pytest.raises(OutputExistsError):
        io.write_bytes(path, b"two")
    io.write_bytes(path, b"three", overwrite=True)
    assert path.read_bytes() == b"three" and _files(tmp_path) == ["r.json"]


def test_temp_names_are_recognised_as_this_runs_temps(tmp_path):
    for kind in ("tmp", "old"):
        match = atomic._TEMP_NAME.fullmatch(io.temp_sibling(tmp_path / "a.nii.gz", kind).name)
        assert match is not None and match.groups() == (kind, str(os.getpid()), "a.nii.gz")


def test_replaced_outputs_are_moved_aside_under_a_name_a_later_run_recognises(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    target.write_text("old")
    renamed = []
    real_rename = os.rename
    monkeypatch.setattr(os, "rename", lambda src, dst: renamed.append(Path(dst).name) or real_rename(src, dst))
    io.write_bytes(target, b"new", overwrite=True)
    aside = atomic._TEMP_NAME.fullmatch(renamed[0])
    assert aside is not None and aside.group(1) == "old" and aside.group(3) == "out.json"
    assert target.read_text() == "new" and _files(tmp_path) == ["out.json"]


def test_temps_of_this_process_and_of_live_processes_are_kept(tmp_path):
    # SIGHUP back to its default first: under nohup (as mutmut may run) a stray signal 1 would go unnoticed
    script = ("import signal, time; signal.signal(signal.SIGHUP, signal.SIG_DFL); print('ready', flush=True); "
              "time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"ready\n"
        mine = io.temp_sibling(tmp_path / "a.nrrd")
        theirs = tmp_path / f".ctsynth-tmp-{child.pid}-0123abcd.b.nrrd"
        for path in (mine, theirs):
            path.write_bytes(b"partial")
        io.remove_stale_temps(tmp_path)
        assert mine.exists() and theirs.exists()
        with pytest.raises(subprocess.TimeoutExpired):  # asked whether it runs, not signalled
            child.wait(timeout=1)
    finally:
        child.kill()
        child.wait()
        child.stdout.close()


def test_a_temp_of_a_process_we_may_not_signal_is_kept(tmp_path, monkeypatch):
    def not_ours(pid: int, signal_number: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", not_ours)
    temp = tmp_path / ".ctsynth-tmp-999999-0123abcd.a.nrrd"
    temp.write_bytes(b"partial")
    io.remove_stale_temps(tmp_path)
    assert temp.exists()


def test_a_path_that_cannot_be_compared_is_not_the_same_file(tmp_path, monkeypatch):
    a, b = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    a.write_bytes(b"a")
    b.write_bytes(b"b")

    def unreadable(first, second) -> bool:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os.path, "samefile", unreadable)
    io.check_distinct_paths({"--out": b}, {"--seg": a})  # no error: different names, unknown identity


def test_read_metadata_of_an_unreadable_file_says_why(tmp_path):
    path = tmp_path / "g.nrrd"
    path.write_text("garbage\n")
    with pytest.raises(InputError) as error:
        io.read_metadata(path)
    assert str(error.value) == f'cannot read {path}: sitk::ERROR: Unable to determine ImageIO reader for "{path}"'


def test_a_vector_image_with_four_dimensions_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "v4.nrrd"
    image = sitk.JoinSeries([sitk.Compose([sitk.Image(3, 3, 3, sitk.sitkUInt8)] * 2)] * 2)
    sitk.WriteImage(image, str(path))
    with pytest.raises(InputError) as error:
        io.read_image(path)
    assert str(error.value) == f"{path} is a 4-D image with 2 components per voxel; give one 3-D volume"


def _dicom_folder(tmp_path: Path, n: int, uid: str = "1.2.826.0.1.3680043.2.1125.1.2") -> tuple[Path, Volume]:
    affine = np.eye(4)
    affine[:3, :3] = np.diag([0.8, 0.9, 2.5])
    vol = Volume(np.arange(4 * 3 * n, dtype=np.int16).reshape(4, 3, n), affine)
    folder = tmp_path / "dicom"
    folder.mkdir(exist_ok=True)
    _write_dicom_series(folder, vol, uid, "main")
    return folder, vol


def _move_slice(path: Path, mm: float) -> None:
    """Shift one DICOM file's ImagePositionPatient along the slice normal (z here) by ``mm``."""
    img = sitk.ReadImage(str(path))
    x, y, z = (float(v) for v in img.GetMetaData("0020|0032").split("\\"))
    img.SetMetaData("0020|0032", f"{x:.6f}\\{y:.6f}\\{z + mm:.6f}")
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(path))
    writer.Execute(img)


@pytest.mark.parametrize("mm, accepted", [(0.025, True), (0.5, False)])  # tolerance 0.01 * 2.5 + 0.001 mm
def test_dicom_slice_positions_within_one_percent_of_the_spacing_are_even(tmp_path, mm, accepted):
    folder, vol = _dicom_folder(tmp_path, 8)
    _move_slice(folder / "main_003.dcm", mm)
    if accepted:
        np.testing.assert_array_equal(io.read_image(folder).array, vol.array.astype(np.float32))
    else:
        with pytest.raises(InputError, match="unevenly spaced"):
            io.read_image(folder)


def test_three_dicom_slices_with_a_gap_are_refused(tmp_path):
    folder, _ = _dicom_folder(tmp_path, 4)
    (folder / "main_001.dcm").unlink()
    with pytest.raises(InputError, match="unevenly spaced"):
        io.read_image(folder)


def test_one_dicom_series_is_read_without_a_note_and_its_first_slice_gives_the_metadata(tmp_path, caplog):
    folder, _ = _dicom_folder(tmp_path, 3)
    with caplog.at_level(logging.INFO, logger="CTSemanticSynthLib.io"):
        io.read_image(folder)
    assert caplog.records == []
    assert io.read_metadata(folder)["0020|0013"].strip() == "1"


@pytest.mark.parametrize("main_uid, other_uid", [("1.2.3.9", "1.2.3.1"), ("1.2.3.1", "1.2.3.9")])
def test_the_largest_dicom_series_is_chosen_whatever_its_uid(tmp_path, caplog, main_uid, other_uid):
    folder, vol = _dicom_folder(tmp_path, 6, main_uid)
    _write_dicom_series(folder, Volume(vol.array[:, :, :2], vol.affine), other_uid, "short")
    with caplog.at_level(logging.INFO, logger="CTSemanticSynthLib.io"):
        assert io.read_image(folder).shape == (4, 3, 6)
    assert [r.getMessage() for r in caplog.records] == [f"{folder} holds 2 DICOM series; using {main_uid} (6 files)"]


def test_a_folder_without_dicom_is_one_message(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(InputError) as error:
        io.read_image(tmp_path)
    assert str(error.value) == f"{tmp_path} holds no DICOM series; give a folder of DICOM slices or an image file"


# --- more details found by mutation testing: the exact one-line messages, segment tables, leftovers --------


def test_sitk_to_volume_refuses_a_vector_image_in_one_message():
    vector = sitk.Compose([sitk.Image(3, 3, 3, sitk.sitkUInt8)] * 2)
    with pytest.raises(ValueError) as error:
        io.sitk_to_volume(vector)
    assert str(error.value) == "expected a 3-D scalar image, got 3-D with 2 components"


def test_an_affine_with_shear_within_1e_4_is_written(tmp_path):
    affine = _affine("right")
    affine[0, 1] += 1e-5  # e.g. a float32 header's rounding: not a grid ITK would need resampled
    io.write_volume(Volume(np.zeros((3, 3, 3), np.int16), affine), tmp_path / "s.nrrd")
    np.testing.assert_allclose(io.read_image(tmp_path / "s.nrrd").affine, affine, atol=1e-4)


def _truncated_detached_nrrd(folder: Path) -> Path:
    """A .nhdr header whose gzip data file (.raw.gz) lost its second half."""
    sitk.WriteImage(io.volume_to_sitk(_volume("right")), str(folder / "d.nhdr"), useCompression=True)
    data = (folder / "d.raw.gz").read_bytes()
    (folder / "d.raw.gz").write_bytes(data[: len(data) // 2])
    return folder / "d.nhdr"


def _truncated_detached_metaimage(folder: Path) -> Path:
    """A .mhd header whose zlib data file (.zraw) lost its second half."""
    sitk.WriteImage(io.volume_to_sitk(_volume("right")), str(folder / "d.mhd"), useCompression=True)
    data = (folder / "d.zraw").read_bytes()
    (folder / "d.zraw").write_bytes(data[: len(data) // 2])
    return folder / "d.mhd"


def _truncated_nrrd_encoding_gz(folder: Path) -> Path:
    """A gzip NRRD that spells its encoding "gz" (an alias NRRD allows) and lost its last bytes."""
    path = folder / "z.nrrd"
    io.write_volume(_volume("right"), path)
    path.write_bytes(path.read_bytes().replace(b"encoding: gzip", b"encoding: gz", 1)[:-40])
    return path


def _nrrd_with_trailing_bytes(folder: Path) -> Path:
    """A gzip NRRD whose complete stream is followed by bytes that are neither a gzip member nor zero padding."""
    path = folder / "t.nrrd"
    io.write_volume(_volume("right"), path)
    path.write_bytes(path.read_bytes() + b"XX")
    return path


def _complex_nrrd(folder: Path) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((2, 3, 4), np.complex64)), str(folder / "c.nrrd"))
    return folder / "c.nrrd"


def _two_dimensional(folder: Path) -> Path:
    sitk.WriteImage(sitk.Image(3, 4, sitk.sitkUInt8), str(folder / "2d.nrrd"))
    return folder / "2d.nrrd"


def _written(folder: Path, name: str, values: list[float], dtype=np.float32) -> Path:
    io.write_volume(Volume(np.array(values, dtype).reshape(len(values), 1, 1), np.eye(4)), folder / name)
    return folder / name


def one_bit_nifti(folder: Path, name: str) -> Path:
    """A NIfTI whose header says datatype 1 (DT_BINARY: 1 bit a voxel), which neither nibabel nor ITK reads."""
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.uint8), np.eye(4)), folder / "u8.nii")
    header = bytearray((folder / "u8.nii").read_bytes())
    header[70:74] = (1).to_bytes(2, "little") + (1).to_bytes(2, "little")  # datatype, bitpix
    (folder / name).write_bytes(gzip.compress(bytes(header)) if name.endswith(".gz") else bytes(header))
    return folder / name


def _garbage(folder: Path, name: str) -> Path:
    (folder / name).write_bytes(b"garbage\n" * 64)
    return folder / name


@pytest.mark.parametrize("make, read, message", [
    (lambda d: _garbage(d, "g.nrrd"), io.read_image,
     'cannot read {p}: sitk::ERROR: Unable to determine ImageIO reader for "{p}"'),
    (lambda d: _garbage(d, "g.nii"), io.read_image,
     'cannot read {p}: the file is damaged (Cannot work out file type of "file"); copy or export it again'),
    (_truncated_detached_nrrd, io.read_image,
     "cannot read {p}: the file is damaged (the compressed data ends early); copy or export it again"),
    (_truncated_detached_metaimage, io.read_image,
     "cannot read {p}: the file is damaged (the compressed data ends early); copy or export it again"),
    (_truncated_nrrd_encoding_gz, io.read_image,
     "cannot read {p}: the file is damaged (the compressed data ends early); copy or export it again"),
    (lambda d: _garbage(d, "g.mha"), io.read_image,  # a header without ElementDataFile: read to its end, once
     'cannot read {p}: sitk::ERROR: Unable to determine ImageIO reader for "{p}"'),
    (_nrrd_with_trailing_bytes, io.read_image, ("cannot read {p}: the file is damaged "
     "(Error -3 while decompressing data: incorrect header check); copy or export it again")),
    (_complex_nrrd, io.read_labelmap, "{p} has voxel type complex64; a label map needs integer labels"),
    (lambda d: _written(d, "f.nrrd", [0.0, 1.5, 2.0]), io.read_labelmap, ("{p} has non-integer voxel values, so it "
     "looks like an intensity image, not a label map; give the segmentation file")),
    (lambda d: _written(d, "n.nrrd", [0, -5, 2], np.int16), io.read_labelmap,
     "{p} has negative labels (minimum -5); a label map needs values >= 0 (is this a CT rather than a segmentation?)"),
    (_two_dimensional, io.read_labelmap, "{p} is a 2-D image with 1 components per voxel; give one 3-D volume"),
    *[(lambda d, n=name: one_bit_nifti(d, n), read, "cannot read {p}: its NIfTI header is not supported (data code 1 "
       "not supported); save it again with a standard voxel type (uint8 or int16 for a label map)")
      for name in ("b.nii", "b.nii.gz") for read in (io.read_labelmap, io.read_image)],
], ids=["no-reader", "nifti-garbage", "nhdr-data-cut", "mhd-data-cut", "gz-cut", "metaimage-garbage", "trailing-bytes",
        "complex", "fractional", "negative", "2-D", "1-bit-nii-labels", "1-bit-nii-image", "1-bit-gz-labels",
        "1-bit-gz-image"])
def test_unreadable_inputs_are_one_message_naming_the_file(tmp_path, make, read, message):
    path = make(tmp_path)
    with pytest.raises(InputError) as error:
        read(path)
    assert str(error.value) == message.format(p=path)


@pytest.mark.parametrize("key, absolute", [("data file", False), ("datafile", True)])
def test_a_detached_nrrd_header_finds_its_gzip_data_file(tmp_path, key, absolute):
    volume = _volume("right")
    sitk.WriteImage(io.volume_to_sitk(volume), str(tmp_path / "d.nhdr"), useCompression=True)
    data = tmp_path / "d.raw.gz"
    if absolute:  # NRRD's older spelling, and a path whose folder has a colon in its name
        (tmp_path / "x:y").mkdir()
        data = data.rename(tmp_path / "x:y" / data.name)
    header = (tmp_path / "d.nhdr").read_text()
    (tmp_path / "d.nhdr").write_text(header.replace("data file: d.raw.gz", f"{key}: {data if absolute else data.name}"))
    np.testing.assert_array_equal(io.read_image(tmp_path / "d.nhdr").array, volume.array)


@pytest.mark.parametrize("data_file", ["LIST\nd_0.raw{gz}\nd_1.raw{gz}\nd_2.raw{gz}", "d_%d.raw{gz} 0 2 1"],
                         ids=["LIST", "formatted"])
@pytest.mark.parametrize("gz", [".gz", ""], ids=["gzip", "raw"])
def test_a_detached_nrrd_header_with_one_data_file_per_slice_is_left_to_itk(tmp_path, data_file, gz):
    volume = _volume("right")  # 3 slices along K
    sitk.WriteImage(io.volume_to_sitk(volume), str(tmp_path / "d.nhdr"), useCompression=bool(gz))
    for k in range(3):
        data = volume.array[:, :, k].T.tobytes()
        (tmp_path / f"d_{k}.raw{gz}").write_bytes(gzip.compress(data) if gz else data)
    header = (tmp_path / "d.nhdr").read_text()
    assert f"data file: d.raw{gz}\n" in header
    (tmp_path / "d.nhdr").write_text(header.replace(f"data file: d.raw{gz}", f"data file: {data_file.format(gz=gz)}"))
    (tmp_path / f"d.raw{gz}").unlink()
    np.testing.assert_array_equal(io.read_image(tmp_path / "d.nhdr").array, volume.array)


def test_a_detached_metaimage_header_finds_its_zlib_data_file(tmp_path):
    volume = _volume("right")
    sitk.WriteImage(io.volume_to_sitk(volume), str(tmp_path / "d.mhd"), useCompression=True)
    np.testing.assert_array_equal(io.read_image(tmp_path / "d.mhd").array, volume.array)


@pytest.mark.parametrize("suffix", [".mha", ".mhd", ".nrrd", ".nhdr"])
def test_uncompressed_files_are_read_without_decompressing(tmp_path, suffix):
    volume = _volume("left")
    sitk.WriteImage(io.volume_to_sitk(volume), str(tmp_path / f"raw{suffix}"), useCompression=False)
    np.testing.assert_array_equal(io.read_image(tmp_path / f"raw{suffix}").array, volume.array)


@pytest.mark.parametrize("itk_message, reason", [
    ("", "unknown error"),
    (("/src/itkNrrdImageIO.cxx:230:\nITK ERROR: NrrdImageIO(0x55d1): ReadImageInformation: Error reading "
      "(file damaged): bad header\n"), "ReadImageInformation: Error reading (file damaged): bad header"),
], ids=["empty", "file-line-and-prefix"])
def test_an_itk_failure_is_reduced_to_its_reason(tmp_path, monkeypatch, itk_message, reason):
    path = tmp_path / "v.nrrd"
    sitk.WriteImage(io.volume_to_sitk(_volume("right")), str(path))  # raw: read by ITK without a check of ours

    def failing_read(*args, **kwargs):
        raise RuntimeError(itk_message)

    monkeypatch.setattr(sitk, "ReadImage", failing_read)
    with pytest.raises(InputError) as error:
        io.read_image(path)
    assert str(error.value) == f"cannot read {path}: {reason}"


def test_unevenly_spaced_dicom_is_one_message_with_the_gaps(tmp_path):
    folder, _ = _dicom_folder(tmp_path, 4)
    (folder / "main_001.dcm").unlink()
    with pytest.raises(InputError) as error:
        io.read_image(folder)
    assert str(error.value) == (f"{folder}: DICOM slices are unevenly spaced (gaps 2.5 to 5 mm); check for missing "
                                "slices or export the series again")


def _segmentation(path: Path, layers: int, keys: dict[str, str]) -> Path:
    """A one- or two-layer .seg.nrrd (labels 1 and 2 in each layer) with the given segment keys only."""
    array = np.zeros((layers, 4, 3, 2), np.uint8)
    array[:, 0], array[:, 1] = 1, 2
    img = (io.volume_to_sitk(Volume(array[0], np.eye(4))) if layers == 1
           else sitk.JoinSeries([io.volume_to_sitk(Volume(layer, np.eye(4))) for layer in array]))
    for key, value in keys.items():
        img.SetMetaData(key, value)
    sitk.WriteImage(img, str(path), useCompression=True)
    return path


def test_one_layer_segments_without_layer_keys_and_names_from_ids(tmp_path):
    path = _segmentation(tmp_path / "s.seg.nrrd", 1, {
        "Segment0_Name": "liver", "Segment0_LabelValue": "1",
        "Segment1_ID": "spleen_id", "Segment1_LabelValue": "2",  # no name: the ID names it
        "Segment2_LabelValue": "3"})  # neither: a made-up name
    seg, names = io.read_labelmap(path)
    assert names == {1: "liver", 2: "spleen_id", 3: "Segment_2"}
    np.testing.assert_array_equal(seg.array[:2, 0, 0], [1, 2])
    assert not seg.array[2:].any()


@pytest.mark.parametrize("layers, keys, message", [
    (1, {"Segment0_Layer": "first"}, ("{p}: Segment0_Layer or Segment0_LabelValue is not an integer; save the "
     "segmentation again from Slicer")),
    (1, {"Segment0_Layer": "1"}, ("{p}: Segment0 has layer 1 and label 1, but the file has 1 layer(s) and labels "
     "must be > 0; save it again from Slicer")),
    (2, {"Segment0_Layer": "-1"}, ("{p}: Segment0 has layer -1 and label 1, but the file has 2 layer(s) and labels "
     "must be > 0; save it again from Slicer")),
    (2, {"Segment0_Layer": "1", "Segment0_LabelValue": "0"}, ("{p}: Segment0 has layer 1 and label 0, but the file "
     "has 2 layer(s) and labels must be > 0; save it again from Slicer")),
], ids=["not-an-integer", "layer-past-the-end", "negative-layer", "label-zero"])
def test_a_broken_segment_table_is_one_message_naming_the_file(tmp_path, layers, keys, message):
    path = _segmentation(tmp_path / "b.seg.nrrd", layers, {"Segment0_Name": "liver", **keys})
    with pytest.raises(InputError) as error:
        io.read_labelmap(path)
    assert str(error.value) == message.format(p=path)


def test_a_label_map_with_four_dimensions_and_vector_voxels_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "v4.nrrd"
    sitk.WriteImage(sitk.JoinSeries([sitk.Compose([sitk.Image(3, 3, 3, sitk.sitkUInt8)] * 2)] * 2), str(path))
    with pytest.raises(InputError) as error:
        io.read_labelmap(path)
    assert str(error.value) == f"{path} is a 4-D image with 2 components per voxel; give one 3-D volume"


def test_an_output_path_that_is_a_folder_is_one_message(tmp_path):
    (tmp_path / "out.nii.gz").mkdir()
    with pytest.raises(InputError) as error:
        io.write_volume(_volume("right"), tmp_path / "out.nii.gz")
    assert str(error.value) == f"cannot write {tmp_path / 'out.nii.gz'}: it is a folder; give a file name"


def test_a_written_file_found_damaged_is_an_eio_oserror_naming_it(tmp_path, monkeypatch):
    folder = tmp_path / "run (1): b"  # "): " in a path must not be taken for the end of an ITK prefix
    folder.mkdir()
    path = folder / "v.nrrd"
    real_write = sitk.WriteImage

    def write_half(img, filename, **kwargs):
        real_write(img, filename, **kwargs)
        Path(filename).write_bytes(Path(filename).read_bytes()[:-40])

    monkeypatch.setattr(sitk, "WriteImage", write_half)
    with pytest.raises(OSError) as error:
        io.save_volume(_volume("right"), path)
    assert (error.value.errno, error.value.filename) == (errno.EIO, str(path))
    assert error.value.strerror == (f"the file written is incomplete or unreadable (cannot read {path}: the file is "
                                    "damaged (the compressed data ends early); copy or export it again)")


@pytest.fixture
def dead_pid() -> int:
    """The pid of a process that has exited."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    return dead.pid


def test_leftovers_removed_and_restored_are_logged(tmp_path, caplog, dead_pid):
    temp = tmp_path / f".ctsynth-tmp-{dead_pid}-0123abcd.a.nii.gz"
    temp.write_bytes(b"half")
    (tmp_path / f".ctsynth-old-{dead_pid}-0123abce.b.json").write_bytes(b"moved aside")
    with caplog.at_level(logging.INFO, logger="CTSemanticSynthLib.io"):
        io.remove_stale_temps(tmp_path)
    assert sorted((r.levelname, r.getMessage()) for r in caplog.records) == [
        ("INFO", f"removed {temp}, left by an interrupted run"),
        ("WARNING", f"restored {tmp_path / 'b.json'}, moved aside by an interrupted run")]
    assert _files(tmp_path) == ["b.json"]


def test_a_leftover_that_cannot_be_restored_is_a_warning(tmp_path, caplog, monkeypatch, dead_pid):
    aside = tmp_path / f".ctsynth-old-{dead_pid}-0123abce.b.json"
    aside.write_bytes(b"moved aside")

    def refused(src, dst) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "rename", refused)
    with caplog.at_level(logging.INFO, logger="CTSemanticSynthLib.io"):
        io.remove_stale_temps(tmp_path)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", f"cannot remove {aside} left by an interrupted run: Permission denied")]
    assert _files(tmp_path) == [aside.name]


def test_a_temp_folder_that_cannot_be_removed_does_not_hide_the_error(tmp_path, monkeypatch):
    real_unlink = os.unlink

    def locked(path, *args, **kwargs) -> None:  # e.g. a file another program holds open on Windows
        if os.fspath(path) == "locked.bin":
            raise PermissionError(13, "Permission denied")
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", locked)
    with pytest.raises(RuntimeError, match="the model failed"), io.atomic_folder(tmp_path / "cases") as tmp:
        (tmp / "locked.bin").write_bytes(b"partial")
        raise RuntimeError("the model failed")
    assert not (tmp_path / "cases").exists()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names open files through /proc (Linux)")
def test_the_folder_is_flushed_after_the_renames(tmp_path, monkeypatch):
    flushed = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: flushed.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    io.write_bytes(tmp_path / "r.json", b"{}")
    assert flushed[-1] == str(tmp_path)


def test_a_tilt_of_exactly_1e_3_is_not_called_oblique():
    affine = np.eye(4)
    affine[:2, :2] = [[0.999999499999875, -0.001], [0.001, 0.999999499999875]]  # unit columns: 0.001 stays exact
    assert io.describe_geometry(Volume(np.zeros((2, 2, 2)), affine)).endswith("axes RAS")


@pytest.mark.parametrize("array, affine, message", [
    (np.zeros((2, 2)), np.eye(4), "Volume array must be 3-D, got shape (2, 2)"),
    (np.zeros((2, 2, 2, 1)), np.eye(4), "Volume array must be 3-D, got shape (2, 2, 2, 1)"),
    (np.zeros((2, 2, 2)), np.eye(3), "Volume affine must be a finite 4x4 matrix, got {affine!r}"),
    (np.zeros((2, 2, 2)), np.diag([1.0, np.nan, 1.0, 1.0]),
     "Volume affine must be a finite 4x4 matrix, got {affine!r}"),
    (np.zeros((2, 2, 2)), np.diag([1.0, 1.0, 0.0, 1.0]), "Volume affine is singular (a zero or degenerate voxel axis)"),
], ids=["2-D", "4-D", "3x3 affine", "nan in affine", "zero axis"])
def test_a_volume_refuses_a_wrong_array_or_affine(array, affine, message):
    with pytest.raises(ValueError) as error:
        Volume(array, affine)
    assert str(error.value) == message.format(affine=np.asarray(affine, dtype=np.float64))


def test_a_volume_keeps_its_affine_as_float64_and_accepts_micrometre_voxels():
    volume = Volume(np.zeros((2, 2, 2)), [[1, 0, 0, 5], [0, 2, 0, 0], [0, 0, 3, 0], [0, 0, 0, 1]])
    assert volume.affine.dtype == np.float64 and isinstance(volume.affine, np.ndarray)
    assert volume.spacing == (1.0, 2.0, 3.0)
    assert Volume(np.zeros((2, 2, 2)), np.diag([1e-3, 1e-3, 1e-3, 1.0])).spacing == (1e-3, 1e-3, 1e-3)


def test_a_label_map_is_refused_where_a_ct_is_expected(tmp_path):
    labels = np.zeros((6, 5, 4), np.uint8)
    labels[1:4, 1:4, 1:3] = 5
    labels[0, 0, 0] = 117
    io.write_volume(Volume(labels, np.eye(4)), tmp_path / "seg.nii.gz")
    with pytest.raises(InputError) as error:
        io.read_ct(tmp_path / "seg.nii.gz", "--keep-ct seg.nii.gz")
    assert str(error.value) == ("--keep-ct seg.nii.gz looks like a label map, not a CT: it holds 3 distinct whole "
                                "numbers from 0 to 117 (a CT in HU has many values, air near -1000); give the CT file")
    ct = np.random.default_rng(0).integers(-1000, 1500, size=(40, 40, 4)).astype(np.int16)
    io.write_volume(Volume(ct, np.eye(4)), tmp_path / "ct.nii.gz")
    np.testing.assert_array_equal(io.read_ct(tmp_path / "ct.nii.gz", "ct").array, ct)
    offset = (ct + 1024).astype(np.uint16)  # a CT stored with +1024, no negative value: many values, so a CT
    io.write_volume(Volume(offset, np.eye(4)), tmp_path / "offset.nii.gz")
    np.testing.assert_array_equal(io.read_ct(tmp_path / "offset.nii.gz", "ct").array, offset)
    halves = Volume(labels.astype(np.float32) + 0.5, np.eye(4))  # not whole numbers: not a label map
    io.write_volume(halves, tmp_path / "halves.nii.gz")
    np.testing.assert_array_equal(io.read_ct(tmp_path / "halves.nii.gz", "ct").array, halves.array)
