"""Cost of the boundary correction (``SamplingOptions.boundary_correction``) on a full-size segmentation.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/boundary_correction.py [--big 512,512,300] [--size 96]

The bundled sample's TotalSegmentator labels, mapped to the anatomy set (36 classes) with the body from the real CT,
upsampled (nearest) to ``--big``; the "model output" is the real CT (upsampled, trilinear) on the model's grid. Times
the two steps synthesize adds, in its resize parts: the class values (:class:`~.partial_volume.ClassValues`) and the
restored full-resolution slices (:func:`~.partial_volume.restore_boundaries`), against the plain upsampling they
replace. Wall and CPU (process) seconds of one run each. Prints a markdown table.
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

from benchmarks.body_outline import upsample  # noqa: E402
from CTSemanticSynthLib.intensity import named_mapping  # noqa: E402
from CTSemanticSynthLib.io import Volume, read_image, read_labelmap  # noqa: E402
from CTSemanticSynthLib.labels import class_set  # noqa: E402
from CTSemanticSynthLib.partial_volume import ClassValues, restore_boundaries  # noqa: E402
from CTSemanticSynthLib.preprocess import AxialOrientation, PlaneResize, hu_from_model, hu_to_model  # noqa: E402
from CTSemanticSynthLib.synthesis import RESIZE_CHUNK, prepare_classes  # noqa: E402

SAMPLE = REPO / "Resources" / "sample"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--big", default="512,512,300")
    parser.add_argument("--size", type=int, default=96, help="the model's slice size")
    args = parser.parse_args()
    seg, names = read_labelmap(SAMPLE / "seg_total.nii.gz")
    ct = read_image(SAMPLE / "ct.nii.gz")
    anatomy, mapping = class_set("anatomy"), named_mapping("full_range")
    classes, _ = prepare_classes(seg, names, "totalseg", reference=ct, classes=anatomy)
    shape = tuple(int(v) for v in args.big.split(","))
    orientation = AxialOrientation.from_affine(seg.affine)
    stack = orientation.to_stack(upsample(classes.array, shape, True).astype(np.uint8))
    real = orientation.to_stack(upsample(ct.array.astype(np.float32), shape, False))
    resize = PlaneResize(stack.shape[1], stack.shape[2], args.size)
    parts = [np.arange(i, min(i + RESIZE_CHUNK, len(stack))) for i in range(0, len(stack), RESIZE_CHUNK)]
    low = [hu_to_model(resize, torch.from_numpy(real[p]), mapping.hu_range) for p in parts]
    rows = []

    def timed(label: str, run) -> None:
        tic, cpu = time.perf_counter(), time.process_time()
        run()
        rows.append((label, time.perf_counter() - tic, time.process_time() - cpu))

    timed("plain upsampling (what the correction replaces)",
          lambda: [hu_from_model(resize, low_p, mapping.hu_range) for low_p in low])
    estimate = ClassValues(len(anatomy.classes), resize)
    timed("class values (GTM)", lambda: [estimate.add(stack[p], low_p) for p, low_p in zip(parts, low)])
    values = estimate.solve(mapping.hu_range)
    timed("restored slices", lambda: [restore_boundaries(stack[p], low_p, resize, values, mapping.hu_range)
                                      for p, low_p in zip(parts, low)])
    print(f"Segmentation {' x '.join(map(str, shape))}, {len(np.unique(stack))} classes present, model grid "
          f"{args.size} px, {torch.get_num_threads()} torch thread(s)\n")
    print("| step | wall s | CPU s |\n|---|---:|---:|")
    for label, wall, cpu in rows:
        print(f"| {label} | {wall:.1f} | {cpu:.1f} |")


if __name__ == "__main__":
    main()
