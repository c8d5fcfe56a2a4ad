"""Mixture-of-experts checkpoints (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE), built by transformers'
own config classes: every expert, the shared expert and the router read as the live modules
compute them, one tensor (or one fused slice) at a time; dense layers mixed in where
``mlp_only_layers`` says so; per-expert effective ranks against numpy; the workflow end to end."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import transformers as T
from conftest import assert_ok, reference_eff_rank, run_snakemake, spread_parameters
from safetensors.torch import save_file

from weight_geometry.architectures import SHARED
from weight_geometry.checkpoint import open_checkpoint
from weight_geometry.extraction import extract_layer

COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=64)
CONFIGS = {
    "mixtral": lambda: T.MixtralConfig(**COMMON, intermediate_size=40, num_local_experts=4,
                                       num_experts_per_tok=2),
    # Layer 1 dense (mlp_only_layers), layer 0 sparse with a shared expert of its own width.
    "qwen2_moe": lambda: T.Qwen2MoeConfig(**COMMON, intermediate_size=48,
                                          moe_intermediate_size=24, num_experts=4,
                                          shared_expert_intermediate_size=40,
                                          num_experts_per_tok=2, mlp_only_layers=[1]),
    "qwen3_moe": lambda: T.Qwen3MoeConfig(**COMMON, head_dim=16, intermediate_size=48,
                                          moe_intermediate_size=24, num_experts=4,
                                          num_experts_per_tok=2, mlp_only_layers=[0]),
    "olmoe": lambda: T.OlmoeConfig(**COMMON, intermediate_size=24, num_experts=4,
                                   num_experts_per_tok=2),
    # Layer 0 dense (first_k_dense_replace), two shared experts stored as one FFN of 2 x 24.
    "glm4_moe": lambda: T.Glm4MoeConfig(**COMMON, head_dim=16, intermediate_size=48,
                                        moe_intermediate_size=24, n_routed_experts=4,
                                        n_shared_experts=2, num_experts_per_tok=2,
                                        first_k_dense_replace=1, use_qk_norm=True),
    "minimax_m2": lambda: T.MiniMaxM2Config(**COMMON, head_dim=16, intermediate_size=24,
                                            num_local_experts=4, num_experts_per_tok=2),
}
SPARSE = {"mixtral": {0, 1}, "qwen2_moe": {0}, "qwen3_moe": {1}, "olmoe": {0, 1},
          "glm4_moe": {1}, "minimax_m2": {0, 1}}
#: The shared expert's module under the sparse block, where there is one.
SHARED_EXPERT = {"qwen2_moe": "shared_expert", "glm4_moe": "shared_experts"}


def build(arch: str, path, fused: bool = False, config=None):
    """The model (of ``config``, default ``CONFIGS[arch]``), saved by ``save_pretrained`` (one
    tensor per expert), or with ``fused`` its in-memory state dict (``experts.gate_up_proj``
    etc., 3-D) written as is beside its config."""
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config or CONFIGS[arch]())
    spread_parameters(model)  # the router starts at zero, the gains at one
    model.save_pretrained(path)
    if fused:
        for f in path.glob("*.safetensors"):
            f.unlink()
        state = {n: t.contiguous() for n, t in model.state_dict().items()}
        state.pop("lm_head.weight", None)
        save_file(state, path / "model.safetensors")
    return model


def sparse_block(model, layer: int):
    return model.model.layers[layer].mlp


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def built(request, tmp_path_factory):
    arch = request.param
    path = tmp_path_factory.mktemp(arch) / arch
    return arch, build(arch, path), path


@pytest.mark.parametrize("fused", [False, True], ids=["per-expert", "fused"])
def test_experts_and_router_reproduce_transformers_modules(built, tmp_path, fused):
    arch, model, path = built
    if fused:
        path = tmp_path / arch
        build(arch, path, fused=True)
    ckpt = open_checkpoint(str(path))
    assert ckpt.expert_layout.fused == fused
    assert ckpt.moe.sparse_layers == SPARSE[arch]
    x = torch.randn(5, 32)
    for layer in range(2):
        ours = ckpt.read_layer(layer)
        blk = model.model.layers[layer]
        q = blk.self_attn.q_proj
        with torch.no_grad():
            np.testing.assert_allclose(x.numpy() @ ours["W_Q"].T,
                                       q(x) - (0 if q.bias is None else q.bias), atol=1e-5)
        if layer not in SPARSE[arch]:   # a dense layer mixed in: Llama's MLP
            assert set(ours) == set(ckpt.weight_types)
            with torch.no_grad():
                np.testing.assert_allclose(x.numpy() @ ours["W_gate"].T,
                                           blk.mlp.gate_proj(x), atol=1e-5)
            continue
        assert set(ours) == {"W_Q", "W_K", "W_V", "W_O"}
        mlp = sparse_block(model, layer)
        with torch.no_grad():
            logits = x @ mlp.gate.weight.T
            np.testing.assert_allclose(x.numpy() @ ckpt.read_router(layer).T, logits,
                                       atol=1e-5)
        seen = []
        for expert, w in ckpt.iter_experts(layer):
            seen.append(expert)
            ours_out = (torch.nn.functional.silu(x @ torch.from_numpy(w["W_gate"]).T)
                        * (x @ torch.from_numpy(w["W_up"]).T)) @ torch.from_numpy(w["W_down"]).T
            with torch.no_grad():
                if expert == SHARED:
                    ref = getattr(mlp, SHARED_EXPERT[arch])(x)
                else:   # every token to this expert alone, weight 1: transformers' forward
                    index = torch.full((5, 1), expert)
                    ref = mlp.experts(x, index, torch.ones(5, 1))
            np.testing.assert_allclose(ours_out.numpy(), ref.numpy(), atol=1e-5,
                                       err_msg=f"{arch} layer {layer} expert {expert}")
        n = ckpt.moe.n_experts
        assert seen == [*range(n), *([SHARED] if arch in SHARED_EXPERT else [])]


def test_fold_norms_folds_the_pre_ffn_gain_into_experts_and_router(built):
    arch, model, path = built
    layer = min(SPARSE[arch])
    raw, folded = open_checkpoint(str(path)), open_checkpoint(str(path), fold_norms=True)
    g = model.model.layers[layer].post_attention_layernorm.weight.detach().numpy()
    np.testing.assert_allclose(folded.read_router(layer, True), raw.read_router(layer) * g,
                               rtol=1e-6)
    for (e, w), (_, w_raw) in zip(folded.iter_experts(layer, True), raw.iter_experts(layer),
                                  strict=True):
        for wt in ("W_gate", "W_up"):
            np.testing.assert_allclose(w[wt], w_raw[wt] * g, rtol=1e-6, err_msg=f"{e} {wt}")
        np.testing.assert_array_equal(w["W_down"], w_raw["W_down"])


def test_per_expert_effective_ranks_and_mean_ffn_input(built):
    """One row per expert weight (``expert`` 0..E-1, ``shared``) equal to numpy's SVD on the
    module's weights; the layer's FFN input is the routed experts' mean W_gate Gram."""
    arch, model, path = built
    ckpt = open_checkpoint(str(path), fold_norms=True)
    for layer in range(2):
        res = extract_layer(ckpt, layer, torch.device("cpu"), fold_norms=True)
        experts = [r for r in res.weight_ranks if len(r) == 5]
        if layer not in SPARSE[arch]:
            assert not experts and len(res.weight_ranks) == 7
            continue
        assert [r[1] for r in res.weight_ranks if len(r) == 4] == ["W_Q", "W_K", "W_V", "W_O"]
        g = model.model.layers[layer].post_attention_layernorm.weight.detach().numpy()
        mlp = sparse_block(model, layer)
        d_e = ckpt.moe.d_expert
        grams = []
        for _, wt, shape, eff, expert in experts:
            if expert == SHARED:
                w = getattr(getattr(mlp, SHARED_EXPERT[arch]), {
                    "W_gate": "gate_proj", "W_up": "up_proj", "W_down": "down_proj"}[wt]
                    ).weight.detach()
            else:
                e = int(expert)
                w = {"W_gate": mlp.experts.gate_up_proj[e, :d_e],
                     "W_up": mlp.experts.gate_up_proj[e, d_e:],
                     "W_down": mlp.experts.down_proj[e]}[wt].detach()
            w = w.numpy() * (g if wt != "W_down" else 1)
            assert shape == f"{w.shape[0]}x{w.shape[1]}"
            assert eff == pytest.approx(reference_eff_rank(w), rel=1e-4), (arch, wt, expert)
            if wt == "W_gate" and expert != SHARED:
                grams.append(w.astype(np.float64).T @ w)
        n = ckpt.moe.n_experts
        assert len(experts) == 3 * (n + (arch in SHARED_EXPERT))
        mean = sum(grams) / n
        assert res.ffn_input_norm2 == pytest.approx(np.trace(mean), rel=1e-6)
        np.testing.assert_allclose(res.ffn_input_singular_values,
                                   np.sqrt(np.clip(np.linalg.eigvalsh(mean)[::-1], 0, None)),
                                   atol=1e-3 * np.sqrt(np.linalg.eigvalsh(mean)[-1]))
        v = res.vectors.astype(np.float64)                       # (h, d_head, d)
        np.testing.assert_allclose(res.ffn_input_energy,
                                   np.einsum("hrd,de,hre->hr", v, mean, v), rtol=1e-4)


def test_unsupported_moe_type_is_refused_in_one_line(tmp_path):
    build("olmoe", tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["model_type"] = "jamba"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    from weight_geometry.errors import UserError
    with pytest.raises(UserError) as info:
        open_checkpoint(str(tmp_path / "m"))
    assert "'jamba' is not supported" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.workflow
def test_workflow_runs_on_qwen2_moe(tmp_path):
    """Qwen2-MoE (a sparse layer with a shared expert, a dense one) through extraction, the
    effective-rank table and the alignment."""
    build("qwen2_moe", tmp_path / "ckpt")
    workdir = tmp_path / "run"
    targets = [f"results/moe/{p}" for p in ("model.json", "effective_ranks.csv",
                                             "k3/alignment.parquet")]
    assert_ok(run_snakemake(workdir, *targets, config={
        "models": {"moe": {"source": str(tmp_path / "ckpt")}}, "top_k": 3,
        "heads": {"sample": 2}, "device": "cpu"}))
    r = workdir / "results" / "moe"
    assert json.loads((r / "model.json").read_text())["experts"]["sparse_layers"] == [0]
    ranks = pd.read_parquet(r / "effective_ranks.parquet")
    assert ranks["expert"].dtype == "string" or ranks["expert"].dtype == object
    sparse = ranks[ranks["layer_idx"] == 0]
    assert sorted(sparse["expert"].dropna().unique()) == ["0", "1", "2", "3", "shared"]
    assert ranks[ranks["layer_idx"] == 1]["expert"].isna().all()
    assert len(ranks) == 4 + 3 * 5 + 7
    align = pd.read_parquet(r / "k3" / "alignment.parquet")
    assert align["alignment"].between(0, 1).all()
    shutil.rmtree(workdir / ".snakemake", ignore_errors=True)
