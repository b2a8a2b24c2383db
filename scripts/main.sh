#!/usr/bin/env bash
# The main job: sets up (or reuses) the environment, then runs the CCA CPU benchmark on its default
# shapes (results in benchmarks/results/). Extra arguments go to the benchmark.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$RETRO_ROOT"
exec python -m benchmarks.cca_cpu "$@"
