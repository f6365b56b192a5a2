"""Named scalar statistics: reported on each rank, reduced over ranks (count, mean, std), saved as JSON lines."""

import json
import re
from typing import Any

import numpy as np
import torch

from . import distributed

#----------------------------------------------------------------------------

# name -> float64 tensor [count, sum, sum of squares] since the last Collector.update(), kept on the
# device of the reported values so that reporting never waits for the GPU.
_moments: dict[str, torch.Tensor] = {}
_names: list[str] = []  # in order of first report, identical on every rank that reports the same names


def report(name: str, value: Any) -> Any:
    """Accumulate `value` (a number or a tensor of samples; non-finite entries ignored) under `name`.

    Returns `value` unchanged, so it can wrap an expression.
    """
    v = torch.as_tensor(value).detach().flatten().to(torch.float64)
    finite = torch.isfinite(v)
    v = torch.where(finite, v, torch.zeros_like(v))  # masking, not indexing: no device synchronisation
    m = torch.stack([finite.sum().to(torch.float64), v.sum(), v.square().sum()])
    if name not in _moments:
        _moments[name] = torch.zeros(3, dtype=torch.float64, device=m.device)
        _names.append(name)
    _moments[name] += m.to(_moments[name].device)
    return value


def report0(name: str, value: Any) -> Any:
    """report() on rank 0; other ranks register the name with no samples (for things computed once)."""
    return report(name, value if distributed.get_rank() == 0 else [])


class Collector:
    """Reduces the statistics reported since the previous update() over all ranks.

    Every rank must call update() together, and must have reported the same set of names (use
    report0 for rank-0-only values).
    """

    def __init__(self, regex: str = '.*', keep_previous: bool = True):
        self._regex = re.compile(regex)
        self._keep_previous = keep_previous
        self._stats: dict[str, dict[str, float]] = {}

    def names(self) -> list[str]:
        return [n for n in _names if self._regex.fullmatch(n)]

    def update(self) -> None:
        names = self.names()
        if not self._keep_previous:
            self._stats = {}
        if not names:
            return
        local = torch.stack([_moments[n].cpu() for n in names])
        total = distributed.all_reduce_sum(local)
        for n, (count, s, sq) in zip(names, total.tolist()):
            _moments[n].zero_()
            if count == 0:
                continue
            mean = s / count
            var = max(sq / count - mean * mean, 0.0)
            self._stats[n] = dict(num=int(count), mean=mean, std=float(np.sqrt(var)))

    def num(self, name: str) -> int:
        return self._stats.get(name, {}).get('num', 0)

    def mean(self, name: str) -> float:
        return self._stats.get(name, {}).get('mean', float('nan'))

    def std(self, name: str) -> float:
        return self._stats.get(name, {}).get('std', float('nan'))

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {n: dict(v) for n, v in self._stats.items()}


def append_jsonl(path: str, record: dict) -> None:
    """Append one JSON record as a line (rank 0 writes; others do nothing)."""
    if distributed.get_rank() != 0:
        return
    with open(path, 'a') as f:
        f.write(json.dumps(record) + '\n')
        f.flush()

