"""What a run trains with: the option records of training_loop and run_sfbd, and the mapping from a preset's flags to them."""

import dataclasses
import json
import math
from typing import Any

import torch

from dnnlib.util import UserError
from torch_utils import perf
from training.dataset import json_default

#----------------------------------------------------------------------------
# The tables: network architectures (EDM's), preconditioning with its loss, the optimizer, augmentation.

ARCHS = {
    'ddpmpp': dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
                   channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2]),
    'ncsnpp': dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual', decoder_type='standard',
                   channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128, channel_mult=[2, 2, 2]),
    'adm': dict(model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4]),
}
PRECONDS = {
    'vp': ('training.networks.VPPrecond', 'training.loss.VPLoss'),
    've': ('training.networks.VEPrecond', 'training.loss.VELoss'),
    'edm': ('training.networks.EDMPrecond', 'training.loss.EDMLoss'),
}
# Adam as in EDM and the SFBD paper's Table 3; fused=True is a speed option only (dropped where unsupported).
ADAM = dict(class_name='torch.optim.Adam', lr=1e-3, betas=[0.9, 0.999], eps=1e-8, fused=True)
# EDM's --augment pipeline: x-flip for every image at 50% (non-leaky), the other transforms with probability p.
AUGMENT = dict(class_name='training.augment.AugmentPipe', xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
AUGMENT_DIM = 9

#----------------------------------------------------------------------------
# The records. Each is the whole set of options of one library call, written to its run directory as JSON.

@dataclasses.dataclass
class TrainingOptions:
    """training_loop's options (everything but run_dir and device); training_loop(run_dir, **options) repeats a run."""
    dataset_kwargs: dict                          # training.dataset.open_dataset arguments: path, xflip, use_labels, cache, max_size.
    network_kwargs: dict | None = None            # class_name + constructor kwargs; None: the transfer / resume network's own.
    loss_kwargs: dict | None = None               # class_name + kwargs of the loss; None: EDMLoss with its defaults.
    optimizer_kwargs: dict | None = None          # class_name + kwargs; None: ADAM.
    augment_kwargs: dict | None = None            # class_name + kwargs of the augment pipe; None: no augmentation.
    data_loader_kwargs: dict | None = None        # torch DataLoader options (num_workers, prefetch_factor).
    mix_dataset_kwargs: dict | None = None        # Second data set mixed into every batch (SFBD's clean share).
    mix_fraction: float = 0.0                     # Share of each global batch from the mix data set: round(f * batch).
    seed: int = 0                                 # Seed of the initialisation, data order, noise and augmentation.
    batch_size: int = 512                         # Global batch: images per optimizer step over all processes.
    batch_gpu: int | None = None                  # Limit per-process batch (gradient accumulation); None: no limit.
    total_kimg: float = 200000                    # Training duration in thousands of images.
    ema_halflife_kimg: float = 500                # EMA half-life in thousands of images.
    ema_rampup_ratio: float | None = 0.05         # Half-life at most this times the images seen; None: no ramp-up.
    lr_rampup_kimg: float = 10000                 # Learning-rate warm-up in thousands of images (restarts on a fine-tune).
    loss_scaling: float = 1.0                     # Loss multiplier against fp16 underflow.
    precision: str = 'fp32'                       # perf.PRECISIONS: 'fp32' | 'bf16' (autocast) | 'auto' | 'fp16' (EDM's).
    channels_last: bool = False                   # Weights and images in channels_last (NHWC) memory format.
    compile: bool = False                         # Wrap the network in torch.compile.
    kimg_per_tick: float = 50                     # Progress line every this many thousands of images.
    snapshot_ticks: int | None = 50               # Network snapshot (EMA) every this many ticks; None: only the final one.
    state_dump_ticks: int | None = 500            # Training state every this many ticks; None: only the final one.
    keep_last: int | None = None                  # Keep only the newest N snapshots and N states; None: keep all.
    transfer: Any = None                          # Start from these weights (copied into net and EMA): load_network input or module.
    resume: str | None = None                     # Continue a training state: a training-state-*.pt or a run directory (newest).
    cudnn_benchmark: bool = True                  # Let cuDNN pick convolution algorithms.

    def check(self) -> None:
        """One-line errors for values no run can use, naming the field and the flag that sets it."""
        lr = (self.optimizer_kwargs or ADAM).get('lr', 0)
        dropout = (self.network_kwargs or {}).get('dropout', 0)
        augment = (self.augment_kwargs or {}).get('p', 0)
        # name: (value, lowest allowed, whether the lowest itself is allowed, highest allowed)
        numbers = dict(total_kimg=(self.total_kimg, 0, True, math.inf), ema_halflife_kimg=(self.ema_halflife_kimg, 0, True, math.inf),
                       lr_rampup_kimg=(self.lr_rampup_kimg, 0, True, math.inf), loss_scaling=(self.loss_scaling, 0, False, math.inf),
                       kimg_per_tick=(self.kimg_per_tick, 0, False, math.inf), mix_fraction=(self.mix_fraction, 0, True, 1),
                       lr=(lr, 0, False, math.inf), dropout=(dropout, 0, True, 1), augment=(augment, 0, True, 1))
        if self.ema_rampup_ratio is not None:
            numbers['ema_rampup_ratio'] = (self.ema_rampup_ratio, 0, False, math.inf)
        for name, (value, low, closed, high) in numbers.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and (value >= low if closed else value > low) and value <= high):
                bounds = f'in [{low}, {high}]' if high < math.inf else f'{">=" if closed else ">"} {low}'
                raise UserError(f'{_named(name)} must be a finite number {bounds}, got {value}')
        for name in ('batch_size', 'batch_gpu', 'snapshot_ticks', 'state_dump_ticks', 'keep_last'):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise UserError(f'{_named(name)} must be a whole number >= 1, got {value}')
        if self.precision not in perf.PRECISIONS:
            raise UserError(f'Unknown precision {self.precision!r}: use one of {", ".join(perf.PRECISIONS)}')
        if self.network_kwargs is None and self.transfer is None and self.resume is None:
            raise UserError('network_kwargs is required unless transferring or resuming')

    def to_json(self) -> dict:
        """The options as plain JSON types (a training state must load with weights_only)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # asdict would deep-copy a module
        if isinstance(self.transfer, torch.nn.Module):
            d['transfer'] = f'<{type(self.transfer).__name__} object>'
        return json_round_trip(d)


# What each SFBD fine-tune trains on.
FINETUNE_DATA = {
    'union': 'D_clean and E_k as one set, every image equally likely (the official README merges them into one folder)',
    'denoised': 'E_k alone (Algorithm 1 as printed)',
    'mix': 'E_k with a fixed share round(clean_mix * batch) of every batch from D_clean',
}


@dataclasses.dataclass
class SFBDOptions:
    """run_sfbd's options, recorded in sfbd_options.json; a rerun must give the same ones (except `iters`)."""
    clean: str                                    # D_clean: image folder/zip or array dataset.
    noisy: str                                    # D_noisy: array dataset whose dataset.json gives sigma (= sigma_tau).
    train_kwargs: dict                            # TrainingOptions shared by pretraining and fine-tuning (network, loss,
                                                  # optimizer, augment, batch, EMA, ticks): no data, duration, seed or weights.
    dataset_kwargs: dict = dataclasses.field(default_factory=dict)  # open_dataset options of the training sets (xflip, cache).
    sigma: float | None = None                    # Expected sigma_tau ([-1, 1] units); an error if the noisy set disagrees.
    pretrained: str | None = None                 # Start from this network (any load_network input) instead of pretraining.
    pretrain_kimg: float = 20000                  # Pretraining on D_clean, thousands of images.
    iters: int = 10                               # K, the number of SFBD iterations.
    finetune_kimg: float = 2000                   # Fine-tuning per iteration, thousands of images.
    finetune_lr: float | None = None              # Fine-tune learning rate; None: that of train_kwargs.
    finetune_lr_rampup_kimg: float | None = None  # Fine-tune lr warm-up (restarted every iteration); None: train_kwargs'.
    finetune_ema_halflife_kimg: float | None = None  # Fine-tune EMA half-life in kimg; None: train_kwargs'.
    finetune_data: str = 'union'                  # FINETUNE_DATA: what each fine-tune trains on (see finetune_kwargs).
    clean_mix: float = 0.0                        # With finetune_data='mix': the share of each batch from D_clean.
    denoise_steps: int = 18                       # Steps of the full EDM schedule before truncation at sigma_tau.
    denoise_solver: str = 'ode'                   # 'ode' (Heun, probability flow; official code) or 'sde' (reverse SDE).
    denoise_batch: int = 256                      # Images per denoising chunk (also the unit of resumption).
    denoise_dtype: str = 'uint8'                  # Storage of E_k: 'uint8' (as the official PNGs) or 'float32'.
    denoise_precision: str = 'fp32'               # perf.INFERENCE_PRECISIONS of the backward sampler.
    eval_every: int = 1                           # FID every this many iterations (and of the last model); 0: never.
    eval_num: int = 50000                         # Generated images per FID.
    eval_steps: int = 18                          # Heun steps when generating for FID and sample grids.
    eval_batch: int = 64                          # Generation batch per process.
    eval_precision: str = 'fp32'                  # perf.INFERENCE_PRECISIONS of that generation ('fp32': EDM-comparable FIDs).
    fid_ref: str | None = None                    # Reference statistics (.npz path or URL); None: no FID.
    detector: str = 'inception'                   # FID feature detector (training.metrics.load_detector).
    grid_num: int = 64                            # Images in each samples.png; 0: none.
    strip_num: int = 8                            # Images in each strip.png (noisy | denoised | original); 0: none.
    final_fid_repeats: int = 3                    # Seed sets of eval_num images for the last model's FID (EDM: min of 3).
    audit_num: int = 0                            # Samples per evaluated model in the memorization audit; 0: no audit.
    audit_heldout: str | None = None              # Held-out clean images (never trained on): the audit's baseline.
    seed: int = 0                                 # Seed of pretraining (k = 0), fine-tune k (seed + k) and denoising.

    def check(self) -> None:
        """One-line errors for values no run can use (the data sets are checked by run_sfbd)."""
        choices = dict(finetune_data=tuple(FINETUNE_DATA), denoise_solver=('ode', 'sde'), denoise_dtype=('uint8', 'float32'),
                       denoise_precision=perf.INFERENCE_PRECISIONS, eval_precision=perf.INFERENCE_PRECISIONS)
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(f'Unknown --{name.replace("_", "-")} {getattr(self, name)!r}: use one of {", ".join(allowed)}')
        if self.iters < 1:
            raise UserError(f'--iters must be at least 1, got {self.iters}')
        if not 0 <= self.clean_mix < 1:
            raise UserError(f'--clean-mix must be in [0, 1), got {self.clean_mix}')
        if (self.clean_mix > 0) != (self.finetune_data == 'mix'):
            raise UserError(f'--clean-mix={self.clean_mix:g} goes with --finetune-data=mix, and mix needs --clean-mix > 0 '
                            f'(got --finetune-data={self.finetune_data})')
        if self.audit_num == 1 or self.audit_num < 0:
            raise UserError(f'--audit-num must be 0 (no audit) or at least 2, got {self.audit_num}')
        if self.audit_heldout is not None and self.audit_num == 0:
            raise UserError('--audit-heldout is unused without --audit-num: give the number of samples to audit')
        if self.final_fid_repeats < 1:
            raise UserError(f'--final-fid-repeats must be at least 1, got {self.final_fid_repeats}')
        flags = dict(pretrain_kimg='--pretrain-kimg', finetune_kimg='--finetune-kimg', finetune_lr='--ft-lr',
                     finetune_lr_rampup_kimg='--ft-lr-rampup', finetune_ema_halflife_kimg='--ft-ema', sigma='--sigma')
        for name, flag in flags.items():
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise UserError(f'{name} ({flag}) must be a finite non-negative number, got {value}')
        for name, low in dict(denoise_steps=2, denoise_batch=1, eval_every=0, eval_num=2, eval_steps=2, eval_batch=1,
                              grid_num=0, strip_num=0, seed=0).items():
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= low):
                flag = {'grid_num': '--grid', 'strip_num': '--strip'}.get(name, '--' + name.replace('_', '-'))
                raise UserError(f'{flag} must be a whole number >= {low}, got {value}')
        for key in ('dataset_kwargs', 'total_kimg', 'seed', 'transfer', 'resume', 'mix_dataset_kwargs', 'mix_fraction'):
            assert key not in self.train_kwargs, key
        # The training options of pretraining and of every fine-tune, checked now rather than when each starts.
        if self.pretrained is None:
            TrainingOptions(**pretrain_kwargs(self)).check()
        TrainingOptions(**finetune_kwargs(self, 1, network='model k-1', denoised='E_k')).check()

    def to_json(self) -> dict:
        return json_round_trip(dataclasses.asdict(self))


def json_round_trip(obj: Any) -> Any:
    """obj as exactly what a JSON file of it reads back (numpy scalars and arrays become numbers and lists)."""
    return json.loads(json.dumps(obj, default=json_default))


# The flags of train.py (and sfbd.py) that set each TrainingOptions field, for messages.
FLAGS = {
    'total_kimg': '--duration', 'ema_halflife_kimg': '--ema', 'lr_rampup_kimg': '--lr-rampup', 'loss_scaling': '--ls',
    'kimg_per_tick': '--tick', 'mix_fraction': '--mix-fraction', 'lr': '--lr', 'dropout': '--dropout', 'augment': '--augment',
    'batch_size': '--batch', 'batch_gpu': '--batch-gpu', 'snapshot_ticks': '--snap', 'state_dump_ticks': '--dump', 'keep_last': '--keep',
    'dataset_kwargs.path': '--data', 'dataset_kwargs.xflip': '--xflip',
    'dataset_kwargs.use_labels': '--cond', 'mix_dataset_kwargs': '--mix-data', 'mix_dataset_kwargs.path': '--mix-data',
    'optimizer_kwargs.lr': '--lr', 'loss_kwargs': '--precond', 'loss_kwargs.class_name': '--precond', 'augment_kwargs': '--augment',
    'augment_kwargs.p': '--augment', 'network_kwargs.class_name': '--precond', 'network_kwargs.model_channels': '--cbase',
    'network_kwargs.channel_mult': '--cres', 'network_kwargs.num_blocks': '--blocks', 'network_kwargs.attn_resolutions': '--attn',
    'network_kwargs.dropout': '--dropout', 'network_kwargs.augment_dim': '--augment', 'network_kwargs.use_fp16': '--fp16',
    'network_kwargs': '--arch', 'transfer': '--transfer',
}
for _key in ('model_type', 'embedding_type', 'encoder_type', 'decoder_type', 'channel_mult_noise', 'resample_filter'):
    FLAGS[f'network_kwargs.{_key}'] = '--arch'


def _named(name: str) -> str:
    """A field as a message names it: with its flag where it has one."""
    return f'{name} ({FLAGS[name]})' if name in FLAGS else name


# What a resumed run may change: its length, its bookkeeping, and how (not what) it computes.
RESUMABLE = ('total_kimg', 'kimg_per_tick', 'snapshot_ticks', 'state_dump_ticks', 'keep_last', 'batch_gpu', 'precision',
             'channels_last', 'compile', 'cudnn_benchmark', 'data_loader_kwargs', 'dataset_kwargs.cache',
             'mix_dataset_kwargs.cache', 'optimizer_kwargs.fused', 'run_dir', 'resume')
# Taken from the training state when resuming (the state continues its own run): printed where they differ.
STATE_WINS = ('seed', 'ema_rampup_ratio', 'transfer')


def changed_options(old: dict, new: dict, ignore: tuple = ()) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) for each option that differs, dict options compared key by key
    ('optimizer_kwargs.lr'); keys in `ignore` (either form) are skipped. A None option on the new side
    (e.g. network_kwargs: the state's own) matches anything."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if key in ignore or b is None and key == 'network_kwargs':
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            changes += [(f'{key}.{k}', a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
                        if f'{key}.{k}' not in ignore and a.get(k) != b.get(k)]
        elif a != b:
            changes.append((key, a, b))
    return changes


def format_changes(changes: list[tuple[str, Any, Any]]) -> str:
    """'optimizer_kwargs.lr (--lr): 0.002 there, 0.001 now' for the first change, and how many more."""
    key, a, b = changes[0]
    more = f' and {len(changes) - 1} more ({", ".join(k for k, _, _ in changes[1:4])})' if len(changes) > 1 else ''
    return f'{_named(key)}: {a!r} there, {b!r} now{more}'

#----------------------------------------------------------------------------
# From the command line (train.py and sfbd.py share these flags; their help lives in dnnlib/cli.py).

@dataclasses.dataclass
class TrainOptions:
    """The network and how it is trained, as the flags of train.py and sfbd.py name them (units in the comments)."""
    arch: str = 'ddpmpp'                # Key of ARCHS.
    precond: str = 'edm'                # Key of PRECONDS.
    batch: int = 512                    # Global batch, images per optimizer step over all processes.
    batch_gpu: int | None = None        # Per-process limit; the rest by gradient accumulation.
    cbase: int | None = None            # Channel multiplier; None: the arch's.
    cres: list[int] | None = None       # Channels per resolution; None: the arch's.
    blocks: int | None = None           # Residual blocks per resolution; None: the network's default.
    attn: list[int] | None = None       # Resolutions with self-attention; None: the network's default.
    lr: float = ADAM['lr']              # Learning rate.
    lr_rampup: float = 10000            # Learning-rate warm-up, kimg.
    ema: float = 0.5                    # EMA half-life, Mimg.
    dropout: float = 0.13               # Dropout probability.
    augment: float = 0.12               # Augment probability; 0 = off.
    xflip: bool = False                 # Add x-flipped copies of the data set.
    cache: bool = True                  # Cache the data set in CPU memory.
    precision: str = 'auto'             # perf.PRECISIONS; resolved for this process's device by training_kwargs.
    fp16: bool = False                  # EDM's alias for precision='fp16'.
    channels_last: bool = False         # Weights and images in channels_last (NHWC) memory format.
    compile: bool = False               # Wrap the network in torch.compile.
    ls: float = 1                       # Loss scaling.
    bench: bool = True                  # cuDNN benchmarking.
    workers: int = 1                    # DataLoader worker processes.
    tick: float = 50                    # Progress line every this many kimg.
    snap: int = 50                      # Network snapshot every this many ticks.
    dump: int = 500                     # Training state every this many ticks.
    keep: int | None = None             # Keep only the newest N snapshots and states; None: all.

    @classmethod
    def take(cls, kwargs: dict) -> 'TrainOptions':
        """The record from a command's click values, removing its keys from `kwargs`."""
        return cls(**{f.name: kwargs.pop(f.name) for f in dataclasses.fields(cls) if f.name in kwargs})


def dataset_kwargs(t: TrainOptions, path: str | None = None, cond: bool = False) -> dict:
    """open_dataset options of a training set."""
    kwargs = dict(class_name='training.dataset.open_dataset', xflip=t.xflip, cache=t.cache)
    if path is not None:
        kwargs.update(path=path, use_labels=cond)
    return kwargs


def training_kwargs(t: TrainOptions, device: torch.device | str) -> dict:
    """TrainingOptions fields from the shared flags: network, loss, optimizer, augmentation, batch, EMA, lr warm-up,
    precision (resolved for `device`), fast path and bookkeeping; no data set, duration, seed or starting weights."""
    if t.arch not in ARCHS or t.precond not in PRECONDS:
        raise UserError(f'Unknown --arch {t.arch!r} or --precond {t.precond!r}: use {"/".join(ARCHS)} and {"/".join(PRECONDS)}')
    if not 0 <= t.augment <= 1:  # checked here: NaN would silently mean no augmentation
        raise UserError(f'--augment must be a probability in [0, 1], got {t.augment}')
    precision = perf.resolve_precision(t.precision, device, fp16=t.fp16)
    network_class, loss_class = PRECONDS[t.precond]
    network_kwargs = dict(class_name=network_class, **ARCHS[t.arch])
    for key, value in [('model_channels', t.cbase), ('channel_mult', t.cres), ('num_blocks', t.blocks), ('attn_resolutions', t.attn)]:
        if value is not None:
            network_kwargs[key] = value
    network_kwargs.update(dropout=t.dropout, use_fp16=(precision == 'fp16'))
    augment_kwargs = None
    if t.augment > 0:
        augment_kwargs = dict(AUGMENT, p=t.augment)
        network_kwargs['augment_dim'] = AUGMENT_DIM
    return dict(network_kwargs=network_kwargs, loss_kwargs=dict(class_name=loss_class), optimizer_kwargs=dict(ADAM, lr=t.lr),
                augment_kwargs=augment_kwargs, data_loader_kwargs=dict(num_workers=t.workers, prefetch_factor=2),
                batch_size=t.batch, batch_gpu=t.batch_gpu, ema_halflife_kimg=t.ema * 1000, lr_rampup_kimg=t.lr_rampup,
                loss_scaling=t.ls, precision=precision, channels_last=t.channels_last, compile=t.compile,
                cudnn_benchmark=t.bench, kimg_per_tick=t.tick, snapshot_ticks=t.snap, state_dump_ticks=t.dump,
                keep_last=t.keep)


def train_run_kwargs(t: TrainOptions, *, data: str, duration: float, seed: int, device: torch.device | str,
                     cond: bool = False, mix_data: str | None = None, mix_fraction: float = 0.0,
                     transfer: str | None = None, resume: str | None = None) -> dict:
    """train.py's whole run: TrainingOptions from the shared flags, the data, the duration (Mimg) and the start."""
    if transfer is not None and resume is not None:
        raise UserError('--transfer and --resume cannot be used together: a training state already holds its weights')
    if mix_fraction > 0 and mix_data is None:
        raise UserError('--mix-fraction needs --mix-data')
    if mix_data is not None and mix_fraction == 0:
        raise UserError('--mix-data is unused with --mix-fraction=0: give the share of each batch it should fill')
    if not math.isfinite(duration):
        raise UserError(f'--duration must be a finite number of Mimg, got {duration}')
    c = dict(training_kwargs(t, device), dataset_kwargs=dataset_kwargs(t, data, cond), total_kimg=duration * 1000, seed=seed)
    if mix_data is not None:
        c.update(mix_dataset_kwargs=dataset_kwargs(t, mix_data, cond), mix_fraction=mix_fraction)
    if transfer is not None:
        c.update(transfer=transfer, ema_rampup_ratio=None)  # EDM: the transferred weights are already a good average.
    if resume is not None:
        c['resume'] = resume
    return c

#----------------------------------------------------------------------------
# SFBD: the run's options from sfbd.py's flags, and the training_loop options of each of its trainings.

def sfbd_options(t: TrainOptions, device: torch.device | str, *, ft_ema: float | None = None,
                 denoise_precision: str | None = None, eval_precision: str = 'fp32', **sfbd: Any) -> SFBDOptions:
    """SFBDOptions from sfbd.py's flags: the shared training flags, the fine-tune EMA in Mimg, the precisions
    resolved for `device` (denoising defaults to the training precision; an fp16 network denoises in fp32)."""
    train_kwargs = training_kwargs(t, device)
    return SFBDOptions(
        train_kwargs=train_kwargs, dataset_kwargs=dict(xflip=t.xflip, cache=t.cache),
        finetune_ema_halflife_kimg=None if ft_ema is None else ft_ema * 1000,
        denoise_precision=perf.resolve_precision(denoise_precision or train_kwargs['precision'], device, inference=True),
        eval_precision=perf.resolve_precision(eval_precision, device, inference=True), **sfbd)


def _sfbd_data(o: SFBDOptions, path: str | list[str]) -> dict:
    return dict(class_name='training.dataset.open_dataset', **o.dataset_kwargs, path=path)


def pretrain_kwargs(o: SFBDOptions) -> dict:
    """training_loop options of model 0: the shared training options on D_clean for pretrain_kimg, seed `seed`."""
    return dict(o.train_kwargs, dataset_kwargs=_sfbd_data(o, o.clean), total_kimg=o.pretrain_kimg, seed=o.seed)


def finetune_kwargs(o: SFBDOptions, k: int, network: str, denoised: str) -> dict:
    """training_loop options of fine-tune k, everything it trains with.

    Data (finetune_data): 'union' D_clean and E_k (`denoised`) as one set, every image equally
    likely; 'denoised' E_k alone; 'mix' E_k with round(clean_mix * batch) images of every batch
    from D_clean. Start: model k-1 (`network`) copied into net and EMA, its own architecture
    (network_kwargs None), a fresh Adam, the image counter at 0 so the lr warm-up restarts, no EMA
    ramp-up (as EDM's --transfer and the official code). Duration finetune_kimg, seed `seed + k`; lr,
    warm-up and EMA half-life from the finetune_* options where given, else the training options'.
    """
    ft = dict(o.train_kwargs, network_kwargs=None, transfer=network, ema_rampup_ratio=None,
              dataset_kwargs=_sfbd_data(o, [o.clean, denoised] if o.finetune_data == 'union' else denoised),
              total_kimg=o.finetune_kimg, seed=o.seed + k)
    if o.finetune_lr is not None:
        ft['optimizer_kwargs'] = dict(ft.get('optimizer_kwargs') or ADAM, lr=o.finetune_lr)
    if o.finetune_lr_rampup_kimg is not None:
        ft['lr_rampup_kimg'] = o.finetune_lr_rampup_kimg
    if o.finetune_ema_halflife_kimg is not None:
        ft['ema_halflife_kimg'] = o.finetune_ema_halflife_kimg
    if o.finetune_data == 'mix':
        ft.update(mix_dataset_kwargs=_sfbd_data(o, o.clean), mix_fraction=o.clean_mix)
    return ft


def schedule_warnings(o: SFBDOptions) -> list[str]:
    """One line for each part of the SFBD schedule that cannot do what it seems to: a fine-tune whose lr warm-up
    (restarted every iteration) outlasts it never reaches its learning rate."""
    rampup = o.finetune_lr_rampup_kimg
    if rampup is None:
        rampup = o.train_kwargs.get('lr_rampup_kimg', TrainingOptions.lr_rampup_kimg)
    if rampup > o.finetune_kimg:
        return [f'Warning: the fine-tune lr warm-up ({rampup:g} kimg, restarted every iteration) is longer than each '
                f'fine-tune ({o.finetune_kimg:g} kimg): fine-tunes end at {o.finetune_kimg / rampup:.0%} of their learning '
                f'rate; pass --ft-lr-rampup <= --finetune-kimg to reach it']
    return []


#----------------------------------------------------------------------------
# Online SFBD (SFBD flow's practical form, training.online): one training run on D_clean and a denoised set E
# that is refreshed a slice at a time with the current EMA network.

REFRESH_RULES = ('fixed', 'kid')
ONLINE_INITS = ('denoise', 'noisy')


@dataclasses.dataclass
class OnlineOptions:
    """run_online's own options, beside the SFBDOptions it shares with batch SFBD (both in online_options.json)."""
    online_kimg: float = 20000                    # The online run after model 0, thousands of images.
    refresh_every: int = 20                       # m: optimizer steps between two refreshes of E (paper: 20, CIFAR-10).
    refresh_num: int = 256                        # Rows of E backward-denoised per refresh (the 'kid' rule: the most).
    refresh_rule: str = 'fixed'                   # 'fixed' (commit every denoised row) | 'kid' (commit a KID-chosen number).
    refresh_min: int | None = None                # 'kid' rule: rows committed at least (the cycle always advances); None: 1/4.
    kid_detector: str | None = None               # Features of the 'kid' rule (training.metrics.load_detector); None: detector.
    ramp_start_kimg: float = 0                    # Weight of E's rows is 0 until here (online kimg) ...
    ramp_end_kimg: float = 2000                   # ... and rises linearly to 1 here.
    init: str = 'denoise'                         # E before the first refresh: 'denoise' (model 0 denoises all) | 'noisy'.
    e_share: float | None = None                  # Share of each batch from E; None: E's share of D_clean + E.
    eval_kimg: float = 2000                       # Evaluation (samples, E's error, FID) every this many kimg, and at the end.

    def check(self) -> None:
        """One-line errors for values no run can use (the data sets are checked by run_online)."""
        if self.refresh_rule not in REFRESH_RULES:
            raise UserError(f'Unknown --refresh-rule {self.refresh_rule!r}: use one of {", ".join(REFRESH_RULES)}')
        if self.init not in ONLINE_INITS:
            raise UserError(f'Unknown --online-init {self.init!r}: use one of {", ".join(ONLINE_INITS)}')
        for name in ('online_kimg', 'eval_kimg'):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise UserError(f'--{name.replace("_", "-")} must be a positive number, got {value}')
        if self.refresh_every < 1 or self.refresh_num < 1:
            raise UserError(f'--refresh-every and --refresh-num must be at least 1, got {self.refresh_every} and {self.refresh_num}')
        if self.refresh_min is not None and not 0 <= self.refresh_min <= self.refresh_num:
            raise UserError(f'--refresh-min must be in [0, --refresh-num={self.refresh_num}], got {self.refresh_min}')
        if not (math.isfinite(self.ramp_start_kimg) and math.isfinite(self.ramp_end_kimg) and 0 <= self.ramp_start_kimg <= self.ramp_end_kimg):
            raise UserError(f'Need 0 <= --ramp-start <= --ramp-end, got {self.ramp_start_kimg} and {self.ramp_end_kimg}')
        if self.e_share is not None and not 0 < self.e_share < 1:
            raise UserError(f'--e-share must be in (0, 1), got {self.e_share}')

    def to_json(self) -> dict:
        return json_round_trip(dataclasses.asdict(self))


def online_kwargs(o: SFBDOptions, on: OnlineOptions, network: str, e_share: float) -> dict:
    """training_loop options of the online run, everything it trains with but E itself (training.online's hook gives it).

    Start: model 0 (`network`) as a fine-tune starts (finetune_kwargs: copied into net and EMA, its own
    architecture, fresh Adam, lr warm-up restarted, no EMA ramp-up, the finetune_* lr/warm-up/EMA), seed
    `seed + 1`. Data: D_clean, with round(e_share * batch) rows of every batch from E. Duration online_kimg.
    """
    on_clean = dataclasses.replace(o, finetune_data='denoised', clean_mix=0.0)  # the training set is D_clean itself; E comes as the mix set
    return dict(finetune_kwargs(on_clean, 1, network, o.clean), total_kimg=on.online_kimg, mix_dataset_kwargs=None, mix_fraction=e_share)
