"""The notebook's method (``/work/shared/seed/notebook-2.py.txt`` and its effective-rank
predecessor "1.py"), re-implemented stage by stage and timed. Run in its own process:

    python benchmarks/baseline.py CHECKPOINT_DIR [--device cpu|cuda] [--k 20] --json OUT

Stages, as the notebook does them:
- ``load``: the whole model through ``AutoModelForCausalLM.from_pretrained`` in float16 (the
  notebook's ``torch_dtype=torch.float16``); every computation casts to float32 (``.float()``).
- ``subspace_extraction``: per (layer, head) the ``d x d`` kernel ``W_Q_i^T W_K_j`` is formed
  and fully decomposed (``torch.linalg.svd``); its top-k right singular vectors are kept. The
  notebook ran head 0 and then the 4 sampled heads (head 0 again): 5L SVDs. Here each
  (layer, head) of the sample is decomposed once (4L SVDs), so the baseline is 20 % cheaper
  than the notebook and every ratio reported against it is conservative.
- ``similarity``: for each sampled head the ``L x L`` matrix of
  ``mean(svdvals(V_i V_j^T)^2)`` over pairs ``i <= j``, one call per pair, as the notebook.
- ``alignment``: per (layer, head) ``W_gate @ P`` with the ``d x d`` projector ``P = V^T V``.
- ``effective_ranks``: "1.py": ``torch.linalg.svdvals`` of the seven full weights per layer;
  ``exp(entropy(sigma / sum sigma))`` over the nonzero sigma (the library's zero threshold).

Every stage runs on ``--device`` (the notebook moved ``W_gate`` to the CPU for the alignment;
keeping it on the device makes the GPU baseline stronger, not weaker). Peak RSS: the process's
``VmHWM`` at the end of each stage, i.e. the high-water mark so far (the model, loaded
first, is resident throughout, as in the notebook). The JSON also holds the head-0 similarity
matrix, the alignments and the effective ranks, which ``run_all.py`` compares with the
workflow's outputs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchlib import (
    K,
    cuda_unavailable,
    gpu_peak_mb,
    peak_rss_mb,
    sampled_heads,
    stopwatch,
    write_json,
)

#: "1.py"'s seven weights per layer, as (module path in a decoder layer, weight type).
WEIGHTS = (("self_attn.q_proj", "W_Q"), ("self_attn.k_proj", "W_K"),
           ("self_attn.v_proj", "W_V"), ("self_attn.o_proj", "W_O"),
           ("mlp.gate_proj", "W_gate"), ("mlp.up_proj", "W_up"), ("mlp.down_proj", "W_down"))


def get_attn_subspace(layer, n_heads: int, n_kv: int, d: int, head: int, k: int):
    """The notebook's ``utils.get_attn_subspace``: top-k right singular vectors ``(k, d)`` of
    the formed kernel ``W_Q_i^T W_K_j`` (full ``d x d`` SVD, O(d^3)); ``d_head = d // h``."""
    import torch

    d_head = d // n_heads
    w_q = layer.self_attn.q_proj.weight.data.float()
    w_k = layer.self_attn.k_proj.weight.data.float()
    kv = head // (n_heads // n_kv)
    kernel = w_q[head * d_head:(head + 1) * d_head].T @ w_k[kv * d_head:(kv + 1) * d_head]
    _, _, vh = torch.linalg.svd(kernel)
    return vh[:k]


def subspace_similarity(v1, v2) -> float:
    """The notebook's ``utils.subspace_similarity``: mean squared cosine of principal angles."""
    import torch

    return float((torch.linalg.svdvals(v1 @ v2.T) ** 2).mean())


def ffn_attention_alignment(layer, subspace) -> float:
    """The notebook's ``ffn_attention_alignment``: energy of ``W_gate @ (V^T V)`` over
    ``||W_gate||_F^2`` (O(d_ff d^2) per call)."""
    projector = subspace.T @ subspace
    w_gate = layer.mlp.gate_proj.weight.data.float()
    projected = w_gate @ projector
    return float((projected**2).sum()) / float((w_gate**2).sum())


def effective_rank(weight) -> float:
    """"1.py": ``exp(entropy(p))``, ``p = sigma / sum(sigma)`` from a full ``svdvals``."""
    import torch

    sigma = torch.linalg.svdvals(weight.float()).double()
    sigma = sigma[sigma > sigma.max() * max(weight.shape) * torch.finfo(torch.float32).eps]
    p = sigma / sigma.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def run(checkpoint: Path, device: str, k: int) -> dict:
    times: dict[str, float] = {}
    rss: dict[str, float] = {}
    with stopwatch(times, "imports"):
        import numpy as np
        import torch
        from transformers import AutoModelForCausalLM
    rss["imports"] = peak_rss_mb()

    with stopwatch(times, "load", device):
        model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float16,
                                                     device_map=device)
    rss["load"] = peak_rss_mb()
    cfg = model.config
    n_layers, d, h, n_kv = (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
                            cfg.num_key_value_heads)
    layers = model.model.layers
    heads = sampled_heads(h)

    with stopwatch(times, "subspace_extraction", device), torch.no_grad():
        subspaces = {head: [get_attn_subspace(layers[i], h, n_kv, d, head, k)
                            for i in range(n_layers)] for head in heads}
    rss["subspace_extraction"] = peak_rss_mb()

    with stopwatch(times, "similarity", device), torch.no_grad():
        similarity = {}
        for head, subs in subspaces.items():
            sim = np.zeros((n_layers, n_layers))
            for i in range(n_layers):
                for j in range(i, n_layers):
                    sim[i, j] = sim[j, i] = subspace_similarity(subs[i], subs[j])
            similarity[head] = sim
    rss["similarity"] = peak_rss_mb()

    with stopwatch(times, "alignment", device), torch.no_grad():
        alignment = {head: [ffn_attention_alignment(layers[i], subs[i])
                            for i in range(n_layers)] for head, subs in subspaces.items()}
    rss["alignment"] = peak_rss_mb()

    with stopwatch(times, "effective_ranks", device), torch.no_grad():
        ranks = [[effective_rank(layers[i].get_submodule(path).weight.data)
                  for path, _ in WEIGHTS] for i in range(n_layers)]
    rss["effective_ranks"] = peak_rss_mb()

    return {
        "method": "baseline (notebook)",
        "device": device,
        "heads": heads,
        "k": k,
        "n_layers": n_layers,
        "stages": {name: {"s": times[name], "peak_rss_mb": rss[name]} for name in times},
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": gpu_peak_mb(device),
        "similarity_head0": similarity[heads[0]].tolist(),
        "alignment": {str(head): values for head, values in alignment.items()},
        "effective_ranks": {"weight_types": [wt for _, wt in WEIGHTS], "values": ranks},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--k", type=int, default=K)
    parser.add_argument("--json", type=Path, required=True, help="where to write the record")
    args = parser.parse_args()
    start = time.perf_counter()
    skip = cuda_unavailable(args.device)
    if skip:
        print(skip)
        return
    record = run(args.checkpoint, args.device, args.k)
    record["in_process_s"] = time.perf_counter() - start
    write_json(args.json, record)


if __name__ == "__main__":
    main()
