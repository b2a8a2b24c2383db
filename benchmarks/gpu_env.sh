# The GPU run's environment, to source before its commands (benchmarks/gpu_check.sh does):
#   . benchmarks/gpu_env.sh
# Every process of the run (the tests, each benchmark, training) then shares one on-disk cache, so
# what one process compiled or tuned the next one loads instead of compiling or tuning again:
#   triton/     Triton's compiled kernels (TRITON_CACHE_DIR), and with TRITON_CACHE_AUTOTUNING=1
#               the autotuner's timings per key, so a benchmark process reuses another's choice
#   inductor/   torch.compile's FX-graph and AOT-autograd caches and inductor's own kernels
# Knobs (set before sourcing to change them):
#   GPU_CACHE_DIR           the folder (default /tmp/retro-gpu-cache; one per run, kept between
#                           calls on a machine that stays warm, so a second call starts warm)
#   RETRO_TRITON_AUTOTUNE   what the fused kernels' autotuner times per (dtype, head_dim, q_rows):
#                           shortlist (default: 2-3 configurations), full (the whole space), 0 (the
#                           shortlist's first, not timed; what the test section uses)
# Sourced by bash; sets nothing else and changes no directory.
GPU_CACHE_DIR=${GPU_CACHE_DIR:-/tmp/retro-gpu-cache}
mkdir -p "$GPU_CACHE_DIR/triton" "$GPU_CACHE_DIR/inductor"
export GPU_CACHE_DIR
export TRITON_CACHE_DIR="$GPU_CACHE_DIR/triton"
export TRITON_CACHE_AUTOTUNING=1
export TORCHINDUCTOR_CACHE_DIR="$GPU_CACHE_DIR/inductor"
export TORCHINDUCTOR_FX_GRAPH_CACHE=1
export TORCHINDUCTOR_AUTOGRAD_CACHE=1
export RETRO_TRITON_AUTOTUNE=${RETRO_TRITON_AUTOTUNE:-shortlist}
