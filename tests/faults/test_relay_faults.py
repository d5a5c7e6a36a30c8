"""A relay rank lost mid-round, dense and routed, with real memory daemons, a real coordinator and a real `weightsync push`."""

from __future__ import annotations

import signal
import time

import pytest

from tests.faults.fleet import Fleet, make_weights, out_of_round_bound_s, wait_for
from weightsync.dataplane.groups import RELAY_ENV

pytestmark = pytest.mark.slow

LONG = dict(collective_timeout_s=120.0, deadline_s=300.0)
IDLE = 1
# Stopped, the rank sending to mem1 is left in a gloo send that cutting the pairs does not end
# (dataplane/groups.py `_NativeCalls`): leaving must not wait for that send.
SIGNALS = pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["sigkill", "sigstop"])


@pytest.fixture
def fleet(tmp_path, monkeypatch):
    # The trainer picks how dense rounds travel; on loopback "auto" keeps gloo's broadcast.
    monkeypatch.setenv(RELAY_ENV, "chain")
    f = Fleet(tmp_path)
    yield f
    f.close()


@SIGNALS
def test_lost_relay_daemon_takes_every_rank_out_fast_and_the_next_round_heals(fleet, sig):
    """mem1 (data-plane rank 2, forwarding to mem2 along the chain 0 -> mem0 -> mem1 -> mem2) is SIGKILLed or SIGSTOPped mid-transfer: the trainer, mem0 and mem2 leave within seconds, not at the 120 s timeout, and the next round commits."""
    push = fleet.push_mid_transfer(1, after_s=0.8, **LONG)
    try:
        fleet.signal_daemon("mem1", sig)
        t0 = time.monotonic()
        rc, summary = fleet.finish_push(push, timeout_s=LONG["collective_timeout_s"])
        trainer_s = time.monotonic() - t0
        wait_for(lambda: all(fleet.daemons_info()[d].state == IDLE for d in ("mem0", "mem2")), 120, "survivors idle")
        survivors_s = time.monotonic() - t0
    finally:
        if push.poll() is None:
            push.kill()
        push.wait(10)
    assert rc == 1 and summary["daemons"]["mem1"] == "FAILED", summary
    assert trainer_s < out_of_round_bound_s(sig), f"trainer left the round {trainer_s:.1f} s after the loss (bound {out_of_round_bound_s(sig):g} s)"
    assert survivors_s < out_of_round_bound_s(sig), f"receivers left the round {survivors_s:.1f} s after the loss (bound {out_of_round_bound_s(sig):g} s)"
    info = fleet.daemons_info()
    assert info["mem0"].dirty and info["mem2"].dirty, "engines that took part in a failed round are flagged"
    fleet.bring_back("mem1", sig)
    fleet.clear_failpoints()
    fleet.wait_daemons(list(fleet.daemons))
    rc, summary = fleet.push(2, **LONG)
    assert rc == 0, summary
    fleet.assert_consistent(2)


@pytest.fixture
def routed_fleet(tmp_path):
    # Three engines' TP rank 0 of TP=2: all three need the same half of every matrix, so each routed
    # piece from the single-rank trainer goes along a chain of the three (core/routing.py).
    f = Fleet(tmp_path, daemon_args=("--tp", "2", "--tp-rank", "0"))
    yield f
    f.close()


@SIGNALS
def test_lost_hop_of_a_routed_relay_takes_every_rank_out_fast_and_the_next_round_heals(routed_fleet, sig):
    """A routed round (needs alone route the push) relays each piece along mem0, mem1, mem2 in turns; mem1 is
    SIGKILLed or SIGSTOPped mid-transfer: the trainer, mem0 and mem2 leave within seconds, the survivors are
    flagged, and the next routed round commits with each rank holding its half."""
    fleet = routed_fleet
    push = fleet.push_mid_transfer(1, after_s=0.8, **LONG)
    try:
        fleet.signal_daemon("mem1", sig)
        t0 = time.monotonic()
        rc, summary = fleet.finish_push(push, timeout_s=LONG["collective_timeout_s"])
        trainer_s = time.monotonic() - t0
        wait_for(lambda: all(fleet.daemons_info()[d].state == IDLE for d in ("mem0", "mem2")), 120, "survivors idle")
        survivors_s = time.monotonic() - t0
    finally:
        if push.poll() is None:
            push.kill()
        push.wait(10)
    assert rc == 1 and summary["state"] == "FAILED" and summary["daemons"]["mem1"] == "FAILED", (rc, summary)
    assert trainer_s < out_of_round_bound_s(sig), f"trainer left the round {trainer_s:.1f} s after the loss (bound {out_of_round_bound_s(sig):g} s)"
    assert survivors_s < out_of_round_bound_s(sig), f"receivers left the round {survivors_s:.1f} s after the loss (bound {out_of_round_bound_s(sig):g} s)"
    info = fleet.daemons_info()
    assert info["mem0"].dirty and info["mem2"].dirty, "engines that took part in a failed round are flagged"
    fleet.bring_back("mem1", sig)
    fleet.clear_failpoints()
    fleet.wait_daemons(list(fleet.daemons))
    rc, summary = fleet.push(2, **LONG)
    assert rc == 0, summary
    info = fleet.daemons_info()
    assert all(info[d].served_version == 2 and not info[d].dirty for d in fleet.daemons), info
    # Routed and relayed: the trainer sent half of every matrix plus the norm once, each rank received that half.
    weights = make_weights(2)
    half = sum(t.nbytes // 2 if t.dim() == 2 else t.nbytes for t in weights.values())
    ranks = fleet.client.list_rounds(1)[0].rank_bytes
    assert ranks[0][1:] == (half, 0), ranks
    assert sorted(v[2] for r, v in ranks.items() if r > 0) == [half] * 3, ranks
