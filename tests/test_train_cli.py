"""train.py: presets and flags become the right options dict; a tiny run; bad input is one clear line."""

import json
import os

import pytest
from click.testing import CliRunner

import train
from tests.test_training_loop import make_image_folder, tiny_options
from torch_utils import perf
from training import training_loop

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


def _one_line_error(res, match: str) -> None:
    assert res.exit_code == 1 and 'Traceback' not in res.output, res.output
    lines = [line for line in res.output.splitlines() if line.startswith('Error:')]
    assert len(lines) == 1 and match in lines[0], res.output

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
    assert {'training_options.json', 'log.txt', 'stats.jsonl', 'network-snapshot-000000.pt', 'training-state-000000.pt'} <= files
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
