"""The whole-volume denoiser: chunked network evaluation equals one evaluation, with or without cached features."""

import dataclasses
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from CTSemanticSynthLib import denoiser as denoiser_module
from CTSemanticSynthLib.checkpoint import load_model
from CTSemanticSynthLib.cli import main
from CTSemanticSynthLib.denoiser import VolumeDenoiser, precision_autocast, to_memory_format
from CTSemanticSynthLib.errors import Cancelled, CTSynthError
from CTSemanticSynthLib.io import Volume, read_labelmap
from CTSemanticSynthLib.models import UNetModel
from CTSemanticSynthLib.preprocess import condition_inputs

from CTSemanticSynthLib.synthesis import SamplingOptions, prepare_classes, synthesize

from conftest import SAMPLE_SEG, randomise_zero_layers, tiny_model_config
from gpu_like import DeviceTrace

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
@pytest.mark.parametrize("cache_bytes", [denoiser_module.CONDITION_CACHE_BYTES, 0])
def test_chunks_give_the_whole_batch_output(monkeypatch, conditioning, cache_bytes):
    monkeypatch.setattr(denoiser_module, "CONDITION_CACHE_BYTES", cache_bytes)
    network = _network(conditioning)
    classes, x, t = _inputs()
    with torch.inference_mode():
        expected = _whole(network, conditioning, classes, x, t)
        denoiser = VolumeDenoiser(network, conditioning, classes, batch_size=3, device=CPU)
        first, again = denoiser(x, t), denoiser(x.flip(0), t.flip(0))  # a second step reuses (or rebuilds) them
    assert expected.abs().mean() > 1e-3  # the tiny model does not output zeros
    torch.testing.assert_close(first, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, _whole(network, conditioning, classes, x.flip(0), t.flip(0)), rtol=1e-4,
                               atol=1e-5)
    assert len(denoiser._conditions) == (3 if cache_bytes else 0)
    assert denoiser.evaluated == 14 and bool(denoiser.finite)


def test_conditions_are_one_hot_over_the_networks_classes():
    """A network trained on more classes than the paper's 17 (its config's ``num_classes``) gets masks that wide."""
    torch.manual_seed(0)
    network = randomise_zero_layers(UNetModel(**tiny_model_config("concat", image_size=16), num_classes=20)).eval()
    classes, x, t = _inputs()
    classes[0, :4] = 19
    with torch.inference_mode():
        out = VolumeDenoiser(network, "concat", classes, batch_size=3, device=CPU)(x, t)
        expected = network(x, t, **condition_inputs(classes.long(), "concat", 20))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("spare", [0, -1])
def test_conditions_are_cached_exactly_while_the_whole_volumes_fit_the_limit(monkeypatch, spare):
    """The limit is on the whole volume's one-hot masks and encoder features, estimated from the first chunk's
    (here: 7 slices in chunks of 3)."""
    network = _network("mask_encoder")
    classes, x, t = _inputs()
    with torch.inference_mode():
        inputs = condition_inputs(classes.long(), "mask_encoder")
        whole = _bytes(inputs.values()) + _bytes(network.encode_condition(**inputs))
        monkeypatch.setattr(denoiser_module, "CONDITION_CACHE_BYTES", whole + spare)
        denoiser = VolumeDenoiser(network, "mask_encoder", classes, batch_size=3, device=CPU)
        denoiser(x, t)
    assert len(denoiser._conditions) == (3 if spare == 0 else 0)


@pytest.mark.parametrize("conditioning", ["concat", "mask_encoder", "edge"])
@pytest.mark.parametrize("cache", [True, False], ids=["cached", "over-the-limit"])
def test_steps_copy_nothing_from_the_host_and_build_each_condition_once(monkeypatch, conditioning, cache):
    """On a GPU stand-in ('meta', whose tensors hold no data): the class slices cross to the device once, when the
    denoiser is made; each chunk's condition is built there, once while the volume's fit the cache (else every
    step, still there); no step copies from the host, computes on it or reads anything back."""
    if not cache:
        monkeypatch.setattr(denoiser_module, "CONDITION_CACHE_BYTES", 0)
    built, build = [], denoiser_module.condition_inputs

    def recorded(classes, *args, **kwargs):
        built.append(classes.device.type)
        return build(classes, *args, **kwargs)

    monkeypatch.setattr(denoiser_module, "condition_inputs", recorded)
    meta = torch.device("meta")
    classes, x, t = _inputs()
    x, t = x.to(meta), t.to(meta)
    denoiser = VolumeDenoiser(_network(conditioning).to(meta), conditioning, classes, batch_size=3, device=meta,
                              guidance=0.5)
    with torch.inference_mode(), DeviceTrace() as trace:
        for _ in range(3):
            out = denoiser(x, t)
    assert trace.to_device == [] and trace.on_host == [] and trace.syncs == []
    assert built == ["meta"] * (3 if cache else 9) and out.shape == (7, 2, 16, 16)


def test_reduced_precision_takes_channels_last_on_the_cpu_only():
    """channels_last pays for oneDNN's bf16 kernels; on a GPU (stand-in: 'meta') GroupNorm returns NCHW anyway."""
    x = torch.zeros((2, 3, 4, 4))
    assert to_memory_format(x, "bf16").is_contiguous(memory_format=torch.channels_last)
    assert to_memory_format(x, "fp32") is x
    on_gpu = x.to("meta")
    assert to_memory_format(on_gpu, "bf16") is on_gpu and to_memory_format(on_gpu, "fp16") is on_gpu


class _Layouts(torch.nn.Module):
    """A network that records whether the one-hot mask it is given is channels_last."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network, self.channels_last = network, []

    def encode_condition(self, **kwargs):
        return self.network.encode_condition(**kwargs)

    def forward(self, x, t, **kwargs):
        self.channels_last.append(kwargs["mask"].is_contiguous(memory_format=torch.channels_last))
        return self.network(x, t, **kwargs)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_denoiser_feeds_channels_last_under_reduced_precision_on_the_cpu(precision):
    """A 2.5D model's mask (its slice's and its neighbours' one-hot masks side by side) is built NCHW; a 2D model's
    one-hot mask is channels_last already."""
    classes, x, t = _inputs(4)
    torch.manual_seed(0)
    network = _Layouts(UNetModel(**tiny_model_config("concat", image_size=16), context_slices=1).eval())
    with torch.inference_mode():
        VolumeDenoiser(network, "concat", classes[:, None].repeat(1, 3, 1, 1), batch_size=2, device=CPU,
                       precision=precision)(x, t)
    assert network.channels_last == [precision == "bf16"] * 2


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                              ("fp16", torch.float16)])
def test_precision_autocasts_to_its_own_dtype(precision, dtype):
    """fp16 is not the CPU's default autocast dtype (bf16 is), nor bf16 CUDA's."""
    with precision_autocast(CPU, precision):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == dtype


def test_sample_slices_defaults_to_independent_noise_and_honours_the_agreement_threshold():
    from CTSemanticSynthLib.diffusion import GaussianDiffusion, make_sampler
    from CTSemanticSynthLib.synthesis import sample_slices

    network = _network("concat")
    classes = torch.zeros((6, 16, 16), dtype=torch.uint8)
    classes[:, 4:12, 4:12] = 6  # the same liver square on every slice: every neighbour agrees
    diffusion = GaussianDiffusion()
    sampler = make_sampler("ddim", diffusion, 3)

    def sample(**options) -> torch.Tensor:
        return sample_slices(network, "concat", sampler, classes, range(6), seed=4, device=CPU, **options)

    torch.testing.assert_close(sample(), sample(slice_correlation=0.0, guidance=0.0), rtol=0, atol=0)
    assert not torch.equal(sample(), sample(slice_correlation=0.5))
    assert not torch.equal(sample(slice_agreement=(0.8, 1.0)), sample(slice_agreement=(0.8, 0.05)))


class _MetaNoise:
    """:class:`SliceNoise`'s interface without generators ('meta' has none): standard normal draws on the device."""

    def __init__(self, seed, slice_index, correlation=0.0, device="cpu") -> None:
        self.device = device

    def draw(self, shape) -> torch.Tensor:
        return torch.randn(tuple(shape), device=self.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, device=x.device, dtype=x.dtype)


@pytest.mark.parametrize("sampler_name", ["ancestral", "ddim"])
def test_the_sampling_loop_copies_nothing_after_its_first_step_and_reads_back_only_at_the_end(monkeypatch,
                                                                                               sampler_name):
    """The whole loop (prior start, guidance, neighbour agreement with a threshold, 6 slices in chunks of 4, 4
    steps) on a GPU stand-in ('meta', which cannot be read back): every step runs, the one read-back is the
    finiteness check at the end, and nothing is copied from the host after the first step (which copies the
    schedule's tables, once per content)."""
    from CTSemanticSynthLib import synthesis
    from CTSemanticSynthLib.diffusion import GaussianDiffusion, make_sampler

    monkeypatch.setattr(synthesis, "SliceNoise", _MetaNoise)
    meta = torch.device("meta")
    classes, _, _ = _inputs(6)
    sampler, progress, copies = make_sampler(sampler_name, GaussianDiffusion(), 4, start_timestep=600), [], []
    with DeviceTrace() as trace, pytest.raises(RuntimeError, match="meta"):
        synthesis.sample_slices(_network("concat").to(meta), "concat", sampler, classes, range(6), seed=0,
                                device=meta, batch_size=4, prior=torch.zeros(17), guidance=0.5,
                                slice_agreement=(0.5, 0.3),
                                on_step=lambda fraction: (progress.append(fraction),
                                                          copies.append(len(trace.to_device))))
    assert len(progress) == 8 and progress[-1] == 1.0  # 2 chunks x 4 steps
    assert copies[2:] == [len(trace.to_device)] * 6  # from the second step on

def test_cancel_is_polled_before_every_chunk_and_progress_counts_slices():
    network = _network("concat")
    classes, x, t = _inputs()
    polls, seen = [], []

    def cancel() -> bool:
        polls.append(1)
        return len(polls) > 2

    denoiser = VolumeDenoiser(network, "concat", classes, batch_size=3, device=CPU, cancel=cancel,
                              progress=seen.append)
    with torch.inference_mode(), pytest.raises(Cancelled, match="^cancelled by the user; nothing was written$"):
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


class _OutOfMemoryAbove(torch.nn.Module):
    """A network that raises torch.OutOfMemoryError when asked for more than ``limit`` slices at once."""

    def __init__(self, network: torch.nn.Module, limit: int) -> None:
        super().__init__()
        self.network, self.limit, self.calls = network, limit, []

    def encode_condition(self, **kwargs):
        return self.network.encode_condition(**kwargs)

    def forward(self, x, t, **kwargs):
        self.calls.append(len(x))
        if len(x) > self.limit:
            raise torch.OutOfMemoryError(f"fake: {len(x)} slices > {self.limit}")
        return self.network(x, t, **kwargs)


@pytest.mark.parametrize("conditioning", ["concat", "mask_encoder"])
def test_out_of_memory_halves_the_batch_and_retries_the_chunk(monkeypatch, caplog, conditioning):
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))  # CUDA's cache only
    network = _network(conditioning)
    classes, x, t = _inputs()
    failing, sizes, seen = _OutOfMemoryAbove(network, limit=3), [], []
    with torch.inference_mode():
        expected = VolumeDenoiser(network, conditioning, classes, batch_size=3, device=CPU)(x, t)
        denoiser = VolumeDenoiser(failing, conditioning, classes, batch_size=100, device=CPU,
                                  on_batch_size=sizes.append, progress=seen.append)
        with caplog.at_level("WARNING", logger="CTSemanticSynthLib.denoiser"):
            out = denoiser(x, t)
    assert torch.equal(out, expected)  # the same volume as an uninterrupted run at the batch size that fits
    assert sizes == [7, 3] and denoiser.batch_size == 3  # at most all slices, then halved
    assert failing.calls == [7, 3, 3, 1]
    assert seen == [3, 6, 7] and denoiser.evaluated == 7  # failed chunks are not counted
    assert set(denoiser._conditions) == {(0, 3), (3, 6), (6, 7)}
    assert [r.getMessage() for r in caplog.records] == ["out of memory on cpu with 7 slices at a time: retrying with 3"]
    assert emptied == []


def test_out_of_memory_at_one_slice_is_raised():
    classes, x, t = _inputs(3)
    one_at_a_time = _OutOfMemoryAbove(_network("concat"), limit=1)
    with torch.inference_mode():
        VolumeDenoiser(one_at_a_time, "concat", classes, batch_size=1, device=CPU)(x, t)
    assert one_at_a_time.calls == [1, 1, 1]  # a batch size of 1 is taken as given
    failing = _OutOfMemoryAbove(_network("concat"), limit=0)
    denoiser = VolumeDenoiser(failing, "concat", classes, batch_size=2, device=CPU)
    with torch.inference_mode(), pytest.raises(torch.OutOfMemoryError):
        denoiser(x, t)
    assert failing.calls == [2, 1] and denoiser.batch_size == 1


class _Raising(torch.nn.Module):
    """A network whose every call raises ``error``."""

    def __init__(self, network: torch.nn.Module, error: Exception) -> None:
        super().__init__()
        self.network, self.error = network, error

    def encode_condition(self, **kwargs):
        return self.network.encode_condition(**kwargs)

    def forward(self, x, t, **kwargs):
        raise self.error


def test_a_failed_compile_is_one_line_and_other_errors_pass_through():
    from torch._dynamo.exc import BackendCompilerFailed

    def inductor():
        """A compiler backend's name."""

    classes, x, t = _inputs(3)
    failed = BackendCompilerFailed(inductor, RuntimeError("no C++ compiler"), None)
    denoiser = VolumeDenoiser(_Raising(_network("concat"), failed), "concat", classes, device=CPU)
    message = ("--compile: torch.compile failed (backend='inductor' raised:); it needs a working C++ compiler on the "
               "CPU, Triton on CUDA: install one or run without --compile")
    with torch.inference_mode(), pytest.raises(CTSynthError) as raised:
        denoiser(x, t)
    assert str(raised.value) == message
    other = VolumeDenoiser(_Raising(_network("concat"), RuntimeError("boom")), "concat", classes, device=CPU)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="^boom$"):
        other(x, t)


def test_auto_batch_is_fixed_where_free_memory_is_unknown():
    classes, x, t = _inputs(11)
    sizes = []
    with torch.inference_mode():
        VolumeDenoiser(_network("concat"), "concat", classes, batch_size="auto", device=CPU,
                       on_batch_size=sizes.append)(x, t)
        VolumeDenoiser(_network("concat"), "concat", classes[:5], batch_size="auto", device=CPU,
                       on_batch_size=sizes.append)(x[:5], t[:5])
    assert sizes == [denoiser_module.FIXED_AUTO_BATCH, 5]


class _MemoryModel(torch.nn.Module):
    """A network with torch.cuda's memory counters to match: its first call keeps ``weights`` bytes (like autocast's
    reduced-precision weight copies), each call needs ``activations`` bytes per slice while it runs, and each
    output (``output`` bytes per slice) is held until the chunk is done (guidance's second pass runs beside it)."""

    def __init__(self, network: torch.nn.Module, weights: int, activations: int, output: int) -> None:
        super().__init__()
        self.network, self.weights, self.activations, self.output = network, weights, activations, output
        self.allocated = self.peak = 5_000_000
        self.held = 0

    def encode_condition(self, **kwargs):
        return self.network.encode_condition(**kwargs)

    def forward(self, x, t, **kwargs):
        if self.weights:
            self.allocated, self.weights = self.allocated + self.weights, 0
        self.peak = max(self.peak, self.allocated + self.held + self.activations * len(x))
        self.held += self.output * len(x)
        return self.network(x, t, **kwargs)

    def reset_peak(self) -> None:  # torch.cuda.reset_peak_memory_stats: the probe's outputs are gone
        self.peak, self.held = self.allocated, 0


def _fake_cuda_memory(monkeypatch, network: _MemoryModel, free: int) -> list:
    """``free_memory`` and torch.cuda's memory counters replaced by ``network``'s; returns the devices asked about."""
    asked = []

    def asking(value):
        def counter(device):
            asked.append(device)
            return value()
        return counter

    monkeypatch.setattr(denoiser_module, "free_memory", asking(lambda: free))
    monkeypatch.setattr(torch.cuda, "synchronize", asking(lambda: None))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", asking(network.reset_peak))
    monkeypatch.setattr(torch.cuda, "memory_allocated", asking(lambda: network.allocated))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", asking(lambda: network.peak))
    return asked


def _mib(n: float) -> float:
    return n / 2**20


@pytest.mark.parametrize("conditioning", ["concat", "mask_encoder"])
@pytest.mark.parametrize("guidance", [0.0, 1.0])
def test_auto_batch_plans_with_the_cost_of_one_more_slice(monkeypatch, caplog, conditioning, guidance):
    """The CUDA planning rule with the memory counters replaced, on a GPU stand-in ('meta': a probe made on the host
    would fail): a slice costs the difference of the 1- and the 2-slice probe (its activations, plus its first output
    under guidance, held during the second pass); the weight copies are paid once. Free 600 MB -> (480 MB - 50 MB
    weights - condition cache - the volume's outputs, twice) / cost, at most all slices; the plan is logged."""
    free, weights, activations, output = 600_000_000, 50_000_000, 2_000_000, 1_000_000
    meta = torch.device("meta")
    network = _MemoryModel(_network(conditioning), weights, activations, output).to(meta)
    asked = _fake_cuda_memory(monkeypatch, network, free)
    classes = torch.randint(0, 17, (1000, 16, 16), generator=torch.Generator().manual_seed(2)).to(torch.uint8)
    denoiser = VolumeDenoiser(network, conditioning, classes, batch_size="auto", device=meta, guidance=guidance)
    with torch.inference_mode(), caplog.at_level("INFO", logger="CTSemanticSynthLib.denoiser"):
        batch = denoiser.measured_batch_size()
        inputs = condition_inputs(classes.to(meta).long(), conditioning)
        features = network.encode_condition(**inputs)
    cache = _bytes(inputs.values()) + (0 if features is None else _bytes(features))
    outputs = 2 * 1000 * 2 * 16 * 16 * 4  # (eps, variance) float32 per slice: the chunks' and their join
    per_slice = activations + (output if guidance else 0)
    assert batch == int((free * denoiser_module.MEMORY_FRACTION - weights - cache - outputs) / per_slice) >= 1
    assert denoiser._conditions == {}  # the probes' conditions are not kept
    assert set(asked) == {meta}  # the counters of the denoiser's device, not the current one
    assert [r.getMessage() for r in caplog.records] == [
        f"batch size auto: {batch} of 1000 slices ({_mib(free):.0f} MiB free x 0.80; once {_mib(weights):.0f} MiB, "
        f"per slice {_mib(per_slice):.1f} MiB, condition cache {_mib(cache):.0f} MiB, outputs {_mib(outputs):.0f} MiB)"]
    denoiser.classes = denoiser.classes[:30]
    with torch.inference_mode():
        assert denoiser.measured_batch_size() == 30  # at most all slices


@pytest.mark.parametrize("slices, free, activations, cache_limit", [
    (1, 600_000_000, 2_000_000, None),  # one slice: one probe, one slice
    (20, 60_000_000, 2_000_000, None),  # less free memory than the fixed cost: still one slice
    (20, 600_000_000, 0, None),  # the 2-slice probe peaks no higher: it is charged half its peak a slice
    (20, 70_352_400, 2_000_000, 0),  # conditions over the cache limit: none cached, none planned for
])
def test_auto_batch_plan_edge_cases(monkeypatch, slices, free, activations, cache_limit):
    weights = 50_000_000
    if cache_limit is not None:
        monkeypatch.setattr(denoiser_module, "CONDITION_CACHE_BYTES", cache_limit)
    network = _MemoryModel(_network("concat"), weights, activations, 0)
    _fake_cuda_memory(monkeypatch, network, free)
    classes, _, _ = _inputs(slices)
    with torch.inference_mode():
        batch = VolumeDenoiser(network, "concat", classes, batch_size="auto", device=CPU).measured_batch_size()
    budget = free * denoiser_module.MEMORY_FRACTION - 2 * slices * 2 * 16 * 16 * 4  # less the outputs
    if slices == 1 or budget < weights + activations:
        assert batch == 1
    elif activations == 0:
        assert batch == int((budget - weights / 2) / (weights / 2)) == 18
    else:  # no cache planned: 6.2 MB for slices (the 20 slices' conditions, were they cached, would leave 2)
        assert batch == int((budget - weights) / activations) == 3


@pytest.fixture(scope="module")
def slab():
    """Twelve axial slices of the sample's model classes."""
    seg, names = read_labelmap(SAMPLE_SEG)
    classes, _ = prepare_classes(seg, names, "totalseg")
    return Volume(np.ascontiguousarray(classes.array[:, :, 50:62]), classes.affine)


def _slab_file(folder) -> str:
    """The sample segmentation's slices 50-61 as a NIfTI file in ``folder``."""
    image, seg = nib.load(SAMPLE_SEG), folder / "seg.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[:, :, 50:62], image.affine), seg)
    return str(seg)


def test_synthesize_survives_out_of_memory_and_records_the_batch_used(tiny_model, slab, caplog):
    options = SamplingOptions(sampler="ddim", steps=2, start_timestep=300, seed=3, batch_size=12)
    loaded = load_model(tiny_model)
    uninterrupted = synthesize(slab, loaded, dataclasses.replace(options, batch_size=3), device="cpu")
    failing = dataclasses.replace(loaded, model=_OutOfMemoryAbove(loaded.model, limit=3))
    with caplog.at_level("WARNING", logger="CTSemanticSynthLib.denoiser"):
        result = synthesize(slab, failing, options, device="cpu")
    assert np.array_equal(result.volume.array, uninterrupted.volume.array)
    assert result.provenance["batch_size_used"] == 3 and result.provenance["options"]["batch_size"] == 12
    assert len(caplog.records) == 2  # 12 -> 6 -> 3, one line each
    never = dataclasses.replace(loaded, model=_OutOfMemoryAbove(loaded.model, limit=0))
    with pytest.raises(CTSynthError, match="out of memory on cpu even with batch size 1"):
        synthesize(slab, never, options, device="cpu")


def test_cli_batch_size_auto_is_the_default_and_recorded(tiny_model, tmp_path, capsys):
    seg, out = _slab_file(tmp_path), tmp_path / "syn.nii.gz"
    code = main(["synth", "--seg", seg, "--out", str(out), "--model", str(tiny_model), "--steps", "2",
                 "--device", "cpu", "--labels", "totalseg", "-q"])
    record = json.loads(out.with_name("syn.json").read_text())
    capsys.readouterr()
    assert code == 0 and record["options"]["batch_size"] == "auto"
    assert record["batch_size_used"] == denoiser_module.FIXED_AUTO_BATCH and record["options"]["compile"] is False
    for bad in ("two", "0", "-3", "1.5"):
        code = main(["synth", "--seg", seg, "--out", str(tmp_path / "bad.nii.gz"), "--model",
                     str(tiny_model), "--batch-size", bad, "--device", "cpu", "-q"])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("ctsynth: error:") and len(err.strip().splitlines()) == 1
        assert "--batch-size" in err and "Traceback" not in err
    assert not (tmp_path / "bad.nii.gz").exists()


@pytest.mark.slow
def test_compile_gives_the_same_volume_within_one_hu(tiny_model, slab):
    """``compile`` (torch.compile of the network; minutes on a loaded 2-core CPU, hence slow): fused kernels round
    differently (network outputs agree to ~1e-5), so a voxel may land on the other side of a HU rounding step."""
    options = SamplingOptions(sampler="ddim", steps=2, start_timestep=300, seed=3, batch_size=6)
    loaded = load_model(tiny_model)
    eager = synthesize(slab, loaded, options, device="cpu")
    compiled = synthesize(slab, loaded, dataclasses.replace(options, compile=True), device="cpu")
    difference = np.abs(compiled.volume.array.astype(int) - eager.volume.array)
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01
    assert compiled.provenance["options"]["compile"] is True


@pytest.mark.slow
def test_compile_without_a_compiler_is_one_line(tiny_model, tmp_path):
    seg = _slab_file(tmp_path)
    env = {**os.environ, "CXX": str(tmp_path / "no-such-g++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "CTSemanticSynthLib.cli", "synth", "--seg", seg, "--out",
                             str(tmp_path / "syn.nii.gz"), "--model", str(tiny_model), "--steps", "1", "--compile",
                             "--labels", "totalseg",
                             "--device", "cpu", "-q"], capture_output=True, text=True, encoding="utf-8", env=env,
                            timeout=900)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.startswith("ctsynth: error: --compile: torch.compile failed")
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "syn.nii.gz").exists()
