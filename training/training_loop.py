"""The EDM training loop: DDP, gradient accumulation, EMA, exactly resumable data order, snapshots."""

import contextlib
import copy
import itertools
import json
import os
import re
import time
from typing import Any, Iterator

import numpy as np
import psutil
import torch

import dnnlib
from dnnlib.util import UserError
from torch_utils import distributed, misc, perf, rng, training_stats
from training import checkpoint
from training.dataset import json_default, to_model_space

# Key spaces of torch_utils.rng.derive_seed(seed, KEY, ...), so no two uses share a stream.
_KEY_STEP, _KEY_ORDER, _KEY_MIX_ORDER, _KEY_DROPOUT = 0, 1, 2, 3

_STATE_RE = re.compile(r'training-state-(\d+)\.pt')
_SNAPSHOT_RE = re.compile(r'network-snapshot-(\d+)\.pt')

#----------------------------------------------------------------------------
# Batch layout.

def batch_layout(batch_size: int, batch_gpu: int | None, world_size: int) -> tuple[int, int]:
    """(per-process batch of one accumulation round, number of rounds) for a global `batch_size`.

    `batch_gpu` limits the per-process batch (None: no limit); the global batch must split evenly
    into world_size x rounds x batch_gpu, so every step sees exactly `batch_size` images.
    """
    if batch_size < 1:
        raise UserError(f'--batch must be at least 1, got {batch_size}')
    if batch_size % world_size != 0:
        raise UserError(f'--batch={batch_size} is not divisible by the number of processes ({world_size})')
    batch_gpu_total = batch_size // world_size
    if batch_gpu is None or batch_gpu >= batch_gpu_total:
        return batch_gpu_total, 1
    if batch_gpu < 1 or batch_gpu_total % batch_gpu != 0:
        raise UserError(f'--batch={batch_size} is not divisible by processes x --batch-gpu '
                        f'({world_size} x {batch_gpu}); pick --batch-gpu dividing {batch_gpu_total}')
    return batch_gpu, batch_gpu_total // batch_gpu

#----------------------------------------------------------------------------
# Data order: a function of (seed, step) only, so a resumed run reads the same images.

class _Stream:
    """An endless sequence of dataset indices: epoch e is a permutation keyed by (seed, key, e)."""

    def __init__(self, size: int, seed: int, key: int):
        self.size, self.seed, self.key = size, seed, key
        self._epoch, self._perm = -1, np.zeros(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            gen = np.random.Generator(np.random.PCG64(rng.derive_seed(self.seed, self.key, epoch)))
            self._epoch, self._perm = epoch, gen.permutation(self.size)
        return self._perm

    def take(self, start: int, count: int) -> np.ndarray:
        """Indices at stream positions [start, start + count)."""
        pos = np.arange(start, start + count, dtype=np.int64)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(pos // self.size):
            sel = (pos // self.size) == epoch
            out[sel] = self._permutation(int(epoch))[pos[sel] % self.size]
        return out


class BatchOrder(torch.utils.data.Sampler):
    """Batch sampler yielding this process's rows of each global batch, one list per accumulation round.

    The global batch of step s holds `batch_size - num_mix` images from the main data set (indices
    [0, main_size)) followed by `num_mix` from the mix data set (indices offset by main_size), taken
    from their streams at positions s * count. Rank r owns the contiguous rows
    [r * batch_gpu * rounds, (r + 1) * batch_gpu * rounds).
    """

    def __init__(self, main_size: int, mix_size: int, num_mix: int, batch_size: int, batch_gpu: int,
                 num_rounds: int, rank: int, seed: int, start_step: int = 0):
        self.batch_size, self.num_mix = batch_size, num_mix
        self.batch_gpu, self.num_rounds, self.rank = batch_gpu, num_rounds, rank
        self.start_step, self.main_size = start_step, main_size
        self.main = _Stream(main_size, seed, _KEY_ORDER) if num_mix < batch_size else None
        self.mix = _Stream(mix_size, seed, _KEY_MIX_ORDER) if num_mix > 0 else None

    def global_batch(self, step: int) -> np.ndarray:
        num_main = self.batch_size - self.num_mix
        parts = []
        if self.main is not None:
            parts.append(self.main.take(step * num_main, num_main))
        if self.mix is not None:
            parts.append(self.main_size + self.mix.take(step * self.num_mix, self.num_mix))
        return np.concatenate(parts)

    def __iter__(self) -> Iterator[list[int]]:
        per_rank = self.batch_gpu * self.num_rounds
        for step in itertools.count(self.start_step):
            rows = self.global_batch(step)[self.rank * per_rank:(self.rank + 1) * per_rank]
            for r in range(self.num_rounds):
                yield rows[r * self.batch_gpu:(r + 1) * self.batch_gpu].tolist()


class _TrainingSet(torch.utils.data.Dataset):
    """The main data set followed by the optional mix data set; items in model space (float32, [-1, 1])."""

    def __init__(self, main: torch.utils.data.Dataset, mix: torch.utils.data.Dataset | None):
        self.main, self.mix = main, mix

    def __len__(self) -> int:
        return len(self.main) + (len(self.mix) if self.mix is not None else 0)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.main[idx] if idx < len(self.main) else self.mix[idx - len(self.main)]
        return to_model_space(torch.from_numpy(image)), torch.from_numpy(label)

#----------------------------------------------------------------------------
# Run directory helpers.

def find_latest_state(run_dir: str) -> str | None:
    """The newest training-state-*.pt in `run_dir`, or None if it holds none."""
    names = [f for f in os.listdir(run_dir) if _STATE_RE.fullmatch(f)] if os.path.isdir(run_dir) else []
    return os.path.join(run_dir, max(names, key=lambda f: int(_STATE_RE.fullmatch(f).group(1)))) if names else None


def _resolve_resume(resume: str) -> str:
    if os.path.isdir(resume):
        path = find_latest_state(resume)
        if path is None:
            raise UserError(f'--resume: no training-state-*.pt in {resume}')
        return path
    if not os.path.isfile(resume):
        raise UserError(f'--resume: no such file or directory: {resume}')
    return resume


def _prune(run_dir: str, pattern: re.Pattern, keep: int | None) -> None:
    """Delete all but the newest `keep` files matching `pattern` (None: keep everything)."""
    if keep is None:
        return
    names = sorted((f for f in os.listdir(run_dir) if pattern.fullmatch(f)), key=lambda f: int(pattern.fullmatch(f).group(1)))
    for name in names[:max(len(names) - keep, 0)]:
        os.remove(os.path.join(run_dir, name))


def _save_snapshot(run_dir: str, ema: torch.nn.Module, o: dict, cur_nimg: int) -> str:
    """Write the EMA network as network-snapshot-KIMG.pt (rank 0); its path on every rank."""
    path = os.path.join(run_dir, f'network-snapshot-{cur_nimg // 1000:06d}.pt')
    if distributed.get_rank() == 0:
        checkpoint.save_network(path, ema, augment_kwargs=o['augment_kwargs'], dataset_kwargs=o['dataset_kwargs'],
                                kimg=cur_nimg / 1e3, meta=dict(run_dir=run_dir, seed=o['seed']))
        _prune(run_dir, _SNAPSHOT_RE, o['keep_last'])
    return path


def _truncate_stats(path: str, kimg: float) -> None:
    """Drop stats.jsonl records past `kimg`: a resumed run rewrites the ticks after its state dump."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    keep = [line for line in lines if json.loads(line).get('Progress/kimg', {}).get('mean', 0) <= kimg + 1e-9]
    if len(keep) != len(lines):
        with dnnlib.util.atomic_write(path, 'w') as f:
            f.writelines(keep)


def _start_run_dir(run_dir: str, options: dict) -> None:
    """Create the run directory (rank 0) and write training_options.json."""
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f'Cannot create output directory {run_dir}: {e.strerror or e}')
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise UserError(f'Output directory {run_dir} is not writable')
    with dnnlib.util.atomic_write(os.path.join(run_dir, 'training_options.json'), 'w') as f:
        json.dump(options, f, indent=2)

#----------------------------------------------------------------------------
# Networks.

def _check_transfer(src: torch.nn.Module, dst: torch.nn.Module, what: str) -> None:
    """Every tensor the source shares with the new network must have the same shape."""
    src_tensors = dict(misc.named_params_and_buffers(src))
    bad = [name for name, t in misc.named_params_and_buffers(dst) if name in src_tensors and src_tensors[name].shape != t.shape]
    if bad:
        raise UserError(f'{what} does not fit the network being trained ({len(bad)} tensors differ in shape, '
                        f'e.g. {bad[0]}); give the same --arch/--cbase/--cres/--blocks/--attn it was trained with')
    if not any(name in src_tensors for name, _ in misc.named_params_and_buffers(dst)):
        raise UserError(f'{what} shares no parameters with the network being trained (a different --arch?)')


def _rng_state(device: torch.device) -> dict:
    """Every rank's torch RNG states (dropout draws from them), gathered onto every rank."""
    local = {'cpu': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state(device) if device.type == 'cuda' else None}
    if not distributed.is_distributed():
        return {'world_size': 1, 'ranks': [local]}
    gathered: list = [None] * distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, local)
    return {'world_size': len(gathered), 'ranks': gathered}


def _set_rng_state(state: dict, device: torch.device) -> bool:
    """Restore this rank's RNG states; False if the state was saved by another number of processes."""
    if state.get('world_size') != distributed.get_world_size():
        return False
    local = state['ranks'][distributed.get_rank()]
    torch.set_rng_state(local['cpu'])
    if device.type == 'cuda' and local['cuda'] is not None:
        torch.cuda.set_rng_state(local['cuda'], device)
    return True


def _build_optimizer(params: list[torch.nn.Parameter], optimizer_kwargs: dict) -> torch.optim.Optimizer:
    """The optimizer; fused=True (one kernel per step, a speed option only) is dropped where it is not supported."""
    try:
        return dnnlib.util.construct_class_by_name(params=params, **optimizer_kwargs)
    except (RuntimeError, TypeError) as e:
        if not optimizer_kwargs.get('fused'):
            raise
        distributed.print0(f'No fused {optimizer_kwargs["class_name"]} here ({str(e).splitlines()[0]}); using the unfused one')
        return dnnlib.util.construct_class_by_name(params=params, **{k: v for k, v in optimizer_kwargs.items() if k != 'fused'})

#----------------------------------------------------------------------------

def training_loop(
    run_dir: str,                                  # Output directory (created; log.txt, stats.jsonl, snapshots).
    *,
    dataset_kwargs: dict,                          # training.dataset.open_dataset arguments: path, xflip, use_labels, cache, max_size.
    network_kwargs: dict | None = None,            # class_name + constructor kwargs; None: the --transfer / --resume network's own.
    loss_kwargs: dict | None = None,               # class_name + kwargs of the loss; None: EDMLoss with its defaults.
    optimizer_kwargs: dict | None = None,          # class_name + kwargs; None: fused Adam(lr 1e-3, betas 0.9/0.999, eps 1e-8).
    augment_kwargs: dict | None = None,            # class_name + kwargs of the augment pipe; None: no augmentation.
    data_loader_kwargs: dict | None = None,        # torch DataLoader options (num_workers, prefetch_factor).
    mix_dataset_kwargs: dict | None = None,        # Second data set mixed into every batch (SFBD --clean-mix).
    mix_fraction: float = 0.0,                     # Share of each global batch from the mix data set: round(f * batch).
    seed: int = 0,                                 # Seed of the initialisation, data order, noise and augmentation.
    batch_size: int = 512,                         # Global batch: images per optimizer step over all processes.
    batch_gpu: int | None = None,                  # Limit per-process batch (gradient accumulation); None: no limit.
    total_kimg: float = 200000,                    # Training duration in thousands of images.
    ema_halflife_kimg: float = 500,                # EMA half-life in thousands of images.
    ema_rampup_ratio: float | None = 0.05,         # Half-life at most this times the images seen; None: no ramp-up.
    lr_rampup_kimg: float = 10000,                 # Learning-rate warm-up in thousands of images (restarts on a fine-tune).
    loss_scaling: float = 1.0,                     # Loss multiplier against fp16 underflow.
    precision: str = 'fp32',                       # 'fp32' | 'bf16' (autocast) | 'auto' | 'fp16' (EDM's network-internal fp16).
    channels_last: bool = False,                   # Weights and images in channels_last (NHWC) memory format.
    compile: bool = False,                         # Wrap the network in torch.compile.
    kimg_per_tick: float = 50,                     # Progress line every this many thousands of images.
    snapshot_ticks: int | None = 50,               # Network snapshot (EMA) every this many ticks; None: only the final one.
    state_dump_ticks: int | None = 500,            # Training state every this many ticks; None: only the final one.
    keep_last: int | None = None,                  # Keep only the newest N snapshots and N states; None: keep all.
    transfer: str | torch.nn.Module | None = None, # Start from these weights (copied into net and EMA); any load_network input.
    resume: str | None = None,                     # Continue a training state: a training-state-*.pt or a run directory (newest).
    cudnn_benchmark: bool = True,                  # Let cuDNN pick convolution algorithms.
    device: str | torch.device | None = None,      # Default: this process's CUDA device, else the CPU.
) -> str:
    """Train a denoiser EDM-style; return the path of the final network snapshot (on every rank).

    Launch with plain python (one process) or torchrun (one process per GPU; gloo on CPU). A fine-tune
    passes `transfer` (fresh Adam, lr warm-up restarted, images counted from 0); `resume` continues a
    training state exactly (weights, EMA, Adam, image counter, RNG, data order) and takes precedence
    over `transfer`, whose weights that state already descends from.
    """
    start_time = time.time()
    distributed.init()
    device = torch.device(device) if device is not None else distributed.device()
    rank, world_size = distributed.get_rank(), distributed.get_world_size()
    batch_gpu, num_rounds = batch_layout(batch_size, batch_gpu, world_size)
    batch_gpu_total = batch_gpu * num_rounds
    if not 0 <= mix_fraction <= 1:
        raise UserError(f'mix_fraction must be in [0, 1], got {mix_fraction}')
    if precision not in ('fp32', 'bf16', 'auto', 'fp16'):
        raise UserError(f'Unknown precision {precision!r}: use fp32, bf16, auto or fp16')
    if (network_kwargs is None) and (transfer is None) and (resume is None):
        raise UserError('network_kwargs is required unless transferring or resuming')
    loss_kwargs = loss_kwargs or dict(class_name='training.loss.EDMLoss')
    optimizer_kwargs = optimizer_kwargs or dict(class_name='torch.optim.Adam', lr=1e-3, betas=[0.9, 0.999], eps=1e-8, fused=True)
    resume_path = _resolve_resume(resume) if resume is not None else None

    options = dict(run_dir=run_dir, dataset_kwargs=dataset_kwargs, network_kwargs=network_kwargs, loss_kwargs=loss_kwargs,
                   optimizer_kwargs=optimizer_kwargs, augment_kwargs=augment_kwargs, data_loader_kwargs=data_loader_kwargs,
                   mix_dataset_kwargs=mix_dataset_kwargs, mix_fraction=mix_fraction, seed=seed, batch_size=batch_size,
                   batch_gpu=batch_gpu, total_kimg=total_kimg, ema_halflife_kimg=ema_halflife_kimg,
                   ema_rampup_ratio=ema_rampup_ratio, lr_rampup_kimg=lr_rampup_kimg, loss_scaling=loss_scaling,
                   precision=precision, channels_last=channels_last, compile=compile, kimg_per_tick=kimg_per_tick,
                   snapshot_ticks=snapshot_ticks, state_dump_ticks=state_dump_ticks, keep_last=keep_last,
                   transfer=transfer if not isinstance(transfer, torch.nn.Module) else f'<{type(transfer).__name__} object>',
                   resume=resume_path, cudnn_benchmark=cudnn_benchmark)
    # Plain JSON types (the state must load with weights_only); training_loop(**options) repeats the run.
    options = json.loads(json.dumps(options, default=json_default))
    with contextlib.ExitStack() as log_scope:
        return _train(run_dir, options, log_scope, resume_path, transfer, device, batch_gpu, num_rounds, batch_gpu_total,
                      start_time, cudnn_benchmark)


def _train(run_dir: str, o: dict, log_scope: contextlib.ExitStack, resume_path: str | None, transfer: Any,
           device: torch.device, batch_gpu: int, num_rounds: int, batch_gpu_total: int, start_time: float,
           cudnn_benchmark: bool) -> str:
    """The body of training_loop: load and check everything, then create the run directory and train."""
    rank, world_size = distributed.get_rank(), distributed.get_world_size()
    seed, batch_size = o['seed'], o['batch_size']
    perf.configure_backends(device, cudnn_benchmark)
    autocast_precision = 'fp32' if o['precision'] == 'fp16' else o['precision']

    # Data sets.
    distributed.print0('Loading dataset...')
    dataset = dnnlib.util.construct_class_by_name(**{'class_name': 'training.dataset.open_dataset', **o['dataset_kwargs']})
    num_mix = int(round(o['mix_fraction'] * batch_size))
    mix = None
    if num_mix > 0:
        mix = dnnlib.util.construct_class_by_name(**{'class_name': 'training.dataset.open_dataset', **o['mix_dataset_kwargs']})
        if (mix.image_shape, mix.label_dim) != (dataset.image_shape, dataset.label_dim):
            raise UserError(f'The mix data set has images {mix.image_shape} and {mix.label_dim} label dims; '
                            f'the training set has {dataset.image_shape} and {dataset.label_dim}')

    # Sources of weights.
    state = None
    if resume_path is not None:
        distributed.print0(f'Loading training state from "{resume_path}"...')
        state = checkpoint.load_training_state(resume_path)
        if (state.get('options') or {}).get('seed', seed) != seed:
            # The seed keys the data order and the noise: only the state's own continues the run exactly.
            distributed.print0(f'Resuming with the state\'s seed {state["options"]["seed"]}, not {seed}')
            seed = o['seed'] = state['options']['seed']
        if transfer is not None:
            distributed.print0('Resuming: the state continues the transferred run, so its weights are used, not --transfer\'s')
            transfer = None
    source = None
    if transfer is not None:
        distributed.print0(f'Transferring weights from {transfer if isinstance(transfer, str) else type(transfer).__name__}...')
        source = transfer if isinstance(transfer, torch.nn.Module) else checkpoint.load_network(transfer, device='cpu')
        checkpoint.check_network_matches(source, dataset.resolution, dataset.num_channels)
        if source.label_dim != dataset.label_dim:
            raise UserError(f'The transferred network takes {source.label_dim} label dims; the data set has {dataset.label_dim} (--cond?)')

    # Network, EMA, loss, optimizer. The same seed on every rank gives identical initial weights.
    distributed.print0('Constructing network...')
    torch.manual_seed(seed)
    if o['network_kwargs'] is not None:
        net_kwargs = dict(o['network_kwargs'])
        net_kwargs.update(img_resolution=dataset.resolution, img_channels=dataset.num_channels, label_dim=dataset.label_dim)
        if o['precision'] == 'fp16':
            net_kwargs['use_fp16'] = True
        net = dnnlib.util.construct_class_by_name(**net_kwargs)
    elif state is not None:
        net = checkpoint.build_network(state['class_name'], state['init_kwargs'])
    else:
        net = checkpoint.build_network(checkpoint.network_class_name(source), source.init_kwargs)
    checkpoint.check_network_matches(net, dataset.resolution, dataset.num_channels)
    net.train().requires_grad_(True).to(device)
    net = perf.prepare_for_training(net, channels_last=o['channels_last'])  # EMA and snapshots inherit the format.
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    if source is not None:
        _check_transfer(source, net, 'The transferred network')
        misc.copy_params_and_buffers(src_module=source, dst_module=net)
        misc.copy_params_and_buffers(src_module=source, dst_module=ema)
        del source
    loss_fn = dnnlib.util.construct_class_by_name(**o['loss_kwargs'])
    augment_pipe = dnnlib.util.construct_class_by_name(**o['augment_kwargs']) if o['augment_kwargs'] is not None else None
    optimizer = _build_optimizer(list(net.parameters()), o['optimizer_kwargs'])
    base_lr = o['optimizer_kwargs']['lr']

    cur_nimg, cur_tick = 0, 0
    if state is not None:
        try:
            net.load_state_dict(state['net'])
            ema.load_state_dict(state['ema'])
        except RuntimeError as e:
            raise UserError(f'{resume_path} does not fit the network options given: {str(e).splitlines()[0]}')
        optimizer.load_state_dict(state['optimizer'])
        cur_nimg, cur_tick = int(state['cur_nimg']), int(state['cur_tick'])
    # Every input checked: only now does the run directory appear, and log.txt starts.
    if rank == 0:
        _start_run_dir(run_dir, o)
    distributed.barrier()
    log_scope.enter_context(dnnlib.util.tee_output(os.path.join(run_dir, 'log.txt') if rank == 0 else None))
    distributed.print0(f'Run directory: {run_dir}')
    distributed.print0(f'Training images: {len(dataset)} from {o["dataset_kwargs"].get("path")}' +
                       (f'; {num_mix} of each batch of {batch_size} from a mix set of {len(mix)}' if mix else ''))
    if resume_path is not None:
        distributed.print0(f'Resuming from {resume_path} at {cur_nimg / 1e3:g} kimg, tick {cur_tick}')
    elif o['transfer'] is not None:
        distributed.print0(f'Transferred weights from {o["transfer"]}')
    distributed.print0(f'Network: {type(net).__name__}, {misc.count_parameters(net):,} parameters')
    # A state that already reached the duration (e.g. a rerun after the end) trains no further.
    total_nimg = int(round(o['total_kimg'] * 1000))
    if cur_nimg >= total_nimg:
        distributed.print0(f'The state is at {cur_nimg / 1e3:g} kimg, not before the end ({o["total_kimg"]:g} kimg): nothing to train')
        return _save_snapshot(run_dir, ema, o, cur_nimg)
    ddp = net
    if distributed.is_distributed():
        ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == 'cuda' else None)
    model = perf.prepare_for_training(ddp, compile=o['compile'])  # ddp itself stays for no_sync().

    # Data loader: an endless batch sampler starting at this step, so the order survives a resume.
    step = cur_nimg // batch_size
    order = BatchOrder(len(dataset), len(mix) if mix else 0, num_mix, batch_size, batch_gpu, num_rounds, rank, seed, start_step=step)
    loader_kwargs = {'num_workers': 1, 'prefetch_factor': 2, **(o['data_loader_kwargs'] or {})}
    if loader_kwargs['num_workers'] == 0:
        loader_kwargs.pop('prefetch_factor')
    loader = torch.utils.data.DataLoader(_TrainingSet(dataset, mix), batch_sampler=order, pin_memory=(device.type == 'cuda'),
                                         generator=torch.Generator().manual_seed(seed), **loader_kwargs)
    data_iter = iter(loader)

    # Dropout draws from each rank's global RNG: restored on resume, else keyed by (seed, rank).
    if state is None or not _set_rng_state(state['rng'], device):
        torch.manual_seed(rng.derive_seed(seed, _KEY_DROPOUT, cur_nimg, rank))
    if state is not None and os.path.abspath(os.path.dirname(resume_path)) == os.path.abspath(run_dir) and rank == 0:
        _truncate_stats(os.path.join(run_dir, 'stats.jsonl'), cur_nimg / 1e3)
    del state

    # Train.
    distributed.print0(f'Training for {o["total_kimg"]:g} kimg on {world_size} process(es), batch {batch_size} '
                       f'({batch_gpu} x {num_rounds} round(s) per process), precision {o["precision"]}...\n')
    collector = training_stats.Collector(regex='.*', keep_previous=False)
    tick_start_nimg, tick_start_time = cur_nimg, time.time()
    maintenance_time = tick_start_time - start_time
    perf.reset_peak_memory(device)
    final_snapshot = None
    while True:
        # Accumulate gradients over rounds; every row's randomness is keyed by (seed, step, row).
        optimizer.zero_grad(set_to_none=True)
        step_seed = rng.derive_seed(seed, _KEY_STEP, step)
        for round_idx in range(num_rounds):
            images, labels = next(data_iter)
            images = perf.to_channels_last(images.to(device, non_blocking=True), o['channels_last'])
            labels = labels.to(device, non_blocking=True)
            start = rank * batch_gpu_total + round_idx * batch_gpu
            rnd = rng.BatchRandom(step_seed, batch_size, start, start + batch_gpu, device)
            with misc.ddp_sync(ddp, round_idx == num_rounds - 1):
                with perf.autocast(device, autocast_precision):
                    loss = loss_fn(net=model, images=images, labels=labels, augment_pipe=augment_pipe, rnd=rnd)
                training_stats.report('Loss/loss', loss)
                loss.sum().mul(o['loss_scaling'] / batch_gpu_total).backward()

        # Update weights: lr warm-up, NaN guard, Adam.
        lr = base_lr * min(cur_nimg / max(o['lr_rampup_kimg'] * 1000, 1e-8), 1)
        for g in optimizer.param_groups:
            g['lr'] = lr
        misc.sanitize_grads(net.parameters())
        optimizer.step()

        # EMA with ramp-up: the half-life is at most ema_rampup_ratio times the images seen.
        ema_halflife_nimg = o['ema_halflife_kimg'] * 1000
        if o['ema_rampup_ratio'] is not None:
            ema_halflife_nimg = min(ema_halflife_nimg, cur_nimg * o['ema_rampup_ratio'])
        ema_beta = 0.5 ** (batch_size / max(ema_halflife_nimg, 1e-8))
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - ema_beta)  # One kernel per group, not per tensor.

        cur_nimg += batch_size
        step += 1
        done = cur_nimg >= total_nimg
        # The first tick of a fresh run ends after one step, so a broken setup shows at once (EDM).
        if not done and cur_tick != 0 and cur_nimg < tick_start_nimg + o['kimg_per_tick'] * 1000:
            continue

        # Progress line; the same numbers go to stats.jsonl.
        tick_end_time = time.time()
        sec_per_kimg = (tick_end_time - tick_start_time) / (cur_nimg - tick_start_nimg) * 1e3
        training_stats.report0('Progress/tick', cur_tick)
        training_stats.report0('Progress/kimg', cur_nimg / 1e3)
        training_stats.report0('Progress/lr', lr)
        training_stats.report0('Progress/ema_beta', ema_beta)
        training_stats.report0('Timing/total_sec', tick_end_time - start_time)
        training_stats.report0('Timing/sec_per_tick', tick_end_time - tick_start_time)
        training_stats.report0('Timing/sec_per_kimg', sec_per_kimg)
        training_stats.report0('Timing/maintenance_sec', maintenance_time)
        training_stats.report0('Resources/cpu_mem_gb', psutil.Process(os.getpid()).memory_info().rss / 2**30)
        training_stats.report0('Resources/peak_mem_gb', perf.peak_memory(device) / 2**30)
        collector.update()
        perf.reset_peak_memory(device)
        eta = (total_nimg - cur_nimg) / 1e3 * sec_per_kimg
        distributed.print0(' '.join([
            f'tick {cur_tick:<5d}',
            f'kimg {cur_nimg / 1e3:<9.3f}',
            f'time {dnnlib.util.format_time(tick_end_time - start_time):<8s}',
            f'sec/kimg {sec_per_kimg:<7.2f}',
            f'ETA {dnnlib.util.format_time(eta):<8s}',
            f'loss {collector.mean("Loss/loss"):<8.4f}',
            f'maintenance {maintenance_time:<5.1f}',
            f'cpumem {collector.mean("Resources/cpu_mem_gb"):<5.2f}',
            f'peakmem {collector.mean("Resources/peak_mem_gb"):<5.2f}',
        ]))
        training_stats.append_jsonl(os.path.join(run_dir, 'stats.jsonl'), dict(collector.as_dict(), timestamp=time.time()))

        # Network snapshot (EMA weights) and full training state; always both at the end.
        if done or (o['snapshot_ticks'] is not None and cur_tick % o['snapshot_ticks'] == 0):
            final_snapshot = _save_snapshot(run_dir, ema, o, cur_nimg)
        if done or (o['state_dump_ticks'] is not None and cur_tick % o['state_dump_ticks'] == 0 and cur_tick != 0):
            rng_state = _rng_state(device)
            if rank == 0:
                checkpoint.save_training_state(os.path.join(run_dir, f'training-state-{cur_nimg // 1000:06d}.pt'), net=net, ema=ema,
                                               optimizer=optimizer, cur_nimg=cur_nimg, cur_tick=cur_tick + 1,
                                               rng=rng_state, options=o)
                _prune(run_dir, _STATE_RE, o['keep_last'])

        cur_tick += 1
        tick_start_nimg, tick_start_time = cur_nimg, time.time()
        maintenance_time = tick_start_time - tick_end_time
        if done:
            break

    del data_iter
    distributed.barrier()
    distributed.print0(f'Done: {final_snapshot}')
    return final_snapshot
