"""Mutable coordinator-side records of daemons and rounds, owned by one Coordinator."""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field

from weightsync.core import Assignment, TensorSpec
from weightsync.core.rank_regions import RankRegions

__all__ = ["DaemonRecord", "DaemonState", "ResultStatus", "RoundRecord", "RoundState", "DaemonOutcome"]


class DaemonState(enum.Enum):
    IDLE = "IDLE"
    UPDATING = "UPDATING"
    LOST = "LOST"
    DRAINING = "DRAINING"


class RoundState(enum.Enum):
    TRANSFERRING = "TRANSFERRING"
    COMMITTED = "COMMITTED"
    FAILED = "FAILED"
    ABORTED = "ABORTED"
    TIMED_OUT = "TIMED_OUT"

    @property
    def finished(self) -> bool:
        return self is not RoundState.TRANSFERRING


class ResultStatus(enum.Enum):
    PENDING = "PENDING"
    OK = "OK"
    CHECKSUM_MISMATCH = "CHECKSUM_MISMATCH"
    FAILED = "FAILED"
    TIMED_OUT = "TIMED_OUT"


@dataclass(slots=True)
class DaemonRecord:
    daemon_id: str
    engine: str
    model: str
    host: str
    num_ranks: int
    inventory: dict[str, TensorSpec]
    transports: tuple[str, ...]
    served_version: int
    dirty: bool
    stale: bool
    session_token: str
    # The identity of the credential that registered this id (control/identity.py).
    owner: str = ""
    # served_version is a claim above every version this coordinator began: not trusted.
    unknown_version: bool = False
    # Its receivers say they hold the bytes of served_version apart from the model (a vLLM
    # worker's shadow), as of its last heartbeat or result: a delta can be applied there.
    holds_delta_base: bool = False
    # ... at least in the regions each receiver rank declared it needs (`needs`): a routed delta
    # round patches only those (a vLLM worker after a routed round). Implied by holds_delta_base.
    holds_needed_delta_base: bool = False
    # What each receiver rank's loader reads (one per rank), or () when every rank needs every tensor whole.
    needs: tuple[RankRegions, ...] = ()
    state: DaemonState = DaemonState.LOST
    reason: str = "registered; session not open yet"
    last_heartbeat_mono: float = field(default_factory=time.monotonic)
    last_heartbeat_unix: float = field(default_factory=time.time)
    outbox: asyncio.Queue | None = None

    @property
    def healthy(self) -> bool:
        return self.outbox is not None and self.state is DaemonState.IDLE

    def beat(self) -> None:
        self.last_heartbeat_mono = time.monotonic()
        self.last_heartbeat_unix = time.time()


@dataclass(slots=True)
class DaemonOutcome:
    """What one daemon reported for a round, and the verdict on it."""

    status: ResultStatus = ResultStatus.PENDING
    reason: str = ""
    checksums: dict[str, int] | None = None
    # A routed round: (data-plane rank, piece index) -> S of what that rank received.
    piece_sums: dict[tuple[int, int], int] = field(default_factory=dict)
    mismatched: list[str] = field(default_factory=list)
    receive_s: float = 0.0
    apply_s: float = 0.0
    bytes_received: int = 0
    # Seconds from the start of its receive to the end of each phase, as the daemon reported them.
    timeline: dict[str, float] = field(default_factory=dict)
    # The daemon itself sent a result: its handler has ended (unlike a failure the coordinator declared).
    reported: bool = False
    # Its dirty flag when the round began: an OK partial round leaves it as it was.
    dirty_before: bool = True


@dataclass(slots=True)
class RoundRecord:
    assignment: Assignment
    manifest_covers: frozenset[str]
    # The identity of the trainer credential that began the round: only it may commit or abort.
    owner: str = ""
    started_mono: float = field(default_factory=time.monotonic)
    started_unix: float = field(default_factory=time.time)
    state: RoundState = RoundState.TRANSFERRING
    reason: str = ""
    outcomes: dict[str, DaemonOutcome] = field(default_factory=dict)
    trainer_checksums: dict[str, int] | None = None
    # A routed round: piece index -> S from its sender (set with trainer_checksums, which is then {}).
    sender_piece_sums: dict[int, int] = field(default_factory=dict)
    duration_s: float = 0.0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    deadline_task: asyncio.Task | None = None
    # The trainer's WatchUpdate streams (its liveness in the round); each gets the final state.
    watchers: list[asyncio.Queue] = field(default_factory=list)
    trainer_attached: bool = False

    @property
    def update_id(self) -> str:
        return self.assignment.update_id

    @property
    def version(self) -> int:
        return self.assignment.version

    def rank_bytes(self) -> list[tuple[int, str, int, int]]:
        """A routed round: (rank, daemon_id or "" for a trainer rank, bytes sent, bytes received) from the verified pieces.

        Pieces count at their dense size, also to the delta ranks of a routed delta round: what
        a delta rank's frames weighed is its daemon's bytes_received (the per-rank split is not reported).
        """
        routing = self.assignment.routing
        if routing is None:
            return []
        pieces = routing.pieces
        out = {r: ["", 0, 0] for r in range(routing.num_senders)}
        for i in self.sender_piece_sums:
            out[pieces[i].sender][1] += pieces[i].nbytes  # once: receivers relay it
        for p in self.assignment.participants:
            o = self.outcomes.get(p.daemon_id)
            for r in p.ranks:
                out[r] = [p.daemon_id, 0, 0]
            for (r, i) in (o.piece_sums if o is not None else {}):
                if r in out and 0 <= i < len(pieces):
                    out[r][2] += pieces[i].nbytes
        return [(r, d, s, g) for r, (d, s, g) in sorted(out.items())]

    def all_reported(self) -> bool:
        return all(o.status is not ResultStatus.PENDING or o.checksums is not None for o in self.outcomes.values())
