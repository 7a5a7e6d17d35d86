"""Score one synthetic CT against its segmentation (and the real CT when there is one) -> a JSON-safe report.

Per organ: voxels, mean HU of the real CT (clipped to the range of the model's intensity mapping: L40/W400 for the
paper's models) and of the synthetic CT, and with
``totalseg`` the Dice of TotalSegmentator's organs on the synthetic CT (and on the real CT, the ceiling) against
the input labels; TotalSegmentator sees the real CT with the synthetic CT's intensity handling (:func:`like_synthetic`),
so the two columns compare like with like. Over the axial slices that hold body or organs: PSNR and SSIM on the paper's definition
(256 x 256, L40/W400 -> [0, 1]); the stripe index (slice-to-slice consistency, see :mod:`.metrics.consistency`);
with ``fid`` also FID per plane (axial, coronal, sagittal) and the gap between the planes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import __version__
from .errors import InputError
from .intensity import PAPER_WINDOW, IntensityMapping, mapping_from_config
from .labels import BACKGROUND, MODEL_CLASSES, ORGANS, PAPER, ClassSet

if TYPE_CHECKING:  # the heavy modules (torch, SimpleITK) load only when a case is evaluated
    from .io import Volume

Progress = Callable[[str], None]


def totalseg_intensity(intensity: IntensityMapping = PAPER_WINDOW) -> str:
    """How TotalSegmentator sees both CTs (the report's ``totalseg.intensity``)."""
    low, high = intensity.hu_range
    return f"both CTs as synthesis writes them: the body clipped to {low:g}..{high:g} HU ({intensity.name}), air outside"


def like_synthetic(hu: np.ndarray, classes: np.ndarray, intensity: IntensityMapping = PAPER_WINDOW) -> np.ndarray:
    """A real CT handled as synthesis writes a synthetic one: the body (``classes`` > 0) clipped to the model's
    mapping (:meth:`~.intensity.IntensityMapping.clipped`), air outside it."""
    from .preprocess import AIR_HU

    return np.where(classes == BACKGROUND, AIR_HU, np.rint(intensity.clipped(hu))).astype(np.int16)


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinite floats (no score; PSNR of identical slices) as None, for strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def hu_per_class(hu: np.ndarray, classes: np.ndarray, indices: Iterable[int] = ORGANS,
                 class_set: ClassSet = PAPER) -> dict[str, dict[str, float]]:
    """``{class name: {"mean", "std"}}`` of ``hu`` over each class in ``indices`` of ``class_set`` (NaN where a class
    has no voxel). Give a real CT through the model's :meth:`~.intensity.IntensityMapping.clipped`."""
    out = {}
    for c in indices:
        voxels = hu[classes == c]
        out[class_set.classes[c]] = ({"mean": float(voxels.mean()), "std": float(voxels.std())} if voxels.size
                                     else {"mean": math.nan, "std": math.nan})
    return out


def evaluate_case(synthetic: Volume, classes: Volume, real: Volume | None = None, *, totalseg: bool = False,
                  fast: bool = True, fid: bool = False, inception: Path | None = None, device: str = "auto",
                  progress: Progress | None = None, save_totalseg: Path | None = None,
                  overwrite: bool = False, intensity: IntensityMapping = PAPER_WINDOW) -> dict[str, Any]:
    """All metrics for one case; ``classes`` holds model classes (body included) on the CT grid.

    ``save_totalseg`` writes TotalSegmentator's organs on the synthetic CT there (with ``totalseg``). The real CT's
    organ HU are taken within ``intensity``'s range (the model's mapping: no synthetic value can leave it).
    """
    from .metrics.consistency import plane_fid_gap, stripe_index
    from .metrics.image import SLICE_SIZE, axial_unit_slices, psnr, ssim, summarize
    from .preprocess import AxialOrientation

    for name, vol in (("synthetic", synthetic), ("real", real)):
        if vol is not None and not vol.same_grid(classes, atol=1e-3):
            raise InputError(f"the {name} CT is not on the segmentation's grid: resample it or give the matching files")
    report: dict[str, Any] = {"voxels": {MODEL_CLASSES[c]: int(np.count_nonzero(classes.array == c)) for c in ORGANS},
                              "hu_synthetic": hu_per_class(synthetic.array, classes.array)}
    stack = AxialOrientation.from_affine(classes.affine).to_stack(classes.array)
    active = np.flatnonzero(stack.reshape(len(stack), -1).any(axis=1))
    if real is not None:
        report["hu_real"] = hu_per_class(intensity.clipped(real.array), classes.array)
        report["hu_real_range"] = list(intensity.hu_range)
        if progress is not None:
            progress(f"PSNR/SSIM over {len(active)} axial slices")
        a = axial_unit_slices(real.array, real.affine, active)
        b = axial_unit_slices(synthetic.array, synthetic.affine, active)
        report["image"] = {"slices": int(len(active)), "size": SLICE_SIZE, "psnr": summarize(psnr(a, b)),
                           "ssim": summarize(ssim(a, b))}
        report["consistency"] = stripe_index(synthetic, real, classes, intensity)
        if fid:
            from .metrics.inception import InceptionFeatures
            from .metrics.planes import per_plane_fid
            from .device import select_device

            features = InceptionFeatures(inception, device=select_device(device))
            if progress is not None:
                progress("FID per plane (Inception features of every view)")
            report["fid_per_plane"] = per_plane_fid([real], [synthetic], features, masks=[classes])
            report["fid_plane_gap"] = plane_fid_gap({p: v["fid"] for p, v in report["fid_per_plane"].items()})
            report["inception"] = {"path": str(features.path), "sha1": features.sha1}
    elif fid:
        raise InputError("--fid needs --real: FID compares the synthetic CT with the real one")
    if totalseg:
        from .io import Volume
        from .totalseg import totalseg_dice

        real_shown = None if real is None else Volume(like_synthetic(real.array, classes.array, intensity),
                                                      real.affine)
        scores = totalseg_dice(synthetic, classes, real_shown, fast=fast, device=device, progress=progress)
        report["totalseg"] = {**scores.to_dict(), "intensity": totalseg_intensity(intensity)}
        if save_totalseg is not None and scores.predicted_synthetic is not None:
            from .io import write_volume

            write_volume(Volume(scores.predicted_synthetic.astype(np.uint8), synthetic.affine), save_totalseg,
                         overwrite=overwrite)
    return report


def evaluate_files(synthetic: Path, seg: Path, real: Path | None = None, *, labels: str = "auto",
                   totalseg: bool = False, fast: bool = True, fid: bool = False, inception: Path | None = None,
                   device: str = "auto", progress: Progress | None = None, save_totalseg: Path | None = None,
                   overwrite: bool = False) -> dict[str, Any]:
    """Read the files and :func:`evaluate_case` them; the report also names the inputs and carries the synthetic
    CT's provenance record (None when it has no readable sidecar)."""
    from .grid import onto_grid
    from .io import read_ct, read_labelmap
    from .provenance import read_sidecar
    from .synthesis import prepare_classes

    if fid and real is None:
        raise InputError("--fid needs --real: FID compares the synthetic CT with the real one")
    if totalseg:  # fail before any work when TotalSegmentator or its weights are missing
        from .totalseg import check_totalsegmentator

        check_totalsegmentator(fast=fast)
    segmentation, names = read_labelmap(seg)
    note = None if progress is None else (lambda message: progress(f"note: {message}"))
    synthetic_volume = onto_grid(read_ct(synthetic, f"--synthetic {synthetic}"), segmentation, "image",
                                 f"--synthetic {synthetic}", note)
    real_volume = None if real is None else onto_grid(read_ct(real, f"--real {real}"), segmentation, "image",
                                                      f"--real {real}", note)
    classes, mapping = prepare_classes(segmentation, names, labels)
    provenance = read_sidecar(synthetic)
    intensity = mapping_from_config(provenance if provenance and "intensity" in provenance else {})
    report = evaluate_case(synthetic_volume, classes, real_volume, totalseg=totalseg, fast=fast, fid=fid,
                           inception=inception, device=device, progress=progress, save_totalseg=save_totalseg,
                           overwrite=overwrite, intensity=intensity)
    report["inputs"] = {"synthetic": str(synthetic), "segmentation": str(seg),
                        "real": None if real is None else str(real), "labels": mapping.adapter,
                        "unknown_labels": {str(k): v for k, v in mapping.unknown.items()}}
    report["synthetic_provenance"] = provenance
    report["generator"] = f"CTSemanticSynth {__version__}"
    return report
