#!/usr/bin/env bash
# Set up, then run the whole test suite on 2 workers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
exec python3 -m pytest -n 2 -p no:benchmark -q "$@"
