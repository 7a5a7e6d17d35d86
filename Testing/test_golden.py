"""Golden outputs of the bundled demo model: a wrong, partial or missing weight load, or a change to the network,
the samplers or the synthesis pipeline, changes these numbers.

Expected outputs live in Testing/data/golden/ and are rewritten by ``python Testing/data/golden/make_golden.py``
(only after a deliberate change to the model or to sampling; say why in the commit). Tolerances: fp32 on CPUs
with different vector units (AVX2 vs AVX-512/AMX) and thread counts differs by ~1e-5 relative after the whole
network, so the one-step output is compared at 1e-4 (absolute and relative; values are O(1)); the sampled volumes
are int16 HU after three steps, where such differences move a voxel by at most one rounding step: <= 1 HU, on
fewer than 1 % of voxels. A network whose weights were not loaded differs by tens to hundreds of HU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from CTSemanticSynthLib.checkpoint import load_model
from CTSemanticSynthLib.io import Volume, read_labelmap
from CTSemanticSynthLib.preprocess import AxialOrientation, PlaneResize, condition_inputs
from CTSemanticSynthLib.synthesis import SamplingOptions, class_prior, prepare_classes, synthesize

from conftest import SAMPLE_SEG, single_thread

GOLDEN = Path(__file__).resolve().parent / "data" / "golden"
SLICES = slice(86, 88)  # two axial slices through liver, kidneys, spleen, stomach and pancreas
ONE_STEP_T = 250
SAMPLED = {
    "synth_ddim": SamplingOptions(sampler="ddim", steps=3, start_timestep=300, seed=0, batch_size=2),
    "synth_ancestral": SamplingOptions(sampler="ancestral", steps=3, start_timestep=300, seed=0, batch_size=2),
}

pytestmark = pytest.mark.usefixtures("one_thread")


def demo_classes() -> Volume:
    """Model classes of the bundled sample's golden slices (cropped before the body class is added)."""
    seg, names = read_labelmap(SAMPLE_SEG)
    crop = Volume(np.ascontiguousarray(seg.array[:, :, SLICES]), seg.affine)
    return prepare_classes(crop, names, "totalseg")[0]


def one_step_output(classes: Volume) -> np.ndarray:
    """Demo model output (eps/v and variance channels) for the first slice, at t=250 from its noised class prior."""
    model = load_model("demo")
    stack = AxialOrientation.from_affine(classes.affine).to_stack(classes.array)[:1]
    small = PlaneResize(stack.shape[1], stack.shape[2], model.image_size).to_model(
        torch.from_numpy(stack.astype(np.int64)), labels=True)
    x0 = class_prior(model.config["class_means"])[small][:, None]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((1,), ONE_STEP_T, dtype=torch.long)
    x_t = model.diffusion.q_sample(x0, t, noise)
    with torch.no_grad():
        return model.model(x_t, t, **condition_inputs(small, model.conditioning)).numpy()


def golden_outputs() -> dict[str, np.ndarray]:
    """Everything stored under Testing/data/golden, recomputed: one model evaluation and two 3-step volumes."""
    classes = demo_classes()
    model = load_model("demo")
    outputs = {"one_step": one_step_output(classes)}
    for name, options in SAMPLED.items():
        outputs[name] = synthesize(classes, model, options, device="cpu").volume.array
    return outputs


@pytest.fixture(scope="module")
def outputs() -> dict[str, np.ndarray]:
    with single_thread():
        return golden_outputs()


def test_one_step_output_matches_golden(outputs):
    expected = np.load(GOLDEN / "one_step.npy")
    assert outputs["one_step"].shape == expected.shape == (1, 2, 96, 96)
    np.testing.assert_allclose(outputs["one_step"], expected, rtol=1e-4, atol=1e-4)
    assert expected[:, 0].std() > 0.1  # the stored output is not trivial


@pytest.mark.parametrize("name", list(SAMPLED))
def test_sampled_volume_matches_golden(outputs, name):
    expected = np.load(GOLDEN / f"{name}.npy")
    actual = outputs[name]
    assert actual.dtype == expected.dtype == np.int16 and actual.shape == expected.shape
    difference = np.abs(actual.astype(np.int32) - expected)
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01, (difference.max(), (difference > 0).mean())
    body = expected > -1000
    assert body.mean() > 0.2 and expected[body].std() > 10  # a body with contrast, not a constant


def test_sampler_goldens_differ():
    """The two samplers really took different paths (guards against a golden written twice from one run)."""
    ddim, ancestral = (np.load(GOLDEN / f"{name}.npy") for name in SAMPLED)
    assert np.abs(ddim.astype(np.int32) - ancestral).max() > 5
