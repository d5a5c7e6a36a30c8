#!/usr/bin/env bash
# What the GPU machine runs (one H100 here; no vLLM there): GPU tests and data-plane benchmarks.
# Wheels for what it lacks travel in .whl/ (see the device notes in BENCHMARKS.md).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/out}
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(), 'gpus', torch.cuda.device_count())"
python3 -m pytest tests/dataplane/test_gpu.py -v -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
python3 bench/apply_path.py --device cuda --shape qwen2.5-1.5b --json "$OUT/apply_path_h100.json" | tail -12
python3 bench/transfer.py --transport cuda_ipc --receivers 1 --shape qwen2.5-1.5b --iters 3 --json "$OUT/cuda_ipc_h100.json" 2>&1 | tail -25
