"""dataset_tool: convert image sources to the EDM layout, split clean/rest, corrupt once with noise, inspect (CLI of training.data_prep)."""

import click

from training.data_prep import convert_dataset, corrupt_dataset, dataset_info, import_noisy, split_dataset

#----------------------------------------------------------------------------
# Command line.

@click.group(context_settings=dict(help_option_names=['-h', '--help']))
def main() -> None:
    """Prepare SFBD's data: convert sources, split off a small clean set, corrupt the rest once, inspect.

    \b
    python dataset_tool.py convert --source=cifar-10-python.tar.gz --dest=datasets/cifar10-32x32.zip
    python dataset_tool.py split --source=datasets/cifar10-32x32.zip --clean=0.04 --seed=0 \\
        --dest-clean=datasets/cifar10-clean.zip --dest-rest=datasets/cifar10-rest.zip
    python dataset_tool.py corrupt --source=datasets/cifar10-rest.zip --sigma=0.2 --seed=0 \\
        --dest=datasets/cifar10-noisy-0.2
    python dataset_tool.py info datasets/cifar10-noisy-0.2
    """


@main.command()
@click.option('--source',      help='CIFAR-10 python tarball (cifar-10-python.tar.gz: its 50,000 training images '
                                    'and labels) or extracted folder; a folder or zip of PNG/JPEG images (e.g. '
                                    "CelebA's img_align_celeba); or 'sklearn-digits' (scikit-learn's bundled 1,797 "
                                    'handwritten digits, 8x8 grey, values 0..16 mapped to 0..255, with labels)',
              metavar='PATH', required=True)
@click.option('--dest',        help='Output: a .zip archive if the name ends in .zip, else a folder', metavar='PATH', required=True)
@click.option('--resolution',  help='Output size WxH, at least 4x4; images are resized (Lanczos) to it  [default: keep]', metavar='WxH')
@click.option('--transform',   help='center-crop: largest centred square, then resize; center-crop-wide: centred crop '
                                    'to the WxH aspect, resize, pad to WxW; celeba: aligned CelebA 178x218 -> the '
                                    '128x128 box centred at (x 89, y 121) (left 25, top 57), then resize '
                                    '[default resolution 64x64]',
              type=click.Choice(['center-crop', 'center-crop-wide', 'celeba']))
@click.option('--partition',   help="With --transform=celeba: CelebA's list_eval_partition.txt; only its training "
                                    'images (partition 0, 162,770 of 202,599) are kept  [default: the file in the '
                                    'source folder or beside the source zip, if there is one]', metavar='FILE')
@click.option('--max-images',  help='Convert only the first N images', metavar='N', type=int)
@click.option('--overwrite',   help='Replace an existing destination (a dataset)', is_flag=True)
def convert(source: str, dest: str, resolution: str | None, transform: str | None, partition: str | None,
            max_images: int | None, overwrite: bool) -> None:
    """Convert a source to the EDM layout.

    Writes PNGs 00000/img00000000.png, ... plus dataset.json {"labels": [[name, label], ...] or null}.
    """
    convert_dataset(source, dest, resolution=resolution, transform=transform, max_images=max_images, overwrite=overwrite,
                    partition=partition)
    click.echo(f'Wrote {dest}')


@main.command()
@click.option('--source',      help='Clean image dataset (folder or zip) to split', metavar='PATH', required=True)
@click.option('--clean',       help='Size of the clean set: a count (50) or a fraction of the data set (0.04)',
              metavar='COUNT|FRACTION', required=True)
@click.option('--seed',        help='Seed of the random split', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--dest-clean',  help='Output for the clean set (.zip or folder)', metavar='PATH', required=True)
@click.option('--dest-rest',   help='Output for the rest, to be corrupted (.zip or folder)', metavar='PATH', required=True)
@click.option('--overwrite',   help='Replace existing destinations', is_flag=True)
def split(source: str, clean: str, seed: int, dest_clean: str, dest_rest: str, overwrite: bool) -> None:
    """Split off a seeded random clean set.

    The clean set and the rest are disjoint and together complete; each dataset.json records
    "source" and "source_indices" (indices into the original data set, through earlier splits).
    """
    clean_idx, rest_idx = split_dataset(source, clean, seed, dest_clean, dest_rest, overwrite=overwrite)
    click.echo(f'Wrote {len(clean_idx)} clean images to {dest_clean} and {len(rest_idx)} to {dest_rest}')


@main.command()
@click.option('--source',      help='Clean image dataset to corrupt (usually the rest of a split)', metavar='PATH', required=True)
@click.option('--sigma',       help='Noise std in [-1, 1] pixel units (0.2 = 25.5 grey levels); must be > 0 and '
                                    'finite, and its noise must fit --dtype (float16: sigma <= 6550)',
              metavar='FLOAT', type=float, required=True)
@click.option('--seed',        help='Noise seed; image i gets noise from derive_seed(seed, i)', metavar='INT',
              type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--dest',        help='Output directory (images.npy + dataset.json; not a .zip)', metavar='DIR', required=True)
@click.option('--dtype',       help='Storage type of the noisy pixels', type=click.Choice(['float32', 'float16']),
              default='float32', show_default=True)
@click.option('--overwrite',   help='Replace an existing destination', is_flag=True)
def corrupt(source: str, sigma: float, seed: int, dest: str, dtype: str, overwrite: bool) -> None:
    """Corrupt every image once with Gaussian noise.

    y = x + sigma * N(0, I) with x in [-1, 1], stored as floats (images.npy) with dataset.json:
    sigma, seed, source, source_indices, originals (the clean images, row for row), labels.
    """
    corrupt_dataset(source, dest, sigma, seed, dtype=dtype, overwrite=overwrite)
    click.echo(f'Wrote {dest}')


@main.command(name='import-noisy')
@click.option('--source',      help='Your noisy images: .npy, N x C x H x W float in [-1, 1] pixel units', metavar='FILE', required=True)
@click.option('--sigma',       help='Their noise std in [-1, 1] pixel units; must be > 0 and finite', metavar='FLOAT', type=float, required=True)
@click.option('--dest',        help='Output directory (images.npy + dataset.json; not a .zip)', metavar='DIR', required=True)
@click.option('--overwrite',   help='Replace an existing destination', is_flag=True)
def import_noisy_cmd(source: str, sigma: float, dest: str, overwrite: bool) -> None:
    """Bring your own noisy data (.npy).

    Values must be finite; values more than 10 sigma outside [-1, 1] get a warning. Without originals,
    evaluation can only compare against clean reference statistics.
    """
    import_noisy(source, dest, sigma, overwrite=overwrite)
    click.echo(f'Wrote {dest}')


@main.command()
@click.argument('path')
def info(path: str) -> None:
    """Show what a dataset holds.

    Kind, count, resolution, channels, dtype, labels, sigma and provenance.
    """
    for key, value in dataset_info(path).items():
        click.echo(f'{key + ":":12s}{value}')


if __name__ == '__main__':
    main()
