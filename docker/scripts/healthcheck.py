"""Container health checks for the compose services; exit 0 when healthy, 1 otherwise.

  healthcheck.py grpc HOST:PORT [SERVICE]     grpc.health.v1 Check answers SERVING
  healthcheck.py http URL                     URL answers 2xx
  healthcheck.py daemon HOST:PORT DAEMON_ID   the coordinator lists DAEMON_ID as idle or updating

One process per check, so compose health checks need no grpcurl in the images.
"""

from __future__ import annotations

import sys
import urllib.request

import grpc

TIMEOUT_S = 3.0


def _check_grpc(target: str, service: str = "") -> str | None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S
        )
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"{target} health {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}: expected SERVING"
    return None


def _check_http(url: str) -> str | None:
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as reply:
        if not 200 <= reply.status < 300:
            return f"{url} answered {reply.status}: expected 2xx"
    return None


def _check_daemon(target: str, daemon_id: str) -> str | None:
    from weightsync.v1 import weightsync_pb2, weightsync_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        reply = weightsync_pb2_grpc.InspectionServiceStub(channel).ListDaemons(
            weightsync_pb2.ListDaemonsRequest(), timeout=TIMEOUT_S
        )
    ready = (weightsync_pb2.DAEMON_STATE_IDLE, weightsync_pb2.DAEMON_STATE_UPDATING)
    for daemon in reply.daemons:
        if daemon.daemon_id == daemon_id:
            if daemon.state in ready:
                return None
            return f"daemon {daemon_id} is {weightsync_pb2.DaemonState.Name(daemon.state)}: expected IDLE or UPDATING"
    return f"daemon {daemon_id} is not registered with {target} (registered: {[d.daemon_id for d in reply.daemons]})"


_CHECKS = {"grpc": _check_grpc, "http": _check_http, "daemon": _check_daemon}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in _CHECKS:
        print(f"usage: healthcheck.py {{{'|'.join(_CHECKS)}}} ARGS...", file=sys.stderr)
        return 2
    try:
        problem = _CHECKS[argv[0]](*argv[1:])
    except Exception as e:  # process boundary: any failure means "not healthy yet"
        problem = f"{argv[0]} check failed: {type(e).__name__}: {e}"
    if problem:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
