"""EDM's non-leaky geometric augmentation: the network sees which transform was applied through 9 labels."""

import numpy as np
import torch

from torch_utils import persistence
from torch_utils.rng import BatchRandom

#----------------------------------------------------------------------------
# Low-pass filter for 2x oversampled resampling: Symlet-6 wavelet (orthogonal, so up then down is identity).

_SYM6 = [0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633, 0.4910559419267466,
         0.787641141030194, 0.3379294217276218, -0.07263752278646252, -0.021060292512300564, 0.04472490177066578,
         0.0017677118642428036, -0.007800708325034148]

#----------------------------------------------------------------------------
# 3x3 homogeneous 2D transforms, batched over any leading shape of their tensor arguments.

def _matrix(*rows, device: torch.device) -> torch.Tensor:
    elems = [torch.as_tensor(x, dtype=torch.float32, device=device) for row in rows for x in row]
    elems = torch.broadcast_tensors(*elems)
    return torch.stack(elems, dim=-1).reshape(*elems[0].shape, len(rows), len(rows[0]))


def _translate(tx, ty, device: torch.device) -> torch.Tensor:
    return _matrix([1, 0, tx], [0, 1, ty], [0, 0, 1], device=device)


def _scale(sx, sy, device: torch.device) -> torch.Tensor:
    return _matrix([sx, 0, 0], [0, sy, 0], [0, 0, 1], device=device)


def _rotate(theta: torch.Tensor, device: torch.device) -> torch.Tensor:
    return _matrix([theta.cos(), -theta.sin(), 0], [theta.sin(), theta.cos(), 0], [0, 0, 1], device=device)

#----------------------------------------------------------------------------

@persistence.record_init_kwargs
class AugmentPipe:
    """Random flips, integer rotations/translations and fractional scale/rotation/anisotropy/translation.

    Each transform's probability is p times its multiplier (EDM uses xflip=1e8, i.e. a 50% flip for any p > 0).
    Called as pipe(images, rnd=None) -> (images, labels); labels are zero for transforms not applied.
    """

    def __init__(self, p: float = 1,
                 xflip: float = 0, yflip: float = 0, rotate_int: float = 0, translate_int: float = 0,
                 translate_int_max: float = 0.125, scale: float = 0, rotate_frac: float = 0, aniso: float = 0,
                 translate_frac: float = 0, scale_std: float = 0.2, rotate_frac_max: float = 1, aniso_std: float = 0.2,
                 aniso_rotate_prob: float = 0.5, translate_frac_std: float = 0.125):
        # Probability multipliers (times p) of each transform, then the spread of the fractional ones: scale and
        # aniso as log2 std, rotate_frac_max in full turns, translations as fractions of the image size.
        self.p, self.xflip, self.yflip, self.rotate_int, self.translate_int = map(float, (p, xflip, yflip, rotate_int, translate_int))
        self.scale, self.rotate_frac, self.aniso, self.translate_frac = map(float, (scale, rotate_frac, aniso, translate_frac))
        self.translate_int_max, self.scale_std, self.rotate_frac_max = map(float, (translate_int_max, scale_std, rotate_frac_max))
        self.aniso_std, self.aniso_rotate_prob, self.translate_frac_std = map(float, (aniso_std, aniso_rotate_prob, translate_frac_std))

    def __call__(self, images: torch.Tensor, rnd: BatchRandom | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        N, C, H, W = images.shape
        device = images.device

        # Per-sample draws of shape [N, *shape]: from rnd's rows of the global batch, else torch's global RNG.
        def rand(*shape):
            return torch.rand([N, *shape], device=device) if rnd is None else rnd.rand(*shape).to(device)

        def randn(*shape):
            return torch.randn([N, *shape], device=device) if rnd is None else rnd.randn(*shape).to(device)

        def randint(high, *shape):
            return torch.randint(high, [N, *shape], device=device) if rnd is None else rnd.randint(0, high, *shape).to(device)

        def gate(w, multiplier):
            """Keep w where this sample's transform is enabled (probability multiplier * p), else zero."""
            return torch.where(rand(*([1] * (w.ndim - 1))) < multiplier * self.p, w, torch.zeros_like(w))

        labels = [torch.zeros([N, 0], device=device)]

        # Pixel blitting: exact, no resampling.
        if self.xflip > 0:
            w = gate(randint(2, 1, 1, 1), self.xflip)
            images = torch.where(w == 1, images.flip(3), images)
            labels += [w]
        if self.yflip > 0:
            w = gate(randint(2, 1, 1, 1), self.yflip)
            images = torch.where(w == 1, images.flip(2), images)
            labels += [w]
        if self.rotate_int > 0:
            w = gate(randint(4, 1, 1, 1), self.rotate_int)
            images = torch.where((w == 1) | (w == 2), images.flip(3), images)
            images = torch.where((w == 2) | (w == 3), images.flip(2), images)
            images = torch.where((w == 1) | (w == 3), images.transpose(2, 3), images)
            labels += [(w == 1) | (w == 2), (w == 2) | (w == 3)]
        if self.translate_int > 0:
            w = gate(rand(2, 1, 1, 1) * 2 - 1, self.translate_int)
            tx = w[:, 0:1].mul(W * self.translate_int_max).round().to(torch.int64)
            ty = w[:, 1:2].mul(H * self.translate_int_max).round().to(torch.int64)
            b, c, y, x = torch.meshgrid(*(torch.arange(size, device=device) for size in images.shape), indexing='ij')
            tx, ty = tx.reshape(N, 1, 1, 1), ty.reshape(N, 1, 1, 1)
            x = W - 1 - (W - 1 - (x - tx) % (W * 2 - 2)).abs()  # Reflect at the borders.
            y = H - 1 - (H - 1 - (y + ty) % (H * 2 - 2)).abs()
            images = images.flatten()[(((b * C) + c) * H + y) * W + x]
            labels += [tx.div(W * self.translate_int_max), ty.div(H * self.translate_int_max)]

        # Geometric transforms, accumulated as the inverse map G_inv (output pixel -> input pixel).
        geometric = self.scale > 0 or self.rotate_frac > 0 or self.aniso > 0 or self.translate_frac > 0
        G_inv = torch.eye(3, device=device).expand(N, 3, 3)
        if self.scale > 0:
            w = gate(randn(), self.scale)
            s = w.mul(self.scale_std).exp2()
            G_inv = G_inv @ _scale(1 / s, 1 / s, device)
            labels += [w]
        if self.rotate_frac > 0:
            w = gate((rand() * 2 - 1) * (np.pi * self.rotate_frac_max), self.rotate_frac)
            G_inv = G_inv @ _rotate(w, device)
            labels += [w.cos() - 1, w.sin()]
        if self.aniso > 0:
            w = randn()
            r = (rand() * 2 - 1) * np.pi
            w = gate(w, self.aniso)
            r = torch.where(rand() < self.aniso_rotate_prob, r, torch.zeros_like(r))
            s = w.mul(self.aniso_std).exp2()
            G_inv = G_inv @ _rotate(-r, device) @ _scale(1 / s, s, device) @ _rotate(r, device)
            labels += [w * r.cos(), w * r.sin()]
        if self.translate_frac > 0:
            w = gate(randn(2), self.translate_frac)
            G_inv = G_inv @ _translate(-w[:, 0] * W * self.translate_frac_std, -w[:, 1] * H * self.translate_frac_std, device)
            labels += [w[:, 0], w[:, 1]]
        if geometric:
            images = _apply_geometric(images, G_inv)

        labels = torch.cat([x.to(torch.float32).reshape(N, -1) for x in labels], dim=1)
        return images, labels

#----------------------------------------------------------------------------

def _apply_geometric(images: torch.Tensor, G_inv: torch.Tensor) -> torch.Tensor:
    """Resample images through G_inv [N, 3, 3] (pixel coordinates about the centre), 2x oversampled, reflect-padded."""
    N, C, H, W = images.shape
    device = images.device
    Hz = torch.tensor(_SYM6, dtype=images.dtype, device=device)
    Hz_pad = len(_SYM6) // 4

    # Pad by the largest reflection the image allows. EDM pads by the margin the whole batch needs; the
    # content each output pixel sees is the same, but a fixed pad keeps an image's result independent of
    # the other images in its batch (and so of the number of processes).
    images = torch.nn.functional.pad(images, pad=[W - 1, W - 1, H - 1, H - 1], mode='reflect')

    # Upsample 2x: zero insertion followed by the low-pass filter, along x then y (as transposed convolutions).
    images = images.reshape(N * C, 1, *images.shape[2:])
    images = torch.nn.functional.conv_transpose2d(images, Hz[None, None, None, :], stride=[1, 2], padding=[0, len(_SYM6) // 2 - 1])
    images = torch.nn.functional.conv_transpose2d(images, Hz[None, None, :, None], stride=[2, 1], padding=[len(_SYM6) // 2 - 1, 0])
    images = images.reshape(N, C, *images.shape[2:])
    G_inv = _scale(2, 2, device) @ G_inv @ _scale(0.5, 0.5, device)
    G_inv = _translate(-0.5, -0.5, device) @ G_inv @ _translate(0.5, 0.5, device)

    # Sample bilinearly in normalised [-1, 1] coordinates.
    shape = [N, C, (H + Hz_pad * 2) * 2, (W + Hz_pad * 2) * 2]
    G_inv = _scale(2 / images.shape[3], 2 / images.shape[2], device) @ G_inv @ _scale(shape[3] / 2, shape[2] / 2, device)
    grid = torch.nn.functional.affine_grid(theta=G_inv[:, :2, :].to(images.dtype), size=shape, align_corners=False)
    images = torch.nn.functional.grid_sample(images, grid, mode='bilinear', padding_mode='zeros', align_corners=False)

    # Downsample 2x with the same filter, and crop the filter margin.
    pad = (len(_SYM6) - 1) // 2
    images = images.reshape(N * C, 1, *shape[2:])
    images = torch.nn.functional.conv2d(images, Hz[None, None, None, :], stride=[1, 2], padding=[0, pad])[:, :, :, Hz_pad:-Hz_pad]
    images = torch.nn.functional.conv2d(images, Hz[None, None, :, None], stride=[2, 1], padding=[pad, 0])[:, :, Hz_pad:-Hz_pad, :]
    return images.reshape(N, C, H, W)

#----------------------------------------------------------------------------
