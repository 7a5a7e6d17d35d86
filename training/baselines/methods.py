"""The three GAN baselines' objectives and published hyper-parameters (arXiv 2312.06453, Sec. 3, "Baseline
Comparisons": Adam, lr 5e-4 for Pix2Pix and SPADE, 4e-4 (D) / 1e-4 (G) for OASIS, 300 epochs).

Values the paper does not state come from the methods' authors:
- Pix2Pix (Isola et al. 2017, Sec. 3.3 and 4): Adam betas (0.5, 0.999), L1 weight lambda = 100, the discriminator
  objective halved, weights N(0, 0.02), no EMA.
- SPADE (Park et al. 2019, Sec. 4 / appendix A): Adam betas (0, 0.999), hinge loss, feature matching weight 10,
  Xavier init (gain 0.02), no EMA; no VGG loss (it needs ImageNet VGG-19 weights, i.e. torchvision).
- OASIS (Schoenfeld et al. 2021, Sec. 4 and code): Adam betas (0, 0.999), LabelMix weight 10, 3D noise of 64
  channels, Xavier init (gain 0.02), EMA of the generator with decay 0.9999.
The batch is 16, the paper's batch for its diffusion models and SDM (it gives none for the GANs).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from .discriminators import MultiscaleDiscriminator, OASISDiscriminator, PatchGAN
from .losses import (bce, feature_matching, hinge_d, labelmix_loss, labelmix_mask, oasis_fake, oasis_real)

Losses = tuple[Tensor, dict[str, Tensor]]


def init_weights(module: nn.Module, kind: str, gain: float = 0.02) -> None:
    """Authors' initialisation: conv/linear weights N(0, gain) ('normal') or Xavier-normal with ``gain``
    ('xavier'), biases 0 (spectral-norm weights are initialised through their ``original``)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim >= 2:
                nn.init.normal_(p, 0.0, gain) if kind == "normal" else nn.init.xavier_normal_(p, gain)


class GANMethod(ABC):
    """One baseline: its published hyper-parameters, discriminator, and the two losses of a training step.

    ``d_loss`` sees the fake batch detached and runs the discriminator once (one DDP forward); ``g_loss`` runs the
    bare discriminator (its gradients are discarded). Both return (loss, {name: detached value}).
    """

    name = ""
    defaults: dict[str, Any] = {}
    init = "xavier"
    LOG_KEYS: tuple[str, ...] = ()

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    @abstractmethod
    def discriminator(self, num_classes: int, image_size: int) -> nn.Module:
        """The method's discriminator for ``num_classes`` classes and ``image_size`` px slices."""

    @abstractmethod
    def d_loss(self, disc: nn.Module, mask: Tensor, classes: Tensor, real: Tensor, fake: Tensor) -> Losses:
        """The discriminator's loss on real and (detached) fake images."""

    @abstractmethod
    def g_loss(self, disc: nn.Module, mask: Tensor, classes: Tensor, real: Tensor, fake: Tensor) -> Losses:
        """The generator's loss for the fake images (gradients reach the generator through ``fake``)."""


class Pix2Pix(GANMethod):
    name = "pix2pix"
    defaults = {"lr": 5e-4, "lr_d": 5e-4, "beta1": 0.5, "beta2": 0.999, "ema_rate": 0.0}
    init = "normal"
    LOG_KEYS = ("g_adv", "l1")

    def discriminator(self, num_classes: int, image_size: int) -> nn.Module:
        return PatchGAN(num_classes + 1, self.config["disc_channels"])

    def d_loss(self, disc, mask, classes, real, fake):
        logits = disc(torch.cat([mask, mask]), torch.cat([fake, real]))
        fake_logits, real_logits = logits.chunk(2)
        return 0.5 * (bce(fake_logits, False) + bce(real_logits, True)), {}

    def g_loss(self, disc, mask, classes, real, fake):
        adv = bce(disc(mask, fake), True)
        l1 = (fake.float() - real).abs().mean()
        return adv + self.config["lambda_l1"] * l1, {"g_adv": adv.detach(), "l1": l1.detach()}


class SPADE(GANMethod):
    name = "spade"
    defaults = {"lr": 5e-4, "lr_d": 5e-4, "beta1": 0.0, "beta2": 0.999, "ema_rate": 0.0}
    LOG_KEYS = ("g_adv", "feat")

    def discriminator(self, num_classes: int, image_size: int) -> nn.Module:
        return MultiscaleDiscriminator(num_classes + 1, self.config["disc_channels"])

    def d_loss(self, disc, mask, classes, real, fake):
        scales = disc(torch.cat([mask, mask]), torch.cat([fake, real]))
        halves = [s[-1].chunk(2) for s in scales]  # (fake, real) logits per scale
        return sum(hinge_d(real_logits, fake_logits) for fake_logits, real_logits in halves) / len(scales), {}

    def g_loss(self, disc, mask, classes, real, fake):
        scales = disc(torch.cat([mask, mask]), torch.cat([fake, real]))
        fake_features = [[f.chunk(2)[0] for f in s] for s in scales]
        real_features = [[f.chunk(2)[1] for f in s] for s in scales]
        adv = -sum(s[-1].float().mean() for s in fake_features) / len(scales)
        feat = feature_matching(fake_features, real_features)
        return adv + self.config["lambda_fm"] * feat, {"g_adv": adv.detach(), "feat": feat.detach()}


class OASIS(GANMethod):
    name = "oasis"
    defaults = {"lr": 1e-4, "lr_d": 4e-4, "beta1": 0.0, "beta2": 0.999, "ema_rate": 0.9999}
    LOG_KEYS = ("g_adv", "labelmix")

    def discriminator(self, num_classes: int, image_size: int) -> nn.Module:
        return OASISDiscriminator(1, num_classes, image_size, self.config["disc_channels"])

    def d_loss(self, disc, mask, classes, real, fake):
        mix = labelmix_mask(classes, mask.shape[1])
        mixed = mix * real + (1 - mix) * fake
        fake_logits, real_logits, mixed_logits = disc(torch.cat([fake, real, mixed.to(fake.dtype)])).chunk(3)
        labelmix = labelmix_loss(mix, mixed_logits, fake_logits, real_logits)
        loss = oasis_fake(fake_logits) + oasis_real(real_logits, classes) + self.config["lambda_labelmix"] * labelmix
        return loss, {"labelmix": labelmix.detach()}

    def g_loss(self, disc, mask, classes, real, fake):
        adv = oasis_real(disc(fake), classes)
        return adv, {"g_adv": adv.detach()}


METHODS: dict[str, type[GANMethod]] = {m.name: m for m in (Pix2Pix, SPADE, OASIS)}


def make_method(config: dict[str, Any]) -> GANMethod:
    """The method named by ``config['method']``, holding the config (lambdas, discriminator width)."""
    return METHODS[config["method"]](config)
