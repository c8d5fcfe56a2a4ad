"""A throw-away, single-node SLURM cluster (with accounting) for integration tests.

Usage::

    from tests.slurm.local_slurm import LocalSlurm, SlurmUnavailable

    with LocalSlurm(tmp_path / "cluster") as cluster:
        subprocess.run(["sbatch", "--wrap", "true"], env=cluster.subprocess_env())
        rows = cluster.job_records()

What it does (see ``/work/shared/LOCAL-SLURM.md`` for the measured facts it builds on):

* checks the machine can run it (Linux, root, Debian packages installed or ``apt-get``
  available) and raises :class:`SlurmUnavailable` otherwise; tests turn that into a skip;
* installs ``slurm-wlm munge slurmdbd mariadb-server`` with ``apt-get`` if they are missing;
* starts ``munged``, ``mariadbd``, ``slurmdbd``, ``slurmctld`` and ``slurmd`` in the foreground
  as child processes, each with its configuration, state, socket, pid and log files under
  ``workdir`` and on free TCP ports of 127.0.0.1, so it touches nothing in ``/etc`` or ``/run``
  and can coexist with a system SLURM or a second instance;
* gives clients ``SLURM_CONF`` and, first on ``PATH``, wrappers of the SLURM commands that set
  ``SLURM_CONF`` themselves (needed inside jobs, see :attr:`LocalSlurm.env`);
* configures one node with ``Gres=gpu:1`` (``File=/dev/null``), ``MinJobAge=300`` and one
  default partition, with accounting through slurmdbd so ``sacct`` works (the
  snakemake SLURM executor plugin's default status query);
* on exit cancels the jobs still in its queue and stops only the daemons it started, by the pid
  of their ``Popen`` handles, never by name.

A daemon that dies or does not become ready raises :class:`SlurmStartupError` (not
:class:`SlurmUnavailable`), so a broken setup fails a test instead of silently skipping it.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

__all__ = ["LocalSlurm", "SlurmStartupError", "SlurmUnavailable"]

#: Debian packages needed, and a binary from each that proves it is installed.
PACKAGES: dict[str, tuple[str, ...]] = {
    "slurm-wlm": ("slurmctld", "slurmd", "sbatch", "sacct", "sinfo", "scontrol"),
    "munge": ("munged", "munge", "mungekey"),
    "slurmdbd": ("slurmdbd",),
    "mariadb-server": ("mariadbd", "mariadb-install-db", "mariadb"),
}

#: SLURM client commands that get a wrapper in ``bin_dir`` (see :attr:`LocalSlurm.env`).
_CLIENT_COMMANDS = (
    "srun",
    "sbatch",
    "salloc",
    "squeue",
    "scancel",
    "scontrol",
    "sinfo",
    "sacct",
    "sacctmgr",
    "sstat",
    "sattach",
    "sprio",
    "sshare",
    "sreport",
)
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")
_APT_TIMEOUT_S = 600.0
_apt_updated = False  # run ``apt-get update`` at most once per process


class SlurmUnavailable(RuntimeError):
    """This machine cannot run a local SLURM (not root, no apt-get, install failed, ...)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SlurmStartupError(RuntimeError):
    """A daemon of the local SLURM failed to start or to become ready."""


def _which(name: str) -> str | None:
    """Like :func:`shutil.which`, but also looks in the sbin directories."""
    path = os.environ.get("PATH", os.defpath)
    extra = [d for d in _SBIN_DIRS if d not in path.split(os.pathsep)]
    return shutil.which(name, path=os.pathsep.join([path, *extra]))


def _missing_packages() -> list[str]:
    """Debian packages from :data:`PACKAGES` whose binaries are not all on the system."""
    return [pkg for pkg, bins in PACKAGES.items() if not all(_which(b) for b in bins)]


def _apt_get(args: Sequence[str]) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "-q", "-o", "DPkg::Lock::Timeout=300", *args]
    try:
        res = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=_APT_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise SlurmUnavailable(f"`{' '.join(cmd)}` timed out after {_APT_TIMEOUT_S:.0f}s") from exc
    if res.returncode != 0:
        tail = "\n".join((res.stdout + res.stderr).splitlines()[-15:])
        raise SlurmUnavailable(f"`{' '.join(cmd)}` failed (rc={res.returncode}):\n{tail}")


def ensure_packages(install: bool = True) -> float:
    """Make sure the Debian packages are installed; return the seconds spent installing.

    Quick (a few ``which`` calls) when everything is present. Raises
    :class:`SlurmUnavailable` if something is missing and cannot be installed.
    """
    global _apt_updated
    missing = _missing_packages()
    if not missing:
        return 0.0
    if not install:
        raise SlurmUnavailable(f"packages not installed: {' '.join(missing)}")
    if _which("apt-get") is None or _which("dpkg") is None:
        raise SlurmUnavailable(f"packages {' '.join(missing)} missing and no apt-get/dpkg here")
    t0 = time.monotonic()
    if not _apt_updated:
        _apt_get(["update"])
        _apt_updated = True
    _apt_get(["install", "-y", "--no-install-recommends", *PACKAGES])
    still = _missing_packages()
    if still:
        raise SlurmUnavailable(f"apt-get install did not provide: {' '.join(still)}")
    return time.monotonic() - t0


def check_prerequisites() -> None:
    """Raise :class:`SlurmUnavailable` if this machine obviously cannot host the cluster."""
    if not sys.platform.startswith("linux"):
        raise SlurmUnavailable(f"needs Linux, this is {sys.platform}")
    if os.geteuid() != 0:
        raise SlurmUnavailable("needs root (daemons run as root, packages may need installing)")
    if _missing_packages() and _which("apt-get") is None:
        raise SlurmUnavailable("SLURM packages are missing and apt-get is not available")


def _free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that are free on 127.0.0.1 right now."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> None:
    """In a freshly forked daemon: get SIGTERM when the process that started it dies.

    A safety net for a test process killed without running ``__exit__`` (even by SIGKILL);
    the daemons all run in the foreground, so the signal reaches them directly.
    """
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


class LocalSlurm:
    """A single-node SLURM with slurmdbd accounting, living entirely under ``workdir``.

    Use it as a context manager; the daemons run between ``__enter__`` and ``__exit__``.

    Attributes available while running:
        env: environment variables to add for SLURM client commands (``SLURM_CONF``, ``PATH``);
            :meth:`subprocess_env` gives a complete environment.
        partition: name of the (default) partition.
        node_name: the node's name (this host's short name).
        slurmctld_log: path of slurmctld's log file (likewise ``slurmd_log``, ``slurmdbd_log``).
        startup_seconds / install_seconds: measured times of the last start.
    """

    cluster_name = "localslurm"
    _db_name = "slurm_acct_db"
    _db_user = "slurm"
    _db_pass = "slurm-local-test"

    def __init__(
        self,
        workdir: Path | str,
        *,
        partition: str = "debug",
        real_memory_mb: int | None = None,
        install: bool = True,
        timeout: float = 90.0,
    ) -> None:
        """Describe a cluster under ``workdir`` (created if needed); nothing starts yet.

        Args:
            workdir: directory for all config, state, sockets, logs and the database.
            partition: name of the single, default partition.
            real_memory_mb: memory the node advertises; default: half of the host's, at
                most 8000 MB and at least 2000 MB.
            install: install missing Debian packages with apt-get (else raise SlurmUnavailable).
            timeout: seconds each daemon may take to become ready.
        """
        self.workdir = Path(workdir).resolve()
        self.partition = partition
        self.install = install
        self.timeout = timeout
        self._real_memory_mb = real_memory_mb
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._start_epoch = 0.0
        self.startup_seconds = 0.0
        self.install_seconds = 0.0
        self.node_name = socket.gethostname().split(".")[0]
        self.ctld_port = self.slurmd_port = self.dbd_port = self.db_port = 0

        w = self.workdir
        self.etc_dir = w / "etc"
        self.log_dir = w / "log"
        self.run_dir = w / "run"
        self.munge_dir = w / "munge"
        self.db_dir = w / "mysql"
        self.state_dir = w / "state"
        self.spool_dir = w / "spool"
        self.bin_dir = w / "bin"
        self.slurm_conf = self.etc_dir / "slurm.conf"
        self.slurmdbd_conf = self.etc_dir / "slurmdbd.conf"
        self.gres_conf = self.etc_dir / "gres.conf"
        self.munge_socket = self.munge_dir / "munge.socket"
        self.db_socket = self.run_dir / "mysqld.sock"
        self.slurmctld_log = self.log_dir / "slurmctld.log"
        self.slurmd_log = self.log_dir / "slurmd.log"
        self.slurmdbd_log = self.log_dir / "slurmdbd.log"
        self.mariadb_log = self.log_dir / "mariadb.err"
        self.munged_log = self.log_dir / "munged.log"

    # ------------------------------------------------------------------ public API

    @property
    def env(self) -> dict[str, str]:
        """Variables to set for a client of this cluster (``sbatch``, ``sacct``, snakemake).

        ``SLURM_CONF`` points at our slurm.conf; ``PATH`` starts with :attr:`bin_dir`, whose
        wrappers of the SLURM client commands set ``SLURM_CONF`` themselves. The wrappers
        matter inside jobs: snakemake-executor-plugin-slurm-jobstep strips every ``SLURM_*``
        variable (``SLURM_CONF`` included) before its nested ``srun``, which would then look
        for ``/etc/slurm/slurm.conf`` and fail.
        """
        path = os.environ.get("PATH", os.defpath).split(os.pathsep)
        path += [d for d in _SBIN_DIRS if d not in path]
        return {
            "SLURM_CONF": str(self.slurm_conf),
            "PATH": os.pathsep.join([str(self.bin_dir), *path]),
        }

    def subprocess_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """A full environment for a client subprocess: ``base`` (default ``os.environ``)
        without inherited ``SLURM_*`` job variables, plus :attr:`env`."""
        base = os.environ if base is None else base
        env = {k: v for k, v in base.items() if not k.startswith("SLURM_")}
        env.update(self.env)
        return env

    @property
    def pids(self) -> dict[str, int]:
        """Process ids of the daemons this object started and has not stopped yet."""
        return {name: proc.pid for name, proc in self._procs}

    def run(
        self, cmd: Sequence[str], *, timeout: float = 30.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a SLURM client command against this cluster and capture its output."""
        res = subprocess.run(
            list(cmd),
            env=self.subprocess_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and res.returncode != 0:
            raise subprocess.CalledProcessError(res.returncode, res.args, res.stdout, res.stderr)
        return res

    def job_records(self, *, allocations_only: bool = True) -> list[dict[str, str]]:
        """Accounting rows of this cluster's jobs (from ``sacct -P``), oldest first.

        Keys: ``JobID, JobIDRaw, JobName, Partition, State, ExitCode, ReqTRES, AllocTRES,
        Comment``. A GPU job shows ``gres/gpu=1`` in ``ReqTRES`` and ``AllocTRES``.
        With ``allocations_only=False`` the job steps (``batch``, srun steps) are included.
        """
        fields = [
            "JobID",
            "JobIDRaw",
            "JobName%200",
            "Partition",
            "State",
            "ExitCode",
            "ReqTRES",
            "AllocTRES",
            "Comment",
        ]
        start = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self._start_epoch - 3600))
        cmd = ["sacct", "-a", "-P", "--delimiter=|", "--starttime", start, "--endtime", "now"]
        cmd += ["--format", ",".join(fields)]
        if allocations_only:
            cmd.append("-X")
        out = self.run(cmd).stdout
        rows = list(csv.DictReader(out.splitlines(), delimiter="|", quoting=csv.QUOTE_NONE))
        return [{k.split("%")[0]: v for k, v in row.items() if k} for row in rows]

    def start(self) -> LocalSlurm:
        """Install if needed, write the configuration and start all daemons."""
        check_prerequisites()
        self.install_seconds = ensure_packages(self.install)
        t0 = time.monotonic()
        self._start_epoch = time.time()
        try:
            self._prepare()
            self._start_munge()
            self._start_mariadb()
            self._start_slurmdbd()
            self._start_slurmctld_and_slurmd()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """Cancel remaining jobs, then stop the daemons this object started (newest first)."""
        if self._alive("slurmctld"):
            with contextlib.suppress(Exception):
                self.run(["scancel", "--full", "-p", self.partition], timeout=15, check=False)
                self._wait(lambda: not self._queue_nonempty(), 15, "queue to drain", fatal=False)
        for name, proc in reversed(self._procs):
            self._terminate(name, proc)
        self._procs.clear()

    def __enter__(self) -> LocalSlurm:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ setup steps

    def _prepare(self) -> None:
        for d in (self.etc_dir, self.log_dir, self.run_dir, self.state_dir, self.spool_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.munge_dir.mkdir(parents=True, exist_ok=True)
        self.munge_dir.chmod(0o755)  # munged wants its socket directory world-executable
        (self.ctld_port, self.slurmd_port, self.dbd_port, self.db_port) = _free_ports(4)
        self._write_configs()
        self._write_client_wrappers()

    def _node_line(self) -> str:
        """The node definition: hardware from ``slurmd -C``, our memory, one fake GPU."""
        res = self._check_output(["slurmd", "-C"])
        first = res.splitlines()[0].split()
        hw = [
            f
            for f in first
            if f.split("=")[0]
            in {"CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore"}
        ]
        host_mem = next((int(f.split("=")[1]) for f in first if f.startswith("RealMemory=")), 4000)
        mem = self._real_memory_mb or max(2000, min(8000, host_mem // 2))
        return (
            f"NodeName={self.node_name} NodeAddr=127.0.0.1 {' '.join(hw)} "
            f"RealMemory={mem} Gres=gpu:1 State=UNKNOWN"
        )

    def _write_configs(self) -> None:
        auth = f"AuthType=auth/munge\nAuthInfo=socket={self.munge_socket}\n"
        plugstack = self.etc_dir / "plugstack.conf"
        plugstack.write_text("")
        self.slurm_conf.write_text(
            f"""# Generated by tests/slurm/local_slurm.py
ClusterName={self.cluster_name}
SlurmctldHost={self.node_name}(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmdPort={self.slurmd_port}
SlurmUser=root
SlurmdUser=root
{auth}CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobContainerType=job_container/none
PlugStackConfig={plugstack}
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
SchedulerType=sched/backfill
ReturnToService=2
MinJobAge=300
KillWait=5
InactiveLimit=0
SlurmctldTimeout=60
SlurmdTimeout=60
MailProg=/bin/true
GresTypes=gpu
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={self.dbd_port}
AccountingStoragePass={self.munge_socket}
AccountingStorageTRES=gres/gpu
AccountingStoreFlags=job_comment
StateSaveLocation={self.state_dir}
SlurmdSpoolDir={self.spool_dir}/slurmd-%n
SlurmctldPidFile={self.run_dir}/slurmctld.pid
SlurmdPidFile={self.run_dir}/slurmd-%n.pid
SlurmctldLogFile={self.slurmctld_log}
SlurmdLogFile={self.slurmd_log}
SlurmctldDebug=info
SlurmdDebug=info
{self._node_line()}
PartitionName={self.partition} Nodes={self.node_name} Default=YES MaxTime=INFINITE State=UP
"""
        )
        self.gres_conf.write_text(f"NodeName={self.node_name} Name=gpu File=/dev/null\n")
        self.slurmdbd_conf.write_text(
            f"""# Generated by tests/slurm/local_slurm.py
{auth}DbdHost={self.node_name}
DbdAddr=127.0.0.1
DbdPort={self.dbd_port}
SlurmUser=root
DebugLevel=info
LogFile={self.slurmdbd_log}
PidFile={self.run_dir}/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={self.db_port}
StorageUser={self._db_user}
StoragePass={self._db_pass}
StorageLoc={self._db_name}
"""
        )
        self.slurmdbd_conf.chmod(0o600)  # slurmdbd refuses a readable slurmdbd.conf

    def _write_client_wrappers(self) -> None:
        """``bin/<cmd>`` for each SLURM client: exports our ``SLURM_CONF``, runs the real one."""
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        for name in _CLIENT_COMMANDS:
            real = _which(name)
            if real is None:
                continue
            wrapper = self.bin_dir / name
            wrapper.write_text(
                f"#!/bin/sh\nSLURM_CONF={shlex.quote(str(self.slurm_conf))}\n"
                f'export SLURM_CONF\nexec {shlex.quote(real)} "$@"\n'
            )
            wrapper.chmod(0o755)

    def _start_munge(self) -> None:
        key = self.munge_dir / "munge.key"
        if not key.exists():
            self._check_output(["mungekey", "--create", "--keyfile", str(key)])
        key.chmod(0o600)
        self.munge_socket.unlink(missing_ok=True)
        self._spawn(
            "munged",
            [
                "munged",
                "--foreground",
                "--force",  # --force: pytest's tmp dirs are 0700
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={self.run_dir / 'munged.pid'}",
                f"--log-file={self.munged_log}",
                f"--seed-file={self.munge_dir / 'munged.seed'}",
            ],
        )

        def ok() -> bool:
            if not self.munge_socket.exists():
                return False
            enc = subprocess.run(
                ["munge", "-n", "-S", str(self.munge_socket)],
                capture_output=True,
                timeout=10,
                check=False,
            )
            dec = subprocess.run(
                ["unmunge", "-S", str(self.munge_socket)],
                input=enc.stdout,
                capture_output=True,
                timeout=10,
                check=False,
            )
            return enc.returncode == 0 and dec.returncode == 0

        self._wait(ok, self.timeout, "munged", proc_name="munged", log=self.munged_log)

    def _mariadb_opts(self) -> list[str]:
        return [
            "--no-defaults",  # must come first
            f"--datadir={self.db_dir}",
            "--user=root",
            "--skip-name-resolve",
            "--innodb-buffer-pool-size=64M",
            "--innodb-log-file-size=16M",
        ]

    def _start_mariadb(self) -> None:
        if not (self.db_dir / "mysql").is_dir():
            self._check_output(
                [
                    "mariadb-install-db",
                    *self._mariadb_opts(),
                    "--auth-root-authentication-method=socket",
                    "--skip-test-db",
                ],
                timeout=120,
            )
        self.db_socket.unlink(missing_ok=True)
        self._spawn(
            "mariadbd",
            [
                "mariadbd",
                *self._mariadb_opts(),
                f"--socket={self.db_socket}",
                f"--pid-file={self.run_dir / 'mariadbd.pid'}",
                f"--log-error={self.mariadb_log}",
                "--bind-address=127.0.0.1",
                f"--port={self.db_port}",
                "--innodb-lock-wait-timeout=900",
            ],
        )

        def sql(statement: str) -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(
                [
                    "mariadb",
                    "--no-defaults",
                    f"--socket={self.db_socket}",
                    "-uroot",
                    "-e",
                    statement,
                ],
                capture_output=True,
                timeout=30,
                check=False,
            )

        self._wait(
            lambda: sql("SELECT 1").returncode == 0,
            self.timeout,
            "mariadbd",
            proc_name="mariadbd",
            log=self.mariadb_log,
        )
        u, p, db = self._db_user, self._db_pass, self._db_name
        grants = "".join(
            f"CREATE USER IF NOT EXISTS '{u}'@'{h}' IDENTIFIED BY '{p}';"
            f"GRANT ALL ON `{db}`.* TO '{u}'@'{h}';"
            for h in ("localhost", "127.0.0.1")
        )
        res = sql(f"CREATE DATABASE IF NOT EXISTS `{db}`;{grants}FLUSH PRIVILEGES;")
        if res.returncode != 0:
            raise SlurmStartupError(f"creating the slurm database failed: {res.stderr!r}")

    def _start_slurmdbd(self) -> None:
        self._spawn("slurmdbd", ["slurmdbd", "-D"])

        def ok() -> bool:
            return self.run(["sacctmgr", "-n", "list", "cluster"], check=False).returncode == 0

        self._wait(ok, self.timeout, "slurmdbd", proc_name="slurmdbd", log=self.slurmdbd_log)
        clusters = self.run(["sacctmgr", "-n", "-P", "list", "cluster", "format=cluster"]).stdout
        if self.cluster_name not in clusters.split():
            self.run(["sacctmgr", "-i", "add", "cluster", self.cluster_name])

    def _start_slurmctld_and_slurmd(self) -> None:
        # -c: no recovery of saved state, so a node drained by an earlier run starts clean.
        self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.slurm_conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-N", self.node_name, "-f", str(self.slurm_conf)])

        def state() -> str:
            res = self.run(["sinfo", "-h", "-o", "%T", "-p", self.partition], check=False)
            return res.stdout.strip() if res.returncode == 0 else ""

        def ready() -> bool:
            s = state()
            if s.startswith(("drain", "down")) and "*" not in s:
                reason = self.run(["sinfo", "-h", "-o", "%E"], check=False).stdout.strip()
                raise SlurmStartupError(
                    f"node is {s}: {reason}\nslurmd log:\n{_tail(self.slurmd_log)}"
                )
            return s == "idle"

        self._wait(
            ready,
            self.timeout,
            "node to become idle",
            proc_name="slurmctld",
            log=self.slurmctld_log,
            also=("slurmd",),
        )
        res = self.run(["sacctmgr", "-n", "-P", "list", "cluster", "format=cluster"])
        if self.cluster_name not in res.stdout.split():
            raise SlurmStartupError(f"cluster {self.cluster_name} not in accounting: {res.stdout}")

    # ------------------------------------------------------------------ process helpers

    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.log_dir / f"{name}.out", "ab")  # noqa: SIM115 - the child keeps its own fd
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.subprocess_env(),
                cwd=self.workdir,
                preexec_fn=_die_with_parent,
            )
        except OSError as exc:
            raise SlurmStartupError(f"cannot start {name}: {exc}") from exc
        finally:
            out.close()
        self._procs.append((name, proc))

    def _proc(self, name: str) -> subprocess.Popen[bytes] | None:
        return next((p for n, p in self._procs if n == name), None)

    def _alive(self, name: str) -> bool:
        proc = self._proc(name)
        return proc is not None and proc.poll() is None

    def _queue_nonempty(self) -> bool:
        res = self.run(["squeue", "-h", "-o", "%i"], timeout=10, check=False)
        return res.returncode == 0 and bool(res.stdout.strip())

    @staticmethod
    def _terminate(name: str, proc: subprocess.Popen[bytes], grace: float = 20.0) -> None:
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=10)

    def _wait(
        self,
        predicate: Callable[[], bool],
        timeout: float,
        what: str,
        *,
        proc_name: str | None = None,
        log: Path | None = None,
        also: Sequence[str] = (),
        fatal: bool = True,
    ) -> None:
        """Poll ``predicate`` until true; fail early if a watched daemon exits."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        watched = [n for n in (proc_name, *also) if n]
        while True:
            with contextlib.suppress(subprocess.TimeoutExpired):
                if predicate():
                    return
            for name in watched:
                proc = self._proc(name)
                if proc is not None and proc.poll() is not None:
                    raise SlurmStartupError(
                        f"{name} exited with code {proc.returncode} while waiting for {what}.\n"
                        f"{self._logs_for(name, log)}"
                    )
            if time.monotonic() > deadline:
                if not fatal:
                    return
                raise SlurmStartupError(
                    f"timed out after {timeout:.0f}s waiting for {what}.\n"
                    + "\n".join(self._logs_for(n, log) for n in watched)
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def _logs_for(self, name: str, log: Path | None) -> str:
        parts = [f"--- {name}.out:\n{_tail(self.log_dir / f'{name}.out')}"]
        if log is not None:
            parts.append(f"--- {log}:\n{_tail(log)}")
        return "\n".join(parts)

    def _check_output(self, cmd: list[str], timeout: float = 30.0) -> str:
        res = subprocess.run(
            cmd,
            env=self.subprocess_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if res.returncode != 0:
            raise SlurmStartupError(
                f"`{' '.join(cmd)}` failed (rc={res.returncode}):\n{res.stdout}{res.stderr}"
            )
        return res.stdout


def main(argv: Sequence[str] | None = None) -> int:
    """Start a cluster in the given directory and keep it up until Ctrl-C (for debugging)."""
    args = list(sys.argv[1:] if argv is None else argv)
    workdir = Path(args[0] if args else "/tmp/local-slurm")
    with LocalSlurm(workdir) as cluster:
        print(f"up in {cluster.startup_seconds:.1f}s; export SLURM_CONF={cluster.slurm_conf}")
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
