"""Stand-in for the PyTorch extension's module: records installTorch and "installs" torch."""

from standin_record import install, record


class PyTorchUtilsLogic:
    def installTorch(self, askConfirmation=False, torchVersionRequirement=None, **kwargs):
        record("PyTorchUtils.installTorch", askConfirmation=askConfirmation, torchVersionRequirement=torchVersionRequirement)
        install("torch")
        return object()  # the real one returns the torch module
