"""SFBD (Algorithm 1) in one command: pretrain, then denoise the noisy set and fine-tune, K times, evaluating as it goes."""

import click

import dnnlib
import train
from dnnlib.cli import config_option
from torch_utils import distributed, perf
from training import sfbd

#----------------------------------------------------------------------------

@click.command(context_settings=dict(help_option_names=['-h', '--help'], show_default=True))
@config_option('sfbd', inherit='train')

# Data and starting point.
@click.option('--outdir',        help='Run directory (created); rerun the same command to resume it', metavar='DIR', type=str, required=True)
@click.option('--clean',         help='Clean set D_clean: image folder/zip or array dataset', metavar='ZIP|DIR', type=str, required=True)
@click.option('--noisy',         help='Noisy set D_noisy: array dataset whose dataset.json gives sigma (dataset_tool.py corrupt / import-noisy)', metavar='DIR', type=str, required=True)
@click.option('--sigma',         help='Expected noise level sigma_tau in [-1, 1] pixel units; an error if the noisy set says otherwise  [default: the noisy set\'s]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--pretrained',    help='Skip pretraining; start from this network (snapshot, training state, or official EDM .pkl - a pickle can run code from the file: trusted files only). Its own architecture is kept', metavar='PT|PKL|URL', type=str)
@click.option('--pretrain-kimg', help='Pretraining on D_clean, thousands of images', metavar='KIMG', type=click.FloatRange(min=0, min_open=True), default=20000)

# Iterations.
@click.option('--iters',         help='Number K of SFBD iterations', metavar='K', type=click.IntRange(min=1), default=10)
@click.option('--finetune-kimg', help='Fine-tuning per iteration, thousands of images', metavar='KIMG', type=click.FloatRange(min=0, min_open=True), default=2000)
@click.option('--ft-lr',         help='Fine-tune learning rate (fresh Adam every iteration)  [default: --lr]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--ft-lr-rampup',  help='Fine-tune lr warm-up in thousands of images, restarted every iteration  [default: --lr-rampup]', metavar='KIMG', type=click.FloatRange(min=0))
@click.option('--ft-ema',        help='Fine-tune EMA half-life in millions of images  [default: --ema]', metavar='MIMG', type=click.FloatRange(min=0))
@click.option('--clean-mix',     help='Share of each fine-tune batch drawn from D_clean; 0 = Algorithm 1 exactly', metavar='FLOAT', type=click.FloatRange(min=0, max=1, max_open=True), default=0)
@click.option('--denoise-steps', help='Steps of the full EDM schedule (sigma 80 -> 0.002) before truncation at sigma_tau', metavar='INT', type=click.IntRange(min=2), default=18)
@click.option('--denoise-solver', help='Backward solver from sigma_tau to 0: ode (Heun, probability flow, as the official code) or sde (reverse-time SDE, as the paper)', type=click.Choice(['ode', 'sde']), default='ode')
@click.option('--denoise-batch', help='Images per denoising batch; also the unit kept on a resume', metavar='INT', type=click.IntRange(min=1), default=256)
@click.option('--denoise-dtype', help='Storage of E_k: uint8 (as the official PNGs) or float32 [-1, 1]', type=click.Choice(['uint8', 'float32']), default='uint8')
@click.option('--denoise-precision', help=f'Arithmetic of the backward sampler: {train.AUTO_HELP}; fp32 = exact reference; bf16 = bf16 autocast  [default: --precision\'s; fp32 with --precision=fp16]', type=click.Choice(list(perf.PRECISIONS)))

# Evaluation.
@click.option('--eval-every',    help='FID every this many iterations, and of the last model; 0 = never', metavar='INT', type=click.IntRange(min=0), default=1)
@click.option('--eval-num',      help='Generated images per FID', metavar='INT', type=click.IntRange(min=2), default=50000)
@click.option('--eval-steps',    help='Heun steps when generating for FID and sample grids', metavar='INT', type=click.IntRange(min=2), default=18)
@click.option('--eval-batch',    help='Generation batch per process', metavar='INT', type=click.IntRange(min=1), default=64)
@click.option('--eval-precision', help=f'Arithmetic of FID and sample-grid generation: fp32 = exact reference, FIDs comparable with EDM\'s; {train.AUTO_HELP}; bf16 (faster, FIDs shift slightly)', type=click.Choice(list(perf.PRECISIONS)), default='fp32')
@click.option('--fid-ref',       help='FID reference statistics (.npz path or URL, e.g. from fid.py ref)  [default: no FID]', metavar='NPZ|URL', type=str)
@click.option('--detector',      help='FID features: inception, dinov2, pixels (tiny tests only) or a detector pickle (runs code: trusted files only)', metavar='NAME|PKL', type=str, default='inception')
@click.option('--grid',          help='Images in each iteration\'s samples.png (0 = none)', metavar='INT', type=click.IntRange(min=0), default=64)
@click.option('--strip',         help='Images in each iteration\'s strip.png, noisy | denoised | original (0 = none)', metavar='INT', type=click.IntRange(min=0), default=8)
@click.option('--seed',          help='Seed of pretraining, fine-tuning (seed + k) and denoising (image i of E_k: seed, k, i)', metavar='INT', type=click.IntRange(min=0), default=0)

def main(**kwargs) -> None:
    """Train a diffusion model from a few clean and many noisy images with SFBD (Lu, Wu, Yu, ICML 2025).

    Pixels and every sigma are in [-1, 1] units (sigma 0.2 = 25.5 grey levels). Pretrains on
    --clean (or starts from --pretrained), then for k = 1..K: (a) denoises every noisy image
    backward from sigma_tau to 0 with model k-1, giving E_k; (b) fine-tunes model k-1 on E_k;
    (c) measures FID against --fid-ref and, for simulated noisy sets, the error of E_k against the
    originals. Denoising, training and FID generation are sharded over the processes of torchrun.
    Killed at any point, the same command resumes where it stopped.

    The network options below (--arch ... --keep) are train.py's; they apply to pretraining and
    fine-tuning (--channels-last and --compile also to denoising and generation). Run directory:
    sfbd_options.json, log.txt, metrics.jsonl, metrics.png, pretrain/, iter-000/ (model 0),
    iter-KKK/{denoised/, finetune/, samples.png, strip.png, DONE}.

    Examples:

    \b
    # CIFAR-10, 4% clean, sigma 0.2, 8 GPUs:
    torchrun --standalone --nproc_per_node=8 sfbd.py --config=cifar10-ddpmpp --outdir=sfbd-runs/cifar10 \\
        --clean=datasets/cifar10-clean.zip --noisy=datasets/cifar10-noisy-0.2 \\
        --fid-ref=https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz

    \b
    # A few seconds on a CPU:
    python sfbd.py --config=tiny --outdir=sfbd-runs/tiny --clean=CLEAN --noisy=NOISY --fid-ref=REF --detector=pixels
    """
    opts = dnnlib.EasyDict(kwargs)
    distributed.init()
    train_kwargs = train.model_training_kwargs({k: opts[k] for k in train.MODEL_OPTIONS})
    # EDM's fp16 network casts inside itself; the sampler around it then runs as fp32.
    denoise_precision = opts.denoise_precision or ('fp32' if train_kwargs['precision'] == 'fp16' else train_kwargs['precision'])
    sfbd.run_sfbd(
        opts.outdir, clean=opts.clean, noisy=opts.noisy, sigma=opts.sigma, pretrained=opts.pretrained, train_kwargs=train_kwargs,
        dataset_kwargs=dict(xflip=opts.xflip, cache=opts.cache), pretrain_kimg=opts.pretrain_kimg, iters=opts.iters,
        finetune_kimg=opts.finetune_kimg, finetune_lr=opts.ft_lr, finetune_lr_rampup_kimg=opts.ft_lr_rampup,
        finetune_ema_halflife_kimg=None if opts.ft_ema is None else opts.ft_ema * 1000, clean_mix=opts.clean_mix,
        denoise_steps=opts.denoise_steps, denoise_solver=opts.denoise_solver, denoise_batch=opts.denoise_batch,
        denoise_dtype=opts.denoise_dtype, denoise_precision=perf.resolve_precision(denoise_precision, distributed.device()),
        eval_every=opts.eval_every, eval_num=opts.eval_num, eval_steps=opts.eval_steps, eval_batch=opts.eval_batch,
        eval_precision=perf.resolve_precision(opts.eval_precision, distributed.device()), fid_ref=opts.fid_ref, detector=opts.detector, grid_num=opts.grid,
        strip_num=opts.strip, seed=opts.seed)
    distributed.cleanup()

# train.py's network and training options, the same objects, so both commands describe them alike.
main.params.extend(p for p in train.main.params if p.name in (*train.MODEL_OPTIONS, 'xflip', 'cache'))

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()
