"""Glue between a Snakemake ``script:`` and the library: logging and one-line errors.

A rule script imports only this module at its top and everything else inside the body it
hands to :func:`run_rule`, so that an import failure (e.g. a package missing from a conda env)
lands in the rule's log like any other."""

from __future__ import annotations

import errno
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout, suppress
from pathlib import Path
from typing import TextIO

from .errors import UserError

#: OS errors that are the machine's state, not a bug (a full disk or quota, a read-only or
#: forbidden path): one line, like a :class:`UserError`, without a traceback.
MACHINE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def run_rule(body: Callable[[], None], log_path: str | Path, outputs: list[str]) -> None:
    """Run a rule body with everything it prints going to the rule's log file: Python's
    ``sys.stdout``/``sys.stderr`` and file descriptors 1 and 2 (what native libraries write).

    A :class:`UserError` becomes one line, ``error: <message>``, written to the log and to the
    real stderr (so it shows in Snakemake's console); so does an ``OSError`` of
    :data:`MACHINE_ERRNOS` (``error: <strerror>: <file>``). Any other exception writes its
    traceback to the log and one line naming it and the log to the real stderr. Either way
    any partial outputs are removed and the process exits with status 1.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "w", buffering=1) as log, _fds_to(log) as real_stderr, \
            redirect_stdout(log), redirect_stderr(log):
        try:
            body()
        except Exception as exc:
            if _is_bug(exc):   # its traceback goes to the log
                traceback.print_exc()
                _fail(f"error: unexpected {type(exc).__name__}: {exc} (traceback in {log_path})",
                      real_stderr, outputs)
            _fail(_one_line(exc), real_stderr, outputs, to_log=True)
        print(f"done in {time.perf_counter() - start:.2f} s", flush=True)


def _is_bug(exc: Exception) -> bool:
    """Neither bad input (:class:`UserError`) nor the machine's state (:data:`MACHINE_ERRNOS`)."""
    machine = isinstance(exc, OSError) and exc.errno in MACHINE_ERRNOS
    return not (isinstance(exc, UserError) or machine)


def _one_line(exc: Exception) -> str:
    """``error: <message>``; for an OSError its strerror and the file, if it names one."""
    if isinstance(exc, OSError):
        return f"error: {exc.strerror}" + (f": {exc.filename}" if exc.filename else "")
    return f"error: {exc}"


def _fail(line: str, real_stderr: TextIO, outputs: list[str], to_log: bool = False) -> None:
    if to_log:
        print(line, flush=True)
    print(line, file=real_stderr, flush=True)
    for out in outputs:
        Path(out).unlink(missing_ok=True)
    sys.exit(1)


@contextmanager
def _fds_to(log: TextIO) -> Iterator[TextIO]:
    """File descriptors 1 and 2 point at ``log`` (sharing its file offset) for the block;
    yields a text stream on the original stderr. Everything buffered for them (Python's
    streams, C's stdio) is flushed into the log before they are restored, even if a flush
    fails."""
    _flush_all()
    saved = [os.dup(1), os.dup(2)]
    real_stderr = os.fdopen(os.dup(saved[1]), "w")
    try:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        yield real_stderr
    finally:
        try:
            log.flush()
            _flush_all()
        finally:
            for fd, copy in zip((1, 2), saved, strict=True):
                os.dup2(copy, fd)
                os.close(copy)
            real_stderr.close()


def _flush_all() -> None:
    """Flush Python's original stdout/stderr and every C stdio stream (``fflush(NULL)``,
    where the C library can be loaded)."""
    for stream in (sys.__stdout__, sys.__stderr__, sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    import ctypes

    with suppress(OSError, AttributeError):   # no C library by that name (Windows)
        ctypes.CDLL(None).fflush(None)


def progress(message: str) -> None:
    """Print one progress line to the rule's log (stdout is redirected there)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)
