"""gRPC servicers: translate weightsync.v1 messages to Coordinator calls and back."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging

from weightsync.control.convert import (
    assignment_to_pb,
    checksums_from_pb,
    holds_from_pb,
    piece_sums_from_pb,
    rank_regions_from_pb,
    spec_from_pb,
)
from weightsync.control.coordinator import Coordinator, DaemonRegistration, SessionEvent, UpdateOptions, check_registration
from weightsync.control.records import DaemonRecord, RoundRecord
from weightsync.control.validation import MAX_LISTED_PROBLEMS, parse_manifest
from weightsync.core import DeadlineExceeded, InvalidArgument, ResourceExhausted
from weightsync.core.rank_regions import needed_bytes_per_rank
from weightsync.v1 import weightsync_pb2 as pb
from weightsync.v1 import weightsync_pb2_grpc as pb_grpc

__all__ = ["DaemonServicer", "InspectionServicer", "TrainerServicer", "daemon_to_pb", "round_to_pb"]

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 10.0
MAX_ROUNDS_LISTED = 1000
# Free text a client sends (a daemon's error): kept and listed, so bounded.
MAX_REASON_CHARS = 2000
# ListRounds stops adding rounds past this many bytes, well under the 64 MiB message limit,
# so that no history a client can cause makes the listing (and `status`) fail.
MAX_LISTING_BYTES = 16 << 20


def _clip(text: str) -> str:
    return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS] + f"... ({len(text) - MAX_REASON_CHARS} more characters)"


def round_to_pb(rnd: RoundRecord) -> pb.RoundInfo:
    a = rnd.assignment
    return pb.RoundInfo(
        update_id=a.update_id,
        version=a.version,
        state=pb.RoundState.Value("ROUND_STATE_" + rnd.state.value),
        participants=[pb.Participant(daemon_id=p.daemon_id, ranks=list(p.ranks), encoding=p.encoding) for p in a.participants],
        results=[
            pb.DaemonResult(
                daemon_id=daemon_id,
                status=pb.ResultStatus.Value("RESULT_STATUS_" + o.status.value),
                reason=_clip(o.reason),
                mismatched_tensors=o.mismatched[:MAX_LISTED_PROBLEMS],
                receive_s=o.receive_s,
                apply_s=o.apply_s,
                bytes_received=o.bytes_received,
                timeline=o.timeline,
            )
            for daemon_id, o in rnd.outcomes.items()
        ],
        total_bytes=a.plan.payload_bytes,
        num_tensors=a.plan.num_tensors,
        started_unix_s=rnd.started_unix,
        duration_s=rnd.duration_s,
        reason=_clip(rnd.reason),
        transport=a.rendezvous.transport,
        rank_bytes=[pb.RankBytes(rank=r, daemon_id=d, bytes_sent=sent, bytes_received=got) for r, d, sent, got in rnd.rank_bytes()],
    )


def daemon_to_pb(rec: DaemonRecord) -> pb.DaemonInfo:
    return pb.DaemonInfo(
        daemon_id=rec.daemon_id,
        state=pb.DaemonState.Value("DAEMON_STATE_" + rec.state.value),
        engine=rec.engine,
        model=rec.model,
        host=rec.host,
        num_ranks=rec.num_ranks,
        served_version=rec.served_version,
        last_heartbeat_unix_s=rec.last_heartbeat_unix,
        dirty=rec.dirty,
        stale=rec.stale,
        num_tensors=len(rec.inventory),
        transports=list(rec.transports),
        reason=_clip(rec.reason),
        unknown_version=rec.unknown_version,
        needed_bytes_per_rank=needed_bytes_per_rank(rec.needs, rec.inventory, rec.num_ranks),
        whole_fallbacks=sum(n.whole_fallbacks for n in rec.needs),
    )


@functools.lru_cache(maxsize=4)
def _assignment_message(assignment) -> pb.CoordinatorMessage:
    # Every participant gets the same plan: convert it once per round, not once per daemon.
    return pb.CoordinatorMessage(assignment=assignment_to_pb(assignment))


def _event_to_pb(ev: SessionEvent) -> pb.CoordinatorMessage:
    if ev.kind == "assignment":
        return _assignment_message(ev.assignment)
    if ev.kind == "cancel":
        return pb.CoordinatorMessage(cancel=pb.CancelUpdate(update_id=ev.update_id, reason=ev.reason))
    return pb.CoordinatorMessage(
        verdict=pb.UpdateVerdict(
            update_id=ev.update_id,
            version=ev.version,
            state=pb.RoundState.Value("ROUND_STATE_" + ev.round_state.value),
            status=pb.ResultStatus.Value("RESULT_STATUS_" + ev.status.value),
            reason=ev.reason,
        )
    )


def _identity_off(context) -> str:
    return ""


def _parse_registration(request: pb.RegisterDaemonRequest, owner: str, coordinator: Coordinator):
    limit = coordinator.config.max_inventory_tensors
    if len(request.inventory) > limit:
        raise ResourceExhausted(
            f"inventory has {len(request.inventory)} tensors: expected at most {limit} (max_inventory_tensors, --max-inventory-tensors)"
        )
    problems = []
    inventory = []
    for i, m in enumerate(request.inventory):
        try:
            inventory.append(spec_from_pb(m))
        except ValueError as e:
            problems.append(f"inventory[{i}]: {e}")
            if len(problems) >= MAX_LISTED_PROBLEMS:
                break
    if problems:
        raise InvalidArgument("inventory is invalid", problems)
    needs = _parse_needs(request, len(inventory))
    reg = DaemonRegistration(
        daemon_id=request.daemon_id,
        engine=request.engine,
        model=request.model,
        host=request.host,
        num_ranks=request.num_ranks,
        inventory=tuple(inventory),
        transports=tuple(request.transports),
        served_version=request.served_version,
        dirty=request.dirty,
        owner=owner,
        resume_token=request.resume_token,
        needs=needs,
    )
    return reg, check_registration(reg, coordinator.config)


def _parse_needs(request: pb.RegisterDaemonRequest, num_tensors: int) -> tuple:
    """The needs in core types; bounded like the inventory: one region per tensor per rank at most."""
    num_entries = sum(len(n.regions) for n in request.needs)
    if len(request.needs) > max(request.num_ranks, 1) or num_entries > len(request.needs) * num_tensors:
        raise ResourceExhausted(
            f"needs: {len(request.needs)} ranks with {num_entries} regions in all: expected at most num_ranks "
            f"({request.num_ranks}) ranks of at most one region per inventory tensor ({num_tensors}) each"
        )
    problems, needs = [], []
    for i, m in enumerate(request.needs):
        try:
            needs.append(rank_regions_from_pb(m, f"needs[{i}]"))
        except ValueError as e:
            problems.append(str(e))
            if len(problems) >= MAX_LISTED_PROBLEMS:
                break
    if problems:
        raise InvalidArgument("needs are invalid", problems)
    return tuple(needs)


class DaemonServicer(pb_grpc.DaemonServiceServicer):
    def __init__(self, coordinator: Coordinator, identify=_identity_off) -> None:
        self._c = coordinator
        self._identify = identify

    async def RegisterDaemon(self, request: pb.RegisterDaemonRequest, context) -> pb.RegisterDaemonResponse:
        # O(tensors) Python work in a thread: a large legal inventory must not stall the loop
        # that serves every other daemon's heartbeats (the GIL still switches every 5 ms).
        reg, inventory = await asyncio.to_thread(_parse_registration, request, self._identify(context), self._c)
        rec = self._c.register(reg, inventory)
        cfg = self._c.config
        return pb.RegisterDaemonResponse(
            session_token=rec.session_token,
            heartbeat_interval_s=cfg.heartbeat_interval_s,
            heartbeat_timeout_s=cfg.heartbeat_timeout_s,
            stale=rec.stale,
            unknown_version=rec.unknown_version,
        )

    async def Connect(self, request_iterator, context):
        it = request_iterator.__aiter__()
        try:
            async with asyncio.timeout(HELLO_TIMEOUT_S):
                first = await anext(it)
        except TimeoutError:
            raise DeadlineExceeded(f"no hello within {HELLO_TIMEOUT_S:g} s of opening the session") from None
        except StopAsyncIteration:
            return
        if first.WhichOneof("kind") != "hello":
            raise InvalidArgument(f"first session message: expected hello, got {first.WhichOneof('kind')}")
        daemon_id = first.hello.daemon_id
        outbox = self._c.open_session(daemon_id, first.hello.session_token, self._identify(context))
        # Tells the daemon its session is open: only now is it eligible for rounds.
        await context.send_initial_metadata((("weightsync-session", "open"),))
        reader = asyncio.create_task(self._read(daemon_id, it), name=f"session-reader-{daemon_id}")
        reason = "session ended"
        get: asyncio.Task | None = None
        try:
            while True:
                get = asyncio.create_task(outbox.get())
                done, _ = await asyncio.wait({get, reader}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    exc = reader.exception()
                    if exc is not None:
                        reason = f"bad session message: {exc}"
                        raise exc
                    reason = "daemon closed its session"
                    return
                ev = get.result()
                if ev is None:
                    reason = "closed by coordinator"
                    return
                yield _event_to_pb(ev)
        finally:
            if get is not None:
                get.cancel()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            self._c.session_closed(daemon_id, outbox, reason)

    async def _read(self, daemon_id: str, it) -> None:
        async for msg in it:
            kind = msg.WhichOneof("kind")
            if kind == "heartbeat":
                hb = msg.heartbeat
                self._c.heartbeat(
                    daemon_id, served_version=hb.served_version, dirty=hb.dirty, draining=hb.draining, busy_update_id=hb.busy_update_id,
                    holds_delta_base=hb.holds_delta_base, holds_needed_delta_base=hb.holds_needed_delta_base,
                )
            elif kind == "progress":
                p = msg.progress
                self._c.progress(daemon_id, p.update_id, p.buckets_done, p.bytes_done)
            elif kind == "result":
                r = msg.result
                try:
                    checksums = checksums_from_pb(r.checksums)
                    piece_sums = piece_sums_from_pb(r.piece_sums)
                    ok, error = r.ok, r.error[:MAX_REASON_CHARS]
                except ValueError as e:
                    checksums, piece_sums, ok, error = {}, {}, False, f"malformed result: {e}"
                self._c.report_result(
                    daemon_id,
                    r.update_id,
                    ok=ok,
                    error=error,
                    checksums=checksums,
                    receive_s=r.receive_s,
                    apply_s=r.apply_s,
                    bytes_received=r.bytes_received,
                    holds_delta_base=r.holds_delta_base,
                    holds_needed_delta_base=r.holds_needed_delta_base,
                    piece_sums=piece_sums,
                    timeline=dict(r.timeline),
                )
            else:
                raise InvalidArgument(f"session message: expected heartbeat, progress or result, got {kind}")


class TrainerServicer(pb_grpc.TrainerServiceServicer):
    def __init__(self, coordinator: Coordinator, identify=_identity_off) -> None:
        self._c = coordinator
        self._identify = identify

    async def BeginUpdate(self, request: pb.BeginUpdateRequest, context) -> pb.BeginUpdateResponse:
        manifest = parse_manifest(request.manifest)
        o = request.options
        options = UpdateOptions(
            transport=o.transport or "gloo",
            bucket_size_bytes=o.bucket_size_bytes,
            deadline_s=o.deadline_s,
            min_daemons=o.min_daemons if o.HasField("min_daemons") else 1,
            daemon_ids=tuple(o.daemon_ids),
            rendezvous_host=o.rendezvous_host,
            rendezvous_port=o.rendezvous_port,
            collective_timeout_s=o.collective_timeout_s,
            delta_base_version=o.delta_base_version if o.HasField("delta_base_version") else None,
        ) if request.HasField("options") else UpdateOptions()
        try:
            holds = holds_from_pb(request.holds, "holds")
        except ValueError as e:
            raise InvalidArgument(f"holds: {e}") from e
        assignment = self._c.begin_update(request.version, manifest, options, owner=self._identify(context), holds=holds or None)
        return pb.BeginUpdateResponse(assignment=assignment_to_pb(assignment))

    async def CommitUpdate(self, request: pb.CommitUpdateRequest, context) -> pb.CommitUpdateResponse:
        try:
            checksums = checksums_from_pb(request.checksums)
            piece_sums = piece_sums_from_pb(request.piece_sums)
        except ValueError as e:
            raise InvalidArgument(f"checksums: {e}") from e
        rnd = await self._c.commit_update(request.update_id, checksums, owner=self._identify(context), piece_sums=piece_sums or None)
        return pb.CommitUpdateResponse(round=round_to_pb(rnd))

    async def AbortUpdate(self, request: pb.AbortUpdateRequest, context) -> pb.AbortUpdateResponse:
        rnd = self._c.abort_update(request.update_id, request.reason[:MAX_REASON_CHARS], owner=self._identify(context))
        return pb.AbortUpdateResponse(round=round_to_pb(rnd))

    async def WatchUpdate(self, request: pb.WatchUpdateRequest, context):
        events = self._c.watch_update(request.update_id)
        # grpc.aio cancels this coroutine when the trainer's connection goes away (a killed
        # process closes its socket at once); the finally then tells the coordinator.
        reason = "the trainer closed its WatchUpdate stream before the round ended"
        try:
            while True:
                ev = await events.get()
                yield pb.RoundEvent(update_id=ev.update_id, state=pb.RoundState.Value("ROUND_STATE_" + ev.state.value), reason=ev.reason)
                if ev.state.finished:
                    return
        except asyncio.CancelledError:
            reason = "the trainer's connection to the coordinator closed (process died or network lost)"
            raise
        finally:
            self._c.watch_closed(request.update_id, events, reason)


class InspectionServicer(pb_grpc.InspectionServiceServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self._c = coordinator

    async def ListDaemons(self, request, context) -> pb.ListDaemonsResponse:
        return pb.ListDaemonsResponse(
            daemons=[daemon_to_pb(d) for d in sorted(self._c.daemons.values(), key=lambda d: d.daemon_id)],
            committed_version=self._c.committed_version,
            version_floor=self._c.max_version,
        )

    async def ListRounds(self, request: pb.ListRoundsRequest, context) -> pb.ListRoundsResponse:
        if request.limit < 0:
            raise InvalidArgument(f"limit: expected >= 0 (0 for the default of 20), got {request.limit}")
        limit = min(request.limit or 20, MAX_ROUNDS_LISTED)
        rounds = list(self._c.rounds.values())[-limit:]
        listed, size = [], 0
        for r in reversed(rounds):
            msg = round_to_pb(r)
            size += msg.ByteSize()
            if listed and size > MAX_LISTING_BYTES:
                break
            listed.append(msg)
        return pb.ListRoundsResponse(rounds=listed)

    async def GetRound(self, request: pb.GetRoundRequest, context) -> pb.GetRoundResponse:
        return pb.GetRoundResponse(round=round_to_pb(self._c.get_round(request.update_id)))
