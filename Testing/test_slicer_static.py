"""Static checks of the Slicer extension (no Slicer needed): the .ui has every widget the module uses, the CMake
lists name every file (and only existing ones), the module keeps the template's shape, and the module-side
helpers that need no Slicer (background process, segment classes) work."""

import ast
import re
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODULE = REPO / "CTSemanticSynth"
HELPERS = MODULE / "CTSemanticSynthSlicerLib"
LIBRARY = REPO / "CTSemanticSynthLib"
MODULE_PY = MODULE / "CTSemanticSynth.py"
UI = MODULE / "Resources" / "UI" / "CTSemanticSynth.ui"
sys.path.insert(0, str(MODULE))


def ui_widgets() -> dict[str, ET.Element]:
    return {w.get("name"): w for w in ET.parse(UI).getroot().iter("widget")}


def cmake_list(cmake: Path, variable: str) -> list[str]:
    text = cmake.read_text()
    name = re.search(r"set\(MODULE_NAME\s+(\S+)\)", text).group(1)
    body = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S).group(1)
    return [t.replace("${MODULE_NAME}", name) for t in body.split() if not t.startswith("#")]


def python_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*.py") if "__pycache__" not in p.parts}


# --- the .ui and the Python code agree ------------------------------------------------------------------------
def test_every_widget_the_module_uses_is_in_the_ui():
    used = set(re.findall(r"\bself\.ui\.(\w+)", MODULE_PY.read_text()))
    missing = used - set(ui_widgets())
    assert used and not missing, f"CTSemanticSynth.py uses widgets missing from the .ui: {sorted(missing)}"


def _parameter_fields() -> dict[str, str]:
    tree = ast.parse(MODULE_PY.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CTSemanticSynthParameterNode")
    assert any(ast.unparse(d) == "parameterNodeWrapper" for d in cls.decorator_list)
    return {n.target.id: ast.unparse(n.annotation) for n in cls.body if isinstance(n, ast.AnnAssign)}


WIDGET_FOR_TYPE = [("vtkMRML", "qMRMLNodeComboBox"), ("pathlib.Path", "ctkPathLineEdit"), ("bool", "QCheckBox"),
                   ("Annotated[str, Choice", "QComboBox"), ("Annotated[int", "QSpinBox")]


def test_parameter_names_in_the_ui_are_parameter_node_fields_of_a_matching_widget_type():
    fields = _parameter_fields()
    bound = {}
    for name, widget in ui_widgets().items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.find("string").text] = widget
    assert set(bound) == set(fields), f"unbound fields {set(fields) - set(bound)}, unknown {set(bound) - set(fields)}"
    for field, widget in bound.items():
        expected = next(w for prefix, w in WIDGET_FOR_TYPE if fields[field].startswith(prefix))
        assert widget.get("class") == expected, f"{field}: {fields[field]} bound to a {widget.get('class')}"


def test_mrml_widgets_get_the_scene():
    root = ET.parse(UI).getroot()
    assert root.find("widget").get("class") == "qMRMLWidget"
    receivers = {c.findtext("receiver") for c in root.iter("connection") if c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    mrml = {n for n, w in ui_widgets().items() if w.get("class", "").startswith("qMRML") and w.get("class") != "qMRMLWidget"}
    assert mrml and mrml <= receivers


# --- template shape and import rules --------------------------------------------------------------------------
def test_module_file_has_the_template_shape():
    text = MODULE_PY.read_text()
    assert len(text.splitlines()) < 500
    classes = [n.name for n in ast.parse(text).body if isinstance(n, ast.ClassDef)]
    assert classes == ["CTSemanticSynth", "CTSemanticSynthParameterNode", "CTSemanticSynthWidget",
                       "CTSemanticSynthLogic", "CTSemanticSynthTest"]
    assert "import torch" not in text and "processEvents" not in text


@pytest.mark.parametrize("name", ["logic.py", "process.py", "segments.py", "models.py"])
def test_headless_helpers_import_no_gui_and_no_torch(name):
    tree = ast.parse((HELPERS / name).read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
    assert not roots & {"qt", "ctk", "torch", "PyTorchUtils"}, f"{name} imports {roots & {'qt', 'ctk', 'torch'}}"
    assert not re.search(r"processEvents\(", (HELPERS / name).read_text())


# --- CMake lists ------------------------------------------------------------------------------------------------
CMAKES = [(MODULE / "CMakeLists.txt", MODULE), (LIBRARY / "CMakeLists.txt", LIBRARY)]


@pytest.mark.parametrize("cmake,root", CMAKES, ids=["module", "library"])
def test_every_cmake_listed_file_exists(cmake, root):
    listed = cmake_list(cmake, "MODULE_PYTHON_SCRIPTS") + cmake_list(cmake, "MODULE_PYTHON_RESOURCES")
    missing = [f for f in listed if not (root / f).is_file()]
    assert listed and not missing, f"{cmake.relative_to(REPO)} lists missing files: {missing}"


def test_library_cmake_lists_every_library_file():
    listed = set(cmake_list(LIBRARY / "CMakeLists.txt", "MODULE_PYTHON_SCRIPTS"))
    resources = set(cmake_list(LIBRARY / "CMakeLists.txt", "MODULE_PYTHON_RESOURCES"))
    data = {str(p.relative_to(LIBRARY)) for p in LIBRARY.rglob("*") if p.is_file() and "__pycache__" not in p.parts
            and p.suffix not in (".py", ".pyc") and p.name != "CMakeLists.txt"}
    assert not python_files(LIBRARY) - listed, (
        f"add to MODULE_PYTHON_SCRIPTS in CTSemanticSynthLib/CMakeLists.txt: {sorted(python_files(LIBRARY) - listed)}")
    assert not data - resources, (
        f"add to MODULE_PYTHON_RESOURCES in CTSemanticSynthLib/CMakeLists.txt: {sorted(data - resources)}")


def test_module_cmake_lists_every_module_file():
    listed = set(cmake_list(MODULE / "CMakeLists.txt", "MODULE_PYTHON_SCRIPTS"))
    resources = set(cmake_list(MODULE / "CMakeLists.txt", "MODULE_PYTHON_RESOURCES"))
    assert python_files(MODULE) == listed
    assert {str(p.relative_to(MODULE)) for p in (MODULE / "Resources").rglob("*") if p.is_file()} == resources


def test_extension_cmake():
    text = (REPO / "CMakeLists.txt").read_text()
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS"):
        assert re.search(rf'set\(EXTENSION_{key} "[^"]+"\)', text), key
    assert re.search(r'set\(EXTENSION_DEPENDS "PyTorch TotalSegmentator"\)', text)
    assert "add_subdirectory(CTSemanticSynthLib)" in text and "add_subdirectory(CTSemanticSynth)" in text
    assert "WITH_SUBDIR" in (LIBRARY / "CMakeLists.txt").read_text()
    assert "WITH_GENERIC_TESTS" in (MODULE / "CMakeLists.txt").read_text()


def test_icon_is_a_128_pixel_png():
    from PIL import Image

    with Image.open(MODULE / "Resources" / "Icons" / "CTSemanticSynth.png") as icon:
        assert icon.format == "PNG" and icon.size == (128, 128)


# --- helpers that need no Slicer --------------------------------------------------------------------------------
def test_progress_parsing_and_eta():
    from CTSemanticSynthSlicerLib.process import formatDuration, parseProgress

    assert parseProgress("PROGRESS 12/87") == (12.0, 87)
    assert parseProgress("PROGRESS 48.32 112") == (48.32, 112)  # ctsynth synth --progress-lines
    assert parseProgress("synthesizing:  14%|#4   | 12.5/87 slices [00:03<00:20]") == (12.5, 87)
    assert parseProgress("synthesizing:   0%|  | 0.0/None slices [00:00<?]") is None
    assert parseProgress("ctsynth: wrote out.nrrd") is None
    assert formatDuration(75) == "1 min 15 s" and formatDuration(7300) == "2 h 01 min"


def test_background_process_reports_progress_and_errors():
    from CTSemanticSynthSlicerLib.process import BackgroundProcess, State

    script = ("import sys, time\nfor i in range(1, 4):\n    sys.stderr.write(f'\\rbar {i}.0/3 slices [x]'); "
              "sys.stderr.flush(); time.sleep(0.05)\nprint('\\nctsynth: error: --seg x.nii: file not found', "
              "file=sys.stderr)\nsys.exit(2)")
    process = BackgroundProcess([sys.executable, "-c", script]).start()
    assert process.wait(30) is State.FAILED and process.returncode == 2
    assert (process.done, process.total) == (3.0, 3) and process.fraction == 1.0
    assert process.errorMessage() == "--seg x.nii: file not found"
    assert sum("slices" in line for line in process.lines) == 1  # one line per progress bar


def test_cancel_kills_the_whole_process_tree(tmp_path):
    from CTSemanticSynthSlicerLib.process import BackgroundProcess, State

    pidfile = tmp_path / "child.pid"
    script = ("import subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              f"open({str(pidfile)!r}, 'w').write(str(child.pid))\nprint('PROGRESS 0/1', flush=True)\ntime.sleep(60)")
    process = BackgroundProcess([sys.executable, "-c", script]).start()
    deadline = time.monotonic() + 30
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = int(pidfile.read_text())
    process.cancel()
    assert process.poll() is State.CANCELLED
    for _ in range(50):  # the orphaned grandchild is reaped by init; give it a moment
        try:
            import os

            os.kill(child, 0)
            with open(f"/proc/{child}/status") as status:
                if "zombie" in status.read():
                    break
        except (ProcessLookupError, FileNotFoundError):
            break
        time.sleep(0.05)
    else:
        pytest.fail("the grandchild process survived cancel")


def test_segment_classes_by_name_value_and_json(tmp_path):
    from CTSemanticSynthLib.labels import BODY, MODEL_CLASSES
    from CTSemanticSynthSlicerLib.segments import LabelMappingError, Segment, classifySegments, exportOrder, mappingJson

    segments = [Segment("a", "Liver", 5), Segment("b", "Right kidney", 2), Segment("c", "vertebrae_L1", 31),
                Segment("d", "body", 0), Segment("e", "Tumor", 7)]
    classes = classifySegments(segments)
    assert classes.organNames == ["kidney_right", "liver"]
    assert [s.name for s in classes.bodyOutline] == ["body"] and [s.name for s in classes.unknown] == ["Tumor"]
    order = exportOrder(classes)
    assert [MODEL_CLASSES[c] for _, c in order] == ["body", "body", "liver", "kidney_right"]  # organs drawn last
    assert mappingJson(order).count('"body"') == 2
    by_value = classifySegments([Segment("x", "Segment_6", 6), Segment("y", "Segment_1", 1)], "amos")
    assert by_value.organNames == ["liver", "spleen"]
    mapping = tmp_path / "map.json"
    mapping.write_text('{"Tumor": "body", "7": "liver", "Lesion": "background"}')
    by_json = classifySegments([Segment("t", "tumor", 3), Segment("l", "Leber", 7), Segment("n", "lesion", 9)],
                               "json", mapping)
    assert by_json.organNames == ["liver"] and not by_json.unknown and by_json.ignored[0].name == "lesion"
    assert dict((s.name, c) for s, c in by_json.organs)["tumor"] == BODY
    with pytest.raises(LabelMappingError, match="'Segment_1', 'Segment_2'"):
        classifySegments([Segment("1", "Segment_1", 1), Segment("2", "Segment_2", 2)])
    with pytest.raises(LabelMappingError, match="'Tumor'"):
        classifySegments(segments, strict=True)
    mapping.write_text('{"Tumor": "kidney"}')
    with pytest.raises(LabelMappingError, match="'kidney'.*not a class"):
        classifySegments(segments, "json", mapping)


def test_model_card_is_read_without_torch(tiny_model):
    from CTSemanticSynthSlicerLib.models import findModel, readModelCard

    card = readModelCard(findModel(str(tiny_model)))
    assert card.name == "tiny-concat" and card.imageSize == 32 and len(card.sha256) == 64
    assert "tiny-concat" in card.summary()
    with pytest.raises(FileNotFoundError, match="model 'no-such-model' not found"):
        findModel("no-such-model")
