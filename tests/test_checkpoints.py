"""Checkpoint sources: sharded safetensors, hub ids in a local cache, and memory that stays near
one layer however big the checkpoint."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_LLAMA, assert_ok, hub_cache, make_llama_checkpoint, run_snakemake

pytestmark = pytest.mark.workflow


def test_sharded_checkpoint_gives_identical_outputs(tmp_path):
    from transformers import AutoModelForCausalLM

    single = make_llama_checkpoint(tmp_path / "single")
    model = AutoModelForCausalLM.from_pretrained(single)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) >= 3 and (tmp_path / "sharded/model.safetensors.index.json").exists()
    assert_ok(run_snakemake(tmp_path / "run", config={
        "models": {"single": {"source": str(single)},
                   "sharded": {"source": str(tmp_path / "sharded")}},
        "top_k": 5, "heads": "all", "device": "cpu"}))
    r = tmp_path / "run/results"
    for rel in ["bases/layers000-003/vectors.npy", "bases/layers000-003/ffn_input_energy.npy",
                "k5/similarity_head3.npy", "k5/similarity_mean.npy"]:
        assert np.array_equal(np.load(r / "single" / rel), np.load(r / "sharded" / rel)), rel
    for rel in ["effective_ranks.csv", "k5/layers.csv"]:
        pd.testing.assert_frame_equal(pd.read_csv(r / "single" / rel),
                                      pd.read_csv(r / "sharded" / rel))


def test_missing_shard_is_one_line(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_llama_checkpoint(tmp_path / "single"))
    model.save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    victim = sorted((tmp_path / "sharded").glob("*.safetensors"))[1]
    victim.unlink()
    proc = run_snakemake(tmp_path / "run", "-n", config={
        "models": {"m": {"source": str(tmp_path / "sharded")}}})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"shard {victim.name} is missing" in proc.stderr


def test_hub_id_resolved_from_local_cache_offline(tmp_path, tiny_checkpoint):
    files = ("config.json", "model.safetensors")
    hub_cache(tmp_path / "hf", "acme/tiny-llama",
              {name: (tiny_checkpoint / name).read_bytes() for name in files})
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    assert_ok(run_snakemake(tmp_path / "run", "results/tiny/model.json", env=env,
                            config={"models": {"tiny": {"source": "acme/tiny-llama"}}}))
    meta = json.loads((tmp_path / "run/results/tiny/model.json").read_text())
    assert meta["source"] == "acme/tiny-llama"
    assert meta["path"].startswith(str(tmp_path / "hf" / "hub"))
    assert meta["n_layers"] == TINY_LLAMA["num_hidden_layers"]


def _big_checkpoint(path, n_layers: int, d=256, d_ff=16384, heads=4) -> int:
    """A Llama-shaped bf16 checkpoint (25 MB a layer) written in 4 shards; returns bytes."""
    from safetensors.torch import save_file

    path.mkdir()
    config = {"model_type": "llama", "num_hidden_layers": n_layers, "hidden_size": d,
              "intermediate_size": d_ff, "num_attention_heads": heads,
              "num_key_value_heads": heads}
    (path / "config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(0)
    shards, index = 4, {}
    per = n_layers // shards
    for s in range(shards):
        tensors = {}
        for layer in range(s * per, (s + 1) * per):
            p = f"model.layers.{layer}."
            shapes = {"self_attn.q_proj": (d, d), "self_attn.k_proj": (d, d),
                      "self_attn.v_proj": (d, d), "self_attn.o_proj": (d, d),
                      "mlp.gate_proj": (d_ff, d), "mlp.up_proj": (d_ff, d),
                      "mlp.down_proj": (d, d_ff)}
            for name, shape in shapes.items():
                tensors[f"{p}{name}.weight"] = torch.randn(shape, generator=gen).bfloat16()
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, path / fname, metadata={"format": "pt"})
        index.update(dict.fromkeys(tensors, fname))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _peak_rss_mb(workdir, model: str, last: int) -> float:
    """The extraction job's peak resident memory as its log reports it (the kernel's
    high-water mark: the benchmark's ``max_rss`` is sampled, and can miss a short job's peak)."""
    log = (workdir / f"logs/{model}/extract_layers000-{last:03d}.log").read_text()
    return float(re.search(r"peak memory of this job: ([0-9.]+) MiB", log)[1])


def test_extraction_memory_stays_near_one_layer(tmp_path):
    """Peak RSS of the extraction job does not grow with the checkpoint: 40 layers (~1 GB of
    bf16) peak within two fp32 layers of 4 layers of the same shapes (~0.1 GB)."""
    size = _big_checkpoint(tmp_path / "big", n_layers=40)
    _big_checkpoint(tmp_path / "small", n_layers=4)
    assert size > 900e6
    workdir = tmp_path / "run"
    assert_ok(run_snakemake(
        workdir, "results/big/effective_ranks.csv", "results/small/effective_ranks.csv",
        timeout=900, config={"models": {"big": {"source": str(tmp_path / "big")},
                                        "small": {"source": str(tmp_path / "small")}},
                             # the synthetic checkpoints store no norm gains
                             "device": "cpu", "fold_norms": False}))
    big, small = _peak_rss_mb(workdir, "big", 39), _peak_rss_mb(workdir, "small", 3)
    layer_fp32_mb = (4 * 256 * 256 + 3 * 16384 * 256) * 4 / 2**20  # 49 MB
    assert big - small < 2 * layer_fp32_mb, (big, small, layer_fp32_mb)
    assert big < size / 2**20, (big, size / 2**20)
