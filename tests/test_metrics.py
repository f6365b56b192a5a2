"""Tests for training/metrics.py and fid.py: statistics, the Frechet distance, detectors, references, CLI errors."""

import os
import pickle

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import fid
from tests.test_generation import bad, run_bad_case  # noqa: F401 - bad is a fixture
from torch_utils import persistence
from training import metrics


class ChannelMomentsDetector:
    """A picklable toy detector: per-channel mean and mean square of the pixels (feature_dim 2C)."""

    def to(self, device):
        return self

    def __call__(self, images, return_features=False):
        assert return_features and images.dtype == torch.uint8
        x = images.to(torch.float32) / 255
        return torch.cat([x.mean([2, 3]), x.square().mean([2, 3])], dim=1)


PERSISTENT_SRC = '''
import torch
from torch_utils import persistence

@persistence.persistent_class
class ScaledMean(torch.nn.Module):
    def forward(self, images, return_features=False):
        return images.to(torch.float32).mean([2, 3]) * self.scale
'''


class PersistentPickle:
    """Pickles like an object of EDM's persistent classes: embedded module source plus state."""

    def __reduce__(self):
        module = torch.nn.Module()
        module.scale = torch.nn.Parameter(torch.tensor(2.0))
        meta = dict(type='class', version=6, module_src=PERSISTENT_SRC, class_name='ScaledMean', state=dict(module.__dict__))
        return persistence._reconstruct_persistent_obj, (meta,)


def write_pngs(path, images: np.ndarray) -> None:
    os.makedirs(path, exist_ok=True)
    for i, img in enumerate(images):
        PIL.Image.fromarray(img.transpose(1, 2, 0)).save(os.path.join(path, f'{i:06d}.png'))


def random_images(n: int, seed: int, shape=(3, 4, 4)) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, size=(n, *shape), dtype=np.uint8)


def invoke(args):
    result = CliRunner().invoke(fid.main, args)
    return result, result.output.strip().splitlines()

#----------------------------------------------------------------------------

def test_feature_stats_match_numpy():
    feats = np.random.RandomState(0).randn(301, 5) * [1, 2, 3, 4, 5] + 7
    stats = metrics.FeatureStats(5)
    for chunk in np.array_split(feats, 4):
        stats.append(torch.from_numpy(chunk).to(torch.float32))
    stats = stats.all_reduce()
    mu, sigma = stats.mean_cov()
    f32 = feats.astype(np.float32).astype(np.float64)
    assert stats.num == 301
    np.testing.assert_allclose(mu, f32.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f32, rowvar=False), rtol=1e-9, atol=1e-9)


def test_frechet_distance_closed_form():
    rng = np.random.RandomState(1)
    a, b = rng.randn(6, 6), rng.randn(6, 6)
    s1, s2 = a @ a.T + np.eye(6), b @ b.T + 0.5 * np.eye(6)
    m1, m2 = rng.randn(6), rng.randn(6)
    # Tr sqrtm(S1 S2) = sum of sqrt eigenvalues of S1^1/2 S2 S1^1/2, a symmetric route to the same value.
    w, v = np.linalg.eigh(s1)
    r1 = v @ np.diag(np.sqrt(w)) @ v.T
    expected = np.square(m1 - m2).sum() + np.trace(s1 + s2) - 2 * np.sqrt(np.linalg.eigvalsh(r1 @ s2 @ r1)).sum()
    assert metrics.frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-10)
    assert metrics.frechet_distance(m1, s1, m1, s1) == pytest.approx(0, abs=1e-9)
    with pytest.raises(metrics.UserError):
        metrics.frechet_distance(m1, s1, m2[:5], s2[:5, :5])


def test_fid_between_gaussian_samples_matches_closed_form():
    rng = np.random.RandomState(2)
    m1, m2 = np.array([0, 0, 0, 0.]), np.array([1, 0, -0.5, 0.])
    d1, d2 = np.array([1, 2, 0.5, 1]), np.array([2, 1, 0.5, 3])
    expected = np.square(m1 - m2).sum() + (d1 + d2 - 2 * np.sqrt(d1 * d2)).sum()
    fids = []
    for m, d in [(m1, d1), (m2, d2)]:
        stats = metrics.FeatureStats(4)
        stats.append(torch.from_numpy(m + rng.randn(40000, 4) * np.sqrt(d)))
        fids.append(stats.mean_cov())
    value = metrics.frechet_distance(*fids[0], *fids[1])
    assert value == pytest.approx(expected, abs=0.03)
    assert abs(expected - 1.25) > 0.2  # the covariance term matters, not only the means


def test_fid_of_a_set_against_itself_is_zero():
    images = torch.from_numpy(random_images(400, 3))
    det = metrics.load_detector('pixels', 'cpu', image_shape=[3, 4, 4])
    assert det.feature_dim == 48
    stats = metrics.compute_feature_stats(images.split(64), det)
    mu, sigma = stats.mean_cov()
    assert metrics.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-8)
    other = metrics.compute_feature_stats([torch.from_numpy(random_images(400, 4)) // 2], det)
    assert metrics.frechet_distance(mu, sigma, *other.mean_cov()) > 1


def test_unstable_square_root_warns():
    rng = np.random.RandomState(5)
    f1, f2 = rng.randn(3, 32), rng.randn(3, 32)  # 3 samples in 32 dimensions: singular covariances
    with pytest.warns(RuntimeWarning, match='FID is numerically unreliable'):
        metrics.frechet_distance(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))

#----------------------------------------------------------------------------
# Detectors.

def test_detector_pickles_written_here_are_loaded_and_used(tmp_path):
    images = torch.from_numpy(random_images(5, 6))
    path = tmp_path / 'moments.pkl'
    path.write_bytes(pickle.dumps(ChannelMomentsDetector()))
    det = metrics.load_detector(str(path), 'cpu')
    assert det.name == 'moments.pkl' and det.feature_dim == 6
    torch.testing.assert_close(det(images), ChannelMomentsDetector()(images, return_features=True))
    # EDM's persistent-class format: the embedded source runs and the state is restored.
    path = tmp_path / 'persistent.pkl'
    path.write_bytes(pickle.dumps(PersistentPickle()))
    det = metrics.load_detector(str(path), 'cpu', image_shape=[3, 4, 4])
    assert det.feature_dim == 3
    torch.testing.assert_close(det(images), images.to(torch.float32).mean([2, 3]) * 2)
    grey = images[:, :1]
    torch.testing.assert_close(det(grey), grey.to(torch.float32).mean([2, 3]).repeat(1, 3) * 2)


def test_pixels_detector_features():
    images = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    det = metrics.load_detector('pixels', 'cpu', image_shape=[1, 1, 2])
    assert det(images).tolist() == [[-1.0, 1.0]]

#----------------------------------------------------------------------------
# fid.py.

def test_ref_and_calc_cli(tmp_path):
    write_pngs(tmp_path / 'a', random_images(60, 7))
    write_pngs(tmp_path / 'b', random_images(60, 8) // 2)
    ref = str(tmp_path / 'ref.npz')
    result, lines = invoke(['ref', f'--data={tmp_path / "a"}', f'--dest={ref}', '--detector=pixels', '--workers=0'])
    assert result.exit_code == 0, result.output
    data = np.load(ref)
    assert str(data['detector']) == 'pixels' and int(data['feature_dim']) == 48 and int(data['num_images']) == 60
    result, lines = invoke(['calc', f'--images={tmp_path / "a"}', f'--ref={ref}', '--num=60', '--workers=0'])
    assert result.exit_code == 0, result.output
    assert abs(float(lines[-1])) < 1e-6  # detector taken from the reference file
    result, lines = invoke(['calc', f'--images={tmp_path / "b"}', f'--ref={ref}', '--num=50', '--workers=0'])
    assert result.exit_code == 0 and float(lines[-1]) > 1
    # A detector pickle by path, end to end.
    det = tmp_path / 'moments.pkl'
    det.write_bytes(pickle.dumps(ChannelMomentsDetector()))
    result, _ = invoke(['ref', f'--data={tmp_path / "a"}', f'--dest={tmp_path / "m.npz"}', f'--detector={det}', '--workers=0'])
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / 'm.npz')['mu'].shape == (6,)


def assert_one_line_error(result, lines, match):
    assert result.exit_code == 1, result.output
    assert lines[-1].startswith('Error:') and match in lines[-1], result.output
    assert 'Traceback' not in result.output


def test_cli_bad_input(tmp_path):
    write_pngs(tmp_path / 'a', random_images(10, 9))
    ref = str(tmp_path / 'ref.npz')
    assert invoke(['ref', f'--data={tmp_path / "a"}', f'--dest={ref}', '--detector=pixels', '--workers=0'])[0].exit_code == 0
    assert_one_line_error(*invoke(['calc', f'--images={tmp_path / "missing"}', f'--ref={ref}']), 'No such file')
    assert_one_line_error(*invoke(['calc', f'--images={tmp_path / "a"}', f'--ref={ref}', '--num=11']), 'fewer than the 11')
    bad = str(tmp_path / 'bad.npz')
    np.savez(bad, mu=np.zeros(3), sigma=np.eye(4))
    assert_one_line_error(*invoke(['calc', f'--images={tmp_path / "a"}', f'--ref={bad}', '--num=10', '--detector=pixels']), 'expected [D] and [D, D]')
    wrong_dim = str(tmp_path / 'wrong_dim.npz')
    np.savez(wrong_dim, mu=np.zeros(3), sigma=np.eye(3))
    assert_one_line_error(*invoke(['calc', f'--images={tmp_path / "a"}', f'--ref={wrong_dim}', '--num=10', '--detector=pixels']), '3-d statistics')
    assert_one_line_error(*invoke(['calc', f'--images={tmp_path / "a"}', f'--ref={ref}', '--num=10', '--detector=dinov2x']), 'No detector')
    corrupt = tmp_path / 'corrupt.pkl'
    corrupt.write_bytes(pickle.dumps(ChannelMomentsDetector())[:-9])
    assert_one_line_error(*invoke(['ref', f'--data={tmp_path / "a"}', f'--dest={ref}', f'--detector={corrupt}']), 'Cannot load detector')
    not_ref = tmp_path / 'not_ref.npz'
    not_ref.write_bytes(b'garbage')
    assert_one_line_error(*invoke(['calc', f'--images={tmp_path / "a"}', f'--ref={not_ref}', '--num=10']), 'is not a .npz file of reference')

#----------------------------------------------------------------------------

def test_statistics_do_not_depend_on_world_size(tmp_path, torchrun):
    write_pngs(tmp_path / 'a', random_images(37, 10))
    torchrun(['fid.py', 'ref', f'--data={tmp_path / "a"}', f'--dest={tmp_path / "two.npz"}', '--detector=pixels',
              '--batch=4', '--workers=0'])
    result, _ = invoke(['ref', f'--data={tmp_path / "a"}', f'--dest={tmp_path / "one.npz"}', '--detector=pixels', '--batch=16', '--workers=0'])
    assert result.exit_code == 0, result.output
    one, two = np.load(tmp_path / 'one.npz'), np.load(tmp_path / 'two.npz')
    assert int(two['num_images']) == 37
    np.testing.assert_allclose(two['mu'], one['mu'], rtol=1e-13)
    np.testing.assert_allclose(two['sigma'], one['sigma'], rtol=1e-10, atol=1e-13)


def test_fid_gen_cli_min_and_mean(tmp_path):
    import generate
    from tests.test_generation import tiny_snapshot
    net = tiny_snapshot(str(tmp_path / 'net.pt'), img_channels=1)
    images = str(tmp_path / 'images')
    assert CliRunner().invoke(generate.main, [f'--network={net}', f'--outdir={images}', '--seeds=0-79', '--steps=4']).exit_code == 0
    ref = str(tmp_path / 'ref.npz')
    assert invoke(['ref', f'--data={images}', f'--dest={ref}', '--detector=pixels', '--workers=0'])[0].exit_code == 0
    result, lines = invoke(['gen', f'--network={net}', f'--ref={ref}', '--num=80', '--repeats=2', '--steps=4'])
    assert result.exit_code == 0, result.output
    fids = [float(line.split('FID ')[1]) for line in lines if line.startswith('seeds ')]
    assert fids[0] == pytest.approx(0, abs=1e-6) and fids[1] > 1e-3  # set 0 is the reference's own seeds 0-79
    words = lines[-1].split()
    assert words[:2] == ['FID', 'min'] and float(words[2]) == min(fids) and words[3] == 'mean'
    assert float(words[4]) == pytest.approx(np.mean(fids), rel=1e-4)
    assert 'only load files you trust' in ' '.join(invoke(['gen', '--help'])[0].output.split())


def test_network_fids_sample_with_the_fast_path_and_fp32_features(tmp_path, monkeypatch):
    """calc_network_fids runs the network under bf16 autocast when asked, never the detector."""
    from tests.test_generation import ToyDenoiser
    from torch_utils import perf
    monkeypatch.setattr(perf, 'device_has_bf16', lambda device: True)
    net = ToyDenoiser(img_resolution=4)
    ref = str(tmp_path / 'ref.npz')
    write_pngs(tmp_path / 'a', random_images(8, 0))
    metrics.make_ref(str(tmp_path / 'a'), ref, detector='pixels')
    autocast_in = {'net': set(), 'detector': set()}
    net.register_forward_hook(lambda module, args, out: autocast_in['net'].add(torch.is_autocast_enabled('cpu')))

    class Spy(metrics.PixelsDetector):
        def __call__(self, images):
            autocast_in['detector'].add(torch.is_autocast_enabled('cpu'))
            return super().__call__(images)
    monkeypatch.setattr(metrics, 'load_detector', lambda name, device, image_shape: Spy(image_shape, device))
    fids = {}
    for precision in ['fp32', 'bf16']:
        fids[precision] = metrics.calc_network_fids(net, ref, num=8, repeats=1, detector='pixels', batch_size=4,
                                                    sampler_kwargs=dict(num_steps=3), precision=precision, channels_last=True)
    assert autocast_in == {'net': {False, True}, 'detector': {False}}
    assert fids['bf16'][0] == pytest.approx(fids['fp32'][0], rel=0.05)


class WritesMarker:
    """Unpickling it creates a file: stands for a pickle that runs code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, 'w')


def test_a_reference_never_selects_a_detector_file(tmp_path):
    """A reference's detector field names only built-in detectors; a path or URL there is refused, never loaded."""
    from tests.test_generation import tiny_snapshot
    marker = tmp_path / 'marker'
    evil = tmp_path / 'evil.pkl'
    evil.write_bytes(pickle.dumps(WritesMarker(str(marker))))
    write_pngs(tmp_path / 'a', random_images(10, 11))
    net = tiny_snapshot(str(tmp_path / 'net.pt'), img_channels=3)
    for named in [str(evil), 'evil.pkl', 'https://example.com/evil.pkl']:
        ref = str(tmp_path / 'ref.npz')
        np.savez(ref, mu=np.zeros(48), sigma=np.eye(48), detector=np.array(named))
        for args in [['calc', f'--images={tmp_path / "a"}', f'--ref={ref}', '--num=10', '--workers=0'],
                     ['gen', f'--network={net}', f'--ref={ref}', '--num=4', '--repeats=1', '--steps=2']]:
            result, lines = invoke(args)
            assert_one_line_error(result, lines, f'names detector {named!r}')
            assert f'pass --detector={named} explicitly' in lines[-1]
            assert not marker.exists()

#----------------------------------------------------------------------------
# EDM's torch_utils for code embedded in pickles; our Inception against EDM's pickle.

EDM_IMPORTS_SRC = '''
import torch
import torch_utils.ops.bias_act
from torch_utils import misc, persistence
from torch_utils.ops import conv2d_gradfix

@misc.profiled_function
def features(x, weight, bias):
    with misc.suppress_tracer_warnings(), conv2d_gradfix.no_weight_gradients():
        x = conv2d_gradfix.conv2d(x, weight)
    return torch_utils.ops.bias_act.bias_act(x, bias, act='lrelu', clamp=0.5)

@persistence.persistent_class
class ConvFeatures(torch.nn.Module):
    def forward(self, images, return_features=False):
        return features(images.to(torch.float32) / 255, self.weight, self.bias).mean([2, 3])
'''


EDM_IMPORTS_WEIGHT = torch.tensor([[1.0, -2.0, 0.5], [0.25, 0.5, 1.0]]).reshape(2, 3, 1, 1)
EDM_IMPORTS_BIAS = torch.tensor([-0.1, 0.2])


class EDMImportsPickle:
    """A persistent-class pickle whose code imports what StyleGAN-era torch_utils offers (misc extras, ops)."""

    def __reduce__(self):
        module = torch.nn.Module()
        module.weight = torch.nn.Parameter(EDM_IMPORTS_WEIGHT.clone())
        module.bias = torch.nn.Parameter(EDM_IMPORTS_BIAS.clone())
        meta = dict(type='class', version=6, module_src=EDM_IMPORTS_SRC, class_name='ConvFeatures', state=dict(module.__dict__))
        return persistence._reconstruct_persistent_obj, (meta,)


def test_embedded_code_finds_edm_torch_utils(tmp_path):
    path = tmp_path / 'edm_imports.pkl'
    path.write_bytes(pickle.dumps(EDMImportsPickle()))
    det = metrics.load_detector(str(path), 'cpu', image_shape=[3, 4, 4])
    images = torch.from_numpy(random_images(3, 12))
    x = torch.nn.functional.conv2d(images.to(torch.float32) / 255, EDM_IMPORTS_WEIGHT) + EDM_IMPORTS_BIAS.reshape(1, 2, 1, 1)
    x = torch.nn.functional.leaky_relu(x, 0.2) * np.sqrt(2)  # StyleGAN's lrelu: slope 0.2, gain sqrt(2)
    torch.testing.assert_close(det(images), x.clamp(-0.5, 0.5).mean([2, 3]))


def inception_stand_in():
    """Random Inception weights (batch-norm scale 1, as in TF's graph) and a stand-in for EDM's pickle holding them."""
    from tests.test_inception import edm_tensors, randomize
    from training import inception
    net = randomize(inception.InceptionV3(), seed=7)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.fill_(1)

    class EDMPickleStandIn:
        scale = 1.0

        def state_dict(self):
            return edm_tensors(net)

        def __call__(self, images, return_features=False):
            assert return_features
            return net(images) * self.scale
    return net, EDMPickleStandIn()


def test_inception_detectors_load_state_dicts_without_downloads(tmp_path, monkeypatch, one_thread):
    from training import inception
    net, _ = inception_stand_in()
    torch.save(net.state_dict(), tmp_path / 'weights.pth')
    monkeypatch.setattr(inception, 'FID_WEIGHTS_URL', str(tmp_path / 'weights.pth'))
    images = torch.from_numpy(random_images(1, 13, shape=(1, 8, 8)))
    with torch.no_grad():
        expected = net(images)
        for name in ['inception', str(tmp_path / 'weights.pth')]:
            det = metrics.load_detector(name, 'cpu')
            assert isinstance(det, metrics.InceptionDetector) and (det.name, det.feature_dim) == ('inception', 2048)
            torch.testing.assert_close(det(images), expected, rtol=0, atol=0)
    # 'inception-pkl' is EDM's pickle, run as a detector pickle; its features are Inception's, so is its name.
    path = tmp_path / 'persistent.pkl'
    path.write_bytes(pickle.dumps(PersistentPickle()))
    monkeypatch.setattr(metrics, 'INCEPTION_URL', str(path))
    det = metrics.load_detector('inception-pkl', 'cpu')
    assert isinstance(det, metrics.PickleDetector) and (det.name, det.feature_dim) == ('inception', 2048)


def test_convert_inception_cli(tmp_path, monkeypatch, one_thread):
    net, stand_in = inception_stand_in()
    sources = []
    monkeypatch.setattr(metrics, '_load_detector_file', lambda src, device: sources.append(src) or stand_in)
    dest = tmp_path / 'converted.pth'
    result, lines = invoke(['convert-inception', f'--dest={dest}'])
    assert result.exit_code == 0, result.output
    assert sources == [metrics.INCEPTION_URL] and lines[-1].startswith(f'Saved {dest}: features within 0 ')
    det = metrics.load_detector(str(dest), 'cpu')
    assert all(torch.equal(det.net.state_dict()[k], v) for k, v in net.state_dict().items())
    stand_in.scale = 1.01  # a conversion that would change the features is refused
    result, lines = invoke(['convert-inception', '--src=edm.pkl', f'--dest={tmp_path / "bad.pth"}'])
    assert_one_line_error(result, lines, 'differs from edm.pkl by up to 0.0099')
    assert not (tmp_path / 'bad.pth').exists()


def test_check_inception_cli(tmp_path, monkeypatch):
    write_pngs(tmp_path / 'a', random_images(40, 14))

    class Scaled(metrics.PixelsDetector):
        def __call__(self, images):
            return super().__call__(images) * 1.01
    loaded = []

    def stand_ins(name, device, image_shape):
        loaded.append(name)
        return (metrics.PixelsDetector if name == 'inception' else Scaled)(image_shape, device)
    monkeypatch.setattr(metrics, 'load_detector', stand_ins)
    res = metrics.compare_detectors(str(tmp_path / 'a'), num=40)
    assert loaded == ['inception', 'inception-pkl'] and res['num'] == 40
    assert res['max_feature'] == pytest.approx(1.01) and res['max_diff'] == pytest.approx(0.01)
    assert res['fids'][1] == pytest.approx(res['fids'][0] * 1.01 ** 2, rel=1e-4) and res['fids'][0] > 1
    result, lines = invoke(['check-inception', f'--data={tmp_path / "a"}', '--num=40'])
    assert result.exit_code == 0, result.output
    assert lines[0] == '40 images: largest feature difference 0.01 (largest feature 1.01)'
    assert lines[1].startswith(f'FID first vs second half: inception {res["fids"][0]:.6g}, inception-pkl {res["fids"][1]:.6g}')


#----------------------------------------------------------------------------
# EDM's FID protocol: seed set r is [seed + r*num, seed + (r+1)*num), seen through a spy on the generator.

def _spy_generated_seeds(monkeypatch) -> list:
    from training import generation
    seen, real = [], generation.generate_images

    def spy(net, seeds, *args, **kwargs):
        seen.append([int(s) for s in seeds])
        return real(net, seeds, *args, **kwargs)
    monkeypatch.setattr(generation, 'generate_images', spy)
    return seen


def test_network_fid_seed_sets_are_consecutive_disjoint_ranges(tmp_path, monkeypatch):
    from tests.test_generation import ToyDenoiser
    net = ToyDenoiser()
    write_pngs(tmp_path / 'a', random_images(8, 0, shape=(3, 8, 8)))
    det = tmp_path / 'moments.pkl'  # 6 features: full-rank covariances from 6 images
    det.write_bytes(pickle.dumps(ChannelMomentsDetector()))
    ref = str(tmp_path / 'ref.npz')
    metrics.make_ref(str(tmp_path / 'a'), ref, detector=str(det))
    seen = _spy_generated_seeds(monkeypatch)
    metrics.calc_network_fids(net, ref, num=6, repeats=3, seed=5, detector=str(det), batch_size=4, sampler_kwargs=dict(num_steps=2))
    assert seen == [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16], [17, 18, 19, 20, 21, 22]]


def test_fid_gen_cli_seed_sets(tmp_path, monkeypatch):
    from tests.test_generation import tiny_snapshot
    net = tiny_snapshot(str(tmp_path / 'net.pt'))
    write_pngs(tmp_path / 'a', random_images(10, 1, shape=(3, 8, 8)))
    det = tmp_path / 'moments.pkl'  # 6 features: full-rank covariances from 8 images
    det.write_bytes(pickle.dumps(ChannelMomentsDetector()))
    ref = str(tmp_path / 'ref.npz')
    metrics.make_ref(str(tmp_path / 'a'), ref, detector=str(det))
    seen = _spy_generated_seeds(monkeypatch)
    result, lines = invoke(['gen', f'--network={net}', f'--ref={ref}', f'--detector={det}', '--num=8', '--repeats=2',
                            '--seed=100', '--steps=2'])
    assert result.exit_code == 0, result.output
    assert seen == [list(range(100, 108)), list(range(108, 116))]
    assert [line.split(':')[0] for line in lines if line.startswith('seeds ')] == ['seeds 100-107', 'seeds 108-115']


#----------------------------------------------------------------------------
# fid.py against bad input (tests/test_generation.py's files and checks): one 'Error:' line naming the input and
# the fix, exit 1 (2 for click's usage errors), no traceback, nothing written, nothing from a hostile file run.

GEN = ['gen', '--network={net_pt}', '--ref={ref_npz}', '--num=4', '--repeats=1', '--steps=2']
FID_CASES = {
    'ref-data-missing':     (['ref', '--data={dir}/missing', '--dest={out}.npz', '--detector=pixels'], 1, ['No such file or directory: {dir}/missing']),
    'ref-data-not-images':  (['ref', '--data={text_txt}', '--dest={out}.npz', '--detector=pixels'], 1, ['{text_txt} is neither a folder nor a zip file']),
    'ref-dest-dir':         (['ref', '--data={imgs}', '--dest={dir}', '--detector=pixels'], 1, ['--dest={dir} is a directory, not a file; give another --dest']),
    'ref-dest-read-only':   (['ref', '--data={imgs}', '--dest={ro}/ref.npz', '--detector=pixels'], 1, ['--dest={ro}/ref.npz cannot be written ({ro} is not a writable directory)']),
    'ref-dest-empty':       (['ref', '--data={imgs}', '--dest=', '--detector=pixels'], 1, ['--dest is empty; give a file path']),
    'ref-dest-under-file':  (['ref', '--data={imgs}', '--dest={text_txt}/ref.npz', '--detector=pixels'], 1, ['--dest={text_txt}/ref.npz cannot be written']),
    'ref-detector-unknown': (['ref', '--data={imgs}', '--dest={out}.npz', '--detector=nosuch'], 1, ["No detector 'nosuch': use inception, dinov2, pixels"]),
    'ref-batch-zero':       (['ref', '--data={imgs}', '--dest={out}.npz', '--batch=0'], 2, ["'--batch': 0 is not in the range x>=1"]),
    'calc-images-missing':  (['calc', '--images={dir}/missing', '--ref={ref_npz}'], 1, ['No such file or directory: {dir}/missing']),
    'calc-num-too-many':    (['calc', '--images={imgs}', '--ref={ref_npz}', '--num=11'], 1, ['{imgs} holds 10 images, fewer than the 11 requested: give --num=10']),
    'calc-num-one':         (['calc', '--images={imgs}', '--ref={ref_npz}', '--num=1'], 2, ["'--num': 1 is not in the range x>=2"]),
    'calc-ref-missing':     (['calc', '--images={imgs}', '--ref={dir}/missing.npz', '--num=10'], 1, ['No such file: {dir}/missing.npz']),
    'calc-ref-dims':        (['calc', '--images={imgs}', '--ref={wrong_dim_npz}', '--num=10', '--detector=pixels'], 1, ['{wrong_dim_npz} holds 3-d statistics', 'use the detector the reference was made with']),
    'calc-ref-pickled':     (['calc', '--images={imgs}', '--ref={pickled_npz}', '--num=10'], 1, ['{pickled_npz} holds pickled Python objects', 'it was not loaded']),
    'calc-ref-code-pkl':    (['calc', '--images={imgs}', '--ref={code_pkl}', '--num=10'], 1, ['{code_pkl} is not a .npz file of reference statistics (it is a Python pickle; it was not loaded): give a .npz']),
    'gen-network-code-pt':  (GEN + ['--network={code_pt}'], 1, ['{code_pt} holds Python objects beyond tensors', 'it was not run']),
    'gen-network-code-pkl': (GEN + ['--network={code_pkl}'], 1, ['{code_pkl} is a pickle but not an EDM network pickle', 'nothing in it was run']),
    'gen-network-huge':     (GEN + ['--network={huge_pt}'], 1, ['{huge_pt} describes a network (EDMPrecond) of', 'GiB of memory available']),
    'gen-network-truncated': (GEN + ['--network={truncated_pt}'], 1, ['{truncated_pt} is truncated or corrupt', 'copy or download it again']),
    'gen-rho-nan':          (GEN + ['--rho=nan'], 2, ["'--rho': nan is not a number"]),
    'gen-sigma_max-inf':    (GEN + ['--sigma_max=inf'], 2, ["'--sigma_max': inf is not finite"]),
    'gen-num-huge':         (GEN + ['--num=20000000'], 2, ["'--num': 20000000 is not in the range 2<=x<=10000000"]),
    'gen-class-uncond':     (GEN + ['--class=0'], 1, ['--class=0 was given, but the network is unconditional', 'drop --class']),
    'gen-ref-dims':         (GEN + ['--ref={wrong_dim_npz}', '--detector=pixels'], 1, ['{wrong_dim_npz} holds 3-d statistics']),
    'gen-inf-images':       (GEN + ['--S_churn=10', '--S_noise=1e308'], 1, ['NaN or inf for seeds 0..3', '--S_noise']),
    'convert-dest-dir':     (['convert-inception', '--dest={dir}'], 1, ['--dest={dir} is a directory, not a file; give another --dest']),
    'convert-dest-read-only': (['convert-inception', '--dest={ro}/inception.pth'], 1, ['--dest={ro}/inception.pth cannot be written']),
    'convert-src-missing':  (['convert-inception', '--src={dir}/missing.pkl', '--dest={out}.pth'], 1, ['No such file: {dir}/missing.pkl']),
    'convert-src-truncated': (['convert-inception', '--src={truncated_pt}', '--dest={out}.pth'], 1, ['Cannot load detector {truncated_pt}: not a readable detector pickle',
                                                                                   'failed finding central directory)']),
    'check-data-missing':   (['check-inception', '--data={dir}/missing'], 1, ['No such file or directory: {dir}/missing']),
    'check-num-too-many':   (['check-inception', '--data={imgs}', '--num=11'], 1, ['{imgs} holds 10 images, fewer than the 11 requested: give --num=10']),
    'check-num-small':      (['check-inception', '--data={imgs}', '--num=2'], 2, ["'--num': 2 is not in the range x>=4"]),
}


def test_the_hostile_reference_is_real(tmp_path):
    from tests.test_generation import bad_input_files
    files = bad_input_files(tmp_path)
    np.load(files['pickled_npz'], allow_pickle=True)['mu'][0].close()  # unpickling it runs open(marker, 'w')
    assert os.path.exists(files['marker'])


@pytest.mark.parametrize('case', FID_CASES)
def test_fid_cli_bad_input(bad, tmp_path, case, monkeypatch):
    def no_downloads(*args, **kwargs):
        raise AssertionError('a bad input must be refused before anything is downloaded')
    monkeypatch.setattr(metrics.dnnlib.util, 'requests', None)  # any download attempt fails loudly
    monkeypatch.setattr(metrics.inception, 'load_inception', no_downloads)
    args, exit_code, needles = FID_CASES[case]
    if args[0] == 'gen':  # the later --network / --ref replace GEN's
        args = [a for i, a in enumerate(args) if a.split('=')[0] not in {b.split('=')[0] for b in args[i + 1:]}]
    run_bad_case(fid.main, bad, tmp_path, args, exit_code, needles)
