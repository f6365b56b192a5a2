"""SFBD (Algorithm 1): pretrain on the clean set, then for k = 1..K denoise the noisy set with model k-1 and fine-tune on the result."""

import json
import math
import os
import shutil
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

import dnnlib
from dnnlib.util import UserError
from torch_utils import distributed, lock, perf, rng
from training import audit, checkpoint, generation, images, metrics, options, sampler, training_loop
from training.dataset import Dataset, assemble_array_dataset, json_default, open_dataset, originals_path, remove_temp_dirs
from training.images import to_model_space
from training.options import SFBDOptions

#----------------------------------------------------------------------------
# Run directory layout (docs/ARCHITECTURE.md, "SFBD"):
#   sfbd_options.json   the options of the run; a rerun must give the same ones (except RESUMABLE_CHANGES)
#   log.txt             everything rank 0 printed
#   metrics.jsonl       one record per model k = 0 (the starting model) .. K; metrics.png plots them
#   pretrain/           training_loop run dir of the pretraining on the clean set (absent with --pretrained)
#   iter-000/           the starting model: samples.png, DONE
#   iter-KKK/           denoised/ (E_k, an array dataset), denoised.parts/ (chunk files while denoising),
#                       finetune/ (training_loop run dir), samples.png, strip.png, DONE
# A training run dir gets finished.json {"network": path} when training_loop returns, so a rerun never
# trains it further; DONE is JSON {"network": path of model k, "metrics": record} and ends iteration k.

OPTIONS_FILE = 'sfbd_options.json'
ONLINE_OPTIONS_FILE = 'online_options.json'  # the run directory of sfbd.py --online (training.online)
RESUMABLE_CHANGES = ('iters',)  # may differ on a rerun: more iterations extend a finished run
# sigma_tau is in [-1, 1] pixel units: the paper's levels are 0.2 .. 1.38; above this a dataset.json surely
# means another unit (0..255: divide by 127.5).
SIGMA_TAU_SANE = 10
PLOTTED = {'fid': 'FID (lower is better)', 'denoise_mse': 'denoising MSE, [-1,1] units', 'denoise_psnr': 'denoising PSNR (dB)',
           'audit_share_below_heldout_p05': 'samples nearer a training image\nthan 95% of held-out images (~5%: no copying)'}


def iter_dir(run_dir: str, k: int) -> str:
    return os.path.join(run_dir, f'iter-{k:03d}')


def _relative(run_dir: str, path: str) -> str:
    """How markers and metrics name a network: relative to run_dir when inside it, so a run dir can move."""
    if dnnlib.util.is_url(path) or not os.path.abspath(path).startswith(os.path.join(run_dir, '')):
        return path
    return os.path.relpath(path, run_dir)


def _resolve(run_dir: str, path: str) -> str:
    return path if dnnlib.util.is_url(path) or os.path.isabs(path) else os.path.join(run_dir, path)


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, obj: Any) -> None:
    with dnnlib.util.atomic_write(path, 'w') as f:
        json.dump(obj, f, indent=2, default=json_default)


def _main_reads_json(path: str) -> Any:
    """Rank 0's view of a JSON file (None if absent), on every rank: all ranks take the same branch."""
    obj = _read_json(path) if distributed.is_main() and os.path.isfile(path) else None
    return distributed.broadcast_object(obj)

#----------------------------------------------------------------------------
# Options.

def _check_options_match(run_dir: str, recorded: dict, name: str = OPTIONS_FILE,
                         resumable: tuple[str, ...] = RESUMABLE_CHANGES) -> None:
    """A rerun continues the run in run_dir only with the options it was started with (recorded in `name`)."""
    path = os.path.join(run_dir, name)
    if not os.path.isfile(path):
        return
    old = _read_json(path)
    changed = sorted(k for k in set(old) | set(recorded) if k not in resumable and old.get(k) != recorded.get(k))
    if changed:
        k = changed[0]
        raise UserError(f'{run_dir} holds an SFBD run with other options ({", ".join(changed)}; e.g. {k}: '
                        f'{old.get(k)!r} there, {recorded.get(k)!r} now); rerun the same command or use a new --outdir')


def _open_inputs(o: SFBDOptions, device: torch.device) -> dnnlib.EasyDict:
    """Open and cross-check the data sets and their values, the originals, the starting network against
    sigma_tau, and the FID reference: everything that can be checked before the first training step.

    Returns EasyDict(clean, noisy, originals or None, detector or None, ref or None, sigma_tau, device).
    """
    clean = open_dataset(o.clean)
    noisy = open_dataset(o.noisy)
    sigma_tau = _sigma_tau(noisy, o.noisy)
    if o.sigma is not None and not math.isclose(o.sigma, sigma_tau, rel_tol=1e-6):
        raise UserError(f'--sigma={o.sigma} contradicts the noisy set\'s own sigma={sigma_tau} (from {o.noisy}); '
                        'drop --sigma or use the matching noisy set')
    if clean.metadata.get('sigma') is not None:
        raise UserError(f'--clean={o.clean} is a noisy set (its dataset.json gives sigma={clean.metadata["sigma"]!r}); give the clean images')
    if (clean.resolution, clean.num_channels) != (noisy.resolution, noisy.num_channels):
        raise UserError(f'The clean set holds {clean.resolution}x{clean.resolution} images with {clean.num_channels} '
                        f'channel(s), the noisy set {noisy.resolution}x{noisy.resolution} with {noisy.num_channels}')
    training_loop.check_finite_images(clean, f'--clean={o.clean}')
    _check_noisy_values(training_loop.check_finite_images(noisy, f'--noisy={o.noisy}'), sigma_tau, o.noisy)
    _check_model0(o, noisy, sigma_tau)
    detector = ref = None
    if o.eval_every > 0 and o.fid_ref is not None:
        detector = metrics.load_detector(o.detector, device, image_shape=noisy.image_shape)
        ref = metrics.load_ref(o.fid_ref, expected_dim=detector.feature_dim, detector=detector.name)
    heldout = open_dataset(o.audit_heldout) if o.audit_heldout is not None else None
    if heldout is not None and heldout.image_shape != noisy.image_shape:
        raise UserError(f'--audit-heldout={o.audit_heldout} holds images of shape {heldout.image_shape}, the data sets {noisy.image_shape}')
    return dnnlib.EasyDict(clean=clean, noisy=noisy, originals=_originals(noisy), detector=detector, ref=ref,
                           heldout=heldout, sigma_tau=sigma_tau, device=device)


def _sigma_tau(noisy: Dataset, path: str) -> float:
    """The noisy set's sigma (sigma_tau), of sane size in [-1, 1] units (opening the set checked it is a positive number)."""
    sigma = noisy.sigma
    if sigma is None:
        raise UserError(f'{path} has no noise level: its dataset.json lacks "sigma" '
                        '(make noisy sets with dataset_tool.py corrupt or import-noisy)')
    if sigma > SIGMA_TAU_SANE:
        raise UserError(f'{path}: its dataset.json gives "sigma": {sigma:g}, far too large for [-1, 1] pixel units (the paper\'s '
                        f'levels are 0.2 to 1.38; above {SIGMA_TAU_SANE} no signal is left); a sigma in 0..255 grey levels must be '
                        'divided by 127.5: fix dataset.json')
    return float(sigma)


def _check_noisy_values(values: np.ndarray | None, sigma_tau: float, path: str) -> None:
    """The noisy set's values against its sigma: [-1, 1] pixels plus noise of std sigma_tau have a std of at
    least sigma_tau and at most sqrt(1 + sigma_tau^2). Far above: another unit (an error); below: a warning."""
    if values is None:
        return
    std = float(values.std(dtype=np.float64))
    if std > 3 * math.sqrt(1 + sigma_tau ** 2):
        raise UserError(f'--noisy={path}: its values have std {std:.3g}, impossible for [-1, 1] pixels with noise '
                        f'sigma={sigma_tau:g}; store the noisy images in [-1, 1] units (u / 127.5 - 1 for 0..255 data)')
    if std < 0.5 * sigma_tau:
        distributed.print0(f'Warning: the values of {path} have std {std:.3g}, less than half the noise level its '
                           f'dataset.json gives (sigma={sigma_tau:g}); check that sigma is in [-1, 1] pixel units')


def _check_model0(o: SFBDOptions, noisy: Dataset, sigma_tau: float) -> None:
    """Model 0 (the pretrained network, or the one pretraining builds) fits the data, and the backward sampler
    can start at sigma_tau with it: within the network's noise levels and EDM's sigma_max."""
    if o.pretrained is not None:
        net = checkpoint.load_network(o.pretrained, device='cpu')
        checkpoint.check_network_matches(net, noisy.resolution, noisy.num_channels)
        if net.label_dim:
            raise UserError(f'{o.pretrained} is class-conditional; SFBD trains unconditional models')
        if o.train_kwargs.get('augment_kwargs') and not net.init_kwargs.get('augment_dim'):
            raise UserError(f'{o.pretrained} was trained without augmentation labels; fine-tune it with --augment=0')
        if not all(p.isfinite().all() for p in net.parameters()):
            raise UserError(f'--pretrained={o.pretrained} holds weights that are not finite (NaN or inf); give a network that trained well')
        what = f'--pretrained={o.pretrained}'
    else:
        net = training_loop.construct_network(o.train_kwargs['network_kwargs'], noisy.resolution, noisy.num_channels)
        what = 'the network pretraining builds'
    low, high = net.sigma_min, min(sampler.SIGMA_MAX, net.sigma_max)
    if not low <= sigma_tau <= high:
        raise UserError(f'sigma_tau={sigma_tau:g} (the noisy set\'s sigma) is outside the noise levels the backward sampler can '
                        f'start from with {what}: [{low:g}, {high:g}] ([-1, 1] units); use another --precond or network, '
                        'or check the noisy set\'s sigma')


def _originals(noisy: Dataset) -> Dataset | None:
    """The clean originals of a simulated noisy set (row i of both is the same image), or None if unknown."""
    path = originals_path(noisy, on_missing=distributed.print0)
    if path is None:
        return None
    originals = open_dataset(path)
    if len(originals) != len(noisy) or originals.image_shape != noisy.image_shape:
        raise UserError(f'The originals {path} named by the field "originals" of the noisy set do not match it: '
                        f'{len(originals)} images of {originals.image_shape}, the noisy set has {len(noisy)} of {noisy.image_shape}')
    return originals

#----------------------------------------------------------------------------
# Training (pretraining and fine-tuning) that a rerun resumes instead of repeating.

def _train_once(train_dir: str, break_lock: bool = False, **kwargs: Any) -> str:
    """training_loop in train_dir, resumed from its newest state if any; finished.json makes it a no-op."""
    marker = os.path.join(train_dir, 'finished.json')
    done = _main_reads_json(marker)
    if done is not None:
        distributed.print0(f'Training in {train_dir} already finished')
        return os.path.join(train_dir, done['network'])
    state = distributed.broadcast_object(training_loop.find_latest_state(train_dir) if distributed.is_main() else None)
    if state is None and distributed.is_main() and os.path.isdir(train_dir):
        shutil.rmtree(train_dir)  # snapshots and logs of an attempt that never dumped a state: start over
    distributed.barrier()
    snapshot = training_loop.training_loop(train_dir, resume=state, break_lock=break_lock, **kwargs)
    if distributed.is_main():
        _write_json(marker, {'network': os.path.relpath(snapshot, train_dir)})
    distributed.barrier()
    return snapshot


def _progress(total: int, mine: int, desc: str) -> Callable[[int], None]:
    """update(n) for rank 0's share of `mine` items, shown as progress over all `total` items (ranks keep pace)."""
    progress = dnnlib.util.Progress(total, desc, enabled=distributed.is_main())
    seen = 0

    def update(n: int) -> None:
        nonlocal seen
        seen += n
        progress.update(round(seen * total / max(mine, 1)) - progress.done)
    return update

#----------------------------------------------------------------------------
# Backward denoising: E_k from the noisy set, sharded, resumable, independent of the number of processes.

def _chunk_path(parts_dir: str, start: int, stop: int) -> str:
    return os.path.join(parts_dir, f'{start:09d}-{stop:09d}.npy')


def _to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    """Denoised float64 images as stored in E_k: uint8 rounded as EDM's sampler output, or float32 [-1, 1]."""
    return (images.to_uint8(x) if dtype == 'uint8' else x.to(torch.float32)).cpu().numpy()


class NonFiniteImages(Exception):
    """A chunk whose noisy input (kind 0) or denoised output (kind 1) holds NaN or inf."""

    def __init__(self, kind: int):
        super().__init__(kind)
        self.kind = kind


@torch.no_grad()
def backward_denoise(net: torch.nn.Module, noisy: Dataset, rows: Sequence[int], seeds: Sequence[int], *, sigma_tau: float,
                     num_steps: int, solver: str, dtype: str = 'uint8', device: torch.device | str = 'cpu') -> np.ndarray:
    """Rows `rows` of `noisy` backward-denoised from sigma_tau by `net` in one batch, as stored (uint8 or float32).

    Row rows[j] draws its noise (solver 'sde') from seeds[j]; the sigma range is clipped to the network's.
    Non-finite input or output raises NonFiniteImages (the caller decides, collectively, what to do).
    """
    y = to_model_space(torch.from_numpy(np.stack([noisy[int(i)][0] for i in rows]))).to(device)
    if not y.isfinite().all():
        raise NonFiniteImages(0)
    rnd = rng.StackedRandomGenerator(device, seeds)
    x = sampler.backward_sample(sampler.net_denoiser(net), y.to(torch.float64), sigma_tau, num_steps, solver=solver,
                                sigma_min=max(sampler.SIGMA_MIN, net.sigma_min), sigma_max=min(sampler.SIGMA_MAX, net.sigma_max),
                                randn_like=rnd.randn_like, round_sigma=net.round_sigma)
    if not x.isfinite().all():
        raise NonFiniteImages(1)
    return _to_storage(x, dtype)


@torch.no_grad()
def denoise_dataset(net: torch.nn.Module, noisy: Dataset, dest: str, *, sigma_tau: float, num_steps: int, solver: str,
                    seed: int, k: int, batch_size: int, dtype: str = 'uint8', device: torch.device | str = 'cpu',
                    metadata: dict | None = None) -> str:
    """Backward-denoise every image of `noisy` with `net` into the array dataset `dest` (E_k); collective.

    The indices are cut into chunks of `batch_size` that do not depend on the number of processes, and the
    chunks are sharded over ranks (distributed.shard), so every image is denoised exactly once, in the
    same batch, whatever the world size. Image i draws its noise (solver 'sde') from
    derive_seed(seed, k, i). Each finished chunk is written atomically to dest + '.parts/'; a rerun
    keeps them, and rank 0 merges them into `dest` when all exist.
    """
    n = len(noisy)
    parts_dir = dest + '.parts'
    chunks = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    mine = [chunks[i] for i in distributed.shard(len(chunks))]
    if distributed.is_main():
        os.makedirs(parts_dir, exist_ok=True)
    distributed.barrier()
    progress = _progress(n, sum(stop - start for start, stop in mine), f'Denoising E_{k}')
    bad = torch.zeros(2, dtype=torch.float64)  # chunks whose noisy input / denoised output is not finite
    for start, stop in mine:
        path = _chunk_path(parts_dir, start, stop)
        if not os.path.isfile(path):
            rows = range(start, stop)
            try:
                x = backward_denoise(net, noisy, rows, [rng.derive_seed(seed, k, i) for i in rows], sigma_tau=sigma_tau,
                                     num_steps=num_steps, solver=solver, dtype=dtype, device=device)
            except NonFiniteImages as e:
                bad[e.kind] += 1
                continue  # never stored: uint8 would turn NaN into black pixels
            with dnnlib.util.atomic_write(path) as f:
                np.save(f, x)
        progress(stop - start)
    bad_inputs, bad_outputs = distributed.all_reduce_sum(bad).tolist()  # every rank stops alike
    if bad_inputs:
        raise UserError(f'Denoising E_{k}: {int(bad_inputs)} chunk(s) of the noisy set hold values that are not finite (NaN or inf); '
                        'fix the noisy set or make it again')
    if bad_outputs:
        raise UserError(f'Denoising E_{k}: model {k - 1} gave values that are not finite for {int(bad_outputs)} chunk(s); '
                        'the network is broken: retrain it with a lower learning rate')
    distributed.barrier()
    if distributed.is_main():
        remove_temp_dirs(dest)  # of a merge killed midway: only rank 0 merges
        assemble_array_dataset(dest, [_chunk_path(parts_dir, start, stop) for start, stop in chunks], metadata, overwrite=True)
        shutil.rmtree(parts_dir)
    distributed.barrier()
    return dest

#----------------------------------------------------------------------------
# Evaluation.

def denoising_error(denoised: Dataset, originals: Dataset) -> dict[str, float]:
    """MSE of E_k against the originals in [-1, 1] units, and PSNR = 10 log10(2^2 / MSE) (equal to 8-bit PSNR); collective."""
    total = torch.zeros(2, dtype=torch.float64)
    for i in distributed.shard(len(denoised)):
        a = to_model_space(torch.from_numpy(denoised[i][0])).to(torch.float64)
        b = to_model_space(torch.from_numpy(originals[i][0])).to(torch.float64)
        total += torch.stack([(a - b).square().sum(), torch.tensor(float(a.numel()), dtype=torch.float64)])
    sq, count = distributed.all_reduce_sum(total).tolist()
    mse = sq / count
    return dict(denoise_mse=mse, denoise_psnr=10 * math.log10(4 / mse) if mse > 0 else float('inf'))


def save_strip(path: str, noisy: Dataset, denoised: Dataset, originals: Dataset | None, num: int) -> None:
    """PNG with rows noisy | denoised | original (if known) for the first `num` images of the noisy set."""
    idx = range(min(num, len(noisy)))
    rows = [images.to_uint8(to_model_space(torch.from_numpy(np.stack([ds[i][0] for i in idx])))).numpy()
            for ds in (noisy, denoised, originals) if ds is not None]
    images.save_grid(path, rows, pad=1)


def save_samples(path: str, net: torch.nn.Module, num: int, sampler_kwargs: dict, device: torch.device) -> None:
    """A near-square grid of `num` images generated for seeds 0..num-1 (rank 0 only)."""
    x = images.to_uint8(generation.sample_images(net, list(range(num)), device=device, **sampler_kwargs)).cpu().numpy()
    images.save_grid(path, images.grid_rows(x), pad=1)


def plot_metrics(path: str, records: list[dict], x: str = 'k', xlabel: str = 'SFBD iteration k') -> None:
    """metrics.png: every metric in PLOTTED against record key `x`, the iteration k by default (matplotlib's Agg canvas)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    keys = [key for key in PLOTTED if any(r.get(key) is not None for r in records)]
    if not keys:
        return
    fig = Figure(figsize=(4.5 * len(keys), 3.5), layout='constrained')
    for ax, key in zip(fig.subplots(1, len(keys), squeeze=False)[0], keys):
        points = [(r[x], r[key]) for r in records if r.get(key) is not None]
        ax.plot(*zip(*points), marker='o')
        ax.set_xlabel(xlabel)
        if x == 'k':
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(PLOTTED[key])
        ax.grid(alpha=0.3)
    with dnnlib.util.atomic_write(path) as f:
        fig.savefig(f, format='png', dpi=100)


def format_summary(records: list[dict], key: str = 'k') -> str:
    """One line per model (record key `key`: the iteration k by default): FID, denoising MSE and PSNR of E, time spent."""
    def num(r: dict, name: str, fmt: str) -> str:
        return format(r[name], fmt) if r.get(name) is not None else '-'
    w = max([3, len(key)] + [len(num(r, key, 'g')) for r in records])
    lines = [f'{key:>{w}}  {"FID":>10}  {"MSE [-1,1]":>11}  {"PSNR dB":>8}  {"time":>8}  network']
    for r in records:
        lines.append(f'{num(r, key, "g"):>{w}}  {num(r, "fid", ".4f"):>10}  {num(r, "denoise_mse", ".3e"):>11}  '
                     f'{num(r, "denoise_psnr", ".2f"):>8}  {dnnlib.util.format_time(r.get("sec", 0)):>8}  {r["network"]}')
    last = records[-1] if records else {}
    if last.get('fid_min') is not None:
        lines.append(f'Model {last[key]}: FID min {last["fid_min"]:.4f} mean {last["fid_mean"]:.4f} over '
                     f'{last["fid_repeats"]} seed sets of {last["fid_num"]} images (EDM reports the minimum)')
    return '\n'.join(lines)

#----------------------------------------------------------------------------
# Algorithm 1.

def _inference_net(network: str, precision: str, o: SFBDOptions, device: torch.device) -> torch.nn.Module:
    """`network` loaded for denoising or sampling: `precision`, and train_kwargs' channels_last and compile."""
    return perf.prepare_for_inference(checkpoint.load_network(network, device=device), precision=precision,
                                      channels_last=o.train_kwargs.get('channels_last', False),
                                      compile=o.train_kwargs.get('compile', False))


def _evaluate(k: int, network: str, o: SFBDOptions, run: dnnlib.EasyDict) -> dict:
    """Metrics and pictures of model k (and of E_k for k >= 1); collective. Returns the metrics record."""
    d = iter_dir(run.run_dir, k)
    net = _inference_net(network, o.eval_precision, o, run.device)
    record: dict[str, Any] = dict(k=k, network=_relative(run.run_dir, network))
    if k > 0:
        denoised = open_dataset(os.path.join(d, 'denoised'))
        if run.originals is not None:
            record.update(denoising_error(denoised, run.originals))
            distributed.print0(f'E_{k} against the originals: MSE {record["denoise_mse"]:.4e} ([-1,1] units), '
                               f'PSNR {record["denoise_psnr"]:.2f} dB')
        if distributed.is_main() and o.strip_num > 0:
            save_strip(os.path.join(d, 'strip.png'), run.noisy, denoised, run.originals, o.strip_num)
    sampler_kwargs = dict(num_steps=o.eval_steps)
    if distributed.is_main() and o.grid_num > 0:
        save_samples(os.path.join(d, 'samples.png'), net, o.grid_num, sampler_kwargs, run.device)
    if run.detector is not None and (k % o.eval_every == 0 or k == o.iters):
        # The last model as EDM reports it: seed set r = [r * eval_num, (r + 1) * eval_num); 'fid' is set 0 for every k.
        repeats = o.final_fid_repeats if k == o.iters else 1
        sets = [network_fid(net, o, run, f'model {k}' + (f', seed set {r + 1}' if repeats > 1 else ''), first_seed=r * o.eval_num)
                for r in range(repeats)]
        record.update(sets[0])
        if len(sets) > 1:
            fids = [x['fid'] for x in sets]
            record.update(fid_min=min(fids), fid_mean=float(np.mean(fids)), fid_repeats=len(fids))
            distributed.print0(f'FID of model {k} over {len(fids)} seed sets: min {min(fids):.4f} mean {np.mean(fids):.4f}')
    if o.audit_num > 0:
        record.update(_audit(net, d, o, run))
    distributed.barrier()
    return record


def _audit(net: torch.nn.Module, d: str, o: SFBDOptions, run: dnnlib.EasyDict) -> dict:
    """Memorization audit of model k (training.audit): audit_num samples against D_clean and the noisy set's
    originals, with the held-out baseline if given; files in d/audit/, the summary in the record. Collective."""
    references = {'clean': run.clean, **({'originals': run.originals} if run.originals is not None else {})}
    result = audit.audit_network(net, range(o.audit_num), references, run.heldout, batch_size=o.eval_batch, device=run.device,
                                 sampler_kwargs=dict(num_steps=o.eval_steps))
    summary = None
    if distributed.is_main():
        audit.write_results(os.path.join(d, 'audit'), result)
        summary = {f'audit_{key}': value for key, value in result.report['summary'].items()}
        distributed.print0(audit.format_report(result.report))
    return dict(distributed.broadcast_object(summary), audit_num=o.audit_num)


def network_fid(net: torch.nn.Module, o: SFBDOptions, run: dnnlib.EasyDict, name: str, first_seed: int = 0) -> dict:
    """{fid, fid_detector, fid_num} of o.eval_num images of `net` (seeds first_seed.., Heun o.eval_steps) against run.ref;
    collective."""
    progress = _progress(o.eval_num, len(distributed.shard(o.eval_num)), f'Generating for FID of {name}')

    def batches() -> Iterator[torch.Tensor]:
        for seeds, batch in generation.generate_images(net, range(first_seed, first_seed + o.eval_num), batch_size=o.eval_batch,
                                                       device=run.device, sampler_kwargs=dict(num_steps=o.eval_steps)):
            progress(len(seeds))
            yield batch
    fid = metrics.fid_from_stats(metrics.compute_feature_stats(batches(), run.detector), run.ref)
    distributed.print0(f'FID of {name}: {fid:.4f} ({o.eval_num} images, detector {run.detector.name})')
    return dict(fid=fid, fid_detector=run.detector.name, fid_num=o.eval_num)


def write_metrics(run_dir: str, records: list[dict], **plot_kwargs: Any) -> None:
    """metrics.jsonl (one record per line, rewritten atomically) and metrics.png of `records` (call on rank 0)."""
    with dnnlib.util.atomic_write(os.path.join(run_dir, 'metrics.jsonl'), 'w') as f:
        f.writelines(json.dumps(r, default=json_default) + '\n' for r in records)
    plot_metrics(os.path.join(run_dir, 'metrics.png'), records, **plot_kwargs)


def _finish(k: int, record: dict, records: list[dict], run_dir: str) -> None:
    """Rank 0 writes metrics.jsonl and metrics.png from all records, then iteration k's DONE marker."""
    records.append(record)
    if distributed.is_main():
        write_metrics(run_dir, records)
        _write_json(os.path.join(iter_dir(run_dir, k), 'DONE'), {'network': record['network'], 'metrics': record})
    distributed.barrier()


def _denoise(k: int, network: str, o: SFBDOptions, run: dnnlib.EasyDict) -> str:
    """Step (a) of iteration k: E_k, the noisy set backward-denoised from sigma_tau by model k-1 (`network`)."""
    denoised = os.path.join(iter_dir(run.run_dir, k), 'denoised')
    if _main_reads_json(os.path.join(denoised, 'dataset.json')):
        if distributed.is_main():
            shutil.rmtree(denoised + '.parts', ignore_errors=True)  # a kill between merge and clean-up
        return denoised
    meta = dict(sfbd_iteration=k, denoised_from=o.noisy, sigma_tau=run.sigma_tau, solver=o.denoise_solver,
                num_steps=o.denoise_steps, seed=o.seed, network=_relative(run.run_dir, network),
                precision=perf.resolve_precision(o.denoise_precision, run.device, inference=True),
                **{key: run.noisy.metadata.get(key) for key in ('source', 'source_indices', 'originals')})
    return denoise_dataset(_inference_net(network, o.denoise_precision, o, run.device), run.noisy, denoised,
                           sigma_tau=run.sigma_tau, num_steps=o.denoise_steps, solver=o.denoise_solver, seed=o.seed, k=k,
                           batch_size=o.denoise_batch, dtype=o.denoise_dtype, device=run.device, metadata=meta)


def run_sfbd(run_dir: str, device: str | torch.device | None = None, *, break_lock: bool = False, **kwargs: Any) -> str:
    """Run SFBD's Algorithm 1 with options.SFBDOptions(**kwargs) in run_dir; return the final network's path (every rank).

    Launch with plain python or torchrun; denoising, training and FID generation are sharded over the
    processes (`device`: default this process's CUDA device, else the CPU). Every phase is resumable:
    rerunning after a kill skips finished iterations, keeps finished denoising chunks and resumes
    training from its newest state. Everything is checked before run_dir is written; run_dir is locked
    against a second process (torch_utils.lock; `break_lock` takes over a lock of another machine).
    """
    distributed.init()
    run_dir = os.path.abspath(run_dir)
    device = torch.device(device) if device is not None else distributed.device()
    o = SFBDOptions(**kwargs)
    o.clean, o.noisy = os.path.abspath(o.clean), os.path.abspath(o.noisy)
    if o.audit_heldout is not None:
        o.audit_heldout = os.path.abspath(o.audit_heldout)
    if o.pretrained is not None and not dnnlib.util.is_url(o.pretrained):
        o.pretrained = os.path.abspath(o.pretrained)
    o.check()
    o = SFBDOptions(**o.to_json())  # exactly what sfbd_options.json holds
    run = _open_inputs(o, device)
    run.update(run_dir=run_dir, break_lock=break_lock)
    if os.path.isfile(os.path.join(run_dir, ONLINE_OPTIONS_FILE)):
        raise UserError(f'{run_dir} holds an online SFBD run (sfbd.py --online); rerun it with --online or use a new --outdir')
    with lock.run_lock(run_dir, break_lock=break_lock):
        _check_options_match(run_dir, o.to_json())
        if distributed.is_main():
            _write_json(os.path.join(run_dir, OPTIONS_FILE), o.to_json())
        distributed.barrier()
        with dnnlib.util.tee_output(os.path.join(run_dir, 'log.txt') if distributed.is_main() else None):
            return _algorithm1(o, run)


def _algorithm1(o: SFBDOptions, run: dnnlib.EasyDict) -> str:
    """Model 0, then for k = 1..K: (a) denoise with model k-1, (b) fine-tune it on E_k, (c) evaluate; skipping what is DONE."""
    distributed.print0(f'SFBD in {run.run_dir}: {len(run.clean)} clean and {len(run.noisy)} noisy images '
                       f'({run.noisy.resolution}x{run.noisy.resolution}x{run.noisy.num_channels}), sigma_tau {run.sigma_tau:g} '
                       f'([-1, 1] units), {o.iters} iteration(s) on {distributed.get_world_size()} process(es)')
    if run.originals is None:
        distributed.print0('The noisy set names no originals: denoising error not measured')
    if run.detector is None:
        distributed.print0('No --fid-ref (or --eval-every 0): FID not measured')
    distributed.print0(f'Fine-tunes train on: {options.FINETUNE_DATA[o.finetune_data]}')
    for warning in options.schedule_warnings(o):
        distributed.print0(warning)
    # Model 0: the given network, or pretraining on D_clean.
    network = o.pretrained
    if network is None:
        network = _train_once(os.path.join(run.run_dir, 'pretrain'), run.break_lock, **options.pretrain_kwargs(o))
    records: list[dict] = []
    times: list[float] = []
    for k in range(o.iters + 1):
        d = iter_dir(run.run_dir, k)
        done = _main_reads_json(os.path.join(d, 'DONE'))
        if done is not None:
            records.append(done['metrics'])
            network = _resolve(run.run_dir, done['network'])
            continue
        start_time = time.time()
        if k > 0:
            distributed.print0(f'\n=== SFBD iteration {k}/{o.iters}: denoise with {_relative(run.run_dir, network)}, then fine-tune ===')
            denoised = _denoise(k, network, o, run)
            network = _train_once(os.path.join(d, 'finetune'), run.break_lock, **options.finetune_kwargs(o, k, network, denoised))
        record = _evaluate(k, network, o, run)
        record['sec'] = time.time() - start_time
        _finish(k, record, records, run.run_dir)
        if k > 0:
            times.append(record['sec'])
            eta = sum(times) / len(times) * (o.iters - k)
            distributed.print0(f'Iteration {k}/{o.iters} done in {dnnlib.util.format_time(record["sec"])}; '
                               f'ETA {dnnlib.util.format_time(eta)}')
    distributed.print0('\nSFBD summary (MSE/PSNR: E_k against the originals, [-1, 1] units):')
    distributed.print0(format_summary(records))
    distributed.print0(f'\nFinal network: {network}')
    return network
