"""The daemon agent owns its engine's version and dirty flag, by the coordinator's rule; both views agree after every round."""

from __future__ import annotations

import asyncio
import dataclasses

from tests.control.helpers import FAST, INVENTORY, ScriptedHandler, start_agent, start_coordinator, trainer_checksums, wait_until
from weightsync.control.trainer_client import TrainerClient

RDV = dict(rendezvous_host="127.0.0.1", rendezvous_port=29999)
NORM = [s for s in INVENTORY if s.name == "model.norm.weight"]


async def _round(client, version, manifest=INVENTORY):
    assignment = await client.begin_update(version, list(manifest), **RDV)
    return await client.commit_update(assignment, trainer_checksums(assignment))


async def _agree(client, agent, version: int, dirty: bool) -> None:
    """The coordinator's row and the agent say the same, and it is what the test expects."""

    async def row():
        return next(d for d in (await client.list_daemons()).daemons if d.daemon_id == agent.identity.daemon_id)

    await wait_until(lambda: agent.served_version == version and agent.dirty == dirty, 10)
    # The row's version follows heartbeats: poll it with a deadline.
    async with asyncio.timeout(10):
        while ((r := await row()).served_version, r.dirty) != (version, dirty):
            await asyncio.sleep(0.05)
    assert (r.served_version, r.dirty) == (version, dirty) == (agent.served_version, agent.dirty)
    status = agent.status()
    assert (status["version"], status["dirty"], status["connected"]) == (version, dirty, True)


async def test_agent_and_coordinator_agree_after_each_kind_of_round_and_a_restart(tmp_path):
    """Full, partial-on-clean, failed, partial-on-dirty, full: agent and ListDaemons agree; after a coordinator restart the agent re-registers clean."""
    config = dataclasses.replace(FAST, state_file=str(tmp_path / "coordinator-state.json"))
    server = await start_coordinator(config)
    handler = ScriptedHandler()
    agent = await start_agent(server.address, "d0", handler, served_version=0)
    client = TrainerClient(server.address)
    try:
        # Version 0 was never committed by this coordinator: the claim is unknown, so dirty, until a full round.
        await _agree(client, agent, 0, True)
        assert (await _round(client, 1)).committed
        await _agree(client, agent, 1, False)
        # Partial on a clean engine: still clean (the agent stayed dirty here before).
        assert (await _round(client, 2, NORM)).committed
        await _agree(client, agent, 2, False)
        handler.fail = "disk full while applying"
        report = await _round(client, 3)
        assert report.state == "FAILED" and "disk full while applying" in report.reason, report
        await _agree(client, agent, 2, True)
        handler.fail = ""
        # Partial on a dirty engine: the new version, still dirty.
        assert (await _round(client, 4, NORM)).committed
        await _agree(client, agent, 4, True)
        assert (await _round(client, 5)).committed
        await _agree(client, agent, 5, False)
        # One more partial round, then the coordinator restarts on the same port: the agent re-registers clean.
        assert (await _round(client, 6, NORM)).committed
        await _agree(client, agent, 6, False)
        address = server.address
        await server.stop(0)
        await wait_until(lambda: not agent.connected.is_set(), 10)
        assert agent.status()["last_error"]
        server = await start_coordinator(config, listen=address)
        await agent.wait_connected(20)
        await client.close()
        client = TrainerClient(address)
        await _agree(client, agent, 6, False)
        assert (await client.list_daemons()).committed_version == 6
    finally:
        await client.close()
        await agent.close(drain_timeout_s=1)
        await server.stop(0)
