"""Hybrid models (Qwen3.5 dense and MoE, its multimodal text tower, Qwen3-Next), built by
transformers' own config classes: gated-DeltaNet linear-attention layers between full-attention
layers whose ``q_proj`` holds each head's query and output gate. The attention geometry runs
over the full-attention layers only, against naive float64 SVDs of the kernels formed from the
live modules (gate rows removed as the module removes them); the linear-attention layers keep
their FFN (and per-expert) effective ranks; the workflow runs end to end with its report."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import transformers as T
from conftest import assert_ok, assert_one_line, reference_eff_rank, run_snakemake
from gguf_convert import convert_hf_to_gguf

from weight_geometry.architectures import SHARED
from weight_geometry.checkpoint import open_checkpoint
from weight_geometry.compare import compare_table
from weight_geometry.errors import UserError
from weight_geometry.extraction import extract_layer, write_layers
from weight_geometry.results_io import BASES_FILES
from weight_geometry.similarity import similarity_matrix

D, H, KV, DH, L = 32, 4, 2, 8, 5
#: Layers 1 and 3 full attention (every second layer), the others gated DeltaNet.
ATTENTION = [1, 3]
TEXT = dict(vocab_size=64, hidden_size=D, num_hidden_layers=L, num_attention_heads=H,
            num_key_value_heads=KV, head_dim=DH, linear_key_head_dim=8,
            linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
            full_attention_interval=2)
MOE = dict(num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=24,
           num_experts_per_tok=2)
VISION = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=D,
              patch_size=4, temporal_patch_size=1, spatial_merge_size=1,
              num_position_embeddings=16)
CONFIGS = {
    "qwen3_5_text": lambda: T.Qwen3_5TextConfig(**TEXT, intermediate_size=48),
    "qwen3_5_moe_text": lambda: T.Qwen3_5MoeTextConfig(**TEXT, **MOE),
    # Qwen3-Next: layer 4 dense (mlp_only_layers); its config.json loses layer_types below,
    # as published configs state only full_attention_interval.
    "qwen3_next": lambda: T.Qwen3NextConfig(**TEXT, **MOE, intermediate_size=48,
                                            mlp_only_layers=[4]),
    # Qwen3_5ForConditionalGeneration: the text tower under model.language_model.
    "qwen3_5": lambda: T.Qwen3_5Config(text_config={**TEXT, "intermediate_size": 48},
                                       vision_config=VISION),
    # Qwen3_5MoeForConditionalGeneration: experts in the text config, every layer sparse.
    "qwen3_5_moe": lambda: T.Qwen3_5MoeConfig(text_config={**TEXT, **MOE},
                                              vision_config=VISION),
}
SPARSE = {"qwen3_5_text": set(), "qwen3_5": set(), "qwen3_5_moe_text": {0, 1, 2, 3, 4},
          "qwen3_5_moe": {0, 1, 2, 3, 4}, "qwen3_next": {0, 1, 2, 3}}


def build(arch: str, path, config=None):
    """The model (of ``config``, default ``CONFIGS[arch]``), every parameter spread (norm
    gains around 0, as ``1 + w`` scales; the rest Gaussian with row scales), saved by
    ``save_pretrained``."""
    torch.manual_seed(0)
    config = config or CONFIGS[arch]()
    multimodal = arch in ("qwen3_5", "qwen3_5_moe")
    auto = T.AutoModelForImageTextToText if multimodal else T.AutoModelForCausalLM
    model = auto.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) - 0.5)
            elif p.dim() >= 2:
                p.copy_(torch.randn_like(p) * (torch.rand(p.shape[:-1])[..., None] + 0.5))
    model.save_pretrained(path)
    if arch == "qwen3_next":
        cfg = json.loads((path / "config.json").read_text())
        del cfg["layer_types"]
        cfg["full_attention_interval"] = 2
        (path / "config.json").write_text(json.dumps(cfg))
    return model


#: GGUF: llama.cpp's qwen3next has no dense layers (no mlp_only_layers there).
GGUF_CONFIGS = {"qwen3_5_text": CONFIGS["qwen3_5_text"],
                "qwen3_5_moe_text": CONFIGS["qwen3_5_moe_text"],
                "qwen3_next": lambda: T.Qwen3NextConfig(**TEXT, **MOE, intermediate_size=48)}


def layers_of(model):
    return (model.model.language_model if hasattr(model.model, "language_model")
            else model.model).layers


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def built(request, tmp_path_factory):
    arch = request.param
    path = tmp_path_factory.mktemp(arch) / arch
    return arch, build(arch, path), path


def module_query_key(attn, in_gain, fold: bool):
    """``(W_Q, W_K)`` of a live Qwen3.5/Qwen3-Next attention module as it computes them, in
    float64: the query rows are what ``torch.chunk(q_proj(x).view(..., h, 2 d_head), 2)[0]``
    keeps (applied to the identity, so the module's own view and chunk cut the gate away);
    with ``fold`` the pre-attention gain ``1 + w`` on the columns and the QK-norm gains
    ``1 + w`` on each head's rows."""
    eye = torch.eye(D)  # x @ W^T at the identity: W^T exactly
    with torch.no_grad():
        q = torch.chunk(attn.q_proj(eye).view(D, H, 2 * DH), 2, dim=-1)[0]
        w_q = q.reshape(D, H * DH).T.double()                                  # (h d_head, d)
        w_k = attn.k_proj(eye).T.double()
        if fold:
            w_q = (w_q.view(H, DH, D) * (1 + attn.q_norm.weight.double())[None, :, None]
                   ).reshape(H * DH, D) * in_gain
            w_k = (w_k.view(KV, DH, D) * (1 + attn.k_norm.weight.double())[None, :, None]
                   ).reshape(KV * DH, D) * in_gain
    return w_q.numpy(), w_k.numpy()


def naive_kernels(model, layer: int, fold: bool) -> list[np.ndarray]:
    """Every head's kernel ``W_Q_i^T W_K_j``, ``(d, d)`` float64, formed explicitly."""
    block = layers_of(model)[layer]
    gain = (1 + block.input_layernorm.weight.detach().double()) if fold else 1.0
    w_q, w_k = module_query_key(block.self_attn, gain, fold)
    return [w_q[i * DH:(i + 1) * DH].T @ w_k[i // (H // KV) * DH:(i // (H // KV) + 1) * DH]
            for i in range(H)]


def projector(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    return rows.T @ rows


def test_layer_pattern_and_model_json(built):
    arch, _, path = built
    ckpt = open_checkpoint(str(path))
    assert ckpt.attention_layers == tuple(ATTENTION)
    record = ckpt.describe()
    assert record["attention_layers"] == ATTENTION
    assert record["layer_types"] == ["linear", "full", "linear", "full", "linear"]
    assert set(ckpt.moe.sparse_layers if ckpt.moe else ()) == SPARSE[arch]
    for layer in range(L):   # a linear layer has no W_Q .. W_O; a sparse one no dense FFN
        expected = ({"W_Q", "W_K", "W_V", "W_O"} if layer in ATTENTION else set()) | (
            set() if layer in SPARSE[arch] else {"W_gate", "W_up", "W_down"})
        assert set(ckpt.layer_weight_types(layer)) == expected, (arch, layer)


@pytest.mark.parametrize("fold", [False, True], ids=["raw", "folded"])
def test_subspaces_equal_naive_svd_of_the_module_kernel(built, fold):
    """Each full-attention head's singular values and top-k subspaces are those of the kernel
    formed from the live module (gate rows removed as its forward removes them)."""
    arch, model, path = built
    ckpt = open_checkpoint(str(path), fold_norms=fold)
    for layer in ATTENTION:
        res = extract_layer(ckpt, layer, torch.device("cpu"), fold_norms=fold)
        for head, kernel in enumerate(naive_kernels(model, layer, fold)):
            _, s, vt = np.linalg.svd(kernel)
            np.testing.assert_allclose(res.singular_values[head], s[:DH], rtol=1e-5,
                                       atol=1e-9 * s[0])
            for k in (1, 3, DH):
                np.testing.assert_allclose(projector(res.vectors[head, :k]),
                                           projector(vt[:k]), atol=2e-5,
                                           err_msg=f"{arch} layer {layer} head {head} k {k}")


def test_linear_layers_keep_their_ffn_effective_ranks(built):
    """A linear-attention layer stores no arrays and gives effective-rank rows for its FFN (or
    each expert's weights) equal to numpy's SVD of the module's weights, gains folded."""
    arch, model, path = built
    ckpt = open_checkpoint(str(path), fold_norms=True)
    for layer in range(L):
        res = extract_layer(ckpt, layer, torch.device("cpu"), fold_norms=True)
        block = layers_of(model)[layer]
        g = (1 + block.post_attention_layernorm.weight.detach().double()).numpy()
        assert (res.vectors is None) == (layer not in ATTENTION)
        ffn = [r for r in res.weight_ranks if r[1] in ("W_gate", "W_up", "W_down")]
        for row in ffn:
            wt, shape, eff = row[1:4]
            name = {"W_gate": "gate_proj", "W_up": "up_proj", "W_down": "down_proj"}[wt]
            expert = row[4] if len(row) == 5 else None
            if expert is None:
                w = getattr(block.mlp, name).weight
            elif expert == SHARED:
                w = getattr(block.mlp.shared_expert, name).weight
            else:
                d_e, e = ckpt.moe.d_expert, int(expert)
                w = {"W_gate": block.mlp.experts.gate_up_proj[e, :d_e],
                     "W_up": block.mlp.experts.gate_up_proj[e, d_e:],
                     "W_down": block.mlp.experts.down_proj[e]}[wt]
            w = w.detach().double().numpy() * (g if wt != "W_down" else 1)
            assert shape == f"{w.shape[0]}x{w.shape[1]}"
            assert eff == pytest.approx(reference_eff_rank(w), rel=1e-4), (arch, layer, row)
        n_ffn = 3 * (ckpt.moe.n_experts + 1) if layer in SPARSE[arch] else 3
        assert len(ffn) == n_ffn, (arch, layer)
        assert len(res.weight_ranks) == n_ffn + 4 * (layer in ATTENTION)


def test_similarity_over_the_attention_layers(built, tmp_path):
    """The stored arrays hold the full-attention layers alone, in layer order: the similarity
    of head 0 is ``(L_attn, L_attn)`` and equals the naive subspaces' Grassmann similarity."""
    arch, model, path = built
    ckpt = open_checkpoint(str(path), fold_norms=True)
    paths = {name: tmp_path / f"{name}.npy" for name in BASES_FILES}
    write_layers(ckpt, range(L), torch.device("cpu"), True, paths)
    vectors = np.load(paths["vectors"])
    assert vectors.shape == (len(ATTENTION), H, DH, D)
    k = 3
    ref = [np.linalg.svd(naive_kernels(model, layer, True)[0])[2][:k] for layer in ATTENTION]
    expected = np.array([[np.sum((a @ b.T) ** 2) / k for b in ref] for a in ref])
    np.testing.assert_allclose(similarity_matrix(vectors[:, 0, :k]), expected, atol=1e-5)


def test_extraction_ranges_each_hold_an_attention_layer():
    """A range without a softmax-attention layer joins the next (trailing ones the last), so
    every extraction job stores arrays; the ranges still cover every layer once."""
    from weight_geometry.config import chunks

    assert chunks(8, 1, (3, 7)) == [(0, 3), (4, 7)]
    assert chunks(8, 3, (3, 7)) == [(0, 5), (6, 7)]
    assert chunks(9, 2, (1, 3)) == [(0, 1), (2, 8)]
    assert chunks(8, 2, tuple(range(8))) == chunks(8, 2) == [(0, 1), (2, 3), (4, 5), (6, 7)]
    for n, per, attention in [(12, 1, (3, 7, 11)), (12, 5, (0,)), (7, 2, (6,))]:
        ranges = chunks(n, per, attention)
        assert [x for a, b in ranges for x in range(a, b + 1)] == list(range(n))
        assert all(any(a <= x <= b for x in attention) for a, b in ranges)


def test_planning_a_hybrid(tmp_path):
    """The plan's extraction ranges each hold an attention layer; a configured bottleneck must
    be one; a hybrid with a single full-attention layer has nothing to compare."""
    from weight_geometry.config import build_plan

    path = tmp_path / "m"
    build("qwen3_5_text", path)
    models = {"h": {"source": str(path)}}
    plan = build_plan({"top_k": 3, "layers_per_job": 1, "bottleneck": 3}, models)
    assert plan.models["h"].chunks == [(0, 1), (2, 4)]
    with pytest.raises(UserError) as err:
        build_plan({"top_k": 3, "bottleneck": 2}, models)
    assert_one_line(err.value, "bottleneck: 2 is not allowed", "softmax attention: 1, 3")
    ranks = tmp_path / "ranks.csv"
    ranks.write_text("layer_idx,weight_type,shape,eff_rank\n")
    with pytest.raises(UserError) as err:
        build_plan({"top_k": 3}, {"h": {"source": str(path), "effective_ranks": str(ranks)}})
    assert_one_line(err.value, "models.h.effective_ranks: not allowed for a hybrid model",
                    "3 linear-attention layers")
    cfg = json.loads((path / "config.json").read_text())
    cfg["layer_types"] = ["linear_attention"] * 3 + ["full_attention", "linear_attention"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError) as err:
        build_plan({"top_k": 3}, models)
    assert_one_line(err.value, "models.h: 1 softmax-attention layer(s)", "at least 2")


def test_planning_a_hybrid_hub_id_before_its_download(tmp_path, monkeypatch):
    """A hub id whose weights are not downloaded yet is planned from its config.json alone:
    its attention layers come from there too (here full_attention_interval, no layer_types),
    so the extraction ranges are those the downloaded checkpoint will get."""
    from types import SimpleNamespace

    from weight_geometry import config, hub

    snapshot = tmp_path / "snapshot"
    build("qwen3_next", snapshot)   # config.json without layer_types
    (snapshot / "model.safetensors").unlink()
    monkeypatch.setattr(hub, "resolve", lambda repo, revision=None: SimpleNamespace(
        complete=False, snapshot=snapshot))
    src = config._open_source("org/qwen3-next", fold_norms=True)
    assert src.attention_layers == tuple(ATTENTION)
    assert config.chunks(L, 1, src.attention_layers) == [(0, 1), (2, 4)]


def test_no_softmax_attention_or_unknown_family_stops_in_one_line(tmp_path):
    path = tmp_path / "linear"
    build("qwen3_5_text", path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["layer_types"] = ["linear_attention"] * L
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError) as err:
        open_checkpoint(str(path))
    assert_one_line(err.value, path, "no softmax attention layer", f"all {L} layers")
    for model_type in ("mamba", "no_such_family"):
        cfg["model_type"] = model_type
        (path / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(UserError) as err:
            open_checkpoint(str(path))
        assert_one_line(err.value, f"'{model_type}' is not supported", "config.json")


@pytest.mark.workflow
@pytest.mark.parametrize("arch", ["qwen3_5_text", "qwen3_5_moe_text"])
def test_workflow_runs_on_a_hybrid(tmp_path, arch):
    """Extraction (one job per layer, so that ranges without attention join their neighbours),
    the tables over the full-attention layers named by model layer, the report."""
    model = build(arch, tmp_path / "ckpt")
    workdir = tmp_path / "run"
    assert_ok(run_snakemake(workdir, "results/hyb/k3/report.md", config={
        "models": {"hyb": {"source": str(tmp_path / "ckpt")}}, "top_k": 3,
        "heads": {"sample": 2}, "device": "cpu", "layers_per_job": 1,
        "circuits": arch == "qwen3_5_text"}))
    r = workdir / "results" / "hyb"
    assert json.loads((r / "model.json").read_text())["attention_layers"] == ATTENTION
    assert sorted(p.name for p in (r / "bases").iterdir()) == ["layers000-001",
                                                              "layers002-004"]
    ranks = pd.read_parquet(r / "effective_ranks.parquet")
    assert sorted(ranks["layer_idx"].unique()) == list(range(L))
    assert sorted(ranks.loc[ranks["weight_type"] == "W_Q", "layer_idx"]) == ATTENTION
    sims = np.load(r / "k3" / "similarity_head0.npy")
    ref = [np.linalg.svd(naive_kernels(model, layer, True)[0])[2][:3] for layer in ATTENTION]
    np.testing.assert_allclose(sims, [[np.sum((a @ b.T) ** 2) / 3 for b in ref] for a in ref],
                               atol=1e-5)
    layers = pd.read_parquet(r / "k3" / "layers.parquet")
    assert layers["layer"].tolist() == ATTENTION
    assert set(layers["layer_type"]) == {"full"}
    record = json.loads((r / "model.json").read_text())
    # the comparison's depth: model layer over L
    assert compare_table({"hyb": (record, layers)}, 3)["depth"].tolist() == [1 / L, 3 / L]
    align = pd.read_parquet(r / "k3" / "alignment.parquet")
    assert sorted(align["layer"].unique()) == ATTENTION
    if arch == "qwen3_5_moe_text":   # per expert and router row
        experts = pd.read_parquet(r / "k3" / "alignment_experts.parquet")
        assert sorted(experts["layer"].unique()) == ATTENTION
    pairs = pd.read_parquet(r / "k3" / "layer_pairs.parquet")
    assert pairs[["layer_a", "layer_b"]].values.tolist() == [ATTENTION]
    if arch == "qwen3_5_text":   # the circuits' tables name model layers too
        for table in (r / "circuits" / "composition_top.parquet",
                      r / "circuits" / "composition_layers.parquet",
                      r / "k3" / "read_write.parquet"):
            t = pd.read_parquet(table)
            assert len(t) and {*t["layer"], *t["earlier_layer"]} == set(ATTENTION), table
            assert (t["earlier_layer"] < t["layer"]).all(), table
    report = (r / "k3" / "report.md").read_text()
    assert "3 linear-attention layers are left out" in report
    shutil.rmtree(workdir / ".snakemake", ignore_errors=True)


@pytest.mark.parametrize("arch", sorted(GGUF_CONFIGS))
@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_gguf_reads_as_the_hugging_face_checkpoint(tmp_path, arch, qtype):
    """The same model written as llama.cpp's converter writes it (``qwen35``, ``qwen35moe``,
    ``qwen3next``: gated ``attn_q`` rows unchanged, norms stored as ``1 + w``, experts stacked,
    ``full_attention_interval``): the same layer kinds, and every weight the Hugging Face
    checkpoint gives, gains folded (F32: exactly; Q8_0: to its rounding)."""
    from gguf import GGMLQuantizationType as QT

    build(arch, tmp_path / "hf", GGUF_CONFIGS[arch]())
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["full_attention_interval"] = 2   # as published configs state it
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    path = convert_hf_to_gguf(tmp_path / "hf", tmp_path / "m.gguf", QT[qtype])[0]
    hf, gg = (open_checkpoint(str(p), fold_norms=True) for p in (tmp_path / "hf", path))
    assert gg.attention_layers == hf.attention_layers == tuple(ATTENTION)
    assert gg.layer_kinds.kinds == hf.layer_kinds.kinds
    assert gg.dims == hf.dims and gg.moe == hf.moe
    assert gg.rotary_fraction == hf.rotary_fraction == 0.25   # RoPE on 2 of 8 coordinates
    tol = dict(rtol=1e-6, atol=1e-6) if qtype == "F32" else dict(rtol=0, atol=0.05)
    for layer in range(L):
        ours, ref = gg.read_layer(layer, True), hf.read_layer(layer, True)
        assert set(ours) == set(ref), layer
        for wt in ref:
            np.testing.assert_allclose(ours[wt], ref[wt], **tol, err_msg=f"{layer} {wt}")
        if hf.is_sparse(layer):
            np.testing.assert_allclose(gg.read_router(layer, True), hf.read_router(layer, True),
                                       **tol)
            for (e, w), (_, w_ref) in zip(gg.iter_experts(layer, True),
                                          hf.iter_experts(layer, True), strict=True):
                for wt in w_ref:
                    np.testing.assert_allclose(w[wt], w_ref[wt], **tol, err_msg=f"{e} {wt}")


def test_trajectory_heatmap_marks_a_hybrid_layer_on_its_row(monkeypatch, tmp_path):
    """A hybrid series' per-layer tables name model layers 1 and 3: the dots marking where a
    statistic exceeds step 0 sit on the heatmap's rows of those layers (0 and 1), not at
    y = 1 and 3."""
    from weight_geometry import figures
    from weight_geometry.trajectory import STATISTICS, draw_statistic

    stat = STATISTICS[0]
    table = pd.DataFrame({"step": [0, 0, 10, 10], "layer": ATTENTION * 2,
                          f"{stat.column}_minus_initial": [0.0, 0.0, 0.1, 0.3],
                          f"{stat.column}_exceeds_initial": [False, False, True, True],
                          stat.column: [0.1, 0.1, 0.2, 0.4]})
    drawn = {}
    monkeypatch.setattr(figures, "save_figure", lambda fig, path: drawn.update(fig=fig))
    draw_statistic(table, stat, tmp_path / "x.png", None)
    (dots,) = drawn["fig"].axes[0].collections
    assert dots.get_offsets()[:, 1].tolist() == [0, 1]


def test_layer_maps_between_positions_and_model_layers(tmp_path):
    """Positions among the attention layers <-> model layers in every layer column, -1 kept;
    a row naming a linear-attention layer in any column is dropped on the way to positions;
    a record without ``attention_layers`` (or without linear layers) maps nothing."""
    from weight_geometry.hybrid import (
        attention_layers,
        is_hybrid,
        relabel_table_file,
        to_model_layers,
        to_positions,
    )

    record = {"n_layers": L, "attention_layers": ATTENTION}
    positions = pd.DataFrame({"layer": [0, 1, 1], "earlier_layer": [0, 0, 1],
                              "bottleneck_layer": [-1, 0, 1], "x": [0.5, 1.5, 2.5]})
    model_layers = to_model_layers(positions, record)
    assert model_layers.to_dict("list") == {"layer": [1, 3, 3], "earlier_layer": [1, 1, 3],
                                            "bottleneck_layer": [-1, 1, 3], "x": [0.5, 1.5, 2.5]}
    assert positions["layer"].tolist() == [0, 1, 1]                    # the input unchanged
    pd.testing.assert_frame_equal(to_positions(model_layers, record), positions)
    pairs = pd.DataFrame({"layer_a": [1, 1, 0, 3], "layer_b": [3, 2, 3, 3], "y": [1, 2, 3, 4]})
    assert to_positions(pairs, record).to_dict("list") == {"layer_a": [0, 1], "layer_b": [1, 1],
                                                           "y": [1, 4]}
    ranks = pd.DataFrame({"layer_idx": range(L), "eff_rank": [9.0, 8.0, 7.0, 6.0, 5.0]})
    kept = to_positions(ranks, record)
    assert kept.index.tolist() == [0, 1] and kept.to_dict("list") == {
        "layer_idx": [0, 1], "eff_rank": [8.0, 6.0]}
    for plain in ({"n_layers": L}, {"n_layers": 2, "attention_layers": [0, 1]}):
        assert not is_hybrid(plain)
        assert attention_layers(plain).tolist() == list(range(plain["n_layers"]))
        pd.testing.assert_frame_equal(to_model_layers(positions, plain), positions)
    path = tmp_path / "t.parquet"
    positions.to_parquet(path, index=False)
    relabel_table_file(path, {"n_layers": L})                         # not a hybrid: as is
    pd.testing.assert_frame_equal(pd.read_parquet(path), positions)
    relabel_table_file(path, record)
    pd.testing.assert_frame_equal(pd.read_parquet(path), model_layers)


def test_left_out_counts_the_linear_layers():
    from weight_geometry.hybrid import left_out

    assert left_out({"n_layers": L, "attention_layers": list(range(L))}) == ""
    assert left_out({"n_layers": L}) == ""
    three = left_out({"n_layers": L, "attention_layers": ATTENTION})
    assert "its 2 softmax attention layers of 5 (model layers 1, 3); 3 linear-attention layers" \
        " are left out" in three
    one = left_out({"n_layers": 4, "attention_layers": [0, 1, 3]})
    assert "(model layers 0, 1, 3); 1 linear-attention layer is left out" in one


def test_comparison_refuses_a_hybrid_layers_table_of_other_layers():
    record = {"n_layers": L, "d_model": D, "ffn_input": "W_gate", "attention_layers": ATTENTION}
    with pytest.raises(ValueError, match=r"h: layers table does not hold layers \[1, 3\] \(its"
                       " softmax-attention layers\\)"):
        compare_table({"h": (record, pd.DataFrame({"layer": [0, 1]}))}, 3)
