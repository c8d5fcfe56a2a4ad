"""Peak memory and time of the extraction job on mixture-of-experts layers of Qwen3-30B-A3B's
shapes (d = 2048, 32 heads on 4 KV heads of d_head 128, 128 experts of 768 x 2048).

The target (issue 29): the job's peak RSS above what the interpreter, torch (its routines
warmed up once on small matrices) and the opened checkpoint hold before the first layer stays
within twice one expert's three matrices plus the
layer's attention weights, in float32; not twice a whole layer. Each measurement runs the
extraction job (:func:`extraction.run_extraction_job`, effective ranks included, norms folded)
in a process of its own and reports ``VmHWM`` against ``VmRSS`` after start-up, and the time per
layer, extrapolated to the model's 48 layers.

    python benchmarks/moe_memory.py /tmp/wg-bench/qwen3-30b-a3b --layers 2

writes the checkpoint there (bf16, one shard per layer, 1.2 GB per layer) unless it is
there already, and prints one line per thread count and the markdown rows of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from benchlib import BENCH, REPO, peak_rss_mb, run_json, status_mb, write_json
from make_checkpoint import _projection

sys.path.insert(0, str(REPO / "src"))

VOCAB = 1024
#: Qwen3-30B-A3B's layers.
LAYERS_FULL = 48


@dataclass(frozen=True)
class MoeShape:
    d_model: int = 2048
    n_heads: int = 32
    n_kv_heads: int = 4
    d_head: int = 128
    n_experts: int = 128
    d_expert: int = 768

    def attention(self) -> dict[str, tuple[int, int]]:
        d, q, kv = self.d_model, self.n_heads * self.d_head, self.n_kv_heads * self.d_head
        return {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q)}

    def expert(self) -> dict[str, tuple[int, int]]:
        d, e = self.d_model, self.d_expert
        return {"gate_proj": (e, d), "up_proj": (e, d), "down_proj": (d, e)}

    def target_mb(self) -> float:
        """Twice one expert's three matrices plus the attention weights, float32, in MiB."""
        floats = sum(a * b for a, b in [*self.attention().values(), *self.expert().values()])
        return 2 * floats * 4 / 2**20


SHAPE = MoeShape()


def config_json(shape: MoeShape, n_layers: int) -> dict:
    return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            "hidden_size": shape.d_model, "intermediate_size": 6144,
            "moe_intermediate_size": shape.d_expert, "num_experts": shape.n_experts,
            "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [],
            "num_attention_heads": shape.n_heads, "num_key_value_heads": shape.n_kv_heads,
            "head_dim": shape.d_head, "num_hidden_layers": n_layers, "vocab_size": VOCAB,
            "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16"}


def write_checkpoint(directory: Path, shape: MoeShape, n_layers: int, seed: int = 0) -> None:
    """``config.json``, one bf16 shard per layer (and one for the embedding) and the index.
    Memory: one layer's bf16 tensors (1.2 GB)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    d, weight_map = shape.d_model, {}

    def shard(name: str, tensors: dict) -> None:
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))

    shard("embed.safetensors", {"model.embed_tokens.weight": _projection(gen, VOCAB, d),
                                "model.norm.weight": torch.ones(d, dtype=torch.bfloat16)})
    for layer in range(n_layers):
        p, tensors = f"model.layers.{layer}", {}
        for name, (rows, cols) in shape.attention().items():
            tensors[f"{p}.self_attn.{name}.weight"] = _projection(gen, rows, cols)
        for name, size in (("self_attn.q_norm", shape.d_head), ("self_attn.k_norm", shape.d_head),
                           ("input_layernorm", d), ("post_attention_layernorm", d)):
            tensors[f"{p}.{name}.weight"] = (1 + 0.1 * torch.randn(size, generator=gen)
                                             ).to(torch.bfloat16)
        tensors[f"{p}.mlp.gate.weight"] = _projection(gen, shape.n_experts, d)
        for e in range(shape.n_experts):
            for name, (rows, cols) in shape.expert().items():
                tensors[f"{p}.mlp.experts.{e}.{name}.weight"] = _projection(gen, rows, cols)
        shard(f"layer{layer:03d}.safetensors", tensors)
        del tensors
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config_json(shape, n_layers), indent=2))


def warm_up() -> None:
    """The pass's torch and LAPACK routines once on small matrices, so that the pages of
    their code that the first call maps (part of torch, counted in RSS) are in the start-up
    figure, not in the layers'."""
    from weight_geometry.kernels import factored_subspaces, ov_circuits
    from weight_geometry.ranks import gram, singular_values_from_gram, weight_spectrum

    gen = torch.Generator().manual_seed(0)
    w_q, w_k = torch.randn(64, 64, generator=gen), torch.randn(32, 64, generator=gen)
    f = factored_subspaces(w_q, w_k, 4, 2, 16, torch.float64)
    f.left_vectors(w_q, torch.float32), f.vectors(torch.float32)
    w = torch.randn(40, 64, generator=gen)
    f.energies(gram(w, "in")), f.weight_energies(w), f.row_energies(w)
    ov_circuits(torch.randn(64, 64, generator=gen), w_k, 4, 2, 16)
    weight_spectrum(w, "out"), singular_values_from_gram(gram(w, "in", torch.float64))


class PhasePeaks:
    """With one worker, the peak RSS of the experts' pass (:func:`experts.expert_pass`) apart
    from the rest of the job: ``VmHWM`` is reset (``/proc/self/clear_refs``) when the pass
    starts and read when it ends; the job's peak is the largest of all readings."""

    def __init__(self):
        self.experts = self.rest = 0.0

    def install(self) -> None:
        import weight_geometry.extraction as extraction

        inner = extraction.expert_pass

        def timed(*args, **kwargs):
            self.rest = max(self.rest, peak_rss_mb())
            Path("/proc/self/clear_refs").write_text("5")
            try:
                return inner(*args, **kwargs)
            finally:
                self.experts = max(self.experts, peak_rss_mb())
                Path("/proc/self/clear_refs").write_text("5")

        extraction.expert_pass = timed

    def job(self) -> float:
        return max(self.experts, self.rest, peak_rss_mb())


def measure(args) -> None:
    """One extraction job (the child process): start-up RSS (after :func:`warm_up`), peak
    (and with one thread the experts' pass's own), time per layer."""
    from weight_geometry.checkpoint import open_checkpoint
    from weight_geometry.extraction import LayerResult, run_extraction_job

    ckpt = open_checkpoint(str(args.checkpoint), fold_norms=True)
    warm_up()
    phases = PhasePeaks()
    if args.threads == 1:
        phases.install()
    scratch = args.json.parent / f"scratch{args.threads}"
    paths = {name: scratch / f"{name}.npy" for name in LayerResult.array_names()}
    n = ckpt.dims.n_layers
    before = status_mb("VmRSS")
    start = time.perf_counter()
    run_extraction_job(ckpt, range(n), "cpu", args.threads, True, paths)
    seconds = time.perf_counter() - start
    write_json(args.json, {"threads": args.threads, "layers": n, "startup_rss_mb": before,
                           "peak_rss_mb": phases.job(), "experts_peak_rss_mb": phases.experts,
                           "seconds": seconds, "torch_threads": torch.get_num_threads()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        args.threads = args.threads[0]
        return measure(args)
    if not (args.checkpoint / "config.json").exists():
        start = time.perf_counter()
        write_checkpoint(args.checkpoint, SHAPE, args.layers)
        print(f"wrote {args.checkpoint} in {time.perf_counter() - start:.0f} s", flush=True)
    target = SHAPE.target_mb()
    rows = []
    for threads in args.threads:
        out = args.checkpoint.parent / f"moe_memory_{threads}.json"
        r = run_json([str(BENCH / "moe_memory.py"), str(args.checkpoint), "--measure",
                      "--threads", str(threads)], out, out.with_suffix(".log"))
        above = r["peak_rss_mb"] - r["startup_rss_mb"]
        per_layer = r["seconds"] / r["layers"]
        verdict = "met" if above <= target else "MISSED"
        experts = (f", the experts' pass {r['experts_peak_rss_mb'] - r['startup_rss_mb']:.0f}"
                   if r["experts_peak_rss_mb"] else "")
        print(f"threads {threads}: peak {r['peak_rss_mb']:.0f} MiB, start-up"
              f" {r['startup_rss_mb']:.0f} MiB, above start-up {above:.0f} MiB{experts} (target"
              f" {target:.0f}: {verdict}); {per_layer:.1f} s/layer, {LAYERS_FULL} layers"
              f" {per_layer * LAYERS_FULL / 60:.1f} min", flush=True)
        rows.append(f"| {threads} | {r['layers']} | {r['startup_rss_mb']:.0f} |"
                    f" {r['peak_rss_mb']:.0f} | {above:.0f} | {target:.0f} ({verdict}) |"
                    f" {per_layer:.1f} | {per_layer * LAYERS_FULL / 60:.1f} |")
    print("| threads | layers | start-up RSS (MiB) | peak RSS (MiB) | above start-up | target |"
          " s / layer | 48 layers (min) |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
