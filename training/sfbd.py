"""SFBD (Algorithm 1): pretrain on the clean set, then for k = 1..K denoise the noisy set with model k-1 and fine-tune on the result."""

import glob
import json
import math
import os
import shutil
import time
from typing import Any, Callable, Iterator

import numpy as np
import torch

import dnnlib
from dnnlib.util import UserError
from torch_utils import distributed, perf, rng
from training import checkpoint, generation, metrics, sampler, training_loop
from training.dataset import ArrayDatasetWriter, Dataset, json_default, open_dataset, to_model_space

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
RESUMABLE_CHANGES = ('iters',)  # may differ on a rerun: more iterations extend a finished run
PLOTTED = {'fid': 'FID (lower is better)', 'denoise_mse': 'denoising MSE, [-1,1] units', 'denoise_psnr': 'denoising PSNR (dB)'}


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

def _check_options_match(run_dir: str, options: dict) -> None:
    """A rerun continues the run in run_dir only with the options it was started with."""
    path = os.path.join(run_dir, OPTIONS_FILE)
    if not os.path.isfile(path):
        return
    old = _read_json(path)
    changed = sorted(k for k in set(old) | set(options) if k not in RESUMABLE_CHANGES and old.get(k) != options.get(k))
    if changed:
        k = changed[0]
        raise UserError(f'{run_dir} holds an SFBD run with other options ({", ".join(changed)}; e.g. {k}: '
                        f'{old.get(k)!r} there, {options.get(k)!r} now); rerun the same command or use a new --outdir')


def _check_inputs(o: dnnlib.EasyDict, device: torch.device) -> tuple[Dataset, Dataset, Dataset | None, metrics.Detector | None, dict | None]:
    """Open and cross-check the data sets, the originals, the starting network and the FID reference.

    Returns (clean, noisy, originals or None, detector or None, reference or None).
    """
    if o.iters < 1:
        raise UserError(f'--iters must be at least 1, got {o.iters}')
    if not 0 <= o.clean_mix < 1:
        raise UserError(f'--clean-mix must be in [0, 1), got {o.clean_mix}')
    clean = open_dataset(o.clean)
    noisy = open_dataset(o.noisy)
    if noisy.sigma is None:
        raise UserError(f'{o.noisy} has no noise level: its dataset.json lacks "sigma" '
                        '(make noisy sets with dataset_tool.py corrupt or import-noisy)')
    if not (noisy.sigma > 0 and math.isfinite(noisy.sigma)):
        raise UserError(f'{o.noisy}: its dataset.json gives sigma={noisy.sigma}; it must be a positive number')
    if o.sigma is not None and not math.isclose(o.sigma, noisy.sigma, rel_tol=1e-6):
        raise UserError(f'--sigma={o.sigma} contradicts the noisy set\'s own sigma={noisy.sigma} (from {o.noisy}); '
                        'drop --sigma or use the matching noisy set')
    if clean.sigma is not None:
        raise UserError(f'--clean={o.clean} is a noisy set (sigma={clean.sigma}); give the clean images')
    if (clean.resolution, clean.num_channels) != (noisy.resolution, noisy.num_channels):
        raise UserError(f'The clean set holds {clean.resolution}x{clean.resolution} images with {clean.num_channels} '
                        f'channel(s), the noisy set {noisy.resolution}x{noisy.resolution} with {noisy.num_channels}')
    if o.pretrained is not None:
        net = checkpoint.load_network(o.pretrained, device='cpu')
        checkpoint.check_network_matches(net, noisy.resolution, noisy.num_channels)
        if net.label_dim:
            raise UserError(f'{o.pretrained} is class-conditional; SFBD trains unconditional models')
        if o.train_kwargs.get('augment_kwargs') and not net.init_kwargs.get('augment_dim'):
            raise UserError(f'{o.pretrained} was trained without augmentation labels; fine-tune it with --augment=0')
        del net
    detector = ref = None
    if o.eval_every > 0 and o.fid_ref is not None:
        detector = metrics.load_detector(o.detector, device, image_shape=noisy.image_shape)
        ref = metrics.load_ref(o.fid_ref, expected_dim=detector.feature_dim, detector=detector.name)
    return clean, noisy, _originals(noisy), detector, ref


def _originals(noisy: Dataset) -> Dataset | None:
    """The clean originals of a simulated noisy set (row i of both is the same image), or None if unknown."""
    path = noisy.metadata.get('originals')
    if not path or not os.path.exists(path):
        return None
    originals = open_dataset(path)
    if len(originals) != len(noisy) or originals.image_shape != noisy.image_shape:
        raise UserError(f'The originals {path} named by the noisy set do not match it: {len(originals)} images of '
                        f'{originals.image_shape}, the noisy set has {len(noisy)} of {noisy.image_shape}')
    return originals

#----------------------------------------------------------------------------
# Training (pretraining and fine-tuning) that a rerun resumes instead of repeating.

def _train(train_dir: str, **kwargs: Any) -> str:
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
    snapshot = training_loop.training_loop(train_dir, resume=state, **kwargs)
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
    return (generation.to_uint8(x) if dtype == 'uint8' else x.to(torch.float32)).cpu().numpy()


@torch.no_grad()
def denoise_dataset(net: torch.nn.Module, noisy: Dataset, dest: str, *, sigma_tau: float, num_steps: int, solver: str,
                    seed: int, k: int, batch: int, dtype: str = 'uint8', device: torch.device | str = 'cpu',
                    metadata: dict | None = None) -> str:
    """Backward-denoise every image of `noisy` with `net` into the array dataset `dest` (E_k); collective.

    The indices are cut into chunks of `batch` that do not depend on the number of processes, and the
    chunks are sharded over ranks (distributed.shard), so every image is denoised exactly once, in the
    same batch, whatever the world size. Image i draws its noise (solver 'sde') from
    derive_seed(seed, k, i). Each finished chunk is written atomically to dest + '.parts/'; a rerun
    keeps them, and rank 0 merges them into `dest` when all exist.
    """
    n = len(noisy)
    parts_dir = dest + '.parts'
    chunks = [(s, min(s + batch, n)) for s in range(0, n, batch)]
    mine = [chunks[i] for i in distributed.shard(len(chunks))]
    if distributed.is_main():
        os.makedirs(parts_dir, exist_ok=True)
    distributed.barrier()
    denoise = sampler.net_denoiser(net)
    progress = _progress(n, sum(stop - start for start, stop in mine), f'Denoising E_{k}')
    for start, stop in mine:
        path = _chunk_path(parts_dir, start, stop)
        if not os.path.isfile(path):
            y = to_model_space(torch.from_numpy(np.stack([noisy[i][0] for i in range(start, stop)]))).to(device)
            rnd = rng.StackedRandomGenerator(device, [rng.derive_seed(seed, k, i) for i in range(start, stop)])
            x = sampler.backward_sample(denoise, y.to(torch.float64), sigma_tau, num_steps, solver=solver,
                                        sigma_min=max(0.002, net.sigma_min), sigma_max=min(80, net.sigma_max),
                                        randn_like=rnd.randn_like, round_sigma=net.round_sigma)
            with dnnlib.util.atomic_write(path) as f:
                np.save(f, _to_storage(x, dtype))
        progress(stop - start)
    distributed.barrier()
    if distributed.is_main():
        # A merge killed midway leaves its hidden temporary directory beside dest: only rank 0 merges, so drop it.
        for stale in glob.glob(os.path.join(os.path.dirname(os.path.abspath(dest)), f'.{os.path.basename(dest)}.*.tmp')):
            shutil.rmtree(stale)
        with ArrayDatasetWriter(dest, n, noisy.image_shape, dtype, metadata, overwrite=True) as writer:
            for start, stop in chunks:
                part = np.load(_chunk_path(parts_dir, start, stop), allow_pickle=False)
                assert part.shape[0] == stop - start
                writer.write(start, part)
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


def _tile(rows: list[np.ndarray], path: str, pad: int = 1) -> None:
    """Write uint8 NCHW image rows (equal widths) as one PNG with `pad` white pixels between images."""
    c, h, w = rows[0].shape[1:]
    cols = max(r.shape[0] for r in rows)
    grid = np.full([len(rows) * (h + pad) - pad, cols * (w + pad) - pad, c], 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            grid[i * (h + pad):i * (h + pad) + h, j * (w + pad):j * (w + pad) + w] = image.transpose(1, 2, 0)
    generation.save_png(path, grid.transpose(2, 0, 1))


def save_strip(path: str, noisy: Dataset, denoised: Dataset, originals: Dataset | None, num: int) -> None:
    """PNG with rows noisy | denoised | original (if known) for the first `num` images of the noisy set."""
    idx = range(min(num, len(noisy)))
    rows = [generation.to_uint8(to_model_space(torch.from_numpy(np.stack([ds[i][0] for i in idx])))).numpy()
            for ds in (noisy, denoised, originals) if ds is not None]
    _tile(rows, path)


def save_samples(path: str, net: torch.nn.Module, num: int, sampler_kwargs: dict, device: torch.device) -> None:
    """A near-square grid of `num` images generated for seeds 0..num-1 (rank 0 only)."""
    images = generation.to_uint8(generation.sample_images(net, list(range(num)), device=device, **sampler_kwargs)).cpu().numpy()
    cols = int(math.ceil(math.sqrt(num)))
    _tile([images[i:i + cols] for i in range(0, num, cols)], path)


def plot_metrics(path: str, records: list[dict]) -> None:
    """metrics.png: every metric in PLOTTED against the iteration k (matplotlib's Agg canvas, no display)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    keys = [key for key in PLOTTED if any(r.get(key) is not None for r in records)]
    if not keys:
        return
    fig = Figure(figsize=(4.5 * len(keys), 3.5), layout='constrained')
    for ax, key in zip(fig.subplots(1, len(keys), squeeze=False)[0], keys):
        points = [(r['k'], r[key]) for r in records if r.get(key) is not None]
        ax.plot(*zip(*points), marker='o')
        ax.set_xlabel('SFBD iteration k')
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(PLOTTED[key])
        ax.grid(alpha=0.3)
    with dnnlib.util.atomic_write(path) as f:
        fig.savefig(f, format='png', dpi=100)


def format_summary(records: list[dict]) -> str:
    """One line per model k: FID, denoising MSE and PSNR of E_k, time spent."""
    lines = [f'{"k":>3}  {"FID":>10}  {"MSE [-1,1]":>11}  {"PSNR dB":>8}  {"time":>8}  network']
    for r in records:
        def num(key: str, fmt: str) -> str:
            return format(r[key], fmt) if r.get(key) is not None else '-'
        lines.append(f'{r["k"]:>3}  {num("fid", ".4f"):>10}  {num("denoise_mse", ".3e"):>11}  {num("denoise_psnr", ".2f"):>8}  '
                     f'{dnnlib.util.format_time(r.get("sec", 0)):>8}  {r["network"]}')
    return '\n'.join(lines)

#----------------------------------------------------------------------------
# Algorithm 1.

def _inference_net(network: str, precision: str, o: dnnlib.EasyDict, device: torch.device) -> torch.nn.Module:
    """`network` loaded for denoising or sampling: `precision`, and train_kwargs' channels_last and compile."""
    return perf.prepare_for_inference(checkpoint.load_network(network, device=device), precision=precision,
                                      channels_last=o.train_kwargs.get('channels_last', False),
                                      compile=o.train_kwargs.get('compile', False))


def _evaluate(k: int, network: str, o: dnnlib.EasyDict, noisy: Dataset, originals: Dataset | None,
              detector: metrics.Detector | None, ref: dict | None, device: torch.device) -> dict:
    """Metrics and pictures of model k (and of E_k for k >= 1); collective. Returns the metrics record."""
    d = iter_dir(o.run_dir, k)
    net = _inference_net(network, o.eval_precision, o, device)
    record: dict[str, Any] = dict(k=k, network=_relative(o.run_dir, network))
    if k > 0:
        denoised = open_dataset(os.path.join(d, 'denoised'))
        if originals is not None:
            record.update(denoising_error(denoised, originals))
            distributed.print0(f'E_{k} against the originals: MSE {record["denoise_mse"]:.4e} ([-1,1] units), '
                               f'PSNR {record["denoise_psnr"]:.2f} dB')
        if distributed.is_main() and o.strip_num > 0:
            save_strip(os.path.join(d, 'strip.png'), noisy, denoised, originals, o.strip_num)
    sampler_kwargs = dict(num_steps=o.eval_steps)
    if distributed.is_main() and o.grid_num > 0:
        save_samples(os.path.join(d, 'samples.png'), net, o.grid_num, sampler_kwargs, device)
    if detector is not None and (k % o.eval_every == 0 or k == o.iters):
        progress = _progress(o.eval_num, len(distributed.shard(o.eval_num)), f'Generating for FID of model {k}')

        def batches() -> Iterator[torch.Tensor]:
            for seeds, images in generation.generate_images(net, range(o.eval_num), batch_size=o.eval_batch, device=device,
                                                            sampler_kwargs=sampler_kwargs):
                progress(len(seeds))
                yield images
        record['fid'] = metrics.fid_from_stats(metrics.compute_feature_stats(batches(), detector), ref)
        record.update(fid_detector=detector.name, fid_num=o.eval_num)
        distributed.print0(f'FID of model {k}: {record["fid"]:.4f} ({o.eval_num} images, detector {detector.name})')
    distributed.barrier()
    return record


def _finetune_kwargs(o: dnnlib.EasyDict, ds_kwargs: dict) -> dict:
    """training_loop options of every fine-tune: the previous network's own architecture (network_kwargs=None),
    fresh Adam, lr warm-up restarted, no EMA ramp-up (as EDM's --transfer), optionally the clean set mixed in."""
    ft = dict(o.train_kwargs, network_kwargs=None, ema_rampup_ratio=None, total_kimg=o.finetune_kimg)
    if o.finetune_lr is not None:
        adam = dict(class_name='torch.optim.Adam', betas=[0.9, 0.999], eps=1e-8, fused=True)
        ft['optimizer_kwargs'] = dict(ft.get('optimizer_kwargs') or adam, lr=o.finetune_lr)
    if o.finetune_lr_rampup_kimg is not None:
        ft['lr_rampup_kimg'] = o.finetune_lr_rampup_kimg
    if o.finetune_ema_halflife_kimg is not None:
        ft['ema_halflife_kimg'] = o.finetune_ema_halflife_kimg
    if o.clean_mix > 0:
        ft.update(mix_dataset_kwargs={**ds_kwargs, 'path': o.clean}, mix_fraction=o.clean_mix)
    return ft


def _finish(k: int, record: dict, records: list[dict], o: dnnlib.EasyDict) -> None:
    """Rank 0 writes metrics.jsonl and metrics.png from all records, then iteration k's DONE marker."""
    records.append(record)
    if distributed.is_main():
        with dnnlib.util.atomic_write(os.path.join(o.run_dir, 'metrics.jsonl'), 'w') as f:
            f.writelines(json.dumps(r, default=json_default) + '\n' for r in records)
        plot_metrics(os.path.join(o.run_dir, 'metrics.png'), records)
        _write_json(os.path.join(iter_dir(o.run_dir, k), 'DONE'), {'network': record['network'], 'metrics': record})
    distributed.barrier()


def run_sfbd(
    run_dir: str,                              # Run directory; a rerun with the same options continues it.
    *,
    clean: str,                                # D_clean: image folder/zip or array dataset.
    noisy: str,                                # D_noisy: array dataset whose dataset.json gives sigma (= sigma_tau).
    train_kwargs: dict,                        # training_loop options shared by pretraining and fine-tuning (network,
                                               # loss, optimizer, augment, batch, EMA, ticks); no data, duration or seed.
    dataset_kwargs: dict | None = None,        # open_dataset options of the training sets (xflip, cache); path set here.
    sigma: float | None = None,                # Expected sigma_tau ([-1, 1] units); an error if the noisy set disagrees.
    pretrained: str | None = None,             # Start from this network (any load_network input) instead of pretraining.
    pretrain_kimg: float = 20000,              # Pretraining on D_clean, thousands of images.
    iters: int = 10,                           # K, the number of SFBD iterations.
    finetune_kimg: float = 2000,               # Fine-tuning per iteration, thousands of images.
    finetune_lr: float | None = None,          # Fine-tune learning rate; None: that of train_kwargs.
    finetune_lr_rampup_kimg: float | None = None,  # Fine-tune lr warm-up (restarted every iteration); None: train_kwargs'.
    finetune_ema_halflife_kimg: float | None = None,  # Fine-tune EMA half-life; None: train_kwargs'.
    clean_mix: float = 0.0,                    # Share of each fine-tune batch from D_clean; 0 = Algorithm 1 exactly.
    denoise_steps: int = 18,                   # Steps of the full EDM schedule before truncation at sigma_tau.
    denoise_solver: str = 'ode',               # 'ode' (Heun, probability flow; official code) or 'sde' (reverse SDE).
    denoise_batch: int = 256,                  # Images per denoising chunk (also the unit of resumption).
    denoise_dtype: str = 'uint8',              # Storage of E_k: 'uint8' (as the official PNGs) or 'float32'.
    denoise_precision: str = 'fp32',           # 'fp32' | 'bf16' | 'auto' (perf.resolve_precision) of the backward sampler.
    eval_every: int = 1,                       # FID every this many iterations (and of the last model); 0: never.
    eval_num: int = 50000,                     # Generated images per FID.
    eval_steps: int = 18,                      # Heun steps when generating for FID and sample grids.
    eval_batch: int = 64,                      # Generation batch per process.
    eval_precision: str = 'fp32',              # 'fp32' (FIDs comparable with EDM's) | 'bf16' | 'auto' of that generation.
    fid_ref: str | None = None,                # Reference statistics (.npz path or URL); None: no FID.
    detector: str = 'inception',               # FID feature detector (training.metrics.load_detector).
    grid_num: int = 64,                        # Images in each samples.png; 0: none.
    strip_num: int = 8,                        # Images in each strip.png (noisy | denoised | original); 0: none.
    seed: int = 0,                             # Seed of pretraining (k = 0), fine-tune k (seed + k) and denoising.
    device: str | None = None,                 # Default: this process's CUDA device, else the CPU.
) -> str:
    """Run SFBD's Algorithm 1 end to end in run_dir and return the path of the final network (on every rank).

    Launch with plain python or torchrun; denoising, training and FID generation are sharded over the
    processes. Every phase is resumable: rerunning after a kill skips finished iterations, keeps
    finished denoising chunks and resumes training from its newest state.
    """
    distributed.init()
    run_dir = os.path.abspath(run_dir)
    if pretrained is not None and not dnnlib.util.is_url(pretrained):
        pretrained = os.path.abspath(pretrained)
    device = torch.device(device) if device is not None else distributed.device()
    if denoise_solver not in ('ode', 'sde'):
        raise UserError(f"Unknown --denoise-solver {denoise_solver!r}: use 'ode' or 'sde'")
    if denoise_dtype not in ('uint8', 'float32'):
        raise UserError(f"Unknown --denoise-dtype {denoise_dtype!r}: use 'uint8' or 'float32'")
    for name, value in [('--denoise-precision', denoise_precision), ('--eval-precision', eval_precision)]:
        if value not in perf.PRECISIONS:
            raise UserError(f'Unknown {name} {value!r}: use one of {", ".join(perf.PRECISIONS)}')
    for key in ('dataset_kwargs', 'total_kimg', 'seed', 'transfer', 'resume', 'mix_dataset_kwargs', 'mix_fraction'):
        assert key not in train_kwargs, key
    o = dnnlib.EasyDict(clean=os.path.abspath(clean), noisy=os.path.abspath(noisy), train_kwargs=train_kwargs,
                        dataset_kwargs=dataset_kwargs or {}, sigma=sigma, pretrained=pretrained, pretrain_kimg=pretrain_kimg,
                        iters=iters, finetune_kimg=finetune_kimg, finetune_lr=finetune_lr,
                        finetune_lr_rampup_kimg=finetune_lr_rampup_kimg, finetune_ema_halflife_kimg=finetune_ema_halflife_kimg,
                        clean_mix=clean_mix, denoise_steps=denoise_steps, denoise_solver=denoise_solver,
                        denoise_batch=denoise_batch, denoise_dtype=denoise_dtype, denoise_precision=denoise_precision,
                        eval_every=eval_every, eval_num=eval_num, eval_steps=eval_steps, eval_batch=eval_batch,
                        eval_precision=eval_precision, fid_ref=fid_ref, detector=detector, grid_num=grid_num,
                        strip_num=strip_num, seed=seed)
    o = dnnlib.EasyDict(json.loads(json.dumps(o, default=json_default)))  # exactly what sfbd_options.json holds
    clean_set, noisy_set, originals, det, ref = _check_inputs(o, device)
    _check_options_match(run_dir, o)
    distributed.barrier()
    if distributed.is_main():
        os.makedirs(run_dir, exist_ok=True)
        _write_json(os.path.join(run_dir, OPTIONS_FILE), o)
    distributed.barrier()
    o.run_dir = run_dir

    with dnnlib.util.tee_output(os.path.join(run_dir, 'log.txt') if distributed.is_main() else None):
        sigma_tau = noisy_set.sigma
        distributed.print0(f'SFBD in {run_dir}: {len(clean_set)} clean and {len(noisy_set)} noisy images '
                           f'({noisy_set.resolution}x{noisy_set.resolution}x{noisy_set.num_channels}), sigma_tau {sigma_tau:g} '
                           f'([-1, 1] units), {o.iters} iteration(s) on {distributed.get_world_size()} process(es)')
        if originals is None:
            distributed.print0('The noisy set names no originals: denoising error not measured')
        if det is None:
            distributed.print0('No --fid-ref (or --eval-every 0): FID not measured')
        ds_kwargs = dict(class_name='training.dataset.open_dataset', **o.dataset_kwargs)

        # Model 0: the given network, or pretraining on D_clean.
        if o.pretrained is not None:
            network = o.pretrained
        else:
            network = _train(os.path.join(run_dir, 'pretrain'), dataset_kwargs={**ds_kwargs, 'path': o.clean},
                             total_kimg=o.pretrain_kimg, seed=o.seed, **o.train_kwargs)

        ft = _finetune_kwargs(o, ds_kwargs)
        records: list[dict] = []
        times: list[float] = []
        for k in range(o.iters + 1):
            d = iter_dir(run_dir, k)
            done = _main_reads_json(os.path.join(d, 'DONE'))
            if done is not None:
                records.append(done['metrics'])
                network = _resolve(run_dir, done['network'])
                continue
            start_time = time.time()
            if k > 0:
                distributed.print0(f'\n=== SFBD iteration {k}/{o.iters}: denoise with {_relative(run_dir, network)}, then fine-tune ===')
                denoised = os.path.join(d, 'denoised')
                if _main_reads_json(os.path.join(denoised, 'dataset.json')):
                    if distributed.is_main():
                        shutil.rmtree(denoised + '.parts', ignore_errors=True)  # a kill between merge and clean-up
                else:
                    meta = dict(sfbd_iteration=k, denoised_from=o.noisy, sigma_tau=sigma_tau, solver=o.denoise_solver,
                                num_steps=o.denoise_steps, seed=o.seed, network=_relative(run_dir, network),
                                precision=perf.resolve_precision(o.denoise_precision, device),
                                **{key: noisy_set.metadata.get(key) for key in ('source', 'source_indices', 'originals')})
                    denoise_dataset(_inference_net(network, o.denoise_precision, o, device), noisy_set, denoised,
                                    sigma_tau=sigma_tau, num_steps=o.denoise_steps, solver=o.denoise_solver, seed=o.seed,
                                    k=k, batch=o.denoise_batch, dtype=o.denoise_dtype, device=device, metadata=meta)
                network = _train(os.path.join(d, 'finetune'), dataset_kwargs={**ds_kwargs, 'path': denoised},
                                 transfer=network, seed=o.seed + k, **ft)
            record = _evaluate(k, network, o, noisy_set, originals, det, ref, device)
            record['sec'] = time.time() - start_time
            _finish(k, record, records, o)
            if k > 0:
                times.append(record['sec'])
                eta = sum(times) / len(times) * (o.iters - k)
                distributed.print0(f'Iteration {k}/{o.iters} done in {dnnlib.util.format_time(record["sec"])}; '
                                   f'ETA {dnnlib.util.format_time(eta)}')

        distributed.print0('\nSFBD summary (MSE/PSNR: E_k against the originals, [-1, 1] units):')
        distributed.print0(format_summary(records))
        distributed.print0(f'\nFinal network: {network}')
    return network
