"""Stand-in for slicer.parameterNodeWrapper: enough to define a parameter node class at load time."""


class Choice:
    def __init__(self, choices):
        self.choices = list(choices)


class WithinRange:
    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum


def parameterNodeWrapper(cls):
    return cls


class GuiConnector:
    def __init__(self):
        self._callback = None


def parameterNodeGuiConnector(cls):
    return cls


def unannotatedType(datatype):
    return datatype
