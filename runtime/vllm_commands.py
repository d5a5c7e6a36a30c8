"""`weightsync serve` (vLLM's OpenAI server with a daemon attached) and `weightsync demo`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket

from weightsync.control.daemon_agent import DaemonAgent, DaemonIdentity, HandlerResult
from weightsync.core import TransferError

__all__ = ["VllmHandler", "add_subcommands"]

log = logging.getLogger(__name__)


class VllmHandler:
    """Applies each assignment to a live vLLM engine between engine steps, one rank per worker.

    It reports what arrived and leaves versions alone: the daemon agent owns the served
    version and the dirty flag, and vLLM's weight-version label is set by VllmEngine as
    part of the write itself.
    """

    def __init__(self, engine) -> None:
        self._engine = engine

    @property
    def holds_delta_base(self) -> bool:
        """Every worker holds a shadow of the served weights: the coordinator may send a delta."""
        return self._engine.holds_delta_base

    @property
    def holds_needed_delta_base(self) -> bool:
        """Every worker's shadow is exact where its loader reads: the coordinator may send a routed delta."""
        return self._engine.holds_needed_delta_base

    async def __call__(self, assignment, ranks, progress) -> HandlerResult:
        try:
            report = await self._engine.apply_assignment(assignment, ranks, progress=progress)
        except Exception as e:
            if type(e).__name__ == "EngineDeadError":
                # vLLM's own message points at a stack trace in this process's log, which the
                # trainer and `weightsync status` never see: say what happened instead.
                raise TransferError(
                    f"the vLLM engine died during update {assignment.update_id}; this engine must be restarted "
                    "(the serve process's log has the engine's traceback)"
                ) from (e.__cause__ or e.__context__)
            raise
        return HandlerResult(report.checksums, report.bytes_received, report.receive_s, report.apply_s, report.piece_sums)


async def _serve(args: argparse.Namespace, vargs: argparse.Namespace) -> int:
    from vllm.entrypoints.launchers.api_server.entry import build_and_serve, build_async_engine_client
    from vllm.entrypoints.launchers.launcher import setup_server

    from weightsync.engine import VllmEngine, VllmEngineConfig, http
    from weightsync.runtime.commands import default_daemon_id, require_registration
    from weightsync.runtime.security import channel_credentials_from_args

    listen_address, sock = setup_server(vargs, reuse_port=False)
    agent = None
    watchdog = None
    unregistered = False
    received: list[int] = []
    try:
        async with build_async_engine_client(vargs) as client:
            config = VllmEngineConfig(
                model=vargs.model, mode="async", inflight_policy=args.inflight_policy, staging=args.staging,
                initial_version=args.served_version if args.served_version >= 0 else None,
                delta_shadow=not args.no_delta_shadow,
            )
            engine = VllmEngine(client, config)
            await engine.set_version(config.initial_version)
            ident = DaemonIdentity(
                # Host and HTTP port name one engine on one host: a restart re-registers the same daemon.
                daemon_id=args.daemon_id or default_daemon_id(args.host, f"vllm-{vargs.port}"),
                engine="vllm",
                model=vargs.model,
                host=args.host,
                inventory=engine.inventory(),
                num_ranks=engine.num_workers,
                needs=await engine.needs(),
                transports=("gloo", "nccl") if _cuda() else ("gloo",),
            )
            agent = DaemonAgent(
                args.coordinator, ident, VllmHandler(engine), served_version=args.served_version,
                credentials=channel_credentials_from_args(args), token=args.token,
            )
            http.attach(agent)
            agent.start()
            log.info("daemon %s attached to vLLM (%d workers, %d tensors), coordinator %s",
                     ident.daemon_id, engine.num_workers, len(ident.inventory), args.coordinator)
            if args.require_coordinator_s is not None:

                async def watch() -> None:
                    nonlocal unregistered
                    if not await require_registration(agent, args.require_coordinator_s):
                        unregistered = True
                        # vLLM's server stops gracefully on SIGTERM (its own handler); reuse that path.
                        signal.raise_signal(signal.SIGTERM)

                watchdog = asyncio.get_running_loop().create_task(watch(), name="require-coordinator")
            _note_signals(asyncio.get_running_loop(), received)
            shutdown_task = await build_and_serve(client, listen_address, sock, vargs)
            await shutdown_task
    finally:
        if watchdog is not None:
            watchdog.cancel()
        if agent is not None:
            http.detach()
            await agent.close(drain_timeout_s=args.drain_s)
        sock.close()
    if unregistered:
        return 3
    # SIGTERM is how orchestrators stop it (status 0); Ctrl-C is an interruption (128 + 2).
    return 130 if received and received[0] == signal.SIGINT else 0


def _note_signals(loop: asyncio.AbstractEventLoop, received: list[int]) -> None:
    """Records which signal stops the server, keeping vLLM's own handlers.

    vLLM's server installs its SIGINT/SIGTERM handlers on this loop and tells neither
    which one fired; the exit status needs it. This wraps the loop's registration for
    the lifetime of the loop, which is this command's.
    """
    add = loop.add_signal_handler

    def add_noting(sig: int, callback, *cb_args) -> None:
        add(sig, lambda: (received.append(sig), callback(*cb_args)))

    try:
        loop.add_signal_handler = add_noting  # type: ignore[method-assign]
    except AttributeError:  # a loop implemented in C (uvloop): exit 0 on either signal
        log.debug("cannot note signals on %s", type(loop).__name__)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _serve_cmd(args: argparse.Namespace) -> int:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from weightsync.engine import EXTENSION_CLS

    if os.sep in args.model and not os.path.isdir(args.model):
        # vLLM would take it for a hub id and answer with a repo-id format error.
        raise FileNotFoundError(f"{args.model}: no such model directory (expected a Hugging Face model directory)")
    vparser = make_arg_parser(FlexibleArgumentParser(prog="weightsync serve (vLLM options)"))
    vargs = vparser.parse_args(["--model", args.model, *args.vllm_args])
    vargs.worker_extension_cls = EXTENSION_CLS
    vargs.middleware = [*(vargs.middleware or []), "weightsync.engine.http.VersionMiddleware"]
    return asyncio.run(_serve(args, vargs))


def _demo_cmd(args: argparse.Namespace) -> int:
    from weightsync.runtime.demo import run_demo

    return run_demo(args)


def add_subcommands(sub, add_security) -> None:
    from weightsync.runtime.commands import HelpFormatter

    s = sub.add_parser(
        "serve",
        allow_abbrev=False,  # vLLM's own --host must not be taken for --host-name
        help="run vLLM's OpenAI-compatible server with a weightsync daemon attached",
        description="Everything after the known options goes to vLLM (e.g. --port 8000 --dtype bfloat16). "
        "On CPU add --kv-cache-memory-bytes 67108864 (vLLM's default memory utilisation refuses to start "
        "when other processes hold memory) and, for --tensor-parallel-size 2, VLLM_CPU_OMP_THREADS_BIND=\"0|1\".",
        formatter_class=HelpFormatter,
    )
    s.add_argument("model", help="model directory (or id, where a hub is reachable)")
    s.add_argument("--coordinator", required=True, help="HOST:PORT of the weightsync coordinator")
    s.add_argument("--daemon-id", default=None,
                   help="this daemon's name in the fleet (default: HOST-vllm-PORT from --host-name and vLLM's --port, "
                        "stable across restarts)")
    s.add_argument("--host-name", dest="host", default=socket.gethostname(), help="this host, as shown by status")
    s.add_argument("--served-version", type=int, default=0,
                   help="the version of the weights the model directory holds; a trainer's first push must be greater")
    s.add_argument("--inflight-policy", default="wait", choices=["wait", "abort", "keep"],
                   help="in-flight requests during an update: finish them first, abort them, or keep them running across it")
    s.add_argument("--staging", default="staged", choices=["staged", "stream"],
                   help="staged: receive and verify while serving, then swap in one short pause (one extra model copy); "
                        "stream: apply as buckets arrive, paused throughout, no staging copy "
                        "(either way each worker keeps a host copy of the served weights, the base of delta rounds)")
    s.add_argument("--no-delta-shadow", action="store_true",
                   help="keep no host copy of the served weights (the model's size in the wire dtype, per worker): "
                        "saves that memory; every round into this engine is then dense")
    s.add_argument("--require-coordinator-s", type=float, default=None, metavar="SECONDS",
                   help="exit non-zero (status 3) unless registered with the coordinator within this many seconds "
                        "of the engine's start (default: keep retrying forever; /weightsync/ready answers 503 meanwhile)")
    s.add_argument("--drain-s", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM, wait this long for the current round")
    add_security(s, server=False)
    s.set_defaults(func=_serve_cmd, _takes_extra=True)

    d = sub.add_parser("demo", help="end-to-end: coordinator, trainer and two vLLM engines on CPU, several rounds",
                       formatter_class=HelpFormatter)
    d.add_argument("--rounds", type=int, default=3, help="rounds of new random weights (then one restoring the original)")
    d.add_argument("--arch", default="qwen2", choices=["qwen2", "llama"], help="architecture of the tiny generated model")
    d.add_argument("--workdir", default=None, help="where models and logs go (default: a temp dir, removed on exit)")
    d.add_argument("--engines", type=int, default=2, help="number of `weightsync serve` processes (vLLM engines)")
    d.add_argument("--keep", action="store_true", help="keep the temp dir (model, logs) on exit")
    d.set_defaults(func=_demo_cmd)
