"""The trainer's liveness in its round (WatchUpdate), rounds failed at once, dirty from the start, busy daemons kept out: real gRPC, real agents."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.control.helpers import INVENTORY, ScriptedHandler, start_agent, start_coordinator, trainer_checksums, wait_until
from weightsync.control.convert import assignment_from_pb
from weightsync.control.records import DaemonState
from weightsync.control.trainer_client import TrainerClient
from weightsync.core import Unavailable
from weightsync.v1 import weightsync_pb2 as pb

RDV = dict(rendezvous_host="127.0.0.1", rendezvous_port=29999)


@pytest.fixture
async def fleet():
    server = await start_coordinator()
    handlers = {f"d{i}": ScriptedHandler(delay_s=30) for i in range(2)}
    agents = [await start_agent(server.address, d, h) for d, h in handlers.items()]
    yield server, agents, handlers
    for a in agents:
        await a.close(drain_timeout_s=1)
    await server.stop(0.5)


async def test_participants_are_dirty_from_the_start_of_the_round(fleet):
    """ListDaemons flags every participant dirty as soon as the round begins, before any result."""
    server, _, handlers = fleet
    async with TrainerClient(server.address) as client:
        assert not any(d.dirty for d in (await client.list_daemons()).daemons)
        a = await client.begin_update(1, INVENTORY, **RDV)
        assert all(d.dirty for d in (await client.list_daemons()).daemons)
        await client.abort_update(a.update_id, "test over")


async def test_trainer_that_closes_its_stream_fails_the_round_at_once(fleet):
    """A trainer whose WatchUpdate stream goes away (its channel closed, as when the process dies) fails the round within a second, not at the deadline."""
    server, _, handlers = fleet
    trainer = TrainerClient(server.address)
    a = await trainer.begin_update(1, INVENTORY, deadline_s=60, **RDV)
    await trainer.close()
    t0 = time.monotonic()
    rnd = server.coordinator.rounds[a.update_id]
    await wait_until(lambda: rnd.state.finished, 5)
    assert time.monotonic() - t0 < 2
    assert rnd.state.value == "FAILED" and "trainer lost" in rnd.reason
    await wait_until(lambda: all(h.cancelled == 1 for h in handlers.values()))


async def test_trainer_that_never_watches_fails_the_round_at_the_heartbeat_timeout(fleet):
    """A round begun without WatchUpdate (a trainer that died right after BeginUpdate) fails after heartbeat_timeout_s, not at its 60 s deadline."""
    server, _, _ = fleet
    async with TrainerClient(server.address) as client:
        resp = await client._trainer.BeginUpdate(
            pb.BeginUpdateRequest(version=1, manifest=[pb.TensorSpec(name=s.name, shape=s.shape, dtype=s.dtype) for s in INVENTORY],
                                  options=pb.UpdateOptions(deadline_s=60, **RDV)),
            timeout=5,
        )
        t0 = time.monotonic()
        report = await client.commit_update(assignment_from_pb(resp.assignment), {s.name: 0 for s in INVENTORY})
        elapsed = time.monotonic() - t0
    assert report.state == "FAILED" and "did not open WatchUpdate" in report.reason, report
    assert elapsed < server.coordinator.config.heartbeat_timeout_s + 2


async def test_a_failed_daemon_fails_the_round_for_everyone_and_tells_the_trainer(fleet):
    """One daemon reporting failure ends the round at once: the others are cancelled and the trainer's on_round_end hears FAILED."""
    server, _, handlers = fleet
    handlers["d0"].delay_s = 0
    handlers["d0"].fail = "receiver broke"
    heard: list[tuple[str, str, str]] = []
    async with TrainerClient(server.address) as client:
        a = await client.begin_update(1, INVENTORY, deadline_s=60, on_round_end=lambda *ev: heard.append(ev), **RDV)
        await wait_until(lambda: heard, 5)
        assert heard[0][0] == a.update_id and heard[0][1] == "FAILED" and "receiver broke" in heard[0][2]
        await wait_until(lambda: handlers["d1"].cancelled == 1, 5)
        report = await client.commit_update(a, trainer_checksums(a))
    assert {v.daemon_id: v.status for v in report.results} == {"d0": "FAILED", "d1": "FAILED"}


class _StuckHandler(ScriptedHandler):
    """A receiver that an abort cannot reach for blocking_s (as inside a long apply): it has `abort`, which does nothing."""

    def abort(self, update_id: str, reason: str) -> None:
        self.aborts = getattr(self, "aborts", 0) + 1


async def test_daemon_stuck_in_an_aborted_round_is_updating_and_not_offered_rounds():
    """After an abort, a daemon whose receiver is still busy shows UPDATING naming the update, is left out of new rounds, and is offered them again once it leaves."""
    server = await start_coordinator()
    stuck = _StuckHandler(blocking_s=4)
    agents = [await start_agent(server.address, "d0"), await start_agent(server.address, "d1", stuck)]
    try:
        async with TrainerClient(server.address) as client:
            a = await client.begin_update(1, INVENTORY, **RDV)
            await wait_until(lambda: stuck.seen, 5)
            await client.abort_update(a.update_id, "operator abort")
            await wait_until(lambda: getattr(stuck, "aborts", 0) == 1, 5)
            rec = server.coordinator.daemons["d1"]
            for _ in range(10):  # heartbeats every 0.2 s: several of them, all saying busy
                assert rec.state is DaemonState.UPDATING and a.update_id in rec.reason, (rec.state, rec.reason)
                await asyncio.sleep(0.1)
            with pytest.raises(Unavailable, match="d1"):
                await client.begin_update(2, INVENTORY, min_daemons=2, **RDV)
            await wait_until(lambda: rec.state is DaemonState.IDLE, 10)
            a = await client.begin_update(2, INVENTORY, min_daemons=2, **RDV)
            assert (await client.commit_update(a, trainer_checksums(a))).committed
    finally:
        for ag in agents:
            await ag.close(drain_timeout_s=1)
        await server.stop(0.5)
