"""Python packages the module needs beyond what Slicer ships, checked without importing them and installed with
Slicer's own installers after the user agreed (SlicerMONAIAuto3DSeg's dependency handler is the model). The Widget
calls the ``ensure...`` functions; nothing here runs at load time.

A package counts as present when Python can find it (``importlib.util.find_spec``, which imports nothing: torch is
never imported into Slicer's main process) and its installed version meets the requirement. torch comes from the
PyTorch extension (it picks the CUDA build for the driver), TotalSegmentator from its extension when present, the
rest (``Resources/requirements.txt``) from ``slicer.packaging.pip_ensure`` (Slicer 5.12) or
``slicer.util.pip_install`` after a confirmation (Slicer 5.10).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
from pathlib import Path

MINIMUM_TORCH = "2.3"
TORCH = f"torch>={MINIMUM_TORCH}"
TOTALSEGMENTATOR_REQUIREMENTS = ("totalsegmentator==2.18.0", "nnunetv2==2.6.0")  # pip fallback without the extension
IMPORT_NAMES = {"pyyaml": "yaml", "scikit-image": "skimage", "pillow": "PIL"}  # distribution -> import name


def installedVersion(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def importable(name: str) -> bool:
    """Whether ``import name`` would find the package (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def satisfied(requirement: str) -> bool:
    """Whether ``requirement`` (e.g. ``'nibabel>=5.0'``) is importable at a version it allows."""
    from packaging.requirements import Requirement

    req = Requirement(requirement)
    if not importable(IMPORT_NAMES.get(req.name.lower(), req.name.replace("-", "_"))):
        return False
    version = installedVersion(req.name)
    return version is not None and (not req.specifier or req.specifier.contains(version.split("+")[0], prereleases=True))


def readRequirements(path: str | Path) -> list[str]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def missingRequirements(requirements: list[str]) -> list[str]:
    importlib.invalidate_caches()  # an install in this session is seen
    return [r for r in requirements if not satisfied(r)]


def missingForSynthesis(requirementsFile: str | Path) -> list[str]:
    """What synthesis still needs, as requirements: torch first, then the library's packages."""
    return missingRequirements([TORCH] + readRequirements(requirementsFile))


def ensureTorch(requester: str) -> None:
    """PyTorch through the PyTorch extension, which asks the user and picks the CUDA build that fits the driver."""
    if not missingRequirements([TORCH]):
        return
    version = installedVersion("torch")
    if version is not None and importable("torch"):
        raise RuntimeError(f"{requester} needs PyTorch >= {MINIMUM_TORCH}, but {version} is installed: update it in "
                           f"the PyTorch Utils module (version requirement >={MINIMUM_TORCH})")
    try:
        import PyTorchUtils
    except ModuleNotFoundError:
        raise RuntimeError(f"{requester} needs the PyTorch extension: install it from the Extensions Manager and restart "
                           "Slicer") from None
    logging.info("%s: installing PyTorch (this can take several minutes)", requester)
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True, torchVersionRequirement=f">={MINIMUM_TORCH}")
    if torch is None or missingRequirements([TORCH]):
        raise RuntimeError(f"PyTorch >= {MINIMUM_TORCH} was not installed; {requester} cannot synthesize without it")


def _slicerPackaging():
    """``slicer.packaging`` (Slicer 5.12; a submodule that must be imported explicitly), or None (Slicer 5.10)."""
    try:
        import slicer.packaging
    except ImportError:
        return None
    return slicer.packaging if hasattr(slicer.packaging, "pip_ensure") else None


def ensurePackages(requirements: list[str], requester: str) -> None:
    """Install what is missing of ``requirements``: ``slicer.packaging.pip_ensure`` (it asks, installs, offers a
    restart), else ``slicer.util.pip_install`` after a confirmation. Raises RuntimeError when declined or when a
    package is still missing afterwards."""
    import slicer

    missing = missingRequirements(requirements)
    if not missing:
        return
    packaging = _slicerPackaging()
    if packaging is not None:
        packaging.pip_ensure(missing, requester=requester)
    else:
        if not slicer.util.confirmOkCancelDisplay(
                f"{requester} needs these Python packages: {', '.join(missing)}. Install them now? "
                "(This needs a network connection and can take a few minutes.)", "Install Python packages"):
            raise RuntimeError(f"{requester} cannot run without {', '.join(missing)}")
        slicer.util.pip_install(missing)
    still = missingRequirements(missing)
    if still:
        raise RuntimeError(f"{requester}: {', '.join(still)} could not be installed; see the Python console")


def ensureLibraryDependencies(requirementsFile: str | Path, requester: str = "CTSemanticSynth") -> None:
    """The packages the library imports beyond what Slicer ships (reading and writing files, the model)."""
    ensurePackages(readRequirements(requirementsFile), requester)


def ensureSynthesisDependencies(requirementsFile: str | Path, requester: str = "CTSemanticSynth") -> None:
    ensureTorch(requester)
    ensureLibraryDependencies(requirementsFile, requester)


def ensureTotalSegmentator(requester: str = "CTSemanticSynth") -> None:
    """TotalSegmentator for the Dice check: the TotalSegmentator extension's installer if present, else pip."""
    if importable("totalsegmentator") and importable("nnunetv2"):
        return
    ensureTorch(requester)
    try:
        import slicer

        logic = slicer.util.getModuleLogic("TotalSegmentator")
    except Exception:
        logic = None
    if logic is not None and hasattr(logic, "setupPythonRequirements"):
        logic.setupPythonRequirements()
        return
    ensurePackages(list(TOTALSEGMENTATOR_REQUIREMENTS), requester)
