"""Datasets: EDM-layout image folders/zips and memory-mapped array datasets, behind one interface."""

import json
import math
import os
import pathlib
import shutil
import sys
import zipfile
from typing import Any, BinaryIO, Callable, Sequence

import numpy as np
import PIL.Image
import torch

from dnnlib.util import UserError, atomic_replace_dir, atomic_write, disk_errors, make_temp_dir, preallocate
from training.images import image_to_array

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
ARRAY_DTYPES = (np.dtype(np.uint8), np.dtype(np.float16), np.dtype(np.float32))
_GREY_MODES = ('1', 'L', 'LA', 'I', 'I;16', 'F')
MIN_RESOLUTION = 4  # the U-Nets halve the image at each level after the first: ddpmpp's 3 levels need 4x4

#----------------------------------------------------------------------------
# Metadata.

def json_default(obj: Any) -> Any:
    """json.dump fallback for numpy scalars and arrays in metadata."""
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f'{type(obj).__name__} is not JSON serializable')


def check_sigma(sigma: Any, dtype: Any, what: str, fix: str) -> float:
    """UserError (`what` names the input, `fix` says what to do) unless `sigma` is a number > 0 whose noise,
    up to 10 sigma, a `dtype` pixel can hold; returns it as a float."""
    dtype = np.dtype(dtype)
    largest = float(np.finfo(dtype).max) if dtype.kind == 'f' else 255.0
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 < sigma < math.inf:
        raise UserError(f'{what} must be a positive finite number in [-1, 1] pixel units, found {sigma!r}; {fix}')
    if 10 * sigma > largest:
        raise UserError(f'{what} is {sigma:g}, whose noise overflows {dtype.name} pixels (largest {largest:g}) to inf; {fix}')
    return float(sigma)

#----------------------------------------------------------------------------
# Image files in a folder or a zip.

def _one_line(e: BaseException) -> str:
    return ' '.join(str(e).split()) or type(e).__name__


def _read_magic(path: str, n: int = 8) -> bytes:
    try:
        with open(path, 'rb') as f:
            return f.read(n)
    except OSError as e:
        raise UserError(f'Cannot read {path}: {_one_line(e)}')


def _not_a_dataset_file(path: str) -> str:
    """Why the file `path` is no image dataset, from its first bytes."""
    magic = _read_magic(path)
    if magic.startswith(b'PK'):
        return f'{path} is a damaged or truncated zip file (its table of contents is unreadable): re-create or re-download it'
    if magic.startswith(b'\x93NUMPY'):
        return (f'{path} is a .npy file; an array dataset is a folder holding images.npy and dataset.json '
                '(make one from your own array with dataset_tool.py import-noisy)')
    if magic.startswith(b'\x1f\x8b') or magic.startswith(b'BZh') or magic.startswith(b'\xfd7zXZ'):
        return f'{path} is a compressed archive (tar?); extract it, or give a CIFAR-10 tarball to dataset_tool.py convert'
    if magic.startswith(b'\x89PNG') or magic.startswith(b'\xff\xd8'):
        return f'{path} is a single image; give the folder or zip that holds the images'
    return f'{path} is neither a folder nor a zip file'


def load_npy(path: str, mmap: bool = True) -> np.ndarray:
    """One .npy array (memory-mapped unless mmap=False), never unpickled; a file that is no .npy, holds Python
    objects or is shorter than its header says is one UserError line."""
    magic = _read_magic(path, 6)
    if magic.startswith(b'PK'):
        raise UserError(f'{path} is an .npz archive of several arrays, not one .npy array: save one with numpy.save')
    if magic != b'\x93NUMPY':
        raise UserError(f'{path} is not a .npy file (it does not begin with the NumPy header): save the array with numpy.save')
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        with open(path, 'rb') as f:
            read_header = readers.get(np.lib.format.read_magic(f))
            header = read_header(f) if read_header else None  # a newer format: np.load alone checks it
            offset = f.tell()
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f'Cannot read {path}: a damaged .npy header ({_one_line(e)})')
    if header is not None:
        shape, _fortran, dtype = header
        if dtype.hasobject:
            raise UserError(f'{path} holds Python objects (dtype {dtype}), which are never loaded since that could '
                            'run code: save a numeric array')
        expected = offset + math.prod(shape) * dtype.itemsize
        if os.path.getsize(path) < expected:
            raise UserError(f'{path} is truncated: {os.path.getsize(path):,} bytes where its header promises {expected:,}')
    try:
        return np.load(path, mmap_mode='r' if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f'Cannot read {path}: {_one_line(e)}')


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
            try:
                with zipfile.ZipFile(self.path) as z:
                    names = [n for n in z.namelist() if not n.endswith('/')]
            except (zipfile.BadZipFile, OSError, ValueError) as e:
                raise UserError(f'{self.path} is a damaged zip file: {_one_line(e)}; re-create or re-download it')
            for name in names:
                # Never trust a member name: '../x' or '/x' would point outside the archive's folder.
                if name.startswith('/') or '..' in pathlib.PurePosixPath(name).parts or ':' in name or '\\' in name:
                    raise UserError(f'Zip entry {name!r} in {self.path} escapes its folder; refusing this archive')
        elif os.path.exists(self.path):
            raise UserError(_not_a_dataset_file(self.path))
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
        self._check_metadata()
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

    def _check_metadata(self) -> None:
        """Refuse a dataset.json whose `sigma` or `source_indices` cannot be what our tools wrote."""
        where = f'the dataset.json of {self.path}'
        sigma = self._metadata.get('sigma')
        if sigma is not None:
            check_sigma(sigma, getattr(self, 'dtype', np.dtype(np.float32)), f'"sigma" in {where}',
                        'the file is damaged or not ours')
        indices = self._metadata.get('source_indices')
        if indices is not None:
            n = self._raw_shape[0]
            if not isinstance(indices, list) or len(indices) != n or \
                    not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
                raise UserError(f'"source_indices" in {where} are not {n} non-negative integers (one per image); '
                                'the file is damaged or not ours')

    @property
    def path(self) -> str:
        """Where the dataset lives (a folder, zip or array dataset directory), as given."""
        return self._path

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
        return None if sigma is None else float(sigma)  # checked in _check_metadata


def check_image_shape(name: str, shape: Sequence[int]) -> None:
    """UserError unless C x H x W images have 1 or 3 channels and are square, a power of two and at least MIN_RESOLUTION."""
    c, h, w = shape
    if c not in (1, 3):
        raise UserError(f'{name}: images must have 1 or 3 channels, found {c}')
    if h != w or h & (h - 1) != 0:
        raise UserError(f'{name}: images must be square with a power-of-two size, found {w}x{h}; '
                        'convert with dataset_tool.py convert --resolution')
    if h < MIN_RESOLUTION:
        raise UserError(f'{name}: images of {w}x{h} are below {MIN_RESOLUTION}x{MIN_RESOLUTION}, the smallest the '
                        f'networks here take; convert with dataset_tool.py convert --resolution={MIN_RESOLUTION}x{MIN_RESOLUTION} or more')

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
        check_image_shape(self._path, first.shape)
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
        stored = {'count': images.shape[0], 'channels': images.shape[1], 'resolution': images.shape[2], 'dtype': images.dtype.name}
        for key, value in stored.items():
            if key in metadata and metadata[key] != value:
                raise UserError(f'{json_path} says "{key}" is {metadata[key]!r} but images.npy holds {value}; '
                                'the two files do not belong together')
        check_image_shape(self._path, images.shape[1:])
        if resolution is not None and images.shape[2] != resolution:
            raise UserError(f'{self._path} holds {images.shape[2]}x{images.shape[2]} images, expected {resolution}x{resolution}')
        name = os.path.basename(os.path.abspath(self._path))
        super().__init__(name=name, raw_shape=images.shape, metadata=metadata, **super_kwargs)

    @property
    def images(self) -> np.ndarray:
        """The stored N x C x H x W array (memory-mapped unless cached); rows are raw indices."""
        if self._images is None:
            self._images = load_npy(self._images_path, mmap=not self._in_memory)
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
        try:
            labels = np.array(labels)
        except ValueError:
            labels = np.array(None)
        if labels.ndim not in (1, 2) or labels.shape[0] != self._raw_shape[0] or labels.dtype.kind not in 'iuf':
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
# What a path is, judged by names alone, and the originals a noisy set names.

def dataset_kind(path: str) -> str | None:
    """'array', 'folder' or 'zip' if `path` carries a dataset's markers (images.npy and dataset.json; dataset.json;
    a zip holding dataset.json), else None. Lists nothing but a zip's table of contents."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, 'dataset.json')):
            return 'array' if os.path.isfile(os.path.join(path, 'images.npy')) else 'folder'
        return None
    if os.path.isfile(path) and zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                return 'zip' if 'dataset.json' in z.namelist() else None
        except (zipfile.BadZipFile, OSError, ValueError):
            return None
    return None


def _has_top_level_images(path: str) -> bool:
    """A folder with a PNG/JPEG directly inside: one directory is scanned, no tree is walked."""
    try:
        with os.scandir(path) as entries:
            return any(e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file() for e in entries)
    except OSError:
        return False


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def originals_path(noisy: 'Dataset', on_missing: Callable[[str], None] = _warn) -> str | None:
    """The clean originals a noisy set's dataset.json names in its field "originals", or None.

    A relative path is relative to the noisy set's own directory. The path must be an image dataset: an
    array dataset or a folder/zip with dataset.json; a relative one may also be a folder with images at its
    top level or a zip. Nothing else is listed or read (a hostile "/usr/share" is refused at once). A path
    that does not exist is not an error (the noisy set stays usable; what compares against the originals
    is skipped): `on_missing` gets a one-line warning and None is returned. Anything else is a UserError.
    """
    value = noisy.metadata.get('originals')
    where = f'field "originals" in the dataset.json of the noisy set {noisy.path}'
    if value is None or value == '':
        return None
    if not isinstance(value, str):
        raise UserError(f'The {where} must be a path (a string), found {value!r}')
    path = value if os.path.isabs(value) else os.path.normpath(os.path.join(noisy.path, value))
    if not os.path.exists(path):
        on_missing(f'Warning: the {where} names {path}, which does not exist (moved or deleted?); '
                   'going on without the originals, so nothing is compared with them')
        return None
    if dataset_kind(path) is None:
        plain = not os.path.isabs(value) and (_has_top_level_images(path) or (os.path.isfile(path) and zipfile.is_zipfile(path)))
        if not plain:
            raise UserError(f'The {where} names {path}, which is not an image dataset (a folder or zip with dataset.json, '
                            'or an array dataset); refusing to read it')
    return path

#----------------------------------------------------------------------------
# Writing array datasets.

def remove_temp_dirs(dest: str) -> None:
    """Remove every temporary directory '.NAME.*.tmp' beside `dest`, live writers' included: for a single
    writer that knows it is alone (SFBD's merge on rank 0). make_temp_dir removes only dead processes' ones."""
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
        check_image_shape(self.dest, self.image_shape)
        if os.path.lexists(self.dest) and not os.path.isdir(self.dest):
            raise UserError(f'{self.dest} exists and is a file; an array dataset is a folder: choose another destination')
        if os.path.exists(self.dest) and not overwrite:
            raise UserError(f'{self.dest} already exists; pass --overwrite to replace it')
        self.metadata = dict(metadata or {})
        self.nbytes = self.num_images * int(np.prod(self.image_shape)) * self.dtype.itemsize
        self._images = None
        with disk_errors(self.dest, self.nbytes):
            self._tmp = make_temp_dir(self.dest)
            try:
                path = os.path.join(self._tmp, 'images.npy')
                self._images = np.lib.format.open_memmap(path, mode='w+', dtype=self.dtype,
                                                         shape=(self.num_images, *self.image_shape))
                with open(path, 'r+b') as f:
                    preallocate(f, self._images.offset, self.nbytes)
            except BaseException:
                self.abort()
                raise
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
        c, h, _w = self.image_shape
        metadata = {'kind': 'array', **self.metadata, 'count': self.num_images, 'dtype': self.dtype.name,
                    'resolution': h, 'channels': c}
        with disk_errors(self.dest, self.nbytes):
            try:
                self._images.flush()
                self._images = None
                with atomic_write(os.path.join(self._tmp, 'dataset.json'), 'w') as f:
                    json.dump(metadata, f, default=json_default)
                atomic_replace_dir(self._tmp, self.dest)
            except BaseException:
                self.abort()
                raise
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
    arrays = [load_npy(path) for path in shards]
    assert arrays and all(a.ndim == 4 and a.shape[1:] == arrays[0].shape[1:] and a.dtype == arrays[0].dtype for a in arrays)
    total = sum(a.shape[0] for a in arrays)
    with ArrayDatasetWriter(dest, total, arrays[0].shape[1:], arrays[0].dtype, metadata, overwrite) as writer:
        start = 0
        for a in arrays:
            for i in range(0, a.shape[0], chunk):
                writer.write(start + i, np.asarray(a[i:i + chunk]))
            start += a.shape[0]
    return writer.dest
