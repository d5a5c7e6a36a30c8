"""One rank of a 2-rank gloo data-plane group that exits with gloo work pending (test_exit.py).

Run as a plain interpreter (`python _exit_worker.py ROLE PORT SCENARIO`): what is tested is the
process's own exit, and multiprocessing children leave by os._exit without it.

ROLE "peer" is rank 0: it hosts the store, joins the group, never sends, and stays up for
PEER_S so that the subject's pending work can only end by our own release or gloo's timeout.
ROLE "subject" is rank 1, in one of two scenarios:
- "pending-recv": a receive from the peer blocks on the group's worker thread;
- "broken-broadcast": a broadcast that the peer never starts is pending in gloo's own threads
  when the group fails (as a receiver's round does when the coordinator ends it).
Either way the subject then leaves Python with a finalizer that keeps interpreter finalization
busy for FINALIZE_S: the window in which a daemon thread that comes back from gloo takes the
process down with SIGABRT, made wide on purpose so that the race is decided every run.
"""

from __future__ import annotations

import datetime
import sys
import time

import torch
from torch.distributed import PrefixStore, TCPStore

from weightsync.core import Rendezvous, TransferError
from weightsync.dataplane import groups

TIMEOUT_S = 30.0
PEER_S = 20.0
FINALIZE_S = 5.0
PENDING_RECV_S = 2.0


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
    if role == "peer":
        group = _group(0, port)
        print("joined", flush=True)
        time.sleep(PEER_S)
        return
    group = _group(1, port)
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
    else:
        raise ValueError(f"scenario {scenario!r}: expected pending-recv or broken-broadcast")
    global _finalizer
    _finalizer = _SlowFinalizer()
    print("leaving", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "")
