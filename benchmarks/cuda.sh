#!/usr/bin/env bash
# The CUDA checks in one go (one H100, about 10 minutes at most): the GPU tests, then the CUDA
# benchmark (bf16, forward+backward, N = 1k, 4k, 16k, 64k) of every registered mechanism with
# the reference kernels (dense SDPA, causal dense SDPA, FlexAttention ±256 window, chunked
# causal linear attention) in the same run, plus causal forward+backward of the mechanisms
# that decode. Before the benchmark, a profile (PROFILE_BUDGET seconds, default 45; 0 skips
# it) of the mechanisms that missed a CUDA target at 64k: the top kernels of their
# forward+backward, one table each in profile/.
# Everything lands in "${OUT:-bench-results}": pytest-gpu.txt, bench-cuda.log, profile/*.txt,
# cuda/bench.{json,csv,md} and plots.
#
#   bash benchmarks/cuda.sh                       # from the repository root
#   SMOKE=1 bash benchmarks/cuda.sh               # 1 minute: 1k and 4k, a few mechanisms
#   BENCH_BUDGET=300 LENGTHS=1024,4096,16384 bash benchmarks/cuda.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench-results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
# Use the installed package if there is one, else this checkout's src/.
if ! "$PY" -c "import efficient_transformers" 2>/dev/null; then
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" - <<'PY' 2>&1 | tee "$OUT/bench-cuda.log"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE")
PY

SECONDS=0
status=0
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  # GPU tests: at most TEST_BUDGET seconds (default 150).
  timeout "${TEST_BUDGET:-150}" "$PY" -m pytest -q -m gpu -p no:cacheprovider 2>&1 \
    | tee "$OUT/pytest-gpu.txt"
  rc=${PIPESTATUS[0]}
  # 5 = no GPU test collected: not a failure of this script
  if [ "$rc" != 0 ] && [ "$rc" != 5 ]; then status=$rc; fi
  echo "gpu tests: exit $rc after ${SECONDS}s"
fi

PROFILE_BUDGET="${PROFILE_BUDGET:-45}"
if [ "$PROFILE_BUDGET" != 0 ] && [ "${SMOKE:-0}" != 1 ]; then
  P0=$SECONDS
  timeout $(( PROFILE_BUDGET + 60 )) "$PY" -m efficient_transformers.bench.profile \
    --models "${PROFILE_MODELS:-etc,performer,linear_transformer,routing_transformer,sinkhorn_transformer,longformer,bigbird,reformer,axial_transformer,sparse_transformer}" \
    --length "${PROFILE_LENGTH:-65536}" --device cuda --dtype bf16 --budget "$PROFILE_BUDGET" \
    --out "$OUT/profile" 2>&1 | tee -a "$OUT/bench-cuda.log"
  echo "profile: $(( SECONDS - P0 ))s"
fi

if [ "${SMOKE:-0}" = 1 ]; then
  LENGTHS="${LENGTHS:-1024,4096}"
  MODELS="${MODELS:-transformer,performer,linear_transformer,longformer,dense_sdpa,dense_sdpa_causal,flex_window,linear_chunked_causal}"
  BUDGET="${BENCH_BUDGET:-60}"
else
  LENGTHS="${LENGTHS:-1024,4096,16384,65536}"
  MODELS="${MODELS:-}"
  # what is left of 10 minutes, less a minute for the reports
  BUDGET="${BENCH_BUDGET:-$(( 540 - SECONDS ))}"
fi
args=(bench --device cuda --dtype bf16 --modes "${MODES:-fwdbwd,causal}" --lengths "$LENGTHS"
      --repeats "${REPEATS:-5}" --warmup 2 --timeout "${CASE_TIMEOUT:-60}" --budget "$BUDGET"
      --out "$OUT/cuda")
[ -n "$MODELS" ] && args+=(--models "$MODELS")
timeout 590 "$PY" -m efficient_transformers "${args[@]}" 2>&1 | tee -a "$OUT/bench-cuda.log"
rc=${PIPESTATUS[0]}
[ "$rc" != 0 ] && status=$rc
echo "cuda.sh: done in ${SECONDS}s (exit $status); results in $OUT/cuda"
exit $status
