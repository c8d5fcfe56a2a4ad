"""Gemma 4 as llama.cpp's converter writes it (``general.architecture`` = ``gemma4``;
tests/gguf_convert.py, after ``Gemma4Model`` of the converter's ``conversion/gemma.py``) reads
as its Hugging Face checkpoint: the tiny Gemma 4 of test_gemma4.py (sliding layers of head
size 8 and 2 KV heads, global ones of 16 and 1 with keys as values, the last two layers
reusing keys and values, double-wide FFNs there), whose per-layer sizes and reuse that module
checks against transformers' live modules, gives back the same dimensions, layer kinds,
key/value reuse and ``model.json`` record, every layer's weights raw and folded, and every
extraction array, from an F32 file exactly and from a Q8_0 file as from a checkpoint holding
its dequantized weights. A file whose metadata contradicts its tensors stops in one line.

transformers' own GGUF loading cannot cross-check the converter here: it reads none of Gemma
4's per-layer keys (``key_length_swa``, ``sliding_window_pattern``, ``shared_kv_layers``, the
per-layer arrays); the file's tensor names are checked against gguf-py's ``MODEL_TENSORS``
of ``MODEL_ARCH.GEMMA4`` instead.
"""

from __future__ import annotations

import shutil

import gguf
import numpy as np
import pytest
import torch
from conftest import assert_one_line
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize
from gguf_convert import convert_hf_to_gguf
from safetensors.numpy import load_file, save_file
from test_gemma4 import build

from weight_geometry.checkpoint import open_checkpoint
from weight_geometry.errors import UserError
from weight_geometry.extraction import LayerResult, extract_layer
from weight_geometry.gguf_file import GGUFModel

L = 6
#: What only the format changes in ``model.json``'s record.
FORMAT_KEYS = ("source", "path", "format", "architecture", "storage_dtype")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(HF directory, F32 GGUF, Q8_0 GGUF, HF directory of the Q8_0 file's weights)."""
    root = tmp_path_factory.mktemp("gemma4_gguf")
    build(root / "hf")
    f32 = convert_hf_to_gguf(root / "hf", root / "f32.gguf", tokens=64)[0]
    q8 = convert_hf_to_gguf(root / "hf", root / "q8.gguf", QT.Q8_0)[0]
    return root / "hf", f32, q8, dequantized_copy(root / "hf", root / "hf_q8")


def dequantized_copy(hf, out):
    """``hf`` with every tensor the converter quantizes to Q8_0 (two or more dimensions, rows
    of whole 32-value blocks) replaced by its dequantized quantization: what the Q8_0 file
    holds, as a Hugging Face checkpoint."""
    out.mkdir()
    shutil.copy(hf / "config.json", out / "config.json")
    tensors = load_file(str(hf / "model.safetensors"))
    save_file({name: dequantize(quantize(w, QT.Q8_0), QT.Q8_0)
               if w.ndim >= 2 and w.shape[-1] % 32 == 0 else w
               for name, w in tensors.items()}, str(out / "model.safetensors"))
    return out


def test_written_as_llama_cpp_names_it(files):
    """Every tensor the converter wrote is one of gguf-py's Gemma 4 tensors, and the reused
    keys and values are absent: no attn_k, attn_v, attn_k_norm in layers 4 and 5, no attn_v in
    the global layers (keys as values)."""
    _, f32, _, _ = files
    known = {gguf.TENSOR_NAMES[t].format(bid=b) + ".weight"
             for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.GEMMA4] for b in range(L)}
    names = set(GGUFModel(f32).tensors)
    assert names <= known, sorted(names - known)
    for layer in range(L):
        has = {part for part in ("attn_k", "attn_v", "attn_k_norm")
               if f"blk.{layer}.{part}.weight" in names}
        assert has == (set() if layer >= 4 else {"attn_k", "attn_k_norm"} if layer % 2
                       else {"attn_k", "attn_v", "attn_k_norm"}), layer


def test_dims_kinds_reuse_and_record_equal_the_hf_checkpoints(files):
    """Per-layer head sizes, KV-head counts and FFN widths, layer kinds and window, which layer
    each reads keys and values from and which use keys as values: the Hugging Face
    checkpoint's, and so its ``model.json`` record but for the format."""
    hf, f32, _, _ = files
    ref, ours = open_checkpoint(str(hf)), open_checkpoint(str(f32))
    assert ours.architecture == "gemma4"
    assert ours.dims == ref.dims
    assert ours.dims.head_dims == (8, 16) * 3 and ours.dims.kv_heads == (2, 1) * 3
    assert ours.dims.ffn_widths == (24,) * 4 + (48,) * 2
    assert ours.layer_kinds == ref.layer_kinds
    assert ours.kv_reuse == ref.kv_reuse
    assert ours.kv_reuse.source == (0, 1, 2, 3, 2, 3)
    assert ours.kv_reuse.keys_as_values == {1, 3, 5}
    assert ours.rotary_fraction == ref.rotary_fraction
    for fold in (False, True):
        record, expected = ours.describe(fold), ref.describe(fold)
        for key in FORMAT_KEYS:
            del record[key], expected[key]
        assert record == expected


def test_every_weight_raw_and_folded_equals_the_hf_checkpoints(files):
    """Every layer's weights, raw and with the gains folded (stored as ``w``, not ``1 + w``:
    a gain shifted by one would show), are the Hugging Face checkpoint's, bit for bit; a
    reusing layer's W_K and W_V are its source layer's, a global layer's W_V its W_K."""
    hf, f32, _, _ = files
    for fold in (False, True):
        ref, ours = open_checkpoint(str(hf), fold), open_checkpoint(str(f32), fold)
        for layer in range(L):
            expected, got = ref.read_layer(layer, fold), ours.read_layer(layer, fold)
            assert got.keys() == expected.keys()
            for wt, w in expected.items():
                np.testing.assert_array_equal(got[wt], w, err_msg=f"{wt} {layer} {fold}")
    raw = open_checkpoint(str(f32))
    assert not np.array_equal(ours.read_layer(4, True)["W_K"], raw.read_layer(4)["W_K"])
    np.testing.assert_array_equal(raw.read_layer(5)["W_V"], raw.read_layer(3)["W_K"])
    np.testing.assert_array_equal(raw.read_layer(4)["W_V"], raw.read_layer(2)["W_V"])


def assert_same_extraction(ours, ref, fold: bool, what: str) -> None:
    """Every extraction array (padded past each layer's head size and KV heads) and every
    effective-rank row of every layer equal between two checkpoints."""
    for layer in range(L):
        got, expected = (extract_layer(c, layer, torch.device("cpu"), fold) for c in (ours, ref))
        for name in LayerResult.array_names():
            a, b = getattr(got, name), getattr(expected, name)
            assert (a is None) == (b is None), (name, layer)
            if b is not None:
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, equal_nan=True,
                                           err_msg=f"{what} {name} layer {layer} fold {fold}")
        assert [r[:3] for r in got.weight_ranks] == [r[:3] for r in expected.weight_ranks]
        assert [r[3] for r in got.weight_ranks] == pytest.approx(
            [r[3] for r in expected.weight_ranks], rel=1e-6), layer


@pytest.mark.parametrize("fold", [False, True])
def test_extraction_arrays_equal_the_hf_checkpoints(files, fold):
    """The F32 file's extraction arrays, layer by layer, are the Hugging Face checkpoint's:
    each at its layer's own head size and KV grouping, a reusing layer's kernel against its
    source layer's keys."""
    hf, f32, _, _ = files
    ref = open_checkpoint(str(hf), fold)
    assert_same_extraction(open_checkpoint(str(f32), fold), ref, fold, "F32")


def test_q8_0_reads_as_its_dequantized_weights(files):
    """The Q8_0 file: each weight is the dequantized quantization of the Hugging Face weight
    (rows of whole blocks; the others, and every gain, F32), folded as the gains scale it, and
    every extraction array and rank row is that of a checkpoint holding those weights; the
    quantization changed them (the comparison is not of a file with itself)."""
    hf, _, q8, hf_q8 = files
    ref, ours = open_checkpoint(str(hf), True), open_checkpoint(str(q8), True)
    assert ours.storage_dtype == "F32/Q8_0 (GGUF, dequantized to float32)"
    for layer in range(L):
        raw, got = ref.read_layer(layer), ours.read_layer(layer)
        folded_ref, folded = ref.read_layer(layer, True), ours.read_layer(layer, True)
        for wt, w in raw.items():
            expected = dequantize(quantize(w, QT.Q8_0), QT.Q8_0) if w.shape[1] % 32 == 0 else w
            np.testing.assert_array_equal(got[wt], expected, err_msg=f"{wt} {layer}")
            scale = np.divide(folded_ref[wt], w, out=np.ones_like(w), where=w != 0)
            np.testing.assert_allclose(folded[wt], expected * scale, rtol=1e-5, atol=1e-6,
                                       err_msg=f"folded {wt} {layer}")
        assert np.abs(got["W_Q"] - raw["W_Q"]).max() > 0
    for fold in (False, True):
        assert_same_extraction(open_checkpoint(str(q8), fold), open_checkpoint(str(hf_q8), fold),
                               fold, "Q8_0")


@pytest.mark.parametrize("metadata, fragments", [
    ({"attention.key_length_swa": 16, "attention.value_length_swa": 16},
     ["tensor blk.0.attn_q.weight has shape (32, 32)", "implies (64, 32)"]),
    ({"attention.value_length_swa": 16},
     ["gemma4.attention.value_length_swa: 16 is not allowed", "key_length_swa = 8"]),
    ({"attention.head_count_kv": [2] * L},
     ["tensor blk.1.attn_k.weight has shape (16, 32)", "implies (32, 32)"]),
    ({"attention.head_count_kv": [2, 3, 2, 1, 2, 1]},
     ["gemma4.attention.head_count_kv: 3 (layer 1) is not allowed", "divisor"]),
    ({"feed_forward_length": 24},
     ["tensor blk.4.ffn_gate.weight has shape (48, 32)", "implies (24, 32)"]),
    ({"feed_forward_length": [24] * 5},
     ["gemma4.feed_forward_length: an array of 5 items is not allowed", "6 layers"]),
    ({"attention.sliding_window_pattern": [True, False] * 2},
     ["gemma4.attention.sliding_window_pattern: an array of 4 items", "one bool per layer"]),
    ({"attention.shared_kv_layers": 0}, ["no tensor blk.4.attn_k.weight (W_K of layer 4)"]),
    ({"attention.shared_kv_layers": 1},
     ["shared_kv_layers: 1 makes global layer 5", "layer 4 in llama.cpp, of layer 3 in"]),
    ({"attention.shared_kv_layers": 6}, ["shared_kv_layers: 6 is not allowed", "0 to 5"]),
    ({"expert_count": 4, "expert_feed_forward_length": 16},
     ["a mixture-of-experts gemma4 model", "expert_count = 4"]),
])
def test_metadata_contradicting_the_tensors_stops_in_one_line(files, tmp_path, metadata,
                                                               fragments):
    """Metadata that the tensors contradict (a head size, KV-head count or FFN width that the
    stored shapes do not have, a reuse count that leaves a layer without keys, or that llama.cpp
    and transformers would read differently, experts that are not stored) or that is malformed
    stops in one line naming the file."""
    hf, *_ = files
    path = convert_hf_to_gguf(hf, tmp_path / "bad.gguf", metadata=metadata)[0]
    with pytest.raises(UserError) as info:
        open_checkpoint(str(path))
    assert_one_line(info.value, path, *fragments)


def test_layers_storing_keys_the_metadata_says_they_reuse_stop_in_one_line(tmp_path):
    """A file whose every layer stores its keys and values, but whose ``shared_kv_layers``
    says the last two reuse them, stops in one line naming the tensor."""
    build(tmp_path / "hf", num_kv_shared_layers=0)
    path = convert_hf_to_gguf(tmp_path / "hf", tmp_path / "bad.gguf",
                              metadata={"attention.shared_kv_layers": 2})[0]
    with pytest.raises(UserError) as info:
        open_checkpoint(str(path))
    assert_one_line(info.value, path, "shared_kv_layers = 2 makes layer 4 reuse the keys and"
                    " values of layer 2, but it stores blk.4.attn_k.weight")
    assert open_checkpoint(str(tmp_path / "hf")).kv_reuse.source == tuple(range(L))
