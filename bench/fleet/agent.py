"""A trainer rank or a console inside an emulated host, driven by JSON lines on stdin.

    ip netns exec NS python -m bench.fleet.agent --coordinator ADDR [--rendezvous-host IP ...]

The orchestrator lives in the root namespace, from which no emulated host can be reached
(no host has a route out). So the trainer rank and the console that reads the coordinator's
state run inside hosts and answer over their stdin/stdout pipes. One request per line, one
answer per line:

    {"op": "push", "version": 3, "weights": PATH, "hold": false}   (+ "base": PATH, "base_version": 2: a delta round)
        -> {"event": "sent"} first when hold is true (then send {"op": "go"} to commit)
        -> {"event": "done", "state": ..., "daemons": {...}, "push_s": ..., ...} or {"event": "error", ...}
    {"op": "daemons"}          -> {"event": "daemons", "committed_version": N, "daemons": {...}}
    {"op": "rounds", "limit": 1} -> {"event": "rounds", "rounds": [...]}
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

__all__ = ["main"]

log = logging.getLogger(__name__)


def _reply(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _wait_go() -> None:
    line = sys.stdin.readline()
    if json.loads(line or "{}").get("op") != "go":
        raise RuntimeError(f"expected {{'op': 'go'}} after 'sent', got {line!r}")


def _report_dict(report) -> dict:
    return {
        "update_id": report.update_id,
        "version": report.version,
        "state": report.state,
        "reason": report.reason,
        "duration_s": report.duration_s,
        "total_bytes": report.total_bytes,
        "daemons": {v.daemon_id: v.status for v in report.results},
        "encodings": {v.daemon_id: v.encoding for v in report.results},
        "bytes_received": {v.daemon_id: v.bytes_received for v in report.results},
        "receive_s": {v.daemon_id: v.receive_s for v in report.results},
        "apply_s": {v.daemon_id: v.apply_s for v in report.results},
        "timeline": {v.daemon_id: v.timeline for v in report.results},
        "rank_bytes": {str(r): list(b) for r, b in report.rank_bytes.items()},
    }


class _Agent:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self._sync = None
        self._client = None

    def client(self):
        from weightsync.control.trainer_client import SyncTrainerClient

        if self._client is None:
            self._client = SyncTrainerClient(self.args.coordinator, rpc_timeout_s=self.args.rpc_timeout_s)
        return self._client

    def sync(self):
        from weightsync.runtime.trainer import WeightSync

        if self._sync is None and self.args.trainer_ranks > 1:
            import torch

            # The trainer's own world (its gloo group, as FSDP2's would be), across the trainer hosts.
            torch.distributed.init_process_group(
                "gloo", init_method=f"tcp://{self.args.trainer_master}", rank=self.args.trainer_rank, world_size=self.args.trainer_ranks
            )
        if self._sync is None:
            self._sync = WeightSync(
                self.args.coordinator,
                rendezvous_host=self.args.rendezvous_host,
                bucket_size_bytes=self.args.bucket_size_bytes,
                deadline_s=self.args.deadline_s,
                collective_timeout_s=self.args.collective_timeout_s,
                min_daemons=self.args.min_daemons,
                routed=self.args.trainer_ranks > 1,
            )
        return self._sync

    def _sharded(self, tensors: dict) -> dict:
        """FSDP2's layout without its traffic: each rank keeps its own dim-0 chunk of every tensor as a DTensor."""
        import torch
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Shard

        world, rank = self.args.trainer_ranks, self.args.trainer_rank
        mesh = init_device_mesh("cpu", (world,))
        out = {}
        for name, t in tensors.items():
            chunks = torch.chunk(t, world, dim=0)
            local = chunks[rank].contiguous() if rank < len(chunks) else t[:0]
            out[name] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=t.shape, stride=t.stride())
        return out

    def push(self, req: dict) -> dict:
        from weightsync.dataplane import load_named_tensors

        tensors = load_named_tensors(req["weights"])
        base = load_named_tensors(req["base"]) if req.get("base") else None
        sync = self.sync()
        if self.args.trainer_ranks > 1:
            tensors = self._sharded(tensors)
        if req.get("hold"):
            # A test hook, not product: the fault "trainer's link cut after sending, before commit"
            # needs a pause exactly there, and WeightSync.push does both in one call.
            if sync._client is None:
                raise ValueError("hold: only trainer rank 0 commits")
            client = sync._client
            commit = client.commit_update

            def held_commit(*a, **kw):
                _reply({"event": "sent"})
                _wait_go()
                return commit(*a, **kw)

            client.commit_update = held_commit
        t0 = time.monotonic()
        try:
            report = sync.push(tensors, version=req["version"], raise_on_failure=False, base=base, base_version=req.get("base_version"))
        finally:
            if req.get("hold"):
                del sync._client.commit_update
        push_s = time.monotonic() - t0
        if report is None:  # trainer ranks other than 0: their part is sent, rank 0 has the verdict
            return {"event": "done", "push_s": push_s, "rank": self.args.trainer_rank}
        sent = sync.last_send
        # The trainer's data-plane phases (seconds from the start of its send): opened, sent, closed.
        timeline = (
            dict(sent.timeline, seconds=sent.seconds, pack_s=sent.pack_s, checksum_s=sent.checksum_s)
            if sent is not None and sent.update_id == report.update_id
            else {}
        )
        return {"event": "done", "push_s": push_s, "sender_timeline": timeline, **_report_dict(report)}

    def daemons(self) -> dict:
        from weightsync.v1 import weightsync_pb2 as pb

        resp = self.client().list_daemons()
        return {
            "event": "daemons",
            "committed_version": resp.committed_version,
            "daemons": {
                d.daemon_id: {
                    "state": pb.DaemonState.Name(d.state).removeprefix("DAEMON_STATE_"),
                    "served_version": d.served_version,
                    "dirty": d.dirty,
                    "stale": d.stale,
                }
                for d in resp.daemons
            },
        }

    def rounds(self, req: dict) -> dict:
        return {"event": "rounds", "rounds": [_report_dict(r) for r in self.client().list_rounds(req.get("limit", 1))]}

    def handle(self, req: dict) -> dict:
        op = req.get("op")
        if op == "push":
            return self.push(req)
        if op == "daemons":
            return self.daemons()
        if op == "rounds":
            return self.rounds(req)
        raise ValueError(f"op {op!r}: expected push, daemons or rounds")

    def close(self) -> None:
        for c in (self._sync, self._client):
            if c is not None:
                c.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--coordinator", required=True)
    p.add_argument("--rendezvous-host", default=None, help="this host's address (trainer rank 0 hosts the store)")
    p.add_argument("--bucket-size-bytes", type=int, default=0)
    p.add_argument("--deadline-s", type=float, default=600.0)
    p.add_argument("--collective-timeout-s", type=float, default=120.0)
    p.add_argument("--min-daemons", type=int, default=1)
    p.add_argument("--trainer-rank", type=int, default=0, help="this trainer rank (routed rounds when --trainer-ranks > 1)")
    p.add_argument("--trainer-ranks", type=int, default=1, help="S: trainer ranks, each sending what it holds")
    p.add_argument("--trainer-master", default=None, help="HOST:PORT where trainer rank 0 forms the trainer's own gloo world")
    p.add_argument("--rpc-timeout-s", type=float, default=10.0)
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    agent = _Agent(args)
    _reply({"event": "ready"})
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                _reply(agent.handle(json.loads(line)))
            except Exception as e:  # process boundary: the orchestrator gets the error as an answer
                log.warning("request %s failed", line.strip(), exc_info=True)
                _reply({"event": "error", "error": f"{type(e).__name__}: {e}"})
    finally:
        agent.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
