"""The method itself on Gaussian data: SFBD with exact Gaussian denoisers and our backward solver converges to the truth."""

import numpy as np
import pytest

from training import analytic

LAM_TRUE = np.array([0.05, 0.5])
SIGMA_TAU = 0.5


def _run(solver, num_noisy, iters):
    return analytic.run_gaussian_sfbd(np.zeros(2), np.diag(LAM_TRUE), SIGMA_TAU, num_noisy, init_mean=np.zeros(2),
                                      init_cov=np.diag([0.5, 0.05]), iters=iters, solver=solver, seed=3)


def _population_w2(solver, iters):
    lam, out = np.array([0.5, 0.05]), []
    for _ in range(iters + 1):
        out.append(analytic.gaussian_w2(np.zeros(2), np.diag(lam), np.zeros(2), np.diag(LAM_TRUE)))
        lam = analytic.population_step(lam, LAM_TRUE, SIGMA_TAU, solver)
    return np.array(out)


def test_gaussian_denoiser_is_posterior_mean():
    cov = np.array([[0.3, 0.1], [0.1, 0.2]])
    d = analytic.gaussian_denoiser(np.zeros(2), cov)
    import torch
    x = torch.tensor([[1.0, -2.0]], dtype=torch.float64).reshape(1, 2, 1, 1)
    want = cov @ np.linalg.inv(cov + 0.25 * np.eye(2)) @ np.array([1.0, -2.0])
    np.testing.assert_allclose(d(x, torch.tensor(0.5, dtype=torch.float64)).flatten().numpy(), want, rtol=1e-12)


def test_ode_sfbd_converges_to_true_covariance_at_predicted_rate():
    recs = _run('ode', num_noisy=8000, iters=10)
    w2 = np.array([r['w2'] for r in recs])
    pop = _population_w2('ode', 10)
    assert np.all(np.diff(w2[:8]) < 0), f'W2 must shrink every iteration: {w2}'
    assert w2[-1] < 0.1 * w2[0], w2
    # Finite data: the trajectory follows the infinite-data recursion up to sampling error.
    np.testing.assert_allclose(w2, pop, atol=0.03)
    # The paper's bound O(1/sqrt(k)) holds: sqrt(k) * W2_k never exceeds W2_1.
    assert np.all(np.sqrt(np.arange(1, 11)) * w2[1:] <= w2[1] + 1e-9)


def test_sde_sfbd_moves_toward_truth_like_em():
    recs = _run('sde', num_noisy=1500, iters=3)
    w2 = np.array([r['w2'] for r in recs])
    pop = _population_w2('sde', 3)
    assert np.all(np.diff(w2) < 0), w2
    np.testing.assert_allclose(w2, pop, atol=0.05)


def test_w2_closed_form_of_identical_gaussians_is_zero():
    s = np.array([[1.0, 0.3], [0.3, 0.5]])
    assert analytic.gaussian_w2(np.ones(2), s, np.ones(2), s) == pytest.approx(0.0, abs=1e-6)
    assert analytic.gaussian_w2(np.zeros(1), np.eye(1), np.zeros(1), 4 * np.eye(1)) == pytest.approx(1.0)
