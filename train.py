"""Train a diffusion model EDM-style: parse options, build one options dict, call training_loop."""

import json
import os
import re

import click

import dnnlib
from dnnlib.cli import check_writable_dir, config_option, finite_float, train_options
from dnnlib.util import UserError
from torch_utils import distributed
from training import options, training_loop
from training.options import TrainingOptions, TrainOptions

#----------------------------------------------------------------------------

def _next_run_dir(outdir: str, desc: str) -> str:
    """outdir/NNNNN-desc with NNNNN one past the highest run number there (EDM's layout)."""
    ids = [int(m.group()) for f in (os.listdir(outdir) if os.path.isdir(outdir) else [])
           if os.path.isdir(os.path.join(outdir, f)) and (m := re.match(r'^\d+', f))]
    return os.path.join(outdir, f'{max(ids, default=-1) + 1:05d}-{desc}')


def _reserve_run_dir(outdir: str, desc: str) -> str:
    """Create the next numbered run directory (rank 0): two runs started together get different numbers."""
    while True:
        run_dir = _next_run_dir(outdir, desc)
        try:
            os.makedirs(run_dir)
            return run_dir
        except FileExistsError:
            continue  # another run took this number just now
        except OSError as e:
            raise UserError(f'--outdir={outdir}: cannot create the run directory {run_dir}: {e.strerror or e}; pick a writable --outdir')


def _remove_if_empty(paths: list[str]) -> None:
    """What a refused run created and left empty: nothing is left behind."""
    for path in paths:
        try:
            os.rmdir(path)
        except OSError:
            return

#----------------------------------------------------------------------------

@click.command(context_settings=dict(help_option_names=['-h', '--help'], show_default=True))
@config_option('train')

# Main options.
@click.option('--outdir',       help='Where to make the run directory', metavar='DIR',                       type=str, required=True)
@click.option('--data',         help='Training set: image folder/zip or array dataset', metavar='ZIP|DIR',  type=str, required=True)
@click.option('--cond',         help='Train a class-conditional model', metavar='BOOL',                     type=bool, default=False)
@click.option('--duration',     help='Training duration in millions of images (fractions allowed)', metavar='MIMG', type=finite_float(min=0, min_open=True), default=200)
@click.option('--mix-data',     help='Second data set mixed into every batch', metavar='ZIP|DIR',           type=str)
@click.option('--mix-fraction', help='Share of each batch from --mix-data: round(f * batch) images', metavar='FLOAT', type=finite_float(min=0, max=1), default=0)

# The network and its training (shared with sfbd.py).
@train_options

# I/O.
@click.option('--desc',         help='String to include in the run directory name', metavar='STR',         type=str)
@click.option('--nosubdir',     help='Write into --outdir itself, not a new numbered run directory',       is_flag=True)
@click.option('--seed',         help='Random seed  [default: random]', metavar='INT',                       type=click.IntRange(min=0))
@click.option('--transfer',     help='Start from this network: snapshot, training state or EDM .pkl (pickles: trusted files only); fresh Adam, lr warm-up restarted, no EMA ramp-up', metavar='PT|PKL|URL', type=str)
@click.option('--resume',       help='Continue exactly from a training-state-*.pt, or the newest one in a run directory (with the same options; only the duration, --tick --snap --dump --keep and speed options may change)', metavar='PT|DIR', type=str)
@click.option('--break-lock',   help='Take over the run directory from a process on another machine that holds its lock (only when that process is gone)', is_flag=True)
@click.option('-n', '--dry-run', help='Print the training options and exit; writes nothing',               is_flag=True)

def main(**kwargs) -> None:
    """Train a diffusion-based generative model (EDM, Karras et al. 2022).

    Pixels are in [-1, 1]. Runs as one process under plain python, or one process per GPU under
    torchrun (gloo on CPU). A run directory gets training_options.json, log.txt, stats.jsonl,
    network-snapshot-KIMG.pt (EMA weights) and training-state-KIMG.pt files.

    Examples:

    \b
    # CIFAR-10, DDPM++, the paper's settings, 8 GPUs:
    torchrun --standalone --nproc_per_node=8 train.py --config=cifar10-ddpmpp \\
        --outdir=training-runs --data=datasets/cifar10-32x32.zip

    \b
    # With --nosubdir, rerunning the same command continues a stopped run from its newest state:
    torchrun --standalone --nproc_per_node=8 train.py --config=cifar10-ddpmpp \\
        --outdir=training-runs/cifar10 --nosubdir --data=datasets/cifar10-32x32.zip

    A run directory is locked while a run writes it (run.lock): a second process on it stops with
    a line naming the first. A lock left by a killed process on this machine is taken over; one of
    another machine (shared file system) after an hour without its heartbeat, or with --break-lock.
    """
    t = TrainOptions.take(kwargs)
    opts = dnnlib.EasyDict(kwargs)
    distributed.init()
    # A random seed must be the same on every rank.
    seed = opts.seed if opts.seed is not None else distributed.broadcast_object(int.from_bytes(os.urandom(4), 'little') >> 1)
    c = dnnlib.EasyDict(options.train_run_kwargs(t, data=opts.data, duration=opts.duration, seed=seed, device=distributed.device(),
                                                 cond=opts.cond, mix_data=opts.mix_data, mix_fraction=opts.mix_fraction,
                                                 transfer=opts.transfer, resume=opts.resume))
    if opts.resume is not None and not os.path.exists(opts.resume):
        raise UserError(f'--resume: no such file or directory: {opts.resume}')
    if opts.nosubdir and opts.resume is None and training_loop.find_latest_state(opts.outdir) is not None:
        c.resume = opts.outdir  # the same command again continues the run (training_loop refuses other options)
    TrainingOptions(**c).check()
    batch_gpu, num_rounds = training_loop.batch_layout(t.batch, t.batch_gpu, distributed.get_world_size())
    dataset = dnnlib.util.construct_class_by_name(**c.dataset_kwargs)
    if opts.cond and not dataset.has_labels:
        raise UserError('--cond=True requires labels in the data set\'s dataset.json')

    desc = (f'{dataset.name}-{"cond" if opts.cond else "uncond"}-{t.arch}-{t.precond}'
            f'-gpus{distributed.get_world_size()}-batch{t.batch}-{c.precision}')
    if opts.desc:
        desc += f'-{opts.desc}'
    check_writable_dir(opts.outdir, '--outdir')
    run_dir = opts.outdir if opts.nosubdir else _next_run_dir(opts.outdir, desc)

    distributed.print0('Training options:')
    distributed.print0(json.dumps(c, indent=2))
    distributed.print0(f'\nRun directory:   {run_dir}' + (f' (resuming {c.resume})' if c.get('resume') else ''))
    distributed.print0(f'Data set:        {opts.data} ({len(dataset)} images, {dataset.resolution}x{dataset.resolution}x{dataset.num_channels})')
    distributed.print0(f'Network:         {t.arch}, {t.precond} preconditioning, precision {c.precision}')
    distributed.print0(f'Processes:       {distributed.get_world_size()}, batch {t.batch} = '
                       f'{distributed.get_world_size()} x {num_rounds} round(s) x {batch_gpu}\n')
    del dataset
    if opts.dry_run:
        distributed.print0('Dry run; exiting.')
        return

    created = []
    if not opts.nosubdir:
        error = None
        if distributed.is_main():
            parent_existed = os.path.isdir(opts.outdir)
            try:
                run_dir = _reserve_run_dir(opts.outdir, desc)
                created = [run_dir] + ([] if parent_existed else [opts.outdir])
            except UserError as e:
                error = e.format_message()
        run_dir, error = distributed.broadcast_object((run_dir, error))  # rank 0 picks the number
        if error is not None:
            raise UserError(error)
    try:
        snapshot = training_loop.training_loop(run_dir, break_lock=opts.break_lock, **c)
    except BaseException:
        _remove_if_empty(created)
        raise
    distributed.print0(f'Final network snapshot: {snapshot}')
    distributed.cleanup()

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()
