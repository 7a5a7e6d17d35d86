"""Slice-to-slice consistency sweep: stripe index, organ mean-HU error, PSNR/SSIM and CPU time per option and seed.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/consistency.py --out /tmp/consistency \
        --option base: --option agree0.6:slice_agreement=0.6 --seeds 0,1,2

Each ``--option NAME:KEY=VALUE,...`` overrides the model's ``--preset`` (``SamplingOptions`` fields); every option
is sampled for every seed on the bundled sample (``--seg``/``--real``) on the CPU, one run after another, and
scored as ``ctsynth evaluate`` does (``evaluation.evaluate_case``). A run whose ``NAME_sSEED.json`` exists in
``--out`` is read back, not repeated, so an interrupted sweep resumes. Prints a markdown table: per option the mean
(and min..max over the seeds) of the stripe index, the mean and the max over the organs of |synthetic - real| mean
HU, PSNR/SSIM over the axial slices and the CPU seconds of the sampling. ``--figure PNG`` also draws the coronal
view through the organs' centre of the real CT and of every option's first seed, side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from CTSemanticSynthLib.checkpoint import load_model, read_config, resolve_model_path  # noqa: E402
from CTSemanticSynthLib.evaluation import evaluate_case, json_safe  # noqa: E402
from CTSemanticSynthLib.grid import onto_grid  # noqa: E402
from CTSemanticSynthLib.io import Volume, read_image, read_labelmap, write_volume  # noqa: E402
from CTSemanticSynthLib.labels import ORGANS  # noqa: E402
from CTSemanticSynthLib.preprocess import AxialOrientation, hu_to_unit  # noqa: E402
from CTSemanticSynthLib.synthesis import (  # noqa: E402
    SamplingOptions,
    prepare_classes,
    preset_options,
    synthesize,
)

SAMPLE = REPO / "Resources" / "sample"


def parse_option(text: str) -> tuple[str, dict[str, float]]:
    """``NAME:KEY=VALUE,...`` -> (NAME, {KEY: float(VALUE)}) with keys checked against SamplingOptions."""
    name, _, rest = text.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in SamplingOptions.__dataclass_fields__:
            raise SystemExit(f"consistency.py: unknown sampling option {key!r} in --option {text}")
        overrides[key] = float(value)
    return name, overrides


def organ_errors(report: dict) -> dict[str, float]:
    """|synthetic - real| mean HU per organ present in the case."""
    return {organ: abs(report["hu_synthetic"][organ]["mean"] - real["mean"])
            for organ, real in report["hu_real"].items() if report["voxels"][organ]}


def summary(report: dict) -> dict[str, float]:
    """The table's numbers of one run."""
    errors = organ_errors(report)
    worst = max(errors, key=errors.get)
    return {"stripe_index": report["consistency"]["stripe_index"],
            "hu_error_mean": float(np.mean(list(errors.values()))),
            "hu_error_max": errors[worst], "hu_error_worst": worst, "psnr": report["image"]["psnr"]["mean"],
            "ssim": report["image"]["ssim"]["mean"], "cpu_s": report["cpu_s"]}


def spread(values: list[float], digits: int) -> str:
    """``mean (min..max)``, or the value alone for one seed."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ({min(values):.{digits}f}..{max(values):.{digits}f})"


def coronal_figure(classes: Volume, views: list[tuple[str, Volume]], path: Path, height: int = 300) -> None:
    """PNG of the coronal plane through the organs' centre (superior up, physical aspect) of each named volume."""
    from PIL import Image, ImageDraw

    orientation = AxialOrientation.from_affine(classes.affine)
    organs = np.isin(orientation.to_stack(classes.array), ORGANS)
    row = int(np.flatnonzero(organs.any(axis=(0, 2))).mean())
    spacing = [classes.spacing[a] for a in orientation.axes]
    width = int(height * organs.shape[2] * spacing[2] / (organs.shape[0] * spacing[0]))
    panels = []
    for name, volume in views:
        unit = hu_to_unit(orientation.to_stack(volume.array)[::-1, row, :])
        panel = Image.fromarray((unit * 255).round().astype(np.uint8)).resize((width, height), Image.BILINEAR)
        ImageDraw.Draw(panel).text((4, 4), name, fill=255)
        panels.append(panel)
    canvas = Image.new("L", (sum(p.width + 2 for p in panels) - 2, height))
    for i, panel in enumerate(panels):
        canvas.paste(panel, (i * (width + 2), 0))
    canvas.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the volumes and per-run reports")
    parser.add_argument("--option", action="append", required=True, metavar="NAME:KEY=VALUE,...")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--seg", type=Path, default=SAMPLE / "seg_total.nii.gz")
    parser.add_argument("--real", type=Path, default=SAMPLE / "ct.nii.gz")
    parser.add_argument("--labels", default="totalseg")
    parser.add_argument("--figure", type=Path, default=None, metavar="PNG")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    options = [parse_option(text) for text in args.option]
    seeds = [int(s) for s in args.seeds.split(",")]
    config = read_config(resolve_model_path(args.model))
    model = load_model(args.model)
    segmentation, names = read_labelmap(args.seg)
    classes = prepare_classes(segmentation, names, args.labels)[0]
    real = onto_grid(read_image(args.real), segmentation, "image", f"--real {args.real}", None)
    rows = []
    for name, overrides in options:
        runs = []
        for seed in seeds:
            path = args.out / f"{name}_s{seed}.json"
            if not path.exists():
                sampling = preset_options(config, args.preset, seed=seed, **{"precision": "auto", **overrides})
                start = time.process_time()
                result = synthesize(classes, model, sampling, device="cpu")  # auto precision, as ctsynth synth
                cpu = time.process_time() - start
                write_volume(result.volume, args.out / f"{name}_s{seed}.nii.gz", overwrite=True)
                report = evaluate_case(result.volume, classes, real)
                report.update(cpu_s=cpu, threads=torch.get_num_threads(), options=result.provenance["options"])
                path.write_text(json.dumps(json_safe(report), indent=1))
            runs.append(summary(json.loads(path.read_text())))
            print(f"{name} seed {seed}: {runs[-1]}", file=sys.stderr, flush=True)
        rows.append((name, overrides, runs))

    print("| option | stripe index | organ mean-HU error: mean / max | PSNR / SSIM (axial) | CPU s | seeds |")
    print("|---|---|---|---|---|---|")
    for name, overrides, runs in rows:
        label = ", ".join(f"{k} {v:g}" for k, v in overrides.items()) or "preset"
        values = {key: [run[key] for run in runs] for key in runs[0] if key != "hu_error_worst"}
        print(f"| {name} ({label}) | {spread(values['stripe_index'], 3)} | {spread(values['hu_error_mean'], 1)} / "
              f"{spread(values['hu_error_max'], 1)} HU | {np.mean(values['psnr']):.2f} dB / "
              f"{np.mean(values['ssim']):.3f} | {np.mean(values['cpu_s']):.0f} | {len(runs)} |")
    if args.figure is not None:
        views = [(name, read_image(args.out / f"{name}_s{seeds[0]}.nii.gz")) for name, _ in options]
        coronal_figure(classes, [("real CT", real), *views], args.figure)


if __name__ == "__main__":
    main()
