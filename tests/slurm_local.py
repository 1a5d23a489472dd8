"""A real one-node Slurm cluster in a directory, for tests and for trying the batch scripts.

    python tests/slurm_local.py start /tmp/slurm     # prints the `export SLURM_CONF=...` to use
    SLURM_CONF=/tmp/slurm/slurm.conf sbatch launch/slurm/pretrain_gpt.sbatch configs/gpt_tiny.yaml
    python tests/slurm_local.py stop /tmp/slurm

No systemd and nothing outside the directory: a private munge key and socket, slurm.conf, state,
spool, logs and pid files all live in it; the daemons (munged, slurmctld, slurmd) run in the
foreground as children of this process (or detached, from the command line) and are stopped by
their PIDs. Needs root and Debian's slurm-wlm + munge (tools/install_slurm.sh installs them).
Ports are picked free, so two clusters (two test sessions) can coexist on one host.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "sinfo", "scontrol", "scancel")


class SlurmUnavailable(RuntimeError):
    """Slurm cannot run here (not installed, not root, or the daemons did not come up)."""


def missing_programs() -> list[str]:
    return [p for p in DAEMONS + CLIENTS if shutil.which(p) is None]


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _node_line() -> str:
    """`slurmd -C`'s NodeName line (CPUs, sockets, memory as slurmd itself will report them)."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=60)
    for line in out.stdout.splitlines():
        if line.startswith("NodeName="):
            return line.strip()
    raise SlurmUnavailable(f"`slurmd -C` printed no NodeName line: {out.stdout!r} {out.stderr!r}")


class LocalSlurm:
    """Start with :meth:`start`, stop with :meth:`stop`; :attr:`env` is the environment for clients."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.pids: dict[str, int] = {}
        self._procs: dict[str, subprocess.Popen] = {}
        self.node = ""

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, SLURM_CONF=str(self.conf))

    # -- set-up ------------------------------------------------------------------------------
    def _write_files(self) -> None:
        for d in ("munge", "state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        # munged insists on a private socket directory and key.
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        node = _node_line()
        self.node = node.split()[0].split("=", 1)[1]
        ctld_port, slurmd_port = _free_ports(2)
        r = self.root
        self.conf.write_text(
            "\n".join(
                [
                    "# Written by tests/slurm_local.py: a one-node cluster living in this directory.",
                    "ClusterName=memoptlocal",
                    f"SlurmctldHost={self.node}(127.0.0.1)",
                    f"SlurmctldPort={ctld_port}",
                    f"SlurmdPort={slurmd_port}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={self.munge_socket}",
                    f"StateSaveLocation={r / 'state'}",
                    f"SlurmdSpoolDir={r / 'spool'}",
                    f"SlurmctldPidFile={r / 'slurmctld.pid'}",
                    f"SlurmdPidFile={r / 'slurmd.pid'}",
                    f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
                    "SlurmctldDebug=info",
                    "SlurmdDebug=info",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "JobCompType=jobcomp/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_CPU",
                    "MpiDefault=none",
                    "MailProg=/bin/true",
                    "ReturnToService=2",
                    "SchedulerType=sched/builtin",
                    "InactiveLimit=0",
                    "KillWait=5",
                    "MinJobAge=300",
                    f"{node} NodeAddr=127.0.0.1 State=UNKNOWN",
                    f"PartitionName=local Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )

    def _spawn(self, name: str, cmd: list[str], detach: bool) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env,
            start_new_session=detach,
        )
        log.close()
        self._procs[name] = proc
        self.pids[name] = proc.pid
        (self.root / f"{name}.daemon.pid").write_text(f"{proc.pid}\n")

    def _fail(self, what: str) -> None:
        logs = []
        for f in sorted((self.root / "log").glob("*")):
            text = f.read_text(errors="replace").strip().splitlines()[-15:]
            if text:
                logs.append(f"--- {f.name}\n" + "\n".join(text))
        self.stop()
        raise SlurmUnavailable(f"{what}\n" + "\n".join(logs))

    def start(self, timeout: float = 90.0, detach: bool = False) -> "LocalSlurm":
        if missing_programs():
            raise SlurmUnavailable(f"not installed: {', '.join(missing_programs())} (run tools/install_slurm.sh as root)")
        if os.geteuid() != 0:
            raise SlurmUnavailable("the local Slurm runs its daemons as root (SlurmUser=root); not root here")
        self._write_files()
        m = self.root / "munge"
        self._spawn("munged", ["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={m / 'munge.key'}", f"--pid-file={m / 'munged.pid'}",
                               f"--seed-file={m / 'munged.seed'}", f"--log-file={self.root / 'log' / 'munged.log'}"], detach)
        deadline = time.monotonic() + timeout
        while not self.munge_socket.exists():
            if self._procs["munged"].poll() is not None or time.monotonic() > deadline:
                self._fail("munged did not start")
            time.sleep(0.1)
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)], detach)
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.node], detach)
        while True:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    self._fail(f"{name} exited with status {proc.returncode}")
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, env=self.env, timeout=30)
            if out.returncode == 0 and out.stdout.strip().rstrip("*") == "idle":
                return self
            if time.monotonic() > deadline:
                self._fail(f"the node is not idle after {timeout:.0f}s (sinfo: {out.stdout.strip()!r} {out.stderr.strip()!r})")
            time.sleep(0.5)

    # -- jobs ----------------------------------------------------------------------------------
    def sbatch(self, args: list[str], env: dict | None = None, cwd=None) -> str:
        """Submit; returns the job id."""
        out = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True,
                             env={**self.env, **(env or {}), "SLURM_CONF": str(self.conf)}, cwd=cwd, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed ({out.returncode}): {out.stderr.strip()}")
        return out.stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> dict[str, str]:
        out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, env=self.env, timeout=30)
        info = {}
        for field in out.stdout.split():
            k, _, v = field.partition("=")
            info[k] = v
        return info

    def wait(self, job_id: str, timeout: float) -> dict[str, str]:
        """Wait until the job leaves PENDING/RUNNING/COMPLETING; returns `scontrol show job`'s fields."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job_info(job_id)
            if info.get("JobState") not in (None, "PENDING", "RUNNING", "COMPLETING", "CONFIGURING"):
                return info
            if time.monotonic() > deadline:
                subprocess.run(["scancel", job_id], env=self.env, timeout=30)
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f}s")
            time.sleep(1.0)

    # -- tear-down -----------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel what is left, then stop slurmd, slurmctld and munged by PID (TERM, then KILL)."""
        pids = dict(self.pids)
        if not pids:  # stopping a cluster started by another process (the command line)
            for name in DAEMONS:
                f = self.root / f"{name}.daemon.pid"
                if f.exists():
                    pids[name] = int(f.read_text())
        if self.conf.exists() and "slurmctld" in pids:
            subprocess.run(["scancel", "--user", str(os.geteuid())], env=self.env, capture_output=True, timeout=30)
        for name in ("slurmd", "slurmctld", "munged"):
            pid = pids.get(name)
            if pid is None:
                continue
            proc = self._procs.get(name)
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                if proc is not None:
                    if proc.poll() is not None:
                        break
                elif not _alive(pid):
                    break
                time.sleep(0.1)
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                if proc is not None:
                    proc.wait(timeout=10)
            (self.root / f"{name}.daemon.pid").unlink(missing_ok=True)
        self.pids.clear()
        self._procs.clear()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (our child, not yet reaped) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print(__doc__.strip().splitlines()[0] + "\nusage: python tests/slurm_local.py start|stop DIR", file=sys.stderr)
        return 2
    cluster = LocalSlurm(argv[1])
    if argv[0] == "stop":
        cluster.stop()
        return 0
    try:
        cluster.start(detach=True)
    except SlurmUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"export SLURM_CONF={cluster.conf}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
