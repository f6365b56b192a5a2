"""training_loop: the loss falls; 1 process = 2 processes = accumulation; exact resume after SIGKILL; transfer; mix."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest
import torch

from dnnlib.util import UserError
from tests.conftest import ROOT
from torch_utils import perf, rng
from training import checkpoint, training_loop as tl
from training.dataset import ArrayDatasetWriter, open_dataset
from training.images import to_model_space
from training.loss import EDMLoss

pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py

#----------------------------------------------------------------------------
# A tiny synthetic data set and tiny options.

def make_image_folder(path, num: int = 32, resolution: int = 8, seed: int = 0) -> str:
    """EDM-layout folder of PNGs: smooth two-colour gradients, easy enough for a tiny net to learn."""
    gen = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    ramp = np.linspace(0, 1, resolution)[None, :, None]
    for i in range(num):
        a, b = gen.uniform(0, 255, size=(2, 1, 1, 3))
        img = a + (b - a) * (ramp if i % 2 else ramp.transpose(1, 0, 2))
        PIL.Image.fromarray(np.broadcast_to(img, (resolution, resolution, 3)).round().astype(np.uint8)).save(os.path.join(path, f'img{i:03d}.png'))
    return str(path)


def tiny_options(data: str, **overrides) -> dict:
    """training_loop keyword arguments: 8x8 DDPM++ with a few thousand parameters, 8 steps of batch 8."""
    opts = dict(
        dataset_kwargs=dict(path=data),
        network_kwargs=dict(class_name='training.networks.EDMPrecond', model_type='SongUNet', embedding_type='positional',
                            encoder_type='standard', decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1],
                            model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0),
        loss_kwargs=dict(class_name='training.loss.EDMLoss'),
        optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=2e-3, betas=[0.9, 0.999], eps=1e-8, fused=True),
        data_loader_kwargs=dict(num_workers=0),
        seed=1, batch_size=8, total_kimg=0.064, kimg_per_tick=0.016, snapshot_ticks=1, state_dump_ticks=2,
        ema_halflife_kimg=0.02, lr_rampup_kimg=0.016,
    )
    opts.update(overrides)
    return opts




@pytest.fixture(scope='module')
def data(tmp_path_factory) -> str:
    return make_image_folder(tmp_path_factory.mktemp('data') / 'images')


def _state(run_dir) -> dict:
    return checkpoint.load_training_state(tl.find_latest_state(str(run_dir)))


def _assert_states(a: dict, b: dict, exact: bool) -> None:
    for key in ['net', 'ema']:
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            if exact:
                assert torch.equal(a[key][name], b[key][name]), f'{key}.{name}'
            else:
                torch.testing.assert_close(a[key][name], b[key][name], rtol=1e-4, atol=1e-5, msg=f'{key}.{name}')
    assert a['cur_nimg'] == b['cur_nimg']

#----------------------------------------------------------------------------

def _eval_loss(net: torch.nn.Module, images: torch.Tensor) -> float:
    """The EDM loss on fixed sigma and noise draws (several per image), so two networks compare fairly."""
    loss_fn, total = EDMLoss(), 0.0
    with torch.no_grad():
        for rep in range(8):
            rnd = rng.BatchRandom(rng.derive_seed(99, rep), len(images), 0, len(images))
            total += loss_fn(net, images, rnd=rnd).mean().item()
    return total / 8


def test_loss_falls(tmp_path, data):
    opts = tiny_options(data, batch_size=16, total_kimg=1.6, kimg_per_tick=0.4, snapshot_ticks=2, state_dump_ticks=2,
                        ema_halflife_kimg=0.1, keep_last=1)
    final = tl.training_loop(str(tmp_path / 'run'), **opts)
    images = to_model_space(torch.stack([torch.from_numpy(x) for x, _ in open_dataset(data)]))
    trained = checkpoint.load_network(final)
    torch.manual_seed(opts['seed'])  # The loop builds its initial network from the same seed.
    initial = type(trained)(**trained.init_kwargs).eval()
    assert _eval_loss(trained, images) < 0.8 * _eval_loss(initial, images)
    stats = [json.loads(line) for line in open(tmp_path / 'run' / 'stats.jsonl')]
    assert stats[-1]['Progress/kimg']['mean'] == pytest.approx(1.6)
    assert stats[-1]['Loss/loss']['mean'] < stats[0]['Loss/loss']['mean']
    for name in ['training_options.json', 'log.txt']:
        assert (tmp_path / 'run' / name).is_file()
    assert 'sec/kimg' in (tmp_path / 'run' / 'log.txt').read_text()
    # keep_last=1 leaves the final snapshot and state (kimg 1.6) and no older ones (kimg 0).
    assert sorted(f for f in os.listdir(tmp_path / 'run') if f.endswith('.pt')) == ['network-snapshot-000001.pt', 'training-state-000001.pt']
    assert final == str(tmp_path / 'run' / 'network-snapshot-000001.pt')

def test_ema_rampup(tmp_path, data):
    # Step 0 runs at lr 0 with half-life 0 (EMA = net = init); step 1's half-life is ratio * 8 images,
    # so beta = 0.5 ** (8 / (0.5 * 8)) = 0.25 and ema = net + 0.25 * (init - net).
    opts = tiny_options(data, total_kimg=0.016, ema_rampup_ratio=0.5)
    tl.training_loop(str(tmp_path / 'run'), **opts)
    state = _state(tmp_path / 'run')
    torch.manual_seed(opts['seed'])
    init = checkpoint.build_network(state['class_name'], state['init_kwargs']).state_dict()
    assert not torch.equal(state['net']['model.dec.8x8_aux_conv.weight'], init['model.dec.8x8_aux_conv.weight'])
    for name, net in state['net'].items():
        torch.testing.assert_close(state['ema'][name], net + 0.25 * (init[name] - net), msg=name)


#----------------------------------------------------------------------------
# The same global batch gives the same weights however it is split.

def main_from_options(path: str) -> None:
    """Entry point for a torchrun process: training_loop with the JSON options at `path`."""
    with open(path) as f:
        opts = json.load(f)
    tl.training_loop(opts.pop('run_dir'), **opts)


def test_two_processes_match_one(tmp_path, data, torchrun):
    opts = tiny_options(data, total_kimg=0.032)
    with open(tmp_path / 'opts.json', 'w') as f:
        json.dump(dict(opts, run_dir=str(tmp_path / 'two')), f)
    torchrun(['--no-python', sys.executable, '-c', f'import tests.test_training_loop as t; t.main_from_options({str(tmp_path / "opts.json")!r})'])
    tl.training_loop(str(tmp_path / 'one'), **opts)
    two, one = _state(tmp_path / 'two'), _state(tmp_path / 'one')
    assert two['rng']['world_size'] == 2
    _assert_states(one, two, exact=False)


def test_accumulation_matches_full_batch(tmp_path, data):
    opts = tiny_options(data, total_kimg=0.032)
    tl.training_loop(str(tmp_path / 'full'), **opts)
    tl.training_loop(str(tmp_path / 'accum'), **dict(opts, batch_gpu=2))
    _assert_states(_state(tmp_path / 'full'), _state(tmp_path / 'accum'), exact=False)
    assert json.load(open(tmp_path / 'accum' / 'training_options.json'))['batch_gpu'] == 2

def test_bf16_autocast_gives_a_close_loss(tmp_path, data, monkeypatch):
    monkeypatch.setattr(perf, 'device_has_bf16', lambda device: True)  # Autocast even where bf16 is emulated.
    opts = tiny_options(data, total_kimg=0.016)
    for precision in ['fp32', 'bf16']:
        tl.training_loop(str(tmp_path / precision), **dict(opts, precision=precision))
    # Tick 0 is the first step: same weights, sigma and noise, so the losses differ only by rounding.
    loss = {p: json.loads(open(tmp_path / p / 'stats.jsonl').readline())['Loss/loss']['mean'] for p in ['fp32', 'bf16']}
    assert loss['bf16'] != loss['fp32']
    assert loss['bf16'] == pytest.approx(loss['fp32'], rel=0.02)


def test_channels_last_gives_the_same_training(tmp_path, data, monkeypatch):
    prepared = []
    real = perf.prepare_for_training

    def spy(net, channels_last=False, compile=False):
        out = real(net, channels_last=channels_last, compile=compile)
        prepared.append((channels_last, any(p.ndim == 4 and p.is_contiguous(memory_format=torch.channels_last)
                                            and not p.is_contiguous() for p in net.parameters())))
        return out
    monkeypatch.setattr(perf, 'prepare_for_training', spy)
    opts = tiny_options(data, total_kimg=0.032)
    tl.training_loop(str(tmp_path / 'contiguous'), **opts)
    assert prepared and not any(nhwc for _, nhwc in prepared)
    prepared.clear()
    tl.training_loop(str(tmp_path / 'cl'), **dict(opts, channels_last=True))
    assert (True, True) in prepared  # the network trained has NHWC weights
    loss = {d: json.loads(open(tmp_path / d / 'stats.jsonl').readline())['Loss/loss']['mean'] for d in ['contiguous', 'cl']}
    assert loss['cl'] == pytest.approx(loss['contiguous'], rel=1e-5)
    _assert_states(_state(tmp_path / 'contiguous'), _state(tmp_path / 'cl'), exact=False)
    assert json.load(open(tmp_path / 'cl' / 'training_options.json'))['channels_last'] is True


def test_compile_wraps_the_network_not_the_state(tmp_path, data, monkeypatch):
    compiled = []

    def fake_compile(module):  # stands in for torch.compile (slow, needs a C++ compiler): records what it wraps
        compiled.append(module)
        return module
    monkeypatch.setattr(torch, 'compile', fake_compile)
    tl.training_loop(str(tmp_path / 'run'), **tiny_options(data, total_kimg=0.016, compile=True))
    assert len(compiled) == 1 and type(compiled[0]).__name__ == 'EDMPrecond'
    assert json.load(open(tmp_path / 'run' / 'training_options.json'))['compile'] is True


def test_options_file_repeats_the_run(tmp_path, data):
    tl.training_loop(str(tmp_path / 'a'), **tiny_options(data, total_kimg=0.016))
    opts = json.load(open(tmp_path / 'a' / 'training_options.json'))
    del opts['run_dir']
    tl.training_loop(str(tmp_path / 'b'), **opts)
    _assert_states(_state(tmp_path / 'a'), _state(tmp_path / 'b'), exact=True)

#----------------------------------------------------------------------------
# Exact resume.

_KILLED_RUN = '''
import json, os, signal, sys
from training import checkpoint, training_loop
opts = json.load(open(sys.argv[1]))
save_network, calls = checkpoint.save_network, []
def save_then_die(*args, **kwargs):
    calls.append(1)
    if len(calls) == 4:  # After the tick-2 state, before the tick-3 snapshot: the process dies mid-run.
        os.kill(os.getpid(), signal.SIGKILL)
    save_network(*args, **kwargs)
checkpoint.save_network = save_then_die
training_loop.training_loop(opts.pop('run_dir'), **opts)
'''


def test_resume_after_sigkill_is_bit_exact(tmp_path, data):
    # Workers load the data here, so the resumed sampler is exercised through a real DataLoader.
    opts = tiny_options(data, data_loader_kwargs=dict(num_workers=1))
    opts['network_kwargs'] = dict(opts['network_kwargs'], dropout=0.1)  # Dropout draws from the restored global RNG.
    ref = tl.training_loop(str(tmp_path / 'ref'), **opts)

    killed = tmp_path / 'killed'
    with open(tmp_path / 'opts.json', 'w') as f:
        json.dump(dict(opts, run_dir=str(killed)), f)
    env = {**os.environ, 'PYTHONPATH': ROOT, 'CUDA_VISIBLE_DEVICES': '', 'OMP_NUM_THREADS': str(torch.get_num_threads())}
    res = subprocess.run([sys.executable, '-c', _KILLED_RUN, str(tmp_path / 'opts.json')], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    partial = checkpoint.load_training_state(tl.find_latest_state(str(killed)))
    assert 0 < partial['cur_nimg'] < 64

    final = tl.training_loop(str(killed), **dict(opts, resume=str(killed), seed=opts['seed'] + 1))  # The state's seed wins.
    _assert_states(_state(tmp_path / 'ref'), _state(killed), exact=True)
    a, b = _state(tmp_path / 'ref')['optimizer'], _state(killed)['optimizer']
    assert a['param_groups'][0]['fused'] is True and b['param_groups'][0]['fused'] is True  # fused Adam resumes exactly
    for k in a['state']:
        for name in ['exp_avg', 'exp_avg_sq']:
            assert torch.equal(a['state'][k][name], b['state'][k][name])
    assert os.path.basename(final) == os.path.basename(ref)
    # Resuming a finished run trains no further: it only returns (rewrites) the final snapshot.
    assert tl.training_loop(str(killed), **dict(opts, resume=str(killed))) == final
    assert _state(killed)['cur_nimg'] == 64
    # The ticks the killed run logged after its last state are not repeated in stats.jsonl.
    ticks = [json.loads(line)['Progress/tick']['mean'] for line in open(killed / 'stats.jsonl')]
    assert ticks == [json.loads(line)['Progress/tick']['mean'] for line in open(tmp_path / 'ref' / 'stats.jsonl')]


def test_resume_rejects_what_is_not_a_training_state(tmp_path, data):
    final = tl.training_loop(str(tmp_path / 'run'), **tiny_options(data, total_kimg=0.008))
    with pytest.raises(UserError):
        tl.training_loop(str(tmp_path / 'again'), **tiny_options(data, resume=final))
    (tmp_path / 'junk.pt').write_bytes(b'not a checkpoint')
    with pytest.raises(UserError):
        tl.training_loop(str(tmp_path / 'again'), **tiny_options(data, resume=str(tmp_path / 'junk.pt')))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(UserError, match='no training-state'):
        tl.training_loop(str(tmp_path / 'again'), **tiny_options(data, resume=str(tmp_path / 'empty')))

class NoFusedAdam(torch.optim.Adam):
    """Adam on a device without a fused kernel."""

    def __init__(self, params, fused=None, **kwargs):
        if fused:
            raise RuntimeError('`fused=True` requires all the params to be on a supported device')
        super().__init__(params, **kwargs)


def test_fused_optimizer_falls_back(tmp_path, data, capsys):
    opts = tiny_options(data, total_kimg=0.008)
    opts['optimizer_kwargs'] = dict(opts['optimizer_kwargs'], class_name='tests.test_training_loop.NoFusedAdam')
    tl.training_loop(str(tmp_path / 'run'), **opts)
    assert 'using the unfused one' in capsys.readouterr().out
    assert not _state(tmp_path / 'run')['optimizer']['param_groups'][0]['fused']
    opts['optimizer_kwargs']['betas'] = [2, 0.999]  # other errors are not hidden
    with pytest.raises(ValueError, match='beta'):
        tl.training_loop(str(tmp_path / 'bad'), **opts)

#----------------------------------------------------------------------------
# Transfer (SFBD's fine-tune start).

def test_transfer_copies_weights_into_net_and_ema(tmp_path, data):
    source_path = tl.training_loop(str(tmp_path / 'src'), **tiny_options(data, total_kimg=0.016))
    source = checkpoint.load_network(source_path)
    # One step at lr 0 (the warm-up restarts at zero) leaves net and EMA at the transferred weights.
    for i, transfer in enumerate([source_path, source]):
        final = tl.training_loop(str(tmp_path / f'ft{i}'), **tiny_options(data, total_kimg=0.008, transfer=transfer, network_kwargs=None,
                                                                          ema_rampup_ratio=None))
        state = _state(tmp_path / f'ft{i}')
        assert state['cur_nimg'] == 8
        for name, value in source.state_dict().items():
            assert torch.equal(state['net'][name], value) and torch.equal(state['ema'][name], value), name
        assert torch.equal(checkpoint.load_network(final).state_dict()[name], value)


def test_transfer_rejects_other_resolution(tmp_path, data):
    source_path = tl.training_loop(str(tmp_path / 'src'), **tiny_options(data, total_kimg=0.008))
    big = make_image_folder(tmp_path / 'big', num=8, resolution=16)
    with pytest.raises(UserError, match='16|8'):
        tl.training_loop(str(tmp_path / 'ft'), **tiny_options(big, transfer=source_path))

#----------------------------------------------------------------------------
# Data order and the mix data set.

def test_batch_order_is_keyed_by_step_not_by_split():
    full = tl.BatchOrder(10, 0, 0, batch_size=4, batch_gpu=4, num_rounds=1, rank=0, seed=3)
    it = iter(full)
    batches = [next(it) for _ in range(10)]  # 40 images: 4 epochs of 10, each a permutation.
    flat = np.array(batches).reshape(4, 10)
    assert all(sorted(row) == list(range(10)) for row in flat)
    assert not all((flat[0] == row).all() for row in flat[1:])
    # Two ranks x two rounds of 1 give the same rows in the same order; a resumed sampler continues.
    split = [iter(tl.BatchOrder(10, 0, 0, batch_size=4, batch_gpu=1, num_rounds=2, rank=r, seed=3)) for r in range(2)]
    for b in batches[:3]:
        assert [next(split[0])[0], next(split[0])[0], next(split[1])[0], next(split[1])[0]] == b
    resumed = iter(tl.BatchOrder(10, 0, 0, batch_size=4, batch_gpu=4, num_rounds=1, rank=0, seed=3, start_step=6))
    assert [next(resumed) for _ in range(4)] == batches[6:]


def test_mix_fraction_takes_a_fixed_share_of_every_batch():
    order = iter(tl.BatchOrder(10, 5, num_mix=3, batch_size=8, batch_gpu=8, num_rounds=1, rank=0, seed=0))
    for _ in range(5):
        batch = np.array(next(order))
        assert (batch >= 10).sum() == 3 and ((batch >= 10) == [False] * 5 + [True] * 3).all()


def test_mix_dataset_joins_the_batch_and_is_ignored_at_zero(tmp_path, data):
    mix = str(tmp_path / 'mix')
    with ArrayDatasetWriter(mix, 4, [3, 8, 8], np.uint8) as w:
        w.write(0, np.zeros([4, 3, 8, 8], np.uint8))
    opts = tiny_options(data, total_kimg=0.016)
    tl.training_loop(str(tmp_path / 'plain'), **opts)
    tl.training_loop(str(tmp_path / 'mixed'), **dict(opts, mix_dataset_kwargs=dict(path=mix), mix_fraction=0.25))
    # Fraction 0 never opens the second data set, even one that does not exist.
    tl.training_loop(str(tmp_path / 'zero'), **dict(opts, mix_dataset_kwargs=dict(path=str(tmp_path / 'missing')), mix_fraction=0))
    plain, mixed, zero = (_state(tmp_path / name)['net'] for name in ['plain', 'mixed', 'zero'])
    assert all(torch.equal(plain[k], zero[k]) for k in plain)
    assert not all(torch.equal(plain[k], mixed[k]) for k in plain)
    big = make_image_folder(tmp_path / 'big', num=4, resolution=16)
    with pytest.raises(UserError, match='mix data set'):
        tl.training_loop(str(tmp_path / 'bad'), **dict(opts, mix_dataset_kwargs=dict(path=big), mix_fraction=0.5))

#----------------------------------------------------------------------------
# Bad input.

def test_batch_layout():
    assert tl.batch_layout(512, None, 8) == (64, 1)
    assert tl.batch_layout(512, 16, 8) == (16, 4)
    assert tl.batch_layout(8, 100, 2) == (4, 1)
    with pytest.raises(UserError, match='not divisible'):
        tl.batch_layout(10, None, 4)
    with pytest.raises(UserError, match='not divisible'):
        tl.batch_layout(24, 5, 2)


def test_unwritable_run_dir_is_one_clear_error(tmp_path, data):
    (tmp_path / 'file').write_text('')
    with pytest.raises(UserError, match='Cannot create output directory'):
        tl.training_loop(str(tmp_path / 'file' / 'run'), **tiny_options(data))


def test_keep_last_prunes_by_number_not_by_name(tmp_path):
    for kimg in [1, 2, 999999, 1000000]:
        (tmp_path / f'network-snapshot-{kimg:06d}.pt').write_bytes(b'')
    (tmp_path / 'training-state-000001.pt').write_bytes(b'')
    tl._prune(str(tmp_path), tl._SNAPSHOT_RE, keep=2)
    assert sorted(os.listdir(tmp_path)) == ['network-snapshot-1000000.pt', 'network-snapshot-999999.pt', 'training-state-000001.pt']
    assert tl.find_latest_state(str(tmp_path)).endswith('training-state-000001.pt')

#----------------------------------------------------------------------------
# Schedules and outputs against EDM's formulas (SPEC section 3), evaluated here by hand, and against the
# weights the optimizer itself produced, captured by a spy.

class SpyAdam(torch.optim.Adam):
    """Adam that records the weights it starts from and, at every step, the lr used and the weights after it."""
    init: list = []
    steps: list = []

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        SpyAdam.init = [p.detach().clone() for g in self.param_groups for p in g['params']]
        SpyAdam.steps = []

    def step(self, closure=None):
        out = super().step(closure)
        SpyAdam.steps.append((self.param_groups[0]['lr'], [p.detach().clone() for g in self.param_groups for p in g['params']]))
        return out


def test_lr_warmup_ema_beta_and_kimg_follow_edm_formulas(tmp_path, data):
    # 8 steps of batch 8 (2 accumulation rounds of 4), a tick per step. The lr ramps over 32 images (4 steps);
    # the EMA half-life of 20 images is capped at 0.5 x the images seen before the step.
    opts = tiny_options(data, total_kimg=0.064, kimg_per_tick=0.008, snapshot_ticks=None, state_dump_ticks=None,
                        lr_rampup_kimg=0.032, ema_halflife_kimg=0.02, ema_rampup_ratio=0.5, batch_gpu=4)
    opts['optimizer_kwargs'] = dict(opts['optimizer_kwargs'], class_name='tests.test_training_loop.SpyAdam')
    final = tl.training_loop(str(tmp_path / 'run'), **opts)
    # Step s sees cur_nimg = 8 s: lr = 2e-3 * min(8 s / 32, 1); half-life min(20, 0.5 * 8 s); beta = 0.5 ** (8 / half-life).
    lr = [0, 0.5e-3, 1e-3, 1.5e-3, 2e-3, 2e-3, 2e-3, 2e-3]
    halflife = [0, 4, 8, 12, 16, 20, 20, 20]
    beta = [0.0] + [0.5 ** (8 / h) for h in halflife[1:]]  # half-life 0: beta = 0.5 ** (8 / 1e-8) = 0
    assert [step_lr for step_lr, _ in SpyAdam.steps] == pytest.approx(lr, rel=1e-12, abs=0)
    stats = [json.loads(line) for line in open(tmp_path / 'run' / 'stats.jsonl')]  # float32 values
    assert [s['Progress/tick']['mean'] for s in stats] == list(range(8))
    assert [s['Progress/kimg']['mean'] for s in stats] == pytest.approx([0.008 * (s + 1) for s in range(8)], rel=1e-6)
    assert [s['Progress/lr']['mean'] for s in stats] == pytest.approx(lr, rel=1e-6, abs=0)
    assert [s['Progress/ema_beta']['mean'] for s in stats] == pytest.approx(beta, rel=1e-6, abs=0)
    # The EMA by hand from the weights after each step: ema <- beta ema + (1 - beta) net.
    ema = SpyAdam.init
    for b, (_, weights) in zip(beta, SpyAdam.steps):
        ema = [b * e + (1 - b) * w for e, w in zip(ema, weights)]
    state = _state(tmp_path / 'run')
    names = [name for name, _ in checkpoint.build_network(state['class_name'], state['init_kwargs']).named_parameters()]
    snapshot = checkpoint.load_network(final).state_dict()
    for name, e, w in zip(names, ema, SpyAdam.steps[-1][1]):
        torch.testing.assert_close(snapshot[name], e, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(state['ema'][name], e, rtol=1e-5, atol=1e-7, msg=name)
        assert torch.equal(state['net'][name], w), name
    moved = [name for name, e, w in zip(names, ema, SpyAdam.steps[-1][1]) if (e - w).abs().max() > 1e-5]
    assert len(moved) > len(names) // 2  # the EMA is not the net: the check above tells them apart


def test_snapshot_and_state_hold_ema_net_optimizer_and_counters(tmp_path, data):
    opts = tiny_options(data)  # 8 steps of 8 images; ticks of 16 images after the first step, which is a tick alone
    final = tl.training_loop(str(tmp_path / 'run'), **opts)
    stats = [json.loads(line) for line in open(tmp_path / 'run' / 'stats.jsonl')]
    assert [s['Progress/kimg']['mean'] for s in stats] == pytest.approx([0.008, 0.024, 0.040, 0.056, 0.064], rel=1e-6)
    state = _state(tmp_path / 'run')
    assert state['format'] == 'sfbd-training-state' and state['cur_nimg'] == 64 and state['cur_tick'] == 5
    assert state['options']['seed'] == 1 and state['options']['batch_size'] == 8
    adam = state['optimizer']
    assert adam['param_groups'][0]['lr'] == 2e-3 and list(adam['param_groups'][0]['betas']) == [0.9, 0.999]
    assert len(adam['state']) == len(list(checkpoint.build_network(state['class_name'], state['init_kwargs']).parameters()))
    assert all(float(s['step']) == 8 for s in adam['state'].values())  # one Adam step per batch
    raw = torch.load(final, weights_only=True)
    assert raw['format'] == 'sfbd-network' and raw['kimg'] == pytest.approx(0.064)
    assert raw['dataset_kwargs'] == dict(path=data) and raw['augment_kwargs'] is None
    assert raw['state_dict'].keys() == state['ema'].keys()
    assert all(torch.equal(raw['state_dict'][k], state['ema'][k]) for k in state['ema'])
    assert sum(not torch.equal(state['net'][k], state['ema'][k]) for k in state['net']) > len(state['net']) // 2

#----------------------------------------------------------------------------
# Augmentation (both paper presets train with it) and dropout, watched through spies.

PAPER_AUGMENT = dict(class_name='training.augment.AugmentPipe', p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1,
                     translate_frac=1)  # train.py's --augment=0.12 (CIFAR-10)


def test_augment_labels_reach_the_network_in_training_and_are_none_at_sampling(tmp_path, data, monkeypatch):
    from training import augment, generation, networks, sampler
    pipe_out, model_labels = [], []
    real_pipe, real_model = augment.AugmentPipe.__call__, networks.SongUNet.forward

    def pipe_spy(self, images, rnd=None):
        pipe_out.append(real_pipe(self, images, rnd=rnd))
        return pipe_out[-1]

    def model_spy(self, x, noise_labels, class_labels, augment_labels=None):
        model_labels.append(augment_labels)
        return real_model(self, x, noise_labels, class_labels, augment_labels=augment_labels)
    monkeypatch.setattr(augment.AugmentPipe, '__call__', pipe_spy)
    monkeypatch.setattr(networks.SongUNet, 'forward', model_spy)
    opts = tiny_options(data, total_kimg=0.032, augment_kwargs=PAPER_AUGMENT)
    opts['network_kwargs'] = dict(opts['network_kwargs'], augment_dim=9)
    final = tl.training_loop(str(tmp_path / 'run'), **opts)
    trial, *model_labels = model_labels  # construct_network first tries the network on one image, without labels
    assert trial is None
    assert len(pipe_out) == len(model_labels) == 4  # one pipe call and one network call per step
    for (_, labels), seen in zip(pipe_out, model_labels):
        assert seen.shape == (8, 9) and torch.equal(seen, labels)
    flips = torch.cat([labels[:, 0] for _, labels in pipe_out])
    assert set(flips.tolist()) == {0, 1}  # x-flips at 50%: both among 32 images
    assert checkpoint.load_snapshot_info(final).augment_kwargs == PAPER_AUGMENT

    # Sampling and SFBD's backward denoising give the network no augmentation labels, which equals all-zero labels.
    net = checkpoint.load_network(final)
    model_labels.clear()
    generation.sample_images(net, [0, 1], num_steps=3)
    sampler.backward_sample(sampler.net_denoiser(net), torch.zeros(2, 3, 8, 8, dtype=torch.float64), 0.5, 8)
    assert len(model_labels) > 0 and all(labels is None for labels in model_labels)
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 2.0])
    plain = net(x, sigma)
    assert torch.equal(net(x, sigma, augment_labels=torch.zeros(2, 9)), plain)
    assert not torch.allclose(net(x, sigma, augment_labels=torch.ones(2, 9)), plain)  # the labels do condition it


def test_dropout_masks_in_training_only_and_reproducible(tmp_path, data, monkeypatch):
    real = torch.nn.functional.dropout
    calls = []

    def spy(input, p=0.5, training=True, inplace=False):
        out = real(input, p, training, inplace)
        calls.append((p, training, (out == 0) & (input != 0)))
        return out
    monkeypatch.setattr(torch.nn.functional, 'dropout', spy)
    opts = tiny_options(data, total_kimg=0.016)
    opts['network_kwargs'] = dict(opts['network_kwargs'], dropout=0.25)
    runs = {}
    for name, seed in [('a', 1), ('b', 1), ('c', 2)]:
        calls.clear()
        final = tl.training_loop(str(tmp_path / name), **dict(opts, seed=seed))
        # construct_network's trial on one image runs in eval mode, before training: no dropout there.
        trial = [c for c in calls if not c[1]]
        calls[:] = [c for c in calls if c[1]]
        assert all(not mask.any() for _, _, mask in trial)
        runs[name] = [mask for _, _, mask in calls]
        assert calls and all(p == 0.25 for p, _, _ in calls)
    per_step = len(runs['a']) // 2  # 2 steps, one network call each
    masks = torch.cat([m.flatten() for m in runs['a']]).double()
    assert masks.mean().item() == pytest.approx(0.25, abs=0.02)
    assert not torch.equal(runs['a'][0], runs['a'][per_step])  # each step draws new masks
    assert all(torch.equal(x, y) for x, y in zip(runs['a'], runs['b']))  # the same seed, the same masks
    assert not torch.equal(runs['a'][0], runs['c'][0])
    # The snapshot samples without dropout.
    calls.clear()
    from training import generation
    generation.sample_images(checkpoint.load_network(final), [0], num_steps=2)
    assert calls and not any(training for _, training, _ in calls)

#----------------------------------------------------------------------------
# File names below 1 kimg.

def test_snapshots_below_one_kimg_do_not_overwrite_each_other(tmp_path, data):
    # Ticks end after 8 images (the first step), then every 16: 24, 40, 56, and the end at 64.
    tl.training_loop(str(tmp_path / 'run'), **tiny_options(data, state_dump_ticks=1))
    names = sorted(f for f in os.listdir(tmp_path / 'run') if f.startswith('network-snapshot-'))
    assert names == [f'network-snapshot-000000.{n:03d}.pt' for n in (8, 24, 40, 56, 64)]
    assert [checkpoint.load_snapshot_info(str(tmp_path / 'run' / n)).kimg for n in names] == [0.008, 0.024, 0.04, 0.056, 0.064]
    assert tl.find_latest_state(str(tmp_path / 'run')).endswith('training-state-000000.064.pt')


def test_names_at_and_above_one_kimg_stay_edms_and_sort_by_number(tmp_path):
    for name in ['000000.512', '000000.064', '000001', '000002', '000000']:
        (tmp_path / f'training-state-{name}.pt').write_bytes(b'')
    assert tl.find_latest_state(str(tmp_path)).endswith('training-state-000002.pt')
    tl._prune(str(tmp_path), tl._STATE_RE, keep=3)
    assert sorted(os.listdir(tmp_path)) == ['training-state-000000.512.pt', 'training-state-000001.pt', 'training-state-000002.pt']
    assert sorted(os.listdir(tmp_path)) == sorted(os.listdir(tmp_path), key=lambda f: float(f[15:-3]))  # names sort as numbers

#----------------------------------------------------------------------------
# A run directory holds one run; a resume keeps the run's options.

def test_resume_refuses_other_options_and_allows_a_longer_run(tmp_path, data):
    run = tmp_path / 'run'
    opts = tiny_options(data, total_kimg=0.032)
    tl.training_loop(str(run), **opts)
    other = make_image_folder(tmp_path / 'other', num=8)
    for change, name in [(dict(dataset_kwargs=dict(path=other)), 'dataset_kwargs.path (--data)'),
                         (dict(optimizer_kwargs=dict(opts['optimizer_kwargs'], lr=1e-4)), 'optimizer_kwargs.lr (--lr)'),
                         (dict(batch_size=16), 'batch_size (--batch)')]:
        with pytest.raises(UserError, match='was trained with other options') as e:
            tl.training_loop(str(tmp_path / 'new'), **dict(opts, resume=str(run), **change))
        assert name in str(e.value) and '\n' not in str(e.value)
        assert not (tmp_path / 'new').exists()
    # The duration, the bookkeeping and the seed (the state's wins) may change: the run goes on to 0.048 kimg.
    tl.training_loop(str(run), **dict(opts, resume=str(run), total_kimg=0.048, kimg_per_tick=0.008, keep_last=2, seed=5))
    assert _state(run)['cur_nimg'] == 48 and _state(run)['options']['seed'] == opts['seed']


def test_a_run_directory_holds_one_run(tmp_path, data):
    run = tmp_path / 'run'
    opts = tiny_options(data, total_kimg=0.016)
    tl.training_loop(str(run), **opts)
    before = sorted(os.listdir(run))
    with pytest.raises(UserError, match=r'holds a training run with other options \(optimizer_kwargs.lr \(--lr\)'):
        tl.training_loop(str(run), **dict(opts, optimizer_kwargs=dict(opts['optimizer_kwargs'], lr=1e-4)))
    with pytest.raises(UserError, match='already holds the training states'):
        tl.training_loop(str(run), **opts)  # the same options from scratch would overwrite its states
    assert sorted(os.listdir(run)) == before


def test_resume_keeps_the_stats_record_of_the_states_own_tick(tmp_path):
    # Progress/kimg went through float32: 3.088 kimg is logged as 3.0880000591..., above 3.088.
    logged = [float(np.float32(k)) for k in (3.072, 3.088, 3.104)]
    assert logged[1] > 3.088
    path = tmp_path / 'stats.jsonl'
    path.write_text(''.join(json.dumps({'Progress/kimg': {'mean': k}}) + '\n' for k in logged))
    tl._truncate_stats(str(path), 3088 / 1e3)
    assert [json.loads(line)['Progress/kimg']['mean'] for line in open(path)] == logged[:2]

#----------------------------------------------------------------------------
# Divergence and non-finite data: one line.

class NaNLoss(EDMLoss):
    """The EDM loss made NaN: the gradients are sanitized to zero, so the weights stay finite."""

    def __call__(self, *args, **kwargs):
        return super().__call__(*args, **kwargs) * float('nan')


def test_a_loss_that_stays_nan_stops_training(tmp_path, data):
    run = tmp_path / 'run'
    opts = tiny_options(data, total_kimg=0.2, loss_kwargs=dict(class_name='tests.test_training_loop.NaNLoss'))
    with pytest.raises(UserError, match='the loss was not finite for 10 steps in a row') as e:
        tl.training_loop(str(run), **opts)
    assert '\n' not in str(e.value) and 'Training diverged at 0.088 kimg' in str(e.value)  # the tick of step 10: 11 steps
    assert _state(run)['cur_nimg'] < 88 and not (run / 'run.lock').exists()


def test_weights_that_overflow_stop_training(tmp_path, data):
    run = tmp_path / 'run'
    opts = tiny_options(data, total_kimg=0.2, optimizer_kwargs=dict(tiny_options(data)['optimizer_kwargs'], lr=1e308))
    with pytest.raises(UserError, match='Training diverged'):
        tl.training_loop(str(run), **opts)
    for name in os.listdir(run):  # what was saved before is still usable
        if name.endswith('.pt'):
            net = checkpoint.load_network(str(run / name))
            assert all(torch.isfinite(p).all() for p in net.parameters()), name


def test_non_finite_training_data_is_refused_before_the_run_dir(tmp_path):
    images = np.random.default_rng(0).uniform(-1, 1, size=[32, 3, 8, 8]).astype(np.float32)
    images[5, 0, 3, 3] = np.nan
    with ArrayDatasetWriter(str(tmp_path / 'floats'), 32, [3, 8, 8], np.float32) as w:
        w.write(0, images)
    with pytest.raises(UserError, match='not finite .* image 5'):
        tl.training_loop(str(tmp_path / 'run'), **tiny_options(str(tmp_path / 'floats')))
    assert not (tmp_path / 'run').exists()

#----------------------------------------------------------------------------
# Network options that cannot work fail before the run directory exists.

@pytest.mark.parametrize('change, match', [
    (dict(attn_resolutions=[7]), r'--attn=7: the network has no 7x7 level; .* resolutions are 8,4'),
    (dict(channel_mult=[1, 2, 2, 2, 2]), 'cannot run on 8x8 images'),
    (dict(channel_mult=[]), '--cres is empty'),
    (dict(model_channels=1), 'cannot run on 8x8 images'),
])
def test_network_options_that_cannot_work(tmp_path, data, change, match):
    opts = tiny_options(data)
    with pytest.raises(UserError, match=match):
        tl.training_loop(str(tmp_path / 'run'), **dict(opts, network_kwargs=dict(opts['network_kwargs'], **change)))
    assert not (tmp_path / 'run').exists()


def test_attention_at_an_existing_resolution_is_built(tmp_path, data):
    opts = tiny_options(data, total_kimg=0.008)
    tl.training_loop(str(tmp_path / 'run'), **dict(opts, network_kwargs=dict(opts['network_kwargs'], attn_resolutions=[4])))
    assert any('.attn.' in name or 'qkv' in name for name in _state(tmp_path / 'run')['net'])

#----------------------------------------------------------------------------
# The run directory lock.

def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, data, capsys):
    from torch_utils import lock
    run = tmp_path / 'run'
    run.mkdir()
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    pid = int(dead.stdout)  # that process has exited; should the pid be reused, the start time tells them apart
    (run / 'run.lock').write_text(json.dumps(dict(lock.machine(), pid=pid, process_start=1.0, started='earlier', command='killed run')))
    tl.training_loop(str(run), **tiny_options(data, total_kimg=0.008))
    assert f'Took over the lock of {run} from pid {pid}' in capsys.readouterr().out
    assert not (run / 'run.lock').exists() and (run / 'training_options.json').exists()


def test_a_lock_of_another_machine_needs_break_lock(tmp_path, data):
    from torch_utils import lock
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'run.lock').write_text(json.dumps(dict(lock.machine(), host='node-b', boot_id='other', pid=os.getpid(), command='python train.py')))
    with pytest.raises(UserError, match=r'in use by another process: pid \d+ on host node-b.*--break-lock') as e:
        tl.training_loop(str(run), **tiny_options(data, total_kimg=0.008))
    assert '\n' not in str(e.value) and os.listdir(run) == ['run.lock']
    # Without a heartbeat for longer than FOREIGN_STALE_SEC it is taken over; so with break_lock.
    old = time.time() - lock.FOREIGN_STALE_SEC - 60
    os.utime(run / 'run.lock', (old, old))
    tl.training_loop(str(run), **tiny_options(data, total_kimg=0.008))
    (run / 'run.lock').write_text(json.dumps(dict(lock.machine(), host='node-b', pid=1, command='python train.py')))
    tl.training_loop(str(run), break_lock=True, **tiny_options(data, total_kimg=0.016, resume=str(run)))
    assert not (run / 'run.lock').exists()


def test_a_live_holder_on_this_machine_is_never_taken_over(tmp_path, data):
    from torch_utils import lock
    run = tmp_path / 'run'
    with lock.run_lock(str(run)):
        old = time.time() - 10 * lock.FOREIGN_STALE_SEC  # however old its heartbeat
        os.utime(run / 'run.lock', (old, old))
        with pytest.raises(UserError, match=f'in use by another process: pid {os.getpid()} on host'):
            tl.training_loop(str(run), break_lock=True, **tiny_options(data, total_kimg=0.008))
        assert os.listdir(run) == ['run.lock']
    assert os.listdir(run) == []


def test_a_run_moved_together_with_its_data_resumes(tmp_path, data):
    # SFBD's fine-tunes train on E_k beside their run directory; the whole SFBD run directory may move.
    import shutil
    shutil.copytree(data, tmp_path / 'a' / 'data')
    tl.training_loop(str(tmp_path / 'a' / 'run'), **tiny_options(str(tmp_path / 'a' / 'data'), total_kimg=0.016))
    shutil.move(tmp_path / 'a', tmp_path / 'b')
    b = tmp_path / 'b'
    tl.training_loop(str(b / 'run'), **tiny_options(str(b / 'data'), total_kimg=0.032, resume=str(b / 'run')))
    assert _state(b / 'run')['cur_nimg'] == 32


def test_only_one_process_replaces_a_stale_lock(tmp_path):
    from torch_utils import lock
    run = tmp_path / 'run'
    run.mkdir()
    pid = int(subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True).stdout)
    (run / 'run.lock').write_text(json.dumps(dict(lock.machine(), pid=pid, process_start=1.0, started='earlier', command='killed run')))
    (run / 'run.lock.takeover').touch()  # another process is replacing the stale lock right now
    with pytest.raises(UserError, match=f'another process is taking over the stale lock of pid {pid}'):
        lock.RunLock(str(run)).acquire()
    old = time.time() - 120  # that takeover was itself killed midway, a minute ago
    os.utime(run / 'run.lock.takeover', (old, old))
    held = lock.RunLock(str(run))
    held.acquire()
    assert json.loads((run / 'run.lock').read_text())['pid'] == os.getpid()
    held.release()
    assert os.listdir(run) == []
