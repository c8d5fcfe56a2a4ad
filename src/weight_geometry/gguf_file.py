"""Lazy GGUF reading: header parsed directly, tensors dequantized one at a time.

``gguf.GGUFReader`` builds views of every metadata array (about 2 s for a 49k-token vocabulary),
which is too slow for the Snakefile's parse-time inspection. This module parses the header with
``struct`` (scalar metadata and short numeric arrays kept, the rest skipped); a tensor's
bytes are read with one ``pread`` and dequantized with ``gguf.quants.dequantize`` only when
asked for, so peak memory is one tensor and no pages of earlier tensors stay mapped.

GGUF stores dimensions innermost first (``ne[0]`` = columns); :class:`GGUFTensorInfo.shape` is
the Hugging Face ``(out, in)`` order, i.e. the reversed list.

A model split by llama.cpp's ``llama-gguf-split`` (or ``GGUFWriter(split_max_tensors=...)``) is
read by :class:`GGUFModel`: the first part holds the model's metadata, every part some of the
tensors, and each tensor is read from the part holding it.
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError

_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                   10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4  # GGML_MAX_DIMS
#: Least bytes of a string (its length) and of an array (element type and count) in an array.
_MIN_ITEM_BYTES = {_STRING: 8, _ARRAY: 12}
#: What a header may claim, refused before anything of that size is copied or looped over (a
#: crafted header could ask for tens of GiB). Far above real files: keys and tensor names are
#: tens of bytes; the longest strings are chat templates and, rarely, an embedded
#: tokenizer.json of a few MB; the longest arrays vocabularies and merges of a few hundred
#: thousand items; the most tensors a few thousand.
MAX_KEY_BYTES = 1 << 16
MAX_STRING_BYTES = 1 << 26
MAX_ARRAY_ITEMS = 1 << 24
MAX_ENTRIES = 1 << 20  # metadata entries, and tensors
#: Numeric arrays up to this length are kept, as tuples (per-layer values such as
#: ``{arch}.attention.sliding_window_pattern``); longer ones (token types) are skipped.
MAX_KEPT_ARRAY = 4096
_CRAFTED = "; a crafted or corrupt file?"


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Directory entry of one tensor (the directory is keyed by its name): HF-order shape,
    ggml type id, byte range in the file."""

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

    def need(self, size: int) -> None:
        """A UserError unless ``size`` more bytes follow (a truncated header)."""
        if self.pos + size > len(self.buf):
            raise UserError(f"{self.path}: truncated GGUF header (needs {self.pos + size} bytes,"
                            f" file has {len(self.buf)})")

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        self.need(size)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self, what: str, limit: int) -> str:
        """A length-prefixed string of at most ``limit`` bytes (``what`` names it in errors),
        refused before it is copied."""
        n = self.unpack("<Q")
        if n > limit:
            raise UserError(f"{self.path}: {what}: a string of {n} bytes (allowed: at most"
                            f" {limit}{_CRAFTED})")
        self.need(n)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, key: str):
        if vtype in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[vtype])
        if vtype == _STRING:
            return self.string(f"GGUF metadata {key}", MAX_STRING_BYTES)
        if vtype == _ARRAY:
            etype, count = self.unpack("<I"), self.unpack("<Q")
            if count > MAX_ARRAY_ITEMS:
                raise UserError(f"{self.path}: GGUF metadata {key}: an array of {count} items"
                                f" (allowed: at most {MAX_ARRAY_ITEMS}{_CRAFTED})")
            if etype in _SCALAR_FORMATS:  # fixed size: skip in one step, or keep a short one
                fmt = _SCALAR_FORMATS[etype]
                size = count * struct.calcsize(fmt)
                self.need(size)
                kept = (struct.unpack_from(f"<{count}{fmt[1]}", self.buf, self.pos)
                        if count <= MAX_KEPT_ARRAY else None)
                self.pos += size
                return kept
            else:
                self.need(count * _MIN_ITEM_BYTES.get(etype, 0))  # before looping over them
                for _ in range(count):
                    self.value(etype, key)
            return None  # arrays of strings (vocabularies, merges) are not needed here
        raise UserError(f"{self.path}: unknown GGUF metadata type {vtype}")


class GGUFFile:
    """A GGUF file opened lazily: ``metadata`` (scalars; numeric arrays of at most
    :data:`MAX_KEPT_ARRAY` items as tuples, other arrays None), ``tensors`` (directory),
    ``read``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as fh:
                if os.fstat(fh.fileno()).st_size == 0:  # mmap refuses an empty file
                    raise UserError(f"{self.path}: empty file (0 bytes), not a GGUF file")
                mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as err:
            raise UserError(f"{self.path}: cannot read the file ({err.strerror})") from None
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
        for count, what in ((n_tensors, "tensors"), (n_kv, "metadata entries")):
            if count > MAX_ENTRIES:
                raise UserError(f"{self.path}: GGUF header: {count} {what} (allowed: at most"
                                f" {MAX_ENTRIES}{_CRAFTED})")
        self.metadata: dict[str, object] = {}
        for i in range(n_kv):
            key = cur.string(f"GGUF metadata key {i + 1}", MAX_KEY_BYTES)
            self.metadata[key] = cur.value(cur.unpack("<I"), key)
        raw_infos = []
        for i in range(n_tensors):
            name = cur.string(f"GGUF tensor name {i + 1}", MAX_KEY_BYTES)
            n_dims = cur.unpack("<I")
            if n_dims > _MAX_DIMS:
                raise UserError(f"{self.path}: tensor {name} has {n_dims} dimensions (allowed:"
                                f" at most {_MAX_DIMS})")
            ne = [cur.unpack("<Q") for _ in range(n_dims)]
            raw_infos.append((name, ne, cur.unpack("<I"), cur.unpack("<Q")))
        align = self.metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        if type(align) is not int or align < 1 or align & (align - 1):
            raise UserError(f"{self.path}: GGUF metadata general.alignment: {align!r} is not"
                            " allowed (a power of two, e.g. 32)")
        data_start = -(-cur.pos // align) * align
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, ne, ggml_type, rel in raw_infos:
            if name in self.tensors:
                raise UserError(f"{self.path}: tensor {name} appears twice in the tensor"
                                " directory")
            self._check_type(name, ne, ggml_type)
            info = GGUFTensorInfo(tuple(reversed(ne)), ggml_type, data_start + rel,
                                  _tensor_nbytes(ne, ggml_type))
            if info.offset + info.nbytes > file_size:
                raise UserError(f"{self.path}: tensor {name} extends past the end of the file"
                                " (truncated download?)")
            self.tensors[name] = info

    def _check_type(self, name: str, ne: list[int], ggml_type: int) -> None:
        """The type id is a ggml type the installed ``gguf`` knows, and the row length (``ne[0]``)
        a whole number of its blocks."""
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        try:
            qtype = GGMLQuantizationType(ggml_type)
        except ValueError:
            qtype = None
        if qtype not in GGML_QUANT_SIZES:
            raise UserError(f"{self.path}: tensor {name} has ggml type id {ggml_type}, not a"
                            f" known GGML quantization type (known ids:"
                            f" {_id_ranges(int(t) for t in GGML_QUANT_SIZES)})")
        block = GGML_QUANT_SIZES[qtype][0]
        if ne and ne[0] % block:
            raise UserError(f"{self.path}: tensor {name} has rows of {ne[0]} values, not a"
                            f" multiple of the {qtype.name} block size {block}")

    def check_readable(self, name: str) -> None:
        """UserError unless the installed ``gguf`` can dequantize tensor ``name``'s type."""
        info = self.tensors[name]
        if not _dequantizable(info.ggml_type):
            supported = ", ".join(t.name for t in _known_types() if _dequantizable(int(t)))
            raise UserError(f"{self.path}: tensor {name} is stored as {info.type_name}, which"
                            f" the installed gguf package cannot dequantize (supported:"
                            f" {supported})")

    def read(self, name: str, index: int | None = None) -> np.ndarray:
        """Dequantize one tensor to a float32 array of HF shape; with ``index``, only its slice
        ``[index]`` along the first (outermost) axis: one expert ``(out, in)`` of a 3-D expert
        tensor ``(E, out, in)``. Quantization blocks run along rows (``ne[0]``), so slice ``e``
        is the contiguous byte range ``[e * nbytes / E, (e + 1) * nbytes / E)``, read alone.
        Cost: one ``pread`` and one dequantizing pass over those bytes; memory: them and the
        float32 output."""
        from gguf.quants import dequantize

        self.check_readable(name)
        info = self.tensors[name]
        shape, offset, nbytes = info.shape, info.offset, info.nbytes
        if index is not None:
            shape, nbytes = shape[1:], nbytes // shape[0]
            offset += index * nbytes
        with open(self.path, "rb") as fh:
            raw = np.frombuffer(os.pread(fh.fileno(), nbytes, offset), dtype=np.uint8)
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        # Corrupt scales decode to inf/NaN (numpy would warn): the caller's finiteness check
        # names the tensor in one line instead.
        with np.errstate(invalid="ignore", over="ignore"):
            values = dequantize(raw.reshape(rows, -1), info.ggml_type)
        return np.asarray(values, dtype=np.float32).reshape(shape)


#: llama.cpp's names of a split model's parts (``llama_split_path``: ``%s-%05d-of-%05d.gguf``):
#: the prefix, the part's number from 1, and the number of parts.
SPLIT_NAME = re.compile(r"(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf")
SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")


class GGUFModel:
    """A GGUF model in one file, or split in ``split.count`` parts as llama.cpp's
    ``llama-gguf-split`` writes them, opened lazily from its (first) file.

    ``metadata`` is the first part's (the model's; the others hold only ``split.*`` keys),
    ``tensors`` the directory of all parts, ``files`` each tensor's part. Like llama.cpp's
    loader, the model is opened from its first part (``split.no`` = 0), the others are found
    by their names (``PREFIX-0000i-of-0000N.gguf``), each must say it is part ``i`` of ``N``,
    a tensor may appear in one part only, and their tensors together must number
    ``split.tensors.count``; each violation is a one-line UserError naming the part. Cost:
    every part's header parsed; tensor data is read only by :meth:`read`, one tensor at a time.
    """

    def __init__(self, path: str | Path):
        first = GGUFFile(path)
        self.path = first.path
        self.metadata = first.metadata
        count = _split_value(first, "split.count", 1)
        parts = [first]
        if count > 1:
            parts += [self._part(first, i, count) for i in self._other_parts(first, count)]
        self.tensors: dict[str, GGUFTensorInfo] = {}
        self.files: dict[str, Path] = {}
        self._parts: dict[str, GGUFFile] = {}
        for part in parts:
            for name, info in part.tensors.items():
                if name in self._parts:
                    raise UserError(f"{part.path}: tensor {name} is also in"
                                    f" {self._parts[name].path} (allowed: each tensor in one"
                                    " part of a split GGUF)")
                self.tensors[name], self.files[name], self._parts[name] = info, part.path, part
        if count > 1:
            expected = _split_value(first, "split.tensors.count", len(self.tensors))
            if expected != len(self.tensors):
                raise UserError(f"{self.path}: the {count} parts of this split GGUF hold"
                                f" {len(self.tensors)} tensors, its GGUF metadata"
                                f" split.tensors.count says {expected} (a part truncated or"
                                " from another model?)")

    @staticmethod
    def _other_parts(first: GGUFFile, count: int) -> range:
        """Parts 1 .. count - 1 (numbered from 0), after checking that ``first`` is part 0 and
        named as llama.cpp names the parts, so that theirs follow from it."""
        number = _split_value(first, "split.no", 0)
        match = SPLIT_NAME.fullmatch(first.path.name)
        if number != 0:
            name = (f"{match['prefix']}-00001-of-{count:05d}.gguf" if match
                    else "the part with split.no = 0")
            raise UserError(f"{first.path}: part {number + 1} of a split GGUF (GGUF metadata"
                            f" split.no = {number}, split.count = {count}); open the model by"
                            f" its first part, {name} (allowed: a .gguf file, or the first part"
                            " of a split one)")
        if not match or int(match["no"]) != 1 or int(match["count"]) != count:
            raise UserError(f"{first.path}: the first part of a split GGUF (GGUF metadata"
                            f" split.count = {count}) whose name does not end in -00001-of-"
                            f"{count:05d}.gguf, so its other parts cannot be found (allowed:"
                            " llama.cpp's part names, PREFIX-00001-of-"
                            f"{count:05d}.gguf ... PREFIX-{count:05d}-of-{count:05d}.gguf)")
        return range(1, count)

    @staticmethod
    def _part(first: GGUFFile, number: int, count: int) -> GGUFFile:
        """Part ``number`` (from 0), checked to say so."""
        prefix = SPLIT_NAME.fullmatch(first.path.name)["prefix"]
        path = first.path.with_name(f"{prefix}-{number + 1:05d}-of-{count:05d}.gguf")
        if not path.exists():
            raise UserError(f"{first.path}: part {number + 1} of this split GGUF ({count}"
                            f" parts), {path}, does not exist (allowed: all {count} parts side"
                            " by side)")
        part = GGUFFile(path)
        found = [part.metadata.get(key, "absent") for key in ("split.no", "split.count")]
        if found != [number, count]:
            raise UserError(f"{path}: GGUF metadata split.no = {found[0]}, split.count ="
                            f" {found[1]}; as part {number + 1} of {first.path.name} it must say"
                            f" split.no = {number}, split.count = {count} (a part of another"
                            " split?)")
        return part

    def check_readable(self, name: str) -> None:
        """UserError unless the installed ``gguf`` can dequantize tensor ``name``'s type."""
        self._parts[name].check_readable(name)

    def read(self, name: str, index: int | None = None) -> np.ndarray:
        """Tensor ``name`` (its slice ``[index]``) from the part holding it (see
        :meth:`GGUFFile.read`)."""
        return self._parts[name].read(name, index)


def _split_value(gguf: GGUFFile, key: str, default: int) -> int:
    """A ``split.*`` metadata value: an integer >= 0 (>= 1 for the counts), ``default`` when
    absent; a one-line UserError naming the file and key otherwise."""
    value = gguf.metadata.get(key, default)
    least = 0 if key == "split.no" else 1
    if type(value) is not int or value < least:
        raise UserError(f"{gguf.path}: GGUF metadata {key}: {value!r} is not allowed (an"
                        f" integer >= {least})")
    return value


def _tensor_nbytes(ne: list[int], ggml_type: int) -> int:
    """Bytes of a tensor of a validated type (Python integers: no overflow on bad headers)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    return math.prod(ne) // block * type_size


def _known_types():
    from gguf.constants import GGML_QUANT_SIZES

    return sorted(GGML_QUANT_SIZES, key=int)


@functools.cache
def _dequantizable(ggml_type: int) -> bool:
    """Whether ``gguf.quants.dequantize`` handles the type (tried on one block of zeros)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType(ggml_type)
    try:
        dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _id_ranges(ids) -> str:
    """``0-3, 6-30, 34`` from integers."""
    ids, runs = sorted(ids), []
    for i in ids:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
