"""The streamed routed round's handoff: the data-plane thread never runs more than one batch ahead of vLLM's loader, and either side's failure reaches the other."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from weightsync.core import TransferError
from weightsync.engine.routed import _Handoff, _StagingMeter


def _batch(i: int) -> list[tuple[str, torch.Tensor]]:
    return [(f"t{i}", torch.full((4,), float(i)))]


def test_tensors_arrive_in_order_and_the_receiver_waits_for_the_loader():
    """Batches come out in order; a second put blocks until the loader took the first (one batch in flight)."""
    h = _Handoff()
    h.put(_batch(0))
    second_done = threading.Event()

    def produce():
        h.put(_batch(1))
        second_done.set()
        h.finish(None)

    t = threading.Thread(target=produce)
    t.start()
    assert not second_done.wait(0.3), "the receiver ran two batches ahead of the loader"
    names = [name for name, _ in h]
    t.join(5)
    assert names == ["t0", "t1"] and second_done.is_set()


def test_a_receive_error_is_raised_in_the_loader():
    """finish(error) ends the loader's iteration with that error, after the batches before it."""
    h = _Handoff()
    seen = []
    err = TransferError("rank 3: routed round bucket 2/9 failed: peer gone")

    def produce():
        h.put(_batch(0))
        h.finish(err)

    threading.Thread(target=produce).start()
    with pytest.raises(TransferError, match="peer gone"):
        for name, _ in h:
            seen.append(name)
    assert seen == ["t0"]


def test_a_stopped_loader_fails_the_receiver_within_the_poll():
    """close() (the loader failed) makes a put on the full slot raise within a few polls, so the round fails on every rank."""
    h = _Handoff()
    h.put(_batch(0))  # fills the one slot
    failed = {}

    def produce():
        started = time.monotonic()
        try:
            h.put(_batch(1))
        except RuntimeError as e:
            failed["error"], failed["s"] = str(e), time.monotonic() - started

    t = threading.Thread(target=produce)
    t.start()
    h.close()  # whether the put is already waiting on the full slot or not yet: it must raise
    t.join(5)
    assert "loader stopped" in failed["error"] and failed["s"] < 2.0
    h.finish(None)  # a late end after close is dropped, not raised


def test_staging_meter_counts_live_full_size_tensors():
    """The peak is the most bytes of tracked tensors alive at once; a freed tensor no longer counts."""
    meter = _StagingMeter()
    a = meter.track(torch.empty(256, dtype=torch.float32))
    b = meter.track(torch.empty(128, dtype=torch.float32))
    assert meter.live_bytes == 1536 and meter.peak_bytes == 1536
    del a, b
    c = meter.track(torch.empty(64, dtype=torch.float32))
    assert meter.live_bytes == 256 and meter.peak_bytes == 1536
    del c
    assert meter.live_bytes == 0
