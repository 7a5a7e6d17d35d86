"""Per-organ mean HU of a synthetic CT against the real one on held-out axial slices (the demo model's bar).

    python -m training.holdout_check --model runs/demo/model --ct Resources/sample/ct.nii.gz \
        --seg Resources/sample/seg_total.nii.gz --labels totalseg --holdout-every 8

Synthesizes the whole volume from the segmentation in the model's class set (as `ctsynth synth` does), then
compares, class by class (every class of the set but background and body), the mean HU over voxels of the held-out
slices (the rule of ``training.prepare --holdout-every``). The real CT is clipped to the range of the model's
intensity mapping first (-160..240 HU for the paper's window), as `ctsynth evaluate` takes it, since no model output
can leave it. The tolerance is the bar for the 15 organs; an anatomy model's other classes are listed beside them.
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
from CTSemanticSynthLib.evaluation import hu_per_class
from CTSemanticSynthLib.intensity import PAPER_WINDOW, IntensityMapping
from CTSemanticSynthLib.labels import ORGANS, PAPER, ClassSet
from CTSemanticSynthLib.preprocess import AxialOrientation
from CTSemanticSynthLib.synthesis import prepare_classes, preset_options, synthesize

from .prepare import is_holdout


def organ_means(classes: np.ndarray, real_hu: np.ndarray, synthetic_hu: np.ndarray, class_set: ClassSet = PAPER,
                intensity: IntensityMapping = PAPER_WINDOW) -> list[dict]:
    """Rows {organ, voxels, real, synthetic, difference, is_organ} for every class of ``class_set`` but background and
    body present in ``classes``; the real CT clipped to ``intensity``'s range."""
    present = [c for c in class_set.labelled if np.any(classes == c)]
    real = hu_per_class(intensity.clipped(real_hu), classes, present, class_set)
    synthetic = hu_per_class(synthetic_hu, classes, present, class_set)
    rows = []
    for c in present:
        name = class_set.classes[c]
        r, s = real[name]["mean"], synthetic[name]["mean"]
        rows.append({"organ": class_set.display_names[c], "voxels": int(np.count_nonzero(classes == c)),
                     "real_hu": round(r, 1), "synthetic_hu": round(s, 1), "difference_hu": round(s - r, 1),
                     "is_organ": c in ORGANS})
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
        model = load_model(args.model)
        classes, _ = prepare_classes(seg, names, args.labels, classes=model.class_set)
        synthetic = synthesize(classes, model, preset_options(model.config, args.preset, seed=args.seed), device="cpu")
    except CTSynthError as exc:
        print(f"holdout_check: error: {exc}", file=sys.stderr)
        return 2
    orientation = AxialOrientation.from_affine(seg.affine)
    stacks = [orientation.to_stack(a) for a in (classes.array, ct.array, synthetic.volume.array)]
    held = np.array([is_holdout(i, args.holdout_every) for i in range(len(stacks[0]))])
    rows = organ_means(*(s[held] for s in stacks), model.class_set, model.intensity)
    low, high = model.intensity.hu_range
    print(f"| organ | voxels | real HU ({low:g}..{high:g}) | synthetic HU | difference |\n|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['organ']} | {row['voxels']} | {row['real_hu']} | {row['synthetic_hu']} | {row['difference_hu']:+} |")
    worst = max((abs(r["difference_hu"]) for r in rows if r["is_organ"]), default=float("nan"))
    print(f"\n{held.sum()} held-out slices; largest |difference| {worst:.1f} HU "
          f"({'within' if worst <= args.tolerance else 'OUTSIDE'} {args.tolerance:g} HU)")
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows, "held_out_slices": int(held.sum()), "max_abs_hu": worst}, indent=2))
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
