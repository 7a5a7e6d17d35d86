"""Diffusion library: schedules, forward/posterior maths, VLB, respacing, samplers, and a tiny overfit run (CPU)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from CTSemanticSynthLib.diffusion import (
    SAMPLERS,
    AncestralSampler,
    DDIMSampler,
    GaussianDiffusion,
    approx_standard_normal_cdf,
    diffusion_defaults,
    discretized_gaussian_log_likelihood,
    get_beta_schedule,
    make_sampler,
    mean_flat,
    normal_kl,
    respaced_betas,
    sample_loop,
    space_timesteps,
)

T = 1000


@pytest.fixture  # per test (cheap): a module-scoped one would be built inside one test only, hiding it from mutmut
def diffusion() -> GaussianDiffusion:
    return GaussianDiffusion(**diffusion_defaults())


def batch_t(value: int, batch: int) -> Tensor:
    return torch.full((batch,), value, dtype=torch.long)


def oracle_model(diffusion: GaussianDiffusion, x0: Tensor, v: float = -1.0):
    """Model that knows the single data point x0: true eps for any x_t, and a constant variance value v."""

    def model_fn(x_t: Tensor, t: Tensor, **_: object) -> Tensor:
        abar = torch.as_tensor(diffusion.alphas_cumprod, dtype=x_t.dtype)[t].reshape(-1, 1, 1, 1)
        eps = (x_t - abar.sqrt() * x0) / (1.0 - abar).sqrt()
        return torch.cat([eps, torch.full_like(eps, v)], dim=1)

    return model_fn


def smooth_image(size: int = 16, dtype: torch.dtype = torch.float64) -> Tensor:
    """A 1 x 1 x size x size phantom in [-1, 1]: background, a body disc, an organ disc."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    image = torch.full((size, size), -1.0)
    image[xx**2 + yy**2 < 0.8] = -0.2
    image[(xx - 0.25) ** 2 + (yy + 0.1) ** 2 < 0.12] = 0.6
    return image.to(dtype)[None, None]


# Schedules.


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [50, 1000])
def test_schedule_shape_range_monotone(name: str, steps: int) -> None:
    betas = get_beta_schedule(name, steps)
    assert betas.shape == (steps,) and betas.dtype == np.float64
    assert ((betas > 0) & (betas < 1)).all()
    assert (np.diff(betas) >= 0).all()


def test_linear_endpoints() -> None:
    betas = get_beta_schedule("linear", 1000)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    short = get_beta_schedule("linear", 250)
    assert short[0] == pytest.approx(4e-4) and short[-1] == pytest.approx(0.08)


def test_cosine_alphas_cumprod_closed_form() -> None:
    betas = get_beta_schedule("cosine", T)
    f = lambda s: np.cos((s / T + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    expected = f(np.arange(1, T + 1)) / f(0)
    abar = np.cumprod(1 - betas)
    np.testing.assert_allclose(abar[:-1], expected[:-1], rtol=1e-9, atol=1e-12)
    assert betas[-1] == pytest.approx(0.999)


def test_unknown_schedule() -> None:
    with pytest.raises(ValueError, match="^unknown beta schedule 'quadratic'; choose one of linear, cosine$"):
        get_beta_schedule("quadratic", 10)
    with pytest.raises(ValueError, match="^num_timesteps must be >= 1, got 0$"):
        get_beta_schedule("cosine", 0)
    with pytest.raises(ValueError, match="num_timesteps > 20"):
        get_beta_schedule("linear", 20)


# Config.


def test_config_round_trip(diffusion: GaussianDiffusion) -> None:
    config = json.loads(json.dumps(diffusion.config))
    rebuilt = GaussianDiffusion.from_config(config)
    np.testing.assert_array_equal(rebuilt.betas, diffusion.betas)
    explicit = GaussianDiffusion(betas=[0.1, 0.2, 0.3])
    assert GaussianDiffusion.from_config(json.loads(json.dumps(explicit.config))).num_timesteps == 3


def test_defaults_are_paper(diffusion: GaussianDiffusion) -> None:
    assert diffusion.num_timesteps == 1000 and diffusion.prediction == "eps"
    assert diffusion.learn_sigma and diffusion.loss_type == "hybrid" and diffusion.vlb_weight == 0.001


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"prediction": "score"}, "^prediction must be one of eps, x0, v, got 'score'$"),
    ({"loss": "kl"}, "^loss must be one of hybrid, mse, got 'kl'$"),
    ({"loss": "hybrid", "learn_sigma": False}, "^loss 'hybrid' trains the learned variance: it needs learn_sigma=True"),
    ({"loss": "mse"}, "^loss 'mse' never trains the variance channel: use loss 'hybrid' or learn_sigma=False$"),
    ({"betas": []}, r"^betas must be a non-empty 1-D sequence of values in \(0, 1\]$"),
    ({"betas": [[0.1, 0.2]]}, "non-empty 1-D"), ({"betas": [0.0, 0.1]}, "non-empty 1-D"),
    ({"betas": [0.1, 1.5]}, "non-empty 1-D"),
])
def test_invalid_config(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GaussianDiffusion(**kwargs)


def test_short_explicit_chains() -> None:
    """One- and two-step chains: the t=0 log variance is clipped to the next step's value (one step: to beta_0)."""
    one = GaussianDiffusion(betas=[0.5], learn_sigma=False, loss="mse")
    np.testing.assert_allclose(one.posterior_log_variance_clipped, np.log([0.5]))
    two = GaussianDiffusion(betas=[0.1, 0.2], learn_sigma=False, loss="mse")
    pv1 = 0.2 * 0.1 / (1 - 0.9 * 0.8)
    np.testing.assert_allclose(two.posterior_log_variance_clipped, np.log([pv1, pv1]))
    np.testing.assert_allclose(two.fixed_log_variance, np.log([pv1, 0.2]))
    assert two.config["betas"] == [0.1, 0.2] and GaussianDiffusion().config["betas"] is None
    assert get_beta_schedule("cosine", 1).shape == (1,)


# Forward process and posterior.


def test_q_sample_moments(diffusion: GaussianDiffusion) -> None:
    x0 = torch.tensor([-0.9, 0.0, 0.4, 1.0], dtype=torch.float64).reshape(1, 1, 2, 2)
    n = 200_000
    g = torch.Generator().manual_seed(0)
    for step in (0, 250, 999):
        t = batch_t(step, n)
        noise = torch.randn((n, 1, 2, 2), generator=g, dtype=torch.float64)
        x_t = diffusion.q_sample(x0.expand(n, -1, -1, -1), t, noise)
        abar = float(np.cumprod(1 - get_beta_schedule("linear", T))[step])
        mean, var, log_var = diffusion.q_mean_variance(x0, batch_t(step, 1))
        torch.testing.assert_close(mean, math.sqrt(abar) * x0)
        torch.testing.assert_close(var, torch.full_like(x0, 1 - abar))
        torch.testing.assert_close(log_var, torch.log(var))
        std = math.sqrt(1 - abar)
        assert (x_t.mean(0) - mean[0]).abs().max() < 5 * std / math.sqrt(n)
        assert (x_t.var(0) / var[0] - 1).abs().max() < 0.02


def test_posterior_closed_form_and_gaussian_product(diffusion: GaussianDiffusion) -> None:
    x0 = torch.tensor([[[[0.3, -0.7]]]], dtype=torch.float64)
    x_t = torch.tensor([[[[0.5, 1.2]]]], dtype=torch.float64)
    betas, abar = diffusion.betas, diffusion.alphas_cumprod
    for step in (1, 10, 500, 999):
        mean, var, log_var = diffusion.q_posterior_mean_variance(x0, x_t, batch_t(step, 1))
        b, a, a_prev = betas[step], abar[step], abar[step - 1]
        torch.testing.assert_close(
            mean, math.sqrt(a_prev) * b / (1 - a) * x0 + math.sqrt(1 - b) * (1 - a_prev) / (1 - a) * x_t
        )
        torch.testing.assert_close(var, torch.full_like(x0, b * (1 - a_prev) / (1 - a)))
        torch.testing.assert_close(log_var, torch.log(var))
        # Numerically: q(x_t | x_{t-1}) q(x_{t-1} | x0), normalised on a grid over x_{t-1}.
        for j in range(2):
            std = math.sqrt(float(var[0, 0, 0, j]))
            grid = torch.linspace(-12 * std, 12 * std, 40001, dtype=torch.float64) + float(mean[0, 0, 0, j])
            log_p = -((float(x_t[0, 0, 0, j]) - math.sqrt(1 - b) * grid) ** 2) / (2 * b) - (
                (grid - math.sqrt(a_prev) * float(x0[0, 0, 0, j])) ** 2
            ) / (2 * (1 - a_prev))
            w = torch.exp(log_p - log_p.max())
            w = w / w.sum()
            num_mean = float((w * grid).sum())
            num_var = float((w * (grid - num_mean) ** 2).sum())
            assert num_mean == pytest.approx(float(mean[0, 0, 0, j]), abs=1e-6 * max(1.0, std))
            assert num_var == pytest.approx(float(var[0, 0, 0, j]), rel=1e-5)
    _, var0, log_var0 = diffusion.q_posterior_mean_variance(x0, x_t, batch_t(0, 1))
    assert float(var0.max()) == 0.0 and torch.isfinite(log_var0).all()


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_parametrisations_recover_x0(prediction: str) -> None:
    d = GaussianDiffusion(prediction=prediction)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand((3, 1, 4, 4), generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 400, 999])
    x_t = d.q_sample(x0, t, noise)
    output = torch.cat([d.prediction_target(x0, t, noise), torch.zeros_like(x0)], dim=1)
    out = d.p_mean_variance(output, x_t, t, clip_denoised=False)
    torch.testing.assert_close(out["pred_x0"], x0)
    torch.testing.assert_close(out["eps"], noise)
    torch.testing.assert_close(out["mean"], d.q_posterior_mean_variance(x0, x_t, t)[0])


def test_fixed_variance_default_clipping_dtype_and_channels() -> None:
    d = GaussianDiffusion(learn_sigma=False, loss="mse")
    x_t = torch.full((2, 2, 2, 2), 3.0)  # two image channels, float32
    t = torch.tensor([0, 500])
    out = d.p_mean_variance(torch.zeros_like(x_t), x_t, t)  # clip_denoised defaults to True
    assert out["pred_x0"].max() == 1.0 and out["mean"].dtype == torch.float32
    np.testing.assert_allclose(out["log_variance"][:, 0, 0, 0].numpy(),
                               np.log([d.posterior_variance[1], d.betas[500]]), rtol=1e-6)
    assert d.q_sample(x_t, t, torch.zeros_like(x_t)).dtype == torch.float32
    learned = GaussianDiffusion()
    assert learned.p_mean_variance(torch.zeros((2, 4, 2, 2)), x_t, t)["mean"].shape == x_t.shape
    with pytest.raises(ValueError, match=r"^noise shape \(2, 2, 2, 2\) differs from x0 shape \(2, 1, 2, 2\)$"):
        d.q_sample(x_t[:, :1], t, x_t)


def test_learned_range_variance_endpoints(diffusion: GaussianDiffusion) -> None:
    x_t = torch.zeros((2, 1, 2, 2), dtype=torch.float64)
    t = torch.tensor([0, 500])
    low = diffusion.p_mean_variance(torch.cat([x_t, -torch.ones_like(x_t)], 1), x_t, t)["log_variance"]
    high = diffusion.p_mean_variance(torch.cat([x_t, torch.ones_like(x_t)], 1), x_t, t)["log_variance"]
    pv = diffusion.posterior_variance
    np.testing.assert_allclose(low[:, 0, 0, 0].numpy(), np.log([pv[1], pv[500]]))
    np.testing.assert_allclose(high[:, 0, 0, 0].numpy(), np.log(diffusion.betas[[0, 500]]))


# Losses and the VLB.


def test_normal_kl_and_decoder_likelihood() -> None:
    m = torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert torch.allclose(normal_kl(m, torch.zeros(2, dtype=torch.float64), m, torch.zeros(2, dtype=torch.float64)),
                          torch.zeros(2, dtype=torch.float64))
    kl = normal_kl(torch.tensor(1.0), torch.tensor(math.log(4.0)), torch.tensor(0.0), torch.tensor(0.0))
    assert float(kl) == pytest.approx(0.5 * (4 + 1 - 1 - math.log(4)))
    # The 256 bins partition the real line: probabilities sum to 1.
    levels = (torch.arange(256, dtype=torch.float64) / 127.5 - 1).reshape(1, 256)
    logp = discretized_gaussian_log_likelihood(
        levels, means=torch.full_like(levels, 0.1), log_scales=torch.full_like(levels, math.log(0.2))
    )
    assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(ValueError, match=r"shape mismatch: x \(2,\), means \(3,\), log_scales \(2,\)"):
        discretized_gaussian_log_likelihood(torch.zeros(2), means=torch.zeros(3), log_scales=torch.zeros(2))
    assert mean_flat(torch.ones(3, 2, 5)).shape == (3,)


def test_decoder_likelihood_against_the_exact_normal_cdf() -> None:
    """Bin probabilities from the exact CDF (erf): the tanh approximation is within 3e-4 of it, so each bin's log
    probability matches to 1e-2 where the bin holds more than 1 % (the edge bins reach to -inf / +inf)."""
    cdf = lambda z: 0.5 * (1 + torch.erf(z / math.sqrt(2)))  # noqa: E731
    z = torch.linspace(-5, 5, 201, dtype=torch.float64)
    assert (approx_standard_normal_cdf(z) - cdf(z)).abs().max() < 3e-4
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    for mean, scale in ((0.1, 0.05), (-0.99, 0.01), (0.99, 0.01)):  # the middle, and both edge bins
        logp = discretized_gaussian_log_likelihood(levels, means=torch.full_like(levels, mean),
                                                   log_scales=torch.full_like(levels, math.log(scale)))
        upper = torch.where(levels > 0.999, torch.ones_like(levels), cdf((levels + 1 / 255 - mean) / scale))
        lower = torch.where(levels < -0.999, torch.zeros_like(levels), cdf((levels - 1 / 255 - mean) / scale))
        exact = upper - lower
        big = exact > 0.01
        assert big.sum() >= 2
        torch.testing.assert_close(logp[big], exact[big].log(), rtol=0, atol=1e-2)


def test_vlb_finite_for_random_outputs(diffusion: GaussianDiffusion) -> None:
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand((3, 1, 8, 8), generator=g) * 2 - 1
    t = torch.tensor([0, 500, 999])
    x_t = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    output = torch.randn((3, 2, 8, 8), generator=g)
    vb = diffusion.vlb_terms(output, x0, x_t, t)
    assert vb.shape == (3,) and torch.isfinite(vb).all() and (vb >= 0).all()


def test_vlb_terms_closed_form(diffusion: GaussianDiffusion) -> None:
    """KL (t>0) and decoder NLL (t=0) in bits/dim, recomputed here from the schedule, for a model output whose x_0
    lies partly outside [-1, 1] (the VLB must not clip it) and a learned variance between the two bounds."""
    x0 = torch.tensor([-1.0, -0.2, 0.4, 1.0], dtype=torch.float64).reshape(1, 1, 2, 2).expand(3, -1, -1, -1)
    t = torch.tensor([0, 1, 300])
    x_t = diffusion.q_sample(x0, t, torch.tensor([0.3, -1.1, 0.8, 2.0], dtype=torch.float64).reshape(1, 1, 2, 2)
                             .expand(3, -1, -1, -1))
    eps = torch.tensor([2.5, -0.4, 0.1, -3.0], dtype=torch.float64).reshape(1, 1, 2, 2).expand(3, -1, -1, -1)
    vb = diffusion.vlb_terms(torch.cat([eps, torch.full_like(eps, 0.3)], dim=1), x0, x_t, t)
    betas = get_beta_schedule("linear", T)
    abar = np.cumprod(1 - betas)
    cdf = lambda z: 0.5 * (1 + torch.erf(z / math.sqrt(2)))  # noqa: E731
    for row, step in enumerate(t.tolist()):
        a, a_prev, b = abar[step], (abar[step - 1] if step else 1.0), betas[step]
        pred_x0 = (x_t[row] - math.sqrt(1 - a) * eps[row]) / math.sqrt(a)
        assert step == 0 or pred_x0.abs().max() > 1  # unclipped x_0 outside [-1, 1]
        coef1, coef2 = math.sqrt(a_prev) * b / (1 - a), math.sqrt(1 - b) * (1 - a_prev) / (1 - a)
        posterior = lambda k: betas[k] * (1 - abar[k - 1]) / (1 - abar[k])  # noqa: E731
        log_var = 0.65 * math.log(b) + 0.35 * math.log(posterior(max(step, 1)))  # frac = (0.3 + 1) / 2
        mean = coef1 * pred_x0 + coef2 * x_t[row]
        if step == 0:
            scale, half = math.exp(0.5 * log_var), 1 / 255
            upper = torch.where(x0[row] > 0.999, torch.ones_like(mean), cdf((x0[row] + half - mean) / scale))
            lower = torch.where(x0[row] < -0.999, torch.zeros_like(mean), cdf((x0[row] - half - mean) / scale))
            expected = float(-(upper - lower).clamp(min=1e-12).log().mean()) / math.log(2)
            assert float(vb[0]) == pytest.approx(expected, rel=2e-2)
        else:
            true_mean = coef1 * x0[row] + coef2 * x_t[row]
            true_log_var = math.log(posterior(step))
            kl = 0.5 * (-1 + log_var - true_log_var + math.exp(true_log_var - log_var)
                        + (true_mean - mean) ** 2 * math.exp(-log_var))
            assert float(vb[row]) == pytest.approx(float(kl.mean()) / math.log(2), rel=1e-9)


def test_vlb_zero_for_true_posterior(diffusion: GaussianDiffusion) -> None:
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand((1, 1, 8, 8), generator=g, dtype=torch.float64) * 2 - 1
    t = torch.tensor([1, 10, 500, 999])
    x0 = x0.expand(4, -1, -1, -1)
    model_fn = oracle_model(diffusion, x0[:1], v=-1.0)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    losses = diffusion.training_losses(model_fn, x0, t, {}, noise=noise)
    assert losses["vb"].abs().max() < 1e-8
    assert losses["mse"].abs().max() < 1e-16
    losses = diffusion.training_losses(oracle_model(diffusion, x0[:1], v=0.5), x0, t, {})
    # A wrong variance costs bits where posterior variance and beta differ (small t) and never gives a negative KL.
    assert (losses["vb"][:2] > 1e-3).all() and (losses["vb"] >= 0).all()


def test_hybrid_gradients_split() -> None:
    d = GaussianDiffusion()
    g = torch.Generator().manual_seed(4)
    x0 = torch.rand((4, 1, 4, 4), generator=g) * 2 - 1
    output = torch.randn((4, 2, 4, 4), generator=g, requires_grad=True)
    t = torch.tensor([0, 3, 300, 999])
    losses = d.training_losses(lambda x, ts: output * 1.0, x0, t, {}, noise=torch.randn(x0.shape, generator=g))
    assert all(v.shape == (4,) for v in losses.values())
    torch.testing.assert_close(losses["loss"], losses["mse"] + 0.001 * 1000 * losses["vb"])
    (grad_vb,) = torch.autograd.grad(losses["vb"].sum(), output, retain_graph=True)
    assert float(grad_vb[:, :1].abs().max()) == 0.0 and float(grad_vb[:, 1:].abs().max()) > 0
    (grad_mse,) = torch.autograd.grad(losses["mse"].sum(), output)
    assert float(grad_mse[:, 1:].abs().max()) == 0.0 and float(grad_mse[:, :1].abs().max()) > 0


def test_mse_loss_with_fixed_variance() -> None:
    d = GaussianDiffusion(learn_sigma=False, loss="mse", prediction="v")
    x0 = torch.zeros((2, 1, 4, 4))
    losses = d.training_losses(lambda x, ts: torch.zeros_like(x), x0, torch.tensor([5, 900]), {})
    assert torch.equal(losses["loss"], losses["mse"]) and torch.isfinite(losses["vb"]).all()
    eps = GaussianDiffusion(learn_sigma=False, loss="mse")
    noise = torch.randn((2, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    losses = eps.training_losses(lambda x, ts: torch.full_like(x, 0.5), x0, torch.tensor([5, 900]), {}, noise=noise)
    torch.testing.assert_close(losses["mse"], ((noise - 0.5) ** 2).mean((1, 2, 3)))
    with pytest.raises(ValueError, match="channels"):
        d.training_losses(lambda x, ts: torch.zeros((2, 2, 4, 4)), x0, torch.tensor([5, 900]), {})


def test_model_receives_original_timesteps(diffusion: GaussianDiffusion) -> None:
    spaced = diffusion.respaced(space_timesteps(T, "10"))
    seen: list[Tensor] = []

    def model_fn(x: Tensor, t: Tensor, *, cond: Tensor) -> Tensor:
        seen.append(t)
        assert cond.shape == x.shape
        return torch.zeros((x.shape[0], 2, *x.shape[2:]))

    x0 = torch.zeros((3, 1, 4, 4))
    spaced.training_losses(model_fn, x0, torch.tensor([0, 5, 9]), {"cond": x0})
    assert seen[0].dtype == torch.long and seen[0].tolist() == [0, 555, 999]


# Respacing.


def test_space_timesteps() -> None:
    assert space_timesteps(T, "1000") == list(range(T))
    steps = space_timesteps(T, "250")
    assert len(steps) == 250 and steps[0] == 0 and steps[-1] == 999
    assert space_timesteps(T, 50) == space_timesteps(T, "50")
    sections = space_timesteps(T, "10,10,10")
    assert len(sections) == 30 and sections[0] == 0 and sections[-1] == 999
    assert space_timesteps(T, "ddim50") == list(range(0, T, 20))
    assert space_timesteps(300, "10,15,20") == sorted(space_timesteps(300, "10,15,20"))
    assert len(space_timesteps(300, "10,15,20")) == 45
    assert space_timesteps(T, "ddim1000") == list(range(T)) and space_timesteps(T, "ddim1") == [0]
    assert space_timesteps(10, "2") == [0, 9] and space_timesteps(10, "1,1") == [0, 5]
    with pytest.raises(ValueError, match="cannot make exactly 300 steps out of 1000 with an integer stride"):
        space_timesteps(T, "ddim300")
    with pytest.raises(ValueError, match="cannot divide a section of 10 timesteps into 11 steps"):
        space_timesteps(10, "11")
    with pytest.raises(ValueError, match="cannot divide a section of 5 timesteps into 0 steps"):
        space_timesteps(10, "0,1")


def test_schedule_tables_are_copied_to_the_device_once(diffusion: GaussianDiffusion, monkeypatch) -> None:
    x = torch.zeros((2, 1, 2, 2))
    t = torch.tensor([3, 700])
    first = diffusion.q_sample(x + 1.0, t, x)
    copies: list[int] = []
    original = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: copies.append(1) or original(self, *a, **k))
    again = diffusion.q_sample(x + 1.0, t, x)
    assert copies == [1, 1]  # only t.to(device), once per table: the tables themselves come from the cache
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    expected = torch.tensor(np.sqrt(np.cumprod(1 - diffusion.betas))[[3, 700]], dtype=torch.float32)
    torch.testing.assert_close(first.flatten(1)[:, 0], expected, rtol=0, atol=0)
    chain = diffusion.respaced([0, 500, 999])
    assert chain.model_timesteps(torch.tensor([2, 0])).tolist() == [999, 0]


def test_respaced_chain(diffusion: GaussianDiffusion) -> None:
    full = diffusion.respaced(range(T))
    np.testing.assert_allclose(full.betas, diffusion.betas, rtol=1e-10)
    np.testing.assert_allclose(full.posterior_variance, diffusion.posterior_variance, rtol=1e-8)
    kept = space_timesteps(T, "ddim40")
    spaced = diffusion.respaced(kept)
    assert spaced.num_timesteps == 40 and spaced.timestep_map.tolist() == kept
    np.testing.assert_allclose(spaced.alphas_cumprod, diffusion.alphas_cumprod[kept], rtol=1e-10)
    betas, timestep_map = respaced_betas(diffusion.alphas_cumprod, {999, 0, 500})
    assert timestep_map == [0, 500, 999] and betas.shape == (3,)
    for bad, message in (([], "^use_timesteps is empty$"), ([-1, 5], r"^use_timesteps must lie in 0\.\.999$"),
                         ([5, 1000], r"^use_timesteps must lie in 0\.\.999$"), ([0, 999, 1000], "0..999")):
        with pytest.raises(ValueError, match=message):
            respaced_betas(diffusion.alphas_cumprod, bad)
    assert respaced_betas(diffusion.alphas_cumprod, [3, 999])[1] == [3, 999]
    twice = spaced.respaced(kept[::2])  # original timesteps, whatever the chain's spacing
    np.testing.assert_allclose(twice.alphas_cumprod, diffusion.alphas_cumprod[kept[::2]], rtol=1e-10)
    assert spaced.config == diffusion.config


# Samplers.


def run_sampler(sampler, model_fn, x_T: Tensor, seed: int | None = 0) -> Tensor:
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    x = x_T
    for _, _, x, _ in sample_loop(model_fn, sampler, x_T, {}, generator=generator):
        pass
    return x


@pytest.mark.parametrize("name", ["ddim", "ancestral", "dpmsolver++"])
def test_oracle_sampling_recovers_x0(diffusion: GaussianDiffusion, name: str) -> None:
    x0 = smooth_image(8)
    x_T = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    sampler = make_sampler(name, diffusion, 50)
    assert sampler.timesteps.dtype == torch.long and sampler.timesteps.tolist()[:1] == [999]
    assert sampler.timesteps[-1] == 0 and (sampler.timesteps.diff() < 0).all()
    x = run_sampler(sampler, oracle_model(diffusion, x0), x_T)
    assert (x - x0).abs().max() < 1e-6


def test_ddim_deterministic_and_seeded_reproducible(diffusion: GaussianDiffusion) -> None:
    x0 = smooth_image(8)
    model_fn = oracle_model(diffusion, x0 * 0.5)  # a model that is not exact for other images
    x_T = torch.randn(x0.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    ddim = DDIMSampler(diffusion)
    ddim.set_timesteps(20)
    assert torch.equal(run_sampler(ddim, model_fn, x_T, seed=1), run_sampler(ddim, model_fn, x_T, seed=2))
    assert torch.equal(run_sampler(ddim, model_fn, x_T, seed=None), run_sampler(ddim, model_fn, x_T, seed=1))
    for sampler in (AncestralSampler(diffusion), DDIMSampler(diffusion, eta=1.0)):
        sampler.set_timesteps(20)
        a = run_sampler(sampler, oracle_model(diffusion, x0, v=0.3), x_T, seed=7)
        b = run_sampler(sampler, oracle_model(diffusion, x0, v=0.3), x_T, seed=7)
        c = run_sampler(sampler, oracle_model(diffusion, x0, v=0.3), x_T + 1e-3, seed=8)
        assert torch.equal(a, b)
        # Intermediate noise differs with the seed; the oracle still lands on x0 at the end.
        assert (a - x0).abs().max() < 1e-6 and (c - x0).abs().max() < 1e-6


def test_stochastic_sampling_without_a_generator_uses_the_global_rng(diffusion: GaussianDiffusion) -> None:
    model_fn = lambda x, t: torch.cat([0.3 * x, torch.zeros_like(x)], dim=1)  # noqa: E731
    sampler = make_sampler("ancestral", diffusion, 5)
    x_T = torch.zeros((2, 1, 4, 4), dtype=torch.float64)
    torch.manual_seed(0)
    a = run_sampler(sampler, model_fn, x_T, seed=None)
    torch.manual_seed(0)
    assert torch.equal(a, run_sampler(sampler, model_fn, x_T, seed=None)) and a.dtype == torch.float64
    assert not torch.equal(a, run_sampler(sampler, model_fn, x_T, seed=None))


def test_sample_loop_yields_every_step(diffusion: GaussianDiffusion) -> None:
    x0 = smooth_image(8)
    sampler = make_sampler("ddim", diffusion, 12, eta=0.0)
    expected = {"name": "ddim", "num_steps": 12, "start_timestep": None, "clip_denoised": True, "eta": 0.0}
    assert sampler.config == expected
    calls: list[int] = []

    def model_fn(x: Tensor, t: Tensor, *, scale: float) -> Tensor:
        calls.append(int(t[0]))
        assert t.shape == (x.shape[0],) and t.dtype == torch.long and scale == 2.0
        return oracle_model(diffusion, x0)(x, t)

    x_T = torch.randn((2, 1, 8, 8), dtype=torch.float64)
    items = list(sample_loop(model_fn, sampler, x_T, {"scale": 2.0}))
    assert [i for i, *_ in items] == list(range(1, 13)) and all(n == 12 for _, n, *_ in items)
    assert calls == sampler.timesteps.tolist()
    assert all(x.shape == p.shape == x_T.shape for *_, x, p in items)
    with pytest.raises(ValueError, match=r"start_index must lie in 0\.\.11, got 12"):
        next(sample_loop(model_fn, sampler, x_T, {"scale": 2.0}, start_index=12))
    rebuilt = make_sampler(diffusion=diffusion, **json.loads(json.dumps(sampler.config)))
    assert torch.equal(rebuilt.timesteps, sampler.timesteps)
    with pytest.raises(ValueError, match=r"^unknown sampler 'euler'; choose one of ancestral, ddim, dpmsolver\+\+$"):
        make_sampler("euler", diffusion, 10)
    with pytest.raises(ValueError):
        make_sampler("ddim", diffusion, 1001)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        make_sampler("ddim", diffusion, 10, eta=-0.1)
    assert make_sampler("ddim", diffusion, 10, clip_denoised=False).config["clip_denoised"] is False
    one = make_sampler("ddim", diffusion, 1, start_timestep=0)  # a single step from t=0
    assert one.timesteps.tolist() == [0] and len(list(sample_loop(model_fn, one, x_T, {"scale": 2.0}))) == 1


def test_set_timesteps_bounds(diffusion: GaussianDiffusion) -> None:
    for steps, start in ((1, None), (1000, None), (301, 300), (1, 0), (2, 999)):
        sampler = make_sampler("ddim", diffusion, steps, start_timestep=start)
        assert sampler.num_steps == steps and sampler.config["start_timestep"] == start
        assert sampler.timesteps.dtype == torch.long and int(sampler.timesteps[0]) == (999 if start is None else start)
    for steps, start, message in ((302, 300, r"num_steps must lie in 1\.\.301 \(timesteps 0\.\.300\), got 302"),
                                  (0, None, r"num_steps must lie in 1\.\.1000 \(timesteps 0\.\.999\), got 0"),
                                  (1, 1000, r"start_timestep must lie in 0\.\.999, got 1000"),
                                  (1, -1, r"start_timestep must lie in 0\.\.999, got -1")):
        with pytest.raises(ValueError, match=message):
            make_sampler("ddim", diffusion, steps, start_timestep=start)
    sampler = make_sampler("ddim", diffusion, 10)
    x = torch.zeros((1, 1, 2, 2))
    with pytest.raises(IndexError, match=r"timestep_index must lie in 0\.\.9, got 10"):
        sampler.step(torch.zeros((1, 2, 2, 2)), 10, x)


@pytest.mark.parametrize("name", ["ancestral", "ddim"])
def test_sampler_steps_multi_channel_batches(diffusion: GaussianDiffusion, name: str) -> None:
    sampler = make_sampler(name, diffusion, 4)
    x0 = torch.rand((3, 2, 2, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = sampler.add_noise(x0, 0, noise)
    torch.testing.assert_close(x, diffusion.q_sample(x0, batch_t(999, 3), noise))
    x_prev, pred_x0 = sampler.step(torch.cat([noise, torch.zeros_like(noise)], 1), 0, x, torch.Generator())
    assert x_prev.shape == pred_x0.shape == x0.shape
    torch.testing.assert_close(pred_x0, x0)


@pytest.mark.parametrize("name", ["ancestral", "ddim"])
def test_clip_denoised_option_reaches_the_step(diffusion: GaussianDiffusion, name: str) -> None:
    x_t = torch.full((1, 1, 2, 2), 3.0, dtype=torch.float64)  # at t=999 x_0 = (3 - eps) / 0.0064: far outside [-1, 1]
    output = torch.cat([torch.zeros_like(x_t), -torch.ones_like(x_t)], dim=1)
    clipped, free = (make_sampler(name, diffusion, 10, clip_denoised=c) for c in (True, False))
    assert float(clipped.step(output, 0, x_t, torch.Generator().manual_seed(0))[1].max()) == 1.0
    assert float(free.step(output, 0, x_t, torch.Generator().manual_seed(0))[1].max()) > 100


@pytest.mark.parametrize("name", ["ancestral", "ddim", "dpmsolver++"])
def test_sampler_before_set_timesteps(diffusion: GaussianDiffusion, name: str) -> None:
    sampler = SAMPLERS[name](diffusion)
    assert sampler.num_steps == 0 and sampler.config["start_timestep"] is None
    x = torch.zeros((1, 1, 2, 2))
    with pytest.raises(RuntimeError, match="^call set_timesteps"):
        next(sample_loop(lambda x, t: torch.zeros((1, 2, 2, 2)), sampler, x, {}))
    with pytest.raises(RuntimeError, match="^call set_timesteps"):
        sampler.step(torch.zeros((1, 2, 2, 2)), 0, x)


def test_sdedit_start_from_noised_prior(diffusion: GaussianDiffusion) -> None:
    x0 = smooth_image(8)
    prior = torch.zeros_like(x0)
    sampler = make_sampler("ddim", diffusion, 10, start_timestep=300)
    assert sampler.timesteps.tolist()[0] == 300 and sampler.timesteps.tolist()[-1] == 0
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    start = sampler.add_noise(prior, 0, noise)
    torch.testing.assert_close(start, diffusion.q_sample(prior, batch_t(300, 1), noise))
    x = run_sampler(sampler, oracle_model(diffusion, x0), start)
    assert (x - x0).abs().max() < 1e-6
    # Skipping the first steps of a full schedule (diffusers-style strength).
    full = make_sampler("ancestral", diffusion, 50)
    start = full.add_noise(prior, 30, noise)
    items = list(sample_loop(oracle_model(diffusion, x0), full, start, {}, torch.Generator().manual_seed(0), 30))
    assert [i for i, *_ in items] == list(range(31, 51))
    assert (items[-1][2] - x0).abs().max() < 1e-6


# The noise each stochastic step adds, against closed forms computed here from the original alphas_cumprod.

STEP_SAMPLES = 20_000
"""Draws of one step per check. The 4 elements of x_t share one variance, so the pooled sample variance has a
relative standard error of sqrt(2 / 80 000) = 0.5 %: the 3 % tolerance is 6 standard errors (never fails by chance,
whatever the generator), while a standard deviation used as a variance or a lost square root changes the variance
by a factor var (0.005-0.5 at the checked steps). Means: 5 standard errors per element."""


def _closed_form_coefficients(diffusion: GaussianDiffusion, sampler, i: int) -> tuple[float, float]:
    """(abar_t, abar_prev) of step i of the sampler's timesteps, straight from the original schedule."""
    abar = np.cumprod(1.0 - diffusion.betas)
    steps = sampler.timesteps.tolist()
    return float(abar[steps[i]]), float(abar[steps[i + 1]]) if i + 1 < len(steps) else 1.0


def _pred_x0_and_eps(x_t: Tensor, eps: Tensor, abar: float) -> tuple[Tensor, Tensor]:
    """Clipped x_0 implied by the noise prediction, and the noise consistent with the clipped x_0."""
    x0 = ((x_t - math.sqrt(1 - abar) * eps) / math.sqrt(abar)).clamp(-1, 1)
    return x0, (x_t - math.sqrt(abar) * x0) / math.sqrt(1 - abar)


def ancestral_step_moments(diffusion, sampler, i, x_t, eps, v) -> tuple[Tensor, float]:
    """Posterior mean at the predicted x_0; variance interpolated (in log) between posterior variance and beta."""
    abar, abar_prev = _closed_form_coefficients(diffusion, sampler, i)
    x0, _ = _pred_x0_and_eps(x_t, eps, abar)
    beta = 1 - abar / abar_prev
    mean = math.sqrt(abar_prev) * beta / (1 - abar) * x0 + math.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar) * x_t
    if i + 1 == sampler.num_steps:
        return mean, 0.0  # the last step returns the mean
    posterior = beta * (1 - abar_prev) / (1 - abar)
    frac = (v + 1) / 2
    return mean, math.exp(frac * math.log(beta) + (1 - frac) * math.log(posterior))


def ddim_step_moments(diffusion, sampler, i, x_t, eps, v) -> tuple[Tensor, float]:
    """Song et al. eq. 12: sigma^2 = eta^2 (1 - abar_prev) / (1 - abar) (1 - abar / abar_prev); v is ignored."""
    abar, abar_prev = _closed_form_coefficients(diffusion, sampler, i)
    x0, eps = _pred_x0_and_eps(x_t, eps, abar)
    sigma2 = sampler.eta**2 * (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)
    mean = math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev - sigma2) * eps
    return mean, (0.0 if i + 1 == sampler.num_steps else sigma2)


def dpmsolver_step_moments(diffusion, sampler, i, x_t, eps, v) -> tuple[Tensor, float]:
    """Without history (a fresh x_t) DPM-Solver++ takes its first-order step: deterministic DDIM; v is ignored."""
    abar, abar_prev = _closed_form_coefficients(diffusion, sampler, i)
    x0, eps = _pred_x0_and_eps(x_t, eps, abar)
    return math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev) * eps, 0.0


EXPECTED_STEP = {"ancestral": ancestral_step_moments, "ddim": ddim_step_moments,
                 "dpmsolver++": dpmsolver_step_moments}
"""Closed-form (mean, variance) of one step, per sampler: a new sampler needs an entry (see the test below)."""

STEP_CASES = [("ancestral", {}, -1.0), ("ancestral", {}, 0.4), ("ddim", {"eta": 1.0}, 0.4), ("ddim", {"eta": 0.5}, -1.0),
              ("ddim", {"eta": 0.0}, 0.4), ("dpmsolver++", {}, 0.4)]


def test_every_sampler_has_a_step_noise_check() -> None:
    assert set(EXPECTED_STEP) == set(SAMPLERS) == {name for name, _, _ in STEP_CASES}


def step_samples(sampler, i: int, x_t: Tensor, model_output: Tensor, n: int, seed: int = 0) -> Tensor:
    """n draws of x_prev from one step at position i, for the same x_t and model output."""
    expand = (n, *x_t.shape[1:])
    x_prev, _ = sampler.step(model_output.expand(n, -1, -1, -1), i, x_t.expand(expand),
                             torch.Generator().manual_seed(seed))
    return x_prev


@pytest.mark.parametrize(("name", "options", "v"), STEP_CASES)
def test_step_noise_matches_closed_form(diffusion: GaussianDiffusion, name: str, options: dict, v: float) -> None:
    sampler = make_sampler(name, diffusion, 10, **options)
    x_t = torch.tensor([-0.8, -0.1, 0.3, 1.1], dtype=torch.float64).reshape(1, 1, 2, 2)
    eps = torch.tensor([0.5, -1.2, 0.1, 0.9], dtype=torch.float64).reshape(1, 1, 2, 2)
    model_output = torch.cat([eps, torch.full_like(eps, v)], dim=1)
    for i in (1, 5, 8, 9):  # high noise to the last step (i=9 adds no noise)
        mean, var = EXPECTED_STEP[name](diffusion, sampler, i, x_t, eps, v)
        x = step_samples(sampler, i, x_t, model_output, STEP_SAMPLES)
        if var == 0.0:
            assert torch.equal(x, x[:1].expand_as(x)), (name, i)
            torch.testing.assert_close(x[0], mean[0])
            continue
        assert (x.mean(0) - mean[0]).abs().max() < 5 * math.sqrt(var / STEP_SAMPLES), (name, i)
        pooled = float((x - x.mean(0)).pow(2).sum() / (4 * (STEP_SAMPLES - 1)))
        assert pooled / var == pytest.approx(1.0, abs=0.03), (name, i, pooled, var)


def test_ddim_eta_one_adds_the_posterior_variance(diffusion: GaussianDiffusion) -> None:
    """DDIM with eta=1 is the ancestral step with the posterior variance: same mean, same noise."""
    ddim, ancestral = make_sampler("ddim", diffusion, 10, eta=1.0), make_sampler("ancestral", diffusion, 10)
    x_t = torch.tensor([0.2, -0.4, 0.7, -1.3], dtype=torch.float64).reshape(1, 1, 2, 2)
    model_output = torch.cat([x_t * 0.5, -torch.ones_like(x_t)], dim=1)  # v = -1: the posterior variance
    for i in (2, 6):
        assert ddim.chain is not None
        k = ddim.chain_index(i)
        a, b = (step_samples(s, i, x_t, model_output, STEP_SAMPLES, seed=3) for s in (ddim, ancestral))
        torch.testing.assert_close(a, b)
        pooled = float((a - a.mean(0)).pow(2).sum() / (4 * (STEP_SAMPLES - 1)))
        assert pooled / ddim.chain.posterior_variance[k] == pytest.approx(1.0, abs=0.03)


@pytest.mark.parametrize(("name", "options"), [("ancestral", {}), ("ddim", {"eta": 1.0})])
def test_per_sample_generators_make_samples_independent_of_the_batch(diffusion: GaussianDiffusion, name: str,
                                                                    options: dict) -> None:
    def model_fn(x: Tensor, t: Tensor) -> Tensor:  # not an oracle: the noise of every step reaches the sample
        return torch.cat([0.3 * x, torch.full_like(x, 0.3)], dim=1)

    sampler = make_sampler(name, diffusion, 6, **options)
    x_T = torch.zeros((3, 1, 8, 8), dtype=torch.float64)  # the samples differ only through the step noise

    def run(rows: slice) -> Tensor:
        generators = [torch.Generator().manual_seed(20 + b) for b in range(3)][rows]
        *_, (_, _, x, _) = sample_loop(model_fn, sampler, x_T[rows], {}, generators)
        return x

    together = run(slice(0, 3))
    apart = torch.cat([run(slice(b, b + 1)) for b in range(3)])
    torch.testing.assert_close(together, apart, rtol=0, atol=1e-12)
    assert not torch.equal(together[0], together[1])
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        list(sample_loop(model_fn, sampler, x_T, {}, [torch.Generator()] * 2))


# DPM-Solver++(2M) against the exact probability-flow ODE of Gaussian data.

GAUSS_MEAN, GAUSS_STD = 0.2, 0.5


def gaussian_data_model(diffusion: GaussianDiffusion):
    """Exact eps model (no variance channels) of data x_0 ~ N(GAUSS_MEAN, GAUSS_STD^2) per pixel."""
    abar_table = torch.as_tensor(diffusion.alphas_cumprod)

    def model_fn(x_t: Tensor, t: Tensor) -> Tensor:
        abar = abar_table[t].reshape(-1, 1, 1, 1)
        gain = abar.sqrt() * GAUSS_STD**2 / (abar * GAUSS_STD**2 + 1 - abar)
        x0 = GAUSS_MEAN + gain * (x_t - abar.sqrt() * GAUSS_MEAN)
        return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()

    return model_fn


def gaussian_ode_sample(diffusion: GaussianDiffusion, x_start: Tensor, start: int) -> Tensor:
    """Exact ODE solution: the standardised x_t is constant along the flow down to t=0, then x_0 = E[x_0 | x_t=0]."""
    def std(abar: float) -> float:
        return math.sqrt(abar * GAUSS_STD**2 + 1 - abar)

    abar_start, abar_0 = float(diffusion.alphas_cumprod[start]), float(diffusion.alphas_cumprod[0])
    z = (x_start - math.sqrt(abar_start) * GAUSS_MEAN) / std(abar_start)
    return GAUSS_MEAN + math.sqrt(abar_0) * GAUSS_STD**2 / std(abar_0) * z


def gaussian_solver_error(name: str, steps: int, start: int | None) -> float:
    diffusion = GaussianDiffusion(prediction="eps", learn_sigma=False, loss="mse")
    x_start = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sampler = make_sampler(name, diffusion, steps, start_timestep=start, clip_denoised=False)
    *_, (_, _, x, _) = sample_loop(gaussian_data_model(diffusion), sampler, x_start, {})
    return float((x - gaussian_ode_sample(diffusion, x_start, 999 if start is None else start)).abs().max())


@pytest.mark.parametrize("start", [300, None])
def test_dpmsolver_converges_to_the_exact_ode_solution_with_second_order_accuracy(start: int | None) -> None:
    ddim = {n: gaussian_solver_error("ddim", n, start) for n in (10, 20, 80)}
    dpm = {n: gaussian_solver_error("dpmsolver++", n, start) for n in (10, 20, 80)}
    assert dpm[80] < 5e-3 and ddim[80] < 6e-2  # both converge to the exact sample
    assert ddim[10] / ddim[80] == pytest.approx(8.0, rel=0.25)  # DDIM: first order, error ~ 1/steps
    assert dpm[20] < ddim[20] / 2.5 and dpm[80] < ddim[80] / 10  # the gap grows with the steps: higher order
    if start == 300:  # the demo's prior start: 10 steps already beat DDIM 20 by a factor 4
        assert dpm[10] < ddim[20] / 4 and dpm[10] / dpm[80] > 12


def test_dpmsolver_second_step_is_the_multistep_formula(diffusion: GaussianDiffusion) -> None:
    """Step 2 uses the x_0 of step 1: D = (1 + 1/2r) x0_1 - 1/2r x0_0 with r = h_0 / h_1 in log-SNR (Lu et al.)."""
    sampler = make_sampler("dpmsolver++", diffusion, 6, start_timestep=300)
    ddim = make_sampler("ddim", diffusion, 6, start_timestep=300)
    x = torch.tensor([0.3, -0.5, 0.9, -0.1], dtype=torch.float64).reshape(1, 1, 2, 2)
    outputs = [torch.cat([f * x, torch.zeros_like(x)], dim=1) for f in (0.4, -0.7)]
    x1, x0_first = sampler.step(outputs[0], 0, x)
    torch.testing.assert_close(x1, ddim.step(outputs[0], 0, x)[0], rtol=0, atol=1e-15)  # first step: DDIM
    outputs[1] = torch.cat([-0.7 * x1, torch.zeros_like(x1)], dim=1)
    x2, x0_second = sampler.step(outputs[1], 1, x1)
    abar = [float(np.cumprod(1 - diffusion.betas)[t]) for t in sampler.timesteps.tolist()[:3]]
    lam = [0.5 * math.log(a / (1 - a)) for a in abar]
    h0, h1 = lam[1] - lam[0], lam[2] - lam[1]
    data = (1 + h1 / (2 * h0)) * x0_second - h1 / (2 * h0) * x0_first
    expected = math.sqrt((1 - abar[2]) / (1 - abar[1])) * x1 + math.sqrt(abar[2]) * (1 - math.exp(-h1)) * data
    torch.testing.assert_close(x2, expected, rtol=0, atol=1e-12)
    assert not torch.allclose(x2, ddim.step(outputs[1], 1, x1)[0])
    # A tensor the sampler did not return (another batch, a restart), or its output fed to another position than the
    # next one, has no history: a first-order step again.
    for index, state in ((1, lambda y: y.clone()), (2, lambda y: y)):
        returned, _ = sampler.step(outputs[0], 0, x)
        torch.testing.assert_close(sampler.step(outputs[1], index, state(returned))[0],
                                   ddim.step(outputs[1], index, returned)[0], rtol=0, atol=1e-15)


def test_dpmsolver_reused_across_batches_gives_the_same_samples(diffusion: GaussianDiffusion) -> None:
    model_fn = lambda x, t: torch.cat([0.3 * x + 0.1, torch.zeros_like(x)], dim=1)  # noqa: E731
    x_T = torch.randn((2, 1, 4, 4), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    shared = make_sampler("dpmsolver++", diffusion, 8, start_timestep=300)
    first = list(sample_loop(model_fn, shared, x_T[:1], {}))[-1][2]
    list(sample_loop(model_fn, shared, x_T[1:], {}))[:3]  # an interrupted run leaves history behind
    again = list(sample_loop(model_fn, shared, x_T[:1], {}))[-1][2]
    fresh = list(sample_loop(model_fn, make_sampler("dpmsolver++", diffusion, 8, start_timestep=300), x_T[:1], {}))
    assert torch.equal(first, again) and torch.equal(first, fresh[-1][2])


# A tiny conditional model overfits one image.


class TinyModel(nn.Module):
    """Two 3x3 convolutions over [x, condition one-hot], with a sinusoidal time embedding added in between."""

    def __init__(self, cond_channels: int = 3, hidden: int = 32, freqs: int = 8) -> None:
        super().__init__()
        self.freqs = freqs
        self.inp = nn.Conv2d(1 + cond_channels, hidden, 3, padding=1)
        self.time = nn.Sequential(nn.Linear(2 * freqs, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.mid = nn.Conv2d(hidden, hidden, 1)
        self.out = nn.Conv2d(hidden, 2, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor, *, cond: Tensor) -> Tensor:
        scale = torch.exp(torch.arange(self.freqs, dtype=torch.float32) * -math.log(1000.0) / self.freqs)
        angles = t.float()[:, None] * scale[None]
        emb = self.time(torch.cat([angles.sin(), angles.cos()], dim=1))[:, :, None, None]
        h = nn.functional.silu(self.inp(torch.cat([x, cond], dim=1)) + emb)
        h = nn.functional.silu(self.mid(h) + emb)
        return self.out(h)


def test_tiny_model_overfits_one_image(one_thread: None) -> None:
    torch.manual_seed(0)
    image = smooth_image(16, torch.float32)
    labels = torch.zeros((16, 16), dtype=torch.long)
    labels[image[0, 0] > -0.5] = 1
    labels[image[0, 0] > 0.2] = 2
    cond = nn.functional.one_hot(labels, 3).permute(2, 0, 1)[None].float()
    diffusion = GaussianDiffusion(**diffusion_defaults())
    model = TinyModel()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = 32
    g = torch.Generator().manual_seed(0)
    history = []
    for _ in range(200):
        t = torch.randint(0, T, (batch,), generator=g)
        noise = torch.randn((batch, 1, 16, 16), generator=g)
        losses = diffusion.training_losses(
            model, image.expand(batch, -1, -1, -1), t, {"cond": cond.expand(batch, -1, -1, -1)}, noise=noise
        )
        loss = losses["loss"].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    first, last = np.mean(history[:10]), np.mean(history[-20:])
    assert last < 0.15 * first, (first, last)  # measured 0.04-0.07 over 8 seeds

    sampler = make_sampler("ddim", diffusion, 50)
    x_T = torch.randn((2, 1, 16, 16), generator=torch.Generator().manual_seed(1))
    x = x_T
    for _, _, x, _ in sample_loop(model, sampler, x_T, {"cond": cond.expand(2, -1, -1, -1)}):
        pass
    mse = float(((x - image) ** 2).mean())
    psnr = 10 * math.log10(4.0 / mse)  # peak-to-peak range 2 in [-1, 1]
    assert psnr > 18.0, psnr  # measured 25.0 dB here; 20-26 dB over 8 training seeds
