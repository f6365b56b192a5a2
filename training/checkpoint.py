"""The one network loader, and the network-snapshot and training-state file formats."""

import copy
import os
from typing import Any

import torch

import dnnlib
from dnnlib import UserError
from torch_utils import persistence

#----------------------------------------------------------------------------
# Formats (docs/ARCHITECTURE.md, "Checkpoints"). Both are torch.save files of tensors and plain Python,
# so torch.load(weights_only=True) reads them without running code.

SNAPSHOT_FORMAT = 'sfbd-network'
STATE_FORMAT = 'sfbd-training-state'
VERSION = 1

# Classes a file may name; anything else is refused, so a file cannot make us construct arbitrary objects.
_NETWORK_CLASSES = ('EDMPrecond', 'VPPrecond', 'VEPrecond', 'iDDPMPrecond', 'SongUNet', 'DhariwalUNet')

#----------------------------------------------------------------------------
# Rebuilding a network from (class_name, init_kwargs).

def _unwrap(net: torch.nn.Module) -> torch.nn.Module:
    """The module itself, inside DistributedDataParallel or torch.compile wrappers."""
    while True:
        if isinstance(net, torch.nn.parallel.DistributedDataParallel):
            net = net.module
        elif hasattr(net, '_orig_mod'):
            net = net._orig_mod
        else:
            return net


def network_class_name(net: torch.nn.Module) -> str:
    """Dotted class name to rebuild `net` with dnnlib.util.construct_class_by_name(class_name, **net.init_kwargs)."""
    net = _unwrap(net)
    if not hasattr(net, 'init_kwargs'):
        raise UserError(f'{type(net).__name__} does not record init_kwargs; only training.networks classes can be saved')
    return f'{type(net).__module__}.{type(net).__qualname__}'


def build_network(class_name: str, init_kwargs: dict) -> torch.nn.Module:
    """Construct a training.networks class by dotted or bare name (e.g. 'training.networks.EDMPrecond')."""
    from training import networks
    short = class_name.removeprefix('training.networks.')
    if short not in _NETWORK_CLASSES:
        raise UserError(f'Unsupported network class {class_name!r}; expected one of {", ".join(_NETWORK_CLASSES)}')
    try:
        return getattr(networks, short)(**init_kwargs)
    except TypeError as e:
        raise UserError(f'Cannot build {short} from the file\'s arguments: {e}')


def _load_weights(net: torch.nn.Module, state_dict: dict, source: str) -> None:
    result = net.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        names = (result.missing_keys + result.unexpected_keys)[:3]
        raise UserError(f'{source}: weights do not fit {type(net).__name__} '
                        f'({len(result.missing_keys)} missing, {len(result.unexpected_keys)} unexpected, e.g. {", ".join(names)})')


def _cpu_state_dict(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu() for name, tensor in _unwrap(net).state_dict().items()}

#----------------------------------------------------------------------------
# Writing.

def save_network(path: str, net: torch.nn.Module, *, augment_kwargs: dict | None = None,
                 dataset_kwargs: dict | None = None, kimg: float = 0.0, meta: dict | None = None) -> None:
    """Write a network snapshot (weights, constructor arguments, and what it was trained on) atomically."""
    data = dict(format=SNAPSHOT_FORMAT, version=VERSION, class_name=network_class_name(net),
                init_kwargs=copy.deepcopy(_unwrap(net).init_kwargs), state_dict=_cpu_state_dict(net),
                augment_kwargs=_plain(augment_kwargs), dataset_kwargs=_plain(dataset_kwargs), kimg=float(kimg),
                meta=_plain(meta or {}))
    with dnnlib.util.atomic_write(path) as f:
        torch.save(data, f)


def save_training_state(path: str, *, net: torch.nn.Module, ema: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        cur_nimg: int, cur_tick: int, rng: dict, options: dict) -> None:
    """Write everything needed to resume training atomically; `rng` must hold tensors and plain Python only."""
    data = dict(format=STATE_FORMAT, version=VERSION, class_name=network_class_name(ema),
                init_kwargs=copy.deepcopy(_unwrap(ema).init_kwargs), net=_cpu_state_dict(net), ema=_cpu_state_dict(ema),
                optimizer=optimizer.state_dict(), cur_nimg=int(cur_nimg), cur_tick=int(cur_tick), rng=_plain(rng),
                options=_plain(options))
    with dnnlib.util.atomic_write(path) as f:
        torch.save(data, f)


def _plain(obj: Any) -> Any:
    """Copy of obj as dicts/lists/scalars/tensors (what weights_only loading accepts); TypeError otherwise."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {_plain(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(x) for x in obj]
    raise TypeError(f'Cannot store {type(obj).__name__} in a checkpoint: only tensors and plain Python values')

#----------------------------------------------------------------------------
# Reading.

def _read(path_or_url: str) -> tuple[str, dict]:
    """(kind, contents) of a network file; kind is 'snapshot', 'training-state' or 'edm-pickle'."""
    name = os.fspath(path_or_url)
    with dnnlib.util.open_url(name) as f:
        magic = f.read(4)
        f.seek(0)
        try:
            if magic.startswith(b'PK\x03\x04'):  # torch.save's zip format: ours.
                data = torch.load(f, map_location='cpu', weights_only=True)
                kind = {SNAPSHOT_FORMAT: 'snapshot', STATE_FORMAT: 'training-state'}.get(
                    data.get('format') if isinstance(data, dict) else None)
                if kind is None:
                    raise UserError(f'{name} is a PyTorch file but not a network snapshot or training state of this project')
                if data.get('version', 0) > VERSION:
                    raise UserError(f'{name} was written by a newer version of this code (format version {data["version"]})')
            elif magic.startswith(b'\x80'):  # A plain pickle: EDM's format.
                data = persistence.load_edm_pickle(f)
                if not (isinstance(data, dict) and isinstance(data.get('ema'), persistence.PersistentRecord)):
                    raise UserError(f'{name} is a pickle but not an EDM network pickle (no "ema" network)')
                kind = 'edm-pickle'
            else:
                raise UserError(f'{name} is not a network file: expected a .pt snapshot or training state, or an EDM .pkl')
        except UserError:
            raise
        except Exception as e:  # Truncated or corrupt files surface as many exception types.
            detail = (str(e).splitlines() or [''])[0][:200]
            raise UserError(f'Cannot read {name}: truncated, corrupt or not a network file ({type(e).__name__}: {detail})')
    return kind, data


def load_network(path_or_url: str, device: torch.device | str = 'cpu') -> torch.nn.Module:
    """Load a network in eval mode with requires_grad off, from a path or URL.

    Accepts this project's network snapshots, its training states (their EMA network), and official
    EDM pickles (edm-*.pkl). Snapshots and states are read with torch.load(weights_only=True): no code
    runs. EDM pickles are read by a restricted unpickler that never executes the module source they
    embed; it rebuilds our class of the same name from the pickled constructor arguments and copies the
    tensors. Pickles remain a code-execution format in general: load them only from paths the user named.
    """
    kind, data = _read(path_or_url)
    if kind == 'edm-pickle':
        record = data['ema']
        net = build_network(record.class_name, record.init_kwargs)
        _load_weights(net, record.state_dict(), path_or_url)
    else:
        net = build_network(data['class_name'], data['init_kwargs'])
        _load_weights(net, data['state_dict'] if kind == 'snapshot' else data['ema'], path_or_url)
    return net.eval().requires_grad_(False).to(device)


def load_snapshot_info(path_or_url: str) -> dnnlib.EasyDict:
    """What a network file says about itself: kind, class_name, init_kwargs, kimg, dataset_kwargs, augment_kwargs, meta."""
    kind, data = _read(path_or_url)
    if kind == 'edm-pickle':
        pipe = data.get('augment_pipe')
        augment_kwargs = None
        if isinstance(pipe, persistence.PersistentRecord):
            augment_kwargs = dict(class_name='training.augment.AugmentPipe', **pipe.init_kwargs)
        dataset_kwargs = data.get('dataset_kwargs')
        return dnnlib.EasyDict(kind=kind, class_name=f'training.networks.{data["ema"].class_name}',
                               init_kwargs=data['ema'].init_kwargs, kimg=None, augment_kwargs=augment_kwargs,
                               dataset_kwargs=dict(dataset_kwargs) if dataset_kwargs is not None else None, meta={})
    if kind == 'snapshot':
        return dnnlib.EasyDict(kind=kind, class_name=data['class_name'], init_kwargs=data['init_kwargs'], kimg=data['kimg'],
                               augment_kwargs=data['augment_kwargs'], dataset_kwargs=data['dataset_kwargs'], meta=data['meta'])
    options = data.get('options') or {}
    return dnnlib.EasyDict(kind=kind, class_name=data['class_name'], init_kwargs=data['init_kwargs'],
                           kimg=data['cur_nimg'] / 1e3, augment_kwargs=options.get('augment_kwargs'),
                           dataset_kwargs=options.get('dataset_kwargs'), meta={})


def load_training_state(path: str) -> dict:
    """Read a training state written by save_training_state (tensors on the CPU); UserError for anything else."""
    kind, data = _read(path)
    if kind != 'training-state':
        raise UserError(f'{path} is a {kind.replace("-", " ")}, not a training state (training-state-*.pt)')
    return data


def check_network_matches(net: torch.nn.Module, resolution: int, channels: int) -> None:
    """UserError unless `net` takes images of the given resolution and number of channels."""
    net = _unwrap(net)
    if (net.img_resolution, net.img_channels) != (resolution, channels):
        raise UserError(f'The network takes {net.img_resolution}x{net.img_resolution} images with {net.img_channels} '
                        f'channels; the data has {resolution}x{resolution} with {channels}')

#----------------------------------------------------------------------------
