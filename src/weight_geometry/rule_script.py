"""Glue between a Snakemake ``script:`` and the library: logging and one-line errors."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from .errors import UserError


def run_rule(body: Callable[[], None], log_path: str | Path, outputs: list[str]) -> None:
    """Run a rule body with stdout/stderr going to the rule's log file.

    A :class:`UserError` becomes one line, ``error: <message>``, written to the log and to the
    real stderr (so it shows in Snakemake's console), any partial outputs are removed, and the
    process exits with status 1. Other exceptions keep their traceback in the log.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    real_stderr = sys.stderr
    start = time.perf_counter()
    with open(log_path, "w") as log, redirect_stdout(log), redirect_stderr(log):
        try:
            body()
        except UserError as err:
            line = f"error: {err}"
            print(line, file=log, flush=True)
            print(line, file=real_stderr, flush=True)
            for out in outputs:
                Path(out).unlink(missing_ok=True)
            sys.exit(1)
        print(f"done in {time.perf_counter() - start:.2f} s", flush=True)


def progress(message: str) -> None:
    """Print one progress line to the rule's log (stdout is redirected there)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)
