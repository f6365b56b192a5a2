"""Bench: training throughput (images/s, s/kimg, peak memory) of full EDM training steps per variant."""

import copy

import click
import torch

import common
from torch_utils import misc, perf
from training.loss import EDMLoss

#----------------------------------------------------------------------------

def make_train_step(net: torch.nn.Module, ema: torch.nn.Module, device: torch.device, batch: int, v: common.Variant):
    """One real EDM training step: loss forward, backward, NaN guard, Adam step, EMA update."""
    loss_fn = EDMLoss()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8)
    model = perf.prepare_for_training(net, channels_last=v.channels_last, compile=v.compile)
    gen = torch.Generator(device).manual_seed(0)
    images = torch.rand([batch, net.img_channels, net.img_resolution, net.img_resolution], generator=gen, device=device) * 2 - 1
    images = perf.to_channels_last(images, v.channels_last)
    net_params, ema_params = list(net.parameters()), list(ema.parameters())

    def step():
        opt.zero_grad(set_to_none=True)
        with perf.autocast(device, v.precision):
            loss = loss_fn(model, images)
        loss.sum().mul(1 / batch).backward()
        misc.sanitize_grads(net_params)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, net_params, 1 - 0.999)
    return step


def bench_train(arch: str, device: torch.device, batch: int, iters: int, warmup: int, variants: list[common.Variant],
                stat: str = 'median') -> list[dict]:
    """Rows of images/s, s/kimg and peak memory per variant, each with its own network, optimizer and EMA."""
    def builder(v: common.Variant):
        def build():
            net = common.build_network(arch, device).train().requires_grad_(True)
            ema = copy.deepcopy(net).eval().requires_grad_(False)
            step = make_train_step(net, ema, device, batch, v)
            def run():
                with common.attention_impl(fused=v.sdpa):
                    step()
            return run
        return build
    rows = common.measure([(v, builder(v)) for v in variants], iters, warmup, device, stat)
    for v, row in zip(variants, rows):
        row.update(precision=perf.resolve_precision(v.precision, device), batch=batch, images_per_sec=batch / row['sec'],
                   sec_per_kimg=row['sec'] * 1000 / batch, peak_mib=common.mib(row['peak_bytes']))
    common.add_ratios(rows, 'images_per_sec')
    return rows

#----------------------------------------------------------------------------

@click.command(context_settings=dict(help_option_names=['-h', '--help']))
@click.option('--arch', type=click.Choice(sorted(common.ARCHS)), default='cifar10-ddpmpp', show_default=True, help='Network preset (EDMPrecond).')
@common.bench_options(batch=8, iters=3, warmup=1, variants='fp32,cl,bf16,bf16+cl,bf16+cl+sdpa', allowed='bf16,cl,sdpa,compile')
def main(arch, device, batch, iters, warmup, stat, variants, threads, json_path):
    """Training throughput: EDM loss forward + backward + Adam + EMA on random images, per variant.

    The baseline fp32 is plain fp32 eager with EDM's unfused attention. On an H100 use e.g.
    --device=cuda --batch=512 --variants=fp32,bf16+cl+sdpa,bf16+cl+sdpa+compile.
    """
    dev = common.setup_device(device, threads)
    rows = bench_train(arch, dev, batch, iters, warmup, common.parse_variants(variants, 'bf16,cl,sdpa,compile'), stat)
    flops = 3 * common.forward_flops(common.build_network(arch, dev), dev)  # forward + backward ~ 3 forwards
    for row in rows:
        row['tflops'] = row['images_per_sec'] * flops / 1e12
    columns = [('variant', 'variant', ''), ('precision', 'prec', ''), ('batch', 'batch', 'd'), ('sec', f's/step ({stat})', '.3f'),
               ('images_per_sec', 'img/s', ',.1f'), ('sec_per_kimg', 's/kimg', ',.1f'), ('ratio', 'x fp32', '.2f'),
               ('tflops', 'TFLOP/s', '.2f'), ('peak_mib', 'peak MiB', ',.0f')]
    common.report('bench_train', dev, dict(arch=arch, batch=batch, iters=iters, warmup=warmup, stat=stat), rows, columns, json_path,
                  notes=[f'{arch}: {flops / 3e9:.1f} GFLOP/image forward, {flops / 1e9:.0f} per training step (x3).',
                         'Peak MiB: above the memory in use before the variant was built (CUDA allocator on GPU, RSS on CPU).'])


if __name__ == '__main__':
    main()
