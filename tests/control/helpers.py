"""Test handler and helpers for control-plane tests: real gRPC, real agents, no tensors."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence

from weightsync.control.coordinator import CoordinatorConfig
from weightsync.control.daemon_agent import DaemonAgent, DaemonIdentity, HandlerResult
from weightsync.control.server import CoordinatorServer
from weightsync.core import Assignment, TensorSpec

INVENTORY = (
    TensorSpec("model.embed_tokens.weight", (64, 16), "bfloat16"),
    TensorSpec("model.layers.0.self_attn.q_proj.weight", (16, 16), "bfloat16"),
    TensorSpec("model.layers.0.self_attn.k_proj.weight", (8, 16), "bfloat16"),
    TensorSpec("model.layers.0.self_attn.v_proj.weight", (8, 16), "bfloat16"),
    TensorSpec("model.layers.0.mlp.down_proj.weight", (16, 32), "bfloat16"),
    TensorSpec("model.norm.weight", (16,), "bfloat16"),
)

FAST = CoordinatorConfig(heartbeat_interval_s=0.2, heartbeat_timeout_s=3.0, default_deadline_s=20.0)


def fake_checksum(version: int, name: str) -> int:
    """What a correct receiver of `name` at `version` reports (stands in for the data plane)."""
    return int.from_bytes(hashlib.sha256(f"{version}:{name}".encode()).digest()[:8], "little")


def trainer_checksums(assignment: Assignment) -> dict[str, int]:
    return {e.name: fake_checksum(assignment.version, e.name) for _, e in assignment.plan.entries()}


class ScriptedHandler:
    """Stands in for the data plane: reports checksums, optionally wrong, slow or failing."""

    def __init__(self, *, corrupt: Sequence[str] = (), delay_s: float = 0.0, blocking_s: float = 0.0, fail: str = "") -> None:
        self.corrupt = set(corrupt)
        self.delay_s = delay_s
        self.blocking_s = blocking_s
        self.fail = fail
        self.seen: list[Assignment] = []
        self.cancelled = 0

    async def __call__(self, assignment, ranks, progress) -> HandlerResult:
        self.seen.append(assignment)
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.blocking_s:
            import time

            # Tensor work runs in a thread; the event loop (and heartbeats) stay free.
            await asyncio.to_thread(time.sleep, self.blocking_s)
        if self.fail:
            raise RuntimeError(self.fail)
        progress(len(assignment.plan.buckets), assignment.plan.payload_bytes)
        sums = {e.name: fake_checksum(assignment.version, e.name) for _, e in assignment.plan.entries()}
        for name in self.corrupt & sums.keys():
            sums[name] ^= 1
        return HandlerResult(checksums=sums, bytes_received=assignment.plan.payload_bytes, receive_s=0.01, apply_s=0.01)


async def start_coordinator(config: CoordinatorConfig = FAST, listen: str = "127.0.0.1:0") -> CoordinatorServer:
    server = CoordinatorServer(config, listen=listen)
    await server.start()
    return server


async def start_agent(address: str, daemon_id: str, handler=None, *, served_version: int = -1, inventory=INVENTORY, engine: str = "test", **kw) -> DaemonAgent:
    ident = DaemonIdentity(daemon_id=daemon_id, engine=engine, model="tiny", host="127.0.0.1", inventory=tuple(inventory))
    agent = DaemonAgent(address, ident, handler or ScriptedHandler(), served_version=served_version, reconnect_max_s=0.5, **kw)
    agent.start()
    await agent.wait_connected(10)
    return agent


async def wait_until(predicate, timeout_s: float = 10.0, interval_s: float = 0.05) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(interval_s)
