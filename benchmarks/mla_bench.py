"""Time and peak memory of the extraction at DeepSeek-V3's attention shapes (MLA).

``write`` makes a synthetic DeepSeek-V3 checkpoint (bf16 safetensors + config.json) with the
real attention shapes (d = 7168, 128 heads, q_lora_rank 1536, kv_lora_rank 512, no-RoPE 128,
RoPE 64, value 128) and ``--layers`` layers whose FFN is dense and small (``--d-ff``, default
256; ``first_k_dense_replace`` = every layer), so that the attention is what is measured. Its
projections are :func:`make_checkpoint._projection`'s noise plus a low-rank spike.

``extract`` runs the extraction job's pass (:func:`extraction.write_layers`, one layer worker,
``.npy`` files in a scratch directory) in this process and prints one JSON record: seconds per
layer (wall and this process's CPU), the cores other processes kept busy meanwhile, peak RSS
(``VmHWM``) and the RSS before the pass (start-up: interpreter, torch, the opened
checkpoint), one layer's attention weights in float32 and its stored arrays.

    python benchmarks/mla_bench.py write /tmp/wg-bench/dsv3-attn --layers 3
    python benchmarks/mla_bench.py extract /tmp/wg-bench/dsv3-attn --scratch /tmp/wg-bench/out
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from benchlib import cpu_snapshot, foreign_cores, peak_rss_mb, status_mb
from make_checkpoint import VOCAB, _projection

#: DeepSeek-V3's attention (config.json of deepseek-ai/DeepSeek-V3).
V3 = dict(hidden_size=7168, num_attention_heads=128, num_key_value_heads=128,
          q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
          v_head_dim=128)
V3_LAYERS = 61


def attention_shapes(c: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of one layer's latent-attention projections, by tensor-name suffix."""
    d, h = c["hidden_size"], c["num_attention_heads"]
    m = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    return {"q_a_proj": (c["q_lora_rank"], d), "q_b_proj": (h * m, c["q_lora_rank"]),
            "kv_a_proj_with_mqa": (c["kv_lora_rank"] + c["qk_rope_head_dim"], d),
            "kv_b_proj": (h * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"]),
            "o_proj": (d, h * c["v_head_dim"])}


def config_json(n_layers: int, d_ff: int) -> dict:
    return {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", **V3,
            "num_hidden_layers": n_layers, "intermediate_size": d_ff,
            "first_k_dense_replace": n_layers, "n_routed_experts": 256,
            "moe_intermediate_size": 2048, "n_shared_experts": 1, "num_experts_per_tok": 8,
            "vocab_size": VOCAB, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096,
            "torch_dtype": "bfloat16"}


def write(args) -> None:
    from safetensors.torch import save_file

    args.directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    d = V3["hidden_size"]
    tensors = {"model.embed_tokens.weight": _projection(gen, VOCAB, d),
               "model.norm.weight": torch.ones(d, dtype=torch.bfloat16)}
    ffn = {"gate_proj": (args.d_ff, d), "up_proj": (args.d_ff, d), "down_proj": (d, args.d_ff)}
    for layer in range(args.layers):
        prefix = f"model.layers.{layer}"
        for name, (rows, cols) in attention_shapes(V3).items():
            tensors[f"{prefix}.self_attn.{name}.weight"] = _projection(gen, rows, cols)
        for name, (rows, cols) in ffn.items():
            tensors[f"{prefix}.mlp.{name}.weight"] = _projection(gen, rows, cols)
        for name, size in (("input_layernorm", d), ("post_attention_layernorm", d),
                           ("self_attn.q_a_layernorm", V3["q_lora_rank"]),
                           ("self_attn.kv_a_layernorm", V3["kv_lora_rank"])):
            tensors[f"{prefix}.{name}.weight"] = \
                (1 + 0.1 * torch.randn(size, generator=gen)).to(torch.bfloat16)
    save_file(tensors, str(args.directory / "model.safetensors"), metadata={"format": "pt"})
    (args.directory / "config.json").write_text(
        json.dumps(config_json(args.layers, args.d_ff), indent=2))


def extract(args) -> None:
    from weight_geometry.checkpoint import open_checkpoint
    from weight_geometry.extraction import LayerResult, write_layers

    ckpt = open_checkpoint(str(args.checkpoint), fold_norms=True)
    args.scratch.mkdir(parents=True, exist_ok=True)
    paths = {name: args.scratch / f"{name}.npy" for name in LayerResult.array_names()}
    layers = range(ckpt.dims.n_layers)
    startup = status_mb("VmRSS")
    before = cpu_snapshot()
    start, cpu = time.perf_counter(), time.process_time()
    write_layers(ckpt, layers, torch.device("cpu"), True, paths, workers=args.workers)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    others = foreign_cores(before, cpu_snapshot())
    attention = sum(a * b for a, b in attention_shapes(V3).values()) * 4
    stored = sum(Path(p).stat().st_size for p in paths.values()) / len(layers)
    record = {"layers": len(layers), "workers": args.workers,
              "threads": torch.get_num_threads(), "s_per_layer": seconds / len(layers),
              "cpu_s_per_layer": cpu / len(layers), "other_processes_cores": others,
              "startup_rss_mib": startup, "peak_rss_mib": peak_rss_mb(),
              "attention_fp32_mib": attention / 2**20,
              "stored_per_layer_mib": stored / 2**20,
              "extrapolated_61_layers_min": seconds / len(layers) * V3_LAYERS / 60}
    print(json.dumps(record))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write")
    w.add_argument("directory", type=Path)
    w.add_argument("--layers", type=int, default=3)
    w.add_argument("--d-ff", type=int, default=256)
    e = sub.add_parser("extract")
    e.add_argument("checkpoint", type=Path)
    e.add_argument("--scratch", type=Path, required=True)
    e.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    (write if args.command == "write" else extract)(args)


if __name__ == "__main__":
    main(sys.argv[1:])
