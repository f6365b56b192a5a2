"""Shared bench pieces: common options, variants, timing with warm-up and sync, machine info, tables, JSON."""

import contextlib
import dataclasses
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
from typing import Any, Callable, Iterator

import click
import torch
import torch.utils.flop_counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as `python bench/x.py`

import dnnlib  # noqa: E402
import dnnlib.cli  # noqa: E402
from torch_utils import distributed, perf  # noqa: E402
from training import options  # noqa: E402

#----------------------------------------------------------------------------
# Variants: '+'-joined tokens, e.g. 'bf16+cl+compile'. 'fp32' is the plain fp32 eager baseline.

TOKENS = {
    'fp32':    'plain fp32 eager (the baseline)',
    'bf16':    'bf16 autocast around forward passes (falls back to fp32 without native bf16)',
    'cl':      'channels_last weights and inputs',
    'sdpa':    'fused attention (scaled_dot_product_attention) in the U-Net attention blocks',
    'compile': 'torch.compile (default mode)',
    'xN':      'N times the batch (larger inference batches), e.g. x4',
    'wN':      'N DataLoader worker processes, e.g. w2',
    'pin':     'pinned host memory and non-blocking copies (prefetch to the device)',
}


@dataclasses.dataclass
class Variant:
    name: str
    bf16: bool = False
    channels_last: bool = False
    sdpa: bool = False
    compile: bool = False
    batch_mult: int = 1
    workers: int = 0
    pin: bool = False

    @property
    def precision(self) -> str:
        return 'bf16' if self.bf16 else 'fp32'


def parse_variant(name: str, allowed: str) -> Variant:
    """One variant from its name; `allowed` lists the token kinds this bench understands ('bf16,cl,...')."""
    allowed_kinds = set(allowed.split(','))
    v = Variant(name=name)
    for token in name.split('+'):
        kind = re.sub(r'\d+$', 'N', token) if re.fullmatch(r'[xw]\d+', token) else token
        if kind not in allowed_kinds | {'fp32'}:
            raise dnnlib.UserError(f'Unknown variant token {token!r} in {name!r}: this bench knows {", ".join(["fp32", *sorted(allowed_kinds)])}')
        if kind == 'bf16': v.bf16 = True
        elif kind == 'cl': v.channels_last = True
        elif kind == 'sdpa': v.sdpa = True
        elif kind == 'compile': v.compile = True
        elif kind == 'pin': v.pin = True
        elif kind == 'xN': v.batch_mult = int(token[1:])
        elif kind == 'wN': v.workers = int(token[1:])
    if v.batch_mult < 1:
        raise dnnlib.UserError(f'Batch multiplier must be >= 1 in {name!r}')
    return v


def parse_variants(spec: str, allowed: str, baseline: str = 'fp32') -> list[Variant]:
    """Comma-separated variants; the baseline is put first if missing, so every ratio has its reference."""
    names = [s.strip() for s in spec.split(',') if s.strip()]
    if not names or names[0] != baseline:
        names = [baseline] + [n for n in names if n != baseline]
    return [parse_variant(n, allowed) for n in names]

#----------------------------------------------------------------------------
# Options shared by every bench.

def bench_options(batch: int, iters: int, warmup: int, variants: str, allowed: str) -> Callable:
    """Decorator adding --device, --batch, --iters, --warmup, --variants, --threads, --json to a click command."""
    known = ', '.join(f'{k} ({TOKENS[k]})' for k in ['fp32', *allowed.split(',')])
    def decorate(fn: Callable) -> Callable:
        options = [
            click.option('--device', type=click.Choice(['cpu', 'cuda']), default='cuda' if torch.cuda.is_available() else 'cpu', show_default=True, help='Where to run.'),
            click.option('--batch', type=click.IntRange(min=1), default=batch, show_default=True, help='Batch size (images) of the baseline.'),
            click.option('--iters', type=click.IntRange(min=1), default=iters, show_default=True, help='Timed iterations per variant.'),
            click.option('--warmup', type=click.IntRange(min=1), default=warmup, show_default=True, help='Untimed iterations first (compilation, cuDNN autotuning, caches; peak memory).'),
            click.option('--stat', type=click.Choice(['median', 'min']), default='median', show_default=True, help='Statistic of the timed iterations behind rates and ratios (min suits a shared CPU).'),
            click.option('--variants', type=str, default=variants, show_default=True, help=f'Comma-separated variants, tokens joined by "+". Tokens: {known}.'),
            click.option('--threads', type=click.IntRange(min=1), default=None, help='CPU threads for torch  [default: torch default]'),
            click.option('--json', 'json_path', type=click.Path(dir_okay=False), default=None, help='Also write the table and machine info here as JSON.'),
        ]
        for option in reversed(options):
            fn = option(fn)
        return fn
    return decorate


def setup_device(device: str, threads: int | None) -> torch.device:
    """Validate the device and set CPU threads and backend flags."""
    if device == 'cuda' and not torch.cuda.is_available():
        raise dnnlib.UserError('--device=cuda but CUDA is not available; use --device=cpu')
    if threads is not None:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    perf.configure_backends(dev)
    return dev

#----------------------------------------------------------------------------
# Timing.

def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], Any], iters: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds per call of `step` for `iters` calls after `warmup` untimed ones, synchronising the device."""
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def measure(builders: list[tuple[Variant, Callable[[], Callable[[], Any]]]], iters: int, warmup: int,
            device: torch.device, stat: str = 'median') -> list[dict]:
    """Build and warm up each variant's step, then time the steps in interleaved rounds.

    Round-robin timing spreads load from other processes (shared CPUs) over all variants alike.
    peak_bytes is the peak during the variant's build and warm-up above the memory in use before
    its build: its weights, gradients, optimizer state and activations.
    """
    steps, rows = [], []
    for v, build in builders:
        gc.collect()
        with perf.track_peak_memory(device) as mem:
            before = perf.current_memory(device)
            step = build()
            time_steps(step, 0, warmup, device)
        steps.append(step)
        rows.append(dict(variant=v.name, peak_bytes=max(mem['peak_bytes'] - before, 0), times=[]))
    for _ in range(iters):
        for step, row in zip(steps, rows):
            row['times'] += time_steps(step, 1, 0, device)
    for row in rows:
        times = row.pop('times')
        row.update(sec_median=statistics.median(times), sec_min=min(times), sec_mean=statistics.fmean(times), samples=len(times))
        row['sec'] = row['sec_' + stat]
    return rows

#----------------------------------------------------------------------------
# Machine description and output.

def machine_info(device: torch.device) -> dict:
    """What the numbers ran on: CPU model and flags that matter, threads, load, GPU, torch version."""
    cpu_model = platform.processor()
    try:
        with open('/proc/cpuinfo') as f:
            cpu_model = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), cpu_model)
    except OSError:
        pass
    info = dict(
        cpu=cpu_model,
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        cpu_bf16_flags=sorted(perf.cpu_flags() & {'amx_bf16', 'amx_tile', 'avx512_bf16', 'avx512f'}),
        loadavg_1m=os.getloadavg()[0] if hasattr(os, 'getloadavg') else None,
        torch=torch.__version__,
        python=platform.python_version(),
        device=str(device),
    )
    if device.type == 'cuda':
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return info


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Rows as an aligned text table; columns are (key, header, format spec)."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        cells.append([('-' if row.get(k) is None else format(row[k], fmt)) for k, _, fmt in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ['  '.join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, '  '.join('-' * w for w in widths))
    return '\n'.join(lines)


def add_throughput(rows: list[dict], variants: list, batch: int, device: torch.device) -> None:
    """Fill each timed row with its precision, images per call, images/s, peak MiB, and ratios to the baseline."""
    for v, row in zip(variants, rows):
        n = batch * v.batch_mult
        row.update(precision=perf.resolve_precision(v.precision, device), batch=n, images_per_sec=n / row['sec'],
                   peak_mib=mib(row['peak_bytes']))
    add_ratios(rows, 'images_per_sec')


def add_ratios(rows: list[dict], key: str) -> None:
    """rows[i]['ratio'] = rows[i][key] / rows[0][key]: speed-up over the baseline (first row) for a rate."""
    base = rows[0][key]
    for row in rows:
        row['ratio'] = row[key] / base if base and row.get(key) is not None else None


def report(bench: str, device: torch.device, args: dict, rows: list[dict], columns: list[tuple[str, str, str]],
           json_path: str | None, notes: list[str] = ()) -> None:
    """Print the machine line, the table and notes; write everything as JSON when asked."""
    info = machine_info(device)
    print(f'\n{bench} on {info.get("gpu", info["cpu"])} ({info["torch_threads"]} threads, load {info["loadavg_1m"]:.2f}), torch {info["torch"]}')
    print(format_table(rows, columns))
    for note in notes:
        print(note)
    if json_path:
        with dnnlib.util.atomic_write(json_path, 'w') as f:
            json.dump(dict(bench=bench, machine=info, args=args, rows=rows, notes=list(notes)), f, indent=2)
        print(f'Wrote {json_path}')


def mib(nbytes: int | None) -> float | None:
    return None if nbytes is None else nbytes / 2**20

#----------------------------------------------------------------------------
# Networks and training objects, built exactly as train.py builds them from a configs/ preset.

RESOLUTIONS = {'cifar10-ddpmpp': 32, 'celeba64-ncsnpp': 64, 'tiny': 16}  # preset -> image resolution


def training_kwargs(preset: str) -> dnnlib.EasyDict:
    """train.py's training_loop kwargs (network, loss, augment, optimizer) for a preset with train.py's defaults."""
    return dnnlib.EasyDict(options.training_kwargs(dnnlib.cli.preset_train_options(preset), distributed.device()))


def preset_network(preset: str, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """The preset's network (3 channels, unconditional) with seeded random weights; speed does not depend on them."""
    torch.manual_seed(seed)
    kwargs = training_kwargs(preset).network_kwargs
    return dnnlib.util.construct_class_by_name(img_resolution=RESOLUTIONS[preset], img_channels=3, label_dim=0, **kwargs).to(device)


def einsum_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """EDM's unfused attention, for the baseline: the full pixels x pixels weight matrix in fp32, then values."""
    w = torch.einsum('nhcq,nhck->nhqk', q.to(torch.float32), (k / k.shape[2] ** 0.5).to(torch.float32)).softmax(dim=3)
    return torch.einsum('nhqk,nhck->nhcq', w.to(v.dtype), v)


@contextlib.contextmanager
def attention_impl(fused: bool) -> Iterator[None]:
    """Use the networks' fused attention (sdpa) or, for the baseline, EDM's unfused einsum attention."""
    import training.networks as networks
    saved = networks.attention
    networks.attention = saved if fused else einsum_attention
    try:
        yield
    finally:
        networks.attention = saved


def forward_flops(net: torch.nn.Module, device: torch.device) -> float:
    """FLOPs (2 per multiply-add) of one network forward pass per image, counted by torch's flop counter."""
    x = torch.zeros([1, net.img_channels, net.img_resolution, net.img_resolution], device=device)
    with torch.no_grad(), torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        net(x, torch.ones([1], device=device))
    return float(counter.get_total_flops())
