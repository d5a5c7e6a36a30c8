"""The trainer side of a round: pack tensors into plan buckets and send them to every receiver."""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from weightsync.core import Assignment, BucketPlan
from weightsync.dataplane.checksum import checksum_views
from weightsync.dataplane.deferred import DeferredTensor, materialize
from weightsync.dataplane.fused import PendingChecksums, copy_and_checksum, prepare
from weightsync.dataplane.groups import DataPlaneGroup
from weightsync.dataplane.handshake import RoundFailed, close_round, open_round_as_sender
from weightsync.dataplane.layout import entry_spans, entry_view, keep_bytes, known_bytes, torch_dtype

__all__ = ["SendResult", "send_assignment"]

log = logging.getLogger(__name__)

SourceTensor = torch.Tensor | DeferredTensor
TensorSource = Mapping[str, SourceTensor] | Iterable[tuple[str, SourceTensor]]


@dataclass(frozen=True, slots=True)
class SendResult:
    """What the trainer reports in CommitUpdate. Empty checksums on trainer ranks other than 0."""

    update_id: str
    checksums: dict[str, int]
    bytes_sent: int
    num_buckets: int
    seconds: float
    pack_s: float
    checksum_s: float
    # Seconds from the call to the end of each phase: opened, sent (every byte left or was
    # taken by every receiver), checksummed (the sender's own sums read back), closed.
    timeline: dict[str, float] = field(default_factory=dict)


def _validate(plan: BucketPlan, source: Mapping[str, SourceTensor]) -> list[str]:
    problems = []
    for _, e in plan.entries():
        t = source.get(e.name)
        if t is None:
            problems.append(f"{e.name}: missing (the plan expects shape {list(e.shape)} {e.dtype})")
            continue
        if tuple(t.shape) != e.shape:
            problems.append(f"{e.name}: shape {list(t.shape)}, the plan expects {list(e.shape)}")
        if t.dtype.is_complex or t.device.type == "meta":
            problems.append(f"{e.name}: a {t.dtype} tensor on {t.device} cannot be sent as {e.dtype}")
    return problems


def _gather_only(plan: BucketPlan, source: Mapping[str, SourceTensor]) -> None:
    for _, e in plan.entries():
        materialize(source[e.name])


class _BroadcastOut:
    """Buckets leave by broadcast from rank 0 (gloo or NCCL)."""

    def __init__(self, group: DataPlaneGroup, num_buckets: int) -> None:
        self._group = group
        self._num_buckets = num_buckets

    def start(self, k: int, slot: int, view: torch.Tensor):
        return self._group.broadcast(view, f"broadcast of bucket {k + 1}/{self._num_buckets}")

    def finish(self, k: int, handle) -> None:
        self._group.wait(handle, f"broadcast of bucket {k + 1}/{self._num_buckets}")

    def close(self) -> None:
        pass


def _outbound(group: DataPlaneGroup, ring: list[torch.Tensor], num_buckets: int):
    if group.transport == "cuda_ipc":
        from weightsync.dataplane.cuda_ipc import IpcOut

        return IpcOut(group, ring, num_buckets)
    return _BroadcastOut(group, num_buckets)


def _buffer_device(group: DataPlaneGroup, device: torch.device | str | None) -> torch.device:
    dev = torch.device(device) if device is not None else group.device
    if group.transport == "gloo" and dev.type != "cpu":
        raise ValueError(f"transport 'gloo' sends from CPU buffers; got device {dev}")
    if group.transport in ("nccl", "cuda_ipc") and dev.type != "cuda":
        raise ValueError(f"transport {group.transport!r} sends from CUDA buffers; got device {dev}")
    return dev


def send_assignment(
    assignment: Assignment,
    tensors: TensorSource,
    group: DataPlaneGroup | None,
    *,
    device: torch.device | str | None = None,
    num_buffers: int = 2,
) -> SendResult:
    """Sends every tensor of the plan to every receiver, bucket by bucket, and verifies delivery.

    `tensors` maps Hugging Face names to plain tensors, DTensors or DeferredTensors (see
    TitanToHF.map_state_dict); entries outside the plan are ignored. Each is cast to the
    plan's wire dtype and copied to its offset in a bucket; while bucket k is on the wire,
    bucket k+1 is packed into the next of `num_buffers` rotating buffers (on CUDA, on a
    stream of its own). Checksums are taken over the packed bytes, the bytes on the wire.

    Lockstep contract for a sharded trainer: every trainer rank calls send_assignment with
    the same plan and the same tensors, at the same point relative to its other collectives,
    or the ranks deadlock. DTensors are gathered with full_tensor() (DeferredTensors
    computed) lazily, bucket by bucket in plan order, on every trainer rank. Only
    data-plane rank 0 sends; the other trainer ranks pass `group=None`, take part in the
    gathers and return a result with no checksums.

    cuda_ipc with plain tensors that already are wire bytes on this GPU (contiguous, the wire
    dtype): nothing is packed. The receivers read the tensors in place, through CUDA IPC
    mappings that the group keeps across rounds (it holds references to the tensors for that);
    the tensors must not change until this call returns, as for any transport.

    Raises ValueError, naming each tensor with the expected and actual shape, when the
    tensors do not match the plan; the receivers are told first and raise RoundFailed.
    Raises RoundFailed (a TransferError) when any rank fails, naming the rank and reason.
    """
    if num_buffers < 2:
        raise ValueError(f"num_buffers {num_buffers}: expected at least 2 so packing overlaps sending")
    started = time.monotonic()
    plan = assignment.plan
    source = dict(tensors.items()) if isinstance(tensors, Mapping) else dict(tensors)
    problems = _validate(plan, source)
    problem_text = f"{len(problems)} tensor(s) do not match the plan: " + "; ".join(problems) if problems else None
    if group is None:
        if problem_text:
            raise ValueError(problem_text)
        _gather_only(plan, source)
        return SendResult(assignment.update_id, {}, 0, len(plan.buckets), time.monotonic() - started, 0.0, 0.0)
    if group.rank != 0:
        raise ValueError(f"send_assignment runs on data-plane rank 0; this group's rank is {group.rank}")
    buffer_device = _buffer_device(group, device)
    direct = None
    if group.transport == "cuda_ipc" and problem_text is None and "direct_refused" not in group.transport_state:
        # Tensors that already are wire bytes on this GPU go unpacked. Their checksums do not
        # depend on the receivers: queue them now, so that the GPU sums while the ranks agree.
        sources = _direct_sources(plan, source, buffer_device, group)
        if sources is not None:
            # Receivers will read these tensors outside any stream ordering: every write the
            # trainer queued, on any stream, must be done first.
            torch.cuda.synchronize(buffer_device)
            direct = (sources, _direct_checksums(group, sources))
    open_round_as_sender(group, assignment, problem_text)
    opened = time.monotonic() - started
    try:
        return _send_buckets(assignment, source, group, buffer_device, num_buffers, started, opened, direct)
    except BaseException as e:
        # Tell the receivers now rather than let them sit out the timeout.
        if not isinstance(e, RoundFailed):
            group.fail(f"sender stopped: {type(e).__name__}: {e}")
        raise


def _as_wire_bytes(t: torch.Tensor, entry, device: torch.device) -> torch.Tensor | None:
    """t's bytes as a flat uint8 view when they already are the wire bytes on `device`, else None."""
    if t.device != device or t.dtype != torch_dtype(entry.dtype) or not t.is_contiguous():
        return None
    return t.reshape(-1).view(torch.uint8)


def _direct_sources(
    plan: BucketPlan, source: Mapping[str, SourceTensor], device: torch.device, group: DataPlaneGroup
) -> list[torch.Tensor] | None:
    """Every plan tensor's wire bytes in place, or None if any needs packing (a cast, a gather, a computation)."""
    seen = group.transport_state.setdefault("direct_sources", {})
    out = []
    for _, e in plan.entries():
        t = source[e.name]
        raw = known_bytes(seen, e.name, t)
        if raw is None:
            if not isinstance(t, torch.Tensor) or type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
                return None
            raw = _as_wire_bytes(t.detach(), e, device)
            if raw is None:
                return None
            keep_bytes(seen, e.name, t, raw)
        out.append(raw)
    return out


def _direct_checksums(group: DataPlaneGroup, sources: list[torch.Tensor]) -> PendingChecksums:
    key = tuple(t.data_ptr() for t in sources) + tuple(t.numel() for t in sources)
    state = group.transport_state.setdefault("direct_checksum", {})
    if state.get("key") != key:
        state.update(key=key, prepared=prepare(sources))
    return state["prepared"].run()


def _send_direct(
    assignment: Assignment, out, pending: PendingChecksums, started: float, marks: dict
) -> tuple[dict[str, int], float, float]:
    """cuda_ipc without packing: receivers copy straight out of the trainer's tensors (out: a DirectOut)."""
    t0 = time.monotonic()
    marks["published"] = t0 - started
    # The sender's own checksums, queued before the round opened, read back now.
    sums = pending.result()
    checksum_s = time.monotonic() - t0
    marks["checksummed"] = time.monotonic() - started
    out.wait_done()
    return {e.name: s for (_, e), s in zip(assignment.plan.entries(), sums)}, 0.0, checksum_s


def _send_buckets(
    assignment: Assignment,
    source: Mapping[str, SourceTensor],
    group: DataPlaneGroup,
    device: torch.device,
    num_buffers: int,
    started: float,
    opened: float,
    direct: tuple[list[torch.Tensor], PendingChecksums] | None,
) -> SendResult:
    plan = assignment.plan
    marks = {"opened": opened}
    out = None
    if direct is not None:
        from weightsync.dataplane.cuda_ipc import DirectOut

        try:
            direct_out = DirectOut(group, direct[0])
        except RuntimeError as e:
            # E.g. memory that CUDA IPC cannot export (expandable segments, foreign allocators):
            # this group packs from now on; the receivers have not been told anything yet.
            log.warning("cuda_ipc: cannot export the trainer's tensors (%s); packing them instead", e)
            group.transport_state["direct_refused"] = {"reason": str(e)}
            direct = None
    if direct is not None:
        checksums, pack_s, checksum_s = _send_direct(assignment, direct_out, direct[1], started, marks)
    else:
        ring = group.buffers(num_buffers, plan.max_bucket_bytes, device)
        out = _outbound(group, ring, len(plan.buckets))
        checksums, pack_s, checksum_s = _pack_and_send(
            plan, source, out, ring, device, num_buffers, single_wire=group.uses_collectives
        )
    sent = time.monotonic() - started
    close_round(group, assignment, [checksums[e.name] for _, e in plan.entries()])
    if out is not None:
        out.close()
    seconds = time.monotonic() - started
    log.info(
        "update %s: sent %d tensors in %d buckets (%.1f MiB) to %d receivers in %.2f s (%.2f GiB/s)",
        assignment.update_id, plan.num_tensors, len(plan.buckets), plan.total_bytes / 2**20,
        group.world_size - 1, seconds, plan.total_bytes / 2**30 / max(seconds, 1e-9),
    )
    return SendResult(
        update_id=assignment.update_id,
        checksums=checksums,
        bytes_sent=plan.total_bytes,
        num_buckets=len(plan.buckets),
        seconds=seconds,
        pack_s=pack_s,
        checksum_s=checksum_s,
        timeline={**marks, "sent": sent, "closed": seconds},
    )


def _pack_and_send(
    plan: BucketPlan,
    source: Mapping[str, SourceTensor],
    out,
    ring: list[torch.Tensor],
    device: torch.device,
    num_buffers: int,
    single_wire: bool,
) -> tuple[dict[str, int], float, float]:
    """Packs bucket k+1 while bucket k is on the wire; returns (checksums, pack_s, checksum_s).

    single_wire (broadcast transports): a bucket that holds one tensor travels as that
    tensor's bytes alone, straight from the tensor when it already is wire bytes (no
    packing copy; e.g. an embedding larger than a bucket), and receivers may take it straight
    into their own tensor.
    """
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    if stream is not None:
        # The trainer wrote the tensors on its own stream; packing must see those writes.
        stream.wait_stream(torch.cuda.current_stream(device))
    checksums: dict[str, int] = {}
    # The sources stay referenced until their sums are read: a gathered or computed tensor
    # must not be freed while the kernel that reads it is still queued.
    pending: list[tuple[list[str], PendingChecksums, list[torch.Tensor]]] = []
    # (bucket, handle, tensor sent from): a tensor sent without packing stays referenced until sent.
    inflight: deque[tuple[int, object, torch.Tensor | None]] = deque()
    pack_s = checksum_s = 0.0
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        for k, bucket in enumerate(plan.buckets):
            slot = k % num_buffers
            if len(inflight) == num_buffers:
                done_k, handle, _ = inflight.popleft()
                out.finish(done_k, handle)
            buf = ring[slot][: bucket.size_bytes]
            names = [e.name for e in bucket.entries]
            t0 = time.monotonic()
            if single_wire and len(bucket.entries) == 1:
                e = bucket.entries[0]
                t = materialize(source[e.name])
                wire = _as_wire_bytes(t.detach(), e, device)
                if wire is None:
                    entry_view(buf, e).copy_(t)
                    wire = buf[: e.nbytes]
                if stream is not None:
                    pending.append((names, copy_and_checksum([wire]), [wire]))
                pack_s += time.monotonic() - t0
                inflight.append((k, out.start(k, slot, wire), t))
                if stream is None:
                    t0 = time.monotonic()
                    checksums[e.name] = checksum_views(wire, [(0, e.nbytes)])[0]
                    checksum_s += time.monotonic() - t0
                continue
            if stream is not None:
                # One launch copies the tensors that are already wire bytes and checksums the
                # whole bucket; the others (casts, gathers) are copied in by torch first.
                sources: list[torch.Tensor] = []
                targets: list[torch.Tensor | None] = []
                for e in bucket.entries:
                    t = materialize(source[e.name])
                    raw = _as_wire_bytes(t.detach(), e, device)
                    view = buf[e.offset_bytes : e.offset_bytes + e.nbytes]
                    if raw is None:
                        entry_view(buf, e).copy_(t)
                        sources.append(view)
                        targets.append(None)
                    else:
                        sources.append(raw)
                        targets.append(view)
                pending.append((names, copy_and_checksum(sources, targets), sources))
                pack_s += time.monotonic() - t0
                inflight.append((k, out.start(k, slot, buf), None))
                continue
            for e in bucket.entries:
                entry_view(buf, e).copy_(materialize(source[e.name]))
            pack_s += time.monotonic() - t0
            inflight.append((k, out.start(k, slot, buf), None))
            # The checksum reads the bucket while it is on the wire: reading is safe, and it hides the cost.
            t0 = time.monotonic()
            sums = checksum_views(buf, entry_spans(bucket))
            checksum_s += time.monotonic() - t0
            checksums.update(zip(names, sums))
        while inflight:
            done_k, handle, _ = inflight.popleft()
            out.finish(done_k, handle)
        t0 = time.monotonic()
        for batch_names, p, _ in pending:
            checksums.update(zip(batch_names, p.result()))
        checksum_s += time.monotonic() - t0
    return checksums, pack_s, checksum_s
