"""Refusals that read well at scale: problems grouped by kind with counts and examples, fixes named."""

from __future__ import annotations

import pytest

from tests.control.helpers import start_agent, start_coordinator
from weightsync.control.trainer_client import TrainerClient
from weightsync.core import InvalidArgument, TensorSpec
from weightsync.core.problems import Problems, group_by_subject
from weightsync.engine.inventory import check_update

RDV = {"rendezvous_host": "127.0.0.1", "rendezvous_port": 1}
LAYERS = 24
# An engine that keeps experts per expert (the checkpoint's names)...
ENGINE = tuple(
    TensorSpec(f"model.layers.{i}.mlp.experts.{e}.down_proj.weight", (16, 32), "bfloat16") for i in range(LAYERS) for e in range(3)
)
# ...and a trainer that sends them fused (transformers' in-memory names): 72 names the engine does not know.
TRAINER = tuple(TensorSpec(f"model.layers.{i}.mlp.experts.down_proj.{e}", (16, 32), "bfloat16") for i in range(LAYERS) for e in range(3))


def test_small_kinds_keep_their_clauses_large_ones_become_one_line():
    """Up to three problems of a kind are listed in full; more become a count, three examples and the hint."""
    p = Problems()
    for i in range(3):
        p.add("unknown tensors", f"unknown tensor 't{i}'", f"t{i}")
    assert p.render() == ["unknown tensor 't0'", "unknown tensor 't1'", "unknown tensor 't2'"]
    p.add("unknown tensors", "unknown tensor 't3'", "t3")
    p.hint("unknown tensors", "the engine has 'u0' instead")
    assert p.render() == ["4 unknown tensors, e.g. 't0', 't1', 't2', ... (1 more); the engine has 'u0' instead"]
    lines = group_by_subject({f"d{i}": ["x"] for i in range(5)} | {"odd": ["y"]}, "daemon")
    assert lines == ["5 daemons ('d0', 'd1', 'd2', ... (2 more)): x", "daemon 'odd': y"]


async def test_seventy_two_unknown_tensors_on_five_daemons_is_one_line():
    """A wrong naming scheme against five daemons gives one short line: the count, examples, and what the engines have instead."""
    server = await start_coordinator()
    agents = [await start_agent(server.address, f"d{i}", inventory=ENGINE) for i in range(5)]
    try:
        async with TrainerClient(server.address) as client:
            with pytest.raises(InvalidArgument) as info:
                await client.begin_update(1, list(TRAINER), **RDV)
    finally:
        for a in agents:
            await a.close()
        await server.stop(0)
    msg = str(info.value)
    assert "5 daemons ('d0', 'd1', 'd2', ... (2 more)): 72 unknown tensors, e.g. 'model.layers.0.mlp.experts.down_proj.0'" in msg, msg
    assert "the engine's inventory has e.g. 'model.layers.0.mlp.experts.0.down_proj.weight'" in msg, msg
    assert msg.count("unknown tensor") == 1 and len(msg) < 600, msg


async def test_dtype_mismatch_names_the_fix_in_the_api_and_the_cli():
    """A trainer sending float32 to bfloat16 engines is told `WeightSync(dtype='bfloat16')` and `weightsync push --dtype bfloat16`."""
    server = await start_coordinator()
    agent = await start_agent(server.address, "d0", inventory=ENGINE)
    try:
        async with TrainerClient(server.address) as client:
            with pytest.raises(InvalidArgument) as info:
                await client.begin_update(1, [TensorSpec(s.name, s.shape, "float32") for s in ENGINE], **RDV)
    finally:
        await agent.close()
        await server.stop(0)
    msg = str(info.value)
    assert "72 dtype mismatches" in msg and "WeightSync(dtype='bfloat16')" in msg and "weightsync push --dtype bfloat16" in msg, msg


def test_engine_check_update_groups_too():
    """The engine's own check (vLLM worker side) groups the same way and names the dtype fix."""
    inventory = {s.name: s for s in ENGINE}
    with pytest.raises(InvalidArgument) as info:
        check_update(inventory, TRAINER)
    assert len(info.value.problems) == 1 and info.value.problems[0].startswith("72 unknown tensors, e.g. "), info.value.problems
    with pytest.raises(InvalidArgument) as info:
        check_update(inventory, [TensorSpec(ENGINE[0].name, ENGINE[0].shape, "float16")])
    assert "WeightSync(dtype='bfloat16')" in str(info.value)
