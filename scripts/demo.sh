#!/usr/bin/env bash
# The main job from a fresh machine: set-up, then an end-to-end weight sync into two
# real local vLLM engines on CPU (coordinator, trainer and engines in separate processes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/weightsync demo "$@"
