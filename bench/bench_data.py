"""Bench: data loading throughput (images/s from dataset files to model-space tensors on the device)."""

import io
import os
import statistics
import tempfile
import zipfile

import click
import numpy as np
import PIL.Image
import torch

import common
from training.dataset import ArrayDatasetWriter, open_dataset
from training.images import to_model_space

# Synthetic stand-ins of the real sets, by (resolution, storage): EDM zips for clean data, float32
# arrays for the noisy set and each E_k in SFBD.
PRESETS = {
    'cifar10-zip':       (32, 'zip'),
    'cifar10-png':       (32, 'png'),
    'cifar10-array-u8':  (32, 'array-u8'),
    'cifar10-noisy-f32': (32, 'array-f32'),
    'celeba64-zip':      (64, 'zip'),
}

#----------------------------------------------------------------------------

def make_synthetic(root: str, preset: str, num_images: int) -> str:
    """Write `num_images` random images in the preset's storage format under `root`; return the path."""
    resolution, kind = PRESETS[preset]
    rnd = np.random.RandomState(0)
    # Smooth random images compress like photos, unlike white noise; PNG decoding cost is realistic.
    base = rnd.randint(0, 256, size=[num_images, resolution // 4, resolution // 4, 3], dtype=np.uint8)
    images = base.repeat(4, axis=1).repeat(4, axis=2)
    images = np.clip(images.astype(np.int16) + rnd.randint(-8, 9, size=images.shape), 0, 255).astype(np.uint8)
    if kind.startswith('array'):
        dtype = np.uint8 if kind == 'array-u8' else np.float32
        path = os.path.join(root, preset)
        with ArrayDatasetWriter(path, num_images, [3, resolution, resolution], dtype, {'kind': 'array', 'source': 'synthetic'}) as writer:
            chw = images.transpose(0, 3, 1, 2)
            writer.write(0, chw if dtype == np.uint8 else chw.astype(np.float32) / 127.5 - 1 + 0.2 * rnd.randn(*chw.shape).astype(np.float32))
        return path
    names = [f'{i // 1000:05d}/img{i:08d}.png' for i in range(num_images)]
    if kind == 'png':
        path = os.path.join(root, preset)
        for name, image in zip(names, images):
            os.makedirs(os.path.dirname(os.path.join(path, name)), exist_ok=True)
            PIL.Image.fromarray(image).save(os.path.join(path, name))
        return path
    path = os.path.join(root, preset + '.zip')
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_STORED) as zf:
        for name, image in zip(names, images):
            buf = io.BytesIO()
            PIL.Image.fromarray(image).save(buf, format='png')
            zf.writestr(name, buf.getvalue())
    return path


def make_loader(dataset: torch.utils.data.Dataset, batch: int, workers: int, pin: bool) -> torch.utils.data.DataLoader:
    """An endless shuffled loader, as a training loop uses it."""
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=1 << 31, generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers, pin_memory=pin,
                                       prefetch_factor=2 if workers else None, persistent_workers=workers > 0)


def bench_data(path: str, device: torch.device, batch: int, iters: int, warmup: int, variants: list[common.Variant]) -> list[dict]:
    """Time next(batch) -> device -> model space for each variant; rows of images/s."""
    rows = []
    for v in variants:
        dataset = open_dataset(path, xflip=True)
        if hasattr(dataset, 'close'):
            # Forked workers would otherwise share the zip handle the constructor opened (racing seeks).
            dataset.close()
        it = iter(make_loader(dataset, batch, v.workers, v.pin and device.type == 'cuda'))

        def step():
            images, _labels = next(it)
            return to_model_space(images.to(device, non_blocking=v.pin))

        # Sequential, not interleaved: idle workers would prefill their queues while others are timed.
        times = common.time_steps(step, iters, warmup + v.workers, device)
        # Throughput over the whole run, since workers make single-batch times bursty.
        rows.append(dict(variant=v.name, workers=v.workers, pin=v.pin, batch=batch, sec_median=statistics.median(times),
                         images_per_sec=batch * len(times) / sum(times)))
        del it
    common.add_ratios(rows, 'images_per_sec')
    return rows

#----------------------------------------------------------------------------

@click.command(context_settings=dict(help_option_names=['-h', '--help']))
@click.option('--preset', type=click.Choice(sorted(PRESETS)), default='cifar10-zip', show_default=True, help='Synthetic data set to build and read (resolution and storage).')
@click.option('--data', type=click.Path(exists=True), default=None, help='Read this real data set instead of a synthetic one.')
@click.option('--num-images', type=click.IntRange(min=1), default=4096, show_default=True, help='Images in the synthetic set.')
@click.option('--target', type=float, default=3000, show_default=True, help='Training rate (images/s) the loader must beat; 3000 = the H100 target.')
@common.bench_options(batch=512, iters=20, warmup=2, variants='w0,w1,w2,w2+pin', allowed='wN,pin')
def main(preset, data, num_images, target, device, batch, iters, warmup, stat, variants, threads, json_path):
    """Data loading throughput: batches from dataset files to [-1, 1] float tensors on the device.

    The baseline is w0 (loading in the training process, pageable memory). A loader is never the
    bottleneck when its rate beats the training rate (--target) with the workers it gets. Rates are
    over all timed batches (--stat does not apply: worker output is bursty).
    """
    dev = common.setup_device(device, threads)
    parsed = common.parse_variants(variants, 'wN,pin', baseline='w0')
    with tempfile.TemporaryDirectory() as tmp:
        path = data or make_synthetic(tmp, preset, num_images)
        rows = bench_data(path, dev, batch, iters, warmup, parsed)
    for row in rows:
        row['vs_target'] = row['images_per_sec'] / target
    columns = [('variant', 'variant', ''), ('workers', 'workers', 'd'), ('batch', 'batch', 'd'), ('sec_median', 's/batch', '.4f'),
               ('images_per_sec', 'img/s', ',.0f'), ('ratio', 'x base', '.2f'), ('vs_target', f'x {target:.0f} img/s', '.2f')]
    common.report('bench_data', dev, dict(preset=preset, data=data, num_images=num_images, batch=batch, iters=iters, warmup=warmup),
                  rows, columns, json_path, notes=[f'data: {data or preset}; x-flip on; shuffled with replacement.'])


if __name__ == '__main__':
    main()
