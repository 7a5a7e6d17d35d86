"""Docs that run as written: every flag that README.md, docs/*.md and the demo model card give a `ctsynth` command,
a ``python -m`` module of this repository or a ``benchmarks/`` script is in that command's ``--help``, and every
repository path they mention exists. Cheap: each command's help is printed in this process, once."""

from __future__ import annotations

import contextlib
import io
import re
import runpy
import sys
import warnings
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "Resources/models/demo/MODEL_CARD.md"]
TOP = {p.name for p in REPO.iterdir() if not p.name.startswith(".")} | {".ci"}

COMMAND = re.compile(
    r"(?:(?<![\w./-])ctsynth(?![\w:-])(?:\s+(?P<sub>synth|batch|evaluate|info|classes)\b)?"
    r"|-m\s+(?P<module>(?:CTSemanticSynthLib|training|benchmarks)[\w.]*)(?:\s+(?P<modsub>synth|batch|evaluate|info|"
    r"classes)\b)?"
    r"|(?<![\w/-])(?P<script>benchmarks/\w+\.py))")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*")
GONE = {"CTSemanticSynthLib/io.py": "split into io/; docs/testing.md records the mutation run made on the file"}
"""Paths the docs name as history (what was run then): they must be gone, not silently renamed."""
PATH = re.compile(r"(?<![\w./$<{-])(?:(?:%s)/[\w./{},*<>-]*|(?:Makefile|pyproject\.toml|constraints\.txt))"
                  % "|".join(re.escape(t) for t in sorted(TOP) if (REPO / t).is_dir()))


def snippets(text: str) -> list[tuple[str, bool]]:
    """The command-bearing pieces of a markdown text, and whether each is a command to run: each line of a code block
    (lines ending in a backslash joined with the next, a comment after `` #`` dropped), and each inline code span
    (prose that names a command or an option)."""
    pieces, code = [], False
    lines = iter(text.splitlines())
    for line in lines:
        if line.lstrip().startswith("```"):
            code = not code
            continue
        if code or line.startswith("    "):
            while line.rstrip().endswith("\\"):
                line = line.rstrip()[:-1] + " " + next(lines, "")
            pieces.append((re.sub(r"\s#\s.*$", "", line), True))
        else:
            pieces += [(span, False) for span in re.findall(r"`([^`]+)`", line)]
    return pieces


def commands(text: str) -> list[tuple[str, str, set[str], set[str]]]:
    """(command key, the snippet, its flags, those given without a value in a command to run) for every command in
    the text: a command's flags run from its name to the next command, a pipe or a shell separator."""
    found = []
    for piece, runnable in snippets(text):
        matches = list(COMMAND.finditer(piece))
        for i, match in enumerate(matches):
            end = matches[i + 1].start() if i + 1 < len(matches) else len(piece)
            rest = re.split(r"[|;]|&&", piece[match.end():end])[0]
            if match["script"]:
                key = match["script"]
            else:
                module = match["module"] or "CTSemanticSynthLib.cli"
                if module == "CTSemanticSynthLib.cli":
                    module = f"ctsynth {match['sub'] or match['modsub'] or ''}".strip()
                key = module
            bare = set(re.findall(r"(--[a-z][a-z0-9_-]*)(?=\s+-|\s*\]|\s*$)", rest)) if runnable else set()
            found.append((key, piece, set(FLAG.findall(rest)), bare))
    return found


@cache
def help_text(key: str) -> str:
    """What ``KEY --help`` prints (run in this process)."""
    if key.startswith("ctsynth"):
        target, argv, run = "CTSemanticSynthLib.cli", ["ctsynth", *key.split()[1:], "--help"], runpy.run_module
    elif key.startswith("benchmarks/"):
        target, argv, run = str(REPO / key), [key, "--help"], runpy.run_path
    else:
        target, argv, run = key, [key, "--help"], runpy.run_module
    out = io.StringIO()
    old_argv = sys.argv
    sys.argv = argv
    try:
        with contextlib.redirect_stdout(out), warnings.catch_warnings(), pytest.raises(SystemExit):
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module is imported already
            run(target, run_name="__main__")
    finally:
        sys.argv = old_argv
    return out.getvalue()


def documented_commands() -> list[tuple[str, str, str, set[str], set[str]]]:
    return [(doc.relative_to(REPO).as_posix(), *command)
            for doc in DOCS for command in commands(doc.read_text(encoding="utf-8"))]


def value_flags(help: str) -> set[str]:
    """The options that take a value: their line in the help shows a METAVAR or {choices} after the flag."""
    return set(re.findall(r"^\s+(?:-\w, )?(--[a-z][a-z0-9_-]*)[ =](?:[A-Z]|\{)", help, re.M))


def test_the_docs_name_commands():
    keys = {key for _, key, *_ in documented_commands()}
    assert {"ctsynth synth", "ctsynth batch", "ctsynth evaluate", "training.train", "training.prepare"} <= keys


@pytest.mark.parametrize("key", sorted({key for _, key, *_ in documented_commands()}))
def test_every_documented_flag_is_in_the_commands_help(key):
    """Each flag exists, and in a command to run one that takes a value is not written bare (followed by another
    flag or nothing)."""
    text = help_text(key)
    assert "usage:" in text, text
    offered, needs_value = set(FLAG.findall(text)), value_flags(text)
    missing = [(doc, flag, piece) for doc, k, piece, flags, _ in documented_commands() if k == key
               for flag in sorted(flags - offered)]
    bare = [(doc, flag, piece) for doc, k, piece, _, flags in documented_commands() if k == key
            for flag in sorted(flags & needs_value)]
    assert (missing, bare) == ([], [])


def expand(path: str) -> list[str]:
    """``a/{b,c}.py`` -> ``a/b.py``, ``a/c.py``; a trailing ``::test`` or ``:function`` dropped."""
    path = re.sub(r"(\.py)(::?\w.*)$", r"\1", path).rstrip(".,:;)")
    brace = re.search(r"\{([^{}]*)\}", path)
    if brace is None:
        return [path]
    return [p for part in brace[1].split(",") for p in expand(path[:brace.start()] + part + path[brace.end():])]


def test_every_repository_path_in_the_docs_exists():
    missing = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        mentioned = {p for piece, _ in snippets(text) for p in PATH.findall(piece)}
        mentioned |= {str((doc.parent / link).relative_to(REPO)) for link in re.findall(r"\]\(([\w./-]+)\)", text)
                      if not link.startswith("http")}
        for path in sorted(mentioned):
            if re.search(r"[<>*$]|\{\w*\}", path):
                continue  # a pattern or a placeholder
            missing += [(doc.name, p) for p in expand(path) if not (REPO / p).exists() and p not in GONE]
    assert missing == []
    assert [p for p in GONE if (REPO / p).exists()] == []
