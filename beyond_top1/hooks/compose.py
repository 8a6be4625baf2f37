"""Build ``fwd_hooks`` lists with checked hook names, and a context manager that always removes
the hooks it added.

TransformerLens 3.9 already guarantees the cleanup: ``model.hooks(...)`` (which
``run_with_hooks`` uses) adds its hooks at a new context level and removes that level's
non-permanent hooks in a ``finally``, so hooks added with ``model.add_hook`` (no level), as
permanent hooks, or by an outer ``model.hooks`` survive. :func:`patched` builds on it and adds
what it lacks: every name is checked *before* any hook is added, with close matches in the
error, and a non-callable hook (a factory that was not called) is caught early.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from beyond_top1.hooks._common import HookFn


class HookNameError(ValueError):
    """A hook name that is not a hook point of the model."""


def _name(name) -> str | Callable[[str], bool]:
    """A layer index ``l`` means ``blocks.{l}.hook_resid_post`` (``-1``: the embedding)."""
    if isinstance(name, bool):
        raise TypeError(f"a hook name must be a str, a layer int or a filter, got {name!r}")
    if isinstance(name, int):
        if name < -1:
            raise HookNameError(f"layer {name}: use 0..L-1, or -1 for the embedding")
        return "blocks.0.hook_resid_pre" if name == -1 else f"blocks.{name}.hook_resid_post"
    if isinstance(name, str) or callable(name):
        return name
    raise TypeError(f"a hook name must be a str, a layer int or a filter, got {name!r}")


def check_hook_names(model, names: Iterable[str | Callable[[str], bool]]) -> None:
    """Raise :class:`HookNameError` for a name that is not in ``model.hook_dict`` (listing
    close matches) or a name filter that matches no hook point."""
    available = list(model.hook_dict)
    known = set(available)
    for name in names:
        if callable(name):
            if not any(name(n) for n in available):
                raise HookNameError(f"the name filter {name!r} matches no hook point")
            continue
        if name in known:
            continue
        close = difflib.get_close_matches(name, available, n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise HookNameError(
            f"{name!r} is not a hook point of {getattr(model.cfg, 'model_name', 'the model')} "
            f"({len(available)} hook points, listed in model.hook_dict).{hint}"
        )


def fwd_hooks(*pairs: tuple, model=None) -> list[tuple[str | Callable[[str], bool], HookFn]]:
    """Compose ``(name, hook_fn)`` pairs into a ``fwd_hooks`` list for TransformerLens.

    ``name``: a hook name, a layer index (``l`` → ``blocks.{l}.hook_resid_post``, ``-1`` →
    ``blocks.0.hook_resid_pre``) or a filter ``str -> bool``. With ``model`` every name is
    checked against ``model.hook_dict``. Several hooks on one point run in the order given.

    >>> hooks_ = fwd_hooks(
    ...     (12, copy_position(source=5, target=17)),
    ...     ("blocks.12.hook_resid_post", record(store)),   # sees the patched activation
    ...     model=model,
    ... )
    >>> logits = model.run_with_hooks(tokens, fwd_hooks=hooks_)
    """
    out = []
    for pair in pairs:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"each hook is a (name, hook_fn) pair, got {pair!r}")
        name, fn = _name(pair[0]), pair[1]
        if not callable(fn):
            raise TypeError(
                f"the hook for {name!r} is a {type(fn).__name__}, not a function "
                "fn(activation, hook); did you forget to call the factory?"
            )
        out.append((name, fn))
    if model is not None:
        check_hook_names(model, [name for name, _ in out])
    return out


@contextmanager
def patched(model, fwd_hooks: Iterable[tuple] = (), bwd_hooks: Iterable[tuple] = ()) -> Iterator:
    """Run code with hooks on ``model`` and remove them afterwards, also when it raises.

    Names are checked first (nothing is added if one is wrong). Only the hooks added here are
    removed: hooks the user added with ``model.add_hook``, permanent hooks and hooks of an
    outer ``patched``/``model.hooks`` stay. Yields the model.

    >>> with patched(model, [("blocks.3.hook_resid_post", zero_ablate([-1]))]) as m:
    ...     logits = m(tokens)
    ...     loss = m(tokens, return_type="loss")
    """
    fwd = _pairs(fwd_hooks, model)
    bwd = _pairs(bwd_hooks, model)
    # TransformerLens' own context: its hooks come off at exit (also on an exception); hooks of
    # other levels (model.add_hook, permanent ones, an outer context) stay
    with model.hooks(fwd_hooks=fwd, bwd_hooks=bwd, reset_hooks_end=True) as hooked_model:
        yield hooked_model


def _pairs(pairs: Iterable[tuple], model) -> list:
    if isinstance(pairs, tuple) and len(pairs) == 2 and not isinstance(pairs[0], (tuple, list)):
        raise TypeError("pass a list of (name, hook_fn) pairs, e.g. [(name, fn)], not one pair")
    return fwd_hooks(*pairs, model=model)
