"""gpu_claim: one GPU per job, driven through its boundary (the visible-device list it is given)
by real OS processes holding real flock locks; no GPU needed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from weight_geometry import gpu_claim
from weight_geometry.errors import UserError
from weight_geometry.gpu_claim import claim_gpu, visible_gpus

#: A job's claim: ``visible`` (comma-separated), lock directory, wait in s, go-file. Says
#: "ready", waits for the go-file (so that all processes claim at once), claims, prints
#: "claimed <index> <ident>", and holds the GPU until its stdin closes; a UserError is one line
#: on stderr and exit status 1, as a rule script's.
_JOB = """
import os, sys, time
from weight_geometry.errors import UserError
from weight_geometry.gpu_claim import claim_gpu
visible, directory, wait_s, go = sys.argv[1].split(","), sys.argv[2], float(sys.argv[3]), \\
    sys.argv[4]
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.01)
try:
    claim = claim_gpu(visible, directory, wait_s)
except UserError as exc:
    print(f"error: {exc}", file=sys.stderr, flush=True)
    sys.exit(1)
print("claimed", claim.index, claim.ident, flush=True)
sys.stdin.read()
"""


class Jobs:
    """Job processes (:data:`_JOB`) started together on one lock directory; stopped at exit."""

    def __init__(self, directory: Path):
        self.directory, self.go, self.procs = directory, directory / "go", []

    def start(self, n: int, visible: list[str], wait_s: float) -> list[subprocess.Popen]:
        """``n`` jobs, each ready (its interpreter started) when this returns; the go-file is
        removed first, so they claim at the next :meth:`go`."""
        self.go.unlink(missing_ok=True)
        procs = [subprocess.Popen([sys.executable, "-c", _JOB, ",".join(visible),
                                   str(self.directory / "locks"), str(wait_s), str(self.go)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(n)]
        self.procs += procs
        for proc in procs:
            assert proc.stdout.readline() == "ready\n"
        return procs

    def go_now(self) -> None:
        self.go.touch()

    @staticmethod
    def claimed(proc: subprocess.Popen) -> tuple[int, str]:
        """The job's claimed (index, ident), once it has printed them."""
        word, index, ident = proc.stdout.readline().split()
        assert word == "claimed"
        return int(index), ident

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                stream.close()


@pytest.fixture
def jobs(tmp_path):
    (tmp_path / "locks").mkdir()
    started = Jobs(tmp_path)
    yield started
    started.stop()


EIGHT = [f"GPU-{i:08x}-0000-0000-0000-000000000000" for i in range(8)]


def test_eight_concurrent_jobs_get_eight_distinct_gpus(jobs):
    """8 processes claiming at once among 8 GPUs: 8 distinct devices, each index naming its
    own entry of the list, all held at the same time (none has exited)."""
    procs = jobs.start(8, EIGHT, wait_s=0)
    jobs.go_now()
    claims = [jobs.claimed(proc) for proc in procs]
    assert sorted(claims) == list(enumerate(EIGHT))
    assert all(proc.poll() is None for proc in procs)


def test_a_killed_holders_gpu_is_claimed_again_at_once(jobs, tmp_path):
    """kill -9 of a holder ends its lock with it: its GPU is claimable at once, by a new
    process and by a job that was waiting for one; the lock files stay, unlocked."""
    holders = jobs.start(8, EIGHT, wait_s=0)
    jobs.go_now()
    by_index = {jobs.claimed(proc)[0]: proc for proc in holders}
    [waiting] = jobs.start(1, EIGHT, wait_s=60)
    jobs.go_now()
    line = waiting.stdout.readline()
    assert "all 8 visible GPUs are claimed by other jobs of this user" in line
    assert "waiting up to 60 s for one" in line
    killed = time.monotonic()
    os.kill(by_index[5].pid, signal.SIGKILL)
    assert "GPU cuda:5 was released: claimed it" in waiting.stdout.readline()
    assert jobs.claimed(waiting) == (5, EIGHT[5])
    assert time.monotonic() - killed < 5    # a poll is 0.2 s; slack for a loaded machine
    os.kill(by_index[2].pid, signal.SIGKILL)
    by_index[2].wait()
    claim = claim_gpu(EIGHT, tmp_path / "locks", wait_s=0)   # this process: no wait at all
    try:
        assert (claim.index, claim.ident) == (2, EIGHT[2])
    finally:
        claim.release()
    assert len(list((tmp_path / "locks").glob("gpu-*.lock"))) == 8


def test_more_jobs_than_gpus_wait_then_fail_with_one_line(jobs, tmp_path):
    """With every GPU held, a further job waits its ``wait_s``, then exits 1 with one line
    naming the GPUs, the holders' pids, the lock directory and the remedy."""
    holders = jobs.start(2, EIGHT[:2], wait_s=0)
    jobs.go_now()
    assert sorted(jobs.claimed(proc)[0] for proc in holders) == [0, 1]
    [extra] = jobs.start(1, EIGHT[:2], wait_s=0.5)
    started = time.monotonic()
    jobs.go_now()
    assert extra.wait(timeout=30) == 1
    assert time.monotonic() - started >= 0.5
    pids = {str(proc.pid) for proc in holders}
    [error] = extra.stderr.read().splitlines()
    assert error.startswith("error: all 2 GPUs visible to this job stayed claimed by other jobs"
                            " of this user for 0.5 s (holders' pids: ")
    assert set(error.split("pids: ")[1].split(";")[0].split(", ")) == pids
    assert error.endswith(f"lock files in {tmp_path / 'locks'}): run at most 2 GPU jobs at once"
                          " here (--resources gpu=2), or let the other run finish")


def test_slurm_jobs_claim_their_only_visible_gpu(jobs):
    """Under SLURM each job sees one GPU, numbered 0 in CUDA_VISIBLE_DEVICES whichever it is:
    the claim picks it at once, and two jobs on one node (their GPUs' UUIDs differ) both do."""
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0"}, 1) == ["0"]
    a, b = jobs.start(1, [EIGHT[3]], wait_s=0) + jobs.start(1, [EIGHT[6]], wait_s=0)
    jobs.go_now()
    assert jobs.claimed(a) == (0, EIGHT[3]) and jobs.claimed(b) == (0, EIGHT[6])


def test_claims_in_one_process_and_release(tmp_path):
    """A lock belongs to its open file: two claims in one process get two GPUs, a released one
    is free again, and a lock-file name keeps only safe characters of the identity."""
    first = claim_gpu(["0", "MIG-a/b"], tmp_path, wait_s=0)
    second = claim_gpu(["0", "MIG-a/b"], tmp_path, wait_s=0)
    assert (first.index, second.index) == (0, 1)
    assert second.path == tmp_path / "gpu-MIG-a_b.lock"
    assert second.path.read_text() == f"{os.getpid()}\n"
    first.release()
    first.release()                                            # idempotent
    again = claim_gpu(["0", "MIG-a/b"], tmp_path, wait_s=0)
    assert again.index == 0
    again.release()
    second.release()
    with pytest.raises(UserError, match=r"^no GPU is visible to this job"):
        claim_gpu([], tmp_path)


@pytest.mark.parametrize(("value", "count", "expected"), [
    (None, 3, ["0", "1", "2"]),          # unset: every device torch counts
    ("", 0, []),                          # empty: no GPU
    ("-1", 0, []),
    ("5,2", 2, ["5", "2"]),               # physical indices, in torch's (logical) order
    (" 3 , 1gpu", 2, ["3", "1"]),         # CUDA reads leading digits, like strtoul
    ("4,-1,2", 1, ["4"]),                 # a negative entry ends the list
    ("1,1", 0, []),                       # a repeated entry hides every GPU
    ("GPU-aa,GPU-bb,0", 2, ["GPU-aa", "GPU-bb"]),   # UUIDs: the list stops at another kind
    ("MIG-x", 1, ["MIG-x"]),
    ("0,1,2,3", 2, ["0", "1"]),           # never more than torch counts
])
def test_visible_gpus_reads_cuda_visible_devices_as_cuda_does(value, count, expected):
    environ = {} if value is None else {"CUDA_VISIBLE_DEVICES": value}
    assert visible_gpus(environ, count) == expected


def test_claims_dir_is_this_users_and_refuses_a_foreign_path(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_claim.tempfile, "gettempdir", lambda: str(tmp_path))
    path = gpu_claim.claims_dir()
    assert path == tmp_path / f"weight_geometry-gpu-claims-{os.getuid()}"
    assert path.stat().st_mode & 0o777 == 0o700 and gpu_claim.claims_dir() == path
    path.rmdir()
    (tmp_path / "elsewhere").mkdir()
    path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UserError, match=r"the GPU claims' directory must be a directory of this"
                                        r" user's .* it is l.* remove it, or point TMPDIR"):
        gpu_claim.claims_dir()
