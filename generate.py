"""Generate images from a trained network with EDM's sampler, one PNG per seed, sharded over ranks."""

import os

import click
import torch

from dnnlib.cli import (MAX_SEEDS, NETWORK_HELP, check_writable_dir, check_writable_file, fast_path_options, grid_option, parse_seeds,
                        sampler_options)
from torch_utils import distributed, perf
from training import checkpoint, generation

#----------------------------------------------------------------------------

@click.command(context_settings=dict(help_option_names=['-h', '--help']))
@click.option('--network', 'network_path', help=NETWORK_HELP, metavar='PATH|URL',                  type=str, required=True)
@click.option('--outdir',                  help='Where to write the PNGs (000123.png per seed)', metavar='DIR', type=str, required=True)
@click.option('--seeds',                   help=f'Seeds, one image each (e.g. 0-49999 or 1,5,10-20; at most {MAX_SEEDS:,})', metavar='LIST', type=str, default='0-63', show_default=True)
@click.option('--subdirs',                 help='Put every 1000 seeds in a subdirectory 000000/, 001000/, ...', is_flag=True)
@click.option('--class', 'class_idx',      help='Class label for every image  [default: random]', metavar='INT', type=click.IntRange(min=0), default=None)
@click.option('--batch', 'batch_size',     help='Images per batch and process (does not change the images)', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--zip', 'make_zip',         help='Also pack the PNGs into OUTDIR.zip', is_flag=True)
@grid_option(0, 'Also write a grid of the first N images to OUTDIR-grid.png')
@fast_path_options
@sampler_options
def main(network_path: str, outdir: str, seeds: str, subdirs: bool, class_idx: int | None, batch_size: int,
         make_zip: bool, grid_num: int, precision: str, channels_last: bool, compile: bool, **sampler_kwargs) -> None:
    """Generate images with EDM's Heun sampler (optionally with stochastic churn).

    Image i depends only on seed i: the same seeds give the same images with any --batch and any
    number of processes.

    \b
    python generate.py --network=run/network-snapshot-200000.pt --outdir=out --seeds=0-63 --grid
    torchrun --standalone --nproc_per_node=8 generate.py --network=net.pkl --outdir=fid-tmp --seeds=0-49999 --subdirs
    """
    distributed.init()
    seed_list = parse_seeds(seeds)
    check_writable_dir(outdir, '--outdir')
    base = os.path.normpath(outdir)
    if make_zip:
        check_writable_file(base + '.zip', '--outdir', what=f'{base}.zip (--zip)')
    if grid_num:
        check_writable_file(base + '-grid.png', '--outdir', what=f'{base}-grid.png (--grid)')
    device = distributed.device()
    distributed.print0(f'Loading network from {network_path} ...')
    net = checkpoint.load_network(network_path, device=device)
    distributed.print0(f'Generating {len(seed_list)} images to {outdir} on {distributed.get_world_size()} process(es), '
                       f'precision {perf.resolve_precision(precision, device)} ...')
    with torch.no_grad():
        generation.generate_to_dir(net, outdir, seed_list, batch_size=batch_size, device=device, sampler_kwargs=sampler_kwargs,
                                   class_idx=class_idx, subdirs=subdirs, make_zip=make_zip, grid_num=grid_num,
                                   precision=precision, channels_last=channels_last, compile=compile)
    distributed.print0('Done.')
    distributed.cleanup()


if __name__ == '__main__':
    main()
