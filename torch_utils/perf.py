"""The fast path: precision choice, bf16 autocast, channels_last / torch.compile preparation, peak memory."""

import contextlib
import ctypes
import functools
import os
import warnings
from typing import Iterator

import torch

from dnnlib.util import UserError

PRECISIONS = ('auto', 'fp32', 'bf16', 'fp16')     # of training
INFERENCE_PRECISIONS = ('auto', 'fp32', 'bf16')  # of sampling, denoising and generation for FID

#----------------------------------------------------------------------------
# Hardware capabilities.

@functools.lru_cache(maxsize=None)
def cpu_flags(cpuinfo_path: str = '/proc/cpuinfo') -> frozenset[str]:
    """The CPU feature flags the kernel reports; empty where /proc/cpuinfo is missing (macOS, Windows)."""
    try:
        with open(cpuinfo_path) as f:
            for line in f:
                if line.startswith('flags'):
                    return frozenset(line.split(':', 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_bf16(cpuinfo_path: str = '/proc/cpuinfo') -> bool:
    """True if the CPU has bf16 dot-product units (AMX amx_bf16 or AVX-512 avx512_bf16) that oneDNN uses."""
    # Without these units PyTorch emulates bf16 on the CPU: correct but slower than fp32.
    return bool(cpu_flags(cpuinfo_path) & {'amx_bf16', 'avx512_bf16'}) and torch.backends.mkldnn.is_available()


def device_has_bf16(device: torch.device | str) -> bool:
    """True if bf16 autocast runs natively (not emulated) on this device."""
    device = torch.device(device)
    if device.type == 'cuda':
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == 'cpu':
        return cpu_has_bf16()
    return False

#----------------------------------------------------------------------------
# Precision.

def resolve_precision(precision: str, device: torch.device | str, *, fp16: bool = False, inference: bool = False) -> str:
    """The one place a precision is decided: 'auto' | 'fp32' | 'bf16' | 'fp16' as `device` runs it.

    'auto' is bf16 where the device computes bf16 natively (CUDA Ampere and newer; CPUs with AMX or
    avx512_bf16), fp32 elsewhere. An explicit 'bf16' on a device without native bf16 falls back to
    fp32 with a warning, because emulated bf16 is slower than fp32 and buys nothing. 'fp16' is EDM's
    network-internal fp16 (use_fp16=True), and `fp16=True` is EDM's --fp16 alias for it. With
    `inference`, fp16 becomes fp32: an fp16 network casts inside itself, the sampler around it is fp32.
    """
    if precision not in PRECISIONS:
        raise UserError(f'Unknown precision {precision!r}: use one of {", ".join(PRECISIONS)}')
    if fp16 and precision not in ('auto', 'fp32', 'fp16'):
        raise UserError(f'--fp16 contradicts --precision={precision}')
    if fp16 or precision == 'fp16':
        return 'fp32' if inference else 'fp16'
    if precision == 'fp32':
        return 'fp32'
    if device_has_bf16(device):
        return 'bf16'
    if precision == 'bf16':
        warnings.warn(f'bf16 requested but {torch.device(device)} has no native bf16; using fp32', stacklevel=2)
    return 'fp32'


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """A context that runs eligible ops (convolutions, matmuls) in bf16 when `precision` resolves to bf16.

    Normalisations, softmax and the loss stay fp32 (autocast's own lists); EDM's preconditioner casts
    the network output back to fp32, so callers see fp32 (or fp64) tensors either way. Use it around
    forward passes only; run backward() outside the context. bf16 needs no gradient scaler.
    """
    device = torch.device(device)
    if resolve_precision(precision, device) != 'bf16':
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def configure_backends(device: torch.device | str, cudnn_benchmark: bool = True) -> None:
    """Let cuDNN pick the fastest convolution algorithms for fixed shapes; keep fp32 matmuls exact (EDM)."""
    if torch.device(device).type == 'cuda':
        torch.backends.cudnn.benchmark = cudnn_benchmark
        # TF32 stays off so 'fp32' means fp32 (EDM's choice); the speed comes from bf16 instead.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False

#----------------------------------------------------------------------------
# Module preparation.

def to_channels_last(x: torch.Tensor, enable: bool = True) -> torch.Tensor:
    """x in channels_last (NHWC) memory format when enabled and 4-D; values and shape unchanged."""
    return x.contiguous(memory_format=torch.channels_last) if enable and x.ndim == 4 else x


def prepare_for_training(net: torch.nn.Module, channels_last: bool = False, compile: bool = False) -> torch.nn.Module:
    """Put `net`'s 4-D weights in channels_last and/or wrap it in torch.compile; parameters stay shared.

    Call after moving `net` to its device and before wrapping it in DDP. channels_last converts the
    parameters in place, so an optimizer built before or after sees the same tensors, and state dicts
    keep their names and values; a compiled wrapper forwards attribute access to `net`.
    """
    if channels_last:
        net.to(memory_format=torch.channels_last)
    if compile:
        return torch.compile(net)
    return net


class FastInference(torch.nn.Module):
    """Calls `net` with channels_last inputs and/or under bf16 autocast; other attributes pass through to `net`.

    For sampling and denoising only: outputs stay fp32 (EDM's preconditioner casts them back), and a
    state dict of this wrapper has an extra 'net.' prefix, so save `wrapper.net` instead.
    """

    def __init__(self, net: torch.nn.Module, device_type: str, bf16: bool, channels_last: bool):
        super().__init__()
        self.net = net
        self.device_type = device_type
        self.bf16 = bf16
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        x = to_channels_last(x, self.channels_last)
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.net(x, *args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules['net'], name)


def prepare_for_inference(net: torch.nn.Module, precision: str = 'fp32', channels_last: bool = False,
                          compile: bool = False) -> torch.nn.Module:
    """`net` frozen (eval, no gradients) and made fast for sampling, denoising and FID.

    precision: see resolve_precision (fp16 samples with the network's own fp16, like fp32); with 'fp32' and
    no other option the result is `net` itself, so exact-equality tests see the unchanged network.
    """
    net.eval().requires_grad_(False)
    device = next(net.parameters()).device if any(True for _ in net.parameters()) else torch.device('cpu')
    bf16 = resolve_precision(precision, device, inference=True) == 'bf16'
    net = prepare_for_training(net, channels_last=channels_last, compile=compile)
    if not (bf16 or channels_last):
        return net
    return FastInference(net, device.type, bf16=bf16, channels_last=channels_last).eval()

#----------------------------------------------------------------------------
# Memory.

def reset_peak_memory(device: torch.device | str) -> None:
    """Start a new peak-memory window: CUDA's allocator counter, or the process's peak RSS on Linux."""
    device = torch.device(device)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        # Hand freed heap back to the OS first, so the window starts from the memory really in use.
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        # Writing 5 to clear_refs resets VmHWM (Linux >= 4.0); elsewhere the peak covers the process life.
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        pass


def _proc_status_bytes(key: str) -> int | None:
    """A 'kB' line of /proc/self/status (VmRSS, VmHWM) in bytes; None where /proc is missing."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(key + ':'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_memory(device: torch.device | str) -> int:
    """Memory in use now, in bytes: CUDA tensors allocated, or the process's resident set on CPU (0 if unknown)."""
    device = torch.device(device)
    if device.type == 'cuda':
        return int(torch.cuda.memory_allocated(device))
    return _proc_status_bytes('VmRSS') or 0


def peak_memory(device: torch.device | str) -> int:
    """Peak memory in bytes since the last reset: CUDA tensors allocated, or the process's peak RSS on CPU."""
    device = torch.device(device)
    if device.type == 'cuda':
        return int(torch.cuda.max_memory_allocated(device))
    peak = _proc_status_bytes('VmHWM')
    if peak is not None:
        return peak
    import resource  # Unix only; reached only where /proc is missing.
    # ru_maxrss is KiB on Linux and bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if os.uname().sysname == 'Darwin' else rss * 1024)


@contextlib.contextmanager
def track_peak_memory(device: torch.device | str) -> Iterator[dict]:
    """`with track_peak_memory(dev) as m: ...` leaves m['peak_bytes'] set to the peak inside the block."""
    result: dict = {}
    reset_peak_memory(device)
    yield result
    result['peak_bytes'] = peak_memory(device)
