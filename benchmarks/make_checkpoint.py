"""Write a synthetic Qwen2 checkpoint (bf16 safetensors + config.json) with real layer shapes.

The directory is a Hugging Face checkpoint that both ``transformers`` (the baseline) and the
library (``weight_geometry.checkpoint.open_checkpoint``) open: every tensor of a Qwen2
decoder (q/k/v/o projections, q/k/v biases, gate/up/down projections, the two RMSNorm gains per
layer, the final norm, the embedding; the LM head is tied to it). The vocabulary is cut to
1024 tokens to keep the file small; only the layer shapes matter to the analysis.

Each projection is ``0.02 * (noise + low-rank spike)``: an isotropic Gaussian bulk plus a
rank-32 component with singular values decaying 10x, so effective ranks, subspaces and
alignments are not those of pure noise. Seeded: the same arguments give the same bytes.

    python benchmarks/make_checkpoint.py qwen2.5-0.5b /tmp/wg-bench/qwen2.5-0.5b
    python benchmarks/make_checkpoint.py qwen2.5-3b /tmp/wg-bench/qwen2.5-3b --layers 4
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

VOCAB = 1024
SPIKE_RANK = 32


@dataclass(frozen=True)
class Shape:
    """Dimensions of a Qwen2 decoder (``d_head = d_model / n_heads`` for Qwen2.5)."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    d_head: int

    def weight_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) shape of the seven analysed projections, keyed by tensor-name suffix."""
        d, q, kv, ff = self.d_model, self.n_heads * self.d_head, \
            self.n_kv_heads * self.d_head, self.d_ff
        return {"self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d),
                "self_attn.v_proj": (kv, d), "self_attn.o_proj": (d, q),
                "mlp.gate_proj": (ff, d), "mlp.up_proj": (ff, d), "mlp.down_proj": (d, ff)}

    def layer_params(self) -> int:
        """Number of parameters of the seven projections of one layer."""
        return sum(a * b for a, b in self.weight_shapes().values())


#: The real shapes; Qwen2.5-3B has 36 layers, the benchmark writes as many as asked.
SHAPES = {
    "qwen2.5-0.5b": Shape(n_layers=24, d_model=896, n_heads=14, n_kv_heads=2, d_ff=4864,
                          d_head=64),
    "qwen2.5-3b": Shape(n_layers=36, d_model=2048, n_heads=16, n_kv_heads=2, d_ff=11008,
                        d_head=128),
}


def _projection(gen: torch.Generator, rows: int, cols: int) -> torch.Tensor:
    """``0.02 * (bulk + spike)`` in bf16. ``bulk`` has i.i.d. N(0, 1) entries, so its singular
    values are about ``sqrt(max(rows, cols))``; ``spike = U diag(s) V^T`` with near-orthonormal
    random ``U``, ``V`` and ``s`` falling geometrically from 10x to 1x that scale."""
    bulk = torch.randn(rows, cols, generator=gen)
    s = torch.logspace(1, 0, SPIKE_RANK) * math.sqrt(max(rows, cols))
    u = torch.randn(rows, SPIKE_RANK, generator=gen) / math.sqrt(rows)
    v = torch.randn(SPIKE_RANK, cols, generator=gen) / math.sqrt(cols)
    return (0.02 * (bulk + (u * s) @ v)).to(torch.bfloat16)


def config_json(shape: Shape, n_layers: int) -> dict:
    """A Qwen2 ``config.json`` with the real dimensions and ``n_layers`` layers."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": shape.d_model,
        "intermediate_size": shape.d_ff,
        "num_attention_heads": shape.n_heads,
        "num_key_value_heads": shape.n_kv_heads,
        "num_hidden_layers": n_layers,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "vocab_size": VOCAB,
        "torch_dtype": "bfloat16",
    }


def write_checkpoint(directory: Path, shape: Shape, n_layers: int, seed: int = 0) -> Path:
    """Write ``config.json`` and ``model.safetensors`` for ``n_layers`` layers of ``shape``.

    Memory: the whole bf16 checkpoint is held once (0.7 GB for 24 layers of Qwen2.5-0.5B).
    """
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    d = shape.d_model
    tensors = {"model.embed_tokens.weight": _projection(gen, VOCAB, d),
               "model.norm.weight": torch.ones(d, dtype=torch.bfloat16)}
    for layer in range(n_layers):
        prefix = f"model.layers.{layer}"
        for name, (rows, cols) in shape.weight_shapes().items():
            tensors[f"{prefix}.{name}.weight"] = _projection(gen, rows, cols)
        for name in ("q_proj", "k_proj", "v_proj"):
            rows = shape.weight_shapes()[f"self_attn.{name}"][0]
            tensors[f"{prefix}.self_attn.{name}.bias"] = \
                (0.02 * torch.randn(rows, generator=gen)).to(torch.bfloat16)
        for name in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"{prefix}.{name}.weight"] = \
                (1 + 0.1 * torch.randn(d, generator=gen)).to(torch.bfloat16)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config_json(shape, n_layers), indent=2))
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("directory", type=Path)
    parser.add_argument("--layers", type=int, help="number of layers (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    out = write_checkpoint(args.directory, shape, args.layers or shape.n_layers, args.seed)
    print(out)


if __name__ == "__main__":
    main()
