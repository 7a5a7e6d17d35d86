"""The module in a Python shaped like a fresh 3D Slicer 5.10/5.12: every third-party package Slicer does not ship
raises ImportError (Testing/slicer_shaped/sitecustomize.py), so a load-time import of nibabel, torch, safetensors,
tqdm, ... in the module or its helpers fails here as it does in Slicer (where the module then silently does not
appear). Each scenario runs in its own subprocess (Testing/slicer_shaped/scenarios.py); the background processes
the module starts inherit the same Python. Needs ``slicer-core`` (skipped without it)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("slicer") is None or importlib.util.find_spec("vtk") is None:
    pytest.skip("slicer-core is not installed (the [slicer] extra)", allow_module_level=True)

REPO = Path(__file__).resolve().parent.parent
SHAPED = REPO / "Testing" / "slicer_shaped"
NOT_SHIPPED = ("nibabel", "safetensors", "tqdm", "torch", "yaml", "skimage", "totalsegmentator", "nnunetv2",
               "matplotlib")
REQUIREMENTS = ["nibabel>=5.0", "safetensors>=0.4", "tqdm>=4.60"]  # CTSemanticSynth/Resources/requirements.txt


def run_scenario(name: str, tmp_path: Path, timeout: float = 300, **env: str) -> tuple[dict, list[dict]]:
    """(result, recorded installer and dialog calls) of one scenario in a fresh Slicer-shaped Python."""
    record = tmp_path / f"{name}-calls.jsonl"
    environment = {**os.environ, "CTSYNTH_SLICER_SHAPED": "1", "CTSYNTH_RECORD": str(record), "CTSYNTH_INSTALLED": "",
                   "PYTHONPATH": os.pathsep.join([str(SHAPED), str(REPO)]), "PYTHONIOENCODING": "utf-8",
                   "OMP_NUM_THREADS": "1", **env}
    done = subprocess.run([sys.executable, str(SHAPED / "scenarios.py"), name], capture_output=True, text=True,
                          encoding="utf-8", env=environment, timeout=timeout, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    calls = [json.loads(line) for line in record.read_text(encoding="utf-8").splitlines()] if record.exists() else []
    return json.loads(done.stdout.strip().splitlines()[-1]), calls


def test_the_hook_blocks_what_slicer_does_not_ship(tmp_path):
    code = ("import importlib, json\nout = {}\nfor name in %r + ['numpy', 'scipy', 'SimpleITK', 'PIL', 'pydicom', "
            "'requests', 'packaging', 'slicer', 'vtk']:\n    try:\n        importlib.import_module(name)\n"
            "        out[name] = True\n    except ImportError:\n        out[name] = False\nprint(json.dumps(out))"
            % list(NOT_SHIPPED))
    env = {**os.environ, "CTSYNTH_SLICER_SHAPED": "1", "PYTHONPATH": str(SHAPED)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert {n for n, ok in found.items() if not ok} == set(NOT_SHIPPED)


def test_every_helper_and_the_module_file_load_in_a_fresh_slicer(tmp_path):
    """Planting a module-level ``import nibabel`` in any helper makes this fail (the helper and everything that
    imports it are named)."""
    result, _ = run_scenario("imports", tmp_path)
    helpers = {f"CTSemanticSynthSlicerLib.{p.stem}" for p in (REPO / "CTSemanticSynth" / "CTSemanticSynthSlicerLib").glob("*.py")
               if p.stem != "__init__"}
    assert helpers <= set(result["modules"])
    assert result["failures"] == {}
    assert result["supported"] and result["classes"] == ["CTSemanticSynth", "CTSemanticSynthLogic",
                                                         "CTSemanticSynthParameterNode", "CTSemanticSynthTest",
                                                         "CTSemanticSynthWidget"]
    assert result["loaded_not_shipped"] == []


def test_the_dependency_check_names_exactly_what_is_missing(tmp_path):
    result, calls = run_scenario("check", tmp_path)
    assert result["missing"] == ["torch>=2.3"] + REQUIREMENTS and calls == []  # checking installs nothing


def test_first_apply_on_slicer_5_10_asks_installs_and_then_synthesizes(tmp_path):
    result, calls = run_scenario("install", tmp_path, timeout=600, CTSYNTH_SLICER_VERSION="5.10")
    assert [c["call"] for c in calls] == ["PyTorchUtils.installTorch", "slicer.util.confirmOkCancelDisplay",
                                          "slicer.util.pip_install"]
    assert calls[0]["askConfirmation"] and calls[0]["torchVersionRequirement"] == ">=2.3"
    assert all(r in calls[1]["text"] for r in REQUIREMENTS)
    assert calls[2]["requirements"] == REQUIREMENTS
    assert result["error"] is None and result["missing_after"] == []
    volume = result["volume"]
    assert volume["dimensions"] == [122, 101, 112] and volume["synthetic"] and volume["seed"] == "3"
    assert volume["min"] == -1000 and -160 <= volume["max"] <= 240


def test_first_apply_on_slicer_5_12_uses_slicer_packaging(tmp_path):
    """Slicer 5.12's ``slicer.packaging`` is a submodule that must be imported explicitly."""
    result, calls = run_scenario("install", tmp_path, CTSYNTH_SLICER_VERSION="5.12", CTSYNTH_SKIP_APPLY="1")
    assert [c["call"] for c in calls] == ["PyTorchUtils.installTorch", "slicer.packaging.pip_ensure"]
    assert calls[1]["requirements"] == REQUIREMENTS and calls[1]["requester"] == "CTSemanticSynth"
    assert result["error"] is None and result["missing_after"] == []


def test_declining_installs_nothing_and_says_what_is_missing(tmp_path):
    result, calls = run_scenario("install", tmp_path, CTSYNTH_SLICER_VERSION="5.10", CTSYNTH_CONSENT="no")
    assert [c["call"] for c in calls] == ["PyTorchUtils.installTorch", "slicer.util.confirmOkCancelDisplay"]
    assert result["error"] == f"CTSemanticSynth cannot run without {', '.join(REQUIREMENTS)}"
    assert result["missing_after"] == REQUIREMENTS and "volume" not in result



def test_ctsynth_started_before_anything_is_installed_says_what_to_install_in_one_line(tmp_path):
    result, _ = run_scenario("commands", tmp_path)
    for command in ("info", "synth"):
        message, output = result[command], result[f"{command}_output"]
        assert message is not None and "\n" not in message, message
        assert "not installed" in message and "torch" in message, message
        assert not any("Traceback" in line or line.startswith("  File ") for line in output), output
    message = result["class_set"]  # Apply before the model's card could be read: the same one line
    assert message is not None and "\n" not in message and "not installed" in message and "torch" in message
    assert result["nodes"] == 0  # the failed synthesis added nothing
