"""Control-plane benchmark: N daemon agents heartbeating against one coordinator.

Reports the coordinator's CPU share (heartbeats only, and during rounds) and the latency
from BeginUpdate until every daemon holds the plan. With --churn, one daemon in ten
disconnects and reconnects throughout (issue 6's load test).

    python bench/control_plane.py --daemons 256 --rounds 10 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from weightsync.core import TensorSpec  # noqa: E402

INVENTORY = tuple(TensorSpec(f"model.layers.{i}.mlp.down_proj.weight", (64, 64), "bfloat16") for i in range(24))


def _checksum(version: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{version}:{name}".encode()).digest()[:8], "little")


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _agents_main(address: str, first: int, count: int, churn: float, seed: int) -> None:
    from weightsync.control.daemon_agent import DaemonAgent, DaemonIdentity, HandlerResult

    rng = random.Random(seed)

    def make(i: int) -> DaemonAgent:
        daemon_id = f"bench-{i:04d}"

        async def handler(assignment, ranks, progress):
            print(f"ASSIGN {daemon_id} {assignment.update_id} {time.time():.6f}", flush=True)
            return HandlerResult({e.name: _checksum(assignment.version, e.name) for _, e in assignment.plan.entries()})

        ident = DaemonIdentity(daemon_id=daemon_id, engine="bench", model="none", host="127.0.0.1", inventory=INVENTORY)
        return DaemonAgent(address, ident, handler, rpc_timeout_s=30, reconnect_max_s=2.0)

    agents = {i: make(i) for i in range(first, first + count)}
    for a in agents.values():
        a.start()
    await asyncio.gather(*(a.wait_connected(120) for a in agents.values()))
    print("READY", flush=True)
    churners = [i for i in agents if rng.random() < churn]
    while True:
        await asyncio.sleep(1.0)
        if churners:
            # Disconnect one churner and bring it back: a daemon restart, as seen by the coordinator.
            i = rng.choice(churners)
            await agents[i].close(drain_timeout_s=0)
            agents[i] = make(i)
            agents[i].start()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _bench(args) -> dict:
    from weightsync.control.trainer_client import TrainerClient

    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    coord = subprocess.Popen(
        [sys.executable, "-m", "weightsync.runtime.cli", "--log-level", "WARNING", "coordinator", "--listen", f"127.0.0.1:{port}",
         "--heartbeat-interval-s", "1.0", "--heartbeat-timeout-s", "10"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    address = f"127.0.0.1:{port}"
    procs = []
    arrivals: dict[str, dict[str, float]] = {}
    ready = 0
    try:
        await asyncio.sleep(1.5)
        per = -(-args.daemons // args.agent_processes)
        for p in range(args.agent_processes):
            first, count = p * per, min(per, args.daemons - p * per)
            if count <= 0:
                break
            procs.append(await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--role", "agents", "--address", address, "--first", str(first), "--count", str(count),
                "--churn", str(args.churn), "--seed", str(p), env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            ))

        async def pump(proc):
            nonlocal ready
            async for line in proc.stdout:
                parts = line.decode().split()
                if parts[:1] == ["READY"]:
                    ready += 1
                elif parts[:1] == ["ASSIGN"]:
                    arrivals.setdefault(parts[2], {})[parts[1]] = float(parts[3])

        pumps = [asyncio.create_task(pump(p)) for p in procs]
        async with asyncio.timeout(300):
            while ready < len(procs):
                await asyncio.sleep(0.2)
        await asyncio.sleep(2.0)
        cpu0, t0 = _cpu_seconds(coord.pid), time.monotonic()
        await asyncio.sleep(args.idle_s)
        idle_share = (_cpu_seconds(coord.pid) - cpu0) / (time.monotonic() - t0)

        latencies, committed, outcomes = [], 0, []
        cpu0, t0 = _cpu_seconds(coord.pid), time.monotonic()
        async with TrainerClient(address, rpc_timeout_s=60) as client:
            for r in range(args.rounds):
                listed = await client.list_daemons()
                healthy = sum(1 for d in listed.daemons if d.state == 1)
                begun = time.time()
                a = await client.begin_update(r + 1, INVENTORY, rendezvous_host="127.0.0.1", rendezvous_port=29999,
                                              min_daemons=1, deadline_s=30)
                n = len(a.participants)
                # Commit at once: the coordinator waits for every result (or a lost session).
                report = await client.commit_update(a, {e.name: _checksum(a.version, e.name) for _, e in a.plan.entries()})
                ok = sum(v.status == "OK" for v in report.results)
                async with asyncio.timeout(10):
                    while len(arrivals.get(a.update_id, {})) < ok:
                        await asyncio.sleep(0.005)
                got = arrivals.get(a.update_id, {})
                latencies.append(max(got.values()) - begun)
                committed += report.committed
                outcomes.append({"version": r + 1, "healthy_before": healthy, "participants": n, "ok": ok,
                                 "state": report.state, "plan_latency_s": round(latencies[-1], 4),
                                 "round_s": round(report.duration_s, 4)})
                await asyncio.sleep(args.round_gap_s)
        rounds_share = (_cpu_seconds(coord.pid) - cpu0) / (time.monotonic() - t0)
        for t in pumps:
            t.cancel()
        return {
            "daemons": args.daemons,
            "churn": args.churn,
            "rounds": args.rounds,
            "rounds_committed": committed,
            "coordinator_cpu_share_heartbeats_only": round(idle_share, 4),
            "coordinator_cpu_share_with_rounds": round(rounds_share, 4),
            "plan_latency_ms_median": round(1000 * statistics.median(latencies), 1),
            "plan_latency_ms_max": round(1000 * max(latencies), 1),
            "per_round": outcomes,
            "hardware": f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or 'cpu'}",
            "python": platform.python_version(),
            "date": dt.date.today().isoformat(),
        }
    finally:
        for p in procs:
            p.kill()
        coord.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", default="bench", choices=["bench", "agents"])
    ap.add_argument("--daemons", type=int, default=256)
    ap.add_argument("--agent-processes", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--idle-s", type=float, default=10.0, help="window for the heartbeat-only CPU share")
    ap.add_argument("--round-gap-s", type=float, default=0.5)
    ap.add_argument("--churn", type=float, default=0.0, help="fraction of daemons that keep disconnecting and reconnecting")
    ap.add_argument("--json", default=None)
    ap.add_argument("--address")
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--count", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.role == "agents":
        asyncio.run(_agents_main(args.address, args.first, args.count, args.churn, args.seed))
        return
    result = asyncio.run(_bench(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
