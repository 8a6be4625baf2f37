"""``from hooks import ...``: the toolkit's TransformerLens hook-function factories.

A thin re-export of :mod:`beyond_top1.hooks`, where they live (see its docstring). The library
itself never imports this top-level name, so a ``hooks.py`` of your own next to a notebook cannot
break ``import beyond_top1``.
"""

import warnings as _warnings

from beyond_top1.hooks import *  # noqa: F403
from beyond_top1.hooks import (  # noqa: F401 - deprecated names, importable for one release
    __all__,  # noqa: F401
    constant_replacement,
    linear_replacement,
    submodule_replacement,
)

_MOVED = {"mean_activation", "mean_from_stream"}


def __getattr__(name: str):
    if name in _MOVED:  # reference means are statistics: they moved to beyond_top1.activations
        _warnings.warn(
            f"hooks.{name} moved to beyond_top1.activations.{name}; the old name goes away in "
            "the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        from beyond_top1 import activations

        return getattr(activations, name)
    raise AttributeError(f"module 'hooks' has no attribute {name!r}")
