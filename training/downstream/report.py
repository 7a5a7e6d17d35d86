"""Score each model's test predictions with the project's Dice and write the study's table (markdown + CSV) and
bar chart, next to the numbers MAISI and MedSegFactory report for their own data.

Per organ: Dice per test case (an organ absent from both prediction and reference has none), the mean over cases
and its 95 % confidence interval (Student's t over cases, clipped to Dice's range [0, 1]). The "mean" row is each
case's mean over its organs, summarised the same way.
"""

from __future__ import annotations

import csv
import io as text_io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from CTSemanticSynthLib.errors import InputError
from CTSemanticSynthLib.io import read_labelmap, write_bytes
from CTSemanticSynthLib.labels import DISPLAY_NAMES, MODEL_CLASSES, ORGANS
from CTSemanticSynthLib.metrics import dice_per_organ, mean_dice

from .datasets import KINDS, NIFTI

MEAN = "mean"
"""The summary row: each case's mean Dice over its organs."""


@dataclass(frozen=True)
class Published:
    """A number another work reports, with what it measured and where it was read."""

    work: str
    data: str
    comparison: str
    reported: str
    source: str


PUBLISHED = (
    Published("MedSegFactory (Mao et al. 2025, arXiv 2504.06897)",
              "AMOS22, 15 abdominal organs (their split; 2D image-mask pairs generated from text prompts)",
              "nnU-Net trained with MedSegFactory's generated pairs",
              "DSC 0.7679, IoU 0.7042; the real-only baseline is not in that source",
              "README of github.com/jwmao1/MedSegFactory (checkpoint table)"),
    Published("MAISI (Guo et al., WACV 2025, arXiv 2409.11169)",
              "tumour segmentation in CT (several tumour types, other datasets)",
              "real + synthetic vs real only",
              "average Dice +4 to +6.5 points over tumour types",
              "alphaXiv summary of arXiv 2409.11169; the per-task table was not retrieved"),
    Published("MAISI-v2 (Zhao et al., AAAI 2026, arXiv 2508.05772)",
              "tumour segmentation in CT (other datasets)",
              "real + synthetic vs real only",
              "exact numbers not retrieved here (issue 27 quotes +3 to +7 Dice points); see the paper's "
              "downstream table",
              "arXiv 2508.05772"),
)


@dataclass(frozen=True)
class Summary:
    """Mean and 95 % CI over the cases that have a Dice for one organ (``math.nan`` where undefined)."""

    cases: int
    mean: float
    low: float
    high: float


def summarise(values: Sequence[float]) -> Summary:
    """Mean and Student-t 95 % confidence interval of the non-NaN Dice values, clipped to [0, 1] (no interval
    below 2 values)."""
    kept = np.array([v for v in values if not math.isnan(v)], dtype=np.float64)
    if kept.size == 0:
        return Summary(0, math.nan, math.nan, math.nan)
    mean = float(kept.mean())
    if kept.size < 2:
        return Summary(1, mean, math.nan, math.nan)
    half = float(stats.t.ppf(0.975, kept.size - 1) * kept.std(ddof=1) / math.sqrt(kept.size))
    return Summary(int(kept.size), mean, max(mean - half, 0.0), min(mean + half, 1.0))


def score_predictions(predictions: Path, labels: Path, cases: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{case: {organ: Dice, "mean": mean over organs}}`` of a folder of predicted organ label maps against the
    study's reference labels; InputError for a missing prediction or one off the reference's grid."""
    scores = {}
    for case in cases:
        predicted, reference = predictions / f"{case}{NIFTI}", labels / f"{case}{NIFTI}"
        if not predicted.is_file():
            raise InputError(f"no prediction for test case '{case}' in {predictions}")
        pred, _ = read_labelmap(predicted)
        ref, _ = read_labelmap(reference)
        if not pred.same_grid(ref):
            raise InputError(f"prediction {predicted} is not on the grid of its reference {reference}")
        organs = dice_per_organ(pred.array, ref.array)
        scores[case] = {**organs, MEAN: mean_dice(organs)}
    return scores


def summary_table(scores: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, dict[str, Summary]]:
    """``{row: {kind: Summary}}`` for every organ some model or reference has, then the mean row."""
    rows = [MODEL_CLASSES[o] for o in ORGANS] + [MEAN]
    table = {row: {kind: summarise([case[row] for case in by_case.values()]) for kind, by_case in scores.items()}
             for row in rows}
    return {row: cells for row, cells in table.items() if any(s.cases for s in cells.values())}


def _label(row: str) -> str:
    return "Mean over organs" if row == MEAN else DISPLAY_NAMES[MODEL_CLASSES.index(row)]


def _number(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.4f}"


def per_case_csv(scores: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """Long format: kind, case, organ, dice (empty where the organ is in neither map)."""
    buffer = text_io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["dataset", "case", "organ", "dice"])
    for kind, by_case in scores.items():
        for case, organs in by_case.items():
            writer.writerows([kind, case, organ, _number(value)] for organ, value in organs.items())
    return buffer.getvalue()


def summary_csv(table: Mapping[str, Mapping[str, Summary]]) -> str:
    buffer = text_io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["organ", "dataset", "cases", "mean_dice", "ci95_low", "ci95_high"])
    for row, cells in table.items():
        for kind, s in cells.items():
            writer.writerow([row, kind, s.cases, _number(s.mean), _number(s.low), _number(s.high)])
    return buffer.getvalue()


def _cell(s: Summary) -> str:
    if s.cases == 0:
        return "n/a"
    interval = "" if math.isnan(s.low) else f" [{s.low:.3f}, {s.high:.3f}]"
    return f"{s.mean:.3f}{interval} (n={s.cases})"


def markdown(table: Mapping[str, Mapping[str, Summary]], settings: Mapping[str, str],
             counts: Mapping[str, tuple[int, int]], chart: str) -> str:
    """The study's report: settings, training-set sizes, the Dice table, the chart, the published numbers."""
    kinds = [k for k in KINDS if k in counts]
    lines = ["# Downstream segmentation study", ""]
    lines += [f"- {key}: {value}" for key, value in settings.items()]
    lines += ["", "| training set | real CTs | synthetic CTs |", "|---|---:|---:|"]
    lines += [f"| {kind} | {counts[kind][0]} | {counts[kind][1]} |" for kind in kinds]
    lines += ["", "Dice on the held-out real test cases: mean over cases [95 % CI, Student's t over cases] "
              "(n = cases with the organ in the reference or the prediction).", "",
              "| organ | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    lines += [f"| {_label(row)} | " + " | ".join(_cell(cells[k]) for k in kinds) + " |" for row, cells in table.items()]
    lines += ["", f"![Dice per organ]({chart})", "",
              "## Published numbers (other datasets and tasks: not comparable one to one)", "",
              "| work | data and task | comparison | reported | source |", "|---|---|---|---|---|"]
    lines += [f"| {p.work} | {p.data} | {p.comparison} | {p.reported} | {p.source} |" for p in PUBLISHED]
    lines += ["", "These works used other data, tasks, generators and training budgets; they frame the size of effect "
              "seen elsewhere and say nothing about this study's numbers.", ""]
    return "\n".join(lines)


def bar_chart(table: Mapping[str, Mapping[str, Summary]]) -> bytes:
    """PNG: mean Dice per organ (and the mean row), one bar per training set, 95 % CI whiskers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = list(table)
    kinds = [k for k in KINDS if any(k in cells for cells in table.values())]
    figure = Figure(figsize=(max(6.0, 0.7 * len(rows) * len(kinds) / 2), 4.0))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.8 / len(kinds)
    for n, kind in enumerate(kinds):
        cells = [table[row][kind] for row in rows]
        means = np.array([c.mean for c in cells])
        errors = np.array([[c.mean - c.low, c.high - c.mean] for c in cells]).T
        axes.bar(np.arange(len(rows)) + (n - (len(kinds) - 1) / 2) * width, np.nan_to_num(means), width,
                 yerr=np.nan_to_num(errors), capsize=2, label=kind)
    axes.set_xticks(np.arange(len(rows)), [_label(r) for r in rows], rotation=45, ha="right")
    axes.set_ylabel("Dice on held-out real CTs")
    axes.set_ylim(0, 1.05)
    axes.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(kinds), frameon=False, fontsize="small")
    figure.tight_layout()
    buffer = text_io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def write_report(folder: Path, scores: Mapping[str, Mapping[str, Mapping[str, float]]],
                 settings: Mapping[str, str], counts: Mapping[str, tuple[int, int]]) -> Path:
    """Write ``dice_per_case.csv``, ``dice_summary.csv``, ``dice_per_organ.png`` and ``downstream.md`` (replacing
    earlier ones); returns the markdown's path."""
    folder.mkdir(parents=True, exist_ok=True)
    table = summary_table(scores)
    write_bytes(folder / "dice_per_case.csv", per_case_csv(scores).encode(), overwrite=True)
    write_bytes(folder / "dice_summary.csv", summary_csv(table).encode(), overwrite=True)
    write_bytes(folder / "dice_per_organ.png", bar_chart(table), overwrite=True)
    report = folder / "downstream.md"
    write_bytes(report, markdown(table, settings, counts, "dice_per_organ.png").encode(), overwrite=True)
    return report
