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

#----------------------------------------------------------------------------
# Noise sizes against EDM's and the SDE's closed forms, with the noise drawn through a spy.

class RecordingDenoiser:
    """Records every (x, sigma) it is called with; returns 0 (zero) or x (identity)."""

    def __init__(self, identity: bool):
        self.identity, self.calls = identity, []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.clone(), sigma.item()))
        return x.clone() if self.identity else torch.zeros_like(x)


class KnownNoise:
    """randn_like returning eps_k = (k + 1) * pattern on its k-th call."""

    def __init__(self, pattern: torch.Tensor):
        self.pattern, self.count = pattern, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.count += 1
        return self.count * self.pattern.to(x.dtype)


@pytest.mark.parametrize('S_churn, gamma', [(0.9, 0.3), (40, math.sqrt(2) - 1)])  # S_churn / N with N = 3, or the cap
def test_churn_adds_noise_of_std_sqrt_t_hat_squared_minus_t_squared(S_churn, gamma):
    # t = 10 and t = 0.5 lie outside [S_min, S_max] = [0.8, 5]; only t = 1 is churned, to t_hat = 1 + gamma.
    sigmas = torch.tensor([10.0, 1.0, 0.5, 0.0], dtype=torch.float64)
    x0 = torch.linspace(-1, 1, 16, dtype=torch.float64).reshape(1, 1, 4, 4)
    pattern = torch.linspace(0.5, 2, 16, dtype=torch.float64).reshape(1, 1, 4, 4)
    noise, d = KnownNoise(pattern), RecordingDenoiser(identity=False)
    sampler.heun_sampler(d, x0, sigmas, S_churn=S_churn, S_min=0.8, S_max=5, S_noise=1.007, randn_like=noise)
    assert noise.count == 3  # drawn at every step, churned or not (EDM)
    # With D = 0 a step from t_hat to t' scales x by t' / t_hat. Calls: (x0, 10), (x1, 1) | (x_hat, t_hat), (x2, 0.5) | (x2, 0.5).
    x1 = x0 * 1 / 10
    t_hat = 1 + gamma
    x_hat = x1 + math.sqrt(t_hat ** 2 - 1) * 1.007 * (2 * pattern)
    expected = [(x0, 10), (x1, 1), (x_hat, t_hat), (x_hat * 0.5 / t_hat, 0.5), (x_hat * 0.5 / t_hat, 0.5)]
    assert [s for _, s in d.calls] == pytest.approx([s for _, s in expected], rel=1e-14)
    for (x, _), (want, _) in zip(d.calls, expected):
        torch.testing.assert_close(x, want, rtol=1e-12, atol=1e-14)


def test_reverse_sde_increments_have_variance_t_squared_minus_t_next_squared():
    # D(x) = x makes the drift 2 (x - D) / sigma vanish: each step adds its increment xi and nothing else.
    # EDM's schedule for N = 5 is 80, 17.53, 2.515, 0.1698, 0.002; truncated at sigma_tau = 3: 3, 2.515, 0.1698, 0.002, 0.
    t = [(80 ** (1 / 7) + i / 4 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for i in range(5)]
    steps = [3.0] + t[2:] + [0.0]
    y = torch.linspace(-1, 1, 16, dtype=torch.float64).reshape(1, 1, 4, 4)
    pattern = torch.linspace(0.5, 2, 16, dtype=torch.float64).reshape(1, 1, 4, 4)
    noise, d = KnownNoise(pattern), RecordingDenoiser(identity=True)
    x = sampler.backward_sample(d, y, 3.0, num_steps=5, solver='sde', randn_like=noise)
    assert noise.count == 3  # one increment per step, shared by predictor and corrector; none into sigma = 0
    assert [s for _, s in d.calls] == pytest.approx([3.0, t[2], t[2], t[3], t[3], t[4], t[4]], rel=1e-14)
    increments = [math.sqrt(a ** 2 - b ** 2) * (k + 1) * pattern for k, (a, b) in enumerate(zip(steps[:-2], steps[1:-1]))]
    torch.testing.assert_close(x, y + sum(increments), rtol=1e-12, atol=1e-14)
    # With real Gaussian noise every increment x_pred - x_cur has variance t^2 - t'^2.
    torch.manual_seed(3)
    d = RecordingDenoiser(identity=True)
    sampler.backward_sample(d, torch.zeros(2000, 1, 4, 4, dtype=torch.float64), 3.0, num_steps=5, solver='sde')
    for k, (a, b) in enumerate(zip(steps[:-2], steps[1:-1])):
        xi = d.calls[2 * k + 1][0] - d.calls[2 * k][0]
        assert xi.var().item() == pytest.approx(a ** 2 - b ** 2, rel=0.05), k  # 32000 draws: 5% is 6 standard errors
        assert xi.mean().item() == pytest.approx(0, abs=0.04 * math.sqrt(a ** 2 - b ** 2))


def test_euler_follows_the_gaussian_probability_flow_and_its_hand_recursion():
    # Data N(0, s^2 I): D(x; sigma) = x s^2 / (s^2 + sigma^2), and the probability-flow ODE carries x(t0) to
    # x(t) = x(t0) sqrt((s^2 + t^2) / (s^2 + t0^2)) (closed form); Euler converges to it at first order.
    s = 0.5
    x0 = torch.tensor([[[[1.0, -2.0]]]], dtype=torch.float64) * 80

    def denoise(x, sigma):
        return x * s ** 2 / (s ** 2 + sigma ** 2)
    exact = x0 * s / math.sqrt(s ** 2 + 80 ** 2)
    errors = [float((sampler.euler_sampler(denoise, x0, sampler.sigma_steps(n)) - exact).abs().max()) for n in (64, 256)]
    assert errors[1] < 0.3 * errors[0] and errors[1] < 0.02 * float(exact.abs().max())  # first order: 4x the steps, ~1/4 the error
    # Three steps by hand: x <- x + (t' - t) (x - D(x; t)) / t on t = 2, 1, 0.5 and into 0 (where it returns D).
    t = [2.0, 1.0, 0.5, 0.0]
    x = 3.0
    for a, b in zip(t[:-1], t[1:]):
        x = x + (b - a) * (x - x * s ** 2 / (s ** 2 + a ** 2)) / a
    got = sampler.euler_sampler(denoise, torch.full([1, 1, 1, 1], 3.0, dtype=torch.float64), torch.tensor(t, dtype=torch.float64))
    assert got.item() == pytest.approx(x, rel=1e-12)
    calls = []
    sampler.euler_sampler(lambda x, sigma: calls.append(float(sigma)) or denoise(x, sigma), x0, torch.tensor(t, dtype=torch.float64))
    assert calls == t[:-1]  # N steps, N calls, at t_0 .. t_{N-1}


def test_backward_schedule_passes_its_range_and_rho_on():
    # EDM's formula with sigma_min 0.01, sigma_max 10, rho 3 and 6 steps, by hand; truncated at sigma_tau 0.5
    # (the last t_i >= 0.5 becomes 0.5), rounded by a network that keeps 3 decimals.
    i = np.arange(6)
    t = (10 ** (1 / 3) + i / 5 * (0.01 ** (1 / 3) - 10 ** (1 / 3))) ** 3
    t = np.round(t, 3)
    first = int(np.flatnonzero(t >= 0.5).max())
    expected = np.concatenate([[0.5], t[first + 1:], [0.0]])
    round3 = lambda x: torch.round(torch.as_tensor(x) * 1000) / 1000  # noqa: E731
    got = sampler.backward_sigmas(0.5, 6, sigma_min=0.01, sigma_max=10, rho=3, round_sigma=round3)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12)
    seen = []
    sampler.backward_sample(lambda x, s: seen.append(float(s)) or x, torch.zeros([1, 1, 2, 2], dtype=torch.float64), 0.5, 6,
                            sigma_min=0.01, sigma_max=10, rho=3, round_sigma=round3)
    # Heun: D at t_i and at t_{i+1} for every step, only at t_i for the last one into sigma 0.
    heun = [float(v) for a, b in zip(expected[:-1], expected[1:]) for v in ((a, b) if b > 0 else (a,))]
    assert seen == pytest.approx(heun)
