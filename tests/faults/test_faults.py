"""Faults with real processes and real signals; each test asserts every engine's final state."""

from __future__ import annotations

import signal
import time

import pytest

from tests.faults.fleet import COLLECTIVE_TIMEOUT_S, HEARTBEAT_TIMEOUT_S, Fleet

pytestmark = pytest.mark.slow


@pytest.fixture
def fleet(tmp_path):
    f = Fleet(tmp_path)
    yield f
    f.close()


def _by_id(summary: dict | None) -> dict:
    return (summary or {}).get("daemons", {})


def test_daemon_sigkill_mid_transfer(fleet):
    """A daemon SIGKILLed mid-transfer fails the round by name within the timeouts; restarted, it is re-synced by the next round."""
    push = fleet.push_mid_transfer(1, after_s=0.8)
    fleet.kill_daemon("mem1")
    t0 = time.monotonic()
    rc, summary = fleet.finish_push(push)
    assert rc == 1
    assert time.monotonic() - t0 < COLLECTIVE_TIMEOUT_S + 10
    assert summary["state"] in ("FAILED", "ABORTED") and _by_id(summary)["mem1"] == "FAILED"
    info = fleet.daemons_info()
    assert info["mem0"].dirty and info["mem2"].dirty, "engines that saw part of a failed round are flagged"
    fleet.clear_failpoints()
    fleet.start_daemon("mem1", served_version=0)
    fleet.wait_daemons(["mem0", "mem1", "mem2"])
    rc, summary = fleet.push(2)
    assert rc == 0, summary
    fleet.assert_consistent(2)


def test_daemon_sigstop_then_sigcont(fleet):
    """A daemon SIGSTOPped mid-transfer is lost and the round fails within the timeouts; after SIGCONT it rejoins and the next round re-syncs it."""
    push = fleet.push_mid_transfer(1, after_s=0.8)
    fleet.signal_daemon("mem2", signal.SIGSTOP)
    t0 = time.monotonic()
    rc, summary = fleet.finish_push(push)
    assert rc == 1 and time.monotonic() - t0 < COLLECTIVE_TIMEOUT_S + HEARTBEAT_TIMEOUT_S + 10
    assert _by_id(summary).get("mem2") in ("FAILED", "TIMED_OUT")
    assert fleet.daemons_info()["mem2"].state == 3  # LOST
    fleet.signal_daemon("mem2", signal.SIGCONT)
    fleet.clear_failpoints()
    fleet.wait_daemons(["mem0", "mem1", "mem2"])
    assert fleet.daemons_info()["mem2"].dirty
    rc, summary = fleet.push(2)
    assert rc == 0, summary
    fleet.assert_consistent(2)


def test_trainer_sigkill_mid_round(fleet):
    """A trainer SIGKILLed mid-round ends the round without hanging the fleet; the engines are flagged and the next round re-syncs them."""
    push = fleet.push_mid_transfer(1, after_s=0.8)
    push.kill()
    push.wait(10)
    assert fleet.wait_round_ended() in ("FAILED", "TIMED_OUT")
    assert all(d.dirty for d in fleet.daemons_info().values())
    fleet.clear_failpoints()
    fleet.wait_daemons(list(fleet.daemons))
    rc, summary = fleet.push(2)
    assert rc == 0, summary
    fleet.assert_consistent(2)


def test_coordinator_sigkill_mid_round_and_between_rounds(fleet):
    """The coordinator killed mid-round and between rounds: daemons reconnect with their versions and the next round commits."""
    push = fleet.push_mid_transfer(1, after_s=0.5)
    fleet.kill_coordinator()
    rc, _ = fleet.finish_push(push)
    assert rc != 0
    fleet.clear_failpoints()
    fleet.start_coordinator()
    fleet.wait_daemons(list(fleet.daemons))
    assert all(d.dirty for d in fleet.daemons_info().values()), "no verdict arrived: every engine is flagged"
    rc, summary = fleet.push(2)
    assert rc == 0, summary
    fleet.assert_consistent(2)
    time.sleep(1.0)  # let the verdicts reach the daemons before the next crash
    fleet.kill_coordinator()
    fleet.start_coordinator()
    fleet.wait_daemons(list(fleet.daemons))
    listed = fleet.client.list_daemons()
    assert listed.committed_version == 2 and not any(d.dirty for d in listed.daemons)
    rc, summary = fleet.push(3)
    assert rc == 0, summary
    fleet.assert_consistent(3)


def test_corrupted_applied_byte_is_caught_and_resynced(fleet):
    """One flipped bit in an applied tensor fails the round for that daemon, naming the tensor; the next round re-syncs it."""
    fleet.set_failpoints("mem0", corrupt_applied="model.layers.2.mlp.down_proj.weight")
    rc, summary = fleet.push(1)
    assert rc == 1 and _by_id(summary) == {"mem0": "CHECKSUM_MISMATCH", "mem1": "OK", "mem2": "OK"}
    report = fleet.client.list_rounds(1)[0]
    bad = {v.daemon_id: v for v in report.results}["mem0"]
    assert bad.mismatched_tensors == ("model.layers.2.mlp.down_proj.weight",)
    assert fleet.daemons_info()["mem0"].dirty
    fleet.clear_failpoints()
    rc, summary = fleet.push(2)
    assert rc == 0, summary
    fleet.assert_consistent(2)


def test_late_joining_daemon(fleet):
    """A daemon that joins after rounds committed is stale until the next full round, then consistent."""
    assert fleet.push(1)[0] == 0
    fleet.start_daemon("late", served_version=0)
    fleet.wait_daemons(["late"])
    assert fleet.daemons_info()["late"].stale
    assert fleet.push(2)[0] == 0
    fleet.assert_consistent(2)
