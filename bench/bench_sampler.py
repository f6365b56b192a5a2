"""Bench: sampler throughput (images/s at a given NFE) for generation and SFBD's backward denoising."""

import functools

import click
import torch

import common
from torch_utils import perf
from training import generation, sampler

#----------------------------------------------------------------------------

def nfe(sigmas: torch.Tensor) -> int:
    """Network evaluations of a Heun solve along sigmas (trailing 0): two per step, one on the last."""
    return 2 * (len(sigmas) - 1) - 1


def make_sample_step(preset: str, device: torch.device, batch: int, mode: str, num_steps: int, sigma_tau: float, v: common.Variant):
    """One batch through the real code path: generation.sample_images, or backward_sample as sfbd.denoise_dataset calls it."""
    net = perf.prepare_for_inference(common.preset_network(preset, device), precision=v.precision,
                                     channels_last=v.channels_last, compile=v.compile)
    n = batch * v.batch_mult
    if mode == 'generate':
        def run():
            with common.attention_impl(fused=v.sdpa):
                generation.sample_images(net, list(range(n)), num_steps=num_steps, device=device)
        return run
    gen = torch.Generator(device).manual_seed(0)
    y = torch.rand([n, net.img_channels, net.img_resolution, net.img_resolution], generator=gen, device=device) * 2 - 1
    y = (y + sigma_tau * torch.randn(y.shape, generator=gen, device=device)).to(torch.float64)
    denoise = sampler.net_denoiser(net)

    def run():
        with common.attention_impl(fused=v.sdpa), torch.no_grad():
            sampler.backward_sample(denoise, y, sigma_tau, num_steps, solver='ode', round_sigma=net.round_sigma)
    return run


def bench_sampler(preset: str, device: torch.device, batch: int, iters: int, warmup: int, variants: list[common.Variant],
                  mode: str, num_steps: int, sigma_tau: float, stat: str = 'median') -> tuple[list[dict], int]:
    """Rows of images/s per variant, and the NFE per image."""
    sigmas = sampler.sigma_steps(num_steps) if mode == 'generate' else sampler.backward_sigmas(sigma_tau, num_steps)
    builders = [(v, functools.partial(make_sample_step, preset, device, batch, mode, num_steps, sigma_tau, v)) for v in variants]
    rows = common.measure(builders, iters, warmup, device, stat)
    common.add_throughput(rows, variants, batch, device)
    return rows, nfe(sigmas)

#----------------------------------------------------------------------------

@click.command(context_settings=dict(help_option_names=['-h', '--help']))
@click.option('--preset', type=click.Choice(sorted(common.RESOLUTIONS)), default='cifar10-ddpmpp', show_default=True, help='configs/ preset of the network.')
@click.option('--mode', type=click.Choice(['generate', 'denoise']), default='denoise', show_default=True, help='generate: Heun from sigma_max (EDM); denoise: SFBD backward ODE from the noisy image at sigma_tau.')
@click.option('--steps', 'num_steps', type=click.IntRange(min=2), default=18, show_default=True, help='Steps of the full EDM schedule (denoise truncates it at sigma_tau).')
@click.option('--sigma-tau', type=click.FloatRange(min=0, min_open=True), default=0.2, show_default=True, help='Noise level of the noisy set, [-1, 1] pixel units (denoise mode).')
@click.option('--num-images', type=click.IntRange(min=1), default=48000, show_default=True, help='Images for the projected pass time (48,000 = the CIFAR-10 noisy set).')
@common.bench_options(batch=4, iters=2, warmup=1, variants='fp32,bf16,bf16+cl,bf16+cl+sdpa,bf16+cl+sdpa+x4', allowed='bf16,cl,sdpa,compile,xN')
def main(preset, mode, num_steps, sigma_tau, num_images, device, batch, iters, warmup, stat, variants, threads, json_path):
    """Sampler throughput: whole sampler calls on a batch, images/s at the schedule's NFE, per variant.

    The baseline fp32 is plain fp32 eager with EDM's unfused attention. On an H100 use e.g.
    --device=cuda --batch=512 --variants=fp32,bf16+cl+sdpa,bf16+cl+sdpa+x4,bf16+cl+sdpa+compile+x4.
    """
    dev = common.setup_device(device, threads)
    parsed = common.parse_variants(variants, 'bf16,cl,sdpa,compile,xN')
    rows, n_fe = bench_sampler(preset, dev, batch, iters, warmup, parsed, mode, num_steps, sigma_tau, stat)
    for row in rows:
        row['nfe'] = n_fe
        row['pass_minutes'] = num_images / row['images_per_sec'] / 60
    columns = [('variant', 'variant', ''), ('precision', 'prec', ''), ('batch', 'batch', 'd'), ('nfe', 'NFE', 'd'),
               ('sec', f's/batch ({stat})', '.3f'), ('images_per_sec', 'img/s', ',.2f'), ('ratio', 'x fp32', '.2f'),
               ('pass_minutes', f'min/{num_images} img', ',.1f'), ('peak_mib', 'peak MiB', ',.0f')]
    common.report('bench_sampler', dev, dict(preset=preset, mode=mode, steps=num_steps, sigma_tau=sigma_tau, batch=batch,
                                             iters=iters, warmup=warmup, stat=stat, num_images=num_images), rows, columns, json_path,
                  notes=[f'{mode}: {num_steps}-step EDM schedule' + (f' truncated at sigma_tau={sigma_tau:g}' if mode == 'denoise' else '') +
                         f', {n_fe} network evaluations per image; projection for {num_images:,} images on this one device.'])


if __name__ == '__main__':
    main()
