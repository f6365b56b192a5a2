"""Batch SFBD against Online SFBD on scikit-learn's digits at equal compute, run as the real CLIs: table and plot against compute."""

import json
import math
import os
import shlex
import subprocess
import sys
import time

import click

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import dnnlib  # noqa: E402 (needs ROOT on the path)
from dnnlib.util import UserError  # noqa: E402
from training import online  # noqa: E402

SMOKE = dict(preset='tiny', max_images=200)

#----------------------------------------------------------------------------

class Runner:
    """Runs `python SCRIPT ARGS` at the repository root with one thread per process, echoing each command."""

    def __init__(self, outdir: str):
        self.script = os.path.join(outdir, 'commands.sh')
        self.env = {**os.environ, 'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS', '1')}
        if not os.path.isfile(self.script):
            with open(self.script, 'w') as f:
                f.write(f'#!/usr/bin/env bash\nset -euo pipefail\nexport OMP_NUM_THREADS={self.env["OMP_NUM_THREADS"]}\n')

    def __call__(self, script: str, *args: str, skip: bool = False) -> None:
        shown = shlex.join([sys.executable, script, *args])
        print(f'\n$ {shown}' + ('    # done already: skipped' if skip else ''), flush=True)
        if skip:
            return
        with open(self.script, 'a') as f:
            f.write(shown + '\n')
        if subprocess.run([sys.executable, script, *args], cwd=ROOT, env=self.env).returncode != 0:
            raise UserError('The step above failed; fix it and rerun (finished steps are kept)')


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def run_setting(run: Runner, outdir: str, *, preset: str, max_images: int | None, clean: float, sigma: float, seed: int,
                refresh_every: int) -> dict:
    """Data, batch SFBD (the preset's schedule), then Online SFBD from the same model 0 with the same training images
    and the same number of denoised images; returns both runs' compute_axis rows."""
    data = os.path.join(outdir, 'data')
    os.makedirs(data, exist_ok=True)
    digits, clean_set, rest = (os.path.join(data, n) for n in ('digits.zip', 'clean.zip', 'rest.zip'))
    noisy, ref = os.path.join(data, f'noisy-{sigma:g}'), os.path.join(data, 'ref-pixels.npz')
    run('dataset_tool.py', 'convert', '--source=sklearn-digits', f'--dest={digits}',
        *([f'--max-images={max_images}'] if max_images else []), skip=os.path.exists(digits))
    run('dataset_tool.py', 'split', f'--source={digits}', f'--clean={clean:g}', f'--seed={seed}', f'--dest-clean={clean_set}',
        f'--dest-rest={rest}', skip=os.path.exists(clean_set) and os.path.exists(rest))
    run('dataset_tool.py', 'corrupt', f'--source={rest}', f'--sigma={sigma:g}', f'--seed={seed}', f'--dest={noisy}',
        skip=os.path.exists(os.path.join(noisy, 'dataset.json')))
    run('fid.py', 'ref', f'--data={rest}', f'--dest={ref}', '--detector=pixels', skip=os.path.exists(ref))
    common = [f'--config={preset}', f'--clean={clean_set}', f'--noisy={noisy}', f'--fid-ref={ref}', '--detector=pixels', f'--seed={seed}']

    batch_dir, online_dir = os.path.join(outdir, 'batch'), os.path.join(outdir, 'online')
    run('sfbd.py', f'--outdir={batch_dir}', *common)
    s = dnnlib.EasyDict(_read_json(os.path.join(batch_dir, 'sfbd_options.json')))
    model0 = os.path.join(batch_dir, _read_json(os.path.join(batch_dir, 'iter-000', 'DONE'))['network'])
    # The same budget: K x finetune_kimg training images, and K passes over the noisy set (one to initialise E).
    batch = s.train_kwargs['batch_size']
    steps = math.ceil(round(s.iters * s.finetune_kimg * 1000) / batch)
    num_noisy = _read_json(os.path.join(noisy, 'dataset.json'))['count']
    refresh_num = max(1, math.ceil((s.iters - 1) * num_noisy / max(steps // refresh_every, 1)))
    run('sfbd.py', f'--outdir={online_dir}', *common, '--online', f'--pretrained={model0}',
        f'--online-kimg={steps * batch / 1000:g}', f'--refresh-every={refresh_every}', f'--refresh-num={refresh_num}',
        f'--ramp-end={s.finetune_kimg:g}', f'--eval-kimg={s.finetune_kimg:g}', f'--tick={s.finetune_kimg / 4:g}')
    return dict(batch=online.compute_axis(batch_dir), online=online.compute_axis(online_dir), refresh_num=refresh_num,
                num_noisy=num_noisy, sigma=sigma, clean=clean)


def format_table(settings: list[dict]) -> str:
    """Markdown: per evaluated model of both runs, the compute spent after model 0 and the Frechet distance / E's error."""
    def num(v: float | None, fmt: str) -> str:
        return '-' if v is None else format(v, fmt)
    lines = []
    for st in settings:
        lines += [f'Clean share {st["clean"]:g}, sigma {st["sigma"]:g}, {st["num_noisy"]} noisy images; online: '
                  f'{st["refresh_num"]} rows per refresh. Compute after model 0 in millions of network evaluations '
                  f'({online.TRAIN_COST:g} per training image + 1 per denoising evaluation).', '',
                  '| run | model | training kimg | denoising Mevals | compute (Mevals) | FD (pixels) | E MSE | E PSNR (dB) |',
                  '|---|---:|---:|---:|---:|---:|---:|---:|']
        for name in ('batch', 'online'):
            for r in st[name]:
                label = f'k={r["k"]}' if name == 'batch' else f'{r["kimg"]:g} kimg'
                lines.append(f'| {name} | {label} | {r["train_nimg"] / 1000:g} | {r["denoise_nfe"] / 1e6:.3f} | {r["compute"] / 1e6:.3f} | '
                             f'{num(r.get("fid"), ".3f")} | {num(r.get("denoise_mse"), ".4f")} | {num(r.get("denoise_psnr"), ".2f")} |')
        lines.append('')
    return '\n'.join(lines)


def plot(path: str, settings: list[dict]) -> None:
    """compare.png: Frechet distance and E's MSE against compute, batch and online, one colour per clean share."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(11, 4), layout='constrained')
    ax_fd, ax_mse = fig.subplots(1, 2)
    for i, st in enumerate(settings):
        for name, style in (('batch', 'o-'), ('online', 's--')):
            rows = st[name]
            label = f'{name}, clean {st["clean"]:g}'
            ax_fd.plot([r['compute'] / 1e6 for r in rows], [r.get('fid') for r in rows], style, color=f'C{i}', label=label)
            points = [(r['compute'] / 1e6, r['denoise_mse']) for r in rows if r.get('denoise_mse') is not None]
            ax_mse.plot(*zip(*points), style, color=f'C{i}', label=label)
    ax_fd.set_title('Frechet distance (pixels) to held-out originals')
    ax_mse.set_title('MSE of E against the originals, [-1, 1] units')
    for ax in (ax_fd, ax_mse):
        ax.set_xlabel(f'compute after model 0, M network evaluations ({online.TRAIN_COST:g} per training image)')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)

#----------------------------------------------------------------------------

@click.command(context_settings=dict(help_option_names=['-h', '--help'], show_default=True))
@click.option('--config',        help='Preset of sfbd.py (configs/NAME.json or a file): the batch schedule both runs share', metavar='NAME|FILE', type=str, default='demo')
@click.option('--outdir',        help='Directory of the comparison (rerun to resume)', metavar='DIR', type=str, default='compare-run')
@click.option('--clean',         help='Clean shares to compare, fractions or counts (e.g. 0.04,0.1)', metavar='LIST', type=str, default='0.04')
@click.option('--sigma',         help='Noise std sigma_tau, [-1, 1] pixel units', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=0.5)
@click.option('--refresh-every', help='Online: optimizer steps between refreshes (m)', metavar='M', type=click.IntRange(min=1), default=20)
@click.option('--max-images',    help='Use only the first N of the 1,797 digits  [default: all]', metavar='N', type=click.IntRange(min=20))
@click.option('--seed',          help='Seed of the split, the noise and all training', metavar='INT', type=click.IntRange(min=0), default=0)
@click.option('--smoke',         help='Seconds-long: the tiny preset on 200 digits', is_flag=True)
def main(config: str, outdir: str, clean: str, sigma: float, refresh_every: int, max_images: int | None, seed: int, smoke: bool) -> None:
    """Batch SFBD (sfbd.py) and Online SFBD (sfbd.py --online) on the same digits, from the same model 0, with the
    same training images and the same number of denoised images; their Frechet distances and E's error against the
    compute each has spent (training.online.compute_axis). Writes OUTDIR/results.md, results.json, compare.png.

    \b
    python scripts/online_compare.py --outdir=compare-run --clean=0.04,0.1
    """
    if smoke:
        config, max_images = SMOKE['preset'], SMOKE['max_images']
    start = time.time()
    outdir = os.path.abspath(outdir)
    os.makedirs(outdir, exist_ok=True)
    run = Runner(outdir)
    settings = [run_setting(run, os.path.join(outdir, f'clean-{c}'), preset=config, max_images=max_images, clean=float(c),
                            sigma=sigma, seed=seed, refresh_every=refresh_every) for c in clean.split(',')]
    with open(os.path.join(outdir, 'results.json'), 'w') as f:
        json.dump(dict(settings=settings, sec=time.time() - start), f, indent=2)
    table = format_table(settings)
    with open(os.path.join(outdir, 'results.md'), 'w') as f:
        f.write(table)
    plot(os.path.join(outdir, 'compare.png'), settings)
    print('\n' + table + f'\nDone in {dnnlib.util.format_time(time.time() - start)}: {outdir}/results.md, compare.png')


if __name__ == '__main__':
    main()
