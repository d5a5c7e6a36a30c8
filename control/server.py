"""The coordinator's gRPC server: weightsync.v1 services, health, reflection, metrics."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
from collections.abc import Sequence

import grpc
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from weightsync.control.auth import OPEN_PREFIXES, TokenAuthInterceptor
from weightsync.control.coordinator import Coordinator, CoordinatorConfig
from weightsync.control.errors_interceptor import ErrorMappingInterceptor
from weightsync.control.identity import caller_identity
from weightsync.control.metrics import CoordinatorMetrics
from weightsync.control.read_limits import ReadLimitInterceptor
from weightsync.control.servicer import DaemonServicer, InspectionServicer, TrainerServicer
from weightsync.v1 import weightsync_pb2 as pb
from weightsync.v1 import weightsync_pb2_grpc as pb_grpc

__all__ = ["CoordinatorServer", "SERVICE_NAMES", "GRPC_OPTIONS", "run_coordinator"]

log = logging.getLogger(__name__)

SERVICE_NAMES = tuple(pb.DESCRIPTOR.services_by_name[n].full_name for n in ("DaemonService", "TrainerService", "InspectionService"))
MAX_MESSAGE_BYTES = 64 << 20
GRPC_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Sessions live for days: let clients keep idle connections alive through NATs.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5000),
    # Overridden per coordinator by _server_options: pings at the heartbeat interval.
    ("grpc.keepalive_time_ms", 30000),
    ("grpc.keepalive_timeout_ms", 10000),
    # No bandwidth-delay probing: it grows every stream's flow-control window (up to MiBs)
    # before a handler asked to read, so that a caller could park that much per stream.
    # Windows stay at 64 KiB until a request is read (control messages are small; bulk
    # bytes travel on the data plane).
    ("grpc.http2.bdp_probe", 0),
    ("grpc.max_concurrent_streams", 1024),
)


def _server_options(config: CoordinatorConfig) -> tuple[tuple[str, int], ...]:
    """GRPC_OPTIONS with HTTP/2 keepalive pings at the heartbeat interval, answered within the heartbeat timeout.

    A trainer's WatchUpdate stream carries no data while the trainer sends, so a trainer cut
    off by the network (no FIN, no RST) would keep its round open until the round's deadline.
    The server's own pings close such a connection, and with it the stream, as fast as a
    silent daemon is marked LOST. Pings without data must be allowed for that (default: 2).
    """
    overrides = {
        "grpc.keepalive_time_ms": max(100, int(config.heartbeat_interval_s * 1000)),
        "grpc.keepalive_timeout_ms": max(1000, int(config.heartbeat_timeout_s * 1000)),
        "grpc.http2.max_pings_without_data": 0,
    }
    return tuple((k, v) for k, v in GRPC_OPTIONS if k not in overrides) + tuple(overrides.items())


class CoordinatorServer:
    """A running coordinator: `await start()`, then `await stop(grace_s)`."""

    def __init__(
        self,
        config: CoordinatorConfig | None = None,
        *,
        listen: str = "127.0.0.1:0",
        metrics_port: int | None = None,
        metrics_addr: str = "127.0.0.1",
        server_credentials: grpc.ServerCredentials | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        allow_insecure_tokens: bool = False,
    ) -> None:
        self._tokens_configured = any(isinstance(i, TokenAuthInterceptor) for i in interceptors)
        if self._tokens_configured and server_credentials is None:
            if not allow_insecure_tokens:
                raise ValueError(
                    "bearer tokens without TLS would travel in plaintext: add --tls-cert/--tls-key, or pass "
                    "--allow-insecure-tokens (only where the network itself is trusted, e.g. loopback tests)"
                )
            log.warning(
                "--allow-insecure-tokens: bearer tokens are accepted without TLS on %s: they travel in plaintext, readable on the network path",
                listen,
            )
        self.metrics = CoordinatorMetrics()
        self.coordinator = Coordinator(config, metrics=self.metrics)
        self._listen = listen
        self._metrics_port = metrics_port
        self._metrics_addr = metrics_addr
        self._credentials = server_credentials
        self._interceptors = tuple(interceptors)
        self._server: grpc.aio.Server | None = None
        self.health: health_async.HealthServicer | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None

    @property
    def address(self) -> str:
        host = self._listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def start(self) -> int:
        self.health = health_async.HealthServicer()
        cfg = self.coordinator.config
        limits = ReadLimitInterceptor(
            max_concurrent_reads=cfg.max_concurrent_reads,
            read_timeout_s=cfg.request_read_timeout_s,
            open_prefixes=OPEN_PREFIXES if self._tokens_configured else (),
        )
        server = grpc.aio.server(
            interceptors=(*self._interceptors, limits, ErrorMappingInterceptor()),
            options=_server_options(cfg),
            # Sessions hold one call each for their lifetime: room for every daemon, plus calls.
            maximum_concurrent_rpcs=cfg.max_daemons + 1024,
        )
        identify = functools.partial(caller_identity, tokens_configured=self._tokens_configured)
        pb_grpc.add_DaemonServiceServicer_to_server(DaemonServicer(self.coordinator, identify), server)
        pb_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(self.coordinator, identify), server)
        pb_grpc.add_InspectionServiceServicer_to_server(InspectionServicer(self.coordinator), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
        )
        if self._credentials is None:
            port = server.add_insecure_port(self._listen)
        else:
            port = server.add_secure_port(self._listen, self._credentials)
        if port == 0:
            raise OSError(f"could not bind the coordinator to {self._listen}")
        await server.start()
        self._server = server
        self.port = port
        self.coordinator.start()
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self._metrics_port is not None:
            self.metrics_port = self.metrics.serve(self._metrics_port, self._metrics_addr)
        log.info("coordinator listening on %s (metrics port %s)", self.address, self.metrics_port)
        return port

    async def stop(self, grace_s: float = 5.0) -> None:
        """Health NOT_SERVING, drain the open round (bounded by grace_s), then stop."""
        if self._server is None:
            return
        await self.health.enter_graceful_shutdown()
        await self.coordinator.drain(grace_s)
        await self.coordinator.close()
        await self._server.stop(grace_s)
        self._server = None

    async def wait_for_termination(self) -> None:
        assert self._server is not None, "start() first"
        await self._server.wait_for_termination()


async def run_coordinator(server: CoordinatorServer, grace_s: float = 10.0) -> int:
    """Runs until SIGTERM or SIGINT, then shuts down gracefully; returns the signal's number."""
    await server.start()
    stop = asyncio.Event()
    received: list[int] = []
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda sig=sig: (received.append(sig), stop.set()))
    print(f"weightsync coordinator listening on {server.address}", flush=True)
    await stop.wait()
    log.info("signal received: draining for up to %.1f s", grace_s)
    await server.stop(grace_s)
    return received[0]
