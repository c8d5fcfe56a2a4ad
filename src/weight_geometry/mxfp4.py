"""MXFP4 weights as gpt-oss's checkpoints store them (``*_blocks`` + ``*_scales``), decoded with
numpy.

MXFP4 (the OCP microscaling format) stores a weight ``W`` of shape ``(..., rows, cols)`` as

- ``scales``: uint8 ``(..., rows, cols / 32)``, one E8M0 exponent ``s`` per group of 32
  consecutive values of a row: the group's scale is ``2^(s - 127)``;
- ``blocks``: uint8 ``(..., rows, cols / 32, 16)``, the group's 32 FP4 (E2M1) codes, two per
  byte: value ``2j`` of the group in the low nibble of byte ``j``, value ``2j + 1`` in the high
  one (transformers' ``integrations/mxfp4.py`` and OpenAI's reference decode them so).

``W[..., r, 32 g + i] = FP4[code_i] * 2^(s[..., r, g] - 127)`` with ``FP4`` the sixteen E2M1
values ``±{0, 0.5, 1, 1.5, 2, 3, 4, 6}`` (bit 3 of the code is the sign). gpt-oss publishes its
experts so: ``mlp.experts.gate_up_proj_blocks`` ``(E, 2 d_ff, d / 32, 16)`` decodes to the
``(E, 2 d_ff, d)`` weight in ``(out, in)`` orientation, its rows gate and up interleaved, and
``down_proj_blocks`` ``(E, d, d_ff / 32, 16)`` to ``(E, d, d_ff)``. (ggml's MXFP4 type, in GGUF
files, holds the same values in another byte layout; the ``gguf`` package decodes that one.)
"""

from __future__ import annotations

import numpy as np

#: Values per scale group, and bytes of codes per group.
GROUP = 32
GROUP_BYTES = GROUP // 2
#: The E2M1 value of each 4-bit code.
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32)
#: ``2^(s - 127)`` for each exponent byte ``s``, in float32 (``s = 0`` is ``2^-127``, a float32
#: subnormal); ``s = 255`` is E8M0's NaN, which makes its whole group NaN (the OCP MX spec),
#: refused by the checkpoint reader as non-finite. (transformers' ``ldexp`` by 128 gives inf
#: instead, and 0 for a zero code.)
SCALES = np.append(np.ldexp(1.0, np.arange(255) - 127), np.nan).astype(np.float32)
#: Both values of each code byte (low nibble first) as one 8-byte word: one gather per byte
#: decodes two values (twice as fast as gathering the nibbles apart).
_BYTE_PAIRS = np.stack([FP4_VALUES[np.arange(256) & 0x0F], FP4_VALUES[np.arange(256) >> 4]],
                       axis=1).view(np.uint64).ravel()
#: Groups decoded at a time (a 128 KiB slice of the output, which stays in cache while it is
#: scaled); ~2x faster on a gpt-oss expert than chunks of 2^15 groups.
_CHUNK_GROUPS = 1 << 10


def decoded_shape(blocks_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The weight's shape ``(..., rows, cols)`` for blocks of shape ``(..., rows, cols / 32,
    16)``."""
    return (*blocks_shape[:-2], blocks_shape[-2] * GROUP)


def decode(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The float32 weight ``(..., rows, cols)`` of uint8 ``blocks`` ``(..., rows, G, 16)`` and
    ``scales`` ``(..., rows, G)`` (module doc), ``cols = 32 G``. Cost: one table lookup per
    code byte and one multiply per value, in chunks of :data:`_CHUNK_GROUPS` groups; memory:
    the output and a chunk's scale column."""
    if blocks.shape[-1] != GROUP_BYTES or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {blocks.shape} and scales {scales.shape} do not match"
                         f" (blocks (..., G, {GROUP_BYTES}), scales (..., G))")
    codes = blocks.reshape(-1, GROUP_BYTES)
    exponents = scales.reshape(-1)
    words = np.empty(codes.shape, dtype=np.uint64)  # a group's 16 bytes -> 16 value pairs
    values = words.view(np.float32)                   # (groups, 32)
    for first in range(0, codes.shape[0], _CHUNK_GROUPS):
        part = slice(first, first + _CHUNK_GROUPS)
        np.take(_BYTE_PAIRS, codes[part], out=words[part])
        with np.errstate(over="ignore"):  # 6 * 2^127 is inf, as transformers gives
            values[part] *= SCALES[exponents[part]][:, None]
    return values.reshape(decoded_shape(blocks.shape))
