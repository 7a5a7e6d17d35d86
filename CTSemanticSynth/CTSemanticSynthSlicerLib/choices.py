"""The panel's fixed choices, in one place. Plain tuples that Python 3.9 can import, so that the module file can
declare its parameter node before it checks the Slicer version."""

PRESETS = ("fast", "balanced", "paper")
SAMPLERS = ("preset", "ddim", "dpmsolver++", "ancestral")  # "preset": the preset's own sampler
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cuda", "cpu", "mps")
CONVENTIONS = ("auto", "amos", "totalseg", "totalseg_v1", "json")
"""auto: segment names; amos / totalseg / totalseg_v1: segment label values; json: a mapping file."""
ORIENTATIONS = ("Axial", "Coronal", "Sagittal")
REVIEW_WINDOWS = ("Abdomen", "Bone", "Lung")
"""Display windows of the side-by-side review, applied to both sides (values in review.WINDOW_PRESETS)."""
BUNDLED_MODELS = ("demo", "anatomy")
"""Models in Resources/models: the paper's classes and window, and the 36-class anatomy set with full-range HU."""
