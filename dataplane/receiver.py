"""The engine side of a round: receive plan buckets, checksum them, and hand tensor views to a consumer."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from weightsync.core import Assignment, TransferError
from weightsync.dataplane.checksum import checksum_views
from weightsync.dataplane.fused import PendingChecksums, prepare
from weightsync.dataplane.groups import DataPlaneGroup
from weightsync.dataplane.handshake import close_round, open_round
from weightsync.dataplane.layout import entry_spans, entry_view, keep_bytes, known_bytes, torch_dtype
from weightsync.dataplane.transports import transport_for

__all__ = ["ReceiveResult", "ReceiveStream", "iter_assignment", "receive_assignment"]

log = logging.getLogger(__name__)

Batch = list[tuple[str, torch.Tensor]]
ApplyFn = Callable[[Batch], None]
ProgressFn = Callable[[int, int], None]
DestinationFn = Callable[[str], "torch.Tensor | None"]

# Prepared GPU launches kept per group (one per bucket and set of addresses).
_MAX_PROGRAMS = 256


@dataclass(frozen=True, slots=True)
class ReceiveResult:
    """What a daemon reports in UpdateResult. Checksums are over the bytes received, in wire dtype."""

    update_id: str
    checksums: dict[str, int]
    bytes_received: int
    num_buckets: int
    receive_s: float  # in the data plane: waiting for bytes, checksums, the handshakes
    apply_s: float  # in the consumer (apply_fn, or the code pulling from the stream)
    checksum_s: float  # part of receive_s
    seconds: float
    # Seconds from the start of the round to: opened, received (the last bucket handed to
    # the consumer), checksummed (every sum read back), closed.
    timeline: dict[str, float] = field(default_factory=dict)


def _describe(error: BaseException) -> str:
    return f"consumer raised {type(error).__name__}: {error}"


class ReceiveStream:
    """One round on a receiver, pulled bucket by bucket.

    Iterating yields `(name, view)` pairs in plan order; `next_bucket()` returns one bucket's
    pairs at a time. Views point into a ring of `num_buffers` bucket buffers: a view stays
    valid until the consumer pulls from the bucket `num_buffers - 1` after its own (with the
    default 2: until the first pair of the next bucket is pulled). Copy or apply it before.

    `destination(name)` may return the consumer's own tensor for a name (contiguous, the
    entry's shape and wire dtype, on the receive device) or None. The bytes are then
    written straight into it, checksummed on the way, and the pair carries that tensor;
    on CUDA this saves the consumer's copy (for cuda_ipc the bytes go from the trainer's
    memory to the engine's in one copy). A destination is written as its bucket arrives,
    as apply_fn would write it; a tensor that does not match raises ValueError and fails
    the round on every rank.

    Use it as a context manager, or exhaust it: if the consumer stops early or raises, the
    stream still receives the remaining buckets (so no rank hangs) and every rank raises
    RoundFailed naming this rank and the consumer's error. `result` is ready once the
    stream is exhausted.
    """

    def __init__(
        self,
        assignment: Assignment,
        rank: int,
        group: DataPlaneGroup,
        *,
        device: torch.device | str | None = None,
        progress: ProgressFn | None = None,
        num_buffers: int = 2,
        destination: DestinationFn | None = None,
    ) -> None:
        if group.rank != rank:
            raise ValueError(f"rank {rank} was given a group whose rank is {group.rank}")
        if rank not in assignment.receiver_ranks:
            raise ValueError(f"rank {rank} is not among the receiver ranks {list(assignment.receiver_ranks)}")
        if num_buffers < 2:
            raise ValueError(f"num_buffers {num_buffers}: expected at least 2 so receiving overlaps applying")
        dev = torch.device(device) if device is not None else group.device
        transport = transport_for(group)
        if dev.type != transport.device_type:
            raise ValueError(
                f"transport {group.transport!r} receives into {transport.device_type.upper()} buffers; got device {dev}"
            )
        self._assignment = assignment
        self._group = group
        self._transport = transport
        self._device = dev
        self._progress = progress
        self._num_buffers = num_buffers
        self._destination = destination
        self._pending: list[tuple[list[str], PendingChecksums]] = []
        self._timeline: dict[str, float] = {}
        self._into: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._plan = assignment.plan
        self._ring: list[torch.Tensor] = []
        self._inbound = None
        self._inflight: dict[int, object] = {}
        self._issued = 0
        self._next = 0
        self._bytes = 0
        self._checksums: dict[str, int] = {}
        self._opened = False
        self._done = False
        self._error: BaseException | None = None
        self._result: ReceiveResult | None = None
        self._started = 0.0
        self._consumer_s = 0.0
        self._checksum_s = 0.0
        self._returned_at: float | None = None

    # ------------------------------------------------------------------ consumer API

    @property
    def result(self) -> ReceiveResult:
        if self._error is not None:
            raise self._error
        if self._result is None:
            raise ValueError("the round is not finished: exhaust the stream first")
        return self._result

    def next_bucket(self) -> Batch | None:
        """The next bucket's (name, view) pairs, or None once the round has closed successfully."""
        if self._done:
            if self._error is not None:
                raise self._error
            return None
        now = time.monotonic()
        if self._returned_at is not None:
            self._consumer_s += now - self._returned_at
            self._returned_at = None
        # The last bucket is reported by _finish, once the round has closed.
        if self._progress is not None and 0 < self._next < len(self._plan.buckets):
            try:
                self._progress(self._next, self._bytes)
            except Exception as e:
                self.close(e)
        try:
            batch = self._advance()
        except BaseException as e:
            self._abandon(e)
            raise
        self._returned_at = time.monotonic()
        return batch

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        try:
            for batch in iter(self.next_bucket, None):
                yield from batch
        except GeneratorExit:
            # The consumer dropped the iterator; its peers must still learn why.
            self._close_quietly(None)
            raise

    def close(self, error: BaseException | None = None) -> None:
        """Ends the round early: drains the remaining buckets, then every rank raises RoundFailed."""
        if self._done:
            return
        reason = _describe(error) if error is not None else (
            f"consumer stopped after {self._next} of {len(self._plan.buckets)} buckets"
        )
        try:
            if not self._opened:
                self._started = time.monotonic()
                open_round(self._group, self._assignment, local_problem=reason)
            else:
                self._drain()
                close_round(self._group, self._assignment, None, local_problem=reason)
        except BaseException as e:
            self._abandon(e)
            if error is not None and isinstance(e, TransferError):
                raise e from error
            raise
        raise AssertionError("a round closed with a local problem must raise RoundFailed")

    def __enter__(self) -> "ReceiveStream":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._done:
            return
        if exc is None:
            self.close()
        elif isinstance(exc, Exception):
            self.close(exc)
        else:
            self._abandon(exc)  # KeyboardInterrupt and the like: no draining, just tell the peers

    # ------------------------------------------------------------------ internals

    def _open(self) -> None:
        self._started = time.monotonic()
        open_round(self._group, self._assignment)
        self._timeline["opened"] = time.monotonic() - self._started
        self._ring = self._group.buffers(self._num_buffers, self._plan.max_bucket_bytes, self._device)
        self._inbound = self._transport.inbound(self._plan)
        self._opened = True

    def _issue_upto(self, limit: int) -> None:
        buckets = self._plan.buckets
        while self._issued < min(limit, len(buckets)):
            k = self._issued
            slot = k % self._num_buffers
            bucket = buckets[k]
            if self._transport.single_wire and len(bucket.entries) == 1:
                # A bucket of one tensor travels as that tensor's bytes alone (see
                # sender._pack_and_send), straight into the consumer's tensor when it offers one.
                e = bucket.entries[0]
                try:
                    d = self._destination_for(e)
                except Exception:
                    d = None  # reported, and the round failed, when the consumer reaches this bucket
                if d is not None:
                    self._into[k] = d
                view = d[1] if d is not None else self._ring[slot][: e.nbytes]
            else:
                view = self._ring[slot][: bucket.size_bytes]
            self._inflight[k] = self._inbound.start(k, slot, view)
            self._issued += 1

    def _advance(self) -> Batch | None:
        if not self._opened:
            self._open()
        buckets = self._plan.buckets
        k = self._next
        if k == len(buckets):
            self._finish()
            return None
        # Bucket k-1's slot is free now that the consumer asked for bucket k.
        self._issue_upto(k + self._num_buffers)
        bucket = buckets[k]
        into = self._into.pop(k, None)  # a one-tensor bucket received straight into the consumer's tensor
        if into is None:
            try:
                dests = [self._destination_for(e) for e in bucket.entries]
            except Exception as e:
                # The consumer's fault, like an apply_fn error: drain, and fail the round on every rank.
                self.close(e)
        sources = self._inbound.finish(k, self._inflight.pop(k))
        buf = self._ring[k % self._num_buffers][: bucket.size_bytes]
        if into is not None:
            sources, dests = [into[1]], [(into[0], None)]  # nothing to copy: checksum it where it landed
        t0 = time.monotonic()
        batch = self._land(bucket, buf, sources, dests)
        self._inbound.copied(k, self._device)
        self._checksum_s += time.monotonic() - t0
        self._next = k + 1
        self._bytes += bucket.size_bytes
        return batch

    def _destination_for(self, e) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(the consumer's tensor for e, its bytes as a flat uint8 view), or None."""
        if self._destination is None:
            return None
        d = self._destination(e.name)
        if d is None:
            return None
        seen = self._group.destination_bytes
        raw = known_bytes(seen, e.name, d)
        if raw is not None:
            return d, raw
        if (
            not isinstance(d, torch.Tensor)
            or d.device != self._device
            or d.dtype != torch_dtype(e.dtype)
            or tuple(d.shape) != tuple(e.shape)
            or not d.is_contiguous()
        ):
            got = (
                f"{list(d.shape)} {str(d.dtype).removeprefix('torch.')} on {d.device}"
                + ("" if d.is_contiguous() else ", not contiguous")
                if isinstance(d, torch.Tensor)
                else type(d).__name__
            )
            raise ValueError(
                f"destination for {e.name}: expected a contiguous {list(e.shape)} {e.dtype} tensor "
                f"on {self._device}, got {got}"
            )
        return d, keep_bytes(seen, e.name, d, d.view(-1).view(torch.uint8))

    def _land(
        self,
        bucket,
        buf: torch.Tensor,
        sources: list[torch.Tensor] | None,
        dests: list[tuple[torch.Tensor, torch.Tensor] | None],
    ) -> Batch:
        """Puts a bucket's bytes where the consumer takes them, checksums them, and returns its pairs.

        sources None: the bytes arrived in the ring slot `buf`. Otherwise they lie in the
        sender's memory (CUDA IPC) and are copied into the destination or the ring slot.
        """
        entries = bucket.entries
        names = [e.name for e in entries]
        if self._device.type == "cuda":
            # One launch per bucket; the sums are read back once, when the round closes. The
            # launch is worked out once per set of addresses: rounds repeat them.
            at = buf.data_ptr()
            ring_ptrs = [at + e.offset_bytes for e in entries]
            src_ptrs = ring_ptrs if sources is None else [t.data_ptr() for t in sources]
            dst_ptrs = []  # 0: checksum only
            for d, r in zip(dests, ring_ptrs):
                if d is not None:
                    dst_ptrs.append(d[1].data_ptr() if d[1] is not None else 0)  # None: landed in place
                else:
                    dst_ptrs.append(0 if sources is None else r)
            key = (tuple(src_ptrs), tuple(dst_ptrs), tuple(e.nbytes for e in entries))
            programs = self._group.launches
            prepared = programs.get(key)
            if prepared is None:
                srcs = sources
                if srcs is None:
                    srcs = [buf[e.offset_bytes : e.offset_bytes + e.nbytes] for e in entries]
                targets = [
                    d[1] if d is not None else (None if sources is None else buf[e.offset_bytes : e.offset_bytes + e.nbytes])
                    for e, d in zip(entries, dests)
                ]
                prepared = prepare(srcs, targets)
                if len(programs) >= _MAX_PROGRAMS:
                    programs.clear()
                programs[key] = prepared
            self._pending.append((names, prepared.run()))
        elif sources is not None:
            # A one-tensor bucket that arrived in the consumer's own tensor (CPU sources only so).
            self._checksums.update(zip(names, (checksum_views(t, [(0, t.numel())])[0] for t in sources)))
        else:
            self._checksums.update(zip(names, checksum_views(buf, entry_spans(bucket))))
            for e, d in zip(entries, dests):
                if d is not None:
                    d[1].copy_(buf[e.offset_bytes : e.offset_bytes + e.nbytes])
        return [(e.name, d[0] if d is not None else entry_view(buf, e)) for e, d in zip(entries, dests)]

    def _drain(self) -> None:
        buckets = self._plan.buckets
        while self._next < len(buckets):
            k = self._next
            self._issue_upto(k + self._num_buffers)
            self._inbound.finish(k, self._inflight.pop(k))
            # Nothing is copied or applied; this only lets a ring-mode CUDA IPC sender go on.
            self._inbound.copied(k, self._device)
            self._next = k + 1

    def _finish(self) -> None:
        t0 = time.monotonic()
        self._timeline["received"] = t0 - self._started
        for batch_names, pending in self._pending:
            self._checksums.update(zip(batch_names, pending.result()))
        self._pending.clear()
        self._checksum_s += time.monotonic() - t0
        self._timeline["checksummed"] = time.monotonic() - self._started
        names = [e.name for _, e in self._plan.entries()]
        close_round(self._group, self._assignment, [self._checksums[n] for n in names])
        self._done = True
        self._release()
        seconds = time.monotonic() - self._started
        self._result = ReceiveResult(
            update_id=self._assignment.update_id,
            checksums=dict(self._checksums),
            bytes_received=self._bytes,
            num_buckets=len(self._plan.buckets),
            receive_s=seconds - self._consumer_s,
            apply_s=self._consumer_s,
            checksum_s=self._checksum_s,
            seconds=seconds,
            timeline={**self._timeline, "closed": seconds},
        )
        log.debug("rank %d: update %s received in %.2f s", self._group.rank, self._assignment.update_id, seconds)
        if self._progress is not None:
            self._progress(self._next, self._bytes)

    def _abandon(self, error: BaseException) -> None:
        """Marks the stream failed; if the group may still be waited on by peers, tells them."""
        if self._done:
            return
        self._done = True
        self._error = error
        self._release()
        if not isinstance(error, TransferError):
            self._group.fail(f"receiver stopped: {type(error).__name__}: {error}")
        elif not self._group.is_broken and not hasattr(error, "reasons"):
            self._group.fail(str(error))

    def _close_quietly(self, error: BaseException | None) -> None:
        try:
            self.close(error)
        except TransferError as e:
            # Nobody is left to catch it here; it is kept for `result` and the peers raise it too.
            log.warning("rank %d: update %s ended early: %s", self._group.rank, self._assignment.update_id, e)

    def _release(self) -> None:
        if self._inbound is not None:
            self._inbound.close()
        self._inflight.clear()
        self._pending.clear()
        self._into.clear()


def iter_assignment(
    assignment: Assignment,
    rank: int,
    group: DataPlaneGroup,
    *,
    device: torch.device | str | None = None,
    progress: ProgressFn | None = None,
    num_buffers: int = 2,
    destination: DestinationFn | None = None,
) -> ReceiveStream:
    """A ReceiveStream for this round: iterate it for `(name, view)` pairs (e.g. as a weights iterator)."""
    return ReceiveStream(
        assignment, rank, group, device=device, progress=progress, num_buffers=num_buffers, destination=destination
    )


def receive_assignment(
    assignment: Assignment,
    rank: int,
    group: DataPlaneGroup,
    apply_fn: ApplyFn,
    *,
    device: torch.device | str | None = None,
    progress: ProgressFn | None = None,
    num_buffers: int = 2,
    destination: DestinationFn | None = None,
) -> ReceiveResult:
    """Receives the round and calls apply_fn once per bucket while the next bucket arrives.

    apply_fn gets the bucket's (name, view) pairs; the views are reused for a later bucket
    as soon as apply_fn returns, so it must copy what it keeps. progress(buckets_done,
    bytes_done) is called after each bucket is applied. `destination` as for ReceiveStream:
    apply_fn then gets the destination tensors themselves for those names. Raises
    RoundFailed on every rank if any rank fails; on failure some buckets may already
    have been applied.
    """
    stream = ReceiveStream(
        assignment, rank, group, device=device, progress=progress, num_buffers=num_buffers, destination=destination
    )
    with stream:
        for batch in iter(stream.next_bucket, None):
            apply_fn(batch)
    return stream.result
