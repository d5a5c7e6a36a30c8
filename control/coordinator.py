"""The coordinator's state machine: daemons, sessions, heartbeats and update rounds.

All state lives on one asyncio event loop; nothing here blocks or touches tensors.
The servicers in `servicer.py` translate gRPC to calls on this object.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from weightsync.control.records import DaemonOutcome, DaemonRecord, DaemonState, ResultStatus, RoundRecord, RoundState
from weightsync.control.validation import check_against_inventory
from weightsync.core import (
    ALIGN_BYTES,
    Assignment,
    BucketPlan,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Participant,
    PermissionDenied,
    Rendezvous,
    TensorSpec,
    Unavailable,
    default_bucket_size,
    is_full_round,
)
from weightsync.core.problems import group_by_subject
from weightsync.core.types import TRANSPORTS

__all__ = ["Coordinator", "CoordinatorConfig", "UpdateOptions", "DaemonRegistration", "SessionEvent"]

log = logging.getLogger(__name__)

MAX_BUCKET_SIZE_BYTES = 8 << 30
MAX_DEADLINE_S = 24 * 3600.0


@dataclass(frozen=True, slots=True, kw_only=True)
class CoordinatorConfig:
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 10.0
    default_deadline_s: float = 600.0
    default_collective_timeout_s: float = 120.0
    rounds_kept: int = 100

    def __post_init__(self) -> None:
        if self.heartbeat_interval_s <= 0:
            raise ValueError(f"heartbeat_interval_s must be > 0, got {self.heartbeat_interval_s}")
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"heartbeat_timeout_s ({self.heartbeat_timeout_s}) must exceed heartbeat_interval_s "
                f"({self.heartbeat_interval_s}), or every daemon would be marked lost"
            )
        if self.default_deadline_s <= 0 or self.default_collective_timeout_s <= 0:
            raise ValueError("default_deadline_s and default_collective_timeout_s must be > 0")
        if self.rounds_kept < 1:
            raise ValueError(f"rounds_kept must be >= 1, got {self.rounds_kept}")


@dataclass(frozen=True, slots=True, kw_only=True)
class UpdateOptions:
    transport: str = "gloo"
    bucket_size_bytes: int = 0
    deadline_s: float = 0.0
    min_daemons: int = 1
    daemon_ids: tuple[str, ...] = ()
    rendezvous_host: str = ""
    rendezvous_port: int = 0
    collective_timeout_s: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class DaemonRegistration:
    daemon_id: str
    engine: str
    model: str
    host: str
    num_ranks: int
    inventory: tuple[TensorSpec, ...]
    transports: tuple[str, ...]
    served_version: int
    dirty: bool


@dataclass(frozen=True, slots=True)
class SessionEvent:
    """What the coordinator pushes down a daemon's session: one of the three kinds."""

    kind: str  # "assignment" | "cancel" | "verdict"
    assignment: Assignment | None = None
    update_id: str = ""
    reason: str = ""
    version: int = 0
    round_state: RoundState | None = None
    status: ResultStatus | None = None


class Coordinator:
    """Owns every daemon record and round; one round open at a time."""

    def __init__(self, config: CoordinatorConfig | None = None, metrics=None) -> None:
        self.config = config or CoordinatorConfig()
        self.metrics = metrics
        self.daemons: dict[str, DaemonRecord] = {}
        self.rounds: OrderedDict[str, RoundRecord] = OrderedDict()
        self.open_round: RoundRecord | None = None
        # Highest version any round has begun with: a half-applied round may have put
        # it on some engine, so a new round must go past it.
        self.max_version = -1
        self.committed_version = -1
        self.accepting = True
        self._reaper: asyncio.Task | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap_forever(), name="weightsync-reaper")

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        if self.open_round is not None:
            self._finish(self.open_round, RoundState.FAILED, "coordinator shut down")
        for rec in self.daemons.values():
            self._close_session(rec, "coordinator shut down")

    async def drain(self, timeout_s: float) -> None:
        """Refuses new rounds and waits (bounded) for the open one to finish."""
        self.accepting = False
        rnd = self.open_round
        if rnd is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await rnd.done.wait()

    # ------------------------------------------------------------------ daemons

    def register(self, reg: DaemonRegistration) -> DaemonRecord:
        if not reg.daemon_id or len(reg.daemon_id) > 256 or not reg.daemon_id.isprintable():
            raise InvalidArgument(f"daemon_id {reg.daemon_id[:64]!r}: expected 1..256 printable characters")
        if not 1 <= reg.num_ranks <= 4096:
            raise InvalidArgument(f"num_ranks: expected 1..4096 receiver ranks, got {reg.num_ranks}")
        if not reg.inventory:
            raise InvalidArgument("inventory is empty: expected every tensor the engine accepts")
        unknown = sorted(set(reg.transports) - set(TRANSPORTS))
        if unknown or not reg.transports:
            raise InvalidArgument(f"transports: expected a non-empty subset of {list(TRANSPORTS)}, got {list(reg.transports)}")
        inventory: dict[str, TensorSpec] = {}
        for spec in reg.inventory:
            if spec.name in inventory:
                raise InvalidArgument(f"inventory: duplicate tensor name {spec.name!r}")
            inventory[spec.name] = spec
        old = self.daemons.get(reg.daemon_id)
        if old is not None:
            # A daemon that restarted re-registers under its old id; its old session is void.
            self._close_session(old, "daemon re-registered")
            self._fail_in_open_round(reg.daemon_id, "daemon re-registered during the round")
        stale = reg.served_version < self.committed_version
        self.max_version = max(self.max_version, reg.served_version)
        if self.committed_version < 0 and reg.served_version >= 0 and not reg.dirty:
            # After a coordinator restart the fleet tells us which version it serves.
            self.committed_version = reg.served_version
        rec = DaemonRecord(
            daemon_id=reg.daemon_id,
            engine=reg.engine,
            model=reg.model,
            host=reg.host,
            num_ranks=reg.num_ranks,
            inventory=inventory,
            transports=tuple(reg.transports),
            served_version=reg.served_version,
            dirty=reg.dirty,
            stale=stale,
            session_token=secrets.token_hex(16),
        )
        self.daemons[reg.daemon_id] = rec
        log.info(
            "daemon registered daemon_id=%s engine=%s ranks=%d tensors=%d served_version=%d dirty=%s stale=%s",
            rec.daemon_id, rec.engine, rec.num_ranks, len(inventory), rec.served_version, rec.dirty, stale,
        )
        self._update_gauges()
        return rec

    def open_session(self, daemon_id: str, token: str) -> asyncio.Queue:
        rec = self.daemons.get(daemon_id)
        if rec is None:
            raise NotFound(f"daemon {daemon_id!r} is not registered: call RegisterDaemon first")
        if not secrets.compare_digest(rec.session_token, token):
            raise PermissionDenied(f"session token for daemon {daemon_id!r} does not match its registration: register again")
        if rec.outbox is not None:
            self._close_session(rec, "replaced by a new session")
        rec.outbox = asyncio.Queue()
        rec.state = DaemonState.IDLE
        rec.reason = ""
        rec.beat()
        self._update_gauges()
        return rec.outbox

    def session_closed(self, daemon_id: str, outbox: asyncio.Queue, reason: str) -> None:
        rec = self.daemons.get(daemon_id)
        if rec is None or rec.outbox is not outbox:
            return  # an older session of a re-registered daemon
        rec.outbox = None
        rec.state = DaemonState.LOST
        rec.reason = reason
        log.warning("daemon session closed daemon_id=%s reason=%s", daemon_id, reason)
        self._fail_in_open_round(daemon_id, f"session closed: {reason}")
        self._update_gauges()

    def heartbeat(self, daemon_id: str, *, served_version: int, dirty: bool, draining: bool) -> None:
        rec = self._live(daemon_id)
        rec.beat()
        rec.served_version = served_version
        # During a session the coordinator's own verdicts decide `dirty`: a heartbeat sent
        # before the daemon heard its verdict must not re-flag it. The daemon's own flag
        # counts at registration, when the coordinator has no history of it.
        if draining and rec.state is DaemonState.IDLE:
            rec.state = DaemonState.DRAINING
            self._update_gauges()

    def progress(self, daemon_id: str, update_id: str, buckets_done: int, bytes_done: int) -> None:
        self._live(daemon_id).beat()
        log.debug("progress update_id=%s daemon_id=%s buckets=%d bytes=%d", update_id, daemon_id, buckets_done, bytes_done)

    def report_result(
        self,
        daemon_id: str,
        update_id: str,
        *,
        ok: bool,
        error: str,
        checksums: dict[str, int],
        receive_s: float,
        apply_s: float,
        bytes_received: int,
    ) -> None:
        rec = self._live(daemon_id)
        rec.beat()
        rnd = self.rounds.get(update_id)
        if rnd is None or daemon_id not in rnd.outcomes:
            log.warning("result for unknown round ignored update_id=%s daemon_id=%s", update_id, daemon_id)
            return
        out = rnd.outcomes[daemon_id]
        if rnd.state.finished or out.status is not ResultStatus.PENDING or out.checksums is not None:
            return
        out.receive_s, out.apply_s, out.bytes_received = receive_s, apply_s, bytes_received
        if ok:
            out.checksums = checksums
        else:
            out.status = ResultStatus.FAILED
            out.reason = error or "daemon reported failure without a reason"
        if rec.state is DaemonState.UPDATING:
            rec.state = DaemonState.IDLE
        self._maybe_judge(rnd)

    # ------------------------------------------------------------------ rounds

    def begin_update(self, version: int, manifest: Sequence[TensorSpec], options: UpdateOptions) -> Assignment:
        self._check_options(options)
        if not self.accepting:
            raise Unavailable("coordinator is shutting down: retry against its replacement")
        if self.open_round is not None:
            raise FailedPrecondition(
                f"update {self.open_round.update_id} (version {self.open_round.version}) is still open: "
                "commit or abort it first; one round at a time"
            )
        if version <= self.max_version:
            raise FailedPrecondition(
                f"version {version} is stale: expected a version greater than {self.max_version}, "
                "the highest version already begun or served"
            )
        participants = self._select_participants(options)
        check_against_inventory(manifest, {d.daemon_id: d.inventory for d in participants})

        bucket_size = options.bucket_size_bytes or default_bucket_size(options.transport)
        plan = BucketPlan.build(manifest, bucket_size)
        ranks: list[Participant] = []
        next_rank = 1
        for d in participants:
            ranks.append(Participant(d.daemon_id, tuple(range(next_rank, next_rank + d.num_ranks))))
            next_rank += d.num_ranks
        membership = repr(
            (options.transport, options.rendezvous_host, options.rendezvous_port, [(d.daemon_id, d.num_ranks, d.session_token) for d in participants])
        )
        rendezvous = Rendezvous(
            transport=options.transport,
            host=options.rendezvous_host,
            port=options.rendezvous_port,
            world_size=next_rank,
            group_id=hashlib.sha256(membership.encode()).hexdigest()[:16],
            timeout_s=options.collective_timeout_s or self.config.default_collective_timeout_s,
        )
        deadline_s = options.deadline_s or self.config.default_deadline_s
        assignment = Assignment(
            update_id=uuid.uuid4().hex[:16],
            version=version,
            rendezvous=rendezvous,
            participants=tuple(ranks),
            plan=plan,
            deadline_s=deadline_s,
        )
        rnd = RoundRecord(assignment=assignment, manifest_covers=frozenset(s.name for s in manifest))
        rnd.outcomes = {d.daemon_id: DaemonOutcome() for d in participants}
        self.max_version = version
        self.open_round = rnd
        self.rounds[assignment.update_id] = rnd
        while len(self.rounds) > self.config.rounds_kept:
            self.rounds.popitem(last=False)
        rnd.deadline_task = asyncio.get_running_loop().create_task(self._deadline(rnd), name=f"deadline-{assignment.update_id}")
        for d in participants:
            d.state = DaemonState.UPDATING
            d.outbox.put_nowait(SessionEvent("assignment", assignment=assignment))
        self._update_gauges()
        log.info(
            "update begun update_id=%s version=%d daemons=%d tensors=%d bytes=%d buckets=%d transport=%s",
            assignment.update_id, version, len(participants), plan.num_tensors, plan.payload_bytes, len(plan.buckets), options.transport,
        )
        return assignment

    async def commit_update(self, update_id: str, checksums: dict[str, int]) -> RoundRecord:
        rnd = self._round(update_id)
        if not rnd.state.finished:
            expected = set(rnd.manifest_covers)
            if set(checksums) != expected:
                missing = sorted(expected - set(checksums))[:10]
                extra = sorted(set(checksums) - expected)[:10]
                raise InvalidArgument(
                    f"checksums must name exactly the {len(expected)} manifest tensors: "
                    f"missing {missing}, unexpected {extra}"
                )
            if rnd.trainer_checksums is None:
                rnd.trainer_checksums = checksums
                self._maybe_judge(rnd)
        await rnd.done.wait()  # the deadline task bounds this wait
        return rnd

    def abort_update(self, update_id: str, reason: str) -> RoundRecord:
        rnd = self._round(update_id)
        if rnd.state.finished:
            raise FailedPrecondition(f"update {update_id} already ended as {rnd.state.value}: nothing to abort")
        self._finish(rnd, RoundState.ABORTED, f"aborted by trainer: {reason or 'no reason given'}")
        return rnd

    def get_round(self, update_id: str) -> RoundRecord:
        return self._round(update_id)

    # ------------------------------------------------------------------ internals

    def _check_options(self, o: UpdateOptions) -> None:
        problems = []
        if o.transport not in TRANSPORTS:
            problems.append(f"options.transport: expected one of {list(TRANSPORTS)}, got {o.transport!r}")
        if o.bucket_size_bytes and not ALIGN_BYTES <= o.bucket_size_bytes <= MAX_BUCKET_SIZE_BYTES:
            problems.append(
                f"options.bucket_size_bytes: expected {ALIGN_BYTES}..{MAX_BUCKET_SIZE_BYTES} (or 0 for the default), got {o.bucket_size_bytes}"
            )
        if not 0 <= o.deadline_s <= MAX_DEADLINE_S:
            problems.append(f"options.deadline_s: expected 0 (default) < deadline_s <= {MAX_DEADLINE_S}, got {o.deadline_s}")
        if not 0 <= o.collective_timeout_s <= MAX_DEADLINE_S:
            problems.append(f"options.collective_timeout_s: expected 0..{MAX_DEADLINE_S}, got {o.collective_timeout_s}")
        if o.min_daemons < 0:
            problems.append(f"options.min_daemons: expected >= 0, got {o.min_daemons}")
        if o.transport != "cuda_ipc" and not o.rendezvous_host:
            problems.append("options.rendezvous_host: expected the host where the trainer serves the data-plane store, got ''")
        if not 0 <= o.rendezvous_port < 65536 or (o.transport != "cuda_ipc" and o.rendezvous_port == 0):
            problems.append(f"options.rendezvous_port: expected 1..65535, got {o.rendezvous_port}")
        if problems:
            raise InvalidArgument("update options are invalid", problems)

    def _select_participants(self, o: UpdateOptions) -> list[DaemonRecord]:
        if o.daemon_ids:
            unknown = [d for d in o.daemon_ids if d not in self.daemons]
            if unknown:
                raise NotFound(f"options.daemon_ids: unknown daemons {unknown}: see ListDaemons")
            pool = [self.daemons[d] for d in sorted(set(o.daemon_ids))]
        else:
            pool = sorted(self.daemons.values(), key=lambda d: d.daemon_id)
        chosen = [d for d in pool if d.healthy and o.transport in d.transports]
        required = max(o.min_daemons, 1)
        if len(chosen) < required or (o.daemon_ids and len(chosen) < len(pool)):
            not_ready = [
                f"{d.daemon_id} ({d.state.value if not d.healthy else 'no ' + o.transport + ' transport'})"
                for d in pool
                if d not in chosen
            ]
            raise Unavailable(
                f"too few healthy daemons: expected at least {len(pool) if o.daemon_ids else required}, "
                f"got {len(chosen)}" + (f"; not ready: {not_ready}" if not_ready else "")
            )
        return chosen

    def _round(self, update_id: str) -> RoundRecord:
        rnd = self.rounds.get(update_id)
        if rnd is None:
            raise NotFound(f"update {update_id!r} is unknown to this coordinator (it may have restarted): begin a new round")
        return rnd

    def _live(self, daemon_id: str) -> DaemonRecord:
        rec = self.daemons.get(daemon_id)
        if rec is None or rec.outbox is None:
            raise FailedPrecondition(f"daemon {daemon_id!r} has no open session")
        return rec

    def _fail_in_open_round(self, daemon_id: str, reason: str) -> None:
        rnd = self.open_round
        if rnd is None:
            return
        out = rnd.outcomes.get(daemon_id)
        if out is not None and out.status is ResultStatus.PENDING and out.checksums is None:
            out.status = ResultStatus.FAILED
            out.reason = reason
            self._maybe_judge(rnd)

    def _maybe_judge(self, rnd: RoundRecord) -> None:
        if rnd.state.finished or not rnd.all_reported():
            return
        if rnd.trainer_checksums is None:
            if all(o.status is ResultStatus.FAILED for o in rnd.outcomes.values()):
                # The reason is the daemons' own reasons (grouped when many share one), never a bare summary.
                per_daemon = {d: [o.reason or o.status.value] for d, o in rnd.outcomes.items()}
                self._finish(rnd, RoundState.FAILED, "every daemon failed: " + "; ".join(group_by_subject(per_daemon, "daemon")))
            return
        self._judge_reported(rnd)
        ok = all(o.status is ResultStatus.OK for o in rnd.outcomes.values())
        failed = [f"{d}: {o.status.value} {o.reason}" for d, o in rnd.outcomes.items() if o.status is not ResultStatus.OK]
        self._finish(rnd, RoundState.COMMITTED if ok else RoundState.FAILED, "; ".join(failed))

    def _judge_reported(self, rnd: RoundRecord) -> None:
        """Compares every reported daemon's checksums with the trainer's."""
        assert rnd.trainer_checksums is not None
        for out in rnd.outcomes.values():
            if out.status is not ResultStatus.PENDING or out.checksums is None:
                continue
            got = out.checksums
            out.mismatched = sorted(n for n, c in rnd.trainer_checksums.items() if got.get(n) != c)
            if out.mismatched:
                out.status = ResultStatus.CHECKSUM_MISMATCH
                out.reason = f"{len(out.mismatched)} tensors differ from the trainer's bytes"
            else:
                out.status = ResultStatus.OK

    def _finish(self, rnd: RoundRecord, state: RoundState, reason: str) -> None:
        if rnd.state.finished:
            return
        rnd.state = state
        rnd.reason = reason
        rnd.duration_s = time.monotonic() - rnd.started_mono
        for daemon_id, out in rnd.outcomes.items():
            if out.status is ResultStatus.PENDING:
                out.status = ResultStatus.TIMED_OUT if state is RoundState.TIMED_OUT else ResultStatus.FAILED
                out.reason = out.reason or reason
            rec = self.daemons.get(daemon_id)
            if rec is None:
                continue
            if out.status is ResultStatus.OK:
                rec.served_version = rnd.version
                if is_full_round(rec.inventory, rnd.manifest_covers):
                    rec.dirty = False
                    rec.stale = False
            else:
                # Its engine may hold some of the new bytes: flag it until a full round re-syncs it.
                rec.dirty = True
            if rec.state is DaemonState.UPDATING:
                rec.state = DaemonState.IDLE
            if rec.outbox is not None:
                if state is RoundState.ABORTED or state is RoundState.TIMED_OUT:
                    rec.outbox.put_nowait(SessionEvent("cancel", update_id=rnd.update_id, reason=reason))
                rec.outbox.put_nowait(
                    SessionEvent("verdict", update_id=rnd.update_id, version=rnd.version, round_state=state, status=out.status, reason=out.reason)
                )
        if state is RoundState.COMMITTED:
            self.committed_version = max(self.committed_version, rnd.version)
        if rnd.deadline_task is not None and rnd.deadline_task is not asyncio.current_task():
            rnd.deadline_task.cancel()
        if self.open_round is rnd:
            self.open_round = None
        rnd.done.set()
        if self.metrics is not None:
            self.metrics.round_finished(state.value, rnd.duration_s, rnd.assignment.plan.payload_bytes * len(rnd.outcomes))
        self._update_gauges()
        log.info(
            "update ended update_id=%s version=%d state=%s duration_s=%.3f%s",
            rnd.update_id, rnd.version, state.value, rnd.duration_s, f" reason={reason}" if reason else "",
        )

    async def _deadline(self, rnd: RoundRecord) -> None:
        await asyncio.sleep(rnd.assignment.deadline_s)
        if rnd.state.finished:
            return
        if rnd.trainer_checksums is None:
            reason = f"deadline of {rnd.assignment.deadline_s:g} s passed before the trainer sent its checksums"
        else:
            waiting = [d for d, o in rnd.outcomes.items() if o.status is ResultStatus.PENDING and o.checksums is None]
            reason = f"deadline of {rnd.assignment.deadline_s:g} s passed; no result from {waiting}"
            self._judge_reported(rnd)
        self._finish(rnd, RoundState.TIMED_OUT, reason)

    def _close_session(self, rec: DaemonRecord, reason: str) -> None:
        if rec.outbox is not None:
            rec.outbox.put_nowait(None)
            rec.outbox = None
        rec.state = DaemonState.LOST
        rec.reason = reason

    async def _reap_forever(self) -> None:
        period = min(self.config.heartbeat_interval_s, self.config.heartbeat_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for rec in list(self.daemons.values()):
                silent_s = now - rec.last_heartbeat_mono
                if rec.outbox is not None and silent_s > self.config.heartbeat_timeout_s:
                    reason = f"lost: no heartbeat for {silent_s:.1f} s (heartbeat_timeout_s={self.config.heartbeat_timeout_s:g})"
                    log.warning("daemon lost daemon_id=%s %s", rec.daemon_id, reason)
                    self._close_session(rec, reason)
                    self._fail_in_open_round(rec.daemon_id, reason)
                    self._update_gauges()

    def _update_gauges(self) -> None:
        if self.metrics is not None:
            counts = {s.value: 0 for s in DaemonState}
            for rec in self.daemons.values():
                counts[rec.state.value] += 1
            self.metrics.daemons_by_state(counts)
