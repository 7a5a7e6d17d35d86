"""Adversarial losses of the baselines: vanilla (BCE) GAN (Pix2Pix), hinge + feature matching (SPADE), the
class-balanced (N+1)-class loss and the LabelMix consistency (OASIS)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def bce(logits: Tensor, real: bool) -> Tensor:
    """Vanilla GAN loss: binary cross-entropy of the logits against all-real or all-fake."""
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


def hinge_d(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Discriminator hinge loss: mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))."""
    return F.relu(1 - real_logits.float()).mean() + F.relu(1 + fake_logits.float()).mean()


def feature_matching(fake: list[list[Tensor]], real: list[list[Tensor]]) -> Tensor:
    """pix2pixHD/SPADE feature matching: L1 between the discriminator's intermediate features (every layer but the
    logits) of fake and (detached) real images, summed over layers and averaged over scales."""
    total = fake[0][0].new_zeros((), dtype=torch.float32)
    for fake_scale, real_scale in zip(fake, real):
        for f, r in zip(fake_scale[:-1], real_scale[:-1]):
            total = total + F.l1_loss(f.float(), r.detach().float())
    return total / len(fake)


def class_balance(classes: Tensor, num_classes: int) -> Tensor:
    """OASIS's per-pixel weights [B, S, S]: each class weighted by the inverse of its pixel share in the batch,
    scaled so that the present classes average to one (pixels / (present classes x class pixels)). Counted by
    comparison, not ``bincount`` (whose output size depends on the data: a GPU sync every step)."""
    counts = (classes.reshape(-1, 1) == torch.arange(num_classes, device=classes.device)).sum(0).float()
    present = (counts > 0).sum()
    weights = classes.numel() / (present * counts.clamp(min=1))
    return weights[classes]


def oasis_real(logits: Tensor, classes: Tensor) -> Tensor:
    """Class-balanced cross-entropy of the N+1 logits [B, N+1, S, S] against the true classes (channel c + 1):
    the discriminator's loss on real images and the generator's adversarial loss."""
    loss = F.cross_entropy(logits.float(), classes + 1, reduction="none")
    return (loss * class_balance(classes, logits.shape[1] - 1)).mean()


def oasis_fake(logits: Tensor) -> Tensor:
    """Cross-entropy of the N+1 logits against the fake class (channel 0), unweighted."""
    target = torch.zeros(logits.shape[0], *logits.shape[2:], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits.float(), target)


def labelmix_mask(classes: Tensor, num_classes: int) -> Tensor:
    """LabelMix's mask [B, 1, S, S]: every class is taken whole from the real (1) or the fake (0) image by a fair
    coin (the global torch generator, which the trainer seeds every step); one coin per class of the model, so that
    nothing is read back from the device."""
    coins = torch.randint(0, 2, (num_classes,), device=classes.device)
    return coins[classes][:, None].float()


def labelmix_loss(mask: Tensor, mixed_logits: Tensor, fake_logits: Tensor, real_logits: Tensor) -> Tensor:
    """LabelMix consistency: D(mix(real, fake)) should equal mix(D(real), D(fake)) (squared error)."""
    return F.mse_loss(mixed_logits.float(), (mask * real_logits.float() + (1 - mask) * fake_logits.float()))
