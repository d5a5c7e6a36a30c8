"""What a registration may claim: versions are checked against the coordinator's own record (issue 10, item 1)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from tests.conftest import free_port
from tests.control.helpers import INVENTORY, ScriptedHandler, start_agent, trainer_checksums, wait_until
from tests.control.test_processes import ROOT, spawn_coordinator, stop_process, wait_serving
from weightsync.control.trainer_client import TrainerClient
from weightsync.core import FailedPrecondition

RDV = dict(rendezvous_host="127.0.0.1", rendezvous_port=29999)
POISON = 2**63 - 1


async def _commit(client, version):
    a = await client.begin_update(version, INVENTORY, **RDV)
    return await client.commit_update(a, trainer_checksums(a))


def _status_json(address: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "weightsync.runtime.cli", "status", "--coordinator", address, "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.slow
async def test_absurd_claims_never_move_the_floor_nor_survive_a_restart(tmp_path):
    """2^63-1 and a typo'd 10^12 are flagged unknown and dirty, never raise the floor or become committed, across a coordinator restart."""
    port, state = free_port(), tmp_path / "state.json"
    address = f"127.0.0.1:{port}"
    proc = spawn_coordinator(port, "--state-file", str(state))
    agents = []
    try:
        await wait_serving(address)
        agents = [await start_agent(address, d) for d in ("d0", "d1")]
        async with TrainerClient(address, rpc_timeout_s=10) as client:
            assert (await _commit(client, 1)).committed
            agents.append(await start_agent(address, "poison", served_version=POISON))
            agents.append(await start_agent(address, "typo", served_version=10**12))
            listed = await client.list_daemons()
            by_id = {d.daemon_id: d for d in listed.daemons}
            assert listed.committed_version == 1 and listed.version_floor == 1
            for d in ("poison", "typo"):
                assert by_id[d].unknown_version and by_id[d].dirty, by_id[d]
            assert not by_id["d0"].unknown_version and not by_id["d0"].dirty
            # The agent's own view agrees: it was told its claim is not trusted.
            assert agents[2].dirty and agents[3].dirty
            shown = await asyncio.to_thread(_status_json, address)  # off the loop: the agents keep heartbeating
            assert shown["version_floor"] == 1 and shown["committed_version"] == 1
            assert {d["daemonId"]: d["unknownVersion"] for d in shown["daemons"]}["poison"] is True

            # The poisoned claim did not raise the floor: version 2 begins and re-syncs everyone.
            assert (await _commit(client, 2)).committed
            await wait_until(lambda: all(not ag.dirty and ag.served_version == 2 for ag in agents), 10)
            listed = await client.list_daemons()
            assert {(d.served_version, d.dirty, d.unknown_version) for d in listed.daemons} == {(2, False, False)}

            # Restart: the committed version comes from the state file, not from what daemons claim.
            agents[3].served_version = 10**12  # the typo'd engine claims it again
            proc.kill()
            proc.wait(10)
            proc = spawn_coordinator(port, "--state-file", str(state))
            await wait_serving(address)
            await wait_until(lambda: all(ag.sessions_opened >= 2 and ag.connected.is_set() for ag in agents), 30)
            listed = await client.list_daemons()
            assert listed.committed_version == 2 and listed.version_floor == 2
            by_id = {d.daemon_id: d for d in listed.daemons}
            assert by_id["typo"].unknown_version and by_id["typo"].dirty
            assert not by_id["d0"].dirty and by_id["d0"].served_version == 2
            with pytest.raises(FailedPrecondition, match="stale"):
                await client.begin_update(2, INVENTORY, **RDV)
            assert (await _commit(client, 3)).committed
    finally:
        for ag in agents:
            await ag.close(1)
        stop_process(proc)


@pytest.mark.slow
async def test_restart_after_a_failed_round_recovers_only_what_was_committed(tmp_path):
    """A daemon judged OK in a round that FAILED for another one re-registers, but the restarted coordinator's committed version is the last COMMITTED one."""
    port, state = free_port(), tmp_path / "state.json"
    address = f"127.0.0.1:{port}"
    proc = spawn_coordinator(port, "--state-file", str(state))
    handlers = {"d0": ScriptedHandler(), "d1": ScriptedHandler()}
    agents = []
    try:
        await wait_serving(address)
        agents = [await start_agent(address, d, h) for d, h in handlers.items()]
        async with TrainerClient(address, rpc_timeout_s=10) as client:
            assert (await _commit(client, 1)).committed
            # d1 fails only after d0 has reported and the trainer has committed: a failed
            # participant ends the round at once, so d0 must be judged (OK) before that.
            handlers["d1"].fail, handlers["d1"].delay_s = "disk full", 2.0
            report = await _commit(client, 2)
            assert report.state == "FAILED" and {v.daemon_id: v.status for v in report.results} == {"d0": "OK", "d1": "FAILED"}
            await wait_until(lambda: all(len(ag.verdicts) == 2 for ag in agents))
            assert agents[0].served_version == 2 and not agents[0].dirty  # d0 holds verified version-2 bytes
            handlers["d1"].fail, handlers["d1"].delay_s = "", 0.0
            proc.kill()
            proc.wait(10)
            proc = spawn_coordinator(port, "--state-file", str(state))
            await wait_serving(address)
            await wait_until(lambda: all(ag.sessions_opened >= 2 and ag.connected.is_set() for ag in agents), 30)
            listed = await client.list_daemons()
            # Version 2 was begun (the floor) but never committed.
            assert (listed.committed_version, listed.version_floor) == (1, 2)
            by_id = {d.daemon_id: d for d in listed.daemons}
            assert (by_id["d0"].served_version, by_id["d0"].unknown_version) == (2, False)
            assert (by_id["d1"].served_version, by_id["d1"].dirty) == (1, True)
            with pytest.raises(FailedPrecondition, match="stale"):
                await client.begin_update(2, INVENTORY, **RDV)
            assert (await _commit(client, 3)).committed
            assert (await client.list_daemons()).committed_version == 3
            assert json.loads(state.read_text()) == {"committed_version": 3, "version_floor": 3}
    finally:
        for ag in agents:
            await ag.close(1)
        stop_process(proc)


@pytest.mark.slow
async def test_without_a_state_file_a_restart_trusts_no_claimed_version():
    """Without --state-file a restarted coordinator knows no history: every claimed version is unknown and dirty, the committed version -1."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    proc = spawn_coordinator(port)
    agents = []
    try:
        await wait_serving(address)
        agents = [await start_agent(address, d) for d in ("d0", "d1")]
        async with TrainerClient(address, rpc_timeout_s=10) as client:
            assert (await _commit(client, 4)).committed
            await wait_until(lambda: all(ag.served_version == 4 and not ag.dirty for ag in agents))
            proc.kill()
            proc.wait(10)
            proc = spawn_coordinator(port)
            await wait_serving(address)
            await wait_until(lambda: all(ag.sessions_opened >= 2 and ag.connected.is_set() for ag in agents), 30)
            listed = await client.list_daemons()
            assert (listed.committed_version, listed.version_floor) == (-1, -1)
            assert {(d.served_version, d.dirty, d.unknown_version) for d in listed.daemons} == {(4, True, True)}
            assert (await _commit(client, 5)).committed
            listed = await client.list_daemons()
            assert {(d.served_version, d.dirty, d.unknown_version) for d in listed.daemons} == {(5, False, False)}
    finally:
        for ag in agents:
            await ag.close(1)
        stop_process(proc)


def test_unreadable_or_inconsistent_state_file_stops_the_coordinator_at_start(tmp_path):
    """A corrupt state file, or one whose floor is below its committed version, is refused at start with the file named."""
    for text, needle in (("{not json", "cannot read it"), ('{"committed_version": 5, "version_floor": 3}', "version_floor (3) is below")):
        state = tmp_path / "state.json"
        state.write_text(text)
        proc = spawn_coordinator(free_port(), "--state-file", str(state))
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode != 0 and str(state) in out and needle in out, out
