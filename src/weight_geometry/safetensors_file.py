"""Lazy safetensors reading, single file or sharded (``model.safetensors.index.json``).

The tensor directory comes from each file's JSON header (8-byte length + JSON), so inspecting a
checkpoint costs a few kilobytes of I/O and no torch import. A tensor is read with one
``pread`` of its byte range and converted to float32: no memory map, so pages of tensors read
earlier do not stay mapped into the process (its RSS stays near one tensor, not the file).
Float32 tensors are read straight into their output array; other dtypes into one raw buffer
reused across reads (no page faults on a fresh buffer per tensor), then decoded in one pass.
Stored bytes are little-endian, as the format specifies (and as the host is assumed to be).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError

#: safetensors dtype codes -> readable names (as torch spells them).
DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
               "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def _bf16_to_float32(raw: np.ndarray) -> np.ndarray:
    """bf16 bits are the high 16 bits of the float32 of the same value: write them into the high
    halves of one zeroed array (little-endian: half 1 of each 32-bit word). One pass, no
    temporaries; 2x faster than ``(raw.astype(uint32) << 16)``."""
    out = np.zeros((raw.size, 2), dtype=np.uint16)
    out[:, 1] = raw.reshape(-1)
    return out.view(np.float32).reshape(raw.shape)


def _to_float32(raw: np.ndarray) -> np.ndarray:
    return raw.astype(np.float32)


#: safetensors dtype code -> (numpy dtype of the stored bytes, how to make float32; None: is).
_DECODE = {
    "F64": (np.float64, _to_float32), "F32": (np.float32, None), "F16": (np.float16, _to_float32),
    "BF16": (np.uint16, _bf16_to_float32),
}


@dataclass(frozen=True)
class TensorEntry:
    """Where a tensor lives and what it is: file, dtype string, HF shape, absolute byte range."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int = 0
    end: int = 0


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse one safetensors header. Raises UserError on a truncated or corrupt file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size - 8:
                raise UserError(f"{path}: truncated safetensors file (header says {n} bytes)")
            header = json.loads(fh.read(n))
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: corrupt safetensors header ({err.__class__.__name__})") from err
    entries = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        if 8 + n + end > size:
            raise UserError(f"{path}: tensor {name} extends past the end of the file (truncated?)")
        entries[name] = TensorEntry(path, meta["dtype"], tuple(meta["shape"]), 8 + n + start,
                                    8 + n + end)
    return entries


def directory_entries(directory: Path) -> dict[str, TensorEntry]:
    """All tensors of a HF checkpoint directory, single-file or sharded."""
    index = directory / INDEX_NAME
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        entries: dict[str, TensorEntry] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = directory / shard
            if not shard_path.exists():
                raise UserError(f"{index}: shard {shard} is missing")
            entries.update(read_header(shard_path))
        return entries
    single = directory / SINGLE_NAME
    if single.exists():
        return read_header(single)
    raise UserError(f"{directory}: no {SINGLE_NAME} or {INDEX_NAME} (only safetensors is read)")


class SafetensorsReader:
    """Read tensors by name from a checkpoint directory, one ``pread`` per tensor."""

    def __init__(self, entries: dict[str, TensorEntry]):
        self.entries = entries
        self._raw = bytearray()  # reused for dtypes that need decoding

    def read(self, name: str) -> np.ndarray:
        """One tensor as float32 numpy, shape as on disk. Cost: one read of its bytes and, for
        other dtypes than float32, one decoding pass; memory: the output plus the raw buffer."""
        entry = self.entries[name]
        if entry.dtype not in _DECODE:
            raise UserError(f"{entry.file}: tensor {name} has dtype {entry.dtype}; readable:"
                            f" {', '.join(_DECODE)}")
        stored, convert = _DECODE[entry.dtype]
        size = entry.end - entry.start
        if convert is None:
            out = np.empty(entry.shape, dtype=np.float32)
            self._pread(entry, name, memoryview(out).cast("B"))
            return out
        if len(self._raw) < size:
            self._raw = bytearray(size)
        view = memoryview(self._raw)[:size]
        self._pread(entry, name, view)
        return convert(np.frombuffer(view, dtype=stored).reshape(entry.shape))

    @staticmethod
    def _pread(entry: TensorEntry, name: str, into: memoryview) -> None:
        fd = os.open(entry.file, os.O_RDONLY)
        try:
            n = os.preadv(fd, [into], entry.start)
        finally:
            os.close(fd)
        if n != len(into):
            raise UserError(f"{entry.file}: tensor {name} is truncated")
