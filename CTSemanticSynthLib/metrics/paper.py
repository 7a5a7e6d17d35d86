"""The paper's published numbers (arXiv 2312.06453, Table 2) and results tables that put measured values beside them.

Published: FID, PSNR (dB), SSIM over the AMOS22 CT validation slices (6559 slices, 256 x 256, L40/W400) and
TotalSegmentator Dice (%) per organ on the synthetic volumes (14 organs; prostate/uterus is not reported).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..labels import PAPER
from .dice import mean_dice

PAPER_ORGANS: tuple[str, ...] = (
    "spleen", "liver", "kidney_left", "kidney_right", "pancreas", "stomach", "aorta", "gallbladder", "esophagus",
    "adrenal_gland_right", "adrenal_gland_left", "duodenum", "inferior_vena_cava", "urinary_bladder",
)
"""Table 2's Dice columns in its order (Sple. Liv. Kid_l Kid_r Panc. Stom. Aorta Gall_bld. Espo. Adr_r. Adr_l.
Duod. Cava. Bladder), with this library's class names."""

_TABLE2 = {
    # method: (FID, PSNR, SSIM, Dice % in PAPER_ORGANS order)
    "Pix2Pix": (78.86, 15.04, 0.561, (79.3, 94.7, 94.5, 92.0, 68.8, 86.5, 80.8, 53.5, 67.9, 58.4, 61.8, 61.0, 75.9, 56.0)),
    "OASIS": (43.57, 14.75, 0.560, (91.8, 93.5, 92.0, 88.1, 73.4, 88.9, 88.6, 78.9, 80.1, 69.0, 75.6, 71.7, 86.3, 74.5)),
    "SPADE": (60.22, 15.27, 0.594, (92.6, 95.4, 92.7, 91.2, 66.6, 86.5, 86.2, 44.8, 65.6, 61.7, 59.3, 59.5, 79.1, 63.9)),
    "SDM": (12.68, 15.12, 0.607, (91.9, 94.3, 93.5, 93.2, 79.3, 87.8, 89.0, 71.9, 77.5, 69.7, 69.6, 66.7, 81.5, 66.2)),
    "Conditional DDPM": (10.56, 16.26, 0.646,
                         (94.0, 95.6, 93.9, 91.2, 76.3, 86.4, 90.8, 64.0, 78.2, 67.2, 66.0, 65.6, 80.9, 70.0)),
    "Mask-guided DDPM": (10.58, 16.28, 0.646,
                         (93.9, 95.6, 93.9, 90.9, 75.6, 87.1, 91.3, 66.0, 79.5, 67.2, 65.1, 65.6, 81.3, 70.7)),
    "Edge-guided DDPM": (10.64, 16.20, 0.646,
                         (93.9, 95.4, 93.8, 92.8, 75.0, 86.7, 90.3, 64.5, 78.1, 65.4, 64.1, 65.3, 79.6, 69.3)),
}

PAPER_RESULTS: dict[str, dict[str, Any]] = {
    method: {"fid": fid, "psnr": psnr, "ssim": ssim, "dice": dict(zip(PAPER_ORGANS, dice)),
             "dice_mean": round(sum(dice) / len(dice), 2)}
    for method, (fid, psnr, ssim, dice) in _TABLE2.items()
}
"""Table 2 by method; ``dice`` in %, ``dice_mean`` is the mean of the 14 published columns (not in the paper)."""

PAPER_METHOD_FOR_CONDITIONING = {"concat": "Conditional DDPM", "mask_encoder": "Mask-guided DDPM",
                                 "edge": "Edge-guided DDPM", "pix2pix": "Pix2Pix", "spade": "SPADE", "oasis": "OASIS"}


def _num(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and (math.isnan(value))):
        return ""
    return f"{value:.{digits}f}"


def csv_rows(measured: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """One row per measured model (paper value beside each metric), then one per published method.

    Each measured entry has ``name``, ``conditioning``, ``n_slices``, ``fid``, ``kid``, ``kid_std``, ``psnr``,
    ``ssim`` and optionally ``dice`` ({organ: fraction}) and ``dice_mean`` (fraction); Dice is written in %.
    """
    rows = []
    for m in measured:
        method = PAPER_METHOD_FOR_CONDITIONING.get(str(m.get("conditioning")), "")
        paper = PAPER_RESULTS.get(method, {})
        dice = m.get("dice") or {}
        row = {"source": "measured", "method": str(m["name"]), "paper_method": method,
               "n_slices": str(m.get("n_slices", "")),
               "fid": _num(m.get("fid"), 3), "fid_paper": _num(paper.get("fid"), 2),
               "kid": _num(m.get("kid"), 5), "kid_std": _num(m.get("kid_std"), 5),
               "psnr": _num(m.get("psnr"), 3), "psnr_paper": _num(paper.get("psnr"), 2),
               "ssim": _num(m.get("ssim"), 4), "ssim_paper": _num(paper.get("ssim"), 3),
               "dsc_mean": _num(_pct(m.get("dice_mean")), 1), "dsc_mean_paper": _num(paper.get("dice_mean"), 2)}
        for organ in PAPER_ORGANS:
            row[f"dsc_{organ}"] = _num(_pct(dice.get(organ)), 1)
            row[f"dsc_{organ}_paper"] = _num(paper.get("dice", {}).get(organ), 1)
        rows.append(row)
    for method, p in PAPER_RESULTS.items():
        row = {key: "" for key in rows[0]} if rows else {}
        row.update({"source": "paper", "method": method, "paper_method": method, "fid_paper": _num(p["fid"], 2),
                    "psnr_paper": _num(p["psnr"], 2), "ssim_paper": _num(p["ssim"], 3),
                    "dsc_mean_paper": _num(p["dice_mean"], 2)})
        row.update({f"dsc_{o}_paper": _num(p["dice"][o], 1) for o in PAPER_ORGANS})
        rows.append(row)
    return rows


def _pct(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else 100.0 * float(value)


def to_csv(rows: Sequence[Mapping[str, str]]) -> str:
    """CSV text of :func:`csv_rows` (columns = union of keys, in first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(c or "-" for c in row) + " |" for row in rows]


def _other_classes_table(measured: Sequence[Mapping[str, Any]], ceiling: Mapping[str, float] | None) -> list[str]:
    """Markdown lines: Dice (%) of every scored class outside Table 2's columns, a row per class and a column per
    model (and the real CT), with the mean over all scored classes; none when the scores hold only the paper's
    classes."""
    scores = {str(m["name"]): m["dice"] for m in measured if m.get("dice")}
    if ceiling:
        scores["real CT (ceiling)"] = ceiling
    others = list(dict.fromkeys(c for d in scores.values() for c in d if c not in PAPER_ORGANS))
    if all(c in PAPER.classes for c in others):
        return []
    body = [[c] + [_num(_pct(d.get(c)), 1) for d in scores.values()] for c in others]
    body.append(["mean, all classes"] + [_num(_pct(mean_dice(d)), 1) for d in scores.values()])
    return ["", "## Dice per class beyond the paper's organs (%)", ""] + _md_table(["Class", *scores], body)


def to_markdown(measured: Sequence[Mapping[str, Any]], ceiling: Mapping[str, float] | None = None,
                notes: Sequence[str] = ()) -> str:
    """results.md: measured metrics beside the paper's, per-organ Dice, and the paper's Table 2 for reference.

    ``ceiling`` is TotalSegmentator's Dice on the real CTs ({organ: fraction}), when it was measured. Scores of a
    class set beyond the paper's (e.g. the anatomy set's bones, lungs, muscles) get a table of their own.
    """
    rows = csv_rows(measured)
    mine = [r for r in rows if r["source"] == "measured"]
    lines = ["# Evaluation results", "",
             "Measured values beside the published ones (arXiv 2312.06453, Table 2). FID/KID: Inception-v3 pool "
             "features; PSNR/SSIM: 256 x 256 slices, window L40/W400 -> [0, 1]; DSC: TotalSegmentator on the "
             "synthetic volumes vs the input labels (%, mean over the 14 published organs).", ""]
    lines += _md_table(
        ["Model", "Paper row", "Slices", "FID", "FID paper", "KID", "PSNR", "PSNR paper", "SSIM", "SSIM paper",
         "DSC", "DSC paper"],
        [[r["method"], r["paper_method"], r["n_slices"], r["fid"], r["fid_paper"], r["kid"], r["psnr"],
          r["psnr_paper"], r["ssim"], r["ssim_paper"], r["dsc_mean"], r["dsc_mean_paper"]] for r in mine])
    if any(r["dsc_mean"] for r in mine) or ceiling:
        lines += ["", "## Dice per organ (%)", ""]
        body = []
        for r in mine:
            body.append([r["method"]] + [r[f"dsc_{o}"] for o in PAPER_ORGANS])
            if r["paper_method"]:
                body.append([f"{r['paper_method']} (paper)"] + [r[f"dsc_{o}_paper"] for o in PAPER_ORGANS])
        if ceiling:
            body.append(["real CT (ceiling)"] + [_num(_pct(ceiling.get(o)), 1) for o in PAPER_ORGANS])
        lines += _md_table(["Model", *PAPER_ORGANS], body)
    lines += _other_classes_table(measured, ceiling)
    lines += ["", "## Published (Table 2)", ""]
    lines += _md_table(["Method", "FID", "PSNR", "SSIM", *PAPER_ORGANS],
                       [[m, _num(p["fid"], 2), _num(p["psnr"], 2), _num(p["ssim"], 3),
                         *[_num(p["dice"][o], 1) for o in PAPER_ORGANS]] for m, p in PAPER_RESULTS.items()])
    if notes:
        lines += ["", "## Settings", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"
