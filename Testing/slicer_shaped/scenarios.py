"""What a fresh 3D Slicer does with the module, run in a Slicer-shaped Python (see sitecustomize.py beside this file):
``python scenarios.py NAME``, started by Testing/test_slicer_shaped.py. The last stdout line is the result as JSON.

The import chain is the real one (the module's folder on sys.path, as Slicer puts it there); only Slicer's installers
and dialogs are recording stand-ins.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "CTSemanticSynth"
REQUIREMENTS = MODULE / "Resources" / "requirements.txt"
sys.path.insert(0, str(MODULE))  # Slicer adds each scripted module's folder
sys.path.insert(1, str(REPO / "Testing"))  # data_builders
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def loadModuleFile():
    """CTSemanticSynth.py loaded as Slicer 5.10/5.12 loads it (Python 3.12: the version check must pass)."""
    spec = importlib.util.spec_from_file_location("CTSemanticSynth", MODULE / "CTSemanticSynth.py")
    module = importlib.util.module_from_spec(spec)
    with mock.patch.object(sys, "version_info", (3, 12, 10, "final", 0)):
        spec.loader.exec_module(module)
    return module


def imports() -> dict:
    """Import every helper and the module file; name what failed and which non-shipped packages got loaded."""
    import sitecustomize

    failures = {}
    names = ["CTSemanticSynthSlicerLib"] + [f"CTSemanticSynthSlicerLib.{p.stem}" for p in
                                             sorted((MODULE / "CTSemanticSynthSlicerLib").glob("*.py"))
                                             if p.stem != "__init__"]
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:
            failures[name] = f"{type(exc).__name__}: {exc}"
    try:
        module = loadModuleFile()
        classes = sorted(n for n in vars(module) if n.startswith("CTSemanticSynth"))
        supported = module.SUPPORTED
    except Exception as exc:
        failures["CTSemanticSynth.py"] = f"{type(exc).__name__}: {exc}"
        classes, supported = [], False
    loaded = {m.split(".")[0] for m in sys.modules}
    return {"modules": names, "failures": failures, "classes": classes, "supported": supported,
            "loaded_not_shipped": sorted(loaded & sitecustomize.NOT_SHIPPED)}


def recordingSlicerUtil(consent: bool):
    """Stand-ins for the dialog and installer in slicer.util (slicer-core has them, but they need Qt and pip)."""
    import slicer
    from standin_record import importName, install, record

    def confirm(text, windowTitle=None, **kwargs):
        record("slicer.util.confirmOkCancelDisplay", text=text)
        return consent

    def pipInstall(requirements, **kwargs):
        requirements = requirements.split() if isinstance(requirements, str) else [str(r) for r in requirements]
        record("slicer.util.pip_install", requirements=requirements)
        install(*(importName(r) for r in requirements))

    return mock.patch.multiple(slicer.util, confirmOkCancelDisplay=confirm, pip_install=pipInstall)


def check() -> dict:
    """The dependency check before anything is installed."""
    from CTSemanticSynthSlicerLib.dependencies import missingForSynthesis

    return {"missing": missingForSynthesis(REQUIREMENTS)}


def install() -> dict:
    """Apply's first-use path (``CTSYNTH_CONSENT`` yes/no); once installed, Apply on the bundled sample (unless
    ``CTSYNTH_SKIP_APPLY=1``)."""
    from CTSemanticSynthSlicerLib.dependencies import ensureSynthesisDependencies, missingForSynthesis

    consent = os.environ.get("CTSYNTH_CONSENT", "yes") == "yes"
    result: dict = {"error": None}
    with recordingSlicerUtil(consent):
        try:
            ensureSynthesisDependencies(REQUIREMENTS)  # what onApplyButton calls first
        except RuntimeError as exc:
            result["error"] = str(exc)
    result["missing_after"] = missingForSynthesis(REQUIREMENTS)
    if result["error"] is None and os.environ.get("CTSYNTH_SKIP_APPLY") != "1":
        result["volume"] = apply()
    return result


def apply() -> dict:
    """Apply on the bundled sample with the bundled demo model (a few steps): the synthetic CT node."""
    import slicer
    from CTSemanticSynthSlicerLib.logic import SynthesisLogic
    from data_builders.slicer_scene import headless_scene, load_sample_segmentation

    scene, app = headless_scene()
    segmentation = load_sample_segmentation(scene)
    with tempfile.TemporaryDirectory() as temp:
        logic = SynthesisLogic(environment=CHILD_ENV, tempRoot=temp)
        node = logic.synthesize(segmentation, timeout=400, labels="totalseg", steps=2, device="cpu", seed=3)
    voxels = slicer.util.arrayFromVolume(node)
    return {"dimensions": list(node.GetImageData().GetDimensions()), "synthetic": logic.isSynthetic(node),
            "min": int(voxels.min()), "max": int(voxels.max()), "seed": node.GetAttribute("CTSemanticSynth.Seed")}


def commands() -> dict:
    """``ctsynth info`` and ``ctsynth synth`` started the way the module starts them, before anything is installed."""
    from CTSemanticSynthSlicerLib.logic import SynthesisError, SynthesisLogic
    from data_builders.slicer_scene import headless_scene, load_sample_segmentation

    scene, app = headless_scene()
    segmentation = load_sample_segmentation(scene)
    result = {}
    with tempfile.TemporaryDirectory() as temp:
        logic = SynthesisLogic(environment=CHILD_ENV, tempRoot=temp)
        for name, task, finish in (
                ("info", logic.startModelInfo(), logic.finishModelInfo),
                ("synth", logic.startSynthesis(segmentation, labels="totalseg", steps=2, device="cpu",
                                               classSet="paper"), logic.finishSynthesis)):
            task.wait(120)
            try:
                finish(task)
                result[name] = None
            except SynthesisError as exc:
                result[name] = str(exc)
            result[f"{name}_output"] = task.process.lines
        try:  # without a class set, Apply reads the model's card first, which needs the library's packages too
            logic.startSynthesis(segmentation, labels="totalseg")
            result["class_set"] = None
        except SynthesisError as exc:
            result["class_set"] = str(exc)
        result["nodes"] = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    return result

if __name__ == "__main__":
    print(json.dumps({"imports": imports, "check": check, "install": install, "commands": commands}[sys.argv[1]]()))
