"""Data-plane process groups, built from a Rendezvous without touching torch's default group.

The trainer (rank 0) hosts a TCPStore; receivers dial it. Each group lives under
its own key prefix, `weightsync/{group_id}/{generation}`: the generation changes
whenever the group is rebuilt, so a rebuilt group never reads the addresses that
a dead one left in the store. Backends are built directly (ProcessGroupGloo for
CPU tensors, ProcessGroupNCCL for CUDA tensors), so a trainer that runs FSDP in
its own default world keeps that world to itself.

Failure propagation: a failing rank posts an abort notice with its reason in the
store and releases its backend at once; every wait polls for the notice. gloo
reports a dead peer only to the ranks that talk to it directly, and an aborted
NCCL communicator tells nobody: without the notice the others would sit out the
whole timeout.

Abort from outside: the control plane learns of a lost participant before the data
plane does (a stopped peer keeps its sockets open). `GroupCache.abort(update_id, reason)`
may be called from any thread; it only records the request, and the thread that runs
the round fails it at its next poll (every ABORT_POLL_INTERVAL_S at most), posting the
notice and closing the backend itself, so no store client or backend is ever driven
from two threads.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import datetime
import ipaddress
import logging
import os
import queue
import socket
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed import AllreduceOptions, BroadcastOptions, PrefixStore, ReduceOp, Store, TCPStore
from torch._C._distributed_c10d import AllgatherOptions

from weightsync.core import Assignment, Rendezvous, TransferError
from weightsync.dataplane.trainer_store import TrainerStore

if TYPE_CHECKING:
    from weightsync.dataplane.transports import Transport

__all__ = ["RELAY_ENV", "RELAY_MODES", "DataPlaneGroup", "GroupCache"]

log = logging.getLogger(__name__)

_KEY_ROOT = "weightsync"
# How often a waiting rank looks for a peer's abort notice: a store round trip
# costs ~20 us, and a failure then reaches every rank within a tenth of a second.
ABORT_POLL_INTERVAL_S = 0.05
# Reading the reason a peer left in the store: it was written before the peer
# entered the collective that told us about it, so it is there or never will be.
_REASON_TIMEOUT_S = 2.0
# Abort requests remembered per process: only the current and recent rounds matter.
_MAX_ABORT_REQUESTS = 16
# How a gloo group's dense rounds travel (dataplane/relay.py): gloo's own broadcast, or our
# pipelined relay over point-to-point sends along a chain or a binary tree. "auto" picks per
# group on the trainer (rank 0), which publishes its pick; see `_pick_relay`.
RELAY_MODES = ("auto", "broadcast", "chain", "tree")
# The trainer-side default when GroupCache(relay=...) is not given (e.g. a bench switch).
RELAY_ENV = "WEIGHTSYNC_GLOO_RELAY"
# A tag no round uses: the receive that closes a failed gloo group's pairs (`release_blocked_waits`).
_RELEASE_TAG = 0x7753
# Interpreter exit and our threads inside gloo (see `_NativeCalls`). Once a group's pairs are cut,
# every wait that the cut reaches is back within milliseconds; _EXIT_GRACE_S is that, with room
# for a loaded machine. A wait that the cut does not reach comes back only when its own timeout
# expires: exit waits for that when it is within _EXIT_SAFE_S (sooner, it could come back while
# the interpreter finalizes), and never longer than _EXIT_WAIT_S in all.
_EXIT_GRACE_S = 1.0
_EXIT_SAFE_S = 5.0
_EXIT_WAIT_S = 10.0


class _NativeCalls:
    """Our daemon threads that are inside a blocking gloo call with the GIL released.

    Such a thread must be back in Python before the interpreter starts finalizing: a daemon thread
    that asks for the GIL then is ended by pthread_exit, whose forced unwind through torch's
    C++ frames (noexcept) calls std::terminate, and the process dies by SIGABRT ("terminate called
    without an active exception") after it already reported its result. Measured: a push that
    reported FAILED exited -6 in about 1 of 3 runs when a peer's socket closed during its exit.
    `_quiesce_at_exit` (atexit, which runs before finalization) cuts the pairs of every group with
    such a call pending and waits for them to come back.

    Cutting the pairs does not end every wait. gloo's tcp `Pair::signalException` (pair.cc) fails
    the buffers of sends and receives still queued on the pair, but not an unbound-buffer send that
    has already started writing (`tx_` holds it without its buffer): when a peer posts its receive
    and then stops reading (SIGSTOP, a hung host), that send's wait ends only at its own timeout.
    Measured: a `weightsync push` whose receiver was SIGSTOPped mid-bucket reported FAILED 3 s after
    the loss and then sat 10 s in exit, in 4 of 6 runs on a loaded 2-core machine. So each call
    records `not_before`, the monotonic time at which its own gloo timeout expires: a call still
    inside after the cut cannot come back sooner, and exit need not wait for one whose time is
    far off.
    """

    def __init__(self) -> None:
        self._not_before: dict[int, float] = {}
        self._next_token = 0
        self._changed = threading.Condition()

    def enter(self, not_before: float) -> int:
        with self._changed:
            token = self._next_token
            self._next_token += 1
            self._not_before[token] = not_before
            return token

    def leave(self, token: int) -> None:
        with self._changed:
            del self._not_before[token]
            self._changed.notify_all()

    @contextlib.contextmanager
    def inside(self, not_before: float):
        token = self.enter(not_before)
        try:
            yield
        finally:
            self.leave(token)

    @property
    def count(self) -> int:
        with self._changed:
            return len(self._not_before)

    def soonest(self) -> float | None:
        """The earliest `not_before` of the calls inside now; None when there are none."""
        with self._changed:
            return min(self._not_before.values(), default=None)

    def wait_zero(self, timeout_s: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: not self._not_before, max(0.0, timeout_s))


_native = _NativeCalls()
_live_groups: "weakref.WeakSet[DataPlaneGroup]" = weakref.WeakSet()


def _quiesce_at_exit() -> None:
    if _native.count == 0:
        return
    for group in list(_live_groups):
        if group.backend is not None and group.transport == "gloo":
            group.release_blocked_waits()
    if _native.wait_zero(_EXIT_GRACE_S):
        return
    # What is still inside waits for its own timeout (see `_NativeCalls`).
    give_up = time.monotonic() + _EXIT_WAIT_S
    while (soonest := _native.soonest()) is not None:
        now = time.monotonic()
        if soonest - now > _EXIT_SAFE_S:
            log.warning("%d data-plane thread(s) still inside gloo after their pairs were cut: each waits for its own "
                        "timeout (the first in %.0f s), so none can come back while this process exits; leaving them",
                        _native.count, soonest - now)
            return
        if now >= give_up:
            log.warning("%d data-plane thread(s) still inside gloo %g s into interpreter exit; the process may abort",
                        _native.count, _EXIT_WAIT_S)
            return
        # Until the soonest has had time to come back; then look again.
        _native.wait_zero(min(give_up, max(soonest, now) + _EXIT_GRACE_S) - now)


atexit.register(_quiesce_at_exit)


def _timedelta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def _local_address_towards(host: str, port: int) -> str:
    """The local address that routes to host: what peers must dial to reach this rank."""
    family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(addr)  # UDP connect sends nothing; it only picks the route
        return s.getsockname()[0]


def _gloo_device(rank: int, rendezvous: Rendezvous):
    from torch.distributed import ProcessGroupGloo

    ifname = os.environ.get("GLOO_SOCKET_IFNAME")
    if ifname:
        return ProcessGroupGloo.create_device(interface=ifname.split(",")[0])
    # Rank 0 advertised rendezvous.host as its own address; the others use the
    # interface that reaches it, which is also the one their peers can reach.
    address = rendezvous.host if rank == 0 else _local_address_towards(rendezvous.host, rendezvous.port)
    return ProcessGroupGloo.create_device(hostname=address)


def _make_backend(rendezvous: Rendezvous, rank: int, store: Store, device: torch.device):
    if rendezvous.transport == "gloo":
        from torch.distributed import ProcessGroupGloo

        options = ProcessGroupGloo._Options()
        options._timeout = _timedelta(rendezvous.timeout_s)
        options._devices = [_gloo_device(rank, rendezvous)]
        return ProcessGroupGloo(store, rank, rendezvous.world_size, options)
    if rendezvous.transport == "nccl":
        if not torch.distributed.is_nccl_available():
            raise TransferError(f"rank {rank}: transport 'nccl' was assigned but this torch build has no NCCL")
        from torch.distributed import ProcessGroupNCCL

        torch.cuda.set_device(device)
        options = ProcessGroupNCCL.Options()
        # Our own waits give up after timeout_s and abort the communicator; torch's watchdog,
        # which would kill the process instead, must not fire first.
        options._timeout = _timedelta(2 * rendezvous.timeout_s + 30)
        return ProcessGroupNCCL(store, rank, rendezvous.world_size, options)
    return None  # cuda_ipc moves bytes through shared GPU memory; the store carries control


class _Worker:
    """One daemon thread running submitted functions in order. Not a ThreadPoolExecutor: its
    threads are joined at interpreter exit, and a send blocked on a dead peer would hold the
    process up to timeout_s."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def submit(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((future, fn))
        return future

    def _run(self) -> None:
        while True:
            future, fn = self._queue.get()
            if future is None:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as e:  # handed to the waiting thread
                future.set_exception(e)

    def close(self) -> None:
        """The thread ends once what it runs now returns; later work is dropped (its waiter has left)."""
        while True:
            try:
                future, _ = self._queue.get_nowait()
            except queue.Empty:
                break
            if future is not None:
                future.cancel()
        self._queue.put((None, None))


class DataPlaneGroup:
    """One data-plane group: a gloo or NCCL backend (none for cuda_ipc) plus its store namespace.

    Collectives are issued asynchronously and awaited with `wait`, which honours the
    rendezvous timeout_s, the round's deadline and peers' abort notices.
    """

    def __init__(
        self,
        *,
        rendezvous: Rendezvous,
        rank: int,
        generation: int,
        store: Store,
        device: torch.device,
        backend: object | None,
        abort_requests: dict[str, str] | None = None,
        relay: str = "broadcast",
    ) -> None:
        self.rendezvous = rendezvous
        self.rank = rank
        self.generation = generation
        self.store = store
        self.device = device
        self.backend = backend
        self.round_index = 0
        self.update_id = ""
        self._round_deadline = float("inf")
        # When this rank began its current round: no collective of the round started earlier.
        self._round_started: float | None = None
        self._broken_reason: str | None = None
        self._buffers: list[torch.Tensor] = []
        # How dense rounds travel on a gloo group ("broadcast", "chain", "tree"); rank 0 picks it.
        self.relay = relay
        # The transport object (dataplane/transports.py), built on first use; it owns what a
        # transport keeps across rounds of this group (e.g. CUDA IPC exports and mappings).
        self.channel: Transport | None = None
        # A receiver's views of the consumer's tensors (layout.known_bytes) and, on CUDA, its
        # prepared copy-and-checksum launches: rounds repeat both.
        self.destination_bytes: dict[str, tuple] = {}
        self.launches: dict[tuple, Any] = {}
        # Runs blocking point-to-point work (a relay's sends and receives) off the round's thread.
        self._worker: _Worker | None = None
        # Threads inside a blocking gloo wait() now (the worker, wait_p2p's helpers); see `close`.
        self._num_blocked = 0
        self._blocked_lock = threading.Lock()
        # Spent store keys, deleted while this rank waits anyway (each delete is a round trip).
        self._spent_keys: list[str] = []
        # update_id -> reason, written by other threads (GroupCache.abort); read at every poll.
        self._abort_requests: dict[str, str] = abort_requests if abort_requests is not None else {}
        _live_groups.add(self)

    @property
    def group_id(self) -> str:
        return self.rendezvous.group_id

    @property
    def world_size(self) -> int:
        return self.rendezvous.world_size

    @property
    def transport(self) -> str:
        return self.rendezvous.transport

    @property
    def timeout_s(self) -> float:
        return self.rendezvous.timeout_s

    @property
    def is_broken(self) -> bool:
        return self._broken_reason is not None

    @property
    def uses_collectives(self) -> bool:
        """False for cuda_ipc, whose control messages travel through the store."""
        return self.transport != "cuda_ipc"

    def begin_round(self, update_id: str, deadline_s: float) -> int:
        """Counts rounds on this group; every rank counts the same rounds or the header check fails."""
        self.round_index += 1
        self.update_id = update_id
        self._round_started = time.monotonic()
        self._round_deadline = self._round_started + deadline_s
        return self.round_index

    def buffers(self, count: int, nbytes: int, device: torch.device) -> list[torch.Tensor]:
        """Ring buffers kept across rounds: fresh pages would cost a page fault per 4 KiB every round."""
        have = self._buffers
        if len(have) < count or any(b.numel() < nbytes or b.device != device for b in have[:count]):
            self._buffers = []  # free the old ring before allocating the new one
            pin = device.type == "cpu" and torch.cuda.is_available()
            have = [torch.empty(nbytes, dtype=torch.uint8, device=device, pin_memory=pin) for _ in range(count)]
            self._buffers = have
        return have[:count]

    # ------------------------------------------------------------------ collectives

    def _require_backend(self, what: str):
        if self.is_broken:
            raise TransferError(f"rank {self.rank}: {what} on broken group {self.group_id}: {self._broken_reason}")
        if self.backend is None:
            raise TransferError(f"rank {self.rank}: {what} needs a collective backend; transport is {self.transport}")
        return self.backend

    def _set_op_timeout(self, opts) -> None:
        # `wait` enforces timeout_s on every collective. gloo's own timeout is the same;
        # NCCL keeps the group's longer one, so that our abort comes before its watchdog.
        if self.transport == "gloo":
            opts.timeout = _timedelta(self.timeout_s)

    def broadcast(self, tensor: torch.Tensor, what: str):
        """Starts a broadcast from rank 0; returns the work for `wait`."""
        backend = self._require_backend(what)
        opts = BroadcastOptions()
        opts.rootRank = 0
        opts.rootTensor = 0
        self._set_op_timeout(opts)
        try:
            return backend.broadcast([tensor], opts)
        except RuntimeError as e:
            raise self.fail(f"{what} could not start: {e}") from e

    def send(self, tensor: torch.Tensor, dst: int, what: str):
        """Starts a point-to-point send to rank `dst` (per-rank payloads, e.g. delta rounds); returns the work for `wait`."""
        backend = self._require_backend(what)
        try:
            return backend.send([tensor], dst, 0)
        except RuntimeError as e:
            raise self.fail(f"{what} could not start: {e}") from e

    def recv(self, tensor: torch.Tensor, src: int, what: str):
        """Starts a point-to-point receive from rank `src` into `tensor`; returns the work for `wait`."""
        backend = self._require_backend(what)
        try:
            return backend.recv([tensor], src, 0)
        except RuntimeError as e:
            raise self.fail(f"{what} could not start: {e}") from e

    def all_gather(self, tensor: torch.Tensor, what: str) -> tuple[object, list[torch.Tensor]]:
        """Starts gathering every rank's `tensor` (same shape everywhere); returns (work, one tensor per rank)."""
        backend = self._require_backend(what)
        outputs = [torch.empty_like(tensor) for _ in range(self.world_size)]
        opts = AllgatherOptions()
        self._set_op_timeout(opts)
        try:
            return backend.allgather([outputs], [tensor], opts), outputs
        except RuntimeError as e:
            raise self.fail(f"{what} could not start: {e}") from e

    def all_reduce_max(self, tensor: torch.Tensor, what: str):
        backend = self._require_backend(what)
        opts = AllreduceOptions()
        opts.reduceOp = ReduceOp.MAX
        self._set_op_timeout(opts)
        try:
            return backend.allreduce([tensor], opts)
        except RuntimeError as e:
            raise self.fail(f"{what} could not start: {e}") from e

    def _deadline(self) -> float:
        return min(time.monotonic() + self.timeout_s, self._round_deadline)

    def _timed_out(self, what: str, started: float) -> TransferError:
        waited = time.monotonic() - started
        if time.monotonic() >= self._round_deadline:
            return self.fail(f"{what} did not finish before the round deadline (waited {waited:.1f} s)")
        return self.fail(f"{what} did not finish within timeout_s={self.timeout_s:g} (a peer hangs or died)")

    def _completion(self, work) -> Callable[[float], bool]:
        """A function that waits up to its argument in seconds and says whether the work is done."""
        if self.transport == "gloo":
            # gloo completes the future on its own thread, so the wait wakes at once.
            done = threading.Event()
            work.get_future().add_done_callback(lambda _: done.set())
            return done.wait

        started = time.monotonic()

        def poll(timeout_s: float) -> bool:
            # NCCL futures complete at enqueue time; only is_completed() reflects the GPU. A
            # bucket or a handshake finishes within milliseconds: look every 10-200 us for the
            # first 20 ms (a fixed 0.5 ms cost a Llama-8B round over 256 MiB buckets ~15%), then
            # back off to 1 ms.
            end = time.monotonic() + timeout_s
            delay_s = 0.00001
            while not work.is_completed():
                now = time.monotonic()
                if now >= end:
                    return False
                time.sleep(delay_s)
                delay_s = min(delay_s * 2, 0.0002 if now - started < 0.02 else 0.001)
            return True

        return poll

    def wait_p2p(self, work, what: str) -> None:
        """`wait` for a send or recv. gloo's point-to-point work has no future and reports
        completion only from inside wait(), so a helper thread blocks in wait() while this one
        keeps watching for aborts and the deadline (as `wait` does for collectives)."""
        if self.transport != "gloo":
            self.wait(work, what)
            return
        self._check_requested_abort(what)
        timeout_s = max(1.0, self._deadline() - time.monotonic())
        timeout = _timedelta(timeout_s)
        future: concurrent.futures.Future = concurrent.futures.Future()

        def block() -> None:
            try:
                with self.blocking_call(timeout_s):
                    work.wait(timeout)
                future.set_result(None)
            except BaseException as e:  # handed to the waiting thread
                future.set_exception(e)

        threading.Thread(target=block, name=f"p2p-wait-{self.rank}", daemon=True).start()
        self.wait_future(future, what)

    def submit(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Runs fn on this group's worker thread, after what was submitted before; wait with `wait_future`.

        For blocking point-to-point work that must go on while the round's thread does
        something else (a relay forwards bucket k+1 while the consumer applies bucket k).
        fn may drive the backend, never the store: the round's thread keeps the store.
        """
        if self._worker is None:
            self._worker = _Worker(f"weightsync-p2p-{self.group_id}-{self.rank}")

        def tracked():
            with self.blocking_call():
                return fn()

        return self._worker.submit(tracked)

    @contextlib.contextmanager
    def blocking_call(self, timeout_s: float | None = None):
        """Wraps a blocking call into this group's backend made on a thread of ours (the worker,
        a relay lane): counted, so that `release_blocked_waits` knows to cut the pairs and
        interpreter exit waits for the thread to come back (`_native`). `timeout_s`: the
        shortest timeout that any wait inside gives gloo; default timeout_s, what relays use."""
        not_before = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        with self._blocked_lock:
            self._num_blocked += 1
        try:
            with _native.inside(not_before):
                yield
        finally:
            with self._blocked_lock:
                self._num_blocked -= 1

    def release_blocked_waits(self) -> None:
        """Makes every pending gloo point-to-point wait() raise now, but one (see `_NativeCalls`).

        gloo's shutdown() and abort() leave a thread blocked in such a wait() (measured), and a
        daemon thread that comes back from C++ while the interpreter exits ends the process in
        std::terminate ("terminate called without an active exception"). An application timeout
        is gloo's one way to close every pair of its context (unbound_buffer.cc): pending sends
        and receives then raise at once, except a send already writing to a peer that stopped
        reading, which waits for its own timeout. Only for a group being closed with such waits pending:
        a healthy close must not cut pairs that may still carry a peer's last bytes.
        """
        with self._blocked_lock:
            if self._num_blocked == 0:
                return
        self._cut_pairs()

    def _cut_pairs(self) -> None:
        try:
            probe = torch.empty(1, dtype=torch.uint8)
            self.backend.recv([probe], 1 if self.rank == 0 else 0, _RELEASE_TAG).wait(_timedelta(0.001))
        except RuntimeError:
            pass  # the expected "timed out": every pair is closed now

    def wait_future(self, future: concurrent.futures.Future, what: str) -> None:
        """Waits for work done on another thread with the deadline and abort rules of `wait`;
        the work's own failure fails the group (a peer's abort notice, if any, gives the reason)."""
        self._check_requested_abort(what)
        started = time.monotonic()
        deadline = self._deadline()
        while not concurrent.futures.wait([future], min(ABORT_POLL_INTERVAL_S, max(0.0, deadline - time.monotonic()))).done:
            self.check_abort(what)
            if time.monotonic() >= deadline:
                raise self._timed_out(what, started)
        error = future.exception()
        if error is None:
            return
        if isinstance(error, TransferError):
            raise error
        notice = self._notice_after_failure()
        if notice is not None:
            self._mark_broken(notice)
            raise TransferError(f"rank {self.rank}: {what} abandoned: {notice} (then: {error})") from error
        raise self.fail(f"{what} failed: {error}") from error

    def wait(self, work, what: str) -> None:
        """Waits for a collective, raising TransferError on failure, timeout or a peer's abort notice."""
        self._check_requested_abort(what)
        started = time.monotonic()
        deadline = self._deadline()
        is_done = self._completion(work)
        while not is_done(min(ABORT_POLL_INTERVAL_S, max(0.0, deadline - time.monotonic()))):
            self.check_abort(what)
            if time.monotonic() >= deadline:
                raise self._timed_out(what, started)
        try:
            work.wait(_timedelta(self.timeout_s))
        except RuntimeError as e:
            # A peer that failed first may have said why; that beats "connection closed".
            notice = self._notice_after_failure()
            if notice is not None:
                self._mark_broken(notice)
                raise TransferError(f"rank {self.rank}: {what} abandoned: {notice} (then: {e})") from e
            raise self.fail(f"{what} failed: {e}") from e

    # ------------------------------------------------------------------ store-side control

    def _abort_key(self) -> str:
        return f"abort/{self.round_index}"

    def _abort_notice(self) -> str | None:
        key = self._abort_key()
        if not self.store.check([key]):
            return None
        return self.store.get(key).decode(errors="replace")

    def _notice_after_failure(self) -> str | None:
        """A peer's abort notice, read after an operation failed; None also when the store's host
        is gone (often the very peer whose loss failed the operation: its error says enough)."""
        try:
            return self._abort_notice()
        except (RuntimeError, OSError):
            return None

    def request_abort(self, update_id: str, reason: str) -> None:
        """Thread-safe: the thread running round `update_id` fails it at its next poll (see the module docstring)."""
        self._abort_requests[update_id] = reason  # one dict store: atomic under the GIL

    def _check_requested_abort(self, what: str) -> None:
        reason = self._abort_requests.get(self.update_id) if self.update_id else None
        if reason is not None:
            raise self.fail(f"{what} abandoned: {reason}")

    def check_abort(self, what: str) -> None:
        """Raises TransferError if this round was aborted from outside, or a peer posted an abort notice."""
        self._check_requested_abort(what)
        try:
            notice = self._abort_notice()
        except RuntimeError as e:
            raise self.fail(f"rendezvous store unreachable during {what}: {e}") from e
        if notice is None:
            return
        self._mark_broken(notice)
        raise TransferError(f"rank {self.rank}: {what} abandoned: {notice}")

    def forget(self, keys: Sequence[str]) -> None:
        """Deletes these store keys later, during a wait_keys that would otherwise sleep."""
        self._spent_keys.extend(keys)

    def wait_keys(self, keys: Sequence[str], what: str) -> None:
        """Waits until every key exists in the group's store, with the same deadline and abort rules as `wait`.

        Polls: a blocking store.wait cannot also watch for the abort notice, and slicing it
        with short timeouts makes torch log two warnings per slice. Checks start 50 us apart
        (a CUDA IPC bucket is ready within a millisecond or two), stay at most 200 us apart
        for the first 20 ms, then back off to 2 ms.
        """
        started = time.monotonic()
        deadline = self._deadline()
        next_abort_check = started + ABORT_POLL_INTERVAL_S
        delay_s = 0.00005
        # Polled closely while a quick answer is likely, then gently: a long wait by many
        # receivers must not flood the trainer's store.
        fast_until = started + 0.02
        keys = list(keys)
        self._check_requested_abort(what)
        while True:
            try:
                if self.store.check(keys):
                    return
            except RuntimeError as e:
                raise self.fail(f"rendezvous store unreachable during {what}: {e}") from e
            now = time.monotonic()
            if now >= deadline:
                raise self._timed_out(what, started)
            if now >= next_abort_check:
                self.check_abort(what)
                next_abort_check = now + ABORT_POLL_INTERVAL_S
            if self._spent_keys:
                try:
                    self.store.delete_key(self._spent_keys.pop())
                except RuntimeError as e:
                    raise self.fail(f"rendezvous store unreachable during {what}: {e}") from e
                continue  # the delete took a round trip: look again rather than sleep
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, 0.0002 if now < fast_until else 0.002)

    def read_reason(self, key: str) -> str | None:
        try:
            self.store.wait([key], _timedelta(_REASON_TIMEOUT_S))
            return self.store.get(key).decode(errors="replace")
        except RuntimeError:
            return None  # the caller reports "no reason recorded"; the failure itself is already known

    def fail(self, reason: str) -> TransferError:
        """Marks the group broken, tells the peers, and returns the error for the caller to raise."""
        message = f"rank {self.rank}: {reason}"
        if not self.is_broken:
            # The notice goes up before the backend closes: a peer whose collective breaks on
            # the closed connection then finds this reason rather than "connection closed".
            try:
                self.store.set(self._abort_key(), message)
            except RuntimeError as e:
                # The store lives in the trainer; if it is gone, the peers learn from their own timeouts.
                log.warning("rank %d could not post the abort notice for group %s: %s", self.rank, self.group_id, e)
            self._mark_broken(message)
        return TransferError(message)

    def _mark_broken(self, reason: str) -> None:
        if self._broken_reason is None:
            self._broken_reason = reason
            log.warning(
                "data-plane group %s gen %d broken on rank %d (update %s): %s",
                self.group_id, self.generation, self.rank, self.update_id, reason,
            )
            # Release the backend now, not at the next round: an NCCL collective left pending
            # would reach torch's watchdog, which tears the whole process down.
            self.close()

    def close(self) -> None:
        """Releases the backend: NCCL is aborted (its kernels would spin forever), gloo shut down."""
        self._buffers = []
        self.channel = None
        self.destination_bytes = {}
        self.launches = {}
        if self._worker is not None:
            self._worker.close()
            self._worker = None
        if self.backend is None:
            return
        if self.transport == "gloo":
            if self.is_broken:
                # Also a collective left pending in gloo's own threads: the destructor below
                # joins them, and cut pairs end that collective now instead of at its timeout.
                self._cut_pairs()
            else:
                self.release_blocked_waits()
        try:
            if self.transport == "nccl":
                self.backend.abort()
            else:
                self.backend.shutdown()
        except RuntimeError as e:
            log.warning("rank %d: closing group %s raised: %s", self.rank, self.group_id, e, exc_info=True)
        # gloo's destructor joins its worker threads, which stay in a pending collective until
        # that collective's own timeout, shutdown() or not (measured: 29 s of a 30 s timeout).
        # The last reference is therefore dropped on a thread of its own, never on the round's.
        holder = [self.backend]
        self.backend = None
        released = threading.Event()

        def drop() -> None:
            released.wait()
            try:
                holder.clear()
            finally:
                _native.leave(token)

        # Counted from before the thread starts, so that an exit right after this close waits
        # for it: the destructor joins gloo's threads with the GIL released. A collective they
        # are stuck in started in this round, with timeout_s (`_set_op_timeout`), and cannot
        # end by its timeout sooner than this; without a round nothing is pending.
        pending_since = self._round_started if self.transport == "gloo" else None
        token = _native.enter(time.monotonic() if pending_since is None else pending_since + self.timeout_s)

        threading.Thread(target=drop, name=f"weightsync-release-{self.group_id}", daemon=True).start()
        released.set()  # only now: this thread holds no reference any more


def _is_loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False


def _next_poll_delay(delay_s: float, waited_s: float) -> float:
    """The pause before the next look at the store while a round opens or a group forms.

    Every rank of a round gets its assignment at about the same time, so what it waits for
    (the round key, the ranks' reports, the formation verdict) usually comes within
    milliseconds: look every millisecond at most for the first 0.2 s (a reused group's round
    waits for every rank's report before its key is set, so a coarse poll here would add its
    period to every round), then back off to ABORT_POLL_INTERVAL_S, which still bounds how
    late an abort is seen.
    """
    return min(delay_s * 2, 0.001 if waited_s < 0.2 else ABORT_POLL_INTERVAL_S)


def _pick_relay(wanted: str, rendezvous: Rendezvous) -> str:
    """How this group's dense rounds travel; decided once, on rank 0, and published to the others.

    NCCL keeps its own broadcast (its rings already relay) and cuda_ipc has no wire. On gloo,
    "auto" relays along a chain once there are 2+ receivers on other hosts: gloo's binomial
    broadcast puts ceil(log2 N) copies on the root's link, the chain one (BENCHMARKS.md, "Relays
    over gloo": 0.28 / 0.16 of the speed of light at 4 / 8 hosts for gloo's broadcast, 0.80 /
    0.82 for the chain). On loopback links cost nothing and every rank shares one machine's CPU:
    the two measured the same there, so gloo's broadcast, the simpler path, stays.
    """
    if rendezvous.transport != "gloo":
        return "broadcast"
    if wanted != "auto":
        return wanted
    if rendezvous.world_size < 3 or _is_loopback(rendezvous.host):
        return "broadcast"
    return "chain"


class GroupCache:
    """Keeps one data-plane group per process and reuses it while the group_id is unchanged.

    Rank 0 owns the TrainerStore and publishes, per update_id, which generation of the
    group serves that round; the other ranks read it, so every rank reuses or rebuilds
    together. A group is reused only when every rank reported holding it for this round
    (a receiver may have left it for another trainer's group); else every rank forms a new
    generation. A group marked broken by a failed round is rebuilt on the next `get`.
    """

    def __init__(
        self,
        *,
        trainer_store: TrainerStore | None = None,
        device: torch.device | str | None = None,
        relay: str | None = None,
    ) -> None:
        """`relay` (rank 0 only; the others follow it): how dense gloo rounds travel, one of
        RELAY_MODES; None reads the environment variable RELAY_ENV, else "auto"."""
        relay = relay if relay is not None else os.environ.get(RELAY_ENV) or "auto"
        if relay not in RELAY_MODES:
            raise ValueError(f"relay {relay!r} (GroupCache(relay=...) or ${RELAY_ENV}): expected one of {list(RELAY_MODES)}")
        self._relay = relay
        self._trainer_store = trainer_store
        self._device = torch.device(device) if device is not None else None
        self._client: tuple[tuple[str, int], TCPStore] | None = None
        self._group: DataPlaneGroup | None = None
        self._last_round_key: str | None = None
        self.num_constructions = 0
        # Shared with every group this cache builds; see `abort`.
        self._abort_requests: dict[str, str] = {}

    @property
    def group(self) -> DataPlaneGroup | None:
        return self._group

    def abort(self, update_id: str, reason: str) -> None:
        """Thread-safe: fails round `update_id` on this rank within ABORT_POLL_INTERVAL_S, wherever it waits
        (joining, in a collective, in a handshake), or at once if it has not begun yet.

        For the control plane's "this round failed elsewhere": the rank then posts the abort
        notice, so its peers leave too.
        """
        self._abort_requests[update_id] = reason
        while len(self._abort_requests) > _MAX_ABORT_REQUESTS:
            # Dicts keep insertion order: drop the oldest request. A concurrent abort may have
            # removed it first; either way the newest requests stay.
            self._abort_requests.pop(next(iter(self._abort_requests)), None)

    def _raise_if_aborted(self, update_id: str, rank: int, what: str) -> None:
        reason = self._abort_requests.get(update_id)
        if reason is not None:
            raise TransferError(f"rank {rank}: {what} abandoned: {reason}")

    def _poll_keys(self, store: Store, keys: list[str], update_id: str, rank: int, what: str, timeout_s: float) -> bool:
        """Waits for keys like store.wait, but leaves at once when the round is aborted from outside; False on timeout."""
        started = time.monotonic()
        delay_s = 0.00005
        while not store.check(keys):
            self._raise_if_aborted(update_id, rank, what)
            if time.monotonic() - started >= timeout_s:
                return False
            time.sleep(delay_s)
            delay_s = _next_poll_delay(delay_s, time.monotonic() - started)
        return True

    def _raw_store(self, rendezvous: Rendezvous, rank: int) -> Store:
        if rank == 0:
            if self._trainer_store is None:
                raise ValueError("rank 0 is the trainer: GroupCache(trainer_store=TrainerStore(...)) is required")
            if self._trainer_store.port != rendezvous.port:
                raise ValueError(
                    f"rendezvous port {rendezvous.port} is not this trainer's store port {self._trainer_store.port}: "
                    "pass TrainerStore.port as rendezvous_port in BeginUpdate"
                )
            return self._trainer_store.store
        address = (rendezvous.host, rendezvous.port)
        if self._client is None or self._client[0] != address:
            try:
                client = TCPStore(
                    rendezvous.host, rendezvous.port, is_master=False, wait_for_workers=False,
                    timeout=_timedelta(rendezvous.timeout_s),
                )
            except (RuntimeError, OSError) as e:
                raise TransferError(
                    f"rank {rank}: cannot reach the rendezvous store at {rendezvous.host}:{rendezvous.port} "
                    f"within {rendezvous.timeout_s:g} s: {e}"
                ) from e
            self._client = (address, client)
        return self._client[1]

    def _device_for(self, transport: str) -> torch.device:
        if transport == "gloo":
            return torch.device("cpu")
        if self._device is not None and self._device.type == "cuda":
            return self._device
        if not torch.cuda.is_available():
            raise TransferError(f"transport {transport!r} needs a CUDA device and none is visible")
        return torch.device("cuda", torch.cuda.current_device())

    def get(self, assignment: Assignment, rank: int) -> DataPlaneGroup:
        """The group for this round: the cached one if still valid, else a new one (blocks until all ranks join)."""
        rdv = assignment.rendezvous
        if not 0 <= rank < rdv.world_size:
            raise ValueError(f"rank {rank}: expected 0..{rdv.world_size - 1} for world_size {rdv.world_size}")
        if rdv.world_size < 2:
            raise ValueError(f"world_size {rdv.world_size}: a round needs the sender and at least one receiver")
        if rank >= assignment.num_senders and rank not in assignment.receiver_ranks:
            raise ValueError(f"rank {rank} is not among the receiver ranks {list(assignment.receiver_ranks)} of this round")
        self._raise_if_aborted(assignment.update_id, rank, f"update {assignment.update_id}")
        store = self._raw_store(rdv, rank)
        base = f"{_KEY_ROOT}/{rdv.group_id}"
        round_key = f"{base}/round/{assignment.update_id}"
        held_key = f"{round_key}/held"
        current = self._group
        reusable = (
            current is not None
            and not current.is_broken
            and current.rendezvous == rdv
            and current.rank == rank
        )
        try:
            if rank == 0:
                reuse = reusable and self._every_rank_holds(store, held_key, current.generation, assignment)
                generation = current.generation if reuse else int(store.add(f"{base}/generation", 1))
                store.set(round_key, f"{'reuse' if reuse else 'new'} {generation}")
                if self._last_round_key is not None and self._last_round_key != round_key:
                    # Every receiver read it before the round that just ended could finish.
                    store.delete_key(self._last_round_key)
                    store.delete_key(f"{self._last_round_key}/held")
                self._last_round_key = round_key
            else:
                # What this rank holds, for rank 0 to decide: a group is reused only if every rank holds it.
                store.append(held_key, f"{rank}:{current.generation if reusable else 0} ")
                if not self._poll_keys(store, [round_key], assignment.update_id, rank, "rendezvous", rdv.timeout_s):
                    raise TransferError(
                        f"rank {rank}: rendezvous for update {assignment.update_id} failed at {rdv.host}:{rdv.port} "
                        f"within {rdv.timeout_s:g} s: the trainer did not open the round"
                    )
                verb, generation_text = store.get(round_key).decode().split()
                generation = int(generation_text)
                reuse = verb == "reuse"
        except TransferError:
            self.drop()
            raise
        except RuntimeError as e:
            self.drop()
            raise TransferError(
                f"rank {rank}: rendezvous for update {assignment.update_id} failed at "
                f"{rdv.host}:{rdv.port} within {rdv.timeout_s:g} s: {e}"
            ) from e
        if reuse:
            # Rank 0 reuses only what this rank said it holds.
            assert reusable and current.generation == generation, (rank, generation, current)
            return current
        self._close_group()
        device = self._device_for(rdv.transport)
        prefixed = PrefixStore(f"{base}/{generation}", store)
        started = time.monotonic()
        try:
            if rank == 0:
                # Before joining: whoever sees the group formed finds its pick.
                prefixed.set("relay", _pick_relay(self._relay, rdv))
            # Backend construction blocks in store reads that no abort can interrupt: enter it
            # only once the formation's verdict says every rank is here.
            self._join(prefixed, assignment, rank)
            relay = prefixed.get("relay").decode()
            if relay not in RELAY_MODES[1:]:
                raise TransferError(f"rank {rank}: the trainer picked relay {relay!r}; this rank knows {list(RELAY_MODES[1:])}")
            backend = _make_backend(rdv, rank, prefixed, device)
        except RuntimeError as e:
            raise TransferError(
                f"rank {rank}: could not form {rdv.transport} group {rdv.group_id} (world_size {rdv.world_size}) "
                f"within {rdv.timeout_s:g} s: {e}"
            ) from e
        self._group = DataPlaneGroup(
            rendezvous=rdv, rank=rank, generation=generation, store=prefixed, device=device, backend=backend,
            abort_requests=self._abort_requests, relay=relay,
        )
        self.num_constructions += 1
        joined_s = time.monotonic() - started
        # A slow join is how a late or stalled peer shows first; WARNING reaches vLLM workers' logs.
        log.log(
            logging.WARNING if joined_s > rdv.timeout_s / 4 else logging.INFO,
            "rank %d joined %s group %s gen %d (world_size %d, dense rounds by %s) in %.2f s",
            rank, rdv.transport, rdv.group_id, generation, rdv.world_size, relay, joined_s,
        )
        return self._group

    def _every_rank_holds(self, store: Store, held_key: str, generation: int, assignment: Assignment) -> bool:
        """Rank 0: whether every other rank reported holding `generation` of this group for this round.

        A rank that left the group (it joined another trainer's, or lost it) must not be sent
        to rebuild this generation alone: the join keys and addresses of its first formation
        are still in the store, and rank 0 would keep talking to the pair it had before.
        """
        rdv = assignment.rendezvous
        others = rdv.world_size - 1
        started = time.monotonic()
        deadline = started + rdv.timeout_s
        delay_s = 0.00005
        while True:
            held: dict[str, str] = {}
            if store.check([held_key]):
                held = dict(entry.split(":") for entry in store.get(held_key).decode().split())
            if len(held) >= others:
                return all(g == str(generation) for g in held.values())
            self._raise_if_aborted(assignment.update_id, 0, f"update {assignment.update_id}")
            if time.monotonic() >= deadline:
                missing = sorted(set(range(1, rdv.world_size)) - {int(r) for r in held})
                raise TransferError(
                    f"rank 0: ranks {missing} did not come to update {assignment.update_id} on group {rdv.group_id} "
                    f"within {rdv.timeout_s:g} s"
                )
            time.sleep(delay_s)
            delay_s = _next_poll_delay(delay_s, time.monotonic() - started)

    def _join(self, prefixed: Store, assignment: Assignment, rank: int) -> None:
        """Joins this generation's formation and waits for its one verdict: formed (every rank joined) or abandoned.

        The verdict is set once (compare_set), by the last rank to join or by the first to give
        up, so either every rank enters backend construction or none does. With per-rank join
        keys alone, a rank that gave up (timeout, abort from outside) left its key behind: a late
        rank then completed the barrier, and the ranks past it waited inside gloo's constructor
        for the address of the rank that had left, for the whole timeout.
        """
        rdv = assignment.rendezvous
        what = f"joining group {rdv.group_id}"
        prefixed.set(f"joined/{rank}", b"1")  # only to name the missing ranks
        if int(prefixed.add("num_joined", 1)) == rdv.world_size:
            prefixed.compare_set("verdict", "", "formed")
        gave_up: str | None = None
        try:
            if not self._poll_keys(prefixed, ["verdict"], assignment.update_id, rank, what, rdv.timeout_s):
                missing = [r for r in range(rdv.world_size) if not prefixed.check([f"joined/{r}"])]
                gave_up = (
                    f"rank {rank}: could not form {rdv.transport} group {rdv.group_id} (world_size {rdv.world_size}) "
                    f"within {rdv.timeout_s:g} s: ranks {missing} never joined"
                )
        except TransferError as e:
            gave_up = str(e)
        if gave_up is None:
            verdict = prefixed.get("verdict").decode()
        else:
            verdict = prefixed.compare_set("verdict", "", f"abandoned: {gave_up}").decode()
        if verdict == "formed":
            return  # formed before this rank gave up: the others are constructing, so must this one
        if gave_up is not None:
            raise TransferError(gave_up)
        raise TransferError(f"rank {rank}: {what} abandoned: {verdict.removeprefix('abandoned: ')}")

    def _close_group(self) -> None:
        group, self._group = self._group, None
        if group is not None:
            group.close()

    def drop(self) -> None:
        """Forgets the group and the store connection; the next `get` builds both anew."""
        self._close_group()
        self._client = None

    def close(self) -> None:
        self.drop()
