"""A routed round inside a vLLM worker: only the regions its loader reads arrive, and are applied as usual.

In a routed round (core/routing.py, dataplane/routed.py) each worker receives only the
pieces of each checkpoint tensor that its own loader reads (the needs it declared,
engine/needs.py). The pieces land in a full-size staging tensor per checkpoint tensor
(`torch.empty`: the parts the worker does not need are never written, and
tests/engine/test_needs_poison.py shows its loader never reads them), which then goes
through the same apply path as a dense round (engine/apply.py: vLLM's reload_weights,
module by module, with its recovery). So a routed round has the dense round's two shapes
(engine/receive.py) and pause semantics:

* Staged: received on a background thread while the engine serves; applied by the
  commit in one short pause. Staging holds every needed tensor of the round until the
  commit, as a dense staged round does, but only its needed regions are written
  (large CPU allocations are mapped lazily, so untouched pages cost address space only).
* Streamed: received on a helper thread while this worker's thread runs one
  reload_weights over the tensors as they complete (a thread because receive_routed
  pushes complete tensors to a callback, while vLLM's loader pulls from an iterator).
  Staging then holds the tensors that vLLM buffers until their module is complete
  (e.g. q, k, v of one layer), one handed-over batch, and one bucket of receive buffers:
  about one apply unit, never the model.

Checksums: every piece's sum at its global positions (dataplane/routed.py), recomputed
from the staging bytes the loader reads; the coordinator matches each against its
sender's. Each worker reports its own pieces (workers of one engine receive different
pieces, unlike a dense round where all receive the same bytes).

Delta rounds: the staging tensors of a routed round, once applied, become the worker's shadow
(engine/shadow.py), exact in its needed regions only. A routed delta round
(dataplane/routed_delta.py) on a delta rank patches those regions of the shadow in place (the
destination is the shadow's tensor, not a fresh one), and the patched tensors go through the
same apply path; its piece sums are of the resulting regions, so a shadow that did not hold the
base shows as a mismatch. Kept tensors are the shadow's memory, not staging: they leave the
staging count when handed over.
"""

from __future__ import annotations

import logging
import queue
import threading
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from weightsync.core import Assignment, InvalidArgument, TensorSpec, TransferError
from weightsync.engine.inventory import check_update

if TYPE_CHECKING:
    import torch

    from weightsync.dataplane.groups import DataPlaneGroup
    from weightsync.engine.apply import AppliedWeights

__all__ = ["RoutedReceipt", "receive_routed_and_apply", "stage_routed"]

log = logging.getLogger(__name__)

# How often the data-plane thread re-checks whether the apply gave up while it waits to hand
# over a batch: the same bound as the data plane's own abort poll.
_HANDOFF_POLL_S = 0.05


@dataclass(slots=True)
class RoutedReceipt:
    """What a worker received in a routed round; the fields the extension reports, as a dense ReceiveResult has."""

    rank: int
    piece_sums: dict[int, int]
    bytes_received: int
    receive_s: float
    checksums: dict[str, int] = field(default_factory=dict)  # whole-tensor sums: none, the pieces carry them
    # Most bytes of full-size staging tensors alive at once during the round (the memory bound, measured).
    staging_peak_bytes: int = 0


class _StagingMeter:
    """Counts the full-size staging tensors alive (a weakref on each): the peak is the round's staging bound.

    vLLM's loader keeps the tensor objects it was handed until their module is complete, and
    the views it narrows them to only while it copies, so the tensor objects' lifetimes are
    the staging memory's."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._finalizers: dict[int, weakref.finalize] = {}

    def track(self, t: "torch.Tensor") -> "torch.Tensor":
        nbytes = t.numel() * t.element_size()
        with self._lock:
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self._finalizers[id(t)] = weakref.finalize(t, self._release, nbytes)
        return t

    def hand_over(self, t: "torch.Tensor") -> None:
        """`t` becomes the worker's shadow (kept past the round): its memory is the shadow's from now on."""
        finalizer = self._finalizers.pop(id(t), None)
        if finalizer is not None and finalizer.detach() is not None:
            self._release(t.numel() * t.element_size())

    def _release(self, nbytes: int) -> None:
        with self._lock:
            self.live_bytes -= nbytes


def _plan_problem(assignment: Assignment, inventory: Mapping[str, TensorSpec]) -> str | None:
    """Why this engine refuses the round's manifest (check_update), or None."""
    try:
        check_update(inventory, [e.spec for _, e in assignment.plan.entries()])
    except InvalidArgument as e:
        return str(e)
    return None


def _staging(
    assignment: Assignment, rank: int, group: "DataPlaneGroup", meter: _StagingMeter, base: "Mapping[str, torch.Tensor] | None"
):
    """A destination that hands out a fresh full-size tensor per needed checkpoint tensor, or on a
    delta rank of a routed delta round the shadow's tensor (`base`), whose needed regions are patched."""
    import torch

    from weightsync.dataplane.layout import torch_dtype

    specs = {e.name: e.spec for _, e in assignment.plan.entries()}
    if rank not in assignment.delta_ranks:
        base = None

    def destination(name: str) -> "torch.Tensor":
        if base is not None:
            t = base[name]
            return t if t.device == group.device else t.to(group.device)
        spec = specs[name]
        return meter.track(torch.empty(spec.shape, dtype=torch_dtype(spec.dtype), device=group.device))

    return destination


def _receive_fn(assignment: Assignment):
    """The data plane's receive for this routed round: dense pieces, or delta frames (routed_delta.py)."""
    if assignment.delta_base_version is None:
        from weightsync.dataplane.routed import receive_routed

        return receive_routed
    from weightsync.dataplane.routed_delta import receive_routed_delta

    return receive_routed_delta


def _base_problem(assignment: Assignment, rank: int, base: "Mapping[str, torch.Tensor] | None") -> str | None:
    """Why a delta rank cannot patch its pieces: it holds no shadow of a tensor it gets pieces of."""
    if rank not in assignment.delta_ranks:
        return None
    names = sorted({p.name for p in assignment.routing.received_by(rank)})
    missing = [n for n in names if base is None or n not in base]
    if not missing:
        return None
    return (
        f"update {assignment.update_id} is a routed delta against version {assignment.delta_base_version}, but this "
        f"worker holds no copy of {len(missing)} of its tensors (e.g. {missing[0]!r}): it must get dense pieces"
    )


def _receipt(result: Any, meter: _StagingMeter) -> RoutedReceipt:
    return RoutedReceipt(
        result.rank, dict(result.piece_sums), result.num_bytes, result.seconds, staging_peak_bytes=meter.peak_bytes
    )


def stage_routed(
    assignment: Assignment,
    rank: int,
    group: "DataPlaneGroup",
    inventory: Mapping[str, TensorSpec],
    *,
    discarded: threading.Event,
    base: "Mapping[str, torch.Tensor] | None" = None,
) -> tuple[list[tuple[str, "torch.Tensor"]], RoutedReceipt]:
    """Receives this worker's pieces into staging (nothing touches the model); returns the complete tensors and the receipt.

    A round whose manifest this engine refuses is refused on every rank at the open
    handshake; `discarded` set while receiving fails the round on every rank at the next bucket.
    A delta rank of a routed delta round patches `base` (the shadow it took) instead.
    """
    staged: list[tuple[str, torch.Tensor]] = []

    def keep(batch: list[tuple[str, "torch.Tensor"]]) -> None:
        if discarded.is_set():
            raise TransferError(f"update {assignment.update_id} was discarded while receiving")
        staged.extend(batch)

    problem = _plan_problem(assignment, inventory) or _base_problem(assignment, rank, base)
    if problem is None and discarded.is_set():
        problem = f"update {assignment.update_id} was discarded before it started"
    meter = _StagingMeter()
    result = _receive_fn(assignment)(
        assignment, rank, group, _staging(assignment, rank, group, meter, base), apply_fn=keep, local_problem=problem
    )
    return staged, _receipt(result, meter)


class _Handoff:
    """Complete tensors from the data-plane thread (put) to vLLM's loader on the worker thread (iterate).

    One batch at a time, so receiving runs at most one batch ahead of the loader. Either side
    may stop: the loader by `close()` (put then raises, which fails the round on every rank),
    the receiver by `finish(error)` (the loader's iterator then raises it).
    """

    _END = object()

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._closed = threading.Event()

    def put(self, batch: list[tuple[str, "torch.Tensor"]]) -> None:
        self._offer(batch)

    def finish(self, error: BaseException | None) -> None:
        try:
            self._offer((self._END, error))
        except RuntimeError:
            pass  # the loader has stopped: nobody waits for the end

    def _offer(self, item: Any) -> None:
        while True:
            if self._closed.is_set():
                raise RuntimeError("the loader stopped taking tensors")
            try:
                self._queue.put(item, timeout=_HANDOFF_POLL_S)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        self._closed.set()

    def __iter__(self) -> Iterator[tuple[str, "torch.Tensor"]]:
        while True:
            item = self._queue.get()
            if isinstance(item, tuple) and len(item) == 2 and item[0] is self._END:
                if item[1] is not None:
                    raise item[1]
                return
            yield from item


def receive_routed_and_apply(
    worker: Any,
    assignment: Assignment,
    rank: int,
    group: "DataPlaneGroup",
    inventory: Mapping[str, TensorSpec],
    *,
    path: str,
    base: "Mapping[str, torch.Tensor] | None" = None,
    keep: "list[tuple[str, torch.Tensor]] | None" = None,
) -> tuple["AppliedWeights", RoutedReceipt]:
    """Streams this worker's pieces into the model (generation paused by the caller); see the module docstring.

    A delta rank of a routed delta round patches `base` (the shadow it took) and hands the
    patched tensors to the loader. `keep`, if given, receives every tensor applied (the worker's
    next shadow, exact in its needed regions); kept tensors leave the staging count."""
    from weightsync.engine.apply import ApplyFailed, apply_weights

    problem = _plan_problem(assignment, inventory) or _base_problem(assignment, rank, base)
    handoff = _Handoff()
    meter = _StagingMeter()
    box: dict[str, Any] = {}

    def hand(batch: list[tuple[str, "torch.Tensor"]]) -> None:
        if keep is not None:
            keep.extend(batch)
            for _, t in batch:
                meter.hand_over(t)
        handoff.put(batch)

    def receive() -> None:
        error: BaseException | None = None
        try:
            box["result"] = _receive_fn(assignment)(
                assignment, rank, group, _staging(assignment, rank, group, meter, base), apply_fn=hand, local_problem=problem
            )
        except BaseException as e:  # thread boundary: handed to the loader's iterator and re-raised there
            error = box["error"] = e
        handoff.finish(error)

    thread = threading.Thread(target=receive, name=f"weightsync-routed-{assignment.update_id}-r{rank}", daemon=True)
    thread.start()
    try:
        applied = apply_weights(worker, handoff, path=path)
    except ApplyFailed as e:
        handoff.close()
        thread.join()
        if isinstance(e.__cause__, TransferError):
            # The round failed under the loader: report it as the transfer error it is.
            raise TransferError(str(e.__cause__)) from e
        # The loader failed: the receive thread failed the round on every rank; its error names the peers.
        if isinstance(box.get("error"), TransferError):
            raise box["error"] from e
        raise
    finally:
        handoff.close()
    thread.join()
    if "error" in box:
        # Applied, but the round failed at its close (another rank's problem): the model holds
        # unverified bytes, which the chain says (model_touched), so the worker is flagged dirty.
        touched = ApplyFailed(f"applied {applied.num_tensors} tensors of a round that then failed", model_touched=True)
        touched.__cause__ = box["error"]
        raise TransferError(str(box["error"])) from touched
    return applied, _receipt(box["result"], meter)
