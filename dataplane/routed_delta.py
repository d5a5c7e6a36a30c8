"""Routed delta rounds: every trainer rank encodes the pieces it sends against its own base of what it holds.

A routed round (routed.py) cuts the traffic into pieces, boxes of one tensor, each sent by
the trainer rank that holds it. A routed delta round is the same plan with, per participant,
an encoding (core/plan.py `Assignment.delta_ranks`): the coordinator gives "delta" only to
daemons clean on exactly `delta_base_version`. Each sender keeps the base of its LOCAL
tensors (its shard, wire dtype, as `held`), so nobody gathers anything: per piece it sends,
it encodes the change between the piece's contiguous copy in the base and in the new tensor
(`encode_many`, once per piece however many receivers take it). Positions in a delta are
piece-local (row-major within the box); the receiver applies the delta to the contiguous
copy of the same box of its destination and writes it back, so no index is ever mapped.

On the wire, per bucket and sender, every receiver of a piece from this sender gets ONE frame
(delta_round.py's header, meta, payload) holding the bucket's pieces for it in plan order:
deltas for a delta rank, each piece whole as a dense "delta" for a dense rank, so both kinds
run one code path and this module depends on routed.py's plan and helpers only, not on how
dense routed rounds move their pieces (which may relay). Point to point: a delta frame goes
once per receiver (relaying frames between receivers that need the same piece is not built).

Verification is routed.py's, unchanged: a sender reports the sum S of each NEW piece at its
global positions, a receiver the sum of the same box of its destination after the patch
(and after `apply_fn`), so a receiver whose region did not hold the base ends with another
sum and the coordinator flags that engine (CHECKSUM_MISMATCH), as a bad byte in a dense
routed round would. The whole resulting tensors of every engine are thereby proven, never
just the patch bytes.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping

import torch

from weightsync.core import Assignment, TransferError
from weightsync.core.regions import Region
from weightsync.core.routing import Piece, box_of
from weightsync.dataplane.delta import apply_many, encode_many
from weightsync.dataplane.delta_round import _dense, _frame, _unframe, post_frame, recv_frame
from weightsync.dataplane.groups import DataPlaneGroup
from weightsync.dataplane.handshake import close_round, open_round, open_round_as_sender
from weightsync.dataplane.layout import torch_dtype
from weightsync.dataplane.routed import RoutedResult, _check_sources, _finish_tensors, _routing, _shapes, _slices, _target, piece_sum

__all__ = ["receive_routed_delta", "send_routed_delta"]

log = logging.getLogger(__name__)

# Header (two int64) of every frame a delta rank takes: counted in its wire bytes.
_HEADER_BYTES = 16


def _base_problems(assignment: Assignment, rank: int, held: Mapping[str, tuple[torch.Tensor, Region]], base: Mapping[str, torch.Tensor]) -> list[str]:
    plan = _routing(assignment)
    delta_ranks = set(assignment.delta_ranks)
    specs = _shapes(assignment)
    names = sorted({p.name for p in plan.sent_by(rank) if delta_ranks.intersection(p.receivers) and p.name in held})
    problems = []
    for name in names:
        t, _ = held[name]
        b = base.get(name)
        want = torch_dtype(specs[name].dtype)
        if b is None:
            problems.append(f"{name}: rank {rank} keeps no base of version {assignment.delta_base_version} for what it holds")
        elif tuple(b.shape) != tuple(t.shape) or b.dtype != want:
            problems.append(f"{name}: the base is {list(b.shape)} {b.dtype}, this rank holds {list(t.shape)} sent as {want}")
    return problems


def send_routed_delta(
    assignment: Assignment,
    rank: int,
    held: Mapping[str, tuple[torch.Tensor, Region]],
    base: Mapping[str, torch.Tensor],
    group: DataPlaneGroup,
) -> RoutedResult:
    """Sends this trainer rank's pieces of a routed delta round: deltas to the delta ranks, dense frames to the others.

    `held` is `send_routed`'s (name -> (local tensor, Region of the global tensor)); `base`
    maps the same names to this rank's local tensors of `assignment.delta_base_version`, in
    the wire dtype (any device). Call on every trainer rank 0..S-1. Returns the sum S of each
    NEW piece sent (the verdict compares every receiver's resulting region with it) and the
    bytes this rank put on the wire, deltas and dense pieces alike.
    """
    plan = _routing(assignment)
    if assignment.delta_base_version is None:
        raise ValueError(f"update {assignment.update_id} is a dense routed round: use send_routed")
    if not 0 <= rank < plan.num_senders:
        raise ValueError(f"rank {rank}: expected a trainer rank 0..{plan.num_senders - 1}")
    started = time.monotonic()
    specs = _shapes(assignment)
    problems = _check_sources(plan, rank, specs, held)
    problems += _base_problems(assignment, rank, held, base) if not problems else []
    open_round_as_sender(group, assignment, f"{len(problems)} piece(s) cannot be sent: " + "; ".join(problems[:10]) if problems else None)
    opened = time.monotonic() - started
    dev = group.device
    delta_ranks = set(assignment.delta_ranks)
    sums: dict[int, int] = {}
    sent = {"delta": 0, "dense": 0}
    try:
        for k in range(plan.num_buckets):
            # The same words as send_routed's: fault injection and logs find a routed bucket either way.
            what = f"routed round bucket {k + 1}/{plan.num_buckets} (delta against version {assignment.delta_base_version})"
            group.check_abort(what)
            pieces = plan.sent_by(rank, k)
            news, bases = [], []
            for p in pieces:
                t, region = held[p.name]
                spec = specs[p.name]
                cut = _slices(p.box, [lo for lo, _ in box_of(region, spec.shape)])
                new = t[cut].detach().to(device=dev, dtype=torch_dtype(spec.dtype)).contiguous()
                sums[p.index] = piece_sum(new, p.box, spec.shape)
                news.append(new)
                bases.append(base[p.name][cut].to(dev).contiguous() if delta_ranks.intersection(p.receivers) else None)
            encoded = [i for i, b in enumerate(bases) if b is not None]
            deltas = dict(zip(encoded, encode_many([bases[i] for i in encoded], [news[i] for i in encoded])))
            works, frames = [], []
            for r in sorted({r for p in pieces for r in p.receivers}):
                mine = [i for i, p in enumerate(pieces) if r in p.receivers]
                kind = "delta" if r in delta_ranks else "dense"
                frame = _frame([pieces[i].name for i in mine], [deltas[i] if kind == "delta" else _dense(news[i]) for i in mine], dev)
                frames.append(frame)  # alive until its sends complete
                works.extend(post_frame(group, frame, r, what))
                sent[kind] += sum(x.numel() * x.element_size() for x in frame)
            for w in works:
                group.wait_p2p(w, what)
    except BaseException as e:
        if not isinstance(e, TransferError):
            group.fail(f"sender rank {rank} stopped: {type(e).__name__}: {e}")
        raise
    sent_s = time.monotonic() - started
    close_round(group, assignment, [0] * assignment.plan.num_tensors)
    seconds = time.monotonic() - started
    log.info(
        "update %s: rank %d sent %d pieces against version %d: %.3f MiB of deltas, %.3f MiB dense in %.2f s",
        assignment.update_id, rank, len(sums), assignment.delta_base_version, sent["delta"] / 2**20, sent["dense"] / 2**20, seconds,
    )
    return RoutedResult(
        assignment.update_id, rank, sums, sent["delta"] + sent["dense"], seconds, {"opened": opened, "sent": sent_s, "closed": seconds}
    )


def receive_routed_delta(
    assignment: Assignment,
    rank: int,
    group: DataPlaneGroup,
    destination: Callable[[str], torch.Tensor | None],
    *,
    apply_fn: Callable[[list[tuple[str, torch.Tensor]]], None] | None = None,
    local_problem: str | None = None,
) -> RoutedResult:
    """Patches this rank's pieces of a routed delta round into `destination(name)` in place (every receiver rank).

    `destination(name)` must be the engine's full-size tensor (plan shape and wire dtype, on
    the group's device); on a delta rank its needed region must hold exactly the base
    version, a dense rank's is overwritten. Returns each piece's S recomputed from the
    destination after the patch and `apply_fn`, and the bytes that arrived (frames).
    On a local problem the rank still takes every frame, then fails the round on every rank.
    """
    plan = _routing(assignment)
    if assignment.delta_base_version is None:
        raise ValueError(f"update {assignment.update_id} is a dense routed round: use receive_routed")
    if rank not in assignment.receiver_ranks:
        raise ValueError(f"rank {rank} is not among the receiver ranks {list(assignment.receiver_ranks)}")
    started = time.monotonic()
    specs = _shapes(assignment)
    dev = group.device
    open_round(group, assignment, local_problem=local_problem)
    opened = time.monotonic() - started
    problem: BaseException | None = None
    landed: dict[str, torch.Tensor] = {}
    sums: dict[int, int] = {}
    received = 0
    last_bucket = {p.name: p.bucket for p in plan.received_by(rank)}
    pending: dict[str, list[Piece]] = {}
    for k in range(plan.num_buckets):
        what = f"routed round bucket {k + 1}/{plan.num_buckets} (delta against version {assignment.delta_base_version})"
        pieces = plan.received_by(rank, k)
        # Senders frame in plan order; each sent its frame before waiting, so one at a time is safe.
        frames = {s: recv_frame(group, s, rank, what) for s in sorted({p.sender for p in pieces})}
        received += sum(_HEADER_BYTES + m.numel() + pl.numel() for m, pl in frames.values())
        if problem is not None:
            continue
        try:
            for s, (meta_t, payload) in frames.items():
                _patch(specs, dev, destination, landed, [p for p in pieces if p.sender == s], meta_t, payload)
            for p in pieces:
                pending.setdefault(p.name, []).append(p)
            _finish_tensors(k, specs, landed, pending, last_bucket, apply_fn, sums)
        except Exception as e:
            problem = e
    if problem is not None:
        close_round(group, assignment, None, local_problem=f"rank {rank}: {type(problem).__name__}: {problem}")
        raise AssertionError("close_round with a local problem raises")
    close_round(group, assignment, [0] * assignment.plan.num_tensors)
    seconds = time.monotonic() - started
    return RoutedResult(assignment.update_id, rank, sums, received, seconds, {"opened": opened, "closed": seconds})


def _patch(specs, dev, destination, landed: dict[str, torch.Tensor], pieces: list[Piece], meta_t: torch.Tensor, payload: torch.Tensor) -> None:
    """Applies one sender's frame: each piece's delta (or dense values) to the contiguous copy of its box, written back."""
    staged: dict[str, torch.Tensor] = {}
    views, regions = [], []
    for p in pieces:
        target = _target(p, specs[p.name], dev, destination, landed, staged)
        if staged:
            raise ValueError(f"{p.name}: a routed delta round patches the engine's own tensor; the destination gave none")
        view = target[_slices(p.box)]
        views.append(view)
        regions.append(view if view.is_contiguous() else view.contiguous())
    deltas = _unframe(json.loads(bytes(meta_t.cpu().numpy())), payload, pieces, regions)
    apply_many(regions, deltas)
    for view, region in zip(views, regions):
        if region is not view:
            view.copy_(region)
