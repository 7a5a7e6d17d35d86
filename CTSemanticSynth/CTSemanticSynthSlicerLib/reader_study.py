"""A blinded reader study: which side is the synthetic CT, and how realistic is each side (1-5)?

Pure Python (no Slicer): the case order and the synthetic CT's side come from the seed (drawn for each reader unless
given, and recorded in every row), every answer is written to the CSV at once (atomically), and a session opened on
an existing CSV continues where the reader stopped. An answer is taken only for the case on screen, and the summary
(accuracy of picking the synthetic side with an exact Clopper-Pearson 95 % interval, mean realism scores) only after
the last case, so that no running score can steer the reader.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import random
import statistics
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from CTSemanticSynthLib.io import write_bytes

logger = logging.getLogger(__name__)

SIDES = ("left", "right")
SCORES = (1, 2, 3, 4, 5)
COLUMNS = ("reader", "seed", "position", "case", "synthetic_side", "chosen_side", "correct", "score_left",
           "score_right", "score_real", "score_synthetic", "note", "answered")
ANSWER_COLUMNS = ("chosen_side", "score_left", "score_right", "note")  # what a repeated row must repeat
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
    the same seed gives the same plan, so a resumed session shows the remaining cases in the same order. Without a
    seed, a continued file gives its own, and a new one gets a random seed: each reader sees their own order.
    """

    def __init__(self, csvPath: str | Path, cases: list[StudyCase], reader: str, seed: int | None = None):
        if not cases:
            raise ValueError("the reader study has no cases")
        ids = [c.caseId for c in cases]
        if len(set(ids)) != len(ids):
            raise ValueError("case ids must be unique")
        if not reader.strip():
            raise ValueError("enter the reader's name or code")
        self.csvPath = Path(csvPath)
        self.reader = reader.strip()
        existing = self._readRows()
        if seed is None:
            seed = int(existing[0]["seed"]) if existing and existing[0].get("seed", "").isdigit() else \
                random.SystemRandom().randrange(1, 2**31)
        self.seed = int(seed)
        self.cases = {c.caseId: c for c in cases}
        rng = random.Random(self.seed)
        order = rng.sample(ids, len(ids))
        sides = [SIDES[i % 2] for i in range(len(ids))]
        rng.shuffle(sides)
        self.plan: list[tuple[str, str]] = list(zip(order, sides))
        self.rows: list[dict[str, str]] = self._checkRows(existing)
        self._shown: str | None = None

    def _readRows(self) -> list[dict[str, str]]:
        if not self.csvPath.exists():
            return []
        with open(self.csvPath, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))

    def _checkRows(self, rows: list[dict[str, str]]) -> list[dict[str, str]]:
        """The answers of an existing file, each case once: a repeated identical answer is dropped, a case answered
        twice differently is refused."""
        planned = dict(self.plan)
        kept: dict[str, dict[str, str]] = {}
        for line, row in enumerate(rows, start=2):
            if (row.get("reader"), row.get("seed")) != (self.reader, str(self.seed)):
                raise ValueError(f"{self.csvPath} belongs to reader '{row.get('reader')}' with seed {row.get('seed')}: "
                                 "choose another file, or the same reader and seed to continue")
            case = row.get("case")
            if planned.get(case) != row.get("synthetic_side"):
                raise ValueError(f"{self.csvPath} has case '{case}', which is not in this study's plan")
            if case in kept:
                if any(kept[case].get(k) != row.get(k) for k in ANSWER_COLUMNS):
                    raise ValueError(f"{self.csvPath} answers case '{case}' twice, differently (line {line}): keep "
                                     "one of the two rows, then continue")
                logger.warning("%s: case '%s' is answered twice (line %d); counted once", self.csvPath, case, line)
                continue
            kept[case] = row
        return list(kept.values())

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

    def markShown(self, caseId: str) -> None:
        """Record that ``caseId`` (the current case) is now on screen: only its answer is taken."""
        current = self.current()
        if current is None or current[1].caseId != caseId:
            raise ValueError(f"case '{caseId}' is not the next case of the study")
        self._shown = caseId

    def answer(self, chosenSide: str, scoreLeft: int, scoreRight: int, note: str = "") -> bool:
        """Record the answer for the current case, which must be on screen (:meth:`markShown`), and write the CSV;
        returns whether the synthetic side was found."""
        current = self.current()
        if current is None:
            raise ValueError("every case has been answered")
        if self._shown != current[1].caseId:
            raise ValueError("no case is on screen: the answer was not recorded (start or continue the study)")
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
        self._shown = None
        return chosenSide == side

    @staticmethod
    def _write(path: Path, rows: list[dict[str, str]], columns: tuple[str, ...]) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_bytes(path, text.getvalue().encode("utf-8"), overwrite=True)

    def summary(self) -> StudySummary:
        """Accuracy with its exact 95 % CI, and the mean realism scores of the real and the synthetic CTs; only once
        every case is answered (no running score during the study)."""
        if not self.finished:
            raise ValueError(f"the summary is shown after the last case ({len(self.rows)} of {len(self.plan)} "
                             "answered)")
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
