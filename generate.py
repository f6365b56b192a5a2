"""Generate images from a trained network with EDM's sampler, one PNG per seed, sharded over ranks."""

import click
import torch

import dnnlib
from torch_utils import distributed, perf
from training import checkpoint, generation

NETWORK_HELP = ('Network: our .pt snapshot/training state, or an official EDM .pkl (a .pkl runs code from the file: '
                'only load files you trust)')

#----------------------------------------------------------------------------

def sampler_options(f):
    """The sampler's click options, shared with fid.py gen; they fill sampler_kwargs."""
    options = [
        click.option('--steps', 'num_steps', help='Number of sampling steps N (2N-1 network calls)', metavar='INT', type=click.IntRange(min=2), default=18, show_default=True),
        click.option('--sigma_min',          help='Lowest noise level, in [-1,1] pixel units (clipped to the network\'s)', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=0.002, show_default=True),
        click.option('--sigma_max',          help='Highest noise level, in [-1,1] pixel units (clipped to the network\'s)', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=80, show_default=True),
        click.option('--rho',                help='Time step exponent', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=7, show_default=True),
        click.option('--S_churn', 'S_churn', help='Stochasticity strength (0 = deterministic)', metavar='FLOAT', type=click.FloatRange(min=0), default=0, show_default=True),
        click.option('--S_min', 'S_min',     help='Churn only at sigma >= S_min ([-1,1] units)', metavar='FLOAT', type=click.FloatRange(min=0), default=0, show_default=True),
        click.option('--S_max', 'S_max',     help='Churn only at sigma <= S_max ([-1,1] units)', metavar='FLOAT', type=click.FloatRange(min=0), default=float('inf'), show_default=True),
        click.option('--S_noise', 'S_noise', help='Churn noise inflation', metavar='FLOAT', type=float, default=1, show_default=True),
        click.option('--solver',             help='ODE solver', type=click.Choice(list(generation.SOLVERS)), default='heun', show_default=True),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def fast_path_options(f):
    """The network's --precision, --channels-last and --compile options, shared with fid.py gen."""
    options = [
        click.option('--precision',     help='Arithmetic of the network: fp32 = exact reference, images and FIDs comparable with EDM\'s; '
                                             'auto = bf16 where it is native (CUDA Ampere or newer; CPUs with AMX or avx512_bf16), else fp32; '
                                             'bf16 = bf16 autocast (faster; images differ by a fraction of a grey level on average). FID features are always fp32',
                     type=click.Choice(list(perf.PRECISIONS)), default='fp32', show_default=True),
        click.option('--channels-last', help='Network weights and inputs in channels_last (NHWC) memory format', metavar='BOOL', type=bool, default=False, show_default=True),
        click.option('--compile',       help='Wrap the network in torch.compile (slow first batches)', metavar='BOOL', type=bool, default=False, show_default=True),
    ]
    for option in reversed(options):
        f = option(f)
    return f

#----------------------------------------------------------------------------

@click.command(context_settings=dict(help_option_names=['-h', '--help']))
@click.option('--network', 'network_path', help=NETWORK_HELP, metavar='PATH|URL',                  type=str, required=True)
@click.option('--outdir',                  help='Where to write the PNGs (000123.png per seed)', metavar='DIR', type=str, required=True)
@click.option('--seeds',                   help='Seeds, one image each (e.g. 0-49999 or 1,5,10-20)', metavar='LIST', type=str, default='0-63', show_default=True)
@click.option('--subdirs',                 help='Put every 1000 seeds in a subdirectory 000000/, 001000/, ...', is_flag=True)
@click.option('--class', 'class_idx',      help='Class label for every image  [default: random]', metavar='INT', type=click.IntRange(min=0), default=None)
@click.option('--batch', 'batch_size',     help='Images per batch and process (does not change the images)', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--zip', 'make_zip',         help='Also pack the PNGs into OUTDIR.zip', is_flag=True)
@click.option('--grid', 'make_grid',       help='Also write a grid of the first 64 images to OUTDIR-grid.png', is_flag=True)
@fast_path_options
@sampler_options
def main(network_path: str, outdir: str, seeds: str, subdirs: bool, class_idx: int | None, batch_size: int,
         make_zip: bool, make_grid: bool, precision: str, channels_last: bool, compile: bool, **sampler_kwargs) -> None:
    """Generate images with EDM's Heun sampler (optionally with stochastic churn).

    Image i depends only on seed i: the same seeds give the same images with any --batch and any
    number of processes.

    \b
    python generate.py --network=run/network-snapshot-200000.pt --outdir=out --seeds=0-63 --grid
    torchrun --standalone --nproc_per_node=8 generate.py --network=net.pkl --outdir=fid-tmp --seeds=0-49999 --subdirs
    """
    distributed.init()
    seed_list = dnnlib.util.parse_int_list(seeds)
    if not seed_list:
        raise dnnlib.UserError('--seeds is empty')
    device = distributed.device()
    distributed.print0(f'Loading network from {network_path} ...')
    net = checkpoint.load_network(network_path, device=device)
    distributed.print0(f'Generating {len(seed_list)} images to {outdir} on {distributed.get_world_size()} process(es), '
                       f'precision {perf.resolve_precision(precision, device)} ...')
    with torch.no_grad():
        generation.generate_to_dir(net, outdir, seed_list, batch_size=batch_size, device=device, sampler_kwargs=sampler_kwargs,
                                   class_idx=class_idx, subdirs=subdirs, make_zip=make_zip, make_grid=make_grid,
                                   precision=precision, channels_last=channels_last, compile=compile)
    distributed.print0('Done.')
    distributed.cleanup()


if __name__ == '__main__':
    main()
