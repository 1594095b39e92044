#!/usr/bin/env bash
# Set up and run the whole test suite (what CI runs). Extra arguments go to pytest.
# The `slurm` tier needs a local Slurm cluster: this script installs (apt, as root) and starts
# one (scripts/slurm_cluster.sh), and stops it afterwards. MTP_NO_SLURM=1 deselects that tier
# explicitly (pytest reports it as deselected) on machines where that is impossible.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [[ "${MTP_NO_SLURM:-0}" == 1 ]]; then
  exec python -m pytest -q -m "not slurm" "$@"
fi
bash scripts/slurm_cluster.sh start
trap 'bash scripts/slurm_cluster.sh stop' EXIT
python -m pytest -q "$@"
