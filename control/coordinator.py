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
from weightsync.control.state_file import CommittedState, load_state, save_state
from weightsync.control.validation import MAX_LISTED_PROBLEMS, check_against_inventory, check_needs
from weightsync.core import (
    ALIGN_BYTES,
    AlreadyExists,
    Assignment,
    BucketPlan,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Participant,
    PermissionDenied,
    Rendezvous,
    ResourceExhausted,
    TensorSpec,
    Unavailable,
    default_bucket_size,
    is_full_round,
)
from weightsync.core.rank_regions import RankRegions
from weightsync.core.regions import Region
from weightsync.core.routing import holds_problems, judge_pieces, plan_routes
from weightsync.core.types import TRANSPORTS

__all__ = ["Coordinator", "CoordinatorConfig", "check_registration", "UpdateOptions", "DaemonRegistration", "RoundEvent", "SessionEvent"]

log = logging.getLogger(__name__)

MAX_BUCKET_SIZE_BYTES = 8 << 30
MAX_DEADLINE_S = 24 * 3600.0
# A round shorter than this would expire before one default heartbeat interval (1 s) could
# tell a working daemon from a silent one: every such round would end TIMED_OUT.
MIN_DEADLINE_S = 1.0
# Free-text fields of a registration (engine, model, host): shown by status, never parsed.
MAX_LABEL_CHARS = 1024
# Trainer ranks that may send in one routed round: each is a data-plane rank of the one group.
MAX_TRAINER_RANKS = 1 << 14
# torch's own limit on a tensor's dims; also keeps the byte count a small product.
MAX_DIMS = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class CoordinatorConfig:
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 10.0
    default_deadline_s: float = 600.0
    default_collective_timeout_s: float = 120.0
    rounds_kept: int = 100
    # "" keeps no state: after a restart every registered version is unknown (flagged dirty).
    state_file: str = ""
    # A daemon without a session for this long is forgotten (its id and credential binding too).
    lost_expiry_s: float = 3600.0
    max_daemons: int = 10_000
    max_inventory_tensors: int = 1_000_000
    max_tensor_bytes: int = 1 << 40
    max_inventory_bytes: int = 64 << 40
    # Request bodies read at once, and how long one may take (see control/read_limits.py).
    max_concurrent_reads: int = 4
    request_read_timeout_s: float = 60.0

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
        if self.lost_expiry_s <= self.heartbeat_timeout_s:
            raise ValueError(
                f"lost_expiry_s ({self.lost_expiry_s}) must exceed heartbeat_timeout_s ({self.heartbeat_timeout_s}): "
                "a daemon must be LOST before it can expire"
            )
        if self.request_read_timeout_s <= 0:
            raise ValueError(f"request_read_timeout_s must be > 0, got {self.request_read_timeout_s}")
        for name in ("max_daemons", "max_inventory_tensors", "max_tensor_bytes", "max_inventory_bytes", "max_concurrent_reads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


# Engines whose receivers read a delta round's per-rank framing (a dense rank of a delta round
# gets every tensor as a dense "delta"); a round with any other engine is dense for all.
DELTA_ENGINES = frozenset({"memory", "vllm"})
# Engines that patch the tensors they serve in place (runtime/daemon.py): clean means they hold
# the base. Others (vLLM: a host shadow per worker, engine/shadow.py) take a delta only while
# their daemon says its receivers hold the base (Heartbeat/UpdateResult.holds_delta_base).
IN_PLACE_DELTA_ENGINES = frozenset({"memory"})
# Engines whose daemons receive routed rounds (dataplane/routed.py via runtime/daemon.py, and
# engine/routed.py in vLLM workers). A round with another engine in it is broadcast as before
# (needs ignored), or refused if trainer ranks declared holds: their shards cannot be broadcast
# from rank 0.
ROUTED_ENGINES = frozenset({"memory", "vllm"})
# Engines whose declared needs route a round by themselves (a trainer without holds: rank 0 holds
# all). Not vLLM: every vLLM daemon declares needs, and a trainer that did not ask for routing
# (WeightSync(routed=False)) keeps the dense path's delta rounds and lazily materialised tensors;
# WeightSync(routed=True) routes into vLLM, from one rank or many.
NEEDS_ROUTE_ENGINES = frozenset({"memory"})
# Engines whose daemons read a routed delta round's frames (dataplane/routed_delta.py: every rank,
# dense or delta, patches its pieces in place: a memory engine's tensors, a vLLM worker's shadow,
# engine/routed.py); a routed round with any other engine is dense for all.
ROUTED_DELTA_ENGINES = frozenset({"memory", "vllm"})


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
    # The version the trainer encodes a delta against; None: a dense round.
    delta_base_version: int | None = None


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
    # Who sent it: the credential's identity (see control/identity.py); "" without credentials.
    owner: str = ""
    # The session token of this same process's previous registration, if it had one.
    resume_token: str = ""
    # What each receiver rank needs (core/rank_regions.py); (): every rank needs every tensor whole.
    needs: tuple[RankRegions, ...] = ()


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


def check_registration(reg: DaemonRegistration, config: CoordinatorConfig) -> dict[str, TensorSpec]:
    """Validates a registration like a manifest and returns its inventory by name.

    Pure and O(tensors): the servicer runs it in a thread so that a large (legal)
    inventory never stalls the event loop, and with it every other daemon's heartbeats.
    """
    problems: list[str] = []
    if not reg.daemon_id or len(reg.daemon_id) > 256 or not reg.daemon_id.isprintable():
        problems.append(f"daemon_id {reg.daemon_id[:64]!r}: expected 1..256 printable characters")
    if not 1 <= reg.num_ranks <= 4096:
        problems.append(f"num_ranks: expected 1..4096 receiver ranks, got {reg.num_ranks}")
    for field in ("engine", "model", "host"):
        value = getattr(reg, field)
        if len(value) > MAX_LABEL_CHARS or not value.isprintable():
            problems.append(f"{field}: expected at most {MAX_LABEL_CHARS} printable characters, got {len(value)} ({value[:40]!r}...)")
    if not -1 <= reg.served_version:
        problems.append(f"served_version: expected -1 (none yet) or a version >= 0, got {reg.served_version}")
    unknown = sorted(set(reg.transports) - set(TRANSPORTS))
    if unknown or not reg.transports or len(reg.transports) > len(TRANSPORTS):
        problems.append(f"transports: expected a non-empty subset of {list(TRANSPORTS)}, got {list(reg.transports)[:8]}")
    if not reg.inventory:
        problems.append("inventory is empty: expected every tensor the engine accepts")
    if len(reg.inventory) > config.max_inventory_tensors:
        raise ResourceExhausted(
            f"inventory has {len(reg.inventory)} tensors: expected at most {config.max_inventory_tensors} "
            "(max_inventory_tensors, --max-inventory-tensors)"
        )
    inventory: dict[str, TensorSpec] = {}
    total_bytes = 0
    for i, spec in enumerate(reg.inventory):
        if spec.name in inventory:
            problems.append(f"inventory[{i}]: duplicate tensor name {spec.name!r}")
            continue
        if len(spec.shape) > MAX_DIMS:
            problems.append(f"inventory[{i}] ({spec.name!r}): {len(spec.shape)} dims: expected at most {MAX_DIMS}")
            continue
        nbytes = spec.nbytes
        if nbytes > config.max_tensor_bytes:
            problems.append(
                f"inventory[{i}] ({spec.name!r}): shape {list(spec.shape)[:8]} of {spec.dtype} is {nbytes} bytes: expected at "
                f"most {config.max_tensor_bytes} per tensor (max_tensor_bytes, --max-tensor-bytes)"
            )
        total_bytes += nbytes
        inventory[spec.name] = spec
        if len(problems) > 2 * MAX_LISTED_PROBLEMS:
            break
    if total_bytes > config.max_inventory_bytes:
        problems.append(
            f"inventory: {total_bytes} bytes in all: expected at most {config.max_inventory_bytes} "
            "(max_inventory_bytes, --max-inventory-bytes)"
        )
    problems.extend(check_needs(reg.needs, inventory, reg.num_ranks))
    if problems:
        raise InvalidArgument("registration is invalid", problems[:MAX_LISTED_PROBLEMS])
    return inventory


@dataclass(frozen=True, slots=True)
class RoundEvent:
    """What the coordinator tells a trainer following its round (WatchUpdate)."""

    update_id: str
    state: RoundState
    reason: str = ""


class Coordinator:
    """Owns every daemon record and round; one round open at a time.

    Every participant of a round has a liveness: each daemon its session and heartbeats,
    the trainer its WatchUpdate stream. Losing any of them, or any daemon reporting a
    failure, fails the round at once and tells everyone (cancel to the daemons, the final
    event to the trainer), so that the data plane is abandoned everywhere within seconds
    instead of at the collective timeout.
    """

    def __init__(self, config: CoordinatorConfig | None = None, metrics=None) -> None:
        self.config = config or CoordinatorConfig()
        self.metrics = metrics
        self.daemons: dict[str, DaemonRecord] = {}
        self.rounds: OrderedDict[str, RoundRecord] = OrderedDict()
        self.open_round: RoundRecord | None = None
        # Only rounds move these two, never a registration: a daemon's claim is checked
        # against them. Highest version any round has begun with (the floor): a
        # half-applied round may have put it on some engine, so a new round must go past it.
        state = load_state(self.config.state_file) if self.config.state_file else CommittedState()
        self.max_version = state.version_floor
        self.committed_version = state.committed_version
        if self.config.state_file:
            save_state(self.config.state_file, state)  # fails now, at start, if it cannot be written
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

    def register(self, reg: DaemonRegistration, inventory: dict[str, TensorSpec] | None = None) -> DaemonRecord:
        """Records a daemon. `inventory` is `check_registration(reg, config)`, when the caller ran it off the loop."""
        if inventory is None:
            inventory = check_registration(reg, self.config)
        old = self.daemons.get(reg.daemon_id)
        if old is not None:
            self._check_takeover(old, reg)
        elif len(self.daemons) >= self.config.max_daemons:
            raise ResourceExhausted(
                f"daemon_id {reg.daemon_id!r}: {len(self.daemons)} daemons are registered, the limit "
                f"(max_daemons, --max-daemons) is {self.config.max_daemons}: stop unused daemons or raise it"
            )
        if old is not None:
            # A daemon that restarted re-registers under its old id; its old session is void.
            self._close_session(old, "daemon re-registered")
            self._fail_in_open_round(reg.daemon_id, "daemon re-registered during the round")
        # A registration only claims a version; the coordinator's own record decides what it
        # is worth. A version above every round this coordinator began (2^63-1, a typo, or any
        # version after a restart without --state-file) is not trusted: it never moves the
        # floor or the committed version, and the engine counts as dirty until a full round.
        unknown = reg.served_version > self.max_version
        stale = reg.served_version < self.committed_version
        rec = DaemonRecord(
            daemon_id=reg.daemon_id,
            engine=reg.engine,
            model=reg.model,
            host=reg.host,
            num_ranks=reg.num_ranks,
            inventory=inventory,
            transports=tuple(reg.transports),
            served_version=reg.served_version,
            dirty=reg.dirty or unknown,
            stale=stale,
            session_token=secrets.token_hex(16),
            owner=reg.owner,
            unknown_version=unknown,
            needs=reg.needs,
        )
        self.daemons[reg.daemon_id] = rec
        log.info(
            "daemon registered daemon_id=%s engine=%s ranks=%d tensors=%d served_version=%d dirty=%s stale=%s unknown_version=%s",
            rec.daemon_id, rec.engine, rec.num_ranks, len(inventory), rec.served_version, rec.dirty, stale, unknown,
        )
        self._update_gauges()
        return rec

    def _check_takeover(self, old: DaemonRecord, reg: DaemonRegistration) -> None:
        """A daemon id belongs to the credential that registered it, and to one live process."""
        if old.owner != reg.owner:
            raise PermissionDenied(
                f"daemon_id {reg.daemon_id!r} is registered by another credential: a daemon id belongs to the "
                "token or client certificate that first registered it; use your own daemon id"
            )
        if old.outbox is None or (reg.resume_token and secrets.compare_digest(reg.resume_token, old.session_token)):
            return  # no live session, or the same process replacing its own half-open session
        silent_s = time.monotonic() - old.last_heartbeat_mono
        raise AlreadyExists(
            f"daemon_id {reg.daemon_id!r} is held by a live session (last heartbeat {silent_s:.1f} s ago, "
            f"host {old.host!r}): give each process its own --daemon-id, or stop the other one; a restarted "
            f"daemon gets in once the old session ends (at most heartbeat_timeout_s={self.config.heartbeat_timeout_s:g} s)"
        )

    def open_session(self, daemon_id: str, token: str, owner: str = "") -> asyncio.Queue:
        rec = self.daemons.get(daemon_id)
        if rec is None:
            raise NotFound(f"daemon {daemon_id!r} is not registered: call RegisterDaemon first")
        if rec.owner != owner:
            raise PermissionDenied(f"daemon {daemon_id!r} is registered by another credential: it may not answer for it")
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

    def heartbeat(
        self,
        daemon_id: str,
        *,
        served_version: int,
        dirty: bool,
        draining: bool,
        busy_update_id: str = "",
        holds_delta_base: bool = False,
        holds_needed_delta_base: bool = False,
    ) -> None:
        rec = self._live(daemon_id)
        rec.beat()
        # Capabilities, not claims about versions: they only ever narrow a delta to dense.
        rec.holds_delta_base = holds_delta_base
        rec.holds_needed_delta_base = holds_delta_base or holds_needed_delta_base
        # During a session the coordinator's own verdicts decide `served_version` and `dirty`:
        # a heartbeat sent before the daemon heard its verdict must not re-flag it, and a
        # heartbeat may not claim a version no round gave it. The daemon's own claims count
        # at registration only, checked there.
        self._settle(rec, busy_update_id)
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
        holds_delta_base: bool = False,
        holds_needed_delta_base: bool = False,
        piece_sums: dict[tuple[int, int], int] | None = None,
        timeline: dict[str, float] | None = None,
    ) -> None:
        rec = self._live(daemon_id)
        rec.beat()
        rec.holds_delta_base = holds_delta_base
        rec.holds_needed_delta_base = holds_delta_base or holds_needed_delta_base
        rnd = self.rounds.get(update_id)
        if rnd is None or daemon_id not in rnd.outcomes:
            log.warning("result for unknown round ignored update_id=%s daemon_id=%s", update_id, daemon_id)
            return
        out = rnd.outcomes[daemon_id]
        # A result is the last thing a daemon's handler sends: its receiver has left this round.
        out.reported = True
        if rnd.state.finished or out.status is not ResultStatus.PENDING or out.checksums is not None:
            self._settle(rec, "")
            return
        out.receive_s, out.apply_s, out.bytes_received = receive_s, apply_s, bytes_received
        out.timeline = dict(timeline or {})
        if ok:
            out.checksums = checksums
            out.piece_sums = piece_sums or {}
        else:
            out.status = ResultStatus.FAILED
            out.reason = error or "daemon reported failure without a reason"
        self._settle(rec, "")
        if ok:
            self._maybe_judge(rnd)
        else:
            self._fail_round(rnd, f"{daemon_id}: {out.reason}")

    # ------------------------------------------------------------------ rounds

    def begin_update(
        self,
        version: int,
        manifest: Sequence[TensorSpec],
        options: UpdateOptions,
        owner: str = "",
        holds: dict[int, dict[str, Region]] | None = None,
    ) -> Assignment:
        """Begins a round. `holds` (trainer rank -> tensor -> Region held), or needs declared by
        daemons of NEEDS_ROUTE_ENGINES only, makes it a routed round (core/routing.py), sending each
        participant only the needs it declared; else rank 0 sends everything to everyone."""
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
        if options.delta_base_version is not None and options.delta_base_version >= version:
            raise InvalidArgument(
                "update options are invalid",
                [f"options.delta_base_version: expected a version below the new version {version}, got {options.delta_base_version}"],
            )
        if holds and len(holds) > MAX_TRAINER_RANKS:
            raise InvalidArgument(f"holds: {len(holds)} trainer ranks: expected at most {MAX_TRAINER_RANKS}")
        if holds:
            problems = holds_problems(manifest, holds)
            if problems:
                raise InvalidArgument("holds are invalid", problems[:MAX_LISTED_PROBLEMS])
        participants = self._select_participants(options)
        check_against_inventory(manifest, {d.daemon_id: d.inventory for d in participants})
        unrouted = sorted(d.daemon_id for d in participants if d.engine not in ROUTED_ENGINES)
        if holds and (unrouted or options.transport == "cuda_ipc"):
            why = f"daemons {unrouted} run engines that cannot receive them yet" if unrouted else "cuda_ipc has no point-to-point sends"
            raise InvalidArgument(
                f"holds: a round whose trainer ranks each send what they hold is routed, and {why}: "
                "push from one rank (no holds), or leave those daemons out (options.daemon_ids)"
            )
        # Needs alone route a round when every participant's engine routes on them (each receiver
        # gets only what it loads). A delta asked of a routed round (holds or needs) is a routed
        # delta round: each sender encodes the pieces it sends for the participants clean on the base.
        routed = bool(holds) or (
            options.transport != "cuda_ipc"
            and all(d.engine in NEEDS_ROUTE_ENGINES for d in participants)
            and any(d.needs for d in participants)
        )
        num_senders = len(holds) if holds else 1

        bucket_size = options.bucket_size_bytes or default_bucket_size(options.transport)
        plan = BucketPlan.build(manifest, bucket_size)
        ranks: list[Participant] = []
        # Trainer ranks are data-plane ranks 0..num_senders-1, receivers come after them.
        next_rank = num_senders
        encodings = {d.daemon_id: self._encoding_for(d, options, routed) for d in participants}
        delta_base = options.delta_base_version
        framed = ROUTED_DELTA_ENGINES if routed else DELTA_ENGINES
        if "delta" not in encodings.values() or any(d.engine not in framed for d in participants):
            # A delta round frames every rank's payload point to point; a receiver that only
            # takes broadcast buckets (or a dense routed round's pieces) would wait for bytes
            # that never come. So the round is dense for all when one of them is in it, or
            # when nobody takes a delta.
            delta_base = None
            encodings = dict.fromkeys(encodings, "dense")
        for d in participants:
            ranks.append(Participant(d.daemon_id, tuple(range(next_rank, next_rank + d.num_ranks)), encodings[d.daemon_id]))
            next_rank += d.num_ranks
        membership = repr(
            (options.transport, options.rendezvous_host, options.rendezvous_port, [(d.daemon_id, d.num_ranks, d.session_token) for d in participants])
        ) + (f"/senders={num_senders}" if num_senders > 1 else "")
        rendezvous = Rendezvous(
            transport=options.transport,
            host=options.rendezvous_host,
            port=options.rendezvous_port,
            world_size=next_rank,
            group_id=hashlib.sha256(membership.encode()).hexdigest()[:16],
            timeout_s=options.collective_timeout_s or self.config.default_collective_timeout_s,
        )
        deadline_s = options.deadline_s or self.config.default_deadline_s
        routing = None
        if routed:
            needs: dict[int, dict[str, Region] | None] = {}
            for d, p in zip(participants, ranks):
                declared = {n.rank: dict(n.regions) for n in d.needs}
                for local, rank in enumerate(p.ranks):
                    needs[rank] = declared.get(local) if declared else None
            try:
                routing = plan_routes(manifest, holds or {}, needs, bucket_size)
            except ValueError as e:
                raise InvalidArgument(f"cannot route this round: {e}") from e
        assignment = Assignment(
            update_id=uuid.uuid4().hex[:16],
            version=version,
            rendezvous=rendezvous,
            participants=tuple(ranks),
            plan=plan,
            deadline_s=deadline_s,
            delta_base_version=delta_base,
            routing=routing,
        )
        rnd = RoundRecord(assignment=assignment, manifest_covers=frozenset(s.name for s in manifest), owner=owner)
        rnd.outcomes = {d.daemon_id: DaemonOutcome() for d in participants}
        self._save_state(version_floor=version)
        self.max_version = version
        self.open_round = rnd
        self.rounds[assignment.update_id] = rnd
        while len(self.rounds) > self.config.rounds_kept:
            self.rounds.popitem(last=False)
        rnd.deadline_task = asyncio.get_running_loop().create_task(self._deadline(rnd), name=f"deadline-{assignment.update_id}")
        for d in participants:
            d.state = DaemonState.UPDATING
            d.reason = ""
            # Dirty from its first new byte, which may land any moment now; only an OK verdict
            # of a round that covers its whole inventory clears it (in _finish); an OK partial
            # round restores what it was, as the daemon agent does.
            rnd.outcomes[d.daemon_id].dirty_before = d.dirty
            d.dirty = True
            d.outbox.put_nowait(SessionEvent("assignment", assignment=assignment))
        self._update_gauges()
        log.info(
            "update begun update_id=%s version=%d daemons=%d tensors=%d bytes=%d buckets=%d transport=%s",
            assignment.update_id, version, len(participants), plan.num_tensors, plan.payload_bytes, len(plan.buckets), options.transport,
        )
        return assignment

    async def commit_update(
        self, update_id: str, checksums: dict[str, int], owner: str = "", piece_sums: dict[tuple[int, int], int] | None = None
    ) -> RoundRecord:
        rnd = self._owned_round(update_id, owner, "commit")
        routing = rnd.assignment.routing
        if routing is not None and not rnd.state.finished:
            # A routed round is judged per piece: every sender's sum of every piece it sent.
            got = {i for (_, i) in (piece_sums or {})}
            wrong = [(r, i) for (r, i) in (piece_sums or {}) if not 0 <= i < len(routing.pieces) or routing.pieces[i].sender != r]
            if checksums or got != set(range(len(routing.pieces))) or wrong:
                missing = sorted(set(range(len(routing.pieces))) - got)[:10]
                raise InvalidArgument(
                    f"a routed round commits the sum of each of its {len(routing.pieces)} pieces from its sender and no "
                    f"per-tensor checksums: got {len(checksums)} checksums, pieces missing {missing}, "
                    f"(rank, piece) pairs that are not the plan's sender {wrong[:10]}"
                )
            if rnd.trainer_checksums is None:
                rnd.sender_piece_sums = {i: s for (_, i), s in (piece_sums or {}).items()}
                rnd.trainer_checksums = {}
                self._maybe_judge(rnd)
            await rnd.done.wait()
            return rnd
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

    def abort_update(self, update_id: str, reason: str, owner: str = "") -> RoundRecord:
        rnd = self._owned_round(update_id, owner, "abort")
        if rnd.state.finished:
            raise FailedPrecondition(f"update {update_id} already ended as {rnd.state.value}: nothing to abort")
        self._finish(rnd, RoundState.ABORTED, f"aborted by trainer: {reason or 'no reason given'}")
        return rnd

    def get_round(self, update_id: str) -> RoundRecord:
        return self._round(update_id)

    def watch_update(self, update_id: str) -> asyncio.Queue:
        """The trainer's stream of RoundEvents for its round: the current state now, the final one later."""
        rnd = self._round(update_id)
        events: asyncio.Queue = asyncio.Queue()
        events.put_nowait(RoundEvent(rnd.update_id, rnd.state, rnd.reason))
        if not rnd.state.finished:
            rnd.watchers.append(events)
            rnd.trainer_attached = True
        return events

    def watch_closed(self, update_id: str, events: asyncio.Queue, reason: str) -> None:
        """A trainer's WatchUpdate stream ended; if it was the round's last and the round is open, the trainer is lost."""
        rnd = self.rounds.get(update_id)
        if rnd is None or events not in rnd.watchers:
            return  # the round ended first (its final event was sent), or was forgotten
        rnd.watchers.remove(events)
        if not rnd.state.finished and not rnd.watchers:
            log.warning("trainer lost update_id=%s reason=%s", update_id, reason)
            self._fail_round(rnd, f"trainer lost: {reason}")

    # ------------------------------------------------------------------ internals

    def _encoding_for(self, d: DaemonRecord, o: UpdateOptions, routed: bool) -> str:
        """"delta" only for a daemon this coordinator knows holds exactly the base; any doubt is dense.

        Dirty (a failed or interrupted round, or never verified), stale, an unproven version
        claim, another version, or a vLLM engine without a shadow of its weights (just
        started, or its last apply failed), or with a shadow of only its needed regions (after a
        routed round) when this round is not routed and patches whole tensors: the delta would be
        applied to bytes it was not encoded against, or to none, so that daemon gets the dense
        weights in the same push.
        """
        if o.delta_base_version is None or o.transport == "cuda_ipc":
            # cuda_ipc receivers copy from the trainer's own memory: no link bytes to save.
            return "dense"
        clean = not (d.dirty or d.stale or d.unknown_version)
        holds = d.engine in IN_PLACE_DELTA_ENGINES or (d.holds_needed_delta_base if routed else d.holds_delta_base)
        return "delta" if clean and holds and d.served_version == o.delta_base_version else "dense"

    def _check_options(self, o: UpdateOptions) -> None:
        problems = []
        if o.delta_base_version is not None and o.delta_base_version < 0:
            problems.append(f"options.delta_base_version: expected a version >= 0 (or absent for dense), got {o.delta_base_version}")
        if o.transport not in TRANSPORTS:
            problems.append(f"options.transport: expected one of {list(TRANSPORTS)}, got {o.transport!r}")
        if o.bucket_size_bytes and not ALIGN_BYTES <= o.bucket_size_bytes <= MAX_BUCKET_SIZE_BYTES:
            problems.append(
                f"options.bucket_size_bytes: expected {ALIGN_BYTES}..{MAX_BUCKET_SIZE_BYTES} (or 0 for the default), got {o.bucket_size_bytes}"
            )
        if not (o.deadline_s == 0 or MIN_DEADLINE_S <= o.deadline_s <= MAX_DEADLINE_S):
            problems.append(
                f"options.deadline_s: expected 0 (the default) or {MIN_DEADLINE_S:g}..{MAX_DEADLINE_S:g} s, got {o.deadline_s} "
                f"(below {MIN_DEADLINE_S:g} s a round expires before one heartbeat interval can tell a working daemon from a silent one)"
            )
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

    def _owned_round(self, update_id: str, owner: str, verb: str) -> RoundRecord:
        rnd = self._round(update_id)
        if rnd.owner != owner:
            raise PermissionDenied(f"update {update_id} was begun by another trainer credential: only it may {verb} the round")
        return rnd

    def _save_state(self, version_floor: int | None = None) -> None:
        if not self.config.state_file:
            return
        try:
            # A few bytes with fsync: fast enough for the event loop, twice per round.
            save_state(self.config.state_file, CommittedState(self.committed_version, self.max_version if version_floor is None else version_floor))
        except OSError as e:
            raise Unavailable(f"cannot write the state file {self.config.state_file}: {e}: fix the disk or the path") from e

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
            self._fail_round(rnd, f"{daemon_id}: {reason}")

    def _fail_round(self, rnd: RoundRecord, reason: str) -> None:
        """Ends an open round FAILED now: it can no longer commit, and everyone still in it must leave.

        Daemons that already reported are judged if the trainer's checksums are in, so a
        daemon that verifiably received every byte is not flagged for another's failure.
        """
        if rnd.state.finished:
            return
        if rnd.trainer_checksums is not None:
            self._judge_reported(rnd)
        self._finish(rnd, RoundState.FAILED, reason)

    def _pending_in_open_round(self, daemon_id: str) -> bool:
        rnd = self.open_round
        out = rnd.outcomes.get(daemon_id) if rnd is not None else None
        return out is not None and out.status is ResultStatus.PENDING and out.checksums is None

    def _settle(self, rec: DaemonRecord, busy_update_id: str) -> None:
        """UPDATING while the daemon owes the open round a result or its receiver is still inside any round; else IDLE.

        `busy_update_id` comes from the daemon's heartbeat: a receiver that a failed round
        left blocked (until its own timeout) must not be offered the next round, which
        would wait for it.
        """
        if rec.state not in (DaemonState.IDLE, DaemonState.UPDATING) or self._pending_in_open_round(rec.daemon_id):
            return
        if busy_update_id:
            if rec.state is not DaemonState.UPDATING:
                rec.state = DaemonState.UPDATING
                self._update_gauges()
            rec.reason = f"receiver still inside update {busy_update_id}: not offered new rounds until it leaves"
        elif rec.state is DaemonState.UPDATING:
            rec.state = DaemonState.IDLE
            rec.reason = ""
            self._update_gauges()

    def _maybe_judge(self, rnd: RoundRecord) -> None:
        if rnd.state.finished or not rnd.all_reported() or rnd.trainer_checksums is None:
            return
        self._judge_reported(rnd)
        ok = all(o.status is ResultStatus.OK for o in rnd.outcomes.values())
        failed = [f"{d}: {o.status.value} {o.reason}" for d, o in rnd.outcomes.items() if o.status is not ResultStatus.OK]
        self._finish(rnd, RoundState.COMMITTED if ok else RoundState.FAILED, "; ".join(failed))

    def _judge_reported(self, rnd: RoundRecord) -> None:
        """Compares every reported daemon's checksums with the trainer's."""
        assert rnd.trainer_checksums is not None
        routing = rnd.assignment.routing
        for daemon_id, out in rnd.outcomes.items():
            if out.status is not ResultStatus.PENDING or out.checksums is None:
                continue
            got = out.checksums
            if routing is not None:
                # Every (piece, receiver rank) of this daemon against its sender's sum.
                mine = rnd.assignment.ranks_of(daemon_id)
                received: dict[int, dict[int, int]] = {r: {} for r in mine}
                for (r, i), v in out.piece_sums.items():
                    if r in received:
                        received[r][i] = v
                bad = judge_pieces(routing, rnd.sender_piece_sums, received)
                out.mismatched = sorted({n for r in mine for n in bad.get(r, [])})
            else:
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
                rec.unknown_version = False
                if is_full_round(rec.inventory, rnd.manifest_covers):
                    rec.dirty = False
                    rec.stale = False
                else:
                    rec.dirty = out.dirty_before
            else:
                # Its engine may hold some of the new bytes: flag it until a full round re-syncs it.
                rec.dirty = True
            if rec.state is DaemonState.UPDATING:
                if out.reported:
                    rec.state = DaemonState.IDLE
                else:
                    # Its receiver may still be inside the round: it becomes IDLE when a
                    # heartbeat says it left (see _settle), not before.
                    rec.reason = f"update {rnd.update_id} ended {state.value}; waiting for its receiver to leave it"
            if rec.outbox is not None:
                if state is not RoundState.COMMITTED:
                    rec.outbox.put_nowait(SessionEvent("cancel", update_id=rnd.update_id, reason=reason))
                rec.outbox.put_nowait(
                    SessionEvent("verdict", update_id=rnd.update_id, version=rnd.version, round_state=state, status=out.status, reason=out.reason)
                )
        if state is RoundState.COMMITTED:
            self.committed_version = max(self.committed_version, rnd.version)
            try:
                self._save_state()
            except Unavailable:
                # The round did commit; a restart will know an older committed version, which
                # only makes it trust fewer claims. Finishing the round matters more.
                log.error("committed version %d not persisted", rnd.version, exc_info=True)
        if rnd.deadline_task is not None and rnd.deadline_task is not asyncio.current_task():
            rnd.deadline_task.cancel()
        if self.open_round is rnd:
            self.open_round = None
        for events in rnd.watchers:
            events.put_nowait(RoundEvent(rnd.update_id, state, reason))
        rnd.watchers.clear()
        rnd.done.set()
        if self.metrics is not None:
            self.metrics.round_finished(state.value, rnd.duration_s, rnd.assignment.plan.payload_bytes * len(rnd.outcomes))
            wire: dict[str, int] = {}
            for p in rnd.assignment.participants:
                o = rnd.outcomes.get(p.daemon_id)
                if o is not None:
                    wire[p.encoding] = wire.get(p.encoding, 0) + o.bytes_received
            self.metrics.wire_bytes(wire)
        self._update_gauges()
        log.info(
            "update ended update_id=%s version=%d state=%s duration_s=%.3f%s",
            rnd.update_id, rnd.version, state.value, rnd.duration_s, f" reason={reason}" if reason else "",
        )

    async def _deadline(self, rnd: RoundRecord) -> None:
        # The trainer holds WatchUpdate open for its round; one that never opens it is as
        # lost as a daemon that never heartbeats, and must not hold the fleet until the deadline.
        attach_s = min(self.config.heartbeat_timeout_s, rnd.assignment.deadline_s)
        await asyncio.sleep(attach_s)
        if not rnd.state.finished and not rnd.trainer_attached:
            self._fail_round(
                rnd, f"trainer lost: it did not open WatchUpdate within heartbeat_timeout_s={self.config.heartbeat_timeout_s:g}"
            )
            return
        await asyncio.sleep(rnd.assignment.deadline_s - attach_s)
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
                elif rec.outbox is None and silent_s > self.config.lost_expiry_s and not self._in_open_round(rec.daemon_id):
                    # Forgotten with its credential binding: a daemon id is not held forever.
                    log.info("daemon expired daemon_id=%s silent_s=%.0f lost_expiry_s=%g", rec.daemon_id, silent_s, self.config.lost_expiry_s)
                    del self.daemons[rec.daemon_id]
                    self._update_gauges()

    def _in_open_round(self, daemon_id: str) -> bool:
        return self.open_round is not None and daemon_id in self.open_round.outcomes

    def _update_gauges(self) -> None:
        if self.metrics is not None:
            counts = {s.value: 0 for s in DaemonState}
            for rec in self.daemons.values():
                counts[rec.state.value] += 1
            self.metrics.daemons_by_state(counts)
