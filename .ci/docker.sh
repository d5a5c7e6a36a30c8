#!/usr/bin/env bash
# CI piece: the docker compose test, timed. Called from .ci/run.
#
#   .ci/docker.sh          build the images, then run docker/compose-test.sh
#   .ci/docker.sh build    only build (docker, base image, wheelhouse, images)
#   .ci/docker.sh test     only the compose test, on images already built
#
# WEIGHTSYNC_SKIP_DOCKER=1 skips it (exit 0). Needs root on a machine without
# docker: compose-test.sh installs docker.io/docker-compose and starts dockerd.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${WEIGHTSYNC_SKIP_DOCKER:-0}" == "1" ]]; then
  echo "ci: docker compose test skipped (WEIGHTSYNC_SKIP_DOCKER=1)"
  exit 0
fi
t0=$(date +%s)
case "${1:-all}" in
  build)
    WEIGHTSYNC_BUILD_ONLY=1 bash docker/compose-test.sh
    echo "ci: docker images built in $(( $(date +%s) - t0 )) s" ;;
  test)
    WEIGHTSYNC_SKIP_BUILD=1 bash docker/compose-test.sh
    echo "ci: docker compose test $(( $(date +%s) - t0 )) s" ;;
  all)
    bash docker/compose-test.sh
    echo "ci: docker build + compose test $(( $(date +%s) - t0 )) s" ;;
  *)
    echo "usage: .ci/docker.sh [build|test]" >&2
    exit 2 ;;
esac
