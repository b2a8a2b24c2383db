#!/usr/bin/env bash
# The test command: sets up (or reuses) the environment, then runs the whole suite.
# Without a GPU, Triton kernels run under the interpreter and GPU tests skip.
# Extra arguments go to pytest (e.g. scripts/test.sh -k decode). It ends with the 15 slowest tests.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$RETRO_ROOT"
exec python -m pytest -q --durations=15 "$@"
