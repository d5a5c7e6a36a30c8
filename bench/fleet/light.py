"""The speed of light of a round: the fastest any design could move it through the links, ignoring CPU.

    speed_of_light_s = max(busiest receiver's needed bytes / its ingress rate,
                           bytes the senders must emit / their total egress rate)

"Bytes the senders must emit" is the design's minimum: every needed byte leaves the senders
once (one copy of what is needed; receivers relay the rest, as NCCL's pipelined ring does).
That is the honest bound to compare designs against, and the ratio is taken to it.

Three more figures say what today's data path can reach:
- `star_bound_s`: a root sending one copy per receiver (receivers x bytes / its egress).
- `gloo_bound_s`: gloo's actual broadcast (gloo/broadcast.cc) is a binomial tree over whole
  messages, in which the root sends ceil(log2 N) copies: its link alone needs that many
  message times, however the sends are scheduled.
- `gloo_model_s`: the same tree as gloo runs it: the root posts all its sends at once (they
  share its link), and every other rank forwards only after its own receive completed, posting
  its sends at once. With equal links and fair sharing the last rank has its copy after
  dim*(dim+1)/2 message times (4 ranks: 3, 8: 6, 16: 10). A prediction, not a bound: TCP
  need not share fairly, and a rank served first starts relaying sooner.

Needed bytes come from the bucket plan the coordinator computes (core/plan.py): today every
receiver rank needs every bucket, TP ranks included, because the data path sends whole tensors.

A delta round (`delta_round_bound`) needs only the delta payload: each delta receiver's needed
bytes are what it must take in (positions and values of the changed elements, per tensor).
The speed of light is the same formula over those bytes. Without a relay the payload goes point
to point from the root to every receiver (dataplane/delta_round.py with --relay gloo), a star,
so for a delta round `gloo_bound_s` and `gloo_model_s` are the star: N copies through the root's
link; with a relay (dataplane/relay.py, the default between hosts) it leaves the root once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from weightsync.core import BucketPlan, TensorSpec

__all__ = ["RoundBound", "delta_round_bound", "gloo_broadcast_model_s", "gloo_broadcast_tree", "plan_bytes", "round_bound"]


def plan_bytes(manifest: Sequence[TensorSpec], bucket_size_bytes: int) -> int:
    """Bytes one receiver needs in a full round: the plan's buckets, alignment padding included (it travels)."""
    return BucketPlan.build(manifest, bucket_size_bytes).total_bytes


def _bytes_per_s(mbit: float) -> float:
    return mbit * 1e6 / 8


@dataclass(frozen=True, slots=True)
class RoundBound:
    """The bounds of one round, in seconds, and which one binds."""

    receiver_bound_s: float
    sender_bound_s: float
    star_bound_s: float
    gloo_bound_s: float
    gloo_model_s: float

    @property
    def speed_of_light_s(self) -> float:
        return max(self.receiver_bound_s, self.sender_bound_s)

    def to_dict(self) -> dict[str, float]:
        return {
            "speed_of_light_s": self.speed_of_light_s,
            "receiver_bound_s": self.receiver_bound_s,
            "sender_bound_s": self.sender_bound_s,
            "star_bound_s": self.star_bound_s,
            "gloo_bound_s": self.gloo_bound_s,
            "gloo_model_s": self.gloo_model_s,
        }


def round_bound(
    *,
    needed_bytes: Mapping[str, int],
    ingress_mbit: Mapping[str, float],
    sender_egress_mbit: Sequence[float],
) -> RoundBound:
    """Bounds for receivers needing `needed_bytes` each (by host), fed by senders with these egress rates.

    The senders must emit every distinct needed byte once: the largest need (today every
    receiver needs the same bytes, so the union is any one of them).
    """
    if not needed_bytes:
        raise ValueError("needed_bytes: expected at least one receiver, got none")
    if not sender_egress_mbit:
        raise ValueError("sender_egress_mbit: expected at least one sender, got none")
    missing = sorted(set(needed_bytes) - set(ingress_mbit))
    if missing:
        raise ValueError(f"ingress_mbit: no rate for receivers {missing}")
    receiver_bound_s = max(n / _bytes_per_s(ingress_mbit[h]) for h, n in needed_bytes.items())
    emit_bytes = max(needed_bytes.values())
    total_egress = sum(_bytes_per_s(r) for r in sender_egress_mbit)
    sender_bound_s = emit_bytes / total_egress
    star_bound_s = sum(needed_bytes.values()) / _bytes_per_s(sender_egress_mbit[0])
    # gloo's tree runs over every link; with unequal links the slowest one is the honest rate here.
    slowest_mbit = min([*sender_egress_mbit, *(ingress_mbit[h] for h in needed_bytes)])
    num_ranks = len(needed_bytes) + 1
    root_copies = len(gloo_broadcast_tree(num_ranks)[0])
    gloo_bound_s = root_copies * emit_bytes / _bytes_per_s(sender_egress_mbit[0])
    gloo_model_s = gloo_broadcast_model_s(num_ranks, emit_bytes, slowest_mbit)
    return RoundBound(receiver_bound_s, sender_bound_s, star_bound_s, gloo_bound_s, gloo_model_s)


def delta_round_bound(
    *,
    payload_bytes: Mapping[str, int],
    ingress_mbit: Mapping[str, float],
    sender_egress_mbit: Sequence[float],
) -> RoundBound:
    """Bounds of a delta round whose receivers need `payload_bytes` each (by host).

    The speed of light is `round_bound`'s over the payload. The root sends every receiver its
    payload point to point (no broadcast tree), so today's path is bound by the star.
    """
    b = round_bound(needed_bytes=payload_bytes, ingress_mbit=ingress_mbit, sender_egress_mbit=sender_egress_mbit)
    return RoundBound(b.receiver_bound_s, b.sender_bound_s, b.star_bound_s, b.star_bound_s, b.star_bound_s)


def gloo_broadcast_tree(num_ranks: int) -> dict[int, list[int]]:
    """Each rank's send targets in gloo's broadcast from root 0, replaying gloo/broadcast.cc's loop."""
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    dim = max(0, (num_ranks - 1).bit_length())  # log2ceil
    sends: dict[int, list[int]] = {v: [] for v in range(num_ranks)}
    for v in range(num_ranks):
        mask = (1 << dim) - 1
        for i in range(dim):
            mask ^= 1 << i
            if v & mask:
                continue
            peer = v ^ (1 << i)
            if peer < num_ranks and not v & (1 << i):
                sends[v].append(peer)
    return sends


def gloo_broadcast_model_s(num_ranks: int, nbytes: int, link_mbit: float) -> float:
    """When the last rank has its copy in gloo's binomial broadcast over equal links, a sender's sends sharing its link fairly."""
    sends = gloo_broadcast_tree(num_ranks)
    copy_s = nbytes / _bytes_per_s(link_mbit)
    done = {0: 0.0}
    order = [0]
    for v in order:
        for child in sends[v]:
            done[child] = done[v] + len(sends[v]) * copy_s
            order.append(child)
    return max(done.values())
