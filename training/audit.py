"""Memorization audit: each sample's nearest training images (pixel L2, optionally DINOv2 cosine) against a held-out baseline."""

import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
import torch

import dnnlib
from dnnlib.util import UserError
from torch_utils import distributed, perf
from training import generation, metrics
from training.dataset import Dataset, json_default, open_dataset, originals_path
from training.images import save_png, tile

GU_THRESHOLD = 1 / 3             # Gu et al. 2023: a sample is memorized if d1 / d2 < 1/3
HELDOUT_QUANTILE = 0.05          # pixels: share of samples closer than this quantile of the held-out distances
FEATURE_QUANTILE = 0.95          # features: share of samples more similar than this quantile of the held-out similarities
SIMILARITY_LEVELS = (0.9, 0.95, 0.99)  # DINOv2 cosine levels counted by Ambient Diffusion
FEATURES = ('none', 'dinov2')
UNITS = 'pixel distances: L2 norm of the difference in [-1,1] units (uint8 u -> u/127.5 - 1); features: cosine similarity'

#----------------------------------------------------------------------------
# Exact nearest neighbours. Pure: tensors in, tensors out.

def _unit_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff of a matmul in `dtype`; float32 follows torch's matmul precision (TF32 / bf16 unless 'highest')."""
    if dtype == torch.float64:
        return 2.0 ** -53
    assert dtype == torch.float32, dtype
    return {'highest': 2.0 ** -24, 'high': 2.0 ** -11, 'medium': 2.0 ** -8}[torch.get_float32_matmul_precision()]


def _values(x: torch.Tensor, integer: bool, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Rows of x flattened: grey levels minus 128 (integer mode: exact in float32 and float64), else [-1, 1] values.

    uint8 goes through float64 in float mode, so a float32 copy is the float64 value rounded once.
    """
    x = x.to(device).flatten(1)
    if integer:
        return x.to(dtype) - 128
    if x.dtype == torch.uint8:
        return (x.to(torch.float64) / 127.5 - 1).to(dtype)
    return x.to(dtype)


def _sort_by_distance(d: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by (distance, index)."""
    by_index = i.argsort(dim=1)
    d, i = d.gather(1, by_index), i.gather(1, by_index)
    order = d.argsort(dim=1, stable=True)
    return d.gather(1, order), i.gather(1, order)


def _exact_sq_distances(q: torch.Tensor, refs: torch.Tensor, idx: torch.Tensor, integer: bool, memory: int) -> torch.Tensor:
    """Float64 squared distances from each row of q [n, D] to the refs rows idx [n, c], in blocks of `memory` bytes."""
    n, c = idx.shape
    step = max(1, memory // (c * q.shape[1] * 8))
    out = torch.empty([n, c], dtype=torch.float64, device=q.device)
    for s in range(0, n, step):
        rows = idx[s:s + step]
        r = _values(refs[rows.flatten().to(refs.device)], integer, torch.float64, q.device).reshape(rows.shape[0], c, -1)
        out[s:s + step] = (q[s:s + step, None, :] - r).square().sum(2)
    return out


def _brute_force(q: torch.Tensor, refs: torch.Tensor, k: int, integer: bool, memory: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest refs of each row of q [n, D] from float64 differences against every reference (the exact fallback)."""
    n, dim = q.shape
    step = max(1, memory // (n * dim * 8))
    best_d = torch.empty([n, 0], dtype=torch.float64, device=q.device)
    best_i = torch.empty([n, 0], dtype=torch.int64, device=q.device)
    for s in range(0, refs.shape[0], step):
        r = _values(refs[s:s + step], integer, torch.float64, q.device)
        all_d = torch.cat([best_d, (q[:, None, :] - r[None]).square().sum(2)], 1)
        all_i = torch.cat([best_i, torch.arange(s, s + r.shape[0], device=q.device).expand(n, -1)], 1)
        # Kept rows come first and have lower indices, chunk rows are in index order: a stable sort breaks ties by index.
        order = all_d.argsort(dim=1, stable=True)[:, :k]
        best_d, best_i = all_d.gather(1, order), all_i.gather(1, order)
    return best_d, best_i


@torch.no_grad()
def nearest_neighbours(queries: torch.Tensor, refs: torch.Tensor, k: int = 2, *, candidates: int = 8,
                       query_chunk: int = 1024, ref_chunk: int = 4096, dtype: torch.dtype = torch.float32,
                       device: torch.device | str | None = None, memory: int = 1 << 28) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact L2 distances and indices of the k nearest rows of `refs` to every row of `queries` (both [N, ...]).

    Two uint8 tensors are compared in [-1, 1] units (u / 127.5 - 1) in exact integer arithmetic; otherwise the
    values are used as they are (uint8 converted to [-1, 1]). Ties go to the lower index. Candidates come from
    ||a||^2 + ||b||^2 - 2ab in `dtype` on `device` (default: the queries'), `query_chunk` x `ref_chunk` at a
    time; the best `candidates` are recomputed exactly in float64, and a query whose rounding bound leaves
    any doubt is recomputed against every reference. Returns (float64 [N, k], int64 [N, k]) on the CPU.
    """
    n, m = queries.shape[0], refs.shape[0]
    if m < k:
        raise UserError(f'Need at least {k} reference images for the {k} nearest, got {m}')
    if queries.shape[1:] != refs.shape[1:]:
        raise UserError(f'Queries of shape {list(queries.shape[1:])} cannot be compared with references of shape {list(refs.shape[1:])}')
    assert k >= 1 and candidates >= 1 and query_chunk >= 1 and ref_chunk >= 1
    device = torch.device(device) if device is not None else queries.device
    integer = queries.dtype == torch.uint8 and refs.dtype == torch.uint8
    dim = math.prod(queries.shape[1:])
    keep = min(max(candidates, k), m)
    u = _unit_roundoff(dtype)
    out_d = torch.empty([n, k], dtype=torch.float64)
    out_i = torch.empty([n, k], dtype=torch.int64)
    with torch.autocast(device.type, enabled=False):
        ref_norm = max(float(_values(refs[s:s + ref_chunk], integer, torch.float64, device).norm(dim=1).max())
                       for s in range(0, m, ref_chunk))
        for qs in range(0, n, query_chunk):
            q = _values(queries[qs:qs + query_chunk], integer, dtype, device)
            q_sq = q.square().sum(1, keepdim=True)
            best_d = torch.empty([q.shape[0], 0], dtype=dtype, device=device)
            best_i = torch.empty([q.shape[0], 0], dtype=torch.int64, device=device)
            for rs in range(0, m, ref_chunk):
                r = _values(refs[rs:rs + ref_chunk], integer, dtype, device)
                all_d = torch.cat([best_d, q_sq + r.square().sum(1) - 2 * (q @ r.T)], 1)
                all_i = torch.cat([best_i, torch.arange(rs, rs + r.shape[0], device=device).expand(q.shape[0], -1)], 1)
                best_d, pos = all_d.topk(min(keep, all_d.shape[1]), dim=1, largest=False)
                best_i = all_i.gather(1, pos)
            q64 = _values(queries[qs:qs + query_chunk], integer, torch.float64, device)
            d, i = _sort_by_distance(_exact_sq_distances(q64, refs, best_i, integer, memory), best_i)
            d, i = d[:, :k].clone(), i[:, :k].clone()
            if keep < m:
                # Every reference left out has an approximate distance >= the largest kept one, so its exact
                # distance is at least that minus the rounding bound (two float32 roundings of the data, a dot
                # product of length D, two additions): if that exceeds the k-th exact distance, nothing was missed.
                tol = 2 * (dim + 8) * u * (q64.norm(dim=1) + ref_norm) ** 2
                doubtful = (d[:, k - 1] >= best_d[:, -1].to(torch.float64) - tol).nonzero()[:, 0]
                for s in range(0, doubtful.numel(), 64):
                    rows = doubtful[s:s + 64]
                    d[rows], i[rows] = _brute_force(q64[rows], refs, k, integer, memory)
            out_d[qs:qs + q.shape[0]] = d.sqrt().cpu() / (127.5 if integer else 1)
            out_i[qs:qs + q.shape[0]] = i.cpu()
    return out_d, out_i


def _top2(d: np.ndarray, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Columns of the nearest and the nearest OTHER image (another key) per row, by (distance, key, column)."""
    column = np.broadcast_to(np.arange(d.shape[1]), d.shape)
    order = np.lexsort((column, key, d), axis=1)
    sorted_key = np.take_along_axis(key, order, 1)
    second = np.argmax(sorted_key != sorted_key[:, :1], axis=1)
    rows = np.arange(d.shape[0])
    return order[:, 0], order[rows, second]


def reference_neighbours(queries: torch.Tensor, refs: torch.Tensor, mirrored_refs: torch.Tensor | None = None,
                         **kwargs: Any) -> dnnlib.EasyDict:
    """Nearest and second-nearest reference of every query: d1, d2 (float64), i1, i2 (int64), mirrored (bool).

    With `mirrored_refs` (row j = reference j x-flipped, or its features), an image's distance is the smaller
    of its two orientations', and `mirrored` says the nearest matched flipped. kwargs go to nearest_neighbours.
    """
    d, i = (t.numpy() for t in nearest_neighbours(queries, refs, 2, **kwargs))
    flipped = np.zeros(d.shape, dtype=bool)
    if mirrored_refs is not None:
        dm, im = (t.numpy() for t in nearest_neighbours(queries, mirrored_refs, 2, **kwargs))
        d, i, flipped = np.concatenate([d, dm], 1), np.concatenate([i, im], 1), np.concatenate([flipped, ~flipped], 1)
    first, second = _top2(d, i)
    pick = lambda a, col: np.take_along_axis(a, col[:, None], 1)[:, 0]
    return dnnlib.EasyDict(d1=pick(d, first), d2=pick(d, second), i1=pick(i, first), i2=pick(i, second),
                           mirrored=pick(flipped, first))


def union_neighbours(per_reference: Sequence[dnnlib.EasyDict]) -> dnnlib.EasyDict:
    """Nearest and second-nearest image over several reference sets: d1, d2, ref1 (position of the set), i1."""
    d = np.stack([x for nn in per_reference for x in (nn.d1, nn.d2)], 1)
    i = np.stack([x for nn in per_reference for x in (nn.i1, nn.i2)], 1)
    ref = np.repeat(np.arange(len(per_reference)), 2)[None].repeat(d.shape[0], 0)
    first, second = _top2(d, ref * (int(i.max()) + 1) + i)
    pick = lambda a, col: np.take_along_axis(a, col[:, None], 1)[:, 0]
    return dnnlib.EasyDict(d1=pick(d, first), d2=pick(d, second), ref1=pick(ref, first), i1=pick(i, first))


def cosine(d: np.ndarray) -> np.ndarray:
    """Cosine similarity of unit vectors from their L2 distance: |a - b|^2 = 2 - 2 cos."""
    return 1 - d ** 2 / 2


def gu_ratio(d1: np.ndarray, d2: np.ndarray) -> np.ndarray:
    """d1 / d2 (Gu et al. 2023); 0 where d2 = 0 (then d1 = 0 too: an exact copy)."""
    return np.divide(d1, d2, out=np.zeros_like(d1, dtype=np.float64), where=d2 > 0)

#----------------------------------------------------------------------------
# Statistics.

def _summary(x: np.ndarray) -> dict[str, float]:
    return {'min': float(x.min()), 'p05': float(np.quantile(x, 0.05)), 'median': float(np.median(x)),
            'mean': float(x.mean()), 'max': float(x.max())}


def pixel_statistics(nn: dnnlib.EasyDict, heldout: dnnlib.EasyDict | None = None) -> dict[str, Any]:
    """Gu rate (share of d1/d2 < 1/3), exact copies, nearest distances; with held-out neighbours the baseline and
    `share_below_heldout_p05`, the share of samples nearer than the held-out images' 5th percentile."""
    out = {'gu_rate': float(np.mean(gu_ratio(nn.d1, nn.d2) < GU_THRESHOLD)), 'exact_copies': int(np.sum(nn.d1 == 0)),
           'nearest': _summary(nn.d1)}
    if 'mirrored' in nn:
        out['mirrored_nearest'] = int(nn.mirrored.sum())
    if heldout is not None:
        p05 = float(np.quantile(heldout.d1, HELDOUT_QUANTILE))
        out.update(share_below_heldout_p05=float(np.mean(nn.d1 < p05)), heldout_p05=p05, heldout=pixel_statistics(heldout))
    return out


def feature_statistics(sim: np.ndarray, heldout: np.ndarray | None = None) -> dict[str, Any]:
    """Top-1 cosine similarities: summary, share above 0.9 / 0.95 / 0.99; with held-out similarities the baseline and
    `share_above_heldout_p95`, the share of samples more similar than the held-out images' 95th percentile."""
    out = {'similarity': _summary(sim), 'share_above': {str(t): float(np.mean(sim > t)) for t in SIMILARITY_LEVELS}}
    if heldout is not None:
        p95 = float(np.quantile(heldout, FEATURE_QUANTILE))
        out.update(share_above_heldout_p95=float(np.mean(sim > p95)), heldout_p95=p95, heldout=feature_statistics(heldout))
    return out

#----------------------------------------------------------------------------
# Audit of image sets.

def as_images(images: torch.Tensor | Dataset, batch_size: int = 256, num_workers: int = 0) -> torch.Tensor:
    """A uint8 NCHW tensor (CPU) of all images of a dataset (float images rounded as EDM's sampler output), or the tensor itself."""
    if isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise TypeError(f'Expected uint8 NCHW images, got {images.dtype} of shape {list(images.shape)}')
        return images.cpu()
    loader = torch.utils.data.DataLoader(images, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    batches = [x if x.dtype == torch.uint8 else generation.to_uint8(x) for x, _labels in loader]
    return torch.cat(batches)


@torch.no_grad()
def _features(images: torch.Tensor, detector: metrics.Detector, batch_size: int) -> torch.Tensor:
    """Unit-length detector features of uint8 images, float32 on the detector's device."""
    feats = torch.cat([detector(images[s:s + batch_size].to(detector.device)).to(torch.float32)
                       for s in range(0, images.shape[0], batch_size)])
    return torch.nn.functional.normalize(feats, dim=1)


def audit_images(samples: torch.Tensor | Dataset, references: Mapping[str, torch.Tensor | Dataset],
                 heldout: torch.Tensor | Dataset | None = None, *, mirror: bool = False,
                 detector: metrics.Detector | None = None, batch_size: int = 64, num_workers: int = 0,
                 device: torch.device | str | None = None, **nn_kwargs: Any) -> dnnlib.EasyDict:
    """Audit samples against named reference sets (uint8 tensors or datasets), with a held-out set as the baseline.

    Returns EasyDict(report: JSON-able statistics (report['summary'] is flat, for metrics.jsonl), samples,
    references, heldout: uint8 tensors, pixel / features: {'samples'|'heldout': {name: neighbours}, plus
    'union'}), features None without a detector. No files are written. nn_kwargs go to nearest_neighbours.
    """
    device = torch.device(device) if device is not None else distributed.device()
    samples = as_images(samples, num_workers=num_workers)
    refs = {name: as_images(r, num_workers=num_workers) for name, r in references.items()}
    held = None if heldout is None else as_images(heldout, num_workers=num_workers)
    if not refs or 'union' in refs:
        raise UserError(f'Name the reference sets (not "union"), at least one; got {list(refs)}')
    for name, images in [*refs.items(), ('heldout', held)]:
        if images is not None and images.shape[1:] != samples.shape[1:]:
            raise UserError(f'The {name} images have shape {list(images.shape[1:])}, the samples {list(samples.shape[1:])}')
    queries = {'samples': samples} if held is None else {'samples': samples, 'heldout': held}

    spaces = {'pixel': dnnlib.EasyDict({who: dnnlib.EasyDict() for who in queries})}
    for name, images in refs.items():
        images = images.to(device)
        for who, q in queries.items():
            spaces['pixel'][who][name] = reference_neighbours(q, images, images.flip(-1) if mirror else None,
                                                              device=device, **nn_kwargs)
    if detector is not None:
        spaces['features'] = dnnlib.EasyDict({who: dnnlib.EasyDict() for who in queries})
        feats = {who: _features(q, detector, batch_size) for who, q in queries.items()}
        for name, images in refs.items():
            ref_feats = _features(images, detector, batch_size)
            mirrored = _features(images.flip(-1), detector, batch_size) if mirror else None
            for who in queries:
                spaces['features'][who][name] = reference_neighbours(feats[who], ref_feats, mirrored, **nn_kwargs)
    for space in spaces.values():
        for who, per_ref in space.items():
            per_ref['union'] = union_neighbours(list(per_ref.values()))

    def statistics(name: str) -> dict[str, Any]:
        pix = spaces['pixel']
        entry = {'num_images': refs[name].shape[0] if name in refs else sum(r.shape[0] for r in refs.values()),
                 'pixel': pixel_statistics(pix.samples[name], pix.heldout[name] if held is not None else None)}
        if detector is not None:
            feat = spaces['features']
            entry[detector.name] = feature_statistics(cosine(feat.samples[name].d1),
                                                      cosine(feat.heldout[name].d1) if held is not None else None)
        return entry

    report = {'units': UNITS, 'num_samples': samples.shape[0], 'num_heldout': None if held is None else held.shape[0],
              'mirror': mirror, 'features': None if detector is None else detector.name, 'gu_threshold': GU_THRESHOLD,
              'references': {name: statistics(name) for name in refs}, 'union': statistics('union'), 'warnings': []}
    for name, entry in report['references'].items():
        copies = entry['pixel'].get('heldout', {}).get('exact_copies', 0)
        if copies:
            report['warnings'].append(f'{copies} held-out image(s) are exact copies of {name} images: the baseline is not held out')
    union = report['union']['pixel']
    report['summary'] = {'gu_rate': union['gu_rate'], 'exact_copies': union['exact_copies'],
                         'share_below_heldout_p05': union.get('share_below_heldout_p05'), 'heldout_p05': union.get('heldout_p05'),
                         'heldout_gu_rate': union['heldout']['gu_rate'] if held is not None else None}
    if detector is not None:
        report['summary']['share_above_heldout_p95'] = report['union'][detector.name].get('share_above_heldout_p95')
    return dnnlib.EasyDict(report=report, samples=samples, references=refs, heldout=held,
                           pixel=spaces['pixel'], features=spaces.get('features'))


@torch.no_grad()
def generate_samples(net: torch.nn.Module, seeds: Sequence[int], batch_size: int = 64, device: torch.device | str | None = None,
                     sampler_kwargs: dict[str, Any] | None = None, class_idx: int | None = None) -> torch.Tensor:
    """uint8 NCHW images (CPU) for all `seeds`, each rank generating its shard, then summed into place on every rank (collective)."""
    seeds = [int(s) for s in seeds]
    images = torch.zeros([len(seeds), net.img_channels, net.img_resolution, net.img_resolution], dtype=torch.uint8)
    pos = distributed.shard(len(seeds)).start
    progress = dnnlib.util.Progress(len(seeds), 'Generating', enabled=distributed.is_main())
    for batch, x in generation.generate_images(net, seeds, batch_size=batch_size, device=device,
                                               sampler_kwargs=sampler_kwargs, class_idx=class_idx):
        images[pos:pos + len(batch)] = x.cpu()
        pos += len(batch)
        progress.update(len(batch) * distributed.get_world_size())
    return distributed.all_reduce_sum(images)


def audit_network(net: torch.nn.Module, seeds: Sequence[int], references: Mapping[str, torch.Tensor | Dataset],
                  heldout: torch.Tensor | Dataset | None = None, *, batch_size: int = 64, device: torch.device | str | None = None,
                  sampler_kwargs: dict[str, Any] | None = None, class_idx: int | None = None, precision: str = 'fp32',
                  channels_last: bool = False, compile: bool = False, **audit_kwargs: Any) -> dnnlib.EasyDict | None:
    """Generate one image per seed (sharded over ranks, collective), then audit them on rank 0 (audit_images).

    Returns audit_images' result on rank 0 and None on the other ranks. precision, channels_last and compile
    go to perf.prepare_for_inference.
    """
    device = torch.device(device) if device is not None else distributed.device()
    net = perf.prepare_for_inference(net, precision=precision, channels_last=channels_last, compile=compile)
    samples = generate_samples(net, seeds, batch_size=batch_size, device=device, sampler_kwargs=sampler_kwargs,
                               class_idx=class_idx)
    if not distributed.is_main():
        return None
    return audit_images(samples, references, heldout, batch_size=batch_size, device=device, **audit_kwargs)

#----------------------------------------------------------------------------
# Inputs.

def open_inputs(clean: str | None = None, noisy: str | None = None,
                heldout: str | None = None) -> tuple[dict[str, Dataset], Dataset | None, list[str]]:
    """Open the reference sets ('clean', 'originals' of the noisy set) and the held-out set; return them and notes.

    The noisy set's originals are audited when they exist (a note says why not otherwise); noisy data as a
    reference or held-out set, originals that do not match their noisy set, and no reference at all are errors.
    """
    refs, notes = {}, []
    if clean is not None:
        refs['clean'] = open_dataset(clean)
        if refs['clean'].sigma is not None:
            raise UserError(f'--clean={clean} is a noisy set (sigma={refs["clean"].sigma}); give the clean images')
    if noisy is not None:
        noisy_set = open_dataset(noisy)
        if noisy_set.sigma is None:
            raise UserError(f'--noisy={noisy} is not a noisy set: its dataset.json has no "sigma" '
                            '(make noisy sets with dataset_tool.py corrupt)')
        missing = []
        path = originals_path(noisy_set, on_missing=missing.append)
        if missing:
            notes.append(f'{missing[0]}; not audited against them (the originals do not exist)')
        elif path is None:
            notes.append(f'{noisy} names no originals (own noisy data): not audited against them')
        else:
            originals = open_dataset(path)
            if len(originals) != len(noisy_set) or originals.image_shape != noisy_set.image_shape:
                raise UserError(f'The originals {path} named by {noisy} do not match it: {len(originals)} images of '
                                f'{originals.image_shape}, the noisy set has {len(noisy_set)} of {noisy_set.image_shape}')
            refs['originals'] = originals
    for name, ds in refs.items():
        if len(ds) < 2:
            raise UserError(f'The {name} set holds {len(ds)} image; the audit needs at least 2 (a nearest and a second nearest)')
    if not refs:
        raise UserError('Nothing to audit against: give --clean and/or --noisy (a noisy set whose originals exist)'
                        + (f'; {notes[0]}' if notes else ''))
    held = None
    if heldout is not None:
        held = open_dataset(heldout)
        if held.sigma is not None:
            raise UserError(f'--heldout={heldout} is a noisy set (sigma={held.sigma}); give clean held-out images')
    return refs, held, notes


def check_shapes(image_shape: Sequence[int], references: Mapping[str, Dataset], heldout: Dataset | None = None,
                 what: str = 'the samples') -> None:
    """UserError unless every set holds images of `image_shape` [C, H, W]."""
    c, h, _w = image_shape
    for name, ds in [*references.items(), ('heldout', heldout)]:
        if ds is not None and list(ds.image_shape) != list(image_shape):
            raise UserError(f'The {name} set holds {ds.resolution}x{ds.resolution} images with {ds.num_channels} channel(s), '
                            f'{what} are {h}x{h} with {c}: audit images of one resolution')

#----------------------------------------------------------------------------
# Outputs: audit.json, gallery.png, histogram.png.

def closest_rows(result: dnnlib.EasyDict, num: int) -> np.ndarray:
    """Indices of the `num` samples nearest (pixel L2) to any reference image, nearest first."""
    return np.argsort(result.pixel.samples.union.d1, kind='stable')[:num]


def gallery(result: dnnlib.EasyDict, rows: np.ndarray, min_size: int = 32, pad: int = 2) -> np.ndarray:
    """uint8 CHW image: one row per sample index, columns sample | its nearest image in each reference set
    (shown in the orientation it matched), pixels repeated up to `min_size`, white gaps."""
    scale = max(1, math.ceil(min_size / result.samples.shape[2]))
    grid_rows = []
    for s in rows:
        tiles = [result.samples[s]]
        for name in result.references:
            nn = result.pixel.samples[name]
            image = result.references[name][nn.i1[s]]
            tiles.append(image.flip(-1) if nn.mirrored[s] else image)
        grid_rows.append(torch.stack(tiles).repeat_interleave(scale, 2).repeat_interleave(scale, 3).numpy())
    return tile(grid_rows, pad=pad)


def save_histogram(path: str, result: dnnlib.EasyDict) -> None:
    """histogram.png: per reference set, the samples' nearest distances against the held-out images' (Agg canvas)."""
    from matplotlib.figure import Figure
    names = list(result.references)
    fig = Figure(figsize=(4.5 * len(names), 3.5), layout='constrained')
    for ax, name in zip(fig.subplots(1, len(names), squeeze=False)[0], names):
        d = result.pixel.samples[name].d1
        held = result.pixel.heldout[name].d1 if 'heldout' in result.pixel else None
        bins = np.histogram_bin_edges(d if held is None else np.concatenate([d, held]), bins=40)
        ax.hist(d, bins=bins, density=True, alpha=0.6, label=f'samples ({d.size})')
        if held is not None:
            ax.hist(held, bins=bins, density=True, alpha=0.6, label=f'held-out ({held.size})')
            ax.axvline(np.quantile(held, HELDOUT_QUANTILE), color='k', linestyle='--', linewidth=1, label='held-out 5th pct')
        ax.set_xlabel(f'distance to nearest {name} image ([-1,1] units)')
        ax.set_ylabel('density')
        ax.legend(fontsize='small')
        ax.grid(alpha=0.3)
    with dnnlib.util.atomic_write(path) as f:
        fig.savefig(f, format='png', dpi=100)


def result_paths(outdir: str) -> dict[str, str]:
    """Where write_results puts audit.json, gallery.png and histogram.png (keys json, gallery, histogram)."""
    return {key: os.path.join(outdir, name) for key, name in
            [('json', 'audit.json'), ('gallery', 'gallery.png'), ('histogram', 'histogram.png')]}


def write_results(outdir: str, result: dnnlib.EasyDict, gallery_rows: int = 16,
                  sample_names: Sequence[Any] | None = None) -> dict[str, str]:
    """Write audit.json (the report and the gallery's rows), gallery.png and histogram.png into `outdir`; return their paths."""
    paths = result_paths(outdir)
    rows = closest_rows(result, gallery_rows)
    names = list(range(result.samples.shape[0])) if sample_names is None else list(sample_names)
    listed = [{'sample': names[s], 'nearest': {name: {'index': int(nn.i1[s]), 'distance': float(nn.d1[s]),
                                                      'mirrored': bool(nn.mirrored[s])}
                                               for name, nn in result.pixel.samples.items() if name != 'union'}}
              for s in rows]
    os.makedirs(outdir, exist_ok=True)
    with dnnlib.util.atomic_write(paths['json'], 'w') as f:
        json.dump({**result.report, 'gallery': listed}, f, indent=2, default=json_default)
    save_png(paths['gallery'], gallery(result, rows))
    save_histogram(paths['histogram'], result)
    return paths


def format_report(report: dict) -> str:
    """One line per reference set (and their union): Gu rate, exact copies, share below the held-out 5th percentile."""
    def pct(x: float | None) -> str:
        return '-' if x is None else f'{100 * x:.2f}%'
    lines = [f'{"reference":<10} {"images":>7} {"Gu rate":>8} {"held-out":>8} {"copies":>6} {"<p05":>7} {"median d1":>9}']
    for name, entry in [*report['references'].items(), ('union', report['union'])]:
        p = entry['pixel']
        lines.append(f'{name:<10} {entry["num_images"]:>7} {pct(p["gu_rate"]):>8} {pct(p.get("heldout", {}).get("gu_rate")):>8} '
                     f'{p["exact_copies"]:>6} {pct(p.get("share_below_heldout_p05")):>7} {p["nearest"]["median"]:>9.4f}')
    return '\n'.join(lines)
