"""Per-class mean HU, synthetic vs real, on the bundled sample: the anatomy model against the paper-set demo model.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/anatomy_hu.py [--models demo,anatomy] [--seed 0] [--out DIR]

Each model synthesizes the bundled sample (``Resources/sample``, TotalSegmentator labels) with its ``fast`` preset,
the body outline taken from the real CT (``--reference-ct``, as training takes it). Structures are grouped with the
anatomy set (``labels.class_set('anatomy')``): the organs, vertebrae, ribs, pelvis (sacrum + hips), femurs, muscles
(autochthon + iliopsoas + gluteus), colon, small bowel, lungs, and fat = the body class (tissue inside the body that no
label covers). For each group and model: mean HU of the synthetic CT and of the real CT over all slices and over the
held-out slices (every 8th axial slice, as ``training.prepare --holdout-every 8``), and for colon, small bowel and
lung the mean over the voxels where the real CT is air (< -500 HU; ``evaluation.means_where_air``, as
``ctsynth evaluate`` reports it for an anatomy-set synthetic CT). "ceiling" is the real CT sent through the model's
grid and mapping and back (HU -> its slice size -> [0, 1] -> back): the best mean any model of that size and mapping
can give. The real CT is taken as it is (full HU); for the
demo model the real organ means clipped to its window are shown too. Also the stripe index
(``metrics.consistency``, 1.0 = as the real CT) and wall/CPU seconds per volume. Prints markdown; ``--out`` keeps the
volumes (``<model>_<sha256[:8]>_s<seed>.nii.gz`` with a ``.json`` of its timing and stripe index) and reads back
those it already holds, so one model can be run at a time.
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

from CTSemanticSynthLib.checkpoint import load_model  # noqa: E402
from CTSemanticSynthLib.evaluation import AIR_BELOW_HU, means_where_air  # noqa: E402
from CTSemanticSynthLib.io import Volume, read_image, read_labelmap, write_volume  # noqa: E402
from CTSemanticSynthLib.labels import ORGANS, class_set  # noqa: E402
from CTSemanticSynthLib.metrics.consistency import stripe_index  # noqa: E402
from CTSemanticSynthLib.parsing import boolean  # noqa: E402
from CTSemanticSynthLib.partial_volume import ClassValues, restore_boundaries  # noqa: E402
from CTSemanticSynthLib.preprocess import AxialOrientation, PlaneResize, hu_from_model, hu_to_model  # noqa: E402
from CTSemanticSynthLib.synthesis import prepare_classes, preset_options, synthesize  # noqa: E402

SAMPLE = REPO / "Resources" / "sample"
ANATOMY = class_set("anatomy")
GROUPS: dict[str, tuple[str, ...]] = {
    **{ANATOMY.display_names[c]: (ANATOMY.classes[c],) for c in ORGANS},
    "Vertebrae": ("vertebrae",), "Ribs": ("ribs",), "Pelvis (sacrum, hips)": ("pelvis",), "Femurs": ("femur",),
    "Muscles (autochthon, iliopsoas, gluteus)": ("autochthon", "iliopsoas", "gluteus"), "Colon": ("colon",),
    "Small bowel": ("small_bowel",), "Lungs": ("lung",), "Fat (body, unlabelled)": ("body",),
}
AIR_GROUPS = ("Colon", "Small bowel", "Lungs")
HOLDOUT_EVERY = 8


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")


def ceiling(real: Volume, classes: Volume, model, correct: bool) -> np.ndarray:
    """The real CT through the model's slice size (resized in HU, as training prepares it) and mapping and back, in
    HU (the file's voxel order), with the boundary correction when ``correct`` (as synthesize does it, its class
    values estimated from the real CT)."""
    orientation = AxialOrientation.from_affine(real.affine)
    stack, mapping = orientation.to_stack(real.array).astype(np.float32), model.intensity
    resize = PlaneResize(stack.shape[1], stack.shape[2], model.image_size)
    low_hu = hu_to_model(resize, torch.from_numpy(stack), mapping.hu_range)
    if not correct:
        return orientation.from_stack(hu_from_model(resize, low_hu, mapping.hu_range).numpy())
    class_stack = orientation.to_stack(classes.array)
    estimate = ClassValues(len(model.class_set.classes), resize)
    estimate.add(class_stack, low_hu)
    values = estimate.solve(mapping.hu_range)
    return orientation.from_stack(restore_boundaries(class_stack, low_hu, resize, values, mapping.hu_range))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="demo,anatomy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="folder for the synthetic volumes (reused)")
    parser.add_argument("--boundary-correction", type=boolean, default=None, metavar="true|false",
                        help="override every model's preset (default: each model's own)")
    args = parser.parse_args()
    seg, names = read_labelmap(SAMPLE / "seg_total.nii.gz")
    real = read_image(SAMPLE / "ct.nii.gz")
    groups_volume, _ = prepare_classes(seg, names, "totalseg", reference=real, classes=ANATOMY)
    orientation = AxialOrientation.from_affine(seg.affine)
    held = np.zeros(orientation.to_stack(seg.array).shape, bool)
    held[HOLDOUT_EVERY // 2 :: HOLDOUT_EVERY] = True
    held_out = orientation.from_stack(held)
    masks = {g: np.isin(groups_volume.array, [ANATOMY.classes.index(n) for n in members])
             for g, members in GROUPS.items()}
    results, timing, ceilings = {}, [], {}
    for name in args.models.split(","):
        model = load_model(name)
        options = preset_options(model.config, "fast", seed=args.seed, boundary_correction=args.boundary_correction)
        tag = "_bc" if options.boundary_correction else ""
        stem = None if args.out is None else args.out / f"{model.name}_{model.sha256[:8]}_s{args.seed}{tag}"
        classes, _ = prepare_classes(seg, names, "totalseg", reference=real, classes=model.class_set)
        if stem is not None and stem.with_suffix(".json").is_file():
            volume = read_image(stem.with_suffix(".nii.gz"))
            timing.append(tuple(json.loads(stem.with_suffix(".json").read_text())))
        else:
            tic, cpu = time.perf_counter(), time.process_time()
            volume = synthesize(classes, model, options, device="cpu").volume
            timing.append((model.name, time.perf_counter() - tic, time.process_time() - cpu,
                           stripe_index(volume, real, classes)["stripe_index"]))
            if stem is not None:
                args.out.mkdir(parents=True, exist_ok=True)
                write_volume(volume, stem.with_suffix(".nii.gz"), overwrite=True)
                stem.with_suffix(".json").write_text(json.dumps(timing[-1]))
        results[model.name] = (volume.array.astype(np.float32), model.intensity)
        ceilings[model.name] = ceiling(real, classes, model, options.boundary_correction)
    real_hu = real.array.astype(np.float32)
    header = ["structure", "voxels", "real HU"] + [f"{m} HU (diff) [ceiling]" for m in results] + \
             [f"{m} held-out diff" for m in results]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for group, mask in masks.items():
        if not mask.any():
            continue
        row = [group, str(int(mask.sum())), f"{_mean(real_hu[mask]):.0f}"]
        for name, (volume, mapping) in results.items():
            shown = _mean(volume[mask]) - _mean(real_hu[mask])
            row.append(f"{_mean(volume[mask]):.0f} ({shown:+.0f}) [{_mean(ceilings[name][mask]):.0f}]")
        for volume, mapping in results.values():
            both = mask & held_out
            row.append(f"{_mean(volume[both]) - _mean(real_hu[both]):+.0f}")
        print("| " + " | ".join(row) + " |")
    print(f"\nWhere the real CT is air (< {AIR_BELOW_HU:g} HU), mean HU:\n")
    print("| structure | voxels | real | " + " | ".join(results) + " |\n|---|---:|---:|" + "---:|" * len(results))
    air = means_where_air({"real": real_hu, **{m: v for m, (v, _) in results.items()}}, real_hu, groups_volume.array,
                          ANATOMY)
    for group in AIR_GROUPS:
        row = air.get(GROUPS[group][0])
        if row is not None:
            print(f"| {group} | {row['voxels']} | " + " | ".join(f"{row[k]:.0f}" for k in ("real", *results)) + " |")
    print("\nOrgans (15 AMOS) against the real CT clipped to each model's range (what it can reproduce):\n")
    print("| model | mean abs organ diff (HU) | max abs organ diff (HU) | organs within 20 HU |\n|---|---:|---:|---:|")
    for name, (volume, mapping) in results.items():
        clipped = mapping.clipped(real_hu)
        diffs = [abs(_mean(volume[masks[g]]) - _mean(clipped[masks[g]])) for g in list(GROUPS)[: len(ORGANS)]
                 if masks[g].any()]
        print(f"| {name} | {np.mean(diffs):.1f} | {np.max(diffs):.1f} | {sum(d <= 20 for d in diffs)} of {len(diffs)} |")
    print(f"\n| model | wall s | CPU s | stripe index |\n|---|---:|---:|---:|")
    for name, wall, cpu, stripes in timing:
        print(f"| {name} | {wall:.1f} | {cpu:.1f} | {stripes:.2f} |")
    corrected = "each model's own" if args.boundary_correction is None else str(args.boundary_correction).lower()
    print(f"\n({torch.get_num_threads()} torch threads, seed {args.seed}, fast preset of each model, boundary "
          f"correction: {corrected})")


if __name__ == "__main__":
    main()
