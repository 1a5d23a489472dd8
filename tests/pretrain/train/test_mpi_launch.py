"""MPI launch: `mpirun -n 2 python launch/pretrain_gpt.py ...` and `deepspeed --launcher mpich`.

Under mpirun every rank is started directly; pretrain.train.launch_env turns the MPI variables
(PMI_* for MPICH's hydra, OMPI_COMM_WORLD_* for Open MPI, SLURM_* inside an srun step) into
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT before torch.distributed starts.
The real runs use the `mpich` wheel's mpirun from the venv (no system MPI).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.train import launch_env
from pretrain.train.launch_env import LaunchEnvError, detect, expand_hostlist, setup_launch_env

ROOT = Path(__file__).resolve().parents[3]
TOKENIZER = str(ROOT / "data/tokenizer/spm_bpe_8k.model")
CACHE = str(ROOT / "data/cache")
CONFIG = str(ROOT / "configs/gpt_tiny.yaml")
BIN = Path(sys.executable).parent
_LEAKY = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES")


def _mpirun() -> str:
    for name in ("mpirun", "mpiexec"):
        if (BIN / name).exists():
            return str(BIN / name)
    pytest.skip(f"no mpirun/mpiexec next to {sys.executable}: install the `mpich` wheel (pip install mpich)")


def _clean_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LEAKY and not k.startswith(("SLURM_", "PMI_", "OMPI_", "PMIX_"))}
    env.update(OMP_NUM_THREADS="1", PATH=f"{BIN}:{env.get('PATH', '')}")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _overrides(out_dir, *more) -> list[str]:
    return [f"output_dir={out_dir}", f"data.tokenizer={TOKENIZER}", f"data.cache_dir={CACHE}",
            "optimizer.name=adafactor", "train.steps=3", "train.progress_bar=false", "train.eval_every=0",
            "checkpoint.every=0", *more]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_trained(out_dir, proc: subprocess.CompletedProcess, engine: str) -> None:
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    rows = [json.loads(line) for line in Path(out_dir, "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in rows if "loss" in r]
    assert [r["step"] for r in losses] == [1, 2, 3]
    assert all(r["loss"] == r["loss"] and abs(r["loss"]) < 1e3 for r in losses)
    summaries = [json.loads(line)["summary"] for line in proc.stdout.splitlines() if line.startswith('{"summary"')]
    assert len(summaries) == 1, log[-4000:]  # printed by rank 0 only: each rank knew its rank
    assert summaries[0]["world_size"] == 2 and summaries[0]["engine"] == engine


# ------------------------------------------------------------------------------------------------
# The variables -> torch's variables (no processes)
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def no_mpi4py(monkeypatch):
    """Unit tests must not MPI_Init the pytest process: the broadcast step is stubbed."""
    calls = []

    def fake(info):
        calls.append(info)
        return None

    monkeypatch.setattr(launch_env, "_mpi_rendezvous", fake)
    return calls


def test_mpich_variables(no_mpi4py):
    env = {"PMI_RANK": "1", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "4"}
    got = setup_launch_env(env)
    assert got["launcher"] == "mpich"
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500"}  # all 4 ranks on this host, mpi4py unavailable: loopback, default port
    assert len(no_mpi4py) == 1


def test_openmpi_variables_and_an_exported_master(no_mpi4py):
    env = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "8", "MASTER_ADDR": "node01", "MASTER_PORT": "6000"}
    setup_launch_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"], env["MASTER_PORT"]) == (
        "5", "16", "1", "node01", "6000")
    assert no_mpi4py == []  # the exported address wins without any MPI call


def test_mpi_across_hosts_uses_rank0s_broadcast_address(monkeypatch):
    monkeypatch.setattr(launch_env, "_mpi_rendezvous", lambda info: ("host-a", 4567))
    env = {"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}
    setup_launch_env(env)
    assert (env["MASTER_ADDR"], env["MASTER_PORT"], env["RANK"]) == ("host-a", "4567", "3")


def test_mpi_across_hosts_without_an_address_is_a_clear_error(no_mpi4py):
    env = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    with pytest.raises(LaunchEnvError, match="export MASTER_ADDR"):
        setup_launch_env(env)


def test_cray_pals_local_rank_variables(no_mpi4py):
    env = {"PMI_RANK": "9", "PMI_SIZE": "16", "PALS_LOCAL_RANKID": "1", "PALS_LOCAL_SIZE": "8",
           "MASTER_ADDR": "x1000c0s0b0n0", "MASTER_PORT": "29500"}
    setup_launch_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("9", "16", "1", "8")


def test_the_cli_reports_a_launch_error_in_one_line(no_mpi4py, monkeypatch, capsys):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "2")
    with pytest.raises(SystemExit) as exit_info:
        launch_env.configure_from_cli()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: openmpi started 4 processes across hosts")
    assert "RANK" not in os.environ


def test_srun_step_variables_and_port_from_the_job_id(no_mpi4py):
    env = {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_ID": "0", "SLURM_LOCALID": "1",
           "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_STEP_NODELIST": "gpu[07-08]",
           "SLURM_JOB_ID": "123456", "PATH": "/nonexistent"}  # no scontrol: the built-in expander
    setup_launch_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("3", "4", "1", "2")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("gpu07", str(20000 + 123456 % 20000))
    assert no_mpi4py == []


def test_batch_step_and_single_process_launches_are_left_alone(no_mpi4py):
    # The batch script's own environment (no srun step): one process, not a world.
    batch = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "n[1-8]"}
    assert setup_launch_env(batch) is None and "RANK" not in batch
    single = {"PMI_RANK": "0", "PMI_SIZE": "1"}
    assert setup_launch_env(single) is None and "WORLD_SIZE" not in single
    assert setup_launch_env({}) is None


def test_a_torch_launchers_variables_win(no_mpi4py):
    # deepspeed --launcher mpich: its helper sets RANK/LOCAL_RANK, mpirun -genv the rest.
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29501",
           "PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1"}
    before = dict(env)
    assert setup_launch_env(env) is None and env == before


def test_inconsistent_variables_are_errors(no_mpi4py):
    with pytest.raises(LaunchEnvError, match="rank 4 is outside a world of 4"):
        setup_launch_env({"PMI_RANK": "4", "PMI_SIZE": "4"})
    with pytest.raises(LaunchEnvError, match="is not an integer"):
        detect({"OMPI_COMM_WORLD_RANK": "x", "OMPI_COMM_WORLD_SIZE": "2"})


def test_hostlist_expansion():
    assert expand_hostlist("node[01-03,7],gpu-a[1-2]x,login") == [
        "node01", "node02", "node03", "node7", "gpu-a1x", "gpu-a2x", "login"]
    assert expand_hostlist("a[1-2]b[3-4]") == ["a1b3", "a1b4", "a2b3", "a2b4"]
    assert expand_hostlist("n[8-10]") == ["n8", "n9", "n10"]


# ------------------------------------------------------------------------------------------------
# Real MPI launches
# ------------------------------------------------------------------------------------------------
def test_mpirun_two_ranks_train_with_ranks_from_the_mpi_environment(tmp_path):
    """`mpirun -n 2 python launch/pretrain_gpt.py`: no torch launcher, no MASTER_* exported; the
    ranks come from PMI_*, the rendezvous from rank 0 over MPI (mpi4py)."""
    mpirun = _mpirun()
    proc = subprocess.run(
        [mpirun, "-n", "2", sys.executable, str(ROOT / "launch/pretrain_gpt.py"), "--config", CONFIG,
         *_overrides(tmp_path, "engine.kind=ddp")],
        env=_clean_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    _assert_trained(tmp_path, proc, "ddp")


def _deepspeed_mpich(tmp_path, engine: str) -> subprocess.CompletedProcess:
    _mpirun()
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    # One host, so --force_multi to take the MPI runner path; no ssh anywhere.
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--launcher", "mpich", "--hostfile", str(hostfile),
           "--force_multi", "--no_ssh_check", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(ROOT / "launch/pretrain_gpt.py"), "--config", CONFIG, *_overrides(tmp_path / "run", f"engine.kind={engine}")]
    return subprocess.run(cmd, env=_clean_env(), cwd=tmp_path, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_deepspeed_launcher_mpich_starts_two_ranks(tmp_path):
    """The launcher path alone (DDP engine): mpirun + deepspeed's launcher_helper give each rank
    RANK/LOCAL_RANK, and -genv gives WORLD_SIZE/MASTER_*."""
    proc = _deepspeed_mpich(tmp_path, "ddp")
    assert "mpirun -n 2 -ppn 2" in proc.stdout + proc.stderr
    _assert_trained(tmp_path / "run", proc, "ddp")


@pytest.mark.slow
def test_deepspeed_launcher_mpich_with_the_deepspeed_engine(tmp_path):
    proc = _deepspeed_mpich(tmp_path, "deepspeed")
    assert "mpirun -n 2 -ppn 2" in proc.stdout + proc.stderr
    _assert_trained(tmp_path / "run", proc, "deepspeed")
