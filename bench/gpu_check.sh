#!/usr/bin/env bash
# The GPU runbook: install offline, check correctness on the GPU, then measure speed, in about six minutes
# on an H100. Options and sections: bench/gpu_check.py (--dry-run, --fetch-wheels, --only, --jobs).
set -uo pipefail
cd "$(dirname "$0")/.."
exec "$(command -v python || command -v python3)" bench/gpu_check.py "$@"
