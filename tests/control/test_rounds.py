"""Update rounds end to end over a real grpc.aio coordinator and real daemon agents."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.control.helpers import FAST, INVENTORY, ScriptedHandler, start_agent, start_coordinator, trainer_checksums, wait_until
from weightsync.control.trainer_client import RoundFailed, SyncTrainerClient, TrainerClient
from weightsync.core import FailedPrecondition, InvalidArgument, NotFound, TensorSpec, Unavailable

RDV = dict(rendezvous_host="127.0.0.1", rendezvous_port=29999)


@pytest.fixture
async def fleet():
    server = await start_coordinator()
    handlers = {f"d{i}": ScriptedHandler() for i in range(3)}
    agents = [await start_agent(server.address, d, h) for d, h in handlers.items()]
    client = TrainerClient(server.address)
    yield server, agents, handlers, client
    await client.close()
    for a in agents:
        await a.close(drain_timeout_s=1)
    await server.stop(0.5)


async def run_round(client, version, manifest=INVENTORY, checksums=None, **options):
    assignment = await client.begin_update(version, manifest, **{**RDV, **options})
    report = await client.commit_update(assignment, checksums if checksums is not None else trainer_checksums(assignment))
    return assignment, report


async def test_three_daemons_commit(fleet):
    """A round with three daemons goes from BeginUpdate to COMMITTED and every daemon serves it."""
    server, agents, handlers, client = fleet
    assignment, report = await run_round(client, 1, bucket_size_bytes=4096)
    assert report.state == "COMMITTED", report
    assert sorted(v.daemon_id for v in report.results) == ["d0", "d1", "d2"]
    assert all(v.status == "OK" for v in report.results)
    # Ranks: trainer is 0, daemons get 1..3; the plan every daemon received is the trainer's.
    assert sorted(r for p in assignment.participants for r in p.ranks) == [1, 2, 3]
    assert assignment.rendezvous.world_size == 4
    for h in handlers.values():
        assert h.seen[-1].plan == assignment.plan
    assert len(assignment.plan.buckets) > 1
    daemons = (await client.list_daemons()).daemons
    assert {(d.daemon_id, d.served_version, d.dirty) for d in daemons} == {("d0", 1, False), ("d1", 1, False), ("d2", 1, False)}
    await wait_until(lambda: all(a.served_version == 1 and not a.dirty for a in agents))
    rounds = await client.list_rounds()
    assert rounds[0].update_id == assignment.update_id and rounds[0].state == "COMMITTED"
    assert rounds[0].total_bytes == sum(s.nbytes for s in INVENTORY)


async def test_fusion_groups_share_a_bucket(fleet):
    """q/k/v of one layer always land in one bucket, even with tiny buckets."""
    _, _, _, client = fleet
    assignment, report = await run_round(client, 1, bucket_size_bytes=256)
    assert report.committed
    where = {e.name: b.index for b, e in assignment.plan.entries()}
    qkv = {where[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"}
    assert len(qkv) == 1


async def test_checksum_mismatch_flags_daemon_and_next_round_resyncs(fleet):
    """A daemon whose bytes differ fails the round with the tensor named, is flagged dirty, and is cleared by the next full round."""
    server, agents, handlers, client = fleet
    handlers["d1"].corrupt = {"model.norm.weight"}
    _, report = await run_round(client, 1)
    assert report.state == "FAILED"
    by_id = {v.daemon_id: v for v in report.results}
    assert by_id["d1"].status == "CHECKSUM_MISMATCH"
    assert by_id["d1"].mismatched_tensors == ("model.norm.weight",)
    assert by_id["d0"].status == "OK" and by_id["d2"].status == "OK"
    with pytest.raises(RoundFailed, match="d1: CHECKSUM_MISMATCH"):
        report.raise_if_failed()
    daemons = {d.daemon_id: d for d in (await client.list_daemons()).daemons}
    assert daemons["d1"].dirty and not daemons["d0"].dirty
    handlers["d1"].corrupt = set()
    _, report = await run_round(client, 2)
    assert report.committed
    daemons = {d.daemon_id: d for d in (await client.list_daemons()).daemons}
    assert not daemons["d1"].dirty and daemons["d1"].served_version == 2


BAD = TensorSpec("model.layers.9.mlp.nope.weight", (4, 4), "bfloat16")


@pytest.mark.parametrize(
    "case, manifest, version, options, exc, needles",
    [
        ("unknown names", [*INVENTORY, BAD, TensorSpec("lm_head.bogus", (1,), "bfloat16")], 1, {}, InvalidArgument,
         ["unknown tensor 'model.layers.9.mlp.nope.weight'", "unknown tensor 'lm_head.bogus'"]),
        ("shape mismatch", [TensorSpec("model.norm.weight", (17,), "bfloat16")], 1, {}, InvalidArgument,
         ["'model.norm.weight' shape: expected [16], got [17]"]),
        ("dtype mismatch", [TensorSpec("model.norm.weight", (16,), "float32")], 1, {}, InvalidArgument,
         ["dtype: expected bfloat16", "got float32"]),
        ("duplicate names", [INVENTORY[-1], INVENTORY[-1]], 1, {}, InvalidArgument, ["duplicate tensor name 'model.norm.weight'"]),
        ("empty manifest", [], 1, {}, InvalidArgument, ["manifest is empty"]),
        ("too few daemons", INVENTORY, 1, {"min_daemons": 5}, Unavailable, ["expected at least 5, got 3"]),
        ("unknown transport", INVENTORY, 1, {"transport": "carrier-pigeon"}, InvalidArgument, ["options.transport"]),
        ("partial fusion group", [INVENTORY[1]], 1, {}, InvalidArgument, ["tensors of one module travel together"]),
    ],
)
async def test_bad_input_is_refused_then_valid_round_commits(fleet, case, manifest, version, options, exc, needles):
    """Each bad BeginUpdate gets its status code and a message naming the problem; a valid round commits after it."""
    _, _, handlers, client = fleet
    with pytest.raises(exc) as info:
        await client.begin_update(version, manifest, **{**RDV, **options})
    for needle in needles:
        assert needle in str(info.value), (case, str(info.value))
    assert not any(h.seen for h in handlers.values()), "no daemon may see a refused round"
    _, report = await run_round(client, version)
    assert report.committed


async def test_every_problem_is_listed_per_daemon(fleet):
    """One error lists every problem, for every daemon, not only the first."""
    _, _, _, client = fleet
    manifest = [BAD, TensorSpec("model.norm.weight", (3,), "bfloat16"), TensorSpec("model.layers.0.mlp.down_proj.weight", (16, 32), "float16")]
    with pytest.raises(InvalidArgument) as info:
        await client.begin_update(1, manifest, **RDV)
    msg = str(info.value)
    for d in ("d0", "d1", "d2"):
        assert f"daemon '{d}': unknown tensor" in msg
        assert f"daemon '{d}': tensor 'model.norm.weight' shape" in msg
        assert f"daemon '{d}': tensor 'model.layers.0.mlp.down_proj.weight' dtype" in msg


async def test_malformed_specs_and_stale_version(fleet):
    """Negative dims and unknown dtypes are INVALID_ARGUMENT; a version not above the last one is FAILED_PRECONDITION."""
    _, _, _, client = fleet
    from weightsync.v1 import weightsync_pb2 as pb

    stub_req = pb.BeginUpdateRequest(
        version=1,
        manifest=[pb.TensorSpec(name="a", shape=[-1, 2], dtype="bfloat16"), pb.TensorSpec(name="b", shape=[2], dtype="complex256")],
        options=pb.UpdateOptions(**RDV),
    )
    import grpc

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client._trainer.BeginUpdate(stub_req, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "negative dims" in info.value.details() and "unknown dtype 'complex256'" in info.value.details()
    _, report = await run_round(client, 5)
    assert report.committed
    with pytest.raises(FailedPrecondition, match="version 5 is stale"):
        await client.begin_update(5, INVENTORY, **RDV)
    with pytest.raises(FailedPrecondition, match="version 3 is stale"):
        await client.begin_update(3, INVENTORY, **RDV)


async def test_second_begin_refused_while_open(fleet):
    """A second BeginUpdate while a round is open is FAILED_PRECONDITION naming the open round."""
    _, _, _, client = fleet
    first = await client.begin_update(1, INVENTORY, **RDV)
    with pytest.raises(FailedPrecondition, match=f"update {first.update_id} .* is still open"):
        await client.begin_update(2, INVENTORY, **RDV)
    report = await client.commit_update(first, trainer_checksums(first))
    assert report.committed


async def test_abort_cancels_daemons(fleet):
    """AbortUpdate ends the round ABORTED, cancels the daemons' work and flags them dirty."""
    server, agents, handlers, client = fleet
    for h in handlers.values():
        h.delay_s = 30
    a = await client.begin_update(1, INVENTORY, **RDV)
    await wait_until(lambda: all(h.seen for h in handlers.values()))
    report = await client.abort_update(a.update_id, "trainer step failed")
    assert report.state == "ABORTED" and "trainer step failed" in report.reason
    await wait_until(lambda: all(h.cancelled == 1 for h in handlers.values()))
    # A daemon is offered rounds again once its handler has reported the cancelled round.
    await wait_until(lambda: all(d.healthy for d in server.coordinator.daemons.values()))
    assert (await client.commit_update(a, trainer_checksums(a))).state == "ABORTED"
    with pytest.raises(FailedPrecondition, match="already ended as ABORTED"):
        await client.abort_update(a.update_id, "again")
    with pytest.raises(NotFound):
        await client.abort_update("nope", "x")
    assert all(d.dirty for d in (await client.list_daemons()).daemons)
    for h in handlers.values():
        h.delay_s = 0
    _, report = await run_round(client, 2)
    assert report.committed
    assert not any(d.dirty for d in (await client.list_daemons()).daemons)


async def test_deadline_expiry_times_out(fleet):
    """A daemon that does not finish by the round deadline is TIMED_OUT and the commit returns promptly."""
    _, _, handlers, client = fleet
    handlers["d2"].delay_s = 30
    t0 = time.monotonic()
    a = await client.begin_update(1, INVENTORY, deadline_s=1.0, **RDV)
    report = await client.commit_update(a, trainer_checksums(a))
    assert time.monotonic() - t0 < 5
    assert report.state == "TIMED_OUT"
    by_id = {v.daemon_id: v for v in report.results}
    assert by_id["d2"].status == "TIMED_OUT" and "deadline of 1 s passed" in by_id["d2"].reason
    assert by_id["d0"].status == "OK"


async def test_trainer_silent_times_out(fleet):
    """A trainer that never commits cannot hold the fleet: the deadline ends the round and the next one begins."""
    _, _, _, client = fleet
    await client.begin_update(1, INVENTORY, deadline_s=1.0, **RDV)
    server = fleet[0]
    await wait_until(lambda: server.coordinator.open_round is None, 10)
    rounds = await client.list_rounds()
    assert rounds[0].state == "TIMED_OUT" and "before the trainer sent its checksums" in rounds[0].reason
    _, report = await run_round(client, 2)
    assert report.committed


async def test_daemon_failure_is_reported(fleet):
    """A handler exception comes back as FAILED with its reason, naming the daemon."""
    _, _, handlers, client = fleet
    handlers["d0"].fail = "receiver rank 1: connection reset"
    _, report = await run_round(client, 1)
    by_id = {v.daemon_id: v for v in report.results}
    assert report.state == "FAILED"
    assert by_id["d0"].status == "FAILED" and "connection reset" in by_id["d0"].reason


async def test_heartbeats_do_not_stall_behind_tensor_work():
    """A handler that blocks a thread for 2x the heartbeat timeout still commits: heartbeats run on their own."""
    server = await start_coordinator()
    try:
        agent = await start_agent(server.address, "slow", ScriptedHandler(blocking_s=2 * FAST.heartbeat_timeout_s))
        async with TrainerClient(server.address) as client:
            _, report = await run_round(client, 1)
        assert report.committed, report
        assert agent.sessions_opened == 1
        await agent.close(1)
    finally:
        await server.stop(0.5)


async def test_late_joiner_is_stale_until_full_sync():
    """A daemon that registers behind the committed version is flagged stale; a full round clears it."""
    server = await start_coordinator()
    try:
        a = await start_agent(server.address, "early")
        async with TrainerClient(server.address) as client:
            await run_round(client, 1)
            late = await start_agent(server.address, "late")
            daemons = {d.daemon_id: d for d in (await client.list_daemons()).daemons}
            assert daemons["late"].stale and not daemons["early"].stale
            _, report = await run_round(client, 2)
            assert report.committed
            daemons = {d.daemon_id: d for d in (await client.list_daemons()).daemons}
            assert not daemons["late"].stale and daemons["late"].served_version == 2
        await a.close(1)
        await late.close(1)
    finally:
        await server.stop(0.5)


def test_sync_client_round():
    """The blocking client runs a whole round for training loops without asyncio."""

    async def setup():
        server = await start_coordinator()
        agent = await start_agent(server.address, "d")
        return server, agent

    loop = asyncio.new_event_loop()
    import threading

    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    server, agent = asyncio.run_coroutine_threadsafe(setup(), loop).result()
    try:
        with SyncTrainerClient(server.address) as client:
            a = client.begin_update(1, INVENTORY, **RDV)
            report = client.commit_update(a, trainer_checksums(a))
            assert report.committed
            assert client.list_daemons().daemons[0].served_version == 1
    finally:
        asyncio.run_coroutine_threadsafe(agent.close(1), loop).result()
        asyncio.run_coroutine_threadsafe(server.stop(0.5), loop).result()
        loop.call_soon_threadsafe(loop.stop)
