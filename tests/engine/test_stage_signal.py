"""Staging signals over a real abstract datagram socket: progress arrives, garbage and strangers' datagrams are dropped."""

from __future__ import annotations

import asyncio
import socket

from weightsync.engine.stage_signal import StageListener, notify_stage


def _status(rank: int, state: str, buckets: int) -> dict:
    return {"update_id": "u1", "rank": rank, "state": state, "buckets_done": buckets, "bytes_done": buckets * 10,
            "error": "", "num_buckets": 4, "seconds": 0.1}


async def test_statuses_arrive_in_order_and_malformed_datagrams_are_dropped():
    """Every queued status comes back at once; non-JSON, JSON without the status fields and fields of the wrong type are ignored."""
    with StageListener() as listener:
        notify_stage(listener.address, _status(0, "receiving", 1))
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"\xff not json", "\0" + listener.address)
            s.sendto(b'{"rank": 0}', "\0" + listener.address)
            # Every field present, but of the wrong type: a rank that is a list, a count that is text.
            s.sendto(b'{"update_id": "u1", "rank": [0], "state": "staged", "buckets_done": 4, "bytes_done": 40}', "\0" + listener.address)
            s.sendto(b'{"update_id": "u1", "rank": 0, "state": "staged", "buckets_done": "4", "bytes_done": 40}', "\0" + listener.address)
        notify_stage(listener.address, _status(1, "staged", 4))
        got = await listener.next_statuses(5.0)
    assert [(s["rank"], s["state"], s["buckets_done"]) for s in got] == [(0, "receiving", 1), (1, "staged", 4)]
    assert set(got[0]) == {"update_id", "rank", "state", "buckets_done", "bytes_done"}


async def test_no_signal_is_an_empty_answer_after_the_timeout():
    """next_statuses returns [] when nothing arrives within its timeout (the caller then polls)."""
    with StageListener() as listener:
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await listener.next_statuses(0.2) == []
        assert loop.time() - started >= 0.19


def test_notifying_a_listener_that_is_gone_is_silent():
    """A worker whose daemon left loses the datagram and carries on (the daemon's poll covers loss)."""
    listener = StageListener()
    address = listener.address
    listener.close()
    notify_stage(address, _status(0, "staged", 4))
    notify_stage("", _status(0, "staged", 4))  # no listener given: nothing to do
