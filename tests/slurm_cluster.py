"""A throw-away single-node SLURM cluster on localhost, for the SLURM tests.

Debian's `slurm-wlm` and `munge` packages (Slurm 22.05) run without systemd when the daemons
are started by hand as root: munged, then slurmctld and slurmd with a slurm.conf written into
a fresh folder (see ../shared/notes/slurm-local.md). Each cluster has a munged of its own on a
private socket, so test sessions running at the same time do not share (and stop) one.
Everything this module starts is stopped by PID at the end.

Clients (sbatch, squeue, scontrol, ...) find the cluster through SLURM_CONF: use
`cluster.env` for every subprocess.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "sinfo", "scontrol", "scancel")


def unavailable_reason() -> str | None:
    """Why no local cluster can be started here, or None when it can."""
    missing = [name for name in (*DAEMONS, *CLIENTS, "munge")
               if not shutil.which(name) and not Path("/usr/sbin", name).exists()]
    if missing:
        return (f"SLURM is not installed (missing {', '.join(missing)}); install it with "
                "`apt-get install slurm-wlm munge` (.ci/run does)")
    if os.geteuid() != 0:
        return "starting a local SLURM cluster (slurmctld, slurmd, munged) needs root"
    return None


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie of ours counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


class LocalCluster:
    """munged + slurmctld + slurmd on this host, one partition `debug`."""

    def __init__(self, root: Path | None = None):
        # Not under pytest's 0700 tmp folders: slurmctld runs as the `slurm` user and must
        # read slurm.conf and write its state and log here.
        self.root = Path(root or tempfile.mkdtemp(prefix="ptft-slurm-"))
        self.root.chmod(0o755)
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.host = socket.gethostname().split(".")[0]
        self.munge_socket = self.root / "munge" / "munge.socket"
        self._pids: list[tuple[str, int]] = []  # what we started, in start order

    # ---- start ---------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> "LocalCluster":
        try:
            self._start_munge()
            self._write_conf()
            for daemon in ("slurmctld", "slurmd"):
                subprocess.run([_binary(daemon), "-f", str(self.conf)], env=self.env,
                               check=True, capture_output=True, text=True, timeout=30)
                pid_file = self.root / f"{daemon}.pid"
                pid = _wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(),
                                15, f"{daemon}'s pid file")
                self._pids.append((daemon, int(pid)))
            _wait_for(lambda: self.sinfo_state() == "idle", timeout,
                      f"the node to be idle (logs in {self.root / 'log'})", interval=0.5)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self) -> None:
        """A munged of this cluster's own, on a private socket: another test session's cluster
        (or a system munged) can come and go without taking this one's authentication along."""
        folder = self.root / "munge"
        folder.mkdir(mode=0o755, exist_ok=True)
        folder.chmod(0o755)  # munged insists: owned by munge, not writable by others
        shutil.chown(folder, "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", _binary("munged"), "--num-threads=4",
                        f"--socket={self.munge_socket}", f"--pid-file={folder / 'munged.pid'}",
                        f"--log-file={folder / 'munged.log'}",
                        f"--seed-file={folder / 'munged.seed'}"],
                       check=True, capture_output=True, text=True, timeout=30)
        pid_file = folder / "munged.pid"
        pid = _wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), 15,
                        "munged's pid file")
        self._pids.insert(0, ("munged", int(pid)))
        _wait_for(lambda: subprocess.run(["munge", f"--socket={self.munge_socket}", "-n"],
                                         capture_output=True).returncode == 0,
                  15, "munged to answer")

    def _write_conf(self) -> None:
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(exist_ok=True)
        for sub in ("state", "log"):
            shutil.chown(self.root / sub, "slurm", "slurm")
        node = self._node_line()
        d = self.root
        self.conf.write_text(f"""\
ClusterName=ptfttest
SlurmctldHost={self.host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
# This cluster's own munged; a short credential lifetime: a requeued job starts again after
# ~11 s instead of ~120 s.
AuthInfo=cred_expire=10,socket={self.munge_socket}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
# No cgroups in containers: track processes by parentage.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# Schedule pending (e.g. requeued) jobs within a second or two, not every 30-60 s.
SchedulerParameters=bf_interval=1,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
KillWait=10
MinJobAge=300
{node} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")

    def _node_line(self) -> str:
        """This machine as slurmd sees it (`slurmd -C`), with a little memory held back."""
        out = subprocess.run([_binary("slurmd"), "-C"], capture_output=True, text=True,
                             timeout=30).stdout
        line = next((l for l in out.splitlines() if l.startswith("NodeName=")), None)
        if line is None:
            cpus = os.cpu_count() or 1
            return (f"NodeName={self.host} CPUs={cpus} Boards=1 SocketsPerBoard=1 "
                    f"CoresPerSocket={cpus} ThreadsPerCore=1 RealMemory=1000")
        words = []
        for word in line.split():
            key, _, value = word.partition("=")
            if key == "NodeName":
                value = self.host
            if key == "RealMemory":
                value = str(max(100, int(int(value) * 0.9)))
            words.append(f"{key}={value}")
        return " ".join(words)

    # ---- use -----------------------------------------------------------------------------
    def run(self, *command: str, check: bool = True, timeout: float = 30,
            **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(list(command), env={**self.env, **kwargs.pop("env", {})},
                              capture_output=True, text=True, timeout=timeout, check=check,
                              **kwargs)

    def sinfo_state(self) -> str:
        result = self.run("sinfo", "-h", "-o", "%T", check=False)
        return result.stdout.strip().rstrip("*") if result.returncode == 0 else ""

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...); {} once gone."""
        result = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
        fields = {}
        for word in result.stdout.split():
            key, sep, value = word.partition("=")
            if sep:
                fields[key] = value
        return fields

    def wait_for_job(self, job_id: str, states=("COMPLETED",), timeout: float = 120) -> dict:
        """Poll until the job is in one of `states` (a terminal state otherwise raises)."""
        terminal = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                    "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
        deadline = time.monotonic() + timeout
        info: dict = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            state = info.get("JobState")
            if state in states:
                return info
            if state in terminal:
                raise AssertionError(f"job {job_id} ended {state}, not {states}: {info}\n"
                                     + self.logs())
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not {states} after {timeout:.0f} s: {info}\n"
                           + self.logs())

    def logs(self) -> str:
        """The daemons' log tails, for assertion messages."""
        parts = []
        for name in ("slurmctld", "slurmd"):
            path = self.root / "log" / f"{name}.log"
            if path.exists():
                parts.append(f"--- {path}\n" + "\n".join(path.read_text().splitlines()[-30:]))
        return "\n".join(parts)

    # ---- stop ----------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel every job, then stop the daemons we started, by PID: slurmd, slurmctld, munged."""
        if any(name == "slurmctld" for name, _ in self._pids):
            self.run("scancel", "--full", "--user", "root", check=False)
            time.sleep(0.5)
        for name, pid in sorted(self._pids, key=lambda item: DAEMONS.index(item[0]),
                                reverse=True):
            if not _alive(pid):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
                _wait_for(lambda: not _alive(pid), 20, f"{name} ({pid}) to stop")
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                _wait_for(lambda: not _alive(pid), 5, f"{name} ({pid}) to die")
            except ProcessLookupError:
                pass
        self._pids.clear()

    def remove(self) -> None:
        """Delete the cluster's folder (config, state, logs); after stop()."""
        shutil.rmtree(self.root, ignore_errors=True)
