"""Tests for training/networks.py: EDM parameter counts and names, preconditioner formulas, shapes, gradients, attention."""

import json
import math

import numpy as np
import pytest
import torch

import dnnlib
from training import networks

#----------------------------------------------------------------------------
# Paper configurations (EDM train.py --arch=ddpmpp / ncsnpp), counted on the meta device.

DDPMPP = dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
              channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, augment_dim=9)
NCSNPP = dict(DDPMPP, embedding_type='fourier', encoder_type='residual', channel_mult_noise=2, resample_filter=[1, 3, 3, 1])


@pytest.mark.parametrize('name, kwargs, expected', [
    ('cifar10-ddpmpp', dict(DDPMPP, img_resolution=32, channel_mult=[2, 2, 2]), 55_733_891),
    ('cifar10-ncsnpp', dict(NCSNPP, img_resolution=32, channel_mult=[2, 2, 2]), 56_397_827),
    ('64x64-ddpmpp', dict(DDPMPP, img_resolution=64, channel_mult=[1, 2, 2, 2]), 61_805_571),
    ('64x64-ncsnpp', dict(NCSNPP, img_resolution=64, channel_mult=[1, 2, 2, 2]), 62_761_091),
    ('cifar10-ddpmpp-cond', dict(DDPMPP, img_resolution=32, channel_mult=[2, 2, 2], label_dim=10), 55_735_299),
])
def test_paper_parameter_counts_and_edm_names(name, kwargs, expected):
    with torch.device('meta'):
        net = networks.EDMPrecond(img_channels=3, **kwargs)
    assert sum(p.numel() for p in net.parameters()) == expected
    keys = set(net.state_dict())
    r = kwargs['img_resolution']
    edm_names = [f'model.map_layer0.weight', 'model.map_augment.weight', f'model.enc.{r}x{r}_conv.weight',
                 f'model.enc.{r // 2}x{r // 2}_down.conv0.resample_filter', f'model.enc.{r // 2}x{r // 2}_down.skip.weight',
                 'model.enc.16x16_block0.qkv.weight', 'model.dec.16x16_block4.proj.bias', f'model.dec.{r}x{r}_aux_norm.weight',
                 f'model.dec.{r}x{r}_aux_conv.weight', f'model.dec.{r // 2}x{r // 2}_up.affine.bias']
    if kwargs['embedding_type'] == 'fourier':
        edm_names += ['model.map_noise.freqs', f'model.enc.{r // 2}x{r // 2}_aux_residual.weight']
    assert not [n for n in edm_names if n not in keys]

#----------------------------------------------------------------------------
# Preconditioners against SPEC section 3, with a fake inner model that records its inputs.

class FakeModel(torch.nn.Module):
    """Records (x, noise_labels, class_labels, augment_labels) and returns a fixed F."""

    def __init__(self, F: torch.Tensor):
        super().__init__()
        self.F = F
        self.calls = []

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        self.calls.append((x, noise_labels, class_labels, augment_labels))
        return self.F


TINY_SONG = dict(model_type='SongUNet', model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[])
TINY_ADM = dict(model_type='DhariwalUNet', model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[])
SIGMAS = torch.tensor([0.002, 0.2, 1.0, 80.0])


def _run_precond(net, out_channels=3):
    """Run net with a fake model at SIGMAS; float64 copies of x, F, D, the model's input and c_noise, and sigma."""
    torch.manual_seed(0)
    x = torch.randn(len(SIGMAS), 3, 8, 8)
    F = torch.randn(len(SIGMAS), out_channels, 8, 8)
    net.model = FakeModel(F)
    D = net(x, SIGMAS)
    x_in, c_noise, _, _ = net.model.calls[-1]
    s = SIGMAS.double().reshape(-1, 1, 1, 1)
    return x.double(), F.double(), D.double(), x_in.double(), c_noise.double(), s


def test_edm_precond_coefficients():
    net = networks.EDMPrecond(img_resolution=8, img_channels=3, sigma_data=0.5, **TINY_SONG)
    x, F, D, x_in, c_noise, s = _run_precond(net)
    sd = 0.5
    c_skip, c_out, c_in = sd ** 2 / (s ** 2 + sd ** 2), s * sd / (s ** 2 + sd ** 2).sqrt(), 1 / (sd ** 2 + s ** 2).sqrt()
    torch.testing.assert_close(x_in, c_in * x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c_noise, s.flatten().log() / 4, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(D, c_skip * x + c_out * F, rtol=1e-5, atol=1e-5)
    assert D.shape == x.shape


def _vp_sigma(t, beta_d=19.9, beta_min=0.1):
    return np.sqrt(np.exp(0.5 * beta_d * t ** 2 + beta_min * t) - 1)


def test_vp_precond_coefficients():
    net = networks.VPPrecond(img_resolution=8, img_channels=3, **TINY_SONG)
    x, F, D, x_in, c_noise, s = _run_precond(net)
    torch.testing.assert_close(x_in, x / (s ** 2 + 1).sqrt(), rtol=1e-5, atol=1e-6)
    # c_noise = (M - 1) t(sigma), t the inverse of sigma(t): solve 0.5 beta_d t^2 + beta_min t = ln(1 + sigma^2).
    rhs = np.log1p(s.flatten().numpy() ** 2)
    t = (np.sqrt(0.1 ** 2 + 2 * 19.9 * rhs) - 0.1) / 19.9
    np.testing.assert_allclose(_vp_sigma(t), s.flatten().numpy(), rtol=1e-9)
    np.testing.assert_allclose(c_noise.numpy(), 999 * t, rtol=1e-4, atol=1e-3)  # float32 inside the network
    torch.testing.assert_close(D, x - s * F, rtol=1e-5, atol=1e-4)
    assert net.sigma_min == pytest.approx(_vp_sigma(1e-5), rel=0.03)  # float32, as in EDM: exp(x) - 1 at x ~ 1e-6
    assert net.sigma_max == pytest.approx(_vp_sigma(1.0), rel=1e-5)


def test_ve_precond_coefficients():
    net = networks.VEPrecond(img_resolution=8, img_channels=3, **TINY_SONG)
    x, F, D, x_in, c_noise, s = _run_precond(net)
    torch.testing.assert_close(x_in, x)
    torch.testing.assert_close(c_noise, (s.flatten() / 2).log(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(D, x + s * F, rtol=1e-5, atol=1e-4)
    assert (net.sigma_min, net.sigma_max) == (0.02, 100)


def test_iddpm_precond_coefficients_and_round_sigma():
    net = networks.iDDPMPrecond(img_resolution=8, img_channels=3, **TINY_ADM)
    M = 1000
    assert net.u.shape == (M + 1,) and net.u[M] == 0 and torch.all(net.u[:-1] > net.u[1:])
    # The network predicts 2 * img_channels; only the first img_channels enter D.
    x, F, D, x_in, c_noise, s = _run_precond(net, out_channels=6)
    j = (s.flatten()[:, None] - net.u.double()[None]).abs().argmin(dim=1)
    torch.testing.assert_close(c_noise, (M - 1 - j).double())
    torch.testing.assert_close(x_in, x / (s ** 2 + 1).sqrt(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(D, x - s * F[:, :3], rtol=1e-5, atol=1e-4)
    rounded = net.round_sigma(torch.tensor([0.5, 3.0]))
    assert all(bool((net.u == r).any()) for r in rounded)
    assert net.sigma_min == float(net.u[M - 1]) and net.sigma_max == float(net.u[0])


def test_class_labels_and_scalar_sigma():
    net = networks.EDMPrecond(img_resolution=8, img_channels=3, label_dim=4, **TINY_SONG)
    net.model = FakeModel(torch.zeros(2, 3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    net(x, 0.7)
    _, c_noise, labels, augment = net.model.calls[-1]
    assert torch.equal(labels, torch.zeros(1, 4)) and augment is None   # no labels given: zeros, as at sampling
    assert c_noise.shape == (2,)                                         # scalar sigma broadcast to the batch
    aug = torch.ones(2, 9)
    net(x, torch.tensor([0.1, 0.2]), torch.eye(4)[[1, 3]], augment_labels=aug)
    _, _, labels, augment = net.model.calls[-1]
    assert torch.equal(labels, torch.eye(4)[[1, 3]]) and augment is aug

#----------------------------------------------------------------------------
# Real tiny networks: shapes, gradients, init_kwargs, autocast.

ARCHS = {
    'ddpmpp': (networks.EDMPrecond, dict(model_type='SongUNet', model_channels=16, channel_mult=[1, 2], num_blocks=1,
                                         attn_resolutions=[4], augment_dim=9, dropout=0.1)),
    'ncsnpp': (networks.EDMPrecond, dict(model_type='SongUNet', model_channels=16, channel_mult=[1, 2], num_blocks=1,
                                         attn_resolutions=[4], embedding_type='fourier', encoder_type='residual',
                                         channel_mult_noise=2, resample_filter=[1, 3, 3, 1], label_dim=3, augment_dim=9)),
    'song-skip': (networks.VEPrecond, dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                                          encoder_type='skip', decoder_type='skip')),
    'adm': (networks.iDDPMPrecond, dict(model_channels=64, channel_mult=[1, 1], num_blocks=1, attn_resolutions=[4],
                                        label_dim=3, augment_dim=9)),
    'vp-adm': (networks.VPPrecond, dict(model_type='DhariwalUNet', model_channels=16, channel_mult=[1, 2], num_blocks=1,
                                        attn_resolutions=[4])),
}


def _randomize(net):
    """Replace zero/tiny initialisations so every parameter influences the output."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return net


@pytest.mark.parametrize('arch', list(ARCHS))
def test_shapes_and_gradients_reach_every_parameter(arch):
    cls, kwargs = ARCHS[arch]
    net = _randomize(cls(img_resolution=8, img_channels=3, **kwargs)).train()
    x = torch.randn(2, 3, 8, 8)
    labels = torch.eye(3)[[0, 2]] if kwargs.get('label_dim') else None
    augment = torch.randn(2, 9) if kwargs.get('augment_dim') else None
    D = net(x, torch.tensor([0.3, 5.0]), labels, augment_labels=augment)
    assert D.shape == x.shape and D.dtype == torch.float32 and torch.isfinite(D).all()
    D.square().sum().backward()
    dead = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead


def test_init_kwargs_rebuild_the_same_network():
    cls, kwargs = ARCHS['ncsnpp']
    net = cls(8, 3, **kwargs)  # positional arguments are recorded by name
    assert net.init_kwargs['img_resolution'] == 8 and net.init_kwargs['img_channels'] == 3
    init_kwargs = json.loads(json.dumps(net.init_kwargs))
    twin = cls(**init_kwargs)
    assert {k: v.shape for k, v in twin.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}
    twin.load_state_dict(net.state_dict())
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(twin.eval()(x, torch.tensor([1.0, 2.0])), net.eval()(x, torch.tensor([1.0, 2.0])))


def test_bad_arguments_are_user_errors():
    with pytest.raises(dnnlib.UserError, match='model_type'):
        networks.EDMPrecond(img_resolution=8, img_channels=3, model_type='Transformer')
    with pytest.raises(dnnlib.UserError, match='embedding_type'):
        networks.EDMPrecond(img_resolution=8, img_channels=3, model_type='SongUNet', embedding_type='learned')


def test_autocast_bf16_forward_matches_fp32():
    cls, kwargs = ARCHS['ddpmpp']
    net = _randomize(cls(img_resolution=8, img_channels=3, **kwargs)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(0.5)
    x = torch.randn(2, 3, 8, 8)
    sigma = torch.tensor([0.5, 2.0])
    ref = net(x, sigma)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = net(x, sigma)
    assert out.dtype == torch.float32
    rel = (out - ref).norm() / ref.norm()
    assert 0 < rel < 0.05

#----------------------------------------------------------------------------
# Attention: the fused kernel computes EDM's softmax(q^T k / sqrt(c)) v, with EDM's qkv channel layout.

def test_attention_matches_edm_math():
    torch.manual_seed(0)
    block = networks.UNetBlock(in_channels=16, out_channels=16, emb_channels=8, attention=True, num_heads=2).double()
    _randomize(block)
    x, emb = torch.randn(2, 16, 4, 4, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
    out = block(x, emb)

    heads, block.num_heads = block.num_heads, 0
    h = block(x, emb)  # the block up to (not including) attention
    block.num_heads = heads
    N, C, H, W = h.shape
    q, k, v = block.qkv(block.norm2(h)).reshape(N * heads, C // heads, 3, H * W).unbind(2)
    w = torch.einsum('ncq,nck->nqk', q, k / math.sqrt(C // heads)).softmax(dim=2)
    a = torch.einsum('nqk,nck->ncq', w, v).reshape(N, C, H, W)
    ref = (block.proj(a) + h) * block.skip_scale
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)

#----------------------------------------------------------------------------


@pytest.mark.parametrize('resample_filter', [[1, 1], [1, 3, 3, 1]])
@pytest.mark.parametrize('kernel', [1, 3])
def test_fused_upsampling_gives_the_unfused_shape_and_interior(resample_filter, kernel):
    # EDM's fused up-sampling conv: 8x8 -> 16x16 as the unfused path, the same values away from the border.
    torch.manual_seed(0)
    fused = networks.Conv2d(4, 5, kernel=kernel, up=True, resample_filter=resample_filter, fused_resample=True)
    plain = networks.Conv2d(4, 5, kernel=kernel, up=True, resample_filter=resample_filter)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 4, 8, 8)
    a, b = fused(x), plain(x)
    assert a.shape == b.shape == (2, 5, 16, 16)
    torch.testing.assert_close(a[..., 2:-2, 2:-2], b[..., 2:-2, 2:-2], rtol=0, atol=1e-6)
