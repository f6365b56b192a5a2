"""Pure diffusion solvers: the EDM time-step schedule, Heun and Euler samplers, and SFBD's backward solver."""

import math
from typing import Callable

import torch

from dnnlib.util import UserError

# denoise(x, sigma) -> D(x; sigma). x is float64 [N, C, H, W], sigma a float64 0-d tensor; the
# result is float64 of x's shape. Every solver here is a pure function of (denoise, x, sigmas).
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
RandnLike = Callable[[torch.Tensor], torch.Tensor]

# EDM's time-step schedule (Karras et al. 2022, Table 1), sigma in [-1, 1] pixel units.
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0

#----------------------------------------------------------------------------

def net_denoiser(net: torch.nn.Module, class_labels: torch.Tensor | None = None) -> Denoiser:
    """Wrap a preconditioned network net(x, sigma, class_labels) as a float64 denoiser."""
    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return net(x, sigma, class_labels).to(torch.float64)
    return denoise


def sigma_steps(num_steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO,
                round_sigma: Callable[[torch.Tensor], torch.Tensor] | None = None,
                device: torch.device | str = 'cpu') -> torch.Tensor:
    """EDM's noise levels t_0 > ... > t_{N-1} (float64, rounded by the network) and a trailing t_N = 0.

    t_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, sigma in [-1,1] pixel units.
    """
    if num_steps < 2:
        raise UserError(f'Need at least 2 sampling steps, got {num_steps}')
    if not 0 < sigma_min < sigma_max:
        raise UserError(f'Need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}')
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    t = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    if round_sigma is not None:
        t = torch.as_tensor(round_sigma(t), dtype=torch.float64, device=device)
    return torch.cat([t, torch.zeros_like(t[:1])])

#----------------------------------------------------------------------------

def _churn(x: torch.Tensor, t_cur: torch.Tensor, num_steps: int, S_churn: float, S_min: float, S_max: float,
           S_noise: float, randn_like: RandnLike, round_sigma: Callable | None) -> tuple[torch.Tensor, torch.Tensor]:
    """EDM's temporary noise increase: t_hat = t (1 + gamma), x_hat = x + sqrt(t_hat^2 - t^2) S_noise eps."""
    if S_churn <= 0:
        return x, t_cur
    gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
    t_hat = t_cur + gamma * t_cur
    if round_sigma is not None:
        t_hat = torch.as_tensor(round_sigma(t_hat), dtype=torch.float64, device=t_cur.device)
    # Drawn at every step, as EDM does, so a seed gives the same image as EDM's sampler.
    eps = randn_like(x)
    return x + (t_hat ** 2 - t_cur ** 2).clip(min=0).sqrt() * S_noise * eps, t_hat


def heun_sampler(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, S_churn: float = 0, S_min: float = 0,
                 S_max: float = float('inf'), S_noise: float = 1, randn_like: RandnLike | None = None,
                 round_sigma: Callable | None = None) -> torch.Tensor:
    """EDM Algorithm 2: solve the probability-flow ODE from x at sigmas[0] along sigmas with Heun steps.

    The step into sigma = 0 is an Euler step, so N steps cost 2N - 1 denoiser calls. S_churn > 0
    adds EDM's stochastic churn on sigmas in [S_min, S_max], drawing noise with randn_like.
    """
    randn_like = randn_like or torch.randn_like
    num_steps = len(sigmas) - 1
    x_next = x.to(torch.float64)
    for i, (t_cur, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x_hat, t_hat = _churn(x_next, t_cur, num_steps, S_churn, S_min, S_max, S_noise, randn_like, round_sigma)
        d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if t_next > 0:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def euler_sampler(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, S_churn: float = 0, S_min: float = 0,
                  S_max: float = float('inf'), S_noise: float = 1, randn_like: RandnLike | None = None,
                  round_sigma: Callable | None = None) -> torch.Tensor:
    """First-order version of heun_sampler: N steps cost N denoiser calls."""
    randn_like = randn_like or torch.randn_like
    num_steps = len(sigmas) - 1
    x_next = x.to(torch.float64)
    for t_cur, t_next in zip(sigmas[:-1], sigmas[1:]):
        x_hat, t_hat = _churn(x_next, t_cur, num_steps, S_churn, S_min, S_max, S_noise, randn_like, round_sigma)
        x_next = x_hat + (t_next - t_hat) * (x_hat - denoise(x_hat, t_hat)) / t_hat
    return x_next


def reverse_sde_sampler(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor,
                        randn_like: RandnLike | None = None) -> torch.Tensor:
    """Solve the reverse-time SDE dx = -2 sigma score dsigma + sqrt(2 sigma) dW from sigmas[0] to 0.

    With score = (D(x; sigma) - x) / sigma^2 the drift is f(x, sigma) = 2 (x - D) / sigma per unit
    sigma. Each step [t, t'] is stochastic Heun for additive noise: one Gaussian increment xi with the
    exact variance t^2 - t'^2 of the noise integral is shared by the Euler predictor and the
    trapezoidal corrector. The last step into sigma = 0 is the deterministic Euler step of the ODE
    (x -> D(x; t)), as the SDE's drift is singular there. N steps cost 2N - 1 denoiser calls.
    """
    randn_like = randn_like or torch.randn_like
    x_next = x.to(torch.float64)
    for t_cur, t_next in zip(sigmas[:-1], sigmas[1:]):
        x_cur = x_next
        if t_next == 0:
            x_next = denoise(x_cur, t_cur)
            break
        h = t_next - t_cur
        xi = (t_cur ** 2 - t_next ** 2).sqrt() * randn_like(x_cur)
        f_cur = 2 * (x_cur - denoise(x_cur, t_cur)) / t_cur
        x_pred = x_cur + h * f_cur + xi
        f_pred = 2 * (x_pred - denoise(x_pred, t_next)) / t_next
        x_next = x_cur + h * (0.5 * f_cur + 0.5 * f_pred) + xi
    return x_next

#----------------------------------------------------------------------------

def backward_sigmas(sigma_tau: float, num_steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO,
                    round_sigma: Callable | None = None, device: torch.device | str = 'cpu') -> torch.Tensor:
    """The EDM schedule of num_steps steps truncated at sigma_tau, as in the official SFBD denoise.py.

    Takes the full schedule t_0..t_N (t_N = 0), keeps t_i.. from the LAST i with t_i >= sigma_tau, and
    sets that first value to sigma_tau exactly; every later value is < sigma_tau.
    """
    if not 0 < sigma_tau <= sigma_max:
        raise UserError(f'sigma_tau must be in (0, sigma_max={sigma_max}], got {sigma_tau}')
    t = sigma_steps(num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, round_sigma=round_sigma, device=device)
    i = int(torch.nonzero(t >= sigma_tau).max())
    t = t[i:].clone()
    t[0] = sigma_tau
    return t


def backward_sample(denoise: Denoiser, y: torch.Tensor, sigma_tau: float, num_steps: int, solver: str = 'ode',
                    sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO,
                    randn_like: RandnLike | None = None, round_sigma: Callable | None = None) -> torch.Tensor:
    """SFBD's backward step: start AT the noisy image y (at sigma_tau exactly) and solve down to sigma = 0.

    solver='ode': deterministic Heun on the probability-flow ODE (the official code);
    solver='sde': the reverse-time SDE (the paper's backward equation), see reverse_sde_sampler.
    num_steps counts the FULL EDM schedule before truncation (e.g. 40 for CelebA).
    """
    sigmas = backward_sigmas(sigma_tau, num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                             round_sigma=round_sigma, device=y.device)
    if solver == 'ode':
        return heun_sampler(denoise, y, sigmas)
    if solver == 'sde':
        return reverse_sde_sampler(denoise, y, sigmas, randn_like=randn_like)
    raise UserError(f"Unknown backward solver {solver!r}: use 'ode' or 'sde'")
