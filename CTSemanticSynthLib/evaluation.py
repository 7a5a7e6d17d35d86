"""Score one synthetic CT against its segmentation (and the real CT when there is one) -> a JSON-safe report.

The segmentation is mapped onto the class set the synthetic CT's provenance records (the paper's without one). Per
class (:func:`scored_classes`: the paper's 15 organs; in a richer set every class, body included): voxels, mean HU
of the real CT (clipped to the range of the model's intensity mapping: L40/W400 for the paper's models) and of the
synthetic CT; in a richer set also their difference and, for the classes that hold gas, the means where the real CT
is air (:func:`means_where_air`). With ``totalseg`` the Dice of TotalSegmentator's structures on the synthetic CT
(and on the real CT, the ceiling) against the input labels, both in the same class set; TotalSegmentator sees the
real CT with the synthetic CT's intensity handling (:func:`like_synthetic`), so the two columns compare like with
like. Over the axial slices that hold body or organs: PSNR and SSIM on the paper's definition (256 x 256, L40/W400
-> [0, 1]); the stripe index (slice-to-slice consistency, see :mod:`.metrics.consistency`); with ``fid`` also FID
per plane (axial, coronal, sagittal) and the gap between the planes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import __version__
from .errors import InputError
from .intensity import PAPER_WINDOW, IntensityMapping, mapping_from_config
from .labels import BACKGROUND, ORGANS, PAPER, ClassSet, class_set as named_class_set

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


GAS_CLASSES = ("lung", "small_bowel", "colon")
"""Classes whose real voxels are often air or gas: a report also gives their mean HU where the real CT is air."""
AIR_BELOW_HU = -500.0
"""Real-CT voxels below this are air (lung, bowel gas) for :func:`means_where_air`."""


def beyond_organs(class_set: ClassSet) -> bool:
    """Whether ``class_set`` names structures besides the 15 organs, so that its body class is fat and unlabelled
    tissue: its report adds the body, the synthetic - real difference and the means where the real CT is air (the
    paper set's report keeps its layout; there body is also bone, muscle, bowel and lung, and its mean says nothing)."""
    return len(class_set.labelled) > len(ORGANS)


def scored_classes(class_set: ClassSet = PAPER) -> tuple[int, ...]:
    """The classes a report lists, in report order: every class but background and body, then body where
    :func:`beyond_organs`."""
    return (*class_set.labelled, class_set.body) if beyond_organs(class_set) else class_set.labelled


def means_where_air(volumes: Mapping[str, np.ndarray], real_hu: np.ndarray, classes: np.ndarray,
                    class_set: ClassSet) -> dict[str, dict[str, float]]:
    """``{class: {"voxels": n, key: mean of volumes[key], ...}}`` over the voxels of each of ``class_set``'s
    GAS_CLASSES where ``real_hu`` (the real CT as it is) is below AIR_BELOW_HU; classes without such a voxel are left
    out."""
    air = real_hu < AIR_BELOW_HU
    out: dict[str, dict[str, float]] = {}
    for name in (n for n in GAS_CLASSES if n in class_set.classes):
        mask = air & (classes == class_set.classes.index(name))
        if mask.any():
            out[name] = {"voxels": int(np.count_nonzero(mask)),
                         **{key: float(volume[mask].mean()) for key, volume in volumes.items()}}
    return out


def recorded_model(synthetic: Path) -> tuple[dict[str, Any] | None, ClassSet, IntensityMapping]:
    """A synthetic CT's provenance record (None without a readable sidecar) and the class set and intensity mapping
    it records; without a record the paper's set and window. InputError for a record that names neither properly."""
    from .provenance import read_sidecar, sidecar_path

    provenance = read_sidecar(synthetic)
    record = provenance or {}
    try:
        classes = named_class_set(str(record.get("class_set", "paper")))
        return provenance, classes, mapping_from_config(record if "intensity" in record else {})
    except (InputError, ValueError) as exc:
        raise InputError(f"the provenance of --synthetic ({sidecar_path(synthetic)}): {exc}") from None


def evaluate_case(synthetic: Volume, classes: Volume, real: Volume | None = None, *, totalseg: bool = False,
                  fast: bool = True, fid: bool = False, inception: Path | None = None, device: str = "auto",
                  progress: Progress | None = None, save_totalseg: Path | None = None,
                  overwrite: bool = False, intensity: IntensityMapping = PAPER_WINDOW,
                  class_set: ClassSet = PAPER, dice_classes: Iterable[int] | None = None) -> dict[str, Any]:
    """All metrics for one case; ``classes`` holds classes of ``class_set`` (body included) on the CT grid.

    ``dice_classes`` are the classes TotalSegmentator's Dice scores (the labels' ``MappingReport.expressible``;
    default every labelled class). ``save_totalseg`` writes TotalSegmentator's structures on the synthetic CT there
    (with ``totalseg``). The real CT's HU are taken within ``intensity``'s range (the model's mapping: no synthetic
    value can leave it).
    """
    from .metrics.consistency import plane_fid_gap, stripe_index
    from .metrics.image import SLICE_SIZE, axial_unit_slices, psnr, ssim, summarize
    from .preprocess import AxialOrientation

    for name, vol in (("synthetic", synthetic), ("real", real)):
        if vol is not None and not vol.same_grid(classes, atol=1e-3):
            raise InputError(f"the {name} CT is not on the segmentation's grid: resample it or give the matching files")
    scored = scored_classes(class_set)
    report: dict[str, Any] = {"voxels": {class_set.classes[c]: int(np.count_nonzero(classes.array == c))
                                         for c in scored},
                              "hu_synthetic": hu_per_class(synthetic.array, classes.array, scored, class_set)}
    stack = AxialOrientation.from_affine(classes.affine).to_stack(classes.array)
    active = np.flatnonzero(stack.reshape(len(stack), -1).any(axis=1))
    if real is not None:
        clipped = intensity.clipped(real.array)
        report["hu_real"] = hu_per_class(clipped, classes.array, scored, class_set)
        report["hu_real_range"] = list(intensity.hu_range)
        if beyond_organs(class_set):
            report["hu_difference"] = {name: stats["mean"] - report["hu_real"][name]["mean"]
                                       for name, stats in report["hu_synthetic"].items()}
            report["hu_where_air"] = means_where_air({"real": clipped, "synthetic": synthetic.array}, real.array,
                                                     classes.array, class_set)
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
        scores = totalseg_dice(synthetic, classes, real_shown, fast=fast, device=device, progress=progress,
                               class_set=class_set, classes=dice_classes)
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
    """Read the files and :func:`evaluate_case` them in the class set and intensity mapping the synthetic CT's
    provenance records (:func:`recorded_model`); the report also names the inputs and carries that record (None when
    it has no readable sidecar)."""
    from .grid import onto_grid
    from .io import read_ct, read_labelmap
    from .synthesis import prepare_classes

    if fid and real is None:
        raise InputError("--fid needs --real: FID compares the synthetic CT with the real one")
    provenance, class_set, intensity = recorded_model(synthetic)
    if totalseg:  # fail before any work when TotalSegmentator or its weights are missing
        from .totalseg import check_totalsegmentator

        check_totalsegmentator(fast=fast)
    segmentation, names = read_labelmap(seg)
    note = None if progress is None else (lambda message: progress(f"note: {message}"))
    synthetic_volume = onto_grid(read_ct(synthetic, f"--synthetic {synthetic}"), segmentation, "image",
                                 f"--synthetic {synthetic}", note)
    real_volume = None if real is None else onto_grid(read_ct(real, f"--real {real}"), segmentation, "image",
                                                      f"--real {real}", note)
    classes, mapping = prepare_classes(segmentation, names, labels, reference=real_volume, classes=class_set)
    report = evaluate_case(synthetic_volume, classes, real_volume, totalseg=totalseg, fast=fast, fid=fid,
                           inception=inception, device=device, progress=progress, save_totalseg=save_totalseg,
                           overwrite=overwrite, intensity=intensity, class_set=class_set,
                           dice_classes=mapping.expressible)
    report["inputs"] = {"synthetic": str(synthetic), "segmentation": str(seg),
                        "real": None if real is None else str(real), "labels": mapping.adapter,
                        "unknown_labels": {str(k): v for k, v in mapping.unknown.items()}}
    report["synthetic_provenance"] = provenance
    report["generator"] = f"CTSemanticSynth {__version__}"
    return report
