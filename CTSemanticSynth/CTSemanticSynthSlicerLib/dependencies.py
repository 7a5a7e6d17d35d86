"""Python packages the module needs, ensured on Apply with Slicer's own installers (called by the Widget only:
this asks the user before installing anything). Checks use package metadata, so torch is never imported into
Slicer's main process; synthesis imports it in the background process.
"""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path

MINIMUM_TORCH = "2.3"
TOTALSEGMENTATOR_REQUIREMENTS = ("totalsegmentator==2.18.0", "nnunetv2==2.6.0")


def installedVersion(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _satisfied(requirement: str) -> bool:
    from packaging.requirements import Requirement

    req = Requirement(requirement)
    version = installedVersion(req.name)
    return version is not None and (not req.specifier or req.specifier.contains(version, prereleases=True))


def readRequirements(path: str | Path) -> list[str]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def missingRequirements(requirements: list[str]) -> list[str]:
    return [r for r in requirements if not _satisfied(r)]


def ensureTorch(requester: str) -> None:
    """PyTorch through the PyTorch extension (it picks the CUDA build that fits the driver)."""
    version = installedVersion("torch")
    if version is not None:
        from packaging.version import Version

        if Version(version.split("+")[0]) < Version(MINIMUM_TORCH):
            raise RuntimeError(f"{requester} needs PyTorch >= {MINIMUM_TORCH}, but {version} is installed: update it in "
                               "the PyTorch Utils module (version requirement >=" + MINIMUM_TORCH + ")")
        return
    try:
        import PyTorchUtils
    except ModuleNotFoundError:
        raise RuntimeError(f"{requester} needs the PyTorch extension: install it from the Extensions Manager and restart "
                           "Slicer") from None
    logging.info("%s: installing PyTorch (this can take several minutes)", requester)
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True, torchVersionRequirement=f">={MINIMUM_TORCH}")
    if torch is None:
        raise RuntimeError(f"PyTorch was not installed; {requester} cannot synthesize without it")


def ensurePackages(requirements: list[str], requester: str) -> None:
    """``slicer.packaging.pip_ensure`` (Slicer >= 5.10: it asks, installs, offers a restart), else
    ``slicer.util.pip_install`` after a confirmation dialog."""
    import slicer

    missing = missingRequirements(requirements)
    if not missing:
        return
    packaging = getattr(slicer, "packaging", None)
    if packaging is not None and hasattr(packaging, "pip_ensure"):
        packaging.pip_ensure(missing, requester=requester)
        return
    if not slicer.util.confirmOkCancelDisplay(
            f"{requester} needs these Python packages: {', '.join(missing)}. Install them now? "
            "(This needs a network connection and can take a few minutes.)", "Install Python packages"):
        raise RuntimeError(f"{requester} cannot run without {', '.join(missing)}")
    slicer.util.pip_install(missing)


def ensureSynthesisDependencies(requirementsFile: str | Path, requester: str = "CTSemanticSynth") -> None:
    ensureTorch(requester)
    ensurePackages(readRequirements(requirementsFile), requester)


def ensureTotalSegmentator(requester: str = "CTSemanticSynth") -> None:
    """TotalSegmentator for the Dice check: the TotalSegmentator extension's installer if present, else pip."""
    if installedVersion("totalsegmentator") is not None and installedVersion("nnunetv2") is not None:
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
