"""gpt-oss: attention with biases and sinks (left out, and said so), every layer a mixture of
experts stored fused, as published (MXFP4 ``*_blocks`` + ``*_scales``) or as transformers
saves it (``gate_up_proj`` ``(E, d, 2 d_ff)`` in ``x @ W`` orientation, gate and up
interleaved in its columns).

The references are transformers' own: its MXFP4 dequantization
(``integrations.mxfp4.convert_moe_packed_tensors``) for the decoder, and its live modules, for
the MXFP4 checkpoint as transformers itself loads it from the directory (on a CPU it
dequantizes), for every weight, router and expert the reader gives back."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import transformers as T
from conftest import assert_ok, run_snakemake
from safetensors.numpy import load_file, save_file
from test_moe import build

from weight_geometry import mxfp4
from weight_geometry.checkpoint import open_checkpoint
from weight_geometry.errors import UserError

N_EXPERTS, D, D_FF = 4, 64, 32


def config() -> T.GptOssConfig:
    # Widths multiples of 32 (an MXFP4 group); q has h * d_head = 128 rows, not d.
    return T.GptOssConfig(hidden_size=D, intermediate_size=D_FF, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                          num_local_experts=N_EXPERTS, num_experts_per_tok=2, vocab_size=64,
                          max_position_embeddings=64)


def random_mxfp4(rng: np.random.Generator, rows: int, cols: int, low: int = 118,
                 high: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Blocks ``(E, rows, cols / 32, 16)`` of every byte value, scales ``(E, rows, cols / 32)``
    in ``[low, high)`` (``2^-9 .. 2^0``)."""
    groups = cols // mxfp4.GROUP
    blocks = rng.integers(0, 256, (N_EXPERTS, rows, groups, 16), dtype=np.uint8)
    return blocks, rng.integers(low, high, (N_EXPERTS, rows, groups), dtype=np.uint8)


def build_gpt_oss(path, published: bool = False):
    """A random gpt-oss saved to ``path`` by ``save_pretrained`` (biases, sinks, norms and
    router spread: test_moe's ``build``); with ``published``, its experts replaced by random
    MXFP4 blocks and scales with the published checkpoints' ``quantization_config``, and the
    model returned as transformers loads that directory (dequantizing the experts)."""
    model = build("gpt_oss", path, config=config())
    if not published:
        return model
    state, rng = load_file(str(path / "model.safetensors")), np.random.default_rng(0)
    for layer in range(2):
        prefix = f"model.layers.{layer}.mlp.experts."
        for proj, (rows, cols) in {"gate_up_proj": (2 * D_FF, D), "down_proj": (D, D_FF)}.items():
            del state[prefix + proj]
            state[prefix + proj + "_blocks"], state[prefix + proj + "_scales"] = random_mxfp4(
                rng, rows, cols)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
        "lm_head"]}
    (path / "config.json").write_text(json.dumps(cfg))
    return T.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def test_mxfp4_decoding_is_transformers():
    """Every code (all 256 bytes, both nibbles) under every finite exponent (0 .. 254:
    subnormal 2^-127 to overflow to inf at 6 * 2^127) decodes as transformers' own
    dequantization, exactly, over more groups than one decoding chunk (a partial last one)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    rng = np.random.default_rng(1)
    blocks, scales = random_mxfp4(rng, 96, 96, low=0, high=255)
    assert mxfp4._CHUNK_GROUPS < scales.size < 2 * mxfp4._CHUNK_GROUPS
    blocks.reshape(-1, 16)[:16] = np.arange(256, dtype=np.uint8).reshape(16, 16)
    scales.reshape(-1)[-255:] = np.arange(255)                 # in the last, partial chunk
    ref = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                     dtype=torch.float32)      # (E, cols, rows): x @ W
    ours = mxfp4.decode(blocks, scales)
    assert ours.shape == (N_EXPERTS, 96, 96) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref.transpose(1, 2).numpy())
    assert np.isinf(ours).any() and (ours[np.isfinite(ours)] != 0).any()
    with pytest.raises(ValueError):
        mxfp4.decode(blocks, scales[..., :1])


def test_mxfp4_nan_scale_makes_its_group_nan():
    """E8M0's 255 is NaN: every value of its group is NaN (zero codes too), the other groups
    are untouched."""
    blocks = np.arange(64, dtype=np.uint8).reshape(1, 2, 2, 16)
    scales = np.array([[[127, 255], [255, 127]]], dtype=np.uint8)
    ours = mxfp4.decode(blocks, scales).reshape(4, 32)
    assert np.isnan(ours[[1, 2]]).all() and np.isfinite(ours[[0, 3]]).all()
    np.testing.assert_array_equal(ours[0], mxfp4.FP4_VALUES[np.stack(
        [np.arange(16) & 15, np.arange(16) >> 4], axis=1).ravel()])


def gpt_oss_expert(w: dict[str, np.ndarray], x: torch.Tensor, experts) -> torch.Tensor:
    """gpt-oss's expert (``GptOssExperts._apply_gate``: clamped, ``(up + 1) * gate *
    sigmoid(alpha gate)``) from our W_gate, W_up, W_down, without biases."""
    gate = (x @ torch.from_numpy(w["W_gate"]).T).clamp(max=experts.limit)
    up = (x @ torch.from_numpy(w["W_up"]).T).clamp(-experts.limit, experts.limit)
    return ((up + 1) * gate * torch.sigmoid(gate * experts.alpha)) @ torch.from_numpy(
        w["W_down"]).T


@pytest.mark.parametrize("published", [True, False], ids=["mxfp4", "saved"])
def test_reads_as_transformers_modules(tmp_path, published):
    model = build_gpt_oss(tmp_path / "m", published)
    ckpt = open_checkpoint(str(tmp_path / "m"))
    assert ckpt.architecture == "gpt_oss" and ckpt.expert_layout.fused
    assert ckpt.moe.n_experts == N_EXPERTS and ckpt.moe.d_expert == D_FF
    assert ckpt.moe.sparse_layers == {0, 1} and ckpt.moe.d_shared == 0
    assert ("mxfp4" in ckpt.storage_dtype) == published
    assert "attention sinks" in ckpt.describe()["not_used"]
    assert ckpt.read_shared_gate(0) is None
    x = torch.randn(6, D)
    with torch.no_grad():
        for layer in range(2):
            blk = model.model.layers[layer]
            ours = ckpt.read_layer(layer)
            assert set(ours) == {"W_Q", "W_K", "W_V", "W_O"}
            for wt, proj in {"W_Q": blk.self_attn.q_proj, "W_K": blk.self_attn.k_proj,
                             "W_V": blk.self_attn.v_proj}.items():
                np.testing.assert_allclose(x.numpy() @ ours[wt].T, proj(x) - proj.bias,
                                           rtol=1e-5, atol=1e-5, err_msg=f"{wt} {layer}")
            o = blk.self_attn.o_proj
            z = torch.randn(6, o.in_features)
            np.testing.assert_allclose(z.numpy() @ ours["W_O"].T, o(z) - o.bias, rtol=1e-5,
                                       atol=1e-5)
            router = blk.mlp.router
            np.testing.assert_allclose(x.numpy() @ ckpt.read_router(layer).T,
                                       router(x)[0] - router.bias, rtol=1e-5, atol=1e-5)
            experts = blk.mlp.experts
            experts.gate_up_proj_bias.zero_()
            experts.down_proj_bias.zero_()
            seen = []
            for e, w in ckpt.iter_experts(layer):
                seen.append(e)
                assert w["W_gate"].shape == (D_FF, D) and w["W_down"].shape == (D, D_FF)
                ref = experts(x, torch.full((6, 1), e), torch.ones(6, 1))
                np.testing.assert_allclose(gpt_oss_expert(w, x, experts).numpy(), ref.numpy(),
                                           rtol=1e-5, atol=1e-5, err_msg=f"{layer} {e}")
            assert seen == list(range(N_EXPERTS))
    g = model.model.layers[1].post_attention_layernorm.weight.detach().numpy()
    folded = open_checkpoint(str(tmp_path / "m"), fold_norms=True)
    np.testing.assert_allclose(folded.read_router(1, True), ckpt.read_router(1) * g, rtol=1e-6)
    raw, fold = next(ckpt.iter_experts(1)), next(folded.iter_experts(1, True))
    np.testing.assert_allclose(fold[1]["W_up"], raw[1]["W_up"] * g, rtol=1e-6)


def test_an_expert_is_read_alone(tmp_path):
    """Expert 2's MXFP4 scales set to 255 (E8M0's NaN): experts 0, 1 and 3 still read, from
    their own bytes; expert 2 is refused in one line."""
    build_gpt_oss(tmp_path / "m", published=True)
    good = list(open_checkpoint(str(tmp_path / "m")).iter_experts(0))
    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    state["model.layers.0.mlp.experts.down_proj_scales"][2] = 255
    save_file(state, str(tmp_path / "m" / "model.safetensors"))
    ckpt = open_checkpoint(str(tmp_path / "m"))
    for e in (0, 1, 3):
        w = ckpt._read("model.layers.0.mlp.experts.down_proj_blocks", e)
        np.testing.assert_array_equal(w, good[e][1]["W_down"])
    with pytest.raises(UserError) as info:
        list(ckpt.iter_experts(0))
    assert str(info.value).endswith("tensor model.layers.0.mlp.experts.down_proj_blocks"
                                    " contains NaN or Inf")


def test_sharded_blocks_and_scales(tmp_path):
    """A sharded checkpoint (as published) whose scales sit in another shard than their
    blocks: the same experts as the single file."""
    build_gpt_oss(tmp_path / "m", published=True)
    single = [w for _, w in open_checkpoint(str(tmp_path / "m")).iter_experts(1)]
    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    shards = {"model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {}}
    for name, w in state.items():
        shards[sorted(shards)[name.endswith("_scales")]][name] = w
    for shard, tensors in shards.items():
        save_file(tensors, str(tmp_path / "m" / shard))
    (tmp_path / "m" / "model.safetensors").unlink()
    (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        name: shard for shard, tensors in shards.items() for name in tensors}}))
    ckpt = open_checkpoint(str(tmp_path / "m"))
    assert ckpt._files["model.layers.1.mlp.experts.down_proj_blocks"].name == sorted(shards)[0]
    for w, ref in zip((w for _, w in ckpt.iter_experts(1)), single, strict=True):
        for wt in ref:
            np.testing.assert_array_equal(w[wt], ref[wt])


def test_unpaired_blocks_are_named(tmp_path):
    """Blocks without their scales are not MXFP4: the uint8 tensor is named in one line."""
    build_gpt_oss(tmp_path / "m", published=True)
    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    del state["model.layers.1.mlp.experts.gate_up_proj_scales"]
    save_file(state, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(UserError) as info:
        open_checkpoint(str(tmp_path / "m"))
    message = str(info.value)
    assert "\n" not in message
    assert "model.layers.1.mlp.experts.gate_up_proj_blocks has shape (4, 64, 2, 16)" in message


@pytest.mark.workflow
def test_workflow_runs_on_published_gpt_oss(tmp_path):
    """The MXFP4 checkpoint through extraction, ranks, alignment and the report, which names
    what it leaves out."""
    build_gpt_oss(tmp_path / "ckpt", published=True)
    work = tmp_path / "run"
    targets = [f"results/oss/{p}" for p in ("model.json", "effective_ranks.csv",
                                             "k4/alignment.parquet", "k4/report.md")]
    assert_ok(run_snakemake(work, *targets, config={
        "models": {"oss": {"source": str(tmp_path / "ckpt")}}, "top_k": 4,
        "heads": {"sample": 2}, "device": "cpu"}))
    r = work / "results" / "oss"
    model = json.loads((r / "model.json").read_text())
    assert model["experts"]["n_experts"] == N_EXPERTS and "mxfp4" in model["storage_dtype"]
    ranks = pd.read_parquet(r / "effective_ranks.parquet")
    assert sorted(ranks["expert"].dropna().unique()) == ["0", "1", "2", "3"]
    assert len(ranks) == 2 * (4 + 3 * N_EXPERTS)
    assert pd.read_parquet(r / "k4" / "alignment.parquet")["alignment"].between(0, 1).all()
    assert "attention sinks" in (r / "k4" / "report.md").read_text()
