"""Random and malformed requests to every RPC: each gets a proper status, state is untouched, a valid round commits after."""

from __future__ import annotations

import random
import resource

import grpc
import pytest

from tests.control.helpers import INVENTORY, start_agent, start_coordinator, trainer_checksums
from weightsync.control.trainer_client import TrainerClient
from weightsync.v1 import weightsync_pb2 as pb

RDV = dict(rendezvous_host="127.0.0.1", rendezvous_port=29999)
ACCEPTABLE = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}


def _name(rng: random.Random) -> str:
    return rng.choice([
        "", "x" * 5000, "model.norm.weight", "\x00\x01bad", "model.layers.0.self_attn.q_proj.weight", "lm_head.weight",
        "".join(chr(rng.randint(0x20, 0x2FFF)) for _ in range(rng.randint(1, 30))),
    ])


def _spec(rng: random.Random) -> pb.TensorSpec:
    shape = [rng.choice([-(2**40), -1, 0, 1, 16, 2**62, rng.randint(0, 64)]) for _ in range(rng.randint(0, 5))]
    dtype = rng.choice(["bfloat16", "float32", "", "complex256", "BFLOAT16", "float8", "int4", "\u00e9"])
    return pb.TensorSpec(name=_name(rng), shape=shape, dtype=dtype)


def _begin(rng: random.Random) -> pb.BeginUpdateRequest:
    n = rng.choice([0, 1, 3, 50, 3000])
    opts = pb.UpdateOptions(
        transport=rng.choice(["gloo", "nccl", "", "tcp", "cuda_ipc"]),
        bucket_size_bytes=rng.choice([0, -5, 1, 2**40, 1 << 20]),
        deadline_s=rng.choice([0.0, -1.0, 1e9, float("nan"), 2.0]),
        min_daemons=rng.choice([-3, 0, 1, 1000]),
        daemon_ids=rng.choice([[], ["nope"], ["d0", "d0"]]),
        rendezvous_host=rng.choice(["", "127.0.0.1", "::::"]),
        rendezvous_port=rng.choice([0, -1, 70000, 29999]),
        collective_timeout_s=rng.choice([0.0, -2.0, float("inf")]),
    )
    return pb.BeginUpdateRequest(version=rng.choice([-(2**63), -1, 0, 2**63 - 1]), manifest=[_spec(rng) for _ in range(n)], options=opts)


def _register(rng: random.Random) -> pb.RegisterDaemonRequest:
    return pb.RegisterDaemonRequest(
        daemon_id=rng.choice(["", "x" * 1000, "\x07bell", "fuzz-daemon"]),
        engine="fuzz",
        num_ranks=rng.choice([-1, 0, 1, 10**6]),
        inventory=[_spec(rng) for _ in range(rng.choice([0, 1, 5]))],
        transports=rng.choice([[], ["gloo"], ["smoke-signals"]]),
        served_version=rng.choice([-1, 2**62]),
    )


async def _expect_status(coro, tried: list[str], kind: str) -> None:
    tried.append(kind)
    try:
        await coro
    except grpc.aio.AioRpcError as e:
        assert e.code() in ACCEPTABLE, (kind, e.code(), e.details())
        assert e.details(), kind


async def test_fuzz_every_rpc():
    """Hundreds of random and malformed calls get proper statuses; the coordinator keeps its state and memory; a valid round commits after."""
    server = await start_coordinator()
    agents = [await start_agent(server.address, f"d{i}") for i in range(2)]
    rng = random.Random(1234)
    tried: list[str] = []
    c = server.coordinator
    try:
        async with grpc.aio.insecure_channel(server.address, options=[("grpc.max_send_message_length", 128 << 20)]) as ch:
            from weightsync.v1 import weightsync_pb2_grpc as g

            trainer, daemon, inspect = g.TrainerServiceStub(ch), g.DaemonServiceStub(ch), g.InspectionServiceStub(ch)
            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            for _ in range(120):
                await _expect_status(trainer.BeginUpdate(_begin(rng), timeout=5), tried, "BeginUpdate")
            for _ in range(40):
                await _expect_status(daemon.RegisterDaemon(_register(rng), timeout=5), tried, "RegisterDaemon")
            for _ in range(30):
                uid = rng.choice(["", "deadbeef", "x" * 300])
                await _expect_status(trainer.CommitUpdate(pb.CommitUpdateRequest(update_id=uid, checksums=[pb.TensorChecksum(name="a", checksum=1)] * rng.randint(0, 3)), timeout=5), tried, "CommitUpdate out of order")
                await _expect_status(trainer.AbortUpdate(pb.AbortUpdateRequest(update_id=uid), timeout=5), tried, "AbortUpdate out of order")
                await _expect_status(inspect.GetRound(pb.GetRoundRequest(update_id=uid), timeout=5), tried, "GetRound")
                await _expect_status(inspect.ListRounds(pb.ListRoundsRequest(limit=rng.choice([-5, 0, 10**9])), timeout=5), tried, "ListRounds")
            # Oversized: a 70 MB manifest is refused by the transport limit, not by crashing.
            huge = pb.BeginUpdateRequest(version=1, manifest=[pb.TensorSpec(name="n" * 1000, shape=[1], dtype="bfloat16")] * 70000)
            await _expect_status(trainer.BeginUpdate(huge, timeout=20), tried, "oversized")
            # Garbage bytes where protobuf is expected: unary and on the session stream.
            raw = ch.unary_unary("/weightsync.v1.TrainerService/BeginUpdate", request_serializer=lambda b: b, response_deserializer=lambda b: b)
            for _ in range(20):
                try:
                    await raw(bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 200))), timeout=5)
                except grpc.aio.AioRpcError as e:
                    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
                tried.append("garbage unary")
            stream = ch.stream_stream("/weightsync.v1.DaemonService/Connect", request_serializer=lambda b: b, response_deserializer=lambda b: b)
            for msgs in ([b"\xff\xfe\xfd"], [pb.DaemonMessage(heartbeat=pb.Heartbeat()).SerializeToString()],
                         [pb.DaemonMessage(hello=pb.SessionHello(daemon_id="d0", session_token="forged")).SerializeToString()],
                         [pb.DaemonMessage(hello=pb.SessionHello(daemon_id="ghost", session_token="x")).SerializeToString()]):
                call = stream(iter(msgs), timeout=5)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for _ in call:
                        pass
                assert info.value.code() in ACCEPTABLE, info.value
                tried.append("garbage stream")
            rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # State untouched: the two real daemons, no open round, no version consumed.
        registered = {d for d in c.daemons if d.startswith("d")}
        assert registered == {"d0", "d1"} and c.daemons["d0"].healthy and c.daemons["d1"].healthy
        assert c.open_round is None and c.max_version == -1 and not c.rounds
        assert rss_after - rss_before < 512 * 1024, f"coordinator grew by {(rss_after - rss_before) // 1024} MB"
        async with TrainerClient(server.address) as client:
            a = await client.begin_update(1, INVENTORY, **RDV)
            assert (await client.commit_update(a, trainer_checksums(a))).committed
        print(f"fuzz: tried {len(tried)} malformed calls")
        assert len(tried) >= 300
    finally:
        for a in agents:
            await a.close(1)
        await server.stop(0.5)
