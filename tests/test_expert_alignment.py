"""Experiment 3 per expert: every expert's W_gate, the shared expert's and every router row
against a reference from the live transformers modules (naive float64 SVD of the formed kernel
``W_Q_i^T W_K_j``, the module's own expert and router weights); both nulls from the module's
weights; the table's layers, labels and multiplicity; the workflow end to end."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
from conftest import assert_ok, assert_one_line, make_llama_checkpoint, run_snakemake
from test_moe import SPARSE, build, sparse_block

from weight_geometry.checkpoint import open_checkpoint
from weight_geometry.errors import UserError
from weight_geometry.expert_alignment import (
    EXPERT_ARRAYS,
    ROUTER,
    expert_alignment_table,
    record_units,
)
from weight_geometry.extraction import extract_layer
from weight_geometry.ranks import EXPERT_RANK_COLUMNS, normalized_eff_rank, per_weight_type
from weight_geometry.statistics import bottleneck_profile
from weight_geometry.user_ranks import read_user_ranks

K = 3
ARCHS = ("qwen3_moe", "mixtral", "qwen2_moe")


def extract(path, fold_norms: bool = False):
    """The checkpoint and its per-unit arrays stacked over layers, ``{name: (L, ...)}``."""
    ckpt = open_checkpoint(str(path), fold_norms=fold_norms)
    layers = [extract_layer(ckpt, layer, torch.device("cpu"), fold_norms=fold_norms)
              for layer in range(ckpt.dims.n_layers)]
    return ckpt, {name: np.stack([getattr(r, name) for r in layers]) for name in EXPERT_ARRAYS}


def table_of(ckpt, arrays, k: int = K) -> pd.DataFrame:
    units = record_units(ckpt.describe())
    return expert_alignment_table(arrays["expert_energy"], arrays["expert_norm2"],
                                  arrays["expert_singular_values"],
                                  arrays["expert_rowspace_eigenvalues"], units, k,
                                  ckpt.dims.as_dict(), ckpt.adapter.ffn_input)


def module_weights(model, arch: str, layer: int, gains: bool) -> dict:
    """From the live module: W_Q, W_K and ``{(expert, router_row): W_u}`` (float64), the
    pre-attention gain folded into W_Q and W_K, the pre-FFN gain into W_gate and the router
    when ``gains``."""
    blk = model.model.layers[layer]
    att = blk.self_attn
    g_att = blk.input_layernorm.weight.detach().double().numpy() if gains else 1.0
    g_ffn = blk.post_attention_layernorm.weight.detach().double().numpy() if gains else 1.0
    mlp = sparse_block(model, layer)
    d_e = mlp.experts.gate_up_proj.shape[1] // 2
    units = {}
    for e in range(mlp.experts.gate_up_proj.shape[0]):
        units[(str(e), None)] = mlp.experts.gate_up_proj[e, :d_e].detach().double().numpy()
    if arch == "qwen2_moe":
        units[("shared", None)] = mlp.shared_expert.gate_proj.weight.detach().double().numpy()
    for e, row in enumerate(mlp.gate.weight.detach().double().numpy()):
        units[(ROUTER, str(e))] = row[None, :]
    if arch == "qwen2_moe":   # the shared expert's sigmoid gate: a router row of its own
        units[(ROUTER, "shared")] = mlp.shared_expert_gate.weight.detach().double().numpy()
    return {"W_Q": att.q_proj.weight.detach().double().numpy() * g_att,
            "W_K": att.k_proj.weight.detach().double().numpy() * g_att,
            "units": {key: w * g_ffn for key, w in units.items()}}


def reference_rows(w: dict, dims, k: int) -> pd.DataFrame:
    """Alignment and both nulls of every (unit, head) from formed matrices, float64: ``V_k``
    from ``np.linalg.svd`` of the ``d x d`` kernel, the KV row space's projector from a QR of
    ``W_K_j^T``, the spectra from ``np.linalg.svd`` and ``eigvalsh``."""
    h, n_kv, m, d = dims.n_heads, dims.n_kv_heads, dims.d_head, dims.d_model
    rows = []
    for i in range(h):
        j = i // (h // n_kv)
        w_q, w_k = w["W_Q"][i * m:(i + 1) * m], w["W_K"][j * m:(j + 1) * m]
        v_k = np.linalg.svd(w_q.T @ w_k)[2][:k]                       # (k, d)
        q = np.linalg.qr(w_k.T)[0]                                    # (d, m)
        for (expert, row), u in w["units"].items():
            total = np.sum(u**2)
            lam = np.linalg.svd(u, compute_uv=False) ** 2
            mu = np.linalg.eigvalsh(q.T @ u.T @ u @ q)
            c_iso = 2 * k * (d - k) / (d * (d - 1) * (d + 2))
            c_cond = 2 * k * (m - k) / (m * (m - 1) * (m + 2))
            rows.append({
                "expert": expert, "router_row": row, "head": i,
                "alignment": np.sum((u @ v_k.T) ** 2) / total,
                "null_std": np.sqrt(c_iso * (np.sum(lam**2) - total**2 / d)) / total,
                "ceiling": np.sort(lam)[::-1][:k].sum() / total,
                "conditional_chance": k / m * np.sum((u @ q) ** 2) / total,
                "conditional_std": np.sqrt(c_cond * (np.sum(mu**2) - mu.sum() ** 2 / m)) / total,
                "conditional_ceiling": np.sort(mu)[::-1][:k].sum() / total})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module", params=ARCHS)
def built(request, tmp_path_factory):
    arch = request.param
    path = tmp_path_factory.mktemp(arch) / arch
    return arch, build(arch, path), path


@pytest.mark.parametrize("fold_norms", [False, True], ids=["raw", "folded"])
def test_every_expert_and_router_row_equals_formed_kernel_reference(built, fold_norms):
    arch, model, path = built
    if fold_norms and arch == "qwen3_moe":
        pytest.skip("QK-norm gains fold per head row; the reference folds only the layer norms")
    ckpt, arrays = extract(path, fold_norms)
    table = table_of(ckpt, arrays)
    assert sorted(table["layer"].unique()) == sorted(SPARSE[arch])
    for layer in SPARSE[arch]:
        ref = reference_rows(module_weights(model, arch, layer, fold_norms), ckpt.dims, K)
        ours = table[table["layer"] == layer].reset_index(drop=True)
        assert len(ours) == len(ref) == ckpt.dims.n_heads * (
            2 * ckpt.moe.n_experts + 2 * (arch == "qwen2_moe"))
        key = ["expert", "router_row", "head"]
        merged = pd.merge(ref.fillna({"router_row": "-"}),
                          ours.astype({"expert": object, "router_row": object})
                          .fillna({"router_row": "-"}), on=key, suffixes=("_ref", ""))
        assert len(merged) == len(ref)
        for column in ("alignment", "null_std", "ceiling", "conditional_chance",
                       "conditional_std", "conditional_ceiling"):
            np.testing.assert_allclose(merged[column], merged[f"{column}_ref"], rtol=2e-5,
                                       atol=1e-7, err_msg=f"{arch} layer {layer} {column}")
        assert (merged["weight"] == np.where(merged["expert"] == ROUTER, ROUTER,
                                             "W_gate")).all()


def test_table_is_one_family_with_its_ratios(built):
    arch, _, path = built
    ckpt, arrays = extract(path)
    table = table_of(ckpt, arrays)
    d = ckpt.dims.d_model
    np.testing.assert_allclose(table["chance"], K / d)
    np.testing.assert_allclose(table["ratio"], table["alignment"] / (K / d))
    np.testing.assert_allclose(table["conditional_ratio"],
                               table["alignment"] / table["conditional_chance"])
    np.testing.assert_allclose(table["z"], (table["alignment"] - K / d) / table["null_std"])
    np.testing.assert_allclose(table["conditional_z"], (table["alignment"]
                                                        - table["conditional_chance"])
                               / table["conditional_std"])
    np.testing.assert_allclose(table["conditional_p_adjusted"],
                               scipy.stats.false_discovery_control(table["conditional_p"]))
    # Router rows: rank one, isotropic ceiling 1 and floor 0.
    router = table[table["expert"] == ROUTER]
    np.testing.assert_allclose(router["ceiling"], 1.0)
    np.testing.assert_allclose(router["floor"], 0.0)
    # Layers without experts hold NaN and give no rows.
    for layer in set(range(ckpt.dims.n_layers)) - SPARSE[arch]:
        assert np.isnan(arrays["expert_norm2"][layer]).all()


def test_router_rows_nulls_are_beta_distributions(built):
    """A router row ``w`` is rank one: for a Haar-random k-subspace of R^d, ``||V w||^2 /
    ||w||^2 ~ Beta(k/2, (d-k)/2)``; within the head's KV row space (dimension m), the share is
    ``||Q_j w||^2 / ||w||^2`` times ``Beta(k/2, (m-k)/2)``. scipy's moments of those."""
    _, _, path = built
    ckpt, arrays = extract(path)
    router = table_of(ckpt, arrays)
    router = router[router["expert"] == ROUTER]
    d, m = ckpt.dims.d_model, ckpt.dims.d_head
    np.testing.assert_allclose(router["null_std"], scipy.stats.beta(K / 2, (d - K) / 2).std(),
                               rtol=1e-10)
    inside = router["conditional_chance"] * m / K          # ||Q_j w||^2 / ||w||^2
    np.testing.assert_allclose(router["conditional_std"],
                               inside * scipy.stats.beta(K / 2, (m - K) / 2).std(), rtol=1e-10)
    np.testing.assert_allclose(router["conditional_ceiling"], inside, rtol=1e-10)


def test_every_k_follows_from_one_extraction(built):
    """The stored energies are per direction: the table at k = 1 and k = d_head - 1 equal the
    reference without another read of the weights."""
    arch, model, path = built
    ckpt, arrays = extract(path)
    layer = min(SPARSE[arch])
    for k in (1, ckpt.dims.d_head - 1):
        ours = table_of(ckpt, arrays, k)
        ours = ours[ours["layer"] == layer]
        ref = reference_rows(module_weights(model, arch, layer, False), ckpt.dims, k)
        np.testing.assert_allclose(np.sort(ours["alignment"]), np.sort(ref["alignment"]),
                                   rtol=2e-5, atol=1e-7)


def test_dense_model_has_no_units_and_an_empty_table(tmp_path):
    path = make_llama_checkpoint(tmp_path / "dense", num_hidden_layers=2)
    ckpt, arrays = extract(path)
    assert arrays["expert_energy"].shape == (2, 0, 4, 24)
    assert record_units(ckpt.describe()) == []
    table = table_of(ckpt, arrays)
    assert table.empty and {"layer", "expert", "router_row", "head", "alignment",
                            "conditional_p_adjusted"} <= set(table.columns)


def computed_ranks(ckpt) -> pd.DataFrame:
    """The extraction's effective-rank table of ``ckpt`` (expert column: null where none)."""
    rows = [r if len(r) == 5 else (*r, None) for layer in range(ckpt.dims.n_layers)
            for r in extract_layer(ckpt, layer, torch.device("cpu")).weight_ranks]
    return pd.DataFrame(rows, columns=list(EXPERT_RANK_COLUMNS)).astype({"expert": "string"})


@pytest.fixture(scope="module")
def qwen2_moe(tmp_path_factory):
    """Qwen2-MoE (layer 0 sparse with a shared expert, layer 1 dense) and its computed ranks."""
    path = tmp_path_factory.mktemp("ranks") / "qwen2_moe"
    build("qwen2_moe", path)
    ckpt = open_checkpoint(str(path))
    return ckpt, computed_ranks(ckpt)


def _csv(tmp_path, table: pd.DataFrame) -> str:
    path = tmp_path / "ranks.csv"
    table.to_csv(path, index=False)
    return str(path)


def test_user_ranks_of_a_moe_model_round_trip_with_their_expert_column(qwen2_moe, tmp_path):
    """The workflow's own table, shuffled and with transposed shapes, reads back as it."""
    ckpt, ranks = qwen2_moe
    shuffled = ranks.sample(frac=1, random_state=0)
    shuffled["shape"] = [f"{c}x{r}" for r, c in (s.split("x") for s in shuffled["shape"])]
    got = read_user_ranks(_csv(tmp_path, shuffled), ckpt.dims, ckpt.weight_types, ckpt.moe)
    pd.testing.assert_frame_equal(got, ranks)
    assert set(got.loc[got["layer_idx"] == 0, "expert"].dropna()) == {"0", "1", "2", "3",
                                                                     "shared"}


def _edit(ranks: pd.DataFrame, case: str) -> pd.DataFrame:
    out = ranks.copy()
    expert = out["expert"].astype(object)
    if case == "no column":
        return out.drop(columns="expert")
    if case == "missing expert row":
        return out[~((out["layer_idx"] == 0) & (out["weight_type"] == "W_up")
                     & (expert == "3"))]
    if case == "expert on attention":
        out.loc[(out["layer_idx"] == 0) & (out["weight_type"] == "W_Q"), "expert"] = "2"
        return out
    if case == "expert in a dense layer":
        out.loc[(out["layer_idx"] == 1) & (out["weight_type"] == "W_gate"), "expert"] = "0"
        return out
    if case == "unknown expert":
        out.loc[(out["layer_idx"] == 0) & (expert == "3"), "expert"] = "9"
        return out
    if case == "shared shape":   # the shared expert's rows given a routed expert's shape
        routed = out.loc[(out["layer_idx"] == 0) & (expert == "0"), "shape"].to_numpy()
        out.loc[(out["layer_idx"] == 0) & (expert == "shared"), "shape"] = routed
        return out
    raise ValueError(case)


@pytest.mark.parametrize("case, fragments", [
    ("no column", ["no expert column", "layers 0", "0, 1, 2, 3, shared"]),
    ("missing expert row", ["no row for (layer 0, W_up, expert 3)"]),
    ("expert on attention", ["(layer 0, W_Q, expert 2)", "an expert of a weight without"]),
    ("expert in a dense layer", ["(layer 1, W_gate, expert 0)"]),
    ("unknown expert", ["(layer 0, W_gate, expert 9)"]),
    ("shared shape", ["(layer 0, W_gate)", "expected 40x32"]),
])
def test_bad_moe_user_ranks_are_one_line_errors(qwen2_moe, tmp_path, case, fragments):
    ckpt, ranks = qwen2_moe
    path = _csv(tmp_path, _edit(ranks, case))
    with pytest.raises(UserError) as err:
        read_user_ranks(path, ckpt.dims, ckpt.weight_types, ckpt.moe)
    assert_one_line(err.value, path, *fragments)


def test_dense_model_csv_may_carry_an_empty_expert_column_only(tmp_path):
    path = make_llama_checkpoint(tmp_path / "dense", num_hidden_layers=2)
    ckpt = open_checkpoint(str(path))
    ranks = computed_ranks(ckpt)
    got = read_user_ranks(_csv(tmp_path, ranks), ckpt.dims, ckpt.weight_types, ckpt.moe)
    pd.testing.assert_frame_equal(got, ranks.drop(columns="expert"))
    ranks.loc[3, "expert"] = "0"
    csv = _csv(tmp_path, ranks)
    with pytest.raises(UserError) as err:
        read_user_ranks(csv, ckpt.dims, ckpt.weight_types, ckpt.moe)
    assert_one_line(err.value, csv, "expert '0' (line 5)", "the model has no experts")


def test_per_layer_means_count_each_expert_weight_type_once(qwen2_moe):
    """A sparse layer's W_gate, W_up, W_down enter the per-layer means as their experts' mean
    (7 values per layer, as a dense layer); the bottleneck rule reads W_Q and W_K only."""
    ckpt, ranks = qwen2_moe
    normalized = ranks["eff_rank"] / [min(int(x) for x in s.split("x")) for s in ranks["shape"]]
    by_type = per_weight_type(ranks)
    assert (by_type.groupby("layer_idx").size() == 7).all()
    for layer in range(2):
        rows = ranks["layer_idx"] == layer
        expected = np.mean([normalized[rows & (ranks["weight_type"] == wt)].mean()
                            for wt in ckpt.weight_types])
        got = by_type.loc[by_type["layer_idx"] == layer, "normalized_eff_rank"].mean()
        assert got == pytest.approx(expected, rel=1e-12)
    sparse = ranks["layer_idx"] == 0
    assert by_type.loc[0:3, "weight_type"].tolist() == ["W_Q", "W_K", "W_V", "W_O"]
    assert not np.isclose(normalized[sparse].mean(), by_type.loc[by_type["layer_idx"] == 0,
                                                                 "normalized_eff_rank"].mean())
    qk = ranks[ranks["weight_type"].isin(["W_Q", "W_K"])]
    pd.testing.assert_series_equal(bottleneck_profile(ranks),
                                   normalized_eff_rank(qk).groupby(qk["layer_idx"]).mean(),
                                   check_names=False)


@pytest.mark.workflow
def test_workflow_writes_expert_alignment_and_its_report_section(tmp_path):
    """Qwen2-MoE end to end with the user's effective ranks (its CSV with an expert column;
    without one the plan stops in one line): the per-expert table, the report's section and
    family, per-layer means over the experts' mean, the dense layer in the same tables."""
    build("qwen2_moe", tmp_path / "ckpt")
    ckpt = open_checkpoint(str(tmp_path / "ckpt"))
    ranks = computed_ranks(ckpt)
    ranks.drop(columns="expert").to_csv(tmp_path / "bad.csv", index=False)
    ranks.to_csv(tmp_path / "ranks.csv", index=False)
    config = {"models": {"moe": {"source": str(tmp_path / "ckpt"),
                                 "effective_ranks": str(tmp_path / "bad.csv")}},
              "top_k": 3, "heads": {"sample": 2}, "device": "cpu"}
    bad = run_snakemake(tmp_path / "dry", "-n", config=config)
    assert bad.returncode != 0 and "no expert column" in bad.stderr
    config["models"]["moe"]["effective_ranks"] = str(tmp_path / "ranks.csv")
    workdir = tmp_path / "run"
    assert_ok(run_snakemake(workdir, config=config))
    r = workdir / "results" / "moe"
    table = pd.read_parquet(r / "k3" / "alignment_experts.parquet")
    assert set(table["layer"]) == {0}
    assert set(table["expert"]) == {"0", "1", "2", "3", "shared", ROUTER}
    assert len(table) == 4 * (4 + 1 + 4 + 1)
    assert set(table.loc[table["expert"] == ROUTER, "router_row"]) == {"0", "1", "2", "3",
                                                                      "shared"}
    ours = table_of(*extract(tmp_path / "ckpt", fold_norms=True))
    np.testing.assert_allclose(table["alignment"], ours["alignment"], rtol=1e-6)
    assert set(pd.read_parquet(r / "k3" / "alignment.parquet")["layer"]) == {0, 1}
    stored = pd.read_parquet(r / "effective_ranks.parquet")
    assert stored["expert"].notna().sum() == 3 * 5
    layers = pd.read_parquet(r / "k3" / "layers.parquet")
    normalized = stored["eff_rank"] / [min(map(int, s.split("x"))) for s in stored["shape"]]
    per_type = normalized.groupby([stored["layer_idx"], stored["weight_type"]]).mean()
    np.testing.assert_allclose(layers["mean_normalized_eff_rank"],
                               per_type.groupby(level=0).mean().to_numpy(), rtol=1e-12)
    report = (r / "k3" / "report.md").read_text()
    assert "### Experts and router" in report and "| Router rows " in report
    assert "| Dense layers' FFN input " in report   # layer 1, beside the experts
    assert "Alignment per expert vs conditional null" in report
    assert "enters the per-layer means as its experts' mean" in report
