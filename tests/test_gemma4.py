"""Gemma 4, built by transformers' own ``Gemma4TextConfig``: per-layer head sizes and KV-head
counts (global layers' ``global_head_dim``, ``num_global_key_value_heads``), layers that reuse
an earlier layer's keys and values (``num_kv_shared_layers``), keys as values
(``attention_k_eq_v``) and double-wide FFNs, each against the live modules: the layer sizes,
each head's kernel and OV circuit against a naive float64 SVD of the maps formed from the live
weights, the folded kernel against what the live q_norm/k_norm compute across layers, the
padded arrays, effective ranks; the workflow end to end; bad configs in one line."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import transformers as T
from conftest import (
    assert_ok,
    assert_one_line,
    naive_kernel_svd,
    reference_eff_rank,
    run_snakemake,
    spread_parameters,
)

from weight_geometry.architectures import dims_from_hf_config
from weight_geometry.checkpoint import open_checkpoint
from weight_geometry.errors import UserError
from weight_geometry.extraction import LayerResult, extract_layer, write_layers
from weight_geometry.head_layout import kv_of_heads, same_keys
from weight_geometry.ksweep import untested_pairs
from weight_geometry.rowspace_nulls import head_pair_null, one_head_null

TYPES = ["sliding_attention", "full_attention"] * 3
D, H = 32, 4
#: Sliding layers: head size 8, 2 KV heads; global layers: 16 and 1 (keys as values).
SIZES = {"sliding_attention": (8, 2), "full_attention": (16, 1)}


def gemma4_config(**changes) -> T.Gemma4TextConfig:
    return T.Gemma4TextConfig(**{
        "vocab_size": 64, "hidden_size": D, "intermediate_size": 24, "num_hidden_layers": 6,
        "num_attention_heads": H, "num_key_value_heads": 2, "head_dim": 8,
        "global_head_dim": 16, "num_global_key_value_heads": 1, "attention_k_eq_v": True,
        "num_kv_shared_layers": 2, "use_double_wide_mlp": True, "layer_types": TYPES,
        "hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": 64, **changes})


def build(path, **changes):
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(gemma4_config(**changes)).double()
    spread_parameters(model)
    model.float().save_pretrained(path)
    return model.double().eval()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma4") / "g4"
    return build(path), path


def source_layers(config) -> list[int]:
    """Transformers' own choice: a ``reuse`` layer reads the ``store`` layer of its kind."""
    modes = config.kv_sharing_modes
    store = {config.layer_types[i]: i for i, mode in enumerate(modes) if mode == "store"}
    return [store[config.layer_types[i]] if mode == "reuse" else i
            for i, mode in enumerate(modes)]


def folded(model, layer: int) -> dict[str, np.ndarray]:
    """``layer``'s folded W_Q, W_K, W_V, W_O from the live modules (float64): the pre-attention
    gain into each projection's columns, the QK-norm gains into each head's rows, W_K and W_V
    from the layer whose keys it reads (W_V = that layer's k_proj where values are keys, with
    no QK-norm gain: v_norm has none)."""
    src = source_layers(model.config)[layer]
    att, own = model.model.layers[src].self_attn, model.model.layers[layer]
    m = own.self_attn.head_dim
    g_q, g_k = (n.weight.detach().numpy() for n in (own.self_attn.q_norm, att.k_norm))
    g_in, g_src = (blk.input_layernorm.weight.detach().numpy()
                   for blk in (own, model.model.layers[src]))
    w_q = own.self_attn.q_proj.weight.detach().numpy() * g_in
    w_k = att.k_proj.weight.detach().numpy() * g_src
    w_v = (att.k_proj if att.v_proj is None else att.v_proj).weight.detach().numpy() * g_src
    return {"W_Q": (w_q.reshape(-1, m, D) * g_q[None, :, None]).reshape(-1, D),
            "W_K": (w_k.reshape(-1, m, D) * g_k[None, :, None]).reshape(-1, D), "W_V": w_v,
            "W_O": own.self_attn.o_proj.weight.detach().numpy()}


def test_layer_sizes_and_reuse_follow_transformers(built):
    """Each layer's head size, KV-head count, FFN width, the layer it takes keys and values
    from and whether its values are its keys, as the live modules have them; model.json
    records them."""
    model, path = built
    ckpt = open_checkpoint(str(path))
    dims, reuse = ckpt.dims, ckpt.kv_reuse
    assert list(reuse.source) == source_layers(model.config) == [0, 1, 2, 3, 2, 3]
    for layer, blk in enumerate(model.model.layers):
        att, own = blk.self_attn, dims.layer(layer)
        assert (own.d_head, own.n_kv_heads) == SIZES[TYPES[layer]]
        assert att.head_dim == own.d_head
        assert att.num_key_value_groups == H // own.n_kv_heads
        assert blk.mlp.gate_proj.out_features == own.d_ff
        assert att.is_kv_shared_layer == (reuse.source[layer] != layer)
        if not att.is_kv_shared_layer:
            assert att.k_proj.out_features == own.n_kv_heads * own.d_head
            assert (att.v_proj is None) == (layer in reuse.keys_as_values)
    record = ckpt.describe()
    assert (record["d_head"], record["n_kv_heads"]) == (16, 2)
    assert record["head_dims"] == [8, 16] * 3 and record["kv_heads"] == [2, 1] * 3
    assert record["kv_shared_layers"] == {"4": 2, "5": 3}
    assert record["keys_as_values"] == [1, 3, 5]
    assert record["layer_types"] == ["sliding", "full"] * 3
    assert "per-layer input embeddings" in record["not_used"]
    assert record["rotary_fractions"] == {"full": 0.25}      # proportional RoPE, transformers'
    rope = model.model.rotary_emb                            # the live global layers' pairs:
    assert int((rope.full_attention_inv_freq > 0).sum()) == int(0.25 * 16) // 2


def test_sizes_of_a_deep_config_as_transformers_resolves_them(tmp_path):
    """A 12-layer config (transformers writes its per_layer_config keys zero-padded, "03"):
    every layer's head size and KV-head count as the config class resolves them."""
    config = gemma4_config(num_hidden_layers=12, layer_types=(["sliding_attention"] * 3
                                                             + ["full_attention"]) * 3)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "03" in saved["per_layer_config"]
    dims = dims_from_hf_config(saved)
    assert [dims.layer(i).d_head for i in range(12)] == [
        config.per_layer_config[i].head_dim for i in range(12)] == [8, 8, 8, 16] * 3
    assert [dims.layer(i).n_kv_heads for i in range(12)] == [
        config.per_layer_config[i].num_key_value_heads for i in range(12)]


def test_kernels_and_circuits_equal_naive_svds_of_live_weights(built):
    """With folded gains, every head's kernel singular values and subspaces (top 3, and all of
    its layer's head size) and OV singular values equal numpy's float64 SVDs of the maps
    formed from the live weights (a reusing layer's W_K and W_V from its source layer); the
    padded rows past a layer's head size are zero, its missing KV heads' eigenvalues NaN."""
    model, path = built
    ckpt = open_checkpoint(str(path), fold_norms=True)
    for layer in range(6):
        m, n_kv = SIZES[TYPES[layer]]
        ref = folded(model, layer)
        ours = ckpt.read_layer(layer, fold_norms=True)
        for wt in ref:
            np.testing.assert_allclose(ours[wt], ref[wt], rtol=1e-6, atol=1e-6,
                                       err_msg=f"{wt} {layer}")
        res = extract_layer(ckpt, layer, torch.device("cpu"), fold_norms=True)
        for i in range(H):
            s_ref, vt_ref = naive_kernel_svd(ref["W_Q"], ref["W_K"], i, m)
            np.testing.assert_allclose(res.singular_values[i, :m], s_ref[:m], rtol=1e-5)
            for k in (3, m):
                v = res.vectors[i, :k].astype(np.float64)
                assert np.square(v @ vt_ref[:k].T).sum() == pytest.approx(k, rel=1e-5)
            j = i // (H // n_kv)
            ov = ref["W_O"][:, i * m:(i + 1) * m] @ ref["W_V"][j * m:(j + 1) * m]
            np.testing.assert_allclose(res.ov_singular_values[i, :m],
                                       np.linalg.svd(ov, compute_uv=False)[:m], rtol=1e-5)
        for name in ("vectors", "query_vectors", "ov_read_vectors", "singular_values",
                     "ffn_input_energy"):
            assert not getattr(res, name)[:, m:].any(), (name, layer)
        eig = res.ffn_input_rowspace_eigenvalues
        assert np.isfinite(eig[:n_kv, :m]).all() and np.isnan(eig[n_kv:]).all()
        assert np.isnan(eig[:, m:]).all()
        gate = model.model.layers[layer].mlp.gate_proj.weight.detach().numpy()
        gate = gate * model.model.layers[layer].pre_feedforward_layernorm.weight.detach().numpy()
        v = res.vectors[0, :m].astype(np.float64)
        np.testing.assert_allclose(res.ffn_input_energy[0, :m], np.square(gate @ v.T).sum(0),
                                   rtol=1e-4)


def test_written_layer_files_equal_the_padded_arrays(built, tmp_path):
    """The extraction job's ``.npy`` files (each array padded as it is written) hold exactly
    the padded arrays of each layer (:func:`extraction.extract_layer`, padded in memory)."""
    _, path = built
    ckpt = open_checkpoint(str(path), fold_norms=True)
    names = LayerResult.array_names()
    paths = {name: tmp_path / f"{name}.npy" for name in names}
    write_layers(ckpt, range(6), torch.device("cpu"), True, paths)
    results = [extract_layer(ckpt, layer, torch.device("cpu"), fold_norms=True)
               for layer in range(6)]
    for name in names:
        np.testing.assert_array_equal(np.load(paths[name]),
                                      np.stack([getattr(r, name) for r in results]), name)


def test_folded_kernel_is_what_the_live_qk_norms_compute(built):
    """The scores transformers computes (q_norm and k_norm outputs, before RoPE: zero offset)
    equal ``x_i^T A y_j / (rms_q rms_k)`` with ``A`` the folded kernel, ``x`` the normalized
    input of the layer without its gain and ``y`` that of the layer whose keys it reads: for a
    layer that reuses keys (4, 5), across layers."""
    model, path = built
    ckpt = open_checkpoint(str(path), fold_norms=True)
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for layer, blk in enumerate(model.model.layers):
        for name, module in (("in", blk.input_layernorm), ("q", blk.self_attn.q_proj),
                             ("qn", blk.self_attn.q_norm),
                             *((("k", blk.self_attn.k_proj), ("kn", blk.self_attn.k_norm))
                               if hasattr(blk.self_attn, "k_proj") else ())):
            hooks.append(module.register_forward_hook(
                lambda _m, _i, out, key=f"{name}{layer}": seen.__setitem__(key, out[0])))
    with torch.no_grad():
        model(torch.arange(5)[None])
    for hook in hooks:
        hook.remove()
    eps = model.config.rms_norm_eps
    for layer in (1, 4, 5):
        src = ckpt.kv_reuse.source[layer]
        m, n_kv = SIZES[TYPES[layer]]
        w = ckpt.read_layer(layer, fold_norms=True)
        gains = [model.model.layers[i].input_layernorm.weight.detach() for i in (layer, src)]
        x, y = seen[f"in{layer}"] / gains[0], seen[f"in{src}"] / gains[1]
        q_raw, k_raw = seen[f"q{layer}"].view(5, H, m), seen[f"k{src}"].view(5, n_kv, m)
        rms_q = (q_raw.pow(2).mean(-1) + eps).sqrt()
        rms_k = (k_raw.pow(2).mean(-1) + eps).sqrt()
        q_hat, k_hat = seen[f"qn{layer}"].view(5, H, m), seen[f"kn{src}"].view(5, n_kv, m)
        for i in range(H):
            j = i // (H // n_kv)
            kernel = (torch.from_numpy(w["W_Q"][i * m:(i + 1) * m]).double().T
                      @ torch.from_numpy(w["W_K"][j * m:(j + 1) * m]).double())
            got = (x @ kernel @ y.T) / rms_q[:, i, None] / rms_k[None, :, j]
            np.testing.assert_allclose(got, q_hat[:, i] @ k_hat[:, j].T, rtol=1e-4, atol=1e-6,
                                       err_msg=f"layer {layer} head {i}")


def test_effective_ranks_of_the_weights_each_layer_stores(built):
    """Effective-rank rows for the weights a layer stores, equal to numpy's: a layer reusing
    keys and values has no W_K/W_V rows (they are its source's), a layer whose values are its
    keys no W_V row; double-wide FFNs at their width."""
    model, path = built
    ckpt = open_checkpoint(str(path))
    for layer, blk in enumerate(model.model.layers):
        rows = extract_layer(ckpt, layer, torch.device("cpu")).weight_ranks
        att = blk.self_attn
        own = {"W_Q": att.q_proj, "W_O": att.o_proj, "W_gate": blk.mlp.gate_proj,
               "W_up": blk.mlp.up_proj, "W_down": blk.mlp.down_proj}
        if not att.is_kv_shared_layer:
            own["W_K"] = att.k_proj
            if att.v_proj is not None:
                own["W_V"] = att.v_proj
        assert sorted(r[1] for r in rows) == sorted(own), layer
        for _, wt, shape, rank in rows:
            w = own[wt].weight.detach().numpy()
            assert shape == f"{w.shape[0]}x{w.shape[1]}"
            assert rank == pytest.approx(reference_eff_rank(w), rel=1e-4), (layer, wt)


def test_multimodal_gemma4_is_read_as_its_text_tower(tmp_path):
    """Gemma4ForConditionalGeneration (``gemma4``): its text tower's layers
    (``model.language_model.``), sizes and reuse from ``text_config``, each weight the live
    tower's; the vision tower is not read."""
    config = T.Gemma4Config(text_config=gemma4_config().to_dict(), audio_config=None,
                            vision_config={"hidden_size": 16, "intermediate_size": 32,
                                           "num_hidden_layers": 1, "num_attention_heads": 2,
                                           "num_key_value_heads": 2, "head_dim": 8})
    torch.manual_seed(0)
    model = T.Gemma4ForConditionalGeneration(config)
    model.save_pretrained(tmp_path / "mm")
    ckpt = open_checkpoint(str(tmp_path / "mm"))
    assert ckpt.architecture == "gemma4" and ckpt.kv_reuse.source == (0, 1, 2, 3, 2, 3)
    assert ckpt.dims.head_dims == (8, 16) * 3 and ckpt.describe()["layer_types"][1] == "full"
    for layer in (1, 5):
        tower = model.model.language_model.layers
        src = ckpt.kv_reuse.source[layer]
        ours = ckpt.read_layer(layer)
        np.testing.assert_array_equal(ours["W_Q"], tower[layer].self_attn.q_proj.weight.detach())
        np.testing.assert_array_equal(ours["W_V"], tower[src].self_attn.k_proj.weight.detach())


def test_layers_reading_the_same_keys_have_no_row_space_null(built):
    """Two kernels that end in the same W_K (a layer reusing keys and its source) share their
    top-k directions beyond the row-space null even for random queries (W_K's own spectrum
    pulls both towards its top directions: Monte Carlo below), so their pairs are left out of
    the tests (NaN null) and of the k-sweep's conditional ratios; every other pair keeps its
    null."""
    rng = np.random.default_rng(0)
    d, m, k = 64, 16, 4
    w_k = rng.standard_normal((m, d))
    sims = []
    for _ in range(200):
        a, b = (np.linalg.svd(rng.standard_normal((m, d)).T @ w_k)[2][:k] for _ in range(2))
        sims.append(np.square(a @ b.T).sum() / k)
    haar = k / m          # the row-space null's mean for one shared row space (t1 = m)
    assert np.mean(sims) > haar + 5 * np.std(sims) / np.sqrt(len(sims))
    _, path = built
    record = open_checkpoint(str(path)).describe()
    shared = {(2, 4), (4, 2), (3, 5), (5, 3)}
    overlaps = np.ones((2, 6, 2, 6, 2))
    mean, std = one_head_null(overlaps, 3, record, 0)
    for a in range(6):
        for b in range(6):
            assert np.isnan(mean[a, b]) == np.isnan(std[a, b]) == ((a, b) in shared)
    assert {tuple(x) for x in np.argwhere(untested_pairs(record, [0, 1]))} == shared
    pair_mean, _ = head_pair_null(overlaps, 3, record)
    mask = same_keys(record, kv_of_heads(record))
    assert (np.isnan(pair_mean) == mask).all() and mask[2, 0, 4, 1] and not mask[2, 0, 4, 2]


#: A mixture-of-experts Gemma 4: routed experts beside the dense FFN in every layer.
MOE = {"enable_moe_block": True, "num_experts": 4, "top_k_experts": 2,
       "moe_intermediate_size": 12, "use_double_wide_mlp": False}


@pytest.fixture(scope="module")
def built_moe(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma4moe") / "g4moe"
    return build(path, **MOE), path


def expert_units(model, layer: int) -> list[tuple[str, int | None, np.ndarray]]:
    """``(expert, router row, folded weight)`` of each unit of ``layer`` from the live modules:
    every routed expert's W_gate with the experts' own pre-FFN gain, the dense FFN's W_gate
    (the shared expert) with the pre-FFN gain, every router row with ``router.scale``."""
    blk = model.model.layers[layer]
    g2 = blk.pre_feedforward_layernorm_2.weight.detach().numpy()
    d_e = blk.experts.intermediate_dim
    units = [(str(e), None, w[:d_e].detach().numpy() * g2)
             for e, w in enumerate(blk.experts.gate_up_proj)]
    units.append(("shared", None, blk.mlp.gate_proj.weight.detach().numpy()
                  * blk.pre_feedforward_layernorm.weight.detach().numpy()))
    router = blk.router.proj.weight.detach().numpy() * blk.router.scale.detach().numpy()
    return units + [("router", e, router[e:e + 1]) for e in range(len(router))]


def test_moe_experts_and_router_read_as_the_live_modules(built_moe):
    """Every layer sparse; each routed expert's W_gate/W_up/W_down (slices of the fused
    tensors), the dense FFN as the shared expert, with their own gains folded; the folded
    router gives the live router's probabilities from the gain-free normalized stream."""
    model, path = built_moe
    ckpt = open_checkpoint(str(path), fold_norms=True)
    assert ckpt.moe.sparse_layers == frozenset(range(6))
    assert (ckpt.moe.n_experts, ckpt.moe.d_expert, ckpt.moe.d_shared) == (4, 12, 24)
    for layer in (0, 5):
        units = expert_units(model, layer)
        got = dict(ckpt.iter_experts(layer, fold_norms=True))
        for name, _, ref in units[:5]:
            np.testing.assert_allclose(got[int(name) if name != "shared" else name]["W_gate"],
                                       ref, rtol=1e-6, atol=1e-7, err_msg=f"{layer} {name}")
        blk = model.model.layers[layer]
        np.testing.assert_allclose(got[1]["W_down"], blk.experts.down_proj[1].detach().numpy())
        router = ckpt.read_router(layer, fold_norms=True)
        x = torch.randn(5, D, dtype=torch.float64)
        x_hat = x / (x.pow(2).mean(-1, keepdim=True) + model.config.rms_norm_eps).sqrt()
        logits = x_hat @ torch.from_numpy(router).double().T * D ** -0.5
        with torch.no_grad():
            probs = blk.router(x)[0]
        np.testing.assert_allclose(torch.softmax(logits, -1), probs, rtol=1e-5)
    res = extract_layer(ckpt, 4, torch.device("cpu"), fold_norms=True)
    assert res.expert_energy.shape == (9, H, 16)        # 4 experts, shared, 4 router rows
    m = SIZES[TYPES[4]][0]
    assert not res.expert_energy[:, :, m:].any()
    assert np.isnan(res.expert_rowspace_eigenvalues[:, :, m:]).all()


@pytest.mark.parametrize("change, fragments", [
    ({**MOE, "use_double_wide_mlp": True},
     ["use_double_wide_mlp: true is not supported with enable_moe_block"]),
    ({"num_kv_shared_layers": 6}, ["num_kv_shared_layers: 6 is not allowed", "0 to 5"]),
    ({"per_layer_config": {"x": {}}}, ["per_layer_config: key 'x' is not allowed", "0 to 5"]),
    ({"rope_parameters": {"full_attention": {"rope_type": "proportional",
                                             "partial_rotary_factor": 0}}},
     ["rope_parameters.full_attention.partial_rotary_factor: 0 is not allowed"]),
    ({"num_kv_shared_layers": 5}, ["num_kv_shared_layers: 5 leaves layer 1", "at most 4"]),
    ({"per_layer_config": {"1": {"head_dim": 16, "num_key_value_heads": 3}}},
     ["per_layer_config.1.num_key_value_heads: 3 is not allowed", "divisor of"]),
])
def test_bad_gemma4_configs_stop_in_one_line(built, tmp_path, change, fragments):
    """A config that the layer sizes or the key/value reuse cannot follow stops in one line
    naming the file and the key."""
    _, path = built
    broken = tmp_path / "g4"
    broken.mkdir()
    config = json.loads((path / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, **change}))
    (broken / "model.safetensors").symlink_to(path / "model.safetensors")
    with pytest.raises(UserError) as info:
        open_checkpoint(str(broken))
    assert_one_line(info.value, broken / "config.json", *fragments)


@pytest.mark.workflow
def test_workflow_runs_on_gemma4(built, built_moe, tmp_path):
    """The workflow end to end on Gemma 4, dense and mixture of experts (folded gains): head
    0's similarity over all layers (sliding and global, head sizes 8 and 16), every head's
    alignment (the MoE's: pooled over the routed experts), every unit's alignment and
    K-composition scores across layers of different head sizes equal references from the live
    weights; the report states the per-layer sizes and the reuse."""
    workdir = tmp_path / "run"
    models = {"g4": built, "g4moe": built_moe}
    assert_ok(run_snakemake(workdir, *(f"results/{name}/k3/{out}" for name in models
                                       for out in ("report.md", "alignment_experts.parquet")),
                            config={"models": {name: {"source": str(path)}
                                               for name, (_, path) in models.items()},
                                    "top_k": 3, "heads": {"sample": 2}, "device": "cpu",
                                    "fold_norms": True, "circuits": True}, timeout=900))
    for name, (model, _) in models.items():
        r = workdir / "results" / name
        bases = []
        for layer in range(6):
            w = folded(model, layer)
            bases.append([naive_kernel_svd(w["W_Q"], w["W_K"], i, SIZES[TYPES[layer]][0])[1][:3]
                          for i in range(H)])
        expected = np.array([[np.square(a[0] @ b[0].T).sum() / 3 for b in bases]
                             for a in bases])
        np.testing.assert_allclose(np.load(r / "k3" / "similarity_head0.npy"), expected,
                                   atol=1e-5, err_msg=name)
        align = pd.read_parquet(r / "k3" / "alignment.parquet").set_index(["layer", "head"])
        units = pd.read_parquet(r / "k3" / "alignment_experts.parquet")
        for layer in range(6):
            blk = model.model.layers[layer]
            routed = ([w for e, _, w in expert_units(model, layer) if e.isdigit()] if name ==
                      "g4moe" else [blk.mlp.gate_proj.weight.detach().numpy()
                                    * blk.pre_feedforward_layernorm.weight.detach().numpy()])
            for i in range(H):
                v = bases[layer][i]
                ref = sum(np.square(w @ v.T).sum() for w in routed) / sum(
                    np.square(w).sum() for w in routed)
                assert align.loc[(layer, i), "alignment"] == pytest.approx(ref, rel=1e-4)
                if name == "g4moe":
                    rows = units[(units["layer"] == layer) & (units["head"] == i)]
                    ref = [np.square(w @ v.T).sum() / np.square(w).sum()
                           for _, _, w in expert_units(model, layer)]
                    np.testing.assert_allclose(rows.alignment.to_numpy(), ref, rtol=1e-4)
        report = (r / "k3" / "report.md").read_text()
        assert "16" in report and "reuse" in report, name
        assert "Proportional RoPE on the full layers turns only 2 of 8 coordinate pairs" in report
    model = built[0]
    maps = [folded(model, layer) for layer in range(6)]

    def circuit(layer: int, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Head ``i``'s formed ``W_QK`` and ``W_OV`` (``d x d``) at its layer's sizes."""
        w, (m, n_kv) = maps[layer], SIZES[TYPES[layer]]
        j = i // (H // n_kv)
        return (w["W_Q"][i * m:(i + 1) * m].T @ w["W_K"][j * m:(j + 1) * m],
                w["W_O"][:, i * m:(i + 1) * m] @ w["W_V"][j * m:(j + 1) * m])

    k_comp = np.load(workdir / "results" / "g4" / "circuits" / "composition_k.npy")
    for later, i, earlier, j in ((1, 0, 0, 3), (4, 2, 1, 1), (5, 3, 4, 0)):
        qk, _ = circuit(later, i)
        _, ov = circuit(earlier, j)
        ref = np.linalg.norm(qk @ ov) / np.linalg.norm(qk) / np.linalg.norm(ov)
        assert k_comp[later * H + i, earlier * H + j] == pytest.approx(ref, rel=1e-4)
