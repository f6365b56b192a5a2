"""Pixels and image files: [-1, 1] model space <-> uint8, PIL images as arrays, atomic PNGs and grids."""

import math
from typing import Sequence

import numpy as np
import PIL.Image
import torch

from dnnlib.util import atomic_write

#----------------------------------------------------------------------------
# Pixel units: uint8 u <-> u / 127.5 - 1.

def to_model_space(batch: torch.Tensor) -> torch.Tensor:
    """A batch as float32 in [-1, 1] units: uint8 u -> u / 127.5 - 1; float batches are already there."""
    if batch.dtype == torch.uint8:
        return batch.to(torch.float32) / 127.5 - 1
    if batch.is_floating_point():
        return batch.to(torch.float32)
    raise TypeError(f'to_model_space expects a uint8 or float batch, got {batch.dtype}')


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images to uint8 as EDM rounds them: (x * 127.5 + 128) clipped and truncated."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)

#----------------------------------------------------------------------------
# Image files.

def image_to_array(img: PIL.Image.Image) -> np.ndarray:
    """A PIL image ('L' or 'RGB') as uint8 CHW."""
    x = np.asarray(img, dtype=np.uint8)
    return x[np.newaxis] if x.ndim == 2 else x.transpose(2, 0, 1)


def array_to_image(image: np.ndarray) -> PIL.Image.Image:
    """A uint8 CHW array (1 or 3 channels) as a PIL image."""
    hwc = np.ascontiguousarray(image.transpose(1, 2, 0))
    return PIL.Image.fromarray(hwc[:, :, 0], 'L') if hwc.shape[2] == 1 else PIL.Image.fromarray(hwc, 'RGB')


def save_png(path: str, image: np.ndarray) -> None:
    """Write one uint8 CHW image as PNG, atomically: a killed run never leaves a half-written file."""
    with atomic_write(path) as f:
        array_to_image(image).save(f, format='PNG')


def tile(rows: Sequence[np.ndarray], pad: int = 0, fill: int = 255) -> np.ndarray:
    """uint8 rows of images (each N_i x C x H x W) as one C x H' x W' image, `pad` pixels of `fill` between them."""
    c, h, w = rows[0].shape[1:]
    cols = max(len(r) for r in rows)
    grid = np.full([c, len(rows) * (h + pad) - pad, cols * (w + pad) - pad], fill, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            grid[:, i * (h + pad):i * (h + pad) + h, j * (w + pad):j * (w + pad) + w] = image
    return grid


def grid_rows(images: np.ndarray, cols: int | None = None) -> list[np.ndarray]:
    """N x C x H x W images cut into rows of `cols` (default: a near-square grid)."""
    cols = cols or int(math.ceil(math.sqrt(len(images))))
    return [images[i:i + cols] for i in range(0, len(images), cols)]


def save_grid(path: str, rows: Sequence[np.ndarray], pad: int = 0) -> None:
    """tile(rows, pad) written as one PNG (atomically)."""
    save_png(path, tile(rows, pad))
