"""Analytic check of SFBD on Gaussian data: exact Gaussian denoisers, our backward solver, a Gaussian refit per iteration."""

import numpy as np
import scipy.linalg
import torch

from torch_utils import rng
from . import sampler

#----------------------------------------------------------------------------

def gaussian_denoiser(mean: np.ndarray, cov: np.ndarray) -> sampler.Denoiser:
    """The exact denoiser of N(mean, cov): D(x; sigma) = mean + cov (cov + sigma^2 I)^-1 (x - mean).

    x is float64 [N, d, 1, 1] (a d-channel 1x1 "image"), as the solvers expect.
    """
    lam, U = np.linalg.eigh(cov)
    lam_t, U_t = torch.as_tensor(np.clip(lam, 0, None)), torch.as_tensor(U)
    mean_t = torch.as_tensor(mean)

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        z = (x.flatten(1) - mean_t) @ U_t
        z = z * (lam_t / (lam_t + sigma.to(torch.float64) ** 2))
        return (mean_t + z @ U_t.T).reshape(x.shape)
    return denoise


def fit_gaussian(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maximum-likelihood mean and covariance of samples x [N, d]."""
    mean = x.mean(0)
    return mean, np.cov(x - mean, rowvar=False, bias=True)


def gaussian_w2(m1: np.ndarray, s1: np.ndarray, m2: np.ndarray, s2: np.ndarray) -> float:
    """2-Wasserstein distance between N(m1, s1) and N(m2, s2)."""
    r1 = scipy.linalg.sqrtm(s1).real
    cross = scipy.linalg.sqrtm(r1 @ s2 @ r1).real
    d2 = float(np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * cross))
    return float(np.sqrt(max(d2, 0.0)))


def population_step(lam: np.ndarray, lam_true: np.ndarray, sigma_tau: float, solver: str = 'ode') -> np.ndarray:
    """One exact SFBD iteration (infinite data) on model eigenvalues sharing the truth's eigenbasis.

    ODE: y maps to (l/(l+s^2))^(1/2) y, so the refit variance is l (l* + s^2) / (l + s^2), contracting
    by s^2 / (l* + s^2) near the fixed point l = l*. SDE: y maps to a posterior sample, whose variance
    is (l/(l+s^2))^2 (l* + s^2) + l s^2 / (l + s^2) - the EM update for Gaussian deconvolution,
    contracting only by 1 - (l* / (l* + s^2))^2: slower, most of all for small l*.
    """
    s2 = sigma_tau ** 2
    if solver == 'ode':
        return lam * (lam_true + s2) / (lam + s2)
    shrink = lam / (lam + s2)
    return shrink ** 2 * (lam_true + s2) + shrink * s2

#----------------------------------------------------------------------------

def run_gaussian_sfbd(true_mean: np.ndarray, true_cov: np.ndarray, sigma_tau: float, num_noisy: int,
                      init_mean: np.ndarray, init_cov: np.ndarray, iters: int, num_steps: int = 40,
                      solver: str = 'ode', seed: int = 0) -> list[dict]:
    """SFBD with a Gaussian model: corrupt once, then per iteration backward-denoise and refit.

    The starting model N(init_mean, init_cov) stands for the pretrained model. Returns one record per
    iteration k = 0..iters with the W2 distance of the model to the truth and its covariance error.
    """
    g = np.random.default_rng(seed)
    d = len(true_mean)
    x = g.multivariate_normal(true_mean, true_cov, size=num_noisy)
    y = torch.as_tensor(x + sigma_tau * g.standard_normal(x.shape)).reshape(num_noisy, d, 1, 1)
    mean, cov = init_mean, init_cov
    records = []
    for k in range(iters + 1):
        records.append(dict(k=k, w2=gaussian_w2(mean, cov, true_mean, true_cov),
                            cov_err=float(np.linalg.norm(cov - true_cov)), cov=cov.copy(), mean=mean.copy()))
        if k == iters:
            break
        randn = rng.StackedRandomGenerator('cpu', [rng.derive_seed(seed, k + 1, i) for i in range(num_noisy)]).randn_like \
            if solver == 'sde' else None
        e_k = sampler.backward_sample(gaussian_denoiser(mean, cov), y, sigma_tau, num_steps, solver=solver, randn_like=randn)
        mean, cov = fit_gaussian(e_k.reshape(num_noisy, d).numpy())
    return records


if __name__ == '__main__':
    # A printed table for docs/REPRODUCTION.md: python -m training.analytic
    lam_true = np.array([0.05, 0.2, 0.5])
    true_cov = np.diag(lam_true)
    for solver in ['ode', 'sde']:
        recs = run_gaussian_sfbd(np.zeros(3), true_cov, sigma_tau=0.5, num_noisy=20000, init_mean=np.zeros(3),
                                 init_cov=np.diag([0.5, 0.02, 1.0]), iters=12, solver=solver, seed=1)
        lam = np.diag(recs[0]['cov'])
        print(f'solver={solver}   k  W2(model, truth)  ||cov - cov*||_F   population W2')
        for r in recs:
            pop = gaussian_w2(np.zeros(3), np.diag(lam), np.zeros(3), true_cov)
            print(f'{"":13s}{r["k"]:2d}  {r["w2"]:.5f}           {r["cov_err"]:.5f}            {pop:.5f}')
            lam = population_step(lam, lam_true, 0.5, solver)
