#!/usr/bin/env bash
# The one prepared GPU call: build the extension with CUDA, run the GPU tests and the GPU
# benchmarks, and leave logs and results under $OUT (default benchmarks/results/gpu-run).
# Meant for the lent H100/H200 (torch 2.11 + triton 3.6, no network); under 8 minutes there.
#   bash benchmarks/gpu_check.sh
# Subsets: GPU_TEST_FILTER (pytest -k expression), GPU_BENCHMARKS ("module[:arg,arg] ..."),
# TEST_TIMEOUT / BENCH_TIMEOUT (seconds).
# What comes back: $OUT/run.log (everything printed) and $OUT/results.tgz (benchmarks/results/*gpu*).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-benchmarks/results/gpu-run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

run_all() {
  local status=0 start
  echo "== $(date -u +%FT%TZ) $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || true
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

  echo "== build (CUDA)"
  start=$SECONDS
  if TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
      $PY setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1; then
    echo "built in $((SECONDS - start)) s"
  else
    echo "BUILD FAILED"; tail -40 "$OUT/build.log"; status=1
  fi
  $PY -c "import retro_kernels as rk; print('cpu kernels', rk.has_cpu_kernels(), 'cuda kernels', rk.has_cuda_kernels())"

  echo "== tests (GPU; one Triton configuration)"
  start=$SECONDS
  RETRO_TRITON_AUTOTUNE=0 timeout ${TEST_TIMEOUT:-240} $PY -m pytest -q -p no:cacheprovider \
      tests/test_gpu.py -k "${GPU_TEST_FILTER:-}" || status=1
  echo "tests took $((SECONDS - start)) s"

  echo "== benchmarks (autotuned)"
  start=$SECONDS
  # each entry: module[:arg,arg,...]
  for entry in ${GPU_BENCHMARKS:-benchmarks.cca_gpu benchmarks.neighbour_attention benchmarks.model \
                 benchmarks.retrieval:--synthetic-database,1000000}; do
    bench=${entry%%:*}
    args=""
    [[ $entry == *:* ]] && args=${entry#*:} && args=${args//,/ }
    echo "-- $bench $args"
    # shellcheck disable=SC2086
    timeout ${BENCH_TIMEOUT:-300} $PY -m "$bench" $args "$@" || { echo "$bench FAILED"; status=1; }
  done
  echo "benchmarks took $((SECONDS - start)) s"
  return $status
}

run_all "$@" 2>&1 | tee "$OUT/run.log"
status=${PIPESTATUS[0]}
tar czf "$OUT/results.tgz" -C benchmarks/results $(cd benchmarks/results && ls | grep -E "gpu" | grep -v "^gpu-run$") 2>/dev/null
exit $status
