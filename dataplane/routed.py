"""Routed rounds on the data plane: every trainer rank sends the pieces it holds to the receivers that need them.

The assignment's RoutingPlan (core/routing.py) lists every piece: a box of one tensor, its
sender (a trainer rank, data-plane ranks 0..S-1) and its receivers in relay order. Per bucket,
the pieces with the same chain form a Route: the sender packs them from its LOCAL tensors (a
DTensor's `to_local()` shard, a replicated or plain tensor as it is: nobody gathers) into one
message, which leaves the sender once and is relayed, pipelined chunk by chunk, along the
chain (dataplane/relay.py `ChainLanes`: a lane per chain, streaming across buckets); every receiver
forwards exactly the bytes it got and lands its pieces into a full-size tensor (the engine's
own, via `destination`, or a staging tensor whose unneeded parts are never written). Point to
point over the one group, as delta_round.py does: one group, one handshake, one failure path;
gloo's broadcast is a star anyway (FACTS.md). Each lane relays its routes in plan order on
every rank (the relay's lockstep contract), the lanes independently of each other; the round's
thread packs (sender) or lands and applies (receiver) one bucket while the lanes relay the
next. Memory:
a sender holds at most two buckets of packed messages, a receiver two buckets of receive
buffers (plus its full-size destinations).

Verification composes (core/wordsum.py): every sender reports, per piece it sent, the sum S
of the piece's bytes at their global positions in the tensor (`runs_sum`); every receiver
the same sums recomputed from what landed in its destination (after `apply_fn`, so a bad
apply shows), per piece. The coordinator matches every (piece, receiver) pair and composes
whole-tensor checksums where a receiver got the whole tensor. The data-plane close
therefore only agrees that every rank finished (zeros): one engine's bad bytes must flag
that engine, not fail every rank. Pieces may start and end anywhere: `runs_sum` handles the
edge words of bf16 columns and odd rows byte by byte.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from weightsync.core import Assignment, TensorSpec, TransferError
from weightsync.core.regions import Region
from weightsync.core.routing import Box, Piece, RoutingPlan, box_of
from weightsync.dataplane.checksum import runs_sum
from weightsync.dataplane.groups import DataPlaneGroup
from weightsync.dataplane.handshake import close_round, open_round, open_round_as_sender
from weightsync.dataplane.layout import torch_dtype
from weightsync.dataplane.relay import ChainLanes

__all__ = ["RoutedResult", "held_region", "local_view", "piece_sum", "receive_routed", "send_routed"]

log = logging.getLogger(__name__)


@dataclass
class RoutedResult:
    """One rank's side of a routed round: the sum S of every piece it sent or received, by piece index."""

    update_id: str
    rank: int
    piece_sums: dict[int, int]
    num_bytes: int
    seconds: float
    timeline: dict[str, float] = field(default_factory=dict)
    # Receivers without a destination: the staging tensors the pieces landed in, by name.
    staged: dict[str, torch.Tensor] = field(default_factory=dict)


def _routing(assignment: Assignment) -> RoutingPlan:
    if assignment.routing is None:
        raise ValueError(f"update {assignment.update_id} is not routed: use send_assignment / receive_assignment")
    return assignment.routing


def _shapes(assignment: Assignment) -> dict[str, TensorSpec]:
    return {e.name: e.spec for _, e in assignment.plan.entries()}


def held_region(t: torch.Tensor) -> Region | None:
    """The region of the global tensor that this rank's `local_view(t)` holds: from DTensor placements, else whole.

    None when this rank's shard is empty (more ranks than rows: torch gives the last ranks nothing).
    One sharded mesh dim at most (FSDP2's Shard(d) over its mesh, or Replicate); other layouts
    (several sharded mesh dims, Partial) raise ValueError, since a region is one block."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(t, DTensor):
        return Region.whole()
    sharded = [(i, p) for i, p in enumerate(t.placements) if not isinstance(p, Replicate)]
    if not sharded:
        return Region.whole()
    if len(sharded) > 1 or not isinstance(sharded[0][1], Shard):
        raise ValueError(f"DTensor placements {t.placements}: expected Replicate and at most one Shard(d)")
    # torch's own rule for where a rank's shard starts (uneven shards, empty trailing ranks).
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local_shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    dim = sharded[0][1].dim
    if local_shape[dim] == 0:
        return None
    return Region(dim, int(offset[dim]), int(local_shape[dim])).normalized(tuple(t.shape))


def local_view(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _runs(box: Box, shape: Sequence[int], itemsize: int) -> tuple[int, int, torch.Tensor]:
    """(number of runs, bytes per run, byte offset of each run) of a box in the row-major tensor."""
    partial = [d for d, (lo, hi) in enumerate(box) if (lo, hi) != (0, shape[d])]
    if not partial:
        return 1, math.prod(shape) * itemsize, torch.zeros(1, dtype=torch.int64)
    k = partial[-1]
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    run_elems = (box[k][1] - box[k][0]) * strides[k]
    offsets = torch.tensor([box[k][0] * strides[k]], dtype=torch.int64)
    for d in reversed(range(k)):
        lo, hi = box[d]
        offsets = (torch.arange(lo, hi, dtype=torch.int64)[:, None] * strides[d] + offsets[None, :]).reshape(-1)
    return offsets.numel(), run_elems * itemsize, offsets * itemsize


def piece_sum(packed: torch.Tensor, box: Box, shape: Sequence[int]) -> int:
    """S of a piece's elements (`packed`: the box in row-major order) at their positions in the whole tensor."""
    num_runs, run_bytes, offsets = _runs(box, shape, packed.element_size())
    raw = packed.contiguous().reshape(-1).view(torch.uint8).view(num_runs, run_bytes)
    return runs_sum(raw, offsets)


def _slices(box: Box, origin: Sequence[int] | None = None) -> tuple[slice, ...]:
    if origin is None:
        return tuple(slice(lo, hi) for lo, hi in box)
    return tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(box, origin))


def _check_sources(plan: RoutingPlan, rank: int, specs: Mapping[str, TensorSpec], held: Mapping[str, tuple[torch.Tensor, Region]]) -> list[str]:
    problems = []
    for p in plan.sent_by(rank):
        if p.name not in held:
            problems.append(f"{p.name}: the plan has rank {rank} send {[list(b) for b in p.box]}, this rank holds nothing of it")
            continue
        t, region = held[p.name]
        hbox = box_of(region, specs[p.name].shape)
        want = tuple(hi - lo for lo, hi in hbox)
        if tuple(t.shape) != want:
            problems.append(f"{p.name}: holds {region} of {list(specs[p.name].shape)}, so a local shape {list(want)}, got {list(t.shape)}")
        elif not all(hlo <= lo and hi <= hhi for (lo, hi), (hlo, hhi) in zip(p.box, hbox)):
            problems.append(f"{p.name}: the plan has rank {rank} send {[list(b) for b in p.box]}, outside what it holds ({region})")
    return problems


def send_routed(
    assignment: Assignment,
    rank: int,
    held: Mapping[str, tuple[torch.Tensor, Region]],
    group: DataPlaneGroup,
) -> RoutedResult:
    """Sends this trainer rank's pieces of a routed round. Call on every trainer rank 0..S-1.

    `held` maps each tensor this rank holds to (its local tensor, the Region of the global
    tensor it is): e.g. (`local_view(t)`, `held_region(t)`) for a DTensor. Pieces are cast to
    the plan's wire dtype. Returns the sum S of each piece sent, by piece index.
    """
    plan = _routing(assignment)
    if not 0 <= rank < plan.num_senders:
        raise ValueError(f"rank {rank}: expected a trainer rank 0..{plan.num_senders - 1}")
    started = time.monotonic()
    specs = _shapes(assignment)
    problems = _check_sources(plan, rank, specs, held)
    open_round_as_sender(group, assignment, f"{len(problems)} piece(s) cannot be sent: " + "; ".join(problems[:10]) if problems else None)
    opened = time.monotonic() - started
    sums: dict[int, int] = {}
    sent = 0

    def pack(k: int) -> list[tuple[tuple[int, ...], int, torch.Tensor]]:
        nonlocal sent
        chains = []
        for route in plan.routes(k, rank):
            buf = torch.empty(route.nbytes, dtype=torch.uint8, device=group.device)
            for p, offset in zip(route.pieces, route.offsets):
                t, region = held[p.name]
                spec = specs[p.name]
                src = t[_slices(p.box, [lo for lo, _ in box_of(region, spec.shape)])].detach()
                packed = buf[offset : offset + p.nbytes].view(torch_dtype(spec.dtype)).view(src.shape)
                packed.copy_(src)
                sums[p.index] = piece_sum(packed, p.box, spec.shape)
                sent += p.nbytes
            chains.append((route.order, route.tag, buf))
        return chains

    # Bucket k is packed while k - 1 relays (queued behind it on each lane), then k - 1 is waited for.
    lanes = ChainLanes(group, lockstep=not plan.streams)
    in_flight: tuple[str, object] | None = None
    try:
        for k in range(plan.num_buckets):
            what = f"routed round bucket {k + 1}/{plan.num_buckets}"
            group.check_abort(what)
            chains = pack(k)
            queued = (what, lanes.submit(chains)) if chains else None
            if in_flight is not None:
                group.wait_future(in_flight[1], in_flight[0])
            in_flight = queued
        if in_flight is not None:
            group.wait_future(in_flight[1], in_flight[0])
    except BaseException as e:
        if not isinstance(e, TransferError):
            group.fail(f"sender rank {rank} stopped: {type(e).__name__}: {e}")
        raise
    finally:
        lanes.close()
    sent_s = time.monotonic() - started
    close_round(group, assignment, [0] * assignment.plan.num_tensors)
    seconds = time.monotonic() - started
    log.info("update %s: rank %d sent %d pieces (%.2f MiB) in %.2f s", assignment.update_id, rank, len(sums), sent / 2**20, seconds)
    return RoutedResult(assignment.update_id, rank, sums, sent, seconds, {"opened": opened, "sent": sent_s, "closed": seconds})


def receive_routed(
    assignment: Assignment,
    rank: int,
    group: DataPlaneGroup,
    destination: Callable[[str], torch.Tensor | None] | None = None,
    *,
    apply_fn: Callable[[list[tuple[str, torch.Tensor]]], None] | None = None,
    local_problem: str | None = None,
) -> RoutedResult:
    """Receives this rank's pieces of a routed round into full-size tensors; returns each piece's S, recomputed.

    `destination(name)`, if given, is the engine's full-size tensor (plan shape and wire dtype, on
    the group's device) to land pieces in; else a staging tensor is allocated per needed tensor
    (`torch.empty`: parts this rank does not need are never written) and returned in `staged`.
    `apply_fn` gets (name, full-size tensor) pairs once every piece of the tensor that this rank
    needs has landed (a tensor cut over several buckets: at its last). On a local
    problem the rank still takes every message, then fails the round on every rank with its reason;
    `local_problem` (e.g. the plan does not fit this engine) refuses the round at the open handshake
    instead, on every rank, before any byte moves. Once a tensor is applied and summed this function
    drops its reference: with a `destination` that hands out fresh staging tensors, staging lasts
    only as long as `apply_fn` keeps them.
    """
    plan = _routing(assignment)
    if rank not in assignment.receiver_ranks:
        raise ValueError(f"rank {rank} is not among the receiver ranks {list(assignment.receiver_ranks)}")
    started = time.monotonic()
    specs = _shapes(assignment)
    dev = group.device
    open_round(group, assignment, local_problem=local_problem)
    opened = time.monotonic() - started
    problem: BaseException | None = None
    landed: dict[str, torch.Tensor] = {}
    staged: dict[str, torch.Tensor] = {}
    sums: dict[int, int] = {}
    received = 0
    mine = plan.received_by(rank)
    # A tensor is handed to apply_fn (and its pieces summed) once its last piece has landed.
    last_bucket = {p.name: p.bucket for p in mine}
    pending: dict[str, list[Piece]] = {}

    lanes = ChainLanes(group, lockstep=not plan.streams)

    def post(k: int):
        routes = plan.routes(k, rank)
        bufs = [torch.empty(r.nbytes, dtype=torch.uint8, device=dev) for r in routes]
        return routes, bufs, (lanes.submit([(r.order, r.tag, b) for r, b in zip(routes, bufs)]) if routes else None)

    try:
        # One bucket relays on the lanes while this thread lands and applies the one before.
        queued = deque(post(k) for k in range(min(2, plan.num_buckets)))
        for k in range(plan.num_buckets):
            what = f"routed round bucket {k + 1}/{plan.num_buckets}"
            routes, bufs, future = queued.popleft()
            if future is not None:
                group.wait_future(future, what)
            if k + 2 < plan.num_buckets:
                queued.append(post(k + 2))
            received += sum(p.nbytes for r in routes for p in r.pieces)
            if problem is not None:
                continue
            try:
                for route, buf in zip(routes, bufs):
                    for p, offset in zip(route.pieces, route.offsets):
                        target = _target(p, specs[p.name], dev, destination, landed, staged)
                        view = target[_slices(p.box)]
                        view.copy_(buf[offset : offset + p.nbytes].view(target.dtype).view(view.shape))
                        pending.setdefault(p.name, []).append(p)
                _finish_tensors(k, specs, landed, pending, last_bucket, apply_fn, sums)
            except Exception as e:
                problem = e
    finally:
        lanes.close()
    if problem is not None:
        close_round(group, assignment, None, local_problem=f"rank {rank}: {type(problem).__name__}: {problem}")
        raise AssertionError("close_round with a local problem raises")
    close_round(group, assignment, [0] * assignment.plan.num_tensors)
    seconds = time.monotonic() - started
    return RoutedResult(assignment.update_id, rank, sums, received, seconds, {"opened": opened, "closed": seconds}, staged)


def _finish_tensors(k, specs, landed: dict, pending: dict, last_bucket: dict, apply_fn, sums: dict[int, int]) -> None:
    """Hands the tensors whose last piece landed in bucket k to `apply_fn`, then sums their pieces and drops them."""
    complete = [n for n in pending if last_bucket[n] == k]
    if apply_fn is not None and complete:
        apply_fn([(n, landed[n]) for n in complete])
    for n in complete:
        # Recomputed from the destination after the apply: proves what the engine holds.
        for p in pending.pop(n):
            sums[p.index] = piece_sum(landed[n][_slices(p.box)], p.box, specs[n].shape)
        del landed[n]


def _target(
    piece: Piece,
    spec: TensorSpec,
    dev: torch.device,
    destination: Callable[[str], torch.Tensor | None] | None,
    landed: dict[str, torch.Tensor],
    staged: dict[str, torch.Tensor],
) -> torch.Tensor:
    t = landed.get(piece.name)
    if t is not None:
        return t
    t = destination(piece.name) if destination is not None else None
    if t is None:
        t = staged[piece.name] = torch.empty(spec.shape, dtype=torch_dtype(spec.dtype), device=dev)
    elif tuple(t.shape) != spec.shape or t.dtype != torch_dtype(spec.dtype) or t.device != dev:
        raise ValueError(
            f"{piece.name}: a routed round lands pieces in a full-size tensor: expected {list(spec.shape)} "
            f"{spec.dtype} on {dev}, got {list(t.shape)} {t.dtype} on {t.device}"
        )
    landed[piece.name] = t
    return t
