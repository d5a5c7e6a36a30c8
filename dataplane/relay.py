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

import concurrent.futures
import datetime
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence

import torch

from weightsync.core import BucketPlan, TransferError
from weightsync.dataplane.groups import DataPlaneGroup
from weightsync.dataplane.transports import PackedOnly

__all__ = ["RELAY_SHAPES", "ChainLanes", "Relay", "chunk_bytes", "links", "relay_chain"]

RELAY_SHAPES = ("chain", "tree")
# Chunks: small enough that the pipeline's fill ((hops - 1) chunks) is a sixteenth of a message or
# less, large enough that a chunk's fixed cost (a Python call and a gloo message) stays small
# against its time on the wire; 4 KiB multiples.
_MIN_CHUNK_BYTES = 64 << 10
# The floor of a streaming lane's chunks (ChainLanes): a routed round's per-sender routes of a small
# model are small messages, and at 64 KiB a 512 KiB route over 8 receivers filled for 7/8 of itself;
# a rank that is one sender's tail waits that long while it heads the other sender's chain
# (S = 2, M = 8, T = 1: 0.76 of the speed of light, 0.87 at 16 KiB). In lockstep (many senders)
# the other chains hide the fill and 16 KiB only adds messages (S = 8: 0.80 against 0.90 at
# 64 KiB). A 16 KiB chunk is 5 ms at 25 Mbit/s, 13 us at 10 Gbit/s, where real buckets' chunks
# are far above either floor. BENCHMARKS.md "Lanes".
_STREAM_MIN_CHUNK_BYTES = 16 << 10
_MAX_CHUNK_BYTES = 4 << 20
_FILL_SHARE = 16
# Operations kept in flight per peer: enough to keep the link busy between two waits, also when
# a rank is scheduled late (2 cores shared by 8 ranks wake a process tens of ms late).
_WINDOW = 16
_TAG = 0
# How long ChainLanes.close waits for its lanes' threads; idle ones end in microseconds, failed
# ones once their group's pairs are cut (milliseconds). After a failure the wait is shorter: a
# lane sending to a peer that stopped reading is not ended by the cut (groups.py `_NativeCalls`)
# and would hold the round's end for the whole bound; exit accounts for it (`blocking_call`).
_CLOSE_JOIN_S = 5.0
_CLOSE_JOIN_FAILED_S = 1.0


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


def chunk_bytes(nbytes: int, num_hops: int, min_chunk: int = _MIN_CHUNK_BYTES) -> int:
    """The chunk size every rank of a relay uses for a message of `nbytes`."""
    want = nbytes // (_FILL_SHARE * max(1, num_hops - 1))
    want = -(-want // 4096) * 4096
    return max(min_chunk, min(_MAX_CHUNK_BYTES, want))


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


def relay_chain(
    group: DataPlaneGroup, order: Sequence[int], tag: int, view: torch.Tensor, min_chunk: int = _MIN_CHUNK_BYTES
) -> None:
    """Blocking: this rank's part in one chain relay: `order[0]` sends `view`, every other rank of
    `order` receives it into `view` and forwards it to the next (every rank with the same `min_chunk`)."""
    parent, children = links(order, group.rank, "chain")
    relay_bytes(group, view, parent, children, chunk_bytes(view.numel(), hops(len(order), "chain"), min_chunk), tag)


class _Countdown:
    """The future of one submit: done when its last chain is, failed with the first error."""

    def __init__(self, n: int) -> None:
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        # Set once the future is: what a lockstep lane waits on before the next unit.
        self.finished = threading.Event()
        self._left = n
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        if n == 0:
            self.future.set_result(None)
            self.finished.set()

    def done(self, error: BaseException | None) -> None:
        with self._lock:
            self._left -= 1
            if error is not None and self._error is None:
                self._error = error
            if self._left:
                return
        if self._error is None:
            self.future.set_result(None)
        else:
            self.future.set_exception(self._error)
        self.finished.set()


class ChainLanes:
    """This rank's part in a routed round's chains: one lane (a thread) per tag, each running
    the chains submitted to it in order, independently of the other lanes.

    A routed round's bucket has one chain per (sender, set of receivers), and every rank of such
    a chain forwards while it receives. Run a bucket's chains as one unit (all of bucket k, then
    all of bucket k+1), a rank would start a sender's chain of k+1 only once every chain of k
    ended there: every bucket then pays each chain's pipeline fill again, and while the last
    chain of k drains, the others' links idle (measured: S = 2 senders, T = 1, M = 4 and 8
    engines on the emulated fleet stood at 0.67-0.71 of the speed of light, BENCHMARKS.md).
    In a lane, a chain of bucket k+1 starts on this rank as soon as this rank's part in the
    same lane's chain of k is done, so each lane streams across buckets as one long chain.

    `lockstep=True` keeps the one-unit rule all the same (a lane starts its chain of a submit
    only once every chain of the submit before has ended on this rank), for rounds where many
    chains share each rank: there the others hide one chain's refill, and a lane that runs a
    bucket ahead takes link share from the bucket every lane's consumer waits for (measured,
    S = 4 and 8: streaming 0.79-0.84 of the speed of light, lockstep 0.89-0.90;
    core/routing.py `RoutingPlan.streams` picks).

    Lockstep contract: a lane is one tag; every rank of its chains submits them in the same
    order (bucket order) with the same order of ranks and view size, and no two lanes share a
    tag (core/routing.py gives each (sender, receivers) its own tag for the whole plan). Lanes
    may then be at different buckets without ever meeting another's messages between the same
    two ranks (gloo matches a receive by peer and tag, first come first served).

    Failure: the first chain to fail cuts the group's pending sends and receives
    (`release_blocked_waits`), so every other lane fails at once instead of at its timeout, and
    fails every chain still queued without running it. Call `close()` when the round ends.
    """

    def __init__(self, group: DataPlaneGroup, *, lockstep: bool = False) -> None:
        self._group = group
        self._lockstep = lockstep
        self._min_chunk = _MIN_CHUNK_BYTES if lockstep else _STREAM_MIN_CHUNK_BYTES
        self._last: _Countdown | None = None
        self._queues: dict[int, queue.SimpleQueue] = {}
        self._threads: list[threading.Thread] = []
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    def submit(self, chains: Sequence[tuple[Sequence[int], int, torch.Tensor]]) -> concurrent.futures.Future:
        """Queues each (order, tag, view) on the lane of its tag; the future is done when all are."""
        countdown = _Countdown(len(chains))
        after = self._last if self._lockstep else None
        if chains:
            self._last = countdown
        for order, tag, view in chains:
            lane = self._queues.get(tag)
            if lane is None:
                lane = self._queues[tag] = queue.SimpleQueue()
                t = threading.Thread(target=self._run, args=(lane,), name=f"relay-{self._group.rank}-lane{tag}", daemon=True)
                self._threads.append(t)
                t.start()
            lane.put((order, tag, view, countdown, after))
        return countdown.future

    def _run(self, lane: queue.SimpleQueue) -> None:
        while True:
            item = lane.get()
            if item is None:
                return
            order, tag, view, countdown, after = item
            if after is not None:
                # Lockstep: the unit before ends on this rank first (failed, it fails this one below).
                after.finished.wait()
            error = self._error
            if error is None:
                try:
                    with self._group.blocking_call():
                        relay_chain(self._group, order, tag, view, self._min_chunk)
                except BaseException as e:  # handed to the round's thread through the future
                    error = e
                    with self._lock:
                        first = self._error is None
                        if first:
                            self._error = e
                    if first:
                        self._group.release_blocked_waits()
            countdown.done(error)

    def close(self) -> None:
        """Ends the lanes: chains still queued run first (or fail at once after a failure), then
        each lane's thread returns; waits up to _CLOSE_JOIN_S for them (_CLOSE_JOIN_FAILED_S once
        a lane or the group failed: what the cut pairs end is back by then). A lane thread still ending
        when the interpreter finalizes aborts the process (measured: every rank of
        tests/dataplane/test_lanes.py exited -6, "terminate called without an active exception",
        until close waited), so a round's lanes end with the round. One blocked in gloo past the
        bound (a healthy group whose peer stalls, a send to a stopped peer) is left to its
        timeout, counted for exit by `blocking_call`."""
        for lane in self._queues.values():
            lane.put(None)
        self._queues = {}
        failed = self._error is not None or self._group.is_broken
        deadline = time.monotonic() + (_CLOSE_JOIN_FAILED_S if failed else _CLOSE_JOIN_S)
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._threads = []


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
