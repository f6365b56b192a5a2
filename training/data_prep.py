"""Data preparation: convert image sources to the EDM layout, split clean/rest, corrupt once with noise, import, inspect."""

import contextlib
import io
import json
import math
import os
import pickle
import re
import shutil
import tarfile
import zipfile
import zlib
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import PIL.Image
import torch

from dnnlib.util import Progress, UserError, atomic_replace_dir
from torch_utils.rng import StackedRandomGenerator, derive_seed
from training.dataset import ArrayDataset, ArrayDatasetWriter, ImageFiles, assemble_array_dataset, json_default, make_temp_dir, open_dataset
from training.images import to_model_space

CIFAR10_BATCHES = [f'data_batch_{i}' for i in range(1, 6)]
CELEBA_SIZE = (178, 218)
CELEBA_BOX = (25, 57, 153, 185)  # 128x128 box centred at (x 89, y 121): the face crop of DDIM and others

#----------------------------------------------------------------------------
# Sources: a count, optional labels, and images read one at a time in a fixed order.

class Source:
    """`count` images with optional `labels`; `read(indices)` yields (name, PIL image, label) for sorted indices."""

    def __init__(self, name: str, count: int, labels: list | None, read: Callable[[Sequence[int]], Iterator],
                 metadata: dict | None = None):
        self.name, self.count, self.labels, self.read, self.metadata = name, count, labels, read, metadata or {}


class _CifarUnpickler(pickle.Unpickler):
    """Reads CIFAR-10 batches allowing only numpy array reconstruction, so no code from the file can run."""
    _allowed = {(m, n) for m in ('numpy.core.multiarray', 'numpy._core.multiarray') for n in ('_reconstruct', 'scalar')} | \
               {('numpy.core.numeric', '_frombuffer'), ('numpy._core.numeric', '_frombuffer'),
                ('numpy', 'ndarray'), ('numpy', 'dtype'), ('_codecs', 'encode')}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._allowed:
            raise pickle.UnpicklingError(f'{module}.{name} is not allowed in a CIFAR-10 batch')
        return super().find_class(module, name)


def _cifar10_batches(path: str) -> Iterator[tuple[np.ndarray, list[int]]]:
    """(images n x 3 x 32 x 32 uint8, labels) of data_batch_1..5, one batch in memory at a time."""
    try:
        with contextlib.ExitStack() as stack:
            if os.path.isdir(path):
                open_member = lambda name: stack.enter_context(open(os.path.join(path, name), 'rb'))
                present = set(os.listdir(path))
            else:
                tar = stack.enter_context(tarfile.open(path))
                members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
                open_member = lambda name: tar.extractfile(members[name])
                present = set(members)
            missing = [b for b in CIFAR10_BATCHES if b not in present]
            if missing:
                raise UserError(f'{path} is not the CIFAR-10 python version: {", ".join(missing)} missing')
            for name in CIFAR10_BATCHES:
                batch = _CifarUnpickler(open_member(name), encoding='bytes').load()
                data = batch.get(b'data') if isinstance(batch, dict) else None
                labels = batch.get(b'labels') if isinstance(batch, dict) else None
                if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or \
                        data.shape[1] != 3072 or labels is None or len(labels) != data.shape[0]:
                    raise UserError(f'{name} in {path} is not a CIFAR-10 batch (b"data" uint8 N x 3072, b"labels")')
                yield data.reshape(-1, 3, 32, 32), [int(x) for x in labels]
    except (tarfile.TarError, OSError, EOFError, zlib.error, pickle.UnpicklingError, ValueError, TypeError) as e:
        raise UserError(f'Cannot read CIFAR-10 data from {path}: {" ".join(str(e).split()) or type(e).__name__}')


def _cifar10_source(path: str) -> Source:
    labels = [label for _images, batch_labels in _cifar10_batches(path) for label in batch_labels]

    def read(indices: Sequence[int]) -> Iterator:
        wanted, pos, start = list(indices), 0, 0
        for images, batch_labels in _cifar10_batches(path):
            if pos == len(wanted):
                return
            while pos < len(wanted) and wanted[pos] < start + len(images):
                i = wanted[pos]
                yield f'image {i}', PIL.Image.fromarray(images[i - start].transpose(1, 2, 0)), batch_labels[i - start]
                pos += 1
            start += len(images)
    return Source(path, len(labels), labels, read)


def _digits_source() -> Source:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).clip(0, 255).astype(np.uint8)
    labels = [int(x) for x in digits.target]

    def read(indices: Sequence[int]) -> Iterator:
        for i in indices:
            yield f'digit {i}', PIL.Image.fromarray(images[i], mode='L'), labels[i]
    return Source('sklearn-digits', len(images), labels, read)


def _files_source(path: str) -> Source:
    files = ImageFiles(path)
    if not files.names:
        raise UserError(f'No PNG or JPEG images found in {path}')
    metadata = files.read_json() or {}
    labels = None
    if metadata.get('labels') is not None:
        try:
            by_name = dict(metadata['labels'])
            labels = [by_name[name] for name in files.names]
        except (TypeError, ValueError, KeyError):
            raise UserError(f'dataset.json in {path}: "labels" must give [file name, label] for every image')

    def read(indices: Sequence[int]) -> Iterator:
        try:
            for i in indices:
                name = files.names[i]
                yield name, files.load_image(name), None if labels is None else labels[i]
        finally:
            files.close()
    return Source(path, len(files.names), labels, read, metadata)


def open_source(source: str) -> Source:
    """A conversion source: 'sklearn-digits', a CIFAR-10 python tarball or folder, or a folder/zip of images."""
    if source == 'sklearn-digits':
        return _digits_source()
    if not os.path.exists(source):
        raise UserError(f'Source not found: {source}')
    if os.path.isdir(source) and os.path.isfile(os.path.join(source, 'data_batch_1')):
        return _cifar10_source(source)
    if os.path.isfile(source) and not zipfile.is_zipfile(source) and tarfile.is_tarfile(source):
        return _cifar10_source(source)
    return _files_source(source)

#----------------------------------------------------------------------------
# Transforms applied to each image before writing.

def parse_resolution(s: str | None) -> tuple[int, int] | None:
    """'64x64' (or '64') -> (64, 64); None stays None."""
    if s is None:
        return None
    m = re.fullmatch(r'\s*(\d+)\s*(?:x\s*(\d+))?\s*', s)
    if not m or int(m.group(1)) == 0 or int(m.group(2) or 1) == 0:
        raise UserError(f'Bad resolution {s!r}: expected WxH, e.g. 64x64')
    return int(m.group(1)), int(m.group(2) or m.group(1))


def make_transform(transform: str | None, resolution: tuple[int, int] | None) -> Callable[[PIL.Image.Image], PIL.Image.Image]:
    """A per-image function: plain resize, center-crop, center-crop-wide (padded to square) or the CelebA crop."""
    if transform in ('center-crop', 'center-crop-wide') and resolution is None:
        raise UserError(f'--transform={transform} needs --resolution=WxH')
    if transform == 'celeba':
        resolution = resolution or (64, 64)
    if transform not in (None, 'center-crop', 'center-crop-wide', 'celeba'):
        raise UserError(f'Unknown transform {transform!r}')

    def resize(img: PIL.Image.Image, size: tuple[int, int]) -> PIL.Image.Image:
        return img if img.size == size else img.resize(size, PIL.Image.LANCZOS)

    def apply(img: PIL.Image.Image) -> PIL.Image.Image:
        w, h = img.size
        if transform is None:
            return img if resolution is None else resize(img, resolution)
        if transform == 'celeba':
            if (w, h) != CELEBA_SIZE:
                raise UserError(f'--transform=celeba expects aligned CelebA images of 178x218, found {w}x{h}')
            return resize(img.crop(CELEBA_BOX), resolution)
        if transform == 'center-crop':
            s = min(w, h)
            return resize(img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)), resolution)
        # center-crop-wide: keep the output's aspect ratio, then pad top and bottom to a square.
        rw, rh = resolution
        cw, ch = (w, round(w * rh / rw)) if w * rh <= h * rw else (round(h * rw / rh), h)
        img = resize(img.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)), resolution)
        canvas = PIL.Image.new(img.mode, (rw, rw))
        canvas.paste(img, (0, (rw - rh) // 2))
        return canvas
    return apply

#----------------------------------------------------------------------------
# Output: staged under a temporary name, renamed into place only when complete.

def check_dest(dest: str, sources: Sequence[str], overwrite: bool) -> str:
    """Refuse an existing destination (unless overwrite) or one inside (or equal to) a source; return its absolute path."""
    dest = os.path.abspath(dest)
    for source in sources:
        src = os.path.realpath(source)
        real = os.path.realpath(dest)
        if real == src or (os.path.isdir(src) and real.startswith(src.rstrip(os.sep) + os.sep)):
            raise UserError(f'Destination {dest} lies inside the source {source}; choose another place')
    if os.path.exists(dest) and not overwrite:
        raise UserError(f'{dest} already exists; pass --overwrite to replace it')
    return dest


@contextlib.contextmanager
def staged_output(dest: str, is_dir: bool) -> Iterator[str]:
    """Yield a temporary path beside `dest`; on success move it onto `dest`, on failure delete it."""
    tmp = make_temp_dir(dest)
    try:
        if not is_dir:
            os.rmdir(tmp)
        yield tmp
        if is_dir and os.path.isdir(dest):
            atomic_replace_dir(tmp, dest)
        else:
            # --overwrite across kinds (folder <-> zip): drop the old one, then rename.
            if os.path.isdir(dest):
                shutil.rmtree(dest)
            elif is_dir and os.path.lexists(dest):
                os.remove(dest)
            os.replace(tmp, dest)
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_image_dataset(path: str, as_zip: bool, items: Iterable[tuple[str, PIL.Image.Image, Any]], total: int,
                        metadata: dict | None = None, desc: str = 'Writing', verbose: bool = True) -> None:
    """Write (name, image, label) items as EDM-layout PNGs plus dataset.json; check sizes and channels agree."""
    progress = Progress(total, desc, enabled=verbose)
    labels, first = [], None
    with contextlib.ExitStack() as stack:
        if as_zip:
            archive = stack.enter_context(zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_STORED))
            put = archive.writestr
        else:
            os.makedirs(path, exist_ok=True)

            def put(name: str, data: bytes) -> None:
                os.makedirs(os.path.dirname(os.path.join(path, name)), exist_ok=True)
                with open(os.path.join(path, name), 'wb') as f:
                    f.write(data)
        for idx, (name, img, label) in enumerate(items):
            if first is None:
                first = (name, img.size, img.mode)
                w, h = img.size
                if w != h or w & (w - 1) != 0:
                    raise UserError(f'Images are {w}x{h}; output must be square with a power-of-two size: '
                                    'pass e.g. --resolution=64x64 --transform=center-crop')
            elif img.size != first[1]:
                raise UserError(f'{name} is {img.size[0]}x{img.size[1]} but {first[0]} is {first[1][0]}x{first[1][1]}; '
                                'pass --resolution=WxH to resize all images to one size')
            elif img.mode != first[2]:
                kind = {'L': 'grayscale', 'RGB': 'RGB'}
                raise UserError(f'{name} is {kind[img.mode]} but {first[0]} is {kind[first[2]]}; '
                                'convert all images to one color mode first')
            fname = f'{idx // 1000:05d}/img{idx:08d}.png'
            buf = io.BytesIO()
            img.save(buf, format='png', compress_level=1)
            put(fname, buf.getvalue())
            if label is not None:
                labels.append([fname, label])
            progress.update()
        if first is None:
            raise UserError('No images to write')
        info = {'labels': labels or None, **(metadata or {})}
        put('dataset.json', json.dumps(info, default=json_default).encode())

#----------------------------------------------------------------------------
# The subcommands as library functions.

def convert_dataset(source: str, dest: str, resolution: str | None = None, transform: str | None = None,
                    max_images: int | None = None, overwrite: bool = False, verbose: bool = True) -> str:
    """Convert a source (see open_source) into an EDM-layout zip (dest ending .zip) or folder; return dest."""
    if max_images is not None and max_images < 1:
        raise UserError(f'--max-images must be at least 1, got {max_images}')
    apply = make_transform(transform, parse_resolution(resolution))
    dest = check_dest(dest, [] if source == 'sklearn-digits' else [source], overwrite)
    src = open_source(source)
    count = src.count if max_images is None else min(src.count, max_images)
    items = ((name, apply(img), label) for name, img, label in src.read(range(count)))
    as_zip = dest.lower().endswith('.zip')
    with staged_output(dest, is_dir=not as_zip) as tmp:
        write_image_dataset(tmp, as_zip, items, count, desc=f'Converting {source}', verbose=verbose)
    return dest


def _root_indices(source: str, metadata: dict, indices: Sequence[int]) -> tuple[str, list[int]]:
    """The data set at the root of a split chain and `indices` mapped into it, so originals can be matched."""
    parent = metadata.get('source_indices')
    if metadata.get('source') is not None and parent is not None:
        return metadata['source'], [int(parent[i]) for i in indices]
    return os.path.abspath(source), [int(i) for i in indices]


def parse_clean(clean: str | float | int, total: int) -> int:
    """'50' -> 50 images; '0.04' -> 4% of `total` (rounded); the rest must keep at least one image."""
    text = str(clean).strip()
    try:
        value = float(text)
    except ValueError:
        raise UserError(f'Bad --clean {clean!r}: give a count (e.g. 50) or a fraction (e.g. 0.04)')
    if re.fullmatch(r'\d+', text):
        count = int(text)
    elif 0 < value < 1:
        count = max(1, int(round(value * total)))
    else:
        raise UserError(f'Bad --clean {clean!r}: a fraction must lie strictly between 0 and 1')
    if count < 1:
        raise UserError('--clean must select at least one image')
    if count >= total:
        raise UserError(f'--clean={clean} asks for {count} clean images but the data set holds {total}; '
                        'at least one must remain for the noisy set')
    return count


def split_dataset(source: str, clean: str | float | int, seed: int, dest_clean: str, dest_rest: str,
                  overwrite: bool = False, verbose: bool = True) -> tuple[list[int], list[int]]:
    """Split an image dataset into a seeded random clean subset and the rest; return both index lists."""
    if os.path.abspath(dest_clean) == os.path.abspath(dest_rest):
        raise UserError('--dest-clean and --dest-rest must differ')
    dest_clean = check_dest(dest_clean, [source], overwrite)
    dest_rest = check_dest(dest_rest, [source], overwrite)
    if os.path.isdir(source) and os.path.isfile(os.path.join(source, 'images.npy')):
        raise UserError(f'{source} is an array dataset; split takes a clean image folder or zip (see convert)')
    if not os.path.exists(source):
        raise UserError(f'Source not found: {source}')
    src = _files_source(source)
    count = parse_clean(clean, src.count)
    # RandomState's stream is frozen across numpy versions, so a seed gives the same split everywhere.
    perm = np.random.RandomState(seed % (1 << 32)).permutation(src.count)
    parts = sorted(int(i) for i in perm[:count]), sorted(int(i) for i in perm[count:])
    with contextlib.ExitStack() as stack:
        for dest, indices, what in zip((dest_clean, dest_rest), parts, ('clean', 'rest')):
            as_zip = dest.lower().endswith('.zip')
            tmp = stack.enter_context(staged_output(dest, is_dir=not as_zip))
            root, root_indices = _root_indices(source, src.metadata, indices)
            meta = {'split': what, 'seed': seed, 'source': root, 'source_indices': root_indices}
            write_image_dataset(tmp, as_zip, src.read(indices), len(indices), meta,
                                desc=f'Writing {what} set', verbose=verbose)
    return parts[0], parts[1]


def corrupt_dataset(source: str, dest: str, sigma: float, seed: int, dtype: str = 'float32', overwrite: bool = False,
                    chunk: int = 256, verbose: bool = True) -> str:
    """Write source + sigma * N(0, I) once per image (noise keyed by (seed, row)) as a float array dataset."""
    if not (sigma > 0 and math.isfinite(sigma)):
        raise UserError(f'--sigma must be a positive number in [-1, 1] pixel units, got {sigma}')
    if seed < 0:
        raise UserError(f'--seed must be non-negative, got {seed}')
    if dtype not in ('float32', 'float16'):
        raise UserError(f'--dtype must be float32 or float16, got {dtype}')
    dest = check_dest(dest, [source], overwrite)
    ds = open_dataset(source)
    if ds.sigma is not None or (isinstance(ds, ArrayDataset) and ds.dtype.kind == 'f'):
        raise UserError(f'{source} already holds noisy (float) images; corrupt a clean image dataset')
    n = len(ds)
    root, root_indices = _root_indices(source, ds.metadata, range(n))
    labels = ds.raw_labels()
    meta = {'sigma': float(sigma), 'seed': int(seed), 'noise': 'x + sigma * randn, generator seeded by derive_seed(seed, row)',
            'source': root, 'source_indices': root_indices, 'originals': os.path.abspath(source),
            'labels': None if labels is None else labels.tolist()}
    progress = Progress(n, f'Corrupting {source}', enabled=verbose)
    with ArrayDatasetWriter(dest, n, ds.image_shape, dtype, meta, overwrite=overwrite) as writer:
        for start in range(0, n, chunk):
            rows = range(start, min(start + chunk, n))
            x = to_model_space(torch.from_numpy(np.stack([ds[i][0] for i in rows])))
            noise = StackedRandomGenerator('cpu', [derive_seed(seed, i) for i in rows]).randn(x.shape)
            writer.write(start, (x + sigma * noise).numpy().astype(dtype))
            progress.update(len(rows))
    return dest


def import_noisy(source: str, dest: str, sigma: float, overwrite: bool = False) -> str:
    """Turn a user's own noisy images (.npy, N x C x H x W float in [-1, 1] units) into a noisy array dataset."""
    if not (sigma > 0 and math.isfinite(sigma)):
        raise UserError(f'--sigma must be a positive number in [-1, 1] pixel units, got {sigma}')
    if not os.path.isfile(source):
        raise UserError(f'Source not found: {source}')
    dest = check_dest(dest, [source], overwrite)
    try:
        array = np.load(source, mmap_mode='r', allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f'Cannot read {source} as a .npy array: {" ".join(str(e).split())}')
    if not isinstance(array, np.ndarray) or array.ndim != 4 or array.dtype not in (np.float16, np.float32) or array.shape[0] == 0:
        found = f'{list(array.shape)} {array.dtype}' if isinstance(array, np.ndarray) else 'an .npz archive'
        raise UserError(f'{source} must hold an N x C x H x W float16/float32 array, found {found}')
    meta = {'sigma': float(sigma), 'seed': None, 'source': os.path.abspath(source), 'originals': None,
            'source_indices': list(range(array.shape[0])), 'labels': None}
    return assemble_array_dataset(dest, [source], meta, overwrite=overwrite)


def dataset_info(path: str) -> dict:
    """What a dataset holds: kind, count, resolution, channels, dtype, labels, sigma and provenance."""
    ds = open_dataset(path)
    meta = ds.metadata
    if isinstance(ds, ArrayDataset):
        kind = 'noisy array' if ds.sigma is not None else 'array'
        dtype = ds.dtype.name
    else:
        kind = 'image zip' if os.path.isfile(path) else 'image folder'
        dtype = 'uint8'
    labels = ds.raw_labels()
    if labels is None:
        label_text = 'none'
    elif labels.ndim == 1:
        label_text = f'{len(np.unique(labels))} classes'
    else:
        label_text = f'vectors of {labels.shape[1]}'
    info = {'kind': kind, 'count': len(ds), 'resolution': f'{ds.resolution}x{ds.resolution}',
            'channels': ds.num_channels, 'dtype': dtype, 'labels': label_text}
    for key in ('sigma', 'seed', 'split', 'source', 'originals'):
        if meta.get(key) is not None:
            info[key] = meta[key]
    return info
