"""A blinded reader study: which side is the synthetic CT, and how realistic is each side (1-5)?

Pure Python (no Slicer): the case order and the synthetic CT's side come from the seed, every answer is written to
the CSV at once (atomically), and a session opened on an existing CSV continues where the reader stopped. The
accuracy of picking the synthetic side gets an exact (Clopper-Pearson) binomial 95 % confidence interval.
"""

from __future__ import annotations

import csv
import io
import math
import random
import statistics
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from CTSemanticSynthLib.io import write_bytes

SIDES = ("left", "right")
SCORES = (1, 2, 3, 4, 5)
COLUMNS = ("reader", "seed", "position", "case", "synthetic_side", "chosen_side", "correct", "score_left",
           "score_right", "score_real", "score_synthetic", "note", "answered")
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha", ".mhd")


@dataclass(frozen=True)
class StudyCase:
    """One case: the real CT, the synthetic CT and (optionally) the segmentation, as file paths or scene node IDs."""

    caseId: str
    real: str
    synthetic: str
    segmentation: str = ""


def _volumeFile(folder: Path, stem: str) -> Path | None:
    found = [p for p in sorted(folder.iterdir()) if p.is_file() and p.name.lower().startswith(stem)
             and p.name.lower().endswith(VOLUME_SUFFIXES)]
    if len(found) > 1:
        raise ValueError(f"{folder} has more than one '{stem}' file: {', '.join(p.name for p in found)}")
    return found[0] if found else None


def casesFromFolder(folder: str | Path) -> list[StudyCase]:
    """One case per subfolder holding ``real.*`` and ``synthetic.*`` (and optionally ``seg*.*``), e.g.
    ``study/case01/{real.nii.gz, synthetic.nrrd, seg.nii.gz}``; the subfolder name is the case id."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    cases = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        real, synthetic, seg = (_volumeFile(sub, stem) for stem in ("real", "synthetic", "seg"))
        if real is None or synthetic is None:
            raise ValueError(f"case folder {sub} needs a real.* and a synthetic.* volume (.nii.gz, .nrrd, ...)")
        cases.append(StudyCase(sub.name, str(real), str(synthetic), str(seg) if seg else ""))
    if not cases:
        raise ValueError(f"{folder} has no case folders (each with real.* and synthetic.*)")
    return cases


def clopperPearson(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact binomial confidence interval for ``successes`` out of ``trials``."""
    from scipy.stats import beta

    if trials <= 0:
        return math.nan, math.nan
    alpha = 1.0 - confidence
    low = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    return low, high


@dataclass(frozen=True)
class StudySummary:
    answered: int
    correct: int
    accuracy: float
    ciLow: float
    ciHigh: float
    meanScoreReal: float
    meanScoreSynthetic: float

    def rows(self) -> list[tuple[str, str]]:
        """(quantity, value) pairs for a table and the summary CSV."""
        def number(value: float) -> str:
            return "" if math.isnan(value) else f"{value:.3f}"

        return [("cases answered", str(self.answered)), ("synthetic side found", str(self.correct)),
                ("accuracy", number(self.accuracy)), ("accuracy 95% CI low (Clopper-Pearson)", number(self.ciLow)),
                ("accuracy 95% CI high (Clopper-Pearson)", number(self.ciHigh)),
                ("mean realism score, real CT", number(self.meanScoreReal)),
                ("mean realism score, synthetic CT", number(self.meanScoreSynthetic))]


class ReaderStudy:
    """A reader's session over ``cases``, recorded in ``csvPath`` (continued when the file exists).

    The order of the cases and the synthetic CT's side (as many left as right, up to one) are drawn from ``seed``:
    the same seed gives the same plan, so a resumed session shows the remaining cases in the same order.
    """

    def __init__(self, csvPath: str | Path, cases: list[StudyCase], reader: str, seed: int):
        if not cases:
            raise ValueError("the reader study has no cases")
        ids = [c.caseId for c in cases]
        if len(set(ids)) != len(ids):
            raise ValueError("case ids must be unique")
        if not reader.strip():
            raise ValueError("enter the reader's name or code")
        self.csvPath = Path(csvPath)
        self.reader = reader.strip()
        self.seed = int(seed)
        self.cases = {c.caseId: c for c in cases}
        rng = random.Random(self.seed)
        order = rng.sample(ids, len(ids))
        sides = [SIDES[i % 2] for i in range(len(ids))]
        rng.shuffle(sides)
        self.plan: list[tuple[str, str]] = list(zip(order, sides))
        self.rows: list[dict[str, str]] = self._readExisting()

    def _readExisting(self) -> list[dict[str, str]]:
        if not self.csvPath.exists():
            return []
        with open(self.csvPath, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        planned = dict(self.plan)
        for row in rows:
            if (row.get("reader"), row.get("seed")) != (self.reader, str(self.seed)):
                raise ValueError(f"{self.csvPath} belongs to reader '{row.get('reader')}' with seed {row.get('seed')}: "
                                 "choose another file, or the same reader and seed to continue")
            if planned.get(row.get("case")) != row.get("synthetic_side"):
                raise ValueError(f"{self.csvPath} has case '{row.get('case')}', which is not in this study's plan")
        return rows

    @property
    def answeredIds(self) -> set[str]:
        return {row["case"] for row in self.rows}

    @property
    def finished(self) -> bool:
        return len(self.rows) == len(self.plan)

    def current(self) -> tuple[int, StudyCase, str] | None:
        """(1-based position, case, synthetic side) of the next unanswered case, or None when all are answered."""
        answered = self.answeredIds
        for position, (caseId, side) in enumerate(self.plan, start=1):
            if caseId not in answered:
                return position, self.cases[caseId], side
        return None

    def answer(self, chosenSide: str, scoreLeft: int, scoreRight: int, note: str = "") -> bool:
        """Record the answer for the current case and write the CSV; returns whether the synthetic side was found."""
        current = self.current()
        if current is None:
            raise ValueError("every case has been answered")
        if chosenSide not in SIDES:
            raise ValueError(f"choose the synthetic side: {' or '.join(SIDES)}")
        if scoreLeft not in SCORES or scoreRight not in SCORES:
            raise ValueError("give each side a realism score from 1 (clearly artificial) to 5 (indistinguishable "
                             "from a real CT)")
        position, case, side = current
        scores = {"left": scoreLeft, "right": scoreRight}
        real = "right" if side == "left" else "left"
        row = {"reader": self.reader, "seed": str(self.seed), "position": str(position), "case": case.caseId,
               "synthetic_side": side, "chosen_side": chosenSide, "correct": str(int(chosenSide == side)),
               "score_left": str(scoreLeft), "score_right": str(scoreRight), "score_real": str(scores[real]),
               "score_synthetic": str(scores[side]), "note": " ".join(note.split()),
               "answered": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self._write(self.csvPath, self.rows + [row], COLUMNS)
        self.rows.append(row)
        return chosenSide == side

    @staticmethod
    def _write(path: Path, rows: list[dict[str, str]], columns: tuple[str, ...]) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_bytes(path, text.getvalue().encode("utf-8"), overwrite=True)

    def summary(self) -> StudySummary:
        """Accuracy with its exact 95 % CI, and the mean realism scores of the real and the synthetic CTs."""
        n = len(self.rows)
        correct = sum(int(row["correct"]) for row in self.rows)
        low, high = clopperPearson(correct, n)

        def mean(column: str) -> float:
            return statistics.fmean(int(row[column]) for row in self.rows) if self.rows else math.nan

        return StudySummary(n, correct, correct / n if n else math.nan, low, high, mean("score_real"),
                            mean("score_synthetic"))

    @property
    def summaryPath(self) -> Path:
        return self.csvPath.with_name(f"{self.csvPath.stem}_summary.csv")

    def writeSummary(self) -> Path:
        """Write the summary beside the answers (``<name>_summary.csv``); returns its path."""
        rows = [{"quantity": q, "value": v} for q, v in self.summary().rows()]
        self._write(self.summaryPath, rows, ("quantity", "value"))
        return self.summaryPath
