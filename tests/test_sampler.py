"""Tests for training/sampler.py on Gaussian data, whose exact denoiser and transport maps are known."""

import math

import numpy as np
import pytest
import torch

from dnnlib.util import UserError
from training import sampler

# Data x ~ N(0, S) with S diagonal over the 16 pixels of a 1x4x4 image: 4 variances, 4 pixels each.
VARIANCES = torch.tensor([0.05, 0.25, 1.0, 2.0], dtype=torch.float64).repeat_interleave(4).reshape(1, 1, 4, 4)


class CountingGaussianDenoiser:
    """The exact denoiser D(x; sigma) = S (S + sigma^2 I)^-1 x, counting its calls."""

    def __init__(self, variances: torch.Tensor = VARIANCES):
        self.variances, self.calls = variances, 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.float64 and sigma.dtype == torch.float64 and sigma.ndim == 0
        self.calls += 1
        return self.variances / (self.variances + sigma ** 2) * x

#----------------------------------------------------------------------------

def test_sigma_steps_matches_edm_formula():
    t = sampler.sigma_steps(18)
    assert t.dtype == torch.float64 and len(t) == 19
    assert t[0].item() == 80 and t[-1].item() == 0
    assert t[-2].item() == pytest.approx(0.002, rel=1e-12)
    i = 5
    expected = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert t[i].item() == pytest.approx(expected, rel=1e-14)
    assert torch.all(t[:-1] > t[1:])


def test_sigma_steps_uses_round_sigma_and_rejects_bad_input():
    t = sampler.sigma_steps(5, round_sigma=lambda s: s.round(decimals=1))
    assert t[-2].item() == 0.0 and t[0].item() == 80
    with pytest.raises(UserError):
        sampler.sigma_steps(1)
    with pytest.raises(UserError):
        sampler.sigma_steps(10, sigma_min=1, sigma_max=0.5)


def test_backward_sigmas_truncates_like_official_sfbd():
    full = sampler.sigma_steps(40)
    for sigma_tau in [0.2, 1.3824, full[20].item(), 0.001]:
        t = sampler.backward_sigmas(sigma_tau, 40)
        assert t[0].item() == sigma_tau and t[-1].item() == 0
        rest = full[full < sigma_tau]
        assert torch.equal(t[1:], rest)  # everything after the first value is the full schedule's tail
    assert len(sampler.backward_sigmas(80, 40)) == 41
    with pytest.raises(UserError):
        sampler.backward_sigmas(100, 40)
    with pytest.raises(UserError):
        sampler.backward_sigmas(0, 40)

#----------------------------------------------------------------------------

@pytest.mark.parametrize('num_steps', [2, 18, 40])
def test_nfe_counts(num_steps):
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    sigmas = sampler.sigma_steps(num_steps)
    d = CountingGaussianDenoiser()
    sampler.heun_sampler(d, x * 80, sigmas)
    assert d.calls == 2 * num_steps - 1
    d = CountingGaussianDenoiser()
    sampler.heun_sampler(d, x * 80, sigmas, S_churn=40, S_min=0.05, S_max=50)
    assert d.calls == 2 * num_steps - 1
    d = CountingGaussianDenoiser()
    sampler.euler_sampler(d, x * 80, sigmas)
    assert d.calls == num_steps
    n = len(sampler.backward_sigmas(0.5, num_steps)) - 1
    for solver in ['ode', 'sde']:
        d = CountingGaussianDenoiser()
        sampler.backward_sample(d, x, 0.5, num_steps, solver=solver)
        assert d.calls == 2 * n - 1


def test_heun_generates_gaussian_with_right_variance():
    torch.manual_seed(0)
    latents = torch.randn(4000, 1, 4, 4, dtype=torch.float64)
    sigmas = sampler.sigma_steps(256)
    x = sampler.heun_sampler(CountingGaussianDenoiser(), latents * sigmas[0], sigmas)
    # The probability-flow ODE maps x_T to x_0 = sqrt(S / (S + T^2)) x_T, pixel by pixel.
    expected = (VARIANCES / (VARIANCES + sigmas[0] ** 2)).sqrt() * latents * sigmas[0]
    torch.testing.assert_close(x, expected, rtol=1e-3, atol=0)
    var = x.square().mean(0).reshape(4, 4).mean(1)
    torch.testing.assert_close(var, VARIANCES.flatten()[::4], rtol=0.05, atol=0)


def test_backward_ode_reproduces_gaussian_transport_map():
    torch.manual_seed(1)
    sigma_tau = 0.7
    y = torch.randn(64, 1, 4, 4, dtype=torch.float64) * (VARIANCES + sigma_tau ** 2).sqrt()
    expected = (VARIANCES / (VARIANCES + sigma_tau ** 2)).sqrt() * y
    x0 = sampler.backward_sample(CountingGaussianDenoiser(), y, sigma_tau, num_steps=512, solver='ode')
    torch.testing.assert_close(x0, expected, rtol=1e-4, atol=0)
    # Heun is second order: doubling the steps divides the error by about 4.
    err = [(sampler.backward_sample(CountingGaussianDenoiser(), y, sigma_tau, n) - expected).abs().max() for n in [64, 128]]
    assert 3.5 < err[0] / err[1] < 4.5
    # With the paper's 40 steps the map is still close, and Tweedie's mean (one denoiser call) is not it.
    x40 = sampler.backward_sample(CountingGaussianDenoiser(), y, sigma_tau, num_steps=40, solver='ode')
    torch.testing.assert_close(x40, expected, rtol=1.5e-2, atol=0)
    tweedie = CountingGaussianDenoiser()(y, torch.tensor(sigma_tau, dtype=torch.float64))
    assert (tweedie - expected).abs().max() > 0.1


def test_backward_sde_gives_data_marginal_variance():
    torch.manual_seed(2)
    sigma_tau = 0.7
    n = 6000
    y = torch.randn(n, 1, 4, 4, dtype=torch.float64) * (VARIANCES + sigma_tau ** 2).sqrt()
    x0 = sampler.backward_sample(CountingGaussianDenoiser(), y, sigma_tau, num_steps=128, solver='sde')
    var = x0.square().mean(0).reshape(4, 4).mean(1)  # 4 pixels per variance: 24000 samples each
    torch.testing.assert_close(var, VARIANCES.flatten()[::4], rtol=0.04, atol=0)
    # The ODE transports exactly too, but deterministically; the SDE's output is not a function of y.
    ode = sampler.backward_sample(CountingGaussianDenoiser(), y, sigma_tau, num_steps=128, solver='ode')
    assert (x0 - ode).square().mean() > 0.01
    # Started at y, the reverse SDE samples the posterior p(x0 | y): E[x0 y] = S and
    # E[(x0 - D(y; sigma_tau))^2] = S sigma_tau^2 / (S + sigma_tau^2); the ODE's map has neither.
    s = VARIANCES.flatten()[::4]
    cov = (x0 * y).mean(0).reshape(4, 4).mean(1)
    torch.testing.assert_close(cov, s, rtol=0.05, atol=0)
    post = (x0 - VARIANCES / (VARIANCES + sigma_tau ** 2) * y).square().mean(0).reshape(4, 4).mean(1)
    torch.testing.assert_close(post, s * sigma_tau ** 2 / (s + sigma_tau ** 2), rtol=0.05, atol=0)


def test_backward_sde_noise_comes_from_randn_like():
    y = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    calls = []

    def zeros_like(x):
        calls.append(1)
        return torch.zeros_like(x)
    x = sampler.backward_sample(CountingGaussianDenoiser(), y, 0.5, 18, solver='sde', randn_like=zeros_like)
    assert len(calls) == len(sampler.backward_sigmas(0.5, 18)) - 2  # every step but the last
    assert torch.isfinite(x).all()
    with pytest.raises(UserError):
        sampler.backward_sample(CountingGaussianDenoiser(), y, 0.5, 18, solver='bogus')


def test_churn_uses_edm_gamma():
    x = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    sigmas = torch.tensor([10.0, 1.0, 0.0], dtype=torch.float64)
    seen = []

    def d(x, sigma):
        seen.append(sigma.item())
        return torch.zeros_like(x)
    sampler.heun_sampler(d, x, sigmas, S_churn=0.5, S_min=2, S_max=20, randn_like=torch.zeros_like)
    gamma = min(0.5 / 2, math.sqrt(2) - 1)
    assert seen == pytest.approx([10 * (1 + gamma), 1.0, 1.0])  # t=1 lies outside [S_min, S_max]
    assert np.isclose(gamma, 0.25)
