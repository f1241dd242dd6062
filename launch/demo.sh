#!/usr/bin/env bash
# The main job: set up, then
#   1. train a small transformer LM with FSDP2 on 2 ranks, async checkpoints every 5 steps (reference);
#   2. the same job, but rank 1 is SIGKILLed at step 17: torchrun --max-restarts brings the group back,
#      it resumes from the latest committed checkpoint, and its final parameters must be bit-identical;
#   3. restart from that job's last checkpoint on 3 ranks: the state re-shards and training goes on;
#   4. node loss: two torchrun agents ("nodes") of 2 workers; one is SIGKILLed mid-save, the other goes
#      on at 2 ranks, a replacement joins and the job grows back to 4 (launch/node_loss.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
out="${DEMO_DIR:-runs/demo}"
rm -rf "$out" && mkdir -p "$out"
export OMP_NUM_THREADS=1
# torchrun shares its rendezvous store with the workers by default, and after a restart the workers
# can read the previous attempt's addresses (pytorch/pytorch#135712); a store of their own avoids it.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
run() { torchrun --standalone "$@" 2> >(grep -vE "Warning|warn\(|^\s*$" >&2); }
train="launch/train.py --steps 30 --save-interval 5"

echo "== 1. reference run: 2 ranks, 30 steps, no failure"
run --nproc_per_node=2 $train --ckpt "$out/reference" --final "$out/reference.json"
echo "== 2. elastic run: rank 1 is SIGKILLed at step 17; torchrun restarts the group"
run --nproc_per_node=2 --max-restarts=1 $train --ckpt "$out/elastic" --crash-at 17 --final "$out/elastic.json" \
  2>/dev/null
python3 launch/compare.py "$out/reference.json" "$out/elastic.json"
echo "== 3. re-sharded restart: the elastic run's checkpoint goes on at 3 ranks to step 40"
run --nproc_per_node=3 launch/train.py --steps 40 --save-interval 5 --ckpt "$out/elastic" --final "$out/resharded.json"
python3 -c "import shardckpt, sys; r = shardckpt.verify(sys.argv[1]); print(f'[verify] {r.path}: {r.blocks} blocks, {r.bytes_raw/1e6:.2f} MB raw, {r.bytes_stored/1e6:.2f} MB stored')" "$out/elastic/step-00000040"
echo "== 4. node loss: two agents of 2 workers; one node dies mid-save, the job shrinks to 2 ranks, then grows back to 4"
python3 launch/node_loss.py --out "$out/node_loss" --memory-every 1 2> >(grep -vE "Warning|warn\(|^\s*$" >&2) | grep "^\[node-loss\]"
