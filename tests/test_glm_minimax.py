"""GLM-4-MoE and MiniMax-M2, built by transformers' own config classes (test_moe's tables): the
attention weights, each head's kernel and QK-norm folding against the live modules and a naive
float64 SVD of the formed kernel; GLM's multi-token-prediction layer and QK-norm switch; the
rotary fraction as transformers resolves it; the workflow end to end, its similarity,
alignment and per-expert effective ranks against references from the live modules' weights.
(Gemma 4: tests/test_gemma4.py.)"""

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
)
from gguf_convert import convert_hf_to_gguf
from safetensors.torch import load_file, save_file
from test_moe import CONFIGS, build

from weight_geometry.architectures import rotary_fraction_from_hf_config
from weight_geometry.checkpoint import open_checkpoint
from weight_geometry.errors import UserError
from weight_geometry.extraction import extract_layer

FAMILIES = ("glm4_moe", "minimax_m2")
#: Per-head QK-norm (GLM-4-MoE, with use_qk_norm) or over the whole projection (MiniMax-M2).
QK_NORM_HEAD = {"glm4_moe": True, "minimax_m2": False}
LAYERS = 3
#: Sparse layers at 3 layers: GLM's first_k_dense_replace = 1 keeps layer 0 dense.
SPARSE3 = {"glm4_moe": {1, 2}, "minimax_m2": {0, 1, 2}}


def config_of(arch: str, **changes):
    config = CONFIGS[arch]()
    config.update({"num_hidden_layers": LAYERS, **changes})
    return config


@pytest.fixture(scope="module", params=FAMILIES)
def built(request, tmp_path_factory):
    arch = request.param
    path = tmp_path_factory.mktemp(arch) / arch
    return arch, build(arch, path, config=config_of(arch)), path


def test_attention_and_kernels_reproduce_live_modules(built):
    """Every layer's W_Q, W_K, W_V, W_O are the live projections' weights, and each head's
    kernel singular values and subspaces (the extraction pass) those of numpy's float64 SVD of
    the formed ``W_Q_i^T W_K_j``, head ``i`` paired with KV head ``i // (h / n_kv)``."""
    arch, model, path = built
    ckpt = open_checkpoint(str(path))
    assert ckpt.moe.sparse_layers == SPARSE3[arch]
    dh = ckpt.dims.d_head
    for layer in range(LAYERS):
        att = model.model.layers[layer].self_attn
        ref = {wt: getattr(att, name).weight.detach().numpy() for wt, name in
               (("W_Q", "q_proj"), ("W_K", "k_proj"), ("W_V", "v_proj"), ("W_O", "o_proj"))}
        ours = ckpt.read_layer(layer)
        for wt, w in ref.items():
            np.testing.assert_array_equal(ours[wt], w, err_msg=f"{arch} {wt} {layer}")
        res = extract_layer(ckpt, layer, torch.device("cpu"))
        for i in range(ckpt.dims.n_heads):
            s_ref, vt_ref = naive_kernel_svd(ref["W_Q"], ref["W_K"], i, dh)
            np.testing.assert_allclose(res.singular_values[i], s_ref[:dh], rtol=1e-5)
            for k in (3, dh):   # the top-3 subspace and the whole row space
                v = res.vectors[i, :k].astype(np.float64)
                assert np.square(v @ vt_ref[:k].T).sum() == pytest.approx(k, rel=1e-5)


def test_qk_norm_folds_as_the_live_norm_computes(built):
    """Folded, ``diag(g_q) W_Q diag(g_attn)`` maps the normalized stream (no gain) to what
    q_norm returns from the unfolded projection, up to q_norm's own RMS: per head for GLM
    (``d_head`` gains), over the whole projection for MiniMax-M2 (``h d_head`` gains)."""
    arch, model, path = built
    raw = open_checkpoint(str(path)).read_layer(1)
    folded = open_checkpoint(str(path), fold_norms=True).read_layer(1, True)
    blk = model.model.layers[1]
    att, g = blk.self_attn, blk.input_layernorm.weight.detach().double()
    x_hat = torch.randn(7, 32, dtype=torch.float64)
    for wt, proj, norm in (("W_Q", att.q_proj, att.q_norm), ("W_K", att.k_proj, att.k_norm)):
        size = norm.weight.shape[0]
        assert size == (16 if QK_NORM_HEAD[arch] else proj.weight.shape[0])
        with torch.no_grad():
            expected = norm.double()(proj.double()(x_hat * g).view(7, -1, size))
        z = (x_hat * g @ torch.from_numpy(raw[wt]).double().T).view(7, -1, size)
        rms = torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        got = (x_hat @ torch.from_numpy(folded[wt]).double().T).view(7, -1, size) * rms
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=f"{arch} {wt}")


def test_glm_without_qk_norm_folds_the_pre_attention_gain_only(tmp_path):
    """GLM-4.5-Air (use_qk_norm false) has no q_norm/k_norm tensors: fold_norms needs none and
    folds the input gain alone."""
    model = build("glm4_moe", tmp_path / "air", config=config_of("glm4_moe", use_qk_norm=False))
    assert not hasattr(model.model.layers[1].self_attn, "q_norm")
    ckpt = open_checkpoint(str(tmp_path / "air"), fold_norms=True)
    assert "q" not in ckpt.adapter.norms and "k" not in ckpt.adapter.norms
    g = model.model.layers[1].input_layernorm.weight.detach().numpy()
    np.testing.assert_allclose(ckpt.read_layer(1, True)["W_Q"],
                               model.model.layers[1].self_attn.q_proj.weight.detach().numpy() * g,
                               rtol=1e-6)


def add_mtp_layer(path) -> None:
    """Store a multi-token-prediction layer after the last, as GLM-4.5's checkpoints do
    (``model.layers.{L}``, here a copy of layer L - 1's tensors)."""
    state = load_file(path / "model.safetensors")
    state.update({n.replace(f"layers.{LAYERS - 1}.", f"layers.{LAYERS}."): t.clone()
                  for n, t in state.items() if n.startswith(f"model.layers.{LAYERS - 1}.")})
    save_file(state, path / "model.safetensors")


def test_glm_multi_token_prediction_layer_is_allowed_not_read(tmp_path):
    """GLM-4.5 stores its multi-token-prediction layer as ``model.layers.{L}`` (which
    transformers skips on load): allowed for ``num_nextn_predict_layers`` layers, not
    analysed; one more is refused naming the tensor and the layers allowed."""
    path = tmp_path / "glm"
    build("glm4_moe", path, config=config_of("glm4_moe"))
    add_mtp_layer(path)
    ckpt = open_checkpoint(str(path))
    assert ckpt.dims.n_layers == LAYERS
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 1
    (path / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 0}))
    with pytest.raises(UserError) as info:
        open_checkpoint(str(path))
    assert_one_line(info.value, f"model.layers.{LAYERS}.", f"layers 0..{LAYERS - 1}")
    (path / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": -1}))
    with pytest.raises(UserError) as info:
        open_checkpoint(str(path))
    assert_one_line(info.value, "num_nextn_predict_layers: -1 is not allowed")


@pytest.mark.parametrize("arch, change, fraction", [
    ("glm4_moe", {}, 0.5),                                     # transformers' default
    ("glm4_moe", {"partial_rotary_factor": 0.25}, 0.25),       # published GLM-4.5 style
    ("minimax_m2", {}, 1.0),
    ("minimax_m2", {"rotary_dim": 8}, 0.5),                    # published MiniMax-M2 style
])
def test_rotary_fraction_as_transformers_resolves_it(tmp_path, arch, change, fraction):
    """The share of each head RoPE rotates, from the keys the published configs use, equals
    what transformers' config class resolves from the same config.json."""
    path = tmp_path / arch
    build(arch, path, config=config_of(arch))
    cfg = json.loads((path / "config.json").read_text())
    cfg["rope_parameters"].pop("partial_rotary_factor", None)
    if arch == "glm4_moe" and not change:
        cfg.pop("rope_parameters")
    (path / "config.json").write_text(json.dumps({**cfg, **change}))
    resolved = T.AutoConfig.from_pretrained(path).rope_parameters.get("partial_rotary_factor", 1)
    ckpt = open_checkpoint(str(path))
    assert ckpt.rotary_fraction == resolved == fraction
    assert ckpt.describe().get("rotary_fraction", 1.0) == fraction
    (path / "config.json").write_text(json.dumps({**cfg, "partial_rotary_factor": 1.5}))
    with pytest.raises(UserError) as info:
        open_checkpoint(str(path))
    assert_one_line(info.value, "partial_rotary_factor: 1.5 is not allowed", "(0, 1]")


def test_rotary_fraction_of_a_text_tower(tmp_path):
    """A multimodal model's rotary fraction is its text config's (Qwen3.5 rotates a quarter of
    each head), as transformers resolves it; a bad one is named with its text_config path."""
    T.Qwen3_5Config().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    resolved = T.AutoConfig.from_pretrained(tmp_path).get_text_config().rope_parameters
    assert rotary_fraction_from_hf_config(cfg) == resolved["partial_rotary_factor"] == 0.25
    cfg["text_config"]["rope_parameters"]["partial_rotary_factor"] = 0
    with pytest.raises(UserError) as info:
        rotary_fraction_from_hf_config(cfg)
    assert_one_line(info.value, "text_config.rope_parameters.partial_rotary_factor: 0 is not")


@pytest.mark.parametrize("arch, changes", [("glm4_moe", {}),
                                           ("glm4_moe", {"use_qk_norm": False}),
                                           ("minimax_m2", {})])
def test_gguf_reads_as_the_hf_checkpoint(tmp_path, arch, changes):
    """The GGUF file llama.cpp's converter writes (gguf_convert: experts stacked, GLM's
    ``block_count`` counting its multi-token-prediction layer, ``rope.dimension_count``) reads
    as the Hugging Face checkpoint: dimensions, sparse layers, shared experts, rotary fraction,
    and every weight, router and expert, raw and folded (QK-norm gains only where stored)."""
    hf = tmp_path / "hf"
    build(arch, hf, config=config_of(arch, **changes))
    cfg = json.loads((hf / "config.json").read_text())
    if arch == "glm4_moe":
        add_mtp_layer(hf)
    else:   # MiniMax-M2's published config.json states rotary_dim, which the converter reads
        (hf / "config.json").write_text(json.dumps({**cfg, "rotary_dim": 8}))
    gguf = convert_hf_to_gguf(hf, tmp_path / "m.gguf")[0]
    for fold in (False, True):
        ref, ours = open_checkpoint(str(hf), fold), open_checkpoint(str(gguf), fold)
        assert ours.architecture == {"glm4_moe": "glm4moe"}.get(arch, "minimax-m2")
        assert (ours.dims, ours.moe) == (ref.dims, ref.moe)
        assert ours.rotary_fraction == 0.5 and ours.adapter.norms.keys() == ref.adapter.norms.keys()
        for layer in range(LAYERS):
            got, expected = ours.read_layer(layer, fold), ref.read_layer(layer, fold)
            assert got.keys() == expected.keys()
            for wt, w in expected.items():
                np.testing.assert_allclose(got[wt], w, rtol=1e-6, atol=1e-7, err_msg=wt)
            if not ref.is_sparse(layer):
                continue
            np.testing.assert_allclose(ours.read_router(layer, fold), ref.read_router(layer, fold),
                                       rtol=1e-6)
            for (e, w), (e_ref, w_ref) in zip(ours.iter_experts(layer, fold),
                                              ref.iter_experts(layer, fold), strict=True):
                assert e == e_ref
                for wt in w_ref:
                    np.testing.assert_allclose(w[wt], w_ref[wt], rtol=1e-6, atol=1e-7)


def fp8_checkpoint(path, block=(16, 16)) -> dict[str, torch.Tensor]:
    """A MiniMax-M2 stored as its published weights are: every projection and expert weight
    block-scaled FP8 (F8_E4M3, ``NAME_scale_inv`` one float per ``block``: amax / 448), the
    router and norms as they were; ``quantization_config.weight_block_size`` = ``block``.
    Returns each quantized weight dequantized by torch (fp8 -> float32, times its block's
    scale), the reference."""
    build("minimax_m2", path, config=config_of("minimax_m2"))
    state, reference = load_file(path / "model.safetensors"), {}
    b0, b1 = block
    for name in [n for n in state if n.endswith("proj.weight") or ".experts." in n]:
        w = state[name]
        n0, n1 = w.shape
        pad = torch.zeros(-(-n0 // b0) * b0, -(-n1 // b1) * b1)
        pad[:n0, :n1] = w.abs()
        scale = pad.view(pad.shape[0] // b0, b0, -1, b1).amax(dim=(1, 3)) / 448
        full = scale.repeat_interleave(b0, 0).repeat_interleave(b1, 1)[:n0, :n1]
        state[name] = (w / full).to(torch.float8_e4m3fn)
        state[name + "_scale_inv"] = scale
        reference[name] = state[name].float() * full
    save_file(state, path / "model.safetensors")
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "float8_e4m3fn",
                                  "activation_scheme": "dynamic",
                                  "weight_block_size": list(block)}
    (path / "config.json").write_text(json.dumps(cfg))
    return reference


def test_block_fp8_weights_read_dequantized(tmp_path):
    """Block-scaled FP8 weights (MiniMax-M2 as published; last blocks partial) read as torch
    dequantizes them: every attention weight and every expert's, each byte's e4m3 value times
    its block's scale_inv."""
    reference = fp8_checkpoint(tmp_path / "fp8")
    ckpt = open_checkpoint(str(tmp_path / "fp8"))
    assert "float8_e4m3fn" in ckpt.storage_dtype
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}."
        for wt, w in ckpt.read_layer(layer).items():
            np.testing.assert_allclose(w, reference[ckpt.adapter.tensor_name(wt, layer)],
                                       rtol=1e-7, atol=0, err_msg=f"{wt} {layer}")
        for e, w in ckpt.iter_experts(layer):
            for wt, proj in (("W_gate", "w1"), ("W_up", "w3"), ("W_down", "w2")):
                ref = reference[f"{prefix}block_sparse_moe.experts.{e}.{proj}.weight"]
                np.testing.assert_allclose(w[wt], ref, rtol=1e-7, atol=0)


def test_block_fp8_without_its_scales_is_refused_in_one_line(tmp_path):
    """An F8_E4M3 weight without its ``scale_inv``, or with one of another block grid, stops
    with one line naming the tensors (not weights missing their scales)."""
    path = tmp_path / "fp8"
    fp8_checkpoint(path)
    state = load_file(path / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    scale = state.pop(name + "_scale_inv")
    save_file(state, path / "model.safetensors")
    with pytest.raises(UserError) as info:
        open_checkpoint(str(path))
    assert_one_line(info.value, name, "dtype F8_E4M3", "NAME_scale_inv")
    state[name + "_scale_inv"] = scale[:, :1].contiguous()
    save_file(state, path / "model.safetensors")
    with pytest.raises(UserError) as info:
        open_checkpoint(str(path))
    assert_one_line(info.value, f"{name}_scale_inv is F32 [4, 1]", "needs F32/BF16/F16 [4, 2]")


def top_subspace(model, layer: int, head: int, k: int) -> np.ndarray:
    """``(k, d)``: the top-k right singular vectors of head ``head``'s formed kernel from the
    live module's raw weights (numpy float64)."""
    att = model.model.layers[layer].self_attn
    return naive_kernel_svd(att.q_proj.weight.detach().numpy(),
                            att.k_proj.weight.detach().numpy(), head, att.head_dim)[1][:k]


def ffn_inputs(model, arch: str, layer: int) -> list[np.ndarray]:
    """The FFN input weights of ``layer`` from the live module: the dense W_gate, or every
    routed expert's (the shared experts are not in the alignment)."""
    mlp = model.model.layers[layer].mlp
    if layer not in SPARSE3[arch]:
        return [mlp.gate_proj.weight.detach().numpy()]
    d_e = mlp.experts.intermediate_dim
    return [w[:d_e].detach().numpy() for w in mlp.experts.gate_up_proj]


def expert_units(model, layer: int) -> list[tuple[str, int | None, np.ndarray]]:
    """``(expert, router row, weight)`` of each unit whose alignment a sparse layer gets, from
    the live module: every routed expert's W_gate, the shared experts' W_gate (GLM), then every
    router row ``(1, d)``."""
    mlp = model.model.layers[layer].mlp
    d_e = mlp.experts.intermediate_dim
    units = [(str(e), None, w[:d_e].detach().numpy())
             for e, w in enumerate(mlp.experts.gate_up_proj)]
    if hasattr(mlp, "shared_experts"):
        units.append(("shared", None, mlp.shared_experts.gate_proj.weight.detach().numpy()))
    router = mlp.gate.weight.detach().numpy()
    return units + [("router", e, router[e:e + 1]) for e in range(len(router))]


@pytest.mark.workflow
def test_workflow_runs_on_glm4_moe_and_minimax_m2(tmp_path):
    """Both families through the whole workflow to their reports (raw weights, the notebook's
    definitions): head 0's similarity, every head's alignment (pooled over the routed experts
    in a sparse layer), per expert and router row, and every weight's effective rank (each
    expert's, the shared experts') equal references from the live modules' weights; GLM's
    report states partial rotary. GLM's GGUF file (its multi-token-prediction layer stored,
    as published) gives the same similarity and per-expert alignment."""
    models, built_models = {}, {}
    for arch in FAMILIES:
        path = tmp_path / "ckpt" / arch
        built_models[arch] = build(arch, path, config=config_of(arch))
        models[arch.replace("_", "-")] = {"source": str(path)}
    add_mtp_layer(tmp_path / "ckpt" / "glm4_moe")   # as published, with its GGUF file
    gguf = convert_hf_to_gguf(tmp_path / "ckpt" / "glm4_moe", tmp_path / "glm.gguf")[0]
    models["glm-gguf"] = {"source": str(gguf)}
    workdir = tmp_path / "run"
    targets = [f"results/{name}/k3/{out}" for name in models
               for out in ("report.md", "alignment_experts.parquet")]
    assert_ok(run_snakemake(workdir, *targets, config={
        "models": models, "top_k": 3, "heads": {"sample": 2}, "device": "cpu",
        "fold_norms": False}, timeout=900))
    for arch in FAMILIES:
        model, r = built_models[arch], workdir / "results" / arch.replace("_", "-")
        meta = json.loads((r / "model.json").read_text())
        assert meta["experts"]["sparse_layers"] == sorted(SPARSE3[arch])
        bases = [top_subspace(model, layer, 0, 3) for layer in range(LAYERS)]
        expected = np.array([[np.square(a @ b.T).sum() / 3 for b in bases] for a in bases])
        np.testing.assert_allclose(np.load(r / "k3" / "similarity_head0.npy"), expected,
                                   atol=1e-5, err_msg=arch)
        align = pd.read_parquet(r / "k3" / "alignment.parquet").set_index(["layer", "head"])
        for layer in range(LAYERS):
            ws = ffn_inputs(model, arch, layer)
            for head in range(model.config.num_attention_heads):
                v = top_subspace(model, layer, head, 3)
                ref = sum(np.square(w @ v.T).sum() for w in ws) / sum(np.square(w).sum()
                                                                       for w in ws)
                assert align.loc[(layer, head), "alignment"] == pytest.approx(ref, rel=1e-4)
        ranks = pd.read_csv(r / "effective_ranks.csv", dtype={"expert": str})
        for layer in SPARSE3[arch]:
            mlp = model.model.layers[layer].mlp
            d_e = mlp.experts.intermediate_dim
            for e in range(mlp.experts.num_experts):
                row = ranks[(ranks.layer_idx == layer) & (ranks.expert == str(e))
                            & (ranks.weight_type == "W_up")]
                ref = reference_eff_rank(mlp.experts.gate_up_proj[e, d_e:].detach().numpy())
                assert row.eff_rank.item() == pytest.approx(ref, rel=1e-4), (arch, layer, e)
        shared = ranks[ranks.expert == "shared"]
        assert len(shared) == (3 * len(SPARSE3[arch]) if arch == "glm4_moe" else 0)
        if arch == "glm4_moe":
            w = model.model.layers[1].mlp.shared_experts.down_proj.weight.detach().numpy()
            assert w.shape == (32, 48)     # n_shared_experts = 2 of width 24, one FFN
            row = shared[(shared.layer_idx == 1) & (shared.weight_type == "W_down")]
            assert row.eff_rank.item() == pytest.approx(reference_eff_rank(w), rel=1e-4)
        per_unit = pd.read_parquet(r / "k3" / "alignment_experts.parquet")
        assert len(per_unit) == sum(len(expert_units(model, layer)) for layer in SPARSE3[arch]
                                    ) * model.config.num_attention_heads
        for layer in SPARSE3[arch]:
            for head in range(model.config.num_attention_heads):
                v = top_subspace(model, layer, head, 3)
                rows = per_unit[(per_unit["layer"] == layer) & (per_unit["head"] == head)]
                ours = rows.alignment.to_numpy()
                ref = [np.square(w @ v.T).sum() / np.square(w).sum()
                       for _, _, w in expert_units(model, layer)]
                router_rows = [-1 if pd.isna(x) else int(x) for x in rows.router_row]
                assert [*zip(rows.expert, router_rows, strict=True)] == [
                    (e, -1 if row is None else row) for e, row, _ in expert_units(model, layer)]
                np.testing.assert_allclose(ours, ref, rtol=1e-4, err_msg=f"{arch} {layer}")
        report = (r / "k3" / "report.md").read_text()
        assert ("Partial rotary: RoPE rotates only the first 8 of each head's 16" in report) == (
            arch == "glm4_moe"), arch
    hf, gg = workdir / "results" / "glm4-moe", workdir / "results" / "glm-gguf"
    assert json.loads((gg / "model.json").read_text())["rotary_fraction"] == 0.5
    np.testing.assert_allclose(np.load(gg / "k3" / "similarity_head0.npy"),
                               np.load(hf / "k3" / "similarity_head0.npy"), atol=1e-6)
    pd.testing.assert_frame_equal(pd.read_parquet(gg / "k3" / "alignment_experts.parquet"),
                                  pd.read_parquet(hf / "k3" / "alignment_experts.parquet"),
                                  rtol=1e-5)
