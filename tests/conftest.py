"""Shared test helpers: running a module function under torchrun with 2 processes (gloo)."""

import os
import socket
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_torchrun(args: list[str], nproc: int = 2, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `torchrun --nproc_per_node=nproc ARGS` on the CPU from the repository root; raise on failure."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', '--master_addr=127.0.0.1',
           f'--master_port={free_port()}', *args]
    full_env = {**os.environ, 'CUDA_VISIBLE_DEVICES': '', 'OMP_NUM_THREADS': '1', 'PYTHONPATH': ROOT, **(env or {})}
    res = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise AssertionError(f'torchrun failed ({res.returncode}):\nSTDOUT:\n{res.stdout[-4000:]}\nSTDERR:\n{res.stderr[-4000:]}')
    return res


def run_python(args: list[str], timeout: float = 300, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run `python ARGS` from the repository root on the CPU."""
    full_env = {**os.environ, 'CUDA_VISIBLE_DEVICES': '', 'PYTHONPATH': ROOT, **(env or {})}
    res = subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f'python {args} failed ({res.returncode}):\nSTDOUT:\n{res.stdout[-4000:]}\nSTDERR:\n{res.stderr[-4000:]}')
    return res


def killed_after_first_state(cli: str) -> str:
    """A `python -c` script that runs the CLI module `cli` (train, sfbd) and SIGKILLs itself right after the
    first training state is written: a kill at the worst moment, for the resume tests."""
    return (f'import os, signal, sys\n'
            f'from training import checkpoint\n'
            f'save = checkpoint.save_training_state\n'
            f'def save_and_die(path, **kwargs):\n'
            f'    save(path, **kwargs)\n'
            f'    os.kill(os.getpid(), signal.SIGKILL)\n'
            f'checkpoint.save_training_state = save_and_die\n'
            f'import {cli}\n'
            f'{cli}.main(sys.argv[1:])\n')


@pytest.fixture
def torchrun():
    return run_torchrun


@pytest.fixture(scope='module')
def one_thread():
    """One torch thread for the module: bitwise comparisons need equal thread counts (each torchrun process
    runs one), tiny networks run fastest so, and a busy 2-core machine is not oversubscribed."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def pytest_configure(config):
    config.addinivalue_line('markers', 'paper: true-size runs of the paper recipes (minutes on a CPU); deselect with -m "not paper"')
