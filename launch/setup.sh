#!/usr/bin/env bash
# Install shardckpt and its test tools. torch is pinned to the CPU build first: an unpinned torch
# would pull the multi-GB CUDA build on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check "torch==2.13.0" -e ".[test]" 2>&1 | grep -v "^WARNING: Running pip as" || true
python3 -c "import torch, shardckpt; print('shardckpt', shardckpt.__version__, 'torch', torch.__version__)"
