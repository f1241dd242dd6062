#!/usr/bin/env bash
# Set up, then run the whole test suite on 2 workers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
# Static checks first: they take seconds and catch what tests might not reach.
python3 -m ruff check shardckpt tests benchmarks launch
python3 -m mypy shardckpt
exec python3 -m pytest -n 2 -p no:benchmark -q "$@"
