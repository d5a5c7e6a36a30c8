"""Subcommands that move tensors: `weightsync daemon`, `weightsync push` (and the vLLM ones)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys

__all__ = ["add_subcommands"]

log = logging.getLogger(__name__)


def _default_daemon_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


async def _run_memory_daemon(args: argparse.Namespace) -> int:
    import torch

    from weightsync.control.daemon_agent import DaemonAgent, DaemonIdentity
    from weightsync.dataplane import MemoryEngine
    from weightsync.runtime.daemon import memory_engine_handler
    from weightsync.runtime.security import channel_credentials_from_args
    from weightsync.v1 import weightsync_pb2 as pb

    engine = MemoryEngine.from_path(args.weights)
    transports = ("gloo", "nccl") if torch.cuda.is_available() else ("gloo",)
    ident = DaemonIdentity(
        daemon_id=args.daemon_id or _default_daemon_id(),
        engine="memory",
        model=os.path.abspath(args.weights),
        host=args.host,
        inventory=tuple(engine.inventory()),
        transports=transports,
    )

    def on_verdict(v: pb.UpdateVerdict) -> None:
        if args.save_on_commit and v.status == pb.RESULT_STATUS_OK:
            engine.save(args.save_on_commit)
            log.info("saved version %d to %s", v.version, args.save_on_commit)

    agent = DaemonAgent(
        args.coordinator,
        ident,
        memory_engine_handler(engine),
        served_version=args.served_version,
        credentials=channel_credentials_from_args(args),
        token=args.token,
        on_verdict=on_verdict,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    agent.start()
    print(f"weightsync daemon {ident.daemon_id}: {len(ident.inventory)} tensors, coordinator {args.coordinator}", flush=True)
    writer = asyncio.create_task(_write_state_forever(agent, args.state_file)) if args.state_file else None
    await stop.wait()
    await agent.close(drain_timeout_s=args.drain_s)
    if writer is not None:
        writer.cancel()
    return 0


async def _write_state_forever(agent, path: str, interval_s: float = 0.1) -> None:
    """Keeps PATH (JSON) equal to the agent's own view of its engine: what it claims to serve, dirty, busy."""
    last = None
    while True:
        state = {"served_version": agent.served_version, "dirty": agent.dirty, "stale": agent.stale, "busy": agent.busy}
        if state != last:
            tmp = f"{path}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(state, f)
            os.replace(tmp, path)  # readers never see half a file
            last = state
        await asyncio.sleep(interval_s)


def _daemon(args: argparse.Namespace) -> int:
    if args.engine != "memory":
        raise SystemExit(f"--engine {args.engine!r}: expected 'memory' (for vLLM use `weightsync serve`)")
    return asyncio.run(_run_memory_daemon(args))


def _served_base_version(sync) -> int | None:
    """The one version the clean daemons serve: what --base must be when --base-version is not given.

    None when no daemon is clean: every one would get dense anyway, so the push is dense.
    """
    served = {d.served_version for d in sync.list_daemons() if not d.dirty and not d.stale and d.served_version >= 0}
    if not served:
        return None
    if len(served) != 1:
        raise SystemExit(
            f"--base: cannot infer its version: clean daemons serve {sorted(served) or 'none'}; expected exactly one, "
            "give --base-version"
        )
    return served.pop()


def _push(args: argparse.Namespace) -> int:
    from weightsync.dataplane import load_named_tensors
    from weightsync.runtime.security import channel_credentials_from_args
    from weightsync.runtime.trainer import WeightSync

    tensors = load_named_tensors(args.weights)
    base = load_named_tensors(args.base) if args.base else None
    if args.base_version is not None and base is None:
        raise SystemExit("--base-version: given without --base (the checkpoint of that version)")
    with WeightSync(
        args.coordinator,
        rendezvous_host=args.rendezvous_host,
        rendezvous_port=args.rendezvous_port,
        bind_host=args.bind_host,
        transport=args.transport,
        dtype=args.dtype,
        bucket_size_bytes=args.bucket_size_bytes,
        deadline_s=args.deadline_s,
        collective_timeout_s=args.collective_timeout_s,
        min_daemons=args.min_daemons,
        credentials=channel_credentials_from_args(args),
        token=args.token,
    ) as sync:
        base_version = args.base_version
        if base is not None and base_version is None:
            base_version = _served_base_version(sync)
            if base_version is None:
                base = None  # no clean daemon to take a delta
        report = sync.push(tensors, version=args.version, raise_on_failure=False, base=base, base_version=base_version)
    summary = {
        "update_id": report.update_id,
        "version": report.version,
        "state": report.state,
        "bytes": report.total_bytes,
        "tensors": report.num_tensors,
        "seconds": round(report.duration_s, 3),
        "daemons": {v.daemon_id: v.status for v in report.results},
        "encodings": {v.daemon_id: v.encoding for v in report.results},
        "wire_bytes": {v.daemon_id: v.bytes_received for v in report.results},
        "reason": report.reason,
    }
    print(json.dumps(summary) if args.json else " ".join(f"{k}={v}" for k, v in summary.items()))
    return 0 if report.committed else 1


def add_subcommands(sub, add_security) -> None:
    d = sub.add_parser("daemon", help="run an inference daemon (in-memory engine)")
    d.add_argument("--coordinator", required=True, help="HOST:PORT")
    d.add_argument("--engine", default="memory", choices=["memory"])
    d.add_argument("--weights", required=True, help="safetensors file or Hugging Face model directory")
    d.add_argument("--daemon-id", default=None)
    d.add_argument("--host", default=socket.gethostname(), help="this host, as shown by status")
    d.add_argument("--served-version", type=int, default=-1, help="the version the weights on disk are")
    d.add_argument("--save-on-commit", default=None, help="write the engine's tensors (safetensors) after each OK verdict")
    d.add_argument("--drain-s", type=float, default=30.0, help="on SIGTERM, wait this long for the current round")
    d.add_argument("--state-file", default=None, help="keep the daemon's own view (served version, dirty, busy) in this JSON file")
    add_security(d, server=False)
    d.set_defaults(func=_daemon)

    p = sub.add_parser("push", help="push a checkpoint from disk as one round (initial sync, rollback, test)")
    p.add_argument("--coordinator", required=True, help="HOST:PORT")
    p.add_argument("--weights", required=True, help="safetensors file or Hugging Face model directory")
    p.add_argument("--version", type=int, required=True)
    p.add_argument("--dtype", default=None, help="wire dtype (the engines' dtype); default: each tensor's own")
    p.add_argument("--transport", default="gloo", choices=["gloo", "nccl", "cuda_ipc"])
    p.add_argument("--rendezvous-host", default="127.0.0.1", help="address the daemons dial to reach this trainer")
    p.add_argument("--rendezvous-port", type=int, default=0, help="0: a free port")
    p.add_argument("--bind-host", default=None, help="interface the data-plane store listens on (default: --rendezvous-host)")
    p.add_argument("--bucket-size-bytes", type=int, default=0)
    p.add_argument("--deadline-s", type=float, default=600.0)
    p.add_argument("--collective-timeout-s", type=float, default=120.0)
    p.add_argument("--min-daemons", type=int, default=1)
    p.add_argument("--base", default=None, help="checkpoint the engines serve: send --weights as a delta against it")
    p.add_argument("--base-version", type=int, default=None, help="the version --base is (default: the one version clean daemons serve)")
    p.add_argument("--json", action="store_true")
    add_security(p, server=False)
    p.set_defaults(func=_push)

    try:
        from weightsync.runtime import vllm_commands
    except ImportError:
        return
    vllm_commands.add_subcommands(sub, add_security)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the `weightsync` command")
