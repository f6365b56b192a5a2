"""Tests for training/generation.py and generate.py: per-seed images, sharding, PNG naming, zip and grid."""

import os
import pickle
import sys
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

import dnnlib
from torch_utils import perf
from training import checkpoint, generation
from training.images import to_uint8


class ToyDenoiser(torch.nn.Module):
    """A tiny EDM-preconditioned denoiser with the attributes the sampler uses; counts its calls."""

    def __init__(self, img_resolution: int = 8, img_channels: int = 3, label_dim: int = 0):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.sigma_min, self.sigma_max = 0, float('inf')
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(img_channels, img_channels, 3, padding=1)
        self.label_proj = torch.nn.Linear(max(label_dim, 1), img_channels)
        self.calls = 0

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None):
        self.calls += 1
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in = 0.25 / (sigma ** 2 + 0.25), sigma * 0.5 / (sigma ** 2 + 0.25).sqrt(), 1 / (sigma ** 2 + 0.25).sqrt()
        F = torch.tanh(self.conv(c_in * x))
        if class_labels is not None:
            F = F + self.label_proj(class_labels)[:, :, None, None]
        return c_skip * x + c_out * F


def generate_all(net, seeds, batch_size, **kwargs):
    out = {}
    for batch_seeds, images in generation.generate_images(net, seeds, batch_size=batch_size, **kwargs):
        assert images.dtype == torch.uint8 and images.shape[1:] == (net.img_channels, net.img_resolution, net.img_resolution)
        out.update(zip(batch_seeds, images))
    return out

#----------------------------------------------------------------------------

def test_images_do_not_depend_on_batch_size():
    net = ToyDenoiser()
    seeds = list(range(3, 17))
    a = generate_all(net, seeds, batch_size=1, sampler_kwargs=dict(num_steps=6))
    b = generate_all(net, seeds, batch_size=7, sampler_kwargs=dict(num_steps=6))
    assert sorted(a) == seeds and sorted(b) == seeds
    for s in seeds:
        assert torch.equal(a[s], b[s]), s
    assert not torch.equal(a[3], a[4])
    # Churn draws noise from the same per-seed generators.
    c = generate_all(net, seeds[:7], batch_size=1, sampler_kwargs=dict(num_steps=6, S_churn=5))
    d = generate_all(net, seeds[:7], batch_size=7, sampler_kwargs=dict(num_steps=6, S_churn=5))
    assert all(torch.equal(c[s], d[s]) for s in seeds[:7])
    assert not torch.equal(c[3], a[3])


def test_latents_follow_edm_per_seed_generators():
    net = ToyDenoiser(img_channels=1)
    net.forward = lambda x, sigma, labels=None: x  # D(x) = x: the ODE stands still at x_T = latent * sigma_max
    images = generation.sample_images(net, [5, 6], num_steps=3, sigma_max=2)
    latents = [torch.randn([1, 8, 8], generator=torch.Generator().manual_seed(s)) for s in [5, 6]]
    torch.testing.assert_close(images, torch.stack(latents).to(torch.float64) * 2, rtol=1e-14, atol=0)


def test_nfe_and_sigma_clipping():
    net = ToyDenoiser()
    generate_all(net, range(10), batch_size=4, sampler_kwargs=dict(num_steps=5))
    assert net.calls == 3 * (2 * 5 - 1)  # 3 batches
    seen = []
    net.sigma_min, net.sigma_max = 0.01, 10
    orig = net.forward
    net.forward = lambda x, sigma, labels=None: (seen.append(float(sigma)), orig(x, sigma, labels))[1]
    generation.sample_images(net, [0], num_steps=4)
    assert max(seen) == pytest.approx(10) and min(seen) == pytest.approx(0.01)


def test_class_labels():
    net = ToyDenoiser(label_dim=4)
    seen = []
    orig = net.forward
    net.forward = lambda x, sigma, labels=None: (seen.append(labels), orig(x, sigma, labels))[1]
    generation.sample_images(net, [0, 1, 2], num_steps=2, class_idx=2)
    assert torch.equal(seen[0], torch.eye(4)[[2, 2, 2]])
    seen.clear()
    generation.sample_images(net, list(range(32)), num_steps=2)
    assert torch.all(seen[0].sum(1) == 1) and len(set(seen[0].argmax(1).tolist())) > 1
    with pytest.raises(Exception, match='out of range'):
        generation.sample_images(net, [0], num_steps=2, class_idx=4)


def test_generate_to_dir_names_zip_and_grid(tmp_path):
    net = ToyDenoiser()
    outdir = str(tmp_path / 'out')
    seeds = [0, 1, 999, 1000, 2500]
    generation.generate_to_dir(net, outdir, seeds, batch_size=2, sampler_kwargs=dict(num_steps=3),
                               subdirs=True, make_zip=True, grid_num=64)
    names = sorted(os.path.relpath(os.path.join(r, f), outdir) for r, _, fs in os.walk(outdir) for f in fs)
    assert names == ['000000/000000.png', '000000/000001.png', '000000/000999.png', '001000/001000.png', '002000/002500.png']
    expected = generate_all(net, seeds, batch_size=5, sampler_kwargs=dict(num_steps=3))
    png = np.asarray(PIL.Image.open(os.path.join(outdir, '001000/001000.png')))
    assert np.array_equal(png, expected[1000].permute(1, 2, 0).numpy())
    with zipfile.ZipFile(outdir + '.zip') as z:
        assert sorted(z.namelist()) == names
    grid = np.asarray(PIL.Image.open(outdir + '-grid.png'))
    assert grid.shape == (2 * 8, 3 * 8, 3)
    assert np.array_equal(grid[8:16, 0:8], expected[1000].permute(1, 2, 0).numpy())

def test_prepared_network_samples_as_the_plain_one(tmp_path, monkeypatch):
    net_path = tiny_snapshot(str(tmp_path / 'net.pt'))
    plain = generation.sample_images(checkpoint.load_network(net_path), list(range(6)), num_steps=4)
    assert perf.prepare_for_inference(net := checkpoint.load_network(net_path), 'fp32') is net  # fp32: the network itself
    nhwc = generation.sample_images(perf.prepare_for_inference(checkpoint.load_network(net_path), 'fp32', channels_last=True),
                                    list(range(6)), num_steps=4)
    torch.testing.assert_close(nhwc, plain, rtol=0, atol=1e-6)
    assert torch.equal(to_uint8(nhwc), to_uint8(plain))
    monkeypatch.setattr(perf, 'device_has_bf16', lambda device: True)  # bf16 autocast even where emulated
    bf16 = generation.sample_images(perf.prepare_for_inference(checkpoint.load_network(net_path), 'bf16'), list(range(6)), num_steps=4)
    assert not torch.equal(bf16, plain) and (bf16 - plain).abs().max() < 0.02  # rounding, not another image
    # generate_to_dir applies its options: fp32 + channels_last PNGs are exactly the plain images.
    generation.generate_to_dir(checkpoint.load_network(net_path), str(tmp_path / 'out'), range(6), batch_size=4,
                               sampler_kwargs=dict(num_steps=4), precision='fp32', channels_last=True)
    for seed in range(6):
        png = np.asarray(PIL.Image.open(tmp_path / 'out' / f'{seed:06d}.png')).transpose(2, 0, 1)
        assert np.array_equal(png, to_uint8(plain[seed]).numpy()), seed

#----------------------------------------------------------------------------
# The same seeds with 1 and 2 processes.

def _worker(outdir: str) -> None:
    from torch_utils import distributed
    distributed.init()
    generation.generate_to_dir(ToyDenoiser(), outdir, list(range(9)), batch_size=2, sampler_kwargs=dict(num_steps=4, S_churn=3))
    distributed.cleanup()


def test_images_do_not_depend_on_world_size(tmp_path, torchrun):
    torchrun(['-m', 'tests.test_generation', str(tmp_path / 'two')])
    _worker(str(tmp_path / 'one'))
    for seed in range(9):
        a = np.asarray(PIL.Image.open(tmp_path / 'one' / f'{seed:06d}.png'))
        b = np.asarray(PIL.Image.open(tmp_path / 'two' / f'{seed:06d}.png'))
        assert np.array_equal(a, b), seed


if __name__ == '__main__':
    _worker(sys.argv[1])


def tiny_snapshot(path: str, img_channels: int = 3) -> str:
    from training import checkpoint, networks
    torch.manual_seed(0)
    net = networks.EDMPrecond(img_resolution=8, img_channels=img_channels, model_type='SongUNet', model_channels=8,
                              channel_mult=[1, 1], num_blocks=1, attn_resolutions=[], dropout=0)
    checkpoint.save_network(path, net)
    return path


def test_generate_cli(tmp_path):
    from click.testing import CliRunner
    import generate
    net_path = tiny_snapshot(str(tmp_path / 'net.pt'))
    outdir = str(tmp_path / 'out')
    result = CliRunner().invoke(generate.main, [f'--network={net_path}', f'--outdir={outdir}', '--seeds=0-4,1000',
                                                '--subdirs', '--batch=4', '--steps=3', '--S_churn=1', '--zip', '--grid'])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(outdir)) == ['000000', '001000'] and os.path.isfile(outdir + '.zip') and os.path.isfile(outdir + '-grid.png')
    expected = generate_all(checkpoint.load_network(net_path), [0, 1, 2, 3, 4, 1000], batch_size=6,
                            sampler_kwargs=dict(num_steps=3, S_churn=1))
    png = np.asarray(PIL.Image.open(os.path.join(outdir, '000000', '000003.png')))
    assert np.array_equal(png, expected[3].permute(1, 2, 0).numpy())
    prepared = []
    real = perf.prepare_for_inference
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(perf, 'prepare_for_inference', lambda net, **kw: prepared.append(kw) or real(net, **kw))
        result = CliRunner().invoke(generate.main, [f'--network={net_path}', f'--outdir={tmp_path / "fast"}', '--seeds=0-1',
                                                    '--steps=3', '--precision=auto', '--channels-last=1'])
    assert result.exit_code == 0, result.output
    assert prepared == [dict(precision='auto', channels_last=True, compile=False)]
    result = CliRunner().invoke(generate.main, [f'--network={tmp_path / "missing.pt"}', f'--outdir={outdir}'])
    assert result.exit_code == 1 and result.output.strip().splitlines()[-1].startswith('Error:'), result.output
    text = ' '.join(CliRunner().invoke(generate.main, ['--help']).output.split())
    assert 'only load files you trust' in text and 'fp32 = exact reference, images and FIDs comparable' in text

#----------------------------------------------------------------------------
# Generated uint8 images and the order of the per-seed draws, against values computed by hand from EDM's code.

def test_generated_uint8_is_edm_rounding_of_the_sampler_output():
    net = ToyDenoiser(img_channels=1)
    net.forward = lambda x, sigma, labels=None: x  # D(x) = x: the image is latent * sigma_max, spread over many levels
    seeds = [0, 1, 2]
    x = np.stack([torch.randn([1, 8, 8], generator=torch.Generator().manual_seed(s)).numpy() for s in seeds]).astype(np.float64) * 0.9
    expected = np.floor(np.clip(x * 127.5 + 128, 0, 255)).astype(np.uint8)
    got = generate_all(net, seeds, batch_size=2, sampler_kwargs=dict(num_steps=3, sigma_max=0.9))
    assert len(np.unique(expected)) > 50 and (expected == 0).any() and (expected == 255).any()  # clipping exercised too
    for i, s in enumerate(seeds):
        assert np.array_equal(got[s].numpy(), expected[i]), s


def test_per_seed_draws_are_latents_then_labels_then_churn():
    # With D(x) = x every ODE step stands still, so the image is the latent at sigma_max plus the churn noise:
    # S_churn >= N (sqrt(2) - 1) caps gamma at sqrt(2) - 1, so t_hat = sqrt(2) t_i and the noise std is t_i exactly.
    net = ToyDenoiser(img_channels=2, label_dim=3)
    seen_labels = []
    net.forward = lambda x, sigma, labels=None: (seen_labels.append(labels), x)[1]
    seeds, S_noise = [7, 8, 9, 10], 0.9
    t = [(2 ** (1 / 7) + i / 2 * (0.002 ** (1 / 7) - 2 ** (1 / 7))) ** 7 for i in range(3)]  # EDM's schedule, N = 3, sigma_max 2
    images = generation.sample_images(net, seeds, num_steps=3, sigma_max=2, S_churn=10, S_noise=S_noise)
    for i, s in enumerate(seeds):
        g = torch.Generator().manual_seed(s)
        latent = torch.randn([2, 8, 8], generator=g)
        label = torch.randint(3, size=[], generator=g)
        churn = [torch.randn([2, 8, 8], generator=g, dtype=torch.float64) for _ in t]  # one draw per step, float64 like x
        expected = latent.to(torch.float64) * t[0] + sum(S_noise * ti * eps for ti, eps in zip(t, churn))
        torch.testing.assert_close(images[i], expected, rtol=1e-12, atol=1e-12)
        assert torch.equal(seen_labels[0][i], torch.eye(3)[label])


# Broken settings and networks stop with one line, before anything is written.

def test_non_finite_images_stop_before_anything_is_written(tmp_path):
    net = ToyDenoiser()
    net.forward = lambda x, sigma, labels=None: x * float('nan')
    outdir = tmp_path / 'out'
    with pytest.raises(dnnlib.UserError, match=r'Sampling gave NaN or inf for seeds 0\.\.1: the network or the sampler settings '
                                               r'are broken') as excinfo:
        generation.generate_to_dir(net, str(outdir), range(4), batch_size=2, sampler_kwargs=dict(num_steps=3), grid_num=4)
    assert '\n' not in excinfo.value.message and os.listdir(tmp_path) == []
    # Finite settings can still overflow: inf noise.
    with pytest.raises(dnnlib.UserError, match='NaN or inf for seeds 7..7'):
        next(generation.generate_images(ToyDenoiser(), [7], sampler_kwargs=dict(num_steps=3, S_churn=10, S_noise=1e308)))


def test_class_and_sigma_range_are_checked_against_the_network():
    with pytest.raises(dnnlib.UserError, match=r'--class=0 was given, but the network is unconditional \(it has no classes\): '
                                               r'drop --class'):
        generation.sample_images(ToyDenoiser(), [0], num_steps=2, class_idx=0)
    with pytest.raises(dnnlib.UserError, match='--class=3 is out of range: the network has 3 classes, give --class from 0 to 2'):
        next(generation.generate_images(ToyDenoiser(label_dim=3), [0], class_idx=3))
    with pytest.raises(dnnlib.UserError, match=r'from --sigma_min=5 to --sigma_max=1 .*: give a --sigma_min below --sigma_max'):
        generation.sample_images(ToyDenoiser(), [0], num_steps=2, sigma_min=5, sigma_max=1)
    net = ToyDenoiser()
    net.sigma_min, net.sigma_max = 0.002, 1
    with pytest.raises(dnnlib.UserError, match=r"--sigma_min=2 to --sigma_max=1 \(after clipping to the network's 0.002 to 1\)"):
        generation.sample_images(net, [0], num_steps=2, sigma_min=2)


def test_seed_ranges_stay_lazy():
    seeds, images = next(generation.generate_images(ToyDenoiser(), range(10 ** 15), batch_size=2, sampler_kwargs=dict(num_steps=2)))
    assert seeds == [0, 1] and images.shape[0] == 2

#----------------------------------------------------------------------------
# generate.py against bad input: one 'Error:' line naming the input and the fix, exit 1 (2 for click's usage
# errors), no traceback, nothing written, nothing from a hostile file run. The files are shared with
# tests/test_metrics.py and tests/test_audit.py.

def bad_input_files(root) -> dict:
    """Networks good and bad, and other files, under `root`: {name with _ for .: path}; a hostile file that runs creates 'marker'."""
    from tests.test_checkpoint import WritesMarker, snapshot_dict
    from training import networks
    root = str(root)
    p = {name.replace('.', '_'): os.path.join(root, name) for name in
         ['net.pt', 'cond.pt', 'code.pt', 'code.pkl', 'truncated.pt', 'other.pkl', 'huge.pt', 'text.txt', 'dir', 'marker',
          'imgs', 'small', 'ref.npz', 'wrong_dim.npz', 'pickled.npz']}
    tiny_snapshot(p['net_pt'])
    torch.manual_seed(0)
    cond = networks.EDMPrecond(img_resolution=8, img_channels=3, label_dim=3, model_type='SongUNet', model_channels=8,
                               channel_mult=[1, 1], num_blocks=1, attn_resolutions=[], dropout=0)
    checkpoint.save_network(p['cond_pt'], cond)
    torch.save(snapshot_dict(cond.init_kwargs, hook=WritesMarker(p['marker'])), p['code_pt'])
    with open(p['code_pkl'], 'wb') as f:
        pickle.dump(dict(ema=WritesMarker(p['marker'])), f)
    with open(p['net_pt'], 'rb') as f, open(p['truncated_pt'], 'wb') as g:
        g.write(f.read()[:3000])
    with open(p['other_pkl'], 'wb') as f:
        pickle.dump({'weights': [1.0, 2.0]}, f)
    torch.save(snapshot_dict(dict(cond.init_kwargs, model_channels=100_000)), p['huge_pt'])  # asks for 160+ GiB
    with open(p['text_txt'], 'w') as f:
        f.write('not a network\n')
    os.makedirs(p['dir'])
    # Images: 10 of the networks' 3x8x8 and 4 of 3x4x4; reference statistics: pixels of imgs, 3-d, and one that
    # holds a pickled object (which would create the marker if unpickled).
    rng = np.random.RandomState(0)
    pixels = rng.randint(0, 256, size=(10, 3, 8, 8), dtype=np.uint8)
    for name, images in [('imgs', pixels), ('small', rng.randint(0, 256, size=(4, 3, 4, 4), dtype=np.uint8))]:
        os.makedirs(p[name])
        for i, image in enumerate(images):
            PIL.Image.fromarray(image.transpose(1, 2, 0)).save(os.path.join(p[name], f'{i:06d}.png'))
    x = pixels.reshape(10, -1) / 127.5 - 1
    np.savez(p['ref_npz'], mu=x.mean(0), sigma=np.cov(x, rowvar=False), detector=np.array('pixels'))
    np.savez(p['wrong_dim_npz'], mu=np.zeros(3), sigma=np.eye(3))
    np.savez(p['pickled_npz'], mu=np.array([WritesMarker(p['marker'])], dtype=object), sigma=np.eye(1))
    return p


def tree(root) -> list[str]:
    """Every file and directory under root, relative."""
    return sorted(os.path.relpath(os.path.join(r, n), root) for r, ds, fs in os.walk(root) for n in ds + fs)


def check_refusal(result, exit_code: int, needles) -> None:
    """exit_code, click's own exit (no uncaught exception, so no traceback), and exactly one 'Error:' line holding every needle."""
    errors = [line for line in result.output.splitlines() if line.startswith('Error:')]
    assert result.exit_code == exit_code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert 'Traceback' not in result.output
    assert len(errors) == 1 and all(n in errors[0] for n in needles), (needles, result.output)


@pytest.fixture(scope='module')
def bad(tmp_path_factory):
    from tests.test_dnnlib import read_only_dir
    root = tmp_path_factory.mktemp('bad-input')
    files = bad_input_files(root)
    try:
        with read_only_dir(root / 'ro') as ro:
            yield dict(files, ro=ro, root=str(root))
    except pytest.skip.Exception:  # no read-only directory here: those cases skip
        yield dict(files, ro=None, root=str(root))


def run_bad_case(main, bad, tmp_path, args, exit_code, needles, setup=None):
    """Invoke a CLI on one bad input (in args and needles, {out} is a fresh path and {name} a file of `bad`), check the
    refusal, that nothing under `bad` or tmp_path changed and that the marker was never written."""
    from click.testing import CliRunner
    if '{ro}' in ' '.join(args) and bad['ro'] is None:
        pytest.skip('no read-only directory here')
    names = dict(bad, out=str(tmp_path / 'out'))
    args = [a.format(**names) for a in args]
    if setup:
        setup(names)
    before = tree(bad['root']), tree(tmp_path)
    result = CliRunner().invoke(main, args)
    check_refusal(result, exit_code, [n.format(**names) for n in needles])
    assert (tree(bad['root']), tree(tmp_path)) == before
    assert not os.path.exists(bad['marker'])


GENERATE_CASES = {
    'rho-nan':           (['--rho=nan'], 2, ["'--rho': nan is not a number; give a finite number x>0"]),
    'S_noise-nan':       (['--S_noise=nan'], 2, ["'--S_noise': nan is not a number"]),
    'sigma_min-nan':     (['--sigma_min=nan'], 2, ["'--sigma_min': nan is not a number"]),
    'sigma_max-inf':     (['--sigma_max=inf'], 2, ["'--sigma_max': inf is not finite"]),
    'S_max-nan':         (['--S_max=nan'], 2, ["'--S_max': nan is not a number; give a finite number x>=0 or inf"]),
    'inf-images':        (['--S_churn=10', '--S_noise=1e308'], 1, ['NaN or inf for seeds 0..3', '--S_noise']),
    'sigma-range':       (['--sigma_min=5', '--sigma_max=1'], 1, ['--sigma_min=5', 'give a --sigma_min below --sigma_max']),
    'seeds-huge':        (['--seeds=0-999999999'], 1, ['--seeds=0-999999999 asks for 1,000,000,000 images', 'give a smaller range']),
    'seeds-empty':       (['--seeds='], 1, ['--seeds is empty: give seeds such as 0-63']),
    'seeds-reversed':    (['--seeds=5-3'], 1, ['--seeds=5-3', 'end before start']),
    'steps-huge':        (['--steps=1000000000'], 2, ["'--steps': 1000000000 is not in the range 2<=x<=100000"]),
    'batch-zero':        (['--batch=0'], 2, ["'--batch': 0 is not in the range x>=1"]),
    'class-uncond':      (['--class=3'], 1, ['--class=3', 'the network is unconditional', 'drop --class']),
    'class-huge':        (['--network={cond_pt}', '--class=1000000000'], 1, ['--class=1000000000 is out of range', 'give --class from 0 to 2']),
    'network-missing':   (['--network={dir}/missing.pt'], 1, ['No such file: {dir}/missing.pt']),
    'network-code-pkl':  (['--network={code_pkl}'], 1, ['{code_pkl} is a pickle but not an EDM network pickle', 'nothing in it was run']),
    'network-code-pt':   (['--network={code_pt}'], 1, ['{code_pt} holds Python objects beyond tensors', 'it was not run']),
    'network-truncated': (['--network={truncated_pt}'], 1, ['{truncated_pt} is truncated or corrupt', 'copy or download it again']),
    'network-other-pkl': (['--network={other_pkl}'], 1, ['{other_pkl} is a pickle but not an EDM network pickle', 'give an EDM']),
    'network-huge':      (['--network={huge_pt}'], 1, ['{huge_pt} describes a network (EDMPrecond) of', 'GiB of memory available']),
    'network-text':      (['--network={text_txt}'], 1, ['{text_txt} is not a network file: expected a .pt snapshot']),
    'network-empty':     (['--network='], 1, ['The network path is empty: give a .pt snapshot']),
    'outdir-empty':      (['--outdir='], 1, ['--outdir is empty; give a directory path']),
    'outdir-file':       (['--outdir={text_txt}'], 1, ['--outdir={text_txt} is a file, not a directory']),
    'outdir-under-file': (['--outdir={text_txt}/sub'], 1, ['--outdir={text_txt}/sub cannot be written', 'give another --outdir']),
    'outdir-read-only':  (['--outdir={ro}/out'], 1, ['--outdir={ro}/out cannot be written ({ro} is not a writable directory)']),
    'zip-is-a-dir':      (['--zip'], 1, ['{out}.zip (--zip) is a directory, not a file; give another --outdir']),
}


@pytest.mark.parametrize('case', GENERATE_CASES)
def test_generate_cli_bad_input(bad, tmp_path, case):
    import generate
    args, exit_code, needles = GENERATE_CASES[case]
    args = [a for a in ['--network={net_pt}', '--outdir={out}', '--seeds=0-3', '--steps=2'] if a.split('=')[0] not in
            {b.split('=')[0] for b in args}] + args
    setup = (lambda names: os.makedirs(names['out'] + '.zip')) if case == 'zip-is-a-dir' else None
    run_bad_case(generate.main, bad, tmp_path, args, exit_code, needles, setup)
