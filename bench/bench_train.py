"""Bench: training throughput (images/s, s/kimg, peak memory) of full EDM training steps per variant."""

import copy
import functools

import click
import torch

import common
import dnnlib
from torch_utils import misc, perf, rng

#----------------------------------------------------------------------------

def make_train_step(preset: str, device: torch.device, batch: int, v: common.Variant):
    """One real EDM training step as training_loop runs it: keyed randomness, augmentation, loss forward,
    backward, NaN guard, Adam, EMA update; network, loss, augmentation and optimizer from the preset."""
    c = common.training_kwargs(preset)
    net = common.preset_network(preset, device).train().requires_grad_(True)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    loss_fn = dnnlib.util.construct_class_by_name(**c.loss_kwargs)
    augment_pipe = dnnlib.util.construct_class_by_name(**c.augment_kwargs) if c.get('augment_kwargs') else None
    opt = dnnlib.util.construct_class_by_name(params=net.parameters(), **c.optimizer_kwargs)
    model = perf.prepare_for_training(net, channels_last=v.channels_last, compile=v.compile)
    gen = torch.Generator(device).manual_seed(0)
    images = torch.rand([batch, net.img_channels, net.img_resolution, net.img_resolution], generator=gen, device=device) * 2 - 1
    images = perf.to_channels_last(images, v.channels_last)
    net_params, ema_params = list(net.parameters()), list(ema.parameters())
    step_idx = iter(range(1 << 62))

    def step():
        opt.zero_grad(set_to_none=True)
        rnd = rng.BatchRandom(rng.derive_seed(0, next(step_idx)), batch, 0, batch, device)
        with common.attention_impl(fused=v.sdpa), perf.autocast(device, v.precision):
            loss = loss_fn(net=model, images=images, labels=None, augment_pipe=augment_pipe, rnd=rnd)
        with common.attention_impl(fused=v.sdpa):
            loss.sum().mul(1 / batch).backward()
        misc.sanitize_grads(net_params)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, net_params, 1 - 0.999)
    return step


def bench_train(preset: str, device: torch.device, batch: int, iters: int, warmup: int, variants: list[common.Variant],
                stat: str = 'median') -> list[dict]:
    """Rows of images/s, s/kimg and peak memory per variant, each with its own network, optimizer and EMA."""
    rows = common.measure([(v, functools.partial(make_train_step, preset, device, batch, v)) for v in variants], iters, warmup, device, stat)
    common.add_throughput(rows, variants, batch, device)
    for row in rows:
        row['sec_per_kimg'] = row['sec'] * 1000 / row['batch']
    return rows

#----------------------------------------------------------------------------

@click.command(context_settings=dict(help_option_names=['-h', '--help']))
@click.option('--preset', type=click.Choice(sorted(common.RESOLUTIONS)), default='cifar10-ddpmpp', show_default=True, help='configs/ preset: network, loss, augmentation, optimizer as train.py builds them.')
@common.bench_options(batch=8, iters=3, warmup=1, variants='fp32,cl,bf16,bf16+cl,bf16+cl+sdpa', allowed='bf16,cl,sdpa,compile')
def main(preset, device, batch, iters, warmup, stat, variants, threads, json_path):
    """Training throughput: EDM loss forward + backward + Adam + EMA on random images, per variant.

    The baseline fp32 is plain fp32 eager with EDM's unfused attention. On an H100 use e.g.
    --device=cuda --batch=512 --variants=fp32,bf16+cl+sdpa,bf16+cl+sdpa+compile.
    """
    dev = common.setup_device(device, threads)
    rows = bench_train(preset, dev, batch, iters, warmup, common.parse_variants(variants, 'bf16,cl,sdpa,compile'), stat)
    flops = 3 * common.forward_flops(common.preset_network(preset, dev), dev)  # forward + backward ~ 3 forwards
    for row in rows:
        row['tflops'] = row['images_per_sec'] * flops / 1e12
    columns = [('variant', 'variant', ''), ('precision', 'prec', ''), ('batch', 'batch', 'd'), ('sec', f's/step ({stat})', '.3f'),
               ('images_per_sec', 'img/s', ',.1f'), ('sec_per_kimg', 's/kimg', ',.1f'), ('ratio', 'x fp32', '.2f'),
               ('tflops', 'TFLOP/s', '.2f'), ('peak_mib', 'peak MiB', ',.0f')]
    common.report('bench_train', dev, dict(preset=preset, batch=batch, iters=iters, warmup=warmup, stat=stat), rows, columns, json_path,
                  notes=[f'{preset}: {flops / 3e9:.1f} GFLOP/image forward, {flops / 1e9:.0f} per training step (x3).',
                         'Peak MiB: above the memory in use before the variant was built (CUDA allocator on GPU, RSS on CPU).'])


if __name__ == '__main__':
    main()
