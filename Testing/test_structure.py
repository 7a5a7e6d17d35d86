"""Architecture rules: the library imports no Slicer/Qt/VTK/training code, samplers never import networks."""

import ast
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parent.parent / "CTSemanticSynthLib"
FORBIDDEN = {"slicer", "qt", "vtk", "ctk", "mrml", "training", "tqdm"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


@pytest.mark.parametrize("path", sorted(LIB.rglob("*.py")), ids=lambda p: str(p.relative_to(LIB)))
def test_library_imports_flow_one_way(path: Path):
    roots = {name.lstrip(".").split(".")[0] for name in _imports(path) if not name.startswith(".")}
    allowed_tqdm = path.name == "cli.py"  # only the command line shows a progress bar
    bad = roots & (FORBIDDEN - ({"tqdm"} if allowed_tqdm else set()))
    assert not bad, f"{path.name} imports {bad}"
    assert "print(" not in path.read_text() or path.name == "cli.py", f"{path.name} prints; use logging"


def test_diffusion_never_imports_models():
    for path in (LIB / "diffusion").rglob("*.py"):
        assert not any("models" in name for name in _imports(path)), path
