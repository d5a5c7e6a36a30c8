#!/usr/bin/env bash
# What the GPU machine runs (one H100 here; no vLLM there): GPU tests and data-plane benchmarks.
# Wheels for what it lacks travel in .whl/ (see the device notes in BENCHMARKS.md); rebuild the
# weightsync wheel first: .venv/bin/pip wheel . --no-deps -w .whl
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/out}
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(), 'gpus', torch.cuda.device_count())"
[ -n "${SKIP_TESTS:-}" ] || python3 -m pytest tests/dataplane/test_gpu.py -v -p no:cacheprovider --durations=5 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
for shape in ${SHAPES:-qwen2.5-0.5b qwen2.5-1.5b llama-8b}; do
  iters=5; [ "$shape" = llama-8b ] && iters=3
  SECONDS=0
  timeout ${BENCH_TIMEOUT:-400} python3 bench/transfer.py --transport cuda_ipc --receivers 1 --shape "$shape" --iters $iters \
    --bucket-size-bytes ${BUCKETS:-268435456,1073741824} --json "$OUT/cuda_ipc_$shape.json" > "$OUT/cuda_ipc_$shape.log" 2>&1; tail -3 "$OUT/cuda_ipc_$shape.log"
  echo "$shape took $SECONDS s"
done
