"""Per-organ mean HU of a synthetic CT against the real one on held-out axial slices (the demo model's bar).

    python -m training.holdout_check --model runs/demo/model --ct Resources/sample/ct.nii.gz \
        --seg Resources/sample/seg_total.nii.gz --labels totalseg --holdout-every 8

Synthesizes the whole volume from the segmentation (as `ctsynth synth` does), then compares, organ by organ,
the mean HU over voxels of the held-out slices (the rule of ``training.prepare --holdout-every``). The real CT
is clipped to the model's window (-160..240 HU) first, since no model output can leave it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from CTSemanticSynthLib.checkpoint import load_model
from CTSemanticSynthLib.errors import CTSynthError, InputError
from CTSemanticSynthLib.io import read_ct, read_labelmap
from CTSemanticSynthLib.labels import DISPLAY_NAMES, ORGANS
from CTSemanticSynthLib.preprocess import AxialOrientation, hu_to_unit, unit_to_hu
from CTSemanticSynthLib.synthesis import prepare_classes, preset_options, synthesize

from .prepare import is_holdout


def organ_means(classes: np.ndarray, real_hu: np.ndarray, synthetic_hu: np.ndarray) -> list[dict]:
    """Rows {organ, voxels, real, synthetic, difference} for every organ present in ``classes``."""
    real = unit_to_hu(hu_to_unit(real_hu))
    rows = []
    for organ in ORGANS:
        voxels = classes == organ
        if voxels.any():
            r, s = float(real[voxels].mean()), float(synthetic_hu[voxels].mean())
            rows.append({"organ": DISPLAY_NAMES[organ], "voxels": int(voxels.sum()), "real_hu": round(r, 1),
                         "synthetic_hu": round(s, 1), "difference_hu": round(s - r, 1)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--ct", type=Path, required=True)
    parser.add_argument("--seg", type=Path, required=True)
    parser.add_argument("--labels", default="auto")
    parser.add_argument("--holdout-every", type=int, default=8)
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=20.0, help="allowed |difference| in HU (default 20)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    try:
        ct, (seg, names) = read_ct(args.ct, f"--ct {args.ct}"), read_labelmap(args.seg)
        if not ct.same_grid(seg):
            raise InputError(f"{args.seg} is not on the grid of {args.ct}")
        classes, _ = prepare_classes(seg, names, args.labels)
        model = load_model(args.model)
        synthetic = synthesize(classes, model, preset_options(model.config, args.preset, seed=args.seed), device="cpu")
    except CTSynthError as exc:
        print(f"holdout_check: error: {exc}", file=sys.stderr)
        return 2
    orientation = AxialOrientation.from_affine(seg.affine)
    stacks = [orientation.to_stack(a) for a in (classes.array, ct.array, synthetic.volume.array)]
    held = np.array([is_holdout(i, args.holdout_every) for i in range(len(stacks[0]))])
    rows = organ_means(*(s[held] for s in stacks))
    print("| organ | voxels | real HU (windowed) | synthetic HU | difference |\n|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['organ']} | {row['voxels']} | {row['real_hu']} | {row['synthetic_hu']} | {row['difference_hu']:+} |")
    worst = max(abs(r["difference_hu"]) for r in rows)
    print(f"\n{held.sum()} held-out slices; largest |difference| {worst:.1f} HU "
          f"({'within' if worst <= args.tolerance else 'OUTSIDE'} {args.tolerance:g} HU)")
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows, "held_out_slices": int(held.sum()), "max_abs_hu": worst}, indent=2))
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
