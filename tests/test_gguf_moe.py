"""Mixture-of-experts GGUF files (``qwen2moe``, ``qwen3moe``, ``olmoe``, Mixtral as ``llama``,
``gpt-oss``) as llama.cpp's converter writes them (``gguf_convert``: experts stacked into
``ffn_*_exps`` ``(E, out, in)``, routers ``ffn_gate_inp``, Qwen2-MoE's shared expert and its
gate, gpt-oss's gate/up de-interleaved and its MXFP4 repacked): every weight, expert, router
and shared gate equals the Hugging Face checkpoint's (raw and folded), in F32, in two
quantized types (each the dequantized quantization of the Hugging Face weight), split and
unsplit; each expert's slice is read alone. The converter's layout is checked against
transformers' own GGUF loading where it reads the architecture (``qwen2moe``, ``qwen3moe``, at
the expert widths it assumes: it does not read ``expert_feed_forward_length``)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import transformers as T
from conftest import assert_ok, assert_one_line, run_snakemake
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize
from gguf_convert import convert_hf_to_gguf
from test_gpt_oss import build_gpt_oss
from test_moe import build

from weight_geometry.architectures import SHARED
from weight_geometry.checkpoint import open_checkpoint
from weight_geometry.errors import UserError
from weight_geometry.gguf_file import GGUFModel

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
# Widths multiples of 32 (every quantization block); Qwen's expert widths transformers' own
# (1408 and shared 5632; 768), which its GGUF loading assumes.
CONFIGS = {
    "qwen2_moe": lambda: T.Qwen2MoeConfig(**COMMON, intermediate_size=96, num_experts=4,
                                          num_experts_per_tok=2),
    "qwen3_moe": lambda: T.Qwen3MoeConfig(**COMMON, head_dim=32, intermediate_size=96,
                                          num_experts=4, num_experts_per_tok=2),
    "olmoe": lambda: T.OlmoeConfig(**COMMON, intermediate_size=32, num_experts=4,
                                   num_experts_per_tok=2),
    "mixtral": lambda: T.MixtralConfig(**COMMON, intermediate_size=32, num_local_experts=4,
                                       num_experts_per_tok=2),
}
GGUF_ARCH = {"qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "olmoe": "olmoe",
             "mixtral": "llama", "gpt_oss": "gpt-oss"}
TRANSFORMERS_LOADS = ("qwen2_moe", "qwen3_moe")


def hf_model(arch: str, path):
    """The tiny model saved to ``path``; gpt-oss as published (MXFP4 experts)."""
    if arch == "gpt_oss":
        return build_gpt_oss(path, published=True)
    return build(arch, path, config=CONFIGS[arch]())


@pytest.fixture(scope="module", params=sorted(GGUF_ARCH))
def converted(request, tmp_path_factory):
    """(arch, HF directory, its F32 GGUF, the transformers model)."""
    arch, root = request.param, tmp_path_factory.mktemp(request.param)
    model = hf_model(arch, root / "hf")
    gguf = convert_hf_to_gguf(root / "hf", root / "m.gguf", tokens=64)[0]
    return arch, root / "hf", gguf, model


def assert_same_model(ours, ref, fold: bool, expected=lambda w: w, **tol) -> None:
    """Every layer's weights, every expert's, the routers and shared gates of ``ours`` are
    ``expected`` of ``ref``'s (the dequantized quantization, for a quantized file)."""
    assert ours.dims == ref.dims and ours.moe == ref.moe
    for layer in range(ref.dims.n_layers):
        got, want = ours.read_layer(layer, fold), ref.read_layer(layer, fold)
        assert got.keys() == want.keys()
        for wt, w in want.items():
            np.testing.assert_allclose(got[wt], expected(w), err_msg=f"{wt} {layer}", **tol)
        if not ref.is_sparse(layer):
            continue
        for (e, w), (e2, g) in zip(ref.iter_experts(layer, fold), ours.iter_experts(layer, fold),
                                   strict=True):
            assert e == e2 and g.keys() == w.keys()
            for wt in w:
                np.testing.assert_allclose(g[wt], expected(w[wt]), **tol,
                                           err_msg=f"{wt} expert {e} layer {layer}")
        np.testing.assert_allclose(ours.read_router(layer, fold),
                                   expected(ref.read_router(layer, fold)), **tol)
        gate = ref.read_shared_gate(layer, fold)
        assert (gate is None) == (ours.read_shared_gate(layer, fold) is None)
        if gate is not None:
            np.testing.assert_allclose(ours.read_shared_gate(layer, fold), gate, **tol)


def test_gguf_reads_as_the_hf_checkpoint(converted):
    """F32 (gpt-oss: its experts in ggml's MXFP4, the published blocks repacked, decoded by
    the gguf package, beside ours of the published checkpoint): exactly the same numbers."""
    arch, hf, gguf, _ = converted
    for fold in (False, True):
        ref, ours = open_checkpoint(str(hf), fold), open_checkpoint(str(gguf), fold)
        assert ours.format == "gguf" and ours.architecture == GGUF_ARCH[arch]
        assert ours.expert_layout.fused and ours.moe.sparse_layers == {0, 1}
        assert ours.adapter.ffn_input == ref.adapter.ffn_input
        assert_same_model(ours, ref, fold, rtol=1e-6, atol=1e-7)
    model = ours.describe()
    assert model["experts"] == ref.describe()["experts"]
    assert ("MXFP4" in ours.storage_dtype) == (arch == "gpt_oss")
    assert ("attention sinks" in model.get("not_used", "")) == (arch == "gpt_oss")


@pytest.mark.parametrize("converted", ["qwen2_moe"], indirect=True)
def test_qwen2_shared_expert_gate_is_the_modules(converted):
    """Qwen2-MoE's shared expert is scaled by sigmoid(shared_expert_gate(x)): the row read
    from either format is that module's."""
    _, hf, gguf, model = converted
    x = torch.randn(5, 64)
    for source in (hf, gguf):
        ckpt = open_checkpoint(str(source))
        assert ckpt.moe.d_shared == 5632 and ckpt.moe.experts[-1] == SHARED
        for layer in range(2):
            gate = model.model.layers[layer].mlp.shared_expert_gate
            with torch.no_grad():
                np.testing.assert_allclose(x.numpy() @ ckpt.read_shared_gate(layer).T, gate(x),
                                           rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("converted", TRANSFORMERS_LOADS, indirect=True)
def test_converter_layout_is_what_transformers_reads(converted):
    """transformers' GGUF loading (its own merging of ffn_gate_exps / ffn_up_exps into
    gate_up_proj, and of the shared gate) gives the original model back from the file."""
    _, _, gguf, model = converted
    loaded = T.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    expected, got = model.state_dict(), loaded.state_dict()
    layer_tensors = [k for k in expected if ".0." in k]
    assert any("experts" in k for k in layer_tensors)
    for name in layer_tensors:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_quantized_experts(tmp_path, arch, qtype):
    """Each weight, expert slice and router is the dequantized quantization of the Hugging
    Face one (quantization acts on rows; the reader slices experts and, for Mixtral as llama,
    reorders rows only); the (1-D) shared gate stays F32. (Folding, which multiplies by the
    F32 norm gains, is checked exactly above.)"""
    hf_model(arch, tmp_path / "hf")
    gguf = convert_hf_to_gguf(tmp_path / "hf", tmp_path / "q.gguf", QT[qtype])[0]
    ref, ours = open_checkpoint(str(tmp_path / "hf")), open_checkpoint(str(gguf))
    assert ours.storage_dtype == f"{qtype} (GGUF, dequantized to float32)"

    def expected(w):
        return dequantize(quantize(w, QT[qtype]), QT[qtype]) if w.shape[0] > 1 else w

    assert_same_model(ours, ref, False, expected, rtol=0, atol=0)


def test_fused_gate_up_exps(tmp_path):
    """Written with the converter's --fuse-gate-up-exps (ffn_gate_up_exps, gate rows first):
    the same numbers as the file with separate ffn_gate_exps and ffn_up_exps."""
    hf_model("olmoe", tmp_path / "hf")
    apart = convert_hf_to_gguf(tmp_path / "hf", tmp_path / "apart.gguf", QT.Q4_0)[0]
    fused = convert_hf_to_gguf(tmp_path / "hf", tmp_path / "fused.gguf", QT.Q4_0,
                               fuse_gate_up_exps=True)[0]
    tensors = GGUFModel(fused).tensors
    assert tensors["blk.0.ffn_gate_up_exps.weight"].shape == (4, 64, 64)
    assert "blk.0.ffn_gate_exps.weight" not in tensors
    ours = open_checkpoint(str(fused), True)
    assert ours.expert_layout.experts["W_up"].tensor == "ffn_gate_up_exps.weight"
    assert_same_model(ours, open_checkpoint(str(apart), True), True, rtol=0, atol=0)


def test_per_expert_tensors(tmp_path):
    """llama.cpp's first Mixtral files: one 2-D tensor per expert (blk.N.ffn_gate.E.weight):
    the same numbers as the stacked file's."""
    hf_model("mixtral", tmp_path / "hf")
    stacked = convert_hf_to_gguf(tmp_path / "hf", tmp_path / "stacked.gguf")[0]
    apart = convert_hf_to_gguf(tmp_path / "hf", tmp_path / "apart.gguf", per_expert=True)[0]
    tensors = GGUFModel(apart).tensors
    assert tensors["blk.1.ffn_down.3.weight"].shape == (64, 32)
    assert "blk.1.ffn_down_exps.weight" not in tensors
    ours = open_checkpoint(str(apart), True)
    assert not ours.expert_layout.fused
    assert_same_model(ours, open_checkpoint(str(stacked), True), True, rtol=0, atol=0)


def test_split_reads_as_the_unsplit_file(tmp_path):
    """Mixtral-as-llama in Q8_0 split in three parts: the experts read from whichever part
    holds them, the same numbers as the unsplit file."""
    hf_model("mixtral", tmp_path / "hf")
    whole = convert_hf_to_gguf(tmp_path / "hf", tmp_path / "whole.gguf", QT.Q8_0)[0]
    (tmp_path / "split").mkdir()
    parts = convert_hf_to_gguf(tmp_path / "hf", tmp_path / "split" / "m.gguf", QT.Q8_0, 9)
    assert len(parts) == 3
    ours, ref = open_checkpoint(str(parts[0]), True), open_checkpoint(str(whole), True)
    held = GGUFModel(parts[0]).files
    assert {held[f"blk.{layer}.ffn_gate_exps.weight"] for layer in (0, 1)} != {parts[0]}
    assert_same_model(ours, ref, True, rtol=0, atol=0)


def test_an_expert_is_read_alone(tmp_path):
    """Expert 2's Q8_0 block scales in ffn_down_exps set to inf: experts 0, 1, 3 read as
    before (only their own bytes are read); expert 2 is refused in one line."""
    hf_model("olmoe", tmp_path / "hf")
    gguf = convert_hf_to_gguf(tmp_path / "hf", tmp_path / "q.gguf", QT.Q8_0)[0]
    before = list(open_checkpoint(str(gguf)).iter_experts(1))
    name = "blk.1.ffn_down_exps.weight"
    info = GGUFModel(gguf).tensors[name]
    per_expert = info.nbytes // 4
    data = bytearray(gguf.read_bytes())
    for block in range(per_expert // 34):  # Q8_0 block: f16 scale, 32 int8
        at = info.offset + 2 * per_expert + 34 * block
        data[at:at + 2] = np.float16(np.inf).tobytes()
    gguf.write_bytes(bytes(data))
    ckpt = open_checkpoint(str(gguf))
    for e in (0, 1, 3):
        np.testing.assert_array_equal(ckpt._read(name, e), before[e][1]["W_down"])
    with pytest.raises(UserError) as err:
        list(ckpt.iter_experts(1))
    assert assert_one_line(err.value).endswith(f"tensor {name} contains NaN or Inf")


@pytest.mark.workflow
def test_workflow_runs_on_a_moe_gguf(tmp_path):
    """A Qwen2-MoE GGUF (Q8_0) through extraction, the per-expert ranks, the alignment and
    the report: the same per-expert effective ranks as its Hugging Face checkpoint's, up to
    quantization."""
    build("qwen2_moe", tmp_path / "hf", config=T.Qwen2MoeConfig(
        **COMMON, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2))
    gguf = convert_hf_to_gguf(tmp_path / "hf", tmp_path / "m.gguf", QT.Q8_0)[0]
    models = {"moe": {"source": str(tmp_path / "hf")}, "moe-gguf": {"source": str(gguf)}}
    targets = [f"results/{m}/{p}" for m in models for p in (
        "model.json", "effective_ranks.csv", "k4/alignment.parquet", "k4/report.md")]
    work = tmp_path / "run"
    assert_ok(run_snakemake(work, *targets, config={
        "models": models, "top_k": 4, "heads": {"sample": 2}, "device": "cpu"}))
    a, b = work / "results" / "moe", work / "results" / "moe-gguf"
    model = json.loads((b / "model.json").read_text())
    assert model["format"] == "gguf" and model["experts"]["d_shared"] == 64
    ranks_a, ranks_b = (pd.read_parquet(r / "effective_ranks.parquet") for r in (a, b))
    assert sorted(ranks_b["expert"].dropna().unique()) == ["0", "1", "2", "3", "shared"]
    np.testing.assert_allclose(ranks_b["eff_rank"], ranks_a["eff_rank"], rtol=0.02)
    assert "mixture" in (b / "k4" / "report.md").read_text().lower()
