#!/usr/bin/env bash
# The batch side of pretrain_gpt.sbatch / pretrain_bert.sbatch (they find the repository, then
# exec this): inside a Slurm allocation, find the master node, then start launch_node.sh as one
# srun task per node.
#
#   srun_nodes.sh ENTRY CONFIG [key=value ...]
#
# MASTER_ADDR is the allocation's first host (`scontrol show hostnames $SLURM_JOB_NODELIST`);
# MASTER_PORT defaults to 20000 + SLURM_JOB_ID % 20000. SRUN_ARGS adds srun options (word-split,
# e.g. "--cpu-bind=none"). Everything launch_node.sh reads (LAUNCHER, NPROC_PER_NODE, PYTHON, ...)
# passes through the environment.
set -euo pipefail

die() { echo "srun_nodes.sh: error: $*" >&2; exit 2; }
[ $# -ge 2 ] || die "usage: sbatch launch/slurm/pretrain_gpt.sbatch CONFIG [key=value ...]"
[ -n "${SLURM_JOB_ID:-}" ] || die "not inside a Slurm job: submit with sbatch (or run launch/slurm/launch_node.sh directly)"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ENTRY=$1; shift

NNODES=${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}
# (awk reads to the end: `head -n 1` could SIGPIPE scontrol on a long list and fail under pipefail)
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk 'NR == 1')
[ -n "$MASTER_ADDR" ] || die "scontrol show hostnames '$SLURM_JOB_NODELIST' gave no host"
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT

srun_args=(--nodes "$NNODES" --ntasks "$NNODES" --ntasks-per-node 1 --kill-on-bad-exit=1)
# Slurm 22.05-23.02 srun does not inherit sbatch's --cpus-per-task: pass it on, so the one task
# per node keeps all the CPUs its processes were given.
[ -z "${SLURM_CPUS_PER_TASK:-}" ] || srun_args+=(--cpus-per-task "$SLURM_CPUS_PER_TASK")
read -r -a extra <<<"${SRUN_ARGS:-}"

echo "[srun_nodes] job $SLURM_JOB_ID: $NNODES node(s) [$SLURM_JOB_NODELIST], master $MASTER_ADDR:$MASTER_PORT, launcher ${LAUNCHER:-torchrun}" >&2
exec srun "${srun_args[@]}" "${extra[@]}" bash "$HERE/launch_node.sh" "$ENTRY" "$@"
