"""Shared CLI pieces: `--config` presets from configs/ that act as defaults (command-line flags win)."""

import json
import math
import os
import re
import tempfile
from typing import Any, Callable

import click

from .util import UserError

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')

#----------------------------------------------------------------------------

def list_presets() -> list[str]:
    """Names of the presets shipped in configs/ (file names without .json)."""
    return sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith('.json'))


def load_preset(name_or_path: str) -> dict[str, Any]:
    """Load a preset by name (configs/NAME.json) or path. Keys are CLI option names, '-' or '_'."""
    path = name_or_path
    if not os.path.isfile(path):
        path = os.path.join(CONFIG_DIR, name_or_path + ('' if name_or_path.endswith('.json') else '.json'))
    if not os.path.isfile(path):
        raise UserError(f'No preset {name_or_path!r}: give a file or one of {", ".join(list_presets())}')
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f'Preset {path} is not valid JSON: {e}')
    if not isinstance(data, dict):
        raise UserError(f'Preset {path} must hold a JSON object of option names to values')
    return {k.replace('-', '_'): v for k, v in data.items() if not k.startswith('_')}


def preset_train_options(preset: str) -> Any:
    """training.options.TrainOptions of a preset's "train" section (its other keys, e.g. duration, are train.py's own)."""
    import dataclasses
    from training.options import TrainOptions
    section = load_preset(preset).get('train', {})
    return TrainOptions(**{f.name: section[f.name] for f in dataclasses.fields(TrainOptions) if f.name in section})


def config_option(section: str | None = None, inherit: str | None = None) -> Callable:
    """A click option `--config=NAME|FILE` whose values become the command's defaults.

    With `section`, the preset's keys under that name (e.g. "train") are used in addition to its
    top-level keys. Unknown keys are an error, so a typo in a preset never passes silently. With
    `inherit`, the keys of that other section which this command also has come first (sfbd.py takes
    the network settings of a preset's "train" section; its own "sfbd" section overrides them).
    """
    def callback(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
        if value is None:
            return value
        preset = load_preset(value)
        sub = preset.pop(section, {}) if section else {}
        inherited = preset.pop(inherit, {}) if inherit else {}
        # A preset names options by their flags (grid for --grid) or by their parameter names (grid_num).
        known = {p.name: p.name for p in ctx.command.params}
        known.update({flag.lstrip('-').replace('-', '_'): p.name for p in ctx.command.params for flag in p.opts})
        preset = {k: v for k, v in preset.items() if not isinstance(v, dict)}
        preset.update({k.replace('-', '_'): v for k, v in inherited.items() if k.replace('-', '_') in known})
        preset.update({k.replace('-', '_'): v for k, v in sub.items()})
        unknown = sorted(set(preset) - set(known))
        if unknown:
            raise UserError(f'Preset {value!r} sets unknown option(s) for this command: {", ".join(unknown)}')
        ctx.default_map = {**(ctx.default_map or {}), **{known[k]: v for k, v in preset.items()}}
        return value

    return click.option('--config', metavar='NAME|FILE', type=str, default=None, is_eager=True, expose_value=True,
                        callback=callback, help='Preset from configs/ (or a JSON file) whose values become defaults; flags given on the command line win.')

#----------------------------------------------------------------------------
# Help texts and option groups shared by the commands (train.py, sfbd.py, generate.py, fid.py).

NETWORK_HELP = ('Network: our .pt snapshot/training state, or an official EDM .pkl (a .pkl runs code from the file: '
                'only load files you trust)')
DETECTOR_HELP = ("Feature detector: inception (Inception-v3 as EDM computes it, with pytorch-fid's weights, downloaded once; "
                 "no code runs; the default for published FIDs), inception-pkl (EDM's own Inception pickle: runs its code), "
                 "dinov2 (FD_DINOv2, torch.hub), pixels (raw [-1,1] pixels: small-scale checks only, not an FID), "
                 "an Inception state dict .pth (fid.py convert-inception), "
                 "or a detector .pkl/TorchScript PATH|URL (a .pkl runs code from the file: only load files you trust)")

AUTO_HELP = 'auto = bf16 where it is native (CUDA Ampere or newer; CPUs with AMX or avx512_bf16), else fp32'
PRECISION_HELP = (f'{AUTO_HELP}; fp32 = the exact reference mode (EDM\'s arithmetic, TF32 off); bf16 = bf16 autocast '
                  '(fp32 with a warning where not native); fp16 = EDM\'s fp16 network')
INFERENCE_PRECISION_HELP = (f'fp32 = exact reference, images and FIDs comparable with EDM\'s; {AUTO_HELP}; '
                            'bf16 = bf16 autocast (faster; images differ by a fraction of a grey level on average)')


MAX_SEEDS = 10_000_000  # images per run: more is a typo (0-999999999), not a plan, and the seed list alone would fill memory
MAX_STEPS = 100_000     # sampling steps (EDM uses 18 to 256); the schedule is held in memory


class FiniteFloat(click.FloatRange):
    """click.FloatRange that also refuses nan (which passes every range check) and, unless allowed, +-inf."""

    def __init__(self, min: float | None = None, max: float | None = None, min_open: bool = False,
                 max_open: bool = False, allow_inf: bool = False):
        super().__init__(min=min, max=max, min_open=min_open, max_open=max_open)
        self.allow_inf = allow_inf

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        rv = super().convert(value, param, ctx)
        if math.isnan(rv) or (math.isinf(rv) and not self.allow_inf):
            bounds = f' {self._describe_range()}' if self.min is not None or self.max is not None else ''
            expected = f'a finite number{bounds}' + (' or inf' if self.allow_inf else '')
            self.fail(f'{rv} is not {"a number" if math.isnan(rv) else "finite"}; give {expected}', param, ctx)
        return rv


def finite_float(min: float | None = None, max: float | None = None, min_open: bool = False, max_open: bool = False,
                 allow_inf: bool = False) -> FiniteFloat:
    """click type: a float in a range, never nan, and inf only with allow_inf (e.g. S_max, whose default is inf)."""
    return FiniteFloat(min=min, max=max, min_open=min_open, max_open=max_open, allow_inf=allow_inf)


def _int_list_length(text: str) -> int:
    """How many numbers dnnlib.util.parse_int_list(text) would return, without building the list."""
    count = 0
    for part in str(text).split(','):
        m = re.fullmatch(r'(\d+)-(\d+)', part.strip())
        count += max(int(m.group(2)) - int(m.group(1)) + 1, 0) if m else 1
    return count


def int_list(value: Any) -> list[int]:
    """click type: '2,2,2' or '0-3' or a preset's list; 'none' or '' is the empty list. A network setting, so at
    most 1,000 numbers (a typo such as 1-999999999 would fill memory). ValueError, which click reports with the flag."""
    from .util import parse_int_list
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    if str(value).strip().lower() in ('', 'none'):
        return []
    if _int_list_length(value) > 1000:
        raise ValueError(f'{value} asks for {_int_list_length(value):,} numbers; give at most 1,000')
    try:
        return parse_int_list(value)
    except UserError as e:
        raise ValueError(e.message) from None


def parse_seeds(text: str, flag: str = '--seeds') -> list[int]:
    """A seed list such as '0-49999' or '1,5,10-20'; empty lists and more than MAX_SEEDS seeds are refused before
    the list is built."""
    from .util import parse_int_list
    if not str(text).strip():
        raise UserError(f'{flag} is empty: give seeds such as 0-63')
    count = _int_list_length(text)
    if count > MAX_SEEDS:
        raise UserError(f'{flag}={text} asks for {count:,} images, more than {MAX_SEEDS:,} in one run: '
                        f'give a smaller range (split a larger job into several runs)')
    try:
        return parse_int_list(text)
    except UserError as e:
        raise UserError(f'{flag}={text}: {e.message}') from None


def _nearest_existing(path: str) -> str:
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    return probe


def _can_create_files_in(directory: str) -> bool:
    """Whether a file can be created in `directory`, tried for real (os.access says yes to root on read-only places)."""
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix='.write-check-')
    except OSError:
        return False
    os.close(fd)
    os.remove(tmp)
    return True


def check_writable_dir(path: str, flag: str) -> None:
    """`path` is (or can be made as) a writable directory: it, or its nearest existing parent, is one."""
    if not path.strip():
        raise UserError(f'{flag} is empty; give a directory path')
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f'{flag}={path} is a file, not a directory; give a directory path')
    probe = _nearest_existing(path)
    if not os.path.isdir(probe) or not _can_create_files_in(probe):
        raise UserError(f'{flag}={path} cannot be written ({probe} is not a writable directory); give another {flag}')


def check_writable_file(path: str, flag: str, what: str | None = None) -> None:
    """`path` can be written as a file (atomically, beside itself): it is not a directory, and its nearest existing
    parent is a writable directory. Messages name it as `what` (default '{flag}={path}') and ask for another `flag`."""
    what = what or f'{flag}={path}'
    if not path.strip():
        raise UserError(f'{flag} is empty; give a file path')
    if os.path.isdir(path):
        raise UserError(f'{what} is a directory, not a file; give another {flag}')
    probe = _nearest_existing(os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(probe) or not _can_create_files_in(probe):
        raise UserError(f'{what} cannot be written ({probe} is not a writable directory); give another {flag}')


def _apply(f: Callable, options: list[Callable]) -> Callable:
    for option in reversed(options):
        f = option(f)
    return f


def train_options(f: Callable) -> Callable:
    """The network and training flags of train.py and sfbd.py: the fields of training.options.TrainOptions."""
    from training.options import ARCHS, PRECONDS, TrainOptions
    from torch_utils.perf import PRECISIONS
    d = TrainOptions()
    pos, unit = finite_float(min=0, min_open=True), finite_float(min=0, max=1)
    return _apply(f, [
        click.option('--arch',      help='Network architecture', type=click.Choice(list(ARCHS)), default=d.arch),
        click.option('--precond',   help='Preconditioning and loss', type=click.Choice(list(PRECONDS)), default=d.precond),
        click.option('--batch',     help='Global batch size (all processes)', metavar='INT', type=click.IntRange(min=1), default=d.batch),
        click.option('--batch-gpu', help='Limit per-process batch; the rest by gradient accumulation', metavar='INT', type=click.IntRange(min=1), default=d.batch_gpu),
        click.option('--cbase',     help='Channel multiplier  [default: by --arch]', metavar='INT', type=click.IntRange(min=1), default=d.cbase),
        click.option('--cres',      help='Channels per resolution  [default: by --arch]', metavar='LIST', type=int_list, default=d.cres),
        click.option('--blocks',    help='Residual blocks per resolution  [default: by --arch]', metavar='INT', type=click.IntRange(min=1), default=d.blocks),
        click.option('--attn',      help='Resolutions with self-attention, or none  [default: by --arch]', metavar='LIST', type=int_list, default=d.attn),
        click.option('--lr',        help='Learning rate', metavar='FLOAT', type=pos, default=d.lr),
        click.option('--lr-rampup', help='Learning-rate warm-up in thousands of images', metavar='KIMG', type=finite_float(min=0), default=d.lr_rampup),
        click.option('--ema',       help='EMA half-life in millions of images', metavar='MIMG', type=finite_float(min=0), default=d.ema),
        click.option('--dropout',   help='Dropout probability', metavar='FLOAT', type=unit, default=d.dropout),
        click.option('--augment',   help='Augment probability (0 = off)', metavar='FLOAT', type=unit, default=d.augment),
        click.option('--xflip',     help='Add x-flipped copies of the data set', metavar='BOOL', type=bool, default=d.xflip),
        click.option('--cache',     help='Cache the data set in CPU memory', metavar='BOOL', type=bool, default=d.cache),
        click.option('--precision', help=f'Arithmetic of training: {PRECISION_HELP}', type=click.Choice(list(PRECISIONS)), default=d.precision),
        click.option('--fp16',      help='EDM\'s alias for --precision=fp16', metavar='BOOL', type=bool, default=d.fp16),
        click.option('--channels-last', help='Weights and images in channels_last (NHWC) memory format', metavar='BOOL', type=bool, default=d.channels_last),
        click.option('--compile',   help='Wrap the network in torch.compile (slow first steps)', metavar='BOOL', type=bool, default=d.compile),
        click.option('--ls',        help='Loss scaling', metavar='FLOAT', type=pos, default=d.ls),
        click.option('--bench',     help='Enable cuDNN benchmarking', metavar='BOOL', type=bool, default=d.bench),
        click.option('--workers',   help='DataLoader worker processes (0 = load in the main process)', metavar='INT', type=click.IntRange(min=0), default=d.workers),
        click.option('--tick',      help='Progress line every this many thousands of images', metavar='KIMG', type=pos, default=d.tick),
        click.option('--snap',      help='Network snapshot every this many ticks', metavar='TICKS', type=click.IntRange(min=1), default=d.snap),
        click.option('--dump',      help='Training state every this many ticks', metavar='TICKS', type=click.IntRange(min=1), default=d.dump),
        click.option('--keep',      help='Keep only the newest N snapshots and N states  [default: all]', metavar='N', type=click.IntRange(min=1), default=d.keep),
    ])


def sampler_options(f: Callable) -> Callable:
    """The sampler's flags (generate.py, fid.py gen); they fill generation.sample_images' sampler_kwargs."""
    from training.generation import SOLVERS
    from training.sampler import RHO, SIGMA_MAX, SIGMA_MIN
    pos = finite_float(min=0, min_open=True)
    return _apply(f, [
        click.option('--steps', 'num_steps', help='Number of sampling steps N (2N-1 network calls)', metavar='INT', type=click.IntRange(min=2, max=MAX_STEPS), default=18, show_default=True),
        click.option('--sigma_min',          help='Lowest noise level, in [-1,1] pixel units (clipped to the network\'s)', metavar='FLOAT', type=pos, default=SIGMA_MIN, show_default=True),
        click.option('--sigma_max',          help='Highest noise level, in [-1,1] pixel units (clipped to the network\'s)', metavar='FLOAT', type=pos, default=SIGMA_MAX, show_default=True),
        click.option('--rho',                help='Time step exponent', metavar='FLOAT', type=pos, default=RHO, show_default=True),
        click.option('--S_churn', 'S_churn', help='Stochasticity strength (0 = deterministic)', metavar='FLOAT', type=finite_float(min=0), default=0, show_default=True),
        click.option('--S_min', 'S_min',     help='Churn only at sigma >= S_min ([-1,1] units)', metavar='FLOAT', type=finite_float(min=0), default=0, show_default=True),
        click.option('--S_max', 'S_max',     help='Churn only at sigma <= S_max ([-1,1] units)', metavar='FLOAT', type=finite_float(min=0, allow_inf=True), default=float('inf'), show_default=True),
        click.option('--S_noise', 'S_noise', help='Churn noise inflation', metavar='FLOAT', type=finite_float(min=0), default=1, show_default=True),
        click.option('--solver',             help='ODE solver', type=click.Choice(list(SOLVERS)), default='heun', show_default=True),
    ])


def fast_path_options(f: Callable) -> Callable:
    """The network's --precision, --channels-last and --compile flags for generation (generate.py, fid.py gen)."""
    from torch_utils.perf import INFERENCE_PRECISIONS
    return _apply(f, [
        click.option('--precision',     help=f'Arithmetic of the network: {INFERENCE_PRECISION_HELP}. FID features are always fp32',
                     type=click.Choice(list(INFERENCE_PRECISIONS)), default='fp32', show_default=True),
        click.option('--channels-last', help='Network weights and inputs in channels_last (NHWC) memory format', metavar='BOOL', type=bool, default=False, show_default=True),
        click.option('--compile',       help='Wrap the network in torch.compile (slow first batches)', metavar='BOOL', type=bool, default=False, show_default=True),
    ])


def grid_option(default: int, help: str) -> Callable:
    """--grid[=N]: the number of images in a sample grid (0 = none); a bare --grid means 64."""
    return click.option('--grid', 'grid_num', help=f'{help}; a bare --grid means 64  [default: {default}]', metavar='N',
                        type=click.IntRange(min=0), default=default, is_flag=False, flag_value=64)
