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
from typing import NoReturn, TextIO

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

    A log that cannot be written (a full disk) never hides the error: the line still reaches
    the real stderr, saying that the log could not take it (or the traceback); a log that
    cannot even be opened is that one line.
    """
    log_path = Path(log_path)
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "w", buffering=1)  # noqa: SIM115  (closed below, errors or not)
    except OSError as err:
        _fail(f"error: the job's log {log_path} cannot be written ({err.strerror})", sys.stderr,
              outputs)
    start = time.perf_counter()
    try:
        with _fds_to(log) as real_stderr, redirect_stdout(log), redirect_stderr(log):
            try:
                body()
            except Exception as exc:
                _report(exc, log, log_path, real_stderr, outputs)
            with suppress(OSError):  # the outputs are complete: a full log fails nothing
                print(f"done in {time.perf_counter() - start:.2f} s", flush=True)
    finally:
        with suppress(OSError):  # the flush of what a full disk refused fails again
            log.close()


def _report(exc: Exception, log: TextIO, log_path: Path, real_stderr: TextIO,
            outputs: list[str]) -> None:
    """End the job for ``exc``: its one line (and for a bug, its traceback) to the log, the
    line to the real stderr, with a note where the log could not take them."""
    if _is_bug(exc):
        failed = _write_log(log, traceback.format_exc())
        where = (f"traceback in {log_path}" if failed is None
                 else f"no traceback: the log {log_path} could not be written: {failed}")
        _fail(f"error: unexpected {type(exc).__name__}: {exc} ({where})", real_stderr, outputs)
    line = _one_line(exc)
    failed = _write_log(log, line + "\n")
    if failed is not None:
        line += f"; the log {log_path} could not be written either ({failed})"
    _fail(line, real_stderr, outputs)


def _write_log(log: TextIO, text: str) -> str | None:
    """Write ``text`` to the log: None, or why it could not be written (a full disk)."""
    try:
        log.write(text)
        log.flush()
    except OSError as err:
        return err.strerror or str(err)
    return None


def _is_bug(exc: Exception) -> bool:
    """Neither bad input (:class:`UserError`) nor the machine's state (:data:`MACHINE_ERRNOS`)."""
    machine = isinstance(exc, OSError) and exc.errno in MACHINE_ERRNOS
    return not (isinstance(exc, UserError) or machine)


def _one_line(exc: Exception) -> str:
    """``error: <message>``; for an OSError its strerror and the file, if it names one."""
    if isinstance(exc, OSError):
        return f"error: {exc.strerror}" + (f": {exc.filename}" if exc.filename else "")
    return f"error: {exc}"


def _fail(line: str, real_stderr: TextIO, outputs: list[str]) -> NoReturn:
    print(line, file=real_stderr, flush=True)
    for out in outputs:
        Path(out).unlink(missing_ok=True)
    sys.exit(1)


@contextmanager
def _fds_to(log: TextIO) -> Iterator[TextIO]:
    """File descriptors 1 and 2 point at ``log`` (sharing its file offset) for the block;
    yields a text stream on the original stderr. Everything buffered for them (Python's
    streams, C's stdio) is flushed into the log before they are restored, even if a flush
    fails (what a full disk refuses is dropped: the caller reports the error)."""
    _flush_all()
    saved = [os.dup(1), os.dup(2)]
    real_stderr = os.fdopen(os.dup(saved[1]), "w")
    try:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        yield real_stderr
    finally:
        try:
            with suppress(OSError):
                log.flush()
            with suppress(OSError):
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


def peak_rss_mib() -> float | None:
    """This process's peak resident memory so far, in MiB (``getrusage``'s ``ru_maxrss``: the
    kernel's high-water mark, Linux ``VmHWM``, exact, not sampled); None where the platform
    has no ``resource`` module (Windows). Cost: one system call."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB; bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def progress(message: str) -> None:
    """Print one progress line to the rule's log (stdout is redirected there)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)
