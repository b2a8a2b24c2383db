#!/usr/bin/env bash
# AddressSanitizer check of the compiled ops: builds retro_kernels._C with -fsanitize=address into
# build/asan/ (the normal in-place build is untouched), stages the Python package with that
# extension in build/asan/stage/, and runs tests/kernels/test_op_boundaries.py there with libasan
# preloaded, so that any read or write past the end of a tensor argument aborts the run with a
# report. Extra arguments go to pytest.
#   bash scripts/asan_check.sh                  # from an activated environment, or it sets one up
# About 5-10 minutes on 2 CPU cores (the build dominates), so CI does not run it.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${VIRTUAL_ENV:-}" ]; then
  . "$ROOT/scripts/env.sh"
fi
cd "$ROOT"
OUT=build/asan
LIBASAN=$(${CXX:-c++} -print-file-name=libasan.so)
LIBSTDCXX=$(${CXX:-c++} -print-file-name=libstdc++.so)
[ -f "$LIBASAN" ] || { echo "[asan] libasan.so not found (gcc's AddressSanitizer runtime)" >&2; exit 1; }

echo "[asan] building retro_kernels._C with -fsanitize=address into $OUT"
# distutils adds CFLAGS/LDFLAGS to every compile and link (setup.py's own -O3 stays).
CFLAGS="-fsanitize=address -fno-omit-frame-pointer -g" LDFLAGS="-fsanitize=address" \
  RETRO_KERNELS_NO_CUDA=1 MAX_JOBS=${MAX_JOBS:-2} \
  python setup.py -q build_ext --build-temp "$OUT/temp" --build-lib "$OUT/lib" 2>&1 \
  | grep -vE "SetuptoolsDeprecationWarning|warnings.warn|^\s*$|!!|\*{5}|License|See https|project.license|By 20" || true
so=$(ls "$OUT"/lib/retro_kernels/_C*.so)

echo "[asan] staging the package with the instrumented extension"
rm -rf "$OUT/stage"
mkdir -p "$OUT/stage"
cp -r retro_kernels "$OUT/stage/"
find "$OUT/stage" -name "*.so" -delete
find "$OUT/stage" -name "__pycache__" -prune -exec rm -rf {} +
cp "$so" "$OUT/stage/retro_kernels/"

# libstdc++ is preloaded too: python itself does not link it, and ASan must find __cxa_throw when it
# starts (the ops throw c10::Error for bad arguments). Reports go to $OUT/report.* (pytest captures
# the test's stderr) and are printed below.
export LD_PRELOAD="$LIBASAN $LIBSTDCXX"
rm -f "$ROOT/$OUT"/report.*
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_odr_violation=0:log_path=$ROOT/$OUT/report"
export PYTHONPATH="$ROOT/$OUT/stage:$ROOT/python"
cd "$OUT/stage"
python - <<'EOF'
import retro_kernels._C as c
assert "/build/asan/stage/" in c.__file__, f"not the instrumented extension: {c.__file__}"
print(f"[asan] using {c.__file__}")
EOF
echo "[asan] running tests/kernels/test_op_boundaries.py under AddressSanitizer"
status=0
python -m pytest -q -p no:cacheprovider -c "$ROOT/pyproject.toml" --rootdir "$ROOT" \
  "$ROOT/tests/kernels/test_op_boundaries.py" "$@" || status=$?
if ls "$ROOT/$OUT"/report.* >/dev/null 2>&1; then
  cat "$ROOT/$OUT"/report.*
  echo "[asan] AddressSanitizer reported an error (above)" >&2
  exit 1
fi
[ "$status" -eq 0 ] || { echo "[asan] the tests failed (exit $status)" >&2; exit "$status"; }
echo "[asan] no AddressSanitizer report: ok"
