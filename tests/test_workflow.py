"""The whole workflow on a tiny random Llama: layout, invariants, and numbers equal to direct
formulas computed here from transformers' own modules (naive d x d SVD, d x d projector)."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import (
    NEEDS_CUDA,
    assert_ok,
    markdown_table,
    naive_kernel,
    naive_kernel_svd,
    reference_eff_rank,
    run_snakemake,
    tiny_run_config,
)

from weight_geometry.figure_names import FIGURES
from weight_geometry.results_io import Analysis

pytestmark = pytest.mark.workflow

KS = (4, 10)
HEADS = (0, 1, 2, 3)
#: Every (head, layer) of the tiny model (4 heads, 4 layers), sorted.
ALL_HEAD_LAYERS = [(head, layer) for head in range(4) for layer in range(4)]


@pytest.fixture(scope="module")
def modules(tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    return model.model.layers, model.config


def qk_weights(layer) -> tuple[np.ndarray, np.ndarray]:
    """``(W_Q, W_K)`` of a transformers decoder layer, float64: the inputs of the naive kernel
    (conftest's :func:`naive_kernel` pairs the heads as transformers' ``repeat_kv`` does:
    tests/test_architectures.py checks it)."""
    att = layer.self_attn
    return (att.q_proj.weight.detach().double().numpy(),
            att.k_proj.weight.detach().double().numpy())


def naive_basis(layer, config, head: int, k: int) -> np.ndarray:
    """Top-k right singular vectors of the explicitly formed d x d kernel."""
    return naive_kernel_svd(*qk_weights(layer), head, config.head_dim)[1][:k]


def test_output_layout(tiny_run):
    r = tiny_run / "results" / "tiny"
    expected = ["model.json", "effective_ranks.csv", "effective_ranks.parquet",
                "kernel_effective_ranks.parquet"]
    expected += [f"bases/layers000-003/{n}.npy" for n in
                 ("vectors", "singular_values", "ffn_input_energy", "ffn_input_norm2")]
    for k in KS:
        expected += [f"k{k}/{n}" for n in ("similarity_mean.npy", "bottleneck.parquet",
                                            "alignment.parquet", "layers.parquet", "layers.csv",
                                            "report.md")]
        expected += [f"k{k}/similarity_head{h}.npy" for h in HEADS]
        expected += [f"k{k}/figures/{f}.png" for f in FIGURES]
    missing = [p for p in expected if not (r / p).is_file()]
    assert not missing
    assert (tiny_run / "logs" / "tiny" / "model_info.log").is_file()
    assert (r / "benchmarks" / "extract_layers000-003.tsv").is_file()


def test_model_json(tiny_run):
    m = json.loads((tiny_run / "results/tiny/model.json").read_text())
    assert (m["n_layers"], m["d_model"], m["d_ff"], m["n_heads"], m["n_kv_heads"],
            m["d_head"]) == (4, 64, 96, 4, 2, 24)
    assert m["architecture"] == "llama" and m["format"] == "safetensors"
    assert "float32" in m["storage_dtype"]


def test_bases_equal_naive_svd(tiny_run, modules):
    layers, config = modules
    v = np.load(tiny_run / "results/tiny/bases/layers000-003/vectors.npy")
    s = np.load(tiny_run / "results/tiny/bases/layers000-003/singular_values.npy")
    assert v.shape == (4, 4, 24, 64) and s.shape == (4, 4, 24)
    for layer in range(4):
        for head in HEADS:
            ref = naive_basis(layers[layer], config, head, 24)
            for k in KS:
                p_ours = v[layer, head, :k].T.astype(np.float64) @ v[layer, head, :k]
                p_ref = ref[:k].T @ ref[:k]
                assert np.abs(p_ours - p_ref).max() < 1e-5, (layer, head, k)


@pytest.mark.parametrize("k", KS)
def test_similarity_matrices(tiny_run, modules, k):
    layers, config = modules
    kdir = tiny_run / f"results/tiny/k{k}"
    mats = []
    for head in HEADS:
        sims = np.load(kdir / f"similarity_head{head}.npy")
        assert sims.shape == (4, 4)
        assert np.allclose(sims, sims.T) and np.allclose(np.diag(sims), 1.0)
        assert sims.max() <= 1 + 1e-12
        bases = [naive_basis(layers[i], config, head, k) for i in range(4)]
        for i in range(4):
            for j in range(4):
                direct = np.square(bases[i] @ bases[j].T).sum() / k
                assert sims[i, j] == pytest.approx(direct, abs=1e-5)
        mats.append(sims)
    assert np.allclose(np.load(kdir / "similarity_mean.npy"), np.mean(mats, axis=0))


@pytest.mark.parametrize("k", KS)
def test_alignment_equals_projector_formula(tiny_run, modules, k):
    layers, config = modules
    table = pd.read_parquet(tiny_run / f"results/tiny/k{k}/alignment.parquet")
    assert {"head", "layer", "alignment", "chance"} <= set(table.columns)
    assert sorted(table[["head", "layer"]].itertuples(index=False, name=None)) == ALL_HEAD_LAYERS
    assert table["alignment"].between(0, 1).all()
    assert np.allclose(table["chance"], k / 64)
    for row in table.itertuples():
        gate = layers[row.layer].mlp.gate_proj.weight.detach().double().numpy()
        basis = naive_basis(layers[row.layer], config, row.head, k)
        projector = basis.T @ basis  # d x d, allowed in a test as the independent reference
        direct = np.square(gate @ projector).sum() / np.square(gate).sum()
        assert row.alignment == pytest.approx(direct, rel=1e-5)


def test_effective_ranks_equal_numpy(tiny_run, modules):
    layers, config = modules
    csv = pd.read_csv(tiny_run / "results/tiny/effective_ranks.csv")
    assert list(csv.columns) == ["layer_idx", "weight_type", "shape", "eff_rank"]
    pq = pd.read_parquet(tiny_run / "results/tiny/effective_ranks.parquet")
    assert (pq["source"] == "computed from the weights").all()
    pd.testing.assert_frame_equal(csv, pq.drop(columns="source"), check_dtype=False)
    assert len(csv) == 4 * 7
    modules_of = {"W_Q": "self_attn.q_proj", "W_K": "self_attn.k_proj", "W_V": "self_attn.v_proj",
                  "W_O": "self_attn.o_proj", "W_gate": "mlp.gate_proj", "W_up": "mlp.up_proj",
                  "W_down": "mlp.down_proj"}
    for row in csv.itertuples():
        w = layers[row.layer_idx].get_submodule(modules_of[row.weight_type]).weight
        w = w.detach().numpy()
        assert row.shape == f"{w.shape[0]}x{w.shape[1]}"
        assert row.eff_rank == pytest.approx(reference_eff_rank(w), rel=1e-6)
    kernel = pd.read_parquet(tiny_run / "results/tiny/kernel_effective_ranks.parquet")
    assert sorted(kernel[["head", "layer"]].itertuples(index=False, name=None)) == ALL_HEAD_LAYERS
    for row in kernel.itertuples():
        a = naive_kernel(*qk_weights(layers[row.layer]), row.head, config.head_dim)
        assert row.kernel_eff_rank == pytest.approx(reference_eff_rank(a), rel=1e-6)


def test_bottleneck_and_layer_join(tiny_run):
    kdir = tiny_run / "results/tiny/k4"
    table = pd.read_parquet(kdir / "bottleneck.parquet")
    assert {"head", "layer", "similarity", "bottleneck_layer", "bottleneck_choice"} <= set(
        table.columns)
    assert (table["bottleneck_layer"] == 2).all()
    for head in HEADS:
        sims = np.load(kdir / f"similarity_head{head}.npy")
        got = table[table["head"] == head].sort_values("layer")["similarity"].to_numpy()
        assert np.allclose(got, sims[2])
    layers = pd.read_csv(kdir / "layers.csv")
    ranks = pd.read_csv(tiny_run / "results/tiny/effective_ranks.csv")
    sims = np.load(kdir / "similarity_head1.npy")  # primary head 1
    assert np.allclose(layers["mean_eff_rank"], ranks.groupby("layer_idx")["eff_rank"].mean())
    assert np.allclose(layers["adjacent_similarity"][:3], np.diagonal(sims, 1))
    assert np.isnan(layers["adjacent_similarity"].iloc[3])
    assert np.allclose(layers["bottleneck_similarity"], sims[2])
    align = pd.read_parquet(kdir / "alignment.parquet")
    assert np.allclose(layers["alignment"], align[align["head"] == 1]["alignment"])
    # The figures draw these columns from the layer table's sources (Analysis.primary).
    primary = SimpleNamespace(primary_head=1)
    for source, column, layer_column in ((table, "similarity", "bottleneck_similarity"),
                                         (align, "alignment", "alignment"),
                                         (align, "null_std", "alignment_null_std")):
        series = Analysis.primary(primary, source, column)
        assert series.index.tolist() == layers["layer"].tolist()
        np.testing.assert_array_equal(series.to_numpy(), layers[layer_column].to_numpy())


def test_report_sections_and_figures(tiny_run):
    text = (tiny_run / "results/tiny/k4/report.md").read_text()
    sections = ["## Model configuration", "## Experiment 1", "### Summary statistics",
                "### Phase boundaries", "### Similarity by layer distance", "## Head matching",
                "## Experiment 2", "## Experiment 3", "## Every head", "## k-sensitivity",
                "## Cross-reference", "### Correlation between metrics", "## Key findings",
                "## Tests and multiplicity", "## Appendix: full tables",
                "### Full similarity matrix", "### Per-layer similarity", "### Per-layer alignment",
                "### Averaged similarity matrix (layer", "### Per-head similarity",
                "### Per-head FFN-attention alignment", "### Cross-reference per layer"]
    positions = [text.index(s) for s in sections]
    assert positions == sorted(positions), "report sections out of order"
    for name in FIGURES:
        assert f"](figures/{name}.png)" in text
    assert "](../figures/ksweep.png)" in text
    assert "z (isotropic)" in text and "z (conditional)" in text and "Random pairing" in text
    assert "The verdicts are judged against the row-space-conditional null" in text
    assert "zero-offset slice" in text  # the RoPE caveat
    assert "Bottleneck layer 2: set in the config" in text
    # 2 layers before the bottleneck: a trend from 2 points is undefined, never r = +-1.
    assert "undefined (n=2 < 3)" in text
    # z-scores at their precision (one decimal, signed), not padded to 4 decimals by tabulate.
    for heading, column in (("### Per-layer similarity", "z (isotropic)"),
                            ("### Per-layer alignment", "z (isotropic)"),
                            ("### Per-layer alignment", "z (conditional)")):
        z = _table_column(text, heading, column)
        assert len(z) == 4 and all(re.fullmatch(r"[+-]\d+\.\d", v) for v in z), (heading, z)
    # The last layer has no next layer: its adjacent similarity is n/a, never "nan".
    assert _table_column(text, "### Cross-reference per layer", "Adj sim")[-1] == "n/a"
    assert not re.search(r"\bnan\b", text, re.IGNORECASE)


def _table_column(text: str, heading: str, column: str) -> list[str]:
    """The cells of ``column`` in the first markdown table after ``heading``."""
    return [row[column] for row in markdown_table(text, heading)]


def test_layers_per_job_splits_extraction_with_identical_results(tmp_path, tiny_run,
                                                                  tiny_checkpoint):
    # Only the outputs compared (and what they are computed from): no figures, no report.
    targets = ["results/tiny/effective_ranks.csv", "results/tiny/k4/layers.csv",
               *(f"results/tiny/circuits/composition_{name}.npy" for name in "qkv"),
               *(f"results/tiny/k4/similarity_head{head}.npy" for head in HEADS)]
    assert_ok(run_snakemake(tmp_path, *targets, config=tiny_run_config(
        tiny_checkpoint, top_k=4, layers_per_job=3)))
    r, ref = tmp_path / "results/tiny", tiny_run / "results/tiny"
    assert sorted(p.name for p in (r / "bases").iterdir()) == ["layers000-002", "layers003-003"]
    for name in ["effective_ranks.csv", "k4/layers.csv"]:
        pd.testing.assert_frame_equal(pd.read_csv(r / name), pd.read_csv(ref / name))
    for name in "qkv":
        np.testing.assert_allclose(np.load(r / f"circuits/composition_{name}.npy"),
                                   np.load(ref / f"circuits/composition_{name}.npy"),
                                   rtol=1e-5)
    for head in HEADS:
        assert np.array_equal(np.load(r / f"k4/similarity_head{head}.npy"),
                              np.load(ref / f"k4/similarity_head{head}.npy"))



def test_composition_equals_formed_maps(tiny_run, modules):
    """circuits/: every ordered pair's Q-, K- and V-composition equals the norms of the d x d
    maps formed in float64 from transformers' q/k/v/o projections (GQA: two heads per KV
    head), NaN where the column's layer is not earlier; the tables' shapes and the null's
    exact mean square 1/d."""
    layers, config = modules
    r, dh = tiny_run / "results/tiny/circuits", config.head_dim
    qk, ov = [], []
    for layer in layers:
        att = layer.self_attn
        w_v, w_o = (m.weight.detach().double().numpy() for m in (att.v_proj, att.o_proj))
        qk += [naive_kernel(*qk_weights(layer), i, dh) for i in HEADS]
        ov += [naive_kernel(w_o.T, w_v, i, dh) for i in HEADS]
    fro = np.linalg.norm
    for t, name in enumerate("qkv"):
        got = np.load(r / f"composition_{name}.npy")
        assert got.dtype == np.float32 and got.shape == (16, 16)
        for later, earlier in np.ndindex(16, 16):
            if earlier // 4 >= later // 4:
                assert np.isnan(got[later, earlier])
                continue
            m = (qk[later].T, qk[later], ov[later])[t]
            ref = fro(m @ ov[earlier]) / (fro(m) * fro(ov[earlier]))
            assert got[later, earlier] == pytest.approx(ref, rel=1e-5), (name, later, earlier)
    null = pd.read_parquet(r / "composition_null.parquet")
    assert list(null["type"]) == ["q", "k", "v"] and np.all(null["exact_mean_square"] == 1 / 64)
    top = pd.read_parquet(r / "composition_top.parquet")
    assert len(top) >= 3 * 20 and set(top["type"]) == {"q", "k", "v"}
    assert np.all(top["earlier_layer"] < top["layer"])
    assert len(pd.read_parquet(r / "composition_layers.parquet")) == 3 * 6


def test_read_write_and_circuits_section(tiny_run, modules):
    """k{k}/read_write.parquet: each layer pair's mean overlap of the heads' top-k write and
    key read subspaces equals that of full float64 SVDs of the d x d maps formed from
    transformers' modules; the report's Circuits section, its finding among the key findings,
    its families in the list, and its figures inlined in the HTML page."""
    from weight_geometry.read_write import COLUMNS

    layers, config = modules
    dh, k = config.head_dim, 4
    table = pd.read_parquet(tiny_run / "results/tiny/k4/read_write.parquet")
    assert list(table.columns) == list(COLUMNS) and len(table) == 3 * 6
    writes, keys = [], []
    for layer in layers:
        att = layer.self_attn
        w_v, w_o = (m.weight.detach().double().numpy() for m in (att.v_proj, att.o_proj))
        writes.append([np.linalg.svd(naive_kernel(w_o.T, w_v, i, dh))[0][:, :k].T
                       for i in HEADS])
        keys.append([np.linalg.svd(naive_kernel(*qk_weights(layer), i, dh))[2][:k]
                     for i in HEADS])
    for row in table[table["type"] == "k"].itertuples():
        ref = np.mean([np.square(x @ w.T).sum() / k for x in keys[row.layer]
                       for w in writes[row.earlier_layer]])
        assert row.mean_overlap == pytest.approx(ref, abs=1e-5), row
    text = (tiny_run / "results/tiny/k4/report.md").read_text()
    section = text.split("## Circuits\n", 1)[1].split("\n## ", 1)[0]
    assert section.lstrip().startswith("**Finding:** ")
    assert "**Circuits:** " in text.split("## Key findings", 1)[1]
    families = dict((r["Family"], r["Tests"]) for r in markdown_table(
        text, "## Tests and multiplicity"))
    assert families["K-composition of every head pair vs both nulls"] == "96"
    assert families["Read/write overlap (keys) of layer pairs vs conditional null"] == "6"
    html = (tiny_run / "results/tiny/k4/report.html").read_text()
    assert "Circuits" in html and 'src="figures/read_write.png"' not in html
    for name in ("composition_layers", "composition_heads", "read_write"):
        assert (tiny_run / f"results/tiny/k4/figures/{name}.png").stat().st_size > 10_000

def cross_head(layers, config, k: int) -> np.ndarray:
    """``S[a, i, b, j] = sim(V_a,i, V_b,j)`` from naive d x d SVD bases of every head."""
    bases = [[naive_basis(layer, config, h, k) for h in HEADS] for layer in layers]
    n, h = len(bases), len(HEADS)
    out = np.empty((n, h, n, h))
    for a, b, i, j in np.ndindex(n, n, h, h):
        out[a, i, b, j] = np.square(bases[a][i] @ bases[b][j].T).sum() / k
    return out


@pytest.mark.parametrize("k", KS)
def test_best_match_and_layer_pairs(tiny_run, modules, k):
    layers, config = modules
    kdir = tiny_run / f"results/tiny/k{k}"
    cross = cross_head(layers, config, k)
    best = np.load(kdir / "best_match.npy")
    assert np.allclose(best, cross.max(axis=3).mean(axis=1), atol=1e-5)
    pairs = np.load(kdir / "best_match_pairs.npy")
    assert pairs.shape == (4, 4, 4)
    for a, b, i in np.ndindex(4, 4, 4):
        # The chosen head is a maximiser (ties at float32 precision allowed).
        assert cross[a, i, b, pairs[a, b, i]] >= cross[a, i, b].max() - 1e-5
    table = pd.read_parquet(kdir / "layer_pairs.parquet")
    assert len(table) == 6 and (table["layer_a"] < table["layer_b"]).all()
    for row in table.itertuples():
        a, b = row.layer_a, row.layer_b
        assert row.same_index == pytest.approx(np.diagonal(cross[a, :, b]).mean(), abs=1e-5)
        assert row.best_match == pytest.approx(best[a, b], abs=1e-6)
        # The random pairing's mean is exactly the mean over all head pairs.
        assert row.random_pairing_mean == pytest.approx(cross[a, :, b].mean(), abs=1e-5)
        assert row.isotropic_mean == pytest.approx(k / 64)
    layer_table = pd.read_parquet(kdir / "layers.parquet")
    assert np.allclose(layer_table["adjacent_best_match"][:3], np.diagonal(best, 1))


def test_alignment_nulls_against_numpy(tiny_run, modules):
    layers, _ = modules
    k, d = 4, 64
    table = pd.read_parquet(tiny_run / f"results/tiny/k{k}/alignment.parquet")
    assert sorted(table[["head", "layer"]].itertuples(index=False, name=None)) == ALL_HEAD_LAYERS
    for row in table.itertuples():
        gate = layers[row.layer].mlp.gate_proj.weight.detach().double().numpy()
        lam = np.linalg.svd(gate, compute_uv=False) ** 2
        assert row.ceiling == pytest.approx(lam[:k].sum() / lam.sum(), rel=1e-5)
        var = 2 * k * (d - k) / (d * (d - 1) * (d + 2)) * (np.sum(lam**2) - lam.sum()**2 / d)
        assert row.null_std == pytest.approx(np.sqrt(var) / lam.sum(), rel=1e-5)
        assert row.z == pytest.approx((row.alignment - k / d) / row.null_std, rel=1e-6)


def test_ksweep_matches_per_k_outputs(tiny_run):
    sweep = pd.read_parquet(tiny_run / "results/tiny/ksweep.parquet")
    assert sweep["k"].tolist() == list(range(1, 24))  # 1 .. d_head - 1
    assert (tiny_run / "results/tiny/figures/ksweep.png").stat().st_size > 0
    for k in KS:
        row = sweep[sweep["k"] == k].iloc[0]
        kdir = tiny_run / f"results/tiny/k{k}"
        sims = [np.load(kdir / f"similarity_head{h}.npy") for h in HEADS]
        off = np.mean([s[~np.eye(4, dtype=bool)].mean() for s in sims])
        adjacent = np.mean([np.diagonal(s, 1).mean() for s in sims])
        assert row["off_diagonal_mean"] == pytest.approx(off, rel=1e-6)
        assert row["adjacent_mean"] == pytest.approx(adjacent, rel=1e-6)
        align = pd.read_parquet(kdir / "alignment.parquet")["alignment"].mean()
        assert row["alignment_mean"] == pytest.approx(align, rel=1e-6)
        assert row["off_diagonal_mean_ratio"] == pytest.approx(off / (k / 64), rel=1e-6)


@NEEDS_CUDA
def test_device_cuda_gives_the_cpu_runs_numbers(tmp_path, tiny_run, tiny_checkpoint):
    """``device: cuda``: the extraction job runs on the GPU (cuBLAS, cuSOLVER) and every
    output agrees with the CPU run's: the same top-k subspaces (singular vectors up to their
    signs), singular values, energies, similarity matrices, effective ranks and layer tables,
    within the float32 precision they are stored and computed in."""
    assert_ok(run_snakemake(tmp_path, config=tiny_run_config(tiny_checkpoint, top_k=4,
                                                             device="cuda")))
    r, ref = tmp_path / "results/tiny", tiny_run / "results/tiny"
    bases = "bases/layers000-003"
    for name in ("singular_values", "ffn_input_energy", "ffn_input_norm2"):
        np.testing.assert_allclose(np.load(r / f"{bases}/{name}.npy"),
                                   np.load(ref / f"{bases}/{name}.npy"), rtol=1e-5, err_msg=name)
    gpu, cpu = (np.load(p / f"{bases}/vectors.npy")[..., :4, :].astype(np.float64)
                for p in (r, ref))
    overlap = np.square(gpu @ np.swapaxes(cpu, -1, -2)).sum(axis=(-1, -2))  # k for equal spans
    np.testing.assert_allclose(overlap, 4.0, rtol=1e-5)
    for head in HEADS:
        np.testing.assert_allclose(np.load(r / f"k4/similarity_head{head}.npy"),
                                   np.load(ref / f"k4/similarity_head{head}.npy"), atol=1e-5)
    for name in ["effective_ranks.csv", "k4/layers.csv"]:  # each within 1e-4 of the truth
        pd.testing.assert_frame_equal(pd.read_csv(r / name), pd.read_csv(ref / name),
                                      check_exact=False, rtol=2e-4, atol=1e-6)


def row_space_projector(layer, config, head: int) -> np.ndarray:
    """The d x d projector onto the row space of the KV head that ``head`` reads (from
    transformers' own k_proj, numpy's QR; tests only)."""
    w_k = qk_weights(layer)[1]
    d_head = config.head_dim
    kv = head // (config.num_attention_heads // config.num_key_value_heads)
    q = np.linalg.qr(w_k[kv * d_head:(kv + 1) * d_head].T)[0]
    return q @ q.T


def test_conditional_nulls_against_direct_projector_formulas(tiny_run, modules):
    """The row-space-conditional nulls of the stored tables against direct formulas on
    transformers' weights: alignment's chance (k / d_head) ||W_gate P_R||_F^2 / ||W_gate||_F^2,
    and same-index's mean over heads of (k / d_head^2) ||Q_a Q_b^T||_F^2 = (k / d_head^2)
    tr(P_a P_b)."""
    layers, config = modules
    k, m = 4, config.head_dim
    kdir = tiny_run / f"results/tiny/k{k}"
    table = pd.read_parquet(kdir / "alignment.parquet")
    for row in table.itertuples():
        gate = layers[row.layer].mlp.gate_proj.weight.detach().double().numpy()
        proj = row_space_projector(layers[row.layer], config, row.head)
        inside = np.linalg.norm(gate @ proj) ** 2 / np.linalg.norm(gate) ** 2
        assert row.conditional_chance == pytest.approx(k / m * inside, rel=1e-5)
        assert row.conditional_ratio == pytest.approx(row.alignment / row.conditional_chance)
    pairs = pd.read_parquet(kdir / "layer_pairs.parquet")
    for row in pairs.itertuples():
        a, b = layers[row.layer_a], layers[row.layer_b]
        expected = np.mean([k / m**2 * np.trace(row_space_projector(a, config, h)
                                                @ row_space_projector(b, config, h))
                            for h in HEADS])
        assert row.conditional_mean == pytest.approx(expected, rel=1e-5)
    assert {"p_pairing", "p_pairing_adjusted", "p_conditional",
            "p_conditional_adjusted"} <= set(pairs.columns)
    layer_table = pd.read_parquet(kdir / "layers.parquet")
    for column in ("adjacent", "bottleneck", "alignment"):
        tested = layer_table[f"{column}_p"].notna()
        assert tested.sum() >= 3, column
        assert (layer_table[f"{column}_p_adjusted"][tested]
                >= layer_table[f"{column}_p"][tested] - 1e-12).all(), column
