"""Static checks of the Slicer extension (no Slicer needed): the .ui has every widget the module uses, the CMake
lists name every file (and only existing ones), the Extensions Index metadata, every third-party import is shipped by
Slicer or listed in Resources/requirements.txt, the module keeps the template's shape and refuses old Slicer, and
the module-side helpers that need no Slicer (background process, segment classes) work."""

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
    text = cmake.read_text(encoding="utf-8")
    name = re.search(r"set\(MODULE_NAME\s+(\S+)\)", text).group(1)
    body = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S).group(1)
    return [t.replace("${MODULE_NAME}", name) for t in body.split() if not t.startswith("#")]


def python_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*.py") if "__pycache__" not in p.parts}


# --- the .ui and the Python code agree ------------------------------------------------------------------------
def test_every_widget_the_module_uses_is_in_the_ui():
    used = set(re.findall(r"\bself\.ui\.(\w+)", MODULE_PY.read_text(encoding="utf-8")))
    missing = used - set(ui_widgets())
    assert used and not missing, f"CTSemanticSynth.py uses widgets missing from the .ui: {sorted(missing)}"


def _parameter_fields() -> dict[str, str]:
    tree = ast.parse(MODULE_PY.read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CTSemanticSynthParameterNode")
    assert any(ast.unparse(d) == "parameterNodeWrapper" for d in cls.decorator_list)
    return {n.target.id: ast.unparse(n.annotation) for n in cls.body if isinstance(n, ast.AnnAssign)}


WIDGET_FOR_TYPE = [("vtkMRML", {"qMRMLNodeComboBox"}), ("bool", {"QCheckBox"}), ("Annotated[str, Choice", {"QComboBox"}),
                   ("Annotated[int", {"QSpinBox"}), ("Annotated[float", {"QDoubleSpinBox"}),
                   ("str", {"QLineEdit", "ctkPathLineEdit"})]  # a path is a str: "" shows as an empty field


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
        assert widget.get("class") in expected, f"{field}: {fields[field]} bound to a {widget.get('class')}"


def test_path_fields_start_empty():
    """ctkPathLineEdit fields are str parameters defaulting to "" (bound by gui.PathLineEditToStrConnector): a
    pathlib.Path parameter, the only kind Slicer binds to them itself, shows an unset path as "."."""
    tree = ast.parse(MODULE_PY.read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CTSemanticSynthParameterNode")
    defaults = {n.target.id: (ast.unparse(n.annotation), n.value and ast.literal_eval(n.value))
                for n in cls.body if isinstance(n, ast.AnnAssign)}
    paths = {p.find("string").text for w in ui_widgets().values() if w.get("class") == "ctkPathLineEdit"
             for p in w.findall("property") if p.get("name") == "SlicerParameterName"}
    assert paths == {"modelFolder", "mappingFile", "studyFolder", "studyCsv"}
    assert {defaults[name] for name in paths} == {("str", "")}
    gui = (HELPERS / "gui.py").read_text(encoding="utf-8")
    assert "@parameterNodeGuiConnector" in gui and "ctk.ctkPathLineEdit" in gui and "== str" in gui


def test_spin_boxes_whose_zero_means_a_default_name_it():
    """steps 0 (the preset's), batchSize 0 (auto) and studySeed 0 (random) show a word, not a bare 0, and
    default to it."""
    bound = {p.find("string").text: w for w in ui_widgets().values() for p in w.findall("property")
             if p.get("name") == "SlicerParameterName"}
    special = {name: w for name, w in bound.items()
               if any(p.get("name") == "specialValueText" for p in w.findall("property"))}
    assert set(special) == {"steps", "batchSize", "studySeed"}  # seed 0 is a seed; study seed 0 is "random"
    text = MODULE_PY.read_text(encoding="utf-8")
    for name in ("steps", "batchSize", "studySeed"):
        assert re.search(rf"\n    {name}: Annotated\[int, WithinRange\(0, \d+\)\] = 0\b", text), name


def test_every_button_is_connected_and_those_disabled_in_the_ui_get_enabled():
    """A push button without a handler, or one the .ui disables that nothing ever enables, is dead."""
    text = MODULE_PY.read_text(encoding="utf-8")
    check = next(n for n in ast.walk(ast.parse(text)) if isinstance(n, ast.FunctionDef) and n.name == "_checkCanApply")
    enabling = ast.unparse(check)
    for name, widget in ui_widgets().items():
        if widget.get("class") != "QPushButton":
            continue
        assert re.search(rf'self\.ui\.{name}\.connect\("clicked\(', text), f"{name} is not connected"
        disabled = any(p.get("name") == "enabled" and p.findtext("bool") == "false" for p in widget.findall("property"))
        if disabled:
            assert f"self.ui.{name}" in enabling and ".enabled = " in enabling, f"{name} is never enabled"


def test_apply_passes_the_sampling_fields_to_the_logic():
    """Every sampling field of the parameter node reaches startSynthesis (the combo boxes are not decoration)."""
    tree = ast.parse(MODULE_PY.read_text(encoding="utf-8"))
    call = next(n for n in ast.walk(tree)
                if isinstance(n, ast.Call) and ast.unparse(n.func) == "self.logic.startSynthesis")
    passed = {k.arg: ast.unparse(k.value) for k in call.keywords}
    for field in ("preset", "sampler", "steps", "precision", "seed", "device", "batchSize", "samples"):
        assert f"p.{field}" in passed.get(field, ""), f"{field} is not passed from the parameter node"
    assert set(_parameter_fields()) >= {"sampler", "precision"}


def test_mrml_widgets_get_the_scene():
    root = ET.parse(UI).getroot()
    assert root.find("widget").get("class") == "qMRMLWidget"
    receivers = {c.findtext("receiver") for c in root.iter("connection") if c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    mrml = {n for n, w in ui_widgets().items() if w.get("class", "").startswith("qMRML") and w.get("class") != "qMRMLWidget"}
    assert mrml and mrml <= receivers


# --- template shape and import rules --------------------------------------------------------------------------
def test_module_file_has_the_template_shape():
    text = MODULE_PY.read_text(encoding="utf-8")
    assert len(text.splitlines()) < 500
    classes = [n.name for n in ast.parse(text).body if isinstance(n, ast.ClassDef)]
    assert classes == ["CTSemanticSynth", "CTSemanticSynthParameterNode", "CTSemanticSynthWidget",
                       "CTSemanticSynthLogic", "CTSemanticSynthTest"]
    assert "import torch" not in text and "processEvents" not in text


@pytest.mark.parametrize("name", sorted(p.name for p in HELPERS.glob("*.py") if p.name not in ("dependencies.py", "gui.py")))
def test_headless_helpers_import_no_gui_and_no_torch(name):
    tree = ast.parse((HELPERS / name).read_text(encoding="utf-8"))
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
    assert not roots & {"qt", "ctk", "torch", "PyTorchUtils"}, f"{name} imports {roots & {'qt', 'ctk', 'torch'}}"
    relative = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level}
    assert "gui" not in relative, f"{name} imports the Qt helpers"
    assert not re.search(r"processEvents\(", (HELPERS / name).read_text(encoding="utf-8"))


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
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL"):
        assert re.search(rf'set\(EXTENSION_{key} "[^"]+"\)', text), key
    contributors = re.search(r'set\(EXTENSION_CONTRIBUTORS "([^"]+)"\)', text).group(1)
    assert re.fullmatch(r"[^(),]+ \([^()]+\)(, [^(),]+ \([^()]+\))*", contributors), "use 'Name (Organisation)'"
    assert "Slicer 5.10" in re.search(r'set\(EXTENSION_DESCRIPTION "([^"]+)"\)', text).group(1)
    assert re.search(r'set\(EXTENSION_DEPENDS "PyTorch TotalSegmentator"\)', text)
    assert "add_subdirectory(CTSemanticSynthLib)" in text and "add_subdirectory(CTSemanticSynth)" in text
    assert "WITH_SUBDIR" in (LIBRARY / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "WITH_GENERIC_TESTS" in (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")


def test_extension_urls_point_at_files_in_the_repository():
    """The Extensions Index shows the icon (and screenshots) from these URLs: each must be a file the repository has."""
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    files = re.findall(r"https://raw\.githubusercontent\.com/[^/\s\"]+/[^/\s\"]+/[^/\s\"]+/([^\s\"]+)", text)
    assert files, "the icon URL is missing"
    missing = [f for f in files if not (REPO / f).is_file()]
    assert not missing, f"CMakeLists.txt points at files the repository does not have: {missing}"


def test_screenshots_are_in_the_repository_with_honest_captions():
    """EXTENSION_SCREENSHOTURLS name PNGs the repository has; the README shows each with a caption and says they are
    rendered, not captured from Slicer, by a script that exists."""
    from PIL import Image

    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    urls = re.search(r'set\(EXTENSION_SCREENSHOTURLS "([^"]+)"\)', text).group(1).split()
    files = [re.sub(r"^https://raw\.githubusercontent\.com/[^/]+/[^/]+/[^/]+/", "", url) for url in urls]
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(files) >= 2
    for name in files:
        with Image.open(REPO / name) as image:
            assert image.format == "PNG" and min(image.size) >= 200
        assert re.search(rf"!\[[^]]*\]\({re.escape(name)}\) \| \*[^|]+\|", readme), f"{name} has no caption"
    assert "not captured\nfrom Slicer's window" in readme and (REPO / "docs/images/make_slicer_figures.py").is_file()


def test_license_file_is_the_project_license():
    license_text = (REPO / "LICENSE.txt").read_text(encoding="utf-8")
    assert re.search(r'^license = \{ text = "Apache-2.0" \}$', (REPO / "pyproject.toml").read_text(encoding="utf-8"), re.M)
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text  # the full text, not a pointer


def test_target_slicer_is_stated_and_older_slicer_is_refused_before_any_newer_syntax():
    text = MODULE_PY.read_text(encoding="utf-8")
    ast.parse(text, feature_version=(3, 9))  # Slicer 5.8 (Python 3.9) can read the file up to the check
    tree = ast.parse(text)
    guard = next(n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "SUPPORTED")
    check = next(n for n in tree.body if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "SUPPORTED")
    assert ast.unparse(check.value) == "sys.version_info >= (3, 12)"
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    unguarded = [ast.unparse(n) for n in top_level if "CTSemanticSynth" in ast.unparse(n)]
    assert [u.split(" import ")[0] for u in unguarded] == ["from CTSemanticSynthSlicerLib.choices"], (
        "helpers imported unguarded (only the plain choices module may be)")
    ast.parse((MODULE_PY.parent / "CTSemanticSynthSlicerLib" / "choices.py").read_text(encoding="utf-8"),
              feature_version=(3, 9))
    assert any("CTSemanticSynthSlicerLib" in ast.unparse(n) for n in guard.body)
    assert "Slicer 5.10" in text and "Slicer 5.10" in (REPO / "README.md").read_text(encoding="utf-8")


# --- dependencies ------------------------------------------------------------------------------------------------
SHIPPED_BY_SLICER = {"numpy", "scipy", "SimpleITK", "PIL", "requests", "pydicom", "packaging",  # Slicer's Python
                     "slicer", "qt", "ctk", "vtk", "mrml"}
FROM_EXTENSIONS = {"torch": "PyTorch", "PyTorchUtils": "PyTorch", "totalsegmentator": "TotalSegmentator",
                   "nnunetv2": "TotalSegmentator"}  # EXTENSION_DEPENDS "PyTorch TotalSegmentator"
OWN_PACKAGES = {"CTSemanticSynthLib", "CTSemanticSynthSlicerLib", "CTSemanticSynth"}
DISTRIBUTION = {"PIL": "pillow", "skimage": "scikit-image", "yaml": "pyyaml"}  # import name -> pip name


def third_party_imports(roots: list[Path]) -> dict[str, set[str]]:
    """{top-level module: files importing it} for every import (also inside functions) under ``roots``."""
    found: dict[str, set[str]] = {}
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module] if isinstance(node, ast.ImportFrom) and not node.level and node.module else [])
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in OWN_PACKAGES:
                        found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def requirement_names(path: Path) -> set[str]:
    lines = [line.split("#")[0].strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return {re.split(r"[<>=!~;\[ ]", line)[0].lower() for line in lines if line}


def test_every_import_is_shipped_by_slicer_or_listed_in_requirements():
    listed = requirement_names(MODULE / "Resources" / "requirements.txt")
    imports = third_party_imports([LIBRARY, MODULE])
    unlisted = {name: sorted(files) for name, files in imports.items()
                if name not in SHIPPED_BY_SLICER | set(FROM_EXTENSIONS) and DISTRIBUTION.get(name, name).lower() not in listed}
    assert not unlisted, f"add to CTSemanticSynth/Resources/requirements.txt (a fresh Slicer lacks them): {unlisted}"
    unused = listed - {DISTRIBUTION.get(name, name).lower() for name in imports}
    assert not unused, f"requirements.txt lists packages nothing imports: {sorted(unused)}"
    assert not listed & {"torch", "totalsegmentator", "nnunetv2"}, "these come from the PyTorch/TotalSegmentator extensions"
    depends = re.search(r'set\(EXTENSION_DEPENDS "([^"]+)"\)', (REPO / "CMakeLists.txt").read_text(encoding="utf-8")).group(1).split()
    assert set(FROM_EXTENSIONS.values()) <= set(depends)


def test_icon_is_a_128_pixel_png():
    from PIL import Image

    with Image.open(MODULE / "Resources" / "Icons" / "CTSemanticSynth.png") as icon:
        assert icon.format == "PNG" and icon.size == (128, 128)


# --- helpers that need no Slicer --------------------------------------------------------------------------------
def test_progress_parsing_and_eta():
    from CTSemanticSynthSlicerLib.process import formatDuration, parseProgress

    assert parseProgress("PROGRESS 12/87") == (12.0, 87)
    assert parseProgress("PROGRESS 48.32 112") == (48.32, 112)  # ctsynth synth --progress-lines
    assert parseProgress("synthesizing:  14%|#4   | 12.5/87 slices [00:03<00:20]") is None  # only --progress-lines
    assert parseProgress("ctsynth: wrote out.nrrd") is None
    assert formatDuration(75) == "1 min 15 s" and formatDuration(7300) == "2 h 01 min"


def test_background_process_reports_progress_and_errors():
    from CTSemanticSynthSlicerLib.process import BackgroundProcess, State

    script = ("import sys, time\nfor i in range(1, 4):\n    sys.stderr.write(f'PROGRESS {i}.0 3\\r'); "
              "sys.stderr.flush(); time.sleep(0.05)\nprint('\\nctsynth: error: --seg x.nii: file not found', "
              "file=sys.stderr)\nsys.exit(2)")
    process = BackgroundProcess([sys.executable, "-c", script]).start()
    assert process.wait(30) is State.FAILED and process.returncode == 2
    assert (process.done, process.total) == (3.0, 3) and process.fraction == 1.0
    assert process.errorMessage() == "--seg x.nii: file not found"
    assert sum("PROGRESS" in line for line in process.lines) == 1  # one line per progress bar


def test_cancel_kills_the_whole_process_tree(tmp_path):
    from CTSemanticSynthSlicerLib.process import BackgroundProcess, State

    pidfile = tmp_path / "child.pid"
    script = ("import subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              f"open({str(pidfile)!r}, 'w').write(str(child.pid))\nprint('PROGRESS 0/1', flush=True)\ntime.sleep(60)")
    process = BackgroundProcess([sys.executable, "-c", script]).start()
    deadline = time.monotonic() + 30
    while not pidfile.exists() or not pidfile.read_text(encoding="utf-8"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = int(pidfile.read_text(encoding="utf-8"))
    process.cancel()
    assert process.wait(30) is State.CANCELLED
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


STOPPABLE = """import pathlib, signal, sys, time
temp = pathlib.Path(sys.argv[1])
temp.write_text("partial")
def stop(signum, frame):
    temp.unlink()  # what ctsynth does on SIGTERM: its temporary files go
    sys.exit(130)
signal.signal(signal.SIGTERM, stop if sys.argv[2] == "handle" else signal.SIG_IGN)
print("PROGRESS 0/1", flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM semantics")
def test_cancel_asks_the_process_to_stop_first_then_kills_it(tmp_path):
    from CTSemanticSynthSlicerLib.process import BackgroundProcess, State

    def started(mode: str, grace: float) -> BackgroundProcess:
        process = BackgroundProcess([sys.executable, "-c", STOPPABLE, str(tmp_path / mode), mode], stopGrace=grace)
        process.start()
        while process.poll() is State.RUNNING and not process.total:
            time.sleep(0.05)
        return process

    polite = started("handle", grace=30)
    begun = time.monotonic()
    polite.cancel()
    assert time.monotonic() - begun < 1  # Cancel returns at once: the GUI thread does not wait
    assert polite.wait(20) is State.CANCELLED and polite.returncode == 130
    assert not (tmp_path / "handle").exists()  # it had the chance to remove its temporary file
    stubborn = started("ignore", grace=0.5)
    begun = time.monotonic()
    stubborn.cancel()
    assert stubborn.poll() is State.CANCELLED and not stubborn.stopped  # asked, still running
    assert stubborn.wait(20) is State.CANCELLED and stubborn.stopped and time.monotonic() - begun >= 0.5
    assert (tmp_path / "ignore").exists()  # killed after the grace period


def test_segment_classes_by_name_value_and_json(tmp_path):
    from CTSemanticSynthLib.labels import BODY, MODEL_CLASSES
    from CTSemanticSynthSlicerLib.segments import LabelMappingError, Segment, classifySegments, exportOrder, mappingJson

    segments = [Segment("a", "Liver", 5), Segment("b", "Right kidney", 2), Segment("c", "vertebrae_L1", 31),
                Segment("d", "body", 0), Segment("e", "Tumor", 7)]
    classes = classifySegments(segments)
    assert classes.organNames == ["kidney_right", "liver"]
    assert [s.name for s in classes.bodyOutline] == ["body"] and [s.name for s in classes.unknown] == ["Tumor"]
    assert classes.bodyTissue() == "Synthesized as body tissue: known structures 'vertebrae_L1'; unrecognised 'Tumor'."
    assert "Every segment is an organ" in classifySegments(segments[:2]).bodyTissue()
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


def test_segments_map_onto_the_models_class_set():
    """The TotalSegmentator extension's segment names keep their structure in the anatomy set; in the paper set they
    are known anatomy synthesized as body tissue (not 'unrecognised'), as TotalSegmentator's own names always were."""
    import json

    from CTSemanticSynthLib.labels import class_set, totalsegmentator_names
    from CTSemanticSynthSlicerLib.segments import Segment, classifySegments, exportOrder, mappingJson

    anatomy = class_set("anatomy")
    names = ["liver", "superior lobe of left lung", "L3 vertebra", "left rib 3", "left deep back muscle", "Tumor",
             "Body"]
    segments = [Segment(str(i), name) for i, name in enumerate(names)]
    rich = classifySegments(segments, classes=anatomy)
    assert {s.name: anatomy.classes[c] for s, c in rich.organs} == {
        "liver": "liver", "superior lobe of left lung": "lung", "L3 vertebra": "vertebrae", "left rib 3": "ribs",
        "left deep back muscle": "autochthon"}
    assert [s.name for s in rich.notInModel] == ["Tumor"] and [s.name for s in rich.bodyOutline] == ["Body"]
    assert json.loads(mappingJson(exportOrder(rich), anatomy)) == {"1": "body", "2": "liver", "3": "lung",
                                                                   "4": "vertebrae", "5": "ribs", "6": "autochthon"}
    paper = classifySegments(segments)
    assert paper.organNames == ["liver"] and [s.name for s in paper.unknown] == ["Tumor"]
    assert [s.name for s in paper.notInModel] == names[1:6]
    assert paper.bodyTissue().startswith("Synthesized as body tissue: known structures 'superior lobe of left lung'")
    l3 = next(v for v, n in totalsegmentator_names(2).items() if n == "vertebrae_L3")
    by_value = classifySegments([Segment("a", "Segment_5", 5), Segment("b", f"Segment_{l3}", l3)], "totalseg",
                                classes=anatomy)
    assert by_value.organNames == ["liver", "vertebrae"]
