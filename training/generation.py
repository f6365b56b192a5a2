"""Sharded image generation from a network: per-seed noise, EDM's Heun/Euler samplers, uint8 output."""

import os
import zipfile
from typing import Any, Iterator, Sequence

import numpy as np
import PIL.Image
import torch

from dnnlib.util import Progress, UserError, atomic_write
from torch_utils import distributed, perf
from torch_utils.rng import StackedRandomGenerator
from training import images, sampler

SOLVERS = {'heun': sampler.heun_sampler, 'euler': sampler.euler_sampler}

#----------------------------------------------------------------------------

def check_class(net: torch.nn.Module, class_idx: int | None) -> None:
    """UserError unless `class_idx` (--class) is None or one of the network's classes."""
    if class_idx is None:
        return
    if not net.label_dim:
        raise UserError(f'--class={class_idx} was given, but the network is unconditional (it has no classes): drop --class')
    if not 0 <= class_idx < net.label_dim:
        raise UserError(f'--class={class_idx} is out of range: the network has {net.label_dim} classes, '
                        f'give --class from 0 to {net.label_dim - 1}')


@torch.no_grad()
def sample_images(net: torch.nn.Module, seeds: Sequence[int], num_steps: int = 18, sigma_min: float = sampler.SIGMA_MIN,
                  sigma_max: float = sampler.SIGMA_MAX, rho: float = sampler.RHO, S_churn: float = 0, S_min: float = 0, S_max: float = float('inf'),
                  S_noise: float = 1, solver: str = 'heun', class_idx: int | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """One batch of images (float64 NCHW, [-1, 1] units), image i drawn from its own seeds[i] as in EDM.

    The latents, then the random class labels, then the churn noise come from one generator per image,
    so an image does not depend on the batch it is in. sigma_min/sigma_max are clipped to the range
    the network supports, as EDM does.
    """
    if solver not in SOLVERS:
        raise UserError(f"Unknown solver {solver!r}: use {' or '.join(SOLVERS)}")
    check_class(net, class_idx)
    sigma_min, sigma_max = max(sigma_min, net.sigma_min), min(sigma_max, net.sigma_max)
    if not sigma_min < sigma_max:
        raise UserError(f'The noise levels run from --sigma_min={sigma_min:g} to --sigma_max={sigma_max:g} (after clipping to '
                        f'the network\'s {net.sigma_min:g} to {net.sigma_max:g}): give a --sigma_min below --sigma_max')
    device = torch.device(device) if device is not None else next(net.parameters(), torch.empty(0)).device
    rnd = StackedRandomGenerator(device, seeds)
    latents = rnd.randn([len(seeds), net.img_channels, net.img_resolution, net.img_resolution])
    class_labels = None
    if net.label_dim:
        class_labels = torch.eye(net.label_dim, device=device)[rnd.randint(net.label_dim, size=[len(seeds)])]
        if class_idx is not None:
            class_labels[:, :] = 0
            class_labels[:, class_idx] = 1
    sigmas = sampler.sigma_steps(num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, round_sigma=net.round_sigma,
                                 device=device)
    return SOLVERS[solver](sampler.net_denoiser(net, class_labels), latents.to(torch.float64) * sigmas[0], sigmas,
                           S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise, randn_like=rnd.randn_like,
                           round_sigma=net.round_sigma)


@torch.no_grad()
def generate_images(net: torch.nn.Module, seeds: Sequence[int], batch_size: int = 64, device: torch.device | str | None = None,
                    sampler_kwargs: dict[str, Any] | None = None,
                    class_idx: int | None = None) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield (seeds of the batch, uint8 NCHW images on `device`) for THIS rank's contiguous shard of `seeds`.

    Every rank must iterate its own generator; no collectives are involved. sampler_kwargs are
    sample_images' keyword arguments (num_steps, sigma_min, sigma_max, rho, S_churn, S_min, S_max,
    S_noise, solver).
    """
    if batch_size < 1:
        raise UserError(f'Batch size must be at least 1, got {batch_size}')
    check_class(net, class_idx)
    shard = distributed.shard(len(seeds))
    mine = seeds[shard.start:shard.stop]
    for start in range(0, len(mine), batch_size):
        batch = [int(s) for s in mine[start:start + batch_size]]
        x = sample_images(net, batch, class_idx=class_idx, device=device, **(sampler_kwargs or {}))
        if not torch.isfinite(x).all():  # to_uint8 would make them black images, and FIDs of black images
            raise UserError(f'Sampling gave NaN or inf for seeds {batch[0]}..{batch[-1]}: the network or the sampler '
                            f'settings are broken (check the network file and --sigma_max, --S_noise, --rho); stopped '
                            f'before writing or using them')
        yield batch, images.to_uint8(x)

#----------------------------------------------------------------------------
# Files: EDM's naming (000123.png, optionally in subdirectories 000000/, 001000/, ...).

def image_path(outdir: str, seed: int, subdirs: bool = False) -> str:
    """Where the PNG for `seed` goes."""
    return os.path.join(outdir, f'{seed - seed % 1000:06d}', f'{seed:06d}.png') if subdirs else os.path.join(outdir, f'{seed:06d}.png')


def write_zip(outdir: str, seeds: Sequence[int], subdirs: bool, dest: str) -> None:
    """Pack the PNGs of `seeds` into the zip `dest`, under the same relative names (atomic)."""
    with atomic_write(dest) as f, zipfile.ZipFile(f, 'w', compression=zipfile.ZIP_STORED) as z:
        for seed in seeds:
            path = image_path(outdir, seed, subdirs)
            z.write(path, os.path.relpath(path, outdir).replace(os.sep, '/'))


def write_grid(outdir: str, seeds: Sequence[int], subdirs: bool, dest: str, max_images: int = 64) -> None:
    """Tile the PNGs of the first `max_images` seeds into one near-square PNG at `dest`."""
    tiles = np.stack([images.image_to_array(PIL.Image.open(image_path(outdir, s, subdirs))) for s in seeds[:max_images]])
    images.save_grid(dest, images.grid_rows(tiles))


def generate_to_dir(net: torch.nn.Module, outdir: str, seeds: Sequence[int], batch_size: int = 64,
                    device: torch.device | str | None = None, sampler_kwargs: dict[str, Any] | None = None,
                    class_idx: int | None = None, subdirs: bool = False, make_zip: bool = False,
                    grid_num: int = 0, precision: str = 'fp32', channels_last: bool = False,
                    compile: bool = False) -> None:
    """Write one PNG per seed (this rank's shard); then rank 0 writes OUTDIR.zip and OUTDIR-grid.png (grid_num images) if asked.

    Call it on every rank: it ends with a barrier so the zip and grid see every rank's images. precision,
    channels_last and compile go to perf.prepare_for_inference; fp32 without the others samples with `net` as is.
    """
    net = perf.prepare_for_inference(net, precision=precision, channels_last=channels_last, compile=compile)
    seeds = [int(s) for s in seeds]
    # Rank 0 extrapolates from its own shard (shards differ by at most one image).
    progress = Progress(len(seeds), 'Generating', enabled=distributed.is_main())
    for batch_seeds, batch in generate_images(net, seeds, batch_size=batch_size, device=device,
                                              sampler_kwargs=sampler_kwargs, class_idx=class_idx):
        for seed, image in zip(batch_seeds, batch.cpu().numpy()):
            images.save_png(image_path(outdir, seed, subdirs), image)
        progress.update(len(batch_seeds) * distributed.get_world_size())
    distributed.barrier()
    if distributed.is_main():
        base = os.path.normpath(outdir)
        if make_zip:
            write_zip(outdir, seeds, subdirs, base + '.zip')
        if grid_num > 0:
            write_grid(outdir, seeds, subdirs, base + '-grid.png', grid_num)
    distributed.barrier()
