"""Region regeneration on the bundled sample: grow the liver, regenerate only that region, measure it.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/regenerate.py --out /tmp/regen --threads 1
    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/regenerate.py --out /tmp/regen --base /tmp/regen/base.nii.gz \
        --jump-n-sample 1

Grows the liver of Resources/sample/seg_total.nii.gz by ``--grow-mm`` (dilation in physical mm, into unlabelled
voxels only), synthesizes a base CT from the original segmentation with the demo model (the full synthesis, timed),
then regenerates the changed region (``--margin-mm`` around the changed voxels, timed) with the grown segmentation
as the condition. Prints both times, the region, the voxels changed outside the region (must be 0) and the seam:
the mean absolute HU difference between face neighbours across the region's border versus between neighbours
inside it (pairs in the body only), for the regenerated and the base CT. Writes to ``--out`` the grown
segmentation, both CTs (so the same run can be repeated with ``ctsynth synth``) and before_after.png (axial slice:
base | regenerated | |difference|, region outline in yellow). ``--base`` reuses a base CT (the full synthesis is then
not timed); slice evaluations (slices x network evaluations each) compare the two runs independently of the load.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from scipy import ndimage  # noqa: E402

from CTSemanticSynthLib.checkpoint import load_model  # noqa: E402
from CTSemanticSynthLib.io import Volume, read_image, read_labelmap, write_volume  # noqa: E402
from CTSemanticSynthLib.labels import BACKGROUND  # noqa: E402
from CTSemanticSynthLib.preprocess import AxialOrientation, hu_to_unit  # noqa: E402
from CTSemanticSynthLib.regenerate import changed_region, grow, organ_classes  # noqa: E402
from CTSemanticSynthLib.synthesis import prepare_classes, preset_options, synthesize  # noqa: E402

SAMPLE = REPO / "Resources" / "sample" / "seg_total.nii.gz"
LIVER = 5  # TotalSegmentator v2 id


def border_pairs(region: np.ndarray, body: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    """(mean |difference| of face-neighbour pairs with one voxel in the region and one outside, the same for pairs
    with both inside), over pairs whose voxels are both in the body."""
    across, inside = [], []
    for axis in range(3):
        a = [slice(None)] * 3
        b = [slice(None)] * 3
        a[axis], b[axis] = slice(None, -1), slice(1, None)
        ra, rb, ba, bb = region[tuple(a)], region[tuple(b)], body[tuple(a)], body[tuple(b)]
        diff = np.abs(values[tuple(a)].astype(np.int32) - values[tuple(b)].astype(np.int32))
        both_body = ba & bb
        across.append(diff[(ra != rb) & both_body])
        inside.append(diff[ra & rb & both_body])
    return float(np.concatenate(across).mean()), float(np.concatenate(inside).mean())


def before_after(base: Volume, regenerated: Volume, region: np.ndarray, path: Path) -> None:
    """Axial slice with the most region voxels: base | regenerated | |difference| (x4), region outline yellow."""
    orientation = AxialOrientation.from_affine(base.affine)
    stacks = [orientation.to_stack(a) for a in (base.array, regenerated.array, region)]
    k = int(stacks[2].reshape(len(stacks[2]), -1).sum(axis=1).argmax())
    outline = stacks[2][k] & ~ndimage.binary_erosion(stacks[2][k])
    panels = []
    for image in (hu_to_unit(stacks[0][k]), hu_to_unit(stacks[1][k]),
                  np.clip(np.abs(stacks[1][k].astype(np.float32) - stacks[0][k]) / 100.0, 0, 1)):
        rgb = np.repeat((image * 255).astype(np.uint8)[..., None], 3, axis=2)
        rgb[outline] = (255, 255, 0)
        panels.append(rgb)
    canvas = np.concatenate(panels, axis=1)
    Image.fromarray(canvas).resize((canvas.shape[1] * 3, canvas.shape[0] * 3), Image.NEAREST).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--grow-mm", type=float, default=5.0)
    parser.add_argument("--margin-mm", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jump-n-sample", type=int, default=2)
    parser.add_argument("--base", type=Path, default=None, help="reuse this base CT instead of synthesizing it")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    seg, names = read_labelmap(SAMPLE)
    grown = seg.array.copy()
    grown[grow(seg.array == LIVER, seg.spacing, args.grow_mm) & (seg.array == 0)] = LIVER
    edited = Volume(grown, seg.affine)
    write_volume(edited, args.out / "seg_liver_grown.nii.gz", overwrite=True)
    model = load_model(args.model, device="cpu")
    options = preset_options(model.config, args.preset, seed=args.seed, batch_size=args.batch_size)

    classes, _ = prepare_classes(seg, names, "totalseg")
    active = int(classes.array.any(axis=(0, 1)).sum())  # axial slices with body (the sample's K axis is axial)
    full_s = None
    if args.base is None:
        tic = time.perf_counter()
        base = synthesize(classes, model, options, device="cpu").volume
        full_s = round(time.perf_counter() - tic, 1)
        write_volume(base, args.out / "base.nii.gz", overwrite=True)
    else:
        base = Volume(read_image(args.base).array.astype(np.int16), seg.affine)

    new_classes, _ = prepare_classes(edited, names, "totalseg")
    region = changed_region(organ_classes(seg, names, "totalseg"), organ_classes(edited, names, "totalseg"),
                            seg.spacing, args.margin_mm)
    tic = time.perf_counter()
    result = synthesize(new_classes, model, options, device="cpu", keep=base, jump_n_sample=args.jump_n_sample,
                        region=Volume(region.astype(np.uint8), seg.affine))
    regen_s = time.perf_counter() - tic
    write_volume(result.volume, args.out / f"regenerated_r{args.jump_n_sample}.nii.gz", overwrite=True)

    body = new_classes.array != BACKGROUND
    seam, inside = border_pairs(region, body, result.volume.array)
    base_seam, base_inside = border_pairs(region, body, base.array)
    changed = result.volume.array != base.array
    report = {
        "command": " ".join(sys.argv), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads": args.threads, "preset": args.preset,
        "sampler": result.provenance["sampler"], "grown_voxels": int((grown != seg.array).sum()),
        "region": result.provenance["region"],
        "slice_evaluations_full": active * options.steps,
        "slice_evaluations_regenerate": result.provenance["slices_sampled"] * jumps.evaluations(options.steps),
        "slices_full": active, "slices_regenerated": result.provenance["slices_sampled"],
        "full_s": full_s, "regenerate_s": round(regen_s, 1),
        "changed_outside_region": int(changed[~region].sum()), "changed_inside_region": float(changed[region].mean()),
        "seam_regenerated_hu": round(seam, 2), "inside_regenerated_hu": round(inside, 2),
        "seam_base_hu": round(base_seam, 2), "inside_base_hu": round(base_inside, 2),
    }
    before_after(base, result.volume, region, args.out / f"before_after_r{args.jump_n_sample}.png")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
