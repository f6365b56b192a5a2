"""Inception-v3 for FID, code-free: TF's 2015-12-05 graph as EDM's pickle runs it, weights from a plain state dict."""

from typing import Mapping

import torch
import torch.nn.functional as F

import dnnlib
from dnnlib.util import UserError
from torch_utils import distributed

# pytorch-fid's port of TF's 2015-12-05 weights; its parameter names are torchvision's Inception3 names.
FID_WEIGHTS_URL = 'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth'
FEATURE_DIM = 2048
RESOLUTION = 299

#----------------------------------------------------------------------------
# Preprocessing, as in EDM's pickle.

def resize_bilinear_tf(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """tf.image.resize_bilinear of float NCHW images (align_corners=False, no half-pixel centers).

    Output pixel i samples the input at i * (in / out), computed in float32 as TF does; the neighbour
    past the last row or column is clamped to it.
    """
    def taps(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scale = torch.tensor(n_in / n_out, dtype=torch.float32)
        src = torch.arange(n_out, dtype=torch.float32) * scale
        lo = src.floor()
        frac = (src - lo).to(x.device, x.dtype)
        lo = lo.long().clamp(max=n_in - 1).to(x.device)
        return lo, (lo + 1).clamp(max=n_in - 1), frac

    if tuple(x.shape[2:]) == (height, width):
        return x
    y0, y1, fy = taps(x.shape[2], height)
    x0, x1, fx = taps(x.shape[3], width)
    left, right = x[:, :, :, x0], x[:, :, :, x1]
    rows = left + (right - left) * fx
    top, bottom = rows[:, :, y0], rows[:, :, y1]
    return top + (bottom - top) * fy[:, None]

#----------------------------------------------------------------------------
# Layers and blocks. Attribute names are torchvision's (so pytorch-fid's state dict loads strictly);
# TF_SCOPES name each convolution's scope in the TF graph (EDM's pickle names its tensors after it).

class ConvBN(torch.nn.Module):
    """Convolution without bias, batch norm (TF's epsilon 1e-3), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = torch.nn.BatchNorm2d(out_channels, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def chain(x: torch.Tensor, *layers: torch.nn.Module) -> torch.Tensor:
    for layer in layers:
        x = layer(x)
    return x


def avg_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    # TF's SAME average pooling divides by the number of pixels inside the image, not 9.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class BlockA(torch.nn.Module):
    """Mixed_5b-d (35x35): 1x1 | 1x1, 5x5 | 1x1, 3x3, 3x3 | avg pool, 1x1."""
    TF_SCOPES = dict(branch1x1='conv', branch5x5_1='tower/conv', branch5x5_2='tower/conv_1',
                     branch3x3dbl_1='tower_1/conv', branch3x3dbl_2='tower_1/conv_1', branch3x3dbl_3='tower_1/conv_2',
                     branch_pool='tower_2/conv')

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(in_channels, 64, 1)
        self.branch5x5_1 = ConvBN(in_channels, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(in_channels, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1x1(x), chain(x, self.branch5x5_1, self.branch5x5_2),
                          chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          self.branch_pool(avg_pool_3x3(x))], dim=1)


class BlockB(torch.nn.Module):
    """Mixed_6a (35x35 -> 17x17): 3x3 stride 2 | 1x1, 3x3, 3x3 stride 2 | max pool stride 2."""
    TF_SCOPES = dict(branch3x3='conv', branch3x3dbl_1='tower/conv', branch3x3dbl_2='tower/conv_1',
                     branch3x3dbl_3='tower/conv_2')

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = ConvBN(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch3x3(x), chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          F.max_pool2d(x, kernel_size=3, stride=2)], dim=1)


class BlockC(torch.nn.Module):
    """Mixed_6b-e (17x17), 7x7 factorised into 1x7 and 7x1: 1x1 | 1x1, 1x7, 7x1 | 1x1, 7x1, 1x7, 7x1, 1x7 | avg pool, 1x1."""
    TF_SCOPES = dict(branch1x1='conv', branch7x7_1='tower/conv', branch7x7_2='tower/conv_1', branch7x7_3='tower/conv_2',
                     **{f'branch7x7dbl_{i + 1}': 'tower_1/conv' + (f'_{i}' if i else '') for i in range(5)},
                     branch_pool='tower_2/conv')

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = ConvBN(in_channels, 192, 1)
        self.branch7x7_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1x1(x), chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
                          chain(x, self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                                self.branch7x7dbl_5),
                          self.branch_pool(avg_pool_3x3(x))], dim=1)


class BlockD(torch.nn.Module):
    """Mixed_7a (17x17 -> 8x8): 1x1, 3x3 stride 2 | 1x1, 1x7, 7x1, 3x3 stride 2 | max pool stride 2."""
    TF_SCOPES = dict(branch3x3_1='tower/conv', branch3x3_2='tower/conv_1',
                     **{f'branch7x7x3_{i + 1}': 'tower_1/conv' + (f'_{i}' if i else '') for i in range(4)})

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(in_channels, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(in_channels, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([chain(x, self.branch3x3_1, self.branch3x3_2),
                          chain(x, self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4),
                          F.max_pool2d(x, kernel_size=3, stride=2)], dim=1)


class BlockE(torch.nn.Module):
    """Mixed_7b-c (8x8): 1x1 | 1x1, (1x3 and 3x1) | 1x1, 3x3, (1x3 and 3x1) | pool, 1x1.

    The FID graph pools by average in Mixed_7b but by max in Mixed_7c (pool='max').
    """
    TF_SCOPES = dict(branch1x1='conv', branch3x3_1='tower/conv', branch3x3_2a='tower/mixed/conv',
                     branch3x3_2b='tower/mixed/conv_1', branch3x3dbl_1='tower_1/conv', branch3x3dbl_2='tower_1/conv_1',
                     branch3x3dbl_3a='tower_1/mixed/conv', branch3x3dbl_3b='tower_1/mixed/conv_1',
                     branch_pool='tower_2/conv')

    def __init__(self, in_channels: int, pool: str = 'avg'):
        super().__init__()
        assert pool in ('avg', 'max')
        self.pool = pool
        self.branch1x1 = ConvBN(in_channels, 320, 1)
        self.branch3x3_1 = ConvBN(in_channels, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(in_channels, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_1(x)
        b = chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2)
        pooled = avg_pool_3x3(x) if self.pool == 'avg' else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a), self.branch3x3dbl_3a(b),
                          self.branch3x3dbl_3b(b), self.branch_pool(pooled)], dim=1)

#----------------------------------------------------------------------------

class InceptionV3(torch.nn.Module):
    """net(uint8 NCHW images, any size, 1 or 3 channels) -> [N, 2048] float32 pool features, as EDM's pickle computes them."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = BlockA(192, pool_features=32)
        self.Mixed_5c = BlockA(256, pool_features=64)
        self.Mixed_5d = BlockA(288, pool_features=64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, channels_7x7=128)
        self.Mixed_6c = BlockC(768, channels_7x7=160)
        self.Mixed_6d = BlockC(768, channels_7x7=160)
        self.Mixed_6e = BlockC(768, channels_7x7=192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, pool='avg')
        self.Mixed_7c = BlockE(2048, pool='max')
        self.fc = torch.nn.Linear(FEATURE_DIM, 1008)  # TF's classifier: unused for FID, part of the published weights
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f'InceptionV3 expects uint8 images, got {images.dtype}')
        x = images.to(torch.float32)
        if x.shape[1] == 1:
            x = x.repeat([1, 3, 1, 1])
        x = (resize_bilinear_tf(x, RESOLUTION, RESOLUTION) - 128) / 128
        x = chain(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = chain(x, self.Conv2d_3b_1x1, self.Conv2d_4a_3x3)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = chain(x, self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                  self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c)
        return x.mean([2, 3])


def load_inception(path_or_url: str = FID_WEIGHTS_URL, device: torch.device | str = 'cpu') -> InceptionV3:
    """InceptionV3 with weights from a state dict file or URL (read with weights_only=True: no code runs), in eval mode."""
    try:
        with dnnlib.util.open_url(path_or_url, verbose=distributed.is_main()) as f:
            state = torch.load(f, map_location='cpu', weights_only=True)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f'Cannot read Inception weights {path_or_url}: {type(e).__name__}: {" ".join(str(e).split())[:200]}')
    net = InceptionV3()
    try:
        net.load_state_dict(state, strict=True)
    except Exception as e:
        raise UserError(f'{path_or_url} does not hold Inception-v3 FID weights: {" ".join(str(e).split())[:300]}')
    return net.requires_grad_(False).to(device)

#----------------------------------------------------------------------------
# Converting the tensors of EDM's pickle: its convolution in TF scope S holds layers.S.{weight, beta, mean, var}
# (S with '/' as '.'; no batch-norm scale: TF's graph has none), its classifier output.{weight, bias}.

STEM_SCOPES = dict(Conv2d_1a_3x3='conv', Conv2d_2a_3x3='conv_1', Conv2d_2b_3x3='conv_2', Conv2d_3b_1x1='conv_3',
                   Conv2d_4a_3x3='conv_4')
BLOCK_SCOPES = dict(Mixed_5b='mixed', Mixed_5c='mixed_1', Mixed_5d='mixed_2', Mixed_6a='mixed_3', Mixed_6b='mixed_4',
                    Mixed_6c='mixed_5', Mixed_6d='mixed_6', Mixed_6e='mixed_7', Mixed_7a='mixed_8', Mixed_7b='mixed_9',
                    Mixed_7c='mixed_10')


def tf_scopes(net: InceptionV3) -> dict[str, str]:
    """Our name of every ConvBN -> its scope in TF's graph, e.g. 'Mixed_7b.branch3x3_2a' -> 'mixed_9/tower/mixed/conv'."""
    scopes = {}
    for name, module in net.named_modules():
        if isinstance(module, ConvBN):
            block, _, branch = name.rpartition('.')
            scopes[name] = STEM_SCOPES[name] if not block else \
                f'{BLOCK_SCOPES[block]}/{type(net.get_submodule(block)).TF_SCOPES[branch]}'
    return scopes


def state_dict_from_edm(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict from the named parameters and buffers of EDM's Inception pickle.

    Names compare with '.' and '_' as the same separator (exports flatten nested scopes either way);
    a missing, unused or misshapen tensor is a UserError.
    """
    source = {}
    for name, tensor in tensors.items():
        key = name.replace('.', '_')
        if key in source:
            raise UserError(f'EDM Inception pickle: tensor names {name!r} and another one collide')
        source[key] = (name, tensor)
    net = InceptionV3()
    out = net.state_dict()
    wanted = {'fc.weight': 'output.weight', 'fc.bias': 'output.bias'}
    for ours, scope in tf_scopes(net).items():
        prefix = 'layers.' + scope.replace('/', '.')
        wanted.update({f'{ours}.conv.weight': f'{prefix}.weight', f'{ours}.bn.bias': f'{prefix}.beta',
                       f'{ours}.bn.running_mean': f'{prefix}.mean', f'{ours}.bn.running_var': f'{prefix}.var'})
    missing = [theirs for theirs in wanted.values() if theirs.replace('.', '_') not in source]
    if missing:
        raise UserError(f'EDM Inception pickle: no tensor {missing[0]} ({len(missing)} of {len(wanted)} missing; '
                        f'it holds e.g. {", ".join(list(tensors)[:3])})')
    for ours, theirs in wanted.items():
        name, tensor = source.pop(theirs.replace('.', '_'))
        if tensor.shape != out[ours].shape:
            raise UserError(f'EDM Inception pickle: {name} has shape {list(tensor.shape)}, expected {list(out[ours].shape)}')
        out[ours] = tensor.detach().to('cpu', torch.float32).clone()
    if source:
        raise UserError(f'EDM Inception pickle: unexpected tensors {", ".join(name for name, _ in list(source.values())[:5])}')
    return out
