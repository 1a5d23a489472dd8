"""Slurm launch: launch/slurm/pretrain_{gpt,bert}.sbatch -> srun_nodes.sh -> launch_node.sh.

* For real: a one-node Slurm (munged, slurmctld, slurmd started by the fixture in a temp dir,
  stopped by PID) runs the batch script with 2 processes on its node. Skips, saying why, where
  Slurm is not installed (tools/install_slurm.sh installs it) or we are not root.
* The multi-node path on localhost: launch_node.sh (the command each node's srun task runs)
  started twice, node ranks 0 and 1, with the variables Slurm would set, forms one 2-rank run.
* The batch side with stand-in `srun` / `scontrol` (what srun is asked to start, and the master
  address), and launch_node.sh's command composition (DRY_RUN=1): fast, no Slurm needed.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/: slurm_local
from slurm_local import LocalSlurm, SlurmUnavailable, missing_programs  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
SLURM_DIR = ROOT / "launch" / "slurm"
NODE_SH = SLURM_DIR / "launch_node.sh"
TOKENIZER = str(ROOT / "data/tokenizer/spm_bpe_8k.model")
CACHE = str(ROOT / "data/cache")
CONFIG = str(ROOT / "configs/gpt_tiny.yaml")

# Launch variables that must not leak from the environment pytest runs in.
_LEAKY = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LAUNCHER",
          "NPROC_PER_NODE", "LAUNCHER_ARGS", "SRUN_ARGS", "DRY_RUN", "CUDA_VISIBLE_DEVICES", "PRETRAIN_ROOT")


def _clean_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LEAKY and not k.startswith(("SLURM_", "PMI_", "OMPI_"))}
    env.update(OMP_NUM_THREADS="1", PYTHON=sys.executable)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _overrides(out_dir, *more) -> list[str]:
    return [f"output_dir={out_dir}", f"data.tokenizer={TOKENIZER}", f"data.cache_dir={CACHE}",
            "engine.kind=ddp", "optimizer.name=adafactor", "train.steps=3", "train.progress_bar=false",
            "train.eval_every=0", "checkpoint.every=0", *more]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(out_dir) -> list[dict]:
    path = Path(out_dir, "metrics.jsonl")
    assert path.is_file(), f"no {path}"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _summary(text: str) -> dict:
    rows = [json.loads(line)["summary"] for line in text.splitlines() if line.startswith('{"summary"')]
    assert len(rows) == 1, f"expected one summary line (rank 0's), got {len(rows)}:\n{text[-3000:]}"
    return rows[0]


def _assert_trained(out_dir, log: str, world_size: int, steps: int = 3) -> None:
    rows = [r for r in _metrics(out_dir) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), log[-3000:]
    assert all(r["loss"] == r["loss"] and abs(r["loss"]) < 1e3 for r in rows)  # finite
    summary = _summary(log)
    assert summary["world_size"] == world_size and summary["engine"] == "ddp" and summary["steps"] == steps


# ------------------------------------------------------------------------------------------------
# A real one-node Slurm
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_slurm():
    missing = missing_programs()
    if missing:
        pytest.skip(f"Slurm is not installed here (missing: {', '.join(missing)}); "
                    "install it with `bash tools/install_slurm.sh` (root, Debian slurm-wlm + munge)")
    if os.geteuid() != 0:
        pytest.skip("the local test Slurm runs its daemons as root (SlurmUser=root); not running as root")
    # Short path: munge's unix socket lives here (sun_path is limited to 108 bytes).
    root = tempfile.mkdtemp(prefix="memopt-slurm-")
    cluster = LocalSlurm(root)
    try:
        cluster.start(timeout=120)
    except SlurmUnavailable as e:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"Slurm is installed but the local cluster did not come up: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def _daemon_logs(cluster: LocalSlurm) -> str:
    out = []
    for f in sorted((cluster.root / "log").glob("*.log")):
        out.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-20:]))
    return "\n".join(out)


def test_sbatch_trains_on_a_real_one_node_slurm(local_slurm, tmp_path):
    """sbatch launch/slurm/pretrain_gpt.sbatch CONFIG key=value...: 2 processes on the node."""
    run, log = tmp_path / "run", tmp_path / "job.out"
    submit_dir = tmp_path / "elsewhere"  # not the repository: the script must find it by itself
    submit_dir.mkdir()
    t0 = time.monotonic()
    job = local_slurm.sbatch(
        [f"--output={log}", "--cpus-per-task=1", "--time=10", str(SLURM_DIR / "pretrain_gpt.sbatch"), CONFIG,
         *_overrides(run)],
        env=_clean_env(NPROC_PER_NODE=2), cwd=submit_dir,
    )
    info = local_slurm.wait(job, timeout=540)
    text = log.read_text(errors="replace") if log.exists() else "(no job output)"
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", (
        f"job {job}: {info.get('JobState')} exit {info.get('ExitCode')} after {time.monotonic() - t0:.0f}s\n"
        f"{text[-4000:]}\n{_daemon_logs(local_slurm)}"
    )
    # One srun task on the node, told it is node 0 of 1, with the master from scontrol.
    assert f"[srun_nodes] job {job}: 1 node(s) [{local_slurm.node}], master {local_slurm.node}:" in text
    assert "[launch_node] node 0/1" in text and "2 process(es), torchrun" in text
    _assert_trained(run, text, world_size=2)


@pytest.mark.slow
def test_sbatch_bert_with_the_deepspeed_launcher_on_a_real_slurm(local_slurm, tmp_path):
    run, log = tmp_path / "run", tmp_path / "job.out"
    job = local_slurm.sbatch(
        [f"--output={log}", "--time=10", str(SLURM_DIR / "pretrain_bert.sbatch"), CONFIG,
         *_overrides(run, "model.kind=bert")],
        env=_clean_env(NPROC_PER_NODE=2, LAUNCHER="deepspeed"), cwd=tmp_path,
    )
    info = local_slurm.wait(job, timeout=900)
    text = log.read_text(errors="replace") if log.exists() else "(no job output)"
    assert info.get("JobState") == "COMPLETED", f"{info.get('JobState')} {info.get('ExitCode')}\n{text[-4000:]}"
    assert "2 process(es), deepspeed" in text
    assert "nnodes=1, num_local_procs=2, node_rank=0" in text  # deepspeed.launcher.launch's own report
    _assert_trained(run, text, world_size=2)


# ------------------------------------------------------------------------------------------------
# The multi-node path: two node ranks on localhost
# ------------------------------------------------------------------------------------------------
def _run_two_nodes(tmp_path, launcher: str, timeout: int, *more) -> tuple[list[subprocess.CompletedProcess], Path]:
    """launch_node.sh as srun would start it on each of 2 nodes (SLURM_* as Slurm sets them for a
    one-task-per-node step, MASTER_* as the batch script exports them), 1 process per node."""
    run, port, job_id = tmp_path / "run", _free_port(), "4242"
    procs, logs = [], []
    for node in (0, 1):
        env = _clean_env(
            SLURM_JOB_ID=job_id, SLURM_JOBID=job_id, SLURM_JOB_NODELIST="node[0-1]", SLURM_NODELIST="node[0-1]",
            SLURM_NNODES=2, SLURM_JOB_NUM_NODES=2, SLURM_NODEID=node, SLURM_PROCID=node, SLURM_LOCALID=0,
            SLURM_STEP_ID=0, SLURM_STEP_NUM_NODES=2, SLURM_STEP_NUM_TASKS=2, SLURM_STEP_NODELIST="node[0-1]",
            SLURM_STEP_TASKS_PER_NODE="1(x2)", SLURM_TASKS_PER_NODE="1(x2)", SLURMD_NODENAME=f"node{node}",
            MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NPROC_PER_NODE=1, LAUNCHER=launcher,
        )
        log = open(tmp_path / f"node{node}.log", "w+")
        logs.append(log)
        procs.append(subprocess.Popen(["bash", str(NODE_SH), "launch/pretrain_gpt.py", CONFIG, *_overrides(run, *more)],
                                      env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, text=True))
    results = []
    try:
        for p, log in zip(procs, logs):
            p.wait(timeout=timeout)
            log.seek(0)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, log.read(), ""))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    return results, run


def test_multinode_path_two_node_ranks_on_localhost(tmp_path):
    (n0, n1), run = _run_two_nodes(tmp_path, "torchrun", 540)
    assert n0.returncode == 0 and n1.returncode == 0, f"node0:\n{n0.stdout[-3000:]}\nnode1:\n{n1.stdout[-3000:]}"
    assert "[launch_node] node 0/2" in n0.stdout and "[launch_node] node 1/2" in n1.stdout
    _assert_trained(run, n0.stdout, world_size=2)  # rank 0 lives on node 0 and reports both ranks
    assert '{"summary"' not in n1.stdout


@pytest.mark.slow
def test_multinode_path_with_the_deepspeed_launcher(tmp_path):
    (n0, n1), run = _run_two_nodes(tmp_path, "deepspeed", 900)
    assert n0.returncode == 0 and n1.returncode == 0, f"node0:\n{n0.stdout[-3000:]}\nnode1:\n{n1.stdout[-3000:]}"
    # deepspeed.launcher.launch on each node: its node rank, one local process, a world of 2.
    for i, node in enumerate((n0, n1)):
        assert f"nnodes=2, num_local_procs=1, node_rank={i}" in node.stdout and "dist_world_size=2" in node.stdout
    _assert_trained(run, n0.stdout, world_size=2)


# ------------------------------------------------------------------------------------------------
# The batch side with stand-in srun / scontrol, and the composed per-node commands
# ------------------------------------------------------------------------------------------------
def _fake_bin(tmp_path, scripts: dict[str, str]) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        f = bindir / name
        f.write_text("#!/bin/bash\n" + body)
        f.chmod(f.stat().st_mode | stat.S_IXUSR)
    return bindir


@pytest.mark.parametrize("kind", ["gpt", "bert"])
def test_sbatch_starts_one_srun_task_per_node_with_the_first_host_as_master(tmp_path, kind):
    record = tmp_path / "srun.txt"
    bindir = _fake_bin(tmp_path, {
        # scontrol: `show hostnames LIST` expands; `show job` names the submitted script, as Slurm does.
        "scontrol": 'case "$1 $2" in\n'
                    '  "show hostnames") [ "$3" = "gpu[07-09]" ] && printf "gpu07\\ngpu08\\ngpu09\\n" ;;\n'
                    f'  "show job") echo "   Command={SLURM_DIR}/pretrain_{kind}.sbatch cfg.yaml" ;;\nesac\n',
        # srun: record its arguments and the environment its tasks would get.
        "srun": f'{{ printf "%s\\n" "$@"; echo "MASTER=$MASTER_ADDR:$MASTER_PORT"; }} > {record}\n',
    })
    copy = tmp_path / "spool" / "slurm_script"  # Slurm runs a copy of the batch script
    copy.parent.mkdir()
    shutil.copy(SLURM_DIR / f"pretrain_{kind}.sbatch", copy)
    env = _clean_env(PATH=f"{bindir}:{os.environ['PATH']}", SLURM_JOB_ID="1234", SLURM_NNODES="3",
                     SLURM_JOB_NODELIST="gpu[07-09]", SLURM_CPUS_PER_TASK="16", SLURM_SUBMIT_DIR=str(tmp_path))
    proc = subprocess.run(["bash", str(copy), "cfg.yaml", "train.steps=7"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    args = record.read_text().splitlines()
    joined = " ".join(args)
    assert "--nodes 3 --ntasks 3 --ntasks-per-node 1" in joined and "--cpus-per-task 16" in joined
    assert "--kill-on-bad-exit=1" in joined
    assert args[-5:-1] == [str(NODE_SH), str(ROOT / f"launch/pretrain_{kind}.py"), "cfg.yaml", "train.steps=7"]
    assert args[-1] == f"MASTER=gpu07:{20000 + 1234}"


def test_sbatch_outside_slurm_is_a_clear_error(tmp_path):
    proc = subprocess.run(["bash", str(SLURM_DIR / "pretrain_gpt.sbatch"), CONFIG], env=_clean_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "not inside a Slurm job" in proc.stderr


def _dry_run(tmp_path, path_prefix: str | None = None, **env):
    base = _clean_env(DRY_RUN=1, **env)
    # No nvidia-smi from the host: a GPU machine must not change what these tests expect.
    base["PATH"] = f"{path_prefix}:/usr/bin:/bin" if path_prefix else "/usr/bin:/bin"
    return subprocess.run(["bash", str(NODE_SH), "launch/pretrain_gpt.py", "cfg.yaml", "train.steps=2"],
                          env=base, cwd=tmp_path, capture_output=True, text=True, timeout=60)


def test_node_command_torchrun(tmp_path):
    proc = _dry_run(tmp_path, SLURM_NNODES=4, SLURM_NODEID=3, MASTER_ADDR="gpu07", SLURM_JOB_ID=77)
    assert proc.returncode == 0, proc.stderr
    cmd = proc.stdout.split()
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    pairs = dict(zip(cmd[3:13:2], cmd[4:14:2]))
    assert pairs == {"--nnodes": "4", "--node_rank": "3", "--nproc_per_node": "1", "--master_addr": "gpu07",
                     "--master_port": "20077"}
    assert cmd[-4:] == [str(ROOT / "launch/pretrain_gpt.py"), "--config", "cfg.yaml", "train.steps=2"]


def test_node_command_deepspeed_no_ssh_with_a_hostfile_of_the_allocation(tmp_path):
    proc = _dry_run(tmp_path, LAUNCHER="deepspeed", SLURM_NNODES=3, SLURM_NODEID=2, MASTER_ADDR="n1",
                    MASTER_PORT=3333, NPROC_PER_NODE=4, SLURM_JOB_NODELIST="n[1-3]", TMPDIR=tmp_path)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.splitlines()[0]
    assert line.startswith(f"{sys.executable} -m deepspeed.launcher.runner --hostfile ")
    assert "--no_ssh --node_rank 2 --master_addr n1 --master_port 3333 " in line
    hosts = [ln.split(": ", 1)[1] for ln in proc.stdout.splitlines() if ln.startswith("hostfile: ")]
    assert len(hosts) == 3 and all(h.endswith(" slots=4") for h in hosts)
    assert line.split("--hostfile ")[1].startswith(f"{tmp_path}/ds_hostfile.")
    assert not list(tmp_path.glob("ds_hostfile.*"))  # removed on exit


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, "1"),  # no GPU: one process per node
        ({"SLURM_GPUS_ON_NODE": "8"}, "8"),
        ({"CUDA_VISIBLE_DEVICES": "0,1,2"}, "3"),
        ({"NPROC_PER_NODE": "5", "SLURM_GPUS_ON_NODE": "8"}, "5"),
        ({"FAKE_GPUS": "2"}, "2"),  # from nvidia-smi -L
    ],
)
def test_node_processes_default_to_the_gpus_on_the_node(tmp_path, env, expected):
    bindir = _fake_bin(tmp_path, {"nvidia-smi": '[ "$1" = -L ] && for ((i=0;i<${FAKE_GPUS:-0};i++)); do '
                                                'echo "GPU $i: NVIDIA H100 (UUID: GPU-$i)"; done\n'})
    proc = _dry_run(tmp_path, str(bindir), **env)
    assert proc.returncode == 0, proc.stderr
    cmd = proc.stdout.split()
    assert cmd[cmd.index("--nproc_per_node") + 1] == expected


@pytest.mark.parametrize(
    "env, message",
    [
        ({"SLURM_NNODES": "2", "SLURM_NODEID": "2", "MASTER_ADDR": "a"}, "SLURM_NODEID=2 is not a node index below SLURM_NNODES=2"),
        ({"SLURM_NNODES": "2", "SLURM_NODEID": "1"}, "MASTER_ADDR is not set"),
        ({"LAUNCHER": "pdsh"}, "LAUNCHER=pdsh is not one of: torchrun, deepspeed"),
        ({"NPROC_PER_NODE": "two"}, "NPROC_PER_NODE=two is not a process count"),
    ],
)
def test_node_command_errors(tmp_path, env, message):
    proc = _dry_run(tmp_path, **env)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
