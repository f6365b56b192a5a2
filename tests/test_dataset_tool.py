"""dataset_tool.py: convert, split, corrupt, info on tiny synthetic inputs; every bad input fails cleanly."""

import errno
import io
import json
import os
import pickle
import re
import shutil
import tarfile
import zipfile

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import dataset_tool
from training import data_prep
from training.dataset import open_dataset


def make_cifar_tarball(path, per_batch=4, seed=0):
    """A tarball in CIFAR-10's python format (protocol-2 pickles, as the real one); returns images and labels."""
    rng = np.random.RandomState(seed)
    images, labels = [], []
    with tarfile.open(path, 'w:gz') as tar:
        for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
            data = rng.randint(0, 256, (per_batch, 3072)).astype(np.uint8)
            lab = [int(x) for x in rng.randint(0, 10, per_batch)]
            if name != 'test_batch':
                images.append(data.reshape(-1, 3, 32, 32))
                labels += lab
            blob = pickle.dumps({b'batch_label': name.encode(), b'labels': lab, b'data': data}, protocol=2)
            info = tarfile.TarInfo(f'cifar-10-batches-py/{name}')
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return np.concatenate(images), labels


def make_faces(root, n=4, ext='png', size=(178, 218)):
    """Face-sized images: black, except the CelebA crop box, which is white."""
    os.makedirs(root, exist_ok=True)
    for i in range(n):
        x = np.zeros((size[1], size[0], 3), np.uint8)
        x[57:185, 25:153] = 255
        x[0, 0, 0] = i
        PIL.Image.fromarray(x).save(os.path.join(root, f'{i:06d}.{ext}'), quality=95)
    return root


def make_small(root, n=6, size=8):
    os.makedirs(root, exist_ok=True)
    for i in range(n):
        PIL.Image.fromarray(np.full((size, size, 3), i * 20 % 240, np.uint8)).save(os.path.join(root, f'{i:03d}.png'))
    return root


def run(*args):
    return CliRunner().invoke(dataset_tool.main, [str(a) for a in args])

#----------------------------------------------------------------------------

def test_convert_cifar10_keeps_images_and_labels(tmp_path):
    images, labels = make_cifar_tarball(tmp_path / 'cifar-10-python.tar.gz')
    res = run('convert', f'--source={tmp_path / "cifar-10-python.tar.gz"}', f'--dest={tmp_path / "c.zip"}')
    assert res.exit_code == 0, res.output
    ds = open_dataset(str(tmp_path / 'c.zip'), use_labels=True)
    assert len(ds) == 20 and ds.resolution == 32 and ds.num_channels == 3
    assert ds.image_names[0] == '00000/img00000000.png'
    for i in (0, 7, 19):
        assert np.array_equal(ds[i][0], images[i]) and ds[i][1].argmax() == labels[i]
    assert ds.raw_labels().tolist() == labels
    # --max-images takes the first N in order.
    data_prep.convert_dataset(str(tmp_path / 'cifar-10-python.tar.gz'), str(tmp_path / 'c5'), max_images=5, verbose=False)
    assert len(open_dataset(str(tmp_path / 'c5'))) == 5


def test_convert_celeba_crop_folder_and_zip(tmp_path):
    faces = make_faces(str(tmp_path / 'img_align_celeba'), ext='jpg')
    dest = data_prep.convert_dataset(faces, str(tmp_path / 'celeba.zip'), resolution='16x16', transform='celeba', verbose=False)
    ds = open_dataset(dest)
    assert len(ds) == 4 and ds.resolution == 16 and not ds.has_labels
    assert ds[2][0].min() > 240  # exactly the white box: the crop is (25, 57)-(153, 185)
    zpath = str(tmp_path / 'faces.zip')
    with zipfile.ZipFile(zpath, 'w') as z:
        for name in sorted(os.listdir(faces)):
            z.write(os.path.join(faces, name), f'img_align_celeba/{name}')
    data_prep.convert_dataset(zpath, str(tmp_path / 'cc'), resolution='32x32', transform='center-crop', verbose=False)
    assert open_dataset(str(tmp_path / 'cc'))[0][0].shape == (3, 32, 32)
    data_prep.convert_dataset(zpath, str(tmp_path / 'wide'), resolution='32x16', transform='center-crop-wide', verbose=False)
    wide = open_dataset(str(tmp_path / 'wide'))[0][0]
    assert wide.shape == (3, 32, 32) and wide[:, :8].max() == 0 and wide[:, 24:].max() == 0  # padded rows


def test_convert_folder_labels_and_digits(tmp_path):
    src = make_small(str(tmp_path / 'src'))
    with open(os.path.join(src, 'dataset.json'), 'w') as f:
        json.dump({'labels': [[f'{i:03d}.png', 5 - i] for i in range(6)]}, f)
    ds = open_dataset(data_prep.convert_dataset(src, str(tmp_path / 'out'), verbose=False), use_labels=True)
    assert ds.raw_labels().tolist() == [5, 4, 3, 2, 1, 0] and ds[3][0][0, 0, 0] == 60
    res = run('convert', '--source=sklearn-digits', f'--dest={tmp_path / "digits.zip"}')
    assert res.exit_code == 0, res.output
    digits = open_dataset(str(tmp_path / 'digits.zip'), use_labels=True)
    assert len(digits) == 1797 and digits.resolution == 8 and digits.num_channels == 1 and digits.label_dim == 10
    from sklearn.datasets import load_digits
    raw = load_digits()
    assert np.array_equal(digits[5][0][0], np.round(raw.images[5] * 255 / 16)) and digits.raw_labels()[5] == raw.target[5]
    info = run('info', tmp_path / 'digits.zip')
    assert info.exit_code == 0 and 'count:      1797' in info.output and '10 classes' in info.output


def test_split_is_disjoint_complete_reproducible(tmp_path):
    src = data_prep.convert_dataset(make_small(str(tmp_path / 'src'), n=20), str(tmp_path / 'all.zip'), verbose=False)
    res = run('split', f'--source={src}', '--clean=0.25', '--seed=3', f'--dest-clean={tmp_path / "clean.zip"}',
              f'--dest-rest={tmp_path / "rest"}')
    assert res.exit_code == 0, res.output
    clean, rest = open_dataset(str(tmp_path / 'clean.zip')), open_dataset(str(tmp_path / 'rest'))
    ci, ri = clean.metadata['source_indices'], rest.metadata['source_indices']
    assert len(ci) == len(clean) == 5 and len(ri) == len(rest) == 15
    assert set(ci).isdisjoint(ri) and sorted(ci + ri) == list(range(20)) and clean.metadata['source'] == src
    assert all(clean[k][0][0, 0, 0] == i * 20 % 240 for k, i in enumerate(ci))  # pixels follow the indices
    again = data_prep.split_dataset(src, '5', 3, str(tmp_path / 'c2'), str(tmp_path / 'r2'), verbose=False)
    other = data_prep.split_dataset(src, 5, 4, str(tmp_path / 'c3'), str(tmp_path / 'r3'), verbose=False)
    assert again == (ci, ri) and other[0] != ci
    # Splitting the rest again maps indices back to the root data set.
    data_prep.split_dataset(str(tmp_path / 'rest'), 3, 0, str(tmp_path / 'c4'), str(tmp_path / 'r4'), verbose=False)
    sub = open_dataset(str(tmp_path / 'c4')).metadata
    assert sub['source'] == src and set(sub['source_indices']) <= set(ri)


def test_corrupt_noise_statistics_and_chunk_independence(tmp_path):
    src = data_prep.convert_dataset(make_small(str(tmp_path / 'src'), n=12, size=16), str(tmp_path / 'all'), verbose=False)
    data_prep.split_dataset(src, 2, 0, str(tmp_path / 'clean'), str(tmp_path / 'rest'), verbose=False)
    rest = str(tmp_path / 'rest')
    res = run('corrupt', f'--source={rest}', '--sigma=0.5', '--seed=7', f'--dest={tmp_path / "n1"}')
    assert res.exit_code == 0, res.output
    n1 = open_dataset(str(tmp_path / 'n1'))
    n2 = open_dataset(data_prep.corrupt_dataset(rest, str(tmp_path / 'n2'), 0.5, 7, chunk=3, verbose=False))
    n3 = open_dataset(data_prep.corrupt_dataset(rest, str(tmp_path / 'n3'), 0.5, 8, chunk=1, verbose=False))
    assert np.array_equal(n1.images, n2.images) and not np.allclose(n1.images, n3.images)
    originals = open_dataset(n1.metadata['originals'])
    clean = np.stack([originals[i][0] for i in range(len(originals))]).astype(np.float32) / 127.5 - 1
    noise = np.asarray(n1.images) - clean
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - 0.5) < 0.02
    meta = n1.metadata
    assert meta['kind'] == 'array' and meta['sigma'] == 0.5 and meta['seed'] == 7 and meta['dtype'] == 'float32'
    assert meta['resolution'] == 16 and meta['channels'] == 3 and meta['source'] == src
    assert meta['source_indices'] == open_dataset(rest).metadata['source_indices'] and meta['originals'] == rest
    half = open_dataset(data_prep.corrupt_dataset(rest, str(tmp_path / 'h'), 0.5, 7, dtype='float16', verbose=False))
    assert half.dtype == np.float16 and np.allclose(half.images, n1.images, atol=4e-3)
    info = run('info', tmp_path / 'n1')
    assert 'noisy array' in info.output and 'sigma:      0.5' in info.output

#----------------------------------------------------------------------------
# Bad input: exit code 1 (2 for click's usage errors), one 'Error:' line naming the input, no traceback,
# nothing left behind.

def _late_bad_png(root, kind):
    """A folder of 6 good images whose fifth is garbage or truncated, so a partial output would exist."""
    d = make_small(str(root))
    path = os.path.join(d, '004.png')
    PIL.Image.fromarray(np.random.RandomState(0).randint(0, 256, (8, 8, 3)).astype(np.uint8)).save(path)
    data = open(path, 'rb').read()
    with open(path, 'wb') as f:
        f.write(b'not an image at all' if kind == 'garbage' else data[: len(data) * 2 // 3])
    return d


def _with_json(src_dir, dest_dir, **changes):
    """A copy of a dataset folder whose dataset.json has `changes`."""
    shutil.copytree(src_dir, dest_dir)
    path = os.path.join(dest_dir, 'dataset.json')
    meta = json.load(open(path))
    meta.update(changes)
    with open(path, 'w') as f:
        json.dump(meta, f)
    return str(dest_dir)


def _npy(path, array):
    np.save(path, array, allow_pickle=array.dtype.hasobject)
    return str(path)


@pytest.fixture(scope='module')
def good(tmp_path_factory):
    """Shared inputs, never written to: 6-image folder and zip, a noisy set made from a split's rest."""
    root = tmp_path_factory.mktemp('good')
    folder = make_small(str(root / 'src'))
    zpath = data_prep.convert_dataset(folder, str(root / 'good.zip'), verbose=False)
    data_prep.convert_dataset(folder, str(root / 'folder'), verbose=False)
    data_prep.split_dataset(zpath, 2, 0, str(root / 'clean'), str(root / 'rest'), verbose=False)
    data_prep.corrupt_dataset(str(root / 'rest'), str(root / 'noisy'), 0.2, 0, verbose=False)
    mixed = make_small(str(root / 'mixed'))
    for i in (3, 4, 5):  # so that any split of it mixes sizes too
        PIL.Image.new('RGB', (16, 16)).save(os.path.join(mixed, f'00{i}.png'))
    return {'root': root, 'zip': zpath, 'folder': str(root / 'folder'), 'noisy': str(root / 'noisy'), 'mixed': mixed}


def _cases():
    """name -> build(tmp, good) -> (arguments, words the Error line must hold)."""
    c = {}
    # convert
    c['convert missing source'] = lambda t, g: (['convert', f'--source={t / "nope"}', f'--dest={t / "o.zip"}'], ['nope', 'not found'])

    def empty(t, g):
        os.makedirs(t / 'empty')
        return ['convert', f'--source={t / "empty"}', f'--dest={t / "o.zip"}'], ['empty', 'No PNG or JPEG']
    c['convert empty folder'] = empty
    c['convert garbage image'] = lambda t, g: (['convert', f'--source={_late_bad_png(t / "g", "garbage")}', f'--dest={t / "o"}'],
                                               ['004.png', 'not a PNG or JPEG'])
    c['convert truncated image'] = lambda t, g: (['convert', f'--source={_late_bad_png(t / "g", "truncated")}', f'--dest={t / "o"}'],
                                                 ['004.png', 'truncated'])
    c['convert mixed sizes'] = lambda t, g: (['convert', f'--source={g["mixed"]}', f'--dest={t / "o.zip"}'], ['003.png', '--resolution'])
    c['convert non-square'] = lambda t, g: (['convert', f'--source={make_faces(str(t / "faces"), n=2)}', f'--dest={t / "o"}'],
                                            ['178x218', 'square'])
    c['convert non-power-of-two'] = lambda t, g: (['convert', f'--source={make_small(str(t / "npot"), size=24)}', f'--dest={t / "o"}'],
                                                  ['24x24', 'power-of-two'])

    def grey(t, g):
        d = make_small(str(t / 'grey'))
        PIL.Image.new('L', (8, 8)).save(os.path.join(d, '005.png'))
        return ['convert', f'--source={d}', f'--dest={t / "o"}'], ['005.png', 'grayscale']
    c['convert grey with RGB'] = grey

    def escape(t, g):
        with zipfile.ZipFile(t / 'evil.zip', 'w') as z:
            z.writestr('ok.png', open(os.path.join(g['mixed'], '000.png'), 'rb').read())
            z.writestr('../../escape.png', b'x')
        return ['convert', f'--source={t / "evil.zip"}', f'--dest={t / "o"}'], ['evil.zip', 'escapes']
    c['convert zip traversal'] = escape

    def truncated_zip(t, g):
        data = open(g['zip'], 'rb').read()
        (t / 'cut.zip').write_bytes(data[: len(data) // 2])
        return ['convert', f'--source={t / "cut.zip"}', f'--dest={t / "o"}'], ['cut.zip', 'truncated zip']
    c['convert truncated zip'] = truncated_zip
    c['convert .npy as source'] = lambda t, g: (['convert', f'--source={_npy(t / "x.npy", np.zeros((2, 1, 8, 8), np.float32))}',
                                                 f'--dest={t / "o"}'], ['x.npy', 'is a .npy file'])
    for res in ('1x1', '2x2', '0', 'abc', '64x'):
        c[f'convert --resolution={res}'] = lambda t, g, res=res: (
            ['convert', f'--source={g["folder"]}', f'--resolution={res}', f'--dest={t / "o"}'], ['--resolution', res])
    for n in ('0', '-5'):
        c[f'convert --max-images={n}'] = lambda t, g, n=n: (
            ['convert', f'--source={g["folder"]}', f'--max-images={n}', f'--dest={t / "o"}'], ['--max-images', n])
    c['convert --max-images=nan'] = lambda t, g: (
        ['convert', f'--source={g["folder"]}', '--max-images=nan', f'--dest={t / "o"}'], ['--max-images', 'nan'], 2)
    c['convert dest inside source'] = lambda t, g: (
        ['convert', f'--source={make_small(str(t / "s"))}', f'--dest={t / "s" / "out.zip"}'], ['out.zip', 'inside the source'])
    c['convert existing dest'] = lambda t, g: (
        ['convert', f'--source={g["folder"]}', f'--dest={g["zip"]}'], [g['zip'], 'already exists', '--overwrite'])

    def not_a_dataset(t, g):
        os.makedirs(t / 'mine')
        (t / 'mine' / 'notes.txt').write_text('precious')
        return ['convert', f'--source={g["folder"]}', f'--dest={t / "mine"}', '--overwrite'], ['mine', 'not a dataset']
    c['convert --overwrite onto a non-dataset folder'] = not_a_dataset

    def file_as_parent(t, g):
        (t / 'file.txt').write_text('x')
        return ['convert', f'--source={g["folder"]}', f'--dest={t / "file.txt" / "out.zip"}'], ['file.txt', 'is a file, not a folder']
    c['convert dest under a file'] = file_as_parent

    def unwritable(t, g):
        os.makedirs(t / 'ro')
        os.chmod(t / 'ro', 0o555)
        if os.access(t / 'ro', os.W_OK):
            pytest.skip('running as a user (root) whom chmod does not stop')
        return ['convert', f'--source={g["folder"]}', f'--dest={t / "ro" / "out.zip"}'], ['ro', 'not writable']
    c['convert unwritable dest'] = unwritable
    c['convert celeba transform on non-CelebA images'] = lambda t, g: (
        ['convert', f'--source={g["folder"]}', '--transform=celeba', f'--dest={t / "o"}'], ['--transform=celeba', '178x218'])
    c['convert --partition without celeba'] = lambda t, g: (
        ['convert', f'--source={g["folder"]}', f'--partition={t / "p.txt"}', f'--dest={t / "o"}'], ['--partition', 'celeba'])
    c['convert --partition missing'] = lambda t, g: (
        ['convert', f'--source={make_faces(str(t / "faces"), n=2)}', '--transform=celeba', f'--partition={t / "p.txt"}',
         f'--dest={t / "o"}'], ['p.txt', 'not found'])

    def bad_partition(t, g):
        faces = make_faces(str(t / 'faces'), n=2)
        (t / 'faces' / 'list_eval_partition.txt').write_text('000000.png 0\n000001.png train\n')
        return ['convert', f'--source={faces}', '--transform=celeba', f'--dest={t / "o"}'], ['list_eval_partition.txt', 'line 2']
    c['convert bad partition file'] = bad_partition
    c['convert unknown transform'] = lambda t, g: (
        ['convert', f'--source={g["folder"]}', '--transform=rotate', f'--dest={t / "o"}'], ['--transform', 'rotate'], 2)
    # split
    split = lambda g, t, clean, src=None: ['split', f'--source={src or g["zip"]}', f'--clean={clean}',
                                           f'--dest-clean={t / "c"}', f'--dest-rest={t / "r"}']
    for clean, words in [('6', ['--clean=6', 'holds 6']), ('1.5', ['1.5', 'strictly between']), ('abc', ['abc', 'count']),
                         ('nan', ['nan', 'strictly between']), ('-3', ['-3', 'strictly between']), ('0', ['--clean', 'at least one'])]:
        c[f'split --clean={clean}'] = lambda t, g, clean=clean, words=words: (split(g, t, clean), words)
    c['split an array dataset'] = lambda t, g: (split(g, t, 1, g['noisy']), ['noisy', 'array dataset'])
    c['split mixed sizes'] = lambda t, g: (split(g, t, 1, g['mixed']), ['16x16', 'convert the source to one size first'])
    c['split same destinations'] = lambda t, g: (
        ['split', f'--source={g["zip"]}', '--clean=1', f'--dest-clean={t / "c"}', f'--dest-rest={t / "c"}'], ['--dest-rest', 'differ'])
    c['split --seed=-1'] = lambda t, g: (split(g, t, 1) + ['--seed=-1'], ['--seed', '-1'], 2)
    c['split hostile source_indices'] = lambda t, g: (
        split(g, t, 1, _with_json(g['folder'], t / 'h', source='x', source_indices=[0, 1])), ['source_indices', 'damaged'])
    # corrupt
    corrupt = lambda g, t, *extra, src=None, dest=None: ['corrupt', f'--source={src or g["zip"]}', f'--dest={dest or t / "n"}', *extra]
    for sigma in ('0', '-0.1', 'nan', 'inf', '-inf'):
        c[f'corrupt --sigma={sigma}'] = lambda t, g, sigma=sigma: (corrupt(g, t, f'--sigma={sigma}'), ['--sigma', 'positive finite'])
    c['corrupt --sigma=abc'] = lambda t, g: (corrupt(g, t, '--sigma=abc'), ['--sigma', 'abc'], 2)
    c['corrupt --sigma=1e30 --dtype=float16'] = lambda t, g: (corrupt(g, t, '--sigma=1e30', '--dtype=float16'),
                                                              ['--sigma', 'float16', 'overflows'])
    c['corrupt --sigma=1e38'] = lambda t, g: (corrupt(g, t, '--sigma=1e38'), ['--sigma', 'float32', 'overflows'])
    c['corrupt --seed=-1'] = lambda t, g: (corrupt(g, t, '--sigma=0.1', '--seed=-1'), ['--seed', '-1'], 2)
    c['corrupt a noisy set'] = lambda t, g: (corrupt(g, t, '--sigma=0.1', src=g['noisy']), ['noisy', 'already holds noisy'])
    c['corrupt to a zip'] = lambda t, g: (corrupt(g, t, '--sigma=0.1', '--overwrite', src=g['folder'], dest=g['zip']),
                                          [g['zip'], 'not a zip'])

    def onto_file(t, g):
        (t / 'n').write_text('mine')
        return corrupt(g, t, '--sigma=0.1', '--overwrite'), [str(t / 'n'), 'a file that is not a dataset']
    c['corrupt --overwrite onto a file'] = onto_file
    c['corrupt existing dest'] = lambda t, g: (corrupt(g, t, '--sigma=0.1', dest=g['noisy']), [g['noisy'], 'already exists'])
    c['corrupt hostile sigma in the source'] = lambda t, g: (
        corrupt(g, t, '--sigma=0.1', src=_with_json(g['folder'], t / 'h', sigma='abc')), ['"sigma"', 'positive finite'])
    # import-noisy
    imp = lambda src, t, *extra: ['import-noisy', f'--source={src}', '--sigma=0.2', f'--dest={t / "n"}', *extra]
    c['import-noisy a folder'] = lambda t, g: (imp(g['folder'], t), [g['folder'], 'is a folder', '.npy'])
    c['import-noisy an array dataset'] = lambda t, g: (imp(g['noisy'], t), [g['noisy'], 'already an array dataset'])
    c['import-noisy missing'] = lambda t, g: (imp(t / 'gone.npy', t), ['gone.npy', 'not found'])

    def text_npy(t, g):
        (t / 'text.npy').write_text('1 2 3')
        return imp(t / 'text.npy', t), ['text.npy', 'not a .npy file']
    c['import-noisy text named .npy'] = text_npy

    def npz(t, g):
        np.savez(t / 'a.npz', x=np.zeros((2, 1, 8, 8), np.float32))
        return imp(t / 'a.npz', t), ['a.npz', '.npz archive']
    c['import-noisy .npz'] = npz
    c['import-noisy object array'] = lambda t, g: (imp(_npy(t / 'o.npy', np.array([{}, None], dtype=object)), t),
                                                   ['o.npy', 'Python objects'])
    c['import-noisy all NaN'] = lambda t, g: (imp(_npy(t / 'nan.npy', np.full((3, 1, 8, 8), np.nan, np.float32)), t),
                                              ['nan.npy', '192 non-finite'])
    c['import-noisy one inf'] = lambda t, g: (imp(_npy(t / 'inf.npy', np.where(np.eye(8) == 1, np.inf, 0).astype(np.float32)[None, None]), t),
                                              ['inf.npy', '8 non-finite'])
    c['import-noisy uint8'] = lambda t, g: (imp(_npy(t / 'u.npy', np.zeros((3, 1, 8, 8), np.uint8)), t), ['u.npy', 'float16/float32'])
    c['import-noisy 3-d'] = lambda t, g: (imp(_npy(t / 'd3.npy', np.zeros((3, 8, 8), np.float32)), t), ['d3.npy', 'N x C x H x W'])
    c['import-noisy 2x2 images'] = lambda t, g: (imp(_npy(t / 's.npy', np.zeros((3, 1, 2, 2), np.float32)), t), ['s.npy', '4x4'])

    def truncated_npy(t, g):
        data = open(_npy(t / 'full.npy', np.zeros((3, 1, 8, 8), np.float32)), 'rb').read()
        (t / 'full.npy').write_bytes(data[:400])
        return imp(t / 'full.npy', t), ['full.npy', 'truncated']
    c['import-noisy truncated .npy'] = truncated_npy
    c['import-noisy to a zip'] = lambda t, g: (imp(_npy(t / 'a.npy', np.zeros((3, 1, 8, 8), np.float32)), t)[:-1] +
                                               [f'--dest={t / "n.zip"}'], ['n.zip', 'not a zip'])
    c['import-noisy --sigma=0'] = lambda t, g: (['import-noisy', f'--source={_npy(t / "a.npy", np.zeros((3, 1, 8, 8), np.float32))}',
                                                 '--sigma=0', f'--dest={t / "n"}'], ['--sigma', 'positive finite'])
    c['import-noisy --sigma=1e5 for float16'] = lambda t, g: (
        ['import-noisy', f'--source={_npy(t / "h.npy", np.zeros((3, 1, 8, 8), np.float16))}', '--sigma=1e5', f'--dest={t / "n"}'],
        ['--sigma', 'float16'])
    # info
    c['info missing'] = lambda t, g: (['info', t / 'nothing'], ['nothing', 'not found'])

    def info_truncated_zip(t, g):
        (t / 'cut.zip').write_bytes(open(g['zip'], 'rb').read()[:100])
        return ['info', t / 'cut.zip'], ['cut.zip', 'truncated zip']
    c['info truncated zip'] = info_truncated_zip
    c['info a .npy'] = lambda t, g: (['info', _npy(t / 'x.npy', np.zeros((2, 1, 8, 8), np.float32))], ['x.npy', 'is a .npy file'])
    for field, value, words in [('sigma', 'abc', ['"sigma"', 'positive finite']), ('sigma', 1e308, ['"sigma"', 'overflows']),
                                ('count', 99, ['"count"', '99']), ('dtype', 'uint8', ['"dtype"', 'float32'])]:
        c[f'info {field}={value}'] = lambda t, g, field=field, value=value, words=words: (
            ['info', _with_json(g['noisy'], t / 'h', **{field: value})], ['h', *words])
    c['info labels=abc'] = lambda t, g: (['info', _with_json(g['noisy'], t / 'h', labels='abc')], ['h', '"labels"'])

    def images_text(t, g):
        path = _with_json(g['noisy'], t / 'h')
        with open(os.path.join(path, 'images.npy'), 'w') as f:
            f.write('not numpy')
        return ['info', path], ['images.npy', 'not a .npy file']
    c['info images.npy is text'] = images_text
    return c


BAD_INPUTS = _cases()


def _tree(*roots):
    return sorted((str(r), os.path.relpath(os.path.join(d, f), r), os.path.getsize(os.path.join(d, f)))
                  for r in roots for d, ds, fs in os.walk(r) for f in fs + ds)


@pytest.mark.parametrize('name', list(BAD_INPUTS))
def test_bad_input_fails_cleanly(name, good, tmp_path):
    case = BAD_INPUTS[name](tmp_path, good)
    args, words, code = case if len(case) == 3 else (*case, 1)
    before = _tree(tmp_path, good['root'])
    res = run(*args)
    lines = res.output.strip().splitlines()
    errors = [line for line in lines if line.startswith('Error:')]
    assert res.exit_code == code and len(errors) == 1, (name, res.output, res.exception)
    others = [line for line in lines if line not in errors and not re.search(r': \d+/\d+ \(\d+%\) elapsed', line)]
    assert code == 2 or not others, res.output  # besides progress lines; usage errors come with click's usage lines
    assert all(w in errors[0] for w in words), (name, errors[0], words)
    assert 'Traceback' not in res.output
    assert _tree(tmp_path, good['root']) == before, name  # no temporary, no partial output, inputs untouched
    if os.path.isdir(tmp_path / 'ro'):
        os.chmod(tmp_path / 'ro', 0o755)

def test_overwrite(tmp_path):
    src = make_small(str(tmp_path / 'src'))
    dest = str(tmp_path / 'out')
    data_prep.convert_dataset(src, dest, verbose=False)
    make_small(str(tmp_path / 'src2'), n=3)
    res = run('convert', f'--source={tmp_path / "src2"}', f'--dest={dest}', '--overwrite')
    assert res.exit_code == 0 and len(open_dataset(dest)) == 3
    assert sorted(os.listdir(tmp_path)) == ['out', 'src', 'src2']


@pytest.mark.parametrize('clean,total,expected', [('50', 1000, 50), ('0.04', 1000, 40), (0.1, 50000, 5000), ('1', 2, 1)])
def test_parse_clean(clean, total, expected):
    assert data_prep.parse_clean(clean, total) == expected

#----------------------------------------------------------------------------
# Replacing, full disks, killed runs, permissions.

def test_overwrite_an_array_dataset_leaves_nothing_else(tmp_path):
    src = data_prep.convert_dataset(make_small(str(tmp_path / 'src')), str(tmp_path / 'all.zip'), verbose=False)
    for sigma in ('0.1', '0.3'):
        res = run('corrupt', f'--source={src}', f'--sigma={sigma}', f'--dest={tmp_path / "noisy"}', '--overwrite')
        assert res.exit_code == 0, res.output
    assert sorted(os.listdir(tmp_path)) == ['all.zip', 'noisy', 'src'] and open_dataset(str(tmp_path / 'noisy')).sigma == 0.3


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _assert_full_disk_error(res, dest, tmp_path, before, seen):
    lines = res.output.strip().splitlines()
    assert res.exit_code == 1 and len(lines) == 1, res.output
    assert lines[0].startswith(f'Error: Cannot write {dest}: No space left on device (it needs about '), lines[0]
    assert sorted(os.listdir(tmp_path)) == before  # the temporary is gone: it would keep the disk full
    assert seen.pop() == before  # and was gone when the free space was measured


def test_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    src = data_prep.convert_dataset(make_small(str(tmp_path / 'src')), str(tmp_path / 'all.zip'), verbose=False)
    np.save(tmp_path / 'mine.npy', np.zeros((4, 3, 8, 8), np.float32))
    before = sorted(os.listdir(tmp_path))
    seen = []
    real_usage = shutil.disk_usage

    def disk_usage(path):
        seen.append(sorted(os.listdir(tmp_path)))
        return real_usage(path)
    monkeypatch.setattr(shutil, 'disk_usage', disk_usage)
    with monkeypatch.context() as m:
        m.setattr(os, 'posix_fallocate', _full_disk, raising=False)
        _assert_full_disk_error(run('corrupt', f'--source={src}', '--sigma=0.2', f'--dest={tmp_path / "noisy"}'),
                                tmp_path / 'noisy', tmp_path, before, seen)
        _assert_full_disk_error(run('import-noisy', f'--source={tmp_path / "mine.npy"}', '--sigma=0.2',
                                    f'--dest={tmp_path / "mine"}'), tmp_path / 'mine', tmp_path, before, seen)
    # PNGs into a zip: the disk fills at the fourth image.
    real_writestr = zipfile.ZipFile.writestr
    calls = []

    def writestr(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            _full_disk()
        return real_writestr(self, *args, **kwargs)
    with monkeypatch.context() as m:
        m.setattr(zipfile.ZipFile, 'writestr', writestr)
        _assert_full_disk_error(run('convert', f'--source={tmp_path / "src"}', f'--dest={tmp_path / "out.zip"}'),
                                tmp_path / 'out.zip', tmp_path, before, seen)
    # PNGs into a folder: a write fails at the third image.
    opened = []

    def full_open(path, mode='r', *args, **kwargs):
        if 'w' in mode:
            opened.append(path)
            if len(opened) > 2:
                _full_disk()
        return open(path, mode, *args, **kwargs)
    monkeypatch.setattr(data_prep, 'open', full_open, raising=False)
    _assert_full_disk_error(run('convert', f'--source={tmp_path / "src"}', f'--dest={tmp_path / "out"}'),
                            tmp_path / 'out', tmp_path, before, seen)


KILLED_RUN = '''
import os, signal, sys
from training import data_prep
real_update = data_prep.Progress.update
def update(self, n=1):  # killed midway: after two images (convert) or the first chunk (corrupt)
    real_update(self, n)
    if self.done >= 2:
        os.kill(os.getpid(), signal.SIGKILL)
data_prep.Progress.update = update
import dataset_tool
dataset_tool.main(sys.argv[1:])
'''


@pytest.mark.parametrize('command', ['convert', 'corrupt'])
def test_a_rerun_removes_what_a_killed_run_left(tmp_path, command):
    from tests.conftest import run_python
    src = data_prep.convert_dataset(make_small(str(tmp_path / 'src')), str(tmp_path / 'all.zip'), verbose=False)
    args = [command, f'--source={src}', f'--dest={tmp_path / "out"}'] + (['--sigma=0.2'] if command == 'corrupt' else [])
    assert run_python(['-c', KILLED_RUN, *args], check=False).returncode == -9
    left = sorted(set(os.listdir(tmp_path)) - {'all.zip', 'src'})
    assert len(left) == 1 and left[0].startswith('.out.') and left[0].endswith('.tmp'), left  # what a kill leaves
    res = run(*args)
    assert res.exit_code == 0, res.output
    assert sorted(os.listdir(tmp_path)) == ['all.zip', 'out', 'src'] and len(open_dataset(str(tmp_path / 'out'))) == 6


@pytest.mark.parametrize('umask,file_mode', [(0o022, 0o644), (0o002, 0o664)])
def test_outputs_follow_the_umask(tmp_path, umask, file_mode):
    saved = os.umask(umask)
    try:
        src = make_small(str(tmp_path / 'src'))
        data_prep.convert_dataset(src, str(tmp_path / 'all.zip'), verbose=False)
        data_prep.convert_dataset(src, str(tmp_path / 'folder'), verbose=False)
        data_prep.corrupt_dataset(str(tmp_path / 'all.zip'), str(tmp_path / 'noisy'), 0.2, 0, verbose=False)
    finally:
        os.umask(saved)
    mode = lambda *p: os.stat(os.path.join(tmp_path, *p)).st_mode & 0o777
    assert mode('all.zip') == file_mode
    assert mode('folder') == mode('folder', '00000') == mode('noisy') == file_mode | 0o111
    assert mode('folder', 'dataset.json') == mode('folder', '00000', 'img00000000.png') == file_mode
    assert mode('noisy', 'images.npy') == mode('noisy', 'dataset.json') == file_mode

#----------------------------------------------------------------------------
# CelebA's training partition, noisy imports, originals.

def make_celeba(root, n=6):
    """CelebA-sized images whose crop box has the grey level 40 * i."""
    os.makedirs(root)
    for i in range(n):
        x = np.zeros((218, 178, 3), np.uint8)
        x[57:185, 25:153] = 40 * i
        PIL.Image.fromarray(x).save(os.path.join(root, f'{i + 1:06d}.png'))
    return str(root)


def test_celeba_keeps_the_official_training_partition(tmp_path):
    faces = make_celeba(tmp_path / 'img_align_celeba')
    listing = ''.join(f'{i + 1:06d}.png {p}\n' for i, p in enumerate([0, 1, 0, 2, 0, 0]))
    (tmp_path / 'img_align_celeba' / 'list_eval_partition.txt').write_text(listing)
    res = run('convert', f'--source={faces}', '--transform=celeba', '--resolution=8x8', f'--dest={tmp_path / "train.zip"}')
    assert res.exit_code == 0, res.output
    assert 'kept 4 training images (partition 0) of 6' in res.output
    ds = open_dataset(str(tmp_path / 'train.zip'))
    assert [int(ds[i][0].mean()) for i in range(len(ds))] == [0, 80, 160, 200]  # images 1, 3, 5, 6
    assert ds.metadata['celeba_partition']['kept'] == 4
    # A zip of the images with the file beside it; and --partition given explicitly.
    with zipfile.ZipFile(tmp_path / 'faces.zip', 'w') as z:
        for name in sorted(os.listdir(faces)):
            if name.endswith('.png'):
                z.write(os.path.join(faces, name), f'img_align_celeba/{name}')
    (tmp_path / 'list_eval_partition.txt').write_text(listing.replace('000006.png 0', '000006.png 2'))
    data_prep.convert_dataset(str(tmp_path / 'faces.zip'), str(tmp_path / 'z'), transform='celeba', resolution='8x8', verbose=False)
    assert len(open_dataset(str(tmp_path / 'z'))) == 3
    (tmp_path / 'mine.txt').write_text(listing.replace(' 1\n', ' 0\n'))
    data_prep.convert_dataset(faces, str(tmp_path / 'p'), transform='celeba', resolution='8x8', partition=str(tmp_path / 'mine.txt'),
                              verbose=False)
    assert len(open_dataset(str(tmp_path / 'p'))) == 5
    # Without a partition file every image is kept, and the output says so.
    os.remove(tmp_path / 'img_align_celeba' / 'list_eval_partition.txt')
    res = run('convert', f'--source={faces}', '--transform=celeba', '--resolution=8x8', f'--dest={tmp_path / "all"}')
    assert res.exit_code == 0 and 'No list_eval_partition.txt' in res.output and len(open_dataset(str(tmp_path / 'all'))) == 6
    # An image that the partition does not list: the wrong file.
    (tmp_path / 'short.txt').write_text(listing.splitlines(True)[0])
    res = run('convert', f'--source={faces}', '--transform=celeba', f'--partition={tmp_path / "short.txt"}', f'--dest={tmp_path / "x"}')
    assert res.exit_code == 1 and res.output.startswith('Error: 5 of the 6 images') and 'not listed in' in res.output


def test_import_noisy_warns_about_values_far_outside(tmp_path):
    x = np.random.RandomState(0).randn(4, 1, 8, 8).astype(np.float32) * 0.1
    x[0, 0, 0, :3] = [5.0, -4.0, 2.5]  # beyond 1 + 10 * 0.1 = 2, and -2
    np.save(tmp_path / 'mine.npy', x)
    res = run('import-noisy', f'--source={tmp_path / "mine.npy"}', '--sigma=0.1', f'--dest={tmp_path / "n"}')
    assert res.exit_code == 0, res.output
    assert 'Warning: 3 of the 256 values' in res.output and '[-2, 2]' in res.output
    ds = open_dataset(str(tmp_path / 'n'))
    assert ds.sigma == 0.1 and np.array_equal(ds.images, x) and ds.metadata['originals'] is None


def test_noisy_set_of_a_plain_folder_names_its_originals_relatively(tmp_path):
    plain = make_small(str(tmp_path / 'plain'))  # no dataset.json
    data_prep.corrupt_dataset(plain, str(tmp_path / 'noisy'), 0.2, 0, verbose=False)
    assert open_dataset(str(tmp_path / 'noisy')).metadata['originals'] == '../plain'
    os.rename(tmp_path, str(tmp_path) + '-moved')  # the pair moves together
    moved = str(tmp_path) + '-moved'
    info = run('info', os.path.join(moved, 'noisy'))
    assert info.exit_code == 0 and f'originals:  {os.path.join(moved, "plain")}' in info.output
    os.rename(moved, tmp_path)
    meta_path = tmp_path / 'noisy' / 'dataset.json'
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), 'originals': '/usr/share'}))
    info = run('info', tmp_path / 'noisy')  # info shows a hostile path without following it
    assert info.exit_code == 0 and "originals:  '/usr/share' (refused: not an image dataset)" in info.output
