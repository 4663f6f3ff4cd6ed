#!/usr/bin/env bash
# The CUDA checks in one go, in at most TOTAL seconds (default 540: a 10-minute slot on one GPU),
# the most wanted first, so that a slot cut short still leaves the benchmark:
#   1. the CUDA benchmark: bf16, forward+backward and causal forward+backward (the mechanisms that
#      decode), N = 8k and 64k (the lengths of the targets), every registered mechanism with the
#      reference kernels (dense SDPA, causal dense SDPA, FlexAttention ±256 window, chunked causal
#      linear attention) in the same run; no case starts after BENCH_BUDGET seconds (default
#      TOTAL - 300);
#   1b. the same forward+backward at 8k, 16k and 64k captured as CUDA graphs (--cuda-graphs; at
#      most GRAPHS_BUDGET seconds, default 100; GRAPHS=0 skips it);
#   2. the GPU tests (pytest -m gpu), with what is left, at most TEST_BUDGET seconds (default
#      150); on PYTEST_WORKERS processes (default 4) where pytest-xdist is installed, each test
#      at most TEST_TIMEOUT seconds (default 90) where pytest-timeout is;
#   3. a profile at 64k of the mechanisms that missed a target in this run (bench.json): the top
#      kernels of their forward+backward, one table each, while time is left.
# Everything lands in "${OUT:-bench-results}": cuda/bench.{json,csv,md} and plots,
# cuda-graphs/bench.{json,csv,md}, bench-cuda.log, pytest-gpu.txt, profile/*.txt. With PACK=DIR,
# DIR also gets after each step bench.json, bench-graphs.json, bench.md, the two logs and
# cuda-results.tar.gz of everything (6 files, no folder), for a machine that returns only a few
# files.
#
#   bash benchmarks/cuda.sh                       # from the repository root
#   SMOKE=1 bash benchmarks/cuda.sh               # about 3 minutes: 1k and 4k, a few mechanisms
#   LENGTHS=1024,4096,16384,65536 TOTAL=900 bash benchmarks/cuda.sh
#   DEVICE=cpu SMOKE=1 LENGTHS=256,512 bash benchmarks/cuda.sh   # the script's flow, no GPU
#   COMPILE=reduce-overhead MODELS=... LENGTHS=65536 bash benchmarks/cuda.sh   # compiled layers
#      (bench --compile: CUDA graphs, no host time per call; each case compiles in its warm-up,
#      tens of seconds, so name few models and lengths)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench-results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
DTYPE="${DTYPE:-bf16}"
TOTAL="${TOTAL:-540}"
# Use the installed package if there is one, else this checkout's src/.
if ! "$PY" -c "import efficient_transformers" 2>/dev/null; then
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
SECONDS=0
left() { echo $(( TOTAL - SECONDS )); }
pack() {
  [ -n "${PACK:-}" ] || return 0
  mkdir -p "$PACK"
  for f in "$OUT/cuda/bench.json" "$OUT/cuda/bench.md" "$OUT/bench-cuda.log" "$OUT/pytest-gpu.txt"; do
    [ -f "$f" ] && cp "$f" "$PACK/"
  done
  [ -f "$OUT/cuda-graphs/bench.json" ] && cp "$OUT/cuda-graphs/bench.json" "$PACK/bench-graphs.json"
  tar czf "$PACK/cuda-results.tar.gz" -C "$OUT" . 2>/dev/null
  return 0
}

"$PY" - <<'PY' 2>&1 | tee "$OUT/bench-cuda.log"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE")
PY
status=0

# 1. the benchmark
if [ "${SMOKE:-0}" = 1 ]; then
  LENGTHS="${LENGTHS:-1024,4096}"
  MODELS="${MODELS:-transformer,performer,linear_transformer,longformer,dense_sdpa,dense_sdpa_causal,flex_window,linear_chunked_causal}"
  BUDGET="${BENCH_BUDGET:-60}"
else
  LENGTHS="${LENGTHS:-8192,65536}"
  MODELS="${MODELS:-}"
  BUDGET="${BENCH_BUDGET:-$(( TOTAL - 300 ))}"
fi
GRAPH_LENGTHS="${GRAPH_LENGTHS:-$([ "${SMOKE:-0}" = 1 ] && echo "$LENGTHS" || echo 8192,16384,65536)}"
CASE_TIMEOUT="${CASE_TIMEOUT:-60}"
args=(bench --device "$DEVICE" --dtype "$DTYPE" --modes "${MODES:-fwdbwd,causal}"
      --lengths "$LENGTHS" --repeats "${REPEATS:-5}" --warmup 2 --timeout "$CASE_TIMEOUT"
      --budget "$BUDGET" --out "$OUT/cuda")
[ -n "$MODELS" ] && args+=(--models "$MODELS")
[ -n "${COMPILE:-}" ] && args+=(--compile "$COMPILE")
# the case in flight when the budget is spent may run CASE_TIMEOUT more; then the reports
timeout $(( BUDGET + CASE_TIMEOUT + 60 )) "$PY" -m efficient_transformers "${args[@]}" 2>&1 \
  | tee -a "$OUT/bench-cuda.log"
rc=${PIPESTATUS[0]}
[ "$rc" != 0 ] && status=$rc
echo "benchmark: exit $rc after ${SECONDS}s"
pack

# 1b. the same layers' forward + backward captured once as CUDA graphs and replayed
#     (bench --cuda-graphs: eager kernels without host time per call, no compiling; each replay
#     checked against the eager step), in at most GRAPHS_BUDGET seconds (default 100), keeping
#     180 s for the tests and the profile; GRAPHS=0 skips it
GRAPHS_S=$(( $(left) - 180 ))
[ "$GRAPHS_S" -gt "${GRAPHS_BUDGET:-100}" ] && GRAPHS_S="${GRAPHS_BUDGET:-100}"
if [ "${GRAPHS:-1}" = 1 ] && [ "$DEVICE" = cuda ] && [ -z "${COMPILE:-}" ] && [ "$GRAPHS_S" -ge 40 ]; then
  gargs=(bench --device cuda --dtype "$DTYPE" --modes fwdbwd --cuda-graphs
         --lengths "$GRAPH_LENGTHS" --repeats "${REPEATS:-5}" --warmup 2 --timeout 25
         --budget $(( GRAPHS_S - 40 )) --no-plots --out "$OUT/cuda-graphs")
  [ -n "$MODELS" ] && gargs+=(--models "$MODELS")
  timeout "$GRAPHS_S" "$PY" -m efficient_transformers "${gargs[@]}" 2>&1 \
    | tee -a "$OUT/bench-cuda.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" != 0 ] && status=$rc
  echo "benchmark with CUDA graphs: exit $rc after ${SECONDS}s"
fi
pack

# 2. the GPU tests, with what is left (30 s kept for the profile and the summary)
TESTS_S=$(( $(left) - 30 ))
[ "$TESTS_S" -gt "${TEST_BUDGET:-150}" ] && TESTS_S="${TEST_BUDGET:-150}"
if [ "${SKIP_TESTS:-0}" != 1 ] && [ "$TESTS_S" -ge 20 ]; then
  workers=()   # pytest-xdist and pytest-timeout where installed: parallel, none stuck for long
  if [ "${PYTEST_WORKERS:-4}" -gt 1 ] && "$PY" -c "import xdist" 2>/dev/null; then
    workers=(-n "${PYTEST_WORKERS:-4}")
  fi
  "$PY" -c "import pytest_timeout" 2>/dev/null && workers+=(--timeout "${TEST_TIMEOUT:-90}")
  # one line per test, so that a run cut by the timeout still says which passed
  timeout "$TESTS_S" "$PY" -m pytest -v -m gpu -p no:cacheprovider "${workers[@]}" 2>&1 \
    | tee "$OUT/pytest-gpu.txt"
  rc=${PIPESTATUS[0]}
  # 5 = no GPU test collected: not a failure of this script
  if [ "$rc" != 0 ] && [ "$rc" != 5 ]; then status=$rc; fi
  echo "gpu tests: exit $rc after ${SECONDS}s (limit ${TESTS_S}s)" | tee -a "$OUT/pytest-gpu.txt"
elif [ "${SKIP_TESTS:-0}" != 1 ]; then
  echo "gpu tests: not run, ${TESTS_S}s left" | tee "$OUT/pytest-gpu.txt"
fi
pack

# 3. profile the misses of this run, while time is left
PROFILE_S=$(( $(left) - 15 ))
if [ "${SKIP_PROFILE:-0}" != 1 ] && [ "$PROFILE_S" -ge 30 ] && [ -f "$OUT/cuda/bench.json" ]; then
  timeout "$PROFILE_S" "$PY" -m efficient_transformers.bench.profile \
    --missed "$OUT/cuda/bench.json" --length "${PROFILE_LENGTH:-65536}" --device "$DEVICE" \
    --dtype "$DTYPE" --budget $(( PROFILE_S - 25 )) --out "$OUT/profile" 2>&1 \
    | tee -a "$OUT/bench-cuda.log"
  echo "profile: exit ${PIPESTATUS[0]} after ${SECONDS}s"
fi
pack

# the summary last, where a caller that keeps only the end of the output sees it
for run in cuda cuda-graphs; do
  if [ -f "$OUT/$run/bench.json" ]; then
    "$PY" -m efficient_transformers bench --from-json "$OUT/$run/bench.json" --no-plots \
      --out "${TMPDIR:-/tmp}/$run-summary" 2>&1 | grep -v "^wrote "
  fi
done
grep -E "^(FAILED|ERROR) " "$OUT/pytest-gpu.txt" 2>/dev/null | head -20
tail -n 2 "$OUT/pytest-gpu.txt" 2>/dev/null   # pytest's summary line, then the exit line
echo "cuda.sh: done in ${SECONDS}s (exit $status); results in $OUT/cuda"
exit $status
