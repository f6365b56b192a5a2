"""Correctness (not speed) of torch_utils.perf: precision choice, autocast fallback, channels_last, attention."""

import warnings

import pytest
import torch

from dnnlib.util import UserError
from torch_utils import perf

#----------------------------------------------------------------------------

def _cpuinfo(tmp_path, flags: str) -> str:
    path = tmp_path / 'cpuinfo'
    path.write_text(f'processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n')
    return str(path)


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    assert perf.cpu_flags(_cpuinfo(tmp_path, 'fpu sse avx512_bf16 avx2')) == {'fpu', 'sse', 'avx512_bf16', 'avx2'}
    assert perf.cpu_flags(str(tmp_path / 'missing')) == frozenset()


@pytest.mark.parametrize('flags, expected', [('sse avx2 avx512f', False), ('sse avx512_bf16', True), ('amx_tile amx_bf16', True)])
def test_cpu_has_bf16_needs_bf16_units(tmp_path, flags, expected):
    assert perf.cpu_has_bf16(_cpuinfo(tmp_path, flags)) == (expected and torch.backends.mkldnn.is_available())


def test_cpu_has_bf16_without_cpuinfo_is_false(tmp_path):
    assert perf.cpu_has_bf16(str(tmp_path / 'missing')) is False

#----------------------------------------------------------------------------

def test_resolve_precision(monkeypatch):
    monkeypatch.setattr(perf, 'device_has_bf16', lambda device: True)
    assert perf.resolve_precision('auto', 'cpu') == 'bf16'
    assert perf.resolve_precision('bf16', 'cpu') == 'bf16'
    assert perf.resolve_precision('fp32', 'cpu') == 'fp32'
    monkeypatch.setattr(perf, 'device_has_bf16', lambda device: False)
    assert perf.resolve_precision('auto', 'cpu') == 'fp32'
    with pytest.warns(UserWarning, match='no native bf16'):
        assert perf.resolve_precision('bf16', 'cpu') == 'fp32'
    assert perf.resolve_precision('fp16', 'cpu') == 'fp16'
    assert perf.resolve_precision('auto', 'cpu', fp16=True) == 'fp16'
    assert perf.resolve_precision('fp16', 'cpu', inference=True) == 'fp32'
    with pytest.raises(UserError, match='contradicts'):
        perf.resolve_precision('bf16', 'cpu', fp16=True)
    with pytest.raises(UserError, match='Unknown precision'):
        perf.resolve_precision('fp8', 'cpu')


def test_auto_never_picks_bf16_on_cuda_without_cuda():
    if torch.cuda.is_available():
        pytest.skip('CUDA present')
    assert perf.device_has_bf16('cuda') is False
    assert perf.resolve_precision('auto', 'cuda') == 'fp32'


def test_autocast_falls_back_to_fp32_when_unsupported(monkeypatch):
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    monkeypatch.setattr(perf, 'device_has_bf16', lambda device: False)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with perf.autocast('cpu', 'bf16'):
            out = a @ b
    assert out.dtype == torch.float32
    assert torch.equal(out, a @ b)


def test_autocast_bf16_runs_matmuls_in_bf16(monkeypatch):
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    monkeypatch.setattr(perf, 'device_has_bf16', lambda device: True)
    with perf.autocast('cpu', 'auto'):
        out = a @ b
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), a @ b, atol=0.1, rtol=0.05)
    with perf.autocast('cpu', 'fp32'):
        assert (a @ b).dtype == torch.float32

#----------------------------------------------------------------------------

def _small_convnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GroupNorm(4, 8), torch.nn.SiLU(),
                               torch.nn.Conv2d(8, 8, 3, padding=1, stride=2), torch.nn.ConvTranspose2d(8, 3, 2, stride=2))


def test_channels_last_gives_same_outputs_and_gradients():
    x = torch.randn(4, 3, 16, 16)
    ref = _small_convnet()
    ref(x).square().sum().backward()
    net = perf.prepare_for_training(_small_convnet(), channels_last=True)
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
    out = net(perf.to_channels_last(x))
    torch.testing.assert_close(out, ref(x), atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4)
    # State dicts keep names and values, so snapshots are interchangeable.
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), _small_convnet().state_dict().values()))


def test_prepare_for_inference_freezes_and_keeps_outputs():
    x = torch.randn(2, 3, 16, 16)
    ref = _small_convnet().eval()
    plain = _small_convnet().train()
    assert perf.prepare_for_inference(plain) is plain  # fp32 without options: the network itself
    net = perf.prepare_for_inference(_small_convnet().train(), channels_last=True)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    torch.testing.assert_close(net(x), ref(x), atol=1e-5, rtol=1e-5)


def test_prepare_for_inference_bf16_wrapper(monkeypatch):
    monkeypatch.setattr(perf, 'device_has_bf16', lambda device: True)
    inner = _small_convnet()
    inner.sigma_min = 0.002  # stands for a preconditioner's attributes
    net = perf.prepare_for_inference(inner, precision='auto')
    assert net.sigma_min == 0.002 and net.net is inner
    x = torch.randn(2, 3, 16, 16)
    out = net(x)
    assert out.dtype == torch.bfloat16  # a bare network; EDM's preconditioner casts back to fp32
    torch.testing.assert_close(out.float(), inner(x), atol=0.05, rtol=0.05)

def test_to_channels_last_keeps_values_and_leaves_other_ranks():
    x = torch.randn(2, 3, 4, 5)
    y = perf.to_channels_last(x)
    assert y.is_contiguous(memory_format=torch.channels_last) and torch.equal(x, y)
    assert perf.to_channels_last(x, enable=False) is x
    z = torch.randn(2, 3)
    assert perf.to_channels_last(z) is z

#----------------------------------------------------------------------------

def test_peak_memory_sees_a_temporary_allocation():
    size = 256 << 20
    with perf.track_peak_memory('cpu') as before:
        pass
    with perf.track_peak_memory('cpu') as during:
        buf = torch.ones(size // 4, dtype=torch.float32)  # touched, so resident
        del buf
    assert during['peak_bytes'] >= before['peak_bytes'] + size * 3 // 4
    assert perf.peak_memory('cpu') > 0

#----------------------------------------------------------------------------
# The benches stay runnable (structure only; speed claims live in bench/ and docs/PERFORMANCE.md).

def test_benches_run_on_tiny_preset():
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'bench'))
    import bench_rng
    import bench_sampler
    import bench_train
    import common
    dev = torch.device('cpu')
    variants = common.parse_variants('bf16+cl', 'bf16,cl,sdpa,compile,xN')
    assert [v.name for v in variants] == ['fp32', 'bf16+cl'] and variants[1].bf16 and variants[1].channels_last
    with pytest.raises(UserError, match='Unknown variant token'):
        common.parse_variants('fp32,bf17', 'bf16')
    rows = bench_train.bench_train('tiny', dev, batch=2, iters=1, warmup=1, variants=variants)
    assert [r['variant'] for r in rows] == ['fp32', 'bf16+cl'] and rows[0]['ratio'] == 1 and rows[1]['images_per_sec'] > 0
    rows, nfe = bench_sampler.bench_sampler('tiny', dev, batch=2, iters=1, warmup=1, variants=common.parse_variants('x2', 'xN'),
                                            mode='denoise', num_steps=18, sigma_tau=0.2)
    assert nfe == 11 and [r['batch'] for r in rows] == [2, 4]
    # One step's draws as the loss and augment pipe make them: sigma, 14 for EDM's augmentation, the noise.
    batch, calls = bench_rng.step_draws('cifar10-ddpmpp')
    assert batch == 512 and len(calls) == 16 and calls[0] == ('randn', (1, 1, 1), {}) and calls[-1] == ('randn', (3, 32, 32), {})
    rows = bench_rng.bench_rng('tiny', dev, worlds=[1, 2], iters=1, warmup=1)
    assert [(r['world'], r['rows'], r['draws']) for r in rows] == [(1, 16, 2), (2, 8, 2)] and rows[0]['keyed_vs_1'] == 1
    assert rows[1]['old_ms'] > 0 and rows[1]['speedup'] > 0
