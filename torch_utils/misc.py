"""Miscellaneous PyTorch helpers (names as in EDM, so EDM's embedded module source finds them).

`constant` and `assert_shape` are not called by this project: they are here for the module source
embedded in EDM-format detector pickles (training.metrics runs it, on explicit opt-in, with
torch_utils importable), which calls them inside its forward pass.
"""

import contextlib
from typing import Any, Iterator

import numpy as np
import torch

#----------------------------------------------------------------------------

_constant_cache: dict = {}


def constant(value: Any, shape=None, dtype=None, device=None, memory_format=None) -> torch.Tensor:
    """A cached constant tensor (EDM's helper, used inside network forward passes)."""
    value = np.asarray(value)
    if shape is not None:
        shape = tuple(shape)
    dtype = dtype or torch.get_default_dtype()
    device = device or torch.device('cpu')
    memory_format = memory_format or torch.contiguous_format
    key = (value.shape, value.dtype, value.tobytes(), shape, dtype, device, memory_format)
    tensor = _constant_cache.get(key)
    if tensor is None:
        tensor = torch.as_tensor(value.copy(), dtype=dtype, device=device)
        if shape is not None:
            tensor, _ = torch.broadcast_tensors(tensor, torch.empty(shape))
        tensor = tensor.contiguous(memory_format=memory_format)
        _constant_cache[key] = tensor
    return tensor


def assert_shape(tensor: torch.Tensor, ref_shape) -> None:
    """Assert tensor.shape matches ref_shape, where None in ref_shape matches any size."""
    if tensor.ndim != len(ref_shape):
        raise AssertionError(f'Wrong number of dimensions: got {tensor.ndim}, expected {len(ref_shape)}')
    for idx, (size, ref) in enumerate(zip(tensor.shape, ref_shape)):
        if ref is not None and int(size) != int(ref):
            raise AssertionError(f'Wrong size for dimension {idx}: got {size}, expected {ref}')


def named_params_and_buffers(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(module.named_parameters()) + list(module.named_buffers())


@torch.no_grad()
def copy_params_and_buffers(src_module: torch.nn.Module, dst_module: torch.nn.Module, require_all: bool = False) -> None:
    """Copy same-named parameters and buffers from src to dst."""
    src = dict(named_params_and_buffers(src_module))
    for name, tensor in named_params_and_buffers(dst_module):
        assert (name in src) or (not require_all), name
        if name in src:
            tensor.copy_(src[name])


@contextlib.contextmanager
def ddp_sync(module: torch.nn.Module, sync: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce inside the block unless `sync` (for gradient accumulation)."""
    if sync or not isinstance(module, torch.nn.parallel.DistributedDataParallel):
        yield
    else:
        with module.no_sync():
            yield


def sanitize_grads(params) -> None:
    """EDM's NaN guard: NaN -> 0 and +-inf -> +-1e5 in every gradient, in place."""
    for p in params:
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
