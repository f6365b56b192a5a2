"""Denoising score-matching losses of EDM (Karras et al. 2022): VP, VE and EDM, per element."""

import torch

from torch_utils import persistence
from torch_utils.rng import BatchRandom

#----------------------------------------------------------------------------
# Draws come from `rnd` (this rank's rows of a global batch) when given, else from torch's global RNG.

def _rand(rnd: BatchRandom | None, images: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1), one per image, shape [N, 1, 1, 1]."""
    if rnd is None:
        return torch.rand([images.shape[0], 1, 1, 1], device=images.device)
    return rnd.rand(1, 1, 1).to(images.device)


def _randn(rnd: BatchRandom | None, images: torch.Tensor, *shape: int) -> torch.Tensor:
    """Standard normal of shape [N, *shape]."""
    if rnd is None:
        return torch.randn([images.shape[0], *shape], device=images.device)
    return rnd.randn(*shape).to(images.device)


def _denoising_loss(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor | None, augment_pipe,
                    rnd: BatchRandom | None, sigma: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """weight * (D(y + n; sigma) - y)^2 with y the (augmented) images and n ~ N(0, sigma^2 I)."""
    if augment_pipe is not None:
        y, augment_labels = augment_pipe(images, rnd=rnd)
    else:
        y, augment_labels = images, None
    n = _randn(rnd, y, *y.shape[1:]).to(y.dtype) * sigma
    D_yn = net(y + n, sigma, labels, augment_labels=augment_labels)
    return weight * ((D_yn - y) ** 2)

#----------------------------------------------------------------------------

@persistence.record_init_kwargs
class VPLoss:
    """Variance preserving: t ~ U(epsilon_t, 1), sigma = sigma_VP(t), weight 1 / sigma^2."""

    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1, epsilon_t: float = 1e-5):
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.epsilon_t = epsilon_t

    def __call__(self, net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None,
                 augment_pipe=None, rnd: BatchRandom | None = None) -> torch.Tensor:
        rnd_uniform = _rand(rnd, images)
        sigma = self.sigma(1 + rnd_uniform * (self.epsilon_t - 1))
        weight = 1 / sigma ** 2
        return _denoising_loss(net, images, labels, augment_pipe, rnd, sigma, weight)

    def sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()


@persistence.record_init_kwargs
class VELoss:
    """Variance exploding: sigma = sigma_min (sigma_max / sigma_min)^u, u ~ U(0, 1), weight 1 / sigma^2."""

    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100):
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def __call__(self, net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None,
                 augment_pipe=None, rnd: BatchRandom | None = None) -> torch.Tensor:
        rnd_uniform = _rand(rnd, images)
        sigma = self.sigma_min * ((self.sigma_max / self.sigma_min) ** rnd_uniform)
        weight = 1 / sigma ** 2
        return _denoising_loss(net, images, labels, augment_pipe, rnd, sigma, weight)


@persistence.record_init_kwargs
class EDMLoss:
    """EDM: ln(sigma) ~ N(P_mean, P_std^2), weight (sigma^2 + sigma_data^2) / (sigma sigma_data)^2."""

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def __call__(self, net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None,
                 augment_pipe=None, rnd: BatchRandom | None = None) -> torch.Tensor:
        rnd_normal = _randn(rnd, images, 1, 1, 1)
        sigma = (rnd_normal * self.P_std + self.P_mean).exp()
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        return _denoising_loss(net, images, labels, augment_pipe, rnd, sigma, weight)

#----------------------------------------------------------------------------
