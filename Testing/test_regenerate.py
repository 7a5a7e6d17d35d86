"""Region regeneration: RePaint loop, the region from two segmentations, the library's identity outside the region,
and `ctsynth synth --keep-ct` with its refusals and provenance."""

import hashlib
import json
import re

import numpy as np
import pytest
import torch

from CTSemanticSynthLib.checkpoint import load_model, save_model
from CTSemanticSynthLib.cli import main
from CTSemanticSynthLib.diffusion import GaussianDiffusion, diffusion_defaults, make_sampler
from CTSemanticSynthLib.diffusion.samplers.repaint import Inpainting, Jumps, repaint_loop
from CTSemanticSynthLib.errors import InputError
from CTSemanticSynthLib.factory import create_generator
from CTSemanticSynthLib.io import Volume, read_image, read_labelmap, write_volume
from CTSemanticSynthLib.labels import BACKGROUND
from CTSemanticSynthLib.provenance import sidecar_path
from CTSemanticSynthLib.regenerate import RegionEdit, changed_region, grow, organ_classes
from CTSemanticSynthLib.synthesis import SamplingOptions, prepare_classes, synthesize

from conftest import SAMPLE_SEG

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = SamplingOptions(sampler="ddim", steps=3, batch_size=32, seed=4)
LIVER = 5  # TotalSegmentator v2


# --- the RePaint loop -------------------------------------------------------------------------------------------


def test_schedule_matches_the_paper():
    """RePaint's get_schedule_jump(t_T=250, jump_length=10, jump_n_sample=10): 24 jump points x 9 x 10 extra
    evaluations; no jumps with one sample."""
    assert Jumps(10, 10).evaluations(250) == 250 + 24 * 9 * 10
    assert Jumps(3, 1).schedule(5) == [0, 1, 2, 3, 4, 5]
    assert Jumps(2, 2).schedule(5) == [0, 1, 2, 0, 1, 2, 3, 4, 2, 3, 4, 5]  # jump points 2 and 4 (t = 2, 0)
    assert Jumps.scaled(250, 10) == Jumps(10, 10) and Jumps.scaled(7, 2) == Jumps(1, 2)
    with pytest.raises(ValueError):
        Jumps(0, 2)


@pytest.mark.parametrize("name", ["ddim", "ancestral", "dpmsolver++"])
def test_known_area_is_held_at_every_step(name):
    """With noise 0 the model must see sqrt(abar_t) * known in the known area at every evaluation, and the sample is
    the known image there."""
    sampler = make_sampler(name, GaussianDiffusion(**diffusion_defaults()), 6)
    known = torch.linspace(-1, 1, 2 * 8 * 8).reshape(2, 1, 8, 8)
    unknown = torch.zeros(2, 1, 8, 8)
    unknown[:, :, 2:5, 3:6] = 1
    seen = []

    def model(x, t):
        seen.append((x.clone(), int(t[0])))
        return torch.zeros(x.shape[0], 2, *x.shape[2:])

    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    steps = list(repaint_loop(model, sampler, x, Inpainting(known, unknown, Jumps(2, 3)), torch.zeros_like))
    assert len(seen) == len(steps) == Jumps(2, 3).evaluations(6) == steps[-1][1]
    abar = {int(t): float(GaussianDiffusion(**diffusion_defaults()).alphas_cumprod[t]) for t in sampler.timesteps}
    for x_in, t in seen:
        expected = abar[t] ** 0.5 * known
        assert torch.allclose(x_in[unknown == 0], expected[unknown == 0], atol=1e-6)
    final = steps[-1][2]
    assert torch.equal(final[unknown == 0], known[unknown == 0])
    assert not torch.allclose(final[unknown == 1], known[unknown == 1])


# --- the region -------------------------------------------------------------------------------------------------


def test_region_from_two_segmentations_grows_in_mm():
    previous = np.zeros((21, 21, 11), np.uint8)
    current = previous.copy()
    current[10, 10, 5] = 6
    region = changed_region(previous, current, (1.0, 2.0, 2.5), margin_mm=5.0)
    i, j, k = np.nonzero(region)
    assert (i.min(), i.max(), j.min(), j.max(), k.min(), k.max()) == (5, 15, 8, 12, 3, 7)
    assert region[10, 12, 7] == (4.0**2 + 5.0**2 <= 25)  # the ball in mm, not a box in voxels
    assert not region[13, 12, 6] and region[13, 11, 5]
    assert np.array_equal(changed_region(previous, current, (1.0, 1.0, 1.0), 0.0), current != 0)
    with pytest.raises(InputError, match="nothing to regenerate"):
        changed_region(previous, previous.copy(), (1.0, 1.0, 1.0))


def test_what_changed_is_judged_in_the_models_class_set():
    """A vertebra turned into a rib is no change for the paper set (body both times), one for the anatomy set."""
    from CTSemanticSynthLib.labels import class_set, totalsegmentator_names

    ids = {n: v for v, n in totalsegmentator_names(2).items()}
    before = np.zeros((6, 6, 3), np.int16)
    before[1:3, 1:3, 1], before[4, 4, 1] = ids["vertebrae_L3"], LIVER
    after = np.where(before == ids["vertebrae_L3"], ids["rib_left_3"], before).astype(np.int16)
    volumes = [Volume(a, np.eye(4)) for a in (before, after)]
    anatomy = [organ_classes(v, None, "totalseg", class_set("anatomy")) for v in volumes]
    assert np.array_equal(changed_region(*anatomy, (1.0, 1.0, 1.0), 0.0), before == ids["vertebrae_L3"])
    with pytest.raises(InputError, match="nothing to regenerate"):
        changed_region(*[organ_classes(v, None, "totalseg") for v in volumes], (1.0, 1.0, 1.0))


def test_feather_fades_inside_the_border_only():
    region = np.zeros((12, 12, 6), bool)
    region[:6, 3:9, :] = True  # touches the volume's border along I and K
    edit = RegionEdit(np.full(region.shape, 100, np.int16), region, (1.5, 1.5, 3.0))
    weight = edit.feather(3.0)
    assert (weight[~region] == 0).all()
    assert weight[2, 3, 2] == pytest.approx(0.5) and weight[2, 5, 2] == 1.0  # 1.5 mm deep, 4.5 mm deep
    assert weight[0, 5, 0] == 1.0  # at the volume's border: nothing outside to fade into
    blended = edit.blend(np.full(region.shape, 300, np.int16), 3.0)
    assert blended[2, 3, 2] == 200 and blended[2, 5, 2] == 300 and (blended[~region] == 100).all()
    assert (RegionEdit(edit.keep, np.ones_like(region), edit.spacing).feather() == 1).all()


# --- the library ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def case():
    """A 16-slice crop of the sample (3 mm voxels), its liver grown by 6 mm into unlabelled voxels, and a kept CT
    with values far outside the window (-1000..1500 HU), as a real CT has."""
    seg, names = read_labelmap(SAMPLE_SEG)
    crop = Volume(np.ascontiguousarray(seg.array[:, :, 84:100]), seg.affine)
    grown = crop.array.copy()
    grown[grow(crop.array == LIVER, crop.spacing, 6.0) & (crop.array == 0)] = LIVER
    edited = Volume(grown, crop.affine)
    keep = Volume(np.random.default_rng(0).integers(-1000, 1500, crop.shape).astype(np.int16), crop.affine)
    return crop, edited, keep


def _classes(seg: Volume) -> Volume:
    return prepare_classes(seg, None, "totalseg")[0]


def test_outside_the_region_is_the_kept_ct_exactly(tiny_model, case):
    crop, edited, keep = case
    region = np.zeros(crop.shape, np.uint8)
    region[30:70, 20:60, 5:9] = 1
    classes = _classes(edited)
    result = synthesize(classes, load_model(tiny_model), FAST, device="cpu", keep=keep,
                        region=Volume(region, crop.affine))
    out = result.volume.array
    assert out.dtype == np.int16 and np.array_equal(out[region == 0], keep.array[region == 0])
    inside = (region == 1) & (classes.array != BACKGROUND)
    assert (out[inside] != keep.array[inside]).mean() > 0.95
    deep = inside & (RegionEdit(keep.array, region == 1, crop.spacing).feather() == 1)
    assert 0 < deep.sum() < inside.sum() and out[deep].min() >= -160 and out[deep].max() <= 240  # sampled (window)
    assert result.provenance["slices_sampled"] == 4  # only the slices that cross the region
    other = synthesize(classes, load_model(tiny_model), FAST, device="cpu", region=Volume(region, crop.affine),
                       keep=Volume(np.full(crop.shape, 240, np.int16), crop.affine)).volume.array
    assert (other[deep] != out[deep]).mean() > 0.3  # the sample is drawn in the kept CT's context (RePaint)
    record = result.provenance["region"]
    assert record["voxels"] == int(region.sum()) and record["volume_mm3"] == pytest.approx(region.sum() * 27.0)
    assert record["jumps"] == {"length": 1, "n_sample": 2}


def test_regeneration_is_deterministic_and_depends_on_the_seed(tiny_model, case):
    crop, edited, keep = case
    region = Volume(changed_region(_classes(crop).array, _classes(edited).array, crop.spacing, 3.0).astype(np.uint8),
                    crop.affine)
    model, classes = load_model(tiny_model), _classes(edited)

    def run(seed: int, batch_size: int = 32) -> np.ndarray:
        options = SamplingOptions(sampler="ddim", steps=3, eta=1.0, seed=seed, batch_size=batch_size)
        return synthesize(classes, model, options, device="cpu", keep=keep, region=region,
                          jump_length=1, jump_n_sample=3).volume.array

    first = run(1)
    assert np.array_equal(first, run(1))
    progress: list[float] = []
    options = SamplingOptions(sampler="ddim", steps=3, eta=1.0, seed=1, batch_size=32)
    synthesize(classes, model, options, device="cpu", keep=keep, region=region, jump_length=1, jump_n_sample=3,
               progress=lambda done, total: progress.append(done / total))
    assert progress == sorted(progress) and progress[-1] == 1.0 and progress.count(1.0) == 1  # jumps counted
    assert np.abs(first.astype(int) - run(1, batch_size=5)).max() <= 1
    other = run(2)
    inside = region.array.astype(bool)
    assert (first[inside] != other[inside]).mean() > 0.3 and np.array_equal(first[~inside], other[~inside])


def test_region_touching_the_volume_border(tiny_model, case):
    crop, edited, keep = case
    region = np.zeros(crop.shape, np.uint8)
    region[:, :40, :3] = 1  # the first slices, to the volume's edge in I, J and K
    result = synthesize(_classes(edited), load_model(tiny_model), FAST, device="cpu", keep=keep,
                        region=Volume(region, crop.affine))
    out = result.volume.array
    assert np.array_equal(out[region == 0], keep.array[region == 0])
    deep = np.zeros(crop.shape, bool)
    deep[:, :38, 0] = True  # the first slice, two voxels (6 mm, the feather) from the region's border in-plane
    body = deep & (_classes(edited).array != BACKGROUND)
    assert body.sum() > 100 and out[body].min() >= -160 and out[body].max() <= 240  # no fade at the volume's edge
    assert result.provenance["slices_sampled"] == 3


def test_library_refuses_mismatched_or_empty_regions(tiny_model, case):
    crop, edited, keep = case
    model, classes = load_model(tiny_model), _classes(edited)
    empty = Volume(np.zeros(crop.shape, np.uint8), crop.affine)
    with pytest.raises(InputError, match="region is empty"):
        synthesize(classes, model, FAST, device="cpu", keep=keep, region=empty)
    moved = Volume(keep.array, np.array(keep.affine) + np.array([[0, 0, 0, 3.0]] * 3 + [[0, 0, 0, 0]]))
    with pytest.raises(InputError, match="kept CT is not on the segmentation's grid"):
        synthesize(classes, model, FAST, device="cpu", keep=moved, region=Volume(np.ones(crop.shape), crop.affine))
    with pytest.raises(InputError, match="both"):
        synthesize(classes, model, FAST, device="cpu", keep=keep)


# --- the command line -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory, case):
    crop, edited, keep = case
    folder = tmp_path_factory.mktemp("regen")
    paths = {"old": folder / "old.nii.gz", "new": folder / "new.nii.gz", "keep": folder / "keep.nii.gz"}
    for key, volume in (("old", crop), ("new", edited), ("keep", keep)):
        write_volume(volume, paths[key])
    return paths


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def regen(capsys, model, files, out, *extra) -> tuple[int, str]:
    return run(capsys, "synth", "--seg", files["new"], "--keep-ct", files["keep"], "--out", out, "--model", model,
               "--steps", 2, "--labels", "totalseg", "--device", "cpu", "-q", "--seed", 9, *extra)


def test_cli_regenerates_what_changed_and_records_it(capsys, tiny_model, files, case, tmp_path):
    crop, edited, keep = case
    out = tmp_path / "edited.nii.gz"
    code, err = regen(capsys, tiny_model, files, out, "--previous-seg", files["old"], "--region-margin", 4)
    assert code == 0, err
    result = read_image(out).array
    region = changed_region(organ_classes(crop, None, "totalseg"), organ_classes(edited, None, "totalseg"),
                            crop.spacing, 4.0)
    assert np.array_equal(result[~region], keep.array[~region])
    assert (result[region] != keep.array[region]).mean() > 0.9
    record = json.loads(sidecar_path(out).read_text())
    assert record["options"]["seed"] == 9
    assert record["region"]["voxels"] == int(region.sum())
    assert record["region"]["volume_mm3"] == pytest.approx(region.sum() * 27.0)
    assert record["region"]["keep_sha256"] == hashlib.sha256(files["keep"].read_bytes()).hexdigest()
    assert record["region"]["margin_mm"] == 4.0 and record["region"]["previous_segmentation"] == str(files["old"])
    assert record["region"]["jumps"] == {"length": 1, "n_sample": 2}


@pytest.mark.parametrize("flags, jumps", [
    (("--jump-n-sample", 3), {"length": 1, "n_sample": 3}),  # the length scaled to the 2 steps
    (("--jump-length", 2, "--jump-n-sample", 1), {"length": 2, "n_sample": 1}),
])
def test_cli_jump_options_reach_the_sampler(capsys, tiny_model, files, tmp_path, flags, jumps):
    out = tmp_path / "edited.nii.gz"
    code, err = regen(capsys, tiny_model, files, out, "--previous-seg", files["old"], *flags)
    assert code == 0, err
    assert json.loads(sidecar_path(out).read_text())["region"]["jumps"] == jumps


def test_cli_keep_ct_in_another_axis_order_is_reordered(capsys, tiny_model, files, case, tmp_path):
    _, _, keep = case
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = keep.shape[0] - 1
    flipped = tmp_path / "keep_flipped.nii.gz"
    write_volume(Volume(keep.array[::-1].copy(), keep.affine @ flip), flipped)
    region = tmp_path / "region.nii.gz"
    mask = np.zeros(keep.shape, np.uint8)
    mask[40:60, 30:50, 6:8] = 1
    write_volume(Volume(mask, keep.affine), region)
    outs = [tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"]
    code, err = regen(capsys, tiny_model, files, outs[0], "--region", region)
    assert code == 0, err
    code, err = run(capsys, "synth", "--seg", files["new"], "--keep-ct", flipped, "--region", region, "--out", outs[1],
                    "--model", tiny_model, "--steps", 2, "--labels", "totalseg", "--device", "cpu", "--seed", 9, "-q")
    assert code == 0 and "reordered losslessly" in err
    assert np.array_equal(read_image(outs[0]).array, read_image(outs[1]).array)


@pytest.mark.parametrize(("seg", "keep", "out", "extra", "message"), [
    ("old", "keep", "out", ("--previous-seg", "old"), "nothing to regenerate"),  # --seg is the old segmentation
    ("new", "keep", "out", ("--region", "empty"), "is empty"),
    ("new", "keep", "out", ("--region", "moved"), "--region .* on another grid .* would need resampling"),
    ("new", "moved_ct", "out", ("--previous-seg", "old"), "--keep-ct .* would need resampling"),
    ("new", "keep", "keep", ("--previous-seg", "old"), "--out .* would overwrite --keep-ct"),
    ("new", "keep", "old", ("--previous-seg", "old"), "--out .* would overwrite --previous-seg"),
    ("new", "keep", "out", (), "--keep-ct needs exactly one of --previous-seg"),
    ("new", "keep", "out", ("--previous-seg", "old", "--region", "empty"), "--keep-ct needs exactly one"),
    ("new", "keep", "out", ("--region", "empty", "--region-margin", "3"), "--region-margin needs --previous-seg"),
    ("new", "keep", "out", ("--previous-seg", "old", "--region-margin", "-1"), "--region-margin -1.0 is out of range"),
    ("new", "keep", "out", ("--previous-seg", "old", "--jump-n-sample", "0"), "--jump-n-sample 0 must be at least 1"),
])
def test_cli_refusals_are_one_line_and_write_nothing(capsys, tiny_model, files, case, tmp_path, seg, keep, out,
                                                     extra, message):
    crop, _, kept = case
    half = np.array(crop.affine)
    half[:3, 3] += 1.5  # half a voxel: only resampling could bring it onto the grid
    paths = {**files, "out": tmp_path / "out.nii.gz", "empty": tmp_path / "empty.nii.gz",
             "moved": tmp_path / "moved.nii.gz", "moved_ct": tmp_path / "moved_ct.nii.gz"}
    write_volume(Volume(np.zeros(crop.shape, np.uint8), crop.affine), paths["empty"])
    write_volume(Volume(np.ones(crop.shape, np.uint8), half), paths["moved"])
    write_volume(Volume(kept.array, half), paths["moved_ct"])
    before = {p: p.stat().st_mtime_ns for p in [*tmp_path.iterdir(), *files.values()]}
    code, err = run(capsys, "synth", "--seg", paths[seg], "--keep-ct", paths[keep], "--out", paths[out], "--model",
                    tiny_model, "--steps", 2, "--labels", "totalseg", "--device", "cpu", "-q",
                    *(paths.get(a, a) for a in extra))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ctsynth: error:"), err
    assert re.search(message, lines[0]), lines[0]
    assert {p: p.stat().st_mtime_ns for p in [*tmp_path.iterdir(), *files.values()]} == before


def test_cli_previous_seg_needs_keep_ct(capsys, tiny_model, files, tmp_path):
    code, err = run(capsys, "synth", "--seg", files["new"], "--previous-seg", files["old"], "--out",
                    tmp_path / "o.nii.gz", "--model", tiny_model, "-q")
    assert code == 2 and err.strip() == "ctsynth: error: --previous-seg needs --keep-ct (the CT to keep outside the region)"
    assert list(tmp_path.iterdir()) == []


def test_a_one_pass_generator_cannot_regenerate_a_region(capsys, files, tmp_path):
    folder = tmp_path / "pix2pix"
    save_model(folder, create_generator({"method": "pix2pix", "image_size": 32, "channels": 2}), None,
               name="tiny-pix2pix")
    out = tmp_path / "edited.nii.gz"
    code, err = regen(capsys, folder, files, out, "--previous-seg", files["old"])
    assert code == 2 and err.count("\n") == 1 and "one-pass generator" in err and "Traceback" not in err
    assert not out.exists()


def test_inpainting_holds_the_kept_ct_in_model_units_and_every_pixel_the_region_touches():
    """The known image is the kept CT windowed to [-1, 1] and resized like an image (antialiased: a fine
    checkerboard becomes its mean); the unknown mask keeps a model pixel that one voxel of the region touches."""
    from CTSemanticSynthLib.preprocess import AxialOrientation, PlaneResize
    from CTSemanticSynthLib.synthesis import _inpainting

    orientation = AxialOrientation.from_affine(np.eye(4))
    keep_stack = np.full((3, 64, 64), 140, np.int16)  # 140 HU: 0.75 of the L40/W400 window, 0.5 in model units
    keep_stack[:, :32] = np.where(np.add.outer(np.arange(32), np.arange(64)) % 2 == 0, 0, 80)  # mean 40 HU: 0
    region_stack = np.zeros((3, 64, 64), bool)
    region_stack[1, 40, 20] = True  # even row and column: nearest-neighbour 2x downsampling samples odd ones
    keep, region = (orientation.from_stack(a) for a in (keep_stack, region_stack))
    classes = Volume(np.ones(keep.shape, np.uint8), np.eye(4))
    edit = RegionEdit.checked(classes, Volume(keep, np.eye(4)), Volume(region, np.eye(4)))
    inpaint = _inpainting(edit, orientation, PlaneResize(64, 64, 32), np.arange(3), Jumps())
    known = inpaint.known[:, 0]
    assert known.shape == (3, 32, 32)
    torch.testing.assert_close(known[:, 17:], torch.full((3, 15, 32), 0.5), atol=1e-5, rtol=0)  # away from row 16
    torch.testing.assert_close(known[:, :15, 1:31], torch.zeros((3, 15, 30)), atol=0.02, rtol=0)  # and the edges
    unknown = inpaint.unknown[:, 0]
    assert unknown[1, 20, 10] == 1 and unknown.sum() <= 4 and unknown[[0, 2]].sum() == 0


def test_inpainting_resizes_a_full_range_kept_ct_in_hu():
    """With a companding mapping the kept CT is resized in HU, as training prepares its slices: a fine checkerboard of
    cortical bone and soft tissue becomes its HU mean (770 HU), not the mean of their model units (~120 HU)."""
    from CTSemanticSynthLib.intensity import FULL_RANGE
    from CTSemanticSynthLib.preprocess import AxialOrientation, PlaneResize
    from CTSemanticSynthLib.synthesis import _inpainting

    orientation = AxialOrientation.from_affine(np.eye(4))
    keep_stack = np.where(np.add.outer(np.arange(64), np.arange(64)) % 2 == 0, 1500, 40)[None].repeat(2, 0)
    keep = orientation.from_stack(keep_stack.astype(np.int16))
    region = orientation.from_stack(np.zeros((2, 64, 64), bool))
    region[0, 0, 0] = True
    edit = RegionEdit.checked(Volume(np.ones(keep.shape, np.uint8), np.eye(4)), Volume(keep, np.eye(4)),
                              Volume(region, np.eye(4)))
    inpaint = _inpainting(edit, orientation, PlaneResize(64, 64, 32), np.arange(2), Jumps(), FULL_RANGE)
    known_hu = FULL_RANGE.to_hu((inpaint.known[:, 0, 2:-2, 2:-2].numpy() + 1) / 2)
    np.testing.assert_allclose(known_hu, 770.0, atol=5.0)
