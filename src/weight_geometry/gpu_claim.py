"""One GPU per extraction job on a machine with several: each job claims a device for its life.

Locally, ``snakemake --resources gpu=8`` runs up to eight GPU jobs at once on one machine, and
``torch.device("cuda")`` is GPU 0 for every one of them. Instead, each job claims one of the
GPUs it can see (:func:`claim_gpu`): an exclusive ``flock`` on a lock file named after the
device's physical identity (its UUID where torch gives one), in a directory of this user's
(:func:`claims_dir`). The lock belongs to the open file, so it ends with the process however
that ends (``kill -9`` included): nothing has to be cleaned up, and the file that stays behind
is free for the next job. Concurrent jobs therefore never share a GPU while a free one exists.

A job that finds every visible GPU claimed waits for one to be released (polling every
:data:`POLL_S`), saying so in its log, and after :data:`CLAIM_WAIT_S` fails with one line that
names the holders. That happens only when more GPU jobs run at once than there are GPUs (a
``--resources gpu=N`` above the machine's GPUs, or two runs of the same user at once).

Claims coordinate the jobs of one user on one machine (the directory is per user and in the
local temporary directory); other users' processes on the same GPUs are not seen. Under SLURM
each job sees only its own GPU (``CUDA_VISIBLE_DEVICES``), which it claims at once: jobs of one
user on one node see different UUIDs even when both number their GPU 0.

Standard library only (no torch): the device side, which turns torch's view of the GPUs into
the list claimed here, is :func:`device.visible_gpu_ids`.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from .errors import UserError

#: How long a job waits for a GPU when every visible one is claimed, in seconds.
CLAIM_WAIT_S = 600.0
#: How often a waiting job tries the visible GPUs again, in seconds.
POLL_S = 0.2


def visible_gpus(environ: Mapping[str, str], count: int) -> list[str]:
    """The GPUs a CUDA process with environment ``environ`` sees, in torch's order (logical
    index ``i`` is ``cuda:i``), each named as ``CUDA_VISIBLE_DEVICES`` names it (a physical
    index, or a ``GPU-``/``MIG-`` UUID), or by its index when the variable is unset; at most
    ``count`` (``torch.cuda.device_count()``). As CUDA reads the variable: empty means no GPU,
    the list stops at the first entry that is not an index (``-1``) or not of the first
    entry's UUID kind, and a repeated entry hides every GPU. Cost O(len(variable))."""
    value = environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return [str(i) for i in range(count)]
    names: list[str] = []
    prefix = next((p for p in ("GPU-", "MIG-") if value.strip().startswith(p)), None)
    for entry in value.split(","):
        entry = entry.strip()
        if prefix is not None:
            name = entry if entry.startswith(prefix) else None
        else:   # strtoul: leading digits ("1gpu" is 1); a sign or nothing stops the list
            digits = re.match(r"\+?(\d+)", entry)
            name = str(int(digits.group(1))) if digits else None
        if name is None:
            break
        if name in names:
            return []
        names.append(name)
    return names[:count]


def claims_dir() -> Path:
    """This user's directory of GPU lock files, ``<tmp>/weight_geometry-gpu-claims-<uid>``
    (``<tmp>``: :func:`tempfile.gettempdir`, i.e. ``$TMPDIR`` or ``/tmp``), created ``0700``.
    Not ``$XDG_RUNTIME_DIR``: systemd removes it when the user's last session ends, which a
    run under ``nohup`` outlives. A UserError when the path is not a directory of this user's
    that only they can write (another user, or a symlink, got there first)."""
    path = Path(tempfile.gettempdir()) / f"weight_geometry-gpu-claims-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise UserError(f"{path}: the GPU claims' directory must be a directory of this user's"
                        f" (uid {os.getuid()}) that others cannot write; it is"
                        f" {stat.filemode(st.st_mode)} owned by uid {st.st_uid}: remove it, or"
                        " point TMPDIR elsewhere")
    return path


@dataclass
class Claim:
    """One GPU held by this process: ``cuda:{index}`` (its position in the visible list),
    physically ``ident``, locked through ``path`` for as long as this object (or the process)
    lives, or until :meth:`release`."""

    index: int
    ident: str
    path: Path
    _file: TextIO = field(repr=False)

    def release(self) -> None:
        """Give the GPU back: close the lock file, which ends the lock. Idempotent."""
        self._file.close()


def claim_gpu(visible: Sequence[str], directory: str | Path | None = None,
              wait_s: float = CLAIM_WAIT_S) -> Claim:
    """Claim the first unclaimed GPU of ``visible`` (physical identities, in logical order:
    entry ``i`` is ``cuda:i``), waiting up to ``wait_s`` seconds, with one progress line, when
    all are claimed; then a UserError naming the holders. ``directory``: the lock files'
    (default :func:`claims_dir`). Cost: one ``open`` and ``flock`` per GPU tried, every
    :data:`POLL_S` while waiting; no GPU is touched."""
    from .rule_script import progress

    if not visible:
        raise UserError("no GPU is visible to this job (CUDA_VISIBLE_DEVICES"
                        f"={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')!r})")
    directory = claims_dir() if directory is None else Path(directory)
    paths = [directory / f"gpu-{re.sub(r'[^A-Za-z0-9._-]', '_', ident)}.lock"
             for ident in visible]
    deadline = time.monotonic() + wait_s
    waiting = False
    while True:
        for index, (ident, path) in enumerate(zip(visible, paths, strict=True)):
            locked = _lock(path)
            if locked is not None:
                if waiting:
                    progress(f"GPU cuda:{index} was released: claimed it")
                return Claim(index, ident, path, locked)
        if time.monotonic() >= deadline:
            raise UserError(f"all {len(visible)} GPUs visible to this job stayed claimed by"
                            f" other jobs of this user for {wait_s:g} s (holders' pids:"
                            f" {_holders(paths)}; lock files in {directory}): run at most"
                            f" {len(visible)} GPU jobs at once here (--resources"
                            f" gpu={len(visible)}), or let the other run finish")
        if not waiting:
            waiting = True
            progress(f"all {len(visible)} visible GPUs are claimed by other jobs of this user"
                     f" (pids {_holders(paths)}): waiting up to {wait_s:g} s for one")
        time.sleep(max(0.0, min(POLL_S, deadline - time.monotonic())))


def _lock(path: Path) -> TextIO | None:
    """``path`` opened and exclusively ``flock``-ed, with this process's pid written into it
    (for the holders' list), or None when another open file holds it."""
    import fcntl

    file = open(path, "a+")   # noqa: SIM115 (the Claim holds it open: that is the lock)
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.close()
        return None
    except BaseException:
        file.close()
        raise
    file.truncate(0)
    file.write(f"{os.getpid()}\n")
    file.flush()
    return file


def _holders(paths: Sequence[Path]) -> str:
    """The pids written in the lock files (``?`` where unreadable), comma-separated."""
    pids = []
    for path in paths:
        try:
            pids.append(path.read_text().strip() or "?")
        except OSError:
            pids.append("?")
    return ", ".join(pids)
