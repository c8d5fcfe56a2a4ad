"""Every supported architecture, built by transformers' own config class: the adapter's weights
reproduce what the transformers modules compute (q/k/v projections per head before RoPE, FFN
input), norm folding matches the module's gains, and the whole workflow runs on each."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import transformers as T
from conftest import assert_ok, run_snakemake

from weight_geometry.checkpoint import open_checkpoint

COMMON = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
              vocab_size=64)
CONFIGS = {
    "llama": lambda: T.LlamaConfig(**COMMON, num_key_value_heads=2),
    "mistral": lambda: T.MistralConfig(**COMMON, num_key_value_heads=2),
    "qwen2": lambda: T.Qwen2Config(**COMMON, num_key_value_heads=2),
    "qwen3": lambda: T.Qwen3Config(**COMMON, num_key_value_heads=2, head_dim=16),
    "gemma": lambda: T.GemmaConfig(**COMMON, num_key_value_heads=1, head_dim=16),
    "gemma2": lambda: T.Gemma2Config(**COMMON, num_key_value_heads=2, head_dim=20),
    "phi3": lambda: T.Phi3Config(**COMMON, num_key_value_heads=2, pad_token_id=0),
    "gpt2": lambda: T.GPT2Config(n_embd=48, n_layer=3, n_head=4, vocab_size=64, n_positions=16),
    "gpt_neox": lambda: T.GPTNeoXConfig(**COMMON),
}
#: Models without a gated FFN (their FFN input is W_up), by their workflow names.
NON_GATED = ("gpt2", "gpt-neox")


def build(arch: str, path):
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(CONFIGS[arch]())
    with torch.no_grad():  # non-trivial biases and norm gains, so leaving them out is visible
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.ndim == 1 else 0.0))
    model.save_pretrained(path)
    return model


def module_projections(model, arch: str, layer: int, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-weight outputs ``x W^T`` as the transformers modules compute them, biases removed,
    split the way each attention's forward splits them (``(n, heads * d_head)``)."""
    def lin(module, inp=x):
        out = module(inp)
        return out - module.bias if getattr(module, "bias", None) is not None else out

    cfg = model.config
    if arch == "gpt2":
        blk = model.transformer.h[layer]
        q, k, v = lin(blk.attn.c_attn).split(cfg.n_embd, dim=-1)
        return {"W_Q": q, "W_K": k, "W_V": v, "W_up": lin(blk.mlp.c_fc)}
    if arch == "gpt_neox":
        blk = model.gpt_neox.layers[layer]
        h = cfg.num_attention_heads
        qkv = lin(blk.attention.query_key_value).view(len(x), h, -1)
        q, k, v = (t.reshape(len(x), -1) for t in qkv.chunk(3, dim=-1))
        return {"W_Q": q, "W_K": k, "W_V": v, "W_up": lin(blk.mlp.dense_h_to_4h)}
    blk = model.model.layers[layer]
    if arch == "phi3":
        qkv = lin(blk.self_attn.qkv_proj)
        nq = cfg.num_attention_heads * blk.self_attn.head_dim
        nkv = cfg.num_key_value_heads * blk.self_attn.head_dim
        gate, up = lin(blk.mlp.gate_up_proj).chunk(2, dim=-1)
        return {"W_Q": qkv[:, :nq], "W_K": qkv[:, nq:nq + nkv], "W_V": qkv[:, nq + nkv:],
                "W_gate": gate, "W_up": up}
    att = blk.self_attn
    return {"W_Q": lin(att.q_proj), "W_K": lin(att.k_proj), "W_V": lin(att.v_proj),
            "W_gate": lin(blk.mlp.gate_proj), "W_up": lin(blk.mlp.up_proj)}


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_adapter_reproduces_transformers_modules(tmp_path, arch):
    model = build(arch, tmp_path / arch)
    ckpt = open_checkpoint(str(tmp_path / arch))
    cfg = model.config
    assert ckpt.architecture == arch
    dims = ckpt.dims
    assert dims.n_layers == 3 and dims.d_model == 48
    assert dims.d_head == (getattr(cfg, "head_dim", None) or 48 // 4)
    x = torch.randn(7, 48)
    for layer in range(3):
        ours = ckpt.read_layer(layer)
        with torch.no_grad():
            ref = module_projections(model, arch, layer, x)
        for wt, out in ref.items():
            got = x.numpy() @ ours[wt].T
            np.testing.assert_allclose(got, out.numpy(), atol=1e-5, err_msg=f"{arch} {wt}")
        assert set(ours) == set(ckpt.weight_types)
        for wt, w in ours.items():
            assert w.shape == dims.weight_shape(wt), (arch, wt)
    # Per-head rows: head i of W_Q and its KV head are the module's (.., heads, d_head) views.
    q = x.numpy() @ ours["W_Q"].T
    with torch.no_grad():
        ref_q = module_projections(model, arch, 2, x)["W_Q"].view(7, dims.n_heads, dims.d_head)
    np.testing.assert_allclose(q.reshape(7, dims.n_heads, dims.d_head), ref_q.numpy(), atol=1e-5)
    assert ckpt.adapter.ffn_input == ("W_up" if arch in ("gpt2", "gpt_neox") else "W_gate")


@pytest.mark.parametrize("arch", ["qwen3", "gemma", "gpt2"])
def test_fold_norms_uses_module_gains(tmp_path, arch):
    model = build(arch, tmp_path / arch)
    raw = open_checkpoint(str(tmp_path / arch)).read_layer(1)
    folded = open_checkpoint(str(tmp_path / arch), fold_norms=True).read_layer(1, True)
    if arch == "gpt2":
        blk = model.transformer.h[1]
        g_attn, g_ffn = blk.ln_1.weight, blk.ln_2.weight
    else:
        blk = model.model.layers[1]
        g_attn, g_ffn = blk.input_layernorm.weight, blk.post_attention_layernorm.weight
        if arch == "gemma":  # Gemma's RMSNorm multiplies by (1 + weight)
            g_attn, g_ffn = 1 + g_attn, 1 + g_ffn
    g_attn, g_ffn = g_attn.detach().numpy(), g_ffn.detach().numpy()
    expected_q = raw["W_Q"] * g_attn
    if arch == "qwen3":  # q_norm gains scale each head's rows
        gq = blk.self_attn.q_norm.weight.detach().numpy()
        expected_q = (expected_q.reshape(4, 16, 48) * gq[None, :, None]).reshape(64, 48)
    np.testing.assert_allclose(folded["W_Q"], expected_q, rtol=1e-6, atol=1e-7)
    ffn_in = "W_up" if arch == "gpt2" else "W_gate"
    np.testing.assert_allclose(folded[ffn_in], raw[ffn_in] * g_ffn, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(folded["W_O"], raw["W_O"])


@pytest.mark.workflow
def test_workflow_runs_on_every_architecture(tmp_path):
    models = {}
    for arch in CONFIGS:
        build(arch, tmp_path / "ckpt" / arch)
        models[arch.replace("_", "-")] = {"source": str(tmp_path / "ckpt" / arch)}
    workdir = tmp_path / "run"
    # Every model through extraction and the per-k tables, the non-gated ones through their
    # report, all nine into the comparison. The figures, head matching and k-sweep of the
    # gated models (architecture-blind steps, run on Llama in test_workflow.py) are left out:
    # each is a Python process per model, and this run is among the slowest tests.
    per_model = ["model.json", "effective_ranks.csv", "k3/alignment.parquet",
                 "k3/similarity_head0.npy"]
    targets = [f"results/{name}/{path}" for name in models for path in per_model]
    targets += [f"results/{name}/k3/report.md" for name in NON_GATED]
    assert_ok(run_snakemake(workdir, *targets, "results/compare/k3/models.csv",
                            config={"models": models, "top_k": 3, "heads": {"sample": 2},
                                    "device": "cpu"}, timeout=900))
    for name in models:
        r = workdir / "results" / name
        meta = json.loads((r / "model.json").read_text())
        align = pd.read_parquet(r / "k3" / "alignment.parquet")
        assert align["alignment"].between(0, 1).all(), name
        ranks = pd.read_csv(r / "effective_ranks.csv")
        if name in NON_GATED:
            assert meta["ffn_input"] == "W_up" and set(align["ffn_input"]) == {"W_up"}
            assert "W_gate" not in set(ranks["weight_type"]) and len(ranks) == 3 * 6
            assert "FFN is not gated" in (r / "k3" / "report.md").read_text()
        else:
            assert len(ranks) == 3 * 7
        sims = np.load(r / "k3" / "similarity_head0.npy")
        assert np.allclose(sims, sims.T) and np.allclose(np.diag(sims), 1)
    # Nine models of different widths side by side.
    compared = pd.read_csv(workdir / "results/compare/k3/models.csv")
    assert sorted(set(compared["model"])) == sorted(models)
