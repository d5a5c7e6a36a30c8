"""What crosses vLLM's collective_rpc: plain dicts, lists, strings, numbers and bytes.

With vLLM's engine in another process, collective_rpc arguments are serialised
with msgpack: dataclasses and tensors do not survive (tensors arrive as nested
lists). Assignments therefore travel as JSON-able dicts, and tensors as
safetensors bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from weightsync.core import Assignment, Bucket, BucketEntry, BucketPlan, Participant, Rendezvous
from weightsync.core.routing import RoutingPlan

if TYPE_CHECKING:
    import torch

__all__ = ["assignment_from_dict", "assignment_to_dict", "decode_tensors", "encode_tensors"]


def assignment_to_dict(a: Assignment) -> dict[str, Any]:
    r = a.rendezvous
    return {
        "update_id": a.update_id,
        "version": a.version,
        "rendezvous": {
            "transport": r.transport,
            "host": r.host,
            "port": r.port,
            "world_size": r.world_size,
            "group_id": r.group_id,
            "timeout_s": r.timeout_s,
        },
        "participants": [
            {"daemon_id": p.daemon_id, "ranks": list(p.ranks), "encoding": p.encoding} for p in a.participants
        ],
        "delta_base_version": a.delta_base_version,
        "plan": {
            "digest": a.plan.digest,
            "buckets": [
                {
                    "index": b.index,
                    "size_bytes": b.size_bytes,
                    "entries": [[e.name, list(e.shape), e.dtype, e.offset_bytes, e.nbytes] for e in b.entries],
                }
                for b in a.plan.buckets
            ],
        },
        "deadline_s": a.deadline_s,
        # A routed round's plan (core/routing.py), digest-checked again on arrival.
        "routing": None if a.routing is None else {"plan": a.routing.to_dict(), "digest": a.routing.digest},
    }


def assignment_from_dict(d: Mapping[str, Any]) -> Assignment:
    """Rebuilds an Assignment; raises ValueError when a field is missing or the plan digest is wrong."""
    try:
        r = d["rendezvous"]
        buckets = [
            Bucket(
                int(b["index"]),
                int(b["size_bytes"]),
                tuple(
                    BucketEntry(str(name), tuple(int(x) for x in shape), str(dtype), int(offset), int(nbytes))
                    for name, shape, dtype, offset, nbytes in b["entries"]
                ),
            )
            for b in d["plan"]["buckets"]
        ]
        return Assignment(
            update_id=str(d["update_id"]),
            version=int(d["version"]),
            rendezvous=Rendezvous(
                transport=str(r["transport"]),
                host=str(r["host"]),
                port=int(r["port"]),
                world_size=int(r["world_size"]),
                group_id=str(r["group_id"]),
                timeout_s=float(r["timeout_s"]),
            ),
            participants=tuple(
                Participant(str(p["daemon_id"]), tuple(p["ranks"]), str(p.get("encoding", "dense")))
                for p in d["participants"]
            ),
            plan=BucketPlan.from_buckets(buckets, str(d["plan"]["digest"])),
            deadline_s=float(d["deadline_s"]),
            delta_base_version=None if d.get("delta_base_version") is None else int(d["delta_base_version"]),
            routing=_routing_from_dict(d.get("routing")),
        )
    except (KeyError, TypeError) as e:
        raise ValueError(f"malformed assignment dict: {type(e).__name__}: {e}") from e


def _routing_from_dict(d: Mapping[str, Any] | None) -> RoutingPlan | None:
    if d is None:
        return None
    return RoutingPlan.from_dict(d["plan"], str(d["digest"]))


def encode_tensors(tensors: Mapping[str, "torch.Tensor"]) -> bytes:
    """safetensors bytes of CPU copies of the tensors, in the given order."""
    from safetensors.torch import save

    return save({name: t.detach().to("cpu").contiguous() for name, t in tensors.items()})


def decode_tensors(data: bytes) -> dict[str, "torch.Tensor"]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(bytes(data))
    except SafetensorError as e:
        raise ValueError(f"payload of {len(data)} bytes is not a safetensors blob: {e}") from e
