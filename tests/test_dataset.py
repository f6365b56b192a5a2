"""training/dataset.py: image folders and zips, memory-mapped array datasets, the writer, pixel units, bad files, originals."""

import errno
import json
import os
import pickle
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

from dnnlib.util import UserError
from training.dataset import (ArrayDataset, ArrayDatasetWriter, ImageFolderDataset, assemble_array_dataset, load_npy, open_dataset,
                              originals_path)
from training.images import to_model_space


def make_folder(root, n=5, size=8, mode='RGB', labels=True):
    """n EDM-layout PNGs whose pixel (0, 0) encodes the index and whose left half is brighter than the right."""
    os.makedirs(os.path.join(root, '00000'))
    entries = []
    for i in range(n):
        x = np.zeros((size, size, 3), np.uint8)
        x[:, : size // 2] = 200
        x[0, 0] = i * 10
        img = PIL.Image.fromarray(x)
        name = f'00000/img{i:08d}.png'
        (img.convert('L') if mode == 'L' else img).save(os.path.join(root, name))
        entries.append([name, i % 3])
    with open(os.path.join(root, 'dataset.json'), 'w') as f:
        json.dump({'labels': entries if labels else None}, f)
    return root


def test_to_model_space():
    u = torch.tensor([0, 255, 128], dtype=torch.uint8)
    assert torch.allclose(to_model_space(u), torch.tensor([-1.0, 1.0, 128 / 127.5 - 1]), atol=1e-6)
    f = torch.tensor([-1.3, 0.5], dtype=torch.float16)
    out = to_model_space(f)
    assert out.dtype == torch.float32 and torch.allclose(out, f.float())


def test_folder_and_zip_give_same_items(tmp_path):
    folder = make_folder(str(tmp_path / 'f'))
    zpath = str(tmp_path / 'd.zip')
    with zipfile.ZipFile(zpath, 'w') as z:
        for root, _dirs, files in os.walk(folder):
            for name in files:
                z.write(os.path.join(root, name), os.path.relpath(os.path.join(root, name), folder))
    a, b = open_dataset(folder, use_labels=True), open_dataset(zpath, use_labels=True)
    assert isinstance(a, ImageFolderDataset) and isinstance(b, ImageFolderDataset)
    assert len(a) == len(b) == 5 and a.resolution == 8 and a.num_channels == 3 and a.label_dim == 3
    for i in range(5):
        (xa, la), (xb, lb) = a[i], b[i]
        assert xa.dtype == np.uint8 and xa.shape == (3, 8, 8) and xa[0, 0, 0] == i * 10
        assert np.array_equal(xa, xb) and np.array_equal(la, lb) and la.argmax() == i % 3
    # Pickled datasets (DataLoader workers) reopen the zip themselves.
    assert np.array_equal(pickle.loads(pickle.dumps(b))[3][0], a[3][0])


def test_xflip_max_size_and_labels(tmp_path):
    folder = make_folder(str(tmp_path / 'f'), n=6)
    ds = open_dataset(folder, xflip=True)
    assert len(ds) == 12 and ds.label_dim == 0 and not ds.has_labels
    x, flipped = ds[2][0], ds[8][0]
    assert np.array_equal(flipped, x[:, :, ::-1]) and x[0, 4, 0] == 200 and flipped[0, 4, 0] == 0
    sub1 = open_dataset(folder, max_size=3, random_seed=5)
    sub2 = open_dataset(folder, max_size=3, random_seed=5)
    picks = [sub1.raw_index(i) for i in range(3)]
    assert len(sub1) == 3 and picks == sorted(set(picks)) and picks == [sub2.raw_index(i) for i in range(3)]
    assert [sub1[i][0][0, 0, 0] for i in range(3)] == [p * 10 for p in picks]
    unlabeled = make_folder(str(tmp_path / 'u'), labels=False)
    with pytest.raises(UserError, match='no labels'):
        open_dataset(unlabeled, use_labels=True)


def test_grey_folder_and_bad_images(tmp_path):
    ds = open_dataset(make_folder(str(tmp_path / 'g'), mode='L'))
    assert ds.num_channels == 1 and ds[0][0].shape == (1, 8, 8)
    folder = make_folder(str(tmp_path / 'm'))
    PIL.Image.new('RGB', (16, 16)).save(os.path.join(folder, '00000', 'img00000009.png'))
    ds = open_dataset(folder)
    with pytest.raises(UserError, match='shape'):
        ds[len(ds) - 1]
    with pytest.raises(UserError, match='not found'):
        open_dataset(str(tmp_path / 'missing'))
    os.makedirs(tmp_path / 'empty')
    with pytest.raises(UserError, match='No PNG or JPEG'):
        open_dataset(str(tmp_path / 'empty'))
    evil = str(tmp_path / 'evil.zip')
    with zipfile.ZipFile(evil, 'w') as z:
        z.writestr('../outside.png', b'x')
    with pytest.raises(UserError, match='escapes'):
        open_dataset(evil)


def test_array_writer_roundtrip_and_memmap(tmp_path):
    dest = str(tmp_path / 'noisy')
    rows = np.random.RandomState(0).randn(7, 3, 8, 8).astype(np.float32)
    with ArrayDatasetWriter(dest, 7, (3, 8, 8), 'float16', {'sigma': 0.2, 'labels': [0, 1, 2, 0, 1, 2, 0]}) as w:
        w.write(4, torch.from_numpy(rows[4:]))
        w.write(0, rows[:4])
    assert sorted(os.listdir(tmp_path)) == ['noisy']
    ds = open_dataset(dest, use_labels=True)
    assert isinstance(ds, ArrayDataset) and isinstance(ds.images, np.memmap)
    assert ds.sigma == 0.2 and ds.dtype == np.float16 and ds.label_dim == 3 and len(ds) == 7
    assert ds.metadata['kind'] == 'array' and ds.metadata['resolution'] == 8 and ds.metadata['channels'] == 3
    x, label = ds[5]
    assert x.dtype == np.float32 and np.allclose(x, rows[5], atol=2e-3) and label.argmax() == 2
    # Workers get the path, not a copy of the array.
    assert len(pickle.dumps(ds)) < rows.nbytes / 2
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=7)))[0]
    assert batch.dtype == torch.float32 and torch.allclose(to_model_space(batch), torch.from_numpy(rows), atol=2e-3)
    cached = open_dataset(dest, cache=True, xflip=True)
    assert len(cached) == 14 and not isinstance(cached.images, np.memmap)
    assert np.array_equal(cached[9][0], cached[2][0][:, :, ::-1])


def test_array_writer_never_leaves_partial_output(tmp_path):
    dest = str(tmp_path / 'out')
    with pytest.raises(ValueError):
        with ArrayDatasetWriter(dest, 4, (1, 4, 4), 'uint8') as w:
            w.write(0, np.zeros((2, 1, 4, 4), np.uint8))
            raise ValueError('interrupted')
    with pytest.raises(RuntimeError, match='never written'):
        with ArrayDatasetWriter(dest, 4, (1, 4, 4), 'uint8') as w:
            w.write(0, np.zeros((2, 1, 4, 4), np.uint8))
    assert os.listdir(tmp_path) == []
    with ArrayDatasetWriter(dest, 1, (1, 4, 4), 'uint8') as w:
        w.write(0, np.zeros((1, 1, 4, 4), np.uint8))
    with pytest.raises(UserError, match='already exists'):
        ArrayDatasetWriter(dest, 1, (1, 4, 4), 'uint8')
    with ArrayDatasetWriter(dest, 2, (1, 4, 4), 'uint8', overwrite=True) as w:
        w.write(0, np.full((2, 1, 4, 4), 7, np.uint8))
    assert len(open_dataset(dest)) == 2 and sorted(os.listdir(tmp_path)) == ['out']


def test_assemble_shards_and_bad_arrays(tmp_path):
    np.save(tmp_path / 's0.npy', np.zeros((2, 1, 4, 4), np.uint8))
    np.save(tmp_path / 's1.npy', np.full((3, 1, 4, 4), 9, np.uint8))
    dest = assemble_array_dataset(str(tmp_path / 'ek'), [str(tmp_path / 's0.npy'), str(tmp_path / 's1.npy')],
                                  {'iteration': np.int64(2)}, chunk=2)
    ds = open_dataset(dest)
    assert ds.images[:, 0, 0, 0].tolist() == [0, 0, 9, 9, 9] and ds.metadata['iteration'] == 2 and ds.sigma is None
    with open(os.path.join(dest, 'images.npy'), 'r+b') as f:
        f.truncate(200)
    with pytest.raises(UserError, match='images.npy is truncated: 200 bytes'):
        open_dataset(dest)

#----------------------------------------------------------------------------
# Full disks, killed writers, files that are not what their names say, hostile dataset.json.

def _enospc(*args):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_writer_preallocates_and_reports_a_full_disk(tmp_path, monkeypatch):
    dest = str(tmp_path / 'noisy')
    w = ArrayDatasetWriter(dest, 64, (3, 32, 32), 'float32')
    images = [os.path.join(tmp_path, n, 'images.npy') for n in os.listdir(tmp_path)][0]
    assert os.stat(images).st_blocks * 512 >= 64 * 3 * 32 * 32 * 4  # reserved now, not at the first write
    w.abort()
    monkeypatch.setattr(os, 'posix_fallocate', _enospc, raising=False)
    with pytest.raises(UserError) as e:
        ArrayDatasetWriter(dest, 64, (3, 32, 32), 'float32')
    assert str(e.value).startswith(f'Cannot write {dest}: No space left on device (it needs about {64 * 3 * 32 * 32 * 4 / 1000:.1f} kB')
    assert os.listdir(tmp_path) == []  # no hidden temporary keeps the disk full


def test_writer_failing_at_the_end_leaves_nothing(tmp_path, monkeypatch):
    import training.dataset as dataset_module

    def read_only(*args):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(dataset_module, 'atomic_replace_dir', read_only)
    with pytest.raises(UserError, match=r'Cannot write .*out: Read-only file system'):
        with ArrayDatasetWriter(str(tmp_path / 'out'), 2, (1, 4, 4), 'uint8') as w:
            w.write(0, np.zeros((2, 1, 4, 4), np.uint8))
    assert os.listdir(tmp_path) == []


def test_remove_temp_dirs_takes_every_temporary_of_its_dest(tmp_path):
    # The SFBD merge's clean-up takes any '.E.*.tmp', a live writer's too (it knows it is alone); make_temp_dir
    # takes only those of dead processes (tests/test_dataset_tool.py kills a run to check that).
    from training.dataset import remove_temp_dirs
    os.makedirs(tmp_path / '.E.abc123.tmp')
    live = ArrayDatasetWriter(str(tmp_path / 'E'), 1, (1, 4, 4), 'uint8')
    os.makedirs(tmp_path / '.F.abc123.tmp')
    assert len(os.listdir(tmp_path)) == 3
    remove_temp_dirs(str(tmp_path / 'E'))
    assert os.listdir(tmp_path) == ['.F.abc123.tmp']
    live.abort()


def test_files_that_are_not_what_their_names_say(tmp_path):
    (tmp_path / 'text.npy').write_text('hello')
    np.savez(tmp_path / 'two.npz', a=np.zeros(2))
    os.rename(tmp_path / 'two.npz', tmp_path / 'two.npy')
    np.save(tmp_path / 'obj.npy', np.array([{}], dtype=object), allow_pickle=True)
    np.save(tmp_path / 'full.npy', np.zeros((4, 1, 8, 8), np.float32))
    (tmp_path / 'short.npy').write_bytes((tmp_path / 'full.npy').read_bytes()[:300])
    for name, message in [('text.npy', 'is not a .npy file'), ('two.npy', 'is an .npz archive'),
                          ('obj.npy', 'holds Python objects'), ('short.npy', 'is truncated: 300 bytes')]:
        with pytest.raises(UserError, match=message):
            load_npy(str(tmp_path / name))
    assert 'pickle' not in str(pytest.raises(UserError, load_npy, str(tmp_path / 'text.npy')).value)
    folder = make_folder(str(tmp_path / 'f'))
    zpath = str(tmp_path / 'd.zip')
    with zipfile.ZipFile(zpath, 'w') as z:
        z.write(os.path.join(folder, 'dataset.json'), 'dataset.json')
        z.write(os.path.join(folder, '00000', 'img00000000.png'), '00000/img00000000.png')
    data = open(zpath, 'rb').read()
    (tmp_path / 'cut.zip').write_bytes(data[: len(data) - 30])
    PIL.Image.new('RGB', (8, 8)).save(tmp_path / 'one.png')
    import tarfile
    with tarfile.open(tmp_path / 'a.tar.gz', 'w:gz') as tar:
        tar.add(folder, 'f')
    for name, message in [('cut.zip', 'damaged or truncated zip'), ('full.npy', 'is a .npy file; an array dataset is a folder'),
                          ('a.tar.gz', 'compressed archive'), ('one.png', 'a single image')]:
        with pytest.raises(UserError, match=message):
            open_dataset(str(tmp_path / name))


def _array_set(path, meta=None, shape=(3, 1, 8, 8), dtype=np.float32):
    os.makedirs(path)
    np.save(os.path.join(path, 'images.npy'), np.zeros(shape, dtype))
    with open(os.path.join(path, 'dataset.json'), 'w') as f:
        json.dump({'kind': 'array', 'count': shape[0], **(meta or {})}, f)
    return str(path)


@pytest.mark.parametrize('meta,shape,message', [
    ({'sigma': 'abc'}, (3, 1, 8, 8), '"sigma" in the dataset.json of .* must be a positive finite number'),
    ({'sigma': 1e308}, (3, 1, 8, 8), '"sigma" in .* is 1e\\+308, whose noise overflows float32'),
    ({'sigma': True}, (3, 1, 8, 8), 'must be a positive finite number'),
    ({'count': 5}, (3, 1, 8, 8), 'says "count" is 5 but images.npy holds 3'),
    ({'resolution': 16}, (3, 1, 8, 8), 'says "resolution" is 16'),
    ({'source_indices': [0, 1]}, (3, 1, 8, 8), '"source_indices" in the dataset.json of .* are not 3'),
    ({}, (3, 1, 2, 2), 'below 4x4'),
])
def test_hostile_dataset_json(tmp_path, meta, shape, message):
    path = _array_set(tmp_path / 'bad', meta, shape)
    with pytest.raises(UserError, match=message):
        open_dataset(path)


def test_labels_that_are_no_labels(tmp_path):
    ds = open_dataset(_array_set(tmp_path / 'bad', {'labels': 'abc'}))
    with pytest.raises(UserError, match='"labels" must list one label per image'):
        ds.raw_labels()

#----------------------------------------------------------------------------
# The originals a noisy set names.

def _noisy(path, originals):
    return open_dataset(_array_set(path, {'sigma': 0.2, 'originals': originals}))


def test_originals_resolve_against_the_noisy_set_not_the_cwd(tmp_path, monkeypatch):
    clean = make_folder(str(tmp_path / 'data' / 'rest'))
    noisy = _noisy(tmp_path / 'data' / 'noisy', '../rest')
    monkeypatch.chdir(tmp_path)  # '../rest' from here would be elsewhere
    assert originals_path(noisy) == os.path.join(str(tmp_path / 'data'), 'rest')
    assert originals_path(_noisy(tmp_path / 'n2', clean)) == clean  # absolute, a dataset with dataset.json
    plain = str(tmp_path / 'data' / 'plain')
    os.makedirs(plain)
    PIL.Image.new('RGB', (8, 8)).save(os.path.join(plain, 'a.png'))
    assert originals_path(_noisy(tmp_path / 'n3', '../data/plain')) == plain  # relative: a plain image folder too
    assert originals_path(_noisy(tmp_path / 'n4', None)) is None


def test_originals_that_are_not_a_dataset_are_refused_unread(tmp_path, monkeypatch):
    def no_walk(*args, **kwargs):
        raise AssertionError('walked a directory')
    monkeypatch.setattr(os, 'walk', no_walk)
    plain = str(tmp_path / 'plain')
    os.makedirs(os.path.join(plain, 'sub'))
    PIL.Image.new('RGB', (8, 8)).save(os.path.join(plain, 'a.png'))
    for i, value in enumerate(['/usr/share', '/etc/passwd', '/', plain, '../../../../../../../../usr', '../plain/sub']):
        noisy = _noisy(tmp_path / f'n{i}', value)
        with pytest.raises(UserError) as e:
            originals_path(noisy)
        text = str(e.value)
        assert 'field "originals"' in text and noisy.path in text and 'not an image dataset' in text, text
    noisy = _noisy(tmp_path / 'n9', ['a', 'b'])
    with pytest.raises(UserError, match='field "originals" in the dataset.json of the noisy set .* must be a path'):
        originals_path(noisy)


def test_missing_originals_are_one_warning(tmp_path, capsys):
    noisy = _noisy(tmp_path / 'noisy', 'gone')
    notes = []
    assert originals_path(noisy, on_missing=notes.append) is None
    assert len(notes) == 1 and notes[0].startswith('Warning: the field "originals" in the dataset.json of the noisy set')
    assert os.path.join(noisy.path, 'gone') in notes[0] and 'does not exist' in notes[0]
    assert originals_path(noisy) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == notes[0]  # printed by default, to stderr
