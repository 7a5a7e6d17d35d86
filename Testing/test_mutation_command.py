"""benchmarks/mutation.py, the repeatable mutation run: every library file has a test selection that exists, the
generated mutmut configuration replaces the checkout's and keeps the rest of pyproject.toml, and the summary counts
what mutmut reports. (Running mutmut itself takes minutes to hours: docs/testing.md.)"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections import Counter
from pathlib import Path

import pytest

from benchmarks.mutation import TESTS, function_of, kill_rate, parse_results, summary, selection_for, with_mutmut_config

REPO = Path(__file__).resolve().parent.parent
LIBRARY = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "CTSemanticSynthLib").rglob("*.py"))


def test_every_library_file_has_tests_that_exist_and_every_row_is_used():
    used = set()
    for file in LIBRARY:
        tests, keyword = selection_for(file)
        assert tests and all((REPO / t).is_file() for t in tests), (file, tests)
        used.add(next(i for i, (pattern, *_) in enumerate(TESTS) if fnmatch.fnmatch(file, pattern)))
    assert used == set(range(len(TESTS)))  # no row is shadowed by an earlier one or names no file


def test_left_out_tests_exist():
    """Each ``not NAME`` of a -k expression names a test, so a renamed slow test cannot slip back into the runs."""
    sources = "".join(p.read_text(encoding="utf-8") for p in (REPO / "Testing").glob("test_*.py"))
    names = "\n".join(re.findall(r"def (test_\w+)", sources))
    terms = {term for _, _, keyword in TESTS for term in re.findall(r"not (\w+)", keyword)}
    assert terms and [t for t in terms if t not in names] == []


def test_unknown_file_is_one_line():
    with pytest.raises(SystemExit, match="^mutation: no test selection for README.md: add a row to TESTS"):
        selection_for("README.md")


def test_generated_config_replaces_the_checkouts_and_keeps_the_rest():
    original = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    old = '[tool.mutmut]\nonly_mutate = ["CTSemanticSynthLib/io.py"]\npytest_add_cli_args = ["-k", """a \\\n  b"""]\n\n'
    at = original.index("[tool.pytest.ini_options]")
    with_old = original[:at] + old + original[at:]  # an old section between two others, as older commits have
    for text in (original, with_old):
        config = tomllib.loads(with_mutmut_config(text, "CTSemanticSynthLib/preprocess.py", timeout_multiplier=4.0))
        tests, keyword = selection_for("CTSemanticSynthLib/preprocess.py")
        assert config["tool"]["mutmut"] == {
            "source_paths": ["CTSemanticSynthLib"], "only_mutate": ["CTSemanticSynthLib/preprocess.py"],
            "also_copy": ["Testing/", "Resources/", "training/"],
            "pytest_add_cli_args_test_selection": list(tests), "pytest_add_cli_args": ["-k", keyword],
            "timeout_multiplier": 4.0}
        assert {k: v for k, v in config.items() if k != "tool"} == {
            k: v for k, v in tomllib.loads(original).items() if k != "tool"}
        assert config["tool"]["pytest"] == tomllib.loads(original)["tool"]["pytest"]


def test_summary_counts_mutmuts_statuses():
    text = """    CTSemanticSynthLib.preprocess.x_window__mutmut_1: killed
    CTSemanticSynthLib.preprocess.x_window__mutmut_2: survived
    CTSemanticSynthLib.preprocess.xǁPlaneResizeǁto_model__mutmut_7: timeout
    CTSemanticSynthLib.preprocess.xǁPlaneResizeǁto_model__mutmut_8: segfault
    CTSemanticSynthLib.preprocess.x_one_hot__mutmut_1: skipped
    CTSemanticSynthLib.preprocess.x_one_hot__mutmut_2: not checked
    CTSemanticSynthLib.preprocess.x_one_hot__mutmut_3: killed
"""
    statuses = parse_results(text)
    assert len(statuses) == 7 and statuses["CTSemanticSynthLib.preprocess.x_window__mutmut_2"] == "survived"
    assert function_of("CTSemanticSynthLib.preprocess.xǁPlaneResizeǁto_model__mutmut_7") == "PlaneResize.to_model"
    assert function_of("CTSemanticSynthLib.preprocess.x_x_one_hot__mutmut_3") == "x_one_hot"
    assert kill_rate(Counter(statuses.values())) == 3 / 5  # killed + crashed of the 5 checked
    assert kill_rate(Counter({"skipped": 2})) is None
    table = summary("CTSemanticSynthLib/preprocess.py", statuses, ["header"])
    assert "| `CTSemanticSynthLib/preprocess.py` | 7 | 2 | 1 | 1 | 1 | 0 | 0 | 1 | 1 | 60.0 % |" in table
    assert "- `PlaneResize.to_model`: 7 (timeout)" in table and "- `window`: 2 (survived)" in table
    assert "`one_hot`" not in table  # killed, skipped or not checked: not listed
