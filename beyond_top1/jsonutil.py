"""JSON-ready values from numpy/pandas results (NaN becomes ``null``)."""

from __future__ import annotations

import math

import numpy as np


def to_jsonable(value):
    """``value`` with numpy scalars turned into Python ones, NaN into ``None``, recursively
    through dicts, lists and tuples (dict keys become strings)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float | np.floating):
        return None if math.isnan(float(value)) else float(value)
    if isinstance(value, np.integer | np.bool_):
        return value.item()
    return value
