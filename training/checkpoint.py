"""The one network loader, and the network-snapshot and training-state file formats."""

import copy
import os
import pickle
import re
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


MAX_MODULES = 5_000  # EDM's networks have about 320; a file asking for more is crafted or corrupt


class _TooManyModules(Exception):
    """Raised by network_size's module hook to stop a construction that has passed MAX_MODULES."""


def _network_class(class_name: str) -> type:
    from training import networks
    short = class_name.removeprefix('training.networks.')
    if short not in _NETWORK_CLASSES:
        raise UserError(f'Unsupported network class {class_name!r}; expected one of {", ".join(_NETWORK_CLASSES)}')
    return getattr(networks, short)


def _construct(cls: type, init_kwargs: dict, source: str) -> torch.nn.Module:
    try:
        return cls(**init_kwargs)
    except (UserError, _TooManyModules):
        raise
    except Exception as e:  # Arguments from a file can be wrong in any way: types, signs, sizes.
        detail = ' '.join(str(e).split())[:200]
        raise UserError(f'Cannot build {cls.__name__} from the arguments in {source}: {type(e).__name__}: {detail}')


class _LargeTensorsOnMeta(torch.overrides.TorchFunctionMode):
    """Tensors of more than SMALL elements are created on the meta device (no memory), smaller ones as usual: a network
    can be built to count its weights while the scalars its constructor computes (VP's sigma_min, iDDPM's u) stay real."""

    SMALL = 4096
    FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn, torch.randint, torch.arange,
                 torch.linspace, torch.eye, torch.tensor, torch.as_tensor}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in self.FACTORIES and kwargs.get('device') is None:
            meta = func(*args, **{**kwargs, 'device': 'meta'})
            if meta.numel() > self.SMALL:
                return meta
        return func(*args, **kwargs)


def network_size(class_name: str, init_kwargs: dict, source: str = 'the file') -> tuple[int, int]:
    """(parameter count, bytes of parameters and buffers) of the network `init_kwargs` describe, counted without
    allocating its weights; a network of more than MAX_MODULES modules is refused while it is being built."""
    cls = _network_class(class_name)
    count = 0

    def on_module(*_args: Any) -> None:
        nonlocal count
        count += 1
        if count > MAX_MODULES:
            raise _TooManyModules()

    hook = torch.nn.modules.module.register_module_module_registration_hook(on_module)
    try:
        # Small tensors are real and drawn from the global RNG: counting must not move the stream a seeded build uses.
        with torch.random.fork_rng(devices=[]), _LargeTensorsOnMeta():
            net = _construct(cls, init_kwargs, source)
    except _TooManyModules:
        raise UserError(f'{source} describes a network ({cls.__name__}) of more than {MAX_MODULES:,} modules (EDM\'s '
                        f'networks have about 320): its constructor arguments are corrupt or crafted; it was not built') from None
    finally:
        hook.remove()
    params = sum(p.numel() for p in net.parameters())
    return params, sum(t.numel() * t.element_size() for t in [*net.parameters(), *net.buffers()])


def available_memory(device: torch.device | str = 'cpu') -> int:
    """Bytes that can be allocated now: free memory of a CUDA device, else the machine's available memory."""
    device = torch.device(device)
    if device.type == 'cuda':
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil
    return int(psutil.virtual_memory().available)


def build_network(class_name: str, init_kwargs: dict, device: torch.device | str | None = None,
                  source: str = 'the file') -> torch.nn.Module:
    """Construct a training.networks class by dotted or bare name (e.g. 'training.networks.EDMPrecond') on the CPU.

    The size is estimated first (network_size); a network that would not fit in the available CPU memory (nor on
    `device`, where the caller will move it) is refused with the estimate, before any memory is allocated.
    """
    cls = _network_class(class_name)
    params, size = network_size(class_name, init_kwargs, source)
    for where in dict.fromkeys([torch.device('cpu'), torch.device(device or 'cpu')]):
        available = available_memory(where)
        if size > available:
            raise UserError(f'{source} describes a network ({cls.__name__}) of {params:,} parameters '
                            f'({size / 2**30:,.1f} GiB), more than the {available / 2**30:,.1f} GiB of memory available on '
                            f'{where}: its constructor arguments are corrupt or it needs a larger machine; it was not built')
    return _construct(cls, init_kwargs, source)


def _load_weights(net: torch.nn.Module, state_dict: dict, source: str) -> None:
    try:
        result = net.load_state_dict(state_dict, strict=False)
    except (RuntimeError, TypeError, AttributeError) as e:  # shapes that differ, or not a dict of tensors
        detail = ' '.join(str(e).split())
        raise UserError(f'{source}: weights do not fit {type(net).__name__} ({detail[:200]})')
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
    if not name.strip():
        raise UserError('The network path is empty: give a .pt snapshot or training state, or an EDM .pkl')
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
                weights = 'state_dict' if kind == 'snapshot' else 'ema'
                for key, types in [('class_name', str), ('init_kwargs', dict), (weights, dict)]:
                    if not isinstance(data.get(key), types):
                        raise UserError(f'{name} claims to be a {kind.replace("-", " ")} but its {key!r} is missing or '
                                        f'malformed: the file is corrupt')
            elif magic.startswith(b'\x80'):  # A plain pickle: EDM's format.
                data = persistence.load_edm_pickle(f)
                if not (isinstance(data, dict) and isinstance(data.get('ema'), persistence.PersistentRecord)):
                    raise UserError(f'{name} is a pickle but not an EDM network pickle (it holds no "ema" network): '
                                    f'give an EDM network pickle or one of our .pt snapshots')
                kind = 'edm-pickle'
            else:
                raise UserError(f'{name} is not a network file: expected a .pt snapshot or training state, or an EDM .pkl')
        except UserError:
            raise
        except persistence.RefusedGlobal as e:
            raise UserError(f'{name} is a pickle but not an EDM network pickle: it needs {e.name}, which no EDM network '
                            f'pickle uses; nothing in it was run. Give an EDM network .pkl or one of our .pt snapshots')
        except pickle.UnpicklingError as e:
            if not magic.startswith(b'PK') or 'weights only' not in str(e).lower():
                raise UserError(f'{name} is truncated or corrupt ({error_summary(e)}): copy or download it again')
            named = re.search(r'GLOBAL ([\w.]+)', str(e))
            raise UserError(f'{name} holds Python objects beyond tensors{f" ({named.group(1)})" if named else ""}, so it is not '
                            f'one of our snapshots; it was not run (network files are read weights-only). Give a '
                            f'network-snapshot-*.pt or training-state-*.pt of this project, or an EDM .pkl')
        except Exception as e:  # Truncated or corrupt files surface as many exception types.
            raise UserError(f'{name} is truncated or corrupt ({error_summary(e)}): copy or download it again')
    return kind, data


def error_summary(e: BaseException) -> str:
    """'Type: the first sentence of the message', short (PyTorch's messages run to several paragraphs)."""
    text = (str(e).strip().splitlines() or [''])[0]
    return f'{type(e).__name__}: {text.split(". ")[0][:120]}'


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
        net = build_network(record.class_name, record.init_kwargs, device, source=os.fspath(path_or_url))
        _load_weights(net, record.state_dict(), path_or_url)
    else:
        net = build_network(data['class_name'], data['init_kwargs'], device, source=os.fspath(path_or_url))
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
