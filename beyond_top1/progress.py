"""Progress bars: notebook widgets where the front end can show them, clean text otherwise.

``tqdm.auto`` picks a widget bar inside a Jupyter kernel and warns (``TqdmWarning: IProgress not
found``) when ``ipywidgets`` is missing. :func:`tqdm` uses the widget bar only when
``ipywidgets`` imports (the ``notebook`` extra installs it) and the plain text bar otherwise, so
no warning is ever printed.
"""

from __future__ import annotations

import functools


@functools.cache
def _bar_class():
    try:
        import ipywidgets  # noqa: F401 - only whether it imports
    except Exception:  # noqa: BLE001 - missing or broken: text bars
        from tqdm.std import tqdm as bar
    else:
        from tqdm.auto import tqdm as bar
    return bar


def tqdm(*args, **kwargs):
    """A progress bar (``tqdm`` arguments): a widget in a notebook with ``ipywidgets``, text
    elsewhere."""
    return _bar_class()(*args, **kwargs)


__all__ = ["tqdm"]
