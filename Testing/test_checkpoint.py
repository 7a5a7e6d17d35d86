"""Model folders: save/load round trip, hash and config validation, lookup, refusal of pickles."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from CTSemanticSynthLib import __version__
from CTSemanticSynthLib.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    list_models,
    load_model,
    read_config,
    resolve_model_path,
    save_model,
)
from CTSemanticSynthLib.errors import CheckpointError, OutputExistsError
from CTSemanticSynthLib.labels import MODEL_CLASSES

from conftest import make_model_folder


@pytest.mark.parametrize("conditioning", ["concat", "mask_encoder", "edge"])
def test_round_trip_gives_identical_outputs(tmp_path: Path, conditioning):
    folder = make_model_folder(tmp_path / "m", conditioning)
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["classes"] == list(MODEL_CLASSES) and config["model"]["conditioning"] == conditioning
    assert config["library_version"] == __version__  # provenance: which ctsynth wrote the folder
    loaded = load_model(folder)
    assert loaded.name == f"tiny-{conditioning}"  # the saved name, not the folder's
    assert loaded.sha256 == config["sha256"] and len(loaded.sha256) == 64
    rebuilt = make_model_folder(tmp_path / "again", conditioning)  # same seed -> same weights
    again = load_model(rebuilt)
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([3, 700])
    kwargs = {"mask": torch.nn.functional.one_hot(torch.randint(0, 17, (2, 32, 32)), 17).permute(0, 3, 1, 2).float()}
    if conditioning == "edge":
        kwargs["edge"] = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        out = loaded.model(x, t, **kwargs)
        torch.testing.assert_close(out, again.model(x, t, **kwargs))
    assert out.abs().mean() > 0.05  # a fresh U-Net outputs zeros: equal outputs must come from loaded weights
    assert loaded.diffusion.config == again.diffusion.config


def test_half_precision_weights_load(tmp_path: Path):
    folder = make_model_folder(tmp_path / "full")
    full = load_model(folder)
    save_model(tmp_path / "half", full.model, full.diffusion, name="half", half=True)
    half = load_model(tmp_path / "half")
    assert (tmp_path / "half" / WEIGHTS_NAME).stat().st_size < (folder / WEIGHTS_NAME).stat().st_size * 0.6
    assert next(half.model.parameters()).dtype == torch.float32


def test_save_refuses_existing_folder(tmp_path: Path):
    folder = make_model_folder(tmp_path / "m")
    before = (folder / WEIGHTS_NAME).read_bytes()
    loaded = load_model(folder)
    with pytest.raises(OutputExistsError, match=f"{folder} exists"):
        save_model(folder, loaded.model, loaded.diffusion, name="x")
    assert (folder / WEIGHTS_NAME).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp folder left behind


def test_corrupt_weights_are_refused(tmp_path: Path):
    folder = make_model_folder(tmp_path / "m")
    data = bytearray((folder / WEIGHTS_NAME).read_bytes())
    data[-10] ^= 0xFF
    (folder / WEIGHTS_NAME).write_bytes(bytes(data))
    recorded = json.loads((folder / CONFIG_NAME).read_text())["sha256"]
    found = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(CheckpointError, match=f"corrupt or was replaced: sha256 {found[:12]}... but config.json says "
                                              f"{recorded[:12]}...; re-copy"):
        load_model(folder)


def test_a_config_the_checks_pass_but_the_builder_rejects_is_one_error(tmp_path: Path, monkeypatch):
    """Defensive: a network builder that refuses a checked config still gives the model's config file and why."""
    import CTSemanticSynthLib.checkpoint as checkpoint

    folder = make_model_folder(tmp_path / "m")

    def refuse(config):
        raise ValueError("no such network")

    monkeypatch.setattr(checkpoint, "create_model", refuse)
    with pytest.raises(CheckpointError) as error:
        load_model(folder)
    assert str(error.value) == f"{folder / CONFIG_NAME} describes an invalid model: no such network"


def _rehash(folder: Path) -> None:
    """Record the current weights' hash in config.json, so that only the weights' content is wrong."""
    config = json.loads((folder / CONFIG_NAME).read_text())
    config["sha256"] = hashlib.sha256((folder / WEIGHTS_NAME).read_bytes()).hexdigest()
    (folder / CONFIG_NAME).write_text(json.dumps(config))


def test_weights_from_another_architecture_are_refused(tmp_path: Path):
    folder = make_model_folder(tmp_path / "a", "concat")
    other = make_model_folder(tmp_path / "b", "mask_encoder")
    shutil.copy(other / WEIGHTS_NAME, folder / WEIGHTS_NAME)
    _rehash(folder)
    with pytest.raises(CheckpointError, match="do not match its config.json"):
        load_model(folder)


@pytest.mark.parametrize("change, problem", [
    (lambda state: state.pop("out.2.bias"), "1 missing .e.g. out.2.bias"),
    (lambda state: state.update(extra=torch.zeros(2)), "1 unexpected .e.g. extra"),
    (lambda state: state.update({"out.2.bias": torch.zeros(3)}), r"1 with other shapes .e.g. out.2.bias: \(3,\)"),
])
def test_each_kind_of_weight_mismatch_is_refused(tmp_path: Path, change, problem):
    folder = make_model_folder(tmp_path / "m")
    state = load_file(folder / WEIGHTS_NAME)
    assert "out.2.bias" in state
    change(state)
    save_file(state, folder / WEIGHTS_NAME)
    _rehash(folder)
    with pytest.raises(CheckpointError, match=problem) as error:
        load_model(folder)
    assert str(error.value).startswith(f"weights in {folder} do not match its config.json: ")


def test_missing_weights_file_is_named(tmp_path: Path):
    folder = make_model_folder(tmp_path / "m")
    (folder / WEIGHTS_NAME).unlink()
    with pytest.raises(CheckpointError, match=f"has no {WEIGHTS_NAME}"):
        load_model(folder)


BAD_CONFIGS = [
    (lambda c: c.update(classes=c["classes"][:-1]), "field 'classes'"),
    (lambda c: c.update(format_version=99), "field 'format_version' is 99.*upgrade ctsynth"),
    (lambda c: c.update(format_version="1"), "field 'format_version' must be a number, not \"1\""),
    (lambda c: c.update(format_version=0), "field 'format_version' is 0(?!.*upgrade)"),  # too old: no "upgrade"
    (lambda c: c["model"].update(conditioning="spade"), "field 'model'.*conditioning"),
    (lambda c: c["model"].update(image_size="96"), "field 'model'.*image_size"),
    (lambda c: c["model"].update(wings=2), "field 'model'.*unknown option.*wings"),
    (lambda c: c.update(model=[1, 2]), "field 'model' must be a JSON object"),
    (lambda c: c["diffusion"].update(num_timesteps="1000"), "field 'diffusion.num_timesteps' must be a number"),
    (lambda c: c["diffusion"].update(schedule="wobbly"), "field 'diffusion'.*wobbly"),
    (lambda c: c["diffusion"].update(speed=3), "field 'diffusion' has unknown key.*speed"),
    (lambda c: c["diffusion"].update(use_timesteps=[0, 9]), "field 'diffusion' has unknown key.*use_timesteps"),
    (lambda c: c.pop("diffusion"), "field 'diffusion' is missing"),
    (lambda c: c["model"].pop("image_size"), "field 'model.image_size' is missing"),
    (lambda c: c["diffusion"].pop("prediction"), "field 'diffusion.prediction' is missing"),
    (lambda c: c.pop("sha256"), "field 'sha256' is missing"),
    (lambda c: c.update(sha256=12), "field 'sha256' must be a string"),
    (lambda c: c.update(sha256=c["sha256"].upper()), "field 'sha256' must be 64 lower-case hex digits"),
    (lambda c: c.update(sha256=c["sha256"][:-1] + "X"), "field 'sha256' must be 64 lower-case hex digits"),
    (lambda c: (c.pop("window"), c.pop("intensity")), "field 'window' is missing"),
    (lambda c: (c.pop("intensity"), c["window"].update(level=None)), "field 'window.level' must be a number"),
    (lambda c: (c.pop("intensity"), c["window"].update(width=0)), "field 'window.width' must be a finite number > 0, not 0"),
    (lambda c: (c.pop("intensity"), c["window"].update(width=-400)),
     "field 'window.width' must be a finite number > 0, not -400"),
    (lambda c: (c.pop("intensity"), c["window"].update(width=float("nan"))),
     "field 'window.width' must be a finite number > 0, not NaN"),
    (lambda c: (c.pop("intensity"), c["window"].update(level=float("inf"))),
     "field 'window.level' must be a finite number, not Infinity"),
    (lambda c: c["intensity"].update(hu=[240, -160]), "field 'intensity' is not a mapping"),
    (lambda c: c.update(intensity=[0, 1]), "field 'intensity' must be a JSON object"),
    (lambda c: c.update(class_set="zoo"), "field 'class_set' is \"zoo\", not one of paper, anatomy"),
    (lambda c: c.update(class_set="anatomy"), "not this version's 'anatomy' set"),
    (lambda c: c.update(class_means=[0.5] * 3), "field 'class_means'"),
    (lambda c: c.update(class_means=[0.5] * 16 + [1.01]), "field 'class_means'"),
    (lambda c: c.update(class_means=[-0.01] + [0.5] * 16), "field 'class_means'"),
    (lambda c: c.update(class_means=[True] + [0.5] * 16), "field 'class_means'"),
    (lambda c: c.update(class_means=["0.5"] * 17), "field 'class_means'"),
    (lambda c: c.update(class_means="0.5"), "field 'class_means'"),
    (lambda c: c.update(sampling_presets={"fast": {"sampler": "ddim", "stepz": 5}}),
     "field 'sampling_presets.fast' has unknown key.*stepz"),
    (lambda c: c.update(sampling_presets={"fast": {"steps": "many"}}), "field 'sampling_presets.fast.steps'"),
    (lambda c: c.update(sampling_presets=[]), "field 'sampling_presets' must be a JSON object"),
    (lambda c: c.update(sampling_presets={"fast": 3}), "field 'sampling_presets.fast' must be a JSON object$"),
    (lambda c: c.update(kind="gan"), "field 'kind' must be one of diffusion, generator, not \"gan\""),
    (lambda c: c.update(name=7), "field 'name' must be a string"),
]
"""(mutation of a good config.json, message naming the field): read_config refuses each before any weight loads."""


def test_garbage_weights_and_bad_configs(tmp_path: Path):
    folder = make_model_folder(tmp_path / "m")
    config = json.loads((folder / CONFIG_NAME).read_text())
    (folder / WEIGHTS_NAME).write_bytes(b"not a safetensors file")
    config["sha256"] = hashlib.sha256(b"not a safetensors file").hexdigest()
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="cannot be read as safetensors"):
        load_model(folder)
    for mutate, message in BAD_CONFIGS:
        bad = json.loads(json.dumps(config))
        mutate(bad)
        (folder / CONFIG_NAME).write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=message):
            load_model(folder)
    (folder / CONFIG_NAME).write_text("{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(folder)


def test_optional_and_integer_fields_are_accepted(tmp_path: Path):
    # class means are optional; a float field may hold an integer (JSON written by hand)
    means = [0, 1] + [0.5] * (len(MODEL_CLASSES) - 2)  # both ends of 0..1 included
    folder = make_model_folder(tmp_path / "m", class_means=means)
    config = json.loads((folder / CONFIG_NAME).read_text())
    config["diffusion"]["vlb_weight"] = 1
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    loaded = load_model(folder)
    assert loaded.config["class_means"] == means and loaded.diffusion.config["vlb_weight"] == 1


def test_weights_with_nan_or_inf_are_refused(tmp_path: Path):
    good = load_model(make_model_folder(tmp_path / "good"))
    with torch.no_grad():
        next(good.model.parameters())[0].fill_(float("inf"))
    save_model(tmp_path / "bad", good.model, good.diffusion, name="bad")
    with pytest.raises(CheckpointError, match="NaN or infinite weights"):
        load_model(tmp_path / "bad")


def test_lookup_by_name_in_cache_and_clear_errors(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("CTSYNTH_HOME", str(tmp_path / "home"))
    make_model_folder(tmp_path / "home" / "models" / "mine")
    assert resolve_model_path("mine") == tmp_path / "home" / "models" / "mine"
    with pytest.raises(CheckpointError, match="not found.*home/models/nothere"):
        resolve_model_path("nothere")
    pickle = tmp_path / "model.pt"
    torch.save({"a": torch.zeros(1)}, pickle)
    with pytest.raises(CheckpointError, match="pickled checkpoint"):
        load_model(pickle)
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_model(tmp_path / "home")


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt", ".pkl", ".bin"])
def test_every_pickle_suffix_is_refused_unread(tmp_path: Path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"not even read")
    with pytest.raises(CheckpointError, match=f"{path} is a pickled checkpoint, which is never loaded"):
        resolve_model_path(path)


def test_a_file_or_an_unknown_name_is_refused_with_what_to_give(tmp_path: Path):
    weights = tmp_path / WEIGHTS_NAME
    weights.write_bytes(b"x")
    with pytest.raises(CheckpointError) as error:
        resolve_model_path(weights)
    assert str(error.value) == f"{weights} is a file; give the model folder that holds {WEIGHTS_NAME} and {CONFIG_NAME}"
    with pytest.raises(CheckpointError, match=r"bundled models: (.+, )?demo(, .+)?$"):
        resolve_model_path("no-such-model")


def test_no_model_means_the_bundled_demo_model():
    assert resolve_model_path(None) == resolve_model_path("demo") and resolve_model_path(None).name == "demo"


@pytest.mark.parametrize("content", ["[1, 2]", '{"format_version": 1}'])
def test_json_that_is_not_a_model_config_is_named(tmp_path: Path, content):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / CONFIG_NAME).write_text(content)
    with pytest.raises(CheckpointError) as error:
        read_config(folder)
    assert str(error.value).startswith(f"{folder / CONFIG_NAME} is not a CTSemanticSynth model config (no \"format\"")


def test_folders_saved_before_the_kind_key_are_diffusion_models(tmp_path: Path):
    folder = make_model_folder(tmp_path / "m")
    config = json.loads((folder / CONFIG_NAME).read_text())
    del config["kind"]
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    assert read_config(folder)["diffusion"] and load_model(folder).kind == "diffusion"


def test_list_models_names_bundled_and_cached_model_folders(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("CTSYNTH_HOME", str(tmp_path / "home"))
    make_model_folder(tmp_path / "home" / "models" / "mine")
    (tmp_path / "home" / "models" / "not-a-model").mkdir()
    names = list_models()
    assert "mine" in names and "demo" in names and "not-a-model" not in names
