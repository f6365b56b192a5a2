"""Frechet Inception Distance, EDM-comparable: reference statistics, FID of image sets, FID of a network."""

import click
import numpy as np

from dnnlib.cli import DETECTOR_HELP, MAX_SEEDS, NETWORK_HELP, check_writable_file, fast_path_options, sampler_options
from torch_utils import distributed, perf
from training import checkpoint, metrics

#----------------------------------------------------------------------------

@click.group(context_settings=dict(help_option_names=['-h', '--help']))
def main() -> None:
    """FID as EDM computes it: Inception-v3 pool features of uint8 images, float64 statistics over all ranks.

    \b
    # Reference statistics of a dataset (all of its images)
    python fid.py ref --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-32x32.npz
    \b
    # FID of 50,000 generated PNGs (generate.py --seeds=0-49999 --subdirs)
    torchrun --standalone --nproc_per_node=8 fid.py calc --images=fid-tmp --ref=fid-refs/cifar10-32x32.npz
    \b
    # EDM's protocol: generate 3 x 50,000 images in memory, report each FID, the minimum and the mean
    torchrun --standalone --nproc_per_node=8 fid.py gen --network=run/network-snapshot-200000.pt \\
        --ref=https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz --repeats=3 --steps=18
    \b
    # Once, with internet: our code-free Inception against EDM's pickle (runs its code) on 1,000 images
    python fid.py check-inception --data=datasets/cifar10-32x32.zip
    """

#----------------------------------------------------------------------------

@main.command()
@click.option('--data', 'data_path',  help='Dataset: folder or zip of PNGs, or an array dataset', metavar='PATH', type=str, required=True)
@click.option('--dest',               help='Output .npz (mu, sigma, detector, feature_dim, num_images)', metavar='NPZ', type=str, required=True)
@click.option('--detector',           help=DETECTOR_HELP, metavar='NAME|PATH', type=str, default='inception', show_default=True)
@click.option('--batch', 'batch_size', help='Images per batch and process', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--workers',            help='Data loading processes per rank', metavar='INT', type=click.IntRange(min=0), default=2, show_default=True)
def ref(data_path: str, dest: str, detector: str, batch_size: int, workers: int) -> None:
    """Reference statistics of every image in a dataset, for 'calc' and 'gen'."""
    distributed.init()
    check_writable_file(dest, '--dest')
    distributed.print0(f'Computing {detector} statistics of {data_path} ...')
    stats = metrics.make_ref(data_path, dest, detector=detector, batch_size=batch_size, device=distributed.device(),
                             num_workers=workers)
    distributed.print0(f'Saved statistics of {stats.num} images ({stats.feature_dim}-d features) to {dest}')
    distributed.cleanup()


@main.command()
@click.option('--images', 'image_path', help='Images: folder or zip of PNGs, or an array dataset', metavar='PATH', type=str, required=True)
@click.option('--ref', 'ref_path',      help='Reference statistics from fid.py ref, or EDM\'s published .npz', metavar='NPZ|URL', type=str, required=True)
@click.option('--num',                  help='Images to use; fewer is an error, more are subsampled with --seed', metavar='INT', type=click.IntRange(min=2), default=50000, show_default=True)
@click.option('--seed',                 help='Random seed for choosing --num of the images', metavar='INT', type=int, default=0, show_default=True)
@click.option('--detector',             help=DETECTOR_HELP + '  [default: the reference file\'s, else inception]', metavar='NAME|PATH', type=str, default=None)
@click.option('--batch', 'batch_size',  help='Images per batch and process', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--workers',              help='Data loading processes per rank', metavar='INT', type=click.IntRange(min=0), default=2, show_default=True)
def calc(image_path: str, ref_path: str, num: int, seed: int, detector: str | None, batch_size: int, workers: int) -> None:
    """FID of a set of images against reference statistics; prints the FID as the last line."""
    distributed.init()
    distributed.print0(f'Computing the FID of {num} images from {image_path} against {ref_path} ...')
    fid = metrics.calc_fid(image_path, ref_path, detector=detector, num=num, seed=seed, batch_size=batch_size,
                           device=distributed.device(), num_workers=workers)
    distributed.print0(f'{fid:g}')
    distributed.cleanup()


@main.command()
@click.option('--network', 'network_path', help=NETWORK_HELP, metavar='PATH|URL', type=str, required=True)
@click.option('--ref', 'ref_path',         help='Reference statistics from fid.py ref, or EDM\'s published .npz', metavar='NPZ|URL', type=str, required=True)
@click.option('--num',                     help='Images per seed set', metavar='INT', type=click.IntRange(min=2, max=MAX_SEEDS), default=50000, show_default=True)
@click.option('--repeats',                 help='Seed sets: set r uses seeds [seed + r*num, seed + (r+1)*num)', metavar='INT', type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--seed',                    help='First seed', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--class', 'class_idx',      help='Class label for every image  [default: random]', metavar='INT', type=click.IntRange(min=0), default=None)
@click.option('--detector',                help=DETECTOR_HELP + '  [default: the reference file\'s, else inception]', metavar='NAME|PATH', type=str, default=None)
@click.option('--batch', 'batch_size',     help='Images per batch and process (does not change the images)', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@fast_path_options
@sampler_options
def gen(network_path: str, ref_path: str, num: int, repeats: int, seed: int, class_idx: int | None, detector: str | None,
        batch_size: int, precision: str, channels_last: bool, compile: bool, **sampler_kwargs) -> None:
    """FID of a network over --repeats seed sets, generated in memory (no PNGs); EDM reports the minimum of 3."""
    distributed.init()
    device = distributed.device()
    net = checkpoint.load_network(network_path, device=device)
    fids = metrics.calc_network_fids(net, ref_path, num=num, repeats=repeats, seed=seed, detector=detector,
                                     batch_size=batch_size, device=device, sampler_kwargs=sampler_kwargs, class_idx=class_idx,
                                     precision=precision, channels_last=channels_last, compile=compile)
    precision = perf.resolve_precision(precision, device)
    distributed.print0(f'FID min {min(fids):g} mean {np.mean(fids):g} over {repeats} seed set(s) of {num} images ({precision} sampling)')
    distributed.cleanup()


@main.command('convert-inception')
@click.option('--src',  help="EDM's Inception-v3 pickle (its code runs: only a file you trust)", metavar='PKL|URL', type=str, default=metrics.INCEPTION_URL, show_default=True)
@click.option('--dest', help='Output state dict, for --detector=PTH', metavar='PTH', type=str, required=True)
def convert_inception(src: str, dest: str) -> None:
    """Convert EDM's Inception pickle once into a plain state dict, after checking both give the same features."""
    check_writable_file(dest, '--dest')
    difference = metrics.convert_inception_pickle(src, dest, device=distributed.device())
    click.echo(f'Saved {dest}: features within {difference:.3g} of the largest feature of {src} on random images')


@main.command('check-inception')
@click.option('--data', 'data_path',   help='Images: folder or zip of PNGs, or an array dataset', metavar='PATH', type=str, required=True)
@click.option('--num',                 help='Images to compare on (drawn with --seed)', metavar='INT', type=click.IntRange(min=4), default=1000, show_default=True)
@click.option('--seed',                help='Random seed for choosing --num of the images', metavar='INT', type=int, default=0, show_default=True)
@click.option('--batch', 'batch_size', help='Images per batch', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
def check_inception(data_path: str, num: int, seed: int, batch_size: int) -> None:
    """Our Inception against EDM's pickle (downloads both; runs the pickle's code) on the same images, one process."""
    res = metrics.compare_detectors(data_path, ('inception', 'inception-pkl'), num=num, seed=seed, batch_size=batch_size,
                                    device=distributed.device())
    ours, pkl = res['fids']
    click.echo(f'{res["num"]} images: largest feature difference {res["max_diff"]:.3g} (largest feature {res["max_feature"]:.3g})')
    click.echo(f'FID first vs second half: inception {ours:.6g}, inception-pkl {pkl:.6g}, difference {ours - pkl:.3g}')


if __name__ == '__main__':
    main()
