"""Lazy safetensors reading, single file or sharded (``model.safetensors.index.json``).

The tensor directory comes from each file's JSON header (8-byte length + JSON), so inspecting a
checkpoint costs a few kilobytes of I/O and no torch import. A tensor is read with ``pread`` of
its byte range and converted to float32: no memory map, so pages of tensors read earlier do not
stay mapped into the process (its RSS stays near one tensor, not the file).
Float32 tensors are read straight into their output array; other dtypes chunk by chunk (at most
``READ_CHUNK`` bytes) into a small buffer, each chunk decoded straight into its slice of the
output, so a read holds the float32 output plus one chunk. Reads share no mutable state: one
reader may be used from several threads at once.
Block-scaled FP8 weights (F8_E4M3 with a ``NAME_scale_inv`` per block, :func:`pair_block_fp8`)
are read whole and dequantized; MXFP4 pairs (``NAME_blocks`` + ``NAME_scales``) likewise.
Stored bytes are little-endian, as the format specifies (and as the host is assumed to be)."""

from __future__ import annotations

import errno
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import mxfp4
from .errors import UserError

#: The dtype of a tensor read from a pair of MXFP4 ``NAME_blocks`` + ``NAME_scales`` uint8
#: tensors (:func:`pair_mxfp4`): its entry is ``NAME_blocks``, of the decoded shape.
MXFP4 = "MXFP4"

#: Block-scaled FP8 (DeepSeek-V3, MiniMax-M2, GLM-4.5-FP8): an F8_E4M3 weight whose
#: ``NAME_scale_inv`` holds one float per ``(b0, b1)`` block (:func:`pair_block_fp8`); the
#: weight is ``fp8 value * scale_inv[i // b0, j // b1]``.
FP8_SCALE = "_scale_inv"
#: Block size when ``quantization_config.weight_block_size`` is absent (the published ones).
FP8_BLOCK = (128, 128)


def _e4m3_values() -> np.ndarray:
    """The 256 float32 values of float8 e4m3fn bytes: sign, 4 exponent bits (bias 7), 3
    mantissa bits; exponent 0 subnormal; ``S.1111.111`` NaN (no infinities)."""
    code = np.arange(256)
    sign = np.where(code >> 7, -1.0, 1.0)
    exp, man = (code >> 3) & 15, code & 7
    values = sign * np.where(exp == 0, man / 8 * 2.0 ** -6, (1 + man / 8) * 2.0 ** (exp - 7))
    values[(exp == 15) & (man == 7)] = np.nan
    return values.astype(np.float32)


_E4M3 = _e4m3_values()

#: safetensors dtype codes -> readable names (as torch spells them).
DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
               "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "U8": "uint8",
               MXFP4: "mxfp4"}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
#: Longest safetensors header read: the format's own limit (the ``safetensors`` package refuses
#: longer ones), checked before anything of the length a header claims is read.
MAX_HEADER_BYTES = 100_000_000
#: Largest JSON file (config.json, a shard index) read whole; real ones are a few MB at most.
MAX_JSON_BYTES = 100_000_000


#: Most stored bytes read and decoded at a time for dtypes other than float32, hence the
#: temporary memory of a read beyond its float32 output. 1-4 MiB read bf16 MLP matrices fastest
#: (the chunk and its output slice stay in cache); 16 MiB was ~20% slower, 32 MiB ~75%.
READ_CHUNK = 4 << 20


def _decode_bf16(raw: np.ndarray, out: np.ndarray) -> None:
    """bf16 bits are the high 16 bits of the float32 of the same value: shift them up into
    ``out`` viewed as uint32. One pass, no temporaries (numpy widens uint16 in small buffers);
    ~30% faster than zeroing the low uint16 halves of ``out`` and then writing the high ones."""
    np.left_shift(raw, 16, out=out.view(np.uint32), dtype=np.uint32)


def _decode_cast(raw: np.ndarray, out: np.ndarray) -> None:
    np.copyto(out, raw)


#: safetensors dtype code -> (numpy dtype of the stored bytes, how to decode a flat chunk into
#: its float32 slice of the output; None: stored as float32, read straight into the output).
_DECODE = {
    "F64": (np.float64, _decode_cast), "F32": (np.float32, None),
    "F16": (np.float16, _decode_cast), "BF16": (np.uint16, _decode_bf16),
}


def _pread_exact(fd: int, into: memoryview, offset: int, entry: TensorEntry,
                 name: str) -> None:
    """Fill ``into`` from ``offset`` (one ``preadv`` unless the kernel returns less, as Linux
    does past 2 GiB); a file that ends first is a truncated tensor (one-line UserError)."""
    done = 0
    while done < len(into):
        n = os.preadv(fd, [into[done:]], offset + done)
        if n == 0:
            raise UserError(f"{entry.file}: tensor {name} is truncated")
        done += n


@dataclass(frozen=True)
class TensorEntry:
    """Where a tensor lives and what it is: file, dtype string, HF shape, absolute byte range."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int
    #: An :data:`MXFP4` tensor's scales (its own entry holds the blocks), or a block-FP8
    #: weight's ``scale_inv`` (:func:`pair_block_fp8`).
    scales: TensorEntry | None = None
    #: A block-FP8 weight's block size ``(b0, b1)``.
    block: tuple[int, int] | None = None


def _show(value) -> str:
    """``value`` as JSON, cut to 80 characters (for an error message)."""
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _parse_json_object(raw: bytes, path: Path, what: str) -> dict:
    """``raw`` (``what`` of ``path``: the file, or a part of it) parsed as a JSON object; a
    one-line UserError naming ``path`` when it is not JSON, or JSON but not an object."""
    try:
        value = json.loads(raw)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise UserError(f"{path}: {what} is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: {what} is {_show(value)}, not a JSON object ({{...}})")
    return value


def read_json_object(path: Path) -> dict:
    """A JSON file holding an object (config.json, an index); one-line UserError otherwise,
    also when it cannot be read (a directory, no permission)."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > MAX_JSON_BYTES:
                raise UserError(f"{path}: {size} bytes (allowed: at most {MAX_JSON_BYTES} for a"
                                " JSON file; a crafted or corrupt file?)")
            raw = fh.read()
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({err.strerror})") from None
    return _parse_json_object(raw, path, "the file")


def _is_sizes(value, length: int | None = None) -> bool:
    """A JSON list of integers >= 0 (of ``length`` items when given)."""
    return (isinstance(value, list) and length in (None, len(value))
            and all(type(v) is int and v >= 0 for v in value))


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse one safetensors header: 8-byte length, then a JSON object mapping each tensor name
    to its dtype, shape and data_offsets [start, end] (bytes after the header). Raises a
    one-line UserError on an unreadable, truncated or corrupt file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            if size < 8:
                raise UserError(f"{path}: file is {size} bytes, shorter than the 8-byte header"
                                " length (truncated, or not a safetensors file)")
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > MAX_HEADER_BYTES:
                raise UserError(f"{path}: the safetensors header is {n} bytes long (allowed: at"
                                f" most {MAX_HEADER_BYTES}, the format's own limit; a crafted or"
                                " corrupt file?)")
            if n > size - 8:
                raise UserError(f"{path}: truncated safetensors file (header says {n} bytes)")
            header = _parse_json_object(fh.read(n), path, "the safetensors header")
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({err.strerror})") from None
    entries = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(meta, dict) and isinstance(meta.get("dtype"), str)
                and _is_sizes(meta.get("shape")) and _is_sizes(meta.get("data_offsets"), 2)
                and meta["data_offsets"][0] <= meta["data_offsets"][1]):
            raise UserError(f"{path}: corrupt safetensors header: tensor {name} is"
                            f" {_show(meta)} (allowed: {{\"dtype\": ..., \"shape\": [...],"
                            f" \"data_offsets\": [start, end]}})")
        start, end = meta["data_offsets"]
        if 8 + n + end > size:
            raise UserError(f"{path}: tensor {name} extends past the end of the file (truncated?)")
        entries[name] = TensorEntry(path, meta["dtype"], tuple(meta["shape"]), 8 + n + start,
                                    8 + n + end)
    return entries


def read_weight_map(index: Path) -> dict[str, str]:
    """A sharded checkpoint's index's ``weight_map``: tensor name -> shard file name; one-line
    UserError when the index is not a JSON object with a ``weight_map`` object of file names,
    or names a shard outside the index's directory (see :func:`_check_shard_name`)."""
    content = read_json_object(index)
    weight_map = content.get("weight_map")
    if not (isinstance(weight_map, dict) and weight_map
            and all(isinstance(f, str) and f for f in weight_map.values())):
        shown = _show(weight_map) if "weight_map" in content else "missing"
        raise UserError(f"{index}: weight_map is {shown} (allowed: an object mapping tensor"
                        " names to shard file names)")
    for name, shard in weight_map.items():
        _check_shard_name(index, name, shard)
    return weight_map


def _check_shard_name(index: Path, name: str, shard: str) -> None:
    """``shard`` (the weight_map's entry for tensor ``name``) is a relative path inside the
    index's directory: no ``..`` part, not absolute, not the directory itself. Checked on the
    name, not on the resolved path: a Hugging Face cache's shards are symlinks into its
    ``blobs/``, outside the snapshot directory."""
    parts = shard.split("/")
    if shard.startswith("/") or ".." in parts or not any(p not in ("", ".") for p in parts):
        raise UserError(f"{index}: weight_map entry {name} names shard {shard!r}, which is not a"
                        f" file name inside the checkpoint directory {index.parent} (allowed: a"
                        " path relative to it, without '..')")


def shard_names(index: Path) -> list[str]:
    """The shard files named by a sharded checkpoint's index (its ``weight_map`` values),
    sorted (see :func:`read_weight_map`)."""
    return sorted(set(read_weight_map(index).values()))


def _sharded_entries(directory: Path, index: Path) -> dict[str, TensorEntry]:
    """The tensors the index's ``weight_map`` lists, each from the shard it names (a copy in
    another shard is not read); one-line UserError for a missing shard, or a shard without a
    tensor the map puts in it."""
    weight_map = read_weight_map(index)
    headers = {}
    for shard in sorted(set(weight_map.values())):
        refuse_broken_symlink(directory / shard)
        if not (directory / shard).exists():
            raise UserError(f"{index}: shard {shard} is missing")
        headers[shard] = read_header(directory / shard)
    entries = {}
    for name, shard in weight_map.items():
        if name not in headers[shard]:
            raise UserError(f"{index}: weight_map puts tensor {name} in {shard}, which has no"
                            " such tensor (an index of another checkpoint?)")
        entries[name] = headers[shard][name]
    return entries


def pair_mxfp4(entries: dict[str, TensorEntry]) -> dict[str, TensorEntry]:
    """``entries`` with each MXFP4 pair (gpt-oss's experts: uint8 ``NAME_blocks`` ``(..., G,
    16)`` and ``NAME_scales`` ``(..., G)``, :mod:`mxfp4`) as one :data:`MXFP4` entry
    ``NAME_blocks`` of the decoded shape ``(..., 32 G)`` holding both (the scales possibly in
    another shard); anything else as it is."""
    out = dict(entries)
    for name, blocks in entries.items():
        scales = entries.get(name.removesuffix("_blocks") + "_scales")
        if (name.endswith("_blocks") and scales is not None and blocks.dtype == "U8"
                and scales.dtype == "U8" and len(blocks.shape) >= 2
                and blocks.shape[-1] == mxfp4.GROUP_BYTES
                and blocks.shape[:-1] == scales.shape):
            out[name] = TensorEntry(blocks.file, MXFP4, mxfp4.decoded_shape(blocks.shape),
                                    blocks.start, blocks.end, scales)
            del out[name.removesuffix("_blocks") + "_scales"]
    return out


def pair_block_fp8(entries: dict[str, TensorEntry], block: tuple[int, int] = FP8_BLOCK
                   ) -> dict[str, TensorEntry]:
    """``entries`` with each 2-D F8_E4M3 weight ``(n0, n1)`` that has a ``NAME_scale_inv``
    ``(ceil(n0 / b0), ceil(n1 / b1))`` (F32, BF16 or F16) holding it and its block size (the
    scale entry dropped); anything else as it is. A scale of another shape is a one-line
    UserError naming both tensors and the shape ``block`` implies."""
    out = dict(entries)
    for name, weight in entries.items():
        scale = entries.get(name + FP8_SCALE)
        if weight.dtype != "F8_E4M3" or scale is None or len(weight.shape) != 2:
            continue
        expected = tuple(-(-n // b) for n, b in zip(weight.shape, block, strict=True))
        if scale.shape != expected or scale.dtype not in ("F32", "BF16", "F16"):
            raise UserError(f"{scale.file}: tensor {name}{FP8_SCALE} is {scale.dtype}"
                            f" {list(scale.shape)}; the FP8 weight {name} {list(weight.shape)}"
                            f" in blocks of {list(block)} needs F32/BF16/F16 {list(expected)}"
                            " (quantization_config.weight_block_size says the block)")
        out[name] = TensorEntry(weight.file, weight.dtype, weight.shape, weight.start,
                                weight.end, scale, block)
        del out[name + FP8_SCALE]
    return out


def fp8_block_size(config: dict) -> tuple[int, int]:
    """``quantization_config.weight_block_size`` of a ``config.json`` (two integers >= 1),
    else :data:`FP8_BLOCK`; a one-line UserError naming the key for another value."""
    quant = config.get("quantization_config")
    block = quant.get("weight_block_size") if isinstance(quant, dict) else None
    if block is None:
        return FP8_BLOCK
    if not (_is_sizes(block, 2) and min(block) >= 1):
        raise UserError(f"quantization_config.weight_block_size: {_show(block)} is not allowed"
                        " (two integers >= 1)")
    return tuple(block)


def directory_entries(directory: Path) -> dict[str, TensorEntry]:
    """All tensors of a HF checkpoint directory, single-file or sharded (those its index
    lists, from the shards it names); MXFP4 pairs as one entry (:func:`pair_mxfp4`)."""
    index = directory / INDEX_NAME
    refuse_broken_symlink(index)
    if index.exists():
        return pair_mxfp4(_sharded_entries(directory, index))
    single = directory / SINGLE_NAME
    refuse_broken_symlink(single)
    if single.exists():
        return pair_mxfp4(read_header(single))
    raise UserError(f"{directory}: no {SINGLE_NAME} or {INDEX_NAME} (only safetensors is read)")


def refuse_broken_symlink(path: Path) -> None:
    """A one-line UserError when ``path`` is a symlink that leads nowhere: a loop, or a target
    that does not exist (``Path.exists`` says False for both, as for a missing file)."""
    if not path.is_symlink():
        return
    try:
        path.stat()
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UserError(f"{path}: a symlink loop (allowed: a file, or a symlink to one)"
                            ) from None
        if err.errno == errno.ENOENT:
            raise UserError(f"{path}: a symlink to {os.readlink(path)}, which does not exist"
                            ) from None
        raise UserError(f"{path}: cannot be read ({err.strerror})") from None


class SafetensorsReader:
    """Read tensors by name from a checkpoint directory as float32. Holds no buffers: each
    ``read`` opens the file and uses its own chunk buffer, so one reader is safe to use from
    several threads at once."""

    def __init__(self, entries: dict[str, TensorEntry]):
        self.entries = entries

    def check_readable(self, name: str) -> None:
        """UserError unless tensor ``name`` has a dtype this reader decodes (F64, F32, F16,
        BF16, or an :data:`MXFP4` pair) and byte ranges that fit its shape. Header only."""
        entry = self.entries[name]
        if entry.dtype == "F8_E4M3" and entry.scales is not None:
            self._check_fp8(name, entry)
            return
        if entry.dtype == MXFP4:
            for part, size in ((entry, math.prod(entry.shape) // 2),
                               (entry.scales, math.prod(entry.shape) // mxfp4.GROUP)):
                if part.end - part.start != size:
                    raise UserError(f"{part.file}: MXFP4 tensor {name} has"
                                    f" {part.end - part.start} bytes of"
                                    f" {'blocks' if part is entry else 'scales'}, not {size}"
                                    f" for shape {list(entry.shape)} (corrupt header)")
            return
        if entry.dtype not in _DECODE:
            raise UserError(f"{entry.file}: tensor {name} has dtype {entry.dtype}; readable:"
                            f" {', '.join(_DECODE)}, {MXFP4} (uint8 NAME_blocks with their"
                            f" NAME_scales), and 2-D F8_E4M3 with its NAME{FP8_SCALE}")
        itemsize = np.dtype(_DECODE[entry.dtype][0]).itemsize
        size = math.prod(entry.shape) * itemsize
        if entry.end - entry.start != size:
            raise UserError(f"{entry.file}: tensor {name} has {entry.end - entry.start} bytes,"
                            f" not {size} for shape {list(entry.shape)} {entry.dtype}"
                            " (corrupt header)")

    def read(self, name: str, index: int | None = None) -> np.ndarray:
        """One tensor as float32 numpy, shape as on disk; with ``index``, only its slice
        ``tensor[index]`` along the first axis (one expert of a fused ``(E, out, in)`` tensor:
        the bytes of that slice alone, C order making it contiguous). Cost: one read of those
        bytes (one ``preadv`` for float32, one per ``READ_CHUNK`` otherwise) and, for other
        dtypes than float32, one decoding pass; memory: the output plus, for other dtypes, one
        chunk of at most ``READ_CHUNK`` bytes. Thread-safe."""
        self.check_readable(name)
        entry = self.entries[name]
        if entry.dtype == MXFP4:
            return self._read_mxfp4(name, entry, index)
        if entry.scales is not None:
            return self._read_fp8(name, entry)
        stored, decode = _DECODE[entry.dtype]
        itemsize = np.dtype(stored).itemsize
        shape, start = tuple(entry.shape), entry.start
        if index is not None:
            shape = shape[1:]
            start += index * math.prod(shape) * itemsize
        out = np.empty(shape, dtype=np.float32)
        fd = os.open(entry.file, os.O_RDONLY)
        try:
            if decode is None:
                _pread_exact(fd, memoryview(out).cast("B"), start, entry, name)
                return out
            flat = out.reshape(-1)
            per_chunk = max(1, READ_CHUNK // itemsize)
            chunk = memoryview(bytearray(min(out.size, per_chunk) * itemsize))
            for first in range(0, out.size, per_chunk):
                count = min(per_chunk, out.size - first)
                into = chunk[:count * itemsize]
                _pread_exact(fd, into, start + first * itemsize, entry, name)
                decode(np.frombuffer(into, dtype=stored), flat[first:first + count])
            return out
        finally:
            os.close(fd)

    @staticmethod
    def _check_fp8(name: str, entry: TensorEntry) -> None:
        """A block-FP8 weight's and its scale's byte ranges fit their shapes (one byte per
        weight value; 4 or 2 per scale)."""
        scale = entry.scales
        for part, what, size in (
                (entry, name, math.prod(entry.shape)),
                (scale, name + FP8_SCALE, math.prod(scale.shape) * (4 if scale.dtype == "F32"
                                                                   else 2))):
            if part.end - part.start != size:
                raise UserError(f"{part.file}: tensor {what} has {part.end - part.start} bytes,"
                                f" not {size} for shape {list(part.shape)} {part.dtype}"
                                " (corrupt header)")

    @staticmethod
    def _read_fp8(name: str, entry: TensorEntry) -> np.ndarray:
        """A block-FP8 weight ``(n0, n1)`` as float32: each byte's e4m3fn value (a table of
        256) times its block's ``scale_inv``, one row block at a time. Cost: one read of
        ``n0 n1`` bytes and of the scales; memory: those bytes and the float32 output."""
        raw = np.empty(entry.shape, dtype=np.uint8)
        fd = os.open(entry.file, os.O_RDONLY)
        try:
            _pread_exact(fd, memoryview(raw).cast("B"), entry.start, entry, name)
        finally:
            os.close(fd)
        out = _E4M3[raw]
        del raw
        scale = SafetensorsReader({name + FP8_SCALE: entry.scales}).read(name + FP8_SCALE)
        (b0, b1), n1 = entry.block, entry.shape[1]
        for i, row in enumerate(scale):
            out[i * b0:(i + 1) * b0] *= np.repeat(row, b1)[:n1]
        return out

    @staticmethod
    def _read_mxfp4(name: str, entry: TensorEntry, index: int | None) -> np.ndarray:
        """An :data:`MXFP4` tensor (its slice ``[index]``: one expert), decoded to float32 by
        :func:`mxfp4.decode`. Cost: one read of the slice's blocks (half a byte per value) and
        scales (one byte per 32 values); memory: those bytes and the float32 output."""
        shape = entry.shape if index is None else entry.shape[1:]
        values = math.prod(shape)
        parts = []
        for part, per_value in ((entry, 2), (entry.scales, mxfp4.GROUP)):
            raw = np.empty(values // per_value, dtype=np.uint8)
            fd = os.open(part.file, os.O_RDONLY)
            try:
                _pread_exact(fd, memoryview(raw), part.start + (index or 0) * raw.size, part,
                             name)
            finally:
                os.close(fd)
            parts.append(raw)
        blocks = parts[0].reshape(*shape[:-1], shape[-1] // mxfp4.GROUP, mxfp4.GROUP_BYTES)
        return mxfp4.decode(blocks, parts[1].reshape(blocks.shape[:-1]))
