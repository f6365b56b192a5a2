"""Datasets: EDM-layout image folders/zips and memory-mapped array datasets, behind one interface."""

import json
import os
import pathlib
import shutil
import tempfile
import zipfile
from typing import Any, BinaryIO, Sequence

import numpy as np
import PIL.Image
import torch

from dnnlib.util import UserError, atomic_replace_dir, atomic_write, current_umask
from training.images import image_to_array

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
ARRAY_DTYPES = (np.dtype(np.uint8), np.dtype(np.float16), np.dtype(np.float32))
_GREY_MODES = ('1', 'L', 'LA', 'I', 'I;16', 'F')

#----------------------------------------------------------------------------
# Metadata.

def json_default(obj: Any) -> Any:
    """json.dump fallback for numpy scalars and arrays in metadata."""
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f'{type(obj).__name__} is not JSON serializable')

#----------------------------------------------------------------------------
# Image files in a folder or a zip.

def _one_line(e: BaseException) -> str:
    return ' '.join(str(e).split()) or type(e).__name__


class ImageFiles:
    """The PNG/JPEG files of a folder or zip, by relative POSIX name; reopens its zip lazily per process."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        if os.path.isdir(self.path):
            self.kind = 'folder'
            names = [os.path.relpath(os.path.join(root, f), self.path).replace(os.sep, '/')
                     for root, _dirs, files in os.walk(self.path) for f in files]
        elif os.path.isfile(self.path) and zipfile.is_zipfile(self.path):
            self.kind = 'zip'
            with zipfile.ZipFile(self.path) as z:
                names = [n for n in z.namelist() if not n.endswith('/')]
            for name in names:
                # Never trust a member name: '../x' or '/x' would point outside the archive's folder.
                if name.startswith('/') or '..' in pathlib.PurePosixPath(name).parts or ':' in name or '\\' in name:
                    raise UserError(f'Zip entry {name!r} in {self.path} escapes its folder; refusing this archive')
        elif os.path.exists(self.path):
            raise UserError(f'{self.path} is neither a folder nor a zip file')
        else:
            raise UserError(f'Dataset not found: {self.path}')
        self.all_names = set(names)
        self.names = sorted(n for n in names if n.lower().endswith(IMAGE_EXTENSIONS) and not n.split('/')[-1].startswith('.'))
        self._zip = None
        self._zip_pid = None

    def open(self, name: str) -> BinaryIO:
        if self.kind == 'folder':
            return open(os.path.join(self.path, name), 'rb')
        if self._zip is None or self._zip_pid != os.getpid():
            # A forked DataLoader worker inherits the parent's handle and its file offset: reading through it
            # from several processes at once corrupts the reads, so every process opens its own.
            self._zip = zipfile.ZipFile(self.path)
            self._zip_pid = os.getpid()
        return self._zip.open(name, 'r')

    def read_json(self, name: str = 'dataset.json') -> dict | None:
        """The parsed JSON file `name`, or None if absent."""
        if name not in self.all_names:
            return None
        try:
            with self.open(name) as f:
                data = json.load(f)
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise UserError(f'Cannot read {name} in {self.path}: {_one_line(e)}')
        if not isinstance(data, dict):
            raise UserError(f'{name} in {self.path} must hold a JSON object')
        return data

    def load_image(self, name: str) -> PIL.Image.Image:
        """Decode one image fully, as mode 'L' (grey) or 'RGB'; unreadable or truncated files raise UserError."""
        try:
            with self.open(name) as f:
                img = PIL.Image.open(f)
                img.load()
        except PIL.UnidentifiedImageError:
            raise UserError(f'Cannot read image {name} in {self.path}: not a PNG or JPEG file')
        except (OSError, SyntaxError, ValueError, EOFError, zipfile.BadZipFile, PIL.Image.DecompressionBombError) as e:
            raise UserError(f'Cannot read image {name} in {self.path}: {_one_line(e)}')
        return img.convert('L' if img.mode in _GREY_MODES else 'RGB')

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, '_zip': None}


#----------------------------------------------------------------------------
# The common interface.

class Dataset(torch.utils.data.Dataset):
    """Item i is (image CHW: uint8 or float32 in [-1, 1], label float32 [label_dim]); optional x-flip copies."""

    def __init__(self, name: str, raw_shape: Sequence[int], metadata: dict, xflip: bool = False,
                 max_size: int | None = None, use_labels: bool = False, cache: bool = False, random_seed: int = 0):
        self._name = name
        self._raw_shape = list(raw_shape)
        self._metadata = metadata
        self._cache = cache
        self._cached_images: dict[int, np.ndarray] = {}
        self._raw_idx = np.arange(self._raw_shape[0], dtype=np.int64)
        if max_size is not None:
            if max_size < 1:
                raise UserError(f'max_size must be at least 1, got {max_size}')
            if self._raw_idx.size > max_size:
                # A seeded subset, kept in source order.
                np.random.RandomState(random_seed % (1 << 32)).shuffle(self._raw_idx)
                self._raw_idx = np.sort(self._raw_idx[:max_size])
        self._xflip = np.zeros(self._raw_idx.size, dtype=bool)
        if xflip:
            self._raw_idx = np.tile(self._raw_idx, 2)
            self._xflip = np.concatenate([self._xflip, np.ones_like(self._xflip)])
        self._labels = self._prepare_labels(use_labels)

    def _load_raw_image(self, raw_idx: int) -> np.ndarray:
        raise NotImplementedError

    def raw_labels(self) -> np.ndarray | None:
        """Stored labels by raw index (integers or vectors, as in dataset.json), or None."""
        raise NotImplementedError

    def _prepare_labels(self, use_labels: bool) -> np.ndarray:
        if not use_labels:
            return np.zeros([self._raw_shape[0], 0], dtype=np.float32)
        raw = self.raw_labels()
        if raw is None:
            raise UserError(f'{self._name} has no labels; train unconditionally or add labels to its dataset.json')
        if raw.ndim == 1:
            # Integer class labels become one-hot vectors.
            if not np.issubdtype(raw.dtype, np.integer) or raw.min() < 0:
                raise UserError(f'Labels of {self._name} must be non-negative integers or vectors')
            onehot = np.zeros([raw.size, int(raw.max()) + 1], dtype=np.float32)
            onehot[np.arange(raw.size), raw] = 1
            return onehot
        return raw.astype(np.float32)

    def __len__(self) -> int:
        return self._raw_idx.size

    def __getitem__(self, idx: int) -> tuple[np.ndarray, np.ndarray]:
        raw_idx = int(self._raw_idx[idx])
        image = self._cached_images.get(raw_idx)
        if image is None:
            image = self._load_raw_image(raw_idx)
            if self._cache:
                self._cached_images[raw_idx] = image
        if self._xflip[idx]:
            image = image[:, :, ::-1]
        return image.copy(), self._labels[raw_idx].copy()

    def raw_index(self, idx: int) -> int:
        """Row of item `idx` in the stored data (differs from idx under max_size / xflip)."""
        return int(self._raw_idx[idx])

    @property
    def name(self) -> str:
        return self._name

    @property
    def metadata(self) -> dict:
        return self._metadata

    @property
    def image_shape(self) -> list[int]:
        return self._raw_shape[1:]

    @property
    def num_channels(self) -> int:
        return self._raw_shape[1]

    @property
    def resolution(self) -> int:
        assert self._raw_shape[2] == self._raw_shape[3]
        return self._raw_shape[2]

    @property
    def label_dim(self) -> int:
        return self._labels.shape[1]

    @property
    def has_labels(self) -> bool:
        return self.label_dim != 0

    @property
    def sigma(self) -> float | None:
        """Noise level of a noisy set in [-1, 1] pixel units; None for clean data."""
        sigma = self._metadata.get('sigma')
        return None if sigma is None else float(sigma)


def _check_shape(name: str, shape: Sequence[int]) -> None:
    c, h, w = shape
    if c not in (1, 3):
        raise UserError(f'{name}: images must have 1 or 3 channels, found {c}')
    if h != w or h & (h - 1) != 0:
        raise UserError(f'{name}: images must be square with a power-of-two size, found {w}x{h}; '
                        'convert with dataset_tool.py convert --resolution')

#----------------------------------------------------------------------------
# PNG/JPEG files in a folder or zip (EDM layout).

class ImageFolderDataset(Dataset):
    """A folder or zip of same-sized PNG/JPEG images; labels from dataset.json {"labels": [[name, label], ...]}."""

    def __init__(self, path: str, resolution: int | None = None, **super_kwargs):
        self._path = os.fspath(path)
        self._files = ImageFiles(self._path)
        if not self._files.names:
            raise UserError(f'No PNG or JPEG images found in {self._path}')
        metadata = self._files.read_json() or {}
        name = os.path.splitext(os.path.basename(self._path.rstrip('/')))[0]
        first = image_to_array(self._files.load_image(self._files.names[0]))
        raw_shape = [len(self._files.names), *first.shape]
        _check_shape(self._path, first.shape)
        if resolution is not None and first.shape[1] != resolution:
            raise UserError(f'{self._path} holds {first.shape[1]}x{first.shape[1]} images, expected {resolution}x{resolution}')
        super().__init__(name=name, raw_shape=raw_shape, metadata=metadata, **super_kwargs)

    @property
    def image_names(self) -> list[str]:
        return self._files.names

    def _load_raw_image(self, raw_idx: int) -> np.ndarray:
        fname = self._files.names[raw_idx]
        image = image_to_array(self._files.load_image(fname))
        if list(image.shape) != self._raw_shape[1:]:
            raise UserError(f'Image {fname} in {self._path} has shape {list(image.shape)}, others '
                            f'{self._raw_shape[1:]}; convert with dataset_tool.py convert --resolution')
        return image

    def raw_labels(self) -> np.ndarray | None:
        labels = self._metadata.get('labels')
        if labels is None:
            return None
        try:
            labels = dict(labels)
            return np.array([labels[fname] for fname in self._files.names])
        except KeyError as e:
            raise UserError(f'dataset.json in {self._path} has no label for {e.args[0]}')
        except (TypeError, ValueError):
            raise UserError(f'dataset.json in {self._path}: "labels" must be [[file name, label], ...]')

    def close(self) -> None:
        self._files.close()

#----------------------------------------------------------------------------
# Arrays in images.npy, memory-mapped (noisy sets, SFBD's denoised sets E_k).

class ArrayDataset(Dataset):
    """A directory with images.npy (N x C x H x W: uint8, float16 or float32 [-1, 1] units) and dataset.json."""

    def __init__(self, path: str, resolution: int | None = None, cache: bool = False, **super_kwargs):
        self._path = os.fspath(path)
        self._in_memory = cache  # the whole array is read once; no per-item cache on top
        self._images_path = os.path.join(self._path, 'images.npy')
        json_path = os.path.join(self._path, 'dataset.json')
        if not os.path.isfile(self._images_path) or not os.path.isfile(json_path):
            raise UserError(f'{self._path} is not an array dataset: it needs images.npy and dataset.json')
        try:
            with open(json_path) as f:
                metadata = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f'Cannot read {json_path}: {_one_line(e)}')
        if not isinstance(metadata, dict):
            raise UserError(f'{json_path} must hold a JSON object')
        self._images = None
        images = self.images
        if images.ndim != 4 or images.dtype not in ARRAY_DTYPES or images.shape[0] == 0:
            raise UserError(f'{self._images_path} must hold a non-empty N x C x H x W array of uint8, float16 or '
                            f'float32; found shape {list(images.shape)} {images.dtype}')
        _check_shape(self._path, images.shape[1:])
        if resolution is not None and images.shape[2] != resolution:
            raise UserError(f'{self._path} holds {images.shape[2]}x{images.shape[2]} images, expected {resolution}x{resolution}')
        name = os.path.basename(os.path.abspath(self._path))
        super().__init__(name=name, raw_shape=images.shape, metadata=metadata, **super_kwargs)

    @property
    def images(self) -> np.ndarray:
        """The stored N x C x H x W array (memory-mapped unless cached); rows are raw indices."""
        if self._images is None:
            try:
                self._images = np.load(self._images_path, mmap_mode=None if self._in_memory else 'r', allow_pickle=False)
            except (OSError, ValueError, EOFError) as e:
                raise UserError(f'Cannot read {self._images_path}: {_one_line(e)}')
        return self._images

    @property
    def dtype(self) -> np.dtype:
        return self.images.dtype

    def _load_raw_image(self, raw_idx: int) -> np.ndarray:
        image = np.array(self.images[raw_idx])
        return image.astype(np.float32) if image.dtype == np.float16 else image

    def raw_labels(self) -> np.ndarray | None:
        labels = self._metadata.get('labels')
        if labels is None:
            return None
        labels = np.array(labels)
        if labels.shape[0] != self._raw_shape[0] or labels.ndim not in (1, 2):
            raise UserError(f'dataset.json in {self._path}: "labels" must list one label per image')
        return labels

    def __getstate__(self) -> dict:
        # Workers reopen the memory map instead of receiving a pickled copy of the whole array.
        return {**self.__dict__, '_images': self._images if self._in_memory else None}

#----------------------------------------------------------------------------

class DatasetUnion(torch.utils.data.Dataset):
    """Several data sets of one image shape as one: items of the first, then of the second, ... (every image once)."""

    def __init__(self, parts: Sequence[Dataset]):
        self.parts = list(parts)
        first = self.parts[0]
        for part in self.parts[1:]:
            if (part.image_shape, part.label_dim) != (first.image_shape, first.label_dim):
                raise UserError(f'Cannot train on {first.name} and {part.name} together: images {first.image_shape} '
                                f'with {first.label_dim} label dims against {part.image_shape} with {part.label_dim}')
        self._offsets = np.cumsum([0] + [len(p) for p in self.parts])
        self.name = '+'.join(p.name for p in self.parts)
        self.image_shape, self.label_dim, self.has_labels = first.image_shape, first.label_dim, first.has_labels
        self.num_channels, self.resolution = first.num_channels, first.resolution
        self.metadata, self.sigma = {'union_of': [p.name for p in self.parts]}, None

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, idx: int) -> tuple[np.ndarray, np.ndarray]:
        part = int(np.searchsorted(self._offsets, idx, side='right')) - 1
        return self.parts[part][idx - int(self._offsets[part])]


def open_dataset(path: str | Sequence[str], *, xflip: bool = False, max_size: int | None = None, use_labels: bool = False,
                 cache: bool = False, random_seed: int = 0, **kwargs) -> Dataset | DatasetUnion:
    """Open an array dataset (directory with images.npy) or an image folder/zip, whichever `path` is; a list of
    paths opens each the same way and returns their union (SFBD's fine-tune on D_clean and E_k)."""
    if isinstance(path, (list, tuple)):
        return DatasetUnion([open_dataset(p, xflip=xflip, max_size=max_size, use_labels=use_labels, cache=cache,
                                          random_seed=random_seed, **kwargs) for p in path])
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f'Dataset not found: {path}')
    common = dict(xflip=xflip, max_size=max_size, use_labels=use_labels, cache=cache, random_seed=random_seed, **kwargs)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, 'images.npy')):
        return ArrayDataset(path, **common)
    return ImageFolderDataset(path, **common)

#----------------------------------------------------------------------------
# Writing array datasets.

def make_temp_dir(dest: str) -> str:
    """A fresh hidden directory beside `dest`, with the permissions a plain mkdir would give."""
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(dest)}.', suffix='.tmp')
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private (0700)
    return tmp

def remove_temp_dirs(dest: str) -> None:
    """Remove the temporary directories that make_temp_dir made for `dest` (of a writer killed midway)."""
    parent, base = os.path.split(os.path.abspath(dest))
    if os.path.isdir(parent):
        for name in os.listdir(parent):
            if name.startswith(f'.{base}.') and name.endswith('.tmp') and os.path.isdir(os.path.join(parent, name)):
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


class ArrayDatasetWriter:
    """Writes rows of an array dataset into a temporary directory; close() renames it to `dest`.

    Use as a context manager: leaving the block by an exception removes the temporary directory, so
    `dest` never holds a half-written data set. Single writer; for several processes, see
    assemble_array_dataset.
    """

    def __init__(self, dest: str, num_images: int, image_shape: Sequence[int], dtype: Any,
                 metadata: dict | None = None, overwrite: bool = False):
        self.dest = os.path.abspath(os.fspath(dest))
        self.dtype = np.dtype(dtype)
        self.num_images = int(num_images)
        self.image_shape = [int(s) for s in image_shape]
        assert self.dtype in ARRAY_DTYPES and self.num_images >= 1 and len(self.image_shape) == 3
        _check_shape(self.dest, self.image_shape)
        if os.path.exists(self.dest) and not overwrite:
            raise UserError(f'{self.dest} already exists; pass --overwrite to replace it')
        self.metadata = dict(metadata or {})
        self._tmp = make_temp_dir(self.dest)
        self._images = np.lib.format.open_memmap(os.path.join(self._tmp, 'images.npy'), mode='w+',
                                                 dtype=self.dtype, shape=(self.num_images, *self.image_shape))
        self._written = np.zeros(self.num_images, dtype=bool)

    def write(self, start: int, images: np.ndarray | torch.Tensor) -> None:
        """Store `images` (n x C x H x W) as rows [start, start + n)."""
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().numpy()
        stop = start + images.shape[0]
        assert 0 <= start <= stop <= self.num_images and list(images.shape[1:]) == self.image_shape
        # Never let floats in [-1, 1] be truncated into uint8 (or the reverse) by accident.
        assert images.dtype == self.dtype or (images.dtype.kind == 'f' and self.dtype.kind == 'f')
        self._images[start:stop] = images
        self._written[start:stop] = True

    def close(self) -> str:
        """Finish: check every row was written, write dataset.json, rename into place; return `dest`."""
        missing = np.flatnonzero(~self._written)
        if missing.size:
            self.abort()
            raise RuntimeError(f'{missing.size} of {self.num_images} rows were never written (first: {missing[0]})')
        self._images.flush()
        self._images = None
        c, h, _w = self.image_shape
        metadata = {'kind': 'array', **self.metadata, 'count': self.num_images, 'dtype': self.dtype.name,
                    'resolution': h, 'channels': c}
        with atomic_write(os.path.join(self._tmp, 'dataset.json'), 'w') as f:
            json.dump(metadata, f, default=json_default)
        atomic_replace_dir(self._tmp, self.dest)
        return self.dest

    def abort(self) -> None:
        """Discard everything written so far."""
        self._images = None
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> 'ArrayDatasetWriter':
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def assemble_array_dataset(dest: str, shards: Sequence[str], metadata: dict | None = None,
                           overwrite: bool = False, chunk: int = 4096) -> str:
    """Concatenate shard .npy files (each n_i x C x H x W, same dtype, in order) into an array dataset at `dest`."""
    arrays = []
    for path in shards:
        try:
            arrays.append(np.load(path, mmap_mode='r', allow_pickle=False))
        except (OSError, ValueError, EOFError) as e:
            raise UserError(f'Cannot read shard {path}: {_one_line(e)}')
    assert arrays and all(a.ndim == 4 and a.shape[1:] == arrays[0].shape[1:] and a.dtype == arrays[0].dtype for a in arrays)
    total = sum(a.shape[0] for a in arrays)
    with ArrayDatasetWriter(dest, total, arrays[0].shape[1:], arrays[0].dtype, metadata, overwrite) as writer:
        start = 0
        for a in arrays:
            for i in range(0, a.shape[0], chunk):
                writer.write(start + i, np.asarray(a[i:i + chunk]))
            start += a.shape[0]
    return writer.dest
