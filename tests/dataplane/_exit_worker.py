"""One rank of a 2-rank gloo data-plane group that exits with gloo work pending (test_exit.py).

Run as a plain interpreter (`python _exit_worker.py ROLE PORT SCENARIO`): what is tested is the
process's own exit, and multiprocessing children leave by os._exit without it.

ROLE "peer" is rank 0: it hosts the store, joins the group, never sends, and stays up for
PEER_S so that the subject's pending work can only end by our own release or gloo's timeout.
ROLE "subject" is rank 1 (rank 0 where it sends), in one of three scenarios:
- "pending-recv": a receive from the peer blocks on the group's worker thread;
- "broken-broadcast": a broadcast that the peer never starts is pending in gloo's own threads
  when the group fails (as a receiver's round does when the coordinator ends it);
- "stopped-peer-send": the peer posts a receive of SEND_BYTES and stops itself (SIGSTOP, as a
  hung host); the subject's send to it fills the socket and waits in gloo when the round is
  abandoned. Cutting the pairs does not end that wait (groups._NativeCalls): exit must leave it
  rather than wait it out.
Each time the subject then leaves Python with a finalizer that keeps interpreter finalization
busy for FINALIZE_S: the window in which a daemon thread that comes back from gloo takes the
process down with SIGABRT, made wide on purpose so that the race is decided every run.
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
import threading
import time

import torch
from torch.distributed import PrefixStore, TCPStore

from weightsync.core import Rendezvous, TransferError
from weightsync.dataplane import groups

TIMEOUT_S = 30.0
PEER_S = 20.0
FINALIZE_S = 5.0
PENDING_RECV_S = 2.0
# Far more than the socket buffers on both ends hold (a few MiB on loopback).
SEND_BYTES = 64 << 20


class _SlowFinalizer:
    def __del__(self, sleep=time.sleep):  # bound now: module globals are gone when this runs
        sleep(FINALIZE_S)


def _group(rank: int, port: int) -> groups.DataPlaneGroup:
    rendezvous = Rendezvous("gloo", "127.0.0.1", port, 2, "exit-test", TIMEOUT_S)
    store = TCPStore("127.0.0.1", port, 2, rank == 0, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    prefixed = PrefixStore("exit-test", store)
    backend = groups._make_backend(rendezvous, rank, prefixed, torch.device("cpu"))
    group = groups.DataPlaneGroup(rendezvous=rendezvous, rank=rank, generation=1, store=prefixed,
                                  device=torch.device("cpu"), backend=backend)
    group.begin_round("exit-test", TIMEOUT_S)
    return group


def main(role: str, port: int, scenario: str) -> None:
    # The subject hosts the store where it sends, as a trainer does: a stopped host must not freeze it.
    subject_rank = 0 if scenario == "stopped-peer-send" else 1
    if role == "peer":
        group = _group(1 - subject_rank, port)
        print("joined", flush=True)
        if scenario == "stopped-peer-send":
            group.store.set("peer-pid", str(os.getpid()))
            # The receive is posted (its notice written to the subject) before this returns.
            work = group.recv(torch.empty(SEND_BYTES, dtype=torch.uint8), subject_rank, "bucket 1/1")
            os.kill(os.getpid(), signal.SIGSTOP)
            del work
        time.sleep(PEER_S)
        return
    group = _group(subject_rank, port)
    if scenario == "pending-recv":
        buf = torch.empty(16)
        group.submit(lambda: group.backend.recv([buf], 0, 5).wait(datetime.timedelta(seconds=PENDING_RECV_S)))
        deadline = time.monotonic() + 10
        while groups._native.count == 0:
            assert time.monotonic() < deadline, "the worker never entered its receive"
            time.sleep(0.01)
    elif scenario == "broken-broadcast":
        group.broadcast(torch.empty(16), "bucket 1/1")
        started = time.monotonic()
        error = group.fail("the round ended FAILED on the coordinator")
        assert isinstance(error, TransferError)
        released = groups._native.wait_zero(TIMEOUT_S)
        print(f"released {released} after {time.monotonic() - started:.3f} s", flush=True)
    elif scenario == "stopped-peer-send":
        peer_pid = int(group.store.get("peer-pid"))
        deadline = time.monotonic() + 30
        while _process_state(peer_pid) != "T":
            assert time.monotonic() < deadline, "the peer never stopped"
            time.sleep(0.01)
        work = group.send(torch.zeros(SEND_BYTES, dtype=torch.uint8), 1, "bucket 1/1")

        def abandon() -> None:  # as the coordinator's verdict does, once the send waits in gloo
            until = time.monotonic() + 30
            while groups._native.count == 0 and time.monotonic() < until:
                time.sleep(0.01)
            group.request_abort("exit-test", "the round ended FAILED on the coordinator")

        threading.Thread(target=abandon, daemon=True).start()
        try:
            group.wait_p2p(work, "bucket 1/1")
        except TransferError as e:
            print(f"abandoned: {e}", flush=True)
        else:
            raise AssertionError("a send to a stopped peer completed")
    else:
        raise ValueError(f"scenario {scenario!r}: expected pending-recv, broken-broadcast or stopped-peer-send")
    global _finalizer
    _finalizer = _SlowFinalizer()
    print(f"leaving at {time.monotonic():.3f}", flush=True)


def _process_state(pid: int) -> str:
    """The state letter of /proc/PID/stat ("T": stopped)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
