"""Tests for training/augment.py: identity at p=0, exact flips, labels, geometry, per-sample randomness."""

import math

import numpy as np
import pytest
import torch

from torch_utils.rng import BatchRandom
from training.augment import AugmentPipe, _apply_geometric, _rotate, _translate

EDM_AUGMENT = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)

#----------------------------------------------------------------------------

def test_p0_is_identity_with_zero_labels():
    images = torch.randn(8, 3, 16, 16)
    out, labels = AugmentPipe(p=0, **EDM_AUGMENT)(images)
    assert labels.shape == (8, 9) and torch.all(labels == 0)
    torch.testing.assert_close(out, images, rtol=0, atol=1e-4)  # resampled through the identity transform


def test_tiny_p_flips_half_and_nothing_else():
    torch.manual_seed(0)
    images = torch.randn(64, 3, 8, 8)
    out, labels = AugmentPipe(p=1e-6, **EDM_AUGMENT)(images)  # xflip multiplier 1e8: flip with probability 1/2
    flipped = labels[:, 0] == 1
    assert torch.all(labels[:, 1:] == 0) and 16 < int(flipped.sum()) < 48
    expected = torch.where(flipped[:, None, None, None], images.flip(3), images)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)


def test_integer_transforms_are_exact_and_labelled():
    torch.manual_seed(1)
    images = torch.randn(32, 1, 6, 6)
    out, labels = AugmentPipe(p=1, xflip=1, yflip=1, rotate_int=1)(images)
    assert labels.shape == (32, 4)
    for img, o, (fx, fy, r1, r2) in zip(images, out, labels.tolist()):
        ref = img.flip(2) if fx else img
        ref = ref.flip(1) if fy else ref
        k = {(0, 0): 0, (1, 0): 1, (1, 1): 2, (0, 1): 3}[(r1, r2)]
        ref = ref.flip(2) if k in (1, 2) else ref
        ref = ref.flip(1) if k in (2, 3) else ref
        ref = ref.transpose(1, 2) if k in (1, 3) else ref
        assert torch.equal(o, ref)


def test_geometric_resampling_rotates_and_translates():
    y, x = torch.meshgrid(torch.arange(12.0), torch.arange(12.0), indexing='ij')
    smooth = torch.stack([torch.exp(-((x - 3) ** 2 + (y - 7) ** 2) / 8), torch.cos(x * 0.5) * torch.sin(y * 0.3)])[None]
    # A quarter turn: close to rot90 (bilinear resampling of a smooth image), far from the opposite turn.
    rotated = _apply_geometric(smooth, _rotate(torch.tensor([np.pi / 2]), smooth.device))
    assert (rotated - torch.rot90(smooth, k=1, dims=(2, 3))).abs().max() < 0.1
    assert (rotated - torch.rot90(smooth, k=-1, dims=(2, 3))).abs().max() > 0.5
    # An integer translation is exact away from the reflected border, for any content.
    images = torch.randn(1, 2, 12, 12)
    shifted = _apply_geometric(images, _translate(torch.tensor([-2.0]), torch.tensor([0.0]), images.device))
    torch.testing.assert_close(shifted[..., 2:], images[..., :-2], rtol=0, atol=1e-4)


def test_p1_label_statistics():
    torch.manual_seed(2)
    _, labels = AugmentPipe(p=1, **EDM_AUGMENT)(torch.randn(512, 3, 8, 8))
    xflip, yflip, scale, rot_cos, rot_sin = labels[:, :5].T
    assert set(xflip.tolist()) == {0, 1} and set(yflip.tolist()) == {0, 1}
    assert scale.std().item() == pytest.approx(1, abs=0.15)            # log2 scale / scale_std ~ N(0, 1)
    torch.testing.assert_close((rot_cos + 1) ** 2 + rot_sin ** 2, torch.ones(512))
    assert labels[:, 7:].std(dim=0).min() > 0.8                         # translation ~ N(0, 1) per axis


def test_rnd_rows_make_results_independent_of_the_batch_split():
    images = torch.randn(6, 3, 8, 8)
    pipe = AugmentPipe(p=0.7, rotate_int=1, translate_int=1, **EDM_AUGMENT)
    whole, whole_labels = pipe(images, rnd=BatchRandom(5, 6, 0, 6))
    parts = [pipe(images[a:b], rnd=BatchRandom(5, 6, a, b)) for a, b in [(0, 1), (1, 6)]]
    # Same draws and same padding for every image; only kernel blocking (float rounding) may differ.
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), whole, rtol=0, atol=1e-6)
    assert torch.equal(torch.cat([p[1] for p in parts]), whole_labels)


def test_init_kwargs_recorded():
    pipe = AugmentPipe(p=0.12, **EDM_AUGMENT)
    assert pipe.init_kwargs == dict(p=0.12, **EDM_AUGMENT)

#----------------------------------------------------------------------------
# Frequencies of the non-leaky labels against the probabilities: the paper's preset (p = 0.12 for CIFAR-10,
# EDM's multipliers), and distinct multipliers so that no two transforms can be confused.

@pytest.mark.parametrize('p, kwargs', [
    (0.12, EDM_AUGMENT),
    (0.1, dict(xflip=1e8, yflip=1, scale=2, rotate_frac=3, aniso=4, translate_frac=5, aniso_rotate_prob=0.25)),
])
def test_each_transform_fires_with_its_probability_and_only_labelled_images_change(p, kwargs):
    n = 4000
    torch.manual_seed(3)
    images = torch.randn(n, 1, 8, 8)
    out, labels = AugmentPipe(p=p, **kwargs)(images)
    on = labels != 0
    # Columns: xflip, yflip, scale, rotate (cos - 1, sin), aniso (w cos r, w sin r), translate (x, y). Transform T
    # is enabled with probability min(p * multiplier, 1); the flips then toss a fair coin (so xflip, multiplier
    # 1e8, mirrors half of all images), and aniso's sin column also needs its rotation (aniso_rotate_prob).
    q = {k: min(p * v, 1) for k, v in kwargs.items() if k != 'aniso_rotate_prob'}
    r = kwargs.get('aniso_rotate_prob', 0.5)
    expected = torch.tensor([q['xflip'] / 2, q['yflip'] / 2, q['scale'], q['rotate_frac'], q['rotate_frac'],
                             q['aniso'], q['aniso'] * r, q['translate_frac'], q['translate_frac']], dtype=torch.float64)
    tolerance = 5 * (expected * (1 - expected) / n).sqrt()
    freq = on.double().mean(0)
    assert ((freq - expected).abs() < tolerance).all(), (freq, expected)
    # Each gate draws on its own: scale and rotation together with probability q_scale q_rotate.
    both = (on[:, 2] & on[:, 3]).double().mean().item()
    pq = q['scale'] * q['rotate_frac']
    assert both == pytest.approx(pq, abs=5 * math.sqrt(pq * (1 - pq) / n))
    # The labels say exactly what happened: no label -> the image itself; the flip label alone -> its mirror.
    plain = ~on.any(1)
    flip_only = on[:, 0] & ~on[:, 1:].any(1)
    assert plain.sum() > 100 and flip_only.sum() > 100
    torch.testing.assert_close(out[plain], images[plain], rtol=0, atol=1e-4)
    torch.testing.assert_close(out[flip_only], images[flip_only].flip(3), rtol=0, atol=1e-4)
    geometric = on[:, 2:].any(1)
    changed = (out[geometric] - images[geometric].flip(3)).abs().amax((1, 2, 3)) > 1e-3
    changed &= (out[geometric] - images[geometric]).abs().amax((1, 2, 3)) > 1e-3
    assert changed.double().mean() > 0.95  # all but the few with a near-zero draw
