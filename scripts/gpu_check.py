"""GPU verification in one command: the tests on CUDA, the bf16 quality guard, the training bench at batch 512 and
one timed SFBD iteration at CIFAR-10 size; a timestamped log, a summary table and summary.json.

    python scripts/gpu_check.py --outdir=gpu-check            # one H100/H200: about 10 minutes at most
    python scripts/gpu_check.py --outdir=gpu-check --smoke    # the same steps at tiny sizes on the CPU

Each run writes OUTDIR/YYYYmmdd-HHMMSS/: log.txt (every line of every step, time-stamped), one JSON per step and
summary.json. The module is also the pytest plugin of the first step (`pytest -p scripts.gpu_check`): it records,
per test, the CUDA memory the test process allocated, so the summary says which tests really ran on the GPU.
"""

import datetime
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import click
import numpy as np
import PIL.Image
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as `python scripts/gpu_check.py`

from training import data_prep, metrics  # noqa: E402 (needs ROOT on the path)

TESTS = ['tests/test_paper_recipes.py', 'tests/test_training_loop.py', 'tests/test_sampler.py']
# Seconds each step may run: together the full check's 10 minutes. A step killed at its limit keeps what it wrote.
TIMEOUTS = {'pytest': 195, 'quality_guard': 120, 'bench_train': 165, 'sfbd_iteration': 120}
BENCH_VARIANTS = 'fp32,bf16,bf16+cl+sdpa,bf16+cl+sdpa+compile'

# sfbd.py run through this reports the CUDA memory its process allocated: python -c CUDA_REPORTER OUT.json sfbd.py ARGS.
CUDA_REPORTER = '''
import atexit, json, runpy, sys
import torch
report = sys.argv.pop(1)
sys.argv.pop(0)
def write_report():
    used = torch.cuda.is_initialized()
    with open(report, 'w') as f:
        json.dump(dict(device=torch.cuda.get_device_name() if used else None,
                       allocated_bytes=torch.cuda.memory_stats().get('allocated_bytes.all.allocated', 0) if used else 0), f)
atexit.register(write_report)
runpy.run_path(sys.argv[0], run_name='__main__')
'''

#----------------------------------------------------------------------------
# Helpers the tests share: synthetic images and a cheap FID detector.

def synthetic_images(num: int, height: int, width: int, seed: int) -> np.ndarray:
    """num x H x W x 3 uint8: a soft coloured blob on a textured background per image, so no two images are alike."""
    rnd = np.random.RandomState(seed)
    yy, xx = np.mgrid[:height, :width] / max(height, width)
    out = []
    for _ in range(num):
        cy, cx = rnd.uniform(0.25, 0.75, size=2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / rnd.uniform(0.01, 0.05))[..., None] * rnd.uniform(0, 1, size=3)
        background = rnd.uniform(0, 0.4, size=3) + 0.15 * rnd.rand(height, width, 3)
        out.append(np.clip((blob + background) * 255, 0, 255).astype(np.uint8))
    return np.stack(out)


class PooledPixels(torch.nn.Module):
    """A detector: [-1, 1] pixels average-pooled to 8x8 per channel (192-d for RGB), net(uint8 NCHW, return_features)."""

    def forward(self, images: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        x = images.to(torch.float32) / 127.5 - 1
        return torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1)


def write_pooled_pixels_detector(path: str) -> str:
    """PooledPixels as a TorchScript file for --detector=PATH: FID's whole path, with a Frechet distance of 192
    dimensions (milliseconds) where the pixels detector's 3072 (32x32) take minutes on a CPU."""
    torch.jit.script(PooledPixels()).save(path)
    return path

#----------------------------------------------------------------------------
# The pytest plugin: CUDA memory allocated in the test process, per test, written to $GPU_CHECK_PYTEST_JSON.

_RESULTS: list[dict] = []


def _cuda_allocated_bytes() -> int:
    """Bytes allocated on CUDA by this process so far (a running total: peak resets do not clear it)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return 0
    return int(torch.cuda.memory_stats().get('allocated_bytes.all.allocated', 0))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    before = _cuda_allocated_bytes()
    try:
        return (yield)
    finally:
        item.user_properties.append(('cuda_bytes_in_process', _cuda_allocated_bytes() - before))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Every test's result (and any failed set-up or tear-down), rewritten after each: a run killed midway keeps them."""
    path = os.environ.get('GPU_CHECK_PYTEST_JSON')
    if path and (report.when == 'call' or report.outcome != 'passed'):
        _RESULTS.append(dict(test=report.nodeid, phase=report.when, outcome=report.outcome, seconds=round(report.duration, 2),
                             **dict(report.user_properties)))
        with open(path, 'w') as f:
            json.dump(_RESULTS, f, indent=2, default=str)

#----------------------------------------------------------------------------
# Running the steps: every output line time-stamped into log.txt (and echoed), a time limit per step.

class Log:
    """log.txt of the check: 'HH:MM:SS +SECONDS [step] line', SECONDS since the check began."""

    def __init__(self, path: str):
        self.file = open(path, 'a', buffering=1)
        self.start = time.monotonic()

    def __call__(self, step: str, line: str) -> float:
        t = time.monotonic() - self.start
        stamped = f'{datetime.datetime.now():%H:%M:%S} +{t:6.1f}s [{step}] {line}'
        self.file.write(stamped + '\n')
        print(stamped, flush=True)
        return t


def run_step(log: Log, step: str, cmd: list[str], timeout: float, env: dict) -> dict:
    """Run cmd at the repository root in its own process group, killed (with its children) after `timeout` seconds.
    Returns rc, started and seconds, timed_out, and lines [(seconds since the check began, text)]."""
    started = log(step, '$ ' + ' '.join(cmd))
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True)
    killed = threading.Event()

    def kill() -> None:
        killed.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # it ended just now
            pass
    timer = threading.Timer(timeout, kill)
    timer.start()
    lines = [(log(step, line.rstrip('\n')), line.rstrip('\n')) for line in proc.stdout]
    rc = proc.wait()
    timer.cancel()
    seconds = time.monotonic() - start
    log(step, f'exit status {rc} after {seconds:.1f} s' + (f' (killed at the {timeout:g} s limit)' if killed.is_set() else ''))
    return dict(rc=rc, started=started, seconds=round(seconds, 1), timed_out=killed.is_set(), lines=lines)


def read_json(path: str) -> Any:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def read_jsonl(path: str) -> list:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]

#----------------------------------------------------------------------------
# (a) The tests, with CUDA visible.

def check_tests(log: Log, out: str, smoke: bool, env: dict) -> dict:
    """pytest on TESTS with SFBD_TEST_CUDA=1 (the paper recipes' sfbd.py sees the GPU); --smoke: test_sampler.py, and
    test_paper_recipes.py imported with its tests deselected. Which tests allocated CUDA memory: the plugin above."""
    path = os.path.join(out, 'pytest.json')
    selection = ['tests/test_sampler.py', 'tests/test_paper_recipes.py', '-m', 'not paper'] if smoke else TESTS
    # test_gpu_check_smoke runs this script: never from inside it.
    cmd = [sys.executable, '-m', 'pytest', '-q', '-p', 'scripts.gpu_check', *selection, '-k', 'not gpu_check_smoke']
    step = run_step(log, 'pytest', cmd, TIMEOUTS['pytest'], dict(env, SFBD_TEST_CUDA='0' if smoke else '1', GPU_CHECK_PYTEST_JSON=path))
    results = read_json(path) or []
    counts: dict[str, int] = {}
    for r in results:
        counts[r['outcome']] = counts.get(r['outcome'], 0) + 1
    in_process = [r['test'] for r in results if r.get('cuda_bytes_in_process', 0) > 0]
    through_cli = [r['test'] for r in results if (r.get('cuda') or {}).get('allocated_bytes', 0) > 0]
    step.update(counts=counts, failed=[r['test'] for r in results if r['outcome'] == 'failed'],
                gpu_in_process=in_process, gpu_through_cli=through_cli, tests=results)
    step['result'] = ((', '.join(f'{n} {k}' for k, n in sorted(counts.items())) or 'no results') +
                      f'; on the GPU: {len(in_process)} in-process, {len(through_cli)} through sfbd.py')
    return step

#----------------------------------------------------------------------------
# (b) The bf16 quality guard, (c) the training bench.

def check_quality(log: Log, out: str, smoke: bool, device: str, env: dict) -> dict:
    """bench/quality_guard.py: bf16 against fp32 training of the CIFAR-10 preset's network at its true size (200 steps
    of 64 enlarged digits) and sampling with it (random weights, 32x32). rc 1 with a JSON is a FAIL verdict, not a crash."""
    path = os.path.join(out, 'quality_guard.json')
    size = (['--steps=20', '--window=5', '--batch=8', '--sample-steps=4', '--num-images=2', '--sample-preset=tiny', '--threads=1']
            if smoke else ['--train-preset=cifar10-ddpmpp', '--steps=200', '--window=50', '--sample-preset=cifar10-ddpmpp'])
    step = run_step(log, 'quality_guard', [sys.executable, 'bench/quality_guard.py', f'--device={device}', *size, f'--json={path}'],
                    TIMEOUTS['quality_guard'], env)
    guard = read_json(path)
    step['guard'] = guard
    if guard is not None and step['rc'] in (0, 1):
        t, s = guard['train'], guard['sampling']
        step['status'] = 'PASS' if t['passed'] else 'FAIL'
        step['result'] = (f'bf16 - fp32 loss {t["bf16_minus_fp32"]:+.5f} (tolerance {t["tolerance"]:.5f}); {s["preset"]}: generate '
                          f'{s["generate"]["mean_abs_levels"]:.3f} levels, denoise {s["denoise"]["mean_abs_levels"]:.3f} levels')
    return step


def check_bench(log: Log, out: str, smoke: bool, device: str, env: dict) -> dict:
    """bench/bench_train.py on the CIFAR-10 preset at batch 512: img/s of fp32 eager against the fast path."""
    path = os.path.join(out, 'bench_train.json')
    size = (['--preset=tiny', '--batch=4', '--iters=1', '--warmup=1', '--variants=fp32,bf16+cl+sdpa', '--threads=1'] if smoke else
            ['--preset=cifar10-ddpmpp', '--batch=512', '--iters=5', '--warmup=2', f'--variants={BENCH_VARIANTS}'])
    step = run_step(log, 'bench_train', [sys.executable, 'bench/bench_train.py', f'--device={device}', *size, f'--json={path}'],
                    TIMEOUTS['bench_train'], env)
    bench = read_json(path)
    if bench is not None:
        step['rows'] = bench['rows']
        step['result'] = '; '.join(f'{r["variant"]} {r["images_per_sec"]:,.0f} img/s (x{r["ratio"]:.2f})' for r in bench['rows'])
    return step

#----------------------------------------------------------------------------
# (d) One SFBD iteration, timed phase by phase.

# Each phase ends at the first output line matching its pattern (after the previous phase's end); 'start' is
# python's start-up, imports and opening the data, 'finish' the summary after the last FID.
PHASE_ENDS = [('start', r'^Constructing network'), ('pretrain', r'^Done: .*pretrain'), ('evaluate 0', r'^FID of model 0:'),
              ('denoise', r'^Denoising E_1: (\d+)/\1 '), ('finetune', r'^Done: .*finetune'), ('evaluate 1', r'^FID of model 1( over|:)')]
SFBD_SIZES = {  # images in the data set, clean ones among them, resolution, sfbd.py's flags
    'full': dict(num=576, clean=64, resolution=32, args=['--config=cifar10-ddpmpp', '--pretrain-kimg=5', '--finetune-kimg=2.5',
                                                          '--tick=1.5', '--eval-num=256']),
    'smoke': dict(num=48, clean=16, resolution=16, args=['--config=tiny', '--batch=8', '--pretrain-kimg=0.032', '--finetune-kimg=0.016',
                                                          '--tick=0.016', '--eval-num=16', '--eval-steps=4', '--grid=4']),
}


def make_sfbd_data(data: str, num: int, clean: int, resolution: int, detector: str | None) -> tuple[str, str]:
    """Synthetic images -> zip -> clean/rest split -> noisy set (sigma 0.2) -> FID reference; returns (detector, ref)."""
    pngs = os.path.join(data, 'pngs')
    os.makedirs(pngs, exist_ok=True)
    for i, image in enumerate(synthetic_images(num, resolution, resolution, seed=0)):
        PIL.Image.fromarray(image).save(os.path.join(pngs, f'{i:05d}.png'))
    data_prep.convert_dataset(pngs, os.path.join(data, 'all.zip'), verbose=False)
    data_prep.split_dataset(os.path.join(data, 'all.zip'), str(clean), 0, os.path.join(data, 'clean.zip'),
                            os.path.join(data, 'rest.zip'), verbose=False)
    data_prep.corrupt_dataset(os.path.join(data, 'rest.zip'), os.path.join(data, 'noisy'), 0.2, 0, verbose=False)
    detector = detector or write_pooled_pixels_detector(os.path.join(data, 'pooled-pixels.pt'))
    metrics.make_ref(os.path.join(data, 'all.zip'), os.path.join(data, 'ref.npz'), detector)
    return detector, os.path.join(data, 'ref.npz')


def check_sfbd(log: Log, out: str, smoke: bool, env: dict, detector: str | None) -> dict:
    """sfbd.py --iters=1 on synthetic data: seconds per phase from the time stamps of its output, training img/s and
    peak memory from stats.jsonl, FID and E_1's error from metrics.jsonl. Network files are deleted afterwards."""
    size = SFBD_SIZES['smoke' if smoke else 'full']
    data, run_dir = os.path.join(out, 'sfbd-data'), os.path.join(out, 'sfbd-run')
    start = time.monotonic()
    detector, ref = make_sfbd_data(data, size['num'], size['clean'], size['resolution'], detector)
    log('sfbd_iteration', f'data: {size["num"]} synthetic {size["resolution"]}x{size["resolution"]} images, {size["clean"]} clean, '
                          f'the rest corrupted at sigma 0.2, in {time.monotonic() - start:.1f} s')
    cmd = [sys.executable, 'sfbd.py', *size['args'], f'--outdir={run_dir}', f'--clean={data}/clean.zip', f'--noisy={data}/noisy',
           f'--fid-ref={ref}', f'--detector={detector}', '--iters=1', '--final-fid-repeats=1', '--dump=1000']
    step = run_step(log, 'sfbd_iteration', cmd, TIMEOUTS['sfbd_iteration'], env)
    phases, begin, lines = {}, step['started'], iter(step['lines'])
    for name, pattern in PHASE_ENDS:
        end = next((t for t, text in lines if re.search(pattern, text)), None)
        if end is None:
            break
        phases[name], begin = round(end - begin, 1), end
    if len(phases) == len(PHASE_ENDS):
        phases['finish'] = round(step['started'] + step['seconds'] - begin, 1)
    training = {}
    for name, stats in (('pretrain', 'pretrain/stats.jsonl'), ('finetune', 'iter-001/finetune/stats.jsonl')):
        ticks = read_jsonl(os.path.join(run_dir, stats))
        if ticks:  # the last tick: past the first step's set-up
            training[name] = dict(images_per_sec=round(1000 / ticks[-1]['Timing/sec_per_kimg']['mean'], 1),
                                  peak_mem_gb=round(max(t['Resources/peak_mem_gb']['mean'] for t in ticks), 2))
    for path in [os.path.join(d, f) for d, _, files in os.walk(run_dir) for f in files]:
        if re.fullmatch(r'(network-snapshot|training-state)-\d+\.pt', os.path.basename(path)):
            os.remove(path)
    step.update(phases=phases, training=training, metrics=read_jsonl(os.path.join(run_dir, 'metrics.jsonl')))
    step['result'] = ', '.join(f'{k} {v:.1f} s' for k, v in phases.items()) + ''.join(
        f'; {k} {v["images_per_sec"]:,.0f} img/s, peak {v["peak_mem_gb"]:.2f} GB' for k, v in training.items())
    return step

#----------------------------------------------------------------------------

def summary_table(steps: list[dict]) -> str:
    rows = [('step', 'status', 'seconds', 'result')] + [(s['name'], s['status'], f'{s["seconds"]:.1f}', s.get('result', '')) for s in steps]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return '\n'.join('  '.join([*(c.ljust(w) for c, w in zip(r[:3], widths)), r[3]]) for r in rows)


@click.command(context_settings=dict(help_option_names=['-h', '--help'], show_default=True))
@click.option('--outdir', help='Parent of the time-stamped output directory', metavar='DIR', default='gpu-check', type=str)
@click.option('--smoke', help='Tiny sizes on the CPU (CUDA hidden): checks this script in seconds, measures nothing', is_flag=True)
@click.option('--detector', help='FID detector of the SFBD step  [default: pixels pooled to 8x8, written here; inception needs '
                                 'its weights in the dnnlib cache on an offline machine]', metavar='NAME|PATH', type=str)
def main(outdir: str, smoke: bool, detector: str | None) -> None:
    """One GPU verification: (a) tests on CUDA, (b) bf16 quality guard, (c) training bench at batch 512 (CIFAR-10
    preset), (d) one SFBD iteration at 32x32 timed per phase. Exit status 0 when every step passed."""
    if not smoke and not torch.cuda.is_available():
        raise click.UsageError('No CUDA device is visible: run this on a GPU machine, or use --smoke for the CPU dry run')
    device = 'cpu' if smoke else 'cuda'
    out = os.path.join(os.path.abspath(outdir), datetime.datetime.now().strftime('%Y%m%d-%H%M%S'))
    os.makedirs(out)
    log = Log(os.path.join(out, 'log.txt'))
    env = {**os.environ, 'PYTHONPATH': ROOT, 'PYTHONUNBUFFERED': '1'}
    if smoke:
        env.update(CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1'))
    log('setup', f'output {out}; python {sys.version.split()[0]}, torch {torch.__version__}, device '
                 f'{torch.cuda.get_device_name() if device == "cuda" else "cpu"}' + (' (smoke: tiny sizes)' if smoke else ''))

    steps = []
    for name, check in [('pytest', lambda: check_tests(log, out, smoke, env)),
                        ('quality_guard', lambda: check_quality(log, out, smoke, device, env)),
                        ('bench_train', lambda: check_bench(log, out, smoke, device, env)),
                        ('sfbd_iteration', lambda: check_sfbd(log, out, smoke, env, detector))]:
        step = dict(name=name, **check())
        step.setdefault('status', 'timeout' if step['timed_out'] else 'ok' if step['rc'] == 0 else 'failed')
        step.pop('lines')
        steps.append(step)
    summary = dict(device=device, smoke=smoke, started=os.path.basename(out), seconds=round(time.monotonic() - log.start, 1),
                   steps=steps)
    with open(os.path.join(out, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=2, default=str)
    table = summary_table(steps)
    for line in ['', *table.splitlines(), f'Summary: {os.path.join(out, "summary.json")}; log: {os.path.join(out, "log.txt")}']:
        log('summary', line)
    sys.exit(0 if all(s['status'] in ('ok', 'PASS') for s in steps) else 1)


if __name__ == '__main__':
    main()
