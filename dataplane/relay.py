"""A pipelined relay over point-to-point sends on the one gloo group: every byte leaves the trainer once.

gloo's broadcast is a binomial tree over whole messages: the root's link carries ceil(log2 N)
copies, and a rank forwards only after its whole receive (0.30 / 0.17 / 0.11 of the speed of
light at 4 / 8 / 16 hosts, BENCHMARKS.md "Emulated fleet"). Here a message is cut into chunks
and every rank forwards chunk j to the next rank(s) while chunk j+1 arrives, as NCCL's ring
broadcast does:

- chain: 0 -> 1 -> 2 -> ... -> N-1. Every link carries one copy, so a round takes about
  (bytes + (N-2) chunks) / rate, whatever N: the speed of light plus the pipeline's fill.
- tree: a binary tree in rank order (rank i feeds 2i+1 and 2i+2). Depth log2 N instead of
  N-1, but every inner rank's link carries two copies out: half the rate. For links that
  have latency to hide rather than bandwidth to save; measured beside the chain.

Lockstep contract: every rank of one relay computes the same chunking from the message size
and the relay's shape (`chunk_bytes`), posts its receives and sends in the same order, and
relays the same messages in the same order, or ranks deadlock (gloo matches a receive to a
send by peer and tag, first come first served).

Failure handling is the group's, as for `DataPlaneGroup.send/recv/wait_p2p`: the blocking
sends and receives run on the group's worker thread (`DataPlaneGroup.submit`), while the
round's thread waits in `DataPlaneGroup.wait_future`, which watches for peers' abort notices,
aborts requested from outside and the deadline. A rank that dies breaks the connections to its
neighbours in the relay: they fail at once and post the abort notice, which every other rank
reads within ABORT_POLL_INTERVAL_S.

Why by hand: torch.distributed has no pipelined broadcast for gloo (its `broadcast` is gloo's
tree above), and vLLM's weight-transfer engines are NCCL/IPC only.
"""

from __future__ import annotations

import datetime
import queue
import threading
from collections import deque
from collections.abc import Sequence

import torch

from weightsync.core import BucketPlan, TransferError
from weightsync.dataplane.groups import DataPlaneGroup
from weightsync.dataplane.transports import PackedOnly

__all__ = ["RELAY_SHAPES", "Relay", "chunk_bytes", "links", "relay_chains"]

RELAY_SHAPES = ("chain", "tree")
# Chunks: small enough that the pipeline's fill ((hops - 1) chunks) is a sixteenth of a message or
# less, large enough that a chunk's fixed cost (a Python call and a gloo message) stays small
# against its time on the wire; 4 KiB multiples.
_MIN_CHUNK_BYTES = 64 << 10
_MAX_CHUNK_BYTES = 4 << 20
_FILL_SHARE = 16
# Operations kept in flight per peer: enough to keep the link busy between two waits, also when
# a rank is scheduled late (2 cores shared by 8 ranks wake a process tens of ms late).
_WINDOW = 16
_TAG = 0


def links(order: Sequence[int], rank: int, shape: str) -> tuple[int | None, list[int]]:
    """(the rank `rank` receives from, or None for the root; the ranks it forwards to) in a relay over `order`."""
    if shape not in RELAY_SHAPES:
        raise ValueError(f"relay shape {shape!r}: expected one of {list(RELAY_SHAPES)}")
    if rank not in order:
        raise ValueError(f"rank {rank} is not in the relay order {list(order)}")
    i = list(order).index(rank)
    if shape == "chain":
        return (order[i - 1] if i else None), ([order[i + 1]] if i + 1 < len(order) else [])
    return (order[(i - 1) // 2] if i else None), [order[c] for c in (2 * i + 1, 2 * i + 2) if c < len(order)]


def hops(num_ranks: int, shape: str) -> int:
    """Links on the longest path from the root."""
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    return num_ranks - 1 if shape == "chain" else (num_ranks).bit_length() - 1


def chunk_bytes(nbytes: int, num_hops: int) -> int:
    """The chunk size every rank of a relay uses for a message of `nbytes`."""
    want = nbytes // (_FILL_SHARE * max(1, num_hops - 1))
    want = -(-want // 4096) * 4096
    return max(_MIN_CHUNK_BYTES, min(_MAX_CHUNK_BYTES, want))


def relay_bytes(
    group: DataPlaneGroup, view: torch.Tensor, parent: int | None, children: Sequence[int], chunk: int, tag: int = _TAG
) -> None:
    """Blocking, on the group's worker: receives `view` from `parent` (unless the root) chunk by
    chunk, forwarding each chunk to `children` as soon as it is in. `tag`: relays that run at
    the same time between the same two ranks need different tags (gloo matches by peer and tag)."""
    backend = group.backend
    if backend is None or group.is_broken:
        raise TransferError(f"rank {group.rank}: relay on a closed or broken group {group.group_id}")
    # Our own waits end at timeout_s; the round's thread enforces the round deadline before that.
    timeout = datetime.timedelta(seconds=group.timeout_s)
    flat = view.reshape(-1).view(torch.uint8)
    n = flat.numel()
    spans = [(a, min(a + chunk, n)) for a in range(0, n, chunk)]
    recvs: deque = deque()
    sends: deque = deque()
    posted = 0
    while parent is not None and posted < min(_WINDOW, len(spans)):
        a, b = spans[posted]
        recvs.append(backend.recv([flat[a:b]], parent, tag))
        posted += 1
    for a, b in spans:
        if parent is not None:
            recvs.popleft().wait(timeout)
            if posted < len(spans):
                c, d = spans[posted]
                recvs.append(backend.recv([flat[c:d]], parent, tag))
                posted += 1
        for child in children:
            sends.append(backend.send([flat[a:b]], child, tag))
        while len(sends) > _WINDOW * max(1, len(children)):
            sends.popleft().wait(timeout)
    while sends:
        sends.popleft().wait(timeout)


class _RelayBuckets:
    """Either side of a dense round over the relay: bucket k is relayed on the group's worker,
    so that forwarding goes on while this rank packs or applies another bucket."""

    def __init__(self, relay: "Relay", num_buckets: int, verb: str) -> None:
        self._relay = relay
        self._num_buckets = num_buckets
        self._verb = verb

    def start(self, k: int, slot: int, view: torch.Tensor):
        return self._relay.submit(view)

    def finish(self, k: int, handle) -> None:
        self._relay.group.wait_future(handle, f"{self._verb} of bucket {k + 1}/{self._num_buckets}")

    def copied(self, k: int, device: torch.device) -> None:
        pass

    def close(self) -> None:
        pass


class Relay(PackedOnly):
    """The gloo transport that relays (dataplane/transports.py): dense buckets in rank order,
    along a chain or a tree of every rank of the group."""

    device_type = "cpu"
    single_wire = True

    def __init__(self, group: DataPlaneGroup, shape: str) -> None:
        if group.transport != "gloo":
            raise ValueError(f"the relay runs on gloo groups; group {group.group_id} is {group.transport}")
        self.group = group
        self.shape = shape
        self._parent, self._children = links(range(group.world_size), group.rank, shape)
        self._hops = hops(group.world_size, shape)

    def submit(self, view: torch.Tensor):
        chunk = chunk_bytes(view.numel(), self._hops)
        return self.group.submit(lambda: relay_bytes(self.group, view, self._parent, self._children, chunk))

    def outbound(self, ring: list[torch.Tensor], num_buckets: int) -> _RelayBuckets:
        return _RelayBuckets(self, num_buckets, f"{self.shape} relay")

    def inbound(self, plan: BucketPlan) -> _RelayBuckets:
        return _RelayBuckets(self, len(plan.buckets), f"{self.shape} relay receive")


# ---------------------------------------------------------------------- many chains at once


def relay_chains(group: DataPlaneGroup, chains: Sequence[tuple[Sequence[int], int, torch.Tensor]]) -> None:
    """Blocking, on the group's worker: this rank's part in several chain relays at once.

    `chains`: (order, tag, view) per chain this rank is in: `order[0]` sends `view`, every other
    rank of `order` receives it into `view` and forwards it to the next. The chains run
    concurrently, one thread each, so that a rank in several chains (a routed round's bucket:
    one chain per sender and group of receivers) never waits on one chain while another's bytes
    could move; run one after the other, a rank's second chain would wait for its first, and
    with it the senders of every later chain. Lockstep contract: every rank of a chain passes
    the same order, tag and view size. When one chain fails, the group's pending sends and
    receives are cut (`release_blocked_waits`), so the others fail at once instead of at their
    timeout; the first failure is raised.
    """

    def one(order: Sequence[int], tag: int, view: torch.Tensor) -> None:
        parent, children = links(order, group.rank, "chain")
        relay_bytes(group, view, parent, children, chunk_bytes(view.numel(), hops(len(order), "chain")), tag)

    if len(chains) == 1:
        one(*chains[0])
        return
    done: queue.Queue = queue.Queue()

    def run(order: Sequence[int], tag: int, view: torch.Tensor) -> None:
        try:
            one(order, tag, view)
            done.put(None)
        except BaseException as e:  # handed to the worker thread, which raises it
            done.put(e)

    threads = [threading.Thread(target=run, args=c, name=f"relay-{group.rank}-tag{c[1]}", daemon=True) for c in chains]
    for t in threads:
        t.start()
    first: BaseException | None = None
    for _ in threads:
        error = done.get()
        if error is not None and first is None:
            first = error
            group.release_blocked_waits()
    for t in threads:
        t.join()
    if first is not None:
        raise first


# ---------------------------------------------------------------------- messages of any size


def send_message(group: DataPlaneGroup, order: Sequence[int], shape: str, parts: Sequence[torch.Tensor]) -> None:
    """Blocking, on the group's worker, at the root `order[0]`: relays `parts` (uint8 tensors;
    the first a fixed-size header from which receivers learn the others' sizes) to `order[1:]`."""
    _, children = links(order, order[0], shape)
    num_hops = hops(len(order), shape)
    for part in parts:
        relay_bytes(group, part, None, children, chunk_bytes(part.numel(), num_hops))


def relay_message(
    group: DataPlaneGroup, order: Sequence[int], shape: str, header: torch.Tensor, sizes_of
) -> list[torch.Tensor]:
    """Blocking, on the group's worker, at a receiver in `order`: takes a message sent by
    `send_message` and forwards it. `sizes_of(header)` gives the byte sizes of the parts after
    the header (it may raise on a damaged header: nothing after it can be read in step).
    Returns [header, *parts]."""
    parent, children = links(order, group.rank, shape)
    num_hops = hops(len(order), shape)
    relay_bytes(group, header, parent, children, chunk_bytes(header.numel(), num_hops))
    parts = [header]
    for size in sizes_of(header):
        part = torch.empty(size, dtype=torch.uint8, device=header.device)
        relay_bytes(group, part, parent, children, chunk_bytes(size, num_hops))
        parts.append(part)
    return parts
