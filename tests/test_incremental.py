"""Incremental reruns: after a complete run, a change plans only the jobs it touches.

Plans are read from ``snakemake -n`` (each planned job's rule and outputs)."""

from __future__ import annotations

import hashlib
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import REPO, assert_ok, make_llama_checkpoint, run_snakemake, snakemake_command

pytestmark = pytest.mark.workflow

CHEAP_K_RULES = {"similarity_matrix", "similarity_mean", "bottleneck_similarity",
                 "ffn_alignment", "match_heads", "layer_table", "report_figures",
                 "report_markdown", "read_write", "circuit_figures", "expert_alignment"}


def planned(proc) -> list[tuple[str, list[str]]]:
    """(rule, outputs) of every job in a dry run, rule ``all`` excluded."""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs, rule = [], None
    for line in proc.stdout.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):$", line)
        if m:
            rule = m.group(1)
        elif rule and line.strip().startswith("output:"):
            jobs.append((rule, line.split("output:", 1)[1].strip().split(", ")))
            rule = None
    return [j for j in jobs if j[0] != "all"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("incremental")
    ckpt = make_llama_checkpoint(root / "ckpt")
    config = {"models": {"tiny": {"source": str(ckpt)}}, "top_k": 4, "heads": [0, 1],
              "bottleneck": "auto", "device": "cpu", "circuits": True}
    workdir = root / "run"
    assert_ok(run_snakemake(workdir, config=config))
    return workdir, config, root


def dry(base, *args, **changes):
    workdir, config, _ = base
    return planned(run_snakemake(workdir, "-n", *args, config={**config, **changes}))


def test_nothing_changed_plans_nothing_quickly(base):
    workdir, config, _ = base
    start = time.perf_counter()
    proc = run_snakemake(workdir, config=config)
    elapsed = time.perf_counter() - start
    assert_ok(proc)
    assert "Nothing to be done" in proc.stdout + proc.stderr
    assert elapsed < 15, f"no-op run took {elapsed:.1f} s"


@pytest.mark.parametrize("args", [("--config", "top_k=6"), ("--config", "top_k=[4,6]")])
def test_new_k_plans_only_that_k(base, args):
    jobs = dry(base, *args)
    assert jobs
    for rule, outputs in jobs:
        assert rule in CHEAP_K_RULES, rule
        assert all(o.startswith("results/tiny/k6/") for o in outputs), outputs


def test_new_head_plans_no_extraction(base):
    jobs = dry(base, heads=[0, 1, 2])
    rules = {r for r, _ in jobs}
    # The k-sweep averages over the sampled heads; head matching and the bottleneck table use
    # all heads and stay.
    assert rules <= CHEAP_K_RULES | {"k_sweep"} and "similarity_matrix" in rules
    assert not rules & {"match_heads", "bottleneck_similarity"}
    sims = [o for r, outs in jobs if r == "similarity_matrix" for o in outs]
    assert sims == ["results/tiny/k4/similarity_head2.npy"]


def test_new_bottleneck_plans_only_its_dependants(base):
    rules = sorted(r for r, _ in dry(base, bottleneck=1))
    assert rules == ["bottleneck_similarity", "layer_table", "report_figures",
                     "report_markdown"]


def test_new_primary_head_plans_its_matrix_and_the_primary_head_tables(base):
    jobs = dry(base, primary_head=2)   # the sample is heads 0 and 1: head 2 has no matrix yet
    # The bottleneck table covers every head already (from head matching's same-index
    # matrices): it stays.
    assert sorted(r for r, _ in jobs) == ["layer_table", "report_figures", "report_markdown",
                                          "similarity_matrix"]
    assert [o for r, outs in jobs if r == "similarity_matrix" for o in outs] == [
        "results/tiny/k4/similarity_head2.npy"]
    # a primary head that is already sampled has its matrix
    assert "similarity_matrix" not in {r for r, _ in dry(base, primary_head=1)}


@pytest.mark.parametrize(("change", "first"), [({"device": "auto"}, "extract_layers"),
                                               ({"fold_norms": False}, "model_info")])
def test_extraction_knob_plans_extraction_and_everything_after(base, change, first):
    rules = {r for r, _ in dry(base, **change)}
    after = ({"extract_layers", "effective_ranks", "rowspace_overlap", "k_sweep", "composition"}
             | CHEAP_K_RULES)
    assert rules == after | {first}


def test_second_model_plans_only_that_model_and_the_comparison(base):
    workdir, config, root = base
    other = make_llama_checkpoint(root / "ckpt2", seed=1)
    models = {**config["models"], "other": {"source": str(other)}}
    jobs = dry(base, models=models)
    assert jobs and "compare_models" in {r for r, _ in jobs}
    assert all(o.startswith(("results/other/", "logs/other/", "results/compare/"))
               for _, outs in jobs for o in outs)


def test_edited_script_reruns_rule_and_dependants(tmp_path, base):
    """A copy of the workflow whose ffn_alignment script changed: that rule and what reads its
    output rerun, nothing upstream or beside it. An edited library module alone reruns
    nothing. The copy starts from the base run's outputs and metadata, which it takes as its
    own but for the report (its ``vega`` parameter is a path into the workflow copy)."""
    workdir, config, root = base
    repo = tmp_path / "repo"
    repo.mkdir()
    for part in ("Snakefile", "workflow", "src", "config", "profiles", "envs"):
        src = REPO / part
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / part)
    shutil.copytree(workdir, tmp_path / "run", symlinks=True)  # copy2: modification times kept
    cmd = snakemake_command(tmp_path / "run", config=config, snakefile=repo / "Snakefile")
    copied = planned(subprocess.run(cmd + ["-n"], capture_output=True, text=True, timeout=300))
    assert {r for r, _ in copied} <= {"report_markdown"}, copied
    assert_ok(subprocess.run(cmd, capture_output=True, text=True, timeout=600))
    # An edited library module is not a rerun trigger (the README says so: use --forcerun).
    module = repo / "src/weight_geometry/alignment.py"
    module.write_text(module.read_text() + "\n# edited\n")
    proc = subprocess.run(cmd + ["-n"], capture_output=True, text=True, timeout=300)
    assert planned(proc) == []
    script = repo / "workflow/scripts/ffn_alignment.py"
    script.write_text(script.read_text() + "\n# edited\n")
    proc = subprocess.run(cmd + ["-n"], capture_output=True, text=True, timeout=300)
    rules = sorted(r for r, _ in planned(proc))
    assert rules == ["ffn_alignment", "layer_table", "report_figures", "report_markdown"]


def _digests(workdir: Path) -> dict[str, str]:
    files = sorted(p for p in (workdir / "results").rglob("*")
                   if p.is_file() and p.suffix in (".npy", ".csv", ".json", ".md"))
    return {str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


SIGNALS = (signal.SIGINT, signal.SIGKILL)


def interrupt_and_complete(run_dir: Path, config: dict, sig: signal.Signals) -> dict[str, str]:
    """The workflow at ``--cores 1`` into ``run_dir``, sent ``sig`` once extraction has begun,
    then completed (after ``--unlock`` where a kill -9 left the lock): :func:`_digests` of the
    result."""
    cmd = snakemake_command(run_dir, config=config, cores=1)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = run_dir / "logs/tiny/extract_layers000-003.log"
    deadline = time.time() + 120
    while not log.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be interrupted"
    proc.send_signal(sig)
    proc.wait(timeout=120)
    time.sleep(3)  # an orphaned job (after kill -9) may still be writing
    if sig == signal.SIGKILL:  # a killed Snakemake cannot release its lock: documented step
        assert_ok(subprocess.run(cmd + ["--unlock"], capture_output=True, text=True, timeout=120))
    assert_ok(subprocess.run(cmd, capture_output=True, text=True, timeout=600))
    return _digests(run_dir)


@pytest.fixture(scope="module")
def interrupted(base, tmp_path_factory) -> Iterator[dict[signal.Signals, Future]]:
    """:func:`interrupt_and_complete` for each of :data:`SIGNALS`, both at once in threads
    (each run takes one of the two cores): signal -> future of the digests."""
    _, config, _ = base
    with ThreadPoolExecutor(len(SIGNALS)) as pool:
        yield {sig: pool.submit(interrupt_and_complete,
                                tmp_path_factory.mktemp(f"interrupted-{sig.name}") / "run",
                                config, sig)
               for sig in SIGNALS}


@pytest.mark.parametrize("sig", SIGNALS)
def test_interrupted_run_completes_identically(base, interrupted, sig):
    workdir, _, _ = base
    assert interrupted[sig].result() == _digests(workdir)
