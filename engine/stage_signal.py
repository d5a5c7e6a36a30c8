"""Staging progress from a vLLM engine's workers to its daemon, without polling the workers.

Why not poll over `collective_rpc`: every call wakes each worker's busy loop, which then spins
on `sched_yield` for vLLM's busy window (`SpinCondition.busy_loop_s`, 1 s in vLLM 0.32) before
it sleeps again. Polled every 20 ms, a staged round kept every worker of the engine at 100% of
a core for the whole round (measured, 2026-12-06: two TP=2 engines on 2 cores; the staged
engine's spinning workers starved the streamed engine's workers, which missed the 20 s group
formation, and its serve process, which missed heartbeats for 10 s).

So each worker's staging thread sends a datagram when a bucket lands and when staging ends
(staged, failed, discarded), to a local datagram socket the daemon listens on; the daemon asks
the workers for their authoritative status (one RPC) only when a datagram says staging ended,
or when none came for a while (a lost datagram, a dead worker). Datagrams carry nothing the
daemon trusts beyond progress figures for display: any local process could send one.

The socket lives in Linux's abstract namespace (no file to clean up, no path-length limit),
which workers share with their daemon: vLLM starts them on its host, in its network namespace.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import uuid
from collections.abc import Mapping
from typing import Any

__all__ = ["StageListener", "notify_stage"]

log = logging.getLogger(__name__)

# A status datagram is a small JSON object; larger ones are not ours.
_MAX_DATAGRAM_BYTES = 4096
_FIELDS = ("update_id", "rank", "state", "buckets_done", "bytes_done")
_TYPES = {"update_id": str, "rank": int, "state": str, "buckets_done": int, "bytes_done": int}


def notify_stage(address: str, status: Mapping[str, Any]) -> None:
    """Best effort, never blocks: the daemon's fallback poll covers a datagram that is lost."""
    if not address:
        return
    body = json.dumps({k: status[k] for k in _FIELDS if k in status}).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            s.sendto(body, "\0" + address)
    except OSError as e:  # a full queue or a daemon gone: the poll will tell
        log.debug("stage signal to %s not sent: %s", address, e)


class StageListener:
    """The daemon's end: one abstract datagram socket, read from the event loop."""

    def __init__(self) -> None:
        self.address = f"weightsync-stage-{os.getpid()}-{uuid.uuid4().hex}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind("\0" + self.address)
        self._sock.setblocking(False)

    async def next_statuses(self, timeout_s: float) -> list[dict[str, Any]]:
        """Statuses that arrive within timeout_s: all queued ones once the first is in; [] on timeout."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout_s):
                first = await loop.sock_recv(self._sock, _MAX_DATAGRAM_BYTES)
        except TimeoutError:
            return []
        out = [first]
        while True:
            try:
                out.append(self._sock.recv(_MAX_DATAGRAM_BYTES))
            except BlockingIOError:
                break
        return [s for s in (_parse(b) for b in out) if s is not None]

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "StageListener":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse(body: bytes) -> dict[str, Any] | None:
    try:
        status = json.loads(body)
    except ValueError:
        return None
    if not isinstance(status, dict):
        return None
    # Exactly the fields a worker sends, each of its type (bool is not a count): nothing else is read.
    out = {k: status.get(k) for k in _FIELDS}
    if not all(isinstance(v, _TYPES[k]) and not isinstance(v, bool) for k, v in out.items()):
        return None
    return out
