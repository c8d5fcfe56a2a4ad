"""The workflow through the shipped profiles/slurm on a real single-node SLURM.

Only the profile's partition placeholder is replaced. Asserts that jobs went through sbatch
(accounted by slurmdbd), that the GPU rule was given the node's GPU GRES, that the outputs equal
a local run's, that a job failing under SLURM ends Snakemake non-zero with the rule's log, and
that the harness (local_slurm.py) stops the daemons it started. Most of a run's time is the
plugin's polling (the profile's first status check after 20 s, then 10 s longer each time no
job finished; a failed job is resubmitted once): the module's three workflow runs (on SLURM,
the failing one on SLURM, the local reference) therefore run at once, and the tests read their
results.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import (  # noqa: E402
    REPO,
    assert_ok,
    make_llama_checkpoint,
    snakemake_command,
)
from local_slurm import LocalSlurm, SlurmUnavailable  # noqa: E402

from weight_geometry.results_io import BASES_FILES  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.workflow]

TIMEOUT_S = 240
SUBMITTED = re.compile(r"has been submitted with SLURM jobid (\d+)")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[LocalSlurm]:
    try:
        with LocalSlurm(tmp_path_factory.mktemp("slurm-cluster")) as running:
            yield running
    except SlurmUnavailable as exc:
        pytest.skip(f"local SLURM unavailable: {exc.reason}")


def shipped_profile(cluster: LocalSlurm, dest: Path) -> Path:
    """profiles/slurm with only its <PARTITION> placeholder filled in."""
    shutil.copytree(REPO / "profiles" / "slurm", dest)
    for path in dest.iterdir():
        text = path.read_text()
        assert "<PARTITION>" in text
        path.write_text(text.replace("<PARTITION>", cluster.partition))
    return dest


def run_on_slurm(cluster: LocalSlurm, workdir: Path, config: dict):
    workdir.mkdir(parents=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    profile = shipped_profile(cluster, workdir.parent / f"{workdir.name}-profile")
    cmd = ["timeout", "-k", "10", str(TIMEOUT_S), sys.executable, "-m", "snakemake",
           "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--profile", str(profile),
           "--configfile", str(workdir / "config.yaml")]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=workdir, env=cluster.subprocess_env(), capture_output=True,
                          text=True, timeout=TIMEOUT_S + 30)
    return proc, time.monotonic() - start


def nan_checkpoint(path: Path) -> Path:
    """A tiny Llama checkpoint with a NaN in layer 0's W_Q: its extraction job fails."""
    from safetensors.torch import load_file, save_file

    ckpt = make_llama_checkpoint(path)
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("nan")
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    return ckpt


def run_when_queued(cluster: LocalSlurm, workdir: Path, config: dict, wait_s: float = 60):
    """:func:`run_on_slurm` once the cluster has a job queued or running (or after ``wait_s``):
    started beside a run whose first job then holds the node's one GPU, its extraction queues
    behind that job instead of delaying it past the plugin's first status check (20 s)."""
    deadline = time.monotonic() + wait_s
    while (not cluster.run(["squeue", "-h", "-o", "%i"]).stdout.strip()
           and time.monotonic() < deadline):
        time.sleep(0.5)
    return run_on_slurm(cluster, workdir, config)


def run_niced(workdir: Path, config: dict) -> subprocess.CompletedProcess:
    """:func:`run_snakemake` at the lowest CPU priority (``nice -n 19``): beside SLURM runs it
    takes the CPU their jobs leave, and never pushes one of their jobs past a status check."""
    cmd = ["nice", "-n", "19", *snakemake_command(workdir, config=config)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=workdir)


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory) -> Iterator[tuple[Path, dict[str, Future]]]:
    """``(root, futures)``: the workflow on SLURM (``slurm``, into ``root/slurm``), the same
    config run locally (``local``, ``root/local``, :func:`run_niced`) and a failing model on
    SLURM (``failing``, ``root/failing``, :func:`run_when_queued`), all started at once in
    threads; each future gives what :func:`run_on_slurm` or :func:`run_niced` returns. The
    SLURM runs spend most of their time waiting for the plugin's next status check, so
    together they take about as long as the longest alone."""
    root = tmp_path_factory.mktemp("runs")
    config = {"models": {"tiny": {"source": str(make_llama_checkpoint(root / "ckpt"))}},
              "top_k": 4, "heads": [0, 3]}
    bad = {"models": {"bad": {"source": str(nan_checkpoint(root / "bad"))}}, "top_k": 4}
    with ThreadPoolExecutor(3) as pool:
        yield root, {"slurm": pool.submit(run_on_slurm, cluster, root / "slurm", config),
                     "failing": pool.submit(run_when_queued, cluster, root / "failing", bad),
                     "local": pool.submit(run_niced, root / "local", config)}


def accounted(cluster: LocalSlurm, job_ids: set[str], wait_s: float = 30) -> dict[str, dict]:
    deadline = time.monotonic() + wait_s
    while True:
        rows = {r["JobIDRaw"]: r for r in cluster.job_records() if r["JobIDRaw"] in job_ids}
        if rows.keys() == job_ids or time.monotonic() > deadline:
            return rows
        time.sleep(1)


def test_cluster_is_stopped_cleanly(tmp_path: Path, runs) -> None:
    """A second, short-lived cluster, started and stopped next to the module's one while the
    module's runs use it (``runs``: they are in flight), leaves nothing running."""
    workdir = tmp_path / "c"
    try:
        with LocalSlurm(workdir) as c:
            pids = c.pids
            assert sorted(pids) == ["mariadbd", "munged", "slurmctld", "slurmd", "slurmdbd"]
            assert c.run(["sinfo", "-h", "-o", "%T"]).stdout.strip() == "idle"
    except SlurmUnavailable as exc:
        pytest.skip(f"local SLURM unavailable: {exc.reason}")
    assert c.pids == {}
    alive = {name: pid for name, pid in pids.items() if _running(pid)}
    assert not alive, alive
    mentioning = [pid for pid, cmd in _cmdlines().items() if str(workdir) in cmd]
    assert not mentioning, mentioning


def test_workflow_on_slurm_equals_local_run(cluster, runs):
    root, futures = runs
    proc, elapsed = futures["slurm"].result()
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]

    job_ids = set(SUBMITTED.findall(out))
    rows = accounted(cluster, job_ids)
    assert job_ids and rows.keys() == job_ids, (job_ids, rows)
    assert {r["State"] for r in rows.values()} == {"COMPLETED"}, rows
    extract = [r for r in rows.values() if r["Comment"].startswith("rule_extract_layers")]
    assert len(extract) == 1 and "gres/gpu=1" in extract[0]["AllocTRES"], rows
    others = [r for r in rows.values() if not r["Comment"].startswith("rule_extract_layers")]
    assert others and all("gres/gpu" not in r["ReqTRES"] for r in others), rows
    # model_info is a local rule: it ran on the submit host, not as a SLURM job.
    assert not any(r["Comment"].startswith("rule_model_info") for r in rows.values()), rows
    assert "localrule model_info" in out, out[-6000:]

    slurm, local = root / "slurm", root / "local"
    assert_ok(futures["local"].result())
    ours = sorted(p.relative_to(slurm) for p in (slurm / "results").rglob("*.npy"))
    theirs = sorted(p.relative_to(local) for p in (local / "results").rglob("*.npy"))
    # The bases arrays, the row-space overlaps, 2 heads' similarity matrices, their mean,
    # best match, its pairs and every head's same-index matrices (circuits are off).
    assert ours == theirs and len(ours) == len(BASES_FILES) + 7
    for rel in ours:
        assert np.array_equal(np.load(slurm / rel), np.load(local / rel), equal_nan=True), rel
    assert (slurm / "results/tiny/k4/report.md").is_file()
    print(f"SLURM run: {elapsed:.0f} s, {len(job_ids)} jobs")


def test_failing_job_on_slurm_exits_with_its_log(runs):
    root, futures = runs
    proc, elapsed = futures["failing"].result()
    out = proc.stdout + proc.stderr
    assert proc.returncode not in (0, 124, 137), out[-6000:]  # failed, and did not hang
    assert "logs/bad/extract_layers000-003.log" in out, out[-6000:]
    assert "contains NaN or Inf" in out, out[-6000:]
    assert not list((root / "failing").glob("results/bad/bases/*/*.npy"))
    print(f"failing SLURM run: {elapsed:.0f} s")


def _running(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        return not Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return False


def _cmdlines() -> dict[int, str]:
    out = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                out[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
    return out
