"""``ctsynth info``: a model's config, classes, cost and sha256."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``info`` subcommand and its options."""
    info = sub.add_parser("info", help="show a model's config, classes and sha256")
    info.add_argument("model", nargs="?", default=None, metavar="DIR|NAME", help="model folder or name (default: demo)")
    info.add_argument("--json", action="store_true", help="print the full config.json")


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import load_model
    from ..synthesis import evaluation_flops, model_presets

    model = load_model(args.model)
    if args.json:
        print(json.dumps(model.config, indent=2))
        return 0
    cfg = model.config
    params = sum(p.numel() for p in model.model.parameters())
    net = cfg["model"]
    if model.kind == "generator":
        print(f"model:        {model.name}  ({model.path})\nsha256:       {model.sha256}\n"
              f"network:      one-pass {net['method']} generator, {params / 1e6:.1f} M parameters, "
              f"{net['image_size']}x{net['image_size']}")
        return 0
    architecture = {"unet": "U-Net", "sdm": "SDM U-Net (SPADE decoder)"}[net.get("architecture", "unet")]
    guidance = float(net.get("guidance_scale", 0.0))  # classifier-free guidance: two evaluations per step
    cost = evaluation_flops(model) * (2 if guidance else 1) / 1e9
    lines = [
        f"model:        {model.name}  ({model.path})",
        f"sha256:       {model.sha256}",
        f"conditioning: {net['conditioning']}",
        f"network:      {architecture} {params / 1e6:.1f} M parameters, {net['image_size']}x{net['image_size']}, "
        f"channels {net['model_channels']} x {net['channel_mult']}",
        f"cost:         {cost:.2f} GFLOP per slice per sampling step"
        + (f" (2 evaluations: guidance {guidance:g} by default)" if guidance else ""),
        f"presets:      {'; '.join(_preset_summary(name, preset) for name, preset in model_presets(cfg).items())}",
        f"diffusion:    T={cfg['diffusion']['num_timesteps']} {cfg['diffusion']['schedule']} schedule, "
        f"predicts {cfg['diffusion']['prediction']}, {cfg['diffusion']['loss']} loss",
        f"intensity:    {model.intensity.describe()}",
        f"class set:    {model.class_set.name} ({len(model.class_set.classes)} classes)",
        f"classes:      {', '.join(cfg['classes'])}",
    ]
    if "description" in cfg:
        lines.append(f"description:  {cfg['description']}")
    if "training" in cfg:
        lines.append(f"training:     {json.dumps(cfg['training'])}")
    print("\n".join(lines))
    return 0


def _preset_summary(name: str, preset: Mapping[str, Any]) -> str:
    """'fast: ddim 7 steps from t=300, slice agreement 0.3'."""
    text = f"{name}: {preset['sampler']} {preset['steps']} steps"
    if preset.get("start_timestep") is not None:
        text += f" from t={preset['start_timestep']}"
    extras = {"eta": "eta", "slice_correlation": "slice correlation", "slice_agreement": "slice agreement"}
    return ", ".join([text, *(f"{label} {preset[key]:g}" for key, label in extras.items() if preset.get(key)),
                      *(["boundary correction"] if preset.get("boundary_correction") else [])])
