"""Tests for training/loss.py: sigma distributions, weighting and noise per SPEC, and rank-independent draws."""

import numpy as np
import scipy.stats
import pytest
import torch

from torch_utils.rng import BatchRandom
from training import augment, loss

#----------------------------------------------------------------------------

class ZeroNet(torch.nn.Module):
    """D(x; sigma) = 0, recording its inputs: the loss is then weight * y^2."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        self.calls.append((x, sigma, class_labels, augment_labels))
        return torch.zeros_like(x)


class HalfNet(torch.nn.Module):
    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        return 0.5 * x / (1 + sigma ** 2)


def _vp_sigma(t, beta_d=19.9, beta_min=0.1):
    return np.sqrt(np.exp(0.5 * beta_d * t ** 2 + beta_min * t) - 1)

#----------------------------------------------------------------------------

def test_edm_loss_weight_and_noise_follow_spec():
    images = torch.randn(6, 3, 8, 8)
    labels = torch.eye(6)
    net = ZeroNet()
    out = loss.EDMLoss()(net, images, labels, rnd=BatchRandom(7, 6, 0, 6))
    x, sigma, got_labels, augment_labels = net.calls[-1]
    assert out.shape == images.shape and got_labels is labels and augment_labels is None

    # The same BatchRandom stream: ln(sigma) ~ N(-1.2, 1.2^2) first, then the noise.
    rnd = BatchRandom(7, 6, 0, 6)
    expected_sigma = (rnd.randn(1, 1, 1) * 1.2 - 1.2).exp()
    expected_noise = rnd.randn(3, 8, 8) * expected_sigma
    torch.testing.assert_close(sigma, expected_sigma)
    torch.testing.assert_close(x, images + expected_noise)
    weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    torch.testing.assert_close(out, weight * images ** 2)


def test_vp_and_ve_weighting_and_sigma_ranges():
    images = torch.randn(5, 1, 4, 4)
    for loss_fn in (loss.VPLoss(), loss.VELoss()):
        net = ZeroNet()
        out = loss_fn(net, images, rnd=BatchRandom(3, 5, 0, 5))
        sigma = net.calls[-1][1]
        torch.testing.assert_close(out, images ** 2 / sigma ** 2)
        u = BatchRandom(3, 5, 0, 5).rand(1, 1, 1).double().numpy()
        if isinstance(loss_fn, loss.VPLoss):
            expected = _vp_sigma(1 + u * (1e-5 - 1))   # t ~ U(eps_t, 1)
        else:
            expected = 0.02 * (100 / 0.02) ** u         # log-uniform on [0.02, 100]
        np.testing.assert_allclose(sigma.numpy(), expected, rtol=1e-5)


def test_global_rng_sigma_distribution():
    images = torch.zeros(20000, 1, 1, 1)
    torch.manual_seed(0)
    net = ZeroNet()
    loss.EDMLoss(P_mean=-1.2, P_std=1.2)(net, images)
    log_sigma = net.calls[-1][1].log()
    assert log_sigma.mean().item() == pytest.approx(-1.2, abs=0.05)
    assert log_sigma.std().item() == pytest.approx(1.2, abs=0.05)
    loss.VELoss()(net, images)
    sigma = net.calls[-1][1]
    assert 0.02 <= sigma.min() and sigma.max() <= 100 and sigma.log().std() > 2


@pytest.mark.parametrize('loss_cls', [loss.EDMLoss, loss.VPLoss, loss.VELoss])
def test_draws_do_not_depend_on_the_split_of_the_batch(loss_cls):
    images = torch.randn(6, 3, 8, 8)
    pipe = augment.AugmentPipe(p=0.5, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
    whole = loss_cls()(HalfNet(), images, augment_pipe=pipe, rnd=BatchRandom(11, 6, 0, 6))
    parts = [loss_cls()(HalfNet(), images[a:b], augment_pipe=pipe, rnd=BatchRandom(11, 6, a, b)) for a, b in [(0, 2), (2, 6)]]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-6, atol=1e-6)


def test_augment_pipe_labels_reach_the_network():
    net = ZeroNet()
    pipe = augment.AugmentPipe(p=1, xflip=1e8, scale=1)
    loss.EDMLoss()(net, torch.randn(4, 3, 8, 8), augment_pipe=pipe)
    assert net.calls[-1][3].shape == (4, 2)

#----------------------------------------------------------------------------
# Distributions of the draws against their closed forms (Kolmogorov-Smirnov on many draws), through the
# BatchRandom path the training loop uses.

def _draw(loss_fn, n: int = 200000, shape=(1, 1, 2)):
    """(sigma [n], noise / sigma [n, 2]) of one loss call on zero images with a recording zero network."""
    net = ZeroNet()
    loss_fn(net, torch.zeros(n, *shape), rnd=BatchRandom(123, n, 0, n))
    x, sigma = net.calls[-1][:2]
    sigma = sigma.double().flatten()
    return sigma, x.double().flatten(1) / sigma[:, None]


def test_edm_sigma_is_lognormal_and_noise_is_sigma_times_standard_normal():
    sigma, z = _draw(loss.EDMLoss())
    assert scipy.stats.kstest(sigma.log().numpy(), 'norm', args=(-1.2, 1.2)).pvalue > 1e-3
    assert sigma.log().mean().item() == pytest.approx(-1.2, abs=0.05)
    assert sigma.log().std().item() == pytest.approx(1.2, abs=0.05)
    # The noise divided by sigma is N(0, 1) at every noise level: check the low and the high half of sigma.
    assert scipy.stats.kstest(z.flatten().numpy(), 'norm').pvalue > 1e-3
    low = sigma < sigma.median()
    for part in [z[low], z[~low]]:
        assert part.std().item() == pytest.approx(1, abs=0.03)


def test_vp_t_is_uniform_and_ve_log_sigma_is_uniform():
    sigma, z = _draw(loss.VPLoss())  # the defaults are SPEC's beta_d 19.9, beta_min 0.1, epsilon_t 1e-5
    # Invert sigma(t)^2 + 1 = exp(beta_d t^2 / 2 + beta_min t) for t: the draws must be U(epsilon_t, 1).
    t = (-0.1 + np.sqrt(0.1 ** 2 + 2 * 19.9 * np.log1p(sigma.numpy() ** 2))) / 19.9
    assert scipy.stats.kstest(t, 'uniform', args=(1e-5, 1 - 1e-5)).pvalue > 1e-3
    assert z.std().item() == pytest.approx(1, abs=0.02)
    sigma, z = _draw(loss.VELoss())  # sigma_min 0.02, sigma_max 100
    assert scipy.stats.kstest(sigma.log().numpy(), 'uniform', args=(np.log(0.02), np.log(100 / 0.02))).pvalue > 1e-3
    assert z.std().item() == pytest.approx(1, abs=0.02)


class ShiftFlipPipe:
    """An augment pipe done by hand: mirrors every image and adds 10, labels = 0.5."""

    def __call__(self, images, rnd=None):
        return images.flip(3) + 10, torch.full([images.shape[0], 9], 0.5)


def test_loss_target_and_network_input_are_the_augmented_image():
    images = torch.rand(64, 1, 4, 4)
    net = ZeroNet()
    out = loss.EDMLoss()(net, images, augment_pipe=ShiftFlipPipe(), rnd=BatchRandom(5, 64, 0, 64))
    x, sigma, _, augment_labels = net.calls[-1]
    y = images.flip(3) + 10
    torch.testing.assert_close(augment_labels, torch.full([64, 9], 0.5))
    torch.testing.assert_close(out, (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2 * y ** 2)  # D = 0: weight * y^2
    z = (x - y) / sigma  # the noise is added to y (not to the images), with std sigma
    assert z.abs().max() < 6 and z.std().item() == pytest.approx(1, abs=0.15)


class HalfRecordingNet(ZeroNet):
    """D(x; sigma) = x / 2, recording its inputs."""

    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        super().forward(x, sigma, class_labels, augment_labels)
        return 0.5 * x


@pytest.mark.parametrize('loss_fn, weight', [
    (loss.EDMLoss(), lambda s: (s ** 2 + 0.25) / (s * 0.5) ** 2),
    (loss.VPLoss(), lambda s: 1 / s ** 2),
    (loss.VELoss(), lambda s: 1 / s ** 2),
])
@pytest.mark.parametrize('batch_random', [True, False])
def test_every_loss_is_weight_times_squared_error_of_the_augmented_image(loss_fn, weight, batch_random):
    images, labels = torch.rand(5, 2, 4, 4), torch.eye(5)
    net = HalfRecordingNet()
    out = loss_fn(net, images, labels, augment_pipe=ShiftFlipPipe(), rnd=BatchRandom(9, 5, 0, 5) if batch_random else None)
    x, sigma, got_labels, augment_labels = net.calls[-1]
    assert got_labels is labels and sigma.shape == (5, 1, 1, 1) and out.shape == images.shape
    torch.testing.assert_close(augment_labels, torch.full([5, 9], 0.5))
    y = images.flip(3) + 10
    torch.testing.assert_close(out, weight(sigma) * (0.5 * x - y) ** 2)  # D(y + n) - y with D = x / 2
