"""Prometheus metrics of one coordinator, on a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["CoordinatorMetrics"]


class CoordinatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._rounds = Counter("weightsync_rounds_total", "Update rounds by outcome", ["outcome"], registry=self.registry)
        self._duration = Histogram(
            "weightsync_round_duration_seconds",
            "Update round duration from BeginUpdate to verdict",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=self.registry,
        )
        self._bytes = Counter("weightsync_bytes_total", "Payload bytes planned to daemons", registry=self.registry)
        # Bytes the daemons received, by how they travelled (dense or delta): what a delta round saves.
        self._wire = Counter(
            "weightsync_wire_bytes_total", "Bytes received by daemons, by encoding", ["encoding"], registry=self.registry
        )
        self._daemons = Gauge("weightsync_daemons", "Registered daemons by state", ["state"], registry=self.registry)

    def round_finished(self, outcome: str, duration_s: float, payload_bytes: int) -> None:
        self._rounds.labels(outcome=outcome).inc()
        self._duration.observe(duration_s)
        self._bytes.inc(payload_bytes)

    def wire_bytes(self, by_encoding: dict[str, int]) -> None:
        for encoding, n in by_encoding.items():
            self._wire.labels(encoding=encoding).inc(n)

    def daemons_by_state(self, counts: dict[str, int]) -> None:
        for state, n in counts.items():
            self._daemons.labels(state=state).set(n)

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Starts the HTTP exporter; returns the bound port (useful with port 0)."""
        server, _ = start_http_server(port, addr=addr, registry=self.registry)
        return server.server_address[1]
