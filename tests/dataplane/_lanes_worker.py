"""Rank processes for tests/dataplane/test_lanes.py: three real gloo ranks on 127.0.0.1 running ChainLanes.

Lane 1 is the chain 0 -> 2, lane 2 the chain 1 -> 2. Each rank reports a dict on its queue.
"""

from __future__ import annotations

import datetime
import os
import time
import traceback

import torch
from torch.distributed import TCPStore

from weightsync.core import Rendezvous
from weightsync.dataplane.groups import DataPlaneGroup, _make_backend
from weightsync.dataplane.relay import ChainLanes

HOST = "127.0.0.1"
NBYTES = 256 << 10  # 16 chunks of 16 KiB: a relay of several chunks, quick on loopback
TIMEOUT_S = 20.0
# How long rank 1 waits for rank 2's word before it sends anyway (the lockstep case).
WAIT_S = 3.0


def _fill(seed: int) -> torch.Tensor:
    return torch.arange(NBYTES, dtype=torch.int64).add_(seed * 7919).remainder_(251).to(torch.uint8)


def _group(rank: int, port: int) -> DataPlaneGroup:
    rdv = Rendezvous("gloo", HOST, port, 3, "lanes", TIMEOUT_S)
    store = TCPStore(HOST, port, 3, rank == 0, datetime.timedelta(seconds=TIMEOUT_S))
    backend = _make_backend(rdv, rank, store, torch.device("cpu"))
    return DataPlaneGroup(rendezvous=rdv, rank=rank, generation=0, store=store, device=torch.device("cpu"), backend=backend)


def main(rank: int, port: int, scenario: str, out) -> None:
    try:
        out.put((rank, _run(rank, port, scenario)))
    except BaseException as e:
        out.put((rank, {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}))


def _run(rank: int, port: int, scenario: str) -> dict:
    group = _group(rank, port)
    lanes = ChainLanes(group, lockstep=scenario == "lockstep")
    store = group.store
    try:
        if scenario in ("independent", "lockstep"):
            return _independent(rank, group, lanes, store)
        return _failure(rank, group, lanes, store)
    finally:
        # The group is left open on purpose: a process that ends with its lanes just closed must exit 0.
        lanes.close()


def _independent(rank: int, group: DataPlaneGroup, lanes: ChainLanes, store) -> dict:
    """Rank 2 takes lane 1's bucket 1 while lane 2's bucket 0 has not started: rank 1 sends it only
    once rank 2 says so, or after WAIT_S without word (lockstep: lane 1's bucket 1 waits for
    bucket 0 on rank 2, so the word never comes first)."""
    if rank == 0:
        f0 = lanes.submit([((0, 2), 1, _fill(0))])
        f1 = lanes.submit([((0, 2), 1, _fill(1))])
        group.wait_future(f0, "lane 1 bucket 0")
        group.wait_future(f1, "lane 1 bucket 1")
        return {"ok": True}
    if rank == 1:
        try:
            store.wait(["lane1-bucket1-in"], datetime.timedelta(seconds=WAIT_S))
            word = True
        except RuntimeError:  # the store's wait timed out
            word = False
        f0 = lanes.submit([((1, 2), 2, _fill(2))])
        group.wait_future(f0, "lane 2 bucket 0")
        return {"ok": True, "word_came": word}
    a0, b0, a1 = (torch.empty(NBYTES, dtype=torch.uint8) for _ in range(3))
    f0 = lanes.submit([((0, 2), 1, a0), ((1, 2), 2, b0)])
    f1 = lanes.submit([((0, 2), 1, a1)])
    group.wait_future(f1, "lane 1 bucket 1")
    bucket0_done_first = f0.done()
    store.set("lane1-bucket1-in", "1")
    group.wait_future(f0, "bucket 0")
    return {
        "ok": True, "bucket0_done_before_lane1_bucket1": bucket0_done_first,
        "exact": [bool(torch.equal(t, _fill(s))) for t, s in ((a0, 0), (b0, 2), (a1, 1))],
    }


def _failure(rank: int, group: DataPlaneGroup, lanes: ChainLanes, store) -> dict:
    """Rank 1 dies before sending on lane 2 while rank 2's lane 1 waits for bytes rank 0 holds back:
    lane 2's failure must end lane 1's wait at once, and a chain queued after it must fail unrun."""
    if rank == 0:
        # Holds its bytes back until rank 2 has its verdicts (its lane 1 must fail without them).
        store.wait(["rank2-judged"], datetime.timedelta(seconds=TIMEOUT_S * 2))
        return {"ok": True}
    if rank == 1:
        store.wait(["rank2-posted"], datetime.timedelta(seconds=TIMEOUT_S))
        os._exit(17)
    a, b, later = (torch.empty(NBYTES, dtype=torch.uint8) for _ in range(3))
    f_a = lanes.submit([((0, 2), 1, a)])
    f_b = lanes.submit([((1, 2), 2, b)])
    f_later = lanes.submit([((1, 2), 2, later)])
    store.set("rank2-posted", "1")
    started = time.monotonic()
    errors = {}
    for name, f in (("lane2", f_b), ("lane1", f_a), ("lane2-queued", f_later)):
        try:
            f.result(timeout=TIMEOUT_S * 2)
            errors[name] = None
        except Exception as e:
            errors[name] = f"{type(e).__name__}: {e}"
    elapsed = time.monotonic() - started
    store.set("rank2-judged", "1")
    return {"ok": True, "errors": errors, "elapsed_s": elapsed}
