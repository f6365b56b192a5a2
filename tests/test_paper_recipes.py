"""The paper's two recipes at true size: the README's command sequence with the real CIFAR-10 DDPM++ and CelebA
NCSN++ networks on a handful of real-shaped images, a few steps of each phase; and scripts/gpu_check.py --smoke.

Marked `paper` (deselect with -m "not paper"). sfbd.py runs as a subprocess with one thread, on the CPU unless
SFBD_TEST_CUDA=1 (scripts/gpu_check.py sets it), which lets it see the GPU.
"""

import io
import json
import math
import os
import pickle
import re
import tarfile
import time
import zipfile
from typing import Any, Callable

import click
import numpy as np
import PIL.Image
import pytest

import dataset_tool
import fid
from scripts import gpu_check
from tests.conftest import run_python
from torch_utils import perf
from training.dataset import open_dataset

pytestmark = pytest.mark.paper

CUDA = os.environ.get('SFBD_TEST_CUDA') == '1'
NUM_IMAGES = 24
BATCH = 8
EVAL_NUM = 16
EVAL_STEPS = 2  # 3 network calls per generated image: the FID path at paper size, not its quality

# The paper's Table 3 and EDM's parameter counts (SPEC sections 1 and 3), written out here so the test checks the
# presets against the paper, not against themselves. `clean` is the split's clean count; the other images form the
# noisy set, and each costs the preset's backward pass (18 / 40 steps: 11 / 37 network calls), so there are few.
# CIFAR-10 runs as its preset says (fp32 throughout); CelebA with --precision=auto and --eval-precision=auto
# (bf16 where native), so both arithmetic paths run at paper size and the heavier recipe takes the faster one.
RECIPES = {
    'cifar10-ddpmpp': dict(resolution=32, sigma=0.2, clean=20, params=55_733_891, lr=1e-3, dropout=0.13, augment=0.12,
                           channel_mult=[2, 2, 2], resample_filter=[1, 1], channel_mult_noise=1, embedding_type='positional',
                           encoder_type='standard', denoise_steps=18, precision='fp32', args=[]),
    'celeba64-ncsnpp': dict(resolution=64, sigma=1.3824, clean=22, params=62_761_091, lr=2e-4, dropout=0.05, augment=0.15,
                            channel_mult=[1, 2, 2, 2], resample_filter=[1, 3, 3, 1], channel_mult_noise=2, embedding_type='fourier',
                            encoder_type='residual', denoise_steps=40, precision='auto',
                            args=['--precision=auto', '--eval-precision=auto']),
}

#----------------------------------------------------------------------------
# Inputs in the formats the README downloads: CIFAR-10's python tarball, CelebA's zip of aligned 178x218 JPEGs.

def write_cifar_tarball(path: str, images: np.ndarray) -> None:
    """cifar-10-python.tar.gz's layout: data_batch_1..5, each a protocol-2 pickle of {b'data': N x 3072 uint8, b'labels'}."""
    with tarfile.open(path, 'w:gz') as tar:
        for b, rows in enumerate(np.array_split(np.arange(len(images)), 5)):
            batch = {b'data': images[rows].transpose(0, 3, 1, 2).reshape(len(rows), -1), b'labels': [int(i) % 10 for i in rows]}
            blob = pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f'cifar-10-batches-py/data_batch_{b + 1}')
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def write_celeba_zip(path: str, images: np.ndarray, num_train: int) -> None:
    """img_align_celeba.zip's layout (img_align_celeba/000001.jpg, ...: 178x218 JPEGs) with list_eval_partition.txt
    beside it: the first num_train images in the training partition 0, the others split between 1 and 2."""
    with zipfile.ZipFile(path, 'w') as z:
        for i, image in enumerate(images):
            buf = io.BytesIO()
            PIL.Image.fromarray(image).save(buf, format='JPEG', quality=95)
            z.writestr(f'img_align_celeba/{i + 1:06d}.jpg', buf.getvalue())
    with open(os.path.join(os.path.dirname(path), 'list_eval_partition.txt'), 'w') as f:
        f.writelines(f'{i + 1:06d}.jpg {0 if i < num_train else 1 + (i - num_train) % 2}\n' for i in range(len(images)))

#----------------------------------------------------------------------------

@pytest.fixture(params=sorted(RECIPES))
def preset(request, tmp_path):
    """The preset's name; afterwards the multi-GB snapshots and training states are deleted (logs stay)."""
    yield request.param
    for path in tmp_path.rglob('*.pt'):
        if re.fullmatch(r'(network-snapshot|training-state)-\d+\.pt', path.name):
            path.unlink()


@pytest.mark.timeout(1500)  # CelebA took 4.5 minutes at a load of 5 on this 2-core machine: pytest.ini's 600 s is too close
@pytest.mark.usefixtures('one_thread')
def test_paper_recipe_true_size(tmp_path, preset, record_property):
    """convert -> split -> corrupt -> fid.py ref -> sfbd.py --config=PRESET at the paper's network and image size."""
    r = RECIPES[preset]
    d = str(tmp_path)
    seconds = {}

    def timed(name: str, run: Callable[[], Any]) -> Any:
        start = time.monotonic()
        result = run()
        seconds[name] = round(time.monotonic() - start, 1)
        return result

    def cli(name: str, main: click.Command, args: list[str]) -> None:
        """A data step's CLI in this process: the same parsing and library call, without python's start-up (seconds each here)."""
        timed(name, lambda: main.main(args=args, standalone_mode=False))

    # 1. The data, as the README prepares it.
    if preset == 'cifar10-ddpmpp':
        write_cifar_tarball(f'{d}/cifar-10-python.tar.gz', gpu_check.synthetic_images(NUM_IMAGES, 32, 32, seed=0))
        cli('convert', dataset_tool.main, ['convert', f'--source={d}/cifar-10-python.tar.gz', f'--dest={d}/data.zip'])
    else:
        write_celeba_zip(f'{d}/img_align_celeba.zip', gpu_check.synthetic_images(NUM_IMAGES + 4, 218, 178, seed=1), NUM_IMAGES)
        cli('convert', dataset_tool.main, ['convert', f'--source={d}/img_align_celeba.zip', '--transform=celeba',
                                           '--resolution=64x64', f'--dest={d}/data.zip'])
        assert open_dataset(f'{d}/data.zip').metadata['celeba_partition']['kept'] == NUM_IMAGES  # the 4 others are not training images
    cli('split', dataset_tool.main, ['split', f'--source={d}/data.zip', f'--clean={r["clean"]}', '--seed=0',
                                     f'--dest-clean={d}/clean.zip', f'--dest-rest={d}/rest.zip'])
    cli('corrupt', dataset_tool.main, ['corrupt', f'--source={d}/rest.zip', f'--sigma={r["sigma"]}', '--seed=0', f'--dest={d}/noisy'])
    # The pixels detector's FID at 32x32 needs the square root of a 3072 x 3072 matrix (minutes here; 12288 at
    # 64x64): pixels average-pooled to 8x8 (192-d) keep the FID path, at a size whose FID takes milliseconds.
    detector = gpu_check.write_pooled_pixels_detector(f'{d}/pooled-pixels.pt')
    cli('fid ref', fid.main, ['ref', f'--data={d}/data.zip', f'--dest={d}/ref.npz', f'--detector={detector}'])

    # 2. SFBD with the preset, cut to one training step of each phase and a 16-image FID of each model (one seed
    # set for the last, not EDM's 3: the same generation again); the backward pass keeps the preset's steps.
    # One thread: on this shared 2-core machine two OpenMP threads ran the network 2-4x slower than one.
    env = {'OMP_NUM_THREADS': '1', **({'CUDA_VISIBLE_DEVICES': os.environ.get('CUDA_VISIBLE_DEVICES', '0')} if CUDA else {})}
    run_dir = f'{d}/run'
    args = ['sfbd.py', f'--config={preset}', f'--outdir={run_dir}', f'--clean={d}/clean.zip', f'--noisy={d}/noisy',
            f'--fid-ref={d}/ref.npz', f'--detector={detector}', f'--batch={BATCH}', '--pretrain-kimg=0.008',
            '--finetune-kimg=0.008', '--iters=1', '--tick=0.008', '--dump=1', f'--eval-num={EVAL_NUM}',
            f'--eval-steps={EVAL_STEPS}', '--final-fid-repeats=1', '--grid=2', '--strip=2', *r['args']]
    if CUDA:  # sfbd.py's own device choice, reported back: what CUDA memory the process allocated
        args = ['-c', gpu_check.CUDA_REPORTER, f'{d}/cuda.json', *args]
    out = timed('sfbd', lambda: run_python(args, timeout=1400, env=env).stdout)
    record_property('seconds', seconds)
    print(f'{preset}: seconds per command {seconds}')
    assert 'SFBD summary' in out

    # 3. What the run wrote. The options: the preset's Table 3 values, the batch given here.
    with open(f'{run_dir}/sfbd_options.json') as f:
        o = json.load(f)
    t, net = o['train_kwargs'], o['train_kwargs']['network_kwargs']
    assert t['optimizer_kwargs']['lr'] == r['lr'] and t['optimizer_kwargs']['betas'] == [0.9, 0.999]
    assert t['augment_kwargs']['p'] == r['augment'] and net['augment_dim'] == 9
    assert t['batch_size'] == BATCH and t['ema_halflife_kimg'] == 500
    for key in ('dropout', 'channel_mult', 'resample_filter', 'channel_mult_noise', 'embedding_type', 'encoder_type'):
        assert net[key] == r[key], key
    assert net['model_channels'] == 128
    assert (o['denoise_steps'], o['eval_steps'], o['eval_num']) == (r['denoise_steps'], EVAL_STEPS, EVAL_NUM)
    device = 'cuda' if CUDA else 'cpu'
    assert t['precision'] == perf.resolve_precision(r['precision'], device)
    assert o['denoise_precision'] == o['eval_precision'] == perf.resolve_precision(r['precision'], device, inference=True)

    # The real networks: EDM's parameter counts, in pretraining and in the fine-tune that transferred them.
    for log in ('pretrain/log.txt', 'iter-001/finetune/log.txt'):
        with open(f'{run_dir}/{log}') as f:
            assert f'Network: EDMPrecond, {r["params"]:,} parameters' in f.read(), log

    # E_1: every noisy image denoised once, stored as uint8 at the paper's resolution.
    with open(f'{d}/noisy/dataset.json') as f:
        num_noisy = json.load(f)['count']
    assert num_noisy == NUM_IMAGES - r['clean']
    with open(f'{run_dir}/iter-001/denoised/dataset.json') as f:
        e1 = json.load(f)
    assert e1['count'] == num_noisy and e1['dtype'] == 'uint8' and e1['num_steps'] == r['denoise_steps']
    images = np.load(f'{run_dir}/iter-001/denoised/images.npy', mmap_mode='r')
    assert images.dtype == np.uint8 and images.shape == (num_noisy, 3, r['resolution'], r['resolution'])

    # metrics.jsonl: models 0 and 1, each with a finite FID; E_1's error against the originals.
    with open(f'{run_dir}/metrics.jsonl') as f:
        records = [json.loads(line) for line in f]
    assert [m['k'] for m in records] == [0, 1]
    assert all(math.isfinite(m['fid']) and m['fid_num'] == EVAL_NUM for m in records)
    assert math.isfinite(records[1]['denoise_mse']) and records[1]['denoise_mse'] > 0

    # Peak memory of every tick of both trainings (CUDA allocator on a GPU, the process's RSS peak on a CPU).
    peaks = {}
    for stats in ('pretrain/stats.jsonl', 'iter-001/finetune/stats.jsonl'):
        with open(f'{run_dir}/{stats}') as f:
            ticks = [json.loads(line) for line in f]
        assert ticks and all(tick['Resources/peak_mem_gb']['mean'] > 0 for tick in ticks), stats
        peaks[stats.split('/')[-2]] = round(max(tick['Resources/peak_mem_gb']['mean'] for tick in ticks), 3)
    record_property('peak_mem_gb', peaks)
    print(f'{preset}: peak memory (GB) {peaks}')
    if CUDA:
        with open(f'{d}/cuda.json') as f:
            cuda = json.load(f)
        record_property('cuda', cuda)
        assert cuda['allocated_bytes'] > 0, 'sfbd.py saw the GPU but allocated nothing on it'


#----------------------------------------------------------------------------

def test_gpu_check_smoke(tmp_path):
    """scripts/gpu_check.py --smoke on the CPU: every step runs at tiny size, the summary table and JSON are written."""
    res = run_python(['scripts/gpu_check.py', '--smoke', f'--outdir={tmp_path}'], timeout=600, env={'OMP_NUM_THREADS': '1'})
    runs = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(runs) == 1 and re.fullmatch(r'\d{8}-\d{6}', runs[0].name)
    with open(runs[0] / 'summary.json') as f:
        summary = json.load(f)
    steps = {s['name']: s for s in summary['steps']}
    assert list(steps) == ['pytest', 'quality_guard', 'bench_train', 'sfbd_iteration']
    assert all(s['rc'] == 0 for s in steps.values()), [(s['name'], s['rc']) for s in steps.values()]
    assert summary['device'] == 'cpu' and summary['smoke']
    assert steps['pytest']['counts'].get('passed', 0) > 0 and not steps['pytest']['gpu_in_process']
    assert list(steps['sfbd_iteration']['phases']) == ['start', 'pretrain', 'evaluate 0', 'denoise', 'finetune', 'evaluate 1', 'finish']
    assert all(row['images_per_sec'] > 0 for row in steps['bench_train']['rows'])
    for name in steps:  # the summary table, in the output and in the time-stamped log
        assert re.search(rf'\[summary\] {name} +(ok|PASS) ', res.stdout), name
    assert '[summary] ' in (runs[0] / 'log.txt').read_text()
