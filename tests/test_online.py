"""online: Online SFBD on 8x8 digits; ramp, refresh order and KID rule against closed forms; exact resume after an
exception and a SIGKILL; 1 = 2 processes bit for bit; the compute axis of batch and online runs; bad input."""

import json
import math
import os
import shutil
import signal

import click
import numpy as np
import pytest
import torch

import dnnlib
import sfbd as sfbd_cli
from tests.conftest import run_python
from tests.test_sfbd import Interrupt, _Identity
from training import checkpoint, data_prep, metrics, online, sampler, sfbd, training_loop
from training.dataset import open_dataset
from training.images import to_model_space

SIGMA = 0.2
NUM_CLEAN, NUM_NOISY = 32, 64

pytestmark = [pytest.mark.filterwarnings('ignore::RuntimeWarning'),  # pixel FID of 128 images: singular covariances
              pytest.mark.usefixtures('one_thread')]

#----------------------------------------------------------------------------
# Data: 96 digits, 32 clean, 64 corrupted once; the FID reference of all 96 (pixels). Runs: the tiny preset, 16 steps
# of batch 16 after model 0, a refresh of 10 rows every 2 steps, states every 2 ticks of 2 steps.

@pytest.fixture(scope='module')
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp('online-data')
    d = {name: str(root / name) for name in ('all', 'clean', 'rest', 'noisy')}
    data_prep.convert_dataset('sklearn-digits', d['all'], max_images=NUM_CLEAN + NUM_NOISY, verbose=False)
    data_prep.split_dataset(d['all'], str(NUM_CLEAN), 0, d['clean'], d['rest'], verbose=False)
    data_prep.corrupt_dataset(d['rest'], d['noisy'], SIGMA, 0, verbose=False)
    d['ref'] = str(root / 'ref.npz')
    metrics.make_ref(d['all'], d['ref'], 'pixels')
    return d


def cli_args(data: dict, outdir, *extra: str) -> list[str]:
    """fp32 throughout (the exact reference mode: the checks below compare runs bit for bit)."""
    pretrain = [] if any(a.startswith('--pretrained=') for a in extra) else ['--pretrain-kimg=0.25']
    return ['--config=tiny', '--precision=fp32', f'--outdir={outdir}', f'--clean={data["clean"]}', f'--noisy={data["noisy"]}',
            f'--fid-ref={data["ref"]}', '--detector=pixels', *pretrain, '--tick=0.032', '--dump=2',
            '--denoise-steps=8', '--denoise-batch=4', '--eval-num=64', '--eval-steps=6', '--grid=4', '--strip=4',
            '--online', '--online-kimg=0.256', '--refresh-every=2', '--refresh-num=10', '--ramp-start=0.032',
            '--ramp-end=0.128', '--eval-kimg=0.128', *extra]


def run_cli(args: list[str]) -> None:
    sfbd_cli.main.main(args=args, standalone_mode=False)


def read_records(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        return [{k: v for k, v in json.loads(line).items() if k != 'sec'} for line in f]


def final_state(run_dir) -> tuple[dict, np.ndarray]:
    """(the final training state, E beside it) of an online run."""
    train_dir = os.path.join(run_dir, 'online')
    state = checkpoint.load_training_state(training_loop.find_latest_state(train_dir))
    return state, np.load(os.path.join(train_dir, f'E-{state["cur_nimg"]:012d}.npy'))


def assert_same_run(a_dir, b_dir, rel: float = 0) -> None:
    """The same final network, EMA and E bit for bit, and the same records (FIDs and E's error to `rel`: sums over ranks)."""
    (a, e_a), (b, e_b) = final_state(a_dir), final_state(b_dir)
    assert a['cur_nimg'] == b['cur_nimg'] == 256
    for key in ('net', 'ema'):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][n], b[key][n]) for n in a[key]), key
    assert e_a.tobytes() == e_b.tobytes()
    records_a, records_b = read_records(a_dir), read_records(b_dir)
    assert len(records_a) == len(records_b) == 3
    sums = [(ra.pop(key), rb.pop(key)) for ra, rb in zip(records_a, records_b) for key in ('fid', 'denoise_mse', 'denoise_psnr')]
    assert records_a == records_b and all(x == pytest.approx(y, rel=rel, abs=0) for x, y in sums)


@pytest.fixture(scope='module')
def run_a(data, tmp_path_factory) -> str:
    """An uninterrupted run: pretraining, then the online run."""
    outdir = tmp_path_factory.mktemp('online-a') / 'run'
    run_cli(cli_args(data, outdir))
    return str(outdir)


def pretrained(run_a: str) -> str:
    return os.path.join(run_a, 'pretrain', 'network-snapshot-000000.256.pt')

#----------------------------------------------------------------------------
# The rules against their closed forms.

def test_ramp_weight_closed_form():
    a, b = 0.5, 2.5  # kimg
    for nimg in [0, 256, 500, 512, 1000, 1536, 2500, 4096]:
        assert online.ramp_weight(nimg, a, b) == pytest.approx(min(max((nimg / 1000 - a) / (b - a), 0), 1), abs=1e-15)
    assert online.ramp_weight(1499, 1.5, 1.5) == 0 and online.ramp_weight(1500, 1.5, 1.5) == 1  # a step at a = b


def test_batch_weights_follow_the_ramp_and_sum_to_the_batch():
    """E's rows of step s get w(s * batch), clean rows 1, normalised so a batch's weights sum to the batch size."""
    E = online.DenoisedSet(np.arange(6 * 64, dtype=np.uint8).reshape(6, 1, 8, 8))
    hook = online.OnlineSFBD.__new__(online.OnlineSFBD)
    hook.E, hook.on = E, dnnlib.EasyDict(ramp_start_kimg=0.0, ramp_end_kimg=0.04)
    order = training_loop.BatchOrder(4, 6, num_mix=5, batch_size=8, batch_gpu=4, num_rounds=2, rank=0, seed=0)
    for step in [0, 1, 2, 3, 6]:
        t = dnnlib.EasyDict(order=order, step=step, cur_nimg=8 * step, batch_gpu=4, num_mix=5)
        w = min(8 * step / 40, 1)
        rows, weights = order.rank_rows(step), []
        for r in range(2):
            images, weight = hook.batch(t, r, torch.full([4, 1, 8, 8], 7.0))
            weights.append(weight)
            for row, image in zip(rows[r * 4:(r + 1) * 4], images):
                expect = to_model_space(torch.from_numpy(E.images[row - 4])) if row >= 4 else torch.full([1, 8, 8], 7.0)
                assert torch.equal(image, expect)  # E's rows replaced, clean rows kept
        weights = torch.cat(weights).double()
        scale = 8 / (3 + 5 * w)
        assert torch.allclose(weights, torch.tensor([scale if row < 4 else w * scale for row in rows], dtype=torch.float64))
        assert float(weights.sum()) == pytest.approx(8)


def test_refresh_order_visits_every_row_once_per_cycle():
    order = online.RefreshOrder(10, seed=3)
    cursor, cycles = 0, {}
    while cursor < 40:
        rows = order.rows(cursor, 3)
        assert len(rows) == (1 if cursor % 10 == 9 else 3)  # 3 + 3 + 3 + 1: a slice never spans two cycles
        cycles.setdefault(cursor // 10, []).extend(rows.tolist())
        cursor += len(rows)
    assert all(sorted(rows) == list(range(10)) for rows in cycles.values()) and len(cycles) == 4
    assert len({tuple(rows) for rows in cycles.values()}) == 4  # each cycle its own permutation
    assert online.RefreshOrder(10, seed=3).rows(13, 5).tolist() == cycles[1][3:8]  # keyed by (seed, position) only
    assert online.RefreshOrder(10, seed=4).rows(0, 10).tolist() != cycles[0]


def test_kid_and_the_adaptive_rule_by_hand():
    # d = 1, k(x, y) = (x y + 1)^3. D_clean features [0, 0]; rows in E [2, 2]; new rows [1, 1]:
    # KID(E, ref) = 125 (E pair) + 1 (ref pair) - 2 * 1 (cross) = 124; KID(new, ref) = 8 + 1 - 2 = 7.
    ref, old, new = (torch.tensor([[v], [v]]) for v in (0.0, 2.0, 1.0))
    assert online.kid(old, ref) == 124 and online.kid(new, ref) == 7
    # The relative gain (124 - 7) / 124 = 0.9435 of 16 rows: 15.1 -> 15 committed.
    assert online.kid_refresh_count(124, 7, 16, 4) == 15
    assert online.kid_refresh_count(0.5, 0.25, 16, 4) == 8    # half the KID gone: half the rows
    assert online.kid_refresh_count(0.5, 0.6, 16, 4) == 4     # worse: the minimum
    assert online.kid_refresh_count(-0.1, -0.3, 16, 4) == 4   # E already indistinguishable: no gain
    assert online.kid_refresh_count(0.5, -0.1, 16, 4) == 16   # more than all of it: all
    # Two features: the diagonal terms are left out (unbiased), the cross term kept.
    x, y = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert online.kid(x, y) == pytest.approx(1 + 1 - 2 * (1.5 ** 3 + 1 + 1.5 ** 3 + 1) / 4)


def test_backward_nfe_counts_the_calls():
    for solver in ('ode', 'sde'):
        for sigma_tau, steps in [(0.2, 8), (0.59, 18), (1.3824, 40)]:
            calls = []

            def denoise(x, sigma):
                calls.append(1)
                return x
            sampler.backward_sample(denoise, torch.zeros([1, 1, 2, 2], dtype=torch.float64), sigma_tau, steps, solver=solver)
            assert len(calls) == online.backward_nfe(sigma_tau, steps, _Identity()) == online.backward_nfe(sigma_tau, steps)

def test_e_files_live_as_long_as_their_states(tmp_path):
    """E-NIMG files beside states: kept while a state of that image count may exist, removed once it cannot."""
    hook = online.OnlineSFBD.__new__(online.OnlineSFBD)
    hook.E, hook.s = online.DenoisedSet(np.zeros([2, 1, 8, 8], np.uint8)), dnnlib.EasyDict(saved=[], records=[])

    def save(nimg: int, kimg: int) -> None:  # what _save_state does: the hook first, then the state
        state = tmp_path / f'training-state-{kimg:06d}.pt'
        hook.save_state(dnnlib.EasyDict(cur_nimg=nimg), {}, str(state))
        state.write_bytes(b'')

    def e_files() -> list[int]:
        return sorted(int(f[2:-4]) for f in os.listdir(tmp_path) if f.startswith('E-') and f.endswith('.npy'))
    save(100, 0)
    save(200, 0)  # overwrites the state of 100: E-100 stays until this write is known to have happened
    assert e_files() == [100, 200]
    save(1100, 1)
    assert e_files() == [200, 1100]
    os.remove(tmp_path / 'training-state-000000.pt')  # --keep=1 prunes the older state after writing the newer
    save(2100, 2)
    assert e_files() == [1100, 2100]
    os.remove(tmp_path / 'training-state-000001.pt')
    assert online._final_records(str(tmp_path)) == [] and e_files() == [2100]  # the end: only the final state's E

#----------------------------------------------------------------------------
# A whole run.

def test_end_to_end_layout_metrics_and_e(run_a, data):
    records = read_records(run_a)
    assert [r['k'] for r in records] == [0, 1, 2] and [r['kimg'] for r in records] == [0, 0.144, 0.256]  # at tick ends
    nfe = online.backward_nfe(SIGMA, 8)
    # Refreshes after steps 2, 4, ...: slices of 10 rows, the 7th 4 (the end of the first cycle of 64).
    assert [(r['refreshes'], r['committed']) for r in records] == [(0, 0), (4, 40), (8, 74)]
    for r in records:
        assert math.isfinite(r['fid']) and r['fid_detector'] == 'pixels' and r['fid_num'] == 64
        assert 0 < r['denoise_mse'] < SIGMA ** 2  # E beats the noisy images at every point
        assert r['denoise_nfe'] == (NUM_NOISY + r['committed']) * nfe  # E_0, then every row of every refresh
        assert r['train_nimg'] == round(r['kimg'] * 1000) and r['cycles'] == r['committed'] / NUM_NOISY
        assert os.path.isfile(os.path.join(run_a, r['network']))
    assert records[0]['weight'] == 0 and records[1]['weight'] == records[2]['weight'] == 1
    for name in ['online_options.json', 'log.txt', 'metrics.png', 'pretrain/finished.json', 'iter-000/denoised/images.npy',
                 'eval-000/record.json', 'eval-000/samples.png', 'eval-001/strip.png', 'eval-002/network.pt', 'online/finished.json']:
        assert os.path.isfile(os.path.join(run_a, name)), name
    assert not os.path.exists(os.path.join(run_a, 'sfbd_options.json'))
    log = open(os.path.join(run_a, 'log.txt')).read()
    assert 'Online SFBD summary' in log and 'Final network' in log and 'ETA of the online run' in log and 'Denoising E_0' in log
    opts = json.load(open(os.path.join(run_a, 'online', 'training_options.json')))
    assert opts['mix_fraction'] == pytest.approx(NUM_NOISY / (NUM_CLEAN + NUM_NOISY)) and opts['mix_dataset_kwargs'] is None
    assert opts['dataset_kwargs']['path'] == data['clean'] and opts['transfer'].endswith('pretrain/network-snapshot-000000.256.pt')  # 256 images: named by the count (below 1 kimg)
    stats = [json.loads(line) for line in open(os.path.join(run_a, 'online', 'stats.jsonl'))]
    assert stats[0]['Online/weight']['mean'] == 0 and stats[-1]['Online/weight']['mean'] == 1
    # E beside every training state, and only there (one pair per state; the last one at the end, 256 images).
    files = os.listdir(os.path.join(run_a, 'online'))
    states = [f for f in files if f.startswith('training-state-')]
    e_files = sorted(f for f in files if f.startswith('E-'))
    assert len(e_files) == 2 * len(states) and {'E-000000000256.json', 'E-000000000256.npy'} <= set(e_files)
    state, E = final_state(run_a)
    e_0 = open_dataset(os.path.join(run_a, 'iter-000', 'denoised')).images
    assert E.dtype == np.uint8 and E.shape == (NUM_NOISY, 1, 8, 8) and (E != e_0).any(axis=(1, 2, 3)).sum() > NUM_NOISY / 2


def test_resume_after_an_exception_and_a_sigkill_equals_uninterrupted(run_a, data, tmp_path, monkeypatch):
    run_b = tmp_path / 'run'
    args = cli_args(data, run_b)
    calls, real_denoise, real_fid = [], sfbd.backward_denoise, metrics.fid_from_stats

    def denoise(*a, **kw):
        calls.append(1)
        if len(calls) == 16 + 3 * 3 + 2:  # E_0 (16 chunks of 4), 3 refreshes (3 chunks each), then in the 4th refresh
            raise Interrupt('during a refresh')
        return real_denoise(*a, **kw)

    def fid(*a, **kw):
        raise Interrupt('during an evaluation')

    monkeypatch.setattr(sfbd, 'backward_denoise', denoise)
    with pytest.raises(Interrupt, match='refresh'):
        run_cli(args)
    assert training_loop.find_latest_state(str(run_b / 'online')) and not (run_b / 'online' / 'finished.json').exists()
    monkeypatch.setattr(sfbd, 'backward_denoise', real_denoise)
    monkeypatch.setattr(metrics, 'fid_from_stats', fid)
    with pytest.raises(Interrupt, match='evaluation'):
        run_cli(args)  # resumes, then fails in evaluation 1
    monkeypatch.setattr(metrics, 'fid_from_stats', real_fid)
    # A process killed after it wrote E beside its next state and before the state itself.
    res = run_python(['-c', _KILLED_BEFORE_STATE, *args], check=False, env={'OMP_NUM_THREADS': '1'})
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    states = [f for f in os.listdir(run_b / 'online') if f.startswith('E-') and f.endswith('.npy')]
    assert len(states) >= 2  # the new E without its state, and the E of the state the rerun resumes
    run_cli(args)
    assert_same_run(run_a, run_b)
    assert sorted(os.listdir(run_b)) == sorted(os.listdir(run_a))


# Run sfbd.py in a process that SIGKILLs itself when it is about to write its 3rd online training state (E already written).
_KILLED_BEFORE_STATE = """
import os, signal, sys
from training import checkpoint
save, calls = checkpoint.save_training_state, []
def die_before_save(path, **kwargs):
    calls.append(path)
    if '/online/' in path and sum('/online/' in p for p in calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    save(path, **kwargs)
checkpoint.save_training_state = die_before_save
import sfbd
sfbd.main(sys.argv[1:])
"""


def test_one_and_two_processes_give_identical_e_and_network(run_a, data, tmp_path, torchrun):
    """With per-process batches of the same size (--batch-gpu), 2 processes train and refresh bit for bit as 1;
    the kid rule, the SDE and init from the noisy images ride along."""
    extra = [f'--pretrained={pretrained(run_a)}', '--batch-gpu=8', '--refresh-rule=kid', '--refresh-min=2',
             '--denoise-solver=sde', '--online-init=noisy', '--ramp-start=0']
    run_cli(cli_args(data, tmp_path / 'one', *extra))
    torchrun([os.path.join(os.path.dirname(sfbd_cli.__file__), 'sfbd.py'), *cli_args(data, tmp_path / 'two', *extra)])
    assert_same_run(tmp_path / 'one', tmp_path / 'two', rel=1e-9)
    assert final_state(tmp_path / 'two')[0]['rng']['world_size'] == 2
    committed = [r['committed'] for r in read_records(tmp_path / 'one')]
    stats = [json.loads(line) for line in open(tmp_path / 'one' / 'online' / 'stats.jsonl')]
    per_tick = [s['Online/committed'] for s in stats if 'Online/committed' in s]
    assert all(2 <= s['mean'] <= 10 for s in per_tick)  # the kid rule chose between --refresh-min and --refresh-num
    assert committed[-1] == pytest.approx(sum(s['num'] * s['mean'] for s in per_tick)) and committed[-1] < 8 * 10

#----------------------------------------------------------------------------
# Batch and online SFBD on one compute axis.

def test_compute_axis_of_batch_and_online_runs(run_a, data, tmp_path):
    batch_dir = tmp_path / 'batch'
    args = [a for a in cli_args(data, batch_dir, f'--pretrained={pretrained(run_a)}', '--iters=2', '--finetune-kimg=0.1')
            if not a.startswith(('--online', '--refresh', '--ramp', '--eval-kimg'))]
    run_cli(args)
    nfe = online.backward_nfe(SIGMA, 8)
    batch = online.compute_axis(str(batch_dir))
    assert [(r['k'], r['train_nimg'], r['denoise_nfe']) for r in batch] == [(k, k * 112, k * NUM_NOISY * nfe) for k in range(3)]
    rows = online.compute_axis(str(run_a), train_cost=2)
    assert [r['train_nimg'] for r in rows] == [0, 144, 256]
    assert all(r['compute'] == 2 * r['train_nimg'] + r['denoise_nfe'] for r in rows) and rows[0]['compute'] == NUM_NOISY * nfe
    with pytest.raises(dnnlib.util.UserError, match='metrics.jsonl'):
        online.compute_axis(str(tmp_path))

#----------------------------------------------------------------------------
# Bad input: one line, before anything is written.

def test_bad_input_one_line(run_a, data, tmp_path):
    batch_dir = tmp_path / 'batch'
    os.makedirs(batch_dir)
    (batch_dir / 'sfbd_options.json').write_text('{}')
    cases = {
        'online flag without --online': ([a for a in cli_args(data, tmp_path / 'a') if a != '--online'], '--online-kimg is for online SFBD'),
        'batch flag with --online': (cli_args(data, tmp_path / 'b', '--iters=3'), '--iters is for batch SFBD'),
        'no clean rows': (cli_args(data, tmp_path / 'c', '--e-share=0.99'), 'needs rows from both'),
        'ramp': (cli_args(data, tmp_path / 'd', '--ramp-start=1', '--ramp-end=0.5'), '--ramp-start <= --ramp-end'),
        'refresh-min': (cli_args(data, tmp_path / 'e', '--refresh-min=11'), '--refresh-min'),
        'batch run dir': (cli_args(data, batch_dir), 'holds a batch SFBD run'),
        'other options': (cli_args(data, run_a, '--refresh-num=9'), 'refresh_num'),
    }
    for what, (args, message) in cases.items():
        with pytest.raises(click.ClickException) as e:
            run_cli(args)
        text = e.value.format_message()
        assert message in text and '\n' not in text, (what, text)
    assert not any(os.path.exists(tmp_path / d / 'online_options.json') for d in 'abcde')
    opts = json.load(open(os.path.join(run_a, 'online', 'training_options.json')))
    with pytest.raises(click.ClickException, match='needs mix_dataset_kwargs'):  # E comes from the hook only
        training_loop.training_loop(str(tmp_path / 'f'), **{k: v for k, v in opts.items() if k != 'run_dir'})
    assert not os.path.exists(tmp_path / 'f')
    with pytest.raises(click.ClickException, match='holds an online SFBD run'):
        run_cli([a for a in cli_args(data, run_a) if not a.startswith(('--online', '--refresh', '--ramp', '--eval-kimg'))])
