"""Smoke test: snakemake's SLURM executor plugin against a real local SLURM (with accounting).

Needs root and Debian packages (installed on demand); skipped where that is impossible.
Slow (about a minute): the cluster is shared by the tests of this module.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # local_slurm.py lives next to us
from local_slurm import LocalSlurm, SlurmUnavailable  # noqa: E402

pytestmark = pytest.mark.slurm

SNAKEFILE = Path(__file__).resolve().parent / "smoke_snakefile" / "Snakefile"
SNAKEMAKE_TIMEOUT_S = 240
SUBMITTED = re.compile(r"Job \d+ has been submitted with SLURM jobid (\d+)")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSlurm]:
    try:
        with LocalSlurm(tmp_path_factory.mktemp("slurm-cluster")) as running:
            yield running
    except SlurmUnavailable as exc:
        pytest.skip(f"local SLURM unavailable: {exc.reason}")


#: The plugin's first status query comes this long after submission; later ones step up by
#: 10 s while nothing finishes. Keep 3 x INIT_SECONDS <= MinJobAge (300): the plugin compares
#: them to judge its status command. A job here takes about 5 s (two snakemake start-ups).
INIT_SECONDS = 5

#: The executor settings, as profile keys; ``run_snakemake(..., profile=True)`` uses these,
#: otherwise the equivalent command-line flags.
PROFILE_YAML = f"""\
executor: slurm
jobs: 2
default-resources:
  - slurm_partition=debug
slurm-no-account: true
slurm-init-seconds-before-status-checks: {INIT_SECONDS}
slurm-keep-successful-logs: true
latency-wait: 10
printshellcmds: true
"""


def run_snakemake(
    cluster: LocalSlurm, workdir: Path, *targets: str, profile: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run the smoke workflow in ``workdir`` through the SLURM executor, under timeout -k."""
    cmd = [
        "timeout", "-k", "10", str(SNAKEMAKE_TIMEOUT_S),
        sys.executable, "-m", "snakemake",
        "--snakefile", str(SNAKEFILE),
        "--directory", str(workdir),
        "--workflow-profile", "none",  # do not pick up the repository's profiles/default
    ]  # fmt: skip
    if profile:
        assert cluster.partition == "debug"
        profile_dir = workdir / "slurm-profile"
        profile_dir.mkdir()
        (profile_dir / "config.yaml").write_text(PROFILE_YAML)
        cmd += ["--profile", str(profile_dir)]
    else:
        cmd += [
            "--executor", "slurm",
            "--jobs", "2",
            "--default-resources", f"slurm_partition={cluster.partition}",
            "--slurm-no-account",
            "--slurm-init-seconds-before-status-checks", str(INIT_SECONDS),
            "--slurm-keep-successful-logs",
            "--latency-wait", "10",
            "--printshellcmds",
        ]  # fmt: skip
    return subprocess.run(
        [*cmd, *targets],
        cwd=workdir,
        env=cluster.subprocess_env(),
        capture_output=True,
        text=True,
        timeout=SNAKEMAKE_TIMEOUT_S + 30,
        check=False,
    )


def records_for(cluster: LocalSlurm, job_ids: set[str], wait_s: float = 30.0) -> dict[str, dict]:
    """Accounting rows for ``job_ids`` once all of them have reached a final state."""
    deadline = time.monotonic() + wait_s
    while True:
        rows = {r["JobIDRaw"]: r for r in cluster.job_records() if r["JobIDRaw"] in job_ids}
        done = all(r["State"] not in {"PENDING", "RUNNING"} for r in rows.values())
        if (rows.keys() == job_ids and done) or time.monotonic() > deadline:
            return rows
        time.sleep(1)


def test_gpu_and_plain_jobs_run_and_are_accounted(cluster: LocalSlurm, tmp_path: Path) -> None:
    """Command-line flags; the GPU job sees one GPU and is accounted with gres/gpu."""
    res = run_snakemake(cluster, tmp_path)
    output = res.stdout + res.stderr
    assert res.returncode == 0, output[-6000:]

    assert (tmp_path / "results" / "gpu.txt").read_text().strip() == "0", output[-3000:]
    assert (tmp_path / "results" / "plain.txt").read_text().strip() == "plain"

    job_ids = set(SUBMITTED.findall(output))
    assert len(job_ids) == 2, output[-3000:]
    rows = records_for(cluster, job_ids)
    assert rows.keys() == job_ids, rows
    assert {r["State"] for r in rows.values()} == {"COMPLETED"}, rows

    by_rule = {r["Comment"]: r for r in rows.values()}
    assert set(by_rule) == {"rule_gpu", "rule_plain"}, rows
    assert "gres/gpu=1" in by_rule["rule_gpu"]["ReqTRES"], by_rule["rule_gpu"]
    assert "gres/gpu=1" in by_rule["rule_gpu"]["AllocTRES"], by_rule["rule_gpu"]
    assert "gres/gpu" not in by_rule["rule_plain"]["AllocTRES"], by_rule["rule_plain"]


def test_failing_rule_exits_nonzero_and_names_its_log(cluster: LocalSlurm, tmp_path: Path) -> None:
    """Profile keys; a rule exiting 3 fails the run promptly, naming the rule's log."""
    started = time.monotonic()
    res = run_snakemake(cluster, tmp_path, "fail", profile=True)
    elapsed = time.monotonic() - started
    output = res.stdout + res.stderr

    assert res.returncode not in (0, 124, 137), f"rc={res.returncode}\n{output[-6000:]}"
    assert elapsed < SNAKEMAKE_TIMEOUT_S
    assert "logs/fail.log" in output, output[-6000:]
    assert (tmp_path / "logs" / "fail.log").read_text().strip() == "about to fail"
    assert not (tmp_path / "results" / "fail.txt").exists()

    job_ids = set(SUBMITTED.findall(output))
    assert len(job_ids) == 1, output[-3000:]
    rows = records_for(cluster, job_ids)
    assert [r["State"] for r in rows.values()] == ["FAILED"], rows


def test_cluster_is_stopped_cleanly(tmp_path: Path) -> None:
    """A second, short-lived cluster (next to the module's one) leaves nothing running."""
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
