#!/usr/bin/env bash
# Prepares, on this machine, what scripts/gpu_check.sh needs on a lent GPU machine. That machine's
# python3 (3.12) has CUDA PyTorch, CuPy, numpy, pyarrow, fsspec, einops, safetensors, Pillow and
# pytest, but no package registry and no espeak-ng. Into .gpu-carry/ (git-ignored, ~8 MB): wheels
# of the packages its image lacks, at the versions in .venv; and the 96-sample NumberWorld corpus
# that jin-orchestrate's tests would generate (the same bytes: the generator is deterministic).
set -euo pipefail
cd "$(dirname "$0")/.."
VPY=.venv/bin/python
CARRY=.gpu-carry
[ -x "$VPY" ] || { echo "gpu_prepare: run scripts/setup.sh first" >&2; exit 1; }
rm -rf "$CARRY"
mkdir -p "$CARRY/wheels"
for name in pydantic pydantic_core annotated-types typing-inspection soundfile cffi pycparser; do
  version=$("$VPY" -m pip show "$name" | awk '/^Version:/ {print $2}')
  "$VPY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$CARRY/wheels" "$name==$version"
done
"$VPY" -c '
from jin_data.numberworld import generate_numberworld
generate_numberworld(".gpu-carry/numberworld-96", 96, 0, progress=False, cache_dir=".gpu-carry/speech")
'
rm -rf "$CARRY/speech"
du -sh "$CARRY"
