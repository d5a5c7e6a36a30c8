"""ChainLanes (dataplane/relay.py): each lane streams its chains across buckets on its own; a failure ends every lane at once."""

from __future__ import annotations

import socket

import pytest
import torch.multiprocessing as mp

import _lanes_worker as worker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((worker.HOST, 0))
        return s.getsockname()[1]


def _launch(scenario: str) -> tuple[dict[int, dict], dict[int, int]]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = {r: ctx.Process(target=worker.main, args=(r, port, scenario, out)) for r in range(3)}
    for p in procs.values():
        p.start()
    reports: dict[int, dict] = {}
    try:
        while len(reports) < sum(1 for r in procs if not (scenario == "failure" and r == 1)):
            rank, report = out.get(timeout=90)
            reports[rank] = report
    finally:
        for p in procs.values():
            p.join(30)
            if p.is_alive():
                p.kill()
    return reports, {r: p.exitcode for r, p in procs.items()}


@pytest.mark.parametrize(
    ("scenario", "word_came", "bucket0_first"),
    [
        # Rank 2 finishes lane 1's bucket 1 before lane 2's bucket 0 is even sent (its sender waits for that).
        ("independent", True, False),
        # lockstep=True (rounds of many senders): rank 2 starts lane 1's bucket 1 only after lane 2's bucket 0,
        # so rank 1 hears nothing and sends after its bounded wait; then everything lands, bucket 0 first.
        ("lockstep", False, True),
    ],
)
def test_a_lane_waits_for_another_lanes_bucket_only_in_lockstep(scenario, word_came, bucket0_first):
    """Streaming lanes do not wait for each other per bucket; lockstep lanes wait for every chain of the
    bucket before. Either way every byte of the three relays is exact and every rank exits 0."""
    reports, codes = _launch(scenario)
    for r in range(3):
        assert reports[r].get("ok"), (r, reports[r])
    assert reports[1]["word_came"] is word_came
    assert reports[2]["bucket0_done_before_lane1_bucket1"] is bucket0_first
    assert reports[2]["exact"] == [True, True, True]
    assert codes == {0: 0, 1: 0, 2: 0}


def test_a_failed_lane_ends_the_others_at_once_and_fails_what_was_queued():
    """Rank 1 dies before it sends on lane 2: lane 2 fails, lane 1 (whose sender holds its bytes back) fails
    with it well inside the 20 s group timeout, and lane 2's queued chain fails with lane 2's first error: it
    never ran."""
    reports, codes = _launch("failure")
    assert codes[1] == 17
    r2 = reports[2]
    assert r2.get("ok"), r2
    assert all(e is not None for e in r2["errors"].values()), r2["errors"]
    assert r2["elapsed_s"] < 10.0, r2
    # The queued chain reports the first failure: it never ran.
    assert r2["errors"]["lane2-queued"] == r2["errors"]["lane2"], r2["errors"]
    assert codes[2] == 0 and codes[0] == 0
