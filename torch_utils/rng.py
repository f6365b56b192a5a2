"""Random numbers keyed by sample, never by rank, batch or world size."""

from typing import Sequence

import numpy as np
import torch

#----------------------------------------------------------------------------

def derive_seed(*keys: int) -> int:
    """A 63-bit seed from a tuple of non-negative integer keys, e.g. (seed, iteration, index)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class StackedRandomGenerator:
    """One torch.Generator per sample; row i of every draw depends only on seeds[i]."""

    def __init__(self, device: torch.device | str, seeds: Sequence[int]):
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(s) % (1 << 63)) for s in seeds]

    def randn(self, size: Sequence[int], **kwargs) -> torch.Tensor:
        assert size[0] == len(self.generators)
        return torch.stack([torch.randn(size[1:], generator=g, device=self.device, **kwargs) for g in self.generators])

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape, dtype=x.dtype, layout=x.layout)

    def rand(self, size: Sequence[int], **kwargs) -> torch.Tensor:
        assert size[0] == len(self.generators)
        return torch.stack([torch.rand(size[1:], generator=g, device=self.device, **kwargs) for g in self.generators])

    def randint(self, *args, size: Sequence[int], **kwargs) -> torch.Tensor:
        assert size[0] == len(self.generators)
        return torch.stack([torch.randint(*args, size=size[1:], generator=g, device=self.device, **kwargs) for g in self.generators])


class BatchRandom:
    """Draws for a whole global batch from one generator, returning this process's rows.

    Every rank (and every accumulation round) creates it with the same `seed` and `global_batch`
    and its own row range [start, stop); each call draws the full (global_batch, *shape) tensor on
    the CPU and slices it, so results do not depend on world size or per-GPU batch.
    """

    def __init__(self, seed: int, global_batch: int, start: int, stop: int, device: torch.device | str = 'cpu'):
        assert 0 <= start <= stop <= global_batch
        self.generator = torch.Generator().manual_seed(int(seed) % (1 << 63))
        self.global_batch, self.start, self.stop = global_batch, start, stop
        self.device = torch.device(device)

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        x = torch.randn((self.global_batch, *shape), generator=self.generator, dtype=dtype)
        return x[self.start:self.stop].to(self.device)

    def rand(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        x = torch.rand((self.global_batch, *shape), generator=self.generator, dtype=dtype)
        return x[self.start:self.stop].to(self.device)

    def randint(self, low: int, high: int, *shape: int) -> torch.Tensor:
        x = torch.randint(low, high, (self.global_batch, *shape), generator=self.generator)
        return x[self.start:self.stop].to(self.device)
