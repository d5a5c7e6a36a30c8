"""Delta rounds on the data plane: each receiver gets the payload its encoding says, dense or delta.

The assignment says per participant whether it takes a delta against `delta_base_version`
(the coordinator gives one only to daemons clean on exactly that version) or the dense
weights. Design, and why: the broadcast of dense rounds sends the same bytes to every
receiver, but a delta round has two payloads, each identical for every rank of its kind.
On gloo each payload is relayed along a pipelined chain of the ranks that take it
(dataplane/relay.py; a tree if the group's dense rounds use one), so it leaves the trainer
once, not once per receiver, over point-to-point sends on ONE group with ONE handshake (no
second sub-round, no second rendezvous, no second failure path). NCCL sends each rank its
payload point to point; cuda_ipc rounds are never delta (the coordinator makes them dense:
the receiver reads the trainer's memory there, nothing to save).

Per frame (a run of about 16 MiB of a plan bucket's tensors, `_frame_runs`, cut the same way
by every rank) the sender encodes the run's tensors once (`encode_many`, against the base it
keeps; the next run while this one travels) and sends every delta rank: a header (int64
[meta bytes, payload bytes]), the meta (JSON: per tensor its name, `Delta.to_dict()` and segment sizes) and the payload
(positions, escapes, values per tensor, each segment padded to 8 bytes so it can be viewed
in its dtype). Dense ranks get the same framing with every tensor a dense "delta" (all
its values), so both kinds of receiver run one code path.

Verification: a receiver patches its engine's tensors in place (`apply_many`) and reports
checksums of the WHOLE resulting tensors, recomputed (see `delta_checksum.py`: an update
from the changed words would not see a wrong base). Measured, the recompute is cheap enough
to keep: 15 ms for 64 MiB on one CPU core, 0.02-0.05 s of a 0.4 s delta round on the emulated
fleet where 7 receivers share 2 cores (BENCHMARKS.md "Where a delta round's time goes"). The
receiver's timeline (opened, received, applied, checksummed, closed) goes into the round
record. The coordinator compares the checksums with the trainer's of its new tensors, per
daemon: an engine that held other bytes than the base ends CHECKSUM_MISMATCH and flagged,
the others verified. The data-plane close therefore only agrees that every rank finished
(all rows zero): comparing payload sums there would fail every rank for one engine's wrong
base.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping

import torch

from weightsync.core import Assignment, TransferError
from weightsync.dataplane.checksum import tensor_checksum
from weightsync.dataplane.deferred import materialize
from weightsync.dataplane.delta import Delta, Encoding, apply_many, encode_many, index_width_bytes
from weightsync.dataplane.groups import DataPlaneGroup
from weightsync.dataplane.handshake import close_round, open_round, open_round_as_sender
from weightsync.dataplane.layout import torch_dtype
from weightsync.dataplane.receiver import ReceiveResult
from weightsync.dataplane.relay import RELAY_SHAPES, relay_message, send_message
from weightsync.dataplane.sender import SendResult, SourceTensor, _validate

__all__ = ["receive_delta_round", "send_delta_round", "wire_tensor"]

log = logging.getLogger(__name__)

_PAD = 8
# Dense bytes per frame: a bucket's tensors are encoded and sent in runs of about this size, so
# the trainer encodes run j+1 while run j travels and a receiver patches run j while run j+1
# arrives. Measured on the emulated fleet (BENCHMARKS.md "Where a delta round's time goes"):
# with one frame per 256 MiB bucket, encoding 64 MiB took 0.076 s before the first byte left.
_FRAME_DENSE_BYTES = 16 << 20
# Meta of one bucket is a few hundred bytes per tensor; a header beyond this is damage, not a plan.
_MAX_META_BYTES = 64 << 20


def _pad(n: int) -> int:
    return (n + _PAD - 1) // _PAD * _PAD


def _frame_runs(entries) -> list[list]:
    """A bucket's entries cut into consecutive runs of at most _FRAME_DENSE_BYTES (one entry at least).

    The sender and every receiver cut the same plan the same way: that is the lockstep.
    """
    runs: list[list] = [[]]
    size = 0
    for e in entries:
        if runs[-1] and size + e.nbytes > _FRAME_DENSE_BYTES:
            runs.append([])
            size = 0
        runs[-1].append(e)
        size += e.nbytes
    return runs


def wire_tensor(t: SourceTensor, dtype: str, device: torch.device) -> torch.Tensor:
    """`t` as the plan sends it: materialised, the wire dtype, contiguous, on `device`."""
    return materialize(t).detach().to(device=device, dtype=torch_dtype(dtype)).contiguous()


def _dense(new: torch.Tensor) -> Delta:
    empty = torch.empty(0, dtype=torch.uint8, device=new.device)
    return Delta(Encoding.DENSE, new.numel(), new.numel(), empty, empty, new.reshape(-1))


def _frame(names: list[str], deltas: list[Delta], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(header, meta, payload) of one bucket for one kind of receiver."""
    meta = []
    parts = []
    for name, d in zip(names, deltas):
        sizes = []
        for t in (d.positions, d.escapes, d.values):
            raw = t.contiguous().reshape(-1).view(torch.uint8)
            sizes.append(raw.numel())
            parts.append(raw)
            if _pad(raw.numel()) != raw.numel():
                parts.append(torch.zeros(_pad(raw.numel()) - raw.numel(), dtype=torch.uint8, device=raw.device))
        meta.append({"name": name, **d.to_dict(), "sizes": sizes})
    payload = torch.cat([p.to(device) for p in parts]) if parts else torch.empty(0, dtype=torch.uint8, device=device)
    meta_t = torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8).to(device)
    header = torch.tensor([meta_t.numel(), payload.numel()], dtype=torch.int64, device=device)
    return header, meta_t, payload


def _relay_shape(group: DataPlaneGroup) -> str | None:
    """How a gloo group relays a delta round's payloads; None: point to point from the trainer."""
    if group.transport != "gloo":
        return None
    return group.relay if group.relay in RELAY_SHAPES else "chain"


def _start_frames(group: DataPlaneGroup, frames, what: str) -> Callable[[], None]:
    """Starts sending the frames; returns the wait for their end (the caller works meanwhile)."""
    shape = _relay_shape(group)
    if shape is not None:
        def send_all() -> None:
            for ranks, (header, meta, payload) in frames:
                send_message(group, [0, *ranks], shape, [header.view(torch.uint8), meta, payload])

        future = group.submit(send_all)
        return lambda: group.wait_future(future, what)
    works = []
    for ranks, frame in frames:
        for r in ranks:
            works.extend(post_frame(group, frame, r, what))

    def wait() -> None:
        for w in works:
            group.wait_p2p(w, what)

    return wait


def post_frame(group: DataPlaneGroup, frame: tuple[torch.Tensor, torch.Tensor, torch.Tensor], dst: int, what: str) -> list:
    """Posts one (header, meta, payload) frame to `dst` point to point; the caller waits on the returned works."""
    header, meta, payload = frame
    works = [group.send(header, dst, what), group.send(meta, dst, what)]
    if payload.numel():
        works.append(group.send(payload, dst, what))
    return works


def _frame_sizes(header: torch.Tensor, rank: int, what: str) -> tuple[int, int]:
    meta_n, payload_n = (int(x) for x in header.view(torch.int64).tolist())
    if not 0 <= meta_n <= _MAX_META_BYTES or payload_n < 0:
        # The framing itself is broken: nothing after it can be read in step.
        raise ValueError(f"rank {rank}: {what}: header says {meta_n} meta bytes, {payload_n} payload bytes")
    return meta_n, payload_n


def recv_frame(group: DataPlaneGroup, src: int, rank: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The (meta, payload) of one frame that `src` posted to this rank with `post_frame`."""
    dev = group.device
    header = torch.zeros(2, dtype=torch.int64, device=dev)
    group.wait_p2p(group.recv(header, src, what), what)
    try:
        meta_n, payload_n = _frame_sizes(header, rank, what)
    except ValueError as e:
        raise group.fail(str(e)) from e
    meta_t = torch.empty(meta_n, dtype=torch.uint8, device=dev)
    group.wait_p2p(group.recv(meta_t, src, what), what)
    payload = torch.empty(payload_n, dtype=torch.uint8, device=dev)
    if payload_n:
        group.wait_p2p(group.recv(payload, src, what), what)
    return meta_t, payload


def _start_take(
    group: DataPlaneGroup, assignment: Assignment, rank: int, what: str
) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """Starts taking this rank's next frame; returns the wait for its (meta, payload).

    Along a relay the frame is taken and forwarded on the group's worker, so the caller can
    patch the previous frame meanwhile; point to point it is taken when waited for.
    """
    shape = _relay_shape(group)
    if shape is None:
        return lambda: recv_frame(group, 0, rank, what)
    header = torch.zeros(2, dtype=torch.int64, device=group.device)
    kind = assignment.delta_ranks if rank in assignment.delta_ranks else assignment.dense_ranks
    future = group.submit(
        lambda: relay_message(group, [0, *kind], shape, header.view(torch.uint8), lambda h: _frame_sizes(h, rank, what))
    )

    def wait_relayed() -> tuple[torch.Tensor, torch.Tensor]:
        group.wait_future(future, what)
        _, meta_t, payload = future.result()
        return meta_t, payload

    return wait_relayed


def send_delta_round(
    assignment: Assignment,
    tensors: Mapping[str, SourceTensor] | Iterable[tuple[str, SourceTensor]],
    group: DataPlaneGroup,
    base: Mapping[str, torch.Tensor],
    *,
    device: torch.device | str | None = None,
    keep: dict[str, torch.Tensor] | None = None,
) -> SendResult:
    """Sends a delta round: deltas against `base` to the delta ranks, dense to the others.

    `base` maps names to the wire-dtype tensors of `assignment.delta_base_version` (any
    device; they are moved to the group's device per bucket). `keep`, if given, receives a
    CPU copy of every new wire tensor: the caller's next base once the round commits.
    Returns the sender's checksums of the new tensors, whole, which every engine must match.
    """
    if assignment.delta_base_version is None:
        raise ValueError(f"update {assignment.update_id} is a dense round: use send_assignment")
    started = time.monotonic()
    plan = assignment.plan
    source = dict(tensors.items()) if isinstance(tensors, Mapping) else dict(tensors)
    dev = torch.device(device) if device is not None else group.device
    problems = _validate(plan, source)
    delta_ranks, dense_ranks = assignment.delta_ranks, assignment.dense_ranks
    if delta_ranks:
        for _, e in plan.entries():
            b = base.get(e.name)
            if b is None:
                problems.append(f"{e.name}: no base tensor of version {assignment.delta_base_version}")
            elif tuple(b.shape) != e.shape or b.dtype != torch_dtype(e.dtype):
                problems.append(
                    f"{e.name}: base is {list(b.shape)} {b.dtype}, the plan sends {list(e.shape)} {e.dtype}"
                )
    problem_text = f"{len(problems)} tensor(s) cannot be sent: " + "; ".join(problems) if problems else None
    open_round_as_sender(group, assignment, problem_text)
    opened = time.monotonic() - started
    checksums: dict[str, int] = {}
    sent_bytes = {"delta": 0, "dense": 0}
    encode_s = checksum_s = 0.0
    wait_sent: Callable[[], None] | None = None
    try:
        for k, bucket in enumerate(plan.buckets):
            runs = _frame_runs(bucket.entries)
            for j, run in enumerate(runs):
                t0 = time.monotonic()
                names = [e.name for e in run]
                news = [wire_tensor(source[e.name], e.dtype, dev) for e in run]
                frames = []
                if delta_ranks:
                    bases = [base[n].to(dev).contiguous() for n in names]
                    frames.append((delta_ranks, _frame(names, encode_many(bases, news), dev)))
                if dense_ranks:
                    frames.append((dense_ranks, _frame(names, [_dense(t) for t in news], dev)))
                encode_s += time.monotonic() - t0
                # One frame in flight at a time: this one was encoded while the previous travelled.
                if wait_sent is not None:
                    wait_sent()
                what = f"delta round bucket {k + 1}/{len(plan.buckets)} frame {j + 1}/{len(runs)}"
                wait_sent = _start_frames(group, frames, what)
                for ranks, (_, _, payload) in frames:
                    # What left the trainer: once per kind through a relay, else once per rank.
                    copies = 1 if _relay_shape(group) is not None else len(ranks)
                    sent_bytes["delta" if ranks == delta_ranks else "dense"] += copies * payload.numel()
                # While the bytes travel: the sums the engines must match, and the next base.
                t0 = time.monotonic()
                for n, t in zip(names, news):
                    checksums[n] = tensor_checksum(t)
                    if keep is not None:
                        keep[n] = t.to("cpu", copy=True)
                checksum_s += time.monotonic() - t0
        if wait_sent is not None:
            wait_sent()
    except BaseException as e:
        if not isinstance(e, TransferError):
            group.fail(f"sender stopped: {type(e).__name__}: {e}")
        raise
    sent = time.monotonic() - started
    # Every rank's row is zeros: the verdict on the engines' bytes is the coordinator's (module docstring).
    close_round(group, assignment, [0] * plan.num_tensors)
    seconds = time.monotonic() - started
    log.info(
        "update %s: delta round against version %d: %d delta ranks (%.2f MiB), %d dense ranks (%.2f MiB) in %.2f s",
        assignment.update_id, assignment.delta_base_version, len(delta_ranks), sent_bytes["delta"] / 2**20,
        len(dense_ranks), sent_bytes["dense"] / 2**20, seconds,
    )
    return SendResult(
        update_id=assignment.update_id,
        checksums=checksums,
        bytes_sent=sent_bytes["delta"] + sent_bytes["dense"],
        num_buckets=len(plan.buckets),
        seconds=seconds,
        pack_s=encode_s,
        checksum_s=checksum_s,
        timeline={"opened": opened, "sent": sent, "closed": seconds},
    )


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if index_width_bytes(numel) == 4 else torch.int64


def _segment_dtypes(encoding: str, numel: int, value_dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype, torch.dtype]:
    positions = {
        "dense": torch.uint8,
        "indices": _index_dtype(numel),
        "bitmask": torch.uint8,
        "gaps8": torch.uint8,
        "gaps16": torch.int16,
    }.get(encoding, torch.uint8)
    return positions, _index_dtype(numel), value_dtype


def _unframe(meta: list, payload: torch.Tensor, entries, targets: list[torch.Tensor]) -> list[Delta]:
    if not isinstance(meta, list) or len(meta) != len(entries):
        raise ValueError(f"delta meta lists {len(meta) if isinstance(meta, list) else meta!r} tensors, the bucket has {len(entries)}")
    deltas = []
    at = 0
    for m, e, target in zip(meta, entries, targets):
        if not isinstance(m, dict) or m.get("name") != e.name:
            raise ValueError(f"delta meta names {m.get('name') if isinstance(m, dict) else m!r}, the plan has {e.name!r} here")
        dtypes = _segment_dtypes(m.get("encoding"), target.numel(), target.dtype)
        segs = []
        for size, dtype in zip(m["sizes"], dtypes):
            if not 0 <= size <= payload.numel() - at:
                raise ValueError(f"{e.name}: a delta segment of {size} bytes at {at} lies outside the payload of {payload.numel()}")
            segs.append(payload[at : at + size].view(dtype))
            at += _pad(size)
        deltas.append(Delta.from_dict(m, *segs))
    return deltas


def receive_delta_round(
    assignment: Assignment,
    rank: int,
    group: DataPlaneGroup,
    destination: Callable[[str], torch.Tensor | None],
    *,
    apply_fn: Callable[[list[tuple[str, torch.Tensor]]], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    refuse: str | None = None,
) -> ReceiveResult:
    """Receives this rank's payload of a delta round and patches `destination(name)` in place.

    Each destination must be the engine's own contiguous tensor of the plan's shape and wire
    dtype on the group's device; for a delta rank it must hold exactly the base version.
    `apply_fn`, if given, is called per frame with (name, patched tensor) pairs after the
    patch (the tensors are already written; e.g. for fault injection or bookkeeping).
    Returns checksums of the whole resulting tensors, recomputed. On any local problem the
    rank still takes every message (so the sender is not left waiting) and then fails the
    round on every rank with its reason. `refuse` (a reason) refuses the round at its open
    handshake, on every rank, before any byte moves (e.g. a vLLM worker without its base).
    """
    if rank not in assignment.receiver_ranks:
        raise ValueError(f"rank {rank} is not among the receiver ranks {list(assignment.receiver_ranks)}")
    started = time.monotonic()
    plan = assignment.plan
    dev = group.device
    open_round(group, assignment, local_problem=refuse)
    opened = time.monotonic() - started
    problem: BaseException | None = None
    received = 0
    apply_s = 0.0
    held: dict[str, torch.Tensor] = {}
    timeline = {"opened": opened}
    frames = []  # (bucket index, its run of entries, what), in the sender's order
    for k, bucket in enumerate(plan.buckets):
        runs = _frame_runs(bucket.entries)
        frames.extend(
            (k, run, f"delta round bucket {k + 1}/{len(plan.buckets)} frame {j + 1}/{len(runs)}") for j, run in enumerate(runs)
        )
    pending = _start_take(group, assignment, rank, frames[0][2]) if frames else None
    for i, (k, run, _) in enumerate(frames):
        meta_t, payload = pending()
        timeline["received"] = time.monotonic() - started
        received += payload.numel()
        if i + 1 < len(frames):
            # The next frame arrives (and is forwarded) while this one is patched.
            pending = _start_take(group, assignment, rank, frames[i + 1][2])
        if problem is not None:
            continue
        t0 = time.monotonic()
        try:
            targets = []
            for e in run:
                d = destination(e.name)
                if (
                    not isinstance(d, torch.Tensor)
                    or tuple(d.shape) != e.shape
                    or d.dtype != torch_dtype(e.dtype)
                    or not d.is_contiguous()
                    or d.device != dev
                ):
                    got = f"{list(d.shape)} {d.dtype} on {d.device}" if isinstance(d, torch.Tensor) else repr(d)
                    raise ValueError(
                        f"{e.name}: a delta round patches the engine's tensor in place: expected a contiguous "
                        f"{list(e.shape)} {e.dtype} tensor on {dev}, got {got}"
                    )
                targets.append(d)
            deltas = _unframe(json.loads(bytes(meta_t.cpu().numpy())), payload, run, targets)
            apply_many(targets, deltas)
            held.update((e.name, t) for e, t in zip(run, targets))
            if apply_fn is not None:
                apply_fn([(e.name, t) for e, t in zip(run, targets)])
            if progress is not None and (i + 1 == len(frames) or frames[i + 1][0] != k):
                progress(k + 1, received)
        except Exception as e:
            problem = e
        apply_s += time.monotonic() - t0
        timeline["applied"] = time.monotonic() - started
    if problem is not None:
        close_round(group, assignment, None, local_problem=f"rank {rank}: {type(problem).__name__}: {problem}")
        raise AssertionError("close_round with a local problem raises")
    t0 = time.monotonic()
    # The whole resulting tensors, recomputed: proves the engine holds the trainer's bytes.
    checksums = {n: tensor_checksum(t) for n, t in held.items()}
    checksum_s = time.monotonic() - t0
    timeline["checksummed"] = time.monotonic() - started
    close_round(group, assignment, [0] * plan.num_tensors)
    seconds = time.monotonic() - started
    timeline["closed"] = seconds
    log.debug(
        "update %s: rank %d: delta round phases (s from its start) %s, apply %.3f s, checksums %.3f s",
        assignment.update_id, rank, {p: round(v, 3) for p, v in timeline.items()}, apply_s, checksum_s,
    )
    return ReceiveResult(
        update_id=assignment.update_id,
        checksums=checksums,
        bytes_received=received,
        num_buckets=len(plan.buckets),
        receive_s=seconds - apply_s,
        apply_s=apply_s,
        checksum_s=checksum_s,
        seconds=seconds,
        timeline=timeline,
    )
