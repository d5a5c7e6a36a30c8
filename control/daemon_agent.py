"""The daemon side of the control plane: registration, one long-lived session, heartbeats.

A pluggable handler does the tensor work for each Assignment (the data-plane receiver,
the vLLM adapter, or a test handler); the agent only speaks gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc

from weightsync.control.channel import check_token_transport, make_channel
from weightsync.control.convert import assignment_from_pb, checksums_to_pb, piece_sums_to_pb, rank_regions_to_pb, spec_to_pb
from weightsync.core import Assignment, TensorSpec, is_full_round
from weightsync.core.rank_regions import RankRegions
from weightsync.v1 import weightsync_pb2 as pb
from weightsync.v1 import weightsync_pb2_grpc as pb_grpc

__all__ = ["DaemonAgent", "DaemonIdentity", "HandlerResult", "ProgressFn", "UpdateHandler", "failure_reason"]

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]


def failure_reason(error: BaseException, max_chars: int = 2000) -> str:
    """The error and its causes in one line: the round's reason must name what went wrong.

    A wrapper's message alone ("staging failed", "engine died") hides the cause that an
    operator reading `weightsync status` needs; the chain of `raise ... from` causes has it.
    """
    parts = [f"{type(error).__name__}: {error}"]
    seen = {id(error)}
    cause = error.__cause__
    while cause is not None and id(cause) not in seen and len(parts) < 5:
        seen.add(id(cause))
        text = f"{type(cause).__name__}: {cause}"
        if text not in parts[-1]:
            parts.append(text)
        cause = cause.__cause__
    return " <- caused by ".join(parts)[:max_chars]


@dataclass(frozen=True, slots=True)
class HandlerResult:
    checksums: dict[str, int]
    bytes_received: int = 0
    receive_s: float = 0.0
    apply_s: float = 0.0
    # A routed round: (data-plane rank, piece index) -> S of the piece as it landed.
    piece_sums: dict[tuple[int, int], int] = field(default_factory=dict)
    # Seconds from the start of the receive to the end of each phase (UpdateResult.timeline).
    timeline: dict[str, float] = field(default_factory=dict)


# handler(assignment, my_ranks, progress) -> HandlerResult; raise to report failure.
# progress(buckets_done, bytes_done) may be called from any thread.
# A handler whose work runs in threads should also have `abort(update_id, reason)`: the
# agent calls it when the coordinator cancels the round (instead of cancelling the task,
# which would leave the thread running unseen), and stays busy until the handler returns.
# A handler whose engine keeps a delta base apart from the model (vLLM's shadow) has a
# `holds_delta_base` attribute, read for every heartbeat and result (so it must be cheap), and
# `holds_needed_delta_base` where the base may cover only its receivers' needed regions.
UpdateHandler = Callable[[Assignment, tuple[int, ...], ProgressFn], Awaitable[HandlerResult]]


@dataclass(frozen=True, slots=True, kw_only=True)
class DaemonIdentity:
    daemon_id: str
    engine: str
    model: str
    host: str
    inventory: tuple[TensorSpec, ...]
    num_ranks: int = 1
    transports: tuple[str, ...] = ("gloo",)
    # What each receiver rank's loader reads, one per rank (engine/needs.py); (): every tensor whole.
    needs: tuple[RankRegions, ...] = ()

    def __post_init__(self) -> None:
        if not self.daemon_id:
            raise ValueError("daemon_id must be non-empty")
        if self.num_ranks < 1:
            raise ValueError(f"num_ranks must be >= 1, got {self.num_ranks}")
        if self.needs and sorted(n.rank for n in self.needs) != list(range(self.num_ranks)):
            raise ValueError(
                f"needs: expected one entry per rank 0..{self.num_ranks - 1} or none, got ranks {sorted(n.rank for n in self.needs)}"
            )


@dataclass(slots=True)
class _Session:
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)


class DaemonAgent:
    """Registers, keeps a session open (reconnecting with backoff) and runs the handler.

    The agent is the one owner, on the daemon side, of what its engine serves:
    `served_version` and `dirty` change only here, by the same rule the coordinator
    applies (core.is_full_round), and every other daemon-side view (the HTTP endpoint
    of `weightsync serve`, logs) reads `status()`. Both survive reconnects and
    coordinator restarts: they are re-registered so that the coordinator recovers what
    each engine holds.
    """

    def __init__(
        self,
        target: str,
        identity: DaemonIdentity,
        handler: UpdateHandler,
        *,
        served_version: int = -1,
        dirty: bool = False,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        rpc_timeout_s: float = 10.0,
        reconnect_min_s: float = 0.2,
        reconnect_max_s: float = 5.0,
        warn_interval_s: float = 30.0,
        on_verdict: Callable[[pb.UpdateVerdict], None] | None = None,
    ) -> None:
        self.identity = identity
        self._target = target
        self._handler = handler
        self._credentials = credentials
        check_token_transport(target, credentials, token)
        self._token = token
        # Proves to the coordinator that a re-registration comes from this same process.
        self._session_token = ""
        self._rpc_timeout_s = rpc_timeout_s
        self._reconnect_min_s = reconnect_min_s
        self._reconnect_max_s = reconnect_max_s
        self._on_verdict = on_verdict
        self._warn_interval_s = warn_interval_s
        self._last_warning_mono = float("-inf")
        self._failures_since_warning = 0
        self.failed_attempts = 0
        self.served_version = served_version
        self.dirty = dirty
        self.stale = False
        self.draining = False
        self.sessions_opened = 0
        self.last_error: str = ""
        self.verdicts: list[pb.UpdateVerdict] = []
        self.connected = asyncio.Event()
        self._channel: grpc.aio.Channel | None = None
        self._run_task: asyncio.Task | None = None
        self._work: asyncio.Task | None = None
        self._work_update_id = ""
        self._closing = False
        self._session: _Session | None = None
        # update_id -> (covers the whole inventory, dirty before the round began)
        self._rounds: dict[str, tuple[bool, bool]] = {}

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._run_task is None:
            self._run_task = asyncio.get_running_loop().create_task(self._run(), name=f"daemon-agent-{self.identity.daemon_id}")

    async def wait_connected(self, timeout_s: float = 30.0) -> None:
        async with asyncio.timeout(timeout_s):
            await self.connected.wait()

    async def close(self, drain_timeout_s: float = 30.0) -> None:
        """Drains: tells the coordinator, finishes the current round (bounded), then stops."""
        self.draining = True
        if self._session is not None:
            self._session.outbox.put_nowait(self._heartbeat_msg())
        if self._work is not None and not self._work.done():
            with contextlib.suppress(TimeoutError, asyncio.CancelledError, Exception):
                async with asyncio.timeout(drain_timeout_s):
                    await asyncio.shield(self._work)
        self._closing = True
        for task in (self._work, self._run_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    @property
    def busy(self) -> bool:
        return self._work is not None and not self._work.done()

    @property
    def coordinator(self) -> str:
        return self._target

    def status(self) -> dict[str, object]:
        """What this engine serves and how the agent stands with the coordinator, for every daemon-side view."""
        return {
            "daemon_id": self.identity.daemon_id,
            "version": self.served_version,
            "dirty": self.dirty,
            "stale": self.stale,
            "update_id": self._work_update_id if self.busy else "",
            "connected": self.connected.is_set(),
            "coordinator": self._target,
            "last_error": self.last_error,
            "failed_attempts": self.failed_attempts,
        }

    # ------------------------------------------------------------------ session

    async def _run(self) -> None:
        backoff_s = self._reconnect_min_s
        while not self._closing:
            opened_before = self.sessions_opened
            try:
                await self._session_once()
                self._note_failure("session closed by coordinator", exc=None)
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as e:
                self._note_failure(f"{e.code().name}: {e.details()}", exc=None)
            except Exception as e:  # process boundary of the reconnect loop: log and retry
                self._note_failure(f"{type(e).__name__}: {e}", exc=e)
            self.connected.clear()
            if self._closing:
                break
            if self.sessions_opened > opened_before:
                backoff_s = self._reconnect_min_s
            await asyncio.sleep(backoff_s * random.uniform(0.5, 1.0))
            backoff_s = min(backoff_s * 2, self._reconnect_max_s)

    def _note_failure(self, error: str, *, exc: Exception | None) -> None:
        """Records a failed attempt and warns, rate-limited: a wrong address must never be silent."""
        self.last_error = error
        self.failed_attempts += 1
        self._failures_since_warning += 1
        now = time.monotonic()
        if now - self._last_warning_mono < self._warn_interval_s:
            log.debug("coordinator %s: attempt failed daemon_id=%s error=%s", self._target, self.identity.daemon_id, error)
            return
        more = f" ({self._failures_since_warning} failed attempts since the last warning)" if self._failures_since_warning > 1 else ""
        log.warning(
            "cannot reach the coordinator at %s daemon_id=%s error=%s; retrying with backoff%s",
            self._target, self.identity.daemon_id, error, more, exc_info=exc,
        )
        self._last_warning_mono = now
        self._failures_since_warning = 0

    async def _session_once(self) -> None:
        if self._channel is None:
            self._channel = make_channel(self._target, self._credentials, token=self._token)
        stub = pb_grpc.DaemonServiceStub(self._channel)
        ident = self.identity
        try:
            reg = await stub.RegisterDaemon(
                pb.RegisterDaemonRequest(
                    daemon_id=ident.daemon_id,
                    engine=ident.engine,
                    model=ident.model,
                    host=ident.host,
                    num_ranks=ident.num_ranks,
                    inventory=[spec_to_pb(s) for s in ident.inventory],
                    needs=[rank_regions_to_pb(n) for n in ident.needs],
                    transports=list(ident.transports),
                    served_version=self.served_version,
                    dirty=self.dirty,
                    resume_token=self._session_token,
                ),
                timeout=self._rpc_timeout_s,
            )
        except grpc.aio.AioRpcError as e:
            if e.code() in (
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.ALREADY_EXISTS,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            ):
                log.error("registration refused daemon_id=%s: %s", ident.daemon_id, e.details())
            raise
        self._session_token = reg.session_token
        self.stale = reg.stale
        if reg.unknown_version:
            # The coordinator does not trust our version: we are dirty until a full round.
            self.dirty = True
        session = _Session()
        session.outbox.put_nowait(pb.DaemonMessage(hello=pb.SessionHello(daemon_id=ident.daemon_id, session_token=reg.session_token)))

        async def requests():
            while True:
                msg = await session.outbox.get()
                if msg is None:
                    return
                yield msg

        call = stub.Connect(requests())
        self._session = session
        try:
            async with asyncio.timeout(self._rpc_timeout_s):
                await call.initial_metadata()  # sent once the coordinator has opened the session
        except BaseException:
            session.outbox.put_nowait(None)
            call.cancel()
            raise
        beats = asyncio.get_running_loop().create_task(self._heartbeats(session, reg.heartbeat_interval_s), name="heartbeats")
        self.sessions_opened += 1
        self.last_error = ""
        # The first failure after a good session always warns.
        self._last_warning_mono = float("-inf")
        self._failures_since_warning = 0
        self.connected.set()
        log.info("session open daemon_id=%s served_version=%d dirty=%s stale=%s", ident.daemon_id, self.served_version, self.dirty, reg.stale)
        try:
            async for msg in call:
                kind = msg.WhichOneof("kind")
                if kind == "assignment":
                    self._on_assignment(msg.assignment, session)
                elif kind == "cancel":
                    self._on_cancel(msg.cancel)
                elif kind == "verdict":
                    self._on_verdict_msg(msg.verdict)
        finally:
            self._session = None
            if self.busy and not self._closing:
                # The round's verdict can no longer arrive: a restarted coordinator does
                # not know it. Give up on it; the engine stays flagged dirty.
                log.warning("session lost mid-round: abandoning update_id=%s", self._work_update_id)
                self._stop_work("the daemon lost its session with the coordinator")
            beats.cancel()
            session.outbox.put_nowait(None)
            call.cancel()

    def _heartbeat_msg(self) -> pb.DaemonMessage:
        return pb.DaemonMessage(
            heartbeat=pb.Heartbeat(
                served_version=self.served_version,
                dirty=self.dirty,
                busy_update_id=self._work_update_id if self.busy else "",
                draining=self.draining,
                holds_delta_base=self._holds_delta_base(),
                holds_needed_delta_base=self._holds_needed_delta_base(),
            )
        )

    def _holds_delta_base(self) -> bool:
        return bool(getattr(self._handler, "holds_delta_base", False))

    def _holds_needed_delta_base(self) -> bool:
        # That a whole base implies it is the coordinator's rule (Coordinator.heartbeat), not repeated here.
        return bool(getattr(self._handler, "holds_needed_delta_base", False))

    async def _heartbeats(self, session: _Session, interval_s: float) -> None:
        # Its own task, and tensor work runs in threads: heartbeats never wait on tensors.
        while True:
            session.outbox.put_nowait(self._heartbeat_msg())
            await asyncio.sleep(interval_s)

    # ------------------------------------------------------------------ work

    def _on_assignment(self, msg: pb.Assignment, session: _Session) -> None:
        try:
            assignment = assignment_from_pb(msg)
            ranks = assignment.ranks_of(self.identity.daemon_id)
        except (ValueError, KeyError) as e:
            session.outbox.put_nowait(pb.DaemonMessage(result=pb.UpdateResult(update_id=msg.update_id, ok=False, error=f"bad assignment: {e}")))
            return
        if self.busy or self.draining:
            why = "draining" if self.draining else f"busy with update {self._work_update_id}"
            session.outbox.put_nowait(pb.DaemonMessage(result=pb.UpdateResult(update_id=msg.update_id, ok=False, error=why)))
            return
        full = is_full_round((s.name for s in self.identity.inventory), {e.name for _, e in assignment.plan.entries()})
        self._rounds[assignment.update_id] = (full, self.dirty)
        self._work_update_id = assignment.update_id
        self._work = asyncio.get_running_loop().create_task(self._handle(assignment, ranks, session), name=f"update-{assignment.update_id}")

    async def _handle(self, assignment: Assignment, ranks: tuple[int, ...], session: _Session) -> None:
        loop = asyncio.get_running_loop()
        daemon_id = self.identity.daemon_id

        def progress(buckets_done: int, bytes_done: int) -> None:
            msg = pb.DaemonMessage(progress=pb.Progress(update_id=assignment.update_id, buckets_done=buckets_done, bytes_done=bytes_done))
            loop.call_soon_threadsafe(session.outbox.put_nowait, msg)

        # From the first byte on, the engine may hold a mix: dirty until a verdict says OK.
        self.dirty = True
        t0 = time.monotonic()
        try:
            res = await self._handler(assignment, ranks, progress)
        except asyncio.CancelledError:
            log.warning("update cancelled update_id=%s daemon_id=%s", assignment.update_id, daemon_id)
            session.outbox.put_nowait(pb.DaemonMessage(result=pb.UpdateResult(update_id=assignment.update_id, ok=False, error="cancelled")))
            raise
        except Exception as e:  # RPC-facing boundary: report the failure to the coordinator
            log.error("update failed update_id=%s daemon_id=%s", assignment.update_id, daemon_id, exc_info=True)
            session.outbox.put_nowait(
                pb.DaemonMessage(result=pb.UpdateResult(update_id=assignment.update_id, ok=False, error=failure_reason(e)))
            )
            return
        self.served_version = assignment.version
        log.info(
            "update applied update_id=%s daemon_id=%s version=%d tensors=%d seconds=%.3f",
            assignment.update_id, daemon_id, assignment.version, len(res.checksums), time.monotonic() - t0,
        )
        session.outbox.put_nowait(
            pb.DaemonMessage(
                result=pb.UpdateResult(
                    update_id=assignment.update_id,
                    ok=True,
                    checksums=checksums_to_pb(res.checksums),
                    receive_s=res.receive_s,
                    apply_s=res.apply_s,
                    bytes_received=res.bytes_received,
                    holds_delta_base=self._holds_delta_base(),
                    holds_needed_delta_base=self._holds_needed_delta_base(),
                    piece_sums=piece_sums_to_pb(res.piece_sums),
                    timeline=res.timeline,
                )
            )
        )

    def _on_cancel(self, msg: pb.CancelUpdate) -> None:
        if self.busy and self._work_update_id == msg.update_id:
            log.warning("cancelling update_id=%s reason=%s", msg.update_id, msg.reason)
            self._stop_work(f"the coordinator cancelled the round: {msg.reason}")

    def _stop_work(self, reason: str) -> None:
        abort = getattr(self._handler, "abort", None)
        if abort is None:
            self._work.cancel()
            return
        # The handler's thread leaves the data plane within its poll interval and the task
        # then ends by itself; until it has, `busy` stays true and heartbeats say so.
        abort(self._work_update_id, reason)

    def _on_verdict_msg(self, v: pb.UpdateVerdict) -> None:
        self.verdicts.append(v)
        full, dirty_before = self._rounds.pop(v.update_id, (False, True))
        # The coordinator's rule, so that ListDaemons and every daemon-side view agree:
        # OK on a full round cleans the engine; OK on a partial round leaves it as it
        # was before the round (it verified only its own tensors); anything else may
        # have left a mix behind.
        if v.status == pb.RESULT_STATUS_OK:
            self.served_version = v.version
            self.dirty = dirty_before and not full
            if full:
                self.stale = False
        else:
            self.dirty = True
        if self._on_verdict is not None:
            self._on_verdict(v)
