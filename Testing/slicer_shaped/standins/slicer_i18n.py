"""Stand-in for slicer.i18n (Qt translation in Slicer)."""


def tr(text):
    return text


def translate(context, text):
    return text
