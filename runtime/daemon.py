"""Daemon side: the data-plane receiver as a control-plane handler, and the memory daemon."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping

import torch

from weightsync.control.daemon_agent import HandlerResult, ProgressFn
from weightsync.core import Assignment, TransferError
from weightsync.dataplane import GroupCache, MemoryEngine, receive_assignment, tensor_checksum
from weightsync.dataplane.delta_round import receive_delta_round
from weightsync.dataplane.routed import RoutedResult, receive_routed
from weightsync.dataplane.routed_delta import receive_routed_delta
from weightsync.dataplane.receiver import DestinationFn
from weightsync.runtime.failpoints import load_failpoints

__all__ = ["ReceiverHandler", "TPMemoryHandler", "memory_engine_handler"]

log = logging.getLogger(__name__)

ApplyFn = Callable[[list[tuple[str, torch.Tensor]]], None]


class ReceiverHandler:
    """Receives each assignment on this process's one receiver rank and applies it bucket by bucket.

    The transfer runs in a worker thread, so the agent's heartbeats never wait on it. A
    round the coordinator failed is left through `abort`, within the data plane's poll
    interval wherever the thread waits; the next round waits for that thread (it cannot
    be interrupted inside an apply) instead of joining a second group.
    """

    def __init__(
        self,
        apply_fn: ApplyFn,
        *,
        device: str | torch.device | None = None,
        held_checksums: Callable[[Iterable[str]], Mapping[str, int]] | None = None,
        on_applied: Callable[[Assignment], None] | None = None,
        destination: DestinationFn | None = None,
    ) -> None:
        self._apply = apply_fn
        self._destination = destination
        self._held_checksums = held_checksums
        self._device = device
        self._groups = GroupCache(device=device)
        self._lock = threading.Lock()
        self._on_applied = on_applied

    def abort(self, update_id: str, reason: str) -> None:
        """Thread-safe: the receiver of `update_id` leaves the round at its next data-plane poll."""
        self._groups.abort(update_id, reason)

    async def __call__(self, assignment: Assignment, ranks: tuple[int, ...], progress: ProgressFn) -> HandlerResult:
        if len(ranks) != 1:
            raise ValueError(f"this daemon hosts one receiver rank; the plan gave it {list(ranks)}")
        return await asyncio.to_thread(self._run, assignment, ranks[0], progress)

    def _run(self, assignment: Assignment, rank: int, progress: ProgressFn) -> HandlerResult:
        wait_s = 2 * assignment.rendezvous.timeout_s
        if not self._lock.acquire(timeout=wait_s):
            raise TransferError(f"rank {rank}: the previous round's transfer did not end within {wait_s:g} s")
        try:
            group = self._groups.get(assignment, rank)
            if assignment.routing is not None:
                routed = receive_any_routed(assignment, rank, group, self._destination, apply_fn=self._apply)
                if self._on_applied is not None:
                    self._on_applied(assignment)
                piece_sums = {(rank, i): v for i, v in routed.piece_sums.items()}
                return HandlerResult({}, routed.num_bytes, routed.seconds, 0.0, piece_sums)
            if assignment.delta_base_version is not None:
                if self._destination is None:
                    raise TransferError(f"rank {rank}: a delta round patches the engine's tensors in place; this engine offers none")
                # Dense and delta ranks alike: the payload is patched into the engine's own tensors.
                res = receive_delta_round(
                    assignment, rank, group, self._destination, apply_fn=self._apply, progress=progress
                )
            else:
                res = receive_assignment(
                    assignment, rank, group, self._apply, device=self._device, progress=progress, destination=self._destination
                )
        finally:
            self._lock.release()
        checksums = res.checksums
        timeline = dict(res.timeline)
        # A delta round's sums are already those of the engine's own tensors, taken after the
        # apply (receive_delta_round patches them in place): a second pass would only repeat them.
        if self._held_checksums is not None and assignment.delta_base_version is None:
            # Verify what the engine holds, not only what arrived: a bad copy shows as a mismatch.
            t0 = time.monotonic()
            checksums = dict(self._held_checksums(checksums.keys()))
            timeline["verified"] = timeline.get("closed", 0.0) + time.monotonic() - t0
        if self._on_applied is not None:
            self._on_applied(assignment)
        return HandlerResult(checksums, res.bytes_received, res.receive_s, res.apply_s, timeline=timeline)


def _failpoint_apply(held: Mapping[str, torch.Tensor], write: ApplyFn | None = None) -> ApplyFn:
    """An apply with the test failpoints around `write` (None: the data plane landed the bytes in place already)."""

    def apply(batch) -> None:
        faults = load_failpoints()
        if faults.mark_apply:
            open(faults.mark_apply, "w").close()
        if write is not None:
            write(batch)
        if faults.corrupt_applied:
            for name, _ in batch:
                if name == faults.corrupt_applied:
                    held[name].view(-1).view(torch.uint8)[0] ^= 1
        if faults.apply_delay_s:
            time.sleep(faults.apply_delay_s)

    return apply


class TPMemoryHandler:
    """A memory daemon with one receiver rank per engine, standing in for tensor-parallel workers.

    Every rank has its own engine (a TP worker's own memory), its own group and thread, and
    declares what it needs (`memory_engine.tp_needs`), so its rounds are routed: each rank
    receives only its pieces, landed in place, and reports every piece's sum as it landed.
    """

    def __init__(self, engines: list[MemoryEngine]) -> None:
        self._engines = engines
        self._groups = [GroupCache() for _ in engines]
        self._lock = threading.Lock()

    def abort(self, update_id: str, reason: str) -> None:
        for g in self._groups:
            g.abort(update_id, reason)

    async def __call__(self, assignment: Assignment, ranks: tuple[int, ...], progress: ProgressFn) -> HandlerResult:
        if len(ranks) != len(self._engines):
            raise ValueError(f"this daemon hosts {len(self._engines)} receiver ranks; the plan gave it {list(ranks)}")
        if assignment.routing is None:
            raise ValueError(f"update {assignment.update_id}: this daemon declares needs per rank: expected a routed round")
        wait_s = 2 * assignment.rendezvous.timeout_s
        if not await asyncio.to_thread(self._lock.acquire, timeout=wait_s):
            raise TransferError(f"ranks {list(ranks)}: the previous round's transfer did not end within {wait_s:g} s")
        try:
            # Every rank's thread runs to its end (a failed round fails them all): only then is the daemon idle.
            results = await asyncio.gather(
                *(asyncio.to_thread(self._run, assignment, rank, t) for t, rank in enumerate(ranks)), return_exceptions=True
            )
        finally:
            self._lock.release()
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]
        piece_sums = {(res.rank, i): v for res in results for i, v in res.piece_sums.items()}
        return HandlerResult(
            {}, sum(res.num_bytes for res in results), max(res.seconds for res in results), 0.0, piece_sums
        )

    def _run(self, assignment: Assignment, rank: int, t: int):
        engine = self._engines[t]
        group = self._groups[t].get(assignment, rank)
        return receive_any_routed(assignment, rank, group, engine.destination, apply_fn=_failpoint_apply(engine.state_dict()))


def receive_any_routed(assignment: Assignment, rank: int, group, destination: DestinationFn | None, *, apply_fn: ApplyFn) -> RoutedResult:
    """This rank's side of a routed round: dense, its pieces landed; a routed delta round, its frames patched in place."""
    if assignment.delta_base_version is None:
        return receive_routed(assignment, rank, group, destination, apply_fn=apply_fn)
    if destination is None:
        # Refused at the open handshake, so no rank waits for bytes this one cannot take.
        problem = f"rank {rank}: a routed delta round patches the engine's tensors in place; this engine offers none"
        return receive_routed_delta(assignment, rank, group, lambda name: None, apply_fn=apply_fn, local_problem=problem)
    return receive_routed_delta(assignment, rank, group, destination, apply_fn=apply_fn)


def memory_engine_handler(engine: MemoryEngine) -> ReceiverHandler:
    """A handler that applies into a MemoryEngine and reports checksums of the tensors it then holds."""
    held = engine.state_dict()
    return ReceiverHandler(
        _failpoint_apply(held, engine.apply),
        held_checksums=lambda names: {n: tensor_checksum(held[n]) for n in names},
        destination=engine.destination,
    )
