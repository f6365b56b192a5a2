"""SFBD (Algorithm 1) in one command: pretrain, then denoise the noisy set and fine-tune, K times, evaluating as it goes."""

import dataclasses

import click

from dnnlib.cli import (AUTO_HELP, DETECTOR_HELP, INFERENCE_PRECISION_HELP, check_writable_dir, config_option, finite_float,
                        grid_option, train_options)
from dnnlib.util import UserError
from torch_utils import distributed, perf
from training import online, options, plan, sfbd
from training.options import FINETUNE_DATA, OnlineOptions, SFBDOptions, TrainOptions

D = SFBDOptions(clean='', noisy='', train_kwargs={})  # the defaults
DO = OnlineOptions()  # the defaults of --online
ONLINE_FIELDS = tuple(f.name for f in dataclasses.fields(OnlineOptions))
BATCH_ONLY = ('iters', 'finetune_kimg', 'finetune_data', 'clean_mix', 'eval_every', 'final_fid_repeats')  # flags online SFBD has no use for

#----------------------------------------------------------------------------

@click.command(context_settings=dict(help_option_names=['-h', '--help'], show_default=True))
@config_option('sfbd', inherit='train')

# Data and starting point.
@click.option('--outdir', 'run_dir',       help='Run directory (created); rerun the same command to resume it', metavar='DIR', type=str, required=True)
@click.option('--clean',         help='Clean set D_clean: image folder/zip or array dataset', metavar='ZIP|DIR', type=str, required=True)
@click.option('--noisy',         help='Noisy set D_noisy: array dataset whose dataset.json gives sigma (dataset_tool.py corrupt / import-noisy)', metavar='DIR', type=str, required=True)
@click.option('--sigma',         help='Expected noise level sigma_tau in [-1, 1] pixel units; an error if the noisy set says otherwise  [default: the noisy set\'s]', metavar='FLOAT', type=finite_float(min=0, min_open=True))
@click.option('--pretrained',    help='Skip pretraining; start from this network (snapshot, training state, or official EDM .pkl - a pickle can run code from the file: trusted files only). Its own architecture is kept', metavar='PT|PKL|URL', type=str)
@click.option('--pretrain-kimg', help='Pretraining on D_clean, thousands of images (not with --pretrained)', metavar='KIMG', type=finite_float(min=0, min_open=True), default=D.pretrain_kimg)
@click.option('--break-lock',    help='Take over the run directory from a process on another machine that holds its lock (only when that process is gone)', is_flag=True)

# Iterations.
@click.option('--iters',         help='Number K of SFBD iterations', metavar='K', type=click.IntRange(min=1), default=D.iters)
@click.option('--finetune-kimg', help='Fine-tuning per iteration, thousands of images', metavar='KIMG', type=finite_float(min=0, min_open=True), default=D.finetune_kimg)
@click.option('--ft-lr', 'finetune_lr',        help='Fine-tune learning rate (fresh Adam every iteration)  [default: --lr]', metavar='FLOAT', type=finite_float(min=0, min_open=True))
@click.option('--ft-lr-rampup', 'finetune_lr_rampup_kimg', help='Fine-tune lr warm-up in thousands of images, restarted every iteration  [default: --lr-rampup]', metavar='KIMG', type=finite_float(min=0))
@click.option('--ft-ema',        help='Fine-tune EMA half-life in millions of images  [default: --ema]', metavar='MIMG', type=finite_float(min=0))
@click.option('--finetune-data', help='What each fine-tune trains on: ' + '; '.join(f'{k} = {v}' for k, v in FINETUNE_DATA.items()), type=click.Choice(list(FINETUNE_DATA)), default=D.finetune_data)
@click.option('--clean-mix',     help='With --finetune-data=mix: the share of each fine-tune batch drawn from D_clean', metavar='FLOAT', type=finite_float(min=0, max=1, max_open=True), default=D.clean_mix)
@click.option('--denoise-steps', help='Steps of the full EDM schedule (sigma 80 -> 0.002) before truncation at sigma_tau', metavar='INT', type=click.IntRange(min=2), default=D.denoise_steps)
@click.option('--denoise-solver', help='Backward solver from sigma_tau to 0: ode (Heun, probability flow, as the official code) or sde (reverse-time SDE, as the paper)', type=click.Choice(['ode', 'sde']), default=D.denoise_solver)
@click.option('--denoise-batch', help='Images per denoising batch; also the unit kept on a resume', metavar='INT', type=click.IntRange(min=1), default=D.denoise_batch)
@click.option('--denoise-dtype', help='Storage of E_k: uint8 (as the official PNGs) or float32 [-1, 1]', type=click.Choice(['uint8', 'float32']), default=D.denoise_dtype)
@click.option('--denoise-precision', help=f'Arithmetic of the backward sampler: {AUTO_HELP}; fp32 = exact reference; bf16 = bf16 autocast  [default: --precision\'s; fp32 with --precision=fp16]', type=click.Choice(list(perf.INFERENCE_PRECISIONS)))

# The network and its training (train.py's flags): pretraining and fine-tuning; --channels-last and
# --compile also apply to denoising and generation.
@train_options

# Evaluation.
@click.option('--eval-every',    help='FID every this many iterations, and of the last model; 0 = never', metavar='INT', type=click.IntRange(min=0), default=D.eval_every)
@click.option('--eval-num',      help='Generated images per FID', metavar='INT', type=click.IntRange(min=2), default=D.eval_num)
@click.option('--eval-steps',    help='Heun steps when generating for FID and sample grids', metavar='INT', type=click.IntRange(min=2), default=D.eval_steps)
@click.option('--eval-batch',    help='Generation batch per process', metavar='INT', type=click.IntRange(min=1), default=D.eval_batch)
@click.option('--eval-precision', help=f'Arithmetic of FID and sample-grid generation: {INFERENCE_PRECISION_HELP}', type=click.Choice(list(perf.INFERENCE_PRECISIONS)), default=D.eval_precision)
@click.option('--final-fid-repeats', help='FID of the last model over this many seed sets of --eval-num images (EDM reports the minimum of 3); metrics.jsonl records min and mean', metavar='INT', type=click.IntRange(min=1), default=D.final_fid_repeats)
@click.option('--audit-num',     help='Memorization audit of every evaluated model: samples per model (nearest D_clean and original images, audit.py\'s statistics in metrics.jsonl and iter-KKK/audit/); 0 = off', metavar='INT', type=click.IntRange(min=0), default=D.audit_num)
@click.option('--audit-heldout', help='Held-out clean images never trained on: the audit\'s baseline  [default: no baseline]', metavar='ZIP|DIR', type=str, default=D.audit_heldout)
@click.option('--fid-ref',       help='FID reference statistics (.npz path or URL, e.g. from fid.py ref)  [default: no FID]', metavar='NPZ|URL', type=str)
@click.option('--detector',      help=DETECTOR_HELP, metavar='NAME|PKL', type=str, default=D.detector)
@grid_option(D.grid_num, 'Images in each iteration\'s samples.png (0 = none)')
@click.option('--strip', 'strip_num',        help='Images in each iteration\'s strip.png, noisy | denoised | original (0 = none)', metavar='INT', type=click.IntRange(min=0), default=D.strip_num)
@click.option('-n', '--dry-run', help='Print the plan (phases, images, network evaluations, estimated wall time on this machine from a few timed steps of the real network) and exit; writes nothing', is_flag=True)
@click.option('--seed',          help='Seed of pretraining, fine-tuning (seed + k) and denoising (image i of E_k: seed, k, i)', metavar='INT', type=click.IntRange(min=0), default=D.seed)

# Online SFBD (SFBD flow, Lu, Lo, Yu, AISTATS 2026): one training run on D_clean and E, E refreshed a slice at a time.
@click.option('--online',        help='Online SFBD instead of Algorithm 1: after model 0, one run on D_clean and E whose rows are re-denoised by the current EMA network a slice at a time (--iters, --finetune-kimg, --clean-mix, --eval-every do not apply)', is_flag=True)
@click.option('--online-kimg',   help='--online: the run after model 0, thousands of images', metavar='KIMG', type=finite_float(min=0, min_open=True), default=DO.online_kimg)
@click.option('--refresh-every', help='--online: m, optimizer steps between two refreshes of E (the paper: 20 for CIFAR-10)', metavar='M', type=click.IntRange(min=1), default=DO.refresh_every)
@click.option('--refresh-num',   help='--online: rows of E backward-denoised per refresh (the kid rule: the most), in a seeded order that visits every row once per cycle', metavar='N', type=click.IntRange(min=1), default=DO.refresh_num)
@click.option('--refresh-rule',  help='--online: fixed = commit every denoised row; kid = commit N x the relative KID improvement of the new rows over the rows they replace, measured against D_clean', type=click.Choice(list(options.REFRESH_RULES)), default=DO.refresh_rule)
@click.option('--refresh-min',   help='--online --refresh-rule=kid: rows committed at least per refresh  [default: --refresh-num / 4]', metavar='N', type=click.IntRange(min=0), default=DO.refresh_min)
@click.option('--kid-detector',  help='--online --refresh-rule=kid: feature detector of the KID (pixels, inception, ...)  [default: --detector]', metavar='NAME|PKL', type=str)
@click.option('--ramp-start', 'ramp_start_kimg', help='--online: the weight of E\'s rows is 0 until this online kimg ...', metavar='KIMG', type=finite_float(min=0), default=DO.ramp_start_kimg)
@click.option('--ramp-end', 'ramp_end_kimg', help='--online: ... and rises linearly to 1 at this online kimg', metavar='KIMG', type=finite_float(min=0), default=DO.ramp_end_kimg)
@click.option('--online-init', 'init', help='--online: E before the first refresh: denoise = the noisy set denoised once by model 0; noisy = the noisy images themselves', type=click.Choice(list(options.ONLINE_INITS)), default=DO.init)
@click.option('--e-share',       help='--online: share of each batch drawn from E  [default: E\'s share of D_clean and E together]', metavar='FLOAT', type=finite_float(min=0, max=1, min_open=True, max_open=True))
@click.option('--eval-kimg',     help='--online: samples, E\'s error and FID every this many online kimg (at tick ends), and at the end', metavar='KIMG', type=finite_float(min=0, min_open=True), default=DO.eval_kimg)

def main(**kwargs) -> None:
    """Train a diffusion model from a few clean and many noisy images with SFBD (Lu, Wu, Yu, ICML 2025).

    Pixels and every sigma are in [-1, 1] units (sigma 0.2 = 25.5 grey levels). Pretrains on
    --clean (or starts from --pretrained), then for k = 1..K: (a) denoises every noisy image
    backward from sigma_tau to 0 with model k-1, giving E_k; (b) fine-tunes model k-1 on D_clean and
    E_k (--finetune-data); (c) measures FID against --fid-ref and, for simulated noisy sets, the error of E_k against the
    originals. Denoising, training and FID generation are sharded over the processes of torchrun.
    Killed at any point, the same command resumes where it stopped. The run directory is locked
    while a run writes it (run.lock): a second process on it stops with a line naming the first; a
    lock left by a killed process on this machine is taken over, one of another machine (shared
    file system) after an hour without its heartbeat, or with --break-lock.

    The network options below (--arch ... --keep) are train.py's; they apply to pretraining and
    fine-tuning (--channels-last and --compile also to denoising and generation). Run directory:
    sfbd_options.json, log.txt, metrics.jsonl, metrics.png, pretrain/, iter-000/ (model 0),
    iter-KKK/{denoised/, finetune/, samples.png, strip.png, DONE}.

    --online runs Online SFBD (SFBD flow's practical form) instead: after model 0, one training run
    on D_clean and a denoised set E (the noisy set denoised once by model 0), whose rows weigh 0 at
    first and 1 after a linear ramp (--ramp-start, --ramp-end); every --refresh-every steps the next
    --refresh-num rows of E (a seeded order visiting every row once per cycle) are re-denoised with the
    current EMA network. Run directory: online_options.json, log.txt, metrics.jsonl, metrics.png,
    pretrain/, iter-000/denoised/ (E before the first refresh), eval-KKK/, online/ (the training
    run, with E-NIMG.npy/.json beside every training state).

    Examples:

    \b
    # CIFAR-10, 4% clean, sigma 0.2, 8 GPUs:
    torchrun --standalone --nproc_per_node=8 sfbd.py --config=cifar10-ddpmpp --outdir=sfbd-runs/cifar10 \\
        --clean=datasets/cifar10-clean.zip --noisy=datasets/cifar10-noisy-0.2 \\
        --fid-ref=https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz

    \b
    # Online SFBD in the paper's CIFAR-10 setting (4% clean, sigma 0.59, m = 20 steps per refresh):
    torchrun --standalone --nproc_per_node=8 sfbd.py --config=cifar10-ddpmpp --online --outdir=sfbd-runs/cifar10-online \\
        --clean=datasets/cifar10-clean-4pct.zip --noisy=datasets/cifar10-noisy-4pct-0.59 \\
        --fid-ref=https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz

    \b
    # A few seconds on a CPU:
    python sfbd.py --config=tiny --outdir=sfbd-runs/tiny --clean=CLEAN --noisy=NOISY --fid-ref=REF --detector=pixels
    """
    t = TrainOptions.take(kwargs)
    run_dir, dry_run, break_lock = kwargs.pop('run_dir'), kwargs.pop('dry_run'), kwargs.pop('break_lock')
    kwargs.pop('config')
    given = click.get_current_context().get_parameter_source('pretrain_kimg') == click.core.ParameterSource.COMMANDLINE
    if kwargs['pretrained'] is not None and given:
        raise UserError('--pretrain-kimg has no effect with --pretrained (pretraining is skipped): drop one of them')
    is_online = kwargs.pop('online')
    on = OnlineOptions(**{name: kwargs.pop(name) for name in ONLINE_FIELDS})
    _check_mode(is_online)
    distributed.init()
    check_writable_dir(run_dir, '--outdir')
    o = options.sfbd_options(t, distributed.device(), **kwargs)
    if dry_run:
        if is_online:
            raise UserError('--dry-run plans batch SFBD runs; drop --online to see the plan of the batch schedule')
        o.check()
        distributed.print0(plan.format_plan(plan.plan_sfbd(o)))
        distributed.print0('Dry run; nothing written.')
        return
    if is_online:
        online.run_online(run_dir, online=on, break_lock=break_lock, **vars(o))
    else:
        sfbd.run_sfbd(run_dir, break_lock=break_lock, **vars(o))
    distributed.cleanup()


def _check_mode(is_online: bool) -> None:
    """Flags given on the command line that the chosen mode would ignore are a one-line error."""
    ctx = click.get_current_context()
    given = [p for p in ctx.command.params if ctx.get_parameter_source(p.name) == click.core.ParameterSource.COMMANDLINE]
    wrong = [p for p in given if p.name in (BATCH_ONLY if is_online else ONLINE_FIELDS)]
    if wrong:
        flag = wrong[0].opts[0]
        raise UserError(f'{flag} is for {"batch SFBD (without --online)" if is_online else "online SFBD"}; '
                        f'{"drop it" if is_online else "add --online or drop it"}')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()
