"""Bench: FID feature throughput (uint8 images -> detector features -> float64 statistics), images/s."""

import functools

import click
import torch

import common
from torch_utils import perf
from training import metrics

#----------------------------------------------------------------------------

def make_fid_step(detector: metrics.Detector, device: torch.device, batch: int, resolution: int, v: common.Variant):
    """One batch as compute_feature_stats handles it: host uint8 images to the device, features, statistics."""
    n = batch * v.batch_mult
    images = torch.randint(0, 256, [n, 3, resolution, resolution], dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    if v.pin and device.type == 'cuda':
        images = images.pin_memory()
    stats = metrics.FeatureStats(detector.feature_dim, device)

    def run():
        x = images.to(device, non_blocking=v.pin)
        with torch.no_grad(), perf.autocast(device, v.precision):
            stats.append(detector(perf.to_channels_last(x, v.channels_last)))
    return run


def bench_fid(detector_name: str, device: torch.device, batch: int, resolution: int, iters: int, warmup: int,
              variants: list[common.Variant], stat: str = 'median') -> list[dict]:
    """Rows of images/s per variant; one detector shared by all variants."""
    detector = metrics.load_detector(detector_name, device, image_shape=[3, resolution, resolution])
    builders = [(v, functools.partial(make_fid_step, detector, device, batch, resolution, v)) for v in variants]
    rows = common.measure(builders, iters, warmup, device, stat)
    common.add_throughput(rows, variants, batch, device)
    return rows

#----------------------------------------------------------------------------

@click.command(context_settings=dict(help_option_names=['-h', '--help']))
@click.option('--detector', type=str, default='inception', show_default=True, help="'inception' (weights downloaded once into the cache; no code runs), 'inception-pkl' (EDM's pickle), 'dinov2', 'pixels', or a detector pickle path. Pickles run code: trusted files only.")
@click.option('--resolution', type=click.IntRange(min=8), default=32, show_default=True, help='Image resolution fed to the detector (it resizes internally).')
@click.option('--num-images', type=click.IntRange(min=1), default=50000, show_default=True, help='Images for the projected time (50,000 = one FID).')
@common.bench_options(batch=64, iters=5, warmup=1, variants='fp32,x4,pin+x4', allowed='bf16,cl,xN,pin')
def main(detector, resolution, num_images, device, batch, iters, warmup, stat, variants, threads, json_path):
    """FID feature throughput: detector forward and float64 feature statistics on random uint8 images.

    Reported FIDs must use fp32 features (the bf16 token is for measurement only: it changes the metric).
    On an H100: --device=cuda --batch=256 --variants=fp32,x2,pin+x2,pin+x4.
    """
    dev = common.setup_device(device, threads)
    rows = bench_fid(detector, dev, batch, resolution, iters, warmup, common.parse_variants(variants, 'bf16,cl,xN,pin'), stat)
    for row in rows:
        row['projected_sec'] = num_images / row['images_per_sec']
    columns = [('variant', 'variant', ''), ('precision', 'prec', ''), ('batch', 'batch', 'd'), ('sec', f's/batch ({stat})', '.4f'),
               ('images_per_sec', 'img/s', ',.1f'), ('ratio', 'x fp32', '.2f'), ('projected_sec', f's/{num_images} img', ',.0f'),
               ('peak_mib', 'peak MiB', ',.0f')]
    common.report('bench_fid', dev, dict(detector=detector, resolution=resolution, batch=batch, iters=iters, warmup=warmup, stat=stat,
                                         num_images=num_images), rows, columns, json_path,
                  notes=[f'detector {detector}; images {resolution}x{resolution} uint8 from host memory; statistics in float64 on the device.'])


if __name__ == '__main__':
    main()
