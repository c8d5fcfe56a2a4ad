"""Gemma 4 as llama.cpp's converter writes it (``general.architecture`` = ``gemma4``;
tests/gguf_convert.py, after ``Gemma4Model`` of the converter's ``conversion/gemma.py``) reads
as its Hugging Face checkpoint: the tiny Gemma 4 of test_gemma4.py (sliding layers of head
size 8 and 2 KV heads, global ones of 16 and 1 with keys as values, the last two layers
reusing keys and values, double-wide FFNs there), whose per-layer sizes and reuse that module
checks against transformers' live modules, gives back the same dimensions, layer kinds,
key/value reuse and ``model.json`` record, every layer's weights raw and folded, and every
extraction array, from an F32 file exactly and from a Q8_0 file as from a checkpoint holding
its dequantized weights. A file whose metadata contradicts its tensors stops in one line.

Its mixture of experts (test_gemma4.py's ``MOE``: every layer sparse, four routed experts of
width 12 beside the dense FFN of width 24) as the converter writes it (``ffn_gate_up_exps``,
``ffn_down_exps``, ``ffn_gate_inp`` and its ``scale``, ``pre_ffw_norm_2``): every expert's
weights and the router, raw and folded, are the Hugging Face checkpoint's and the live
modules' (the routed experts through ``pre_ffw_norm_2``, the dense FFN as the shared expert
through ``ffn_norm``, the router through ``ffn_gate_inp.scale``), every extraction array with
the ``expert_*`` ones equal, from an F32 file and a Q4_0 one; bad expert metadata stops in one
line.

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
from test_gemma4 import MOE, D, build, expert_units

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


def dequantized_copy(hf, out, qtype=QT.Q8_0):
    """``hf`` with every tensor the converter quantizes to ``qtype`` (two or more dimensions,
    rows of whole 32-value blocks) replaced by its dequantized quantization: what the ``qtype``
    file holds, as a Hugging Face checkpoint."""
    out.mkdir()
    shutil.copy(hf / "config.json", out / "config.json")
    tensors = load_file(str(hf / "model.safetensors"))
    save_file({name: dequantize(quantize(w, qtype), qtype)
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
    assert ours.rotary_by_kind == ref.rotary_by_kind == {"full": 0.25}   # rope_freqs: 2 of 8
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
        assert [r[:3] + r[4:] for r in got.weight_ranks] == [
            r[:3] + r[4:] for r in expected.weight_ranks]       # (layer, type, shape, expert)
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
    ({"rope.dimension_count_swa": 9},
     ["gemma4.rope.dimension_count_swa: 9 is not allowed", "sliding layers' head size, 8"]),
    ({"expert_count": 4, "expert_feed_forward_length": 16, "feed_forward_length": 24},
     ["gemma4.expert_count = 4, but no layer stores a router (blk.N.ffn_gate_inp.weight)"]),
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


def test_sliding_layers_rotating_part_of_each_head_are_recorded(files, tmp_path):
    """``rope.dimension_count_swa`` below the sliding head size records their share beside the
    global layers' (from ``rope_freqs``)."""
    hf, *_ = files
    path = convert_hf_to_gguf(hf, tmp_path / "swa.gguf",
                              metadata={"rope.dimension_count_swa": 4})[0]
    assert open_checkpoint(str(path)).describe()["rotary_fractions"] == {"full": 0.25,
                                                                         "sliding": 0.5}


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


@pytest.fixture(scope="module")
def moe_files(tmp_path_factory):
    """(live MoE model, HF directory, F32 GGUF, Q4_0 GGUF, HF directory of the Q4_0 file's
    weights)."""
    root = tmp_path_factory.mktemp("gemma4_moe_gguf")
    model = build(root / "hf", **MOE)
    f32 = convert_hf_to_gguf(root / "hf", root / "f32.gguf")[0]
    q4 = convert_hf_to_gguf(root / "hf", root / "q4.gguf", QT.Q4_0)[0]
    return model, root / "hf", f32, q4, dequantized_copy(root / "hf", root / "hf_q4", QT.Q4_0)


#: Each sparse layer's tensors that llama.cpp's loader requires beside the dense FFN
#: (``llama_model_gemma4::load_arch_tensors`` where ``ffn_gate_inp`` is stored), with their
#: shapes (numpy order, outermost first) for E = 4 experts of width d_e = 12, d = 32.
MOE_TENSORS = {"ffn_gate_inp.weight": (4, D), "ffn_gate_inp.scale": (D,),
               "pre_ffw_norm_2.weight": (D,), "post_ffw_norm_1.weight": (D,),
               "post_ffw_norm_2.weight": (D,), "ffn_gate_up_exps.weight": (4, 24, D),
               "ffn_down_exps.weight": (4, D, 12), "ffn_down_exps.scale": (4,),
               "ffn_gate.weight": (24, D), "ffn_up.weight": (24, D), "ffn_down.weight": (D, 24)}


def test_moe_written_as_llama_cpp_loads_it(moe_files):
    """Every tensor is one of gguf-py's Gemma 4 tensors (the router's and the experts' scales
    as ``.scale`` of theirs), each layer holds the MoE tensors llama.cpp's loader requires in
    its shapes, and the metadata counts and widths are the config's; ``ffn_gate_up_exps[e]``
    is expert e's ``gate_up_proj``, gate rows first."""
    model, _, f32, _, _ = moe_files
    gguf_file = GGUFModel(f32)
    known = {gguf.TENSOR_NAMES[t].format(bid=b) + suffix
             for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.GEMMA4] for b in range(L)
             for suffix in (".weight", ".scale")}
    assert set(gguf_file.tensors) <= known, sorted(set(gguf_file.tensors) - known)
    for layer in range(L):
        for name, shape in MOE_TENSORS.items():
            assert gguf_file.tensors[f"blk.{layer}.{name}"].shape == shape, (layer, name)
    meta = {key: gguf_file.metadata[f"gemma4.{key}"] for key in (
        "expert_count", "expert_used_count", "expert_feed_forward_length",
        "feed_forward_length")}
    assert meta == {"expert_count": 4, "expert_used_count": 2,
                    "expert_feed_forward_length": 12, "feed_forward_length": 24}
    np.testing.assert_array_equal(gguf_file.read("blk.5.ffn_gate_up_exps.weight", 3),
                                  model.model.layers[5].experts.gate_up_proj[3].detach()
                                  .float().numpy())


def test_moe_experts_and_router_equal_the_hf_checkpoints(moe_files):
    """Experts, widths and sparse layers and the ``model.json`` record are the Hugging Face
    checkpoint's; every expert's W_gate, W_up, W_down (the shared one the dense FFN) and the
    router, raw and folded, are its too, bit for bit; folded, each unit's W_gate and router row
    is the live modules' (routed experts through ``pre_feedforward_layernorm_2``, the shared
    one through ``pre_feedforward_layernorm``, the router through ``router.scale``), which
    differ from each other and from the raw weights."""
    model, hf, f32, _, _ = moe_files
    for fold in (False, True):
        ref, ours = open_checkpoint(str(hf), fold), open_checkpoint(str(f32), fold)
        assert ours.moe == ref.moe
        assert (ours.moe.n_experts, ours.moe.d_expert, ours.moe.d_shared) == (4, 12, 24)
        assert ours.moe.sparse_layers == frozenset(range(L))
        record, expected = ours.describe(fold), ref.describe(fold)
        for key in FORMAT_KEYS:
            del record[key], expected[key]
        assert record == expected
        for layer in range(L):
            got, want = dict(ours.iter_experts(layer, fold)), dict(ref.iter_experts(layer, fold))
            assert list(got) == [0, 1, 2, 3, "shared"] == list(want)
            for expert, weights in want.items():
                assert got[expert].keys() == weights.keys() == {"W_gate", "W_up", "W_down"}
                for wt, w in weights.items():
                    np.testing.assert_array_equal(got[expert][wt], w,
                                                  err_msg=f"{layer} {expert} {wt} {fold}")
            np.testing.assert_array_equal(ours.read_router(layer, fold),
                                          ref.read_router(layer, fold), err_msg=f"{layer}")
    raw, folded = open_checkpoint(str(f32)), open_checkpoint(str(f32), True)
    for layer in (0, 5):
        units = expert_units(model, layer)
        got = dict(folded.iter_experts(layer, True))
        for name, _, w in units[:5]:
            np.testing.assert_allclose(got[int(name) if name.isdigit() else name]["W_gate"], w,
                                       rtol=1e-6, atol=1e-7, err_msg=f"{layer} {name}")
        router = np.concatenate([w for name, _, w in units if name == "router"])
        np.testing.assert_allclose(folded.read_router(layer, True), router, rtol=1e-6,
                                   atol=1e-7)
        assert not np.allclose(raw.read_router(layer), router)
        blk = model.model.layers[layer]
        assert not torch.allclose(blk.pre_feedforward_layernorm.weight,
                                  blk.pre_feedforward_layernorm_2.weight)


@pytest.mark.parametrize("fold", [False, True])
def test_moe_extraction_arrays_equal_the_hf_checkpoints(moe_files, fold):
    """The F32 MoE file's extraction arrays, ``expert_*`` included (routed experts, the dense
    FFN as the shared one, the router's rows, each at its layer's head size), and every
    effective-rank row, with its expert, are the Hugging Face checkpoint's."""
    _, hf, f32, _, _ = moe_files
    ours = open_checkpoint(str(f32), fold)
    res = extract_layer(ours, 1, torch.device("cpu"), fold)
    assert res.expert_energy.shape == (9, 4, 16)    # 4 experts, shared, 4 router rows
    assert np.isfinite(res.expert_energy).all() and res.expert_energy.any()
    assert {r[4] for r in res.weight_ranks if len(r) > 4} == {"0", "1", "2", "3", "shared"}
    assert_same_extraction(ours, open_checkpoint(str(hf), fold), fold, "MoE F32")


def test_moe_q4_0_reads_as_its_dequantized_weights(moe_files):
    """The Q4_0 MoE file: each expert's weights and the router are, bit for bit, those of a
    checkpoint holding the dequantized quantizations (``ffn_gate_up_exps`` and
    ``ffn_gate_inp``, rows of 32 values; ``ffn_down_exps``, rows of 12, and the gains F32), raw
    and folded, and so is every extraction array; the quantization changed them."""
    _, hf, _, q4, hf_q4 = moe_files
    for fold in (False, True):
        ref, ours = open_checkpoint(str(hf_q4), fold), open_checkpoint(str(q4), fold)
        for layer in range(L):
            got, want = dict(ours.iter_experts(layer, fold)), dict(ref.iter_experts(layer, fold))
            for expert, weights in want.items():
                for wt, w in weights.items():
                    np.testing.assert_array_equal(got[expert][wt], w,
                                                  err_msg=f"{layer} {expert} {wt} {fold}")
            np.testing.assert_array_equal(ours.read_router(layer, fold),
                                          ref.read_router(layer, fold))
        assert_same_extraction(ours, ref, fold, "MoE Q4_0")
    ours, exact = open_checkpoint(str(q4)), open_checkpoint(str(hf))
    assert ours.storage_dtype == "F32/Q4_0 (GGUF, dequantized to float32)"
    assert np.abs(dict(ours.iter_experts(2))[1]["W_up"]
                  - dict(exact.iter_experts(2))[1]["W_up"]).max() > 0
    assert np.abs(ours.read_router(2) - exact.read_router(2)).max() > 0


@pytest.mark.parametrize("metadata, fragments", [
    ({"expert_count": 3},
     ["tensor blk.0.ffn_gate_inp.weight has shape (4, 32)", "implies (3, 32)"]),
    ({"expert_count": None},
     ["layers [0, 1, 2, 3, 4, 5] store a router (blk.N.ffn_gate_inp.weight)",
      "gemma4.expert_count is absent or 0"]),
    ({"expert_feed_forward_length": 16},
     ["tensor blk.0.ffn_gate_up_exps.weight has shape (4, 24, 32)", "implies (4, 32, 32)"]),
    ({"expert_feed_forward_length": None},
     ["no gemma4.expert_feed_forward_length in the GGUF metadata"]),
    ({"feed_forward_length": 48},
     ["tensor blk.0.ffn_gate.weight has shape (24, 32)", "implies (48, 32)"]),
    ({"feed_forward_length": [24] * 4 + [48] * 2},
     ["gemma4.feed_forward_length: widths [24, 48] are not allowed with experts"]),
])
def test_bad_moe_metadata_stops_in_one_line(moe_files, tmp_path, metadata, fragments):
    """Expert metadata that the tensors contradict (the expert count, the experts' or the dense
    FFN's width), that is missing (routers stored without an expert count, no expert width) or
    that gives the dense FFN beside the experts a width per layer stops in one line naming the
    file."""
    _, hf, *_ = moe_files
    path = convert_hf_to_gguf(hf, tmp_path / "bad.gguf", metadata=metadata)[0]
    with pytest.raises(UserError) as info:
        open_checkpoint(str(path))
    assert_one_line(info.value, path, *fragments)
