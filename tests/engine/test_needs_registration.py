"""Receivers' needs at registration: carried by a real agent to a real coordinator, kept on its record, shown, validated."""

from __future__ import annotations

import json

import grpc
import pytest

from tests.control.helpers import INVENTORY, ScriptedHandler, start_agent, start_coordinator
from weightsync.control.daemon_agent import DaemonAgent, DaemonIdentity
from weightsync.control.trainer_client import TrainerClient
from weightsync.core.rank_regions import RankRegions
from weightsync.core.regions import Region
from weightsync.runtime.status import status_json
from weightsync.v1 import weightsync_pb2 as pb
from weightsync.v1 import weightsync_pb2_grpc as pb_grpc

SPECS = {s.name: s for s in INVENTORY}
BF16 = 2
# What a TP=2 engine's two workers declare: q/k/v rows, down_proj columns, embedding rows, the norm whole.
NEEDS = tuple(
    RankRegions(
        rank,
        {
            "model.embed_tokens.weight": Region(0, 32 * rank, 32),
            "model.layers.0.self_attn.q_proj.weight": Region(0, 8 * rank, 8),
            "model.layers.0.self_attn.k_proj.weight": Region(0, 4 * rank, 4),
            "model.layers.0.self_attn.v_proj.weight": Region.whole(),
            "model.layers.0.mlp.down_proj.weight": Region(1, 16 * rank, 16),
            "model.norm.weight": Region.whole(),
        },
        whole_fallbacks=1,
    )
    for rank in range(2)
)


def _reg(**kw) -> pb.RegisterDaemonRequest:
    base = dict(daemon_id="bad", engine="vllm", num_ranks=2, transports=["gloo"],
                inventory=[pb.TensorSpec(name=s.name, shape=list(s.shape), dtype=s.dtype) for s in INVENTORY])
    return pb.RegisterDaemonRequest(**{**base, **kw})


def _needs_pb(*entries: tuple[int, list[tuple[str, int, int, int]], int]) -> list[pb.RankRegions]:
    return [
        pb.RankRegions(rank=rank, whole_fallbacks=fallbacks, regions=[
            pb.TensorRegion(name=n, region=pb.Region(dim=d, start=s, length=l)) for n, d, s, l in regions
        ])
        for rank, regions, fallbacks in entries
    ]


async def test_declared_needs_reach_the_record_and_listing():
    """An agent's needs per rank arrive on the coordinator's record as declared; ListDaemons shows bytes per rank and fallbacks."""
    server = await start_coordinator()
    agents = []
    try:
        ident = DaemonIdentity(daemon_id="tp2", engine="vllm", model="tiny", host="127.0.0.1", inventory=INVENTORY,
                               num_ranks=2, needs=NEEDS)
        agents.append(DaemonAgent(server.address, ident, ScriptedHandler(), reconnect_max_s=0.5))
        agents[0].start()
        await agents[0].wait_connected(10)
        agents.append(await start_agent(server.address, "whole", engine="memory"))
        rec = server.coordinator.daemons["tp2"]
        assert rec.needs == NEEDS and rec.num_ranks == 2
        assert server.coordinator.daemons["whole"].needs == ()
        async with TrainerClient(server.address) as c:
            response = await c.list_daemons()
        listed = {d.daemon_id: d for d in response.daemons}
        shown = {d["daemonId"]: d for d in json.loads(status_json(response, pb.ListRoundsResponse()))["daemons"]}
        assert shown["tp2"]["wholeFallbacks"] == 2 and len(shown["tp2"]["neededBytesPerRank"]) == 2
        per_rank = [(32 * 16 + 8 * 16 + 4 * 16 + 8 * 16 + 16 * 16 + 16) * BF16] * 2
        assert list(listed["tp2"].needed_bytes_per_rank) == per_rank
        assert listed["tp2"].whole_fallbacks == 2
        assert list(listed["whole"].needed_bytes_per_rank) == [sum(s.nbytes for s in INVENTORY)]
        assert per_rank[0] < sum(s.nbytes for s in INVENTORY)
    finally:
        for agent in agents:
            await agent.close()
        await server.stop(0.5)


@pytest.mark.parametrize(
    "needs, code, needles",
    [
        (_needs_pb((0, [], 0)), grpc.StatusCode.INVALID_ARGUMENT, ["needs: expected one entry per receiver rank (num_ranks 2) or none, got 1"]),
        (_needs_pb((0, [], 0), (0, [], 0)), grpc.StatusCode.INVALID_ARGUMENT, ["needs: ranks expected 0..1 once each, got [0, 0]"]),
        (_needs_pb((0, [("model.nope", -1, 0, 0)], 0), (1, [], 0)), grpc.StatusCode.INVALID_ARGUMENT,
         ["needs[0] (rank 0): tensor 'model.nope' is not in the inventory"]),
        (_needs_pb((0, [("model.norm.weight", 0, 8, 16)], 0), (1, [], 0)), grpc.StatusCode.INVALID_ARGUMENT,
         ["needs[0] (rank 0) tensor 'model.norm.weight': expected 0 <= start < start + length <= 16", "got start 8, length 16"]),
        (_needs_pb((0, [("model.norm.weight", 3, 0, 1)], 0), (1, [], 0)), grpc.StatusCode.INVALID_ARGUMENT,
         ["tensor 'model.norm.weight': dim expected 0..0", "got 3"]),
        (_needs_pb((0, [("model.norm.weight", -1, 0, 0), ("model.norm.weight", -1, 0, 0)], 0), (1, [], 0)),
         grpc.StatusCode.INVALID_ARGUMENT, ["needs[0].regions[1]: tensor 'model.norm.weight' appears twice"]),
        (_needs_pb((0, [("model.norm.weight", -1, 0, 0)], 2), (1, [], 0)), grpc.StatusCode.INVALID_ARGUMENT,
         ["needs[0]: rank 0: whole_fallbacks expected 0..1", "got 2"]),
        (_needs_pb((0, [(s.name, -1, 0, 0) for s in INVENTORY] * 3, 0), (1, [], 0)), grpc.StatusCode.RESOURCE_EXHAUSTED,
         ["18 regions in all", "at most one region per inventory tensor (6)"]),
    ],
)
async def test_bad_needs_are_refused_naming_field_expected_and_actual(needs, code, needles):
    """Wrong rank counts, unknown tensors, regions outside their tensor, duplicates and oversized declarations are refused before any record exists."""
    server = await start_coordinator()
    try:
        async with grpc.aio.insecure_channel(server.address) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.DaemonServiceStub(ch).RegisterDaemon(_reg(needs=needs), timeout=10)
        assert info.value.code() == code, info.value
        for needle in needles:
            assert needle in info.value.details(), (needle, info.value.details())
        assert not server.coordinator.daemons
    finally:
        await server.stop(0.5)


def test_many_unknown_names_are_grouped():
    """Many unknown names in needs give one grouped line, not one per tensor; more regions than tensors is refused by count."""
    from weightsync.control.validation import check_needs

    bad = RankRegions(0, {f"model.layers.{i}.x.weight": Region.whole() for i in range(5)})
    assert check_needs((bad,), SPECS, 1) == [
        "5 regions of unknown tensors, e.g. 'model.layers.0.x.weight', 'model.layers.1.x.weight', 'model.layers.2.x.weight', "
        "... (2 more); needs name inventory tensors only (the engine's checkpoint names)"
    ]
    many = RankRegions(0, {f"w{i}": Region.whole() for i in range(7)})
    assert check_needs((many,), SPECS, 1) == ["needs[0] (rank 0): 7 regions: expected at most 6 (one per inventory tensor)"]
    assert check_needs((), SPECS, 4) == []
