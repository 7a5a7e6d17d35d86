"""Body outline from a segmentation: agreement with the CT's body on the bundled sample, limbs kept apart, and speed.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/body_outline.py [--margins 10,20,30] [--big 512,512,300]

1. On the bundled sample (TotalSegmentator labels, no body label): Dice and volume ratio of the outline built from
   the labels (``synthesis.prepare_classes``, per margin) against the body taken from the real CT as training takes
   it (``preprocess.body_mask_from_ct``).
2. The same sample with two 24 mm "humerus" discs 50 mm outside the body on either side (a third of the way from
   the body's front to its back), every slice: body voxels
   added outside the CT's body by the grouped hulls, and by one hull around everything (the outline before
   2026-12: a single group).
3. Seconds for the outline of the sample upsampled (nearest) to ``--big`` (default 512 x 512 x 300): from the labels,
   and from the upsampled CT (``--reference-ct``): wall and CPU (process) seconds of one run each after a warm-up.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from scipy import ndimage  # noqa: E402

from CTSemanticSynthLib.io import Volume, read_image, read_labelmap  # noqa: E402
from CTSemanticSynthLib.labels import BACKGROUND  # noqa: E402
from CTSemanticSynthLib.preprocess import AxialOrientation, body_mask_from_ct, body_mask_from_labels  # noqa: E402
from CTSemanticSynthLib.synthesis import BODY_BRIDGE_MM, prepare_classes  # noqa: E402

SAMPLE = REPO / "Resources" / "sample"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b)))


def with_arms(seg: Volume, ct_body: np.ndarray, pixel_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """The sample's labels and CT body (stack order), widened by 100 mm each side, with a 24 mm humerus disc
    (TotalSegmentator 69/70) 50 mm beside the body's left and right edge, a third of the way back from its front,
    in every slice that has body."""
    orientation = AxialOrientation.from_affine(seg.affine)
    pad = ((0, 0), (0, 0), (int(100 / pixel_mm),) * 2)
    stack, ct_body = np.pad(orientation.to_stack(seg.array), pad), np.pad(ct_body, pad)
    yy, xx = np.mgrid[: stack.shape[1], : stack.shape[2]]
    radius, gap = 12 / pixel_mm, 50 / pixel_mm
    for k in range(len(stack)):
        cols = np.flatnonzero(ct_body[k].any(axis=0))
        if not len(cols):
            continue
        body_rows = np.flatnonzero(ct_body[k].any(axis=1))
        row = body_rows[0] + (body_rows[-1] - body_rows[0]) / 3
        for value, col in ((69, cols[0] - gap - radius), (70, cols[-1] + gap + radius)):
            stack[k][(yy - row) ** 2 + (xx - col) ** 2 <= radius**2] = value
    return stack, ct_body


def upsample(array: np.ndarray, shape: tuple[int, int, int], labels: bool) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(array).astype(np.float32))[None, None]
    out = F.interpolate(x, size=shape, mode="nearest" if labels else "trilinear")[0, 0].numpy()
    return out.astype(np.uint8 if labels else np.int16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--margins", default="0,10,15,20,30")
    parser.add_argument("--big", default="512,512,300")
    args = parser.parse_args()
    seg, names = read_labelmap(SAMPLE / "seg_total.nii.gz")
    ct = read_image(SAMPLE / "ct.nii.gz")
    orientation = AxialOrientation.from_affine(seg.affine)
    ct_body = body_mask_from_ct(orientation.to_stack(ct.array))
    pixel = float(np.mean([s for a, s in enumerate(seg.spacing) if a != orientation.axes[0]]))
    print("| margin (mm) | Dice vs CT body | volume / CT body |\n|---:|---:|---:|")
    for margin in map(float, args.margins.split(",")):
        classes, _ = prepare_classes(seg, names, "totalseg", body_margin_mm=margin)
        body = orientation.to_stack(classes.array) != BACKGROUND
        print(f"| {margin:g} | {dice(body, ct_body):.3f} | {body.sum() / ct_body.sum():.3f} |")
    arms, wide_body = with_arms(seg, ct_body, pixel)
    margin = 30.0
    print(f"\nWith a humerus beside each side of the body ({margin:g} mm margin):\n")
    arm = np.isin(arms, (69, 70))
    arm_zone = np.stack([ndimage.distance_transform_edt(~a) <= margin / pixel for a in arm])  # each arm + margin
    print("| outline | outside the CT body / CT body | of which not arm + margin (air bridged) |\n|---|---:|---:|")
    for label, bridge in (("one hull around everything", 1e9), (f"grouped hulls (bridge {BODY_BRIDGE_MM:g} mm)",
                                                               BODY_BRIDGE_MM / pixel)):
        body = body_mask_from_labels(arms, has_outline=False, margin_px=margin / pixel, bridge_px=bridge)
        outside = body & ~wide_body
        print(f"| {label} | {outside.sum() / wide_body.sum():.3f} | "
              f"{np.count_nonzero(outside & ~arm_zone) / wide_body.sum():.3f} |")
    shape = tuple(int(v) for v in args.big.split(","))
    big_seg = Volume(upsample(seg.array, shape, True), seg.affine @ np.diag([*(np.array(seg.shape) / shape), 1]))
    big_ct = Volume(upsample(ct.array, shape, False), big_seg.affine)
    print(f"\nOn the sample upsampled to {'x'.join(map(str, shape))} ({torch.get_num_threads()} torch threads):\n")
    print("| outline from | wall s | CPU s |\n|---|---:|---:|")
    prepare_classes(Volume(seg.array, seg.affine), names, "totalseg")  # warm-up
    for label, kwargs in (("labels", {}), ("reference CT", {"reference": big_ct})):
        tic, cpu = time.perf_counter(), time.process_time()
        prepare_classes(big_seg, names, "totalseg", **kwargs)
        print(f"| {label} (whole prepare_classes) | {time.perf_counter() - tic:.1f} | {time.process_time() - cpu:.1f} |")


if __name__ == "__main__":
    main()
