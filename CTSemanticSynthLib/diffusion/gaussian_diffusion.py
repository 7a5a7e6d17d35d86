"""Gaussian diffusion of improved DDPM: forward process, posterior, learned-range variance and the hybrid loss.

Timestep arguments ``t`` index this object's chain (0..num_timesteps-1). For a respaced chain the model is always
called with the ORIGINAL timesteps, ``model_timesteps(t)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .respace import respaced_betas
from .schedule import get_beta_schedule

PREDICTIONS = ("eps", "x0", "v")
LOSSES = ("hybrid", "mse")

ModelFn = Callable[..., Tensor]


def diffusion_defaults() -> dict[str, Any]:
    """The paper's settings: linear schedule, T=1000, eps-prediction, learned-range variance, hybrid loss (1e-3)."""
    return {
        "schedule": "linear",
        "num_timesteps": 1000,
        "prediction": "eps",
        "learn_sigma": True,
        "loss": "hybrid",
        "vlb_weight": 0.001,
    }


def _extract(values: np.ndarray, t: Tensor, like: Tensor) -> Tensor:
    """``values[t]`` in ``like``'s dtype and device, shaped [B, 1, ..., 1] to broadcast against ``like``."""
    table = device_table(np.asarray(values), like.dtype, like.device)
    return table[t.to(like.device)].reshape(-1, *([1] * (like.ndim - 1)))


def device_table(values: np.ndarray, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A 1-D table as a tensor of ``dtype`` on ``device``, copied there once per content (not once per step)."""
    return _cached_table(values.dtype.str, values.tobytes(), dtype, device)


@functools.lru_cache(maxsize=256)
def _cached_table(numpy_dtype: str, data: bytes, dtype: torch.dtype, device: torch.device) -> Tensor:
    with torch.inference_mode(False):  # also usable outside inference mode (training)
        return torch.as_tensor(np.frombuffer(data, dtype=numpy_dtype).copy(), dtype=dtype).to(device)


class GaussianDiffusion:
    """Diffusion process and its losses, built from JSON-serialisable keyword arguments (kept in ``config``).

    ``betas`` (explicit list) overrides ``schedule``/``num_timesteps``; ``respaced`` gives a shorter chain over
    some of the timesteps (what samplers walk). ``prediction`` is what the model predicts ("eps", "x0" or "v"); with ``learn_sigma`` the model outputs 2*C channels, the second half
    interpolating the log variance between the clipped posterior variance (-1) and beta_t (+1). Without it the
    variance is fixed to beta_t ("fixed large"). ``loss`` "hybrid" = MSE + vlb_weight * num_timesteps * VLB term
    (needs ``learn_sigma``), "mse" = MSE only (needs fixed variance).
    """

    def __init__(
        self,
        betas: Sequence[float] | None = None,
        *,
        schedule: str = "linear",
        num_timesteps: int = 1000,
        prediction: str = "eps",
        learn_sigma: bool = True,
        loss: str = "hybrid",
        vlb_weight: float = 0.001,
    ) -> None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        if loss == "hybrid" and not learn_sigma:
            raise ValueError("loss 'hybrid' trains the learned variance: it needs learn_sigma=True (or use loss 'mse')")
        if loss == "mse" and learn_sigma:
            raise ValueError("loss 'mse' never trains the variance channel: use loss 'hybrid' or learn_sigma=False")

        base = get_beta_schedule(schedule, num_timesteps) if betas is None else np.asarray(betas, dtype=np.float64)
        if base.ndim != 1 or base.size == 0 or not ((base > 0) & (base <= 1)).all():
            raise ValueError("betas must be a non-empty 1-D sequence of values in (0, 1]")
        self.config: dict[str, Any] = {
            "betas": None if betas is None else [float(b) for b in base],
            "schedule": schedule,
            "num_timesteps": int(num_timesteps),
            "prediction": prediction,
            "learn_sigma": bool(learn_sigma),
            "loss": loss,
            "vlb_weight": float(vlb_weight),
        }
        self.prediction = prediction
        self.learn_sigma = bool(learn_sigma)
        self.loss_type = loss
        self.vlb_weight = float(vlb_weight)
        self.original_num_timesteps = int(base.size)
        self.timestep_map = np.arange(base.size, dtype=np.int64)
        self._set_chain(base)

    def _set_chain(self, betas: np.ndarray) -> None:
        """Precompute the float64 coefficient tables of the chain with these betas."""
        self.betas = betas
        self.num_timesteps = int(betas.size)
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t=0; its log is clipped to the t=1 value (for a 1-step chain: to beta_0).
        first = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.fixed_log_variance = np.log(np.append(first, betas[1:]))

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GaussianDiffusion:
        """Rebuild from a ``config`` dict (missing keys take the constructor defaults)."""
        return cls(**config)

    def respaced(self, use_timesteps: Iterable[int]) -> GaussianDiffusion:
        """The same process restricted to ``use_timesteps`` (ORIGINAL timesteps, whatever this chain's spacing).

        Its ``config`` is this process's: the chain is a view for sampling, not a new process.
        """
        chain = GaussianDiffusion.from_config(self.config)
        betas, timestep_map = respaced_betas(chain.alphas_cumprod, use_timesteps)
        chain.timestep_map = np.asarray(timestep_map, dtype=np.int64)
        chain._set_chain(betas)
        return chain

    def model_timesteps(self, t: Tensor) -> Tensor:
        """Original timesteps (LongTensor) for chain indices ``t``: what the model is called with."""
        return device_table(self.timestep_map, torch.long, t.device)[t]

    # Forward process and posterior.

    def q_mean_variance(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and log variance of q(x_t | x_0)."""
        mean = _extract(self.sqrt_alphas_cumprod, t, x0) * x0
        variance = _extract(1.0 - self.alphas_cumprod, t, x0).expand_as(x0)
        return mean, variance, torch.log(variance)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Sample q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} differs from x0 shape {tuple(x0.shape)}")
        signal = _extract(self.sqrt_alphas_cumprod, t, x0) * x0
        return signal + _extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def q_posterior_mean_variance(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log variance of the posterior q(x_{t-1} | x_t, x_0)."""
        mean = _extract(self.posterior_mean_coef1, t, x_t) * x0 + _extract(self.posterior_mean_coef2, t, x_t) * x_t
        variance = _extract(self.posterior_variance, t, x_t).expand_as(x_t)
        log_variance = _extract(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    # Conversions between the parametrisations.

    def x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_0 implied by a noise prediction."""
        scaled = _extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
        return scaled - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps

    def eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """Noise implied by an x_0 prediction."""
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / _extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        )

    def x0_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """x_0 implied by a velocity prediction v = sqrt(abar) eps - sqrt(1 - abar) x_0."""
        scaled = _extract(self.sqrt_alphas_cumprod, t, x_t) * x_t
        return scaled - _extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * v

    def x0_from_prediction(self, x_t: Tensor, t: Tensor, prediction: Tensor) -> Tensor:
        """x_0 implied by the model's prediction (eps, x0 or v, see ``prediction``); inverse: ``prediction_target``."""
        if self.prediction == "eps":
            return self.x0_from_eps(x_t, t, prediction)
        if self.prediction == "x0":
            return prediction
        return self.x0_from_v(x_t, t, prediction)

    def velocity(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """The v target sqrt(abar_t) noise - sqrt(1 - abar_t) x_0."""
        scaled = _extract(self.sqrt_alphas_cumprod, t, x0) * noise
        return scaled - _extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0

    def prediction_target(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """What the model's first C channels should output for this x_0, t and noise."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        return self.velocity(x0, t, noise)

    # Reverse process.

    def split_output(self, model_output: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor | None]:
        """(prediction, variance values or None) from a model output of C or 2*C channels."""
        channels = x_t.shape[1]
        expected = 2 * channels if self.learn_sigma else channels
        if model_output.shape != (x_t.shape[0], expected, *x_t.shape[2:]):
            raise ValueError(
                f"model output has shape {tuple(model_output.shape)}; expected {expected} channels for x_t of shape "
                f"{tuple(x_t.shape)} (learn_sigma={self.learn_sigma})"
            )
        if not self.learn_sigma:
            return model_output, None
        return model_output[:, :channels], model_output[:, channels:]

    def p_mean_variance(
        self, model_output: Tensor, x_t: Tensor, t: Tensor, clip_denoised: bool = True
    ) -> dict[str, Tensor]:
        """p(x_{t-1} | x_t) from a model output: dict(mean, log_variance, pred_x0, eps).

        ``pred_x0`` is clipped to [-1, 1] when ``clip_denoised``; ``eps`` is the noise consistent with it.
        """
        prediction, var_values = self.split_output(model_output, x_t)
        if var_values is None:
            log_variance = _extract(self.fixed_log_variance, t, x_t).expand_as(x_t)
        else:
            min_log = _extract(self.posterior_log_variance_clipped, t, x_t)
            max_log = _extract(np.log(self.betas), t, x_t)
            frac = (var_values + 1.0) / 2.0
            log_variance = frac * max_log + (1.0 - frac) * min_log

        pred_x0 = self.x0_from_prediction(x_t, t, prediction)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
        if self.prediction == "eps" and not clip_denoised:
            eps = prediction
        else:
            eps = self.eps_from_x0(x_t, t, pred_x0)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
        return {
            "mean": mean,
            "log_variance": log_variance,
            "pred_x0": pred_x0,
            "eps": eps,
        }

    # Losses.

    def vlb_terms(self, model_output: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Per-sample VLB term in bits/dim: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t>0, decoder NLL at t=0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -mean_flat(
            discretized_gaussian_log_likelihood(x0, means=out["mean"], log_scales=0.5 * out["log_variance"])
        ) / math.log(2.0)
        return torch.where(t.to(kl.device) == 0, nll, kl)

    def training_losses(
        self,
        model_fn: ModelFn,
        x0: Tensor,
        t: Tensor,
        model_kwargs: dict[str, Any] | None = None,
        noise: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Per-sample losses dict(loss, mse, vb) for data ``x0`` in [-1, 1] at chain indices ``t``.

        ``mse`` is on the prediction target; ``vb`` is the VLB term (bits/dim) whose gradient reaches only the
        variance channels (the mean is detached). "hybrid": loss = mse + vlb_weight * num_timesteps * vb, the
        paper's L_simple + lambda L_vlb; "mse": loss = mse and vb is a detached diagnostic. ``noise`` defaults to
        ``torch.randn_like(x0)``.
        """
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        model_output = model_fn(x_t, self.model_timesteps(t), **(model_kwargs or {}))
        prediction, var_values = self.split_output(model_output, x_t)
        if var_values is None:
            vb = self.vlb_terms(model_output.detach(), x0, x_t, t).detach()
        else:
            frozen = torch.cat([prediction.detach(), var_values], dim=1)
            vb = self.vlb_terms(frozen, x0, x_t, t)
        mse = mean_flat((self.prediction_target(x0, t, noise) - prediction) ** 2)
        loss = mse + self.vlb_weight * self.num_timesteps * vb if self.loss_type == "hybrid" else mse
        return {"loss": loss, "mse": mse, "vb": vb}
