"""GGUF files of every supported architecture, as llama.cpp's converter writes them: the reader
gives back the Hugging Face checkpoint's weights (raw, and with the norm gains folded).

Each tiny model is built by transformers' own config class, saved, and converted by
``gguf_convert.convert_hf_to_gguf`` (llama.cpp's layout: RoPE-permuted rows for the llama
family, Gemma's norm gains stored as ``1 + w``, GPT-2's ``Conv1D`` weights transposed, Phi-3's
fused tensors as they are). That converter is itself checked against transformers' GGUF
loading, which undoes each of these with its own code (for the architectures it loads:
not ``gemma``, and not a ``qwen3`` whose ``head_dim`` is not its default).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import transformers as T
from conftest import assert_ok, run_snakemake
from gguf_convert import convert_hf_to_gguf

from weight_geometry.checkpoint import open_checkpoint

# Widths multiples of 32, the Q8_0/Q4_0 block: every weight can be quantized.
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              vocab_size=64, max_position_embeddings=64)
CONFIGS = {
    "llama": lambda: T.LlamaConfig(**COMMON, num_key_value_heads=2),
    "mistral": lambda: T.MistralConfig(**COMMON, num_key_value_heads=2),
    "qwen2": lambda: T.Qwen2Config(**COMMON, num_key_value_heads=2),
    "qwen3": lambda: T.Qwen3Config(**COMMON, num_key_value_heads=2, head_dim=32),
    "gemma": lambda: T.GemmaConfig(**COMMON, num_key_value_heads=1, head_dim=32),
    "gemma2": lambda: T.Gemma2Config(**COMMON, num_key_value_heads=2, head_dim=32),
    "gemma3_text": lambda: T.Gemma3TextConfig(**COMMON, num_key_value_heads=2, head_dim=32),
    "phi3": lambda: T.Phi3Config(**COMMON, num_key_value_heads=2, pad_token_id=0),
    "gpt2": lambda: T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=64),
}
#: general.architecture of each (Mistral's converter writes llama).
GGUF_ARCH = {"mistral": "llama", "gemma3_text": "gemma3"}
#: What transformers' GGUF loading reads back as the same model.
TRANSFORMERS_LOADS = sorted(set(CONFIGS) - {"gemma", "qwen3"})


def build(arch: str, path):
    """A random model saved to ``path``, with norm gains and biases far from their defaults
    (so that a gain left out, or a 1 + w added twice, shows)."""
    torch.manual_seed(1)
    model = T.AutoModelForCausalLM.from_config(CONFIGS[arch]())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.ndim == 1 else 0.0))
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def converted(request, tmp_path_factory):
    """(arch, HF directory, its GGUF file, the transformers model)."""
    arch, root = request.param, tmp_path_factory.mktemp(request.param)
    model = build(arch, root / "hf")
    gguf = convert_hf_to_gguf(root / "hf", root / f"{arch}.gguf", tokens=64)[0]
    return arch, root / "hf", gguf, model


def test_gguf_reads_as_the_hf_checkpoint(converted):
    """Every weight of every layer, raw and folded, equals the Hugging Face checkpoint's."""
    arch, hf, gguf, _ = converted
    for fold in (False, True):
        ref, ours = open_checkpoint(str(hf), fold), open_checkpoint(str(gguf), fold)
        assert ours.format == "gguf" and ours.architecture == GGUF_ARCH.get(arch, arch)
        assert ours.dims == ref.dims
        assert ours.weight_types == ref.weight_types
        assert ours.adapter.ffn_input == ref.adapter.ffn_input
        for layer in range(ref.dims.n_layers):
            got, expected = ours.read_layer(layer, fold), ref.read_layer(layer, fold)
            for wt, w in expected.items():
                np.testing.assert_allclose(got[wt], w, rtol=1e-6, atol=1e-7,
                                           err_msg=f"{arch} {wt} layer {layer} fold {fold}")


def test_converter_layout_is_what_transformers_reads(converted):
    """transformers' GGUF loading (its own un-permutation, ``w - 1`` of Gemma's norms,
    transpose of GPT-2's) gives the original model back from the converted file: the test's
    converter writes llama.cpp's layout, not a mirror of the reader."""
    arch, _, gguf, model = converted
    if arch not in TRANSFORMERS_LOADS:
        pytest.skip(f"transformers' GGUF loading does not read this {arch} file")
    loaded = T.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    expected, got = model.state_dict(), loaded.state_dict()
    layer_tensors = [k for k in expected if ".0." in k and not k.endswith((".attn.bias",
                                                                           "masked_bias"))]
    assert layer_tensors
    for name in layer_tensors:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "F16"])
def test_quantized_weights(tmp_path, qtype):
    """Phi-3 (fused QKV and gate/up) stored quantized: each weight is the dequantized
    quantization of the Hugging Face weight (quantization acts on rows, and the reader cuts
    and reorders rows only); the norms stay F32, so folding scales the dequantized weight."""
    from gguf import GGMLQuantizationType as QT
    from gguf.quants import dequantize, quantize

    build("phi3", tmp_path / "hf")
    gguf = convert_hf_to_gguf(tmp_path / "hf", tmp_path / "q.gguf", QT[qtype])[0]
    ref = open_checkpoint(str(tmp_path / "hf"), fold_norms=True)
    ours = open_checkpoint(str(gguf), fold_norms=True)
    assert ours.storage_dtype == f"{qtype} (GGUF, dequantized to float32)"
    for layer in range(2):
        raw, got = ref.read_layer(layer), ours.read_layer(layer)
        folded_ref, folded = ref.read_layer(layer, True), ours.read_layer(layer, True)
        for wt, w in raw.items():
            expected = (w.astype(np.float16).astype(np.float32) if qtype == "F16"
                        else dequantize(quantize(w, QT[qtype]), QT[qtype]))
            np.testing.assert_array_equal(got[wt], expected, err_msg=f"{wt} {layer}")
            scale = np.divide(folded_ref[wt], w, out=np.ones_like(w), where=w != 0)
            np.testing.assert_allclose(folded[wt], expected * scale, rtol=1e-5, atol=1e-6,
                                       err_msg=f"folded {wt} {layer}")
        assert np.abs(got["W_Q"] - raw["W_Q"]).max() > 0 or qtype == "F16"


@pytest.mark.workflow
def test_workflow_runs_on_new_gguf_architectures(tmp_path):
    """Gemma 3, Phi-3 and GPT-2 GGUFs through extraction and the alignment, norms folded (the
    default): the same tables as from their Hugging Face checkpoints."""
    models = {}
    for arch in ("gemma3_text", "phi3", "gpt2"):
        build(arch, tmp_path / arch)
        gguf = convert_hf_to_gguf(tmp_path / arch, tmp_path / f"{arch}.gguf")[0]
        name = arch.replace("_", "-")
        models[name] = {"source": str(tmp_path / arch)}
        models[f"{name}-gguf"] = {"source": str(gguf)}
    targets = [f"results/{name}/{path}" for name in models
               for path in ("model.json", "effective_ranks.csv", "k4/alignment.parquet")]
    work = tmp_path / "run"
    assert_ok(run_snakemake(work, *targets, config={
        "models": models, "top_k": 4, "heads": {"sample": 2}, "device": "cpu"}))
    for name in ("gemma3-text", "phi3", "gpt2"):
        a, b = work / "results" / name, work / "results" / f"{name}-gguf"
        assert json.loads((b / "model.json").read_text())["format"] == "gguf"
        ranks_a, ranks_b = (pd.read_csv(r / "effective_ranks.csv") for r in (a, b))
        np.testing.assert_allclose(ranks_b["eff_rank"], ranks_a["eff_rank"], rtol=1e-4)
        align_a, align_b = (pd.read_parquet(r / "k4/alignment.parquet") for r in (a, b))
        np.testing.assert_allclose(align_b["alignment"], align_a["alignment"], rtol=1e-4,
                                   atol=1e-6, err_msg=name)
