"""Quality guard for bf16: training follows the fp32 loss curve within seed noise; sampling changes images by little."""

import copy
import json

import click
import numpy as np
import sklearn.datasets
import torch

import common
import dnnlib
from torch_utils import perf, rng
from training import generation, sampler
from training.images import to_uint8

#----------------------------------------------------------------------------

def digits(device: torch.device, preset: str = 'tiny') -> torch.Tensor:
    """scikit-learn's 1,797 handwritten digits (8x8 grey, 17 levels) in [-1, 1] units, N x 1 x 8 x 8; for a paper
    preset, enlarged (bilinear) to its resolution and repeated to RGB, so its real network trains on them."""
    x = torch.from_numpy(sklearn.datasets.load_digits().images.astype(np.float32)[:, None] / 16 * 2 - 1)
    if preset != 'tiny':
        x = torch.nn.functional.interpolate(x, size=common.RESOLUTIONS[preset], mode='bilinear', align_corners=False).repeat(1, 3, 1, 1)
    return x.to(device)


def train_curve(data: torch.Tensor, steps: int, batch: int, seed: int, bf16: bool, device: torch.device,
                preset: str = 'tiny') -> tuple[np.ndarray, torch.nn.Module]:
    """Per-step mean loss of the preset's network trained on `data`; same init for every call, data order and noise keyed by seed."""
    c = common.training_kwargs(preset)
    torch.manual_seed(0)
    net = dnnlib.util.construct_class_by_name(img_resolution=data.shape[2], img_channels=data.shape[1], label_dim=0,
                                              **c.network_kwargs).to(device).train().requires_grad_(True)
    loss_fn = dnnlib.util.construct_class_by_name(**c.loss_kwargs)
    opt = dnnlib.util.construct_class_by_name(params=net.parameters(), **c.optimizer_kwargs)
    order = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        idx = torch.randint(len(data), [batch], generator=order)
        rnd = rng.BatchRandom(rng.derive_seed(seed, step), batch, 0, batch, device)
        # torch.autocast directly, not perf.autocast: the guard checks bf16 numerics even where bf16 is emulated.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(net=net, images=data[idx], rnd=rnd)
        opt.zero_grad(set_to_none=True)
        loss.mean().backward()
        opt.step()
        losses.append(loss.mean().item())
    return np.array(losses), net.eval().requires_grad_(False)


def image_difference(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Mean and max absolute difference in uint8 levels and PSNR (dB) between two image batches in [-1, 1]."""
    ua, ub = to_uint8(a).to(torch.float64), to_uint8(b).to(torch.float64)
    mse = (ua - ub).square().mean().item()
    return dict(mean_abs_levels=(ua - ub).abs().mean().item(), max_abs_levels=(ua - ub).abs().max().item(),
                psnr_db=float('inf') if mse == 0 else 10 * np.log10(255 ** 2 / mse))


def bf16_inference(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`net` under bf16 autocast whatever the hardware (numerics check), as prepare_for_inference wraps it."""
    return perf.FastInference(copy.deepcopy(net), device.type, bf16=True, channels_last=False).eval()


def sampling_guard(net: torch.nn.Module, noisy: torch.Tensor, device: torch.device, num_steps: int, sigma_tau: float,
                   num_images: int) -> dict:
    """fp32 vs bf16 outputs from the same seeds / noisy images: generation (Heun) and SFBD backward denoising."""
    net_bf16 = bf16_inference(net, device)
    seeds = list(range(num_images))
    with torch.no_grad():
        gen = [generation.sample_images(n, seeds, num_steps=num_steps, device=device) for n in (net, net_bf16)]
        den = [sampler.backward_sample(sampler.net_denoiser(n), noisy.to(torch.float64), sigma_tau, num_steps,
                                       round_sigma=n.round_sigma) for n in (net, net_bf16)]
    return dict(generate=image_difference(*gen), denoise=image_difference(*den))

#----------------------------------------------------------------------------

@click.command(context_settings=dict(help_option_names=['-h', '--help']))
@click.option('--steps', type=click.IntRange(min=20), default=400, show_default=True, help='Training steps per run.')
@click.option('--batch', type=click.IntRange(min=1), default=64, show_default=True, help='Training batch (images).')
@click.option('--window', type=click.IntRange(min=5), default=100, show_default=True, help='Last steps averaged for the loss comparison.')
@click.option('--train-preset', type=click.Choice(['tiny', *sorted(p for p in common.RESOLUTIONS if p != 'tiny')]), default='tiny', show_default=True,
              help='Network of the training check: tiny, or a paper preset at its true size (digits enlarged to its resolution, RGB).')
@click.option('--sample-steps', type=click.IntRange(min=2), default=18, show_default=True, help='EDM schedule steps for sampling (18 = 35 NFE).')
@click.option('--sigma-tau', type=click.FloatRange(min=0, min_open=True), default=0.2, show_default=True, help='Noise of the denoising check, [-1, 1] pixel units.')
@click.option('--sample-preset', type=click.Choice(['trained-tiny', *sorted(common.RESOLUTIONS)]), default='trained-tiny', show_default=True,
              help='Network for the sampling check: the tiny digits model trained here, or a preset with random weights (3 channels).')
@click.option('--num-images', type=click.IntRange(min=1), default=64, show_default=True, help='Images in the sampling check.')
@click.option('--device', type=click.Choice(['cpu', 'cuda']), default='cuda' if torch.cuda.is_available() else 'cpu', show_default=True, help='Where to run.')
@click.option('--threads', type=click.IntRange(min=1), default=None, help='CPU threads for torch  [default: torch default]')
@click.option('--json', 'json_path', type=click.Path(dir_okay=False), default=None, help='Also write the results here as JSON.')
def main(steps, batch, window, train_preset, sample_steps, sigma_tau, sample_preset, num_images, device, threads, json_path):
    """Check that bf16 autocast keeps quality: the loss curve and sampled images against fp32.

    Training: --train-preset's network on scikit-learn's digits, fp32 and bf16 from the same init with the same data
    order and noise (seed 0), plus fp32 with seed 1 as the yardstick of noise. bf16 passes when its
    late-window mean loss differs from fp32's by no more than 2x the seed-to-seed difference (or 1%).
    Sampling: mean/max |difference| in uint8 levels and PSNR between fp32 and bf16 outputs.
    """
    dev = common.setup_device(device, threads)
    data = digits(dev, train_preset)
    fp32_a, net = train_curve(data, steps, batch, 0, False, dev, train_preset)
    bf16_a, _ = train_curve(data, steps, batch, 0, True, dev, train_preset)
    fp32_b, _ = train_curve(data, steps, batch, 1, False, dev, train_preset)
    late = slice(steps - window, steps)
    m_fp32, m_bf16, m_seed = fp32_a[late].mean(), bf16_a[late].mean(), fp32_b[late].mean()
    tolerance = max(2 * abs(m_seed - m_fp32), 0.01 * m_fp32)
    # Step-by-step agreement of the smoothed curves (moving average over 20 steps).
    smooth = lambda c: np.convolve(c, np.ones(20) / 20, mode='valid')
    curve_rel = float(np.abs(smooth(bf16_a) - smooth(fp32_a)).max() / smooth(fp32_a).mean())
    curve_rel_seed = float(np.abs(smooth(fp32_b) - smooth(fp32_a)).max() / smooth(fp32_a).mean())
    train = dict(preset=train_preset, steps=steps, batch=batch, window=window, fp32_loss=float(m_fp32), bf16_loss=float(m_bf16),
                 fp32_seed1_loss=float(m_seed), bf16_minus_fp32=float(m_bf16 - m_fp32), seed_noise=float(m_seed - m_fp32),
                 tolerance=float(tolerance), max_smoothed_rel_diff_bf16=curve_rel, max_smoothed_rel_diff_seed=curve_rel_seed,
                 passed=bool(abs(m_bf16 - m_fp32) <= tolerance))

    if sample_preset == 'trained-tiny':
        sample_net = net
        noisy = data[:num_images] + sigma_tau * torch.randn(data[:num_images].shape, generator=torch.Generator(dev).manual_seed(0), device=dev)
    else:
        sample_net = common.preset_network(sample_preset, dev).eval().requires_grad_(False)
        r = sample_net.img_resolution
        g = torch.Generator(dev).manual_seed(0)
        noisy = torch.rand([num_images, 3, r, r], generator=g, device=dev) * 2 - 1 + sigma_tau * torch.randn([num_images, 3, r, r], generator=g, device=dev)
    sample = sampling_guard(sample_net, noisy, dev, sample_steps, sigma_tau, num_images)

    print(f'\nquality_guard on {common.machine_info(dev)["cpu"] if dev.type == "cpu" else torch.cuda.get_device_name(dev)}: '
          f'bf16 native here: {perf.device_has_bf16(dev)}')
    print(f'Training ({steps} steps, batch {batch}, tiny preset on digits 8x8): mean loss over the last {window} steps')
    print(f'  fp32 {m_fp32:.5f}   bf16 {m_bf16:.5f} (diff {m_bf16 - m_fp32:+.5f})   fp32 other seed {m_seed:.5f} (diff {m_seed - m_fp32:+.5f})')
    print(f'  max |smoothed curve diff| / mean loss: bf16 {curve_rel:.4f}, other seed {curve_rel_seed:.4f}')
    print(f'  {"PASS" if train["passed"] else "FAIL"}: |bf16 - fp32| <= {tolerance:.5f} (2x seed noise or 1%)')
    print(f'Sampling ({sample_preset}, {num_images} images, {sample_steps}-step schedule; denoise at sigma_tau={sigma_tau:g}):')
    for mode, d in sample.items():
        print(f'  {mode:8s} mean |diff| {d["mean_abs_levels"]:.3f} levels, max {d["max_abs_levels"]:.0f} levels, PSNR {d["psnr_db"]:.1f} dB')
    if json_path:
        with dnnlib.util.atomic_write(json_path, 'w') as f:
            json.dump(dict(machine=common.machine_info(dev), train=train, sampling=dict(preset=sample_preset, num_images=num_images,
                      steps=sample_steps, sigma_tau=sigma_tau, **sample)), f, indent=2)
    if not train['passed']:
        raise SystemExit(1)


if __name__ == '__main__':
    main()
