"""safetensors files written deterministically and piece by piece, and read memory-mapped.

The safetensors library writes a whole dict of tensors at once and orders a header's metadata
differently from one process to the next. :func:`write_safetensors` writes the same format
(read back by the library; tested) with sorted keys, so the same tensors and metadata always
give the same bytes, and takes the rows of each tensor in pieces, so no tensor need be whole in
memory. :func:`map_safetensors` maps a file's tensors without reading them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np

_SAFETENSORS_DTYPES = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "uint16": "U16", "int16": "I16",
    "uint32": "U32", "int32": "I32", "uint64": "U64", "int64": "I64", "float16": "F16",
    "float32": "F32", "float64": "F64",
}  # fmt: skip
_NUMPY_DTYPES = {code: name for name, code in _SAFETENSORS_DTYPES.items()}


class SafetensorsLayout:
    """The tensors of a safetensors file written piece by piece: dtype, shape beyond the first
    axis, and rows so far, checked to agree between pieces."""

    def __init__(self):
        self.specs: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}

    def add(self, arrays: dict[str, np.ndarray]) -> None:
        for name, array in arrays.items():
            if array.ndim == 0:
                raise ValueError(f"{name} is a scalar: give arrays of at least one axis")
            if array.dtype.name not in _SAFETENSORS_DTYPES:
                raise ValueError(f"{name}: dtype {array.dtype} cannot be stored in safetensors")
            dtype, tail, rows = self.specs.get(name, (array.dtype, array.shape[1:], 0))
            if (dtype, tail) != (array.dtype, array.shape[1:]):
                raise ValueError(
                    f"pieces disagree on {name}: {dtype}{list(tail)} vs "
                    f"{array.dtype}{list(array.shape[1:])}"
                )
            self.specs[name] = (dtype, tail, rows + len(array))

    def check_rows(self, n_rows: int) -> None:
        wrong = {n: s[2] for n, s in self.specs.items() if s[2] != n_rows}
        if wrong:
            raise ValueError(f"arrays {wrong} (name: rows) should have {n_rows} rows each")


def write_safetensors(
    path: Path, layout: SafetensorsLayout, pieces: Iterable[dict], metadata: dict | None = None
) -> None:
    """A safetensors file of ``layout``'s tensors, their rows written piece by piece (each
    tensor's bytes at its running offset), so no tensor is ever whole in memory. Wider dtypes
    come first (then by name), so every tensor starts aligned to its item size."""
    names = sorted(layout.specs, key=lambda n: (-layout.specs[n][0].itemsize, n))
    header, offset, end = {}, {}, 0
    for name in names:
        dtype, tail, rows = layout.specs[name]
        size = rows * math.prod(tail) * dtype.itemsize
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype.name],
            "shape": [rows, *tail],
            "data_offsets": [end, end + size],
        }
        offset[name], end = end, end + size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    text += b" " * (-len(text) % 8)  # data 8-byte aligned, as safetensors writes it
    base = 8 + len(text)
    with open(path, "wb") as handle:
        handle.write(len(text).to_bytes(8, "little") + text)
        handle.truncate(base + end)
        for arrays in pieces:
            for name in names:
                little_endian = layout.specs[name][0].newbyteorder("<")
                data = np.ascontiguousarray(arrays[name], dtype=little_endian)
                handle.seek(base + offset[name])
                handle.write(data.reshape(-1).view(np.uint8))
                offset[name] += data.nbytes
    if any(offset[name] != header[name]["data_offsets"][1] for name in names):
        raise ValueError(f"{path.name}: the pieces changed between passes")


def map_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file as views of one copy-on-write memory map: nothing is
    read until used, and writing to an array changes this process's copy, never the file."""
    path = Path(path)
    if path.stat().st_size < 10:
        raise ValueError(f"{path.name} is not a safetensors file")
    whole = np.memmap(path, np.uint8, "c")
    n = int.from_bytes(whole[:8].tobytes(), "little")
    header = json.loads(whole[8 : 8 + n].tobytes()) if 2 <= n <= len(whole) - 8 else None
    if not isinstance(header, dict):
        raise ValueError(f"{path.name} is not a safetensors file")
    header.pop("__metadata__", None)
    arrays = {}
    for name, spec in header.items():
        if not isinstance(spec, dict) or spec.get("dtype") not in _NUMPY_DTYPES:
            raise ValueError(f"{path.name}: tensor {name} has an unsupported dtype")
        dtype = np.dtype(_NUMPY_DTYPES[spec["dtype"]]).newbyteorder("<")
        shape = tuple(int(d) for d in spec["shape"])
        begin, end = (8 + n + int(x) for x in spec["data_offsets"])
        if end - begin != math.prod(shape) * dtype.itemsize or end > len(whole):
            raise ValueError(f"{path.name}: tensor {name} does not fit the file")
        arrays[name] = whole[begin:end].view(dtype).reshape(shape)
    return arrays


def save_arrays(path: Path, arrays: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    """``arrays`` (and string ``metadata``) as one safetensors file, deterministically."""
    layout = SafetensorsLayout()
    layout.add(arrays)
    write_safetensors(Path(path), layout, [arrays], metadata)


__all__ = ["SafetensorsLayout", "map_safetensors", "save_arrays", "write_safetensors"]
