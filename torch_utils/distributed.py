"""One way to launch on 1 or N processes: torchrun environment, NCCL on CUDA, gloo on CPU."""

import datetime
import os
from typing import Any

import torch

_initialized = False

#----------------------------------------------------------------------------

def init(backend: str | None = None, device: str | None = None) -> None:
    """Initialise from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

    Plain `python` (no WORLD_SIZE) runs as a single process without a process group. The backend is
    NCCL when CUDA is used, gloo otherwise. Idempotent.
    """
    global _initialized
    if _initialized:
        return
    _initialized = True
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    if device is None:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device.startswith('cuda') and torch.cuda.is_available():
        torch.cuda.set_device(get_local_rank() % torch.cuda.device_count())
        # One arithmetic for every phase (training, denoising, generation, FID features): TF32 off from the start.
        from torch_utils import perf
        perf.configure_backends(torch.device('cuda', torch.cuda.current_device()))
    if world_size > 1 and not torch.distributed.is_initialized():
        if backend is None:
            backend = 'nccl' if device.startswith('cuda') else 'gloo'
        kwargs: dict[str, Any] = dict(backend=backend, init_method='env://', timeout=datetime.timedelta(minutes=30))
        if backend == 'nccl':
            kwargs['device_id'] = torch.device('cuda', torch.cuda.current_device())
        torch.distributed.init_process_group(**kwargs)


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def get_rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def get_local_rank() -> int:
    return int(os.environ.get('LOCAL_RANK', '0'))


def is_main() -> bool:
    return get_rank() == 0


def device() -> torch.device:
    """This process's compute device: its CUDA device under torchrun, else the CPU."""
    if torch.cuda.is_available():
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def comm_device() -> torch.device:
    """Where tensors must live for collectives with the active backend."""
    if is_distributed() and torch.distributed.get_backend() == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')

#----------------------------------------------------------------------------

def print0(*args: Any, **kwargs: Any) -> None:
    """print() on rank 0 only, flushed."""
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (returns a new tensor on x's device; identity when single-process)."""
    if not is_distributed():
        return x.clone()
    y = x.detach().to(comm_device()).clone()
    torch.distributed.all_reduce(y, op=torch.distributed.ReduceOp.SUM)
    return y.to(x.device)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s Python object, on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def shard(num_items: int, rank: int | None = None, world_size: int | None = None) -> range:
    """The contiguous index range this rank owns out of `num_items` (sizes differ by at most one)."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    base, extra = divmod(num_items, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def cleanup() -> None:
    """Tear down the process group, if any."""
    if is_distributed():
        torch.distributed.destroy_process_group()
