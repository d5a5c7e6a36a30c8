"""Bounded input: registrations validated like manifests, listings that cannot be broken, no stalled loop (issue 10, item 7)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import free_port
from tests.control.helpers import INVENTORY, ScriptedHandler, start_agent, start_coordinator, trainer_checksums, wait_until
from tests.control.test_processes import ROOT, spawn_coordinator, stop_process, wait_serving
from weightsync.control.coordinator import CoordinatorConfig
from weightsync.control.trainer_client import TrainerClient
from weightsync.core import InvalidArgument
from weightsync.v1 import weightsync_pb2 as pb
from weightsync.v1 import weightsync_pb2_grpc as pb_grpc

RDV = dict(rendezvous_host="127.0.0.1", rendezvous_port=29999)
SMALL = CoordinatorConfig(heartbeat_interval_s=0.2, heartbeat_timeout_s=1.0, default_deadline_s=20.0, rounds_kept=3,
                          lost_expiry_s=2.0, max_inventory_tensors=100, max_tensor_bytes=1 << 30, max_inventory_bytes=2 << 30)


def _reg(**kw) -> pb.RegisterDaemonRequest:
    base = dict(daemon_id="x", engine="test", num_ranks=1, transports=["gloo"],
                inventory=[pb.TensorSpec(name=s.name, shape=list(s.shape), dtype=s.dtype) for s in INVENTORY])
    return pb.RegisterDaemonRequest(**{**base, **kw})


async def test_registrations_are_bounded_and_name_the_field():
    """Overflowing or oversized shapes, absurd tensor counts, num_ranks and labels are refused naming the field and the limit."""
    server = await start_coordinator(SMALL)
    cases = [
        (dict(inventory=[pb.TensorSpec(name="w", shape=[2**62, 2**62], dtype="float32")]), grpc.StatusCode.INVALID_ARGUMENT, ["inventory[0]", "max_tensor_bytes"]),
        (dict(inventory=[pb.TensorSpec(name=f"w{i}", shape=[1 << 14, 1 << 14], dtype="float32") for i in range(3)]),
         grpc.StatusCode.INVALID_ARGUMENT, ["inventory:", "max_inventory_bytes"]),
        (dict(inventory=[pb.TensorSpec(name=f"w{i}", shape=[1], dtype="float32") for i in range(101)]),
         grpc.StatusCode.RESOURCE_EXHAUSTED, ["101 tensors", "max_inventory_tensors"]),
        (dict(num_ranks=10**6), grpc.StatusCode.INVALID_ARGUMENT, ["num_ranks", "1..4096"]),
        (dict(engine="e" * 5000), grpc.StatusCode.INVALID_ARGUMENT, ["engine", "1024"]),
        (dict(served_version=-5), grpc.StatusCode.INVALID_ARGUMENT, ["served_version", "-5"]),
        (dict(inventory=[pb.TensorSpec(name="w", shape=[2**62] * 100_000, dtype="float32")]), grpc.StatusCode.INVALID_ARGUMENT, ["inventory[0]", "100000 dims"]),
        (dict(inventory=[pb.TensorSpec(name="n" * 2000, shape=[1], dtype="float32")]), grpc.StatusCode.INVALID_ARGUMENT, ["inventory[0]", "1024"]),
    ]
    try:
        async with grpc.aio.insecure_channel(server.address) as ch:
            stub = pb_grpc.DaemonServiceStub(ch)
            for kw, code, needles in cases:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.RegisterDaemon(_reg(**kw), timeout=10)
                assert info.value.code() == code, (kw.keys(), info.value)
                for needle in needles:
                    assert needle in info.value.details(), (needle, info.value.details())
        assert not server.coordinator.daemons
        async with TrainerClient(server.address) as c:
            with pytest.raises(InvalidArgument, match=r"options.deadline_s: expected 0 \(the default\) or 1\.\.86400 s, got 0.5"):
                await c.begin_update(1, INVENTORY, deadline_s=0.5, **RDV)
    finally:
        await server.stop(0.5)


async def test_lost_daemons_expire_and_round_history_is_bounded():
    """A daemon without a session is forgotten after lost_expiry_s; only rounds_kept rounds are kept."""
    server = await start_coordinator(SMALL)
    keeper = await start_agent(server.address, "keeper")
    leaver = await start_agent(server.address, "leaver")
    try:
        async with TrainerClient(server.address) as c:
            for v in range(1, 6):
                a = await c.begin_update(v, INVENTORY, **RDV)
                assert (await c.commit_update(a, trainer_checksums(a))).committed
            assert [r.version for r in await c.list_rounds(100)] == [5, 4, 3]
            await leaver.close(1)
            await wait_until(lambda: server.coordinator.daemons["leaver"].state.value == "LOST", 5)
            await wait_until(lambda: "leaver" not in server.coordinator.daemons, SMALL.lost_expiry_s + 5)
            assert [d.daemon_id for d in (await c.list_daemons()).daemons] == ["keeper"]
    finally:
        await keeper.close(1)
        await server.stop(0.5)


def test_lost_expiry_is_in_help_with_default_and_unit():
    """`weightsync coordinator --help` shows --lost-expiry-s with its default and unit, and the other limits."""
    out = subprocess.run([sys.executable, "-m", "weightsync.runtime.cli", "coordinator", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    text = " ".join(out.stdout.split())
    assert "--lost-expiry-s" in text and "(default: 3600.0 s)" in text, text
    for flag in ("--state-file", "--rounds-kept", "--max-daemons", "--max-inventory-tensors", "--max-tensor-bytes", "--max-inventory-bytes"):
        assert flag in text


@pytest.mark.slow
async def test_huge_daemon_errors_and_fuzzed_registrations_cannot_break_listings():
    """Daemons reporting 20 MB errors and fuzzed registrations leave ListRounds, ListDaemons and `weightsync status` working."""
    import random

    from tests.control.test_fuzz import _register

    server = await start_coordinator()
    agents = [await start_agent(server.address, f"d{i}", ScriptedHandler(fail="x" * (20 << 20))) for i in range(2)]
    rng = random.Random(7)
    try:
        async with TrainerClient(server.address) as c:
            # One round: 2 x 20 MB in the results plus 40 MB in the round's reason is past the 64 MB message limit.
            a = await c.begin_update(1, INVENTORY, **RDV)
            report = await c.commit_update(a, trainer_checksums(a))
            assert report.state == "FAILED"
        async with grpc.aio.insecure_channel(server.address, options=[("grpc.max_send_message_length", 128 << 20)]) as ch:
            stub = pb_grpc.DaemonServiceStub(ch)
            for _ in range(60):
                req = _register(rng)
                req.served_version = rng.choice([-1, 0, 2**63 - 1, 10**12])
                try:
                    await stub.RegisterDaemon(req, timeout=10)
                except grpc.aio.AioRpcError as e:
                    assert e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ALREADY_EXISTS), e
        async with TrainerClient(server.address) as c:
            rounds = await c.list_rounds(1000)
            assert [r.version for r in rounds] == [1] and all(len(r.reason) < 10_000 for r in rounds)
            listed = await c.list_daemons()
            assert listed.version_floor == 1  # no registration moved it
        out = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "weightsync.runtime.cli", "status", "--coordinator", server.address, "--json"],
            cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr[-2000:]
        assert json.loads(out.stdout)["version_floor"] == 1
    finally:
        for a in agents:
            await a.close(1)
        await server.stop(0.5)


@pytest.mark.slow
async def test_large_registration_does_not_stall_heartbeats():
    """A 200k-tensor (about 25 MB) registration to a real coordinator process: its event loop answers within a heartbeat interval throughout, other daemons stay alive."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    interval_s = 1.0
    proc = spawn_coordinator(port, "--heartbeat-interval-s", str(interval_s), "--heartbeat-timeout-s", "3.0")
    agents, big = [], None
    try:
        await wait_serving(address)
        agents = [await start_agent(address, f"d{i}") for i in range(2)]
        big = subprocess.Popen([sys.executable, "-m", "tests.control._big_register", address, "200000"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        worst_s = 0.0
        async with grpc.aio.insecure_channel(address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            deadline = time.monotonic() + 120
            while big.poll() is None:
                assert time.monotonic() < deadline, "the large registration did not finish"
                t0 = time.monotonic()
                await health.Check(health_pb2.HealthCheckRequest(), timeout=30)
                worst_s = max(worst_s, time.monotonic() - t0)
                await asyncio.sleep(0.05)
        out = big.stdout.read()
        assert big.returncode == 0 and "registered" in out, out
        print(f"large registration: {out.split()}, worst health-check latency {worst_s:.3f} s")
        assert worst_s < interval_s, f"the coordinator's loop stalled {worst_s:.2f} s (heartbeat interval {interval_s} s)"
        assert all(a.sessions_opened == 1 and a.connected.is_set() for a in agents), [a.last_error for a in agents]
        async with TrainerClient(address) as c:
            listed = {d.daemon_id: d for d in (await c.list_daemons()).daemons}
            assert listed["big"].num_tensors == 200000 and all(listed[f"d{i}"].state == 1 for i in range(2))
    finally:
        for a in agents:
            await a.close(1)
        if big is not None and big.poll() is None:
            big.kill()
            big.wait(10)
        stop_process(proc)
