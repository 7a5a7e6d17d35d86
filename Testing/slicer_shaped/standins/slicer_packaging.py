"""Stand-in for Slicer 5.12's slicer.packaging (a submodule Slicer does not import for you)."""

from standin_record import importName, install, record


def pip_ensure(requirements, requester=None, **kwargs):
    requirements = [str(r) for r in requirements]
    record("slicer.packaging.pip_ensure", requirements=requirements, requester=requester)
    install(*(importName(r) for r in requirements))
