"""Memorization audit of a network or a set of samples against the clean set and the noisy set's originals."""

import click
import torch

import dnnlib
from dnnlib.cli import (MAX_SEEDS, NETWORK_HELP, check_writable_dir, check_writable_file, fast_path_options, parse_seeds,
                        sampler_options)
from torch_utils import distributed
from training import audit, checkpoint, metrics
from training.dataset import open_dataset

DEFAULT_SEEDS = '0-9999'

#----------------------------------------------------------------------------

def _load_detector(features: str, device: torch.device) -> metrics.Detector | None:
    """The feature detector on rank 0 (None elsewhere, or for 'none'); a failure is raised on every rank."""
    if features == 'none':
        return None
    detector, error = None, None
    if distributed.is_main():
        try:
            detector = metrics.load_detector(features, device)
        except dnnlib.UserError as e:
            error = e.message
    error = distributed.broadcast_object(error)
    if error is not None:
        raise dnnlib.UserError(error)
    return detector


@click.command(context_settings=dict(help_option_names=['-h', '--help']))
@click.option('--network', 'network_path', help=NETWORK_HELP, metavar='PATH|URL', type=str, default=None)
@click.option('--samples', 'samples_path', help='Or: samples to audit, a folder or zip of PNGs', metavar='PATH', type=str, default=None)
@click.option('--seeds',                   help=f'With --network: seeds, one sample each (e.g. 0-9999; at most {MAX_SEEDS:,})  [default: {DEFAULT_SEEDS}]', metavar='LIST', type=str, default=None)
@click.option('--clean',                   help='Reference: the clean training set (folder or zip)', metavar='PATH', type=str, default=None)
@click.option('--noisy',                   help='Reference: the ORIGINALS of this noisy set (named by its dataset.json; a relative path is relative to the noisy set\'s directory)', metavar='DIR', type=str, default=None)
@click.option('--heldout',                 help='Baseline: held-out clean images of the same distribution, never trained on', metavar='PATH', type=str, default=None)
@click.option('--outdir',                  help='Where to write audit.json, gallery.png, histogram.png', metavar='DIR', type=str, required=True)
@click.option('--mirror',                  help='Also compare against x-flipped references (catches mirrored copies)', is_flag=True)
@click.option('--features',                help='Also audit in a feature space: dinov2 = cosine similarity of DINOv2 ViT-L/14 features (torch.hub; needs internet once)', type=click.Choice(audit.FEATURES), default='none', show_default=True)
@click.option('--gallery', 'gallery_rows', help='Rows of gallery.png: the samples nearest to any reference image', metavar='INT', type=click.IntRange(min=1), default=16, show_default=True)
@click.option('--batch', 'batch_size',     help='Images per batch and process (generation, features)', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--workers',                 help='Data loading processes', metavar='INT', type=click.IntRange(min=0), default=2, show_default=True)
@fast_path_options
@sampler_options
def main(network_path: str | None, samples_path: str | None, seeds: str | None, clean: str | None, noisy: str | None,
         heldout: str | None, outdir: str, mirror: bool, features: str, gallery_rows: int, batch_size: int, workers: int,
         precision: str, channels_last: bool, compile: bool, **sampler_kwargs) -> None:
    """Memorization audit: for every sample, its nearest and second-nearest image in each reference set.

    Distances are L2 norms in [-1,1] pixel units (uint8 u -> u/127.5 - 1), exact. Reported per reference
    set and for their union: the Gu et al. 2023 rate (share of samples with d1/d2 < 1/3), exact copies,
    and, against --heldout, the share of samples nearer to a reference image than the 5th percentile of
    the held-out images' own nearest distances (about 5% when nothing is memorized). Pixel distances
    are not shift-invariant: a translated copy is not caught; --mirror catches mirrored ones.

    \b
    python audit.py --network=run/network-snapshot.pt --seeds=0-9999 --clean=datasets/cifar10-clean-4pct.zip \\
        --noisy=datasets/cifar10-noisy-4pct-0.2 --heldout=datasets/cifar10-test.zip --outdir=audit-out
    python audit.py --samples=out/ --clean=datasets/clean.zip --heldout=datasets/test.zip --outdir=audit-out --mirror
    """
    distributed.init()
    if (network_path is None) == (samples_path is None):
        raise dnnlib.UserError('Give either --network (to generate samples) or --samples (a folder or zip of PNGs)')
    if samples_path is not None and seeds is not None:
        raise dnnlib.UserError('--seeds applies to --network only; --samples audits every image it holds')
    if network_path is not None and seeds is None:
        seeds = DEFAULT_SEEDS
    seed_list = parse_seeds(seeds) if network_path is not None else None
    check_writable_dir(outdir, '--outdir')
    for path in audit.result_paths(outdir).values():
        check_writable_file(path, '--outdir', what=path)
    references, heldout_set, notes = audit.open_inputs(clean, noisy, heldout)
    for note in notes:
        distributed.print0(note)
    device = distributed.device()
    if samples_path is not None:
        samples = open_dataset(samples_path)
        if samples.sigma is not None:
            raise dnnlib.UserError(f'--samples={samples_path} is a noisy set (sigma={samples.sigma}); give generated images')
        audit.check_shapes(samples.image_shape, references, heldout_set)
        names = getattr(samples, 'image_names', None)
    else:
        distributed.print0(f'Loading network from {network_path} ...')
        net = checkpoint.load_network(network_path, device=device)
        audit.check_shapes([net.img_channels, net.img_resolution, net.img_resolution], references, heldout_set, what='the network\'s images')
        names = seed_list
    detector = _load_detector(features, device)
    audit_kwargs = dict(mirror=mirror, detector=detector, batch_size=batch_size, num_workers=workers, device=device)
    if samples_path is not None:
        result = audit.audit_images(samples, references, heldout_set, **audit_kwargs) if distributed.is_main() else None
    else:
        distributed.print0(f'Generating {len(seed_list)} samples on {distributed.get_world_size()} process(es) ...')
        result = audit.audit_network(net, seed_list, references, heldout_set, sampler_kwargs=sampler_kwargs, precision=precision,
                                     channels_last=channels_last, compile=compile, **audit_kwargs)
    if distributed.is_main():
        result.report['inputs'] = dict(network=network_path, samples=samples_path, seeds=seeds,
                                       clean=clean, noisy=noisy, heldout=heldout, sampler=None if samples_path else sampler_kwargs,
                                       precision=None if samples_path else precision)
        paths = audit.write_results(outdir, result, gallery_rows, names)
        print(audit.format_report(result.report))
        for warning in result.report['warnings']:
            print(f'Warning: {warning}')
        s = result.report['summary']
        if s['share_below_heldout_p05'] is None:
            print(f'Gu rate {100 * s["gu_rate"]:.2f}%; no --heldout, so no baseline')
        else:
            print(f'{100 * s["share_below_heldout_p05"]:.2f}% of samples are nearer to a reference image than 95% of held-out '
                  f'images are (about 5% when nothing is memorized); Gu rate {100 * s["gu_rate"]:.2f}%, held-out '
                  f'{100 * s["heldout_gu_rate"]:.2f}%')
        print(f'Wrote {paths["json"]}, {paths["gallery"]}, {paths["histogram"]}')
    distributed.barrier()
    distributed.cleanup()


if __name__ == '__main__':
    main()
