"""Shared fixtures: the bundled sample case and tiny randomly initialised model folders."""

import contextlib
from pathlib import Path

import pytest
import torch

from CTSemanticSynthLib.checkpoint import save_model
from CTSemanticSynthLib.diffusion import GaussianDiffusion, diffusion_defaults
from CTSemanticSynthLib.models import UNetModel

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "Resources" / "sample"
SAMPLE_SEG = SAMPLE / "seg_total.nii.gz"
SAMPLE_CT = SAMPLE / "ct.nii.gz"


def tiny_model_config(conditioning: str = "concat", image_size: int = 32) -> dict:
    """A U-Net small enough to sample a whole volume on the CPU in seconds."""
    return {"image_size": image_size, "model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
            "attention_resolutions": [2], "num_heads": 1, "conditioning": conditioning}


def randomise_zero_layers(model: torch.nn.Module) -> torch.nn.Module:
    """Give the zero-initialised tensors (output convolutions, attention projections) random values, so that every
    input reaches the output and two models agree only if their weights do."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                torch.nn.init.normal_(p, std=0.1)
    return model


def make_model_folder(folder: Path, conditioning: str = "concat", seed: int = 0, **extra) -> Path:
    """A tiny model folder; the same seed gives the same weights."""
    torch.manual_seed(seed)
    model = randomise_zero_layers(UNetModel(**tiny_model_config(conditioning)))
    diffusion = GaussianDiffusion(**diffusion_defaults())
    save_model(folder, model, diffusion, name=f"tiny-{conditioning}", extra=extra)
    return folder


def make_anatomy_model_folder(folder: Path, seed: int = 0) -> Path:
    """A tiny concat model of the anatomy class set (36 classes) with the full-range intensity mapping."""
    from CTSemanticSynthLib.intensity import FULL_RANGE
    from CTSemanticSynthLib.labels import class_set

    torch.manual_seed(seed)
    anatomy = class_set("anatomy")
    model = randomise_zero_layers(UNetModel(**tiny_model_config(), num_classes=len(anatomy.classes)))
    save_model(folder, model, GaussianDiffusion(**diffusion_defaults()), name="tiny-anatomy", classes=anatomy,
               intensity=FULL_RANGE)
    return folder


@contextlib.contextmanager
def single_thread():
    """One intra-op thread inside the block, restored after. Module fixtures that fork worker processes (slice-cache
    preparation) need it: a forked child deadlocks in a torch thread pool the parent started."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """One intra-op thread during the test: on a small shared CPU more threads make tiny models slower. Modules use
    it through ``pytestmark``, never by setting the thread count at import."""
    with single_thread():
        yield


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny concat model folder with class means, so the SDEdit-style prior start works too."""
    means = [0.0] + [0.55] * 15 + [0.45]
    return make_model_folder(tmp_path_factory.mktemp("models") / "tiny", class_means=means)
