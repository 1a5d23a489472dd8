"""Find this process's place in the job when no torch launcher told it.

``torchrun`` and ``deepspeed`` export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT,
which is what ``torch.distributed``'s ``env://`` init reads. Other launchers start every process
directly and describe the job in their own variables:

=====================  =========================  =============================  ==========================
launcher               rank                       world size                     local rank
=====================  =========================  =============================  ==========================
Open MPI ``mpirun``    OMPI_COMM_WORLD_RANK       OMPI_COMM_WORLD_SIZE           OMPI_COMM_WORLD_LOCAL_RANK
MPICH / Intel MPI      PMI_RANK                   PMI_SIZE                       MPI_LOCALRANKID
(hydra), Cray PALS                                                               (PMI_LOCAL_RANK,
                                                                                 PALS_LOCAL_RANKID)
``srun`` (one task     SLURM_PROCID               SLURM_STEP_NUM_TASKS           SLURM_LOCALID
per process)
=====================  =========================  =============================  ==========================

:func:`setup_launch_env` translates them into the torch variables, once, before the process group
is created, and never overrides what a torch launcher (or the user) already set.

The rendezvous address is the one thing these variables do not give: an MPI process knows only
its own host. In order:

1. MASTER_ADDR / MASTER_PORT from the environment (``mpirun -genv MASTER_ADDR ...``, or exported
   by a batch script), when both are set;
2. under MPI, rank 0's host name and a free port on it, broadcast with mpi4py (one ``bcast``;
   the ``mpich`` wheel provides the library), when mpi4py is importable and its world matches;
3. under ``srun``, the first host of SLURM_STEP_NODELIST (``scontrol show hostnames``, or a
   built-in hostlist expander), port 20000 + job id mod 20000 (+ step id) unless MASTER_PORT;
4. all ranks on this host (local size == world size): 127.0.0.1, MASTER_PORT or 29500.

Otherwise it stops with an error saying which variable to set.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from typing import Mapping, MutableMapping

from pretrain.errors import UserError

_TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_PORT = 29500


class LaunchEnvError(UserError, RuntimeError):
    """The launcher's variables are inconsistent or the rendezvous address cannot be found."""


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise LaunchEnvError(f"{name}={env[name]!r} is not an integer") from None


def _first_int(env: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        if name in env:
            return _int(env, name)
    return None


def detect(env: Mapping[str, str]) -> dict | None:
    """The launcher's view of this process: {launcher, rank, world_size, local_rank, local_world_size},
    or None when no known launcher variables say the job has more than one process."""
    if "OMPI_COMM_WORLD_RANK" in env and "OMPI_COMM_WORLD_SIZE" in env:
        launcher, rank, world = "openmpi", _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
        local = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK") if "OMPI_COMM_WORLD_LOCAL_RANK" in env else None
        local_size = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE") if "OMPI_COMM_WORLD_LOCAL_SIZE" in env else None
    elif "PMI_RANK" in env and "PMI_SIZE" in env:
        launcher, rank, world = "mpich", _int(env, "PMI_RANK"), _int(env, "PMI_SIZE")
        local = _first_int(env, "MPI_LOCALRANKID", "PMI_LOCAL_RANK", "PALS_LOCAL_RANKID")
        local_size = _first_int(env, "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE", "PALS_LOCAL_SIZE")
    elif "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env and "SLURM_STEP_ID" in env:
        # Only inside an srun step: the batch script itself also carries SLURM_PROCID=0 and
        # SLURM_NTASKS, and a plain `python` there is one process, not a world.
        launcher, rank, world = "slurm", _int(env, "SLURM_PROCID"), _int(env, "SLURM_STEP_NUM_TASKS")
        local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else None
        local_size = _slurm_tasks_on_this_node(env)
    else:
        return None
    if world <= 1:
        return None
    if not 0 <= rank < world:
        raise LaunchEnvError(f"{launcher}: rank {rank} is outside a world of {world} processes")
    return {"launcher": launcher, "rank": rank, "world_size": world, "local_rank": local, "local_world_size": local_size}


def _slurm_tasks_on_this_node(env: Mapping[str, str]) -> int | None:
    # SLURM_STEP_TASKS_PER_NODE looks like "2(x3),1": tasks on each node of the step, in node order.
    spec, node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE"), env.get("SLURM_NODEID")
    if not spec or node is None:
        return None
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    i = int(node)
    return counts[i] if i < len(counts) else None


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a Slurm hostlist ("node[01-03,7],gpu-a[1-2]x,login") like `scontrol show hostnames`."""
    hosts: list[str] = []
    for item in re.findall(r"[^,\[]*(?:\[[^\]]*\][^,\[]*)*", hostlist):
        if not item:
            continue
        parts = [item]
        while any("[" in p for p in parts):
            nxt = []
            for p in parts:
                m = re.match(r"([^\[]*)\[([^\]]*)\](.*)", p)
                if not m:
                    nxt.append(p)
                    continue
                head, ranges, tail = m.groups()
                for r in ranges.split(","):
                    lo, _, hi = r.partition("-")
                    if hi:
                        nxt += [f"{head}{i:0{len(lo)}d}{tail}" for i in range(int(lo), int(hi) + 1)]
                    else:
                        nxt.append(f"{head}{lo}{tail}")
            parts = nxt
        hosts += parts
    return hosts


def _first_slurm_host(nodelist: str, env: Mapping[str, str]) -> str:
    scontrol = shutil.which("scontrol", path=env.get("PATH"))
    if scontrol:
        try:
            out = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30, env=dict(env))
            if out.returncode == 0 and out.stdout.split():
                return out.stdout.split()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return expand_hostlist(nodelist)[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _mpi_rendezvous(info: dict) -> tuple[str, int] | None:
    """Rank 0's host name and a free port there, broadcast over MPI; None if mpi4py cannot help."""
    try:
        from mpi4py import MPI
    except Exception:  # not installed, or no MPI library behind it
        return None
    comm = MPI.COMM_WORLD
    # mpi4py built for another MPI than the launcher's starts as a 1-process "singleton".
    if comm.Get_size() != info["world_size"] or comm.Get_rank() != info["rank"]:
        return None
    addr, port = comm.bcast((socket.gethostname(), _free_port()) if comm.Get_rank() == 0 else None, root=0)
    return addr, int(port)


def _rendezvous(info: dict, env: Mapping[str, str]) -> tuple[str, int]:
    if env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
        return env["MASTER_ADDR"], _int(env, "MASTER_PORT")
    if info["launcher"] == "slurm":
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if nodelist:
            addr = env.get("MASTER_ADDR") or _first_slurm_host(nodelist, env)
            if env.get("MASTER_PORT"):
                port = _int(env, "MASTER_PORT")
            else:  # the same on every task of the step, different for concurrent steps of a job
                job, step = int(env.get("SLURM_JOB_ID", "0") or 0), int(env.get("SLURM_STEP_ID", "0") or 0)
                port = 20000 + (job + 97 * step) % 20000
            return addr, port
    else:
        found = _mpi_rendezvous(info)
        if found is not None:
            addr, port = found
            return env.get("MASTER_ADDR") or addr, _int(env, "MASTER_PORT") if env.get("MASTER_PORT") else port
    if info["local_world_size"] is not None and info["local_world_size"] == info["world_size"]:
        return env.get("MASTER_ADDR") or "127.0.0.1", _int(env, "MASTER_PORT") if env.get("MASTER_PORT") else DEFAULT_PORT
    raise LaunchEnvError(
        f"{info['launcher']} started {info['world_size']} processes across hosts but the rendezvous address is "
        "unknown: install mpi4py (pip install mpi4py mpich) or export MASTER_ADDR (rank 0's host) and MASTER_PORT "
        "to every rank (e.g. mpirun -genv MASTER_ADDR host0 -genv MASTER_PORT 29500)"
    )


def setup_launch_env(env: MutableMapping[str, str] | None = None) -> dict | None:
    """Export RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT derived
    from MPI or Slurm variables into ``env`` (default ``os.environ``).

    Does nothing (returns None) when RANK and WORLD_SIZE are already set (torchrun, deepspeed, or
    by hand) or when no multi-process launcher is detected. Returns what it set otherwise.
    Call it before ``torch.distributed`` is initialized.
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return None
    info = detect(env)
    if info is None:
        return None
    addr, port = _rendezvous(info, env)
    values = {"RANK": str(info["rank"]), "WORLD_SIZE": str(info["world_size"]), "MASTER_ADDR": addr, "MASTER_PORT": str(port)}
    if info["local_rank"] is not None:  # unknown stays unset rather than guessed
        values["LOCAL_RANK"] = str(info["local_rank"])
    if info["local_world_size"] is not None:
        values["LOCAL_WORLD_SIZE"] = str(info["local_world_size"])
    for k, v in values.items():
        env.setdefault(k, v)
    return {"launcher": info["launcher"], **{k: env[k] for k in _TORCH_VARS if k in env}}


def configure_from_cli() -> None:
    """:func:`setup_launch_env` for the command line: an error is one line on stderr, exit status 2."""
    import sys

    try:
        setup_launch_env()
    except LaunchEnvError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
