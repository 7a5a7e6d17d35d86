"""Architecture rules: the library imports no Slicer/Qt/VTK/training code, samplers never import networks."""

import ast
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parent.parent / "CTSemanticSynthLib"
FORBIDDEN = {"slicer", "qt", "vtk", "ctk", "mrml", "training", "tqdm"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


@pytest.mark.parametrize("path", sorted(LIB.rglob("*.py")), ids=lambda p: str(p.relative_to(LIB)))
def test_library_imports_flow_one_way(path: Path):
    roots = {name.lstrip(".").split(".")[0] for name in _imports(path) if not name.startswith(".")}
    display = path == LIB / "progress.py"  # the commands' progress display: the one bar, and only when drawn
    command_line = path.parent == LIB / "cli" or display  # only the command line prints
    allowed_tqdm = display
    bad = roots & (FORBIDDEN - ({"tqdm"} if allowed_tqdm else set()))
    assert not bad, f"{path.name} imports {bad}"
    assert "print(" not in path.read_text(encoding="utf-8") or command_line, f"{path.name} prints; use logging"



@pytest.mark.parametrize("path", sorted((LIB.parent / "training").rglob("*.py")), ids=lambda p: p.name)
def test_training_shows_progress_through_the_one_display(path: Path):
    """The trainers show progress with ``progress.ProgressDisplay`` (a bar on a terminal, lines in a log), never with
    a tqdm of their own."""
    assert not {n for n in _imports(path) if n.split(".")[0] == "tqdm"}, f"{path.name} imports tqdm"

def test_only_the_command_line_imports_its_commands():
    """The trainers and the library take the one-line parser from below ``cli``, never the command modules."""
    cli = "CTSemanticSynthLib.cli"
    users = [m for m, targets in module_graph(LIB).items() if not m.startswith(cli)
             and any(t == cli or t.startswith(f"{cli}.") for t in targets)]
    users += [str(p.relative_to(LIB.parent)) for p in sorted((LIB.parent / "training").rglob("*.py"))
              if any(n == cli or n.startswith(f"{cli}.") for n in _imports(p))]
    assert not users, f"{users} import the command line"


def test_commands_pass_options_not_sampler_parts():
    """The command modules hand plain option values to synthesis; samplers and networks are assembled below them."""
    below = ("CTSemanticSynthLib.diffusion", "CTSemanticSynthLib.models")
    parts = {m: sorted(t for t in targets if t.startswith(below))
             for m, targets in module_graph(LIB).items() if m.startswith("CTSemanticSynthLib.cli")}
    assert not any(parts.values()), parts


def test_diffusion_never_imports_models():
    for path in (LIB / "diffusion").rglob("*.py"):
        assert not any("models" in name for name in _imports(path)), path


def module_graph(package: Path) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}``, counting imports anywhere (functions, TYPE_CHECKING)."""
    root = package.name
    modules = {".".join((root, *p.relative_to(package).with_suffix("").parts)).removesuffix(".__init__"): p
               for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        base = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                parent = base.rsplit(".", node.level - 1)[0] if node.level else ""
                module = ".".join(filter(None, (parent, node.module or "")))
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path that returns to its start) per strongly connected component with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                cycles.append(_cycle_through(graph, set(component), node))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def _cycle_through(graph: dict[str, set[str]], component: set[str], start: str) -> list[str]:
    """A shortest path start -> ... -> start inside the component (breadth first)."""
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph[node] & component):
            if nxt == start:
                return [*paths[node], start]
            if nxt not in paths:
                paths[nxt] = [*paths[node], nxt]
                queue.append(nxt)
    raise AssertionError("a strongly connected component always has a cycle")


def test_library_has_no_import_cycle():
    cycles = find_cycles(module_graph(LIB))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_cycle_finder_sees_function_level_and_relative_imports(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .sub import b\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")
    (package / "c.py").write_text("import pkg.d\n")
    (package / "d.py").write_text("from pkg import a\n")
    graph = module_graph(package)
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"}
    assert find_cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.c", "pkg.d", "pkg.a"]]
    (package / "d.py").write_text("from pkg import sub\n")
    assert find_cycles(module_graph(package)) == []


def test_inception_features_load_without_models_or_checkpoints():
    """The FID feature extractor needs a cache path and a file digest, not the U-Net or the model loader."""
    graph = module_graph(LIB)
    reached, todo = set(), ["CTSemanticSynthLib.metrics.inception"]
    while todo:
        for nxt in graph[todo.pop()] - reached:
            reached.add(nxt)
            todo.append(nxt)
    assert not reached & {"CTSemanticSynthLib.checkpoint", "CTSemanticSynthLib.models", "CTSemanticSynthLib.factory"}
