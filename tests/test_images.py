"""training/images.py: the uint8 <-> [-1, 1] mapping against hand-computed values, PNG and grid writers."""

import os

import numpy as np
import PIL.Image
import pytest
import torch

from training.images import grid_rows, save_grid, save_png, tile, to_model_space, to_uint8

#----------------------------------------------------------------------------
# The uint8 mapping, against values computed by hand from EDM's code.

@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_to_uint8_truncates_like_edm(dtype):
    # EDM: (x * 127.5 + 128).clip(0, 255).to(uint8). Left: x; right: x * 127.5 + 128 and the uint8 it truncates to.
    table = [
        (-1, 0),             # 0.5
        (0, 128),            # 128
        (1, 255),            # 255.5
        (-117.5 / 127.5, 10),  # 10.5: truncated, not rounded up
        (-116.5 / 127.5, 11),  # 11.5: not 12 (round half to even) either
        (0.5, 191),          # 191.75
        (-0.5, 64),          # 64.25
        (-1.0039, 0),        # 0.00275
        (1.0039, 255),       # 255.997
        (-1.02, 0),          # -2.05: clipped (a bare cast would wrap to 254)
        (1.02, 255),         # 258.05: clipped (a bare cast would wrap to 2)
        (-7, 0),
        (7, 255),
    ]
    x = torch.tensor([v for v, _ in table], dtype=dtype)
    out = to_uint8(x)
    assert out.dtype == torch.uint8
    assert out.tolist() == [u for _, u in table]


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_uint8_round_trip_through_model_space_is_the_identity(dtype):
    u = torch.arange(256, dtype=torch.uint8)
    # u / 127.5 - 1 maps to u + 0.5 (up to rounding), which truncates back to u.
    assert torch.equal(to_uint8(u.to(dtype) / 127.5 - 1), u)
    assert torch.equal(to_uint8(to_model_space(u).to(dtype)), u)


def test_to_model_space():
    assert to_model_space(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [-1.0, 1.0]
    f = torch.tensor([0.25], dtype=torch.float64)
    assert to_model_space(f).dtype == torch.float32 and to_model_space(f).item() == 0.25
    with pytest.raises(TypeError):
        to_model_space(torch.tensor([1], dtype=torch.int32))

#----------------------------------------------------------------------------
# Files.

def test_tile_places_every_image_with_gaps():
    a = np.full((3, 1, 2, 2), 7, np.uint8)
    a[1] = 9
    grid = tile([a[:2], a[2:]], pad=1)  # rows of 2 and 1 images
    assert grid.shape == (1, 2 * 3 - 1, 2 * 3 - 1)
    assert (grid[0, :2, :2] == 7).all() and (grid[0, :2, 3:] == 9).all() and (grid[0, 3:, :2] == 7).all()
    assert (grid[0, 2, :] == 255).all() and (grid[0, 3:, 3:] == 255).all()  # gaps and the missing cell are white
    assert [len(r) for r in grid_rows(np.zeros((10, 1, 2, 2), np.uint8))] == [4, 4, 2]


def test_save_png_is_atomic_and_round_trips(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (3, 5, 4), dtype=np.uint8)
    save_png(str(tmp_path / 'a.png'), image)
    assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / 'a.png')).transpose(2, 0, 1), image)
    save_grid(str(tmp_path / 'g.png'), [image[None, :1], image[None, :1]], pad=0)
    assert np.asarray(PIL.Image.open(tmp_path / 'g.png')).shape == (10, 4)
    assert sorted(os.listdir(tmp_path)) == ['a.png', 'g.png']  # no temporary file left
