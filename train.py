"""Train a diffusion model EDM-style: parse options, build one options dict, call training_loop."""

import json
import os
import re

import click

import dnnlib
from dnnlib.cli import config_option
from dnnlib.util import UserError, parse_int_list
from torch_utils import distributed, perf
from training import training_loop

# Network architectures (EDM's table); --cbase, --cres, --blocks, --attn override.
ARCHS = {
    'ddpmpp': dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
                   channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2]),
    'ncsnpp': dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual', decoder_type='standard',
                   channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128, channel_mult=[2, 2, 2]),
    'adm': dict(model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4]),
}
# Preconditioning and its loss.
PRECONDS = {
    'vp': ('training.networks.VPPrecond', 'training.loss.VPLoss'),
    've': ('training.networks.VEPrecond', 'training.loss.VELoss'),
    'edm': ('training.networks.EDMPrecond', 'training.loss.EDMLoss'),
}

#----------------------------------------------------------------------------

def _int_list(value):
    """click type: '2,2,2' or '0-3' or a preset's list; 'none' or '' is the empty list."""
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    if str(value).strip().lower() in ('', 'none'):
        return []
    return parse_int_list(value)


def _check_outdir(path: str) -> None:
    """The output directory exists and is writable, or its nearest existing parent is."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f'--outdir={path} cannot be written ({probe} is not a writable directory)')


def _next_run_dir(outdir: str, desc: str) -> str:
    """outdir/NNNNN-desc with NNNNN one past the highest run number there (EDM's layout)."""
    ids = [int(m.group()) for f in (os.listdir(outdir) if os.path.isdir(outdir) else [])
           if os.path.isdir(os.path.join(outdir, f)) and (m := re.match(r'^\d+', f))]
    return os.path.join(outdir, f'{max(ids, default=-1) + 1:05d}-{desc}')

# main()'s options that describe the network and how to train it; sfbd.py offers the same ones.
MODEL_OPTIONS = ('arch', 'precond', 'batch', 'batch_gpu', 'cbase', 'cres', 'blocks', 'attn', 'lr', 'lr_rampup', 'ema',
                 'dropout', 'augment', 'precision', 'fp16', 'channels_last', 'compile', 'ls', 'bench', 'workers', 'tick',
                 'snap', 'dump', 'keep')

AUTO_HELP = 'auto = bf16 where it is native (CUDA Ampere or newer; CPUs with AMX or avx512_bf16), else fp32'
PRECISION_HELP = (f'{AUTO_HELP}; fp32 = the exact reference mode (EDM\'s arithmetic, TF32 off); bf16 = bf16 autocast '
                  '(fp32 with a warning where not native); fp16 = EDM\'s fp16 network')


def resolve_precision(precision: str, fp16: bool) -> str:
    """--precision as this process's device runs it: 'fp32', 'bf16' or 'fp16' (also EDM's --fp16=True)."""
    if fp16 and precision not in ('auto', 'fp32', 'fp16'):
        raise UserError(f'--fp16 contradicts --precision={precision}')
    if fp16 or precision == 'fp16':
        return 'fp16'
    return perf.resolve_precision(precision, distributed.device())


def model_training_kwargs(opts: dict) -> dict:
    """training_loop arguments from the MODEL_OPTIONS values: network, loss, optimizer, augmentation, batch,
    EMA, lr warm-up, precision ('auto' resolved here), fast path and bookkeeping (no data set, duration, seed
    or starting weights)."""
    opts = dnnlib.EasyDict(opts)
    precision = resolve_precision(opts.precision, opts.fp16)
    c = dnnlib.EasyDict()
    c.data_loader_kwargs = dict(num_workers=opts.workers, prefetch_factor=2)
    network_class, loss_class = PRECONDS[opts.precond]
    c.network_kwargs = dict(class_name=network_class, **ARCHS[opts.arch])
    for key, value in [('model_channels', opts.cbase), ('channel_mult', opts.cres), ('num_blocks', opts.blocks),
                       ('attn_resolutions', opts.attn)]:
        if value is not None:
            c.network_kwargs[key] = value
    c.network_kwargs.update(dropout=opts.dropout, use_fp16=(precision == 'fp16'))
    c.loss_kwargs = dict(class_name=loss_class)
    c.optimizer_kwargs = dict(class_name='torch.optim.Adam', lr=opts.lr, betas=[0.9, 0.999], eps=1e-8, fused=True)
    if opts.augment > 0:
        c.augment_kwargs = dict(class_name='training.augment.AugmentPipe', p=opts.augment, xflip=1e8, yflip=1, scale=1,
                                rotate_frac=1, aniso=1, translate_frac=1)
        c.network_kwargs['augment_dim'] = 9
    c.update(batch_size=opts.batch, batch_gpu=opts.batch_gpu, ema_halflife_kimg=opts.ema * 1000,
             lr_rampup_kimg=opts.lr_rampup, loss_scaling=opts.ls, precision=precision, channels_last=opts.channels_last,
             compile=opts.compile, cudnn_benchmark=opts.bench,
             kimg_per_tick=opts.tick, snapshot_ticks=opts.snap, state_dump_ticks=opts.dump, keep_last=opts.keep)
    return c

#----------------------------------------------------------------------------

@click.command(context_settings=dict(help_option_names=['-h', '--help'], show_default=True))
@config_option('train')

# Main options.
@click.option('--outdir',       help='Where to make the run directory', metavar='DIR',                       type=str, required=True)
@click.option('--data',         help='Training set: image folder/zip or array dataset', metavar='ZIP|DIR',  type=str, required=True)
@click.option('--cond',         help='Train a class-conditional model', metavar='BOOL',                     type=bool, default=False)
@click.option('--arch',         help='Network architecture', type=click.Choice(list(ARCHS)),                default='ddpmpp')
@click.option('--precond',      help='Preconditioning and loss', type=click.Choice(list(PRECONDS)),         default='edm')

# Hyperparameters.
@click.option('--duration',     help='Training duration in millions of images (fractions allowed)', metavar='MIMG', type=click.FloatRange(min=0, min_open=True), default=200)
@click.option('--batch',        help='Global batch size (all processes)', metavar='INT',                    type=click.IntRange(min=1), default=512)
@click.option('--batch-gpu',    help='Limit per-process batch; the rest by gradient accumulation', metavar='INT', type=click.IntRange(min=1))
@click.option('--cbase',        help='Channel multiplier  [default: by --arch]', metavar='INT',             type=click.IntRange(min=1))
@click.option('--cres',         help='Channels per resolution  [default: by --arch]', metavar='LIST',       type=_int_list)
@click.option('--blocks',       help='Residual blocks per resolution  [default: by --arch]', metavar='INT', type=click.IntRange(min=1))
@click.option('--attn',         help='Resolutions with self-attention, or none  [default: by --arch]', metavar='LIST', type=_int_list)
@click.option('--lr',           help='Learning rate', metavar='FLOAT',                                      type=click.FloatRange(min=0, min_open=True), default=10e-4)
@click.option('--lr-rampup',    help='Learning-rate warm-up in thousands of images', metavar='KIMG',        type=click.FloatRange(min=0), default=10000)
@click.option('--ema',          help='EMA half-life in millions of images', metavar='MIMG',                 type=click.FloatRange(min=0), default=0.5)
@click.option('--dropout',      help='Dropout probability', metavar='FLOAT',                                type=click.FloatRange(min=0, max=1), default=0.13)
@click.option('--augment',      help='Augment probability (0 = off)', metavar='FLOAT',                      type=click.FloatRange(min=0, max=1), default=0.12)
@click.option('--xflip',        help='Add x-flipped copies of the data set', metavar='BOOL',                type=bool, default=False)
@click.option('--mix-data',     help='Second data set mixed into every batch', metavar='ZIP|DIR',           type=str)
@click.option('--mix-fraction', help='Share of each batch from --mix-data: round(f * batch) images', metavar='FLOAT', type=click.FloatRange(min=0, max=1), default=0)

# Performance.
@click.option('--precision',    help=f'Arithmetic of training: {PRECISION_HELP}', type=click.Choice(['auto', 'fp32', 'bf16', 'fp16']), default='auto')
@click.option('--fp16',         help='EDM\'s alias for --precision=fp16', metavar='BOOL',                   type=bool, default=False)
@click.option('--channels-last', help='Weights and images in channels_last (NHWC) memory format', metavar='BOOL', type=bool, default=False)
@click.option('--compile',      help='Wrap the network in torch.compile (slow first steps)', metavar='BOOL', type=bool, default=False)
@click.option('--ls',           help='Loss scaling', metavar='FLOAT',                                       type=click.FloatRange(min=0, min_open=True), default=1)
@click.option('--bench',        help='Enable cuDNN benchmarking', metavar='BOOL',                           type=bool, default=True)
@click.option('--cache',        help='Cache the data set in CPU memory', metavar='BOOL',                    type=bool, default=True)
@click.option('--workers',      help='DataLoader worker processes (0 = load in the main process)', metavar='INT', type=click.IntRange(min=0), default=1)

# I/O.
@click.option('--desc',         help='String to include in the run directory name', metavar='STR',         type=str)
@click.option('--nosubdir',     help='Write into --outdir itself, not a new numbered run directory',       is_flag=True)
@click.option('--tick',         help='Progress line every this many thousands of images', metavar='KIMG',   type=click.FloatRange(min=0, min_open=True), default=50)
@click.option('--snap',         help='Network snapshot every this many ticks', metavar='TICKS',             type=click.IntRange(min=1), default=50)
@click.option('--dump',         help='Training state every this many ticks', metavar='TICKS',               type=click.IntRange(min=1), default=500)
@click.option('--keep',         help='Keep only the newest N snapshots and N states  [default: all]', metavar='N', type=click.IntRange(min=1))
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
    opts = dnnlib.EasyDict(kwargs)
    distributed.init()
    opts.precision = resolve_precision(opts.precision, opts.fp16)
    if opts.transfer is not None and opts.resume is not None:
        raise UserError('--transfer and --resume cannot be used together: a training state already holds its weights')
    if opts.mix_fraction > 0 and opts.mix_data is None:
        raise UserError('--mix-fraction needs --mix-data')
    batch_gpu, num_rounds = training_loop.batch_layout(opts.batch, opts.batch_gpu, distributed.get_world_size())

    c = dnnlib.EasyDict()
    c.dataset_kwargs = dict(class_name='training.dataset.open_dataset', path=opts.data, use_labels=opts.cond,
                            xflip=opts.xflip, cache=opts.cache)
    dataset = dnnlib.util.construct_class_by_name(**c.dataset_kwargs)
    if opts.cond and not dataset.has_labels:
        raise UserError('--cond=True requires labels in the data set\'s dataset.json')
    if opts.mix_data is not None:
        c.mix_dataset_kwargs = {**c.dataset_kwargs, 'path': opts.mix_data}
        c.mix_fraction = opts.mix_fraction
    c.update(model_training_kwargs(opts), total_kimg=opts.duration * 1000)
    # A random seed must be the same on every rank.
    c.seed = opts.seed if opts.seed is not None else distributed.broadcast_object(int.from_bytes(os.urandom(4), 'little') >> 1)
    if opts.transfer is not None:
        c.transfer = opts.transfer
        c.ema_rampup_ratio = None  # EDM: the transferred weights are already a good average.
    if opts.resume is not None:
        if not os.path.exists(opts.resume):
            raise UserError(f'--resume: no such file or directory: {opts.resume}')
        c.resume = opts.resume

    desc = (f'{dataset.name}-{"cond" if opts.cond else "uncond"}-{opts.arch}-{opts.precond}'
            f'-gpus{distributed.get_world_size()}-batch{opts.batch}-{opts.precision}')
    if opts.desc:
        desc += f'-{opts.desc}'
    _check_outdir(opts.outdir)
    run_dir = opts.outdir if opts.nosubdir else _next_run_dir(opts.outdir, desc)
    run_dir = distributed.broadcast_object(run_dir)  # Rank 0 picks the number.

    distributed.print0('Training options:')
    distributed.print0(json.dumps(c, indent=2))
    distributed.print0(f'\nRun directory:   {run_dir}')
    distributed.print0(f'Data set:        {opts.data} ({len(dataset)} images, {dataset.resolution}x{dataset.resolution}x{dataset.num_channels})')
    distributed.print0(f'Network:         {opts.arch}, {opts.precond} preconditioning, precision {opts.precision}')
    distributed.print0(f'Processes:       {distributed.get_world_size()}, batch {opts.batch} = '
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
