"""Tests for training/inception.py: pytorch-fid's FID Inception (names, shapes, features), TF's bilinear resize,
the uint8 preprocessing, weight files, and the mapping of EDM's pickle tensors."""

import pickle
import sys

import numpy as np
import pytest
import torch

from dnnlib.util import UserError
from training import inception

_torchvision_schemas = []


def import_pytorch_fid():
    """pytorch_fid.inception (a test-only requirement).

    Beside a CPU build of torch, PyPI's torchvision (a CUDA build) cannot load its C++ ops, and its import
    then fails declaring fake kernels for two of them: declaring their schemas first lets it import. Only
    its model classes are used here.
    """
    try:
        import torchvision  # noqa: F401
    except RuntimeError as e:
        if 'torchvision::nms does not exist' not in str(e):
            raise
        for name in [name for name in sys.modules if name.split('.')[0] == 'torchvision']:
            del sys.modules[name]
        lib = torch.library.Library('torchvision', 'DEF')
        for op in ['nms', 'qnms']:
            lib.define(f'{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
        _torchvision_schemas.append(lib)  # the schemas live as long as the library object
        import torchvision  # noqa: F401
    from pytorch_fid import inception as fid_inception
    return fid_inception


@torch.no_grad()
def randomize(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """He-initialised convolutions and non-trivial batch-norm statistics, so features carry signal through 94 layers."""
    gen = torch.Generator().manual_seed(seed)
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            fan_in = module.weight[0].numel()
            module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * np.sqrt(2 / fan_in))
        elif isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.weight.copy_(0.5 + torch.rand(n, generator=gen))
            module.bias.copy_(0.2 * torch.randn(n, generator=gen))
            module.running_mean.copy_(0.2 * torch.randn(n, generator=gen))
            module.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=gen))
        elif isinstance(module, torch.nn.Linear):
            module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * 0.02)
            module.bias.copy_(torch.randn(module.bias.shape, generator=gen))
    return net


@pytest.fixture(scope='module')
def nets(one_thread):
    """Ours with random weights; pytorch-fid's FID Inception (the torchvision model and the feature wrapper) with the same."""
    ours = randomize(inception.InceptionV3())
    fid_inception = import_pytorch_fid()
    urls = []

    def fake_download(url, *args, **kwargs):
        urls.append(url)
        return ours.state_dict()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fid_inception, 'load_state_dict_from_url', fake_download)  # pytorch-fid loads it with strict=True
        model = fid_inception.fid_inception_v3().eval()
        wrapper = fid_inception.InceptionV3([3], resize_input=False, normalize_input=False, use_fid_inception=True).eval()
    assert urls == [inception.FID_WEIGHTS_URL] * 2
    return ours, model, wrapper


def tf_resize_reference(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """tf.image.resize_bilinear(align_corners=False, half_pixel_centers=False) of a CHW array, pixel by pixel from
    TF's formula: source = dst * in / out (float32 arithmetic, as TF's), neighbours floor and floor + 1 (clamped),
    linear in x, then in y."""
    _, in_h, in_w = img.shape
    img = img.astype(np.float64)
    out = np.zeros((img.shape[0], out_h, out_w))
    scale_y, scale_x = np.float32(in_h) / np.float32(out_h), np.float32(in_w) / np.float32(out_w)
    for y in range(out_h):
        sy = np.float32(y) * scale_y
        y0 = int(np.floor(sy))
        y1, ly = min(y0 + 1, in_h - 1), float(sy - np.float32(y0))
        for x in range(out_w):
            sx = np.float32(x) * scale_x
            x0 = int(np.floor(sx))
            x1, lx = min(x0 + 1, in_w - 1), float(sx - np.float32(x0))
            top = img[:, y0, x0] + (img[:, y0, x1] - img[:, y0, x0]) * lx
            bottom = img[:, y1, x0] + (img[:, y1, x1] - img[:, y1, x0]) * lx
            out[:, y, x] = top + (bottom - top) * ly
    return out


def random_uint8(shape, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.RandomState(seed).randint(0, 256, size=shape, dtype=np.uint8))

#----------------------------------------------------------------------------
# The network against pytorch-fid's.

def test_parameter_names_and_shapes_match_pytorch_fid(nets):
    ours, model, wrapper = nets
    theirs = model.state_dict()
    assert list(ours.state_dict()) == list(theirs)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.items()}
    inception.InceptionV3().load_state_dict(theirs, strict=True)
    # The feature wrapper holds every parameter but the classifier's.
    wrapped = sorted(tuple(p.shape) for p in wrapper.parameters())
    assert wrapped == sorted(tuple(p.shape) for name, p in ours.named_parameters() if not name.startswith('fc.'))


@torch.no_grad()
def test_features_match_pytorch_fid(nets):
    ours, _, wrapper = nets
    images = random_uint8([2, 3, 299, 299], seed=1)
    features = ours(images)
    expected = wrapper((images.to(torch.float32) - 128) / 128)[0].reshape(2, -1)
    assert features.shape == (2, inception.FEATURE_DIM) and features.dtype == torch.float32
    assert features.std() > 0.1 * features.abs().mean()  # random weights still give informative features
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@torch.no_grad()
def test_small_images_are_resized_as_tf_and_scaled_as_edm(nets):
    ours, _, wrapper = nets
    images = random_uint8([1, 3, 32, 24], seed=2)
    resized = torch.from_numpy(tf_resize_reference(images[0].numpy(), 299, 299)).to(torch.float32)[None]
    expected = wrapper((resized - 128) / 128)[0].reshape(1, -1)
    torch.testing.assert_close(ours(images), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@torch.no_grad()
def test_grey_images_are_repeated_to_rgb(nets):
    ours, _, _ = nets
    grey = random_uint8([1, 1, 16, 16], seed=3)
    assert torch.equal(ours(grey), ours(grey.repeat(1, 3, 1, 1)))


class Stop(Exception):
    pass


@torch.no_grad()
def test_uint8_images_are_scaled_as_edm():
    net = inception.InceptionV3()
    seen = []

    def capture(module, args):
        seen.append(args[0])
        raise Stop  # the first layer's input is all this test needs
    net.Conv2d_1a_3x3.register_forward_pre_hook(capture)
    images = torch.zeros([1, 3, 299, 299], dtype=torch.uint8)
    images[0, 1], images[0, 2] = 128, 255
    with pytest.raises(Stop):
        net(images)
    assert [seen[0][0, c].unique().tolist() for c in range(3)] == [[-1.0], [0.0], [127 / 128]]
    with pytest.raises(TypeError, match='uint8'):
        net(images.to(torch.float32))

#----------------------------------------------------------------------------
# TF's bilinear resize.

def test_resize_hand_computed_example():
    x = torch.tensor([[0., 4.], [8., 12.]])[None, None]
    # Sources 0, 0.5, 1, 1.5 on both axes; 1.5 clamps its right/lower neighbour to the last pixel.
    expected = [[0, 2, 4, 4], [4, 6, 8, 8], [8, 10, 12, 12], [8, 10, 12, 12]]
    assert inception.resize_bilinear_tf(x, 4, 4)[0, 0].tolist() == expected
    # Half-pixel centers (torch's align_corners=False) would give other values.
    assert torch.nn.functional.interpolate(x, size=(4, 4), mode='bilinear', align_corners=False)[0, 0].tolist() != expected


@pytest.mark.parametrize('shape, size', [((2, 5, 7), (11, 13)), ((1, 9, 8), (4, 3)), ((3, 3, 3), (3, 5)), ((1, 32, 32), (299, 299))])
def test_resize_matches_tf_formula(shape, size):
    img = np.random.RandomState(4).uniform(0, 255, size=shape)
    ours = inception.resize_bilinear_tf(torch.from_numpy(img).to(torch.float32)[None], *size)[0]
    np.testing.assert_allclose(ours.numpy(), tf_resize_reference(img, *size), rtol=0, atol=1e-4)


def test_resize_keeps_299_images():
    x = torch.rand([1, 3, 299, 299])
    assert inception.resize_bilinear_tf(x, 299, 299) is x

#----------------------------------------------------------------------------
# Weight files.

class WritesMarker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, 'w')


def test_load_inception_reads_state_dicts_only(tmp_path):
    state = inception.InceptionV3().state_dict()
    torch.save(state, tmp_path / 'w.pth')
    net = inception.load_inception(str(tmp_path / 'w.pth'))
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    del state['fc.bias']
    torch.save(state, tmp_path / 'partial.pth')
    with pytest.raises(UserError, match=r'does not hold Inception-v3 FID weights.*fc\.bias'):
        inception.load_inception(str(tmp_path / 'partial.pth'))
    marker = tmp_path / 'marker'
    (tmp_path / 'code.pth').write_bytes(pickle.dumps(WritesMarker(str(marker)), protocol=2))
    with pytest.raises(UserError, match='Cannot read Inception weights') as e:
        inception.load_inception(str(tmp_path / 'code.pth'))
    assert not marker.exists() and '\n' not in str(e.value)

#----------------------------------------------------------------------------
# EDM's pickle names its tensors after TF's graph.

def test_tf_scopes_follow_the_tf_graph():
    scopes = inception.tf_scopes(inception.InceptionV3())
    assert len(scopes) == 94 and len(set(scopes.values())) == 94
    expected = {
        'Conv2d_1a_3x3': 'conv', 'Conv2d_4a_3x3': 'conv_4',
        'Mixed_5b.branch1x1': 'mixed/conv', 'Mixed_5b.branch5x5_2': 'mixed/tower/conv_1',
        'Mixed_5d.branch3x3dbl_3': 'mixed_2/tower_1/conv_2', 'Mixed_5c.branch_pool': 'mixed_1/tower_2/conv',
        'Mixed_6a.branch3x3': 'mixed_3/conv', 'Mixed_6a.branch3x3dbl_3': 'mixed_3/tower/conv_2',
        'Mixed_6b.branch7x7_3': 'mixed_4/tower/conv_2', 'Mixed_6e.branch7x7dbl_5': 'mixed_7/tower_1/conv_4',
        'Mixed_7a.branch3x3_2': 'mixed_8/tower/conv_1', 'Mixed_7a.branch7x7x3_4': 'mixed_8/tower_1/conv_3',
        'Mixed_7b.branch3x3_2b': 'mixed_9/tower/mixed/conv_1', 'Mixed_7c.branch3x3dbl_3a': 'mixed_10/tower_1/mixed/conv',
        'Mixed_7c.branch_pool': 'mixed_10/tower_2/conv',
    }
    assert {k: scopes[k] for k in expected} == expected


def edm_tensors(net: inception.InceptionV3) -> dict[str, torch.Tensor]:
    state = net.state_dict()
    out = {'output.weight': state['fc.weight'], 'output.bias': state['fc.bias']}
    for ours, scope in inception.tf_scopes(net).items():
        prefix = 'layers.' + scope.replace('/', '.')
        out.update({prefix + '.weight': state[ours + '.conv.weight'], prefix + '.beta': state[ours + '.bn.bias'],
                    prefix + '.mean': state[ours + '.bn.running_mean'], prefix + '.var': state[ours + '.bn.running_var']})
    return out


def test_state_dict_from_edm_round_trip_and_errors():
    net = randomize(inception.InceptionV3(), seed=6)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.fill_(1)  # TF's batch norm has no scale
    tensors = edm_tensors(net)
    converted = inception.state_dict_from_edm(tensors)
    assert list(converted) == list(net.state_dict())
    assert all(torch.equal(converted[k], v) for k, v in net.state_dict().items())
    flattened = {k.replace('tower.mixed.', 'tower_mixed_').replace('tower_1.mixed.', 'tower_1_mixed_'): v for k, v in tensors.items()}
    assert torch.equal(inception.state_dict_from_edm(flattened)['Mixed_7c.branch3x3_2a.conv.weight'],
                       tensors['layers.mixed_10.tower.mixed.conv.weight'])
    with pytest.raises(UserError, match='no tensor layers.mixed_3.tower.conv_2.beta'):
        inception.state_dict_from_edm({k: v for k, v in tensors.items() if k != 'layers.mixed_3.tower.conv_2.beta'})
    with pytest.raises(UserError, match='unexpected tensors layers.conv.gamma'):
        inception.state_dict_from_edm({**tensors, 'layers.conv.gamma': torch.ones(32)})
    hwio = {**tensors, 'layers.conv_4.weight': tensors['layers.conv_4.weight'].permute(2, 3, 1, 0)}
    with pytest.raises(UserError, match=r'layers.conv_4.weight has shape \[3, 3, 80, 192\]'):
        inception.state_dict_from_edm(hwio)
