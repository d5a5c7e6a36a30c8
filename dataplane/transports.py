"""How a round's buckets travel: one class per transport, behind one small protocol.

A transport moves the bytes of plan buckets from data-plane rank 0 to every receiver; the
sender and receiver (sender.py, receiver.py) pack, checksum and hand over, and never ask
which transport they run on. Three kinds:

- `Broadcast`: a collective broadcast per bucket (NCCL, whose rings relay already; or gloo's
  own binomial tree, which does not).
- `relay.Relay`: point-to-point sends along a pipelined chain or tree on the one gloo group,
  so that a bucket leaves the trainer once (dataplane/relay.py).
- `cuda_ipc.Ipc`: same-GPU receivers read the sender's memory; its direct mode sends nothing
  at all when the trainer's tensors already are the wire bytes.

Each transport object belongs to one DataPlaneGroup (`transport_for`) and keeps what it needs
across that group's rounds; it is dropped with the group.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch

from weightsync.core import BucketPlan
from weightsync.dataplane.groups import DataPlaneGroup

__all__ = ["Broadcast", "Inbound", "Outbound", "PackedOnly", "Transport", "transport_for"]


class Outbound(Protocol):
    """The sender's side of one round: bucket k leaves from `view` (a ring slot or the tensor itself)."""

    def start(self, k: int, slot: int, view: torch.Tensor) -> object:
        """Starts sending bucket k; returns a handle for `finish`."""
        ...

    def finish(self, k: int, handle: object) -> None:
        """Returns once bucket k's bytes have left `view` (its slot may be refilled)."""
        ...

    def close(self) -> None: ...


class Inbound(Protocol):
    """A receiver's side of one round."""

    def start(self, k: int, slot: int, view: torch.Tensor) -> object:
        """Starts receiving bucket k into `view`; returns a handle for `finish`."""
        ...

    def finish(self, k: int, handle: object) -> list[torch.Tensor] | None:
        """Returns once bucket k has arrived: None if its bytes are in the view given to `start`,
        else each entry's bytes where they lie (the sender's memory, for CUDA IPC)."""
        ...

    def copied(self, k: int, device: torch.device) -> None:
        """Bucket k's bytes have been taken (queued on the current stream)."""
        ...

    def close(self) -> None: ...


class Transport(Protocol):
    """One group's way of moving buckets; owns whatever it keeps across that group's rounds."""

    # Where the ring buffers live: "cpu" (gloo) or "cuda" (NCCL, CUDA IPC).
    device_type: str
    # A one-tensor bucket travels as that tensor's bytes alone (no packing copy), and a
    # receiver may take it straight into its own tensor.
    single_wire: bool

    def outbound(self, ring: list[torch.Tensor], num_buckets: int) -> Outbound: ...

    def inbound(self, plan: BucketPlan) -> Inbound: ...

    def direct_sources(self, plan: BucketPlan, source: Mapping[str, object], device: torch.device):
        """Sender: the tensors to send unpacked (and their queued checksums), or None to pack."""
        ...

    def direct_out(self, sources: list[torch.Tensor]):
        """Sender: publishes the unpacked tensors for this round; None if they cannot be (then pack)."""
        ...


class PackedOnly:
    """For transports that always send packed buckets over a wire."""

    def direct_sources(self, plan: BucketPlan, source: Mapping[str, object], device: torch.device) -> None:
        return None

    def direct_out(self, sources: list[torch.Tensor]) -> None:
        raise AssertionError("direct_out without direct_sources")


class _BroadcastOut:
    def __init__(self, group: DataPlaneGroup, num_buckets: int) -> None:
        self._group = group
        self._num_buckets = num_buckets

    def start(self, k: int, slot: int, view: torch.Tensor):
        return self._group.broadcast(view, f"broadcast of bucket {k + 1}/{self._num_buckets}")

    def finish(self, k: int, handle) -> None:
        self._group.wait(handle, f"broadcast of bucket {k + 1}/{self._num_buckets}")

    def close(self) -> None:
        pass


class BroadcastIn:
    def __init__(self, group: DataPlaneGroup, num_buckets: int) -> None:
        self._group = group
        self._num_buckets = num_buckets

    def start(self, k: int, slot: int, view: torch.Tensor):
        return self._group.broadcast(view, f"receive of bucket {k + 1}/{self._num_buckets}")

    def finish(self, k: int, handle) -> None:
        self._group.wait(handle, f"receive of bucket {k + 1}/{self._num_buckets}")

    def copied(self, k: int, device: torch.device) -> None:
        pass

    def close(self) -> None:
        pass


class Broadcast(PackedOnly):
    """Buckets leave by one collective broadcast each from rank 0 (gloo or NCCL)."""

    single_wire = True

    def __init__(self, group: DataPlaneGroup) -> None:
        self._group = group
        self.device_type = "cpu" if group.transport == "gloo" else "cuda"

    def outbound(self, ring: list[torch.Tensor], num_buckets: int) -> _BroadcastOut:
        return _BroadcastOut(self._group, num_buckets)

    def inbound(self, plan: BucketPlan) -> BroadcastIn:
        return BroadcastIn(self._group, len(plan.buckets))


def transport_for(group: DataPlaneGroup) -> Transport:
    """The group's transport, built on first use and kept while the group lives."""
    if group.channel is None:
        if group.transport == "cuda_ipc":
            from weightsync.dataplane.cuda_ipc import Ipc

            group.channel = Ipc(group)
        elif group.relay in ("chain", "tree"):
            from weightsync.dataplane.relay import Relay

            group.channel = Relay(group, group.relay)
        else:
            group.channel = Broadcast(group)
    return group.channel
