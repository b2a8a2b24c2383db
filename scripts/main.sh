#!/usr/bin/env bash
# The main job: sets up (or reuses) the environment, then runs `retro demo`: the whole RETRO
# pipeline on the model sources of transformers 5.24.0 (pinned) (database, RETRO and a baseline trained
# for the same time, bits per byte with and without retrieval, by overlap and without near-
# duplicates, generation with the retrieved neighbours). Extra arguments go to the demo
# (e.g. --steps 900, --seed 1, --corpus DIR, --out runs/mine).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$RETRO_ROOT"
exec python -m retro demo "$@"
