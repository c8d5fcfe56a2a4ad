"""DeepSeek-V2/V3 multi-head latent attention (MLA), built by transformers' own config classes:
each head's kernel, query vectors and OV circuit equal a float64 SVD of the ``d x d`` map formed
from the live module's projections (``q_a_proj``, ``q_b_proj`` or ``q_proj``,
``kv_a_proj_with_mqa``, ``kv_b_proj``, ``o_proj``, applied to the identity), with and without
folded norm gains; effective ranks against numpy; dense first layers and shared experts; the
workflow end to end."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import transformers as T
from conftest import assert_ok, assert_one_line, naive_kernel, reference_eff_rank, run_snakemake
from gguf_convert import convert_hf_to_gguf
from test_moe import build

from weight_geometry.architectures import SHARED
from weight_geometry.checkpoint import open_checkpoint
from weight_geometry.errors import UserError
from weight_geometry.extraction import extract_layer

D, H, NOPE, ROPE, V, KV_RANK, Q_RANK = 64, 4, 16, 8, 16, 32, 32
M = NOPE + ROPE
COMMON = dict(hidden_size=D, intermediate_size=96, num_hidden_layers=2, num_attention_heads=H,
              num_key_value_heads=H, vocab_size=64, max_position_embeddings=64,
              kv_lora_rank=KV_RANK, qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE, v_head_dim=V,
              n_routed_experts=4, moe_intermediate_size=32, num_experts_per_tok=2,
              first_k_dense_replace=1)
#: Layer 0 dense, layer 1 sparse with shared experts (n_shared_experts x 32 wide).
CONFIGS = {
    "v2-lora": lambda: T.DeepseekV2Config(**COMMON, q_lora_rank=Q_RANK, n_shared_experts=2),
    "v3-lora": lambda: T.DeepseekV3Config(**COMMON, q_lora_rank=Q_RANK, n_shared_experts=1),
    "v3-nolora": lambda: T.DeepseekV3Config(**COMMON, q_lora_rank=None, n_shared_experts=1,
                                            n_group=1, topk_group=1),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def built(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / "ckpt"
    model = build(request.param, path, config=CONFIGS[request.param]())
    return request.param, model.double(), path


def effective_projections(model, layer: int, fold: bool) -> dict[str, np.ndarray]:
    """Each head's effective W_Q ``(h m, d)``, W_K ``(h m, d)`` (the shared RoPE rows in every
    head's block), W_V ``(h v, d)`` and W_O ``(d, h v)``, float64, from the live module's own
    layers applied to the identity (or, with ``fold``, to ``diag(g_attn)``), its latent RMSNorms
    replaced by their gains (``fold``) or by nothing: the normalization is left out. Sizes are
    the module's own."""
    blk = model.model.layers[layer]
    att = blk.self_attn
    d, h, nope, rope, v = (att.hidden_size, att.num_heads, att.qk_nope_head_dim,
                           att.qk_rope_head_dim, att.v_head_dim)
    x = torch.eye(d, dtype=torch.float64)
    if fold:
        x = x * blk.input_layernorm.weight.detach()

    def gain(norm):
        return (lambda t: t * norm.weight) if fold else (lambda t: t)

    with torch.no_grad():
        if att.q_lora_rank is None:
            q = att.q_proj(x)
        else:
            q = att.q_b_proj(gain(att.q_a_layernorm)(att.q_a_proj(x)))
        kv_a = att.kv_a_proj_with_mqa(x)
        latent, k_rot = kv_a[:, :att.kv_lora_rank], kv_a[:, att.kv_lora_rank:]
        kv = att.kv_b_proj(gain(att.kv_a_layernorm)(latent)).reshape(d, h, nope + v)
        k = torch.cat([kv[..., :nope], k_rot[:, None].expand(d, h, rope)], dim=-1)
        return {"W_Q": q.T.numpy(), "W_K": k.reshape(d, h * (nope + rope)).T.numpy(),
                "W_V": kv[..., nope:].reshape(d, h * v).T.numpy(),
                "W_O": att.o_proj.weight.detach().numpy()}


def assert_same_vectors(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    """Rows equal up to sign (distinct singular values of random weights)."""
    dots = np.abs(np.einsum("rd,rd->r", ours.astype(np.float64), ref))
    np.testing.assert_allclose(dots, 1, atol=2e-5, err_msg=what)


@pytest.mark.parametrize("fold", [False, True], ids=["raw", "folded"])
def test_kernels_and_ov_circuits_equal_the_formed_maps(built, fold):
    name, model, path = built
    ckpt = open_checkpoint(str(path), fold_norms=fold)
    assert (ckpt.dims.d_head, ckpt.dims.n_kv_heads) == (M, H)
    assert ckpt.latent.q_rank == (0 if "nolora" in name else Q_RANK)
    for layer in range(2):
        res = extract_layer(ckpt, layer, torch.device("cpu"), fold_norms=fold)
        w = effective_projections(model, layer, fold)
        assert res.vectors.shape == res.ov_write_vectors.shape == (H, M, D)
        for head in range(H):
            u, s, vt = np.linalg.svd(naive_kernel(w["W_Q"], w["W_K"], head, M))
            np.testing.assert_allclose(res.singular_values[head], s[:M], rtol=1e-6,
                                       atol=1e-9 * s[0])
            assert s[M] < 1e-9 * s[0]       # rank <= nope + rope
            assert_same_vectors(res.vectors[head], vt[:M], f"{name} {layer} {head} right")
            assert_same_vectors(res.query_vectors[head], u[:, :M].T, f"{name} {head} left")
            ov = w["W_O"][:, head * V:(head + 1) * V] @ w["W_V"][head * V:(head + 1) * V]
            u, t, vt = np.linalg.svd(ov)
            np.testing.assert_allclose(res.ov_singular_values[head, :V], t[:V], rtol=1e-6)
            np.testing.assert_array_equal(res.ov_singular_values[head, V:], 0)
            assert not res.ov_write_vectors[head, V:].any()
            assert_same_vectors(res.ov_write_vectors[head, :V], u[:, :V].T, f"{head} OV out")
            assert_same_vectors(res.ov_read_vectors[head, :V], vt[:V], f"{head} OV in")


def test_effective_ranks_and_ffn_energies(built):
    """W_Q, W_K, W_V, W_O ranks of the effective projections, W_gate/W_up/W_down of the dense
    layer and of every expert (``shared`` included) against numpy; the FFN energies of the
    subspaces (dense W_gate, the routed experts' mean Gram) against the formed quadratic
    forms."""
    name, model, path = built
    ckpt = open_checkpoint(str(path), fold_norms=True)
    assert ckpt.moe.sparse_layers == {1}
    for layer in range(2):
        res = extract_layer(ckpt, layer, torch.device("cpu"), fold_norms=True)
        w = effective_projections(model, layer, True)
        mlp = model.model.layers[layer].mlp
        g_ffn = model.model.layers[layer].post_attention_layernorm.weight.detach().numpy()
        dense = [r for r in res.weight_ranks if len(r) == 4]
        assert [r[1] for r in dense][:4] == ["W_Q", "W_K", "W_V", "W_O"]
        for _, wt, shape, eff in dense[:4]:
            assert shape == "x".join(map(str, w[wt].shape))
            assert eff == pytest.approx(reference_eff_rank(w[wt]), rel=1e-4), (name, wt)
        v = res.vectors.astype(np.float64)
        if layer == 0:
            gate = mlp.gate_proj.weight.detach().numpy() * g_ffn
            assert dense[4][1:] == ("W_gate", "96x64", pytest.approx(reference_eff_rank(gate),
                                                                       rel=1e-4))
            gram = gate.T @ gate
        else:
            experts = [r for r in res.weight_ranks if len(r) == 5]
            n_shared = 2 if name.startswith("v2") else 1
            assert {r[4] for r in experts} == {"0", "1", "2", "3", SHARED}
            shared = [r for r in experts if r[4] == SHARED and r[1] == "W_gate"]
            assert shared[0][2] == f"{32 * n_shared}x{D}"
            ref = mlp.shared_experts.gate_proj.weight.detach().numpy() * g_ffn
            assert shared[0][3] == pytest.approx(reference_eff_rank(ref), rel=1e-4)
            gates = [mlp.experts.gate_up_proj[e, :32].detach().numpy() * g_ffn
                     for e in range(4)]
            gram = sum(g.T @ g for g in gates) / 4
            # per-unit energies (each expert's W_gate, the shared one, each router row) go
            # through the latent basis too (LatentSubspaces._project)
            router = mlp.gate.weight.detach().numpy() * g_ffn
            units = [*gates, ref, *router[:, None]]
            assert res.expert_energy.shape == (len(units), H, M)
            for u, w_u in enumerate(units):
                ref_u = np.einsum("hrd,de,hre->hr", v, w_u.T @ w_u, v)
                np.testing.assert_allclose(res.expert_energy[u], ref_u, rtol=1e-4,
                                           atol=1e-6 * np.trace(w_u.T @ w_u), err_msg=u)
        np.testing.assert_allclose(res.ffn_input_energy, np.einsum("hrd,de,hre->hr", v, gram, v),
                                   rtol=1e-4, atol=1e-6 * np.trace(gram))
        # the row-space nulls' spectra: G restricted to each head's key row space, which its
        # M right vectors span (full-rank kernels), M eigenvalues each
        restricted = np.linalg.eigvalsh(np.einsum("hrd,de,hse->hrs", v, gram, v))[:, ::-1]
        np.testing.assert_allclose(res.ffn_input_rowspace_eigenvalues, restricted, rtol=1e-4,
                                   atol=1e-6 * np.trace(gram))


def test_ov_sides_are_handed_over_unpadded(built):
    """With an ``emit``, each OV part leaves the pass with its ``v`` rows per head and ``m``,
    the rows the receiver pads it to (no padded copy, no product of zero rows with ``Q_m``);
    the kernel's parts have their ``m`` rows already."""
    _, _, path = built
    seen = {}
    extract_layer(open_checkpoint(str(path)), 0, torch.device("cpu"),
                  emit=lambda name, array, rows=None: seen.update({name: (array.shape, rows)}))
    assert seen["ov_singular_values"] == ((H, V), M)
    assert seen["ov_write_vectors"] == seen["ov_read_vectors"] == ((H, V, D), M)
    assert seen["vectors"] == seen["query_vectors"] == ((H, M, D), None)
    assert seen["singular_values"] == ((H, M), None)


#: The smallest latents with every thin QR (``q_lora_rank = m``, ``kv_lora_rank = nope``),
#: odd widths, ``v`` neither ``m`` nor ``nope``: m = 8 of 64.
SMALLEST = dict(q_lora_rank=8, kv_lora_rank=5, qk_nope_head_dim=5, qk_rope_head_dim=3,
                v_head_dim=7)


def test_smallest_latents_with_odd_widths_equal_the_formed_maps(tmp_path):
    """At the smallest allowed latent ranks (square ``X_i`` and ``Y_i``) and odd widths, the
    kernels and OV circuits are the formed maps' (folded gains), OV rows padded from 7 to 8;
    ``W_UV_i`` (7 x 5) leaves each OV circuit of rank 5, its other singular values 0."""
    cfg = T.DeepseekV3Config(**{**COMMON, **SMALLEST}, n_shared_experts=1)
    model = build("v3", tmp_path / "m", config=cfg).double()
    ckpt, m, v, rank = open_checkpoint(str(tmp_path / "m"), fold_norms=True), 8, 7, 5
    res = extract_layer(ckpt, 1, torch.device("cpu"), fold_norms=True)
    w = effective_projections(model, 1, True)
    for head in range(H):
        _, s, vt = np.linalg.svd(naive_kernel(w["W_Q"], w["W_K"], head, m))
        np.testing.assert_allclose(res.singular_values[head], s[:m], rtol=1e-6)
        assert s[m] < 1e-9 * s[0]
        assert_same_vectors(res.vectors[head], vt[:m], f"smallest {head}")
        ov = w["W_O"][:, head * v:(head + 1) * v] @ w["W_V"][head * v:(head + 1) * v]
        u, t, vt = np.linalg.svd(ov)
        np.testing.assert_allclose(res.ov_singular_values[head], [*t[:v], 0], rtol=1e-6,
                                   atol=1e-9 * t[0])
        assert t[rank - 1] > 1e-3 * t[0] and t[rank] < 1e-9 * t[0]
        assert_same_vectors(res.ov_write_vectors[head, :rank], u[:, :rank].T, f"{head} OV out")
        assert_same_vectors(res.ov_read_vectors[head, :rank], vt[:rank], f"{head} OV in")
        assert not res.ov_read_vectors[head, v:].any()


@pytest.mark.parametrize("overrides, fragments", [
    (dict(q_lora_rank=16), ("q_lora_rank = 16 is not allowed", "= 24 to hidden_size = 64")),
    (dict(q_lora_rank=65), ("q_lora_rank = 65 is not allowed", "= 24 to hidden_size = 64")),
    (dict(kv_lora_rank=8), ("kv_lora_rank = 8 is below qk_nope_head_dim = 16",)),
    (dict(kv_lora_rank=60), ("kv_lora_rank + qk_rope_head_dim = 68 exceeds hidden_size = 64",)),
], ids=["q-below-m", "q-above-d", "kv-below-nope", "kv-above-d"])
def test_latents_without_thin_qrs_are_one_line(tmp_path, overrides, fragments):
    """A query latent narrower than ``m`` or wider than ``d``, a key latent narrower than
    ``nope`` or, with the RoPE key, wider than ``d``: a one-line UserError naming the keys and
    what is allowed, not a shape error from inside a QR."""
    cfg = T.DeepseekV3Config(**{**COMMON, "q_lora_rank": Q_RANK, **overrides},
                             n_shared_experts=1)
    build("v3", tmp_path / "m", config=cfg)
    with pytest.raises(UserError) as info:
        extract_layer(open_checkpoint(str(tmp_path / "m")), 0, torch.device("cpu"))
    assert_one_line(info.value, tmp_path / "m", *fragments)


def test_fused_experts_read_as_the_per_expert_ones(tmp_path):
    """The experts as transformers 5 holds them (``mlp.experts.gate_up_proj`` ``(E, 2 d_e, d)``,
    ``down_proj``), one slice at a time, equal the per-expert tensors ``save_pretrained``
    writes; the shared experts and the router are the same tensors in both."""
    build("v2-lora", tmp_path / "per", config=CONFIGS["v2-lora"]())
    build("v2-lora", tmp_path / "fused", fused=True, config=CONFIGS["v2-lora"]())
    per, fused = (open_checkpoint(str(tmp_path / n), fold_norms=True) for n in ("per", "fused"))
    assert fused.expert_layout.fused and not per.expert_layout.fused
    pairs = zip(per.iter_experts(1, True), fused.iter_experts(1, True), strict=True)
    for (e, a), (f, b) in pairs:
        assert e == f and a.keys() == b.keys()
        for wt in a:
            np.testing.assert_array_equal(a[wt], b[wt], err_msg=f"{e} {wt}")
    np.testing.assert_array_equal(per.read_router(1, True), fused.read_router(1, True))


def test_model_json_says_what_is_left_out(built):
    _, _, path = built
    described = open_checkpoint(str(path)).describe(fold_norms=True)
    assert described["latent_attention"]["kv_rank"] == KV_RANK
    assert "left out" in described["latent_attention"]["note"]
    assert described["weight_types"][:4] == ["W_Q", "W_K", "W_V", "W_O"]


def test_bad_latent_config_is_one_line(tmp_path):
    build("v3-lora", tmp_path / "m", config=CONFIGS["v3-lora"]())
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    for key, value, fragment in (("v_head_dim", 64, "v_head_dim = 64 exceeds"),
                                 ("kv_lora_rank", "32", "kv_lora_rank: '32' is not allowed"),
                                 ("kv_lora_rank", 16, "kv_a_proj_with_mqa.weight has shape")):
        (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(UserError) as info:
            open_checkpoint(str(tmp_path / "m"))
        assert fragment in str(info.value) and "\n" not in str(info.value)


def test_deepseek_v3_multi_token_prediction_layer_is_allowed(tmp_path):
    """Published DeepSeek-V3 checkpoints store the multi-token-prediction layer after the last
    (``model.layers.61``, ``num_nextn_predict_layers``: 1): allowed, not read; without the key
    a stored layer past the last is refused in one line."""
    from safetensors.numpy import load_file, save_file

    build("v3-lora", tmp_path / "m", config=CONFIGS["v3-lora"]())
    weights = load_file(str(tmp_path / "m" / "model.safetensors"))
    weights.update({name.replace("layers.1.", "layers.2."): w for name, w in weights.items()
                    if "layers.1." in name})
    save_file(weights, str(tmp_path / "m" / "model.safetensors"))
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 1          # as DeepseekV3Config writes it
    assert open_checkpoint(str(tmp_path / "m")).dims.n_layers == 2
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg,
                                                            "num_nextn_predict_layers": 0}))
    with pytest.raises(UserError) as info:
        open_checkpoint(str(tmp_path / "m"))
    assert "is of layer 2" in str(info.value) and "\n" not in str(info.value)


def test_gguf_deepseek2_metadata():
    """llama.cpp's MQA-over-the-latent metadata give the heads' own widths; layers counted
    after the decoder's (``nextn_predict_layers``) are not analysed; a key length not above the
    RoPE width is refused in one line."""
    from weight_geometry.architectures import dims_from_gguf_metadata

    a = "deepseek2."
    meta = {a + "block_count": 4, a + "nextn_predict_layers": 1, a + "embedding_length": 64,
            a + "feed_forward_length": 96, a + "attention.head_count": 4,
            a + "attention.head_count_kv": 1, a + "attention.key_length": 40,
            a + "attention.value_length": 32, a + "attention.key_length_mla": 24,
            a + "attention.value_length_mla": 16, a + "attention.kv_lora_rank": 32,
            a + "rope.dimension_count": 8}
    dims = dims_from_gguf_metadata(meta, "deepseek2")
    assert (dims.n_layers, dims.n_heads, dims.n_kv_heads, dims.d_head) == (3, 4, 4, 24)
    with pytest.raises(UserError) as info:
        dims_from_gguf_metadata({**meta, a + "attention.key_length_mla": 8}, "deepseek2")
    assert "key_length_mla = 8 is not above" in str(info.value)


@pytest.mark.parametrize("qtype", ["F16", "Q8_0"])
def test_gguf_deepseek2_reads_back_the_hugging_face_weights(built, tmp_path, qtype):
    """The same model written as llama.cpp's converter writes ``deepseek2`` (MQA metadata,
    ``kv_b_proj`` split into ``attn_k_b`` (transposed) and ``attn_v_b``, experts stacked into
    ``ffn_*_exps``), in two storage types: every latent weight, expert and router reads back
    as the Hugging Face checkpoint's (to the type's rounding), and so do the extraction's
    products."""
    import gguf

    name, _, path = built
    out = tmp_path / "model.gguf"
    convert_hf_to_gguf(path, out, getattr(gguf.GGMLQuantizationType, qtype))
    hf, gg = open_checkpoint(str(path), fold_norms=True), open_checkpoint(str(out), True)
    assert (gg.architecture, gg.dims, gg.latent) == ("deepseek2", hf.dims, hf.latent)
    assert gg.moe == hf.moe and gg.adapter.latent.split_kv_b
    tol = {"F16": 2e-3, "Q8_0": 2e-2}[qtype]
    for part in ("kv_a", "kv_b", "o", *(("q_a", "q_b") if hf.latent.q_rank else ("q",))):
        ours, ref = gg.read_latent(1, part, True), hf.read_latent(1, part, True)
        np.testing.assert_allclose(ours, ref, atol=tol * np.abs(ref).max(), err_msg=part)
    for (e, ours), (_, ref) in zip(gg.iter_experts(1, True), hf.iter_experts(1, True),
                                   strict=True):
        for wt in ours:
            np.testing.assert_allclose(ours[wt], ref[wt], atol=tol * np.abs(ref[wt]).max(),
                                       err_msg=f"expert {e} {wt}")
    router = hf.read_router(1, True)
    np.testing.assert_allclose(gg.read_router(1, True), router, atol=tol * np.abs(router).max())
    for layer in range(2):
        a, b = (extract_layer(c, layer, torch.device("cpu"), fold_norms=True) for c in (gg, hf))
        np.testing.assert_allclose(a.singular_values, b.singular_values, rtol=5 * tol)
        overlap = np.einsum("hrd,hsd->hrs", a.vectors[:, :3], b.vectors[:, :3]) ** 2
        np.testing.assert_allclose(overlap.sum((1, 2)), 3, atol=50 * tol)
        assert [r[:3] for r in a.weight_ranks] == [r[:3] for r in b.weight_ranks]


@pytest.mark.workflow
def test_workflow_runs_on_deepseek_v3(tmp_path):
    """DeepSeek-V3 (a dense layer, a sparse one with a shared expert) through extraction, the
    effective-rank table, the alignment and the report."""
    build("v3-lora", tmp_path / "ckpt", config=CONFIGS["v3-lora"]())
    workdir = tmp_path / "run"
    targets = [f"results/mla/{p}" for p in ("model.json", "effective_ranks.csv",
                                             "k3/alignment.parquet", "k3/report.md")]
    assert_ok(run_snakemake(workdir, *targets, config={
        "models": {"mla": {"source": str(tmp_path / "ckpt")}}, "top_k": 3,
        "heads": {"sample": 2}, "device": "cpu"}))
    r = workdir / "results" / "mla"
    model = json.loads((r / "model.json").read_text())
    assert model["d_head"] == M and model["latent_attention"]["q_rank"] == Q_RANK
    ranks = pd.read_parquet(r / "effective_ranks.parquet")
    assert set(ranks[ranks["layer_idx"] == 1]["expert"].dropna()) == {"0", "1", "2", "3",
                                                                       "shared"}
    assert len(ranks) == 7 + 4 + 3 * 5
    align = pd.read_parquet(r / "k3" / "alignment.parquet")
    assert align["alignment"].between(0, 1).all()
    assert "latent" in (r / "k3" / "report.md").read_text()
    shutil.rmtree(workdir / ".snakemake", ignore_errors=True)
