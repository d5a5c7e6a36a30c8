"""Delta rounds in the control plane: only daemons clean on exactly the base take the delta."""

from __future__ import annotations

import pytest

from tests.control.helpers import INVENTORY, ScriptedHandler, start_agent, start_coordinator, trainer_checksums
from weightsync.control.convert import assignment_from_pb, assignment_to_pb
from weightsync.control.trainer_client import TrainerClient
from weightsync.core import InvalidArgument

RDV = dict(rendezvous_host="127.0.0.1", rendezvous_port=29999)


async def _round(client, version, checksums=None, **options):
    a = await client.begin_update(version, INVENTORY, **{**RDV, **options})
    return a, await client.commit_update(a, checksums if checksums is not None else trainer_checksums(a))


async def test_encoding_per_participant_and_in_the_round_record():
    """Clean-on-base daemons get delta (a late joiner once a full round healed it); one on another version gets dense."""
    server = await start_coordinator()
    agents = []
    try:
        async with TrainerClient(server.address) as client:
            for d in ("clean", "other"):
                agents.append(await start_agent(server.address, d, engine="memory"))
            _, report = await _round(client, 1)
            assert report.committed
            _, report = await _round(client, 2)
            assert report.committed
            agents.append(await start_agent(server.address, "late", engine="memory"))
            daemons = {d.daemon_id: d for d in (await client.list_daemons()).daemons}
            assert daemons["late"].stale or daemons["late"].dirty
            # Round 3 is dense; round 4 asks for a delta against 3.
            _, report = await _round(client, 3, daemon_ids=["clean", "late"])
            assert report.committed
            a4 = await client.begin_update(4, INVENTORY, delta_base_version=3, **RDV)
            enc = {p.daemon_id: p.encoding for p in a4.participants}
            # "other" still serves 2 (it was left out of round 3): another version, so dense.
            assert enc == {"clean": "delta", "late": "delta", "other": "dense"}, enc
            assert a4.delta_base_version == 3
            assert a4.delta_ranks and a4.dense_ranks
            # The digest every rank checks covers who takes the delta: flipping one changes it.
            again = assignment_from_pb(assignment_to_pb(a4))
            assert again == a4 and again.digest == a4.digest != a4.plan.digest
            report = await client.commit_update(a4, trainer_checksums(a4))
            assert report.committed
            assert {v.daemon_id: v.encoding for v in report.results} == enc
            assert {v.daemon_id: v.encoding for v in (await client.get_round(a4.update_id)).results} == enc
    finally:
        for a in agents:
            await a.close(1)
        await server.stop(0.5)


async def test_dirty_daemon_gets_dense():
    """A daemon flagged by a failed round is dense in the next delta round against the same base."""
    server = await start_coordinator()
    agents = []
    try:
        async with TrainerClient(server.address) as client:
            for d in ("a", "b"):
                agents.append(await start_agent(server.address, d, engine="memory"))
            _, report = await _round(client, 1)
            assert report.committed
            a2 = await client.begin_update(2, INVENTORY, **RDV)
            await client.abort_update(a2.update_id, "trainer died mid round")
            a3 = await client.begin_update(3, INVENTORY, delta_base_version=1, **RDV)
            # Both took bytes of round 2 and are dirty now: a delta against 1 would land on unknown bytes.
            assert {p.encoding for p in a3.participants} == {"dense"}
            await client.commit_update(a3, trainer_checksums(a3))
            a4 = await client.begin_update(4, INVENTORY, delta_base_version=3, **RDV)
            assert {p.encoding for p in a4.participants} == {"delta"}
            await client.commit_update(a4, trainer_checksums(a4))
    finally:
        for a in agents:
            await a.close(1)
        await server.stop(0.5)


async def test_engine_without_delta_support_gets_dense():
    """A round with an engine that cannot take a delta round (here "test") is dense for all; without it, delta."""
    server = await start_coordinator()
    agents = [await start_agent(server.address, "mem", engine="memory"), await start_agent(server.address, "other")]
    try:
        async with TrainerClient(server.address) as client:
            assert (await _round(client, 1))[1].committed
            a2 = await client.begin_update(2, INVENTORY, delta_base_version=1, **RDV)
            # "other" only takes broadcast buckets: the whole round is dense.
            assert a2.delta_base_version is None
            assert {p.daemon_id: p.encoding for p in a2.participants} == {"mem": "dense", "other": "dense"}
            await client.commit_update(a2, trainer_checksums(a2))
            a3 = await client.begin_update(3, INVENTORY, delta_base_version=2, daemon_ids=["mem"], **RDV)
            assert a3.delta_base_version == 2 and {p.encoding for p in a3.participants} == {"delta"}
            report = await client.commit_update(a3, trainer_checksums(a3))
            # Prometheus counts what each daemon reported receiving, by its encoding.
            wire = {v.encoding: v.bytes_received for v in report.results}
            registry = server.metrics.registry
            assert registry.get_sample_value("weightsync_wire_bytes_total", {"encoding": "delta"}) == wire["delta"] > 0
            # Rounds 1 and 2, dense for both daemons (the scripted daemons report the plan's bytes).
            assert registry.get_sample_value("weightsync_wire_bytes_total", {"encoding": "dense"}) == 4 * wire["delta"]
    finally:
        for a in agents:
            await a.close(1)
        await server.stop(0.5)


class _ShadowHandler(ScriptedHandler):
    """A vLLM-like daemon: after each round it holds a delta base or not, as `after_round` says."""

    def __init__(self) -> None:
        super().__init__()
        self.holds_delta_base = False
        self.after_round = False

    async def __call__(self, assignment, ranks, progress):
        result = await super().__call__(assignment, ranks, progress)
        self.holds_delta_base = self.after_round
        return result


async def test_vllm_engine_takes_a_delta_only_while_it_says_it_holds_the_base():
    """A clean vLLM daemon on the base gets dense until its heartbeat says it holds the base, then delta; a memory daemon needs no such word."""
    server = await start_coordinator()
    shadow = _ShadowHandler()
    agents = [await start_agent(server.address, "mem", engine="memory"), await start_agent(server.address, "vllm", shadow, engine="vllm")]
    try:
        async with TrainerClient(server.address) as client:
            assert (await _round(client, 1))[1].committed
            # Clean on version 1, but no shadow (just started, or its last apply failed): dense, in a delta round.
            shadow.after_round = True  # this round fills its shadow; it says so with its result
            a2 = await client.begin_update(2, INVENTORY, delta_base_version=1, **RDV)
            assert a2.delta_base_version == 1
            assert {p.daemon_id: p.encoding for p in a2.participants} == {"mem": "delta", "vllm": "dense"}
            assert (await client.commit_update(a2, trainer_checksums(a2))).committed
            shadow.after_round = False  # the next round loses it (say, a failed apply that the daemon survived)
            a3 = await client.begin_update(3, INVENTORY, delta_base_version=2, **RDV)
            assert {p.daemon_id: p.encoding for p in a3.participants} == {"mem": "delta", "vllm": "delta"}
            assert (await client.commit_update(a3, trainer_checksums(a3))).committed
            a4 = await client.begin_update(4, INVENTORY, delta_base_version=3, **RDV)
            assert {p.daemon_id: p.encoding for p in a4.participants} == {"mem": "delta", "vllm": "dense"}
            await client.commit_update(a4, trainer_checksums(a4))
    finally:
        for a in agents:
            await a.close(1)
        await server.stop(0.5)


@pytest.mark.parametrize("base, needle", [(-1, "expected a version >= 0"), (5, "below the new version 5")])
async def test_bad_base_is_refused_by_field(base, needle):
    server = await start_coordinator()
    agent = await start_agent(server.address, "a")
    try:
        async with TrainerClient(server.address) as client:
            with pytest.raises(InvalidArgument) as e:
                await client.begin_update(5, INVENTORY, delta_base_version=base, **RDV)
            assert "options.delta_base_version" in str(e.value) and needle in str(e.value)
    finally:
        await agent.close(1)
        await server.stop(0.5)
