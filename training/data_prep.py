"""Data preparation: convert image sources to the EDM layout, split clean/rest, corrupt once with noise, import, inspect."""

import contextlib
import io
import json
import os
import pickle
import re
import sys
import tarfile
import zipfile
import zlib
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import PIL.Image
import torch

from dnnlib.util import Progress, UserError, atomic_replace_dir, disk_errors, make_temp_dir, remove_path, remove_stale_temps
from torch_utils.rng import StackedRandomGenerator, derive_seed
from training.dataset import (MIN_RESOLUTION, ArrayDataset, ArrayDatasetWriter, ImageFiles, assemble_array_dataset,
                              check_image_shape, check_sigma, dataset_kind, json_default, load_npy, open_dataset,
                              originals_path)
from training.images import to_model_space

CIFAR10_BATCHES = [f'data_batch_{i}' for i in range(1, 6)]
CELEBA_SIZE = (178, 218)
CELEBA_BOX = (25, 57, 153, 185)  # 128x128 box centred at (x 89, y 121): the face crop of DDIM and others
CELEBA_PARTITION = 'list_eval_partition.txt'  # CelebA's official split: 'NAME.jpg P', P = 0 train, 1 validation, 2 test

#----------------------------------------------------------------------------
# Sources: a count, optional labels, and images read one at a time in a fixed order.

class Source:
    """`count` images with optional `labels` (and file `names` for files); `read(indices)` yields (name, PIL
    image, label) for sorted indices."""

    def __init__(self, name: str, count: int, labels: list | None, read: Callable[[Sequence[int]], Iterator],
                 metadata: dict | None = None, names: list[str] | None = None):
        self.name, self.count, self.labels, self.read, self.metadata = name, count, labels, read, metadata or {}
        self.names = names


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
    return Source(path, len(files.names), labels, read, metadata, names=files.names)


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
# CelebA's official training partition.

def read_celeba_partition(path: str) -> dict[str, int]:
    """list_eval_partition.txt ('000001.jpg 0' per line) as {image name: partition}."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f'Cannot read the CelebA partition file {path}: {" ".join(str(e).split())}')
    parts = {}
    for number, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ('0', '1', '2'):
            raise UserError(f'{path}, line {number}: expected "IMAGE.jpg 0|1|2", found {line.strip()[:60]!r}; '
                            f"is it CelebA's {CELEBA_PARTITION}?")
        parts[fields[0]] = int(fields[1])
    if not parts:
        raise UserError(f'The CelebA partition file {path} lists no images')
    return parts


def celeba_training_indices(src: Source, partition: str | None) -> tuple[list[int], dict, str]:
    """Indices of `src`'s images in CelebA's training partition (0), from `partition` or a list_eval_partition.txt
    in the source folder or beside the source zip (all indices when there is none), the metadata to record
    and a line that says what was kept."""
    if partition is None:
        where = src.name if os.path.isdir(src.name) else os.path.dirname(os.path.abspath(src.name))
        found = os.path.join(where, CELEBA_PARTITION)
        if not os.path.isfile(found):
            return list(range(src.count)), {}, (f'No {CELEBA_PARTITION} in {where}: converted all {src.count:,} images '
                                               '(give --partition=PATH to keep only the official training images)')
        partition = found
    elif not os.path.isfile(partition):
        raise UserError(f'--partition={partition}: file not found')
    if src.names is None:
        raise UserError(f'--partition needs a folder or zip of CelebA images, not {src.name}')
    parts = read_celeba_partition(partition)
    unknown = [name for name in src.names if os.path.basename(name) not in parts]
    if unknown:
        raise UserError(f'{len(unknown):,} of the {src.count:,} images in {src.name} are not listed in {partition} '
                        f'(first: {unknown[0]}); is it the partition file of these images?')
    kept = [i for i, name in enumerate(src.names) if parts[os.path.basename(name)] == 0]
    if not kept:
        raise UserError(f'None of the images in {src.name} is in the training partition (0) of {partition}')
    return kept, {'celeba_partition': {'file': os.path.abspath(partition), 'partition': 0, 'kept': len(kept), 'of': src.count}}, \
        f'CelebA partition {partition}: kept {len(kept):,} training images (partition 0) of {src.count:,}'


#----------------------------------------------------------------------------
# Transforms applied to each image before writing.

def parse_resolution(s: str | None) -> tuple[int, int] | None:
    """'64x64' (or '64') -> (64, 64); None stays None."""
    if s is None:
        return None
    m = re.fullmatch(r'\s*(\d+)\s*(?:x\s*(\d+))?\s*', s)
    if not m:
        raise UserError(f'Bad --resolution {s!r}: expected WxH, e.g. 64x64')
    w, h = int(m.group(1)), int(m.group(2) or m.group(1))
    if min(w, h) < MIN_RESOLUTION or max(w, h) > 1 << 14:
        raise UserError(f'--resolution={s} is outside {MIN_RESOLUTION}x{MIN_RESOLUTION} .. 16384x16384: '
                        f'the networks here take at least {MIN_RESOLUTION}x{MIN_RESOLUTION} images')
    return w, h


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

def _replaceable(dest: str) -> bool:
    """What --overwrite may replace: a dataset (see dataset_kind), an empty folder, or a zip file when a zip is written."""
    if dataset_kind(dest) is not None:
        return True
    if os.path.isdir(dest):
        return not os.listdir(dest)
    return dest.lower().endswith('.zip') and zipfile.is_zipfile(dest)


def check_dest(dest: str, sources: Sequence[str], overwrite: bool) -> str:
    """Refuse a destination inside (or equal to) a source, in an unwritable place, or existing (unless overwrite,
    and then only a dataset); delete what killed runs left for it; return its absolute path."""
    dest = os.path.abspath(dest)
    for source in sources:
        src = os.path.realpath(source)
        real = os.path.realpath(dest)
        if real == src or (os.path.isdir(src) and real.startswith(src.rstrip(os.sep) + os.sep)):
            raise UserError(f'Destination {dest} lies inside the source {source}; choose another place')
    parent = os.path.dirname(dest)
    probe = parent
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f'Cannot write {dest}: {probe} is a file, not a folder; choose another place')
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f'Cannot write {dest}: {probe} is not writable; choose a writable place')
    remove_stale_temps(parent, os.path.basename(dest))
    if os.path.lexists(dest):
        if not _replaceable(dest):
            what = 'a folder that is not a dataset (no dataset.json)' if os.path.isdir(dest) else 'a file that is not a dataset'
            raise UserError(f'{dest} exists and is {what}; --overwrite replaces only datasets: choose another place')
        if not overwrite:
            raise UserError(f'{dest} already exists; pass --overwrite to replace it')
    return dest


@contextlib.contextmanager
def staged_output(dest: str, is_dir: bool, needed: Callable[[], int | None] | None = None) -> Iterator[str]:
    """Yield a temporary path beside `dest` (a folder, or a free name for a file); on success move it onto
    `dest` (replacing a folder or file there), on any failure delete it. A full disk is one UserError line
    (`needed()` estimates the size), its free space counted after the temporary is gone."""
    with disk_errors(dest, needed):
        tmp = make_temp_dir(dest)
        try:
            if not is_dir:
                os.rmdir(tmp)
            yield tmp
            atomic_replace_dir(tmp, dest)
        except BaseException:
            remove_path(tmp)
            raise


CONVERT_FIX = 'pass --resolution=WxH (with --transform=center-crop for non-square images)'
SPLIT_FIX = 'split copies images as they are: convert the source to one size first (dataset_tool.py convert --resolution=WxH)'


class Written:
    """Bytes and images written so far; `needed()` extrapolates to the size of all `total` images."""

    def __init__(self, total: int):
        self.total, self.bytes, self.images = total, 0, 0

    def needed(self) -> int | None:
        return self.bytes * self.total // self.images if self.images else None


def write_image_dataset(path: str, as_zip: bool, items: Iterable[tuple[str, PIL.Image.Image, Any]], total: int,
                        metadata: dict | None = None, desc: str = 'Writing', verbose: bool = True,
                        fix: str = CONVERT_FIX, written: Written | None = None) -> None:
    """Write (name, image, label) items as EDM-layout PNGs plus dataset.json; check sizes and channels agree
    (`fix` says how to make them agree); count what was written in `written`."""
    progress = Progress(total, desc, enabled=verbose)
    labels, first = [], None
    written = written or Written(total)
    with contextlib.ExitStack() as stack:
        if as_zip:
            archive = stack.enter_context(zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_STORED))
            write = archive.writestr
        else:
            os.makedirs(path, exist_ok=True)

            def write(name: str, data: bytes) -> None:
                os.makedirs(os.path.dirname(os.path.join(path, name)), exist_ok=True)
                with open(os.path.join(path, name), 'wb') as f:
                    f.write(data)

        def put(name: str, data: bytes) -> None:
            write(name, data)
            written.bytes += len(data)
        for idx, (name, img, label) in enumerate(items):
            if first is None:
                first = (name, img.size, img.mode)
                w, h = img.size
                if w != h or w & (w - 1) != 0:
                    raise UserError(f'Images are {w}x{h} ({name}); output must be square with a power-of-two size: {fix}')
                if w < MIN_RESOLUTION:
                    raise UserError(f'Images are {w}x{h} ({name}); the networks here take at least '
                                    f'{MIN_RESOLUTION}x{MIN_RESOLUTION}: {fix}')
            elif img.size != first[1]:
                raise UserError(f'{name} is {img.size[0]}x{img.size[1]} but {first[0]} is {first[1][0]}x{first[1][1]}; {fix}')
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
            written.images += 1
            progress.update()
        if first is None:
            raise UserError('No images to write')
        info = {'labels': labels or None, **(metadata or {})}
        put('dataset.json', json.dumps(info, default=json_default).encode())

#----------------------------------------------------------------------------
# The subcommands as library functions.

def convert_dataset(source: str, dest: str, resolution: str | None = None, transform: str | None = None,
                    max_images: int | None = None, overwrite: bool = False, verbose: bool = True,
                    partition: str | None = None) -> str:
    """Convert a source (see open_source) into an EDM-layout zip (dest ending .zip) or folder; return dest.

    With transform='celeba', only CelebA's training partition is kept when `partition` (list_eval_partition.txt)
    is given or found in the source folder or beside the source zip.
    """
    if max_images is not None and max_images < 1:
        raise UserError(f'--max-images must be at least 1, got {max_images}')
    if partition is not None and transform != 'celeba':
        raise UserError('--partition (CelebA\'s list_eval_partition.txt) applies only with --transform=celeba')
    apply = make_transform(transform, parse_resolution(resolution))
    dest = check_dest(dest, [] if source == 'sklearn-digits' else [source], overwrite)
    src = open_source(source)
    indices, metadata, kept = celeba_training_indices(src, partition) if transform == 'celeba' else (range(src.count), {}, None)
    indices = indices[:max_images]
    items = ((name, apply(img), label) for name, img, label in src.read(indices))
    as_zip = dest.lower().endswith('.zip')
    written = Written(len(indices))
    with staged_output(dest, is_dir=not as_zip, needed=written.needed) as tmp:
        write_image_dataset(tmp, as_zip, items, len(indices), metadata, desc=f'Converting {source}', verbose=verbose,
                            written=written)
    if kept and verbose:
        print(kept)  # after the work, so that an error stays the only line
    return dest


def _root_indices(source: str, metadata: dict, indices: Sequence[int]) -> tuple[str, list[int]]:
    """The data set at the root of a split chain and `indices` mapped into it, so originals can be matched."""
    parent = metadata.get('source_indices')
    if metadata.get('source') is not None and parent is not None:
        if not isinstance(parent, list) or len(parent) <= max(indices, default=-1) or \
                not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in parent):
            raise UserError(f'dataset.json in {source}: "source_indices" must list one non-negative integer per image; '
                            'the file is damaged or not ours')
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
    _root_indices(source, src.metadata, range(src.count))  # a damaged source_indices fails before anything is written
    count = parse_clean(clean, src.count)
    # RandomState's stream is frozen across numpy versions, so a seed gives the same split everywhere.
    perm = np.random.RandomState(seed % (1 << 32)).permutation(src.count)
    parts = sorted(int(i) for i in perm[:count]), sorted(int(i) for i in perm[count:])
    with contextlib.ExitStack() as stack:
        for dest, indices, what in zip((dest_clean, dest_rest), parts, ('clean', 'rest')):
            as_zip = dest.lower().endswith('.zip')
            written = Written(len(indices))
            tmp = stack.enter_context(staged_output(dest, is_dir=not as_zip, needed=written.needed))
            root, root_indices = _root_indices(source, src.metadata, indices)
            meta = {'split': what, 'seed': seed, 'source': root, 'source_indices': root_indices}
            write_image_dataset(tmp, as_zip, src.read(indices), len(indices), meta,
                                desc=f'Writing {what} set', verbose=verbose, fix=SPLIT_FIX, written=written)
    return parts[0], parts[1]


def _check_array_dest(dest: str) -> None:
    if dest.lower().endswith('.zip'):
        raise UserError(f'--dest={dest}: a noisy set is an array dataset, a folder (images.npy + dataset.json), '
                        'not a zip: give a name without .zip')


def corrupt_dataset(source: str, dest: str, sigma: float, seed: int, dtype: str = 'float32', overwrite: bool = False,
                    chunk: int = 256, verbose: bool = True) -> str:
    """Write source + sigma * N(0, I) once per image (noise keyed by (seed, row)) as a float array dataset.

    Its "originals" is the source: an absolute path if the source is a dataset with dataset.json, else
    (a plain folder or zip of images) a path relative to the noisy set (see dataset.originals_path).
    """
    if dtype not in ('float32', 'float16'):
        raise UserError(f'--dtype must be float32 or float16, got {dtype}')
    sigma = check_sigma(sigma, dtype, '--sigma', 'e.g. 0.2 (25.5 grey levels); large noise needs --dtype=float32')
    if seed < 0:
        raise UserError(f'--seed must be non-negative, got {seed}')
    _check_array_dest(dest)
    dest = check_dest(dest, [source], overwrite)
    ds = open_dataset(source)
    if ds.sigma is not None or (isinstance(ds, ArrayDataset) and ds.dtype.kind == 'f'):
        raise UserError(f'{source} already holds noisy (float) images; corrupt a clean image dataset')
    n = len(ds)
    root, root_indices = _root_indices(source, ds.metadata, range(n))
    labels = ds.raw_labels()
    originals = os.path.abspath(source)
    if dataset_kind(source) is None:
        originals = os.path.relpath(originals, dest)
    meta = {'sigma': sigma, 'seed': int(seed), 'noise': 'x + sigma * randn, generator seeded by derive_seed(seed, row)',
            'source': root, 'source_indices': root_indices, 'originals': originals,
            'labels': None if labels is None else labels.tolist()}
    progress = Progress(n, f'Corrupting {source}', enabled=verbose)
    with ArrayDatasetWriter(dest, n, ds.image_shape, dtype, meta, overwrite=overwrite) as writer:
        for start in range(0, n, chunk):
            rows = range(start, min(start + chunk, n))
            x = to_model_space(torch.from_numpy(np.stack([ds[i][0] for i in rows])))
            noise = StackedRandomGenerator('cpu', [derive_seed(seed, i) for i in rows]).randn(x.shape)
            with np.errstate(over='ignore', invalid='ignore'):
                y = (x + sigma * noise).numpy().astype(dtype)
            bad = y.size - int(np.isfinite(y).sum())
            if bad:
                raise UserError(f'--sigma={sigma:g} gives {bad:,} values that {dtype} cannot hold (inf) in images '
                                f'{rows.start}..{rows.stop - 1}; use a smaller sigma or --dtype=float32')
            writer.write(start, y)
            progress.update(len(rows))
    return dest


def _count_values(array: np.ndarray, lo: float, hi: float, chunk: int = 1 << 22) -> tuple[int, int]:
    """(non-finite values, finite values outside [lo, hi]) of an array, read a chunk of elements at a time."""
    flat = array.reshape(-1)
    nonfinite = outside = 0
    for start in range(0, flat.size, chunk):
        part = np.asarray(flat[start:start + chunk], dtype=np.float32)
        finite = np.isfinite(part)
        nonfinite += part.size - int(finite.sum())
        outside += int(((part < lo) | (part > hi))[finite].sum())
    return nonfinite, outside


def import_noisy(source: str, dest: str, sigma: float, overwrite: bool = False) -> str:
    """Turn a user's own noisy images (.npy, N x C x H x W float in [-1, 1] units) into a noisy array dataset.

    Non-finite values are refused; values further than 10 sigma outside [-1, 1] are counted in a warning.
    """
    if os.path.isdir(source):
        if dataset_kind(source) == 'array':
            raise UserError(f'--source={source} is already an array dataset: use it as it is (a noisy set needs '
                            '"sigma" in its dataset.json)')
        raise UserError(f'--source={source} is a folder; import-noisy takes one .npy file (N x C x H x W float in '
                        '[-1, 1] pixel units)')
    if not os.path.isfile(source):
        raise UserError(f'Source not found: {source}')
    _check_array_dest(dest)
    dest = check_dest(dest, [source], overwrite)
    array = load_npy(source)
    if array.ndim != 4 or array.dtype not in (np.float16, np.float32) or array.shape[0] == 0:
        raise UserError(f'{source} must hold an N x C x H x W float16/float32 array, found {list(array.shape)} {array.dtype}')
    check_image_shape(source, array.shape[1:])
    sigma = check_sigma(sigma, array.dtype, '--sigma', "give your images' noise std, e.g. 0.2 (25.5 grey levels)")
    lo, hi = -1 - 10 * sigma, 1 + 10 * sigma
    nonfinite, outside = _count_values(array, lo, hi)
    if nonfinite:
        raise UserError(f'{source} holds {nonfinite:,} non-finite values (NaN or inf) of {array.size:,}; '
                        'noisy images must be finite numbers')
    if outside:
        print(f'Warning: {outside:,} of the {array.size:,} values in {source} lie outside [-1, 1] +- 10 sigma = '
              f'[{lo:g}, {hi:g}]: are they in [-1, 1] pixel units (uint8 u -> u / 127.5 - 1), and is --sigma right?',
              file=sys.stderr, flush=True)
    meta = {'sigma': sigma, 'seed': None, 'source': os.path.abspath(source), 'originals': None,
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
    for key in ('sigma', 'seed', 'split', 'source'):
        if meta.get(key) is not None:
            info[key] = meta[key]
    if meta.get('originals') is not None:
        missing = []
        try:
            info['originals'] = originals_path(ds, on_missing=missing.append) or f'{meta["originals"]} (missing)'
        except UserError:
            info['originals'] = f'{meta["originals"]!r} (refused: not an image dataset)'
    return info
