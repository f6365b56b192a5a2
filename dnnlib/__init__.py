"""Small general-purpose utilities (EDM-compatible names): EasyDict, construction by name, URLs."""

from .util import EasyDict, UserError  # noqa: F401
