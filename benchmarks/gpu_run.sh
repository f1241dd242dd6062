#!/usr/bin/env bash
# GPU checks (issue 11, item 7) in one command on a GPU machine: the gpu-marked tests, then
# bench.py --device cuda at 1 GiB per rank of the issue's state (bf16 weights + two Adam moments as
# DTensors, one rank per GPU, a "cpu:gloo,cuda:nccl" group). Logs and results go under $OUT
# (default benchmarks/out/gpu): env.txt, gpu_tests.log, bench.log, bench/results.{md,json}, chart.png.
#
# The device machine's python3 (3.12) has torch with CUDA, numpy, xxhash and tqdm but not zstandard,
# and cannot fetch anything: carry the wheel. Once, here, in the repo root (.whl/ is git-ignored):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl zstandard==0.25.0
#
# then run it there with the device tool: command "bash benchmarks/gpu_run.sh", carry [".whl"],
# timeout_s 600. It fits inside that limit: the tests are capped at 4 minutes, the benchmark at 5.5.
# shardckpt is used from this checkout (PYTHONPATH), not installed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/benchmarks/out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ! python3 -c "import zstandard" 2>/dev/null; then
    if ! ls .whl/zstandard-*.whl >/dev/null 2>&1; then
        echo "zstandard is missing and there is no .whl/zstandard-*.whl to install it from (see this script's header)"
        exit 2
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
    nvidia-smi
    python3 -c "import sys, torch, zstandard, xxhash; print(sys.version); print('torch', torch.__version__, \
'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count(), 'zstandard', zstandard.__version__)"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")
if [ "${GPUS:-0}" -lt 1 ]; then
    echo "no CUDA device visible to torch"
    exit 2
fi

status=0
# Only the files that hold gpu-marked tests: collecting the whole suite would import the S3 tests'
# moto, which the image lacks.
timeout 240 python3 -m pytest -p no:cacheprovider -q -rs -m gpu \
    tests/dist/test_gpu.py tests/faults/test_async.py tests/unit/test_replica_digest.py 2>&1 | tee "$OUT/gpu_tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

# One rank per GPU (NCCL refuses two ranks on one device); the re-sharded load uses one rank fewer
# where there are several GPUs. The checkpoints go to /tmp, never under $OUT (they would travel back).
RESHARD=$((GPUS > 1 ? GPUS - 1 : 1))
rm -rf /tmp/shardckpt-gpu-bench
timeout 330 python3 benchmarks/bench.py --device cuda --ranks "$GPUS" --reshard-to "$RESHARD" --mb-per-rank 1024 \
    --dtype bf16 --repeats 3 --warmup 1 --out "$OUT/bench" --work /tmp/shardckpt-gpu-bench 2>&1 | tee "$OUT/bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
rm -rf /tmp/shardckpt-gpu-bench
[ -f "$OUT/bench/chart.png" ] && mv "$OUT/bench/chart.png" "$OUT/chart.png"
exit $status
