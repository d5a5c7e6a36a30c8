"""Protobuf <-> domain dataclass conversion, used only at the servicer/client boundary."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from weightsync.core import Assignment, Bucket, BucketEntry, BucketPlan, Participant, Rendezvous, TensorSpec
from weightsync.core.rank_regions import RankRegions
from weightsync.core.regions import Region
from weightsync.core.routing import RoutingPlan
from weightsync.v1 import weightsync_pb2 as pb

__all__ = [
    "assignment_from_pb",
    "assignment_to_pb",
    "checksums_from_pb",
    "checksums_to_pb",
    "holds_from_pb",
    "holds_to_pb",
    "piece_sums_from_pb",
    "piece_sums_to_pb",
    "rank_regions_from_pb",
    "rank_regions_to_pb",
    "spec_from_pb",
    "spec_to_pb",
]


def spec_to_pb(spec: TensorSpec) -> pb.TensorSpec:
    return pb.TensorSpec(name=spec.name, shape=list(spec.shape), dtype=spec.dtype)


def spec_from_pb(msg: pb.TensorSpec) -> TensorSpec:
    """Raises ValueError naming the tensor when the spec is malformed."""
    return TensorSpec(msg.name, tuple(msg.shape), msg.dtype)


def rank_regions_to_pb(r: RankRegions) -> pb.RankRegions:
    return pb.RankRegions(
        rank=r.rank,
        regions=[
            pb.TensorRegion(name=n, region=pb.Region(dim=g.dim, start=g.start, length=g.length)) for n, g in r.regions.items()
        ],
        whole_fallbacks=r.whole_fallbacks,
    )


def rank_regions_from_pb(msg: pb.RankRegions, what: str) -> RankRegions:
    """Raises ValueError naming `what` (e.g. "needs[1]") and the tensor: a name twice, or a bad count.

    Whether each region fits its tensor is the caller's check (it needs the inventory).
    """
    regions: dict[str, Region] = {}
    for i, tr in enumerate(msg.regions):
        if tr.name in regions:
            raise ValueError(f"{what}.regions[{i}]: tensor {tr.name!r} appears twice: expected one region per tensor")
        regions[tr.name] = Region(tr.region.dim, tr.region.start, tr.region.length)
    try:
        return RankRegions(msg.rank, regions, msg.whole_fallbacks)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from e


def checksums_to_pb(checksums: Mapping[str, int]) -> list[pb.TensorChecksum]:
    return [pb.TensorChecksum(name=n, checksum=c) for n, c in checksums.items()]


def checksums_from_pb(msgs: Iterable[pb.TensorChecksum]) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in msgs:
        if m.name in out:
            raise ValueError(f"checksum for tensor {m.name!r} appears twice")
        out[m.name] = m.checksum
    return out


def piece_sums_to_pb(sums: Mapping[tuple[int, int], int]) -> list[pb.PieceChecksum]:
    """(rank, piece index) -> S as messages."""
    return [pb.PieceChecksum(rank=r, piece=i, sum=s & ((1 << 64) - 1)) for (r, i), s in sums.items()]


def piece_sums_from_pb(msgs: Iterable[pb.PieceChecksum]) -> dict[tuple[int, int], int]:
    out: dict[tuple[int, int], int] = {}
    for m in msgs:
        if (m.rank, m.piece) in out:
            raise ValueError(f"the sum of piece {m.piece} at rank {m.rank} appears twice")
        out[(m.rank, m.piece)] = m.sum
    return out


def holds_to_pb(regions: Mapping[int, Mapping[str, Region]]) -> list[pb.RankRegions]:
    """A trainer's holds (rank -> tensor name -> Region) as BeginUpdateRequest.holds."""
    return [
        pb.RankRegions(
            rank=r,
            regions=[pb.TensorRegion(name=n, region=pb.Region(dim=g.dim, start=g.start, length=g.length)) for n, g in per.items()],
        )
        for r, per in sorted(regions.items())
    ]


def holds_from_pb(msgs: Iterable[pb.RankRegions], what: str) -> dict[int, dict[str, Region]]:
    """BeginUpdateRequest.holds: per rank, tensor name -> Region; ValueError naming the field on duplicates (regions are checked against shapes later)."""
    out: dict[int, dict[str, Region]] = {}
    for i, m in enumerate(msgs):
        if m.rank in out:
            raise ValueError(f"{what}[{i}]: rank {m.rank} appears twice")
        per: dict[str, Region] = {}
        for j, tr in enumerate(m.regions):
            if tr.name in per:
                raise ValueError(f"{what}[{i}].regions[{j}]: tensor {tr.name!r} appears twice for rank {m.rank}")
            region = Region(tr.region.dim, tr.region.start, tr.region.length) if tr.HasField("region") else Region.whole()
            per[tr.name] = region
        out[m.rank] = per
    return out


def _routing_to_pb(plan: RoutingPlan) -> pb.RoutingPlan:
    return pb.RoutingPlan(
        num_senders=plan.num_senders,
        num_buckets=plan.num_buckets,
        pieces=[
            pb.RoutedPiece(
                name=p.name, box=[x for b in p.box for x in b], sender=p.sender, receivers=list(p.receivers),
                bucket=p.bucket, nbytes=p.nbytes,
            )
            for p in plan.pieces
        ],
        digest=plan.digest,
    )


def _routing_from_pb(msg: pb.RoutingPlan) -> RoutingPlan:
    pieces = []
    for p in msg.pieces:
        if len(p.box) % 2:
            raise ValueError(f"routing plan: piece of {p.name!r} has a box of {len(p.box)} numbers: expected start, stop per dim")
        box = [[p.box[k], p.box[k + 1]] for k in range(0, len(p.box), 2)]
        pieces.append(
            {"name": p.name, "box": box, "sender": p.sender, "receivers": list(p.receivers), "bucket": p.bucket, "nbytes": p.nbytes}
        )
    d = {"num_senders": msg.num_senders, "num_buckets": msg.num_buckets, "pieces": pieces}
    return RoutingPlan.from_dict(d, msg.digest or None)


def _plan_to_pb(plan: BucketPlan) -> pb.BucketPlan:
    return pb.BucketPlan(
        buckets=[
            pb.Bucket(
                index=b.index,
                size_bytes=b.size_bytes,
                entries=[
                    pb.BucketEntry(name=e.name, shape=list(e.shape), dtype=e.dtype, offset_bytes=e.offset_bytes, nbytes=e.nbytes)
                    for e in b.entries
                ],
            )
            for b in plan.buckets
        ],
        total_bytes=plan.total_bytes,
        digest=plan.digest,
    )


def _plan_from_pb(msg: pb.BucketPlan) -> BucketPlan:
    buckets = [
        Bucket(
            b.index,
            b.size_bytes,
            tuple(BucketEntry(e.name, tuple(e.shape), e.dtype, e.offset_bytes, e.nbytes) for e in b.entries),
        )
        for b in msg.buckets
    ]
    return BucketPlan.from_buckets(buckets, msg.digest or None)


def assignment_to_pb(a: Assignment) -> pb.Assignment:
    r = a.rendezvous
    return pb.Assignment(
        update_id=a.update_id,
        version=a.version,
        rendezvous=pb.Rendezvous(
            transport=r.transport, host=r.host, port=r.port, world_size=r.world_size, group_id=r.group_id, timeout_s=r.timeout_s
        ),
        participants=[pb.Participant(daemon_id=p.daemon_id, ranks=list(p.ranks), encoding=p.encoding) for p in a.participants],
        plan=_plan_to_pb(a.plan),
        deadline_s=a.deadline_s,
        delta_base_version=a.delta_base_version,
        routing=_routing_to_pb(a.routing) if a.routing is not None else None,
    )


def assignment_from_pb(msg: pb.Assignment) -> Assignment:
    r = msg.rendezvous
    return Assignment(
        update_id=msg.update_id,
        version=msg.version,
        rendezvous=Rendezvous(r.transport, r.host, r.port, r.world_size, r.group_id, r.timeout_s),
        participants=tuple(Participant(p.daemon_id, tuple(p.ranks), p.encoding or "dense") for p in msg.participants),
        plan=_plan_from_pb(msg.plan),
        deadline_s=msg.deadline_s,
        delta_base_version=msg.delta_base_version if msg.HasField("delta_base_version") else None,
        routing=_routing_from_pb(msg.routing) if msg.HasField("routing") else None,
    )
