"""sfbd: Algorithm 1 end to end on 8x8 digits; every index once in E_k; 1 = 2 processes; resume after interruptions; clean mix; bad input."""

import json
import math
import os
import shutil
import signal

import click
import numpy as np
import pytest
import torch

import dnnlib
import sfbd as sfbd_cli
from tests.conftest import killed_after_first_state, run_python
from torch_utils import perf
from training import checkpoint, data_prep, metrics, options, sampler, sfbd, training_loop
from training.dataset import ArrayDatasetWriter, open_dataset
from training.images import to_model_space, to_uint8
from training.networks import EDMPrecond

SIGMA = 0.2
NUM_NOISY = 64

pytestmark = [pytest.mark.filterwarnings('ignore::RuntimeWarning'),  # FID of 128 pixel vectors: singular covariances
              pytest.mark.usefixtures('one_thread')]


#----------------------------------------------------------------------------
# Data: 96 digits (8x8 grey), 32 clean, 64 corrupted once; FID reference from all 96 originals (pixels).

@pytest.fixture(scope='module')
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp('sfbd-data')
    d = {name: str(root / name) for name in ('all', 'clean', 'rest', 'noisy')}
    data_prep.convert_dataset('sklearn-digits', d['all'], max_images=96, verbose=False)
    data_prep.split_dataset(d['all'], '32', 0, d['clean'], d['rest'], verbose=False)
    data_prep.corrupt_dataset(d['rest'], d['noisy'], SIGMA, 0, verbose=False)
    d['ref'] = str(root / 'ref.npz')
    metrics.make_ref(d['all'], d['ref'], 'pixels')
    return d


def cli_args(data: dict, outdir, *extra: str) -> list[str]:
    """The tiny preset (pretraining 1 kimg), two iterations, short phases; states dumped every 4 steps so a
    resume has one; fp32 throughout (the exact reference mode: the byte-equality checks below compare runs)."""
    return ['--config=tiny', '--precision=fp32', f'--outdir={outdir}', f'--clean={data["clean"]}', f'--noisy={data["noisy"]}',
            f'--fid-ref={data["ref"]}', '--detector=pixels', '--iters=2', '--finetune-kimg=0.128',
            '--tick=0.032', '--dump=2', '--denoise-steps=8', '--denoise-batch=12', '--eval-num=128', '--eval-steps=8',
            '--grid=16', '--strip=6', *extra]


def run_cli(args: list[str]) -> None:
    sfbd_cli.main.main(args=args, standalone_mode=False)


class _BatchSpy(training_loop.BatchOrder):
    """Records, for every training run, the size of the main data set and the rows of each global batch."""
    runs: list = []

    def __init__(self, main_size: int, *args, **kwargs):
        super().__init__(main_size, *args, **kwargs)
        self.rows = []
        _BatchSpy.runs.append((main_size, self.rows))

    def global_batch(self, step: int) -> np.ndarray:
        rows = super().global_batch(step)
        self.rows.append(rows)
        return rows


@pytest.fixture(scope='module')
def run_a(data, tmp_path_factory) -> dict:
    """An uninterrupted run: pretraining and 2 iterations, with the fine-tune batches, every training_loop call
    (its options and the snapshot it returned) and every denoising call (its network's weights and options) recorded."""
    outdir = tmp_path_factory.mktemp('run-a') / 'run'
    _BatchSpy.runs = []
    trainings, denoisings = [], []
    real_train, real_denoise = training_loop.training_loop, sfbd.denoise_dataset

    def train_spy(run_dir, **kwargs):
        snapshot = real_train(run_dir, **kwargs)
        trainings.append(dict(kwargs, returned=snapshot))
        return snapshot

    def denoise_spy(net, noisy, dest, **kwargs):
        denoisings.append(dict(kwargs, dest=dest, weights={k: v.clone() for k, v in net.state_dict().items()}))
        return real_denoise(net, noisy, dest, **kwargs)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training_loop, 'BatchOrder', _BatchSpy)
        mp.setattr(training_loop, 'training_loop', train_spy)
        mp.setattr(sfbd, 'denoise_dataset', denoise_spy)
        run_cli(cli_args(data, outdir))
    return dict(dir=str(outdir), batches=list(_BatchSpy.runs), trainings=trainings, denoisings=denoisings)


def read_records(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def final_state_dict(run_dir) -> dict:
    done = json.load(open(os.path.join(run_dir, 'iter-002', 'DONE')))
    return checkpoint.load_network(os.path.join(run_dir, done['network'])).state_dict()

#----------------------------------------------------------------------------

def test_end_to_end_metrics_and_plots(run_a, data):
    run_dir = run_a['dir']
    records = read_records(run_dir)
    assert [r['k'] for r in records] == [0, 1, 2]
    for r in records:
        assert math.isfinite(r['fid']) and r['fid'] > 0 and r['fid_detector'] == 'pixels' and r['fid_num'] == 128
        assert os.path.isfile(os.path.join(run_dir, r['network']))
    for r in records[1:]:
        # Denoising must beat the noisy input, whose MSE against the originals is about sigma^2.
        assert 0 < r['denoise_mse'] < SIGMA ** 2
        assert r['denoise_psnr'] == pytest.approx(10 * math.log10(4 / r['denoise_mse']))
    for name in ['sfbd_options.json', 'log.txt', 'metrics.png', 'pretrain/finished.json', 'iter-000/samples.png',
                 'iter-000/DONE', 'iter-001/strip.png', 'iter-002/samples.png', 'iter-002/finetune/finished.json']:
        assert os.path.isfile(os.path.join(run_dir, name)), name
    import PIL.Image
    assert PIL.Image.open(os.path.join(run_dir, 'iter-001', 'strip.png')).size == (6 * 9 - 1, 3 * 9 - 1)  # 6 images x 3 rows
    assert PIL.Image.open(os.path.join(run_dir, 'iter-002', 'samples.png')).size == (4 * 9 - 1, 4 * 9 - 1)
    log = open(os.path.join(run_dir, 'log.txt')).read()
    assert 'SFBD summary' in log and 'Final network' in log and 'Denoising E_2' in log
    noisy = open_dataset(data['noisy'])
    for k in (1, 2):
        e_k = open_dataset(os.path.join(run_dir, f'iter-{k:03d}', 'denoised'))
        assert len(e_k) == NUM_NOISY and e_k.dtype == np.uint8 and e_k.sigma is None
        assert e_k.metadata['sfbd_iteration'] == k and e_k.metadata['precision'] == 'fp32' and e_k.metadata['source_indices'] == noisy.metadata['source_indices']
        assert not os.path.exists(os.path.join(run_dir, f'iter-{k:03d}', 'denoised.parts'))


def test_algorithm1_wiring(run_a, data):
    """Algorithm 1 with the command line's numbers: pretrain on D_clean; then for k = 1, 2 denoise D_noisy from
    sigma_tau = the noisy set's sigma with model k-1 and fine-tune model k-1 (not model 0) on it, seed k."""
    pre, ft1, ft2 = run_a['trainings']
    assert pre['dataset_kwargs']['path'] == data['clean'] and pre.get('transfer') is None
    assert pre['seed'] == 0 and pre['total_kimg'] == 1 and pre['network_kwargs'] is not None
    tiny = dnnlib.cli.load_preset('tiny')['train']
    for k, (ft, previous) in enumerate([(ft1, pre), (ft2, ft1)], start=1):
        assert ft['transfer'] == previous['returned'], f'fine-tune {k} must start from model {k - 1}'
        assert ft['seed'] == k and ft['total_kimg'] == 0.128 and ft['network_kwargs'] is None and ft['ema_rampup_ratio'] is None
        assert ft['optimizer_kwargs']['lr'] == tiny['lr'] and ft['lr_rampup_kimg'] == tiny['lr_rampup']
        assert ft['ema_halflife_kimg'] == tiny['ema'] * 1000 and ft['batch_size'] == tiny['batch']
        assert ft['dataset_kwargs']['path'][1] == os.path.join(run_a['dir'], f'iter-{k:03d}', 'denoised')
    assert len(run_a['denoisings']) == 2
    for k, (call, model) in enumerate(zip(run_a['denoisings'], [pre, ft1]), start=1):
        assert call['sigma_tau'] == SIGMA and call['k'] == k and call['seed'] == 0
        assert call['num_steps'] == 8 and call['solver'] == 'ode' and call['batch_size'] == 12
        assert call['dest'] == os.path.join(run_a['dir'], f'iter-{k:03d}', 'denoised')
        expected = checkpoint.load_network(model['returned']).state_dict()
        assert expected.keys() == call['weights'].keys()
        assert all(torch.equal(expected[name], call['weights'][name]) for name in expected), f'E_{k} must come from model {k - 1}'


def test_finetunes_train_on_the_union_of_clean_and_denoised_by_default(run_a, data):
    (pre_size, pre_rows), *finetunes = run_a['batches']
    assert pre_size == 32 and len(finetunes) == 2
    for main_size, rows in finetunes:
        # One set of 32 clean + 64 denoised images; a fine-tune of 128 images sees a whole epoch of it first.
        assert main_size == 32 + NUM_NOISY
        assert set(np.concatenate(rows[:6]).tolist()) == set(range(32 + NUM_NOISY))
    options = json.load(open(os.path.join(run_a['dir'], 'iter-001', 'finetune', 'training_options.json')))
    assert options['dataset_kwargs']['path'] == [data['clean'], os.path.join(run_a['dir'], 'iter-001', 'denoised')]
    assert options['mix_dataset_kwargs'] is None and options['mix_fraction'] == 0


TRAIN_KWARGS = dict(network_kwargs=dict(class_name='training.networks.EDMPrecond'))


@pytest.mark.parametrize('mode, path, mix', [('union', ['C', 'E'], None), ('denoised', 'E', None), ('mix', 'E', 'C')])
def test_finetune_data_modes(mode, path, mix):
    o = options.SFBDOptions(clean='C', noisy='N', train_kwargs=dict(TRAIN_KWARGS, batch_size=16), finetune_data=mode,
                            clean_mix=0.25 if mode == 'mix' else 0)
    o.check()
    ft = options.finetune_kwargs(o, 3, 'net.pt', 'E')
    assert ft['dataset_kwargs']['path'] == path and ft['transfer'] == 'net.pt' and ft['seed'] == 3
    assert (ft.get('mix_dataset_kwargs') or {}).get('path') == mix and ft.get('mix_fraction', 0) == (0.25 if mix else 0)


@pytest.mark.parametrize('mode, clean_mix', [('union', 0.5), ('denoised', 0.1), ('mix', 0)])
def test_clean_mix_goes_with_mix_only(mode, clean_mix):
    with pytest.raises(dnnlib.UserError, match='--finetune-data=mix'):
        options.SFBDOptions(clean='C', noisy='N', train_kwargs=TRAIN_KWARGS, finetune_data=mode, clean_mix=clean_mix).check()


def test_schedule_warns_when_the_warmup_outlasts_a_finetune():
    o = options.SFBDOptions(clean='C', noisy='N', train_kwargs=dict(lr_rampup_kimg=10000), finetune_kimg=2000)
    [warning] = options.schedule_warnings(o)
    assert '10000 kimg' in warning and '2000 kimg' in warning and '20%' in warning
    assert options.schedule_warnings(options.SFBDOptions(clean='C', noisy='N', train_kwargs={}, finetune_kimg=2000,
                                                         finetune_lr_rampup_kimg=500)) == []


def test_audit_of_every_evaluated_model(run_a, data, tmp_path):
    pretrained = os.path.join(run_a['dir'], 'pretrain', 'network-snapshot-000001.pt')
    run_cli(cli_args(data, tmp_path / 'audit', f'--pretrained={pretrained}', '--iters=1', '--eval-every=0',
                     '--audit-num=24', f'--audit-heldout={data["all"]}'))
    records = read_records(tmp_path / 'audit')
    assert [r['k'] for r in records] == [0, 1]
    for r in records:
        assert r['audit_num'] == 24 and 0 <= r['audit_gu_rate'] <= 1 and 0 <= r['audit_share_below_heldout_p05'] <= 1
        report = json.load(open(tmp_path / 'audit' / f'iter-{r["k"]:03d}' / 'audit' / 'audit.json'))
        # The references are the clean set and the noisy set's originals; the "held-out" set here holds both, and says so.
        assert {name: e['num_images'] for name, e in report['references'].items()} == {'clean': 32, 'originals': NUM_NOISY}
        assert report['num_samples'] == 24 and report['num_heldout'] == 96 and report['warnings']


class Interrupt(Exception):
    """Stands for a kill at that point: the run stops there, leaving its files as they are."""


class _Identity(torch.nn.Module):
    """D(x; sigma) = x: the backward ODE then leaves each image where it starts, so E_k = uint8(noisy)."""
    sigma_min, sigma_max, label_dim = 0, float('inf'), 0

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None):
        return x


def test_every_noisy_index_once_and_chunks_kept(data, tmp_path, monkeypatch):
    noisy = open_dataset(data['noisy'])
    expect = to_uint8(to_model_space(torch.from_numpy(np.stack([noisy[i][0] for i in range(len(noisy))])))).numpy()
    dest = str(tmp_path / 'E')
    calls = []
    real = sampler.backward_sample

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3 and kill:
            raise Interrupt('killed')
        return real(*args, **kwargs)
    monkeypatch.setattr(sampler, 'backward_sample', counted)
    kwargs = dict(sigma_tau=SIGMA, num_steps=8, solver='ode', seed=0, k=1, batch_size=7)  # 64 = 9 x 7 + 1: a last partial batch
    kill = True
    with pytest.raises(Interrupt):
        sfbd.denoise_dataset(_Identity(), noisy, dest, **kwargs)
    assert len(os.listdir(dest + '.parts')) == 2 and not os.path.exists(dest)
    calls.clear()
    kill = False
    os.makedirs(tmp_path / '.E.abc123.tmp')  # what a merge killed midway leaves behind
    sfbd.denoise_dataset(_Identity(), noisy, dest, **kwargs)
    assert len(calls) == 10 - 2  # the two finished chunks were kept
    assert sorted(os.listdir(tmp_path)) == ['E'], 'no temporary directory may outlive the merge'
    e_k = open_dataset(dest)
    np.testing.assert_array_equal(e_k.images, expect)  # row i is noisy image i: none lost, none duplicated
    assert not os.path.exists(dest + '.parts')
    e_float = open_dataset(sfbd.denoise_dataset(_Identity(), noisy, str(tmp_path / 'F'), dtype='float32', **kwargs))
    assert e_float.dtype == np.float32 and np.array_equal(e_float.images, noisy.images)


def test_one_and_two_processes_give_identical_e1(run_a, data, tmp_path, torchrun):
    pretrained = os.path.join(run_a['dir'], 'pretrain', 'network-snapshot-000001.pt')
    assert os.path.isfile(pretrained)
    extra = [f'--pretrained={pretrained}', '--iters=1', '--denoise-solver=sde', '--eval-every=0', '--finetune-data=mix', '--clean-mix=0.5']
    _BatchSpy.runs = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training_loop, 'BatchOrder', _BatchSpy)
        run_cli(cli_args(data, tmp_path / 'one', *extra))
    torchrun([os.path.join(os.path.dirname(sfbd_cli.__file__), 'sfbd.py'), *cli_args(data, tmp_path / 'two', *extra)])
    one = np.load(tmp_path / 'one' / 'iter-001' / 'denoised' / 'images.npy')
    two = np.load(tmp_path / 'two' / 'iter-001' / 'denoised' / 'images.npy')
    assert one.shape == (NUM_NOISY, 1, 8, 8) and one.tobytes() == two.tobytes()
    assert os.path.isfile(tmp_path / 'two' / 'iter-001' / 'DONE')
    # The positive control of the clean-mix check: half of each fine-tune batch comes from the clean set.
    [(main_size, rows)] = _BatchSpy.runs
    assert all((r >= main_size).sum() == 8 for r in rows)


_KILLED_AFTER_STATE = killed_after_first_state('sfbd')


def test_resume_after_kills_equals_uninterrupted(run_a, data, tmp_path, monkeypatch):
    run_b = tmp_path / 'run'
    shutil.copytree(run_a['dir'], run_b)
    shutil.rmtree(run_b / 'iter-002')  # as if killed when iteration 2 began
    args = cli_args(data, run_b)
    denoise_calls = []
    real_sample, real_fid = sampler.backward_sample, metrics.fid_from_stats

    def sample(*a, **kw):
        denoise_calls.append(1)
        if len(denoise_calls) == 3:
            raise Interrupt('during denoising')
        return real_sample(*a, **kw)

    def fid(*a, **kw):
        raise Interrupt('during evaluation')

    monkeypatch.setattr(sampler, 'backward_sample', sample)
    with pytest.raises(Interrupt, match='denoising'):
        run_cli(args)
    assert len(os.listdir(run_b / 'iter-002' / 'denoised.parts')) == 2

    res = run_python(['-c', _KILLED_AFTER_STATE, *args], check=False, env={'OMP_NUM_THREADS': '1'})
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert 'Denoising E_2' in res.stdout and os.path.isfile(run_b / 'iter-002' / 'denoised' / 'images.npy')
    assert training_loop.find_latest_state(str(run_b / 'iter-002' / 'finetune'))
    assert not os.path.exists(run_b / 'iter-002' / 'finetune' / 'finished.json')

    monkeypatch.setattr(metrics, 'fid_from_stats', fid)
    with pytest.raises(Interrupt, match='evaluation'):
        run_cli(args)
    assert os.path.isfile(run_b / 'iter-002' / 'finetune' / 'finished.json')
    assert not os.path.exists(run_b / 'iter-002' / 'DONE')

    monkeypatch.setattr(metrics, 'fid_from_stats', real_fid)
    run_cli(args)
    assert len(denoise_calls) == 3  # E_2 was finished by the killed process, and not redone
    a_dir = run_a['dir']
    name = 'iter-002/denoised/images.npy'
    assert open(os.path.join(a_dir, name), 'rb').read() == open(run_b / name, 'rb').read()
    a, b = final_state_dict(a_dir), final_state_dict(run_b)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    strip = lambda records: [{k: v for k, v in r.items() if k != 'sec'} for r in records]
    assert strip(read_records(a_dir)) == strip(read_records(run_b))

#----------------------------------------------------------------------------
# Bad input: one line, before anything is written.

def _bad_inputs(data: dict, root) -> dict:
    small = dict(img_resolution=16, img_channels=1, model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    checkpoint.save_network(str(root / 'net16.pt'), EDMPrecond(**small))
    os.makedirs(root / 'bare')
    np.save(root / 'bare' / 'images.npy', np.zeros([4, 1, 8, 8], np.float32))
    data_prep.convert_dataset('sklearn-digits', str(root / 'big'), resolution='16x16', max_images=4, verbose=False)
    with open(root / 'ref10.npz', 'wb') as f:
        np.savez(f, mu=np.zeros(10), sigma=np.eye(10))
    return {
        'resolution': ([f'--clean={root / "big"}'], 'clean set holds 16x16'),
        'no metadata': ([f'--noisy={root / "bare"}'], 'needs images.npy and dataset.json'),
        'clean as noisy': ([f'--noisy={data["clean"]}'], 'has no noise level'),
        'sigma': (['--sigma=0.3'], 'contradicts'),
        'pretrained': ([f'--pretrained={root / "net16.pt"}'], 'takes 16x16 images'),
        'ref': ([f'--fid-ref={root / "ref10.npz"}'], '10-d statistics'),
        'iters': (['--iters=0'], '--iters'),
    }


def test_bad_input_one_line(data, tmp_path):
    for what, (extra, message) in _bad_inputs(data, tmp_path).items():
        outdir = tmp_path / f'out-{what}'
        with pytest.raises(click.ClickException) as e:
            run_cli(cli_args(data, outdir, *extra))
        text = e.value.format_message()
        assert message in text and '\n' not in text, (what, text)
        assert not os.path.exists(outdir / 'sfbd_options.json'), what


def test_rerun_with_other_options_refused(run_a, data):
    with pytest.raises(click.ClickException, match='other options') as e:
        run_cli(cli_args(data, run_a['dir'], '--finetune-kimg=0.5'))
    assert 'finetune_kimg' in e.value.format_message()


def test_precision_options(data, tmp_path, monkeypatch):
    """--precision=auto (the default) resolves for this machine; denoising follows it unless told; FID sampling stays fp32."""
    from tests.test_train_cli import native_bf16
    calls = []
    monkeypatch.setattr(sfbd_cli.sfbd, 'run_sfbd', lambda run_dir, **kwargs: calls.append(kwargs))
    base = [a for a in cli_args(data, tmp_path) if a != '--precision=fp32']
    for extra in [[], ['--precision=fp32'], ['--fp16=1'], ['--denoise-precision=fp32', '--eval-precision=auto', '--channels-last=1']]:
        run_cli(base + extra)
    got = [(c['train_kwargs']['precision'], c['denoise_precision'], c['eval_precision']) for c in calls]
    auto = native_bf16()
    assert got == [(auto, auto, 'fp32'), ('fp32', 'fp32', 'fp32'), ('fp16', 'fp32', 'fp32'), (auto, 'fp32', auto)]
    assert calls[-1]['train_kwargs']['channels_last'] is True and calls[0]['train_kwargs']['channels_last'] is False


def test_inference_network_follows_the_options(run_a, monkeypatch):
    """Denoising and sampling get the network prepared with the run's precision and train_kwargs' channels_last."""
    monkeypatch.setattr(perf, 'device_has_bf16', lambda device: True)
    network = os.path.join(run_a['dir'], 'pretrain', 'network-snapshot-000001.pt')
    o = dnnlib.EasyDict(train_kwargs=dict(channels_last=True))
    net = sfbd._inference_net(network, 'bf16', o, torch.device('cpu'))
    assert isinstance(net, perf.FastInference) and net.bf16 and net.channels_last and not net.training
    assert not sfbd._inference_net(network, 'fp32', dnnlib.EasyDict(train_kwargs={}), torch.device('cpu')).training


def test_help_mentions_units_and_pickles():
    text = sfbd_cli.main.get_help(click.Context(sfbd_cli.main))
    assert '[-1, 1]' in text and 'pickle can run code' in text and '--cbase' in text


def test_more_iterations_extend_a_finished_run(run_a, data, tmp_path):
    run_c = tmp_path / 'run'
    shutil.copytree(run_a['dir'], run_c)
    _BatchSpy.runs = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training_loop, 'BatchOrder', _BatchSpy)
        run_cli(cli_args(data, run_c, '--iters=3'))
    assert len(_BatchSpy.runs) == 1  # only fine-tune 3 trained: pretraining and iterations 1, 2 were done
    assert [r['k'] for r in read_records(run_c)] == [0, 1, 2, 3]
    assert read_records(run_c)[:3] == read_records(run_a['dir'])

#----------------------------------------------------------------------------
# One process per run directory.

# An sfbd.py process that holds its run directory: it waits in Algorithm 1 until RELEASE exists.
_HOLDER = '''
import os, sys, time
from training import sfbd
def wait(o, run):
    open(os.environ['READY'], 'w').close()
    deadline = time.time() + 120
    while not os.path.exists(os.environ['RELEASE']) and time.time() < deadline:
        time.sleep(0.1)
    return 'held'
sfbd._algorithm1 = wait
import sfbd as cli
cli.main(sys.argv[1:])
'''


def test_a_second_sfbd_process_on_one_outdir_is_refused(data, tmp_path):
    from tests.test_train_cli import one_error_line, start_holder
    run = tmp_path / 'run'
    args = cli_args(data, run)
    holder = start_holder(_HOLDER, args, tmp_path)
    try:
        os.makedirs(run / 'pretrain')  # what the holder would be training in
        before = {f: os.path.getmtime(run / f) for f in os.listdir(run)}
        second = run_python(['sfbd.py', *args], check=False, env={'OMP_NUM_THREADS': '1'})
        line = one_error_line(second.stdout + second.stderr)
        assert second.returncode == 1 and f'{run} is in use by another process: pid {holder.pid} on host' in line
        assert {f: os.path.getmtime(run / f) for f in os.listdir(run)} == before  # nothing deleted, nothing written
    finally:
        (tmp_path / 'release').touch()
        out = holder.communicate(timeout=120)[0]
    assert holder.returncode == 0, out[-3000:]
    assert sorted(os.listdir(run)) == ['log.txt', 'pretrain', 'sfbd_options.json']  # the lock released


class _NaNNet(_Identity):
    def forward(self, x, sigma, class_labels=None):
        return x * float('nan')


def test_denoising_never_stores_non_finite_images(data, tmp_path):
    noisy = open_dataset(data['noisy'])
    kwargs = dict(sigma_tau=SIGMA, num_steps=8, solver='ode', seed=0, k=1, batch_size=16)
    with pytest.raises(click.ClickException, match='model 0 gave values that are not finite for 4 chunk'):
        sfbd.denoise_dataset(_NaNNet(), noisy, str(tmp_path / 'E'), **kwargs)
    assert not os.path.exists(tmp_path / 'E') and os.listdir(tmp_path / 'E.parts') == []
    images = noisy.images.copy()
    images[20, 0, 1, 1] = np.inf
    bad = write_array_set(str(tmp_path / 'inf'), images, noisy.metadata)
    with pytest.raises(click.ClickException, match='1 chunk\\(s\\) of the noisy set hold values that are not finite'):
        sfbd.denoise_dataset(_Identity(), open_dataset(bad), str(tmp_path / 'F'), **kwargs)
    assert len(os.listdir(tmp_path / 'F.parts')) == 3 and not os.path.exists(tmp_path / 'F')  # the good chunks are kept


def write_array_set(dest: str, images: np.ndarray, metadata: dict) -> str:
    """An array dataset of `images` with another set's metadata (less the keys the writer sets itself)."""
    meta = {k: v for k, v in metadata.items() if k not in ('kind', 'count', 'dtype', 'resolution', 'channels', 'labels')}
    with ArrayDatasetWriter(dest, len(images), list(images.shape[1:]), images.dtype, metadata=meta) as w:
        w.write(0, images)
    return dest


#----------------------------------------------------------------------------
# Bad input: a battery. Every case is one line naming the input and the fix, exit 1 (2 for click's usage
# errors), no traceback, and no run directory left behind.

def _noisy_variant(data: dict, dest, sigma=SIGMA, values=None) -> str:
    """A copy of the noisy set whose dataset.json says `sigma` (any JSON value) and whose values are `values`."""
    noisy = open_dataset(data['noisy'])
    images = noisy.images.copy() if values is None else values(noisy.images.copy())
    write_array_set(str(dest), images, noisy.metadata)
    meta = json.load(open(os.path.join(dest, 'dataset.json')))
    meta['sigma'] = sigma
    json.dump(meta, open(os.path.join(dest, 'dataset.json'), 'w'))
    return str(dest)


@pytest.fixture(scope='module')
def bad(data, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp('bad-sfbd')
    tiny = dict(model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    checkpoint.save_network(str(root / 'net16.pt'), EDMPrecond(img_resolution=16, img_channels=1, **tiny))
    checkpoint.save_network(str(root / 'cond.pt'), EDMPrecond(img_resolution=8, img_channels=1, label_dim=10, **tiny))
    checkpoint.save_network(str(root / 'plain8.pt'), EDMPrecond(img_resolution=8, img_channels=1, **tiny))
    nan_net = EDMPrecond(img_resolution=8, img_channels=1, **tiny)
    with torch.no_grad():
        next(nan_net.parameters()).fill_(float('nan'))
    checkpoint.save_network(str(root / 'nan.pt'), nan_net)
    (root / 'junk.pt').write_bytes(b'\x80junk')
    (root / 'file').write_text('')
    os.makedirs(root / 'bare')
    np.save(root / 'bare' / 'images.npy', np.zeros([4, 1, 8, 8], np.float32))
    data_prep.convert_dataset('sklearn-digits', str(root / 'big'), resolution='16x16', max_images=4, verbose=False)
    with open(root / 'ref10.npz', 'wb') as f:
        np.savez(f, mu=np.zeros(10), sigma=np.eye(10))
    d = dict(root=str(root), **{k: v for k, v in data.items()})
    for name, sigma in [('huge', 1e308), ('text', 'abc'), ('bool', True), ('negative', -0.2), ('grey', 25.5), ('tiny', 0.01)]:
        d[f'sigma-{name}'] = _noisy_variant(data, root / f'sigma-{name}', sigma=sigma)
    d['nan'] = _noisy_variant(data, root / 'nan', values=lambda x: x * np.nan)
    d['u255'] = _noisy_variant(data, root / 'u255', values=lambda x: (x + 1) * 127.5)
    return d


SFBD_CASES = {
    # bad paths and wrong kinds of data
    'clean missing': (['--clean={root}/nope'], 1, ['Dataset not found', '/nope']),
    'noisy missing': (['--noisy={root}/nope'], 1, ['Dataset not found', '/nope']),
    'noisy without metadata': (['--noisy={root}/bare'], 1, ['{root}/bare', 'needs images.npy and dataset.json']),
    'clean images as noisy': (['--noisy={clean}'], 1, ['{clean} has no noise level', 'dataset_tool.py corrupt']),
    'noisy as clean': (['--clean={noisy}'], 1, ['--clean={noisy} is a noisy set', 'give the clean images']),
    'mismatched resolutions': (['--clean={root}/big'], 1, ['clean set holds 16x16', 'the noisy set 8x8']),
    # hostile noisy-set dataset.json and values
    # (refused when the data set is opened: its noise would overflow float32 pixels)
    'sigma huge': (['--noisy={sigma-huge}'], 1, ['{sigma-huge}', '"sigma"', '1e+308', 'overflows']),
    'sigma text': (['--noisy={sigma-text}'], 1, ['{sigma-text}', '"sigma"', "found 'abc'", 'positive finite number']),
    'sigma bool': (['--noisy={sigma-bool}'], 1, ['"sigma"', 'found True', 'positive finite number']),
    'sigma negative': (['--noisy={sigma-negative}'], 1, ['"sigma"', 'found -0.2', 'positive finite number']),
    'sigma in grey levels': (['--noisy={sigma-grey}'], 1, ['"sigma": 25.5', 'divided by 127.5']),
    'sigma below the network': (['--noisy={sigma-tiny}', '--precond=ve'], 1, ['sigma_tau=0.01', '[0.02, 80]', 'another --precond']),
    'noisy all NaN': (['--noisy={nan}'], 1, ['--noisy={nan}', 'not finite', 'fix the data set']),
    'noisy in 0..255': (['--noisy={u255}'], 1, ['--noisy={u255}', 'std', 'u / 127.5 - 1']),
    'sigma contradicted': (['--sigma=0.3'], 1, ['--sigma=0.3 contradicts', 'drop --sigma']),
    'sigma nan': (['--sigma=nan'], 2, ['--sigma', 'give a finite number']),  # refused by click's finite_float
    # a pretrained network that does not fit
    'pretrained other resolution': (['--pretrained={root}/net16.pt'], 1, ['takes 16x16 images', '8x8']),
    'pretrained missing': (['--pretrained={root}/nope.pt'], 1, ['No such file', 'nope.pt']),
    'pretrained junk': (['--pretrained={root}/junk.pt'], 1, ['junk.pt', 'truncated or corrupt']),
    'pretrained conditional': (['--pretrained={root}/cond.pt'], 1, ['cond.pt is class-conditional', 'unconditional']),
    'pretrained NaN weights': (['--pretrained={root}/nan.pt'], 1, ['--pretrained={root}/nan.pt', 'not finite', 'trained well']),
    'pretrained without augment labels': (['--pretrained={root}/plain8.pt', '--augment=0.12'], 1, ['without augmentation labels', '--augment=0']),
    # non-finite and out-of-range numbers
    'pretrain-kimg nan': (['--pretrain-kimg=nan'], 2, ['--pretrain-kimg', 'give a finite number']),  # refused by click's finite_float
    'finetune-kimg inf': (['--finetune-kimg=inf'], 2, ['--finetune-kimg', 'give a finite number']),  # refused by click's finite_float
    'ft-lr nan': (['--ft-lr=nan'], 2, ['--ft-lr', 'give a finite number']),  # refused by click's finite_float
    'ft-ema inf': (['--ft-ema=inf'], 2, ['--ft-ema', 'give a finite number']),  # refused by click's finite_float
    'lr inf': (['--lr=inf'], 2, ['--lr', 'give a finite number']),  # refused by click's finite_float
    'ema inf': (['--ema=inf'], 2, ['--ema', 'give a finite number']),  # refused by click's finite_float
    'tick nan': (['--tick=nan'], 2, ['--tick', 'give a finite number']),  # refused by click's finite_float
    'dropout nan': (['--dropout=nan'], 2, ['--dropout', 'give a finite number']),  # refused by click's finite_float
    'clean-mix nan': (['--clean-mix=nan'], 2, ['--clean-mix', 'give a finite number']),  # refused by click's finite_float
    'clean-mix one': (['--clean-mix=1'], 2, ["'--clean-mix'"]),
    'iters zero': (['--iters=0'], 2, ["'--iters'"]),
    # conflicting flags and networks that cannot be built
    'pretrain-kimg with pretrained': (['--pretrained={root}/plain8.pt', '--pretrain-kimg=5'], 1, ['--pretrain-kimg has no effect with --pretrained', 'drop one']),
    'attn at no resolution': (['--attn=7'], 1, ['--attn=7', 'pick from them']),
    'too many levels': (['--cres=1,2,2,2,2'], 1, ['cannot run on 8x8 images', 'fewer --cres levels']),
    # evaluation
    'ref of another detector size': (['--fid-ref={root}/ref10.npz'], 1, ['10-d statistics']),
    'ref missing': (['--fid-ref={root}/nope.npz'], 1, ['No such file', 'nope.npz']),
    'detector unknown': (['--detector=nonsense'], 1, ["No detector 'nonsense'", 'use inception']),
    # unwritable destinations
    'outdir is a file': (['--outdir={root}/file'], 1, ['--outdir={root}/file is a file', 'give a directory']),
    'outdir under a file': (['--outdir={root}/file/run'], 1, ['--outdir={root}/file/run cannot be written']),
}


@pytest.mark.parametrize('case', list(SFBD_CASES))
def test_bad_input_battery(bad, tmp_path, case):
    from tests.test_train_cli import _one_line_error
    from click.testing import CliRunner
    args, code, matches = SFBD_CASES[case]
    out = tmp_path / 'out'
    res = CliRunner().invoke(sfbd_cli.main, cli_args(bad, out) + [a.format(**bad) for a in args])
    _one_line_error(res, *[m.format(**bad) for m in matches], code=code)
    assert not out.exists() and sorted(os.listdir(tmp_path)) == []  # no run directory left behind


@pytest.mark.parametrize('name', ['/sys/kernel', '/sys/sfbd-run'])
def test_unwritable_outdir_is_one_line(data, name):
    from tests.test_train_cli import _one_line_error, _unwritable_dir
    from click.testing import CliRunner
    if _unwritable_dir() is None:
        pytest.skip('no directory here that cannot be written')
    res = CliRunner().invoke(sfbd_cli.main, cli_args(data, name))
    _one_line_error(res, name, 'writ')
    assert not os.path.exists('/sys/sfbd-run')
