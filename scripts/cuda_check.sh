#!/usr/bin/env bash
# The CUDA build check, without a GPU: builds the whole extension retro_kernels._C with its CUDA
# kernels and their torch glue (csrc/sources.txt: [cpu] + [cuda] + [cuda-glue]), for sm_80 and
# sm_90a, linked against a CUDA build of torch, exactly as `pip install` does on a GPU machine;
# then loads it and checks that the CUDA kernels are registered. Fails if any source is missing,
# does not compile or does not link. .ci/run calls it; it prints what it built.
#
# The CUDA torch lives in an environment of its own, used only here (the project's .venv keeps
# the CPU torch): torch 2.11.0 (CUDA 13.0) with triton 3.6.0, the versions of the lent GPU
# machines. It is created once outside the clone and reused by later runs on this machine:
#   RETRO_CUDA_ENV     where (default: ~/.cache/retro-kernels/cuda-torch-2.11.0)
#   RETRO_CUDA_TORCH   the torch requirement (default: torch==2.11.0)
#   RETRO_CUDA_TESTS   pytest arguments run with that environment after the build (torch 2.11 and
#                      triton 3.6 on the CPU: the sm_90 Triton compile test, the ops' tests, and a
#                      smoke test of the model and of FSDP2's fully_shard on one gloo rank, a few
#                      seconds); "none" skips them
# torch 2.11 is the lowest torch pyproject.toml accepts (torch>=2.11, triton>=3.6): this is where
# that bound is tested.
# Needs nvcc (CUDA 13, matching torch's CUDA) on PATH or in CUDA_HOME.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
TORCH_REQ=${RETRO_CUDA_TORCH:-torch==2.11.0}
ENV_DIR=${RETRO_CUDA_ENV:-${XDG_CACHE_HOME:-$HOME/.cache}/retro-kernels/cuda-${TORCH_REQ//==/-}}
BUILD=$ROOT/build/cuda-check
ARCHS="8.0;9.0a"   # kept in step with CUDA_ARCHS in setup.py

# The CUDA toolkit: CUDA_HOME, else the one holding nvcc's real binary, else /usr/local/cuda.
if [ -z "${CUDA_HOME:-}" ]; then
  for home in "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /nonexistent)")")")" /usr/local/cuda; do
    [ -x "$home/bin/nvcc" ] && [ -d "$home/include" ] && [ -f "$home/include/cuda_runtime.h" ] && { CUDA_HOME=$home; break; }
  done
fi
[ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ] \
  || { echo "cuda_check: no CUDA toolkit found (set CUDA_HOME; nvcc on PATH: $(command -v nvcc || echo none))" >&2; exit 1; }
export CUDA_HOME

PACKAGES=("$TORCH_REQ" "setuptools>=77,<82" wheel ninja pybind11 "numpy<2.4" pytest hypothesis)
stamp="$ENV_DIR/.ready-$(echo "${PACKAGES[*]}" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then  # no stamp: never made, or cut short; made anew (a venv cannot move)
  echo "[cuda_check] creating $ENV_DIR ($TORCH_REQ, CUDA build; once per machine)"
  rm -rf "$ENV_DIR"
  mkdir -p "$(dirname "$ENV_DIR")"
  "${PYTHON:-python3}" -m venv "$ENV_DIR"
  "$ENV_DIR/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
  "$ENV_DIR/bin/python" -m pip install -q "${PACKAGES[@]}" 2>&1 | grep -v "is ignored" || true
  "$ENV_DIR/bin/python" -c "import torch; assert torch.version.cuda, 'not a CUDA build of torch'"
  touch "$stamp"  # written last: its presence means the environment is complete
fi
PY="$ENV_DIR/bin/python"
"$PY" -c "import torch, triton; print(f'[cuda_check] torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}')"
nvcc_bin=$CUDA_HOME/bin/nvcc
echo "[cuda_check] $("$nvcc_bin" --version | tail -1)"

rm -rf "$BUILD"
mkdir -p "$BUILD"
start=$SECONDS
# RETRO_KERNELS_REQUIRE_CUDA: setup.py fails instead of quietly building a CPU-only extension.
if ! (PATH="$(dirname "$nvcc_bin"):$ENV_DIR/bin:$PATH" RETRO_KERNELS_REQUIRE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCHS" \
      MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py -q build --build-base "$BUILD" > "$BUILD/build.log" 2>&1); then
  grep -E "error|Error|FAILED|missing" "$BUILD/build.log" | head -40 >&2
  echo "[cuda_check] BUILD FAILED (full log: $BUILD/build.log)" >&2
  exit 1
fi
LIB=$(ls -d "$BUILD"/lib.*)
SO=$(ls "$LIB"/retro_kernels/_C*.so)
echo "[cuda_check] built in $((SECONDS - start)) s: ${SO#$ROOT/} ($(du -h "$SO" | cut -f1))"
echo "[cuda_check] compiled:"
grep -oE "(-c|\[[0-9]+/[0-9]+\] [^ ]+) [^ ]*csrc/[^ ]+\.(cpp|cu)" "$BUILD/build.log" | grep -oE "csrc/[^ ]+" | sort -u | sed 's/^/  /'
# The device code in the library: the toolkit's cuobjdump, else the one triton ships.
cuobj=$(command -v cuobjdump || true)
[ -n "$cuobj" ] || cuobj=$("$PY" -c "import os, triton; print(os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'cuobjdump'))")
[ -x "$cuobj" ] || { echo "[cuda_check] no cuobjdump to list the device code" >&2; exit 1; }
archs=$("$cuobj" --dump-sass "$SO" 2>/dev/null | grep -oE "arch = sm_[0-9]+a?" | cut -d' ' -f3 | sort -u | tr '\n' ' ')
echo "[cuda_check] device code for: $archs"
for arch in sm_80 sm_90a; do
  [[ " $archs " == *" $arch "* ]] || { echo "[cuda_check] no $arch code in $SO" >&2; exit 1; }
done
# Loads it (torch's CUDA libraries load without a GPU) and checks every op has its CUDA kernel.
(cd "$BUILD" && PYTHONPATH="$LIB" "$PY" - <<'PY'
import torch
import retro_kernels
from retro_kernels import _C
assert retro_kernels.__file__.startswith(__import__("os").environ["PYTHONPATH"]), retro_kernels.__file__
assert _C.cuda_kernels_compiled(), "the extension was built without its CUDA kernels"
ops = [name for name in torch._C._dispatch_get_all_op_names() if name.startswith("retro_kernels::")]
cuda = sorted(op for op in ops if torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"))
cpu = sorted(op for op in ops if torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"))
print(f"[cuda_check] loaded: {len(ops)} ops, CPU kernels: {', '.join(cpu)}; CUDA kernels: {', '.join(cuda)}")
assert cuda, "no retro_kernels op has a CUDA kernel"
PY
)

tests=${RETRO_CUDA_TESTS:-tests/kernels/test_triton_compile.py tests/kernels/test_op_boundaries.py
  tests/kernels/test_chunked_cross_attention_triton.py tests/retro/model/test_model.py::test_backends_agree
  tests/retro/model/test_model.py::test_retro_off_and_on_differ_and_encoder_runs_once
  tests/retro/training/test_fsdp.py::test_sharded_layers_run_through_fsdp_with_checkpointing}
if [ "$tests" != "none" ]; then
  echo "[cuda_check] tests with torch $("$PY" -c 'import torch; print(torch.__version__)') and this build, on the CPU: $tests"
  # Run from $BUILD, not the repository root: `python -m` puts the working directory on sys.path, and
  # the root's retro_kernels would hide the one built here (pytest's importlib mode adds nothing).
  # shellcheck disable=SC2086
  (cd "$BUILD" && PYTHONPATH="$LIB:$ROOT/python" "$PY" -m pytest -q -p no:cacheprovider --rootdir "$ROOT" \
     -c "$ROOT/pyproject.toml" ${tests//tests\//$ROOT/tests/})
fi
echo "[cuda_check] ok"
