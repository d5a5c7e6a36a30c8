"""The trainer's control-plane client: BeginUpdate, CommitUpdate, AbortUpdate (async and sync)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import grpc

from weightsync.control.channel import error_from_rpc, make_channel
from weightsync.control.convert import assignment_from_pb, checksums_to_pb, holds_to_pb, piece_sums_to_pb, spec_to_pb
from weightsync.core import Assignment, TensorSpec, WeightsyncError
from weightsync.v1 import weightsync_pb2 as pb
from weightsync.v1 import weightsync_pb2_grpc as pb_grpc

__all__ = ["DaemonVerdict", "RoundEndFn", "RoundFailed", "RoundReport", "SyncTrainerClient", "TrainerClient"]

log = logging.getLogger(__name__)

# on_round_end(update_id, state, reason): the round ended on the coordinator (state COMMITTED,
# FAILED, ABORTED or TIMED_OUT), or the trainer lost its round stream (state LOST). Called on
# the client's event loop thread; it must not block.
RoundEndFn = Callable[[str, str, str], None]

# Beyond the round's own deadline, the commit call waits this long for the verdict.
COMMIT_MARGIN_S = 30.0


@dataclass(frozen=True, slots=True)
class DaemonVerdict:
    daemon_id: str
    status: str  # OK | CHECKSUM_MISMATCH | FAILED | TIMED_OUT | PENDING
    reason: str
    mismatched_tensors: tuple[str, ...]
    receive_s: float
    apply_s: float
    bytes_received: int
    encoding: str = "dense"  # how its bytes travelled: "dense" or "delta"
    # Seconds from the start of its receive to the end of each phase (opened, received, ..., closed).
    timeline: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RoundReport:
    update_id: str
    version: int
    state: str  # COMMITTED | FAILED | ABORTED | TIMED_OUT | TRANSFERRING
    results: tuple[DaemonVerdict, ...]
    total_bytes: int
    num_tensors: int
    duration_s: float
    reason: str
    transport: str
    # A routed round: rank -> (daemon_id or "" for a trainer rank, bytes sent, bytes received).
    rank_bytes: dict[int, tuple[str, int, int]] = field(default_factory=dict)

    @property
    def committed(self) -> bool:
        return self.state == "COMMITTED"

    def raise_if_failed(self) -> "RoundReport":
        if not self.committed:
            raise RoundFailed(self)
        return self

    @classmethod
    def from_pb(cls, r: pb.RoundInfo) -> "RoundReport":
        encodings = {p.daemon_id: p.encoding or "dense" for p in r.participants}
        return cls(
            update_id=r.update_id,
            version=r.version,
            state=pb.RoundState.Name(r.state).removeprefix("ROUND_STATE_"),
            results=tuple(
                DaemonVerdict(
                    daemon_id=x.daemon_id,
                    status=pb.ResultStatus.Name(x.status).removeprefix("RESULT_STATUS_"),
                    reason=x.reason,
                    mismatched_tensors=tuple(x.mismatched_tensors),
                    receive_s=x.receive_s,
                    apply_s=x.apply_s,
                    bytes_received=x.bytes_received,
                    encoding=encodings.get(x.daemon_id, "dense"),
                    timeline=dict(x.timeline),
                )
                for x in r.results
            ),
            total_bytes=r.total_bytes,
            num_tensors=r.num_tensors,
            duration_s=r.duration_s,
            reason=r.reason,
            transport=r.transport,
            rank_bytes={b.rank: (b.daemon_id, b.bytes_sent, b.bytes_received) for b in r.rank_bytes},
        )


class RoundFailed(WeightsyncError):
    """A round ended without COMMITTED; the message names every failed daemon and why."""

    def __init__(self, report: RoundReport) -> None:
        self.report = report
        bad = [
            f"{v.daemon_id}: {v.status}" + (f" ({v.reason})" if v.reason else "")
            + (f" tensors {list(v.mismatched_tensors[:5])}" if v.mismatched_tensors else "")
            for v in report.results
            if v.status != "OK"
        ]
        super().__init__(f"update {report.update_id} (version {report.version}) ended {report.state}", bad or [report.reason])


class TrainerClient:
    """Async client. Every call carries a deadline; errors arrive as WeightsyncError subclasses."""

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        rpc_timeout_s: float = 30.0,
    ) -> None:
        self._channel = make_channel(target, credentials, token=token)
        self._trainer = pb_grpc.TrainerServiceStub(self._channel)
        self._inspect = pb_grpc.InspectionServiceStub(self._channel)
        self.rpc_timeout_s = rpc_timeout_s
        self._watches: dict[str, asyncio.Task] = {}

    async def __aenter__(self) -> "TrainerClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        for update_id in list(self._watches):
            await self._stop_watch(update_id)
        await self._channel.close()

    async def _call(self, what: str, method, request, timeout_s: float | None = None):
        try:
            return await method(request, timeout=timeout_s or self.rpc_timeout_s)
        except grpc.aio.AioRpcError as e:
            raise error_from_rpc(e, what) from e

    async def begin_update(
        self,
        version: int,
        manifest: Sequence[TensorSpec],
        *,
        transport: str = "gloo",
        bucket_size_bytes: int = 0,
        deadline_s: float = 0.0,
        min_daemons: int = 1,
        daemon_ids: Sequence[str] = (),
        rendezvous_host: str = "",
        rendezvous_port: int = 0,
        collective_timeout_s: float = 0.0,
        on_round_end: RoundEndFn | None = None,
        delta_base_version: int | None = None,
        holds: Mapping[int, Mapping] | None = None,
    ) -> Assignment:
        """Begins a round and holds its WatchUpdate stream open until the verdict (the trainer's liveness).

        on_round_end is told when the round ends or the stream is lost, e.g. to abandon a
        transfer the coordinator already failed because a daemon was lost.
        """
        req = pb.BeginUpdateRequest(
            version=version,
            manifest=[spec_to_pb(s) for s in manifest],
            options=pb.UpdateOptions(
                transport=transport,
                bucket_size_bytes=bucket_size_bytes,
                deadline_s=deadline_s,
                min_daemons=min_daemons,
                daemon_ids=list(daemon_ids),
                rendezvous_host=rendezvous_host,
                rendezvous_port=rendezvous_port,
                collective_timeout_s=collective_timeout_s,
                delta_base_version=delta_base_version,
            ),
            holds=holds_to_pb(holds or {}),
        )
        resp = await self._call("BeginUpdate", self._trainer.BeginUpdate, req)
        assignment = assignment_from_pb(resp.assignment)
        await self._watch(assignment.update_id, on_round_end)
        return assignment

    async def _watch(self, update_id: str, on_round_end: RoundEndFn | None) -> None:
        """Opens WatchUpdate and waits (bounded) for its first event, so the coordinator knows this trainer before any byte moves."""
        # No deadline on the stream itself: it lives exactly as long as the round, which the
        # coordinator bounds with the round's deadline.
        call = self._trainer.WatchUpdate(pb.WatchUpdateRequest(update_id=update_id))
        try:
            async with asyncio.timeout(self.rpc_timeout_s):
                first = await call.read()
        except (grpc.aio.AioRpcError, TimeoutError) as e:
            call.cancel()
            # The coordinator fails a round whose trainer never attached; say so now.
            log.warning("update_id=%s: could not open WatchUpdate: %s", update_id, e)
            self._round_ended(on_round_end, update_id, "LOST", f"could not open WatchUpdate: {e}")
            return
        self._watches[update_id] = asyncio.get_running_loop().create_task(
            self._follow(update_id, call, first, on_round_end), name=f"watch-{update_id}"
        )

    async def _follow(self, update_id: str, call, event, on_round_end: RoundEndFn | None) -> None:
        try:
            while event is not grpc.aio.EOF:
                state = pb.RoundState.Name(event.state).removeprefix("ROUND_STATE_")
                if state != "TRANSFERRING":
                    self._round_ended(on_round_end, update_id, state, event.reason)
                    return
                event = await call.read()
            reason = "the coordinator ended WatchUpdate without a final state"
        except grpc.aio.AioRpcError as e:
            reason = f"lost WatchUpdate: {e.code().name}: {e.details()}"
        except asyncio.CancelledError:
            call.cancel()  # the round ended for this trainer (verdict, abort, close): release the stream
            raise
        finally:
            self._watches.pop(update_id, None)
        log.warning("update_id=%s: %s", update_id, reason)
        self._round_ended(on_round_end, update_id, "LOST", reason)

    @staticmethod
    def _round_ended(on_round_end: RoundEndFn | None, update_id: str, state: str, reason: str) -> None:
        if on_round_end is None:
            return
        try:
            on_round_end(update_id, state, reason)
        except Exception:  # a caller's callback must not kill the watch; log it with its traceback
            log.error("on_round_end for update_id=%s raised", update_id, exc_info=True)

    async def _stop_watch(self, update_id: str) -> None:
        task = self._watches.pop(update_id, None)
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def commit_update(
        self, assignment: Assignment, checksums: Mapping[str, int], sender_s: float = 0.0,
        piece_sums: Mapping[tuple[int, int], int] | None = None,
    ) -> RoundReport:
        """Sends the trainer's checksums (a routed round: every rank's piece sums) and waits for the verdict (bounded by the round's deadline)."""
        req = pb.CommitUpdateRequest(
            update_id=assignment.update_id, checksums=checksums_to_pb(checksums), sender_s=sender_s,
            piece_sums=piece_sums_to_pb(piece_sums or {}),
        )
        try:
            resp = await self._call("CommitUpdate", self._trainer.CommitUpdate, req, assignment.deadline_s + COMMIT_MARGIN_S)
        finally:
            await self._stop_watch(assignment.update_id)
        return RoundReport.from_pb(resp.round)

    async def abort_update(self, update_id: str, reason: str) -> RoundReport:
        try:
            resp = await self._call("AbortUpdate", self._trainer.AbortUpdate, pb.AbortUpdateRequest(update_id=update_id, reason=reason))
        finally:
            await self._stop_watch(update_id)
        return RoundReport.from_pb(resp.round)

    async def list_daemons(self) -> pb.ListDaemonsResponse:
        return await self._call("ListDaemons", self._inspect.ListDaemons, pb.ListDaemonsRequest())

    async def list_rounds_pb(self, limit: int = 20) -> pb.ListRoundsResponse:
        return await self._call("ListRounds", self._inspect.ListRounds, pb.ListRoundsRequest(limit=limit))

    async def list_rounds(self, limit: int = 20) -> list[RoundReport]:
        return [RoundReport.from_pb(r) for r in (await self.list_rounds_pb(limit)).rounds]

    async def get_round(self, update_id: str) -> RoundReport:
        resp = await self._call("GetRound", self._inspect.GetRound, pb.GetRoundRequest(update_id=update_id))
        return RoundReport.from_pb(resp.round)


class SyncTrainerClient:
    """Blocking flavour for training loops: the async client on a private event-loop thread."""

    def __init__(self, target: str, **kwargs) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="weightsync-client", daemon=True)
        self._thread.start()
        self._client: TrainerClient = self._run(self._make(target, kwargs))

    @staticmethod
    async def _make(target: str, kwargs) -> TrainerClient:
        return TrainerClient(target, **kwargs)

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def begin_update(self, version: int, manifest: Sequence[TensorSpec], **options) -> Assignment:
        return self._run(self._client.begin_update(version, manifest, **options))

    def commit_update(
        self, assignment: Assignment, checksums: Mapping[str, int], sender_s: float = 0.0,
        piece_sums: Mapping[tuple[int, int], int] | None = None,
    ) -> RoundReport:
        return self._run(self._client.commit_update(assignment, checksums, sender_s, piece_sums))

    def abort_update(self, update_id: str, reason: str) -> RoundReport:
        return self._run(self._client.abort_update(update_id, reason))

    def get_round(self, update_id: str) -> RoundReport:
        return self._run(self._client.get_round(update_id))

    def list_daemons(self) -> pb.ListDaemonsResponse:
        return self._run(self._client.list_daemons())

    def list_rounds(self, limit: int = 20) -> list[RoundReport]:
        return self._run(self._client.list_rounds(limit))

    def close(self) -> None:
        if self._loop.is_running():
            self._run(self._client.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

    def __enter__(self) -> "SyncTrainerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
