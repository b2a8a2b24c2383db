#!/usr/bin/env bash
# Prints a short hash of what the compiled extension is built from (setup.py and csrc/): a carried,
# prebuilt extension (scripts/gpu_carry.sh) is used only where this hash matches the one it was built at.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck disable=SC2046
cat setup.py $(find csrc -type f | sort) | sha1sum | cut -c1-16
