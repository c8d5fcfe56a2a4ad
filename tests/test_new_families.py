"""SmolLM3, OLMo 3 and Llama 4 (text), built by transformers' own config classes.

Their attention and dense FFNs are in the tables of tests/test_architectures.py (every weight
against the live modules, each head's kernel against a naive float64 SVD, folding). Here:
Llama 4's experts (fused in ``x @ W`` orientation), its shared expert and router against the
live ``Llama4TextMoe``; per-expert effective ranks against numpy; and one workflow run of the
three families whose similarity matrices, effective ranks and layer kinds equal references
formed from the live modules' own weights, with their reports."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import transformers as T
from conftest import (
    assert_ok,
    naive_kernel_svd,
    reference_eff_rank,
    run_snakemake,
    spread_parameters,
)
from test_architectures import build as build_dense
from test_layer_kinds import reference_kinds

from weight_geometry.architectures import SHARED
from weight_geometry.checkpoint import open_checkpoint
from weight_geometry.extraction import extract_layer

#: Llama 4 with experts in layers 1 and 3 (interleave step 2), dense FFNs of their own width in
#: 0 and 2; RoPE layers chunked (8 tokens), layer 3 NoPE (transformers' every 4th).
LLAMA4 = dict(hidden_size=48, intermediate_size=24, intermediate_size_mlp=40,
              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              num_local_experts=3, num_experts_per_tok=1, interleave_moe_layer_step=2,
              attention_chunk_size=8, vocab_size=64)
SPARSE = {1, 3}


def build_llama4(path, **overrides):
    """The model, every weight and norm gain spread (the router and gains start trivial)."""
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(T.Llama4TextConfig(**{**LLAMA4, **overrides}))
    spread_parameters(model)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def llama4(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama4") / "ckpt"
    return build_llama4(path), path


def expert_weights(moe, expert, d_e: int) -> dict[str, torch.Tensor]:
    """Expert ``expert``'s W_gate, W_up, W_down ``(out, in)`` from the live module: the
    columns of ``gate_up_proj[e]`` (``x @ W``: gate first) and ``down_proj[e]``, transposed."""
    if expert == SHARED:
        s = moe.shared_expert
        return {"W_gate": s.gate_proj.weight, "W_up": s.up_proj.weight,
                "W_down": s.down_proj.weight}
    gate_up, down = moe.experts.gate_up_proj[expert], moe.experts.down_proj[expert]
    return {"W_gate": gate_up[:, :d_e].T, "W_up": gate_up[:, d_e:].T, "W_down": down.T}


def test_llama4_experts_router_and_dense_layers_reproduce_the_live_modules(llama4):
    """Each expert's SwiGLU from the weights read equals the live ``Llama4TextExperts``
    forward of that expert (all experts run on the same tokens, as its ``bmm`` does), the
    shared expert its module, the router's logits ``Llama4Router``'s; dense layers' FFN is
    ``feed_forward.*_proj`` of width ``intermediate_size_mlp``."""
    model, path = llama4
    ckpt = open_checkpoint(str(path))
    assert ckpt.moe.sparse_layers == SPARSE and ckpt.expert_layout.fused
    assert (ckpt.dims.d_ff, ckpt.moe.d_expert, ckpt.moe.d_shared) == (40, 24, 24)
    assert ckpt.layer_kinds.kinds == ("chunked", "chunked", "chunked", "nope")
    n, x = ckpt.moe.n_experts, torch.randn(5, 48)
    for layer in range(4):
        ff = model.model.layers[layer].feed_forward
        ours = ckpt.read_layer(layer)
        if layer not in SPARSE:
            with torch.no_grad():
                for wt, module in (("W_gate", ff.gate_proj), ("W_up", ff.up_proj)):
                    np.testing.assert_allclose(x.numpy() @ ours[wt].T, module(x), atol=1e-5)
                np.testing.assert_allclose(x[:, :40].numpy() @ ours["W_down"].T,
                                           ff.down_proj(x[:, :40]), atol=1e-5)
            continue
        assert set(ours) == {"W_Q", "W_K", "W_V", "W_O"}
        with torch.no_grad():
            _, logits = ff.router(x)
            every = ff.experts(x.repeat(n, 1)).view(n, 5, 48)      # expert e: block e
            shared = ff.shared_expert(x)
        np.testing.assert_allclose(x.numpy() @ ckpt.read_router(layer).T, logits, atol=1e-5)
        seen = []
        for expert, w in ckpt.iter_experts(layer):
            seen.append(expert)
            w = {wt: torch.from_numpy(a) for wt, a in w.items()}
            out = (torch.nn.functional.silu(x @ w["W_gate"].T) * (x @ w["W_up"].T)) @ \
                w["W_down"].T
            ref = shared if expert == SHARED else every[expert]
            np.testing.assert_allclose(out.numpy(), ref.numpy(), atol=1e-4,
                                       err_msg=f"layer {layer} expert {expert}")
        assert seen == [*range(n), SHARED]


def test_llama4_per_expert_effective_ranks_and_alignment(llama4):
    """One rank row per expert weight, equal to numpy's SVD of the live module's weights with
    the pre-FFN gain folded (``W diag(g)`` for W_gate and W_up); each expert's and router row's
    alignment with every head's top-k subspace (``||W V_k^T||_F^2 / ||W||_F^2``, from the
    stored per-direction energies) equal to that of the naive float64 SVD of the formed
    kernel."""
    model, path = llama4
    ckpt = open_checkpoint(str(path), fold_norms=True)
    k, d_head = 3, ckpt.dims.d_head
    for layer in sorted(SPARSE):
        res = extract_layer(ckpt, layer, torch.device("cpu"), fold_norms=True)
        rows = [r for r in res.weight_ranks if len(r) == 5]
        ff = model.model.layers[layer].feed_forward
        g = model.model.layers[layer].post_attention_layernorm.weight.detach().numpy()
        assert len(rows) == 3 * (ckpt.moe.n_experts + 1)
        for _, wt, shape, eff, expert in rows:
            e = expert if expert == SHARED else int(expert)
            w = expert_weights(ff, e, 24)[wt].detach().numpy() * (g if wt != "W_down" else 1)
            assert shape == f"{w.shape[0]}x{w.shape[1]}"
            assert eff == pytest.approx(reference_eff_rank(w), rel=1e-4), (layer, wt, expert)
        units = [expert_weights(ff, e, 24)["W_gate"].detach().double().numpy() * g
                 for e in (*range(ckpt.moe.n_experts), SHARED)]
        units += list(ff.router.weight.detach().double().numpy() * g)      # router rows
        assert res.expert_norm2.shape == (len(units),)
        qk = folded_attention(model, "llama4_text", layer)
        for head in range(ckpt.dims.n_heads):
            v = naive_kernel_svd(qk["W_Q"], qk["W_K"], head, d_head)[1][:k]
            for u, w in enumerate(units):
                w = np.atleast_2d(w)
                expected = np.square(w @ v.T).sum() / np.square(w).sum()
                got = res.expert_energy[u, head, :k].sum() / res.expert_norm2[u]
                assert got == pytest.approx(expected, rel=1e-4, abs=1e-7), (layer, head, u)


def test_llama4_multimodal_checkpoint_reads_as_its_text_tower(tmp_path):
    """Llama4ForConditionalGeneration (``llama4``, as Llama 4 is published: ``text_config``,
    weights under ``language_model.model.``) reads as its text model saved alone: the same
    dimensions, experts, layer kinds and every weight, expert and router, raw and folded."""
    torch.manual_seed(3)
    vision = T.Llama4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, image_size=28, patch_size=14,
                                  vision_output_dim=32, projector_input_dim=32,
                                  projector_output_dim=32)
    model = T.Llama4ForConditionalGeneration(T.Llama4Config(
        text_config=T.Llama4TextConfig(**LLAMA4).to_dict(), vision_config=vision.to_dict()))
    model.save_pretrained(tmp_path / "mm")
    model.language_model.save_pretrained(tmp_path / "text")
    for fold in (False, True):
        ours = open_checkpoint(str(tmp_path / "mm"), fold)
        ref = open_checkpoint(str(tmp_path / "text"), fold)
        assert (ours.architecture, ref.architecture) == ("llama4", "llama4_text")
        assert (ours.dims, ours.moe, ours.layer_kinds) == (ref.dims, ref.moe, ref.layer_kinds)
        got, expected = all_weights(ours, fold), all_weights(ref, fold)
        assert got.keys() == expected.keys()
        for key, w in expected.items():
            np.testing.assert_array_equal(got[key], w, err_msg=f"{key} fold {fold}")


def folded_attention(model, arch: str, layer: int) -> dict[str, np.ndarray]:
    """W_Q and W_K of the live module with their norm gains folded as the workflow's default
    does: the pre-attention gain on the columns (SmolLM3, Llama 4), OLMo 3's QK-norm gains over
    the whole projection on the rows; float64."""
    blk = model.model.layers[layer]
    att = blk.self_attn
    w = {wt: m.weight.detach().double().numpy() for wt, m in (("W_Q", att.q_proj),
                                                              ("W_K", att.k_proj))}
    if arch == "olmo3":
        return {"W_Q": att.q_norm.weight.detach().double().numpy()[:, None] * w["W_Q"],
                "W_K": att.k_norm.weight.detach().double().numpy()[:, None] * w["W_K"]}
    g = blk.input_layernorm.weight.detach().double().numpy()
    return {wt: a * g for wt, a in w.items()}


def reference_similarity(model, arch: str, head: int, k: int, d_head: int) -> np.ndarray:
    """``(L, L)``: ``||V_a V_b^T||_F^2 / k`` of head ``head``'s top-k right singular vectors of
    the formed kernel (naive float64 SVD) at every two layers."""
    bases = []
    for layer in range(len(model.model.layers)):
        w = folded_attention(model, arch, layer)
        bases.append(naive_kernel_svd(w["W_Q"], w["W_K"], head, d_head)[1][:k])
    return np.array([[np.square(a @ b.T).sum() / k for b in bases] for a in bases])


@pytest.mark.workflow
def test_workflow_on_the_new_families(tmp_path):
    """SmolLM3 (NoPE layer 1), OLMo 3 (sliding, full, sliding) and Llama 4 (chunked and NoPE
    layers, experts) end to end: similarity of the sampled heads and effective ranks equal the
    references from the live modules, model.json and the per-layer tables label every layer
    with transformers' kind, and the report's caveat names the layers of each kind."""
    models = {"smollm3": build_dense("smollm3", tmp_path / "ckpt" / "smollm3"),
              "olmo3": build_dense("olmo3", tmp_path / "ckpt" / "olmo3"),
              "llama4": build_llama4(tmp_path / "ckpt" / "llama4")}
    workdir = tmp_path / "run"
    assert_ok(run_snakemake(workdir, *[f"results/{name}/k3/report.md" for name in models],
                            config={"models": {name: {"source": str(tmp_path / "ckpt" / name)}
                                               for name in models},
                                    "top_k": 3, "heads": {"sample": 2}, "device": "cpu"},
                            timeout=900))
    caveats = {"smollm3": "RoPE layers (full: 0, 2): taken before RoPE; RoPE makes the true"
                          " kernel depend on the relative position, and this is its zero-offset"
                          " slice. NoPE layers (1): exact, no position enters their score.",
               "olmo3": "RoPE layers (full: 1; sliding over a window of 8 tokens: 0, 2)",
               "llama4": "RoPE layers (chunked in chunks of 8 tokens: 0-2): taken before RoPE;"
                         " RoPE makes the true kernel depend on the relative position, and this"
                         " is its zero-offset slice. NoPE layers (3): exact"}
    for name, model in models.items():
        r = workdir / "results" / name
        meta = json.loads((r / "model.json").read_text())
        kinds = reference_kinds(model)
        assert meta["layer_types"] == kinds, name
        assert list(pd.read_csv(r / "k3" / "layers.csv")["layer_type"]) == kinds, name
        within = pd.read_parquet(r / "k3" / "within_layer.parquet")
        assert list(within["layer_type"]) == kinds, name
        for head in (0, 3):
            np.testing.assert_allclose(
                np.load(r / "k3" / f"similarity_head{head}.npy"),
                reference_similarity(model, name, head, 3, meta["d_head"]), atol=2e-5,
                err_msg=f"{name} head {head}")
        ranks = pd.read_csv(r / "effective_ranks.csv")
        for _, row in ranks[ranks["weight_type"].isin(["W_Q", "W_K"])].iterrows():
            w = folded_attention(model, name, int(row["layer_idx"]))[row["weight_type"]]
            assert row["eff_rank"] == pytest.approx(reference_eff_rank(w), rel=1e-4), name
        report = (r / "k3" / "report.md").read_text()
        assert caveats[name] in report, (name, report[:2000])
    ranks = pd.read_csv(workdir / "results/llama4/effective_ranks.csv")
    sparse = ranks[ranks["layer_idx"].isin(SPARSE) & ranks["expert"].notna()]
    assert len(sparse) == 2 * 3 * 4            # two sparse layers, 3 routed + shared, 3 each


# --- GGUF, as llama.cpp's converter writes these families (tests/gguf_convert.py) ---------

#: Widths multiples of 32 (the Q8_0 block), so that every weight is quantized.
GGUF_COMMON = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
GGUF_CONFIGS = {
    "smollm3": lambda: T.SmolLM3Config(**GGUF_COMMON, intermediate_size=96, pad_token_id=0),
    "olmo3": lambda: T.Olmo3Config(**GGUF_COMMON, intermediate_size=96, sliding_window=16),
    "llama4_text": lambda: T.Llama4TextConfig(**{**LLAMA4, **GGUF_COMMON}, intermediate_size=32,
                                              intermediate_size_mlp=96),
}
#: general.architecture as the converter writes it (OLMo 3 is Olmo2Model's).
GGUF_ARCH = {"smollm3": "smollm3", "olmo3": "olmo2", "llama4_text": "llama4"}


@pytest.fixture(scope="module", params=sorted(GGUF_CONFIGS))
def gguf_pair(request, tmp_path_factory):
    """(arch, HF directory, F32 GGUF, Q8_0 GGUF) of one tiny model."""
    from gguf import GGMLQuantizationType as QT
    from gguf_convert import convert_hf_to_gguf

    arch, root = request.param, tmp_path_factory.mktemp(request.param)
    if arch == "llama4_text":
        build_llama4(root / "hf", **{**GGUF_COMMON, "intermediate_size": 32,
                                     "intermediate_size_mlp": 96})
    else:
        torch.manual_seed(2)
        model = T.AutoModelForCausalLM.from_config(GGUF_CONFIGS[arch]())
        spread_parameters(model, weights=False)
        model.save_pretrained(root / "hf")
    f32 = convert_hf_to_gguf(root / "hf", root / "f32.gguf")[0]
    q8 = convert_hf_to_gguf(root / "hf", root / "q8.gguf", QT.Q8_0)[0]
    return arch, root / "hf", f32, q8


def all_weights(ckpt, fold: bool) -> dict:
    """Every weight of every layer, each expert's and each router, by (layer, what)."""
    out = {}
    for layer in range(ckpt.dims.n_layers):
        out.update({(layer, wt): w for wt, w in ckpt.read_layer(layer, fold).items()})
        if ckpt.is_sparse(layer):
            out[(layer, "router")] = ckpt.read_router(layer, fold)
            for expert, w in ckpt.iter_experts(layer, fold):
                out.update({(layer, f"{wt} expert {expert}"): a for wt, a in w.items()})
    return out


def test_gguf_of_the_new_families_reads_as_their_hf_checkpoint(gguf_pair):
    """The F32 file gives every weight, expert and router of the Hugging Face checkpoint back,
    raw and folded (SmolLM3's RoPE row permutation undone; OLMo 3's QK-norms over the whole
    projection; Llama 4's experts split and transposed by the converter); the layer kinds are
    llama.cpp's, which match transformers' (Llama 4's chunk is llama.cpp's 8192 tokens: the
    converter writes none); the Q8_0 file gives the dequantized quantization of each."""
    from gguf import GGMLQuantizationType as QT
    from gguf.quants import dequantize, quantize

    arch, hf, f32, q8 = gguf_pair
    for fold in (False, True):
        ref, ours = open_checkpoint(str(hf), fold), open_checkpoint(str(f32), fold)
        assert ours.architecture == GGUF_ARCH[arch] and ours.dims == ref.dims
        assert ours.moe == ref.moe
        assert ours.layer_kinds.kinds == ref.layer_kinds.kinds
        assert ours.layer_kinds.window == (8192 if arch == "llama4_text" else
                                           ref.layer_kinds.window)
        expected, got = all_weights(ref, fold), all_weights(ours, fold)
        assert got.keys() == expected.keys()
        for key, w in expected.items():
            np.testing.assert_allclose(got[key], w, rtol=1e-6, atol=1e-7,
                                       err_msg=f"{arch} {key} fold {fold}")
    assert set(open_checkpoint(str(hf)).layer_kinds.kinds) == {
        "smollm3": {"full", "nope"}, "olmo3": {"sliding", "full"},
        "llama4_text": {"chunked", "nope"}}[arch]
    quantized = open_checkpoint(str(q8))
    assert quantized.storage_dtype.startswith("Q8_0")
    got = all_weights(quantized, False)
    for key, w in all_weights(open_checkpoint(str(hf)), False).items():
        expected = dequantize(quantize(w, QT.Q8_0), QT.Q8_0) if w.shape[-1] % 32 == 0 else w
        np.testing.assert_array_equal(got[key], expected, err_msg=f"{arch} {key} Q8_0")
