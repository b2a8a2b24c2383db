#!/usr/bin/env bash
# The GPU check: ONE command on a lent H100/H200 (CPython 3.12, torch 2.11 + triton 3.6, no network)
# that returns every GPU figure, figures first, in at most 480 s including the build.
#
# The command, as the device tool runs it (put this checkout's commit in RETRO_COMMIT: the copy of
# the working tree on the GPU machine may have no .git):
#   run  command   RETRO_COMMIT=<git rev-parse --short=10 HEAD> bash benchmarks/gpu_check.sh
#        timeout_s 560          (the script stops itself at CHECK_BUDGET_S=480 s and packs)
#        carry     [".gpu_carry"]   (run `bash scripts/gpu_carry.sh` here first: the wheels the GPU
#                                    machine lacks, the MiniLM model, the pinned corpus; sourced
#                                    through scripts/gpu_carry_use.sh before the tests and the demo)
# What comes back under $OUT, 2 files: gpu_check-gpu.tar.gz (rows.jsonl, info.txt, logs/<section>.log,
# results/ (each benchmark's .json/.md/.png), demo/ summary) and run.log (everything printed).
# Every row follows benchmarks/gpu_rows.py (described in benchmarks/README.md) and is appended to
# rows.jsonl by the benchmark as soon as it is measured; the tarball is re-packed after every
# section and on any exit (trap), so a cut run keeps what it finished. Read the figures with
#   python -m benchmarks.gpu_rows check gpu_check-gpu.tar.gz --profile gpu   # lists missing figures
#
# Sections, in order; each is time-boxed (timeout) to min(its box, time left - 15 s for packing):
#   section   box   expected on an H100 (source)
#   build     100   47-66 s (benchmarks/results/gpu_check-*.log, MAX_JOBS=16)       stops on failure
#                   0 s where .gpu_carry/ext holds an extension prebuilt from these sources that loads
#                   with CUDA kernels (GPU_CARRY_EXT in scripts/gpu_carry.sh)
#   cca        90   ~60 s (estimated: on 2026-11-26 the whole cca_gpu, with its decode rows and more
#                   impls, plus neighbour_attention took 123 s, autotuned; here 2 shapes x 9 rows:
#                   layer forward and forward+backward and bare forward, ours / SDPA / FlexAttention;
#                   FlexAttention compiles ~4 times per shape)
#   decode    130   ~100 s (estimated: 4 eager rows, ~5 s each with the encoder's first autotune,
#                   then 2 batch sizes x 2 compiled halves of the 172M step, inductor reduce-overhead,
#                   ~30-40 s per batch size; the compiled rows come last: the riskiest box)
#   training  120   ~80 s (estimated: 172M eager, then --compile: one fullgraph inductor compile of
#                   forward+backward, ~60 s; 1 + 2 + 10 steps of 8 x 2048 tokens, 145 ms each in
#                   results/model_gpu-nvidia-h100-80gb-hbm3.md)
#   tests     what is left, at most 150: benchmarks/gpu_tests.txt (most valuable first; 60 GPU tests
#                   took 87 s on 2026-11-26 with one Triton configuration, RETRO_TRITON_AUTOTUNE=0, as
#                   here) else tests/kernels/test_gpu.py
#   fsdp      60    optional: 172M sharded by fully_shard in a world of one (estimated ~30 s)
#   demo      what is left: optional, `retro demo --device cuda` (needs the carried MiniLM)
# Worst case the four figure sections take 440 s and the tests get the last ~20 s; expected (~310 s)
# the tests get their ~150 s and fsdp and the demo what is left, if anything.
#
# Rehearsal on the CPU (CI: .ci/run), the same script and sections with tiny shapes in < 3 min:
#   GPU_CHECK_REHEARSAL=1 bash benchmarks/gpu_check.sh      # -> $OUT/gpu_check-rehearsal.tar.gz
# there the build is only checked (the extension must be built), compiled rows use torch.compile's
# "eager" backend (dynamo's fullgraph trace without code generation; no CUDA graphs), FlexAttention
# runs uncompiled (no backward on the CPU: that row records the error), the tests are only
# collected (every listed id must exist), and the demo runs a few steps with BM25 if time is left.
# Knobs: OUT (default benchmarks/results/gpu-run), CHECK_BUDGET_S, GPU_SECTIONS (a subset, in this
# order), the boxes BUILD_S CCA_S DECODE_S TRAIN_S TESTS_S FSDP_S, PYTHON, DEMO_STEPS, DEMO_ARGS,
# TESTS_AUTOTUNE, GPU_TESTS_LIST (default benchmarks/gpu_tests.txt). The figure sections autotune (benchmarks/gpu_env.sh, sourced where it exists, may
# shortlist the configurations and share the compile caches).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
REHEARSAL=${GPU_CHECK_REHEARSAL:-0}
if [ "$REHEARSAL" = 1 ]; then
  PROFILE=rehearsal BUDGET=${CHECK_BUDGET_S:-170}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # tiny shapes on busy cores: a second thread only spin-waits
else
  PROFILE=gpu BUDGET=${CHECK_BUDGET_S:-480}
fi
SECTIONS=${GPU_SECTIONS:-build cca decode training tests fsdp demo}
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results/gpu-run}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")  # everything but run.log and the tarball: not under $OUT
mkdir -p "$WORK/logs" "$WORK/results"
DEMO_DIR=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_demo.XXXXXX")  # the demo's database and runs: not packed
TARBALL=$OUT/gpu_check-$PROFILE.tar.gz
rm -f "$TARBALL" && : > "$OUT/run.log"
START=$SECONDS
STATUS=0
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT:$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
export RETRO_GPU_ROWS=$WORK/rows.jsonl RETRO_RESULTS_DIR=$WORK/results
export RETRO_COMMIT=${RETRO_COMMIT:-$(git rev-parse --short=10 HEAD 2>/dev/null || echo unknown)}
# run.log gets everything; its tee ignores INT/TERM, so that the trap's last lines and packing get through
exec > >(trap '' INT TERM; exec tee -a "$OUT/run.log") 2>&1

left() { echo $((BUDGET - (SECONDS - START))); }
has() { [[ " $SECTIONS " == *" $1 "* ]]; }
pack() {  # the run so far -> one tarball under $OUT (written aside, then renamed)
  cp "$OUT/run.log" "$WORK/run.log" 2>/dev/null
  tar -czf "$TARBALL.tmp" -C "$WORK" . && mv -f "$TARBALL.tmp" "$TARBALL"
}
finish() {  # STATUS: set by each failing step (a cut optional section is no failure)
  trap - EXIT
  if [ -s "$RETRO_GPU_ROWS" ]; then
    "$PY" -m benchmarks.gpu_rows check "$RETRO_GPU_ROWS" --profile "$PROFILE" || STATUS=1
  else
    echo "== no rows were written"; STATUS=1
  fi
  echo "== done in $((SECONDS - START)) s (budget $BUDGET s), status $STATUS; $TARBALL"
  pack
  rm -rf "$WORK" "$DEMO_DIR"
  exit "$STATUS"
}
trap finish EXIT
CHILD=
trap 'echo "== interrupted"; [ -n "$CHILD" ] && kill -TERM "$CHILD" 2>/dev/null; STATUS=130; exit 130' INT TERM

optional() {  # optional NAME BOX COMMAND...: a section whose cut (timeout) does not fail the run
  section "$@"
  case $? in 0|124|137) ;; *) STATUS=1 ;; esac
}
section() {  # section NAME BOX_SECONDS COMMAND...: time-boxed, logged to logs/NAME.log, then packed
  local name=$1 box=$2 limit t0=$SECONDS rc
  shift 2
  limit=$(( $(left) - 15 ))
  if [ "$limit" -lt 10 ]; then echo "== $name: SKIPPED, $(left) s left"; return 0; fi  # a missing figure fails
  [ "$box" -lt "$limit" ] && limit=$box
  echo "== $name (box $limit s, $(left) s left) $(date -u +%T)"
  # in the background, waited for: a signal to this script is handled at once (the trap stops it)
  timeout -k 5 "$limit" "$@" > >(tee "$WORK/logs/$name.log") 2>&1 &
  CHILD=$!
  wait "$CHILD"
  rc=$?
  CHILD=
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && echo "== $name: CUT at $limit s"
  echo "== $name: exit $rc in $((SECONDS - t0)) s"
  pack
  return "$rc"
}

echo "== $(date -u +%FT%TZ) gpu_check, profile $PROFILE, budget $BUDGET s, sections: $SECTIONS"
# shared compile/autotune caches and the Triton autotune shortlist (benchmarks/gpu_env.sh, where it exists)
# shellcheck disable=SC1091
[ -f benchmarks/gpu_env.sh ] && . benchmarks/gpu_env.sh
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>/dev/null
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', \
torch.version.cuda); import triton; print('triton', triton.__version__)"
  echo "commit $RETRO_COMMIT"; env | grep -E '^(RETRO|TRITON|TORCHINDUCTOR)_' | sort
} 2>&1 | tee "$WORK/info.txt"

prebuilt() {  # a carried extension (scripts/gpu_carry.sh) for this Python, built from these sources, with CUDA kernels
  local so
  so=.gpu_carry/ext/_C.$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("SOABI"))').so
  [ -f "$so" ] && [ "$(cat .gpu_carry/ext/csrc.hash 2>/dev/null)" = "$(bash scripts/csrc_hash.sh)" ] || return 1
  cp "$so" retro_kernels/ && "$PY" -c "import retro_kernels as rk; assert rk.has_cuda_kernels()" 2>/dev/null
}
if has build; then
  if [ "$PROFILE" = gpu ] && prebuilt; then
    echo "== build: the carried extension loads with CUDA kernels (sources $(bash scripts/csrc_hash.sh)): not rebuilt"
  elif [ "$PROFILE" = gpu ]; then
    section build "${BUILD_S:-100}" env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" \
      MAX_JOBS="${MAX_JOBS:-16}" RETRO_KERNELS_REQUIRE_CUDA=1 "$PY" setup.py -q build_ext --inplace
  else  # the rehearsal checks that the CPU build made the extension (cca's rows say which backend ran)
    section build "${BUILD_S:-10}" bash -c 'ls retro_kernels/_C*.so'
  fi || { echo "BUILD FAILED: stopping (nothing after it would measure the fused kernels)"; STATUS=1; exit 1; }
  if [ "$PROFILE" = gpu ] && ! "$PY" -c "import retro_kernels as rk; assert rk.has_cuda_kernels()"; then
    echo "the extension has no CUDA kernels: stopping"; STATUS=1; exit 1
  fi
fi
# the figures: each benchmark appends its rows to $RETRO_GPU_ROWS as it measures them
# the rehearsal's boxes: its figure sections need ~35 s of CPU time in all, but 2 cores shared by a
# dozen processes stretch that 3-4x; they get most of its 170 s, the collection of the tests the rest
if [ "$PROFILE" = gpu ]; then boxes=(90 130 120); else boxes=(40 60 50); fi
has cca && { section cca "${CCA_S:-${boxes[0]}}" "$PY" -m benchmarks.cca_gpu --profile "$PROFILE" || STATUS=1; }
has decode && { section decode "${DECODE_S:-${boxes[1]}}" "$PY" -m benchmarks.decode --profile "$PROFILE" || STATUS=1; }
has training && { section training "${TRAIN_S:-${boxes[2]}}" "$PY" -m benchmarks.training --profile "$PROFILE" \
  --modes eager,compile || STATUS=1; }

# what the GPU machine lacks (wheels, the MiniLM model, the corpus), where .gpu_carry/ came along
# shellcheck disable=SC1091
[ -f scripts/gpu_carry_use.sh ] && . scripts/gpu_carry_use.sh
if has tests; then
  # the curated list (one pytest id or file a line, most valuable first, # comments), else test_gpu.py
  ids=() list=${GPU_TESTS_LIST:-benchmarks/gpu_tests.txt}
  [ -f "$list" ] && mapfile -t ids < <(sed -e 's/#.*//' -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' "$list" \
    | grep -v '^$')
  [ "${#ids[@]}" -gt 0 ] || ids=(tests/kernels/test_gpu.py)
  if [ "$PROFILE" = gpu ]; then
    # one Triton configuration per kernel (RETRO_TRITON_AUTOTUNE=0): the tests check results, not speed
    section tests "${TESTS_S:-150}" env RETRO_TRITON_AUTOTUNE="${TESTS_AUTOTUNE:-0}" \
      "$PY" -m pytest -v -p no:cacheprovider --durations=10 "${ids[@]}" || STATUS=1
  else  # the rehearsal: every listed test must exist (a wrong id would waste the GPU's minutes)
    section tests "${TESTS_S:-30}" "$PY" -m pytest -q -p no:cacheprovider --collect-only "${ids[@]}" || STATUS=1
  fi
fi
# optional, with the time left
has fsdp && optional fsdp "${FSDP_S:-$([ "$PROFILE" = gpu ] && echo 60 || echo 25)}" "$PY" -m benchmarks.training \
  --profile "$PROFILE" --modes fsdp
if has demo; then
  mkdir -p "$WORK/demo"
  if [ "$PROFILE" = gpu ]; then
    # shellcheck disable=SC2086
    optional demo "$(left)" "$PY" -m retro demo --device cuda --out "$DEMO_DIR" \
      --steps "${DEMO_STEPS:-150}" ${DEMO_ARGS:-}
  else
    # shellcheck disable=SC2086
    optional demo "$(left)" "$PY" -m retro demo --device cpu --out "$DEMO_DIR" --steps 2 \
      --max-documents 30 --embedder bm25 --eval-documents 2 --eval-tokens 256 ${DEMO_ARGS:-}
  fi
  cp "$DEMO_DIR"/summary.* "$WORK/demo/" 2>/dev/null || echo "== demo: no summary"
fi
