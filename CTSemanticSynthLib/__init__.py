"""CTSemanticSynth backend: abdominal segmentation -> synthetic CT with a conditional diffusion model."""

__version__ = "0.1.0"
