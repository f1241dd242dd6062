#!/usr/bin/env bash
# The main job: set up, then save from a 4-rank torchrun job and restore it into 2 and 3 ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
out="${DEMO_DIR:-runs/demo}"
rm -rf "$out" && mkdir -p "$out"
export OMP_NUM_THREADS=1
torchrun --standalone --nproc_per_node=4 launch/reshard_demo.py save "$out/ckpt"
torchrun --standalone --nproc_per_node=2 launch/reshard_demo.py load "$out/ckpt"
torchrun --standalone --nproc_per_node=3 launch/reshard_demo.py load "$out/ckpt"
