"""The SDM baseline (semantic diffusion model): network shapes, SPADE conditioning in the decoder only, training with
label dropout, exact resume, export + ``ctsynth synth``, and classifier-free guidance."""

import csv
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import test_training
from CTSemanticSynthLib.checkpoint import load_model, save_model
from CTSemanticSynthLib.cli import main as ctsynth
from CTSemanticSynthLib.denoiser import VolumeDenoiser
from CTSemanticSynthLib.diffusion import GaussianDiffusion, diffusion_defaults
from CTSemanticSynthLib.factory import create_model
from CTSemanticSynthLib.models import UNetModel
from CTSemanticSynthLib.models.sdm import SDMModel
from CTSemanticSynthLib.preprocess import condition_inputs, one_hot
from CTSemanticSynthLib.provenance import read_record, sidecar_path
from CTSemanticSynthLib.synthesis import evaluation_flops

from conftest import randomise_zero_layers, tiny_model_config
from test_training import _train, amos_cache  # noqa: F401  (the module's slice-cache fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

SDM = {"architecture": "sdm", "conditioning": "spade"}
SDM_FLAGS = ["--architecture", "sdm", "--conditioning", "spade"]


def _sdm(**extra) -> SDMModel:
    torch.manual_seed(0)
    return randomise_zero_layers(create_model(tiny_model_config(**{"image_size": 16}) | SDM | extra)).eval()


def _classes(seed: int, n: int = 2, size: int = 16) -> torch.Tensor:
    return torch.randint(0, 17, (n, size, size), generator=torch.Generator().manual_seed(seed))


# --- the network ----------------------------------------------------------------------------------------------


def test_shapes_and_config_round_trip():
    model = _sdm()
    assert isinstance(model, SDMModel)
    x = torch.randn(3, 1, 16, 16)
    out = model(x, torch.tensor([0, 10, 999]), one_hot(_classes(0, 3)).float())
    assert out.shape == (3, 2, 16, 16) and torch.isfinite(out).all()
    assert model(x, torch.tensor(5), one_hot(_classes(0, 3)).float()).shape == (3, 2, 16, 16)  # scalar timestep
    rebuilt = create_model(model.config)
    assert type(rebuilt) is SDMModel and rebuilt.state_dict().keys() == model.state_dict().keys()
    assert model.encode_condition(one_hot(_classes(0)).float()) is None


@pytest.mark.parametrize("config, needle", [
    (SDM | {"conditioning": "concat"}, "conditioning must be one of spade for architecture sdm"),
    ({"architecture": "unet", "conditioning": "spade"}, "for architecture unet"),
    ({"architecture": "gan"}, "architecture must be one of unet, sdm"),
    (SDM | {"guidance_scale": 1.5}, "guidance_scale > 0 needs label_dropout > 0"),
    (SDM | {"label_dropout": 1.0}, "label_dropout must be a number in [0, 1)"),
])
def test_config_errors_name_the_key(config, needle):
    with pytest.raises(ValueError) as info:
        create_model(tiny_model_config() | config)
    assert needle in str(info.value)


def test_unet_refuses_an_sdm_config_and_sdm_a_unet_config():
    with pytest.raises(ValueError, match="UNetModel builds architecture 'unet', not 'sdm'"):
        UNetModel(**tiny_model_config() | SDM)
    with pytest.raises(ValueError, match="SDMModel builds architecture 'sdm', not 'unet'"):
        SDMModel(**tiny_model_config())


def test_bad_inputs_raise():
    """The SDM checks a call's image, timesteps and mask as the U-Net does (one mask: no 2.5D neighbours)."""
    model, x, t = _sdm(), torch.randn(2, 1, 16, 16), torch.tensor([1, 2])
    mask = one_hot(_classes(0)).float()
    with pytest.raises(ValueError, match=r"^mask must be one-hot \[2, 17, 16, 16\], got \(2, 51, 16, 16\)$"):
        model(x, t, mask.repeat(1, 3, 1, 1))
    with pytest.raises(ValueError, match="multiples of 2, got 15x16"):
        model(x[:, :, :15], t, mask[:, :, :15])
    with pytest.raises(ValueError, match=r"timesteps must be a scalar or have shape \[2\]"):
        model(x, t[:1], mask)
    with pytest.raises(ValueError, match=r"x must be \[B, 1, H, W\]"):
        model(x[0], t, mask)


def test_spade_decoder_reads_the_labels_and_the_encoder_does_not():
    model = _sdm()
    encoder: list[list[torch.Tensor]] = []
    hooks = [block.register_forward_hook(lambda _m, _i, out: encoder[-1].append(out)) for block in model.input_blocks]
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([100, 700])
    outputs = []
    with torch.no_grad():
        for seed in (0, 1):
            encoder.append([])
            outputs.append(model(x, t, one_hot(_classes(seed)).float()))
    for hook in hooks:
        hook.remove()
    assert len(encoder[0]) == len(model.input_blocks)
    assert all(torch.equal(a, b) for a, b in zip(*encoder))  # the encoder never sees the labels
    assert (outputs[0] - outputs[1]).abs().mean() > 1e-3 * outputs[0].abs().mean()  # the decoder does
    with pytest.raises(ValueError, match="mask only"):
        model(x, t, one_hot(_classes(0)).float(), edge=torch.zeros(2, 1, 16, 16))


# --- training -------------------------------------------------------------------------------------------------


def test_label_dropout_zeroes_some_training_conditions(amos_cache, tmp_path):
    """With label dropout the network sees the "no label" input (all zeros) for about that fraction of samples,
    without it never."""
    for rate, expect_dropped in ((0.5, True), (0.0, False)):
        config, _ = test_training.train.parse_config(
            ["--data", str(amos_cache), "--out", str(tmp_path / f"run{rate}"), *test_training.TINY, *SDM_FLAGS,
             "--batch-size", "8", "--label-dropout", str(rate)])
        trainer = test_training.train.Trainer(config, resume=False)
        seen = []
        network = trainer.net

        def recording(x, t, mask, **kwargs):
            seen.extend(mask.flatten(1).sum(1).tolist())
            return network(x, t, mask, **kwargs)

        trainer.net = recording
        for _ in range(3):
            trainer.train_step()
        trainer._loader.shutdown()
        dropped = seen.count(0)
        assert len(seen) == 24 and set(seen) <= {0, 32 * 32}  # whole samples: 32 px one-hot masks or zeros
        assert (3 <= dropped <= 21) if expect_dropped else dropped == 0


@pytest.mark.parametrize("flags, needle", [
    (["--architecture", "sdm"], "conditioning must be one of spade for architecture sdm, got 'concat'"),
    ([*SDM_FLAGS, "--label-dropout", "1"], "label_dropout must be a number in [0, 1)"),
    ([*SDM_FLAGS, "--guidance-scale", "1.5"], "guidance_scale > 0 needs label_dropout > 0"),
])
def test_bad_sdm_training_flag_is_one_line(amos_cache, tmp_path, capsys, flags, needle):
    flags = [*flags, "--iterations", "1", "--sample-every", "0"]  # quick to fail if the flag were accepted
    test_training.test_error_bad_training_flag_is_one_line_and_makes_no_folder(amos_cache, tmp_path, capsys, flags,
                                                                                needle)


def _labels(amos_cache: Path) -> Path:
    return amos_cache.parent / "amos" / "labelsTr" / "amos_0001.nii.gz"


def _synth(amos_cache: Path, model: Path, out: Path, *extra: str) -> int:
    """``ctsynth synth`` of a fake AMOS label volume: 2 DDIM steps, every slice in one chunk."""
    return ctsynth(["synth", "--seg", str(_labels(amos_cache)), "--out", str(out), "--model", str(model), "--steps",
                    "2", "--labels", "totalseg", "--device", "cpu", "--batch-size", "32", "-q", *extra])


def test_train_export_and_synthesize(amos_cache, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(amos_cache, out, *SDM_FLAGS, "--label-dropout", "0.2", "--guidance-scale", "1.5",
                  "--iterations", "3", "--sample-every", "3") == 0
    with open(out / "log.csv", newline="") as f:
        log = list(csv.DictReader(f))
    assert [int(r["step"]) for r in log] == [1, 2, 3] and all(np.isfinite(float(r["loss"])) for r in log)
    torch.manual_seed(0)  # the trainer's initialisation
    initial = create_model(json.loads((out / "model" / "config.json").read_text())["model"]).state_dict()
    trained = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    assert [k for k in initial if not torch.equal(initial[k], trained[k])]  # the weights moved
    loaded = load_model(out / "model")
    assert isinstance(loaded.model, SDMModel) and loaded.conditioning == "spade"
    assert loaded.config["model"]["label_dropout"] == 0.2 and loaded.config["model"]["guidance_scale"] == 1.5

    syn = tmp_path / "syn.nii.gz"
    assert _synth(amos_cache, out / "model", syn) == 0, capsys.readouterr().err
    result, labels = nib.load(syn), nib.load(_labels(amos_cache))
    assert result.shape == labels.shape
    np.testing.assert_allclose(result.affine, labels.affine, atol=1e-5)
    body = np.asarray(result.dataobj)[np.asarray(labels.dataobj) > 0]
    assert body.std() > 1.0  # not a constant volume inside the labelled body
    assert read_record(sidecar_path(syn))["options"]["guidance"] == 1.5  # the model's default guidance was used


def test_resume_is_exact_with_label_dropout(amos_cache, tmp_path):
    test_training.test_resume_is_exact(amos_cache, tmp_path, [*SDM_FLAGS, "--label-dropout", "0.5", "--dropout", "0.1"])


# --- guidance -------------------------------------------------------------------------------------------------


class _Recorder(torch.nn.Module):
    """A fake network: prediction channel 1 + mask sum per pixel (so conditional and "no label" outputs differ), the
    variance channel 10 + the same; counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def encode_condition(self, mask: torch.Tensor, edge: torch.Tensor | None = None) -> None:
        return None

    def forward(self, x, t, mask, **kwargs):
        self.calls += 1
        level = mask.sum(1, keepdim=True) * 3
        return torch.cat([1 + level, 10 + level], dim=1) + 0 * x


@pytest.mark.parametrize("guidance", [0.0, 0.5, 1.5])
def test_guidance_combines_conditional_and_unconditional_predictions(guidance):
    network, classes = _Recorder(), _classes(2, n=5)
    denoiser = VolumeDenoiser(network, "spade", classes.to(torch.uint8), batch_size=2, device=torch.device("cpu"),
                              guidance=guidance)
    out = denoiser(torch.zeros(5, 1, 16, 16), torch.zeros(5, dtype=torch.long))
    assert network.calls == (3 if guidance == 0 else 6)  # 3 chunks; twice each when guided
    cond, uncond = 4.0, 1.0  # one-hot mask sums to 1 per pixel; the "no label" input to 0
    assert torch.allclose(out[:, 0], torch.tensor(uncond + (1 + guidance) * (cond - uncond)))
    assert torch.allclose(out[:, 1], torch.tensor(13.0))  # the variance channel stays conditional


def _sdm_folder(folder: Path, label_dropout: float) -> Path:
    model = _sdm(image_size=32, label_dropout=label_dropout)
    save_model(folder, model, GaussianDiffusion(**diffusion_defaults()), name=folder.name)
    return folder


def test_guidance_changes_the_volume_and_needs_label_dropout(amos_cache, tmp_path, capsys):
    guided_model = _sdm_folder(tmp_path / "cfg", 0.2)
    volumes = {}
    for guidance in ("0", "2"):
        out = tmp_path / f"g{guidance}.nii.gz"
        assert _synth(amos_cache, guided_model, out, "--guidance", guidance) == 0, capsys.readouterr().err
        volumes[guidance] = np.asarray(nib.load(out).dataobj)
    assert not np.array_equal(volumes["0"], volumes["2"])

    plain = _sdm_folder(tmp_path / "plain", 0.0)
    capsys.readouterr()
    out = tmp_path / "refused.nii.gz"
    code = _synth(amos_cache, plain, out, "--guidance", "1.5")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "--guidance 1.5 needs a model trained with label dropout" in err and "'plain'" in err
    assert not out.exists()


def test_training_sample_grids_use_the_models_guidance():
    from CTSemanticSynthLib.diffusion import make_sampler
    from CTSemanticSynthLib.synthesis import sample_slices
    from training.sample_grid import sample_grid_slices

    model, classes = _sdm(label_dropout=0.2, guidance_scale=1.5), _classes(3)
    diffusion = GaussianDiffusion(**diffusion_defaults())
    grid = sample_grid_slices(model, diffusion, classes, "spade", steps=3, start_timestep=None, class_means=None,
                              device=torch.device("cpu"))
    sampler = make_sampler("ddim", diffusion, 3)
    expected = {s: sample_slices(model, "spade", sampler, classes, range(2), seed=0, device=torch.device("cpu"),
                                 guidance=s) for s in (0.0, 1.5)}
    torch.testing.assert_close(grid, expected[1.5])
    assert not torch.allclose(grid, expected[0.0], atol=1e-3)
    assert model.training  # handed back in training mode


def test_info_names_the_architecture_and_counts_both_guided_evaluations(tmp_path, capsys):
    for dropout, guided in ((0.2, True), (0.0, False)):
        folder = _sdm_folder(tmp_path / f"d{dropout}", dropout)
        if guided:
            config = json.loads((folder / "config.json").read_text())
            config["model"]["guidance_scale"] = 1.5
            (folder / "config.json").write_text(json.dumps(config))
        assert ctsynth(["info", str(folder)]) == 0
        out = capsys.readouterr().out
        assert "network:      SDM U-Net (SPADE decoder)" in out
        one = evaluation_flops(load_model(folder)) / 1e9
        cost = float(re.search(r"cost: +([0-9.]+) GFLOP", out).group(1))
        assert cost == pytest.approx(one * (2 if guided else 1), abs=0.006)
        assert ("2 evaluations: guidance 1.5 by default" in out) == guided


def test_model_folders_older_than_the_architecture_key_load_as_unets(tmp_path):
    folder = tmp_path / "old"
    save_model(folder, UNetModel(**tiny_model_config()), GaussianDiffusion(**diffusion_defaults()), name="old")
    config = json.loads((folder / "config.json").read_text())
    for key in ("architecture", "label_dropout", "guidance_scale"):
        del config["model"][key]
    (folder / "config.json").write_text(json.dumps(config))
    loaded = load_model(folder)
    assert type(loaded.model) is UNetModel and loaded.model.config["guidance_scale"] == 0.0


def test_condition_inputs_of_an_sdm_model_are_the_mask_only():
    assert set(condition_inputs(_classes(0), "spade")) == {"mask"}
