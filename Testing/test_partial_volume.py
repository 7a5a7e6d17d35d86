"""Boundary correction (region-based partial-volume correction of the upsampled model output)."""

import json

import numpy as np
import pytest
import torch

from CTSemanticSynthLib.checkpoint import load_model
from CTSemanticSynthLib.errors import CTSynthError
from CTSemanticSynthLib.io import Volume
from CTSemanticSynthLib.labels import BACKGROUND, BODY
from CTSemanticSynthLib.partial_volume import ClassValues, restore_boundaries
from CTSemanticSynthLib.preprocess import AxialOrientation, PlaneResize, hu_to_model
from CTSemanticSynthLib.synthesis import SamplingOptions, preset_options, synthesize

from conftest import make_anatomy_model_folder, make_model_folder

LIVER, AORTA, RIBS = 6, 8, 22
HU = {BACKGROUND: -1000.0, BODY: -100.0, LIVER: 60.0, AORTA: 230.0}
HU_RANGE = (-1024.0, 2000.0)


def _phantom(slices: int = 4, side: int = 90) -> np.ndarray:
    """(slices, side, side) classes: a body disk holding a 'liver' block and a 2-voxel wide 'aorta' bar."""
    rows, cols = np.mgrid[:side, :side]
    classes = np.where((rows - side / 2) ** 2 + (cols - side / 2) ** 2 < (0.45 * side) ** 2, BODY, BACKGROUND)
    classes[20:50, 20:45] = LIVER
    classes[55:75, 60:62] = AORTA
    return np.repeat(classes[None].astype(np.uint8), slices, axis=0)


def _template(classes: np.ndarray) -> np.ndarray:
    lookup = np.zeros(256, np.float32)
    for c, hu in HU.items():
        lookup[c] = hu
    return lookup[classes]


def test_class_values_unmix_the_model_grid_and_the_boundaries_come_back():
    classes = _phantom()
    truth = torch.from_numpy(_template(classes))
    resize = PlaneResize(90, 90, 32)
    low = resize.to_model(truth, labels=False)
    blurred = resize.from_model(low, labels=False).numpy()
    estimate = ClassValues(17, resize)
    estimate.add(classes[:2], low[:2])  # accumulated over parts as synthesize does
    estimate.add(classes[2:], low[2:])
    values = estimate.solve(HU_RANGE)
    for c, hu in HU.items():
        assert values[c] == pytest.approx(hu, abs=3.0)
    restored = restore_boundaries(classes, low, resize, values, HU_RANGE)
    bar = classes == AORTA
    assert blurred[bar].mean() < 120  # a 2-voxel bar on a 3x coarser grid: half its contrast is gone
    assert restored[bar].mean() == pytest.approx(230, abs=5)
    assert np.abs(restored - truth.numpy()).mean() < 0.2 * np.abs(blurred - truth.numpy()).mean()


def test_texture_inside_a_class_is_the_models_and_values_stay_in_range():
    classes = _phantom(slices=2)
    rows = np.arange(90, dtype=np.float32)[:, None]
    texture = 30 * np.sin(rows / 9)  # smooth: the model's grid resolves it
    truth = torch.from_numpy(_template(classes) + np.where(classes == LIVER, texture, 0).astype(np.float32))
    resize = PlaneResize(90, 90, 45)
    low = resize.to_model(truth, labels=False)
    estimate = ClassValues(17, resize)
    estimate.add(classes, low)
    values = estimate.solve((-1024.0, 50.0))  # a range that cuts the aorta and the liver
    assert values.max() <= 50.0 and values[AORTA] == 50.0
    restored = restore_boundaries(classes, low, resize, values, (-1024.0, 50.0))
    assert restored.max() <= 50.0
    inner = np.zeros_like(classes, bool)
    inner[:, 26:44, 26:39] = True  # the liver away from its boundary
    keep = restore_boundaries(classes, low, resize, estimate.solve(HU_RANGE), HU_RANGE)
    np.testing.assert_allclose(keep[inner], resize.from_model(low, labels=False).numpy()[inner], atol=2.0)


def test_a_class_seen_in_a_few_mixed_pixels_stays_finite():
    classes = _phantom(slices=1)
    classes[0, 10, 44] = 21  # one voxel of a class, never a whole model pixel
    resize = PlaneResize(90, 90, 16)
    low = resize.to_model(torch.from_numpy(_template(classes)), labels=False)
    estimate = ClassValues(36, resize)
    estimate.add(classes, low)
    values = estimate.solve(HU_RANGE)
    assert np.isfinite(values).all() and HU_RANGE[0] <= values[21] <= HU_RANGE[1]
    assert values[30] == 0  # never seen


def _fake_sampler(truth_hu: np.ndarray, resize: PlaneResize, mapping):
    """sample_slices stand-in: the model output is the true image on the model's grid as training prepares it (a
    perfect model)."""
    def sample(network, conditioning, sampler, small, active, **kwargs):
        kwargs["on_batch_size"](len(active))
        low_hu = hu_to_model(resize, torch.from_numpy(truth_hu[active]), mapping.hu_range)
        return torch.from_numpy(mapping.to_unit(low_hu.numpy()))
    return sample


@pytest.mark.parametrize("correct", [False, True])
def test_synthesize_restores_the_boundaries_when_asked_and_records_it(tiny_model, monkeypatch, correct):
    import CTSemanticSynthLib.synthesis as synthesis

    classes = _phantom(slices=3)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    orientation = AxialOrientation.from_affine(affine)
    volume = Volume(orientation.from_stack(classes), affine)
    model = load_model(tiny_model)  # 32 px, the paper window (-160..240 HU)
    resize = PlaneResize(90, 90, model.image_size)
    truth = _template(classes)
    monkeypatch.setattr(synthesis, "sample_slices", _fake_sampler(truth, resize, model.intensity))
    result = synthesize(volume, model, SamplingOptions(steps=2, boundary_correction=correct), device="cpu")
    out = orientation.to_stack(result.volume.array).astype(np.float32)
    bar = classes == AORTA
    assert result.provenance["options"]["boundary_correction"] is correct
    if correct:
        assert out[bar].mean() == pytest.approx(230, abs=6)
        assert (out[classes == BACKGROUND] == -1000).all()
    else:
        assert out[bar].mean() < 130



@pytest.mark.parametrize("correct", [False, True])
def test_a_full_range_output_keeps_the_attenuation_of_a_thin_bone(tmp_path, monkeypatch, correct):
    """A full-range model's output is upsampled in HU: around a 2-voxel rib (1200 HU) the mean attenuation is the
    real one with or without the correction (upsampled after the companding it would come out 100s of HU low), and
    the correction brings the rib itself back to its value."""
    import CTSemanticSynthLib.synthesis as synthesis

    classes = _phantom(slices=2)
    classes[classes == AORTA] = RIBS
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    orientation = AxialOrientation.from_affine(affine)
    model = load_model(make_anatomy_model_folder(tmp_path / "anatomy"))  # 32 px, -1024..2000 HU
    resize = PlaneResize(90, 90, model.image_size)
    truth = _template(classes)
    truth[classes == RIBS] = 1200.0
    monkeypatch.setattr(synthesis, "sample_slices", _fake_sampler(truth, resize, model.intensity))
    result = synthesize(Volume(orientation.from_stack(classes), affine), model,
                        SamplingOptions(steps=2, boundary_correction=correct), device="cpu")
    out = orientation.to_stack(result.volume.array).astype(np.float32)
    around = (slice(None), slice(50, 80), slice(52, 70))  # the rib and the body tissue its blur reaches
    assert out[around].mean() == pytest.approx(truth[around].mean(), abs=8)
    rib = classes == RIBS
    assert (out[rib].mean() == pytest.approx(1200, abs=30)) if correct else (out[rib].mean() < 700)


def test_presets_carry_boundary_correction_and_the_flag_overrides(tmp_path):
    folder = make_model_folder(tmp_path / "m", class_means=[0.0] + [0.55] * 15 + [0.45])
    config = json.loads((folder / "config.json").read_text())
    config["sampling_presets"] = {"fast": {"sampler": "ddim", "steps": 2, "boundary_correction": True}}
    assert preset_options(config, "fast").boundary_correction is True
    assert preset_options(config, "fast", boundary_correction=False).boundary_correction is False
    assert preset_options(config, "balanced").boundary_correction is False
    config["sampling_presets"]["fast"]["boundary_correction"] = "yes"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CTSynthError, match="sampling_presets.fast.boundary_correction"):
        load_model(folder)


def test_the_bundled_anatomy_model_corrects_boundaries_by_default():
    from CTSemanticSynthLib.checkpoint import read_config, resolve_model_path

    config = read_config(resolve_model_path("anatomy"))
    assert all(preset_options(config, name).boundary_correction for name in ("fast", "balanced", "paper"))
    demo = read_config(resolve_model_path("demo"))
    assert not preset_options(demo, "fast").boundary_correction  # the paper protocol is unchanged
