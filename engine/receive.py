"""The engine side of a data-plane round, in the two shapes the worker extension offers.

* Staged (`StagedUpdate`): a background thread receives the whole round into
  staging memory while the engine keeps serving; the data plane verifies every
  checksum before the round closes; only then is the staged copy applied, in
  one short step between engine steps. A transfer failure therefore never
  touches the model. Costs one extra copy of the update in staging memory.
* Streamed (`receive_and_apply`): vLLM's loader pulls tensors straight from the
  receiver while the engine is paused. No staging copy, but the engine stays
  paused for the whole transfer and a transfer failure leaves a mix of old and
  new modules (recovered to a servable state, reported as dirty).

Either way the plan is checked against the inventory before any byte moves,
and a refusal reaches every rank (the data plane's open handshake).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from weightsync.core import Assignment, InvalidArgument, TensorSpec, TransferError
from weightsync.engine.inventory import check_update

if TYPE_CHECKING:
    import torch

    from weightsync.dataplane import GroupCache, ReceiveResult, ReceiveStream
    from weightsync.engine.apply import AppliedWeights

__all__ = ["DataPlaneSeat", "StagedUpdate", "receive_and_apply"]

log = logging.getLogger(__name__)

RECEIVING = "receiving"
STAGED = "staged"
FAILED = "failed"
DISCARDED = "discarded"
TAKEN = "taken"  # handed to the apply


class _Discarded(Exception):
    """Raised in the consumer to end a round that the daemon gave up on."""


def _num_buckets(assignment: Assignment) -> int:
    return assignment.routing.num_buckets if assignment.routing is not None else len(assignment.plan.buckets)


class DataPlaneSeat:
    """A worker's place in the data plane: one group cache, used by one round at a time.

    A round given up on (deadline, discard) may still be blocked in a collective
    until its timeout; the next round waits for it rather than driving the same
    group from a second thread.
    """

    def __init__(self, device: "str | torch.device | None" = None) -> None:
        from weightsync.dataplane import GroupCache

        self._groups = GroupCache(device=device)
        self._busy = threading.Lock()

    @contextlib.contextmanager
    def claim(self, assignment: Assignment, rank: int) -> Iterator["GroupCache"]:
        wait_s = 2 * assignment.rendezvous.timeout_s
        if not self._busy.acquire(timeout=wait_s):
            raise TransferError(
                f"rank {rank}: update {assignment.update_id}: the previous round on this worker did not end "
                f"within {wait_s:g} s"
            )
        try:
            yield self._groups
        finally:
            self._busy.release()

    def close(self, timeout_s: float) -> None:
        """Leaves the group; a round still running after timeout_s keeps it (and the process ends it)."""
        if not self._busy.acquire(timeout=timeout_s):
            log.warning("a data-plane round is still running after %.1f s; not closing its group", timeout_s)
            return
        try:
            self._groups.close()
        finally:
            self._busy.release()


def _open_stream(
    assignment: Assignment,
    rank: int,
    groups: "GroupCache",
    inventory: Mapping[str, TensorSpec],
    progress: Any = None,
) -> "ReceiveStream":
    """Joins the round's group and returns its stream; refuses (on every rank) a plan that does not fit."""
    from weightsync.dataplane import iter_assignment

    group = groups.get(assignment, rank)
    stream = iter_assignment(assignment, rank, group, progress=progress)
    try:
        check_update(inventory, [e.spec for _, e in assignment.plan.entries()])
    except InvalidArgument as e:
        stream.close(e)  # always raises RoundFailed, chained to e
    return stream


class StagedUpdate:
    """One round received on a background thread into `staging_device` memory, applied later by `take()`.

    `status()` may be called from any thread. The thread owns the data-plane
    group for the duration of the round.
    """

    def __init__(
        self,
        assignment: Assignment,
        rank: int,
        seat: DataPlaneSeat,
        inventory: Mapping[str, TensorSpec],
        *,
        staging_device: "str | torch.device" = "cpu",
    ) -> None:
        self.assignment = assignment
        self.rank = rank
        self._seat = seat
        self._inventory = inventory
        self._staging_device = staging_device
        self._lock = threading.Lock()
        self._state = RECEIVING
        self._error: BaseException | None = None
        self._buckets_done = 0
        self._bytes_done = 0
        self._discard = threading.Event()
        self._tensors: list[tuple[str, torch.Tensor]] = []
        self._result: ReceiveResult | None = None
        self._started = time.monotonic()
        self._thread = threading.Thread(
            target=self._run, name=f"weightsync-stage-{assignment.update_id}-r{rank}", daemon=True
        )

    @property
    def update_id(self) -> str:
        return self.assignment.update_id

    def start(self) -> None:
        self._thread.start()

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "update_id": self.update_id,
                "rank": self.rank,
                "state": self._state,
                "buckets_done": self._buckets_done,
                "bytes_done": self._bytes_done,
                "num_buckets": _num_buckets(self.assignment),
                "error": "" if self._error is None else f"{type(self._error).__name__}: {self._error}",
                "seconds": time.monotonic() - self._started,
            }

    def take(self) -> tuple[list[tuple[str, "torch.Tensor"]], "ReceiveResult"]:
        """The staged tensors (plan order) and the verified receive result; the update must be staged."""
        with self._lock:
            if self._state != STAGED or self._result is None:
                detail = f": {self._error}" if self._error is not None else ""
                raise InvalidArgument(f"update {self.update_id} is {self._state}, not staged{detail}")
            tensors, self._tensors = self._tensors, []
            self._state = TAKEN  # a second take() must not apply an empty update
            return tensors, self._result

    def discard(self) -> None:
        """Drops the staged copy; a round still on the wire ends on every rank at the next bucket."""
        self._discard.set()
        with self._lock:
            self._tensors = []
            if self._state == STAGED:
                self._state = DISCARDED

    def _on_progress(self, buckets_done: int, bytes_done: int) -> None:
        with self._lock:
            self._buckets_done, self._bytes_done = buckets_done, bytes_done

    def _run(self) -> None:
        if self.assignment.routing is not None:
            self._run_routed()
            return
        staged: list[tuple[str, torch.Tensor]] = []
        try:
            with self._seat.claim(self.assignment, self.rank) as groups:
                stream = _open_stream(self.assignment, self.rank, groups, self._inventory, self._on_progress)
                if self._discard.is_set():
                    # Refused at the open handshake, so the peers learn at once.
                    stream.close(_Discarded(f"update {self.update_id} was discarded before it started"))
                with stream:
                    for batch in iter(stream.next_bucket, None):
                        if self._discard.is_set():
                            raise _Discarded(f"update {self.update_id} was discarded while receiving")
                        # Views point into the receiver's reused ring buffers.
                        staged.extend((name, view.to(self._staging_device, copy=True)) for name, view in batch)
                result = stream.result
        except Exception as e:  # thread boundary: kept for status() and take(), and logged
            log.warning("rank %d: staging update %s failed: %s", self.rank, self.update_id, e, exc_info=True)
            with self._lock:
                self._state = FAILED
                self._error = e
            return
        with self._lock:
            if self._discard.is_set():
                self._state = DISCARDED
                return
            self._tensors = staged
            self._result = result
            self._state = STAGED
        log.debug("rank %d: update %s staged (%d tensors)", self.rank, self.update_id, len(staged))

    def _run_routed(self) -> None:
        """_run for a routed round: only this worker's pieces arrive (engine/routed.py)."""
        from weightsync.engine.routed import stage_routed

        try:
            with self._seat.claim(self.assignment, self.rank) as groups:
                group = groups.get(self.assignment, self.rank)
                staged, result = stage_routed(self.assignment, self.rank, group, self._inventory, discarded=self._discard)
        except Exception as e:  # thread boundary: kept for status() and take(), and logged
            log.warning("rank %d: staging routed update %s failed: %s", self.rank, self.update_id, e, exc_info=True)
            with self._lock:
                self._state = FAILED
                self._error = e
            return
        with self._lock:
            self._buckets_done, self._bytes_done = _num_buckets(self.assignment), result.bytes_received
            if self._discard.is_set():
                self._state = DISCARDED
                return
            self._tensors = staged
            self._result = result
            self._state = STAGED


def receive_and_apply(
    worker: Any,
    assignment: Assignment,
    rank: int,
    seat: DataPlaneSeat,
    inventory: Mapping[str, TensorSpec],
    *,
    path: str,
) -> tuple["AppliedWeights", "ReceiveResult"]:
    """Streams the round straight into the model; see the module docstring for the trade-off."""
    from weightsync.engine.apply import ApplyFailed, apply_weights

    if assignment.routing is not None:
        from weightsync.engine.routed import receive_routed_and_apply

        with seat.claim(assignment, rank) as groups:
            group = groups.get(assignment, rank)
            return receive_routed_and_apply(worker, assignment, rank, group, inventory, path=path)
    try:
        with seat.claim(assignment, rank) as groups:
            stream = _open_stream(assignment, rank, groups, inventory)
            with stream:  # an apply error ends the round on every rank, naming this one
                applied = apply_weights(worker, _copies(stream), path=path)
    except ApplyFailed as e:
        if isinstance(e.__cause__, TransferError):
            # The round failed under the loader: report it as the transfer error it is
            # (the ApplyFailed in the chain still says whether the model was touched).
            raise TransferError(str(e.__cause__)) from e
        raise
    return applied, stream.result


def _copies(stream: "ReceiveStream") -> Iterator[tuple[str, "torch.Tensor"]]:
    # vLLM keeps a tensor until its module is complete, possibly past the point
    # where the receiver reuses the buffer the view points into.
    for name, view in stream:
        yield name, view.clone()
