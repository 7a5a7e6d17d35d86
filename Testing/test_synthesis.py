"""Volume-level synthesis: geometry kept, HU rule, seeds, progress, cancel, prior start, class preparation."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from CTSemanticSynthLib.checkpoint import load_model
from CTSemanticSynthLib.diffusion import SAMPLERS
from CTSemanticSynthLib.device import device_capability, select_device, select_precision
from CTSemanticSynthLib.errors import Cancelled, InputError
from CTSemanticSynthLib.io import Volume, read_labelmap
from CTSemanticSynthLib.labels import BACKGROUND, BODY
from CTSemanticSynthLib.synthesis import (SamplingOptions, evaluation_flops, prepare_classes, preset_options,
                                           synthesize)

from conftest import SAMPLE_SEG, make_model_folder

FAST = SamplingOptions(sampler="ddim", steps=2, batch_size=16)


@pytest.fixture(scope="module")
def sample_classes():
    seg, names = read_labelmap(SAMPLE_SEG)
    classes, report = prepare_classes(seg, names, "totalseg")
    return seg, classes, report


def _cropped(volume: Volume, affine: np.ndarray | None = None, slices: int = 20) -> Volume:
    """A crop of axial slices from 40 on (kidneys/liver), optionally placed on another affine."""
    return Volume(np.ascontiguousarray(volume.array[:, :, 40:40 + slices]), volume.affine if affine is None else affine)


def test_prepare_classes_on_sample(sample_classes):
    seg, classes, report = sample_classes
    assert classes.array.dtype == np.uint8 and classes.array.shape == seg.array.shape
    assert np.array_equal(classes.affine, seg.affine)
    assert set(report.organs_present) >= {"liver", "spleen", "kidney_left", "kidney_right", "aorta", "pancreas"}
    assert report.unknown == {}
    organ_voxels = (seg.array > 0).sum()
    body_voxels = ((classes.array != BACKGROUND)).sum()
    assert body_voxels > organ_voxels  # the body grows beyond the labelled structures
    liver = seg.array == 5
    assert (classes.array[liver] == 6).all()


@pytest.mark.parametrize("handedness", ["oblique", "left-handed"])
def test_output_keeps_exact_geometry(tiny_model, sample_classes, handedness):
    _, classes, _ = sample_classes
    if handedness == "oblique":
        c, s = np.cos(0.3), np.sin(0.3)
        affine = np.array([[3 * c, -3 * s, 0, -170.0], [3 * s, 3 * c, 0, 12.5], [0, 0, 2.5, 90.0], [0, 0, 0, 1]])
    else:
        affine = np.diag([-3.0, 3.0, 2.5, 1.0])
    crop = _cropped(classes, affine)
    result = synthesize(crop, load_model(tiny_model), FAST, device="cpu")
    assert result.volume.array.shape == crop.array.shape and result.volume.array.dtype == np.int16
    assert np.array_equal(result.volume.affine, crop.affine)
    hu = result.volume.array
    assert (hu[crop.array == BACKGROUND] == -1000).all()
    inside = hu[crop.array != BACKGROUND]
    assert inside.min() >= -160 and inside.max() <= 240


@pytest.mark.parametrize(("sampler", "eta"), [("ancestral", 0.0), ("ddim", 1.0), ("dpmsolver++", 0.0)])
def test_seed_reproducible_and_independent_of_batch_size(tiny_model, sample_classes, sampler, eta):
    """Each slice has its own generator (starting noise and step noise), so the batch size does not change the
    noise. Batched convolutions round differently (~1e-6), which moves a handful of voxels by one HU step (measured:
    <= 1 HU on 0.01 % of voxels); other noise moves most voxels by up to hundreds of HU."""
    model = load_model(tiny_model)
    crop = _cropped(sample_classes[1], slices=8)

    def volume(batch_size: int, seed: int = 5) -> np.ndarray:
        options = SamplingOptions(sampler=sampler, eta=eta, steps=3, seed=seed, batch_size=batch_size)
        return synthesize(crop, model, options, device="cpu").volume.array.astype(np.int32)

    one = volume(1)
    for other in (volume(3), volume(8)):
        assert np.abs(one - other).max() <= 1 and (one != other).mean() < 1e-3
    assert (one != volume(8, seed=6)).mean() > 0.3


def test_progress_and_provenance(tiny_model, sample_classes):
    crop = _cropped(sample_classes[1])
    seen = []
    result = synthesize(crop, load_model(tiny_model), SamplingOptions(steps=2, batch_size=8, seed=3), device="cpu",
                        progress=lambda done, total: seen.append((done, total)))
    totals = {t for _, t in seen}
    assert totals == {20}
    done = [d for d, _ in seen]
    assert done == sorted(done) and done[-1] == pytest.approx(20)
    p = result.provenance
    assert p["synthetic"] is True and p["model_sha256"] == load_model(tiny_model).sha256
    assert p["options"]["seed"] == 3 and p["sampler"]["name"] == "ddim" and p["sampler"]["num_steps"] == 2


def test_cancel_stops_sampling(tiny_model, sample_classes):
    calls = []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled):
        synthesize(_cropped(sample_classes[1]), load_model(tiny_model), FAST, device="cpu", cancel=cancel)
    assert len(calls) == 3


@pytest.mark.parametrize("sampler", ["ddim", "dpmsolver++"])
def test_prior_start_and_its_requirement(tmp_path, tiny_model, sample_classes, sampler):
    crop = _cropped(sample_classes[1])
    options = SamplingOptions(sampler=sampler, steps=3, start_timestep=300, batch_size=32)
    result = synthesize(crop, load_model(tiny_model), options, device="cpu")
    assert result.provenance["sampler"] == {"name": sampler, "num_steps": 3, "start_timestep": 300,
                                            "clip_denoised": True, **({"eta": 0.0} if sampler == "ddim" else {})}
    plain = load_model(make_model_folder(tmp_path / "plain"))
    with pytest.raises(InputError, match="class_means"):
        synthesize(crop, plain, options, device="cpu")


@pytest.mark.parametrize("conditioning", ["mask_encoder", "edge"])
def test_other_conditionings_synthesize(tmp_path, sample_classes, conditioning):
    model = load_model(make_model_folder(tmp_path / conditioning, conditioning))
    crop = _cropped(sample_classes[1])
    result = synthesize(crop, model, FAST, device="cpu")
    assert result.volume.array.shape == crop.array.shape


def test_model_presets(tiny_model):
    model = load_model(tiny_model)
    assert preset_options(model.config, "paper").sampler == "ancestral"
    assert preset_options(model.config, "fast", steps=7).steps == 7
    with pytest.raises(InputError, match="unknown preset"):
        preset_options(model.config, "turbo")


def test_prepare_classes_rejects_empty_unknown_and_mismatched_body(sample_classes):
    seg = sample_classes[0]
    with pytest.raises(InputError, match="empty"):
        prepare_classes(Volume(np.zeros_like(seg.array), seg.affine))
    strange = Volume(np.where(seg.array > 0, 200, 0).astype(np.uint8), seg.affine)
    with pytest.raises(InputError, match="^the 'amos' label convention knows none of the label values \\(200\\): no "
                                         "organ the model knows"):
        prepare_classes(strange, labels="amos")
    body = Volume(np.ones(seg.array.shape, np.uint8), seg.affine @ np.diag([1, 1, 1.1, 1]))
    with pytest.raises(InputError, match="body mask is not on the segmentation's grid"):
        prepare_classes(seg, labels="totalseg", body_mask=body)


def test_a_region_with_known_labels_but_no_organ_is_body_tissue():
    """A pelvis crop with TotalSegmentator's small bowel (18), colon (20), sacrum (25) and hips (77, 78), plus an
    unknown value: no organ of the model, but the convention knows the labels, so all of it is body."""
    labels = np.zeros((40, 40, 4), np.uint8)
    labels[5:15, 5:15] = 18
    labels[15:25, 5:15] = 20
    labels[18:22, 20:24] = 25
    labels[5:10, 25:35, :2] = 77
    labels[30:35, 25:35, 2:] = 78
    labels[26:28, 5:7] = 250  # unknown: body too, and reported
    seg = Volume(labels, np.diag([2.0, 2.0, 3.0, 1.0]))
    classes, report = prepare_classes(seg, labels="totalseg")
    assert report.organs_present == () and report.unknown == {250: 16}
    assert ((classes.array == BODY) == (classes.array != BACKGROUND)).all()  # body only
    assert (classes.array[labels > 0] == BODY).all() and (classes.array == BODY).sum() > (labels > 0).sum()
    with pytest.raises(InputError, match="knows none of the label values \\(250\\)"):
        prepare_classes(Volume(np.where(labels == 250, 250, 0).astype(np.uint8), seg.affine), labels="totalseg")


def _box_segmentation(spacing: tuple[float, float, float]) -> Volume:
    """A 60 x 60 x 8 label map (axial slices along k) with a 10 x 10 'liver' (TotalSegmentator's 5) in the middle."""
    labels = np.zeros((60, 60, 8), np.uint8)
    labels[25:35, 25:35, 2:6] = 5
    return Volume(labels, np.diag([*spacing, 1.0]))


def test_prepare_classes_defaults_to_automatic_labels(sample_classes):
    seg, classes, report = sample_classes
    default, default_report = prepare_classes(seg)
    assert default_report == prepare_classes(seg, labels="auto")[1] and "liver" in default_report.organs_present


def test_prepare_classes_grows_the_hull_by_the_in_plane_margin():
    seg = _box_segmentation((2.0, 2.0, 5.0))  # 2 mm pixels, 5 mm slices: the margin is counted in pixels
    classes, report = prepare_classes(seg, labels="totalseg")
    row = classes.array[:, 30, 3] != BACKGROUND
    margin_px = round(30.0 / 2.0)  # BODY_MARGIN_MM over the in-plane spacing
    assert np.flatnonzero(row)[[0, -1]].tolist() == [25 - margin_px, 34 + margin_px]


def test_prepare_classes_uses_segment_names_and_a_drawn_body_outline():
    labels = np.zeros((40, 40, 6), np.uint8)
    labels[5:35, 5:35, 1:5] = 1  # the body outline, drawn: an L, larger than the organs' hull and not convex
    labels[22:35, 22:35, 1:5] = 0
    labels[15:20, 15:20, 2:4] = 2
    seg = Volume(labels, np.eye(4))
    classes, report = prepare_classes(seg, {1: "body", 2: "liver"})
    assert report.has_outline and report.organs_present == ("liver",)
    assert np.array_equal(classes.array != BACKGROUND, labels != 0)  # the outline itself, not a hull around it
    assert (classes.array[15:20, 15:20, 2:4] == 6).all()


def test_synthesize_picks_the_device_itself_by_default(tiny_model):
    classes, _ = prepare_classes(_box_segmentation((2.0, 2.0, 5.0)), labels="totalseg")
    model = load_model(tiny_model)
    result = synthesize(classes, model, SamplingOptions(steps=2))
    assert result.provenance["device"] == str(select_device("auto"))
    record = result.provenance  # the model it names
    assert (record["model"], record["model_sha256"], record["conditioning"], record["kind"]) == (
        model.name, model.sha256, model.conditioning, "diffusion")


def test_synthesize_resizes_classes_as_labels_and_pastes_every_resize_part_back(tiny_model, monkeypatch):
    import CTSemanticSynthLib.synthesis as synthesis

    classes, _ = prepare_classes(_box_segmentation((2.0, 2.0, 5.0)), labels="totalseg")  # 60 x 60 -> 32 x 32
    model, options = load_model(tiny_model), SamplingOptions(sampler="ddim", steps=2, seed=3)
    whole = synthesize(classes, model, options, device="cpu").volume.array
    monkeypatch.setattr(synthesis, "RESIZE_CHUNK", 1)  # one slice per resize part
    np.testing.assert_array_equal(synthesize(classes, model, options, device="cpu").volume.array, whole)
    seen = {}
    real = synthesis.sample_slices
    monkeypatch.setattr(synthesis, "sample_slices", lambda network, conditioning, sampler, small, *a, **k:
                        seen.setdefault("small", small) is not None and real(network, conditioning, sampler, small,
                                                                             *a, **k))
    synthesize(classes, model, options, device="cpu")
    assert set(np.unique(seen["small"].numpy())) <= set(np.unique(classes.array))  # no averaged class values


def test_synthesize_refuses_class_values_beyond_the_model_and_names_an_empty_class_volume(tiny_model):
    model = load_model(tiny_model)
    labels = np.zeros((8, 8, 2), np.uint8)
    with pytest.raises(InputError, match="^the class volume has no body or organ voxel"):
        synthesize(Volume(labels, np.eye(4)), model, SamplingOptions(steps=1), device="cpu")
    labels[2:4, 2:4, 0] = 17  # NUM_CLASSES: one past the body class
    with pytest.raises(InputError, match="class volume has values >= 17"):
        synthesize(Volume(labels, np.eye(4)), model, SamplingOptions(steps=1), device="cpu")


def test_synthesize_names_a_region_without_body_or_organ(tiny_model):
    labels = np.zeros((8, 8, 3), np.uint8)
    labels[2:6, 2:6, 0] = BODY
    region = np.zeros(labels.shape, np.uint8)
    region[2:6, 2:6, 2] = 1  # a slice without body
    keep = Volume(np.zeros(labels.shape, np.int16), np.eye(4))
    with pytest.raises(InputError, match="^the region has no body or organ voxel"):
        synthesize(Volume(labels, np.eye(4)), load_model(tiny_model), SamplingOptions(steps=1), device="cpu",
                   keep=keep, region=Volume(region, np.eye(4)))


def test_synthesize_resolves_auto_precision_for_the_device(tiny_model):
    classes, _ = prepare_classes(_box_segmentation((2.0, 2.0, 5.0)), labels="totalseg")
    result = synthesize(classes, load_model(tiny_model), SamplingOptions(steps=1, precision="auto"), device="cpu")
    resolved = select_precision("auto", torch.device("cpu"))
    assert result.provenance["precision"] == result.provenance["options"]["precision"] == resolved


def test_compile_option_compiles_the_network(tiny_model, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module: compiled.append(module) or module)
    classes, _ = prepare_classes(_box_segmentation((2.0, 2.0, 5.0)), labels="totalseg")
    model = load_model(tiny_model)
    synthesize(classes, model, SamplingOptions(steps=1, compile=True), device="cpu")
    synthesize(classes, model, SamplingOptions(steps=1), device="cpu")
    assert compiled == [model.model]


def test_no_known_organ_lists_the_label_values_found():
    labels = np.zeros((20, 20, 4), np.uint8)
    for value in range(200, 212):
        labels[value - 200, 0, 0] = value
    with pytest.raises(InputError) as error:
        prepare_classes(Volume(labels, np.eye(4)), labels="amos")
    assert "knows none of the label values (200, 201, 202, 203, 204, 205, 206, 207, 208, ...)" in str(error.value)


def test_explicit_body_mask_defines_body(sample_classes):
    seg = sample_classes[0]
    body = np.zeros(seg.array.shape, np.uint8)
    body[10:110, 10:90, :] = 1
    classes, _ = prepare_classes(seg, labels="totalseg", body_mask=Volume(body, seg.affine))
    outside = (body == 0) & (seg.array == 0)
    assert (classes.array[outside] == BACKGROUND).all()
    assert (classes.array[(body == 1) & (seg.array == 0)] == BODY).all()


def test_precision_selection(monkeypatch):
    cpu = torch.device("cpu")
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)
    assert select_precision("auto", cpu) == "fp32" and device_capability(cpu) == torch.backends.cpu.get_cpu_capability()
    assert [select_precision(p, cpu) for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert select_precision("auto", cpu) == "bf16" and device_capability(cpu).endswith("+AVX512_BF16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert select_precision("auto", torch.device("cuda")) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert select_precision("auto", torch.device("cuda")) == "fp32"  # emulated bf16 is slow: not chosen
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert select_precision("auto", torch.device("cuda")) == "bf16"
    assert select_precision("auto", torch.device("mps")) == "fp32"
    with pytest.raises(InputError, match="unknown precision 'half': use one of auto, fp32, bf16, fp16"):
        select_precision("half", cpu)


BF16_TOLERANCE_HU = 2.0
"""RMSE inside the body between bf16 autocast and fp32 on the demo model. bf16 keeps 8 bits of mantissa (0.4 %
relative error per operation; the window is 400 HU wide, one HU step is 0.25 % of it). Measured: 4 slices,
DPM-Solver++ 4 steps from t=300: RMSE 0.45 HU, max 2 HU, 99th percentile 1 HU; another seed moves the same
slices by 16 HU RMSE. One slice and two steps here: a CPU without bf16 units emulates bf16 slowly."""


def test_bf16_and_fp32_volumes_agree_on_the_demo_model(sample_classes):
    model = load_model("demo")
    crop = _cropped(sample_classes[1], slices=1)
    options = SamplingOptions(sampler="dpmsolver++", steps=2, start_timestep=300, batch_size=1)
    results = {p: synthesize(crop, model, replace(options, precision=p), device="cpu") for p in ("fp32", "bf16")}
    body = crop.array != BACKGROUND
    fp32, bf16 = (results[p].volume.array[body].astype(np.float64) for p in ("fp32", "bf16"))
    rmse = float(np.sqrt(np.mean((fp32 - bf16) ** 2)))
    assert 0 < rmse < BF16_TOLERANCE_HU, rmse  # > 0: the network really ran in bf16
    for p in ("fp32", "bf16"):  # beside the other options and on its own (older readers)
        assert results[p].provenance["precision"] == results[p].provenance["options"]["precision"] == p
    assert results["bf16"].provenance["device_capability"].startswith(torch.backends.cpu.get_cpu_capability())


def test_preset_option_bounds_are_inclusive_where_documented(tiny_model):
    from CTSemanticSynthLib.checkpoint import read_config
    from CTSemanticSynthLib.synthesis import MAX_SEED

    config = read_config(tiny_model)
    options = preset_options(config, "fast", seed=MAX_SEED, slice_correlation=1.0, slice_agreement=1.0,
                             slice_agreement_below=1.0)
    assert (options.seed, options.slice_correlation, options.slice_agreement) == (MAX_SEED, 1.0, 1.0)
    for overrides, message in (
        ({"sampler": "turbo"}, f"unknown sampler 'turbo': use one of {', '.join(SAMPLERS)}"),
        ({"guidance": float("inf")}, "--guidance inf is out of range: use a number >= 0 (0: no guidance)"),
        ({"slice_agreement_below": 1.5}, "slice_agreement_below 1.5 is out of range: use (0, 1]"),
        ({"steps": 5000}, f"--steps 5000 (eta 0.0) does not fit preset 'fast' of model '{config['name']}': "),
    ):
        with pytest.raises(InputError) as error:
            preset_options(config, "fast", **overrides)
        assert str(error.value).startswith(message), str(error.value)


def test_guidance_defaults_to_the_models_scale_and_steps_are_checked_without_a_kind_key(tiny_model):
    from CTSemanticSynthLib.checkpoint import read_config

    config = read_config(tiny_model)
    guided = {**config, "model": {**config["model"], "guidance_scale": 1.5, "label_dropout": 0.2}}
    assert preset_options(guided, "fast").guidance == 1.5 and preset_options(guided, "fast", guidance=0.0).guidance == 0
    old = {k: v for k, v in config.items() if k != "kind"}  # folders saved before the key: diffusion models
    with pytest.raises(InputError, match="does not fit preset"):
        preset_options(old, "fast", steps=5000)


def test_evaluation_flops_of_the_demo_model():
    """5.1 GFLOP per 96 x 96 slice evaluation was measured independently for the demo U-Net (../shared/DESIGN.md:
    140-200 GFLOP/s at 25 ms/slice); the count is per slice, so a batch would not change it."""
    assert evaluation_flops(load_model("demo")) / 1e9 == pytest.approx(5.1, rel=0.02)


@pytest.mark.parametrize("conditioning", ["concat", "mask_encoder", "edge"])
def test_evaluation_flops_count_the_network_step_without_the_condition_encoder(tmp_path, conditioning):
    """The per-step cost leaves out the condition encoder, which runs once per batch (features cached)."""
    from torch.utils.flop_counter import FlopCounterMode

    from CTSemanticSynthLib.preprocess import condition_inputs

    model = load_model(make_model_folder(tmp_path / "m", conditioning))
    size = model.image_size
    inputs = condition_inputs(torch.zeros((1, size, size), dtype=torch.long), conditioning)
    x, t = torch.zeros((1, 1, size, size)), torch.zeros((1,), dtype=torch.long)
    with torch.inference_mode(), FlopCounterMode(display=False) as whole:
        model.model(x, t, **inputs)  # the encoder runs inside forward when no features are given
    step = evaluation_flops(model)
    if conditioning == "concat":
        assert step == whole.get_total_flops()
    else:
        with torch.inference_mode(), FlopCounterMode(display=False) as encoder:
            model.model.encode_condition(**inputs)
        assert 0 < encoder.get_total_flops() and step == whole.get_total_flops() - encoder.get_total_flops()


def test_evaluation_flops_of_a_2p5d_model_include_the_neighbour_channels(tmp_path):
    from CTSemanticSynthLib.checkpoint import save_model
    from CTSemanticSynthLib.diffusion import GaussianDiffusion, diffusion_defaults
    from CTSemanticSynthLib.models import UNetModel

    from conftest import tiny_model_config

    flops = {}
    for k in (0, 1):
        folder = tmp_path / f"k{k}"
        save_model(folder, UNetModel(**tiny_model_config() | {"context_slices": k}), GaussianDiffusion(
            **diffusion_defaults()), name=folder.name)
        flops[k] = evaluation_flops(load_model(folder))
    assert flops[1] > flops[0]  # the first convolution reads 3 x 17 mask channels instead of 17
