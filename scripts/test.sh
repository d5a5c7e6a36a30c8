#!/usr/bin/env bash
# The whole test suite from a fresh machine: set-up, generated-code check, pytest
# (fast and slow tests: real gRPC, real gloo groups, real vLLM engines, real signals),
# then the docker compose test unless WEIGHTSYNC_SKIP_DOCKER=1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PYTHON=.venv/bin/python bash scripts/gen_proto.sh --check
export PATH="$PWD/.venv/bin:$PATH"
.venv/bin/python -m pytest -q -ra "$@"
if [[ "${WEIGHTSYNC_SKIP_DOCKER:-0}" != "1" && -f docker/compose-test.sh ]]; then
  bash docker/compose-test.sh
fi
