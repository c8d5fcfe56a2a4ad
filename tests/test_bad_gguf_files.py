"""Malformed GGUF files: each is one UserError line naming the file and the offending value.

The files are tiny (d = 16, two layers) and written with gguf's own ``GGUFWriter``; defects the
writer refuses to produce (an unknown tensor type id, a missing ``general.architecture``) are
patched into its output byte by byte.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line, error_line, run_snakemake

from weight_geometry.checkpoint import open_checkpoint
from weight_geometry.errors import UserError

GGUF_NAMES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
REQUIRED = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")


def write_gguf(path: Path, arch: str = "llama", *, d: int = 16, h: int = 2, n_kv: int = 2,
               d_ff: int = 8, n_layers: int = 2, drop: tuple[str, ...] = (),
               meta: dict | None = None, extra: dict | None = None,
               dtypes: dict | None = None) -> Path:
    """A complete tiny decoder GGUF. ``drop``: metadata keys (without ``{arch}.``) left out;
    ``meta``: key -> ``(GGUFWriter method name, value)`` written instead of the default uint32;
    ``extra``: more metadata, full key -> ``(GGUFWriter method name, value)``;
    ``dtypes``: tensor name -> numpy dtype (float32 otherwise)."""
    from gguf import GGUFWriter

    d_head = d // h
    values = {"block_count": n_layers, "embedding_length": d, "feed_forward_length": d_ff,
              "attention.head_count": h, "attention.head_count_kv": n_kv}
    meta, dtypes = meta or {}, dtypes or {}
    writer = GGUFWriter(str(path), arch)
    for key, value in values.items():
        if key in drop:
            continue
        method, value = meta.get(key, ("add_uint32", value))
        getattr(writer, method)(f"{arch}.{key}", value)
    for key, (method, value) in (extra or {}).items():
        getattr(writer, method)(key, value)
    q, kv = h * d_head, n_kv * d_head
    shapes = {"attn_q": (q, d), "attn_k": (kv, d), "attn_v": (kv, d), "attn_output": (d, q),
              "ffn_gate": (d_ff, d), "ffn_up": (d_ff, d), "ffn_down": (d, d_ff)}
    rng = np.random.default_rng(0)
    for layer in range(n_layers):
        for short in GGUF_NAMES:
            name = f"blk.{layer}.{short}.weight"
            w = rng.standard_normal(shapes[short])
            writer.add_tensor(name, w.astype(dtypes.get(name, np.float32)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def patch_tensor_type(path: Path, name: str, type_id: int) -> None:
    """Overwrite the ggml type id in tensor ``name``'s directory entry."""
    data = bytearray(path.read_bytes())
    raw = name.encode()
    pos = data.index(struct.pack("<Q", len(raw)) + raw) + 8 + len(raw)
    n_dims = struct.unpack_from("<I", data, pos)[0]
    struct.pack_into("<I", data, pos + 4 + 8 * n_dims, type_id)
    path.write_bytes(bytes(data))


def user_error(path: Path, fold_norms: bool = False) -> str:
    """The UserError message of opening ``path``: one line naming the file."""
    with pytest.raises(UserError) as info:
        open_checkpoint(str(path), fold_norms)
    return assert_one_line(info.value, path)


def test_tiny_base_file_opens(tmp_path):
    """The unmodified builder output is valid, so each failure below is its one defect."""
    ckpt = open_checkpoint(str(write_gguf(tmp_path / "ok.gguf")))
    assert (ckpt.dims.n_layers, ckpt.dims.d_model, ckpt.dims.d_head) == (2, 16, 8)
    assert ckpt.read_layer(1)["W_Q"].shape == (16, 16)


def test_empty_file(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"")
    assert "empty file (0 bytes)" in user_error(path)


@pytest.mark.parametrize("key", REQUIRED)
def test_missing_required_metadata_key(tmp_path, key):
    msg = user_error(write_gguf(tmp_path / "x.gguf", drop=(key,)))
    assert f"no llama.{key} in the GGUF metadata" in msg


@pytest.mark.parametrize("key,method,value,shown", [
    ("block_count", "add_string", "two", "'two'"),
    ("block_count", "add_uint32", 0, "0"),
    ("embedding_length", "add_float32", 16.0, "16.0"),
    ("attention.head_count", "add_int32", -2, "-2"),
    ("feed_forward_length", "add_bool", True, "True"),
])
def test_wrong_typed_metadata_value(tmp_path, key, method, value, shown):
    msg = user_error(write_gguf(tmp_path / "x.gguf", meta={key: (method, value)}))
    assert f"llama.{key}: {shown} is not allowed (an integer >= 1)" in msg


def test_per_layer_array_metadata_value(tmp_path):
    """Was silently read as absent (head_count_kv defaulted to head_count)."""
    msg = user_error(write_gguf(tmp_path / "x.gguf", meta={
        "attention.head_count_kv": ("add_array", [2, 2])}))
    assert "llama.attention.head_count_kv: an array is not allowed" in msg


def test_missing_architecture(tmp_path):
    path = write_gguf(tmp_path / "x.gguf")
    path.write_bytes(path.read_bytes().replace(b"general.architecture", b"general.architecturX"))
    msg = user_error(path)
    assert "no general.architecture" in msg and "llama" in msg


def test_unknown_tensor_type_id(tmp_path):
    path = write_gguf(tmp_path / "x.gguf")
    patch_tensor_type(path, "blk.1.attn_v.weight", 99)
    msg = user_error(path)
    assert "tensor blk.1.attn_v.weight has ggml type id 99" in msg
    assert "known ids: 0-3," in msg


def test_row_length_not_a_multiple_of_block_size(tmp_path):
    path = write_gguf(tmp_path / "x.gguf")
    patch_tensor_type(path, "blk.0.ffn_up.weight", 8)   # Q8_0: blocks of 32, rows are 16
    msg = user_error(path)
    assert "tensor blk.0.ffn_up.weight has rows of 16 values" in msg and "Q8_0" in msg


def test_type_gguf_cannot_dequantize(tmp_path):
    """I32 is a valid ggml type that gguf.quants cannot dequantize: fail at open, not mid-run."""
    path = write_gguf(tmp_path / "x.gguf", dtypes={"blk.1.ffn_down.weight": np.int32})
    msg = user_error(path)
    assert "tensor blk.1.ffn_down.weight is stored as I32" in msg and "Q8_0" in msg


def test_bad_alignment(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "x.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_uint32("general.alignment", 0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    assert "general.alignment: 0 is not allowed" in user_error(path)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_odd_d_head_with_rope_permutation(tmp_path, arch):
    msg = user_error(write_gguf(tmp_path / "x.gguf", arch, d=44, h=4, n_kv=4))
    assert "d_head 11 is odd" in msg and f"{arch}.embedding_length 44" in msg


def test_odd_d_head_without_rope_permutation_is_fine(tmp_path):
    """qwen2's GGUF rows are not permuted, so an odd d_head is read as is."""
    ckpt = open_checkpoint(str(write_gguf(tmp_path / "x.gguf", "qwen2", d=44, h=4, n_kv=4)))
    assert ckpt.dims.d_head == 11
    assert ckpt.read_layer(0)["W_K"].shape == (44, 44)


@pytest.mark.parametrize(("shape", "expected"), [
    ({"h": 4, "n_kv": 3}, "llama.attention.head_count=4 is not a multiple of"
                          " llama.attention.head_count_kv=3 (allowed:"
                          " llama.attention.head_count_kv a divisor of 4)"),
    ({"d": 18, "h": 4}, "llama.embedding_length=18 is not divisible by"
                        " llama.attention.head_count=4 and the GGUF metadata has no"
                        " llama.attention.key_length (allowed: llama.embedding_length a multiple"
                        " of llama.attention.head_count, or a llama.attention.key_length)"),
])
def test_head_counts_are_named_by_their_metadata_keys(tmp_path, shape, expected):
    """Not by the library's own names (n_heads, n_kv_heads), which no GGUF file has."""
    path = write_gguf(tmp_path / "x.gguf", **shape)
    assert user_error(path) == f"{path}: {expected}"


def test_fold_norms_without_norm_tensors(tmp_path):
    """write_gguf stores no norm gains: fine as is, refused under fold_norms, which names the
    way out."""
    path = write_gguf(tmp_path / "x.gguf")
    open_checkpoint(str(path))
    assert user_error(path, fold_norms=True) == (
        f"{path}: checkpoint has no tensor blk.0.attn_norm.weight (attn norm gain of layer 0),"
        " which fold_norms: true folds into the projections (allowed: a checkpoint with its"
        " norm gains, or fold_norms: false to analyse the raw weights)")


def test_mixture_of_experts_gguf_without_routers(tmp_path):
    """A llama GGUF whose metadata says experts (as Mixtral's does) but whose layers store dense
    FFNs and no router: named by its key, not read as dense (test_gguf_moe reads real ones)."""
    path = write_gguf(tmp_path / "x.gguf", extra={"llama.expert_count": ("add_uint32", 8),
                                                  "llama.expert_used_count": ("add_uint32", 2)})
    assert user_error(path) == (
        f"{path}: GGUF metadata llama.expert_count = 8, but no layer stores a router"
        " (blk.N.ffn_gate_inp.weight) (allowed: a mixture of experts with its routers and"
        " ffn_*_exps tensors, or a dense file without expert_count)")


def test_mixture_of_experts_of_a_dense_only_architecture(tmp_path):
    path = write_gguf(tmp_path / "x.gguf", "qwen2",
                      extra={"qwen2.expert_count": ("add_uint32", 4)})
    message = user_error(path)
    assert message.startswith(
        f"{path}: a mixture-of-experts qwen2 model (GGUF metadata qwen2.expert_count = 4) is"
        " not supported (allowed: a dense qwen2 file, or a mixture of experts of ")
    assert "gpt-oss" in message and "qwen3moe" in message


def test_workflow_dry_run_odd_d_head(tmp_path):
    """This one used to pass the dry run and die in the extraction job with a traceback."""
    path = write_gguf(tmp_path / "x.gguf", d=44, h=4, n_kv=4)
    proc = run_snakemake(tmp_path / "work", "-n", config={
        "models": {"g": {"source": str(path)}}, "device": "cpu", "top_k": 4})
    line = error_line(proc)
    assert line.startswith("error: models.g.source: ") and str(path) in line
    assert "d_head 11 is odd" in line
