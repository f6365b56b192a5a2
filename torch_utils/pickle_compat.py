"""What code embedded in EDM/StyleGAN pickles may import from their torch_utils, in plain torch.

Used only when such a pickle's code is run (detector pickles, training.metrics): imports of torch_utils
from that code resolve to `import_torch_utils`, our package with EDM's extra names filled in.
"""

import contextlib
import functools
import importlib
import types
import warnings
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

#----------------------------------------------------------------------------
# misc.

def profiled_function(fn: Callable) -> Callable:
    """EDM wraps the function in a profiler range; the function itself is all that embedded code needs."""
    return fn


@contextlib.contextmanager
def suppress_tracer_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', category=torch.jit.TracerWarning)
        yield

#----------------------------------------------------------------------------
# ops.conv2d_gradfix and ops.bias_act: StyleGAN's custom kernels compute these forward values.

def conv2d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: Any = 1,
           padding: Any = 0, dilation: Any = 1, groups: int = 1) -> torch.Tensor:
    return F.conv2d(input, weight, bias, stride=stride, padding=padding, dilation=dilation, groups=groups)


def conv_transpose2d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: Any = 1,
                     padding: Any = 0, output_padding: Any = 0, groups: int = 1, dilation: Any = 1) -> torch.Tensor:
    return F.conv_transpose2d(input, weight, bias, stride=stride, padding=padding, output_padding=output_padding,
                              groups=groups, dilation=dilation)


@contextlib.contextmanager
def no_weight_gradients(disable: bool = True) -> Iterator[None]:
    yield


# name -> (function of (x, alpha), default alpha, default gain), StyleGAN's table.
ACTIVATIONS = {
    'linear': (lambda x, alpha: x, 0, 1),
    'relu': (lambda x, alpha: F.relu(x), 0, np.sqrt(2)),
    'lrelu': (lambda x, alpha: F.leaky_relu(x, alpha), 0.2, np.sqrt(2)),
    'tanh': (lambda x, alpha: torch.tanh(x), 0, 1),
    'sigmoid': (lambda x, alpha: torch.sigmoid(x), 0, 1),
    'elu': (lambda x, alpha: F.elu(x), 0, 1),
    'selu': (lambda x, alpha: F.selu(x), 0, 1),
    'softplus': (lambda x, alpha: F.softplus(x), 0, 1),
    'swish': (lambda x, alpha: torch.sigmoid(x) * x, 0, np.sqrt(2)),
}


def bias_act(x: torch.Tensor, b: torch.Tensor | None = None, dim: int = 1, act: str = 'linear',
             alpha: float | None = None, gain: float | None = None, clamp: float | None = None,
             impl: str | None = None) -> torch.Tensor:
    """act(x + b broadcast along `dim`) * gain, clamped to [-clamp, clamp] when clamp >= 0."""
    fn, default_alpha, default_gain = ACTIVATIONS[act]
    if b is not None:
        x = x + b.reshape([-1 if i == dim else 1 for i in range(x.ndim)])
    x = fn(x, default_alpha if alpha is None else alpha)
    x = x * (default_gain if gain is None else gain)
    if clamp is not None and clamp >= 0:
        x = x.clamp(-clamp, clamp)
    return x

#----------------------------------------------------------------------------

def _module(name: str, *namespaces: dict, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    for namespace in namespaces:
        module.__dict__.update(namespace)
    module.__dict__.update(attrs)
    module.__name__ = name
    return module


@functools.cache
def _package() -> types.ModuleType:
    import torch_utils.misc
    import torch_utils.persistence
    # persistent_class: the original class is all an unpickled object needs.
    persistence = _module('torch_utils.persistence', torch_utils.persistence.__dict__, persistent_class=lambda cls: cls)
    misc = _module('torch_utils.misc', torch_utils.misc.__dict__, profiled_function=profiled_function,
                   suppress_tracer_warnings=suppress_tracer_warnings)
    ops = _module('torch_utils.ops',
                  conv2d_gradfix=_module('torch_utils.ops.conv2d_gradfix', enabled=True, conv2d=conv2d,
                                         conv_transpose2d=conv_transpose2d, no_weight_gradients=no_weight_gradients),
                  bias_act=_module('torch_utils.ops.bias_act', bias_act=bias_act))
    return _module('torch_utils', persistence=persistence, misc=misc, ops=ops)


def _child(module: types.ModuleType, name: str) -> Any:
    if not hasattr(module, name):
        setattr(module, name, importlib.import_module(f'{module.__name__}.{name}'))  # our other modules, unchanged
    return getattr(module, name)


def import_torch_utils(name: str, fromlist: Sequence[str] | None = ()) -> types.ModuleType:
    """What `__import__(name, fromlist=fromlist)` returns for a torch_utils module, from the stand-in package."""
    package = _package()
    module = package
    for part in name.split('.')[1:]:
        module = _child(module, part)
    if not fromlist:
        return package
    for item in fromlist:
        if item != '*':
            _child(module, item)
    return module
