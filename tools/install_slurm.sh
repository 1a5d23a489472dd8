#!/usr/bin/env bash
# Install a local Slurm (Debian slurm-wlm + munge) for tests/pretrain/train/test_slurm.py.
#
#   bash tools/install_slurm.sh            # best effort: never fails the caller
#   bash tools/install_slurm.sh --strict   # exit non-zero when Slurm cannot be installed
#
# Only installs packages; it starts nothing (the test fixture starts munged, slurmctld and
# slurmd itself, in a temp dir, and stops them by PID). Needs root and apt-get. Where either is
# missing, or the install fails (no network), it says so and the Slurm tests skip.
set -uo pipefail
strict=0
[ "${1:-}" = "--strict" ] && strict=1

give_up() {
    echo "[install_slurm] $*; tests/pretrain/train/test_slurm.py will skip" >&2
    exit $((strict ? 1 : 0))
}

if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
   && command -v sbatch >/dev/null; then
    echo "[install_slurm] already installed: $(dpkg-query -W -f '${Version}' slurm-wlm 2>/dev/null || echo "?")"
    exit 0
fi
command -v apt-get >/dev/null || give_up "apt-get not found (not a Debian/Ubuntu system)"
[ "$(id -u)" = 0 ] || give_up "must run as root to install packages"

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq || give_up "apt-get update failed"
apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null || give_up "apt-get install slurm-wlm munge failed"
command -v slurmctld >/dev/null || give_up "slurmctld still missing after install"
echo "[install_slurm] installed: $(dpkg-query -W -f '${Version}' slurm-wlm 2>/dev/null || echo "?")"
