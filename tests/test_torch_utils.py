"""torch_utils: statistics reduced over 2 ranks equal single-process values; sharding; keyed RNG."""

import json
import sys

import numpy as np
import pytest
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


def test_report_ignores_non_finite_values():
    training_stats.report('Test/nonfinite', torch.tensor([1.0, float('nan'), float('inf'), 3.0]))
    c = training_stats.Collector(regex='Test/nonfinite')
    c.update()
    assert c.num('Test/nonfinite') == 2 and c.mean('Test/nonfinite') == 2.0 and c.std('Test/nonfinite') == 1.0
