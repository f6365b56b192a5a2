"""The cost plan of an SFBD run before it starts: phases, images, network evaluations, and wall time on this machine."""

import math
import time
from typing import Any

import torch

import dnnlib
from torch_utils import distributed, misc, perf
from training import sampler
from training.dataset import open_dataset
from training.options import SFBDOptions

#----------------------------------------------------------------------------
# Counting: a function of the options and the data sizes only.

def heun_nfe(num_sigmas: int) -> int:
    """Network evaluations of Heun on a schedule of num_sigmas values ending in 0: 2 per step, 1 for the last."""
    return 2 * (num_sigmas - 1) - 1


def count_work(o: SFBDOptions, num_clean: int, num_noisy: int, sigma_tau: float) -> list[dict[str, Any]]:
    """Every phase of the run, in order: {'phase', 'kind' ('train' | 'sample'), 'images', 'nfe' (per image; train: 0)}."""
    backward_nfe = heun_nfe(len(sampler.backward_sigmas(sigma_tau, o.denoise_steps)))
    eval_nfe = heun_nfe(o.eval_steps + 1)
    fid = o.eval_every > 0 and o.fid_ref is not None
    phases = []

    def evaluate(k: int) -> None:
        sets = o.final_fid_repeats if k == o.iters else 1
        if fid and (k % o.eval_every == 0 or k == o.iters):
            phases.append(dict(phase=f'FID of model {k}', kind='sample', images=sets * o.eval_num, nfe=eval_nfe))
        extra = o.grid_num + o.audit_num
        if extra:
            phases.append(dict(phase=f'samples and audit of model {k}', kind='sample', images=extra, nfe=eval_nfe))

    if o.pretrained is None:
        phases.append(dict(phase='pretraining on D_clean', kind='train', images=round(o.pretrain_kimg * 1000), nfe=0))
    evaluate(0)
    for k in range(1, o.iters + 1):
        phases.append(dict(phase=f'denoising E_{k}', kind='sample', images=num_noisy, nfe=backward_nfe))
        phases.append(dict(phase=f'fine-tune {k}', kind='train', images=round(o.finetune_kimg * 1000), nfe=0))
        evaluate(k)
    return phases

#----------------------------------------------------------------------------
# Timing: a few steps of the real network on this process's device.

def _network(o: SFBDOptions, resolution: int, channels: int, device: torch.device) -> torch.nn.Module:
    if o.pretrained is not None:
        from training import checkpoint
        return checkpoint.load_network(o.pretrained, device=device)
    kwargs = dict(o.train_kwargs['network_kwargs'], img_resolution=resolution, img_channels=channels, label_dim=0)
    return dnnlib.util.construct_class_by_name(**kwargs).to(device)


def _seconds(fn, repeats: int, budget: float) -> float:
    """The mean time of `fn` over up to `repeats` calls after one warm-up, stopping early past `budget` seconds."""
    fn()
    times = []
    while len(times) < repeats and sum(times) < budget:
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sum(times) / len(times)


def time_per_image(o: SFBDOptions, resolution: int, channels: int, device: torch.device, batch: int,
                   repeats: int = 3, budget: float = 10.0) -> dict[str, float]:
    """Seconds per image of one training step (forward, backward, Adam) and of one sampling network evaluation,
    each timed at `batch` images (this process's share) with the run's precision, then divided by `batch`."""
    net = _network(o, resolution, channels, device).train().requires_grad_(True)
    loss_fn = dnnlib.util.construct_class_by_name(**(o.train_kwargs.get('loss_kwargs') or {'class_name': 'training.loss.EDMLoss'}))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-9)
    images = torch.zeros([batch, channels, resolution, resolution], device=device)
    precision = o.train_kwargs.get('precision', 'fp32')

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with perf.autocast(device, precision):
            loss = loss_fn(net=net, images=images)
        loss.sum().backward()
        optimizer.step()
    train = _seconds(train_step, repeats, budget) / batch
    inference = perf.prepare_for_inference(net, precision=o.denoise_precision)
    sigma = torch.full([batch], 1.0, device=device)

    @torch.no_grad()
    def evaluation() -> None:
        inference(images, sigma)
    sample = _seconds(evaluation, repeats, budget) / batch
    return dict(train=train, sample=sample, batch=batch, parameters=misc.count_parameters(net))

#----------------------------------------------------------------------------

def plan_sfbd(o: SFBDOptions, device: torch.device | str | None = None, timing: bool = True,
              max_timing_batch: int | None = None) -> dnnlib.EasyDict:
    """The plan of run_sfbd(**o): the data sizes, every phase's images and network evaluations and, with `timing`,
    its estimated wall time on this machine (time per image from a few real steps at min(real batch, max_timing_batch)
    images per process - default 64 on a GPU, 8 on a CPU, whose time grows about linearly with the batch - scaled
    linearly; every process takes 1 / world size of the work). Writes nothing."""
    device = torch.device(device) if device is not None else distributed.device()
    clean, noisy = open_dataset(o.clean), open_dataset(o.noisy)
    sigma_tau = o.sigma if o.sigma is not None else noisy.sigma
    phases = count_work(o, len(clean), len(noisy), sigma_tau)
    world = distributed.get_world_size()
    per_process = max(o.train_kwargs.get('batch_size', 512) // world, 1)
    plan = dnnlib.EasyDict(num_clean=len(clean), num_noisy=len(noisy), sigma_tau=sigma_tau, world_size=world,
                           device=str(device), phases=phases, timing=None)
    if timing:
        cap = max_timing_batch or (64 if device.type == 'cuda' else 8)
        batch = min(per_process, o.train_kwargs.get('batch_gpu') or per_process, cap)
        plan.timing = time_per_image(o, noisy.resolution, noisy.num_channels, device, batch)
        for p in phases:
            per_image = plan.timing['train'] if p['kind'] == 'train' else plan.timing['sample'] * p['nfe']
            p['sec'] = p['images'] * per_image / world
    return plan


def format_plan(plan: dnnlib.EasyDict) -> str:
    """The plan as a table: one line per phase, then the totals."""
    lines = [f'SFBD plan: {plan.num_clean} clean and {plan.num_noisy} noisy images, sigma_tau {plan.sigma_tau:g}, '
             f'{plan.world_size} process(es) on {plan.device}', '',
             f'{"phase":<32} {"images":>12} {"NFE/image":>10} {"network evals":>14} {"est. time":>10}']
    for p in plan.phases:
        nfe, evals = (p['nfe'], f'{p["images"] * p["nfe"]:,}') if p['nfe'] else ('-', '-')
        sec = dnnlib.util.format_time(p['sec']) if 'sec' in p else '-'
        lines.append(f'{p["phase"]:<32} {p["images"]:>12,} {nfe:>10} {evals:>14} {sec:>10}')
    train = sum(p['images'] for p in plan.phases if p['kind'] == 'train')
    evals = sum(p['images'] * p['nfe'] for p in plan.phases if p['kind'] == 'sample')
    lines += ['', f'Total: {train / 1e6:.3f} Mimg of training, {evals:,} sampling network evaluations']
    if plan.timing:
        t = plan.timing
        total = sum(p['sec'] for p in plan.phases)
        lines.append(f'Estimated wall time on this machine: {dnnlib.util.format_time(total)} ({math.ceil(total / 3600):d} h), from '
                     f'{t["train"] * 1e3:.2f} ms per training image and {t["sample"] * 1e3:.3f} ms per image per network '
                     f'evaluation, timed at {t["batch"]} images per process with the {t["parameters"]:,}-parameter network')
    return '\n'.join(lines)
