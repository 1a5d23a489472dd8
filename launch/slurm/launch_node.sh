#!/usr/bin/env bash
# One node's share of a (multi-node) pretraining run: starts NPROC_PER_NODE training processes on
# this node with torchrun (default) or the DeepSpeed launcher, joined to the other nodes through
# MASTER_ADDR:MASTER_PORT. pretrain_gpt.sbatch / pretrain_bert.sbatch run it as their one srun task
# per node; it also runs by hand (or under another scheduler) given the same variables.
#
#   launch_node.sh ENTRY CONFIG [key=value ...]      e.g. ENTRY=launch/pretrain_gpt.py
#
# Variables (defaults in brackets):
#   SLURM_NNODES       number of nodes [1]
#   SLURM_NODEID       this node's index, 0 = the master node [0]
#   MASTER_ADDR        host of node 0 [127.0.0.1 when SLURM_NNODES=1, required otherwise]
#   MASTER_PORT        rendezvous port on node 0 [20000 + SLURM_JOB_ID % 20000, or 29500]
#   LAUNCHER           torchrun | deepspeed [torchrun]
#   NPROC_PER_NODE     processes on this node [GPUs here: SLURM_GPUS_ON_NODE, CUDA_VISIBLE_DEVICES,
#                      or nvidia-smi -L; 1 without GPUs]
#   PYTHON             interpreter [<repo>/.venv/bin/python if present, else python3]
#   LAUNCHER_ARGS      extra launcher arguments, word-split (e.g. "--max_restarts 0")
#   DRY_RUN=1          print the command (and the DeepSpeed hostfile) instead of running it
set -euo pipefail

die() { echo "launch_node.sh: error: $*" >&2; exit 2; }
[ $# -ge 2 ] || die "usage: launch_node.sh ENTRY CONFIG [key=value ...]"
ENTRY=$1; CONFIG=$2; shift 2
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
case $ENTRY in /*) ;; *) [ -f "$ENTRY" ] || ENTRY=$ROOT/$ENTRY ;; esac
[ -f "$ENTRY" ] || die "entry script not found: $ENTRY"

is_count() { [[ $1 =~ ^[0-9]+$ ]]; }

NNODES=${SLURM_NNODES:-1}
NODE_RANK=${SLURM_NODEID:-0}
is_count "$NNODES" && [ "$NNODES" -ge 1 ] || die "SLURM_NNODES=$NNODES is not a node count"
is_count "$NODE_RANK" && [ "$NODE_RANK" -lt "$NNODES" ] || die "SLURM_NODEID=$NODE_RANK is not a node index below SLURM_NNODES=$NNODES"

if [ -z "${MASTER_ADDR:-}" ]; then
    [ "$NNODES" = 1 ] || die "MASTER_ADDR is not set (the batch script exports node 0's host name)"
    MASTER_ADDR=127.0.0.1
fi
if [ -z "${MASTER_PORT:-}" ]; then
    if is_count "${SLURM_JOB_ID:-}"; then MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000)); else MASTER_PORT=29500; fi
fi

gpus_here() {
    if is_count "${SLURM_GPUS_ON_NODE:-}" && [ "$SLURM_GPUS_ON_NODE" -gt 0 ]; then
        echo "$SLURM_GPUS_ON_NODE"; return
    fi
    if [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [ "$CUDA_VISIBLE_DEVICES" != "-1" ] && [ "$CUDA_VISIBLE_DEVICES" != NoDevFiles ]; then
        awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES"; return
    fi
    if command -v nvidia-smi >/dev/null 2>&1; then
        local n
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
        if [ "${n:-0}" -gt 0 ]; then echo "$n"; return; fi
    fi
    echo 0
}
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$(gpus_here)
    # Without GPUs one process per node: CPU ranks on one node only compete for the same cores.
    [ "$NPROC_PER_NODE" -gt 0 ] || NPROC_PER_NODE=1
fi
is_count "$NPROC_PER_NODE" && [ "$NPROC_PER_NODE" -ge 1 ] || die "NPROC_PER_NODE=$NPROC_PER_NODE is not a process count"

if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
# The interpreter's bin (a venv's) first: deepspeed's launcher looks up mpirun / pdsh there.
PATH="$(dirname "$(command -v "$PYTHON")"):$PATH"
export PATH PYTHONUNBUFFERED=1

read -r -a extra <<<"${LAUNCHER_ARGS:-}"
hostfile=""
case ${LAUNCHER:-torchrun} in
    torchrun)
        cmd=("$PYTHON" -m torch.distributed.run
             --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE"
             --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "${extra[@]}")
        ;;
    deepspeed)
        # --no_ssh: every node runs its own launcher (this script), told its rank; the hostfile
        # only gives the world's shape (node count x slots), so it is written locally on each node.
        hosts=()
        if [ -n "${SLURM_JOB_NODELIST:-}" ] && command -v scontrol >/dev/null 2>&1; then
            mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null || true)
        fi
        if [ "${#hosts[@]}" -ne "$NNODES" ]; then
            hosts=(); for ((i = 0; i < NNODES; i++)); do hosts+=("node$i"); done
        fi
        hostfile=$(mktemp "${TMPDIR:-/tmp}/ds_hostfile.XXXXXX")
        trap 'rm -f "$hostfile"' EXIT
        for h in "${hosts[@]}"; do echo "$h slots=$NPROC_PER_NODE"; done >"$hostfile"
        cmd=("$PYTHON" -m deepspeed.launcher.runner --hostfile "$hostfile"
             --no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "${extra[@]}")
        ;;
    *) die "LAUNCHER=${LAUNCHER} is not one of: torchrun, deepspeed" ;;
esac
cmd+=("$ENTRY" --config "$CONFIG" "$@")

echo "[launch_node] node $NODE_RANK/$NNODES on $(hostname): $NPROC_PER_NODE process(es), ${LAUNCHER:-torchrun}, master $MASTER_ADDR:$MASTER_PORT" >&2
if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "${cmd[@]}"; echo
    [ -z "$hostfile" ] || sed 's/^/hostfile: /' "$hostfile"
    exit 0
fi
"${cmd[@]}"
