"""Bench: one training step's keyed draws per rank against the world size, against the old whole-batch draw."""

import functools
import itertools

import click
import torch

import common
import dnnlib
from torch_utils import rng

#----------------------------------------------------------------------------

class WholeBatchRandom:
    """The previous BatchRandom, kept here only as the baseline: every rank and accumulation round draws the
    whole global batch on the CPU from one torch.Generator, then copies its rows [start, stop) to the device."""

    def __init__(self, seed: int, global_batch: int, start: int, stop: int, device: torch.device | str = 'cpu'):
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


class _Recorder:
    """Stands in for BatchRandom to record the calls (method, args, kwargs) a loss and augment pipe make per step."""

    def __init__(self, rows: int):
        self.rows, self.calls = rows, []

    def __getattr__(self, name: str):
        def draw(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            shape = args[2:] if name == 'randint' else args
            return torch.zeros([self.rows, *shape], dtype=torch.int64 if name == 'randint' else kwargs.get('dtype', torch.float32))
        return draw


def step_draws(preset: str) -> tuple[int, list[tuple]]:
    """The preset's global batch and the draws of one training step (sigma, augmentation, noise), recorded from
    the loss and augment pipe that train.py builds for it."""
    c = common.training_kwargs(preset)
    loss_fn = dnnlib.util.construct_class_by_name(**c.loss_kwargs)
    pipe = dnnlib.util.construct_class_by_name(**c.augment_kwargs) if c.get('augment_kwargs') else None
    recorder = _Recorder(rows=2)
    res = common.RESOLUTIONS[preset]
    loss_fn(net=lambda x, sigma, labels=None, augment_labels=None: x, images=torch.zeros([2, 3, res, res]),
            augment_pipe=pipe, rnd=recorder)
    return c.batch_size, recorder.calls


def make_step(impl: type, calls: list[tuple], batch: int, rows: int, device: torch.device):
    """One step's draws for the first rank of batch // rows ranks: a fresh generator per step, as training_loop makes."""
    steps = itertools.count()

    def step():
        rnd = impl(rng.derive_seed(0, next(steps)), batch, 0, rows, device)
        return [getattr(rnd, name)(*args, **kwargs) for name, args, kwargs in calls]
    return step


def bench_rng(preset: str, device: torch.device, worlds: list[int], iters: int, warmup: int, stat: str = 'median',
              batch: int | None = None) -> list[dict]:
    """Rows (one per world size) of per-rank seconds for the old and the keyed draws, timed interleaved in one run."""
    preset_batch, calls = step_draws(preset)
    batch = batch or preset_batch
    builders, layout = [], []
    for world in worlds:
        if world < 1 or batch % world:
            raise dnnlib.UserError(f'--worlds: {world} ranks do not split the batch of {batch}')
        for name, impl in [('old', WholeBatchRandom), ('keyed', rng.BatchRandom)]:
            builders.append((common.Variant(name=f'{name}-w{world}'), functools.partial(make_step, impl, calls, batch, batch // world, device)))
            layout.append((world, name))
    timed = {key: row for key, row in zip(layout, common.measure(builders, iters, warmup, device, stat))}
    rows = []
    for world in worlds:
        old, new = timed[world, 'old']['sec'], timed[world, 'keyed']['sec']
        rows.append(dict(preset=preset, world=world, rows=batch // world, draws=len(calls), old_ms=old * 1e3, keyed_ms=new * 1e3,
                         speedup=old / new, old_vs_1=old / timed[worlds[0], 'old']['sec'], keyed_vs_1=new / timed[worlds[0], 'keyed']['sec']))
    return rows

#----------------------------------------------------------------------------

@click.command(context_settings=dict(help_option_names=['-h', '--help']))
@click.option('--preset', 'presets', type=click.Choice(sorted(common.RESOLUTIONS)), multiple=True, default=['cifar10-ddpmpp', 'celeba64-ncsnpp'], show_default=True, help='configs/ preset: batch, resolution, loss and augmentation as train.py builds them (repeatable).')
@click.option('--worlds', type=dnnlib.util.parse_int_list, default='1,2,8,64', show_default=True, help='Simulated numbers of ranks; each times the first rank\'s rows of the global batch.')
@click.option('--batch', type=click.IntRange(min=1), default=None, help='Global batch  [default: the preset\'s]')
@click.option('--device', type=click.Choice(['cpu', 'cuda']), default='cuda' if torch.cuda.is_available() else 'cpu', show_default=True, help='Where the draws go.')
@click.option('--iters', type=click.IntRange(min=1), default=20, show_default=True, help='Timed steps per row.')
@click.option('--warmup', type=click.IntRange(min=1), default=2, show_default=True, help='Untimed steps first.')
@click.option('--stat', type=click.Choice(['median', 'min']), default='median', show_default=True, help='Statistic of the timed steps (min suits a shared CPU).')
@click.option('--threads', type=click.IntRange(min=1), default=None, help='CPU threads for torch  [default: torch default]')
@click.option('--json', 'json_path', type=click.Path(dir_okay=False), default=None, help='Also write the table and machine info here as JSON.')
def main(presets, worlds, batch, device, iters, warmup, stat, threads, json_path):
    """Per-rank time of one training step's random draws (sigma, augmentation, noise) at simulated world sizes.

    Rank 0's rows of the global batch are drawn as training_loop draws them, by the keyed generator
    (torch_utils.rng.BatchRandom) and by the old whole-batch CPU draw (kept in this file); both are
    timed interleaved, synchronised on CUDA. On a CPU device this is host time; on CUDA it is the
    host time of the old draw and the (mostly launch-bound) host or device time of the keyed one.
    """
    dev = common.setup_device(device, threads)
    rows = [row for preset in presets for row in bench_rng(preset, dev, worlds, iters, warmup, stat, batch)]
    columns = [('preset', 'preset', ''), ('world', 'ranks', 'd'), ('rows', 'rows/rank', 'd'), ('draws', 'draws', 'd'),
               ('old_ms', f'old ms ({stat})', '.2f'), ('keyed_ms', f'keyed ms ({stat})', '.2f'), ('speedup', 'x old', '.2f'),
               ('old_vs_1', 'old vs 1 rank', '.3f'), ('keyed_vs_1', 'keyed vs 1 rank', '.3f')]
    common.report('bench_rng', dev, dict(presets=list(presets), worlds=worlds, batch=batch, iters=iters, warmup=warmup, stat=stat),
                  rows, columns, json_path,
                  notes=['Per rank and step. x old: old time / keyed time. "vs 1 rank": time per rank against one rank drawing the whole batch',
                         '(target for keyed at 8 ranks: <= 0.25); the old draw costs every rank the whole batch, so its total host work grows with the ranks.'])


if __name__ == '__main__':
    main()
