"""Lazy GGUF reading: header parsed directly, tensors dequantized one at a time.

``gguf.GGUFReader`` builds views of every metadata array (about 2 s for a 49k-token vocabulary),
which is too slow for the Snakefile's parse-time inspection. This module parses the header with
``struct`` (scalar metadata kept, arrays skipped); a tensor's bytes are read with one ``pread``
and dequantized with ``gguf.quants.dequantize`` only when asked for, so peak memory is one
tensor and no pages of earlier tensors stay mapped.

GGUF stores dimensions innermost first (``ne[0]`` = columns); :class:`GGUFTensorInfo.shape` is
the Hugging Face ``(out, in)`` order, i.e. the reversed list.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError

_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                   10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Directory entry of one tensor: HF-order shape, ggml type id, byte range in the file."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    nbytes: int

    @property
    def type_name(self) -> str:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(self.ggml_type).name


class _Cursor:
    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise UserError(f"{self.path}: truncated GGUF header (needs {self.pos + size} bytes,"
                            f" file has {len(self.buf)})")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.unpack("<I"), self.unpack("<Q")
            if etype in _SCALAR_FORMATS:  # fixed size: skip in one step
                self.pos += count * struct.calcsize(_SCALAR_FORMATS[etype])
            else:
                for _ in range(count):
                    self.value(etype)
            return None  # arrays (vocabularies, merges) are not needed here
        raise UserError(f"{self.path}: unknown GGUF metadata type {vtype}")


class GGUFFile:
    """A GGUF file opened lazily: ``metadata`` (scalars), ``tensors`` (directory), ``read``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as fh:
            mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        view = memoryview(mapped)
        try:
            self._parse(_Cursor(view, self.path), len(mapped))
        finally:
            view.release()
            mapped.close()

    def _parse(self, cur: _Cursor, file_size: int) -> None:
        if file_size < 24 or bytes(cur.buf[:4]) != b"GGUF":
            raise UserError(f"{self.path}: not a GGUF file (magic bytes differ)")
        cur.pos = 4
        version = cur.unpack("<I")
        if version < 2:
            raise UserError(f"{self.path}: GGUF version {version} is not supported (need >= 2)")
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        self.metadata: dict[str, object] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.unpack("<I"))
        raw_infos = []
        for _ in range(n_tensors):
            name = cur.string()
            ne = [cur.unpack("<Q") for _ in range(cur.unpack("<I"))]
            raw_infos.append((name, ne, cur.unpack("<I"), cur.unpack("<Q")))
        align = int(self.metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
        data_start = -(-cur.pos // align) * align
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, ne, ggml_type, rel in raw_infos:
            info = GGUFTensorInfo(name, tuple(reversed(ne)), ggml_type, data_start + rel,
                                  _tensor_nbytes(ne, ggml_type))
            if info.offset + info.nbytes > file_size:
                raise UserError(f"{self.path}: tensor {name} extends past the end of the file"
                                " (truncated download?)")
            self.tensors[name] = info

    def read(self, name: str) -> np.ndarray:
        """Dequantize one tensor to a float32 array of HF shape. Cost: one pass over its bytes."""
        from gguf.quants import dequantize

        info = self.tensors[name]
        with open(self.path, "rb") as fh:
            raw = np.frombuffer(os.pread(fh.fileno(), info.nbytes, info.offset), dtype=np.uint8)
        rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
        values = dequantize(raw.reshape(rows, -1), info.ggml_type)
        return np.asarray(values, dtype=np.float32).reshape(info.shape)


def _tensor_nbytes(ne: list[int], ggml_type: int) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    return int(np.prod(ne)) // block * type_size
