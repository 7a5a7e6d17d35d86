"""Paper-style evaluation (arXiv 2312.06453, Tables 1-2): FID/KID, PSNR/SSIM and TotalSegmentator Dice.

    python -m training.evaluate --model runs/mask/model --data cache/amos256 --split test --out eval/amos
    python -m training.evaluate --model pix2pix=runs/pix2pix/model --model spade=runs/spade/model \
        --model oasis=runs/oasis/model --model concat=runs/concat/model --data cache/amos256 --out eval/all
    python -m training.evaluate --model concat=runs/a/model --model mask=runs/b/model --data cache/amos256 \
        --volumes-images amos/imagesVa --volumes-labels amos/labelsVa --convention amos --totalseg \
        --preset paper --device cuda --out eval/amos

Models are diffusion models or one-pass GAN baselines (``kind: generator``, from training/train_gan.py: one forward
per slice, the sampler options do not apply); each lands in one table beside its row of the paper's Table 2
(``CTSemanticSynthLib.metrics.paper``), and in one column of the figure.
Slices: every test slice of the cache (or ``--max-slices``, evenly spread) is sampled with each model's preset
through ``CTSemanticSynthLib.synthesis.synthesize`` (per-slice seeds), in chunks saved under
``OUT/samples/<model>-<key>/``, so an interrupted run resumes; a change of model, preset, steps, seed, chunk or
slice set gets a new folder. A 2.5D model, or slice agreement, needs a slice's neighbours: those are taken from the
slice's own case and sampled with it (up to 2 x 4 more slices per slice with ``--max-slices``; see
``pseudo_volume``). Real and synthetic slices are compared at 256 x 256 in [0, 1] through the model's intensity
mapping (L40/W400 for the paper's models; the cache must hold the model's class set and mapping): PSNR and SSIM per
slice, FID/KID over the Inception features of the sets.
Volumes (optional): CT/label pairs are synthesized whole (cached as NIfTI under ``OUT/volumes/``), scored with
TotalSegmentator (Dice per labelled class of the model's set that the --convention can hold: AMOS labels hold
no ribs, so those are left out and named in the notes; ``dice_mean`` over the paper's 14 organs and, for a set beyond
the paper's, ``dice_mean_all`` over all its scored classes; on the real CT too, the ceiling), with FID per plane
(and the gap between planes) and with the stripe index (slice-to-slice consistency, 1.0 = like the real CT; mean over
the cases), both in the model's mapping; their classes are the model's set, the body taken from the CT.
Writes ``OUT/results.{md,csv,json}`` (the paper's numbers in adjacent columns; replaced on each run) and
``OUT/figure.png`` (mask | real | each model, and per-organ Dice bars) when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from CTSemanticSynthLib import __version__
from CTSemanticSynthLib.checkpoint import LoadedModel, load_model
from CTSemanticSynthLib.device import select_device
from CTSemanticSynthLib.diffusion.slice_agreement import neighbour_weights
from CTSemanticSynthLib.errors import CTSynthError, InputError
from CTSemanticSynthLib.evaluation import json_safe
from CTSemanticSynthLib.io import (Volume, atomic_outputs, read_ct, read_image, read_labelmap, write_bytes,
                                   write_volume)
from CTSemanticSynthLib.intensity import IntensityMapping
from CTSemanticSynthLib.labels import ClassSet, MappingReport
from CTSemanticSynthLib.metrics import InceptionFeatures, fid, kid, mean_dice, psnr, ssim, summarize, to_model_slices
from CTSemanticSynthLib.metrics.consistency import plane_fid_gap, stripe_index
from CTSemanticSynthLib.metrics.paper import PAPER_ORGANS, csv_rows, to_csv, to_markdown
from CTSemanticSynthLib.metrics.planes import PLANES, plane_slices
from CTSemanticSynthLib.preprocess import AxialOrientation, body_mask_from_ct
from CTSemanticSynthLib.progress import ProgressDisplay
from CTSemanticSynthLib.slice_context import network_context
from CTSemanticSynthLib.synthesis import SamplingOptions, prepare_classes, preset_options, synthesize
from CTSemanticSynthLib.totalseg import check_totalsegmentator, totalseg_dice

from .dataset import SliceCache
from .prepare import paired_cases

logger = logging.getLogger("training.evaluate")
PREFIX = "evaluate:"
EVAL_SIZE = 256
# A voxel grid whose axial stack is the array itself (slices, rows, columns): cached slices pass through
# synthesize() unchanged (AxialOrientation identity, PlaneResize identity at the model size).
STACK_AFFINE = np.array([[0.0, 0.0, -1.0, 0.0], [0.0, -1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])


@dataclass
class Entry:
    """One model under evaluation: its loaded weights, sampling options and sample folder."""

    name: str
    model: LoadedModel
    options: SamplingOptions
    folder: Path
    volume_folder: Path


def _digest(value: Any) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_outputs(path, overwrite=True) as (tmp,), open(tmp, "wb") as f:
        np.save(f, array)


def _cached(path: Path, compute) -> np.ndarray:
    if path.is_file():
        return np.load(path)
    value = compute()
    _save_npy(path, value)
    return value


def select_rows(n: int, max_slices: int) -> np.ndarray:
    """All row indices, or ``max_slices`` of them evenly spread."""
    if max_slices <= 0 or max_slices >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max_slices).round().astype(int))


def parse_model(spec: str) -> tuple[str | None, str]:
    """``NAME=PATH`` or ``PATH`` (the name then comes from the model's config)."""
    name, sep, path = spec.partition("=")
    return (name, path) if sep and name and not Path(spec).exists() else (None, spec)


def neighbour_margin(model: LoadedModel, options: SamplingOptions) -> int:
    """Slices on each side of a test slice that its sample depends on: a 2.5D network's ``context_slices`` (their
    classes) and, with slice agreement, twice the agreement's reach (their samples, blended at every step)."""
    agreement = 2 * max(neighbour_weights()) if options.slice_agreement and model.kind == "diffusion" else 0
    return max(network_context(model.model), agreement)


def pseudo_volume(cache: SliceCache, picks: list[tuple[str, int]], margin: int) -> tuple[np.ndarray, list[int]]:
    """The class slices [N, S, S] to sample for the (case, slice) ``picks`` along one axis, and where each pick lies.

    With ``margin`` m > 0 every pick comes with its case's slices within m (those the case has), runs of one case's
    consecutive slices stay neighbours, and other runs are m + 1 empty (skipped) slices apart, so that a pick's
    neighbours are its real ones, never another case's. With m = 0 the picks are laid side by side in order.
    """
    wanted: dict[tuple[str, int], None] = {}
    for case, index in picks:
        for k in range(index - margin, index + margin + 1):
            if 0 <= k < len(cache.case_classes(case)):
                wanted[case, k] = None
    case_rank = {case: rank for rank, case in enumerate(dict.fromkeys(case for case, _ in picks))}
    order = sorted(wanted, key=lambda key: (case_rank[key[0]], key[1])) if margin else list(wanted)
    position: dict[tuple[str, int], int] = {}
    previous = None
    for key in order:
        step = 1 if not margin or previous == (key[0], key[1] - 1) else margin + 2
        position[key] = 0 if previous is None else position[previous] + step
        previous = key
    stack = np.zeros((position[previous] + 1, *cache.case_classes(picks[0][0]).shape[1:]), dtype=np.uint8)
    for (case, index), at in position.items():
        stack[at] = cache.case_classes(case)[index]
    return stack, [position[pick] for pick in picks]


def sample_chunk(entry: Entry, cache: SliceCache, picks: list[tuple[str, int]], chunk_index: int,
                 device: torch.device) -> np.ndarray:
    """Synthetic [0, 1] slices (float16, in the model's intensity mapping, as the cache holds the real ones) for a
    chunk of (case, slice) picks, each sampled with its real neighbours where the model or the options look at
    neighbours (:func:`neighbour_margin`)."""
    stack, at = pseudo_volume(cache, picks, neighbour_margin(entry.model, entry.options))
    options = replace(entry.options, seed=entry.options.seed * 100_003 + chunk_index)
    result = synthesize(Volume(stack, STACK_AFFINE), entry.model, options, device=device)
    return entry.model.intensity.to_unit(result.volume.array[at]).astype(np.float16)


def sample_all(entries: list[Entry], cache: SliceCache, rows: np.ndarray, chunk: int, device: torch.device) -> None:
    """Make sure every chunk of every model is sampled (resumes from the chunk files already there)."""
    for entry in entries:
        todo = [c for c in range(math.ceil(len(rows) / chunk)) if not (entry.folder / f"chunk_{c:05d}.npy").is_file()]
        done = len(rows) - sum(len(rows[c * chunk:(c + 1) * chunk]) for c in todo)
        with ProgressDisplay(PREFIX, f"sampling {entry.name}", "slice", total=len(rows), done=done) as display:
            for c in todo:
                index = rows[c * chunk:(c + 1) * chunk]
                picks = [cache.rows[i] for i in index]
                _save_npy(entry.folder / f"chunk_{c:05d}.npy", sample_chunk(entry, cache, picks, c, device))
                display.update(display.done + len(index))


def slice_metrics(entries: list[Entry], cache: SliceCache, rows: np.ndarray, chunk: int, out: Path,
                  extractor: InceptionFeatures | None) -> dict[str, dict[str, Any]]:
    """PSNR/SSIM per slice and FID/KID per model, at EVAL_SIZE, from the cached chunks."""
    real_dir = out / "real" / f"features-{_digest([cache.rows[i] for i in rows])}-c{chunk}"
    real_dir.mkdir(parents=True, exist_ok=True)
    tag = extractor.sha1[:8] if extractor is not None else ""  # features of another network are not reused
    per = {e.name: {"psnr": [], "ssim": [], "features": []} for e in entries}
    real_features = []
    chunks = math.ceil(len(rows) / chunk)
    with ProgressDisplay(PREFIX, "metrics", "chunk", total=chunks) as display:
        for c in range(chunks):
            images, _ = cache.batch(rows[c * chunk:(c + 1) * chunk].tolist())
            real = to_model_slices((images[:, 0] + 1) / 2, EVAL_SIZE)
            if extractor is not None:
                real_features.append(_cached(real_dir / f"feat_{tag}_{c:05d}.npy", lambda: extractor(real)))
            for e in entries:
                syn = to_model_slices(torch.from_numpy(np.load(e.folder / f"chunk_{c:05d}.npy").astype(np.float32)),
                                      EVAL_SIZE)
                per[e.name]["psnr"].append(psnr(real, syn))
                per[e.name]["ssim"].append(ssim(real, syn))
                if extractor is not None:
                    features = _cached(e.folder / f"feat_{tag}_{c:05d}.npy", lambda: extractor(syn))
                    per[e.name]["features"].append(features)
            display.update(c + 1)
    results = {}
    for e in entries:
        p, s = summarize(np.concatenate(per[e.name]["psnr"])), summarize(np.concatenate(per[e.name]["ssim"]))
        r = {"n_slices": int(len(rows)), "psnr": p["mean"], "psnr_std": p["std"], "ssim": s["mean"],
             "ssim_std": s["std"]}
        if extractor is not None and len(rows) >= 2:
            fr, fs = np.concatenate(real_features), np.concatenate(per[e.name]["features"])
            r["fid"] = fid(fr, fs)
            r["kid"], r["kid_std"] = kid(fr, fs)
        results[e.name] = r
    return results


def _case_classes(ct: Volume, seg: Volume, names: dict[int, str], convention: str,
                  classes: ClassSet) -> tuple[Volume, MappingReport]:
    """Classes of ``classes`` with the body from the CT (threshold + morphology), as training.prepare makes them,
    and the mapping's report."""
    orientation = AxialOrientation.from_affine(ct.affine)
    body = orientation.from_stack(body_mask_from_ct(orientation.to_stack(ct.array)))
    return prepare_classes(seg, names, convention, Volume(body.astype(np.uint8), seg.affine), classes=classes)


def _plane_features(extractor: InceptionFeatures, ct: Volume, mask: Volume, folder: Path, stem: str,
                    intensity: IntensityMapping) -> dict:
    """Inception features of each plane's views of ``ct`` in ``intensity`` (a file per plane; a mapping other than
    the paper's window is part of the name)."""
    stem = stem if intensity.name == "paper_window" else f"{stem}.{intensity.name}"
    return {p: _cached(folder / f"{stem}.{p}.{extractor.sha1[:8]}.npy",
                       lambda p=p: extractor(plane_slices(ct, p, mask=mask, intensity=intensity))) for p in PLANES}


def dice_means(scores: list[dict[str, float]]) -> dict[str, float]:
    """Mean Dice per class over the cases that scored it (NaN: absent from both sides; a class a case's labels cannot
    hold is not in its scores), classes in first-scored order."""
    out = {}
    for name in dict.fromkeys(name for case in scores for name in case):
        values = [case[name] for case in scores if name in case and not math.isnan(case[name])]
        out[name] = float(np.mean(values)) if values else math.nan
    return out


def evaluate_volumes(entries: list[Entry], args: argparse.Namespace, device: torch.device,
                     extractor: InceptionFeatures | None, cache: SliceCache
                     ) -> tuple[dict[str, dict[str, Any]], dict[str, float] | None, list[str]]:
    """Synthesize each case with each model (classes of the cache's set, the models' own); TotalSegmentator Dice
    (of the classes the labels' convention can hold), the stripe index and FID per plane in the cache's intensity
    mapping. Returns (per model, ceiling, the classes Dice left out of some case)."""
    cases = paired_cases(args.volumes_images, args.volumes_labels, "test")
    if args.totalseg:
        check_totalsegmentator(fast=not args.totalseg_full)
    mode = "full" if args.totalseg_full else "fast"
    real_dir = args.out / "volumes" / "real"
    real_dir.mkdir(parents=True, exist_ok=True)
    dice = {e.name: [] for e in entries}
    stripes: dict[str, list[float]] = {e.name: [] for e in entries}
    ceiling: list[dict[str, float]] = []
    feats: dict[str, dict[str, list]] = {n: {p: [] for p in PLANES} for n in ["real", *dice]}
    left_out: dict[str, None] = {}

    def ts_scores(path: Path, ct: Volume, classes: Volume, mapping: MappingReport) -> dict[str, float]:
        """Dice of the labelled classes of the cache's set that the labels can hold, kept in ``path``; a file that
        scored other classes (an earlier version's, another set's) is scored again."""
        expressible = mapping.expressible
        left_out.update((cache.class_set.classes[c], None) for c in cache.class_set.labelled if c not in expressible)
        if path.is_file():
            saved = json.loads(path.read_text(encoding="utf-8"))
            if set(saved) == {cache.class_set.classes[c] for c in expressible}:
                return {k: (math.nan if v is None else v) for k, v in saved.items()}
        scores = totalseg_dice(ct, classes, fast=not args.totalseg_full, device=args.device,
                               class_set=cache.class_set, classes=expressible).synthetic
        write_bytes(path, json.dumps(json_safe(scores)).encode(), overwrite=True)
        return scores

    intensity = cache.intensity
    with ProgressDisplay(PREFIX, "volumes", "case", total=len(cases)) as overall, \
            ProgressDisplay(PREFIX, "volume", "slice", lines=False, position=1, leave=False) as volume:
        for done, case in enumerate(cases, start=1):
            ct, (seg, names) = read_ct(case.image, f"CT {case.image}"), read_labelmap(case.labels)
            if not ct.same_grid(seg, atol=1e-3):
                raise InputError(f"{case.labels} is not on the grid of {case.image}")
            classes, mapping = _case_classes(ct, seg, names, args.convention, cache.class_set)
            if args.totalseg:
                ceiling.append(ts_scores(real_dir / f"{case.case_id}.totalseg-{mode}.json", ct, classes, mapping))
            if extractor is not None:
                for p, f in _plane_features(extractor, ct, classes, real_dir, case.case_id, intensity).items():
                    feats["real"][p].append(f)
            for e in entries:
                folder = e.volume_folder
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / f"{case.case_id}.nii.gz"
                if not path.is_file():
                    overall.postfix(f"{case.case_id} {e.name}")
                    write_volume(synthesize(classes, e.model, e.options, device=device, progress=volume.update).volume,
                                 path)
                syn = read_image(path)
                stripes[e.name].append(stripe_index(syn, ct, classes, intensity)["stripe_index"])
                if args.totalseg:
                    dice[e.name].append(ts_scores(folder / f"{case.case_id}.totalseg-{mode}.json", syn, classes,
                                                  mapping))
                if extractor is not None:
                    for p, f in _plane_features(extractor, syn, classes, folder, case.case_id, intensity).items():
                        feats[e.name][p].append(f)
            overall.update(done)

    results: dict[str, dict[str, Any]] = {}
    for e in entries:
        r: dict[str, Any] = {"n_volumes": len(cases), "stripe_index": float(np.nanmean(stripes[e.name]))
                             if any(math.isfinite(v) for v in stripes[e.name]) else math.nan}
        if args.totalseg and cases:
            r["dice"] = dice_means(dice[e.name])
            r["dice_mean"] = mean_dice({o: r["dice"][o] for o in PAPER_ORGANS})
            if cache.class_set.name != "paper":
                r["dice_mean_all"] = mean_dice(r["dice"])
        if extractor is not None:
            r["fid_per_plane"] = {p: fid(np.concatenate(feats["real"][p]), np.concatenate(feats[e.name][p]))
                                  for p in PLANES}
            r["fid_plane_gap"] = plane_fid_gap(r["fid_per_plane"])
        results[e.name] = r
    return results, (dice_means(ceiling) if ceiling else None), list(left_out)


def write_figure(path: Path, cache: SliceCache, rows: np.ndarray, entries: list[Entry], chunk: int,
                 measured: list[dict[str, Any]], n_rows: int) -> bool:
    """mask | real | each model for ``n_rows`` slices, and per-organ Dice bars when measured; False if skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: %s not written (pip install matplotlib)", path.name)
        return False
    picks = select_rows(len(rows), n_rows)
    with_dice = [m for m in measured if m.get("dice")]
    fig = plt.figure(figsize=(2.2 * (2 + len(entries)), 2.2 * len(picks) + (3.0 if with_dice else 0)))
    grid = fig.add_gridspec(len(picks) + (1 if with_dice else 0), 2 + len(entries),
                            height_ratios=[1] * len(picks) + ([1.4] if with_dice else []))
    colours = np.asarray(cache.class_set.colors, dtype=np.uint8)
    for r, pick in enumerate(picks):
        images, classes = cache.batch([int(rows[pick])])
        chunk_index, offset = divmod(int(pick), chunk)
        panels = [("mask", colours[classes[0].numpy()]), ("real", (images[0, 0].numpy() + 1) / 2)]
        panels += [(e.name, np.load(e.folder / f"chunk_{chunk_index:05d}.npy")[offset].astype(np.float32))
                   for e in entries]
        for col, (title, img) in enumerate(panels):
            ax = fig.add_subplot(grid[r, col])
            ax.imshow(img, cmap=None if img.ndim == 3 else "gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_axis_off()
            if r == 0:
                ax.set_title(title, fontsize=9)
    if with_dice:
        ax = fig.add_subplot(grid[len(picks), :])
        width = 0.8 / len(with_dice)
        x = np.arange(len(PAPER_ORGANS))
        for i, m in enumerate(with_dice):
            ax.bar(x + i * width, [100 * m["dice"].get(o, math.nan) for o in PAPER_ORGANS], width, label=m["name"])
        ax.set_xticks(x + 0.4 - width / 2, [o.replace("_", " ") for o in PAPER_ORGANS], rotation=45, ha="right",
                      fontsize=7)
        ax.set_ylabel("TotalSegmentator DSC (%)")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_outputs(path, overwrite=True) as (tmp,):
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, metavar="[NAME=]DIR",
                        help="model folder or name; repeat to compare models")
    parser.add_argument("--data", type=Path, required=True, help="slice cache (training.prepare)")
    parser.add_argument("--split", default="test", help="cache split to evaluate (default test)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (resumed when it exists)")
    parser.add_argument("--preset", default="fast", help="sampling preset of each model: fast, balanced, paper")
    parser.add_argument("--steps", type=int, default=None, help="override the preset's number of steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16, help="slices sampled together (= chunk size)")
    parser.add_argument("--max-slices", type=int, default=0, help="evaluate this many slices, evenly spread (0 = all)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--inception", type=Path, default=None, help="TorchScript Inception-v3 file")
    parser.add_argument("--no-fid", action="store_true", help="skip FID/KID (no Inception file needed)")
    parser.add_argument("--volumes-images", type=Path, help="folder of test CT NIfTI files (with --volumes-labels)")
    parser.add_argument("--volumes-labels", type=Path, help="folder of their label maps, named like the CTs")
    parser.add_argument("--convention", default="amos", help="label convention of --volumes-labels (default amos)")
    parser.add_argument("--totalseg", action="store_true", help="TotalSegmentator Dice on the volumes")
    parser.add_argument("--totalseg-full", action="store_true", help="TotalSegmentator full mode (default fast)")
    parser.add_argument("--figure-rows", type=int, default=4, help="slices shown in figure.png")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="evaluate: %(message)s")
    try:
        if (args.volumes_images is None) != (args.volumes_labels is None):
            raise InputError("--volumes-images and --volumes-labels go together")
        if args.totalseg and args.volumes_images is None:
            raise InputError("--totalseg needs volumes: give --volumes-images and --volumes-labels")
        if args.batch_size < 1:
            raise InputError("--batch-size must be at least 1")
        device = select_device(args.device)
        cache = SliceCache(args.data, args.split)
        rows = select_rows(len(cache), args.max_slices)
        entries = []
        for spec in args.model:
            name, path = parse_model(spec)
            model = load_model(path, device=device)
            if model.image_size != cache.image_size:
                raise InputError(f"model {path} works at {model.image_size} px but {args.data} holds "
                                 f"{cache.image_size} px slices; prepare a cache at the model's size")
            if (model.class_set, model.intensity) != (cache.class_set, cache.intensity):
                raise InputError(f"model {path} works in the '{model.class_set.name}' class set and the "
                                 f"{model.intensity.name} mapping but {args.data} holds '{cache.class_set.name}' "
                                 f"classes in {cache.intensity.name}; prepare a cache with the model's --class-set "
                                 "and --intensity")
            options = preset_options(model.config, args.preset, steps=args.steps, seed=args.seed, batch_size=args.batch_size)
            key = {"sha256": model.sha256, "options": asdict(options), "split": args.split,
                   "rows": [cache.rows[i] for i in rows], "chunk": args.batch_size, "version": 1}
            margin = neighbour_margin(model, options)
            if margin:  # sampled with real neighbours (before: with the chunk's rows)
                key["neighbour_margin"] = margin
            folder = args.out / "samples" / f"{name or model.name}-{_digest(key)}"
            folder.mkdir(parents=True, exist_ok=True)
            write_bytes(folder / "key.json", json.dumps({k: v for k, v in key.items() if k != "rows"}, indent=1).encode(),
                        overwrite=True)
            volumes = args.out / "volumes" / f"{name or model.name}-{_digest([model.sha256, asdict(options)])}"
            entries.append(Entry(name or model.name, model, options, folder, volumes))
        if len({e.name for e in entries}) != len(entries):
            raise InputError("two --model entries have the same name: use NAME=DIR")
        extractor = None if args.no_fid else InceptionFeatures(args.inception, device=device)
        sample_all(entries, cache, rows, args.batch_size, device)
        results = slice_metrics(entries, cache, rows, args.batch_size, args.out, extractor)
        ceiling, left_out = None, []
        if args.volumes_images is not None:
            volume_results, ceiling, left_out = evaluate_volumes(entries, args, device, extractor, cache)
            for name, r in volume_results.items():
                results[name].update(r)
        measured = [{"name": e.name, "kind": e.model.kind, "conditioning": e.model.conditioning,
                     "model": str(e.model.path),
                     "sha256": e.model.sha256, "sampling": asdict(e.options), **results[e.name]} for e in entries]
        settings = {"data": str(args.data), "split": args.split, "slices": int(len(rows)), "size": EVAL_SIZE,
                    "preset": args.preset, "device": str(device), "library_version": __version__,
                    "inception": None if extractor is None else {"path": str(extractor.path), "sha1": extractor.sha1},
                    "totalseg": ("full" if args.totalseg_full else "fast") if args.totalseg else None}
        if left_out:
            settings["dice_not_expressible"] = (f"{', '.join(left_out)} (not scored: the --convention "
                                                f"{args.convention} labels cannot hold them)")
        notes = [f"{k}: {v}" for k, v in settings.items()]
        notes.append("FID/KID from few slices are biased upward; compare only runs with the same slice count")
        for m in measured:
            if "stripe_index" in m:
                gap = m.get("fid_plane_gap", {}).get("max_gap", math.nan)
                notes.append(f"{m['name']}: stripe index {m['stripe_index']:.3f} (1.0 = as consistent from slice to "
                             f"slice as the real CT), largest FID gap between planes {gap:.2f}")
        write_bytes(args.out / "results.json", (json.dumps(json_safe({"settings": settings, "models": measured,
                    "totalseg_real_ceiling": ceiling}), indent=2) + "\n").encode(), overwrite=True)
        write_bytes(args.out / "results.csv", to_csv(csv_rows(measured)).encode(), overwrite=True)
        write_bytes(args.out / "results.md", to_markdown(measured, ceiling, notes).encode(), overwrite=True)
        figure = write_figure(args.out / "figure.png", cache, rows, entries, args.batch_size, measured,
                              args.figure_rows)
    except CTSynthError as exc:
        print(f"evaluate: error: {exc}", file=sys.stderr)
        return 2
    print(f"evaluate: wrote results.md, results.csv, results.json{', figure.png' if figure else ''} to {args.out}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
