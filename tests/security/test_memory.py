"""No unauthenticated memory: stalled streams cannot make a real coordinator process buffer large bodies (issue 10, item 8)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import free_port
from tests.control.helpers import INVENTORY, start_agent, trainer_checksums
from tests.control.test_processes import ROOT, stop_process, wait_serving
from weightsync.control.trainer_client import TrainerClient

pytestmark = pytest.mark.slow
RDV = dict(rendezvous_host="127.0.0.1", rendezvous_port=29999)
DAEMON_TOKEN, TRAINER_TOKEN = "d" * 24, "t" * 24
WINDOW_BYTES = 65535  # HTTP/2's initial stream window, which the coordinator keeps (no BDP probing)


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


class _Attack:
    """tests/control/_h2_stall.py in its own process: stalled RegisterDaemon streams announcing 60 MB each."""

    def __init__(self, port: int, connections: int, streams: int, token: str, path: str = "/weightsync.v1.DaemonService/RegisterDaemon") -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.control._h2_stall", "127.0.0.1", str(port), str(connections), str(streams), token, path],
                                     cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    async def line(self, prefix: str, timeout_s: float = 60) -> int:
        async with asyncio.timeout(timeout_s):
            while True:
                line = await asyncio.to_thread(self.proc.stdout.readline)
                assert line, "the attacker exited"
                if line.startswith(prefix):
                    return int(line.split()[1])

    def close(self) -> None:
        stop_process(self.proc)


async def test_stalled_streams_cannot_make_the_coordinator_buffer(tmp_path):
    """Bad-token streams are refused before their bodies are read; valid-token stalled uploads are bounded and cut at the read timeout; the fleet keeps working."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"daemon {DAEMON_TOKEN}\ntrainer {TRAINER_TOKEN}\n")
    port = free_port()
    address = f"127.0.0.1:{port}"
    read_timeout_s = 3.0
    coord = subprocess.Popen(
        [sys.executable, "-m", "weightsync.runtime.cli", "--log-level", "WARNING", "coordinator", "--listen", address,
         "--tokens-file", str(tokens), "--allow-insecure-tokens", "--max-concurrent-reads", "1",
         "--request-read-timeout-s", str(read_timeout_s)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    attacks: list[_Attack] = []
    agent = None
    try:
        await wait_serving(address)
        agent = await start_agent(address, "d0", token=DAEMON_TOKEN)
        base_mb = _rss_mb(coord.pid)

        # 1. A wrong token: 300 streams over 6 connections, each announcing 60 MB (18 GB in all).
        bad = _Attack(port, 6, 50, "x" * 24)
        attacks.append(bad)
        accepted = await bad.line("stalled")
        closed = 0
        while closed < 300:
            closed = await bad.line("closed", timeout_s=30)
        grown_mb = _rss_mb(coord.pid) - base_mb
        print(f"bad token: coordinator took {accepted / 2**20:.1f} MiB of 300 x 60 MB announced; RSS +{grown_mb:.1f} MB")
        assert accepted <= 300 * WINDOW_BYTES, accepted
        assert grown_mb < 48, f"the coordinator grew {grown_mb:.0f} MB for unauthenticated streams"

        # 2. A valid daemon token, 6 stalled uploads: one body at a time, all cut at the read timeout.
        good = _Attack(port, 6, 1, DAEMON_TOKEN)
        attacks.append(good)
        accepted = await good.line("stalled")
        t_stalled = time.monotonic()
        closed = 0
        while closed < 6:
            closed = await good.line("closed", timeout_s=read_timeout_s + 30)
        grown_mb = _rss_mb(coord.pid) - base_mb
        print(f"valid token: took {accepted / 2**20:.1f} MiB of 6 x 60 MB; all cut {time.monotonic() - t_stalled:.1f} s after stalling; RSS +{grown_mb:.1f} MB")
        assert accepted <= (60 << 20) + 6 * WINDOW_BYTES, accepted
        assert grown_mb < 120, f"the coordinator grew {grown_mb:.0f} MB for 6 stalled uploads (one read at a time allows ~64)"

        # 3. No token, to the health service that stays open: one body at a time, cut at the read timeout.
        health = _Attack(port, 6, 1, "-", "/grpc.health.v1.Health/Check")
        attacks.append(health)
        accepted = await health.line("stalled")
        closed = 0
        while closed < 6:
            closed = await health.line("closed", timeout_s=read_timeout_s + 30)
        grown_mb = _rss_mb(coord.pid) - base_mb
        print(f"open health service: took {accepted / 2**20:.1f} MiB of 6 x 60 MB; RSS +{grown_mb:.1f} MB")
        assert accepted <= (60 << 20) + 6 * WINDOW_BYTES, accepted
        assert grown_mb < 120, f"the coordinator grew {grown_mb:.0f} MB for 6 stalled health calls"

        # The fleet never noticed.
        assert agent.sessions_opened == 1 and agent.connected.is_set()
        async with TrainerClient(address, token=TRAINER_TOKEN) as c:
            a = await c.begin_update(1, INVENTORY, **RDV)
            assert (await c.commit_update(a, trainer_checksums(a))).committed
    finally:
        for a in attacks:
            a.close()
        if agent is not None:
            await agent.close(1)
        stop_process(coord)
