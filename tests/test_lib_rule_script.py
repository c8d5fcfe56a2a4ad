"""rule_script.run_rule in a real process: what reaches the log, the console and the disk."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

BODY = """
import ctypes, os, sys
from weight_geometry.errors import UserError
from weight_geometry.rule_script import progress, run_rule

kind, log, out = sys.argv[1:]

def body():
    with open(out, "w") as fh:
        fh.write("partial")
    progress("working")
    os.write(1, b"native stdout\\n")
    os.write(2, b"native stderr\\n")
    ctypes.CDLL(None).printf(b"C stdio, buffered\\n")
    print("python stderr", file=sys.stderr)
    if kind == "user":
        raise UserError("top_k: 0 is not allowed (1 <= k <= d_head = 64)")
    if kind == "bug":
        raise ValueError("boom")
    if kind == "disk":
        raise OSError(28, "No space left on device")
    if kind == "readonly":
        raise PermissionError(13, "Permission denied", "/results/x.npy")

run_rule(body, log, [out])
print("after run_rule")
"""


@pytest.mark.parametrize("kind", ["ok", "user", "bug", "disk", "readonly"])
def test_run_rule_sends_everything_to_the_log(tmp_path, kind):
    log, out = tmp_path / "logs" / "rule.log", tmp_path / "out.npy"
    # Without PYTHONUNBUFFERED, C's stdout is buffered as it is in a Snakemake job.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.run([sys.executable, "-c", BODY, kind, str(log), str(out)],
                          capture_output=True, text=True, timeout=60, env=env)
    text = log.read_text()
    for line in ("working", "native stdout", "native stderr", "python stderr",
                 "C stdio, buffered"):
        assert line in text, text
    assert "native" not in proc.stdout + proc.stderr and "python stderr" not in proc.stderr
    assert "C stdio" not in proc.stdout
    if kind == "ok":
        assert proc.returncode == 0, proc.stderr
        assert "done in" in text and out.exists()
        assert proc.stdout == "after run_rule\n"          # fds 1 and 2 restored afterwards
        return
    assert proc.returncode == 1 and not out.exists() and "after run_rule" not in proc.stdout
    one_line = {"user": "error: top_k: 0 is not allowed (1 <= k <= d_head = 64)",
                # the machine's state, not a bug: no traceback, on the console nor in the log
                "disk": "error: No space left on device",
                "readonly": "error: Permission denied: /results/x.npy"}
    if kind in one_line:
        line = one_line[kind]
        assert proc.stderr == line + "\n" and line in text.splitlines()
        assert "Traceback" not in text
    else:
        assert proc.stderr == f"error: unexpected ValueError: boom (traceback in {log})\n"
        assert "Traceback (most recent call last)" in text and "in body\nValueError: boom" in text
