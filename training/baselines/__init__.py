"""Training-only parts of the paper's GAN baselines (arXiv 2312.06453, Table 2): discriminators, losses and the
per-method discriminator/generator objectives. The generators themselves live in the library
(``CTSemanticSynthLib.models.generators``), since synthesis needs them; ``training.train_gan`` runs the loop."""

from .methods import METHODS, GANMethod, make_method

__all__ = ["METHODS", "GANMethod", "make_method"]
