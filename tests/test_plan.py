"""training/plan.py and sfbd.py --dry-run: the phases and their network evaluations against hand counts; nothing written."""

import os

import numpy as np
import pytest

from tests.test_sfbd import cli_args, data, run_cli  # noqa: F401 (the data fixture)
from training import options, plan

pytestmark = pytest.mark.usefixtures('one_thread')


def _backward_nfe(sigma_tau: float, n: int) -> int:
    """Heun's evaluations on EDM's n-step schedule truncated at sigma_tau, counted from the paper's formula."""
    i = np.arange(n)
    t = (80 ** (1 / 7) + i / (n - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    first = int(np.flatnonzero(t >= sigma_tau).max())
    return 2 * (n - first) - 1  # n - first steps (the last into sigma 0 is one Euler evaluation)


def test_count_work_matches_hand_counts():
    o = options.SFBDOptions(clean='C', noisy='N', train_kwargs={}, pretrain_kimg=20, iters=2, finetune_kimg=4,
                            denoise_steps=18, eval_num=100, eval_steps=18, grid_num=16, final_fid_repeats=3, fid_ref='ref.npz')
    phases = plan.count_work(o, num_clean=50, num_noisy=1000, sigma_tau=0.5)
    assert [(p['phase'], p['images'], p['nfe']) for p in phases] == [
        ('pretraining on D_clean', 20000, 0),
        ('FID of model 0', 100, 35), ('samples and audit of model 0', 16, 35),
        ('denoising E_1', 1000, _backward_nfe(0.5, 18)), ('fine-tune 1', 4000, 0),
        ('FID of model 1', 100, 35), ('samples and audit of model 1', 16, 35),
        ('denoising E_2', 1000, _backward_nfe(0.5, 18)), ('fine-tune 2', 4000, 0),
        ('FID of model 2', 300, 35), ('samples and audit of model 2', 16, 35)]  # the last model: 3 seed sets
    assert _backward_nfe(0.5, 18) == 13
    without = plan.count_work(options.SFBDOptions(clean='C', noisy='N', train_kwargs={}, pretrained='net.pt', iters=1,
                                                  grid_num=0), 50, 1000, 0.2)
    assert [p['phase'] for p in without] == ['denoising E_1', 'fine-tune 1']  # no pretraining, no FID reference, no grid


def test_dry_run_prints_the_plan_and_writes_nothing(data, tmp_path, capsys):
    outdir = tmp_path / 'never'
    run_cli(cli_args(data, outdir, '--dry-run'))
    out = capsys.readouterr().out
    assert 'pretraining on D_clean' in out and 'denoising E_2' in out and 'Estimated wall time on this machine' in out
    assert 'Dry run; nothing written.' in out
    assert not os.path.exists(outdir) and sorted(os.listdir(tmp_path)) == []
