"""The whole-volume denoiser: chunked network evaluation equals one evaluation, with or without cached features."""

import pytest
import torch

from CTSemanticSynthLib import denoiser as denoiser_module
from CTSemanticSynthLib.denoiser import VolumeDenoiser
from CTSemanticSynthLib.errors import Cancelled
from CTSemanticSynthLib.models import UNetModel
from CTSemanticSynthLib.preprocess import condition_inputs

from conftest import randomise_zero_layers, tiny_model_config

CPU = torch.device("cpu")


def _network(conditioning: str) -> UNetModel:
    torch.manual_seed(0)
    return randomise_zero_layers(UNetModel(**tiny_model_config(conditioning, image_size=16))).eval()


def _inputs(n: int = 7) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    classes = torch.randint(0, 17, (n, 16, 16), generator=g).to(torch.uint8)
    x = torch.randn((n, 1, 16, 16), generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    return classes, x, t


def _whole(network: UNetModel, conditioning: str, classes: torch.Tensor, x: torch.Tensor, t: torch.Tensor):
    kwargs = condition_inputs(classes.long(), conditioning)
    features = network.encode_condition(**kwargs)
    if features is not None:
        kwargs["cond_features"] = features
    return network(x, t, **kwargs)


@pytest.mark.parametrize("conditioning", ["concat", "mask_encoder", "edge"])
@pytest.mark.parametrize("cache_bytes", [denoiser_module.FEATURE_CACHE_BYTES, 0])
def test_chunks_give_the_whole_batch_output(monkeypatch, conditioning, cache_bytes):
    monkeypatch.setattr(denoiser_module, "FEATURE_CACHE_BYTES", cache_bytes)
    network = _network(conditioning)
    classes, x, t = _inputs()
    with torch.inference_mode():
        expected = _whole(network, conditioning, classes, x, t)
        denoiser = VolumeDenoiser(network, conditioning, classes, batch_size=3, device=CPU)
        first, again = denoiser(x, t), denoiser(x.flip(0), t.flip(0))  # a second step reuses (or rebuilds) features
    assert expected.abs().mean() > 1e-3  # the tiny model does not output zeros
    torch.testing.assert_close(first, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, _whole(network, conditioning, classes, x.flip(0), t.flip(0)), rtol=1e-4,
                               atol=1e-5)
    cached = len(denoiser._features)
    assert cached == (3 if conditioning != "concat" and cache_bytes else 0)
    assert denoiser.evaluated == 14 and bool(denoiser.finite)


def test_cancel_is_polled_before_every_chunk_and_progress_counts_slices():
    network = _network("concat")
    classes, x, t = _inputs()
    polls, seen = [], []

    def cancel() -> bool:
        polls.append(1)
        return len(polls) > 2

    denoiser = VolumeDenoiser(network, "concat", classes, batch_size=3, device=CPU, cancel=cancel,
                              progress=seen.append)
    with torch.inference_mode(), pytest.raises(Cancelled):
        denoiser(x, t)
    assert seen == [3, 6] and denoiser.evaluated == 6


def test_non_finite_output_is_flagged():
    network = _network("concat")
    classes, x, t = _inputs()
    with torch.inference_mode():
        denoiser = VolumeDenoiser(network, "concat", classes, batch_size=4, device=CPU)
        denoiser(x, t)
        assert bool(denoiser.finite)
        denoiser(x.index_fill(0, torch.tensor([1]), float("inf")), t)
    assert not bool(denoiser.finite)
