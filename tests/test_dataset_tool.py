"""dataset_tool.py: convert, split, corrupt, info on tiny synthetic inputs; every bad input fails cleanly."""

import io
import json
import os
import pickle
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
# Bad input: exit code 1, one 'Error:' line, nothing left behind.

def _bad_inputs(tmp):
    """(name, args, directory that must not change) for each bad input."""
    cases = []
    os.makedirs(tmp / 'empty')
    cases.append(('missing source', ['convert', f'--source={tmp / "nope"}', f'--dest={tmp / "o.zip"}']))
    cases.append(('empty source', ['convert', f'--source={tmp / "empty"}', f'--dest={tmp / "o.zip"}']))
    for kind in ('garbage', 'truncated'):
        d = make_small(str(tmp / kind))
        path = os.path.join(d, '004.png')
        PIL.Image.fromarray(np.random.RandomState(0).randint(0, 256, (8, 8, 3)).astype(np.uint8)).save(path)
        data = open(path, 'rb').read()
        with open(path, 'wb') as f:  # a late image, so a partial output would exist without cleanup
            f.write(b'not an image at all' if kind == 'garbage' else data[: len(data) * 2 // 3])
        cases.append((kind + ' image', ['convert', f'--source={d}', f'--dest={tmp / "o"}']))
    mixed = make_small(str(tmp / 'mixed'))
    PIL.Image.new('RGB', (16, 16)).save(os.path.join(mixed, '005.png'))
    cases.append(('mixed sizes', ['convert', f'--source={mixed}', f'--dest={tmp / "o.zip"}']))
    cases.append(('non-square', ['convert', f'--source={make_faces(str(tmp / "faces"), n=2)}', f'--dest={tmp / "o"}']))
    npot = str(tmp / 'npot')
    make_small(npot, size=24)
    cases.append(('non-power-of-two', ['convert', f'--source={npot}', f'--dest={tmp / "o"}']))
    grey = make_small(str(tmp / 'grey'))
    PIL.Image.new('L', (8, 8)).save(os.path.join(grey, '005.png'))
    cases.append(('grey with RGB', ['convert', f'--source={grey}', f'--dest={tmp / "o"}']))
    with zipfile.ZipFile(tmp / 'evil.zip', 'w') as z:
        z.writestr('ok.png', open(os.path.join(str(tmp / 'mixed'), '000.png'), 'rb').read())
        z.writestr('../../escape.png', b'x')
    cases.append(('zip escape', ['convert', f'--source={tmp / "evil.zip"}', f'--dest={tmp / "o"}']))
    good = data_prep.convert_dataset(make_small(str(tmp / 'g')), str(tmp / 'good.zip'), verbose=False)
    cases.append(('clean too large', ['split', f'--source={good}', '--clean=6', f'--dest-clean={tmp / "c"}', f'--dest-rest={tmp / "r"}']))
    cases.append(('clean fraction 1', ['split', f'--source={good}', '--clean=1.5', f'--dest-clean={tmp / "c"}', f'--dest-rest={tmp / "r"}']))
    cases.append(('sigma zero', ['corrupt', f'--source={good}', '--sigma=0', f'--dest={tmp / "n"}']))
    cases.append(('sigma negative', ['corrupt', f'--source={good}', '--sigma=-0.1', f'--dest={tmp / "n"}']))
    cases.append(('dest inside source', ['convert', f'--source={tmp / "g"}', f'--dest={tmp / "g" / "out.zip"}']))
    cases.append(('existing dest', ['convert', f'--source={tmp / "g"}', f'--dest={good}']))
    cases.append(('noisy import not float', ['import-noisy', f'--source={good}', '--sigma=0.2', f'--dest={tmp / "n"}']))
    return cases


def test_bad_inputs_fail_cleanly(tmp_path):
    def snapshot():
        return sorted(os.path.relpath(os.path.join(r, f), tmp_path) for r, ds, fs in os.walk(tmp_path) for f in fs + ds)
    for name, args in _bad_inputs(tmp_path):
        before = snapshot()
        res = run(*args)
        lines = res.output.strip().splitlines()
        assert res.exit_code == 1 and len(lines) == 1 and lines[0].startswith('Error: '), (name, res.output)
        assert 'truncated' not in name or 'truncated' in lines[0], res.output
        assert snapshot() == before, name


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
