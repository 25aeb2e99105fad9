"""The gamma process scheduler: forward marginals, exact-denoiser sampling, EDM loss, config, warnings."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from raysynth.config import DiffusionConfig
from raysynth.diffusion.gamma import GammaVEScheduler, check_data_scale
from raysynth.diffusion.process import GammaProcess

MU, S = 0.2, 0.25  # a Gaussian "dataset" x ~ N(MU, S^2) that stays inside [-1, 1]


class ExactGaussianDenoiser:
    """The network F whose preconditioned output is the exact D(x; sigma) = mu + s^2/(s^2+sigma^2) (x - mu)."""

    def __init__(self, scheduler: GammaVEScheduler, mu: float = MU, s: float = S):
        self.scheduler, self.mu, self.s = scheduler, mu, s

    def __call__(self, x_in, c_noise, class_labels):
        sigma = torch.exp(4.0 * c_noise).reshape(-1, *([1] * (x_in.ndim - 1)))  # invert c_noise = ln(sigma)/4
        c_skip, c_out, c_in = self.scheduler.edm_coefficients(sigma)
        x = x_in / c_in
        denoised = self.mu + self.s**2 / (self.s**2 + sigma**2) * (x - self.mu)
        return (denoised - c_skip * x) / c_out


@pytest.mark.parametrize("gamma", [0.5, 2.0, 10.0])
def test_add_noise_marginal_variance(gamma):
    sch = GammaVEScheduler(gamma=gamma)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 64, 64, generator=g) * 2 - 1
    for t in (0.05, 0.25, 0.5, 1.0):
        noise = torch.randn(x0.shape, generator=g)
        x_t = sch.add_noise(x0, noise, torch.full((4,), t))
        var = (x_t - x0).var().item()
        assert var == pytest.approx(2 * gamma * t, rel=0.05), (t, var)
        assert sch.sigma_for_t(t).item() == pytest.approx(math.sqrt(2 * gamma * t))
        assert sch.t_for_sigma(sch.sigma_for_t(t)).item() == pytest.approx(t, rel=1e-5)


@pytest.mark.parametrize("solver,steps,calls", [("euler", 10, 10), ("heun", 10, 19), ("heun", 1, 1)])
def test_timesteps_layout(solver, steps, calls):
    sch = GammaVEScheduler(gamma=2.0, sigma_min=0.01, solver=solver)
    sch.set_timesteps(steps)
    assert len(sch.timesteps) == calls and len(sch.sigmas) == calls + 1
    assert sch.sigmas[0].item() == pytest.approx(2.0)  # sigma_max = sqrt(2 * gamma)
    assert sch.sigmas[-1].item() == 0.0
    assert torch.all(sch.sigmas[1:] <= sch.sigmas[:-1])
    if steps > 1:
        assert sch.sigmas[-2].item() == pytest.approx(0.01)
    # timesteps are process times t = sigma^2 / (2 gamma) of the levels the network is called at
    torch.testing.assert_close(sch.timesteps, sch.sigmas[:-1] ** 2 / 4.0)
    assert sch.init_noise_sigma == pytest.approx(2.0) and sch.order == (2 if solver == "heun" else 1)


@pytest.mark.parametrize("solver,steps", [("euler", 100), ("heun", 40)])
def test_exact_denoiser_recovers_gaussian_data(solver, steps):
    process = GammaProcess(DiffusionConfig(process="gamma", gamma=50.0))
    n = 2000
    out = process.sample(
        ExactGaussianDenoiser(process.scheduler), torch.zeros(n, dtype=torch.long), (1, 4, 4), solver, steps,
        [torch.Generator().manual_seed(i) for i in range(n)],
    )
    # Starting from N(0, sigma_max^2) instead of N(MU, S^2 + sigma_max^2) leaves a known bias:
    # the linear ODE maps x - MU by S / sqrt(S^2 + sigma_max^2).
    shrink = S / math.sqrt(S**2 + process.sigma_max**2)
    assert out.mean().item() == pytest.approx(MU * (1 - shrink), abs=0.005)
    assert out.var().item() == pytest.approx(S**2, rel=0.05)


def test_heun_is_more_accurate_than_euler_at_equal_steps():
    process = GammaProcess(DiffusionConfig(process="gamma", gamma=50.0))
    errors = {}
    for solver in ("euler", "heun"):
        out = process.sample(ExactGaussianDenoiser(process.scheduler), torch.zeros(500, dtype=torch.long), (1, 4, 4),
                             solver, 20, [torch.Generator().manual_seed(i) for i in range(500)])
        errors[solver] = abs(out.var().item() - S**2)
    assert errors["heun"] < errors["euler"] / 3


def test_training_loss_is_lambda_weighted_denoising_error():
    """With the exact denoiser, the loss per sample is lambda(sigma) * posterior variance, known in closed form."""
    process = GammaProcess(DiffusionConfig(process="gamma", gamma=8.0))
    sch = process.scheduler
    g = torch.Generator().manual_seed(3)
    x0 = MU + S * torch.randn(256, 1, 16, 16, generator=g)
    exact = ExactGaussianDenoiser(sch)
    loss = process.training_loss(exact, x0, torch.zeros(256, dtype=torch.long), torch.Generator().manual_seed(7))
    # the same generator seed redraws the same t that training_loss drew first
    sigma = sch.sigma_for_t(process.sample_training_t(256, torch.Generator().manual_seed(7), torch.device("cpu")))
    sd2 = sch.config.sigma_data**2
    expected = (S**2 * (sigma**2 + sd2) / (sd2 * (S**2 + sigma**2))).mean().item()
    assert loss.item() == pytest.approx(expected, rel=0.03)
    # a denoiser that is off by 0.1 everywhere scores worse
    worse = process.training_loss(lambda x, c, y: exact(x, c, y) + 0.1, x0, torch.zeros(256, dtype=torch.long),
                                  torch.Generator().manual_seed(7))
    assert worse.item() > loss.item() + 0.005


@pytest.mark.parametrize("training_noise", ["lognormal", "uniform_t"])
def test_training_t_distribution(training_noise):
    process = GammaProcess(DiffusionConfig(process="gamma", gamma=200.0), training_noise=training_noise)
    t = process.sample_training_t(20000, torch.Generator().manual_seed(0), torch.device("cpu"))
    sigma = process.scheduler.sigma_for_t(t)
    assert t.dtype == torch.float32 and t.min() > 0 and t.max() <= 1.0
    assert sigma.min() >= 0.002 * (1 - 1e-4) and sigma.max() <= 20.0 * (1 + 1e-4)
    if training_noise == "lognormal":  # ln sigma ~ N(-1.2, 1.2^2), hardly truncated at these ends
        assert sigma.log().mean().item() == pytest.approx(-1.2, abs=0.05)
        assert sigma.log().std().item() == pytest.approx(1.2, rel=0.05)
    else:
        assert t.mean().item() == pytest.approx(0.5, abs=0.01)


def test_config_round_trip(tmp_path):
    sch = GammaVEScheduler(gamma=3.5, sigma_min=0.01, sigma_data=0.6, solver="heun", rho=5.0)
    sch.save_pretrained(tmp_path)
    loaded = GammaVEScheduler.from_pretrained(tmp_path)
    assert dict(loaded.config) == dict(sch.config)
    sch.set_timesteps(8)
    loaded.set_timesteps(8)
    assert torch.equal(sch.sigmas, loaded.sigmas) and torch.equal(sch.timesteps, loaded.timesteps)
    assert GammaVEScheduler.from_config(sch.config, solver="euler").config.solver == "euler"


def test_preconditioning_identities():
    sch = GammaVEScheduler(sigma_data=0.5)
    sigma = torch.tensor([0.01, 0.5, 3.0])
    c_skip, c_out, c_in = sch.edm_coefficients(sigma)
    torch.testing.assert_close(c_in, 1 / (sigma**2 + 0.25).sqrt())
    torch.testing.assert_close(c_skip, 0.25 / (sigma**2 + 0.25))
    torch.testing.assert_close(c_out, sigma * 0.5 / (sigma**2 + 0.25).sqrt())
    torch.testing.assert_close(sch.precondition_noise(sigma), sigma.log() / 4)
    x = torch.ones(3, 1, 2, 2)
    torch.testing.assert_close(sch.precondition_outputs(x, torch.zeros_like(x), sigma), c_skip.reshape(3, 1, 1, 1) * x)


def test_small_gamma_is_warned_about():
    data = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1  # std ~0.58
    process = GammaProcess(DiffusionConfig(process="gamma", gamma=0.05))  # sigma_max ~0.32
    model = ExactGaussianDenoiser(process.scheduler)
    with pytest.warns(UserWarning, match="sigma_max"):
        process.training_loss(model, data, torch.zeros(8, dtype=torch.long))
    with pytest.warns(UserWarning, match="gamma=0.05"):
        assert process.check_data_scale(0.58) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_data_scale(gamma=8.0, data_std=0.58) is True  # sigma_max = 4 > 3 * 0.58


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(solver="rk4"), r"solver='rk4' is not valid; choose one of \['euler', 'heun'\]"),
        (dict(gamma=0.0), "gamma=0.0"),
        (dict(sigma_min=-1.0), "sigma_min=-1.0"),
        (dict(sigma_data=0.0), "sigma_data=0.0"),
        (dict(gamma=1e-6), "sigma_min=0.002 must be below sigma_max"),
    ],
)
def test_invalid_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GammaVEScheduler(**kwargs)


def test_invalid_use_raises():
    sch = GammaVEScheduler()
    with pytest.raises(ValueError, match="num_inference_steps=0"):
        sch.set_timesteps(0)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        sch.step(torch.zeros(1), 0.5, torch.zeros(1))
    sch.set_timesteps(4)
    with pytest.raises(ValueError, match="not in this schedule"):
        sch.step(torch.zeros(1), 0.123, torch.zeros(1))
