"""CPU tests for the conditional diffusion U-Net (tiny configs, a few seconds)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from CTSemanticSynthLib.checkpoint import load_model
from CTSemanticSynthLib.factory import create_model
from CTSemanticSynthLib.models import CONDITIONINGS, UNetModel, model_defaults
from CTSemanticSynthLib.models.blocks import AttentionBlock, Downsample, ResBlock, Upsample
from CTSemanticSynthLib.models.sdm import SPADEResBlock

from conftest import make_model_folder, randomise_zero_layers

TINY = {
    "image_size": 32,
    "num_classes": 4,
    "model_channels": 16,
    "channel_mult": [1, 2],
    "num_res_blocks": 1,
    "attention_resolutions": [2],
    "num_heads": 2,
    "encoder_channels": 8,
}
B, H = 2, 32


def tiny_model(conditioning: str, seed: int = 0, **overrides: object) -> UNetModel:
    """A tiny model whose zero-initialised layers are randomised, so every input can reach the output."""
    torch.manual_seed(seed)
    return randomise_zero_layers(UNetModel(**{**TINY, "conditioning": conditioning, **overrides})).eval()


def inputs(conditioning: str, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, TINY["num_classes"], (B, H, H), generator=g)
    mask = nn.functional.one_hot(labels, TINY["num_classes"]).permute(0, 3, 1, 2).float()
    kw = {
        "x": torch.randn(B, 1, H, H, generator=g),
        "timesteps": torch.randint(0, 1000, (B,), generator=g),
        "mask": mask,
    }
    if conditioning == "edge":
        kw["edge"] = (torch.rand(B, 1, H, H, generator=g) > 0.8).float()
    return kw


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_output_shape_and_finite(conditioning: str) -> None:
    model = tiny_model(conditioning)
    out = model(**inputs(conditioning))
    assert out.shape == (B, 2, H, H)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_shared_test_models_give_non_trivial_outputs(tmp_path, conditioning: str) -> None:
    """conftest's model folders must not output zeros (a fresh U-Net does), or a checkpoint round trip that never
    loads the weights would still compare equal."""
    model = load_model(make_model_folder(tmp_path / "m", conditioning)).model
    kw = inputs(conditioning)
    kw["mask"] = nn.functional.one_hot(kw["mask"].argmax(1) * 5, 17).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        out = model(**kw)
    assert out.abs().mean() > 0.05 and out[:, 0].std() > 0.05 and out[:, 1].std() > 0.05
    assert UNetModel(**model.config)(**kw).abs().max() == 0.0  # what a fresh model gives: all zeros


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_config_json_round_trip(conditioning: str) -> None:
    model = UNetModel(**{**TINY, "conditioning": conditioning})
    config = json.loads(json.dumps(model.config))
    assert config == model.config
    rebuilt = UNetModel(**config)
    assert rebuilt.config == model.config
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    assert set(model_defaults()) == set(model.config)


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_mask_and_timestep_matter(conditioning: str) -> None:
    model = tiny_model(conditioning)
    kw = inputs(conditioning)
    with torch.no_grad():
        ref = model(**kw)
        other_mask = model(**{**kw, "mask": inputs(conditioning, seed=2)["mask"]})
        other_t = model(**{**kw, "timesteps": (kw["timesteps"] + 300) % 1000})
    assert (ref - other_mask).abs().max() > 1e-3
    assert (ref - other_t).abs().max() > 1e-3


def test_edge_matters() -> None:
    model = tiny_model("edge")
    kw = inputs("edge")
    with torch.no_grad():
        ref = model(**kw)
        other = model(**{**kw, "edge": 1.0 - kw["edge"]})
    assert (ref - other).abs().max() > 1e-3


@pytest.mark.parametrize("conditioning", ["mask_encoder", "edge"])
def test_precomputed_condition_features_match(conditioning: str) -> None:
    model = tiny_model(conditioning)
    kw = inputs(conditioning)
    with torch.no_grad():
        features = model.encode_condition(kw["mask"], kw.get("edge"))
        assert len(features) == len(TINY["channel_mult"])
        cached = model(kw["x"], kw["timesteps"], kw["mask"], cond_features=features)
        torch.testing.assert_close(cached, model(**kw))


def test_scalar_and_float_timesteps() -> None:
    model = tiny_model("concat")
    kw = inputs("concat")
    with torch.no_grad():
        batch = model(**{**kw, "timesteps": torch.full((B,), 7)})
        scalar = model(**{**kw, "timesteps": torch.tensor(7.0)})
    torch.testing.assert_close(batch, scalar)


def test_edge_is_required_exactly_for_edge_models() -> None:
    kw = inputs("edge")
    with pytest.raises(ValueError, match="edge"):
        tiny_model("edge")(**{**kw, "edge": None})
    with pytest.raises(ValueError, match="edge"):
        tiny_model("concat")(**kw)
    with pytest.raises(ValueError, match="edge"):
        tiny_model("edge")(**{**kw, "edge": kw["edge"][:, :, :16]})


def test_bad_inputs_raise() -> None:
    model = tiny_model("concat")
    kw = inputs("concat")
    with pytest.raises(ValueError, match="mask"):
        model(**{**kw, "mask": kw["mask"][:, :3]})
    with pytest.raises(ValueError, match="multiples of 2"):
        model(kw["x"][..., :31, :31], kw["timesteps"], kw["mask"][..., :31, :31])
    with pytest.raises(ValueError, match="timesteps"):
        model(**{**kw, "timesteps": kw["timesteps"][:1]})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"conditioning": "spade"}, "conditioning"),
        ({"image_size": 30, "channel_mult": [1, 2, 2]}, "divisible by 4"),
        ({"attention_resolutions": [4]}, "attention_resolutions"),
        ({"num_heads": 3}, "num_heads"),
        ({"model_channels": 0}, "model_channels"),
        ({"num_res_blocks": True}, "num_res_blocks"),
        ({"channel_mult": []}, "channel_mult"),
        ({"dropout": 1.5}, "dropout"),
        ({"use_checkpoint": "yes"}, "use_checkpoint"),
        ({"learn_sigma": True}, "unknown option"),
    ],
)
def test_bad_config_raises(override: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        UNetModel(**{**TINY, **override})


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_training_steps_reduce_loss_and_reach_condition_encoder(conditioning: str) -> None:
    torch.manual_seed(0)
    model = UNetModel(**{**TINY, "conditioning": conditioning}).train()
    kw = inputs(conditioning)
    target = torch.cat([kw["mask"][:, 1:2], kw["mask"][:, 2:3]], dim=1) - 0.25
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(**kw), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    if model.cond_encoder is not None:
        grads = [p.grad for p in model.cond_encoder.parameters()]
        assert all(g is not None for g in grads)
        assert sum(g.abs().sum().item() for g in grads) > 0


def test_gradient_checkpointing_gives_same_gradients() -> None:
    kw = inputs("mask_encoder")
    grads = []
    for use_checkpoint in (False, True):
        model = tiny_model("mask_encoder", use_checkpoint=use_checkpoint).train()
        model(**kw).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(plain, checkpointed)


@pytest.mark.parametrize("conditioning", ["mask_encoder", "edge"])
def test_bf16_autocast_and_compile_without_graph_breaks(conditioning: str) -> None:
    model = tiny_model(conditioning)
    kw = inputs(conditioning)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**kw)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(**kw), model(**kw))


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_default_256_parameter_count_is_sane(conditioning: str) -> None:
    with torch.device("meta"):
        model = UNetModel(conditioning=conditioning)
    assert model.config["image_size"] == 256
    assert 20e6 < sum(p.numel() for p in model.parameters()) < 200e6


LEVEL_VARIANTS = {
    "concat": {"conditioning": "concat"},
    "mask_encoder": {"conditioning": "mask_encoder"},
    "edge": {"conditioning": "edge"},
    "concat_2.5d": {"conditioning": "concat", "context_slices": 1},
    "sdm": {"architecture": "sdm", "conditioning": "spade"},
}


def expected_level_layout(cfg: dict, cond_ch: list[int]) -> list[tuple[str, list[tuple]]]:
    """Every block of the encoder, the middle and the decoder as (state-dict prefix, layers), each layer a
    (kind, channels...) tuple, from closed-form positions rather than the builder's running bookkeeping: with
    n = num_res_blocks + 1 blocks a level, encoder block j is at level j // n and downsamples when j % n == n - 1;
    its output (a decoder skip) has that level's width. Decoder block k is at level L - 1 - k // n, takes the skip
    of encoder block E - 1 - k (the input conv's for the last), and its level's last block upsamples."""
    mc, mult, n = cfg["model_channels"], cfg["channel_mult"], cfg["num_res_blocks"] + 1
    width = [m * mc for m in mult]
    last = len(mult) - 1
    n_enc = len(mult) * n - 1
    skips = [mc] + [width[j // n] for j in range(n_enc)]

    def attended(level: int, kind: str, in_ch: int) -> list[tuple]:
        attn = [("attn", width[level])] if 2**level in cfg["attention_resolutions"] else []
        return [(kind, in_ch, width[level]), *attn]

    blocks = []
    for j in range(n_enc):
        level, i = divmod(j, n)
        in_ch = mc if j == 0 else width[level - (i == 0)]
        layers = [("down", width[level])] if i == n - 1 else attended(level, "enc", in_ch + (0 if i else cond_ch[level]))
        blocks.append((f"input_blocks.{j}", layers))
    bottom = width[last]
    blocks.append(("middle_block", [("dec", bottom, bottom), ("attn", bottom), ("dec", bottom, bottom)]))
    for k in range(len(mult) * n):
        level, i = last - k // n, k % n
        prev = width[last] if k == 0 else width[last - (k - 1) // n]
        layers = attended(level, "dec", prev + skips[n_enc - k] + (0 if i else cond_ch[level]))
        if level and i == n - 1:
            layers.append(("up", width[level]))
        blocks.append((f"output_blocks.{k}", layers))
    return blocks


def reference_layer(cfg: dict, kind: str, *channels: int) -> nn.Module:
    """A freshly built layer of one kind; its state-dict keys and shapes are what the network must hold there."""
    emb, rest = 4 * cfg["model_channels"], (cfg["dropout"], cfg["use_scale_shift_norm"], cfg["use_checkpoint"])
    if kind == "dec" and cfg["architecture"] == "sdm":
        return SPADEResBlock(*channels, emb, cfg["num_classes"], *rest)
    if kind in ("enc", "dec"):
        return ResBlock(*channels, emb, *rest)
    if kind == "attn":
        return AttentionBlock(*channels, cfg["num_heads"])
    return (Downsample if kind == "down" else Upsample)(*channels, cfg["conv_resample"])


@pytest.mark.parametrize("num_res_blocks", [1, 2])
@pytest.mark.parametrize("attention", [[], [1, 2]], ids=["no_attn", "attn"])
@pytest.mark.parametrize("channel_mult", [[1, 2], [1, 2, 2], [1, 1, 2, 4]], ids=["2lev", "3lev", "4lev"])
@pytest.mark.parametrize("variant", list(LEVEL_VARIANTS))
def test_levels_hold_the_expected_blocks_in_order(variant, channel_mult, attention, num_res_blocks) -> None:
    """The state-dict keys and shapes (what saved models load by) of the encoder, middle and decoder, in order, and
    where the condition-encoder features enter, for both U-Nets; also the order of the top-level parts. Resampling
    is by convolution with one residual block a level and parameter-free with two."""
    config = {**TINY, **LEVEL_VARIANTS[variant], "channel_mult": channel_mult, "attention_resolutions": attention,
              "num_res_blocks": num_res_blocks, "conv_resample": num_res_blocks == 1}
    model = create_model(config)
    cfg = model.config
    cond_ch = model.cond_encoder.out_channels if getattr(model, "cond_encoder", None) else [0] * len(channel_mult)
    layout = expected_level_layout(cfg, cond_ch)
    expected = [
        (f"{prefix}.{index}.{key}", tuple(value.shape))
        for prefix, layers in layout
        for index, layer in enumerate(layers)
        for key, value in reference_layer(cfg, *layer).state_dict().items()
    ]
    state = model.state_dict()
    level_parts = ("input_blocks", "middle_block", "output_blocks")
    assert [(k, tuple(v.shape)) for k, v in state.items() if k.split(".")[0] in level_parts] == expected
    parts = ["cond_encoder"] * bool(any(cond_ch)) + ["time_embed", "input_conv", *level_parts, "out"]
    assert list(dict.fromkeys(k.split(".")[0] for k in state)) == parts
    if cfg["architecture"] == "unet":  # features enter the first block of each level, encoder and decoder
        n, levels, injected = num_res_blocks + 1, len(channel_mult), any(cond_ch)
        assert model.input_inject == tuple(j // n if injected and j % n == 0 else None for j in range(levels * n - 1))
        assert model.output_inject == tuple(
            levels - 1 - k // n if injected and k % n == 0 else None for k in range(levels * n)
        )
