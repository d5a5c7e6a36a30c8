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

A delta round (`assignment.delta_base_version` set) arrives framed per rank
(`dataplane/delta_round.py`, or `routed_delta.py` for a routed one: engine/routed.py): a
delta rank patches the worker's shadow of the served weights (`shadow.py`), taken out of
the shadow for the round; a dense rank gets every tensor (or routed piece) whole. Either
way the result is whole checkpoint tensors (a routed round's: exact in the needed regions),
applied by the same path as a dense round; in streamed mode a dense-path delta's tensors
are applied once the round has arrived (complete only then), still inside the pause.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from weightsync.core import Assignment, InvalidArgument, TensorSpec, TransferError
from weightsync.engine.inventory import check_update

if TYPE_CHECKING:
    import torch

    from weightsync.dataplane import GroupCache, ReceiveResult, ReceiveStream
    from weightsync.engine.apply import AppliedWeights

__all__ = ["DataPlaneSeat", "StagedUpdate", "receive_and_apply", "receive_delta"]

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
        base: "dict[str, torch.Tensor] | None" = None,
        on_change: "Callable[[dict[str, Any]], None] | None" = None,
    ) -> None:
        self.assignment = assignment
        # Told the status after every bucket and when staging ends (engine/stage_signal.py).
        self._on_change = on_change
        # A delta rank's base (the shadow it took), patched in place by the round.
        self.base = base
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
        self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.status())

    def _run(self) -> None:
        try:
            self._stage()
        finally:
            self._changed()

    def _stage(self) -> None:
        try:
            with self._seat.claim(self.assignment, self.rank) as groups:
                staged, result = self._receive(groups)
        except Exception as e:  # thread boundary: kept for status() and take(), and logged
            log.warning("rank %d: staging update %s failed: %s", self.rank, self.update_id, e, exc_info=True)
            with self._lock:
                self._state = FAILED
                self._error = e
            return
        with self._lock:
            if self.assignment.routing is not None:  # routed rounds report no progress on the way
                self._buckets_done, self._bytes_done = _num_buckets(self.assignment), result.bytes_received
            if self._discard.is_set():
                self._state = DISCARDED
                return
            self._tensors = staged
            self._result = result
            self._state = STAGED
        log.debug("rank %d: update %s staged (%d tensors)", self.rank, self.update_id, len(staged))

    def _receive(self, groups: "GroupCache") -> tuple[list[tuple[str, "torch.Tensor"]], Any]:
        """This rank's tensors of the round, as it travels: routed (only this worker's pieces,
        engine/routed.py), a delta against the shadow, or dense."""
        if self.assignment.routing is not None:
            from weightsync.engine.routed import stage_routed

            group = groups.get(self.assignment, self.rank)
            return stage_routed(self.assignment, self.rank, group, self._inventory, discarded=self._discard, base=self.base)
        if self.assignment.delta_base_version is not None:
            staged, result = receive_delta(
                self.assignment, self.rank, groups, self._inventory, self.base,
                progress=self._on_progress, stop=self._discard,
            )
            return [(name, t.to(self._staging_device)) for name, t in staged], result
        return self._receive_dense(groups)

    def _receive_dense(self, groups: "GroupCache") -> tuple[list[tuple[str, "torch.Tensor"]], "ReceiveResult"]:
        staged: list[tuple[str, torch.Tensor]] = []
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
        return staged, stream.result


def receive_and_apply(
    worker: Any,
    assignment: Assignment,
    rank: int,
    seat: DataPlaneSeat,
    inventory: Mapping[str, TensorSpec],
    *,
    path: str,
    base: "dict[str, torch.Tensor] | None" = None,
    keep: "list[tuple[str, torch.Tensor]] | None" = None,
) -> tuple["AppliedWeights", "ReceiveResult"]:
    """Streams the round straight into the model; see the module docstring for the trade-off.

    `keep`, if given, receives the whole tensors applied (the worker's next shadow).
    """
    from weightsync.engine.apply import ApplyFailed, apply_weights

    if assignment.routing is not None:
        from weightsync.engine.routed import receive_routed_and_apply

        with seat.claim(assignment, rank) as groups:
            group = groups.get(assignment, rank)
            return receive_routed_and_apply(worker, assignment, rank, group, inventory, path=path, base=base, keep=keep)
    try:
        with seat.claim(assignment, rank) as groups:
            if assignment.delta_base_version is not None:
                items, result = receive_delta(assignment, rank, groups, inventory, base)
                if keep is not None:
                    keep.extend(items)
                return apply_weights(worker, items, path=path), result
            stream = _open_stream(assignment, rank, groups, inventory)
            with stream:  # an apply error ends the round on every rank, naming this one
                applied = apply_weights(worker, _copies(stream, keep), path=path)
    except ApplyFailed as e:
        if isinstance(e.__cause__, TransferError):
            # The round failed under the loader: report it as the transfer error it is
            # (the ApplyFailed in the chain still says whether the model was touched).
            raise TransferError(str(e.__cause__)) from e
        raise
    return applied, stream.result


def _copies(
    stream: "ReceiveStream", keep: "list[tuple[str, torch.Tensor]] | None" = None
) -> Iterator[tuple[str, "torch.Tensor"]]:
    # vLLM keeps a tensor until its module is complete, possibly past the point
    # where the receiver reuses the buffer the view points into.
    for name, view in stream:
        copy = view.clone()
        if keep is not None:
            keep.append((name, copy))
        yield name, copy


def receive_delta(
    assignment: Assignment,
    rank: int,
    groups: "GroupCache",
    inventory: Mapping[str, TensorSpec],
    base: "Mapping[str, torch.Tensor] | None",
    *,
    progress: Any = None,
    stop: "threading.Event | None" = None,
) -> tuple[list[tuple[str, "torch.Tensor"]], "ReceiveResult"]:
    """Receives this rank's payload of a delta round; returns the whole resulting tensors (plan order) and the result.

    A delta rank needs `base` (the shadow it took) holding every planned tensor; it is
    patched in place. A dense rank writes into fresh tensors. A plan that does not fit
    the inventory, or a delta rank without its base, refuses the round on every rank
    before any byte moves. The checksums are of the whole resulting tensors.
    """
    import torch

    from weightsync.dataplane.delta_round import receive_delta_round
    from weightsync.dataplane.layout import torch_dtype

    group = groups.get(assignment, rank)
    device = group.device
    specs = {e.name: e.spec for _, e in assignment.plan.entries()}
    is_delta = rank in assignment.delta_ranks
    problem = None
    try:
        check_update(inventory, list(specs.values()))
    except InvalidArgument as e:
        problem = str(e)
    if problem is None and is_delta:
        missing = sorted(n for n in specs if base is None or n not in base)
        if missing:
            problem = (
                f"update {assignment.update_id} is a delta against version {assignment.delta_base_version}, but this "
                f"worker holds no copy of {len(missing)} of its tensors (e.g. {missing[0]!r}): it must get dense "
                "weights (its shadow was dropped by a failed round, or it never applied a full one)"
            )
    if problem is None and stop is not None and stop.is_set():
        problem = f"update {assignment.update_id} was discarded before it started"

    def destination(name: str) -> "torch.Tensor":
        if is_delta:
            t = base[name]
            return t if t.device == device else t.to(device)
        spec = specs[name]
        return torch.empty(spec.shape, dtype=torch_dtype(spec.dtype), device=device)

    items: list[tuple[str, torch.Tensor]] = []

    def on_bucket(batch: list[tuple[str, "torch.Tensor"]]) -> None:
        if stop is not None and stop.is_set():
            raise _Discarded(f"update {assignment.update_id} was discarded while receiving")
        items.extend(batch)

    result = receive_delta_round(
        assignment, rank, group, destination, apply_fn=on_bucket, progress=progress, refuse=problem
    )
    return items, result
