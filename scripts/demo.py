"""The built-in demo: SFBD on scikit-learn's 8x8 digits against clean-only and noisy-only baselines, run as the real CLIs."""

import glob
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

# --smoke: a seconds-long run of the same steps (the tiny preset, 200 digits).
SMOKE = dict(preset='tiny', max_images=200, clean=0.1)
METHODS = ('sfbd', 'clean-only', 'noisy-only')
LABELS = {'sfbd': 'SFBD', 'clean-only': 'clean-only', 'noisy-only': 'noisy-only'}

#----------------------------------------------------------------------------
# Running the CLIs: echo each command (paths as seen from the repository root), stream its output.

def _shown(arg: str) -> str:
    """An argument as the user would type it at the repository root (paths inside it made relative)."""
    key, eq, value = arg.rpartition('=') if arg.startswith('--') else ('', '', arg)
    if os.path.isabs(value) and value.startswith(os.path.join(ROOT, '')):
        value = os.path.relpath(value, ROOT)
    return f'{key}{eq}{value}'


class Runner:
    """Runs `python SCRIPT ARGS` at the repository root, echoing the command and recording it in commands.sh."""

    def __init__(self, outdir: str, threads: int):
        self.script = os.path.join(outdir, 'commands.sh')
        self.steps: list[dict] = []
        # One thread per process unless the user says otherwise: for networks this small a second thread gains
        # little, and on a shared machine OpenMP threads that spin-wait for a busy core can be 10x slower.
        self.env = {**os.environ, 'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS', str(threads))}
        with open(self.script, 'w') as f:
            f.write(f'#!/usr/bin/env bash\n# The commands of the demo run in {_shown(outdir)}, in order (run at the repository root).\n'
                    f'set -euo pipefail\nexport OMP_NUM_THREADS={self.env["OMP_NUM_THREADS"]}\n')
        print(f'$ export OMP_NUM_THREADS={self.env["OMP_NUM_THREADS"]}', flush=True)

    def __call__(self, script: str, *args: str, skip: bool = False) -> str:
        cmd = [sys.executable, script, *args]
        shown = shlex.join(_shown(a) for a in cmd)
        with open(self.script, 'a') as f:
            f.write(shown + '\n')
        print(f'\n$ {shown}' + ('    # done already: skipped' if skip else ''), flush=True)
        if skip:
            return ''
        start = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        lines = []
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            lines.append(line)
        if proc.wait() != 0:
            raise UserError(f'The step above failed (exit status {proc.returncode}); fix it and rerun the demo (finished steps are kept)')
        self.steps.append(dict(command=shown, sec=time.time() - start))
        return ''.join(lines)


def _fd_from_output(text: str) -> float:
    """The Frechet distance printed by `fid.py gen` ('FID min X ...') or `fid.py calc` (last line)."""
    lines = text.strip().splitlines()
    for line in reversed(lines):
        if line.startswith('FID min '):
            return float(line.split()[2])
    return float(lines[-1])


def _newest_snapshot(run_dir: str) -> str:
    """The final network of a train.py run: the snapshot with the highest kimg (written last)."""
    snapshots = sorted(glob.glob(os.path.join(run_dir, 'network-snapshot-*.pt')))
    assert snapshots, run_dir
    return snapshots[-1]

#----------------------------------------------------------------------------
# The run.

def run_demo(outdir: str, *, preset: str, max_images: int | None, clean: float, sigma: float, seed: int,
             finetune_data: str = 'union', heldout: float = 0.1, audit_num: int = 1000) -> dict:
    """Data -> SFBD -> two baselines with the same schedule -> Frechet distances, memorization audit, table, plot,
    pictures; returns the results."""
    outdir = os.path.abspath(outdir)
    settings = dict(preset=preset, max_images=max_images, clean=clean, sigma=sigma, seed=seed, finetune_data=finetune_data,
                    heldout=heldout, audit_num=audit_num)
    settings_path = os.path.join(outdir, 'demo_settings.json')
    if os.path.isfile(settings_path):
        with open(settings_path) as f:
            old = json.load(f)
        if old != settings:
            raise UserError(f'{outdir} holds a demo run with other settings ({old}); use another --outdir or delete it')
    os.makedirs(os.path.join(outdir, 'data'), exist_ok=True)
    with open(settings_path, 'w') as f:
        json.dump(settings, f, indent=2)
    run = Runner(outdir, threads=1)
    start = time.time()

    # 1. Data: convert, set a held-out share aside (never trained on: the audit's baseline), split off the clean
    #    share, corrupt the rest once, statistics of the noisy set's originals.
    data = os.path.join(outdir, 'data')
    digits, held_set, pool, clean_set, rest = (os.path.join(data, n) for n in
                                               ('digits.zip', 'heldout.zip', 'pool.zip', 'clean.zip', 'rest.zip'))
    noisy, ref = os.path.join(data, f'noisy-{sigma:g}'), os.path.join(data, 'ref-pixels.npz')
    run('dataset_tool.py', 'convert', '--source=sklearn-digits', f'--dest={digits}',
        *([f'--max-images={max_images}'] if max_images else []), skip=os.path.exists(digits))
    run('dataset_tool.py', 'split', f'--source={digits}', f'--clean={heldout:g}', f'--seed={seed}', f'--dest-clean={held_set}',
        f'--dest-rest={pool}', skip=os.path.exists(held_set) and os.path.exists(pool))
    run('dataset_tool.py', 'split', f'--source={pool}', f'--clean={clean:g}', f'--seed={seed}', f'--dest-clean={clean_set}',
        f'--dest-rest={rest}', skip=os.path.exists(clean_set) and os.path.exists(rest))
    run('dataset_tool.py', 'corrupt', f'--source={rest}', f'--sigma={sigma:g}', f'--seed={seed}', f'--dest={noisy}',
        skip=os.path.exists(os.path.join(noisy, 'dataset.json')))
    run('fid.py', 'ref', f'--data={rest}', f'--dest={ref}', '--detector=pixels', skip=os.path.exists(ref))

    # 2. SFBD (resumes by itself when rerun).
    sfbd_dir = os.path.join(outdir, 'sfbd')
    run('sfbd.py', f'--config={preset}', f'--outdir={sfbd_dir}', f'--clean={clean_set}', f'--noisy={noisy}',
        f'--fid-ref={ref}', '--detector=pixels', f'--seed={seed}', f'--finetune-data={finetune_data}')
    with open(os.path.join(sfbd_dir, 'metrics.jsonl')) as f:
        sfbd_records = [json.loads(line) for line in f]
    with open(os.path.join(sfbd_dir, 'sfbd_options.json')) as f:
        s = dnnlib.EasyDict(json.load(f))  # the schedule and evaluation sfbd.py used: the baselines repeat them
    P, K, F = s.pretrain_kimg, s.iters, s.finetune_kimg
    eval_args = [f'--num={s.eval_num}', f'--steps={s.eval_steps}', f'--batch={s.eval_batch}', '--detector=pixels']
    finetune_args = [f'--{flag}={s[key] if key != "finetune_ema_halflife_kimg" else s[key] / 1000:g}'
                     for flag, key in (('lr', 'finetune_lr'), ('lr-rampup', 'finetune_lr_rampup_kimg'), ('ema', 'finetune_ema_halflife_kimg'))
                     if s[key] is not None]
    pretrained = os.path.join(sfbd_dir, sfbd_records[0]['network'])

    # 3. Baselines with SFBD's schedule (pretrain P kimg, then K fine-tunes of F kimg, fresh Adam each), other data:
    #    clean-only continues the pretrained model on D_clean; noisy-only trains on D_noisy from scratch.
    fds = {'sfbd': [r.get('fid') for r in sfbd_records], 'clean-only': [sfbd_records[0].get('fid')], 'noisy-only': []}
    finals = {'sfbd': os.path.join(sfbd_dir, sfbd_records[-1]['network'])}
    for name, data_path, network in (('clean-only', clean_set, pretrained), ('noisy-only', noisy, None)):
        for k in range(0 if network is None else 1, K + 1):
            d = os.path.join(outdir, name, f'stage-{k:03d}')
            run('train.py', f'--config={preset}', f'--outdir={d}', '--nosubdir', f'--data={data_path}',
                f'--duration={(F if k else P) / 1000:g}', f'--seed={seed + k}',
                *([f'--transfer={network}'] if network else []), *(finetune_args if k else []))  # a rerun resumes by itself
            network = _newest_snapshot(d)
            fds[name].append(_fd_from_output(run('fid.py', 'gen', f'--network={network}', f'--ref={ref}', '--repeats=1',
                                                 '--seed=0', *eval_args)))
        finals[name] = network

    # 4. References: the data sets themselves against the held-out originals; sample grids of the baselines.
    references = {}
    for label, path in ((f'D_clean ({_count(clean_set)} clean images)', clean_set), (f'D_noisy (sigma {sigma:g}, clipped to 8 bits)', noisy)):
        references[label] = _fd_from_output(run('fid.py', 'calc', f'--images={path}', f'--ref={ref}', f'--num={_count(path)}',
                                                '--detector=pixels'))
    grids = {'sfbd': os.path.join(sfbd_dir, f'iter-{K:03d}', 'samples.png')}
    for name in ('clean-only', 'noisy-only'):
        dest = os.path.join(outdir, name, 'samples')
        run('generate.py', f'--network={finals[name]}', f'--outdir={dest}', f'--seeds=0-{max(s.grid_num, 1) - 1}',
            f'--steps={s.eval_steps}')
        grids[name] = dest

    # 5. Memorization audit of every final model: its samples' nearest clean and original images, against the held-out baseline.
    audits = {}
    for m in METHODS:
        dest = os.path.join(outdir, 'audit', m)
        run('audit.py', f'--network={finals[m]}', f'--seeds=0-{audit_num - 1}', f'--steps={s.eval_steps}', f'--clean={clean_set}',
            f'--noisy={noisy}', f'--heldout={held_set}', f'--outdir={dest}', skip=os.path.isfile(os.path.join(dest, 'audit.json')))
        with open(os.path.join(dest, 'audit.json')) as f:
            report = json.load(f)
        audits[m] = {name: {key: entry['pixel'].get(key) for key in ('gu_rate', 'exact_copies', 'share_below_heldout_p05', 'heldout_p05')}
                     | {'heldout_gu_rate': entry['pixel'].get('heldout', {}).get('gu_rate'), 'num_images': entry['num_images']}
                     for name, entry in report['references'].items()}

    # 6. Results.
    rows = [dict(k=k, kimg=P + k * F, **{f'fd_{m}': fds[m][k] for m in METHODS},
                 denoise_mse=sfbd_records[k].get('denoise_mse'), denoise_psnr=sfbd_records[k].get('denoise_psnr'))
            for k in range(K + 1)]
    results = dict(settings=settings, schedule=dict(pretrain_kimg=P, iters=K, finetune_kimg=F, eval_num=s.eval_num,
                                                    eval_steps=s.eval_steps),
                   noisy_input_mse=sigma ** 2, references=references, rows=rows, final_networks=finals, audit=audits,
                   total_sec=time.time() - start, steps=run.steps)
    with open(os.path.join(outdir, 'results.json'), 'w') as f:
        json.dump(results, f, indent=2)
    table = format_table(results)
    with open(os.path.join(outdir, 'results.md'), 'w') as f:
        f.write(table + '\n')
    plot_results(os.path.join(outdir, 'results.png'), results)
    save_pictures(os.path.join(outdir, 'samples.png'), [('originals of D_noisy', rest)] +
                  [(f'{LABELS[m]}, k={K}' if m == 'sfbd' else f'{LABELS[m]}, {P + K * F:g} kimg', grids[m]) for m in METHODS])
    save_pictures(os.path.join(outdir, 'strips.png'), [(f'rows: noisy | E_{k} (SFBD iteration {k}) | original',
                                                        os.path.join(sfbd_dir, f'iter-{k:03d}', 'strip.png')) for k in sorted({1, K})],
                  vertical=True)
    print('\n' + table)
    print(f'\nDemo done in {dnnlib.util.format_time(results["total_sec"])}: {_shown(outdir)}/results.md, results.png, '
          f'samples.png, strips.png; every command in {_shown(run.script)}')
    return results


def _count(path: str) -> int:
    from training.dataset import open_dataset
    return len(open_dataset(path))

#----------------------------------------------------------------------------
# Table, plot and pictures.

def format_table(results: dict) -> str:
    """Markdown table: Frechet distance (pixels) of each method per iteration k, and the error of SFBD's E_k."""
    def num(v: float | None, fmt: str) -> str:
        return '-' if v is None else format(v, fmt)
    st = results['settings']
    lines = [f'Frechet distance in pixel space to the clean originals of D_noisy (lower is better), '
             f'{results["schedule"]["eval_num"]} samples per model; E_k error against the originals '
             f'(noisy input: MSE {results["noisy_input_mse"]:.4f}, PSNR {10 * math.log10(4 / results["noisy_input_mse"]):.2f} dB). '
             f'sigma {st["sigma"]:g}, clean share {st["clean"]:g}, preset {st["preset"]}.', '',
             '| k | kimg | FD SFBD | FD clean-only | FD noisy-only | E_k MSE | E_k PSNR (dB) |',
             '|---:|---:|---:|---:|---:|---:|---:|']
    for r in results['rows']:
        lines.append(f'| {r["k"]} | {r["kimg"]:g} | {num(r["fd_sfbd"], ".3f")} | {num(r["fd_clean-only"], ".3f")} | '
                     f'{num(r["fd_noisy-only"], ".3f")} | {num(r["denoise_mse"], ".4f")} | {num(r["denoise_psnr"], ".2f")} |')
    lines += [''] + [f'Reference: FD of {name}: {fd:.3f}' for name, fd in results['references'].items()]
    if results.get('audit'):
        st = results['settings']
        lines += ['', f'Memorization audit of each final model ({st["audit_num"]} samples; pixel L2 in [-1, 1] units; the held-out '
                      f'{st["heldout"]:g} of the digits were never trained on): the share of samples nearer to a reference image than '
                      f'95% of held-out images are (about 5% when nothing is copied), the Gu et al. rate d1/d2 < 1/3 (held-out images: '
                      f'their own rate), and exact copies.', '',
                  '| model | reference set | images | share < held-out p05 | Gu rate | Gu rate, held-out | exact copies |',
                  '|---|---|---:|---:|---:|---:|---:|']
        for m, per_ref in results['audit'].items():
            for name, a in per_ref.items():
                lines.append(f'| {LABELS[m]} | {name} | {a["num_images"]} | {num(a["share_below_heldout_p05"], ".1%")} | '
                             f'{num(a["gu_rate"], ".1%")} | {num(a["heldout_gu_rate"], ".1%")} | {a["exact_copies"]} |')
    return '\n'.join(lines)


def plot_results(path: str, results: dict) -> None:
    """results.png: FD per iteration for the three methods (data sets as dashed lines), and E_k's MSE."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    rows = results['rows']
    fig = Figure(figsize=(11, 4), layout='constrained')
    ax_fd, ax_mse = fig.subplots(1, 2)
    for m in METHODS:
        ax_fd.plot([r['k'] for r in rows], [r[f'fd_{m}'] for r in rows], marker='o', label=LABELS[m])
    for (name, fd), style in zip(results['references'].items(), (':', '--')):
        ax_fd.axhline(fd, color='grey', linestyle=style, label=name)
    ax_fd.set_title('Frechet distance (pixels) to held-out originals')
    ax_fd.set_yscale('log')
    ax_fd.legend(fontsize=8)
    points = [(r['k'], r['denoise_mse']) for r in rows if r['denoise_mse'] is not None]
    ax_mse.plot(*zip(*points), marker='o', color='C0', label='E_k (SFBD)')
    ax_mse.axhline(results['noisy_input_mse'], color='grey', linestyle='--', label='noisy input (sigma^2)')
    ax_mse.set_title('Denoising MSE of E_k, [-1, 1] units')
    ax_mse.set_ylim(bottom=0)
    ax_mse.legend(fontsize=8)
    for ax in (ax_fd, ax_mse):
        ax.set_xlabel(f'iteration k (kimg = {results["schedule"]["pretrain_kimg"]:g} + k x {results["schedule"]["finetune_kimg"]:g})')
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)


def save_pictures(path: str, panels: list[tuple[str, str]], *, vertical: bool = False) -> None:
    """One figure of titled panels side by side (or stacked), each a PNG file, a folder of PNGs or a dataset (first 64 images)."""
    import numpy as np
    import PIL.Image
    import torch
    from matplotlib.figure import Figure
    from training import images as image_io
    from training.dataset import open_dataset
    images = []
    for _title, source in panels:
        if source.endswith('.png'):
            images.append(np.asarray(PIL.Image.open(source).convert('RGB')))
            continue
        if os.path.isdir(source) and not os.path.exists(os.path.join(source, 'dataset.json')):
            tiles = [image_io.image_to_array(PIL.Image.open(f).convert('RGB')) for f in sorted(glob.glob(os.path.join(source, '*.png')))[:64]]
        else:
            ds = open_dataset(source)
            tiles = [ds[i][0] for i in range(min(64, len(ds)))]
            if tiles[0].dtype != np.uint8:  # a noisy set: [-1, 1] floats
                tiles = [image_io.to_uint8(torch.from_numpy(x)).numpy() for x in tiles]
        tiles = np.stack([np.repeat(x, 3 // x.shape[0], axis=0) for x in tiles])  # grey as RGB
        images.append(image_io.tile(image_io.grid_rows(tiles), pad=1).transpose(1, 2, 0))
    n = len(panels)
    aspect = max(x.shape[1] / x.shape[0] for x in images)
    fig = Figure(figsize=(3.2 * aspect, 3.4 * n) if vertical else (3.2 * n, 3.6), layout='constrained')
    axes = fig.subplots(n, 1, squeeze=False)[:, 0] if vertical else fig.subplots(1, n, squeeze=False)[0]
    for ax, (title, _source), image in zip(axes, panels, images):
        ax.imshow(image, interpolation='nearest')
        ax.set_title(title, fontsize=9)
        ax.axis('off')
    fig.savefig(path, dpi=100)

#----------------------------------------------------------------------------

@click.command(context_settings=dict(help_option_names=['-h', '--help'], show_default=True))
@click.option('--config',     help='Preset of sfbd.py and train.py: a name in configs/ or a JSON file (its "sfbd" section gives the schedule)', metavar='NAME|FILE', type=str, default='demo')
@click.option('--outdir',     help='Directory of the demo run (rerun to resume; other settings need another one)', metavar='DIR', type=str, default='demo-run')
@click.option('--max-images', help='Use only the first N of the 1,797 digits  [default: all]', metavar='N', type=click.IntRange(min=20))
@click.option('--clean',      help='Clean share D_clean: a fraction (0.04) or a count (50)', metavar='FRACTION|COUNT', type=click.FloatRange(min=0, min_open=True), default=0.04)
@click.option('--sigma',      help='Noise std sigma_tau of the noisy set, [-1, 1] pixel units (0.5 = 64 grey levels)', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=0.5)
@click.option('--seed',       help='Seed of the split, the noise and all training', metavar='INT', type=click.IntRange(min=0), default=0)
@click.option('--finetune-data', help='What SFBD fine-tunes on (sfbd.py --finetune-data): union = D_clean and E_k, denoised = E_k alone (Algorithm 1 as printed), mix', type=click.Choice(['union', 'denoised', 'mix']), default='union')
@click.option('--heldout',    help='Share of the digits set aside, never trained on: the baseline of the memorization audit', metavar='FRACTION', type=click.FloatRange(min=0, max=1, min_open=True, max_open=True), default=0.1)
@click.option('--audit-num',  help='Samples per final model in the memorization audit', metavar='N', type=click.IntRange(min=2), default=1000)
@click.option('--smoke',      help='A seconds-long check of the same steps: the tiny preset on 200 digits (overrides --config, --max-images, --clean)', is_flag=True)
def main(config: str, outdir: str, max_images: int | None, clean: float, sigma: float, seed: int, finetune_data: str,
         heldout: float, audit_num: int, smoke: bool) -> None:
    """SFBD end to end on scikit-learn's 8x8 handwritten digits (bundled: no download), on a CPU.

    Splits off a small clean set, corrupts the rest once with Gaussian noise of std --sigma, runs
    sfbd.py (pretraining, K iterations of denoising + fine-tuning) and two baselines with the same
    schedule and kimg: clean-only (the pretrained model fine-tuned on the clean set) and
    noisy-only (trained on the noisy images). Measures the Frechet distance of generated samples
    to the noisy set's clean originals in pixel space (fid.py --detector=pixels), the denoising
    error of every E_k, and audits every final model for memorization (audit.py: nearest clean and
    original images against a held-out share of the digits never trained on). Writes results.md (table), results.json, results.png (plot), samples.png,
    strips.png (noisy | denoised | original) and commands.sh (every command, in order). The SFBD and
    training settings come from the preset (configs/demo.json), which sfbd.py and train.py read.

    \b
    make demo                                     # = .venv/bin/python scripts/demo.py --outdir=demo-run
    python scripts/demo.py --outdir=demo-sigma0.3 --sigma=0.3
    """
    preset = config
    if smoke:
        preset, max_images, clean = SMOKE['preset'], SMOKE['max_images'], SMOKE['clean']
    if clean >= 1 and clean != int(clean):
        raise UserError(f'--clean={clean:g}: give a fraction below 1 or a whole number of images')
    if smoke:
        audit_num = min(audit_num, 64)
    run_demo(outdir, preset=preset, max_images=max_images, clean=clean, sigma=sigma, seed=seed, finetune_data=finetune_data,
             heldout=heldout, audit_num=audit_num)


if __name__ == '__main__':
    main()
