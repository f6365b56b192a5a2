"""Train a diffusion model EDM-style: parse options, build one options dict, call training_loop."""

import json
import os
import re

import click

import dnnlib
from dnnlib.cli import check_writable_dir, config_option, train_options
from dnnlib.util import UserError
from torch_utils import distributed
from training import options, training_loop
from training.options import TrainOptions

#----------------------------------------------------------------------------

def _next_run_dir(outdir: str, desc: str) -> str:
    """outdir/NNNNN-desc with NNNNN one past the highest run number there (EDM's layout)."""
    ids = [int(m.group()) for f in (os.listdir(outdir) if os.path.isdir(outdir) else [])
           if os.path.isdir(os.path.join(outdir, f)) and (m := re.match(r'^\d+', f))]
    return os.path.join(outdir, f'{max(ids, default=-1) + 1:05d}-{desc}')

#----------------------------------------------------------------------------

@click.command(context_settings=dict(help_option_names=['-h', '--help'], show_default=True))
@config_option('train')

# Main options.
@click.option('--outdir',       help='Where to make the run directory', metavar='DIR',                       type=str, required=True)
@click.option('--data',         help='Training set: image folder/zip or array dataset', metavar='ZIP|DIR',  type=str, required=True)
@click.option('--cond',         help='Train a class-conditional model', metavar='BOOL',                     type=bool, default=False)
@click.option('--duration',     help='Training duration in millions of images (fractions allowed)', metavar='MIMG', type=click.FloatRange(min=0, min_open=True), default=200)
@click.option('--mix-data',     help='Second data set mixed into every batch', metavar='ZIP|DIR',           type=str)
@click.option('--mix-fraction', help='Share of each batch from --mix-data: round(f * batch) images', metavar='FLOAT', type=click.FloatRange(min=0, max=1), default=0)

# The network and its training (shared with sfbd.py).
@train_options

# I/O.
@click.option('--desc',         help='String to include in the run directory name', metavar='STR',         type=str)
@click.option('--nosubdir',     help='Write into --outdir itself, not a new numbered run directory',       is_flag=True)
@click.option('--seed',         help='Random seed  [default: random]', metavar='INT',                       type=click.IntRange(min=0))
@click.option('--transfer',     help='Start from this network: snapshot, training state or EDM .pkl (pickles: trusted files only); fresh Adam, lr warm-up restarted, no EMA ramp-up', metavar='PT|PKL|URL', type=str)
@click.option('--resume',       help='Continue exactly from a training-state-*.pt, or the newest one in a run directory', metavar='PT|DIR', type=str)
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
    # Continue a stopped run in place:
    torchrun --standalone --nproc_per_node=8 train.py --config=cifar10-ddpmpp \\
        --outdir=training-runs/00000-RUN --nosubdir --resume=training-runs/00000-RUN --data=...
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
    run_dir = distributed.broadcast_object(run_dir)  # Rank 0 picks the number.

    distributed.print0('Training options:')
    distributed.print0(json.dumps(c, indent=2))
    distributed.print0(f'\nRun directory:   {run_dir}')
    distributed.print0(f'Data set:        {opts.data} ({len(dataset)} images, {dataset.resolution}x{dataset.resolution}x{dataset.num_channels})')
    distributed.print0(f'Network:         {t.arch}, {t.precond} preconditioning, precision {c.precision}')
    distributed.print0(f'Processes:       {distributed.get_world_size()}, batch {t.batch} = '
                       f'{distributed.get_world_size()} x {num_rounds} round(s) x {batch_gpu}\n')
    del dataset
    if opts.dry_run:
        distributed.print0('Dry run; exiting.')
        return

    snapshot = training_loop.training_loop(run_dir, **c)
    distributed.print0(f'Final network snapshot: {snapshot}')
    distributed.cleanup()

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()
