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

__all__ = ["HelpFormatter", "add_subcommands", "default_daemon_id", "require_registration"]

log = logging.getLogger(__name__)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)


# Open lock files of the ids this process holds: closing one would free its id.
_held_ids: list = []


def default_daemon_id(host: str, key: str) -> str:
    """`HOST-KEY`, the same for every restart of one engine, so that it re-registers as itself.

    Two live processes with the same key on one host (e.g. two memory daemons of one
    checkpoint) must not share an id: the coordinator would take each registration for
    a restart of the other. Each id is held with an exclusive lock on a file under
    $WEIGHTSYNC_STATE_DIR (default: the system temp dir); a second process takes
    `HOST-KEY-2`, and so on. The kernel drops a lock when its process dies.
    """
    import fcntl
    import re
    import tempfile

    base = f"{host}-{key}"
    lock_dir = os.path.join(os.environ.get("WEIGHTSYNC_STATE_DIR") or tempfile.gettempdir(), "weightsync-daemon-ids")
    os.makedirs(lock_dir, exist_ok=True)
    for n in range(1, 1000):
        candidate = base if n == 1 else f"{base}-{n}"
        f = open(os.path.join(lock_dir, re.sub(r"[^A-Za-z0-9_.-]", "_", candidate) + ".lock"), "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            continue
        _held_ids.append(f)
        return candidate
    raise RuntimeError(f"no free daemon id of the form {base}-N in {lock_dir}: pass --daemon-id")


async def require_registration(agent, timeout_s: float) -> bool:
    """True once the agent holds a session; False (after an ERROR naming address and error) past timeout_s."""
    try:
        await agent.wait_connected(timeout_s)
        return True
    except TimeoutError:
        log.error(
            "not registered with the coordinator at %s within --require-coordinator-s %g s (last error: %s): exiting",
            agent.coordinator, timeout_s, agent.last_error or "none yet",
        )
        return False


def _memory_daemon_key(weights: str) -> str:
    import hashlib

    return "memory-" + hashlib.sha256(os.path.abspath(weights).encode()).hexdigest()[:8]


async def _run_memory_daemon(args: argparse.Namespace) -> int:
    import torch

    from weightsync.control.daemon_agent import DaemonAgent, DaemonIdentity
    from weightsync.dataplane import MemoryEngine
    from weightsync.core.rank_regions import RankRegions
    from weightsync.dataplane.memory_engine import tp_needs
    from weightsync.runtime.daemon import TPMemoryHandler, memory_engine_handler
    from weightsync.runtime.security import channel_credentials_from_args
    from weightsync.v1 import weightsync_pb2 as pb

    if args.tp < 1:
        raise SystemExit(f"--tp {args.tp}: expected >= 1")
    if args.tp_rank is not None and not 0 <= args.tp_rank < args.tp:
        raise SystemExit(f"--tp-rank {args.tp_rank}: expected 0..{args.tp - 1} (--tp {args.tp})")
    # --tp T: T receiver ranks, each with its own copy (a TP worker's memory) and needs;
    # with --tp-rank t only rank t of them (one TP worker per host, as on an emulated fleet).
    own_ranks = [args.tp_rank] if args.tp_rank is not None else list(range(args.tp))
    engines = [MemoryEngine.from_path(args.weights) for _ in own_ranks]
    engine = engines[0]
    transports = ("gloo", "nccl") if torch.cuda.is_available() else ("gloo",)
    ident = DaemonIdentity(
        daemon_id=args.daemon_id or default_daemon_id(args.host, _memory_daemon_key(args.weights)),
        engine="memory",
        model=os.path.abspath(args.weights),
        host=args.host,
        inventory=tuple(engine.inventory()),
        transports=transports,
        num_ranks=len(own_ranks),
        needs=tuple(RankRegions(i, tp_needs(engine.inventory(), args.tp)[t]) for i, t in enumerate(own_ranks)) if args.tp > 1 else (),
    )

    def on_verdict(v: pb.UpdateVerdict) -> None:
        if args.save_on_commit and v.status == pb.RESULT_STATUS_OK:
            if len(engines) == 1:
                engine.save(args.save_on_commit)
            else:
                # Each rank holds only its own region up to date: one file per rank.
                stem = args.save_on_commit.removesuffix(".safetensors")
                for t, e in enumerate(engines):
                    e.save(f"{stem}.rank{t}.safetensors")
            log.info("saved version %d to %s", v.version, args.save_on_commit)

    agent = DaemonAgent(
        args.coordinator,
        ident,
        memory_engine_handler(engine) if args.tp == 1 else TPMemoryHandler(engines),
        served_version=args.served_version,
        credentials=channel_credentials_from_args(args),
        token=args.token,
        on_verdict=on_verdict,
    )
    stop = asyncio.Event()
    stopped_by: list[int] = []
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda sig=sig: (stopped_by.append(sig), stop.set()))
    agent.start()
    print(f"weightsync daemon {ident.daemon_id}: {len(ident.inventory)} tensors, coordinator {args.coordinator}", flush=True)
    writer = asyncio.create_task(_write_state_forever(agent, args.state_file)) if args.state_file else None
    status = 0
    try:
        if args.require_coordinator_s is not None:
            waiter = loop.create_task(require_registration(agent, args.require_coordinator_s))
            stopping = loop.create_task(stop.wait())
            await asyncio.wait({waiter, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if waiter.done() and not waiter.result():
                return 3
            waiter.cancel()
        await stop.wait()
        # SIGTERM is how orchestrators stop a daemon (status 0); SIGINT is an interruption (128 + 2).
        status = 130 if stopped_by and stopped_by[0] == signal.SIGINT else 0
    finally:
        await agent.close(drain_timeout_s=args.drain_s)
        if writer is not None:
            writer.cancel()
    return status


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
    fmt = HelpFormatter
    d = sub.add_parser("daemon", help="run an inference daemon (in-memory engine)", formatter_class=fmt)
    d.add_argument("--coordinator", required=True, help="HOST:PORT of the weightsync coordinator")
    d.add_argument("--engine", default="memory", choices=["memory"], help="engine kind (for vLLM use `weightsync serve`)")
    d.add_argument("--weights", required=True, help="safetensors file or Hugging Face model directory")
    d.add_argument("--daemon-id", default=None,
                   help="this daemon's name in the fleet (default: HOST-memory-HASH of the weights path, stable across restarts)")
    d.add_argument("--host", default=socket.gethostname(), help="this host, as shown by status")
    d.add_argument("--served-version", type=int, default=-1, help="the version the weights on disk are (-1: unversioned)")
    d.add_argument("--save-on-commit", default=None, help="write the engine's tensors (safetensors) to this path after each OK verdict")
    d.add_argument("--require-coordinator-s", type=float, default=None, metavar="SECONDS",
                   help="exit non-zero (status 3) unless registered with the coordinator within this many seconds "
                        "(default: keep retrying forever)")
    d.add_argument("--tp", type=int, default=1, metavar="T",
                   help="receiver ranks standing in for T tensor-parallel workers: rank t needs block t of dim 0 of "
                        "2-D tensors, the rest whole (dataplane/memory_engine.py tp_needs); push with WeightSync(routed=True)")
    d.add_argument("--tp-rank", type=int, default=None, metavar="t",
                   help="with --tp T: host only TP rank t (one receiver rank with rank t's needs)")
    d.add_argument("--drain-s", type=float, default=30.0, metavar="SECONDS", help="on SIGTERM, wait this long for the current round")
    d.add_argument("--state-file", default=None, help="keep the daemon's own view (served version, dirty, busy) in this JSON file (default: none)")
    add_security(d, server=False)
    d.set_defaults(func=_daemon)

    p = sub.add_parser("push", help="push a checkpoint from disk as one round (initial sync, rollback, test)", formatter_class=fmt)
    p.add_argument("--coordinator", required=True, help="HOST:PORT of the weightsync coordinator")
    p.add_argument("--weights", required=True, help="safetensors file or Hugging Face model directory")
    p.add_argument("--version", type=int, required=True,
                   help="version of these weights; must be greater than every version begun or served (engines "
                        "started by `weightsync serve` serve 0)")
    p.add_argument("--dtype", default=None,
                   help="wire dtype, the engines' dtype (e.g. bfloat16); default: each tensor's own dtype")
    p.add_argument("--transport", default="gloo", choices=["gloo", "nccl", "cuda_ipc"], help="data-plane transport")
    p.add_argument("--rendezvous-host", default="127.0.0.1", help="address the daemons dial to reach this trainer")
    p.add_argument("--rendezvous-port", type=int, default=0, help="port of this trainer's data-plane store (0: a free port)")
    p.add_argument("--bind-host", default=None, help="interface the data-plane store listens on (default: --rendezvous-host)")
    p.add_argument("--bucket-size-bytes", type=int, default=0,
                   help="bucket size in bytes (0: by transport, 1 GiB for nccl and cuda_ipc, 256 MiB for gloo)")
    p.add_argument("--deadline-s", type=float, default=600.0, metavar="SECONDS", help="the whole round's deadline")
    p.add_argument("--collective-timeout-s", type=float, default=120.0, metavar="SECONDS", help="each data-plane wait")
    p.add_argument("--min-daemons", type=int, default=1, help="refuse the round with fewer healthy daemons than this")
    p.add_argument("--base", default=None, metavar="CHECKPOINT",
                   help="the checkpoint the engines serve: send --weights as a delta against it (default: dense)")
    p.add_argument("--base-version", type=int, default=None,
                   help="the version --base is (default: the one version the clean daemons serve)")
    p.add_argument("--json", action="store_true", help="print the round's summary as JSON")
    add_security(p, server=False)
    p.set_defaults(func=_push)

    try:
        from weightsync.runtime import vllm_commands
    except ImportError:
        return
    vllm_commands.add_subcommands(sub, add_security)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the `weightsync` command")
