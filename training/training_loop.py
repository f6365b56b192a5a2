"""The EDM training loop: DDP, gradient accumulation, EMA, exactly resumable data order, snapshots."""

import copy
import inspect
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
from torch_utils import distributed, lock, misc, perf, rng, training_stats
from training import checkpoint
from training.dataset import Dataset
from training.images import to_model_space
from training.options import ADAM, RESUMABLE, STATE_WINS, TrainingOptions, changed_options, format_changes

# Key spaces of torch_utils.rng.derive_seed(seed, KEY, ...), so no two uses share a stream.
_KEY_STEP, _KEY_ORDER, _KEY_MIX_ORDER, _KEY_DROPOUT = 0, 1, 2, 3

# File names carry KIMG (kimg_label): EDM's 6-digit kimg, with the images below 1 kimg.
_STATE_RE = re.compile(r'training-state-(\d+(?:\.\d{3})?)\.pt')
_SNAPSHOT_RE = re.compile(r'network-snapshot-(\d+(?:\.\d{3})?)\.pt')
# Training stops once the loss was not finite for this many steps in a row.
NONFINITE_STEPS = 10

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

    def rank_rows(self, step: int) -> np.ndarray:
        """This rank's rows of the global batch of `step`, its accumulation rounds one after another."""
        per_rank = self.batch_gpu * self.num_rounds
        return self.global_batch(step)[self.rank * per_rank:(self.rank + 1) * per_rank]

    def __iter__(self) -> Iterator[list[int]]:
        for step in itertools.count(self.start_step):
            rows = self.rank_rows(step)
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
# Hooks: what a caller runs inside the loop (SFBD's online mode, training.online). The base does nothing.

class TrainingHook:
    """Callbacks of training_loop(hook=...); every rank calls each of them at the same point, so they may be collective.

    `t` is the loop's state (net, ema, optimizer, cur_nimg, step, order, run_dir, device, ...), `o` its options.
    """

    def mix_dataset(self, o: dict) -> Dataset | None:
        """The mix data set to train with instead of opening o['mix_dataset_kwargs'] (None: open it)."""
        return None

    def start(self, t: dnnlib.EasyDict, o: dict, resume_path: str | None) -> None:
        """Before the first step of this call (after a resume has restored the loop's state from resume_path)."""

    def batch(self, t: dnnlib.EasyDict, round_idx: int, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(images, per-row loss weight or None) of accumulation round `round_idx` of step t.step, rows
        t.order.rank_rows(t.step)[round_idx * t.batch_gpu:]. Rows of a data set refreshed in place must be
        read here: the loader's workers hold copies and prefetch ahead of the step."""
        return images, None

    def after_step(self, t: dnnlib.EasyDict, o: dict) -> None:
        """After every optimizer step and EMA update (t.step and t.cur_nimg already advanced)."""

    def tick_end(self, t: dnnlib.EasyDict, o: dict, done: bool) -> None:
        """At the end of every tick, after its progress line, before its snapshot and state."""

    def save_state(self, t: dnnlib.EasyDict, o: dict, state_path: str) -> None:
        """Before training-state file `state_path` is written: whatever else a resume from it needs."""

#----------------------------------------------------------------------------
# Run directory helpers.

def kimg_label(nimg: int) -> str:
    """KIMG in snapshot and state names: EDM's 6-digit kimg, and below 1 kimg the image count too
    ('000000.512'), so early snapshots do not overwrite each other. Names sort as their numbers do."""
    return f'{nimg // 1000:06d}' if nimg >= 1000 or nimg == 0 else f'000000.{nimg:03d}'


def _file_kimg(pattern: re.Pattern, name: str) -> float:
    return float(pattern.fullmatch(name).group(1))


def find_latest_state(run_dir: str) -> str | None:
    """The newest training-state-*.pt in `run_dir`, or None if it holds none."""
    names = [f for f in os.listdir(run_dir) if _STATE_RE.fullmatch(f)] if os.path.isdir(run_dir) else []
    return os.path.join(run_dir, max(names, key=lambda f: _file_kimg(_STATE_RE, f))) if names else None


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
    names = sorted((f for f in os.listdir(run_dir) if pattern.fullmatch(f)), key=lambda f: _file_kimg(pattern, f))
    for name in names[:max(len(names) - keep, 0)]:
        os.remove(os.path.join(run_dir, name))


def _save_snapshot(run_dir: str, ema: torch.nn.Module, o: dict, cur_nimg: int) -> str:
    """Write the EMA network as network-snapshot-KIMG.pt (rank 0); its path on every rank."""
    path = os.path.join(run_dir, f'network-snapshot-{kimg_label(cur_nimg)}.pt')
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
    # The logged kimg went through float32: compare with its precision, not exactly.
    keep = [line for line in lines if json.loads(line).get('Progress/kimg', {}).get('mean', 0) <= kimg * (1 + 1e-6) + 1e-9]
    if len(keep) != len(lines):
        with dnnlib.util.atomic_write(path, 'w') as f:
            f.writelines(keep)


def _absolute_paths(o: dict, now: dict | None = None) -> dict:
    """o with its data set paths absolute (as training_options.json records them). Given the options
    `now`, a path that moved together with the run directory (SFBD's E_k beside its fine-tune) counts
    as the same path."""
    o = dict(o)
    for key in ('dataset_kwargs', 'mix_dataset_kwargs'):
        if isinstance(o.get(key), dict) and isinstance(o[key].get('path'), str):
            path = os.path.abspath(o[key]['path'])
            if now is not None and isinstance((now.get(key) or {}).get('path'), str) and o.get('run_dir') and now.get('run_dir'):
                if os.path.relpath(path, o['run_dir']) == os.path.relpath(now[key]['path'], now['run_dir']):
                    path = now[key]['path']
            o[key] = dict(o[key], path=path)
    return o


def _check_run_dir(run_dir: str, o: dict, resuming_here: bool) -> None:
    """A run directory holds one run: a rerun continues it with the same options, anything else is refused."""
    path = os.path.join(run_dir, 'training_options.json')
    if os.path.isfile(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f'Cannot read {path}: {e}; remove it, or use another output directory')
        # A fresh start may draw a new seed; a resumed one takes the state's seed and weights.
        changes = changed_options(_absolute_paths(old, o), o, RESUMABLE + (STATE_WINS if resuming_here else ('seed',)))
        if changes:
            raise UserError(f'{run_dir} holds a training run with other options ({format_changes(changes)}); '
                            'rerun with that run\'s options to continue it, or use another output directory')
    if not resuming_here and find_latest_state(run_dir) is not None:
        raise UserError(f'{run_dir} already holds the training states of a run; continue it with resume={run_dir} '
                        '(train.py: rerun with --nosubdir and the same options), or use another output directory')


def _start_run_dir(run_dir: str, options: dict, fresh: bool) -> None:
    """Write training_options.json (rank 0); a fresh start drops the stats of an attempt that left no state."""
    with dnnlib.util.atomic_write(os.path.join(run_dir, 'training_options.json'), 'w') as f:
        json.dump(options, f, indent=2)
    stats = os.path.join(run_dir, 'stats.jsonl')
    if fresh and os.path.isfile(stats):
        os.remove(stats)

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

def training_loop(run_dir: str, device: str | torch.device | None = None, hook: TrainingHook | None = None, *,
                  break_lock: bool = False, **kwargs: Any) -> str:
    """Train a denoiser EDM-style with training.options.TrainingOptions(**kwargs); return the final snapshot's path.

    Launch with plain python (one process) or torchrun (one process per GPU; gloo on CPU); `device`
    defaults to this process's CUDA device, else the CPU. A fine-tune passes `transfer` (fresh Adam,
    lr warm-up restarted, images counted from 0); `resume` continues a training state exactly
    (weights, EMA, Adam, image counter, RNG, data order) and takes precedence over `transfer`, whose
    weights that state already descends from. Every input is checked before run_dir is created; the
    run directory is locked (torch_utils.lock; `break_lock` takes over a lock of another machine) and
    holds one run: a call with other options than the run already there is refused.
    `hook` (a TrainingHook) runs the caller's code inside the loop; it is not part of the options.
    """
    start_time = time.time()
    distributed.init()
    device = torch.device(device) if device is not None else distributed.device()
    options = TrainingOptions(**kwargs)
    options.check()
    batch_gpu, num_rounds = batch_layout(options.batch_size, options.batch_gpu, distributed.get_world_size())
    resume_path = _resolve_resume(options.resume) if options.resume is not None else None
    # What training_options.json records: training_loop(**o) repeats the run.
    o = _absolute_paths(dict(run_dir=run_dir, **options.to_json()))
    o.update(resume=resume_path, loss_kwargs=o['loss_kwargs'] or dict(class_name='training.loss.EDMLoss'),
             optimizer_kwargs=o['optimizer_kwargs'] or dict(ADAM))
    perf.configure_backends(device, options.cudnn_benchmark)

    # 1. The data.
    distributed.print0('Loading dataset...')
    dataset, mix, num_mix = _open_data(o, hook)
    # 2. Where the weights come from: a training state, transferred weights, or a fresh initialisation.
    state, source = _load_start(o, resume_path, options.transfer, dataset)
    # 3. Network, EMA, loss, augmentation, optimizer, counters.
    t = _build(o, dataset, state, source, device)
    t.update(run_dir=run_dir, device=device, batch_gpu=batch_gpu, num_rounds=num_rounds, num_mix=num_mix,
             total_nimg=int(round(o['total_kimg'] * 1000)), start_time=start_time, hook=hook)
    # 4. Every input checked: only now does the run directory appear, locked against a second process; log.txt starts.
    with lock.run_lock(run_dir, break_lock=break_lock):
        resuming_here = resume_path is not None and os.path.abspath(os.path.dirname(resume_path)) == os.path.abspath(run_dir)
        _check_run_dir(run_dir, o, resuming_here)
        if distributed.is_main():
            _start_run_dir(run_dir, o, fresh=state is None)
        distributed.barrier()
        with dnnlib.util.tee_output(os.path.join(run_dir, 'log.txt') if distributed.is_main() else None):
            _print_start(t, o, dataset, mix, resume_path)
            if t.cur_nimg >= t.total_nimg:
                # A state that already reached the duration (e.g. a rerun after the end) trains no further.
                distributed.print0(f'The state is at {t.cur_nimg / 1e3:g} kimg, not before the end ({o["total_kimg"]:g} kimg): nothing to train')
                return _save_snapshot(run_dir, t.ema, o, t.cur_nimg)
            # 5. The loader: an endless batch sampler from this step on, so the order survives a resume.
            data_iter = _make_loader(t, o, dataset, mix)
            _restore_rng(t, o, state, resume_path)
            del state
            if hook is not None:
                hook.start(t, o, resume_path)
            # 6. Train: steps, and at the end of every tick the progress line, snapshots and states.
            return _train(t, o, data_iter)


def check_finite_images(dataset: Dataset, name: str, max_images: int = 512) -> np.ndarray | None:
    """UserError if a float data set holds NaN or inf: every image of a small set, else `max_images`
    evenly spaced ones. Returns the float images read (None for uint8 sets, which are always finite)."""
    if not np.issubdtype(dataset[0][0].dtype, np.floating):
        return None
    rows = np.unique(np.linspace(0, len(dataset) - 1, num=min(len(dataset), max_images)).round().astype(np.int64))
    images = np.stack([dataset[int(i)][0] for i in rows]).astype(np.float32)
    bad = ~np.isfinite(images).reshape(len(rows), -1).all(axis=1)
    if bad.any():
        raise UserError(f'{name} holds values that are not finite (NaN or inf), e.g. in image {int(rows[bad.argmax()])}; '
                        'fix the data set or make it again')
    return images


def _open_data(o: dict, hook: TrainingHook | None = None) -> tuple[Dataset, Dataset | None, int]:
    """(training set, mix set or None, images per batch from the mix set); the hook may give the mix set."""
    dataset = dnnlib.util.construct_class_by_name(**{'class_name': 'training.dataset.open_dataset', **o['dataset_kwargs']})
    check_finite_images(dataset, f'The training set {o["dataset_kwargs"].get("path")}')
    num_mix = int(round(o['mix_fraction'] * o['batch_size']))
    mix = None
    if num_mix > 0:
        mix = hook.mix_dataset(o) if hook is not None else None
        if mix is None:
            if o['mix_dataset_kwargs'] is None:
                raise UserError('mix_fraction > 0 needs mix_dataset_kwargs, or a hook that gives the mix set '
                                '(an online SFBD run is repeated by sfbd.py --online, not by its training_options.json)')
            mix = dnnlib.util.construct_class_by_name(**{'class_name': 'training.dataset.open_dataset', **o['mix_dataset_kwargs']})
            check_finite_images(mix, f'The mix data set {o["mix_dataset_kwargs"].get("path")}')
        if (mix.image_shape, mix.label_dim) != (dataset.image_shape, dataset.label_dim):
            raise UserError(f'The mix data set has images {mix.image_shape} and {mix.label_dim} label dims; '
                            f'the training set has {dataset.image_shape} and {dataset.label_dim}: give a mix set of the same '
                            'resolution, channels and labels')
    return dataset, mix, num_mix


def _load_start(o: dict, resume_path: str | None, transfer: Any, dataset: Dataset) -> tuple[dict | None, torch.nn.Module | None]:
    """(training state or None, network whose weights to transfer or None); a state wins over a transfer."""
    state = None
    if resume_path is not None:
        distributed.print0(f'Loading training state from "{resume_path}"...')
        state = checkpoint.load_training_state(resume_path)
        recorded = _absolute_paths(state.get('options') or {}, o)
        if transfer is not None:
            distributed.print0('Resuming: the state continues the transferred run, so its weights are used, not --transfer\'s')
        # The seed keys the data order and the noise: only the state's own continues the run exactly (so
        # for its EMA ramp-up and the weights it started from).
        for key in STATE_WINS:
            if key in recorded and recorded[key] != o[key]:
                if key != 'transfer':
                    distributed.print0(f'Resuming with the state\'s {key} {recorded[key]}, not {o[key]}')
                o[key] = recorded[key]
        changes = changed_options(recorded, o, RESUMABLE + STATE_WINS) if recorded else []
        if changes:
            raise UserError(f'Cannot resume {resume_path}: it was trained with other options ({format_changes(changes)}); give its '
                            'options (only the duration, --tick, --snap, --dump, --keep and speed options may change), or start '
                            'a new run elsewhere, from its weights with --transfer')
        return state, None
    if transfer is None:
        return None, None
    distributed.print0(f'Transferring weights from {transfer if isinstance(transfer, str) else type(transfer).__name__}...')
    source = transfer if isinstance(transfer, torch.nn.Module) else checkpoint.load_network(transfer, device='cpu')
    checkpoint.check_network_matches(source, dataset.resolution, dataset.num_channels)
    if source.label_dim != dataset.label_dim:
        raise UserError(f'The transferred network takes {source.label_dim} label dims; the data set has {dataset.label_dim} (--cond?)')
    return None, source


def _build(o: dict, dataset: Dataset, state: dict | None, source: torch.nn.Module | None, device: torch.device) -> dnnlib.EasyDict:
    """net, ema, loss_fn, augment_pipe, optimizer, cur_nimg, cur_tick. The same seed on every rank gives identical weights."""
    distributed.print0('Constructing network...')
    torch.manual_seed(o['seed'])
    if o['network_kwargs'] is not None:
        net_kwargs = dict(o['network_kwargs'], use_fp16=True) if o['precision'] == 'fp16' else o['network_kwargs']
        net = construct_network(net_kwargs, dataset.resolution, dataset.num_channels, dataset.label_dim)
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
    zero = torch.zeros((), dtype=torch.int64, device=device)
    t = dnnlib.EasyDict(net=net, ema=ema, cur_nimg=0, cur_tick=0, bad_steps=zero, max_bad_steps=zero,
                        loss_fn=dnnlib.util.construct_class_by_name(**o['loss_kwargs']),
                        augment_pipe=dnnlib.util.construct_class_by_name(**o['augment_kwargs']) if o['augment_kwargs'] else None,
                        optimizer=_build_optimizer(list(net.parameters()), o['optimizer_kwargs']))
    if state is not None:
        try:
            net.load_state_dict(state['net'])
            ema.load_state_dict(state['ema'])
        except RuntimeError as e:
            raise UserError(f'{o["resume"]} does not fit the network options given: {str(e).splitlines()[0]}')
        t.optimizer.load_state_dict(state['optimizer'])
        t.cur_nimg, t.cur_tick = int(state['cur_nimg']), int(state['cur_tick'])
    return t


def construct_network(network_kwargs: dict, resolution: int, channels: int, label_dim: int = 0) -> torch.nn.Module:
    """The network of `network_kwargs` for these images, on the CPU, tried on one image (eval mode, no
    randomness drawn), so options that cannot work fail now in one line rather than at the first step."""
    kwargs = dict(network_kwargs, img_resolution=resolution, img_channels=channels, label_dim=label_dim)
    if 'channel_mult' in kwargs and not kwargs['channel_mult']:
        raise UserError('--cres is empty: the network needs at least one resolution level, e.g. --cres=1,2')
    _check_attention(kwargs)
    what = f'The network options ({kwargs.get("class_name")}, --arch/--cbase/--cres/--blocks/--attn)'
    try:
        net = dnnlib.util.construct_class_by_name(**kwargs)
    except (TypeError, ValueError, IndexError, KeyError, ZeroDivisionError, RuntimeError) as e:
        raise UserError(f'{what} cannot build a network for {resolution}x{resolution} images: {type(e).__name__}: '
                        f'{(str(e).splitlines() or [""])[0]}')
    net.eval()
    try:
        with torch.no_grad():
            net(torch.zeros([1, channels, resolution, resolution]), torch.ones([1]),
                class_labels=torch.zeros([1, label_dim]) if label_dim else None)
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        raise UserError(f'{what} give a network that cannot run on {resolution}x{resolution} images: '
                        f'{(str(e).splitlines() or [""])[0]}; use fewer --cres levels or more --cbase channels')
    return net.train()


def _check_attention(kwargs: dict) -> None:
    """Attention at a resolution the network does not have would be silently no attention."""
    attn = kwargs.get('attn_resolutions')
    if not attn:
        return
    from training import networks
    model = getattr(networks, kwargs.get('model_type', 'DhariwalUNet'), None)
    if model is None:
        return
    mult = kwargs.get('channel_mult', inspect.signature(model).parameters['channel_mult'].default)
    levels = [kwargs['img_resolution'] >> level for level in range(len(mult))]
    bad = sorted(set(attn) - set(levels))
    if bad:
        raise UserError(f'--attn={",".join(map(str, attn))}: the network has no {bad[0]}x{bad[0]} level; for '
                        f'{kwargs["img_resolution"]}x{kwargs["img_resolution"]} images and {len(mult)} --cres levels its '
                        f'resolutions are {",".join(map(str, levels))}; pick from them, or --attn=none')


def _print_start(t: dnnlib.EasyDict, o: dict, dataset: Dataset, mix: Dataset | None, resume_path: str | None) -> None:
    distributed.print0(f'Run directory: {t.run_dir}')
    distributed.print0(f'Training images: {len(dataset)} from {o["dataset_kwargs"].get("path")}' +
                       (f'; {t.num_mix} of each batch of {o["batch_size"]} from a mix set of {len(mix)}' if mix else ''))
    if resume_path is not None:
        distributed.print0(f'Resuming from {resume_path} at {t.cur_nimg / 1e3:g} kimg, tick {t.cur_tick}')
    elif o['transfer'] is not None:
        distributed.print0(f'Transferred weights from {o["transfer"]}')
    distributed.print0(f'Network: {type(t.net).__name__}, {misc.count_parameters(t.net):,} parameters')


def _make_loader(t: dnnlib.EasyDict, o: dict, dataset: Dataset, mix: Dataset | None) -> Iterator:
    """DDP and torch.compile wrappers of the network (t.ddp, t.model) and the endless batch iterator from t.cur_nimg on."""
    t.ddp = t.net
    if distributed.is_distributed():
        t.ddp = torch.nn.parallel.DistributedDataParallel(t.net, device_ids=[t.device] if t.device.type == 'cuda' else None)
    t.model = perf.prepare_for_training(t.ddp, compile=o['compile'])  # ddp itself stays for no_sync().
    t.step = t.cur_nimg // o['batch_size']
    t.order = order = BatchOrder(len(dataset), len(mix) if mix else 0, t.num_mix, o['batch_size'], t.batch_gpu, t.num_rounds,
                       distributed.get_rank(), o['seed'], start_step=t.step)
    loader_kwargs = {'num_workers': 1, 'prefetch_factor': 2, **(o['data_loader_kwargs'] or {})}
    if loader_kwargs['num_workers'] == 0:
        loader_kwargs.pop('prefetch_factor')
    loader = torch.utils.data.DataLoader(_TrainingSet(dataset, mix), batch_sampler=order, pin_memory=(t.device.type == 'cuda'),
                                         generator=torch.Generator().manual_seed(o['seed']), **loader_kwargs)
    return iter(loader)


def _restore_rng(t: dnnlib.EasyDict, o: dict, state: dict | None, resume_path: str | None) -> None:
    """Dropout draws from each rank's global RNG: restored on resume, else keyed by (seed, images seen, rank).
    Resuming into the state's own directory drops the stats.jsonl records past the state."""
    if state is None or not _set_rng_state(state['rng'], t.device):
        torch.manual_seed(rng.derive_seed(o['seed'], _KEY_DROPOUT, t.cur_nimg, distributed.get_rank()))
    if state is not None and os.path.abspath(os.path.dirname(resume_path)) == os.path.abspath(t.run_dir) and distributed.is_main():
        _truncate_stats(os.path.join(t.run_dir, 'stats.jsonl'), t.cur_nimg / 1e3)


def _train(t: dnnlib.EasyDict, o: dict, data_iter: Iterator) -> str:
    """Steps until total_kimg; a progress line, stats.jsonl record, snapshot and state at tick ends. Returns the final snapshot."""
    distributed.print0(f'Training for {o["total_kimg"]:g} kimg on {distributed.get_world_size()} process(es), batch {o["batch_size"]} '
                       f'({t.batch_gpu} x {t.num_rounds} round(s) per process), precision {o["precision"]}...\n')
    t.collector = training_stats.Collector(regex='.*', keep_previous=False)
    t.tick_start_nimg, t.tick_start_time = t.cur_nimg, time.time()
    t.maintenance_time = t.tick_start_time - t.start_time
    perf.reset_peak_memory(t.device)
    final_snapshot = None
    while True:
        _step(t, o, data_iter)
        done = t.cur_nimg >= t.total_nimg
        # The first tick of a fresh run ends after one step, so a broken setup shows at once (EDM).
        if not done and t.cur_tick != 0 and t.cur_nimg < t.tick_start_nimg + o['kimg_per_tick'] * 1000:
            continue
        tick_end_time = _report_tick(t, o)
        _check_divergence(t, o)
        if t.hook is not None:
            t.hook.tick_end(t, o, done)
        # Network snapshot (EMA weights) and full training state; always both at the end.
        if done or (o['snapshot_ticks'] is not None and t.cur_tick % o['snapshot_ticks'] == 0):
            final_snapshot = _save_snapshot(t.run_dir, t.ema, o, t.cur_nimg)
        if done or (o['state_dump_ticks'] is not None and t.cur_tick % o['state_dump_ticks'] == 0 and t.cur_tick != 0):
            _save_state(t, o)
        t.cur_tick += 1
        t.tick_start_nimg, t.tick_start_time = t.cur_nimg, time.time()
        t.maintenance_time = t.tick_start_time - tick_end_time
        if done:
            break
    del data_iter
    distributed.barrier()
    distributed.print0(f'Done: {final_snapshot}')
    return final_snapshot


def _step(t: dnnlib.EasyDict, o: dict, data_iter: Iterator) -> None:
    """One optimizer step: gradients accumulated over rounds, lr warm-up, NaN guard, Adam, EMA; advances the counters."""
    # Every row's randomness is keyed by (seed, step, row).
    t.optimizer.zero_grad(set_to_none=True)
    step_seed = rng.derive_seed(o['seed'], _KEY_STEP, t.step)
    batch_gpu_total = t.batch_gpu * t.num_rounds
    finite = torch.ones((), dtype=torch.bool, device=t.device)
    for round_idx in range(t.num_rounds):
        images, labels = next(data_iter)
        images = perf.to_channels_last(images.to(t.device, non_blocking=True), o['channels_last'])
        labels = labels.to(t.device, non_blocking=True)
        start = distributed.get_rank() * batch_gpu_total + round_idx * t.batch_gpu
        rnd = rng.BatchRandom(step_seed, o['batch_size'], start, start + t.batch_gpu, t.device)
        weight = None
        if t.hook is not None:
            images, weight = t.hook.batch(t, round_idx, images)
        with misc.ddp_sync(t.ddp, round_idx == t.num_rounds - 1):
            with perf.autocast(t.device, o['precision']):
                loss = t.loss_fn(net=t.model, images=images, labels=labels, augment_pipe=t.augment_pipe, rnd=rnd)
            training_stats.report('Loss/loss', loss)
            finite &= torch.isfinite(loss).all()  # no synchronisation: read once per tick
            if weight is not None:
                loss = loss * weight.reshape(-1, *[1] * (loss.ndim - 1))
            loss.sum().mul(o['loss_scaling'] / batch_gpu_total).backward()
    t.bad_steps = (t.bad_steps + 1) * ~finite
    t.max_bad_steps = torch.maximum(t.max_bad_steps, t.bad_steps)

    # lr warm-up over lr_rampup_kimg thousand images, counted from the start of this run (a fine-tune restarts it).
    t.lr = o['optimizer_kwargs']['lr'] * min(t.cur_nimg / max(o['lr_rampup_kimg'] * 1000, 1e-8), 1)
    for g in t.optimizer.param_groups:
        g['lr'] = t.lr
    misc.sanitize_grads(t.net.parameters())
    t.optimizer.step()

    # EMA with ramp-up: the half-life is at most ema_rampup_ratio times the images seen.
    ema_halflife_nimg = o['ema_halflife_kimg'] * 1000
    if o['ema_rampup_ratio'] is not None:
        ema_halflife_nimg = min(ema_halflife_nimg, t.cur_nimg * o['ema_rampup_ratio'])
    t.ema_beta = 0.5 ** (o['batch_size'] / max(ema_halflife_nimg, 1e-8))
    with torch.no_grad():
        torch._foreach_lerp_(list(t.ema.parameters()), list(t.net.parameters()), 1 - t.ema_beta)  # One kernel per group.
    t.cur_nimg += o['batch_size']
    t.step += 1
    if t.hook is not None:
        t.hook.after_step(t, o)


def _check_divergence(t: dnnlib.EasyDict, o: dict) -> None:
    """Stop in one line (every rank alike) once the loss was not finite for NONFINITE_STEPS steps in a row,
    or a weight is not finite; before the tick's snapshot and state, so the newest saved ones stay good."""
    weights_finite = torch.stack([p.isfinite().all() for p in itertools.chain(t.net.parameters(), t.ema.parameters())]).all()
    bad = torch.stack([t.max_bad_steps >= NONFINITE_STEPS, ~weights_finite]).to(torch.float32)
    long_streak, bad_weights = distributed.all_reduce_sum(bad).tolist()
    t.max_bad_steps = t.bad_steps
    if long_streak or bad_weights:
        what = 'the weights are not finite' if bad_weights else f'the loss was not finite for {NONFINITE_STEPS} steps in a row'
        raise UserError(f'Training diverged at {t.cur_nimg / 1e3:g} kimg: {what}; nothing after the newest state in {t.run_dir} '
                        f'was saved. Lower the learning rate (it is {o["optimizer_kwargs"]["lr"]:g}), or check the data for NaN/inf')


def _report_tick(t: dnnlib.EasyDict, o: dict) -> float:
    """The progress line and its stats.jsonl record; returns the tick's end time."""
    tick_end_time = time.time()
    sec_per_kimg = (tick_end_time - t.tick_start_time) / (t.cur_nimg - t.tick_start_nimg) * 1e3
    training_stats.report0('Progress/tick', t.cur_tick)
    training_stats.report0('Progress/kimg', t.cur_nimg / 1e3)
    training_stats.report0('Progress/lr', t.lr)
    training_stats.report0('Progress/ema_beta', t.ema_beta)
    training_stats.report0('Timing/total_sec', tick_end_time - t.start_time)
    training_stats.report0('Timing/sec_per_tick', tick_end_time - t.tick_start_time)
    training_stats.report0('Timing/sec_per_kimg', sec_per_kimg)
    training_stats.report0('Timing/maintenance_sec', t.maintenance_time)
    training_stats.report0('Resources/cpu_mem_gb', psutil.Process(os.getpid()).memory_info().rss / 2**30)
    training_stats.report0('Resources/peak_mem_gb', perf.peak_memory(t.device) / 2**30)
    t.collector.update()
    perf.reset_peak_memory(t.device)
    eta = (t.total_nimg - t.cur_nimg) / 1e3 * sec_per_kimg
    distributed.print0(' '.join([
        f'tick {t.cur_tick:<5d}',
        f'kimg {t.cur_nimg / 1e3:<9.3f}',
        f'time {dnnlib.util.format_time(tick_end_time - t.start_time):<8s}',
        f'sec/kimg {sec_per_kimg:<7.2f}',
        f'ETA {dnnlib.util.format_time(eta):<8s}',
        f'loss {t.collector.mean("Loss/loss"):<8.4f}',
        f'maintenance {t.maintenance_time:<5.1f}',
        f'cpumem {t.collector.mean("Resources/cpu_mem_gb"):<5.2f}',
        f'peakmem {t.collector.mean("Resources/peak_mem_gb"):<5.2f}',
    ]))
    training_stats.append_jsonl(os.path.join(t.run_dir, 'stats.jsonl'), dict(t.collector.as_dict(), timestamp=time.time()))
    return tick_end_time


def _save_state(t: dnnlib.EasyDict, o: dict) -> None:
    """training-state-KIMG.pt: net, EMA, Adam, counters and every rank's RNG state (collective; rank 0 writes)."""
    rng_state = _rng_state(t.device)
    path = os.path.join(t.run_dir, f'training-state-{kimg_label(t.cur_nimg)}.pt')
    if t.hook is not None:
        t.hook.save_state(t, o, path)
    if distributed.is_main():
        checkpoint.save_training_state(path, net=t.net,
                                       ema=t.ema, optimizer=t.optimizer, cur_nimg=t.cur_nimg, cur_tick=t.cur_tick + 1,
                                       rng=rng_state, options=o)
        _prune(t.run_dir, _STATE_RE, o['keep_last'])
