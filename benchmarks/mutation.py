"""Mutation testing of one library file with mutmut 3.x, repeatable by anyone:

    .venv/bin/python benchmarks/mutation.py CTSemanticSynthLib/preprocess.py      (or: make mutation FILE=...)

Copies the checkout (tracked and untracked, not ignored files; or ``--rev REV``, a commit, via ``git archive``) into
a scratch folder, writes there a ``[tool.mutmut]`` section that mutates only FILE and selects the tests that cover
it (`TESTS` below: the first pattern that matches FILE), and runs ``mutmut run --max-children N`` in it with
``OMP_NUM_THREADS=1`` (torch's thread pool does not survive mutmut's fork) and no ``PYTHONPATH`` (mutmut puts its
mutated copy first on the path; a test's child process imports the installed library, not the mutant). The
checkout's own files are never touched. Then it writes the
summary (``mutation-summary.md`` in the scratch folder, and ``--out``): mutants killed, survived, timed out,
skipped, ..., the raw kill rate, the survivors by function, the machine and the command. Classifying the
survivors (equivalent or not) is left to a reader: ``cd SCRATCH && python -m mutmut show NAME``.

``--mutants NAME ...`` runs only those mutants (mutmut's name patterns, e.g. ``"CTSemanticSynthLib.synthesis.x_synthesize*"``)
and ``--scratch DIR`` reuses an earlier scratch folder (its sources refreshed; mutmut keeps the results of functions
that did not change). Kill rate = (killed + crashed) / (mutants - skipped - not checked): a timeout, a
suspicious result or a mutant no test reaches counts as not killed.
"""

from __future__ import annotations

import argparse
import fnmatch
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

UNIT_FAST = "not sigterm_while and not sigkill_while and not full_disk and not writer_failing and not preview_failing " \
            "and not read_only_folder and not output_that_is_an_input and not evaluate_json " \
            "and not truncated_input_is_one_line and not closed_stderr"
"""End-to-end `ctsynth` runs (a subprocess signalled, a full disk, a whole synthesis): seconds per surviving mutant on
two shared cores, and they test the command line's handling rather than the library file under mutation."""
NO_TRAINING = "not overfits and not train_export and not train_resume and not resume_is_exact " \
              "and not label_dropout_zeroes and not sdm_training_flag and not torchrun and not slicer_panel"
"""Trainer runs (a minute per surviving mutant) and the Slicer panel; they test training, not sampling."""

TESTS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    # (pattern of library files, test files, pytest -k expression); the first matching pattern wins
    ("CTSemanticSynthLib/preprocess.py", ("test_preprocess.py", "test_io.py"), UNIT_FAST),
    ("CTSemanticSynthLib/checkpoint.py", ("test_checkpoint.py", "test_models.py", "test_bad_inputs.py", "test_sdm.py",
                                          "test_baselines.py"), f"{UNIT_FAST} and {NO_TRAINING}"),
    ("CTSemanticSynthLib/io*", ("test_io.py", "test_write_safety.py", "test_bad_inputs.py", "test_preprocess.py",
                                "test_regenerate.py"), UNIT_FAST),
    ("CTSemanticSynthLib/grid.py", ("test_io.py", "test_bad_inputs.py", "test_synthesis.py"), UNIT_FAST),
    ("CTSemanticSynthLib/preview.py", ("test_io.py", "test_cli.py"), UNIT_FAST),
    ("CTSemanticSynthLib/labels.py", ("test_labels.py", "test_io.py", "test_totalseg.py"), UNIT_FAST),
    ("CTSemanticSynthLib/diffusion/slice_*", ("test_consistency.py", "test_diffusion.py"), NO_TRAINING),
    ("CTSemanticSynthLib/diffusion/samplers/repaint.py", ("test_regenerate.py", "test_diffusion.py"), NO_TRAINING),
    ("CTSemanticSynthLib/diffusion/*", ("test_diffusion.py",), NO_TRAINING),
    ("CTSemanticSynthLib/models/generators/*", ("test_baselines.py", "test_checkpoint.py"), NO_TRAINING),
    ("CTSemanticSynthLib/models/*", ("test_models.py", "test_sdm.py", "test_consistency.py", "test_golden.py",
                                     "test_checkpoint.py"), NO_TRAINING),
    ("CTSemanticSynthLib/factory.py", ("test_models.py", "test_sdm.py", "test_baselines.py"), NO_TRAINING),
    ("CTSemanticSynthLib/metrics/*", ("test_metrics.py", "test_evaluate.py", "test_consistency.py"), NO_TRAINING),
    ("CTSemanticSynthLib/evaluat*", ("test_evaluate.py",), NO_TRAINING),
    ("CTSemanticSynthLib/totalseg.py", ("test_totalseg.py",), NO_TRAINING),
    ("CTSemanticSynthLib/batch.py", ("test_batch.py", "test_write_safety.py"), UNIT_FAST),
    ("CTSemanticSynthLib/cli*", ("test_cli.py", "test_bad_inputs.py", "test_write_safety.py"), NO_TRAINING),
    ("CTSemanticSynthLib/provenance.py", ("test_synthesis.py", "test_cli.py", "test_batch.py", "test_sdm.py"),
     f"{UNIT_FAST} and {NO_TRAINING}"),
    ("CTSemanticSynthLib/regenerate.py", ("test_regenerate.py",), NO_TRAINING),
    ("CTSemanticSynthLib/slice_context.py", ("test_consistency.py",), NO_TRAINING),
    ("CTSemanticSynthLib/*", ("test_synthesis.py", "test_golden.py", "test_consistency.py", "test_regenerate.py",
                              "test_denoiser.py", "test_sdm.py", "test_baselines.py", "test_bad_inputs.py",
                              "test_cli.py", "test_batch.py"),
     f"{UNIT_FAST} and {NO_TRAINING}"),
)
"""Which tests may kill a mutant of each library file (synthesis.py, denoiser.py, device.py and the rest: the last
row). mutmut runs, for each mutant, only those of them that call the mutated function."""

STATUS_COLUMNS = ("killed", "segfault", "survived", "timeout", "suspicious", "no tests", "skipped", "not checked")


def selection_for(file: str) -> tuple[tuple[str, ...], str]:
    """(test files under Testing/, -k expression) of the first `TESTS` row matching the repository path `file`."""
    for pattern, tests, keyword in TESTS:
        if fnmatch.fnmatch(file, pattern):
            return tuple(f"Testing/{name}" for name in tests), keyword
    raise SystemExit(f"mutation: no test selection for {file}: add a row to TESTS in benchmarks/mutation.py")


def with_mutmut_config(pyproject: str, file: str, timeout_multiplier: float = 15.0) -> str:
    """`pyproject` (the text of pyproject.toml) with its ``[tool.mutmut]`` section, if any, replaced by one that
    mutates `file` alone with its test selection; a mutant times out after `timeout_multiplier` times (its tests'
    measured duration + 1 s)."""
    tests, keyword = selection_for(file)
    kept = re.sub(r"(?ms)^\[tool\.mutmut\]\n.*?(?=^\[|\Z)", "", pyproject)
    settings = {  # JSON strings and lists of strings are valid TOML
        "source_paths": ["CTSemanticSynthLib"],
        "only_mutate": [file],
        "also_copy": ["Testing/", "Resources/", "training/"],
        "pytest_add_cli_args_test_selection": list(tests),
        "pytest_add_cli_args": ["-k", keyword],
        "timeout_multiplier": timeout_multiplier,
    }
    return kept.rstrip("\n") + "\n\n[tool.mutmut]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items())


def copy_sources(dest: Path, rev: str | None) -> None:
    """Put the checkout's files (the commit `rev`, else the work tree's tracked and untracked, not ignored, files)
    into `dest`, replacing what is there except mutmut's ``mutants/`` folder."""
    for child in dest.iterdir():
        if child.name != "mutants":
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    if rev:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(dest, filter="data")
        return
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():  # a deleted tracked file is still listed
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def parse_results(text: str) -> dict[str, str]:
    """Mutant name -> status from ``mutmut results --all true`` (lines ``    NAME: STATUS``)."""
    return dict(line.strip().rsplit(": ", 1) for line in text.splitlines() if ": " in line)


def function_of(mutant: str) -> str:
    """The function (``Class.method`` for a method) a mutant name such as ``pkg.mod.xǁClassǁmethod__mutmut_3`` or
    ``pkg.mod.x_function__mutmut_3`` belongs to."""
    name = mutant.rsplit(".", 1)[-1].rsplit("__mutmut_", 1)[0]
    if name.startswith("xǁ"):
        return ".".join(name[2:].split("ǁ"))
    return name.removeprefix("x_")


def kill_rate(counts: Counter) -> float | None:
    """(killed + crashed) / (mutants - skipped - not checked), or None when nothing was checked."""
    checked = sum(counts.values()) - counts["skipped"] - counts["not checked"]
    return (counts["killed"] + counts["segfault"]) / checked if checked else None


def summary(file: str, statuses: dict[str, str], header: list[str]) -> str:
    """Markdown: the header lines, one row of counts for `file`, and the mutants not killed by function."""
    counts = Counter(statuses.values())
    rate = kill_rate(counts)
    columns = ["File", "Mutants", *[c.capitalize() if c != "segfault" else "Crashed" for c in STATUS_COLUMNS],
               "Kill rate"]
    row = [f"`{file}`", str(len(statuses)), *[str(counts[c]) for c in STATUS_COLUMNS],
           "n/a" if rate is None else f"{100 * rate:.1f} %"]
    others = sorted(set(counts) - set(STATUS_COLUMNS))
    lines = [*header, "", "| " + " | ".join(columns) + " |", "| --- |" + " ---: |" * (len(columns) - 1),
             "| " + " | ".join(row) + " |", ""]
    if others:
        lines += [f"Other statuses: {', '.join(f'{s} {counts[s]}' for s in others)}.", ""]
    not_killed: dict[str, list[str]] = defaultdict(list)
    for name, status in statuses.items():
        if status not in ("killed", "segfault", "skipped", "not checked"):
            not_killed[function_of(name)].append(f"{name.rsplit('__mutmut_', 1)[-1]} ({status})")
    if not_killed:
        lines += ["Checked and not killed, by function (mutant number and status; `python -m mutmut show NAME` in "
                  "the scratch folder prints one):", ""]
        lines += [f"- `{fn}`: {', '.join(items)}" for fn, items in sorted(not_killed.items())]
    return "\n".join(lines) + "\n"


def machine() -> str:
    """CPU model, logical CPUs and load, Python, torch and mutmut versions."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    versions = subprocess.run([sys.executable, "-c", "import torch, importlib.metadata as m; "
                               "print(torch.__version__, m.version('mutmut'))"], capture_output=True, text=True)
    torch_version, mutmut_version = (versions.stdout.split() + ["?", "?"])[:2]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (f"{cpu}, {os.cpu_count()} logical CPUs (load {load} at the start), Python {platform.python_version()}, "
            f"torch {torch_version}, mutmut {mutmut_version}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="library file to mutate, relative to the repository root "
                                     "(e.g. CTSemanticSynthLib/preprocess.py)")
    parser.add_argument("--rev", help="run on this commit's files (git archive) instead of the work tree")
    parser.add_argument("--max-children", type=int, default=1, help="parallel mutmut workers (default 1)")
    parser.add_argument("--timeout-multiplier", type=float, default=15.0,
                        help="a mutant times out after this many times its tests' clean duration + 1 s (mutmut's "
                             "default 15; a mutant that loops forever costs that long)")
    parser.add_argument("--mutants", nargs="+", default=[], help="run only these mutant names or patterns")
    parser.add_argument("--scratch", type=Path, help="scratch folder to use or reuse (default: a new temporary one)")
    parser.add_argument("--out", type=Path, help="also write the summary here")
    args = parser.parse_args()

    file = Path(args.file).as_posix().removeprefix("./")
    selection_for(file)  # an unknown file fails before any copying
    try:
        import mutmut  # noqa: F401  (only checked: it runs in a child)
    except ImportError:
        raise SystemExit("mutation: mutmut is not installed: pip install -e '.[mutation]'") from None
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="ctsynth-mutation-"))
    scratch.mkdir(parents=True, exist_ok=True)
    copy_sources(scratch, args.rev)
    if not (scratch / file).is_file():
        raise SystemExit(f"mutation: {file} is not a file of {'commit ' + args.rev if args.rev else 'the checkout'}")
    pyproject = scratch / "pyproject.toml"
    pyproject.write_text(with_mutmut_config(pyproject.read_text(encoding="utf-8"), file, args.timeout_multiplier), encoding="utf-8")

    # mutmut puts its mutated copy first on sys.path itself; a PYTHONPATH (even to that copy) breaks its test runs
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children), *args.mutants]
    header = [f"Mutation run of `{file}` at {args.rev or 'the work tree of ' + _describe_head()}, "
              f"{time.strftime('%Y-%m-%d %H:%M')}",
              f"Machine: {machine()}",
              f"Command: `{' '.join(['python', 'benchmarks/mutation.py', *sys.argv[1:]])}` -> "
              f"`OMP_NUM_THREADS=1 mutmut run --max-children {args.max_children}"
              f"{''.join(' ' + m for m in args.mutants)}` in {scratch}",
              f"Tests: {', '.join(selection_for(file)[0])}; -k \"{selection_for(file)[1]}\""]
    log = scratch / "mutmut.log"
    print(f"mutation: mutating {file} in {scratch}; mutmut's output goes to {log}", flush=True)
    tic = time.perf_counter()
    with log.open("w") as handle:
        code = subprocess.run(command, cwd=scratch, env=env, stdout=handle, stderr=subprocess.STDOUT,
                              preexec_fn=lambda: os.nice(10)).returncode  # a long CPU job: others come first
    minutes = (time.perf_counter() - tic) / 60
    results = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=scratch, env=env,
                             capture_output=True, text=True)
    statuses = parse_results(results.stdout)
    if args.mutants:
        statuses = {k: v for k, v in statuses.items() if any(fnmatch.fnmatch(k, m) for m in args.mutants)}
    header.append(f"Wall time: {minutes:.0f} min; mutmut exit status {code}")
    text = summary(file, statuses, header)
    (scratch / "mutation-summary.md").write_text(text, encoding="utf-8")
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    print(text)
    if code or not statuses:
        print(f"mutation: mutmut failed or ran no mutant: see {log}", file=sys.stderr)
        return 1
    return 0


def _describe_head() -> str:
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True)
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


if __name__ == "__main__":
    sys.exit(main())
