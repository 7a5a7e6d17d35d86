"""The GAN baselines (Pix2Pix, SPADE, OASIS): network shapes, a few training iterations, exact resume, export and
``ctsynth synth`` of a ``kind: generator`` model folder, their losses, and clear errors for broken model folders and
bad training options."""

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from CTSemanticSynthLib.checkpoint import CONFIG_NAME, load_model, save_model
from CTSemanticSynthLib.cli import main as ctsynth
from CTSemanticSynthLib.errors import CheckpointError
from CTSemanticSynthLib.labels import NUM_CLASSES
from CTSemanticSynthLib.factory import create_generator
from CTSemanticSynthLib.preprocess import one_hot

from conftest import REPO, SAMPLE_SEG, single_thread
from gpu_like import DeviceTrace

from training import prepare, train_gan  # noqa: E402
from training.baselines.discriminators import MultiscaleDiscriminator, OASISDiscriminator, PatchGAN  # noqa: E402
from training.baselines.losses import class_balance, labelmix_mask, oasis_real  # noqa: E402
from test_training import _amos_folder, _one_line_error  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
METHODS = ("pix2pix", "spade", "oasis")
TINY = ["--gen-channels", "2", "--disc-channels", "4", "--hidden-channels", "8", "--batch-size", "2",
        "--log-every", "1", "--device", "cpu", "--precision", "fp32"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A 32-px slice cache of two small cases cut from the sample."""
    root = tmp_path_factory.mktemp("gan")
    _amos_folder(root / "amos")
    with single_thread():  # prepare forks workers
        assert prepare.main(["--amos", str(root / "amos"), "--out", str(root / "cache"), "--size", "32",
                             "--workers", "1", "--convention", "totalseg"]) == 0
    return root / "cache"


def _train(cache: Path, out: Path, method: str, *extra) -> int:
    return train_gan.main(["--method", method, "--data", str(cache), "--out", str(out), *TINY, *map(str, extra)])


def _checkpoint(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)


# --- networks -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_generator_maps_a_class_map_to_one_channel_in_range(method):
    torch.manual_seed(0)
    generator = create_generator({"method": method, "image_size": 32, "channels": 2,
                                  **({} if method == "pix2pix" else {"hidden_channels": 8})}).eval()
    classes = torch.randint(0, NUM_CLASSES, (3, 32, 32))
    noise = torch.randn(3, generator.noise_channels) if generator.noise_channels else None
    with torch.no_grad():
        out = generator(one_hot(classes), noise)
        again = generator(one_hot(classes[:1]), None if noise is None else noise[:1])
    assert out.shape == (3, 1, 32, 32) and out.abs().max() <= 1 and out.std() > 0
    torch.testing.assert_close(again, out[:1], rtol=1e-4, atol=1e-5)  # a slice does not depend on its batch
    other = torch.roll(classes, 5, dims=1)
    with torch.no_grad():
        assert not torch.allclose(generator(one_hot(other), noise), out)  # the output follows the class map


def test_oasis_generator_needs_its_noise_and_uses_it():
    generator = create_generator({"method": "oasis", "image_size": 32, "channels": 2, "hidden_channels": 8}).eval()
    mask = one_hot(torch.zeros(2, 32, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="noise"):
        generator(mask)
    with torch.no_grad():
        a, b = generator(mask, torch.randn(2, 64)), generator(mask, torch.randn(2, 64))
    assert not torch.allclose(a, b)


def test_discriminator_shapes():
    mask, image = one_hot(torch.zeros(2, 256, 256, dtype=torch.long)), torch.zeros(2, 1, 256, 256)
    assert PatchGAN(NUM_CLASSES + 1, 2)(mask, image).shape == (2, 1, 30, 30)  # 70 x 70 patches at 256 px
    scales = MultiscaleDiscriminator(NUM_CLASSES + 1, 2)(mask[..., :64, :64], image[..., :64, :64])
    assert len(scales) == 2 and all(len(s) == 5 for s in scales)
    assert [s[-1].shape for s in scales] == [(2, 1, 11, 11), (2, 1, 7, 7)]  # the second sees half the resolution
    segmenter = OASISDiscriminator(1, NUM_CLASSES, 64, 2)
    assert len(segmenter.down) == 4 and segmenter(image[..., :64, :64]).shape == (2, NUM_CLASSES + 1, 64, 64)


def test_class_balance_weights_each_present_class_equally():
    classes = torch.zeros(1, 10, 10, dtype=torch.long)
    classes[0, :2] = 3  # 20 pixels of class 3, 80 of class 0
    weights = class_balance(classes, NUM_CLASSES)
    assert weights[classes == 3].sum() == pytest.approx(weights[classes == 0].sum())
    assert weights.mean() == pytest.approx(1.0)


def test_labelmix_takes_every_class_whole():
    torch.manual_seed(0)
    classes = torch.randint(0, 6, (2, 16, 16))
    mask = labelmix_mask(classes, 6)[:, 0]
    for c in range(6):
        assert mask[classes == c].unique().numel() == 1
    assert mask.unique().numel() == 2


def test_oasis_losses_never_wait_for_the_gpu():
    """The class-balanced loss and LabelMix's coins run every discriminator step: no bincount (its size depends on
    the data), no ``int(classes.max())``, nothing read back on the host."""
    classes = torch.randint(0, NUM_CLASSES, (2, 16, 16), generator=torch.Generator().manual_seed(0))
    logits = torch.randn(2, NUM_CLASSES + 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with DeviceTrace() as trace:
        loss = oasis_real(logits, classes)
        mask = labelmix_mask(classes, NUM_CLASSES)
    assert trace.syncs == []
    assert torch.isfinite(loss) and mask.shape == (2, 1, 16, 16)


# --- training, resume, export, synthesis ----------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_train_resume_export_and_synthesize(cache, tmp_path, capsys, method):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert _train(cache, whole, method, "--iterations", 4, "--sample-every", 4) == 0
    assert _train(cache, parts, method, "--iterations", 2, "--sample-every", 0) == 0
    first = _checkpoint(parts)
    assert _train(cache, parts, method, "--iterations", 4, "--sample-every", 0, "--resume") == 0
    a, b = _checkpoint(whole), _checkpoint(parts)
    for key in ("model", "ema", "disc"):
        different = [name for name in a[key] if not torch.equal(a[key][name], b[key][name])]
        assert not different, f"{key}: {different[:3]}"
        changed = [name for name in a[key] if a[key][name].is_floating_point()
                   and not torch.equal(a[key][name], first[key][name])]
        assert changed, f"{key} did not change between steps 2 and 4"
    for out in (whole, parts):
        with open(out / "log.csv", newline="") as f:
            log = list(csv.DictReader(f))
        assert [int(r["step"]) for r in log] == [1, 2, 3, 4]
        assert all(math.isfinite(float(r[k])) for r in log for k in ("g_loss", "d_loss"))
    assert [p.name for p in (whole / "samples").glob("*.png")] == ["step_0000004.png"]

    loaded = load_model(whole / "model")
    assert loaded.kind == "generator" and loaded.diffusion is None and loaded.conditioning == method
    assert loaded.config["training"]["iterations"] == 4 and "diffusion" not in loaded.config
    seg = cache.parent / "amos" / "labelsTr" / "amos_0001.nii.gz"
    syn = tmp_path / "syn.nii.gz"
    capsys.readouterr()
    code = ctsynth(["synth", "--seg", str(seg), "--out", str(syn), "--model", str(whole / "model"), "--labels",
                    "totalseg", "--device", "cpu", "--steps", "7", "-q"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.count("are ignored") == 1 and "one-pass" in err
    result, source = nib.load(syn), nib.load(seg)
    assert result.shape == source.shape and result.get_data_dtype() == np.int16
    np.testing.assert_allclose(result.affine, source.affine, atol=1e-5)
    volume, labels = np.asarray(result.dataobj), np.asarray(source.dataobj)
    assert np.unique(volume[labels > 0]).size > 1  # not a constant (4 iterations from a 0.02-gain init: faint)
    assert (volume[labels == 0] >= -1000).all()
    record = json.loads(syn.with_name("syn.json").read_text())
    assert record["kind"] == "generator" and record["conditioning"] == method
    assert record["sampler"] == {"sampler": "one-pass"} and record["options"]["steps"] == 1
    descrip = result.header["descrip"].tobytes().decode().rstrip("\x00")
    assert descrip.endswith(" one-pass seed0"), descrip  # not "one-pass1": a generator takes no steps


def test_epochs_set_the_iterations(cache, tmp_path):
    assert _train(cache, tmp_path / "run", "pix2pix", "--epochs", "0.1", "--sample-every", 0) == 0
    train_slices = len(list(csv.DictReader(open(cache / "manifest.csv"))))  # upper bound: train + test rows
    (row,) = [r for r in csv.DictReader(open(tmp_path / "run" / "log.csv"))][-1:]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert int(row["step"]) == saved["iterations"] <= math.ceil(0.1 * train_slices / 2)


def test_oasis_synthesis_depends_on_the_seed_only(cache, tmp_path, capsys):
    assert _train(cache, tmp_path / "run", "oasis", "--iterations", 1, "--sample-every", 0) == 0
    seg = cache.parent / "amos" / "labelsTr" / "amos_0001.nii.gz"
    volumes = {}
    for name, flags in (("a", ["--seed", "1"]), ("b", ["--seed", "1", "--batch-size", "3"]), ("c", ["--seed", "2"])):
        out = tmp_path / f"{name}.nii.gz"
        assert ctsynth(["synth", "--seg", str(seg), "--out", str(out), "--model", str(tmp_path / "run" / "model"),
                        "--labels", "totalseg", "--device", "cpu", "-q", *flags]) == 0, capsys.readouterr().err
        volumes[name] = np.asarray(nib.load(out).dataobj)
    np.testing.assert_array_equal(volumes["a"], volumes["b"])  # per-slice noise: the batch does not matter
    assert not np.array_equal(volumes["a"], volumes["c"])


# --- clear errors ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generator_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gen") / "pix2pix"
    generator = create_generator({"method": "pix2pix", "image_size": 32, "channels": 2})
    save_model(folder, generator, None, name="tiny-pix2pix")
    return folder


def _edit_config(src: Path, dst: Path, drop: tuple[str, ...] = (), **model) -> Path:
    """A copy of a model folder whose config.json's ``model`` gets ``model`` and loses the keys ``drop``."""
    dst.mkdir()
    (dst / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    config = json.loads((src / CONFIG_NAME).read_text())
    config["model"] = {k: v for k, v in config["model"].items() if k not in drop} | model
    (dst / CONFIG_NAME).write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("change, drop, needle", [
    ({"method": "spade", "init_size": 8, "hidden_channels": 8, "noise_channels": 0}, ("dropout",),
     "do not match its config.json"),
    ({"channels": 4}, (), "do not match its config.json"),
    ({"method": "cyclegan"}, (), "model.method"),
    ({}, ("method",), "field 'model.method' is missing"),
    ({"method": 3}, (), "field 'model.method' must be a string"),
    ({"dropout": 2}, (), "dropout must be a number in [0, 1)"),
    ({}, ("channels",), "field 'model.channels' is missing"),
])
def test_error_mismatched_generator_folder_is_one_line(generator_folder, tmp_path, capsys, change, drop, needle):
    broken = _edit_config(generator_folder, tmp_path / "broken", drop, **change)
    with pytest.raises(CheckpointError, match=re.escape(needle)):
        load_model(broken)
    code = ctsynth(["synth", "--seg", str(SAMPLE_SEG), "--out", str(tmp_path / "x.nii.gz"), "--model", str(broken),
                    "--labels", "totalseg", "--device", "cpu"])
    _one_line_error(capsys, code, needle)
    assert not (tmp_path / "x.nii.gz").exists()


@pytest.mark.parametrize("kind", ["generator", "diffusion"])
def test_a_model_folder_for_another_class_set_is_one_line(tmp_path, capsys, kind):
    """Config and weights agree (both for 20 classes), but the model's class set has 17."""
    from CTSemanticSynthLib.diffusion import GaussianDiffusion, diffusion_defaults
    from CTSemanticSynthLib.models import UNetModel
    from conftest import tiny_model_config

    folder = tmp_path / kind
    if kind == "generator":
        save_model(folder, create_generator({"method": "pix2pix", "image_size": 32, "channels": 2,
                                             "num_classes": NUM_CLASSES + 3}), None, name="g20")
    else:
        save_model(folder, UNetModel(**tiny_model_config() | {"num_classes": NUM_CLASSES + 3}),
                   GaussianDiffusion(**diffusion_defaults()), name="d20")
    needle = f"field 'model.num_classes' is {NUM_CLASSES + 3}, but the model's classes are {NUM_CLASSES}"
    with pytest.raises(CheckpointError, match=re.escape(needle)):
        load_model(folder)
    code = ctsynth(["synth", "--seg", str(SAMPLE_SEG), "--out", str(tmp_path / "x.nii.gz"), "--model", str(folder),
                    "--labels", "totalseg", "--device", "cpu", "--steps", "2"])
    _one_line_error(capsys, code, needle)
    assert not (tmp_path / "x.nii.gz").exists()


def test_a_generator_cannot_regenerate_a_region(generator_folder):
    """synthesize() itself says why (the command line refuses it before reading anything)."""
    from CTSemanticSynthLib.errors import InputError
    from CTSemanticSynthLib.io import Volume
    from CTSemanticSynthLib.synthesis import synthesize

    classes = np.full((32, 32, 2), 16, np.uint8)
    keep, region = Volume(np.zeros(classes.shape, np.int16), np.eye(4)), Volume(classes // 16, np.eye(4))
    with pytest.raises(InputError, match="^model 'tiny-pix2pix' is a one-pass generator: it cannot regenerate a "
                                         r"region \(it has no steps to hold the kept CT in\); use a diffusion model$"):
        synthesize(Volume(classes, np.eye(4)), load_model(generator_folder), device="cpu", keep=keep, region=region)


@pytest.mark.parametrize("batch_size", [2, 1, "auto"])
def test_a_generator_records_the_batch_size_it_ran_with(generator_folder, batch_size):
    from CTSemanticSynthLib.denoiser import FIXED_AUTO_BATCH
    from CTSemanticSynthLib.io import Volume
    from CTSemanticSynthLib.synthesis import SamplingOptions, synthesize

    classes = np.zeros((32, 32, 5), np.uint8)
    classes[4:28, 4:28] = 16  # body on every slice
    classes[10:20, 10:20, 1:4] = 6  # liver
    steps, polls = [], []
    options = SamplingOptions(batch_size=batch_size, eta=0.3, slice_correlation=0.5, slice_agreement=0.4,
                              slice_agreement_below=0.5)  # ignored by a generator
    result = synthesize(Volume(classes, np.eye(4)), load_model(generator_folder), options, device="cpu",
                        progress=lambda done, total: steps.append(done / total), cancel=lambda: polls.append(1) and False)
    expected = FIXED_AUTO_BATCH if batch_size == "auto" else batch_size
    assert result.provenance["batch_size_used"] == expected and result.provenance["options"]["sampler"] == "one-pass"
    assert result.provenance["sampler"] == {"sampler": "one-pass"} and result.provenance["kind"] == "generator"
    recorded = result.provenance["options"]
    assert (recorded["steps"], recorded["eta"], recorded["slice_correlation"]) == (1, 0.0, 0.0)
    assert (recorded["slice_agreement"], recorded["slice_agreement_below"], recorded["guidance"]) == (0.0, 1.0, 0.0)
    assert steps[-1] == 1.0 and len(polls) == len(steps) >= 1  # progress and cancel polls per batch


class _Constant(torch.nn.Module):
    """A stand-in one-pass generator that outputs ``value`` everywhere (NaN allowed)."""

    noise_channels = 0

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, mask: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        return torch.full((mask.shape[0], 1, *mask.shape[-2:]), self.value, device=mask.device)


def test_generation_reports_progress_per_batch_and_stops_on_cancel_or_nan():
    from CTSemanticSynthLib.errors import Cancelled, CTSynthError
    from CTSemanticSynthLib.synthesis import generate_slices

    classes, cpu = torch.zeros((5, 8, 8), dtype=torch.uint8), torch.device("cpu")
    steps: list[float] = []
    generate_slices(_Constant(0.0), classes, range(5), seed=0, device=cpu, batch_size=2, on_step=steps.append)
    assert steps == [0.4, 0.8, 1.0]
    polls = iter([False, True])
    with pytest.raises(Cancelled) as cancelled:
        generate_slices(_Constant(0.0), classes, range(5), seed=0, device=cpu, batch_size=2,
                        cancel=lambda: next(polls))
    assert str(cancelled.value) == "cancelled by the user; nothing was written"
    with pytest.raises(CTSynthError) as broken:
        generate_slices(_Constant(float("nan")), classes, range(5), seed=0, device=cpu)
    assert str(broken.value).startswith("the generator's output is NaN or infinite; nothing was written")


def test_generation_in_bf16_runs_the_generator_under_autocast():
    from CTSemanticSynthLib.synthesis import generate_slices

    seen = []

    class Recording(_Constant):
        def forward(self, mask: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
            seen.append(torch.is_autocast_enabled("cpu"))
            return super().forward(mask, noise)

    classes = torch.zeros((2, 8, 8), dtype=torch.uint8)
    generate_slices(Recording(0.0), classes, range(2), seed=0, device=torch.device("cpu"), precision="bf16")
    generate_slices(Recording(0.0), classes, range(2), seed=0, device=torch.device("cpu"))
    assert seen == [True, False]


@pytest.mark.parametrize("value, expected", [(3.0, 1.0), (-3.0, 0.0), (0.5, 0.75)])
def test_generator_output_is_clamped_to_the_window_and_mapped_to_0_1(value, expected):
    from CTSemanticSynthLib.synthesis import generate_slices

    out = generate_slices(_Constant(value), torch.zeros((2, 8, 8), dtype=torch.uint8), [0, 1], seed=0,
                          device=torch.device("cpu"))
    torch.testing.assert_close(out, torch.full((2, 8, 8), expected))


def test_error_unknown_kind_and_corrupt_weights(generator_folder, tmp_path):
    broken = _edit_config(generator_folder, tmp_path / "kind")
    config = json.loads((broken / CONFIG_NAME).read_text())
    (broken / CONFIG_NAME).write_text(json.dumps(config | {"kind": "gan"}))
    with pytest.raises(CheckpointError, match="field 'kind' must be one of diffusion, generator"):
        load_model(broken)
    corrupt = _edit_config(generator_folder, tmp_path / "corrupt")
    data = bytearray((corrupt / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (corrupt / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt or was replaced"):
        load_model(corrupt)


@pytest.mark.parametrize("flags, needle", [
    (["--method", "cyclegan"], "--method 'cyclegan'"),
    (["--method", "spade", "--noise-channels", "8"], "--noise-channels is for oasis"),
    (["--method", "oasis", "--noise-channels", "0"], "needs noise"),
    (["--lr-d", "0"], "--lr-d 0"),
    (["--beta1", "1"], "--beta1 1"),
    (["--epochs", "0"], "--epochs 0"),
    (["--lambda-l1", "-1"], "--lambda-l1 -1"),
])
def test_error_bad_gan_flag_is_one_line_and_makes_no_folder(cache, tmp_path, capsys, flags, needle):
    code = train_gan.main(["--data", str(cache), "--out", str(tmp_path / "run"), *flags])
    _one_line_error(capsys, code, needle)
    assert not (tmp_path / "run").exists()


def test_method_defaults_are_the_published_ones():
    pix2pix, spade, oasis = (train_gan.gan_defaults(m) for m in METHODS)
    assert (pix2pix["lr"], pix2pix["lr_d"], pix2pix["beta1"], pix2pix["lambda_l1"]) == (5e-4, 5e-4, 0.5, 100.0)
    assert (spade["lr"], spade["lr_d"], spade["beta1"], spade["lambda_fm"]) == (5e-4, 5e-4, 0.0, 10.0)
    assert (oasis["lr"], oasis["lr_d"], oasis["noise_channels"], oasis["ema_rate"]) == (1e-4, 4e-4, 64, 0.9999)
    assert all(d["epochs"] == 300 and d["batch_size"] == 16 for d in (pix2pix, spade, oasis))


# --- configs and evaluation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_shipped_config_selects_the_method_and_its_defaults(method):
    config, _ = train_gan.parse_gan_config(["--config", str(REPO / "training" / "configs" / f"{method}.yaml")])
    assert config == train_gan.gan_defaults(method) | {"data": "cache/amos256", "out": f"runs/{method}",
                                                       "name": method, "checkpoint_every": 1000, "sample_every": 5000}


def test_evaluate_puts_generators_and_diffusion_models_in_one_table(cache, tmp_path, tiny_model):
    from training.evaluate import main as evaluate_main

    assert _train(cache, tmp_path / "run", "spade", "--iterations", 1, "--sample-every", 0) == 0
    out = tmp_path / "eval"
    assert evaluate_main(["--model", f"spade={tmp_path / 'run' / 'model'}", "--model", f"tiny={tiny_model}",
                          "--data", str(cache), "--out", str(out), "--max-slices", "3", "--steps", "2", "--no-fid",
                          "--device", "cpu"]) == 0
    rows = {r["method"]: r for r in csv.DictReader((out / "results.csv").open()) if r["source"] == "measured"}
    assert rows["spade"]["paper_method"] == "SPADE" and rows["spade"]["ssim_paper"] == "0.594"
    assert rows["tiny"]["paper_method"] == "Conditional DDPM"
    assert all(0 < float(r["ssim"]) < 1 for r in rows.values())
    models = {m["name"]: m for m in json.loads((out / "results.json").read_text())["models"]}
    assert models["spade"]["kind"] == "generator" and models["tiny"]["kind"] == "diffusion"
    assert "| spade | SPADE | 3 |" in (out / "results.md").read_text()


def test_batch_runs_a_generator_and_says_the_sampler_is_ignored(cache, tmp_path, capsys):
    assert _train(cache, tmp_path / "run", "pix2pix", "--iterations", 1, "--sample-every", 0) == 0
    capsys.readouterr()
    segs = cache.parent / "amos" / "labelsTr"
    listing = tmp_path / "segs.txt"
    listing.write_text(f"{segs / 'amos_0001.nii.gz'}\n")
    code = ctsynth(["batch", "--segs", str(listing), "--out", str(tmp_path / "out"), "--model",
                    str(tmp_path / "run" / "model"), "--labels", "totalseg", "--device", "cpu", "-q"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.count("are ignored") == 1
    (volume,) = (tmp_path / "out").rglob("*.nii.gz")
    assert nib.load(volume).shape == nib.load(segs / "amos_0001.nii.gz").shape


def test_torchrun_two_cpu_processes_resume_exactly(cache, tmp_path):
    """DistributedDataParallel over gloo for the generator and the discriminator (OASIS: noise, LabelMix, EMA):
    one log and one export (rank 0), the batch split across ranks, and a run stopped at step 2 and resumed equal
    to an uninterrupted one."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    for out, argv in ((whole, [4]), (parts, [2]), (parts, [4, "--resume"])):
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
             "training.train_gan", "--method", "oasis", "--data", str(cache), "--out", str(out), *TINY,
             "--threads", "1", "--sample-every", "0", "--iterations", *map(str, argv)],
            capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300, cwd=REPO)
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stderr.count("train_gan: exported") == 1
    card = load_model(whole / "model").config["training"]
    assert card["hardware"].endswith("x2") and card["batch_per_rank"] == 1
    a, b = _checkpoint(whole), _checkpoint(parts)
    for key in ("model", "ema", "disc"):
        different = [name for name in a[key] if not torch.equal(a[key][name], b[key][name])]
        assert not different, f"{key}: {different[:3]}"


def test_slicer_panel_summarises_a_generator(generator_folder, monkeypatch):
    pytest.importorskip("slicer", reason="slicer-core is not installed")
    monkeypatch.syspath_prepend(str(REPO / "CTSemanticSynth"))
    from CTSemanticSynthSlicerLib.logic import SynthesisLogic

    config = json.loads((generator_folder / CONFIG_NAME).read_text())
    assert SynthesisLogic.modelSummary(config).startswith("tiny-pix2pix (pix2pix, 32x32)\nclass set: paper (17 classes)")
