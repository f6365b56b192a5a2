"""Tests for training/audit.py and audit.py: exact neighbours, known-answer audits, mirrored and shifted copies, the CLI."""

import json
import os

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import audit as audit_cli
import dataset_tool
from tests.test_generation import bad, run_bad_case  # noqa: F401 - bad is a fixture
from tests.test_metrics import write_pngs
from training import audit, metrics


def random_images(n: int, seed: int, shape=(3, 8, 8)) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, size=(n, *shape), dtype=np.uint8)


def clustered_images(n: int, seed: int, prototypes: np.ndarray, noise: float = 8) -> np.ndarray:
    """Draws of a distribution rich in near-duplicates: a random prototype plus N(0, noise^2) grey levels."""
    rs = np.random.RandomState(seed)
    x = prototypes[rs.randint(len(prototypes), size=n)] + rs.randn(n, *prototypes.shape[1:]) * noise
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def brute_force(q: np.ndarray, r: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """k nearest by (distance, index) from all pairwise distances; exact integers for uint8, float64 otherwise."""
    if q.dtype == np.uint8:
        sq = ((q.reshape(len(q), 1, -1).astype(np.int64) - r.reshape(1, len(r), -1)) ** 2).sum(-1)
        dist = np.sqrt(sq) / 127.5
    else:
        dist = np.sqrt(((q.reshape(len(q), 1, -1).astype(np.float64) - r.reshape(1, len(r), -1)) ** 2).sum(-1))
        sq = dist
    order = np.lexsort((np.broadcast_to(np.arange(len(r)), sq.shape), sq), axis=1)[:, :k]
    return np.take_along_axis(dist, order, 1), order


def t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


@pytest.fixture(scope='module', autouse=True)
def _one_thread(one_thread):
    yield

#----------------------------------------------------------------------------
# nearest_neighbours against numpy.

def test_nearest_neighbours_match_brute_force_with_ties_across_chunk_boundaries():
    q, r = random_images(37, 0), random_images(53, 1)
    r[[20, 21, 34]] = r[6]         # a tie of four, straddling chunks of 7 (6 | 20 | 21 ... 34)
    r[13], r[14] = r[40], r[40]    # duplicates on both sides of a boundary, below and above the original
    q[3], q[4], q[5] = r[6], r[40], r[52]  # exact copies, one of the last reference
    q[6] = np.clip(r[6].astype(int) + 1, 0, 255)  # near a tie: its two nearest are equally far
    for k in (1, 2, 3):
        expected_d, expected_i = brute_force(q, r, k)
        for query_chunk, ref_chunk in [(5, 7), (37, 53), (1, 1), (64, 4096)]:
            d, i = audit.nearest_neighbours(t(q), t(r), k, query_chunk=query_chunk, ref_chunk=ref_chunk)
            assert d.dtype == torch.float64 and i.dtype == torch.int64 and d.shape == (37, k)
            np.testing.assert_array_equal(i.numpy(), expected_i)
            np.testing.assert_allclose(d.numpy(), expected_d, rtol=1e-13, atol=0)
    d, i = audit.nearest_neighbours(t(q), t(r), 3, ref_chunk=7)
    assert i[3].tolist() == [6, 20, 21] and d[3].tolist() == [0, 0, 0]
    assert i[4].tolist()[:3] == [13, 14, 40] and i[5, 0] == 52 and d[6, 0] == d[6, 1]


def test_nearest_neighbours_of_float_data():
    rs = np.random.RandomState(2)
    q, r = rs.uniform(-1, 1, (29, 1, 4, 4)).astype(np.float32), rs.uniform(-1, 1, (41, 1, 4, 4)).astype(np.float32)
    r[30] = q[7]
    expected_d, expected_i = brute_force(q, r, 2)
    for dtype in (torch.float32, torch.float64):
        d, i = audit.nearest_neighbours(t(q), t(r), 2, ref_chunk=6, query_chunk=4, dtype=dtype)
        np.testing.assert_array_equal(i.numpy(), expected_i)
        np.testing.assert_allclose(d.numpy(), expected_d, rtol=1e-12, atol=1e-15)
    assert d[7, 0] == 0 and i[7, 0] == 30
    # uint8 against float compares in [-1, 1] units.
    u = random_images(5, 3, (1, 4, 4))
    d, _ = audit.nearest_neighbours(t(u), t(r), 1)
    np.testing.assert_allclose(d.numpy(), brute_force(u.astype(np.float64) / 127.5 - 1, r, 1)[0], rtol=1e-12)


def test_doubtful_candidates_fall_back_to_exact_distances(monkeypatch):
    """More tied references than candidates, or a coarse matmul precision: the exact fallback keeps the answer."""
    calls = []
    real = audit._brute_force
    monkeypatch.setattr(audit, '_brute_force', lambda q, *args: calls.append(q.shape[0]) or real(q, *args))
    q, r = random_images(20, 4), random_images(30, 5)
    r[[3, 9, 10, 17, 25, 29]] = r[1]
    q[:4] = r[1]
    expected_d, expected_i = brute_force(q, r, 2)
    d, i = audit.nearest_neighbours(t(q), t(r), 2, candidates=2, ref_chunk=8)
    np.testing.assert_array_equal(i.numpy(), expected_i)
    np.testing.assert_allclose(d.numpy(), expected_d, rtol=1e-13)
    assert i[:4].tolist() == [[1, 3]] * 4 and sum(calls) >= 4  # the tied rows needed the fallback
    calls.clear()
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision('medium')  # bf16-grade bound: every query is in doubt
        d, i = audit.nearest_neighbours(t(q), t(r), 2)
    finally:
        torch.set_float32_matmul_precision(saved)
    np.testing.assert_array_equal(i.numpy(), expected_i)
    assert sum(calls) == 20


def test_too_few_references_or_mismatched_shapes_are_user_errors():
    import dnnlib
    with pytest.raises(dnnlib.UserError, match='at least 2 reference'):
        audit.nearest_neighbours(t(random_images(3, 0)), t(random_images(1, 1)), 2)
    with pytest.raises(dnnlib.UserError, match='cannot be compared'):
        audit.nearest_neighbours(t(random_images(3, 0)), t(random_images(3, 1, (3, 4, 4))), 2)

#----------------------------------------------------------------------------
# Audits with known answers.

@pytest.fixture(scope='module')
def clustered():
    """Reference, held-out and sample splits of one near-duplicate-rich distribution (300 prototypes, 8 grey levels)."""
    prototypes = random_images(300, 10, (1, 8, 8)).astype(np.float64)
    return {name: t(clustered_images(300, seed, prototypes)) for name, seed in [('train', 11), ('heldout', 12), ('samples', 13)]}


def test_verbatim_training_images_are_flagged(clustered):
    result = audit.audit_images(clustered['train'][:100], {'clean': clustered['train']}, clustered['heldout'], device='cpu')
    nn = result.pixel.samples.clean
    assert (nn.d1 == 0).all() and (nn.i1 == np.arange(100)).all() and (audit.gu_ratio(nn.d1, nn.d2) == 0).all()
    stats = result.report['references']['clean']['pixel']
    assert stats['gu_rate'] == 1 and stats['exact_copies'] == 100 and stats['share_below_heldout_p05'] == 1
    assert result.report['summary']['share_below_heldout_p05'] == 1 and result.report['warnings'] == []


def test_a_heldout_split_scores_at_the_baseline(clustered):
    result = audit.audit_images(clustered['samples'], {'clean': clustered['train']}, clustered['heldout'], device='cpu')
    stats = result.report['references']['clean']['pixel']
    # 300 samples: the share below the held-out 5th percentile has a standard error of about 1.5 points here.
    assert 0.01 <= stats['share_below_heldout_p05'] <= 0.10, stats
    # Near-duplicates flag fresh images too (a prototype drawn once into the reference set, about 1/e of them):
    # the Gu rate means something only next to the held-out rate, which a fresh split matches.
    assert stats['heldout']['gu_rate'] > 0.2
    assert abs(stats['gu_rate'] - stats['heldout']['gu_rate']) < 0.1, stats
    assert stats['exact_copies'] == 0


def test_union_of_reference_sets_and_heldout_overlap_warning(clustered):
    train = clustered['train']
    samples = torch.cat([train[:10], train[200:210], clustered['samples'][:20]])
    result = audit.audit_images(samples, {'clean': train[:100], 'originals': train[100:]}, train[250:], device='cpu')
    union = result.pixel.samples.union
    assert union.ref1[:10].tolist() == [0] * 10 and union.ref1[10:20].tolist() == [1] * 10
    assert union.i1[10:20].tolist() == list(range(100, 110)) and (union.d1[:20] == 0).all()
    assert result.report['summary']['exact_copies'] == 20 and result.report['references']['clean']['pixel']['exact_copies'] == 10
    assert result.report['union']['num_images'] == 300
    assert any('exact copies of originals' in w for w in result.report['warnings'])  # held-out set inside the references


def test_pixel_audit_is_not_shift_invariant_but_mirror_catches_flips():
    """A one-pixel shift of a (textured) copy is as far as any other image: not flagged, with or without --mirror.
    An x-flipped copy is flagged only with mirror=True, which also keeps the second nearest a different image."""
    refs = random_images(100, 20)
    refs[50] = np.concatenate([refs[50][:, :, :4], refs[50][:, :, :4][:, :, ::-1]], 2)  # x-symmetric
    mirrored = refs[:20, :, :, ::-1]
    shifted = np.concatenate([refs[20:40, :, :, 1:], refs[20:40, :, :, -1:]], 3)  # one pixel left, edge repeated
    samples = t(np.concatenate([mirrored, shifted, refs[50:51]]))
    for mirror in (False, True):
        nn = audit.audit_images(samples, {'clean': t(refs)}, mirror=mirror, device='cpu').pixel.samples.clean
        flagged = audit.gu_ratio(nn.d1, nn.d2) < audit.GU_THRESHOLD
        assert not flagged[20:40].any() and (nn.d1[20:40] > 0.5).all()
        assert flagged[:20].all() == mirror and flagged[:20].any() == mirror
        assert flagged[40] and nn.i1[40] == 50 and nn.i2[40] != 50
    assert (nn.d1[:20] == 0).all() and nn.mirrored[:20].all() and (nn.i1[:20] == np.arange(20)).all()
    assert not nn.mirrored[40]  # the unflipped orientation wins a tie


def test_feature_space_audit_with_a_stand_in_detector(clustered):
    detector = metrics.PixelsDetector([1, 8, 8], 'cpu')
    result = audit.audit_images(clustered['train'][:50], {'clean': clustered['train']}, clustered['heldout'],
                                detector=detector, device='cpu', mirror=True)
    stats = result.report['references']['clean']['pixels']
    assert stats['share_above']['0.99'] == 1 and stats['share_above_heldout_p95'] == 1
    assert stats['similarity']['min'] == pytest.approx(1, abs=1e-6) and stats['heldout']['similarity']['max'] < 1
    assert result.features.samples.clean.i1.tolist() == list(range(50))
    assert result.report['features'] == 'pixels' and result.report['summary']['share_above_heldout_p95'] == 1

#----------------------------------------------------------------------------
# The CLI.

def invoke(args):
    result = CliRunner().invoke(audit_cli.main, args)
    return result, result.output.strip().splitlines()


def assert_one_line_error(result, lines, match):
    assert result.exit_code == 1, result.output
    assert lines[-1].startswith('Error:') and match in lines[-1], result.output
    assert 'Traceback' not in result.output


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """clean/ (40), rest/ (60, corrupted into noisy/ whose originals path is relative), heldout/ (60), samples/."""
    root = tmp_path_factory.mktemp('audit-data')
    prototypes = random_images(60, 30).astype(np.float64)
    clean, rest, heldout = clustered_images(40, 31, prototypes), clustered_images(60, 32, prototypes), clustered_images(60, 33, prototypes)
    write_pngs(root / 'clean', clean)
    write_pngs(root / 'rest', rest)
    write_pngs(root / 'heldout', heldout)
    write_pngs(root / 'small', random_images(10, 34, (3, 4, 4)))
    write_pngs(root / 'single', clean[:1])
    write_pngs(root / 'samples', np.concatenate([clean[:5], rest[:5], clustered_images(30, 35, prototypes)]))
    dataset_tool.corrupt_dataset(str(root / 'rest'), str(root / 'noisy'), sigma=0.2, seed=0, verbose=False)
    meta_path = root / 'noisy' / 'dataset.json'
    meta = json.loads(meta_path.read_text())
    meta['originals'] = '../rest'
    meta_path.write_text(json.dumps(meta))
    return root


def test_cli_bad_input(data, monkeypatch):
    d = lambda name: str(data / name)
    base = [f'--outdir={d("out-bad")}']
    assert_one_line_error(*invoke(base + [f'--clean={d("clean")}']), 'Give either --network')
    assert_one_line_error(*invoke(base + [f'--clean={d("clean")}', f'--samples={d("samples")}', '--network=x.pt']), 'Give either --network')
    assert_one_line_error(*invoke(base + [f'--samples={d("samples")}', '--seeds=0-9', f'--clean={d("clean")}']), '--seeds applies to --network')
    assert_one_line_error(*invoke(base + [f'--samples={d("samples")}']), 'Nothing to audit against')
    assert_one_line_error(*invoke(base + [f'--samples={d("samples")}', f'--clean={d("missing")}']), 'Dataset not found')
    assert_one_line_error(*invoke(base + [f'--samples={d("samples")}', f'--clean={d("small")}']), 'audit images of one resolution')
    assert_one_line_error(*invoke(base + [f'--samples={d("samples")}', f'--clean={d("clean")}', f'--heldout={d("small")}']),
                          'The heldout set holds 4x4')
    assert_one_line_error(*invoke(base + [f'--samples={d("samples")}', f'--clean={d("single")}']), 'needs at least 2')
    assert_one_line_error(*invoke(base + [f'--samples={d("samples")}', f'--noisy={d("clean")}']), 'is not a noisy set')
    assert_one_line_error(*invoke(base + [f'--samples={d("samples")}', f'--clean={d("noisy")}']), 'is a noisy set')
    assert_one_line_error(*invoke(base + ['--network=missing.pt', f'--clean={d("clean")}']), 'No such file')

    def offline(*args, **kwargs):
        raise OSError('<urlopen error [Errno -3] Temporary failure in name resolution>')
    monkeypatch.setattr(torch.hub, 'load', offline)
    assert_one_line_error(*invoke(base + [f'--samples={d("samples")}', f'--clean={d("clean")}', '--features=dinov2']),
                          'Cannot load DINOv2')
    assert not os.path.exists(d('out-bad'))
    help_text = ' '.join(invoke(['--help'])[0].output.split())
    assert '[-1,1] pixel units' in help_text and 'only load files you trust' in help_text


def test_cli_end_to_end_on_samples(data):
    out = data / 'out'
    result, lines = invoke([f'--samples={data / "samples"}', f'--clean={data / "clean"}', f'--noisy={data / "noisy"}',
                            f'--heldout={data / "heldout"}', f'--outdir={out}', '--gallery=6', '--workers=0'])
    assert result.exit_code == 0, result.output
    report = json.loads((out / 'audit.json').read_text())
    assert {'units', 'num_samples', 'num_heldout', 'mirror', 'features', 'gu_threshold', 'references', 'union',
            'summary', 'warnings', 'inputs', 'gallery'} <= set(report)
    assert list(report['references']) == ['clean', 'originals']  # originals found through the relative path
    assert report['num_samples'] == 40 and report['references']['originals']['num_images'] == 60
    assert report['references']['clean']['pixel']['exact_copies'] == 5 and report['summary']['exact_copies'] == 10
    assert {'gu_rate', 'heldout_gu_rate', 'share_below_heldout_p05', 'heldout_p05', 'exact_copies'} == set(report['summary'])
    # The ten copies are the closest samples: first in the gallery, at distance 0, from the right set.
    rows = report['gallery']
    assert len(rows) == 6 and all(min(r['nearest'][n]['distance'] for n in r['nearest']) == 0 for r in rows)
    assert rows[0]['sample'] == '000000.png' and rows[0]['nearest']['clean'] == {'index': 0, 'distance': 0.0, 'mirrored': False}
    gallery = np.asarray(PIL.Image.open(out / 'gallery.png'))
    assert gallery.shape == (6 * 34 - 2, 3 * 34 - 2, 3)  # 8x8 images shown at 32x32, 2-pixel gaps
    np.testing.assert_array_equal(gallery[:32:4, :32:4], gallery[:32:4, 34:66:4])  # sample 0 beside its clean copy
    assert PIL.Image.open(out / 'histogram.png').size[0] > 400
    assert 'of samples are nearer to a reference image' in lines[-2]


def test_cli_notes_missing_originals(data, tmp_path):
    noisy = tmp_path / 'noisy'
    dataset_tool.corrupt_dataset(str(data / 'heldout'), str(noisy), sigma=0.2, seed=0, verbose=False)
    meta = json.loads((noisy / 'dataset.json').read_text())
    meta['originals'] = 'gone'
    (noisy / 'dataset.json').write_text(json.dumps(meta))
    result, lines = invoke([f'--samples={data / "samples"}', f'--noisy={noisy}', f'--clean={data / "clean"}',
                            f'--outdir={tmp_path / "out"}', '--workers=0'])
    assert result.exit_code == 0, result.output
    assert 'originals' in lines[0] and 'not audited against them (the originals do not exist)' in lines[0]
    report = json.loads((tmp_path / 'out' / 'audit.json').read_text())
    assert list(report['references']) == ['clean'] and report['summary']['share_below_heldout_p05'] is None
    assert_one_line_error(*invoke([f'--samples={data / "samples"}', f'--noisy={noisy}', f'--outdir={tmp_path / "o2"}']),
                          'Nothing to audit against')


def test_cli_on_a_network_does_not_depend_on_world_size(data, tmp_path, torchrun):
    from tests.test_generation import tiny_snapshot
    net = tiny_snapshot(str(tmp_path / 'net.pt'))
    args = [f'--network={net}', '--seeds=0-22', '--steps=3', f'--clean={data / "clean"}', f'--heldout={data / "heldout"}',
            '--batch=5', '--workers=0', '--mirror']
    result, _ = invoke(args + [f'--outdir={tmp_path / "one"}'])
    assert result.exit_code == 0, result.output
    torchrun(['audit.py', *args, f'--outdir={tmp_path / "two"}'])
    one, two = (json.loads((tmp_path / name / 'audit.json').read_text()) for name in ('one', 'two'))
    assert one['num_samples'] == 23 and one['mirror'] and one['gallery'][0]['sample'] in range(23)
    assert one == two

#----------------------------------------------------------------------------
# audit.py against bad input (tests/test_generation.py's files and checks): one 'Error:' line naming the input and
# the fix, exit 1 (2 for click's usage errors), no traceback, nothing written, nothing from a hostile file run.

AUDIT_CASES = {
    'outdir-file':        (['--outdir={text_txt}'], 1, ['--outdir={text_txt} is a file, not a directory']),
    'outdir-read-only':   (['--outdir={ro}/audit'], 1, ['--outdir={ro}/audit cannot be written ({ro} is not a writable directory)']),
    'outdir-empty':       (['--outdir='], 1, ['--outdir is empty; give a directory path']),
    'outdir-json-is-dir': ([], 1, ['{out}/audit.json is a directory, not a file; give another --outdir']),
    'seeds-huge':         (['--seeds=0-999999999'], 1, ['--seeds=0-999999999 asks for 1,000,000,000 images', 'give a smaller range']),
    'seeds-empty':        (['--seeds='], 1, ['--seeds is empty: give seeds such as 0-63']),
    'rho-nan':            (['--rho=nan'], 2, ["'--rho': nan is not a number"]),
    'S_max-nan':          (['--S_max=nan'], 2, ["'--S_max': nan is not a number; give a finite number x>=0 or inf"]),
    'S_noise-inf':        (['--S_noise=inf'], 2, ["'--S_noise': inf is not finite"]),
    'inf-images':         (['--S_churn=10', '--S_noise=1e308'], 1, ['NaN or inf for seeds 0..3', '--S_noise']),
    'gallery-zero':       (['--gallery=0'], 2, ["'--gallery': 0 is not in the range x>=1"]),
    'network-code-pkl':   (['--network={code_pkl}'], 1, ['{code_pkl} is a pickle but not an EDM network pickle', 'nothing in it was run']),
    'network-code-pt':    (['--network={code_pt}'], 1, ['{code_pt} holds Python objects beyond tensors', 'it was not run']),
    'network-huge':       (['--network={huge_pt}'], 1, ['{huge_pt} describes a network (EDMPrecond) of', 'GiB of memory available']),
    'network-truncated':  (['--network={truncated_pt}'], 1, ['{truncated_pt} is truncated or corrupt', 'copy or download it again']),
    'clean-not-images':   (['--clean={text_txt}'], 1, ['{text_txt} is neither a folder nor a zip file']),
    'clean-resolution':   (['--clean={small}'], 1, ['The clean set holds 4x4 images', 'audit images of one resolution']),
    'samples-missing':    (['--samples={dir}/missing', '--clean={imgs}', '--outdir={out}'], 1, ['Dataset not found']),
}


@pytest.mark.parametrize('case', AUDIT_CASES)
def test_audit_cli_bad_input(bad, tmp_path, case):
    args, exit_code, needles = AUDIT_CASES[case]
    if not any(a.startswith('--samples=') for a in args):  # a network audit: the flags given replace these
        base = ['--network={net_pt}', '--clean={imgs}', '--outdir={out}', '--seeds=0-3', '--steps=2', '--workers=0']
        args = [a for a in base if a.split('=')[0] not in {b.split('=')[0] for b in args}] + args
    setup = (lambda names: os.makedirs(os.path.join(names['out'], 'audit.json'))) if case == 'outdir-json-is-dir' else None
    run_bad_case(audit_cli.main, bad, tmp_path, args, exit_code, needles, setup)
