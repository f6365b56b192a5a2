"""The recipes: the README's commands parse, the CLI sequence runs end to end at tiny scale, and the demo's smoke mode."""

import json
import math
import os
import re
import shlex

import numpy as np
import PIL.Image

from tests.conftest import ROOT, run_python

CLIS = {'dataset_tool.py', 'train.py', 'sfbd.py', 'generate.py', 'fid.py'}

#----------------------------------------------------------------------------

def _recipe_commands(path: str) -> list[list[str]]:
    """The commands in the ```bash blocks of a Markdown file that call one of our CLIs, as argument lists."""
    with open(os.path.join(ROOT, path)) as f:
        blocks = re.findall(r'```bash\n(.*?)```', f.read(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace('\\\n', ' ').splitlines():
            args = shlex.split(line, comments=True)
            script = next((i for i, a in enumerate(args) if a in CLIS), None)
            if script is not None:
                commands.append(args[script:])
    return commands


def test_readme_commands_parse():
    """Every CLI call in the README's recipes names real options, subcommands and presets (click parses it, nothing runs)."""
    import click

    import dataset_tool
    import fid
    import generate
    import sfbd
    import train
    mains = {'dataset_tool.py': dataset_tool.main, 'train.py': train.main, 'sfbd.py': sfbd.main, 'generate.py': generate.main,
             'fid.py': fid.main}
    doc = 'README.md'
    commands = _recipe_commands(doc)
    assert {'dataset_tool.py', 'fid.py', 'sfbd.py'} <= {c[0] for c in commands}
    for script, *args in commands:
        cmd = mains[script]
        if isinstance(cmd, click.Group):
            sub = cmd.get_command(None, args[0])
            assert sub is not None, f'{doc}: {script} has no subcommand {args[0]!r}'
            cmd, args = sub, args[1:]
        try:
            cmd.make_context(script, list(args))
        except click.ClickException as e:
            raise AssertionError(f'{doc}: {script} {shlex.join(args)}: {e.format_message()}')


def test_recipe_end_to_end(tmp_path):
    """convert -> split -> corrupt -> fid ref -> sfbd.py with the tiny preset, on a folder of synthetic PNGs."""
    src = tmp_path / 'pngs'
    src.mkdir()
    rnd = np.random.RandomState(0)
    yy, xx = np.mgrid[:8, :8]
    for i in range(60):  # blobs at random places: structure a model can learn, not noise
        cy, cx = rnd.uniform(2, 6, size=2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 3)[..., None] * rnd.uniform(0.3, 1, size=3)
        PIL.Image.fromarray((blob * 255).astype(np.uint8)).save(src / f'{i:03d}.png')
    d = str(tmp_path)
    run_python(['dataset_tool.py', 'convert', f'--source={src}', f'--dest={d}/data.zip'])
    run_python(['dataset_tool.py', 'split', f'--source={d}/data.zip', '--clean=10', '--seed=0',
                f'--dest-clean={d}/clean.zip', f'--dest-rest={d}/rest.zip'])
    run_python(['dataset_tool.py', 'corrupt', f'--source={d}/rest.zip', '--sigma=0.3', '--seed=0', f'--dest={d}/noisy'])
    run_python(['fid.py', 'ref', f'--data={d}/rest.zip', f'--dest={d}/ref.npz', '--detector=pixels'])  # 2 loader workers on a zip
    res = run_python(['sfbd.py', '--config=tiny', f'--outdir={d}/run', f'--clean={d}/clean.zip', f'--noisy={d}/noisy',
                      f'--fid-ref={d}/ref.npz', '--detector=pixels', '--iters=1', '--eval-num=32', '--grid=4', '--strip=4'])
    assert 'SFBD summary' in res.stdout
    with open(f'{d}/run/metrics.jsonl') as f:
        records = [json.loads(line) for line in f]
    assert [r['k'] for r in records] == [0, 1]
    assert all(math.isfinite(r['fid']) and r['fid'] > 0 for r in records)
    # E_1 is a denoised copy of all 50 noisy images: closer to the originals than the noisy input (MSE 0.09).
    assert 0 < records[1]['denoise_mse'] < 0.3 ** 2
    with open(f'{d}/run/iter-001/denoised/dataset.json') as f:
        assert json.load(f)['count'] == 50


def test_demo_smoke(tmp_path):
    """scripts/demo.py --smoke: every step runs and the table, plot, pictures and command list are written."""
    out = tmp_path / 'demo'
    res = run_python(['scripts/demo.py', '--smoke', f'--outdir={out}'], env={'OMP_NUM_THREADS': '1'})
    assert re.search(r'^\$ \S*python\S* sfbd\.py --config=tiny --outdir=', res.stdout, flags=re.M)  # echoed, then run
    with open(out / 'results.json') as f:
        results = json.load(f)
    K = results['schedule']['iters']
    assert [r['k'] for r in results['rows']] == list(range(K + 1)) and K >= 2
    for r in results['rows']:
        assert all(math.isfinite(r[f'fd_{m}']) for m in ('sfbd', 'clean-only', 'noisy-only'))
        assert (r['denoise_mse'] is None) == (r['k'] == 0)
    # Model 0 of SFBD is the pretrained model, which is also where clean-only starts.
    assert results['rows'][0]['fd_sfbd'] == results['rows'][0]['fd_clean-only']
    # The memorization audit of every final model, against the clean set and the noisy set's originals.
    assert set(results['audit']) == {'sfbd', 'clean-only', 'noisy-only'}
    for per_ref in results['audit'].values():
        assert set(per_ref) == {'clean', 'originals'} and per_ref['clean']['num_images'] == 18
        assert all(0 <= a['gu_rate'] <= 1 and 0 <= a['share_below_heldout_p05'] <= 1 for a in per_ref.values())
    table = (out / 'results.md').read_text()
    assert len(re.findall(r'^\| \d+ \|', table, flags=re.M)) == K + 1 and 'Memorization audit' in table
    for name in ('results.png', 'samples.png', 'strips.png'):
        assert PIL.Image.open(out / name).size[0] > 100
    commands = (out / 'commands.sh').read_text()
    for step in ('dataset_tool.py convert --source=sklearn-digits', 'dataset_tool.py split', 'dataset_tool.py corrupt',
                 'fid.py ref', 'sfbd.py --config=tiny', 'train.py --config=tiny', 'fid.py gen', 'audit.py --network='):
        assert step in commands, step
