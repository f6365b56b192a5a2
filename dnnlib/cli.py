"""Shared CLI pieces: `--config` presets from configs/ that act as defaults (command-line flags win)."""

import json
import os
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
        known = {p.name for p in ctx.command.params}
        preset = {k: v for k, v in preset.items() if not isinstance(v, dict)}
        preset.update({k.replace('-', '_'): v for k, v in inherited.items() if k.replace('-', '_') in known})
        preset.update({k.replace('-', '_'): v for k, v in sub.items()})
        unknown = sorted(set(preset) - known)
        if unknown:
            raise UserError(f'Preset {value!r} sets unknown option(s) for this command: {", ".join(unknown)}')
        ctx.default_map = {**(ctx.default_map or {}), **preset}
        return value

    return click.option('--config', metavar='NAME|FILE', type=str, default=None, is_eager=True, expose_value=True,
                        callback=callback, help='Preset from configs/ (or a JSON file) whose values become defaults; flags given on the command line win.')
