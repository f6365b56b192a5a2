"""Online SFBD (SFBD flow; Lu, Lo, Yu, AISTATS 2026): one training run on D_clean and a denoised set E refreshed a slice at a time."""

import dataclasses
import json
import math
import os
import time
from typing import Any

import numpy as np
import torch

import dnnlib
from dnnlib.util import UserError
from torch_utils import distributed, lock, perf, rng, training_stats
from training import checkpoint, images, metrics, options, sampler, sfbd, training_loop
from training.dataset import Dataset, open_dataset
from training.images import to_model_space
from training.options import OnlineOptions, SFBDOptions

#----------------------------------------------------------------------------
# Run directory layout (docs/ARCHITECTURE.md, "Online SFBD"):
#   online_options.json   the SFBDOptions and OnlineOptions fields of the run (one flat object); a rerun must give the same
#   log.txt               everything rank 0 printed
#   metrics.jsonl         one record per evaluation k = 0 (model 0) .. (online kimg, E's error, FID, compute spent);
#                         metrics.png plots them against the online kimg
#   pretrain/             training_loop run dir of the pretraining on D_clean (absent with --pretrained)
#   iter-000/denoised/    E before the first refresh with init 'denoise': the noisy set denoised once by model 0
#   eval-KKK/             evaluation k: samples.png, strip.png (noisy | E | original), network.pt (the EMA; k >= 1),
#                         record.json (k = 0 only: model 0's record, so a rerun does not repeat it)
#   online/               training_loop run dir of the online run; beside every training-state-*.pt lie E-NIMG.npy
#                         (E's rows) and E-NIMG.json (refresh cursor, counters, metrics records) for its image count NIMG

# Key spaces of torch_utils.rng.derive_seed(seed, KEY, ...), apart from batch SFBD's (seed, k, i) and the loop's.
_KEY_ORDER, _KEY_REFRESH = 101, 102
TRAIN_COST = 3.0  # network evaluations per training image (forward + backward) on the compute axis

#----------------------------------------------------------------------------
# The rules: the weight of E's rows, the refresh order, the KID-guided number of rows.

def ramp_weight(nimg: int, start_kimg: float, end_kimg: float) -> float:
    """Weight of E's rows after `nimg` images of the online run: 0 until start_kimg, linear to 1 at end_kimg, 1 after."""
    kimg = nimg / 1000
    if kimg >= end_kimg:
        return 1.0
    if kimg <= start_kimg:
        return 0.0
    return (kimg - start_kimg) / (end_kimg - start_kimg)


class RefreshOrder:
    """The rows of E that refreshes re-denoise: an endless stream whose cycle c is a permutation of all rows keyed by (seed, c)."""

    def __init__(self, size: int, seed: int):
        self.size = size
        self._stream = training_loop._Stream(size, seed, _KEY_ORDER)

    def rows(self, cursor: int, num: int) -> np.ndarray:
        """The next `num` rows from stream position `cursor`, fewer at the end of a cycle (a slice never spans two)."""
        stop = min(cursor + num, (cursor // self.size + 1) * self.size)
        return self._stream.take(cursor, stop - cursor)


def kid(a: torch.Tensor, b: torch.Tensor) -> float:
    """Kernel inception distance of features a [m, d] and b [n, d]: the unbiased MMD^2 estimate over all pairs with
    the cubic kernel k(x, y) = (x.y / d + 1)^3 (Binkowski et al. 2018), in float64. Near 0 for equal distributions."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    m, n, d = a.shape[0], b.shape[0], a.shape[1]
    if m < 2 or n < 2:
        raise UserError(f'KID needs at least 2 images in each set, got {m} and {n}')
    kxx, kyy, kxy = ((x @ y.T / d + 1) ** 3 for x, y in ((a, a), (b, b), (a, b)))
    return float((kxx.sum() - kxx.trace()) / (m * (m - 1)) + (kyy.sum() - kyy.trace()) / (n * (n - 1)) - 2 * kxy.mean())


def kid_refresh_count(kid_old: float, kid_new: float, num_max: int, num_min: int) -> int:
    """Rows to commit under the 'kid' rule: num_max times the relative KID improvement (kid_old - kid_new) / kid_old
    clipped to [0, 1], rounded half up, and at least num_min. kid_old <= 0 (E already as close as KID can tell) is no gain."""
    gain = (kid_old - kid_new) / kid_old if kid_old > 0 else 0.0
    return max(num_min, min(num_max, math.floor(num_max * min(max(gain, 0.0), 1.0) + 0.5)))


def backward_nfe(sigma_tau: float, num_steps: int, net: torch.nn.Module | None = None) -> int:
    """Network evaluations per image of sampler.backward_sample (ODE and SDE alike: 2N - 1 for N steps from sigma_tau);
    the sigma range is the network's, clipped to EDM's, or EDM's without a network."""
    lo, hi, round_sigma = sampler.SIGMA_MIN, sampler.SIGMA_MAX, None
    if net is not None:
        lo, hi, round_sigma = max(lo, net.sigma_min), min(hi, net.sigma_max), net.round_sigma
    return 2 * (len(sampler.backward_sigmas(sigma_tau, num_steps, lo, hi, round_sigma=round_sigma)) - 1) - 1

#----------------------------------------------------------------------------
# E in memory.

class DenoisedSet(torch.utils.data.Dataset):
    """E: N x C x H x W rows (uint8, or float32 in [-1, 1]) refreshed in place; item i is (image, empty label) as a Dataset's.

    Pickled (DataLoader workers) it carries no images and yields zeros: OnlineSFBD.batch reads E's rows at step time.
    """

    def __init__(self, rows: np.ndarray):
        self.images, self._count, self._shape, self._dtype = rows, len(rows), rows.shape[1:], rows.dtype
        self.label_dim = 0

    def __len__(self) -> int:
        return self._count

    @property
    def image_shape(self) -> list[int]:
        return list(self._shape)

    def __getitem__(self, idx: int) -> tuple[np.ndarray, np.ndarray]:
        image = self.images[idx].copy() if self.images is not None else np.zeros(self._shape, self._dtype)
        return image, np.zeros([0], np.float32)

    def __getstate__(self) -> dict:
        return {**self.__dict__, 'images': None}


def _as_uint8(rows: np.ndarray) -> torch.Tensor:
    """Stored rows as uint8 NCHW (float rows in [-1, 1] rounded as EDM's sampler output)."""
    return torch.from_numpy(rows) if rows.dtype == np.uint8 else images.to_uint8(torch.from_numpy(np.asarray(rows, np.float32)))


@torch.no_grad()
def _features(detector: metrics.Detector, rows: np.ndarray, batch: int) -> torch.Tensor:
    """Detector features (float64, CPU) of stored rows, `batch` images at a time; not sharded (every rank computes all)."""
    return torch.cat([detector(_as_uint8(rows[i:i + batch]).to(detector.device)).to('cpu', torch.float64)
                      for i in range(0, len(rows), batch)])

#----------------------------------------------------------------------------
# The hook: E's rows in every batch with the ramp weight, a refresh every m steps, evaluations, E beside each state.

def _eval_dir(run_dir: str, k: int) -> str:
    return os.path.join(run_dir, f'eval-{k:03d}')


def _e_path(state_dir: str, nimg: int, ext: str) -> str:
    # Named by the exact image count, not the state's kimg: a short run writes several states of the same kimg.
    return os.path.join(state_dir, f'E-{nimg:012d}.{ext}')


def _evaluation(k: int, network: str, net: torch.nn.Module, E: DenoisedSet, o: SFBDOptions, run: dnnlib.EasyDict) -> dict:
    """Record of evaluation k (network `network`, loaded as `net`): E against the originals, strip.png, samples.png, FID; collective."""
    d = _eval_dir(run.run_dir, k)
    if distributed.is_main():
        os.makedirs(d, exist_ok=True)
    record: dict[str, Any] = dict(k=k, network=sfbd._relative(run.run_dir, network))
    if run.originals is not None:
        record.update(sfbd.denoising_error(E, run.originals))
        distributed.print0(f'E against the originals: MSE {record["denoise_mse"]:.4e} ([-1,1] units), PSNR {record["denoise_psnr"]:.2f} dB')
    if distributed.is_main() and o.strip_num > 0:
        sfbd.save_strip(os.path.join(d, 'strip.png'), run.noisy, E, run.originals, o.strip_num)
    if distributed.is_main() and o.grid_num > 0:
        sfbd.save_samples(os.path.join(d, 'samples.png'), net, o.grid_num, dict(num_steps=o.eval_steps), run.device)
    if run.detector is not None:
        record.update(sfbd.network_fid(net, o, run, f'evaluation {k}'))
    distributed.barrier()
    return record


class OnlineSFBD(training_loop.TrainingHook):
    """Online SFBD inside training_loop: D_clean is the training set, E (in memory) the mix set.

    Every E row of step s's batch gets the weight w = ramp_weight(s * batch) and every clean row 1, normalised by
    the batch's total weight; after every refresh_every-th step the next slice of RefreshOrder is backward-denoised
    from sigma_tau by the current EMA network and committed into E (all of it, or a KID-chosen number of its first
    rows). The state (E, cursor, counters, records) lies beside every training state, so a resume is exact.
    """

    def __init__(self, o: SFBDOptions, on: OnlineOptions, run: dnnlib.EasyDict, rows: np.ndarray, progress: dict):
        self.o, self.on, self.run = o, on, run
        self.E = DenoisedSet(rows)
        self.order = RefreshOrder(len(rows), o.seed)
        self.s = dnnlib.EasyDict(progress)  # what E-NIMG.json holds: JSON-able, the same on every rank
        self.kid_ref = None
        if on.refresh_rule == 'kid':
            clean = np.stack([run.clean[i][0] for i in range(len(run.clean))])
            self.kid_ref = _features(run.kid_detector, clean, o.eval_batch)

    def mix_dataset(self, opts: dict) -> Dataset:
        return self.E

    def start(self, t: dnnlib.EasyDict, opts: dict, resume_path: str | None) -> None:
        if resume_path is not None:
            self._load(os.path.dirname(resume_path), t.cur_nimg)
        assert t.num_mix > 0
        prepare = dict(channels_last=opts['channels_last'], compile=opts['compile'])
        self.denoise_net = perf.prepare_for_inference(t.ema, self.o.denoise_precision, **prepare)
        self.eval_net = perf.prepare_for_inference(t.ema, self.o.eval_precision, **prepare)
        self.nfe_per_image = backward_nfe(self.run.sigma_tau, self.o.denoise_steps, t.ema)
        self.weight, self.last_eval_time = 0.0, time.time()
        self.start_nimg, self.start_time = t.cur_nimg, time.time()
        if distributed.is_main():
            sfbd.write_metrics(self.run.run_dir, self.s.records, x='kimg', xlabel='online kimg')

    def _load(self, state_dir: str, nimg: int) -> None:
        path = _e_path(state_dir, nimg, 'npy')
        if not (os.path.isfile(path) and os.path.isfile(_e_path(state_dir, nimg, 'json'))):
            raise UserError(f'{state_dir} holds no {os.path.basename(path)} (and .json) for its training state at {nimg} images: '
                            'it is not an online SFBD run, or E was removed; use a new --outdir')
        rows = np.load(path)
        if rows.shape != self.E.images.shape or rows.dtype != self.E.images.dtype:
            raise UserError(f'{path} holds {rows.dtype} rows of {list(rows.shape)}, not E of {list(self.E.images.shape)} {self.E.images.dtype}')
        self.E.images[...] = rows
        self.s = dnnlib.EasyDict(sfbd._read_json(_e_path(state_dir, nimg, 'json')))

    def batch(self, t: dnnlib.EasyDict, round_idx: int, images_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = t.order.rank_rows(t.step)[round_idx * t.batch_gpu:(round_idx + 1) * t.batch_gpu]
        is_e = rows >= t.order.main_size
        self.weight = w = ramp_weight(t.cur_nimg, self.on.ramp_start_kimg, self.on.ramp_end_kimg)
        mask = torch.from_numpy(is_e).to(images_.device)
        images_[mask] = to_model_space(torch.from_numpy(self.E.images[rows[is_e] - t.order.main_size])).to(images_.device)
        # Normalised by the global batch's total weight: w = 0 trains on D_clean alone, w = 1 on D_clean + E uniformly.
        batch = t.order.batch_size
        scale = batch / ((batch - t.num_mix) + w * t.num_mix)
        return images_, torch.where(mask, w * scale, scale).to(torch.float32)

    def after_step(self, t: dnnlib.EasyDict, opts: dict) -> None:
        training_stats.report0('Online/weight', self.weight)
        if t.step % self.on.refresh_every == 0:
            self._refresh(t.step)

    @torch.no_grad()
    def _refresh(self, step: int) -> None:
        """Backward-denoise the next slice of E with the current EMA network, sharded over ranks, and commit it."""
        rows = self.order.rows(self.s.cursor, self.on.refresh_num)
        new = self._denoise(rows, step)
        self.s.denoise_nfe += len(rows) * self.nfe_per_image
        num = len(rows)
        if self.on.refresh_rule == 'kid' and num >= 2:
            kid_old = kid(_features(self.run.kid_detector, self.E.images[rows], self.o.eval_batch), self.kid_ref)
            kid_new = kid(_features(self.run.kid_detector, new, self.o.eval_batch), self.kid_ref)
            num_min = self.on.refresh_num // 4 if self.on.refresh_min is None else self.on.refresh_min
            num = kid_refresh_count(kid_old, kid_new, len(rows), min(num_min, len(rows)))
            training_stats.report0('Online/kid_gain', (kid_old - kid_new) / kid_old if kid_old > 0 else 0.0)
        self.E.images[rows[:num]] = new[:num]
        self.s.cursor += num
        self.s.refreshes += 1
        self.s.committed += num
        training_stats.report0('Online/committed', num)

    def _denoise(self, rows: np.ndarray, step: int) -> np.ndarray:
        """E's new rows: chunks of denoise_batch that do not depend on the world size, sharded over ranks and summed into
        place on every rank; row i draws its noise from derive_seed(seed, _KEY_REFRESH, step, i)."""
        b = self.o.denoise_batch
        chunks = [(s, min(s + b, len(rows))) for s in range(0, len(rows), b)]
        out = torch.zeros([len(rows), *self.E.image_shape], dtype=torch.float64)
        for start, stop in (chunks[i] for i in distributed.shard(len(chunks))):
            part = rows[start:stop]
            x = sfbd.backward_denoise(self.denoise_net, self.run.noisy, part,
                                      [rng.derive_seed(self.o.seed, _KEY_REFRESH, step, int(i)) for i in part],
                                      sigma_tau=self.run.sigma_tau, num_steps=self.o.denoise_steps, solver=self.o.denoise_solver,
                                      dtype=self.o.denoise_dtype, device=self.run.device)
            out[start:stop] = torch.from_numpy(x).to(torch.float64)
        return distributed.all_reduce_sum(out).numpy().astype(self.E.images.dtype)

    def tick_end(self, t: dnnlib.EasyDict, opts: dict, done: bool) -> None:
        distributed.print0(f'online: E weight {self.weight:.3f}, {self.s.refreshes} refreshes, {self.s.committed} rows committed '
                           f'({self.s.cursor / len(self.E):.2f} cycles of {len(self.E)}), {self.s.denoise_nfe:,} denoising evaluations')
        if t.cur_nimg >= self.s.next_eval_nimg or (done and self.s.records[-1]['train_nimg'] != t.cur_nimg):
            self._evaluate(t, opts)
            self.s.next_eval_nimg = (t.cur_nimg // self.s.eval_nimg + 1) * self.s.eval_nimg

    def _evaluate(self, t: dnnlib.EasyDict, opts: dict) -> None:
        k = len(self.s.records)
        distributed.print0(f'\n=== Online SFBD evaluation {k} at {t.cur_nimg / 1e3:g} kimg ===')
        network = os.path.join(_eval_dir(self.run.run_dir, k), 'network.pt')
        if distributed.is_main():
            os.makedirs(os.path.dirname(network), exist_ok=True)
            checkpoint.save_network(network, t.ema, augment_kwargs=opts['augment_kwargs'], dataset_kwargs=opts['dataset_kwargs'],
                                    kimg=t.cur_nimg / 1e3, meta=dict(run_dir=self.run.run_dir, online_evaluation=k))
        record = _evaluation(k, network, self.eval_net, self.E, self.o, self.run)
        record.update(kimg=t.cur_nimg / 1e3, weight=ramp_weight(t.cur_nimg, self.on.ramp_start_kimg, self.on.ramp_end_kimg),
                      refreshes=self.s.refreshes, committed=self.s.committed, cycles=self.s.cursor / len(self.E),
                      train_nimg=t.cur_nimg, denoise_nfe=self.s.denoise_nfe, sec=time.time() - self.last_eval_time)
        self.s.records.append(record)
        self.last_eval_time = time.time()
        if distributed.is_main():
            sfbd.write_metrics(self.run.run_dir, self.s.records, x='kimg', xlabel='online kimg')
        eta = (t.total_nimg - t.cur_nimg) / max(t.cur_nimg - self.start_nimg, 1) * (time.time() - self.start_time)
        distributed.print0(sfbd.format_summary(self.s.records[-1:], key='kimg') + f'\nETA of the online run {dnnlib.util.format_time(eta)}\n')

    def save_state(self, t: dnnlib.EasyDict, opts: dict, state_path: str) -> None:
        """E-NIMG.npy and E-NIMG.json before the state: a kill in between leaves the older state whole. Files of
        states that are gone (pruned, or overwritten under the same name) go at the next save."""
        if not distributed.is_main():
            return
        state_dir, name = os.path.dirname(state_path), os.path.basename(state_path)
        latest = {n: nimg for n, nimg in self.s.get('saved', []) if os.path.isfile(os.path.join(state_dir, n))}
        keep = set(latest.values()) | {t.cur_nimg}
        self.s.saved = [[n, nimg] for n, nimg in latest.items()] + [[name, t.cur_nimg]]
        with dnnlib.util.atomic_write(_e_path(state_dir, t.cur_nimg, 'npy')) as f:
            np.save(f, self.E.images)
        sfbd._write_json(_e_path(state_dir, t.cur_nimg, 'json'), self.s)
        _prune_e(state_dir, keep)


def _prune_e(state_dir: str, keep: set[int]) -> None:
    """Remove the E-NIMG files of state_dir whose NIMG is not in `keep`."""
    for f in os.listdir(state_dir):
        stem, _, ext = f.partition('.')
        if f.startswith('E-') and ext in ('npy', 'json') and stem[2:].isdigit() and int(stem[2:]) not in keep:
            os.remove(os.path.join(state_dir, f))

#----------------------------------------------------------------------------
# The run.

def run_online(run_dir: str, device: str | torch.device | None = None, online: OnlineOptions | dict | None = None, *,
               break_lock: bool = False, **kwargs: Any) -> str:
    """Run Online SFBD with options.SFBDOptions(**kwargs) and `online` (OnlineOptions) in run_dir; return the final network.

    Launch with plain python or torchrun; denoising, training and FID generation are sharded over the processes.
    Model 0 is `pretrained` or pretraining on D_clean (as batch SFBD); then one training run on D_clean and E.
    Rerunning after a kill resumes it exactly (the same final network, bit for bit, in fp32).
    """
    distributed.init()
    run_dir = os.path.abspath(run_dir)
    device = torch.device(device) if device is not None else distributed.device()
    o = SFBDOptions(**kwargs)
    o.clean, o.noisy = os.path.abspath(o.clean), os.path.abspath(o.noisy)
    if o.pretrained is not None and not dnnlib.util.is_url(o.pretrained):
        o.pretrained = os.path.abspath(o.pretrained)
    o.check()
    o = SFBDOptions(**o.to_json())
    on = online if isinstance(online, OnlineOptions) else OnlineOptions(**(online or {}))
    on.check()
    on = OnlineOptions(**on.to_json())
    if o.clean_mix != 0:
        raise UserError('--clean-mix is batch SFBD\'s; online SFBD trains on D_clean and E together (--e-share)')
    run = sfbd._open_inputs(dataclasses.replace(o, eval_every=1), device)  # online evaluations: every eval_kimg
    run.run_dir = run_dir
    e_share = on.e_share if on.e_share is not None else len(run.noisy) / (len(run.clean) + len(run.noisy))
    batch = o.train_kwargs['batch_size']
    if not 1 <= round(e_share * batch) <= batch - 1:
        raise UserError(f'E\'s share {e_share:g} of a batch of {batch} gives {round(e_share * batch)} rows from E; '
                        'every batch needs rows from both D_clean and E (--e-share, --batch)')
    run.kid_detector = None
    if on.refresh_rule == 'kid':
        run.kid_detector = metrics.load_detector(on.kid_detector or o.detector, device, image_shape=run.noisy.image_shape)
        if len(run.clean) < 2:
            raise UserError('The kid rule compares E with D_clean, which needs at least 2 images')
    if os.path.isfile(os.path.join(run_dir, sfbd.OPTIONS_FILE)):
        raise UserError(f'{run_dir} holds a batch SFBD run (sfbd.py without --online); use a new --outdir')
    run.break_lock = break_lock
    with lock.run_lock(run_dir, break_lock=break_lock):
        sfbd._check_options_match(run_dir, {**o.to_json(), **on.to_json()}, name=sfbd.ONLINE_OPTIONS_FILE, resumable=())
        if distributed.is_main():
            sfbd._write_json(os.path.join(run_dir, sfbd.ONLINE_OPTIONS_FILE), {**o.to_json(), **on.to_json()})
        distributed.barrier()
        with dnnlib.util.tee_output(os.path.join(run_dir, 'log.txt') if distributed.is_main() else None):
            return _online(o, on, run, e_share)


def _online(o: SFBDOptions, on: OnlineOptions, run: dnnlib.EasyDict, e_share: float) -> str:
    """Model 0, E before the first refresh, model 0's record, then the online run; its summary."""
    distributed.print0(f'Online SFBD in {run.run_dir}: {len(run.clean)} clean and {len(run.noisy)} noisy images '
                       f'({run.noisy.resolution}x{run.noisy.resolution}x{run.noisy.num_channels}), sigma_tau {run.sigma_tau:g} '
                       f'([-1, 1] units), {on.online_kimg:g} kimg, a refresh of {on.refresh_num} rows ({on.refresh_rule}) '
                       f'every {on.refresh_every} steps, on {distributed.get_world_size()} process(es)')
    network = o.pretrained
    if network is None:
        network = sfbd._train_once(os.path.join(run.run_dir, 'pretrain'), run.break_lock, **options.pretrain_kwargs(o))
    rows, nfe = _initial_rows(o, on, run, network)
    record0 = _model0_record(network, rows, o, run)
    progress = dict(cursor=0, refreshes=0, committed=0, denoise_nfe=nfe, next_eval_nimg=round(on.eval_kimg * 1000),
                    eval_nimg=round(on.eval_kimg * 1000), records=[dict(record0, denoise_nfe=nfe)], saved=[])
    hook = OnlineSFBD(o, on, run, rows, progress)
    train_dir = os.path.join(run.run_dir, 'online')
    final = sfbd._train_once(train_dir, run.break_lock, hook=hook, **options.online_kwargs(o, on, network, e_share))
    records = distributed.broadcast_object(_final_records(train_dir) if distributed.is_main() else None)
    if distributed.is_main():
        sfbd.write_metrics(run.run_dir, records, x='kimg', xlabel='online kimg')
    distributed.print0('\nOnline SFBD summary (kimg of the online run; MSE/PSNR: E against the originals, [-1, 1] units):')
    distributed.print0(sfbd.format_summary(records, key='kimg'))
    distributed.print0(f'\nFinal network: {final}')
    return final


def _initial_rows(o: SFBDOptions, on: OnlineOptions, run: dnnlib.EasyDict, network: str) -> tuple[np.ndarray, int]:
    """(E before the first refresh, the denoising evaluations it cost): the noisy set denoised once by model 0, or as is."""
    if on.init == 'noisy':
        noisy = np.stack([run.noisy[i][0] for i in range(len(run.noisy))])
        return (_as_uint8(noisy).numpy() if o.denoise_dtype == 'uint8' else noisy.astype(np.float32)), 0
    path = sfbd._denoise(0, network, o, run)
    net = checkpoint.load_network(network)
    return np.array(open_dataset(path).images), len(run.noisy) * backward_nfe(run.sigma_tau, o.denoise_steps, net)


def _model0_record(network: str, rows: np.ndarray, o: SFBDOptions, run: dnnlib.EasyDict) -> dict:
    """Evaluation 0: model 0 and E before the first refresh; kept in eval-000/record.json, so a rerun reads it."""
    path = os.path.join(_eval_dir(run.run_dir, 0), 'record.json')
    record = sfbd._main_reads_json(path)
    if record is None:
        distributed.print0('\n=== Online SFBD evaluation 0: model 0 ===')
        start = time.time()
        record = _evaluation(0, network, sfbd._inference_net(network, o.eval_precision, o, run.device), DenoisedSet(rows), o, run)
        record.update(kimg=0.0, weight=0.0, refreshes=0, committed=0, cycles=0.0, train_nimg=0, sec=time.time() - start)
        if distributed.is_main():
            sfbd._write_json(path, record)
        distributed.barrier()
    return record


def _final_records(train_dir: str) -> list[dict]:
    """The records of the finished online run, from the E-NIMG.json of its final state (the largest NIMG); stale E files go."""
    nimg = max(int(f[2:-5]) for f in os.listdir(train_dir) if f.startswith('E-') and f.endswith('.json') and f[2:-5].isdigit())
    progress = sfbd._read_json(_e_path(train_dir, nimg, 'json'))
    live = {n: x for n, x in progress['saved'] if os.path.isfile(os.path.join(train_dir, n))}
    _prune_e(train_dir, set(live.values()) | {nimg})
    return progress['records']

#----------------------------------------------------------------------------
# Compute: batch and online SFBD on one axis.

def compute_axis(run_dir: str, train_cost: float = TRAIN_COST) -> list[dict]:
    """The metrics records of a batch or online SFBD run dir, each with what was spent after model 0: `train_nimg`
    (training images), `denoise_nfe` (backward-denoising network evaluations) and `compute` = train_cost x train_nimg
    + denoise_nfe, in network evaluations (pretraining, shared by both, and evaluation are not counted)."""
    path = os.path.join(run_dir, 'metrics.jsonl')
    if not os.path.isfile(path):
        raise UserError(f'{run_dir} holds no metrics.jsonl: not an SFBD run directory (or no model evaluated yet)')
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    if os.path.isfile(os.path.join(run_dir, sfbd.ONLINE_OPTIONS_FILE)):
        rows = [dict(r) for r in records]
    elif os.path.isfile(os.path.join(run_dir, sfbd.OPTIONS_FILE)):
        s = sfbd._read_json(os.path.join(run_dir, sfbd.OPTIONS_FILE))
        noisy = open_dataset(s['noisy'])
        batch = s['train_kwargs']['batch_size']
        per_finetune = math.ceil(round(s['finetune_kimg'] * 1000) / batch) * batch  # training_loop ends at the first step past it
        per_pass = len(noisy) * backward_nfe(noisy.sigma, s['denoise_steps'])
        rows = [dict(r, train_nimg=r['k'] * per_finetune, denoise_nfe=r['k'] * per_pass) for r in records]
    else:
        raise UserError(f'{run_dir} holds neither {sfbd.OPTIONS_FILE} nor {sfbd.ONLINE_OPTIONS_FILE}: not an SFBD run directory')
    for r in rows:
        r['compute'] = train_cost * r['train_nimg'] + r['denoise_nfe']
    return rows
