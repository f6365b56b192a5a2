"""train.py: presets and flags become the right options dict; a tiny run; bad input is one clear line."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

import train
from tests.conftest import ROOT, free_port, killed_after_first_state, run_python
from tests.test_training_loop import make_image_folder, tiny_options
from torch_utils import perf
from training import checkpoint, training_loop
from training.dataset import ArrayDatasetWriter
from training.networks import EDMPrecond

pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py

#----------------------------------------------------------------------------

@pytest.fixture(scope='module')
def data(tmp_path_factory) -> str:
    return make_image_folder(tmp_path_factory.mktemp('cli') / 'images', num=16)


def _run(*args: str):
    return CliRunner().invoke(train.main, list(args))


def _dry_options(*args: str) -> dict:
    """The options dict a dry run prints."""
    res = _run(*args, '--dry-run')
    assert res.exit_code == 0, res.output
    text = res.output.split('Training options:\n', 1)[1].split('\n\nRun directory:', 1)[0]
    return json.loads(text)


def native_bf16() -> str:
    """What --precision=auto must give on this CPU, read from /proc/cpuinfo here rather than from perf."""
    flags = set()
    if os.path.isfile('/proc/cpuinfo'):
        flags = {f for line in open('/proc/cpuinfo') if line.startswith('flags') for f in line.split(':', 1)[1].split()}
    return 'bf16' if flags & {'amx_bf16', 'avx512_bf16'} else 'fp32'


def _one_line_error(res, *matches: str, code: int = 1) -> None:
    """click's own exit (code 1: our UserError, 2: a usage error), not an exception escaping as a traceback,
    and exactly one 'Error:' line holding every one of `matches` (the input and the fix)."""
    assert isinstance(res.exception, SystemExit) and res.exit_code == code, (res.exception, res.output)
    assert 'Traceback' not in res.output, res.output
    lines = [line for line in res.output.splitlines() if line.startswith('Error:')]
    assert len(lines) == 1 and all(m in lines[0] for m in matches), res.output

#----------------------------------------------------------------------------

def test_dry_run_writes_nothing(tmp_path, data):
    c = _dry_options('--config=tiny', f'--outdir={tmp_path / "out"}', f'--data={data}')
    assert not (tmp_path / 'out').exists()
    assert c['batch_size'] == 16 and c['network_kwargs']['model_channels'] == 8
    assert c['network_kwargs']['num_blocks'] == 1 and c['network_kwargs']['attn_resolutions'] == []


def test_flags_beat_the_preset(tmp_path, data, monkeypatch):
    monkeypatch.setattr(perf, 'device_has_bf16', lambda device: True)  # explicit bf16 stays bf16 where native
    c = _dry_options('--config=tiny', '--batch=8', '--cbase=4', '--attn=4', '--precision=bf16', f'--outdir={tmp_path}', f'--data={data}')
    assert c['batch_size'] == 8 and c['network_kwargs']['model_channels'] == 4
    assert c['network_kwargs']['attn_resolutions'] == [4] and c['precision'] == 'bf16'


def test_paper_presets(tmp_path, data):
    cifar = _dry_options('--config=cifar10-ddpmpp', f'--outdir={tmp_path}', f'--data={data}', '--seed=0')
    assert cifar['network_kwargs'] == dict(class_name='training.networks.EDMPrecond', model_type='SongUNet',
                                           embedding_type='positional', encoder_type='standard', decoder_type='standard',
                                           channel_mult_noise=1, resample_filter=[1, 1], model_channels=128,
                                           channel_mult=[2, 2, 2], dropout=0.13, use_fp16=False, augment_dim=9)
    assert (cifar['batch_size'], cifar['optimizer_kwargs']['lr'], cifar['augment_kwargs']['p']) == (512, 1e-3, 0.12)
    assert (cifar['total_kimg'], cifar['ema_halflife_kimg'], cifar['lr_rampup_kimg']) == (200000, 500, 10000)
    assert cifar['loss_kwargs'] == dict(class_name='training.loss.EDMLoss') and cifar['optimizer_kwargs']['betas'] == [0.9, 0.999]
    celeba = _dry_options('--config=celeba64-ncsnpp', f'--outdir={tmp_path}', f'--data={data}')
    net = celeba['network_kwargs']
    assert (net['embedding_type'], net['encoder_type'], net['channel_mult_noise'], net['resample_filter']) == ('fourier', 'residual', 2, [1, 3, 3, 1])
    assert (net['channel_mult'], net['dropout'], celeba['batch_size'], celeba['optimizer_kwargs']['lr']) == ([1, 2, 2, 2], 0.05, 256, 2e-4)
    assert celeba['augment_kwargs']['p'] == 0.15
    adm = _dry_options('--arch=adm', '--precond=vp', '--fp16=1', f'--outdir={tmp_path}', f'--data={data}')
    assert adm['network_kwargs']['model_type'] == 'DhariwalUNet' and adm['network_kwargs']['channel_mult'] == [1, 2, 3, 4]
    assert adm['loss_kwargs']['class_name'] == 'training.loss.VPLoss' and adm['precision'] == 'fp16'


def test_precision_auto_resolves_for_this_machine(tmp_path, data, monkeypatch):
    args = ('--config=tiny', f'--outdir={tmp_path}', f'--data={data}')
    c = _dry_options(*args)
    assert c['precision'] == native_bf16() and c['channels_last'] is False and c['compile'] is False
    assert c['optimizer_kwargs'] == dict(class_name='torch.optim.Adam', lr=2e-3, betas=[0.9, 0.999], eps=1e-8, fused=True)
    assert _dry_options(*args, '--precision=fp32')['precision'] == 'fp32'
    assert _dry_options(*args, '--fp16=1')['precision'] == 'fp16'
    monkeypatch.setattr(perf, 'device_has_bf16', lambda device: False)
    assert _dry_options(*args)['precision'] == 'fp32'
    with pytest.warns(UserWarning, match='no native bf16'):
        assert _dry_options(*args, '--precision=bf16')['precision'] == 'fp32'
    monkeypatch.setattr(perf, 'device_has_bf16', lambda device: True)
    c = _dry_options(*args, '--channels-last=1', '--compile=1')
    assert c['precision'] == 'bf16' and c['channels_last'] is True and c['compile'] is True
    text = ' '.join(_run('--help').output.split())
    assert 'auto = bf16 where it is native' in text and 'fp32 = the exact reference mode' in text and '[default: auto]' in text


def test_tiny_run_makes_numbered_run_directories(tmp_path, data):
    for expected in ['00000', '00001']:
        res = _run('--config=tiny', f'--outdir={tmp_path}', f'--data={data}', '--duration=0.00005', '--seed=3', '--desc=x')
        assert res.exit_code == 0, res.output
    runs = sorted(os.listdir(tmp_path))
    p = native_bf16()  # the default --precision=auto
    assert runs == [f'00000-images-uncond-ddpmpp-edm-gpus1-batch16-{p}-x', f'00001-images-uncond-ddpmpp-edm-gpus1-batch16-{p}-x']
    files = set(os.listdir(tmp_path / runs[0]))
    # 50 images at batch 16 end after 4 steps, 64 images: below 1 kimg the names carry the images.
    assert {'training_options.json', 'log.txt', 'stats.jsonl', 'network-snapshot-000000.064.pt', 'training-state-000000.064.pt'} <= files
    assert 'run.lock' not in files  # released at the end
    log = (tmp_path / runs[0] / 'log.txt').read_text()
    assert 'Training images: 16' in log and 'sec/kimg' in log and 'Training options:' not in log

#----------------------------------------------------------------------------
# Bad input.

def test_batch_not_divisible(tmp_path, data):
    _one_line_error(_run('--config=tiny', '--batch=12', '--batch-gpu=8', f'--outdir={tmp_path}', f'--data={data}', '-n'), 'not divisible')


def test_unwritable_outdir(tmp_path, data):
    (tmp_path / 'file').write_text('')
    _one_line_error(_run('--config=tiny', f'--outdir={tmp_path / "file" / "runs"}', f'--data={data}'), 'cannot be written')


def test_resume_of_a_non_state(tmp_path, data):
    (tmp_path / 'junk.pt').write_bytes(b'\x80junk')
    _one_line_error(_run('--config=tiny', f'--outdir={tmp_path / "out"}', f'--data={data}', f'--resume={tmp_path / "junk.pt"}'), 'junk.pt')
    assert not (tmp_path / 'out').exists()


def test_transfer_to_other_resolution(tmp_path, data):
    snapshot = training_loop.training_loop(str(tmp_path / 'src'), **tiny_options(data, total_kimg=0.008))
    big = make_image_folder(tmp_path / 'big', num=4, resolution=16)
    res = _run('--config=tiny', f'--outdir={tmp_path / "out"}', f'--data={big}', f'--transfer={snapshot}', '--cbase=8', '--cres=1,2')
    _one_line_error(res, '8x8')
    assert not (tmp_path / 'out').exists() or not os.listdir(tmp_path / 'out')


@pytest.mark.parametrize('args, match', [
    (['--transfer=a.pt', '--resume=b.pt'], 'cannot be used together'),
    (['--fp16=1', '--precision=bf16'], 'contradicts'),
    (['--mix-fraction=0.5'], 'needs --mix-data'),
    (['--config=no-such-preset'], 'No preset'),
])
def test_conflicting_options(tmp_path, data, args, match):
    _one_line_error(_run('--config=tiny', f'--outdir={tmp_path}', f'--data={data}', *args), match)

#----------------------------------------------------------------------------
# One process per run directory.

# A train.py process that holds its run directory: it waits in the training loop until RELEASE exists.
_HOLDER = '''
import os, sys, time
from training import training_loop
def wait(*args, **kwargs):
    open(os.environ['READY'], 'w').close()
    deadline = time.time() + 120
    while not os.path.exists(os.environ['RELEASE']) and time.time() < deadline:
        time.sleep(0.1)
    return 'held'
training_loop._train = wait
import train
train.main(sys.argv[1:])
'''


def start_holder(script: str, args: list[str], tmp_path) -> subprocess.Popen:
    """Start `script` with `args` in a process; return once it holds its lock (READY exists)."""
    env = {**os.environ, 'PYTHONPATH': ROOT, 'CUDA_VISIBLE_DEVICES': '', 'OMP_NUM_THREADS': '1',
           'READY': str(tmp_path / 'ready'), 'RELEASE': str(tmp_path / 'release')}
    holder = subprocess.Popen([sys.executable, '-c', script, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (tmp_path / 'ready').exists():
        assert holder.poll() is None and time.time() < deadline, holder.communicate()[0][-3000:]
        time.sleep(0.1)
    return holder


def one_error_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.startswith('Error:')]
    assert len(lines) == 1 and 'Traceback' not in text, text[-3000:]
    return lines[0]


def test_a_second_process_on_a_nosubdir_run_is_refused(tmp_path, data):
    run = tmp_path / 'run'
    args = ['--config=tiny', f'--outdir={run}', '--nosubdir', f'--data={data}', '--seed=1']
    holder = start_holder(_HOLDER, args, tmp_path)
    try:
        before = {f: os.path.getmtime(run / f) for f in os.listdir(run)}
        second = run_python(['train.py', *args], check=False, env={'OMP_NUM_THREADS': '1'})
        line = one_error_line(second.stdout + second.stderr)
        assert second.returncode == 1
        assert f'{run} is in use by another process: pid {holder.pid} on host' in line
        assert f'command: {sys.executable} -c {" ".join(args)}' in line  # how the holder was started
        assert {f: os.path.getmtime(run / f) for f in os.listdir(run)} == before  # the holder's files untouched
    finally:
        (tmp_path / 'release').touch()
        out = holder.communicate(timeout=120)[0]
    assert holder.returncode == 0, out[-3000:]
    assert 'run.lock' not in os.listdir(run)


def test_under_torchrun_every_rank_gives_the_same_line(tmp_path, data):
    from torch_utils import lock
    run = tmp_path / 'run'
    held = lock.RunLock(str(run))
    held.acquire()
    try:
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_addr=127.0.0.1',
               f'--master_port={free_port()}', 'train.py', '--config=tiny', f'--outdir={run}', '--nosubdir', f'--data={data}', '--seed=1']
        env = {**os.environ, 'CUDA_VISIBLE_DEVICES': '', 'OMP_NUM_THREADS': '1', 'PYTHONPATH': ROOT}
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    finally:
        held.release()
    lines = [line for line in (res.stdout + res.stderr).splitlines() if line.startswith('Error:')]
    assert res.returncode != 0 and len(lines) == 2 and lines[0] == lines[1], res.stdout[-3000:] + res.stderr[-3000:]
    assert f'in use by another process: pid {os.getpid()}' in lines[0]
    assert os.listdir(run) == []  # rank 0 wrote nothing, and no other rank did


_KILLED_AFTER_STATE = killed_after_first_state('train')


def _ticks(run_dir) -> list[float]:
    return [json.loads(line)['Progress/kimg']['mean'] for line in open(os.path.join(run_dir, 'stats.jsonl'))]


def test_nosubdir_rerun_resumes_after_a_kill(tmp_path, data):
    # 160 images at batch 16, a tick every 32 (2 steps), a state every 2 ticks: the first state is at 80 images.
    args = ['--config=tiny', '--precision=fp32', f'--data={data}', '--nosubdir', '--seed=1', '--duration=0.00016',
            '--tick=0.032', '--dump=2']
    run, ref = tmp_path / 'run', tmp_path / 'ref'
    res = run_python(['-c', _KILLED_AFTER_STATE, *args, f'--outdir={run}'], check=False, env={'OMP_NUM_THREADS': '1'})
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert checkpoint.load_training_state(training_loop.find_latest_state(str(run)))['cur_nimg'] == 80
    # The same command again continues from the state; other options are refused, naming the flag.
    _one_line_error(_run(*args, f'--outdir={run}', '--lr=1e-4'), 'other options', 'optimizer_kwargs.lr (--lr)', 'give its options')
    res = _run(*args, f'--outdir={run}')
    assert res.exit_code == 0, res.output
    assert f'Resuming from {run}' in res.output
    assert _run(*args, f'--outdir={ref}').exit_code == 0  # uninterrupted
    a, b = (checkpoint.load_training_state(training_loop.find_latest_state(str(d))) for d in (ref, run))
    assert a['cur_nimg'] == b['cur_nimg'] == 160 and all(torch_equal(a['ema'][k], b['ema'][k]) for k in a['ema'])
    assert _ticks(run) == _ticks(ref)  # one record per tick, none twice, in order
    # A longer --duration extends the finished run.
    res = _run(*[a for a in args if not a.startswith('--duration')], '--duration=0.000192', f'--outdir={run}')
    assert res.exit_code == 0 and checkpoint.load_training_state(training_loop.find_latest_state(str(run)))['cur_nimg'] == 192


def torch_equal(a, b) -> bool:
    import torch
    return torch.equal(a, b)

#----------------------------------------------------------------------------
# Bad input: a battery. Every case is one line naming the input and the fix, exit 1 (2 for click's usage
# errors), no traceback, and no run directory left behind.

def _unwritable_dir() -> str | None:
    """An existing directory that even root cannot write (sysfs), or None."""
    try:
        open('/sys/kernel/.write-probe', 'w').close()
    except OSError:
        return '/sys/kernel' if os.path.isdir('/sys/kernel') else None
    os.remove('/sys/kernel/.write-probe')
    return None


@pytest.fixture(scope='module')
def bad(tmp_path_factory, data) -> dict:
    root = tmp_path_factory.mktemp('bad-train')
    floats = np.random.default_rng(0).uniform(-1, 1, size=[16, 3, 8, 8]).astype(np.float32)
    floats[3] = np.inf
    with ArrayDatasetWriter(str(root / 'inf'), 16, [3, 8, 8], np.float32) as w:
        w.write(0, floats)
    make_image_folder(root / 'big', num=4, resolution=16)
    checkpoint.save_network(str(root / 'net16.pt'), EDMPrecond(img_resolution=16, img_channels=3, model_channels=8,
                                                              channel_mult=[1, 2], num_blocks=1, attn_resolutions=[]))
    (root / 'junk.pt').write_bytes(b'\x80junk')
    (root / 'file').write_text('')
    (root / 'empty').mkdir()
    # A finished run (one step) to resume or rerun into.
    run = root / 'run'
    res = _run('--config=tiny', f'--outdir={run}', '--nosubdir', f'--data={data}', '--seed=1', '--duration=0.000016')
    assert res.exit_code == 0, res.output
    return dict(root=str(root), run=str(run), state=training_loop.find_latest_state(str(run)))


TRAIN_CASES = {
    # bad paths and wrong kinds of data
    'data missing': (['--data={root}/nope'], 1, ['Dataset not found', '/nope']),
    'data non-finite': (['--data={root}/inf'], 1, ['{root}/inf', 'not finite', 'image 3', 'fix the data set']),
    'mix data other resolution': (['--mix-data={root}/big', '--mix-fraction=0.5'], 1, ['mix data set has images', 'same resolution']),
    'cond without labels': (['--cond=1'], 1, ['has no labels', 'train unconditionally']),
    'outdir is a file': (['--outdir={root}/file'], 1, ['--outdir={root}/file is a file', 'give a directory']),
    'outdir under a file': (['--outdir={root}/file/runs'], 1, ['--outdir={root}/file/runs cannot be written']),
    'resume missing': (['--resume={root}/nope.pt'], 1, ['--resume: no such file', 'nope.pt']),
    'resume junk': (['--resume={root}/junk.pt'], 1, ['junk.pt', 'truncated or corrupt']),
    'resume without states': (['--resume={root}/empty'], 1, ['--resume: no training-state', '{root}/empty']),
    'transfer of another resolution': (['--transfer={root}/net16.pt'], 1, ['16x16', '8x8']),
    'transfer junk': (['--transfer={root}/junk.pt'], 1, ['junk.pt', 'truncated or corrupt']),
    # non-finite and out-of-range numbers
    'duration nan': (['--duration=nan'], 2, ['--duration', 'give a finite number']),  # refused by click's finite_float
    'duration inf': (['--duration=inf'], 2, ['--duration', 'give a finite number']),  # refused by click's finite_float
    'duration huge': (['--duration=1e308'], 1, ['total_kimg (--duration)', 'finite']),
    'duration zero': (['--duration=0'], 2, ["'--duration'", '0']),
    'lr inf': (['--lr=inf'], 2, ['--lr', 'give a finite number']),  # refused by click's finite_float
    'lr nan': (['--lr=nan'], 2, ['--lr', 'give a finite number']),  # refused by click's finite_float
    'lr negative': (['--lr=-1'], 2, ["'--lr'"]),
    'ema inf': (['--ema=inf'], 2, ['--ema', 'give a finite number']),  # refused by click's finite_float
    'lr-rampup nan': (['--lr-rampup=nan'], 2, ['--lr-rampup', 'give a finite number']),  # refused by click's finite_float
    'dropout nan': (['--dropout=nan'], 2, ['--dropout', 'give a finite number']),  # refused by click's finite_float
    'augment nan': (['--augment=nan'], 2, ['--augment', 'give a finite number']),  # refused by click's finite_float
    'tick inf': (['--tick=inf'], 2, ['--tick', 'give a finite number']),  # refused by click's finite_float
    'loss scaling nan': (['--ls=nan'], 2, ['--ls', 'give a finite number']),  # refused by click's finite_float
    'batch zero': (['--batch=0'], 2, ["'--batch'"]),
    'batch not divisible': (['--batch=12', '--batch-gpu=8'], 1, ['not divisible', 'pick --batch-gpu']),
    # networks that cannot work on these images
    'attn at no resolution': (['--attn=7'], 1, ['--attn=7', 'resolutions are 8,4', 'pick from them']),
    'too many levels': (['--cres=1,2,2,2,2'], 1, ['cannot run on 8x8 images', 'fewer --cres levels']),
    'no levels': (['--cres=none'], 1, ['--cres is empty', '--cres=1,2']),
    'too few channels': (['--cbase=1'], 1, ['cannot run on 8x8 images', 'more --cbase']),
    # conflicting flags
    'transfer and resume': (['--transfer={root}/net16.pt', '--resume={state}'], 1, ['--transfer and --resume cannot be used together']),
    'fp16 and bf16': (['--fp16=1', '--precision=bf16'], 1, ['contradicts']),
    'mix fraction without data': (['--mix-fraction=0.5'], 1, ['--mix-fraction needs --mix-data']),
    'mix data at fraction 0': (['--mix-data={root}/big', '--mix-fraction=0'], 1, ['--mix-data is unused with --mix-fraction=0', 'give the share']),
    'no such preset': (['--config=no-such-preset'], 1, ['No preset', 'no-such-preset']),
    # a run directory holding another run
    'resume with other data': (['--resume={run}', '--data={root}/big'], 1, ['dataset_kwargs.path (--data)', 'give its options']),
    'resume with other lr': (['--resume={run}', '--lr=1e-4'], 1, ['optimizer_kwargs.lr (--lr)', 'give its options']),
    'nosubdir rerun with other batch': (['--outdir={run}', '--nosubdir', '--batch=8'], 1, ['batch_size (--batch)', 'give its options']),
}


@pytest.mark.parametrize('case', list(TRAIN_CASES))
def test_bad_input_battery(tmp_path, data, bad, case):
    args, code, matches = TRAIN_CASES[case]
    subst = dict(root=bad['root'], run=bad['run'], state=bad['state'])
    out = tmp_path / 'out'
    before = sorted(os.listdir(bad['run']))
    res = _run('--config=tiny', f'--outdir={out}', f'--data={data}', '--seed=1', *[a.format(**subst) for a in args])
    _one_line_error(res, *[m.format(**subst) for m in matches], code=code)
    assert not out.exists() and sorted(os.listdir(bad['run'])) == before  # nothing left behind, nothing added


@pytest.mark.parametrize('nosubdir', [True, False])
def test_unwritable_outdir_is_one_line(tmp_path, data, nosubdir):
    path = _unwritable_dir()
    if path is None:
        pytest.skip('no directory here that cannot be written')
    res = _run('--config=tiny', f'--outdir={path}', f'--data={data}', *(['--nosubdir'] if nosubdir else []))
    _one_line_error(res, path, 'writ')
