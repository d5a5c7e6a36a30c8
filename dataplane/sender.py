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
from weightsync.dataplane.fused import PendingChecksums, copy_and_checksum
from weightsync.dataplane.groups import DataPlaneGroup
from weightsync.dataplane.handshake import RoundFailed, close_round, open_round_as_sender
from weightsync.dataplane.layout import entry_spans, entry_view, wire_bytes
from weightsync.dataplane.transports import Transport, transport_for

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


def _buffer_device(group: DataPlaneGroup, transport: Transport, device: torch.device | str | None) -> torch.device:
    dev = torch.device(device) if device is not None else group.device
    if dev.type != transport.device_type:
        raise ValueError(
            f"transport {group.transport!r} sends from {transport.device_type.upper()} buffers; got device {dev}"
        )
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
    transport = transport_for(group)
    buffer_device = _buffer_device(group, transport, device)
    # (tensors sent unpacked, their queued checksums): CUDA IPC's direct mode, else None.
    direct = transport.direct_sources(plan, source, buffer_device) if problem_text is None else None
    open_round_as_sender(group, assignment, problem_text)
    opened = time.monotonic() - started
    try:
        return _send_buckets(assignment, source, group, transport, buffer_device, num_buffers, started, opened, direct)
    except BaseException as e:
        # Tell the receivers now rather than let them sit out the timeout.
        if not isinstance(e, RoundFailed):
            group.fail(f"sender stopped: {type(e).__name__}: {e}")
        raise


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
    transport: Transport,
    device: torch.device,
    num_buffers: int,
    started: float,
    opened: float,
    direct: tuple[list[torch.Tensor], PendingChecksums] | None,
) -> SendResult:
    plan = assignment.plan
    marks = {"opened": opened}
    out = None
    direct_out = transport.direct_out(direct[0]) if direct is not None else None
    if direct_out is not None:
        checksums, pack_s, checksum_s = _send_direct(assignment, direct_out, direct[1], started, marks)
    else:
        ring = group.buffers(num_buffers, plan.max_bucket_bytes, device)
        out = transport.outbound(ring, len(plan.buckets))
        checksums, pack_s, checksum_s = _pack_and_send(
            plan, source, out, ring, device, num_buffers, single_wire=transport.single_wire
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
                wire = wire_bytes(t.detach(), e, device)
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
                    raw = wire_bytes(t.detach(), e, device)
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
