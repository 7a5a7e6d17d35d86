"""Slice-to-slice consistency: the stripe index on volumes with known stripes, the FID gap between planes, and
noise correlated along the slice axis (configured correlation, unit variance, independent of the batch)."""

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from CTSemanticSynthLib.checkpoint import load_model, save_model
from CTSemanticSynthLib.cli import main
from CTSemanticSynthLib.diffusion import GaussianDiffusion
from CTSemanticSynthLib.diffusion.slice_agreement import SliceAgreement, neighbour_weights
from CTSemanticSynthLib.diffusion.slice_noise import SliceNoise, shared_weights
from CTSemanticSynthLib.errors import InputError
from CTSemanticSynthLib.io import Volume, read_image, write_volume
from CTSemanticSynthLib.labels import BACKGROUND, BODY
from CTSemanticSynthLib.metrics.consistency import plane_fid_gap, slice_ratio, stripe_index
from CTSemanticSynthLib.models import UNetModel
from CTSemanticSynthLib.preprocess import condition_inputs, semantic_edges
from CTSemanticSynthLib.slice_context import context_offsets, with_neighbours
from CTSemanticSynthLib.synthesis import SamplingOptions, prepare_classes, preset_options, synthesize

from conftest import SAMPLE_CT, SAMPLE_SEG, randomise_zero_layers, single_thread, tiny_model_config
from gpu_like import DeviceTrace

pytestmark = pytest.mark.usefixtures("one_thread")

LIVER = 6
GRADIENT = 0.01  # window units per voxel (4 HU): rows rise by 1, columns by 3, slices by 2 gradients


def _affine(slice_spacing: float = 1.0) -> np.ndarray:
    """Array axis 0 runs inferior -> superior (the slice axis), so the axial stack is the array itself."""
    return np.array([[0.0, 0.0, -1.0, 0.0], [0.0, -1.0, 0.0, 0.0], [slice_spacing, 0.0, 0.0, 0.0], [0, 0, 0, 1.0]])


def _ramp(shape=(13, 16, 16), slice_spacing: float = 1.0) -> tuple[Volume, Volume]:
    """An HU ramp whose mean in-plane change per voxel (rows 1, columns 3 GRADIENTs) equals its change from slice to
    slice (2 GRADIENTs), and classes: liver inside, body in a rim."""
    s, r, c = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    unit = 0.1 + GRADIENT * (2 * s + r + 3 * c)
    classes = np.full(shape, BODY, dtype=np.uint8)
    classes[:, 2:-2, 2:-2] = LIVER
    affine = _affine(slice_spacing)
    return Volume(np.float32(unit * 400 - 160), affine), Volume(classes, affine)


def _with(volume: Volume, array: np.ndarray) -> Volume:
    return Volume(np.asarray(array, dtype=np.float32), volume.affine)


def test_a_smooth_volume_against_itself_scores_one():
    ct, classes = _ramp()
    assert slice_ratio(ct, classes) == pytest.approx(1.0)
    assert stripe_index(ct, ct, classes)["stripe_index"] == pytest.approx(1.0)


def test_alternating_slice_offsets_raise_the_index_by_the_computed_amount():
    """Offsets +d, -d, +d... make adjacent slices differ by |2g - 2d| and |2g + 2d| in turn (12 pairs): on average
    2d when d > g, against 2g in-plane."""
    ct, classes = _ramp()
    for d in (0.02, 0.05):
        offsets = d * (-1.0) ** np.arange(ct.shape[0])
        striped = _with(ct, ct.array + 400 * offsets[:, None, None])
        result = stripe_index(striped, ct, classes)
        assert result["ratio_real"] == pytest.approx(1.0)
        assert result["stripe_index"] == pytest.approx(d / GRADIENT, rel=1e-4)


def test_differences_are_per_millimetre_along_each_axis():
    ct, classes = _ramp(slice_spacing=2.5)  # the same per-voxel ramp over thicker slices
    assert slice_ratio(ct, classes) == pytest.approx(1 / 2.5)


def test_only_pairs_inside_the_organs_count_and_values_are_windowed():
    ct, classes = _ramp()
    noisy = ct.array.copy()
    outside = classes.array != LIVER
    noisy[outside] += np.random.default_rng(0).normal(0, 300, outside.sum())  # body and rim: ignored
    assert slice_ratio(_with(ct, noisy), classes) == pytest.approx(1.0)
    bright = ct.array.copy()
    bright[1::2] = 5000  # every other slice far above the window: clipped to its top, 240 HU
    top = _with(ct, np.full(ct.shape, 240.0))
    assert slice_ratio(_with(ct, bright), classes) == pytest.approx(
        slice_ratio(_with(ct, np.where(np.arange(ct.shape[0])[:, None, None] % 2, top.array, ct.array)), classes))


def test_a_volume_without_organ_neighbours_has_no_index():
    ct, classes = _ramp()
    no_organs = Volume(np.where(classes.array == LIVER, BACKGROUND, classes.array).astype(np.uint8), classes.affine)
    assert math.isnan(slice_ratio(ct, no_organs))
    flat = _with(ct, np.zeros(ct.shape))  # no change at all: the real ratio is undefined
    assert math.isnan(stripe_index(ct, flat, classes)["stripe_index"])


def test_plane_fid_gap():
    gap = plane_fid_gap({"axial": 10.0, "coronal": 25.0, "sagittal": 18.0})
    assert gap == {"coronal_minus_axial": 15.0, "sagittal_minus_axial": 8.0, "max_gap": 15.0}
    assert math.isnan(plane_fid_gap({"axial": 1.0, "coronal": math.nan})["max_gap"])


def _striped_sample(tmp_path) -> tuple:
    ct = read_image(SAMPLE_CT)
    offsets = 40.0 * (-1.0) ** np.arange(ct.shape[2])  # the sample's slice axis is its last array axis
    path = tmp_path / "striped.nii.gz"
    write_volume(Volume(np.clip(ct.array + offsets[None, None, :], -1000, 3000).astype(np.int16), ct.affine), path)
    return path


def test_ctsynth_evaluate_reports_the_stripe_index(capsys, tmp_path):
    report = tmp_path / "r.json"
    assert main(["evaluate", "--synthetic", str(SAMPLE_CT), "--real", str(SAMPLE_CT), "--seg", str(SAMPLE_SEG),
                 "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert json.loads(report.read_text())["consistency"]["stripe_index"] == pytest.approx(1.0)
    assert "stripe index 1.000" in out
    striped = _striped_sample(tmp_path)
    assert main(["evaluate", "--synthetic", str(striped), "--real", str(SAMPLE_CT), "--seg", str(SAMPLE_SEG),
                 "--json", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["consistency"]["stripe_index"] > 1.5


# --- correlated noise ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rho", [0.3, 0.8])
def test_slice_noise_has_unit_variance_and_the_configured_correlation(rho):
    noise = SliceNoise(5, range(40), rho)
    x = torch.cat([noise.draw((40, 1, 32, 32)) for _ in range(4)], dim=1)  # 4 draws: (40, 4, 32, 32)
    assert float(x.var()) == pytest.approx(1.0, abs=0.03)
    assert float(x.mean()) == pytest.approx(0.0, abs=0.03)
    flat = x.reshape(40, -1)
    for lag in (1, 3):
        measured = float((flat[:-lag] * flat[lag:]).mean() / flat.var())
        assert measured == pytest.approx(noise.correlation(lag), abs=0.03)
    assert noise.correlation(1) == pytest.approx(rho * float(np.dot(shared_weights(3.0)[:-1], shared_weights(3.0)[1:])))
    assert noise.correlation(1) > 0.9 * rho
    draws = x.reshape(40, 4, -1)  # successive draws are independent
    assert abs(float((draws[:, 0] * draws[:, 1]).mean())) < 0.03


def test_slice_noise_does_not_depend_on_the_batch():
    whole = SliceNoise(3, range(10), 0.7)
    halves = [SliceNoise(3, range(4), 0.7), SliceNoise(3, range(4, 10), 0.7)]
    for _ in range(3):  # the starting noise and two steps
        together = whole.draw((10, 1, 8, 8))
        apart = torch.cat([halves[0].draw((4, 1, 8, 8)), halves[1].draw((6, 1, 8, 8))])
        torch.testing.assert_close(together, apart)


def test_correlated_noise_takes_a_few_operations_per_slice_not_one_per_slice_and_tap():
    """Each draw is one randn per slice and per shared field (their generators keep the noise independent of the
    batch) plus a few whole-volume operations per filter tap: not a multiply and an add per slice per tap (thousands
    of tiny GPU launches per step for a 300-slice volume)."""
    slices = 40
    noise = SliceNoise(3, range(slices), 0.5)
    fields = slices + len(noise.weights) - 1
    noise.draw((slices, 1, 8, 8))
    with DeviceTrace() as trace:
        noise.draw((slices, 1, 8, 8))
    assert trace.syncs == []
    assert trace.ops.count("randn") == slices + fields
    assert len(trace.ops) - trace.ops.count("randn") <= 4 * len(noise.weights) + 10

def test_without_correlation_the_noise_is_the_per_slice_generators():
    noise = SliceNoise(2, [4, 9], 0.0)
    expected = torch.stack([torch.randn((1, 8, 8), generator=torch.Generator().manual_seed(2 * 1_000_003 + k))
                            for k in (4, 9)])
    torch.testing.assert_close(noise(torch.zeros(2, 1, 8, 8)), expected)
    with pytest.raises(ValueError, match="0..1"):
        SliceNoise(0, [0], 1.5)


@pytest.fixture(scope="module")
def sample_classes() -> Volume:
    from CTSemanticSynthLib.io import read_labelmap

    seg, names = read_labelmap(SAMPLE_SEG)
    return prepare_classes(seg, names, "totalseg")[0]


@pytest.fixture(scope="module")
def tiny_loaded(tiny_model):
    return load_model(tiny_model)


def test_correlated_sampling_is_independent_of_the_batch_size(sample_classes, tiny_loaded):
    crop = Volume(np.ascontiguousarray(sample_classes.array[::6, ::6, 40:52]), sample_classes.affine)
    options = SamplingOptions(sampler="ancestral", steps=3, seed=4, batch_size=5, slice_correlation=0.9)
    a = synthesize(crop, tiny_loaded, options, device="cpu")
    b = synthesize(crop, tiny_loaded, SamplingOptions(**{**options.__dict__, "batch_size": 2}), device="cpu")
    np.testing.assert_array_equal(a.volume.array, b.volume.array)
    assert a.provenance["options"]["slice_correlation"] == 0.9
    plain = synthesize(crop, tiny_loaded, SamplingOptions(**{**options.__dict__, "slice_correlation": 0.0}),
                       device="cpu")
    assert not np.array_equal(a.volume.array, plain.volume.array)


@pytest.mark.parametrize("option", ["slice_correlation", "slice_agreement"])
def test_a_bad_slice_option_is_refused_before_any_work(tmp_path, capsys, tiny_model, option):
    from CTSemanticSynthLib.checkpoint import read_config

    flag = "--" + option.replace("_", "-")
    with pytest.raises(InputError, match=f"{flag} 1.5"):
        preset_options(read_config(tiny_model), "fast", **{option: 1.5})
    out = tmp_path / "syn.nii.gz"
    code = main(["synth", "--seg", str(SAMPLE_SEG), "--out", str(out), flag, "-0.1", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().startswith("ctsynth: error:") and flag in err
    assert not out.exists()
    with pytest.raises(InputError, match="slice_agreement_below 0"):
        preset_options(read_config(tiny_model), "fast", slice_agreement_below=0.0)


# --- neighbour agreement ------------------------------------------------------------------------------------------


def _agreement_case(prediction: str = "v", n: int = 6, size: int = 8, seed: int = 0):
    """A diffusion, random network outputs (prediction + variance channels), a state and random classes."""
    g = torch.Generator().manual_seed(seed)
    diffusion = GaussianDiffusion(prediction=prediction)
    classes = torch.randint(0, 3, (n, size, size), generator=g).to(torch.uint8)
    output = torch.randn((n, 2, size, size), generator=g)
    x = torch.randn((n, 1, size, size), generator=g)
    return diffusion, classes, output, x


def _x0(diffusion: GaussianDiffusion, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The x0 prediction a sampler takes from ``output`` (clipped)."""
    return diffusion.p_mean_variance(output, x, t)["pred_x0"]


def test_neighbour_weights_are_gaussian_over_two_slices_each_side():
    weights = neighbour_weights(1.0)
    assert sorted(weights) == [-2, -1, 1, 2]
    assert weights[1] == weights[-1] == pytest.approx(math.exp(-0.5))
    assert weights[2] == pytest.approx(math.exp(-2.0))


def test_zero_agreement_returns_the_network_output_itself():
    diffusion, classes, output, x = _agreement_case()
    classes[:] = 1  # every neighbour agrees everywhere
    t = torch.full((len(x),), 250)
    off = SliceAgreement(lambda x, t: output, diffusion, classes, range(len(x)), 0.0)
    assert torch.equal(off(x, t), output)
    late = SliceAgreement(lambda x, t: output, diffusion, classes, range(len(x)), 1.0, below=0.25)
    assert torch.equal(late(x, t), output)  # t = 250 is not below 0.25 * 1000
    assert not torch.equal(late(x, t - 1), output)


@pytest.mark.parametrize("below", [1.0, 0.25])
def test_agreement_reads_nothing_back_from_the_device(below):
    """Every step of every slice goes through the agreement: the timestep threshold is applied on the device (no
    ``int(t[0])``). On 'meta', which has no data, any read-back would fail."""
    diffusion, classes, output, x = _agreement_case()
    t = torch.tensor([400, 400, 100, 100, 100, 100])  # one step's timesteps are equal; mixed here to see the rule
    agreement = SliceAgreement(lambda x, t: output, diffusion, classes, range(len(x)), 1.0, below=below)
    with DeviceTrace() as trace:
        blended = agreement(x, t)
    assert trace.syncs == []
    assert torch.equal(blended[:2], output[:2]) == (below < 0.4) and not torch.equal(blended[2:], output[2:])
    meta = torch.device("meta")
    on_meta = SliceAgreement(lambda x, t: output.to(meta), diffusion, classes, range(len(x)), 1.0, below=below,
                             device=meta)
    assert on_meta(x.to(meta), t.to(meta)).shape == output.shape

@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_samplers_see_the_blended_x0_and_untouched_variance(prediction):
    diffusion, classes, output, x = _agreement_case(prediction)
    t = torch.full((len(x),), 120)
    agreement = SliceAgreement(lambda x, t: output, diffusion, classes, range(len(x)), 0.7)
    blended = agreement(x, t)
    torch.testing.assert_close(_x0(diffusion, blended, x, t), agreement.blend(_x0(diffusion, output, x, t)))
    assert torch.equal(blended[:, 1:], output[:, 1:])
    # by hand at one pixel of slice 2: its agreeing neighbours' x0, Gaussian-weighted, pulled in by 0.7
    x0 = _x0(diffusion, output, x, t)[:, 0, 3, 4]
    weights = {d: w for d, w in neighbour_weights().items() if classes[2 + d, 3, 4] == classes[2, 3, 4]}
    average = (x0[2] + sum(w * x0[2 + d] for d, w in weights.items())) / (1 + sum(weights.values()))
    assert weights and float(_x0(diffusion, blended, x, t)[2, 0, 3, 4]) == pytest.approx(
        float(x0[2] + 0.7 * (average - x0[2])), abs=1e-5)


def test_pixels_whose_labels_differ_from_every_neighbour_are_not_blended():
    diffusion, classes, output, x = _agreement_case(n=8)
    classes[:, :4] = torch.arange(8, dtype=torch.uint8)[:, None, None]  # top half: a new class on every slice
    classes[:, 4:] = 5  # bottom half: one class throughout
    t = torch.full((len(x),), 200)
    blended = SliceAgreement(lambda x, t: output, diffusion, classes, range(len(x)), 1.0)(x, t)
    assert torch.equal(blended[:, :, :4], output[:, :, :4])
    assert (_x0(diffusion, blended, x, t) - _x0(diffusion, output, x, t))[:, :, 4:].abs().mean() > 0.05


def test_only_sampled_slices_numbered_next_to_each_other_are_neighbours():
    diffusion, classes, output, x = _agreement_case(n=6)
    classes[:] = 1
    t = torch.full((6,), 200)
    agreement = SliceAgreement(lambda x, t: output, diffusion, classes, [0, 1, 2, 7, 8, 9], 1.0)
    x0 = _x0(diffusion, output, x, t)
    moved = x0.clone()
    moved[3:] += 0.5  # slices 7..9: far from slices 0..2
    torch.testing.assert_close(agreement.blend(moved)[:3], agreement.blend(x0)[:3])
    torch.testing.assert_close(agreement.blend(moved)[3:], agreement.blend(x0)[3:] + 0.5)


def _identical_slices(sample_classes: Volume, n: int = 10) -> Volume:
    """``n`` copies of one axial slice of the sample (downsampled): every neighbour agrees everywhere."""
    one = sample_classes.array[::6, ::6, 60:61]
    return Volume(np.ascontiguousarray(np.repeat(one, n, axis=2)), sample_classes.affine)


def _adjacent_difference(volume: Volume, classes: Volume) -> float:
    """Mean |difference| (HU) between adjacent slices over the body and organs."""
    inside = (classes.array[..., 1:] != BACKGROUND) & (classes.array[..., :-1] != BACKGROUND)
    return float(np.abs(np.diff(volume.array.astype(np.float32), axis=2))[inside].mean())


@pytest.mark.parametrize("sampler", ["ddim", "ancestral"])
def test_full_agreement_makes_identical_label_slices_nearly_identical(sample_classes, tiny_loaded, sampler):
    classes = _identical_slices(sample_classes)
    options = SamplingOptions(sampler=sampler, steps=4, start_timestep=300, seed=1, batch_size=4)
    apart = synthesize(classes, tiny_loaded, options, device="cpu").volume
    together = synthesize(classes, tiny_loaded, replace(options, slice_agreement=1.0), device="cpu").volume
    independent, agreeing = _adjacent_difference(apart, classes), _adjacent_difference(together, classes)
    assert independent > 5.0  # the tiny model's slices differ by several HU on their own
    assert agreeing < 0.2 * independent


def test_agreement_is_independent_of_the_batch_size(sample_classes, tiny_loaded):
    crop = Volume(np.ascontiguousarray(sample_classes.array[::6, ::6, 40:52]), sample_classes.affine)
    options = SamplingOptions(sampler="ancestral", steps=3, start_timestep=300, seed=4, batch_size=5,
                              slice_agreement=0.8)
    a = synthesize(crop, tiny_loaded, options, device="cpu")
    b = synthesize(crop, tiny_loaded, replace(options, batch_size=2), device="cpu")
    np.testing.assert_array_equal(a.volume.array, b.volume.array)
    assert a.provenance["options"]["slice_agreement"] == 0.8
    plain = synthesize(crop, tiny_loaded, replace(options, slice_agreement=0.0), device="cpu")
    assert not np.array_equal(a.volume.array, plain.volume.array)


# --- 2.5D conditioning --------------------------------------------------------------------------------------------


def test_with_neighbours_takes_neighbours_by_slice_number_and_background_elsewhere():
    classes = torch.stack([torch.full((2, 2), k, dtype=torch.uint8) for k in (3, 4, 5, 8)])  # class = slice number
    context = with_neighbours(classes, [3, 4, 5, 8], 2)
    assert context_offsets(2) == [0, -1, 1, -2, 2]
    assert context.shape == (4, 5, 2, 2)
    assert context[:, :, 0, 0].tolist() == [[3, 0, 4, 0, 5], [4, 3, 5, 0, 0], [5, 4, 0, 3, 0], [8, 0, 0, 0, 0]]
    assert with_neighbours(classes, [3, 4, 5, 8], 0) is classes


def _context_network(conditioning: str, context_slices: int) -> UNetModel:
    torch.manual_seed(0)
    config = tiny_model_config(conditioning, image_size=16) | {"context_slices": context_slices}
    return randomise_zero_layers(UNetModel(**config)).eval()


@pytest.mark.parametrize("conditioning", ["concat", "mask_encoder", "edge"])
def test_neighbour_masks_reach_the_output(conditioning):
    network = _context_network(conditioning, 1)
    classes = torch.full((3, 1 + 2, 16, 16), BODY, dtype=torch.long)
    classes[:, 0, 4:12, 4:12] = LIVER
    other = classes.clone()
    other[:, 2, 2:8, 2:8] = 2  # only the slice above changes
    x, t = torch.randn((3, 1, 16, 16), generator=torch.Generator().manual_seed(0)), torch.full((3,), 500)
    with torch.no_grad():
        first, second = (network(x, t, **condition_inputs(c, conditioning)) for c in (classes, other))
    assert (first - second).abs().mean() > 1e-3
    inputs = condition_inputs(classes, conditioning)
    assert inputs["mask"].shape == (3, 3 * 17, 16, 16)
    torch.testing.assert_close(inputs["mask"][:, :17], condition_inputs(classes[:, 0], conditioning)["mask"])
    if conditioning == "edge":  # the slice's own edges
        torch.testing.assert_close(inputs["edge"], semantic_edges(classes[:, 0]))
    with pytest.raises(ValueError, match="mask must be one-hot"):
        network(x, t, **condition_inputs(classes[:, 0], conditioning))


def test_a_2p5d_model_saves_loads_and_samples_with_its_neighbours(tmp_path, sample_classes):
    folder = tmp_path / "tiny25d"
    network = _context_network("concat", 1)
    save_model(folder, network, GaussianDiffusion(), name="tiny-2.5d", extra={"class_means": [0.0] + [0.55] * 16})
    loaded = load_model(folder)
    assert loaded.model.config["context_slices"] == 1
    for name, value in network.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value)
    crop = np.ascontiguousarray(sample_classes.array[::3, ::3, 80:86])
    options = SamplingOptions(sampler="ddim", steps=2, start_timestep=300, seed=2, batch_size=4)
    a = synthesize(Volume(crop, sample_classes.affine), loaded, options, device="cpu").volume.array
    changed = crop.copy()
    changed[..., 4] = np.where(changed[..., 4] != BACKGROUND, BODY, BACKGROUND)  # the organs of slice 4 removed
    b = synthesize(Volume(changed, sample_classes.affine), loaded, options, device="cpu").volume.array
    assert a.shape == crop.shape
    assert not np.array_equal(a[..., 3], b[..., 3]) and not np.array_equal(a[..., 5], b[..., 5])  # neighbours of 4
    np.testing.assert_array_equal(a[..., :2], b[..., :2])  # slices 0, 1: slice 4 is not within one of them
    gap = crop.copy()
    gap[..., 2] = BACKGROUND  # not sampled: slices 1 and 3 are no neighbours of each other
    c = synthesize(Volume(gap, sample_classes.affine), loaded, options, device="cpu").volume.array
    gap[..., 1] = np.where(gap[..., 1] != BACKGROUND, BODY, BACKGROUND)
    d = synthesize(Volume(gap, sample_classes.affine), loaded, options, device="cpu").volume.array
    assert not np.array_equal(c[..., 0], d[..., 0])
    np.testing.assert_array_equal(c[..., 3:], d[..., 3:])


@pytest.fixture(scope="module")
def sample_cache(tmp_path_factory) -> Path:
    """A 32-px slice cache of the bundled sample."""
    from training import prepare

    root = tmp_path_factory.mktemp("cache")
    for folder, source in (("images", SAMPLE_CT), ("labels", SAMPLE_SEG)):
        (root / folder).mkdir()
        (root / folder / "sample.nii.gz").symlink_to(source)
    with single_thread():  # prepare forks workers
        assert prepare.main(["--images", str(root / "images"), "--labels", str(root / "labels"), "--out",
                             str(root / "cache"), "--size", "32", "--workers", "1", "--convention", "totalseg"]) == 0
    return root / "cache"


def test_the_slice_cache_gives_the_neighbours_classes(sample_cache):
    from training.dataset import SliceCache

    cache = SliceCache(sample_cache, "train")
    stack = np.load(sample_cache / "cases" / "sample" / "classes.npy")
    rows = [0, 80, len(stack) - 1]
    assert [cache.rows[r][1] for r in rows] == rows
    _, classes = cache.load(rows, context_slices=2)
    assert classes.shape == (3, 5, 32, 32)
    np.testing.assert_array_equal(classes[1].numpy(), stack[[80, 79, 81, 78, 82]])
    assert (classes[0, [1, 3]] == BACKGROUND).all() and (classes[2, [2, 4]] == BACKGROUND).all()  # beyond the ends
    np.testing.assert_array_equal(classes[0, [0, 2, 4]].numpy(), stack[[0, 1, 2]])
    np.testing.assert_array_equal(cache.load(rows)[1].numpy(), stack[rows])


def test_the_trainer_trains_and_exports_a_2p5d_model(sample_cache, tmp_path, monkeypatch):
    from training import train

    grids = []
    monkeypatch.setattr(train, "write_sample_grid", lambda *args, **kwargs: grids.append(args[4]))
    out = tmp_path / "run"
    assert train.main(["--data", str(sample_cache), "--out", str(out), "--context-slices", "1", "--model-channels",
                       "8", "--channel-mult", "1,2", "--num-res-blocks", "1", "--attention-resolutions", "2",
                       "--num-heads", "1", "--batch-size", "2", "--iterations", "2", "--sample-every", "2",
                       "--sample-steps", "2", "--threads", "1", "--device", "cpu", "--checkpoint-every", "2"]) == 0
    assert [tuple(classes.shape) for classes in grids] == [(4, 3, 32, 32)]  # the sample grid gets the neighbours
    loaded = load_model(out / "model")
    assert loaded.model.config["context_slices"] == 1 and loaded.model.mask_channels == 3 * 17


def test_the_demo_models_default_preset_carries_its_agreement_and_a_flag_overrides_it():
    from CTSemanticSynthLib.checkpoint import read_config, resolve_model_path

    config = read_config(resolve_model_path("demo"))
    assert preset_options(config, "fast").slice_agreement == config["sampling_presets"]["fast"]["slice_agreement"] > 0
    assert preset_options(config, "fast", slice_agreement=0.0).slice_agreement == 0.0
    assert preset_options(config, "balanced").slice_agreement == 0.0  # measured on the fast preset only
