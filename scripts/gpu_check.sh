#!/usr/bin/env bash
# Every GPU check in one run, for a lent GPU machine (see the root README, "GPU checks"):
#   here:  bash scripts/gpu_prepare.sh
#   there: bash scripts/gpu_check.sh   (the device run carrying .gpu-carry)
# Runs each package's tests marked `gpu` (CuPy dispatch kernels against PyTorch; the joint
# embedding space and JinModel on CUDA fed host batches; the curriculum trained, killed and
# resumed on the GPU), then benchmarks/moe.py's GPU section (CuPy permute/un-permute bandwidth, the
# MoE layer with CuPy against PyTorch dispatch) and benchmarks/train.py's jin-nano steps in fp32
# and bf16 (train.precision). Logs, moe.json and train.json go to $OUT (or
# /tmp/jin-gpu-check). Exit status 0 only if every step passed. PY overrides python3.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
case $PY in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # the tests run from each package's folder
RESULTS=${OUT:-/tmp/jin-gpu-check}
CARRY=$PWD/.gpu-carry
mkdir -p "$RESULTS"
[ -d "$CARRY/numberworld-96" ] || {
  echo "gpu_check: no $CARRY: run scripts/gpu_prepare.sh here and carry .gpu-carry" >&2
  exit 2
}
SITE=""
if ! "$PY" -c 'import pydantic, soundfile' 2>/dev/null; then
  SITE=/tmp/jin-site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$CARRY"/wheels/*.whl || exit 2
fi
SRC=$SITE
for p in jin-encoders jin-backbone jin-zjepa jin-data jin-orchestrate; do
  SRC="$SRC:$PWD/packages/$p/src"
done
export PYTHONPATH="${SRC#:}" PYTHONUNBUFFERED=1 JIN_TEST_CORPUS="$CARRY/numberworld-96"
nvidia-smi -L 2>&1 || true
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'

status=0
# step NAME LINES COMMAND...: run COMMAND with its output in $RESULTS/NAME.log, show its last
# LINES lines, and mark the check failed if it fails.
step() {
  local name=$1 lines=$2
  shift 2
  "$@" > "$RESULTS/$name.log" 2>&1
  local code=$?
  tail -n "$lines" "$RESULTS/$name.log"
  [ "$code" = 0 ] || { echo "== $name: FAILED ($code)"; status=1; }
}

for pkg in jin-backbone jin-encoders jin-orchestrate; do
  files=$(cd "packages/$pkg" && grep -l "pytest.mark.gpu" tests/test_*.py)
  echo "== $pkg: pytest -m gpu" $files
  # The packages' addopts run their README examples (--markdown-docs, a plugin that image lacks),
  # and the conftest.py beside each README imports what those need (MLflow, also lacking there):
  # neither is needed by the test files, so both are left out (--confcutdir: tests/ and below).
  # shellcheck disable=SC2086  # one word per file
  step "$pkg-gpu" 15 env -C "packages/$pkg" "$PY" -m pytest -q -m gpu -p no:cacheprovider \
    -o "addopts=-ra --strict-markers" --confcutdir tests $files
done
echo "== benchmarks/moe.py (the smallest CPU case, then the GPU section)"
step moe 40 timeout 300 "$PY" benchmarks/moe.py --cases 2 --json "$RESULTS/moe.json"
echo "== benchmarks/train.py: jin-nano training steps on the GPU, fp32 against bf16"
if "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  step train 12 timeout 360 "$PY" benchmarks/train.py --preset jin-nano --device cuda \
    --precision fp32 bf16 --steps 3 --warmup 1 --data "$JIN_TEST_CORPUS" \
    --json "$RESULTS/train.json"
else
  echo "no CUDA device: not run"
fi
echo "== gpu_check: $([ $status = 0 ] && echo passed || echo FAILED)"
exit $status
