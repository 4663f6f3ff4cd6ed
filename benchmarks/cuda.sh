#!/usr/bin/env bash
# The CUDA checks in one go, in at most TOTAL seconds (default 540: a 10-minute slot on one GPU),
# the most wanted first, so that a slot cut short still leaves the benchmark:
#   1a. the CUDA benchmark: bf16, forward+backward, N = 8k and 64k (the lengths of the targets),
#      every registered mechanism with the reference kernels (dense SDPA, causal dense SDPA,
#      FlexAttention ±256 window, chunked causal linear attention), at most BENCH_S seconds
#      (default 230);
#   1b. causal forward+backward of the decoders without a FlexAttention path (CAUSAL_MODELS), at
#      most CAUSAL_S seconds (default 80);
#   1c. the forward+backward of 1a captured as CUDA graphs (--cuda-graphs), at most GRAPHS_S
#      seconds (default 100; GRAPHS=0 skips it);
#   2. the GPU tests (pytest -m gpu), with what is left, at most TEST_BUDGET seconds (default
#      150); on PYTEST_WORKERS processes (default 4) where pytest-xdist is installed, each test
#      at most TEST_TIMEOUT seconds (default 90) where pytest-timeout is;
#   2b. FlexAttention with each fixed pattern's own mask (the references flex_mask:NAME, held
#      against 1a's mechanisms: `--from-json` of both), at most MASK_S seconds (default 90);
#   3. a profile at 64k of the mechanisms that missed a target in 1a (bench.json): the top
#      kernels of their forward+backward, one table each, while time is left.
# Everything lands in "${OUT:-bench-results}": cuda/, cuda-causal/, cuda-graphs/ and cuda-mask/
# (each bench.{json,csv,md}; plots in cuda/), bench-cuda.log, pytest-gpu.txt, profile/*.txt.
# With PACK=DIR, DIR also gets after each step bench.json, bench-causal.json, bench-graphs.json,
# bench-mask.json, bench.md, the two logs and cuda-results.tar.gz of everything (8 files, no
# folder), for a machine that returns only a few files.
#
#   bash benchmarks/cuda.sh                       # from the repository root
#   SMOKE=1 bash benchmarks/cuda.sh               # about 3 minutes: 1k and 4k, a few mechanisms
#   LENGTHS=1024,4096,16384,65536 TOTAL=900 BENCH_S=500 bash benchmarks/cuda.sh
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
  [ -f "$OUT/cuda-causal/bench.json" ] && cp "$OUT/cuda-causal/bench.json" "$PACK/bench-causal.json"
  [ -f "$OUT/cuda-graphs/bench.json" ] && cp "$OUT/cuda-graphs/bench.json" "$PACK/bench-graphs.json"
  [ -f "$OUT/cuda-mask/bench.json" ] && cp "$OUT/cuda-mask/bench.json" "$PACK/bench-mask.json"
  tar czf "$PACK/cuda-results.tar.gz" -C "$OUT" . 2>/dev/null
  return 0
}

"$PY" - <<'PY' 2>&1 | tee "$OUT/bench-cuda.log"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE")
PY
status=0

# 1. the benchmark, in stages; a stage whose budget is spent records the cases left as skipped
if [ "${SMOKE:-0}" = 1 ]; then
  LENGTHS="${LENGTHS:-1024,4096}"
  MODELS="${MODELS:-transformer,performer,linear_transformer,longformer,dense_sdpa,dense_sdpa_causal,flex_window,linear_chunked_causal}"
  CAUSAL_MODELS="${CAUSAL_MODELS:-transformer,performer,linear_transformer}"
else
  LENGTHS="${LENGTHS:-8192,65536}"
  MODELS="${MODELS:-}"
  # the decoders without a FlexAttention path: a FlexAttention layer compiles for 6-18 s per
  # length (2026-11-27), which the causal stage cannot afford
  CAUSAL_MODELS="${CAUSAL_MODELS:-transformer,memory_compressed,transformer_xl,sparse_transformer,axial_transformer,compressive_transformer,sinkhorn_transformer,synthesizer,performer,linear_transformer}"
fi
GRAPH_LENGTHS="${GRAPH_LENGTHS:-$LENGTHS}"

# stage NAME OUT_DIR WALL_S CASE_TIMEOUT ARGS...: one `bench` run in at most WALL_S seconds;
# no case starts after WALL_S - CASE_TIMEOUT - 20 (the case in flight, then the reports)
stage() {
  local name=$1 dir=$2 wall=$3 case_timeout=$4
  shift 4
  if [ "$wall" -lt $(( case_timeout + 30 )) ]; then
    echo "$name: not run, ${wall}s left for it" | tee -a "$OUT/bench-cuda.log"
    return 0
  fi
  timeout "$wall" "$PY" -m efficient_transformers bench --device "$DEVICE" --dtype "$DTYPE" \
    --repeats "${REPEATS:-5}" --warmup 2 --timeout "$case_timeout" \
    --budget $(( wall - case_timeout - 20 )) --out "$OUT/$dir" "$@" 2>&1 \
    | tee -a "$OUT/bench-cuda.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" != 0 ] && status=$rc
  echo "$name: exit $rc after ${SECONDS}s"
  pack
}
cap() { [ "$1" -lt "$2" ] && echo "$1" || echo "$2"; }   # the smaller of two numbers
compiled=()
[ -n "${COMPILE:-}" ] && compiled=(--compile "$COMPILE")
models=()
[ -n "$MODELS" ] && models=(--models "$MODELS")

# 1a. forward + backward, eager (every mechanism and the reference kernels unless MODELS)
stage "benchmark" cuda "$(cap "${BENCH_S:-230}" $(( $(left) - 60 )))" 40 \
  --modes fwdbwd --lengths "$LENGTHS" "${models[@]}" "${compiled[@]}"
# 1b. causal forward + backward of the decoders in CAUSAL_MODELS
stage "causal benchmark" cuda-causal "$(cap "${CAUSAL_S:-80}" $(( $(left) - 60 )))" 20 \
  --modes causal --lengths "$LENGTHS" --models "$CAUSAL_MODELS" --no-plots "${compiled[@]}"
# 1c. forward + backward captured once as CUDA graphs and replayed (bench --cuda-graphs: the
#     eager kernels without host time per call, no compiling; each replay checked against the
#     eager step); GRAPHS=0 skips it
if [ "${GRAPHS:-1}" = 1 ] && [ "$DEVICE" = cuda ] && [ -z "${COMPILE:-}" ]; then
  stage "benchmark with CUDA graphs" cuda-graphs "$(cap "${GRAPHS_S:-100}" $(( $(left) - 60 )))" 25 \
    --modes fwdbwd --cuda-graphs --lengths "$GRAPH_LENGTHS" --no-plots "${models[@]}"
fi

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
  # the CUDA paths never run on a GPU yet first, then the rest (pytest collects a file once)
  first=(tests/test_grid_flash.py tests/test_flash.py tests/test_lsh_flex.py tests/test_flex.py
         tests/test_cuda_graphs.py)
  timeout "$TESTS_S" "$PY" -m pytest -v -m gpu -p no:cacheprovider "${workers[@]}" \
    "${first[@]}" tests 2>&1 \
    | tee "$OUT/pytest-gpu.txt"
  rc=${PIPESTATUS[0]}
  # 5 = no GPU test collected: not a failure of this script
  if [ "$rc" != 0 ] && [ "$rc" != 5 ]; then status=$rc; fi
  echo "gpu tests: exit $rc after ${SECONDS}s (limit ${TESTS_S}s)" | tee -a "$OUT/pytest-gpu.txt"
elif [ "${SKIP_TESTS:-0}" != 1 ]; then
  echo "gpu tests: not run, ${TESTS_S}s left" | tee "$OUT/pytest-gpu.txt"
fi
pack

# 2b. the same-mask FlexAttention references of the fixed patterns (their mechanisms ran in 1a)
MASK_MODELS="${MASK_MODELS:-flex_mask:image_transformer,flex_mask:sparse_transformer,flex_mask:axial_transformer,flex_mask:longformer,flex_mask:bigbird}"
if [ "${MASK:-1}" = 1 ]; then
  stage "same-mask references" cuda-mask "$(cap "${MASK_S:-90}" $(( $(left) - 30 )))" 40 \
    --modes fwdbwd --lengths "$LENGTHS" --models "$MASK_MODELS" --no-plots
fi

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
for run in cuda cuda-causal cuda-graphs cuda-mask; do
  if [ -f "$OUT/$run/bench.json" ]; then
    "$PY" -m efficient_transformers bench --from-json "$OUT/$run/bench.json" --no-plots \
      --out "${TMPDIR:-/tmp}/$run-summary" 2>&1 | grep -v "^wrote "
  fi
done
grep -E "^(FAILED|ERROR) " "$OUT/pytest-gpu.txt" 2>/dev/null | head -20
tail -n 2 "$OUT/pytest-gpu.txt" 2>/dev/null   # pytest's summary line, then the exit line
echo "cuda.sh: done in ${SECONDS}s (exit $status); results in $OUT/cuda"
exit $status
