"""torch_utils: statistics reduced over 2 ranks equal single-process values; sharding; keyed RNG."""

import json
import math
import sys

import numpy as np
import pytest
import scipy.stats
import torch

from torch_utils import distributed, rng, training_stats

# Values each of two ranks reports; the 2-rank reduction must equal one process reporting both.
RANK_VALUES = {0: [1.0, 2.0, 3.0], 1: [10.0, 20.0]}


def _report_and_collect(values_by_rank, rank):
    training_stats.report('Loss/x', torch.tensor(values_by_rank[rank]))
    training_stats.report0('Timing/once', 5.0)
    c = training_stats.Collector(regex='.*')
    c.update()
    return c.as_dict()


def main_two_rank(out_path):
    distributed.init()
    stats = _report_and_collect(RANK_VALUES, distributed.get_rank())
    if distributed.get_rank() == 0:
        with open(out_path, 'w') as f:
            json.dump(stats, f)
    distributed.cleanup()


def test_stats_two_ranks_equal_single_process(tmp_path, torchrun):
    out = tmp_path / 'stats.json'
    torchrun(['--no-python', sys.executable, '-c', f'import tests.test_torch_utils as t; t.main_two_rank({str(out)!r})'])
    two = json.loads(out.read_text())
    single = _report_and_collect({0: RANK_VALUES[0] + RANK_VALUES[1]}, 0)
    all_vals = np.array(RANK_VALUES[0] + RANK_VALUES[1])
    assert two['Loss/x']['num'] == 5 == single['Loss/x']['num']
    assert two['Loss/x']['mean'] == pytest.approx(all_vals.mean()) == single['Loss/x']['mean']
    assert two['Loss/x']['std'] == pytest.approx(all_vals.std())
    assert two['Timing/once'] == {'num': 1, 'mean': 5.0, 'std': 0.0}


def test_shard_covers_every_index_once():
    for n in [0, 1, 7, 100]:
        for world in [1, 2, 3, 8]:
            idx = [i for r in range(world) for i in distributed.shard(n, r, world)]
            assert idx == list(range(n))


def test_stacked_generator_independent_of_batching():
    seeds = [rng.derive_seed(0, 1, i) for i in range(5)]
    full = rng.StackedRandomGenerator('cpu', seeds).randn([5, 3])
    part = torch.cat([rng.StackedRandomGenerator('cpu', seeds[:2]).randn([2, 3]),
                      rng.StackedRandomGenerator('cpu', seeds[2:]).randn([3, 3])])
    assert torch.equal(full, part)
    assert rng.derive_seed(0, 1, 2) != rng.derive_seed(0, 2, 1)


def test_batch_random_rows_independent_of_split():
    full = rng.BatchRandom(7, 6, 0, 6)
    a, b = rng.BatchRandom(7, 6, 0, 4), rng.BatchRandom(7, 6, 4, 6)
    for _ in range(2):
        assert torch.equal(full.randn(2), torch.cat([a.randn(2), b.randn(2)]))
        assert torch.equal(full.rand(1), torch.cat([a.rand(1), b.rand(1)]))

#----------------------------------------------------------------------------
# BatchRandom: Philox4x32-10, exact floats, statistics.

def _philox_reference(counter, key):
    """Philox4x32-10 in Python integers, written from the Random123 paper (SC 2011)."""
    x, (k0, k1) = list(counter), key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * x[0], 0xCD9E8D57 * x[2]
        x = [(p1 >> 32) ^ x[1] ^ k0, p1 & 0xFFFFFFFF, (p0 >> 32) ^ x[3] ^ k1, p0 & 0xFFFFFFFF]
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return x


@pytest.mark.parametrize('counter, key, expected', [  # Random123's published known answers (kat_vectors)
    ((0, 0, 0, 0), (0, 0), '6627e8d5 e169c58d bc57ac4c 9b00dbd8'),
    ((0xffffffff,) * 4, (0xffffffff,) * 2, '408f276d 41c83b0e a20bc7c6 6d5451fd'),
    ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0), 'd16cfe09 94fdcceb 5001e420 24126ea1'),
])
def test_philox_known_answers(counter, key, expected):
    assert ' '.join(f'{int(w):08x}' for w in rng.philox4x32(counter, key)) == expected
    assert ' '.join(f'{w:08x}' for w in _philox_reference(counter, key)) == expected


def test_philox_matches_the_reference_on_random_counters():
    gen = np.random.default_rng(0)
    counters = gen.integers(0, 1 << 32, size=(4, 50)).tolist()
    key = tuple(gen.integers(0, 1 << 32, size=2).tolist())
    words = rng.philox4x32([torch.tensor(c) for c in counters], key)
    assert words.shape == (4, 50) and words.dtype == torch.int64
    assert words.T.tolist() == [_philox_reference(c, key) for c in zip(*counters)]


def test_batch_random_is_philox_of_seed_row_and_block():
    seed = (123 << 32) | 456
    words = rng.BatchRandom(seed, 10, 3, 5)._words(8)  # rows 3, 4; blocks 0, 1; word v is lane v // 2 of block v % 2
    for r, row in enumerate([3, 4]):
        blocks = [_philox_reference((j, row, 0, 0), (456, 123)) for j in range(2)]
        assert words[r].tolist() == [blocks[v % 2][v // 2] for v in range(8)]


def _draw_sequence(rnd: rng.BatchRandom) -> list[torch.Tensor]:
    """Small draws (served from one Philox pass), a large one (its own pass) and every dtype path."""
    return [rnd.randn(1, 1, 1), rnd.rand(2), rnd.randint(0, 4, 3), rnd.randn(3, 8, 8), rnd.rand(5), rnd.randn(),
            rnd.randn(7, dtype=torch.float64), rnd.rand(3, dtype=torch.float64), rnd.rand(4, dtype=torch.bfloat16),
            rnd.randint(-3, 4, 2, 2)]


def test_batch_random_rows_identical_for_every_split_and_thread_count():
    whole = _draw_sequence(rng.BatchRandom(11, 7, 0, 7))
    for bounds in [[0, 1, 4, 7], [0, 3, 7], [0, 7]]:
        parts = [_draw_sequence(rng.BatchRandom(11, 7, a, b)) for a, b in zip(bounds[:-1], bounds[1:])]
        for i, x in enumerate(whole):
            assert torch.equal(torch.cat([p[i] for p in parts]), x), (bounds, i)
    assert [x.dtype for x in whole] == [torch.float32] * 2 + [torch.int64] + [torch.float32] * 3 + [torch.float64] * 2 + [torch.bfloat16, torch.int64]
    assert [tuple(x.shape) for x in whole[:4]] == [(7, 1, 1, 1), (7, 2), (7, 3), (7, 3, 8, 8)]
    # Elementwise ops split across threads above torch's grain size (32768 elements): still the same bits.
    saved = torch.get_num_threads()
    try:
        draws = {}
        for threads in [1, 2]:
            torch.set_num_threads(threads)
            rnd = rng.BatchRandom(3, 64, 0, 40)
            draws[threads] = [rnd.randn(3, 32, 32), rnd.rand(1000)]
    finally:
        torch.set_num_threads(saved)
    assert all(torch.equal(a, b) for a, b in zip(draws[1], draws[2]))


def test_batch_random_costs_only_its_own_rows():
    # Two rows of a global batch of 2^31 - 1: the old whole-batch draw would need 26 TB here.
    x = rng.BatchRandom(0, (1 << 31) - 1, (1 << 31) - 3, (1 << 31) - 1).randn(3, 32, 32)
    assert x.shape == (2, 3, 32, 32) and torch.isfinite(x).all()


def test_box_muller_matches_float64_closed_form():
    gen = np.random.default_rng(1)
    for bits, dtype, tol in [(24, torch.float32, 1e-6), (53, torch.float64, 1e-14)]:
        k = gen.integers(0, 1 << bits, size=(2, 20000), dtype=np.int64)
        k[:, :6] = [[0, 1, (1 << bits) - 1, 1 << (bits - 1), 12345, 0], [0, (1 << bits) - 1, 1 << (bits - 2), 3 << (bits - 2), 1 << (bits - 3), 5]]
        z0, z1 = rng._box_muller(torch.from_numpy(k[0]), torch.from_numpy(k[1]), bits, dtype)
        quarter = 1 << (bits - 2)
        radius = np.sqrt(-2 * np.log((k[0] + 1) / 2.0 ** bits))
        angle = (k[1] >> (bits - 2)) * (np.pi / 2) + ((k[1] & (quarter - 1)) - quarter // 2) * (np.pi / 2 / quarter)
        assert z0.dtype == dtype
        np.testing.assert_allclose(z0.double().numpy(), radius * np.cos(angle), rtol=0, atol=tol)
        np.testing.assert_allclose(z1.double().numpy(), radius * np.sin(angle), rtol=0, atol=tol)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_batch_random_normal_and_uniform_statistics(dtype):
    rnd = rng.BatchRandom(2024, 100, 0, 100)
    z = rnd.randn(1000, dtype=dtype).double().flatten().numpy()
    n = z.size
    assert abs(z.mean()) < 4 / math.sqrt(n) and abs(z.var() - 1) < 4 * math.sqrt(2 / n)
    assert abs(scipy.stats.skew(z)) < 4 * math.sqrt(6 / n) and abs(scipy.stats.kurtosis(z)) < 4 * math.sqrt(24 / n)
    assert scipy.stats.kstest(z, 'norm').pvalue > 1e-3
    assert np.abs(z).max() <= math.sqrt(2 * (24 if dtype == torch.float32 else 53) * math.log(2)) + 1e-6
    u = rnd.rand(1000, dtype=dtype).double().flatten().numpy()
    assert 0 <= u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 4 * math.sqrt(1 / 12 / n) and abs(u.var() - 1 / 12) < 4 * math.sqrt(1 / 180 / n)
    assert scipy.stats.kstest(u, 'uniform').pvalue > 1e-3


def _corr(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(np.corrcoef(x.double().flatten().numpy(), y.double().flatten().numpy())[0, 1])


def test_batch_random_rows_calls_lanes_and_seeds_are_uncorrelated():
    rnd = rng.BatchRandom(5, 200, 0, 200)
    x, y = rnd.randn(2000), rnd.randn(2000)  # 500 blocks per row and call: value v and v + 500 share a Box-Muller pair
    bound = 5 / math.sqrt(x.numel() / 4)
    assert abs(_corr(x[:-1], x[1:])) < bound                                  # neighbouring rows
    assert abs(_corr(x, y)) < bound                                           # successive calls
    assert abs(_corr(x[:, :-1], x[:, 1:])) < bound                            # neighbouring blocks
    assert abs(_corr(x[:, :500], x[:, 500:1000])) < bound                     # cos and sin of one pair ...
    assert abs(_corr(x[:, :500] ** 2, x[:, 500:1000] ** 2)) < bound           # ... independent, not just uncorrelated
    assert abs(_corr(x[:, :1000], x[:, 1000:])) < bound                       # lanes (0, 1) and (2, 3)
    assert abs(_corr(x, rng.BatchRandom(6, 200, 0, 200).randn(2000))) < bound  # neighbouring seeds
    u, v = rnd.rand(2000), rnd.rand(2000)
    assert abs(_corr(u, v)) < bound and abs(_corr(u[:-1], u[1:])) < bound


def test_batch_random_randint_range_and_uniformity():
    k = rng.BatchRandom(9, 100, 0, 100).randint(-3, 4, 1000)
    assert k.dtype == torch.int64 and k.min() == -3 and k.max() == 3
    counts = torch.bincount((k + 3).flatten(), minlength=7).numpy()
    assert scipy.stats.chisquare(counts).pvalue > 1e-3
    assert torch.equal(rng.BatchRandom(9, 100, 0, 100).randint(0, 1, 5), torch.zeros(100, 5, dtype=torch.int64))


def test_batch_random_low_precision_uniforms_stay_below_one():
    for dtype, bits in [(torch.bfloat16, 8), (torch.float16, 11)]:
        u = rng.BatchRandom(1, 64, 0, 64).rand(4096, dtype=dtype)
        assert u.dtype == dtype and u.max() == 1 - 2.0 ** -bits and u.min() == 0
        assert torch.equal(u.float() * 2 ** bits, (u.float() * 2 ** bits).round())  # exactly k 2^-bits


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_batch_random_cuda_gives_the_cpu_bits():
    for cpu, cuda in zip(_draw_sequence(rng.BatchRandom(11, 7, 2, 7)), _draw_sequence(rng.BatchRandom(11, 7, 2, 7, 'cuda'))):
        assert cuda.device.type == 'cuda' and torch.equal(cuda.cpu(), cpu)
    assert torch.equal(rng.BatchRandom(4, 512, 0, 64, 'cuda').randn(3, 32, 32).cpu(), rng.BatchRandom(4, 512, 0, 64).randn(3, 32, 32))


def test_report_ignores_non_finite_values():
    training_stats.report('Test/nonfinite', torch.tensor([1.0, float('nan'), float('inf'), 3.0]))
    c = training_stats.Collector(regex='Test/nonfinite')
    c.update()
    assert c.num('Test/nonfinite') == 2 and c.mean('Test/nonfinite') == 2.0 and c.std('Test/nonfinite') == 1.0
