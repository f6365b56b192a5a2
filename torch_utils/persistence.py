"""Constructor-argument records for our networks, and a code-free reader for EDM's persistent pickles."""

import copy
import functools
import inspect
import io
import json
import pickle
from collections import OrderedDict
from typing import Any, BinaryIO

import numpy as np
import torch

import dnnlib

#----------------------------------------------------------------------------
# Recording constructor arguments, so an object can be rebuilt from (class_name, init_kwargs).

def record_init_kwargs(cls: type) -> type:
    """Class decorator: after __init__, `self.init_kwargs` holds the explicitly given arguments, JSON-able."""
    signature = inspect.signature(cls.__init__)
    orig_init = cls.__init__

    @functools.wraps(orig_init)
    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        init_kwargs = {}
        for name, value in list(bound.arguments.items())[1:]:
            if signature.parameters[name].kind == inspect.Parameter.VAR_KEYWORD:
                init_kwargs.update(value)
            else:
                init_kwargs[name] = value
        try:
            # A JSON round trip turns tuples into lists and rejects what a snapshot could not store.
            init_kwargs = json.loads(json.dumps(init_kwargs))
        except TypeError as e:
            raise dnnlib.UserError(f'{cls.__name__} arguments must be plain JSON values: {e}')
        orig_init(self, *args, **kwargs)
        self.init_kwargs = init_kwargs

    cls.__init__ = __init__
    return cls

#----------------------------------------------------------------------------
# EDM pickles (torch_utils.persistence format version 6). Every persistent object is pickled as
# _reconstruct_persistent_obj(meta) with meta = {type, version, module_src, class_name, state}.
# EDM executes module_src; we never do: the object becomes a PersistentRecord holding class_name
# and state, and the caller rebuilds its own class from the record's init kwargs and tensors.

_version = 6


class PersistentRecord:
    """What an EDM persistent object unpickles to here: its class name and pickled __dict__."""

    def __init__(self, class_name: str, state: dict):
        self.class_name = class_name
        self.state = state

    @property
    def init_kwargs(self) -> dict:
        """Constructor keyword arguments recorded by EDM's persistent_class decorator."""
        if self.state.get('_init_args'):
            raise dnnlib.UserError(f'EDM pickle: {self.class_name} was constructed with positional arguments; '
                                   'cannot rebuild it')
        kwargs = self.state.get('_init_kwargs') or {}
        if not isinstance(kwargs, dict):
            raise dnnlib.UserError(f'EDM pickle: the constructor arguments of {self.class_name} are not a dict; the file is corrupt')
        return dict(copy.deepcopy(kwargs))

    def state_dict(self, prefix: str = '') -> dict[str, torch.Tensor]:
        """Flat state dict (parameters and persistent buffers) gathered from the pickled module tree."""
        return _module_state_dict(self, prefix)


def _reconstruct_persistent_obj(meta: dict) -> PersistentRecord:
    """Called by the unpickler for each EDM persistent object (the name EDM pickles reference)."""
    if meta.get('type') != 'class' or meta.get('version') != _version:
        raise dnnlib.UserError(f'EDM pickle: unsupported persistent object format '
                               f'(type {meta.get("type")!r}, version {meta.get("version")!r}; expected class, {_version})')
    return PersistentRecord(str(meta['class_name']), dict(meta['state'] or {}))


class _TorchModuleStub:
    """Stands in for plain torch.nn containers (ModuleDict, ModuleList) inside an EDM pickle."""

    def __setstate__(self, state: dict) -> None:
        self.state = state


def _module_state_dict(obj: Any, prefix: str) -> dict[str, torch.Tensor]:
    state = getattr(obj, 'state', None)
    if not isinstance(state, dict):
        raise dnnlib.UserError(f'EDM pickle: {prefix or "network"} is not a module')
    out = {}
    for name, value in (state.get('_parameters') or {}).items():
        if value is not None:
            out[prefix + name] = value.detach()
    skip = state.get('_non_persistent_buffers_set') or set()
    for name, value in (state.get('_buffers') or {}).items():
        if value is not None and name not in skip:
            out[prefix + name] = value.detach()
    for name, child in (state.get('_modules') or {}).items():
        if child is not None:
            out.update(_module_state_dict(child, f'{prefix}{name}.'))
    return out


def _load_storage_from_bytes(data: bytes) -> Any:
    # EDM-era torch pickles each storage as torch.save bytes; read them without running code.
    return torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)


_ALLOWED = {
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): _reconstruct_persistent_obj,
    ('dnnlib.util', 'EasyDict'): dnnlib.util.EasyDict,
    ('collections', 'OrderedDict'): OrderedDict,
    ('torch._utils', '_rebuild_tensor_v2'): torch._utils._rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'): torch._utils._rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): torch._utils._rebuild_parameter_with_state,
    ('torch.storage', '_load_from_bytes'): _load_storage_from_bytes,
    ('torch', 'Size'): torch.Size,
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('numpy', 'dtype'): np.dtype,
    ('numpy.core.multiarray', 'scalar'): np._core.multiarray.scalar,
    ('numpy._core.multiarray', 'scalar'): np._core.multiarray.scalar,
}


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle names a global (`name`, e.g. 'posix.system') that no EDM network pickle needs; nothing was called."""

    def __init__(self, name: str):
        super().__init__(f'refusing to load {name}')
        self.name = name


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals an EDM network pickle needs; anything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module.startswith('torch.nn.modules.'):
            return _TorchModuleStub
        if module == 'torch' and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise RefusedGlobal(f'{module}.{name}')


def load_edm_pickle(f: BinaryIO) -> Any:
    """Unpickle an EDM pickle without executing embedded code; persistent objects become PersistentRecords.

    Raises RefusedGlobal for a global outside the allowed set, pickle.UnpicklingError (or EOFError etc.) for
    files that are not such pickles.
    """
    return _RestrictedUnpickler(f).load()

#----------------------------------------------------------------------------
