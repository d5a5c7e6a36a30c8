"""The `weightsync` command: one entry point, one subcommand per role."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

__all__ = ["main"]


def _coordinator(args: argparse.Namespace) -> int:
    from weightsync.control.coordinator import CoordinatorConfig
    from weightsync.control.server import CoordinatorServer, run_coordinator
    from weightsync.runtime.security import server_credentials_from_args, server_interceptors_from_args

    config = CoordinatorConfig(
        heartbeat_interval_s=args.heartbeat_interval_s,
        heartbeat_timeout_s=args.heartbeat_timeout_s,
        default_deadline_s=args.deadline_s,
        rounds_kept=args.rounds_kept,
        state_file=args.state_file or "",
        lost_expiry_s=args.lost_expiry_s,
        max_daemons=args.max_daemons,
        max_inventory_tensors=args.max_inventory_tensors,
        max_tensor_bytes=args.max_tensor_bytes,
        max_inventory_bytes=args.max_inventory_bytes,
        max_concurrent_reads=args.max_concurrent_reads,
        request_read_timeout_s=args.request_read_timeout_s,
    )
    server = CoordinatorServer(
        config,
        listen=args.listen,
        metrics_port=args.metrics_port,
        metrics_addr=args.metrics_addr,
        server_credentials=server_credentials_from_args(args),
        interceptors=server_interceptors_from_args(args),
        allow_insecure_tokens=args.allow_insecure_tokens,
    )
    asyncio.run(run_coordinator(server, grace_s=args.grace_s))
    return 0


def _status(args: argparse.Namespace) -> int:
    from weightsync.control.trainer_client import TrainerClient
    from weightsync.runtime.security import channel_credentials_from_args
    from weightsync.runtime.status import format_status, status_json

    async def fetch():
        async with TrainerClient(args.coordinator, credentials=channel_credentials_from_args(args), token=args.token, rpc_timeout_s=args.timeout_s) as c:
            daemons = await c.list_daemons()
            rounds = await c.list_rounds_pb(args.rounds)
            return daemons, rounds

    daemons, rounds = asyncio.run(fetch())
    print(status_json(daemons, rounds) if args.json else format_status(daemons, rounds))
    return 0


def _add_security(p: argparse.ArgumentParser, server: bool) -> None:
    g = p.add_argument_group("security")
    g.add_argument("--tls-cert", help="PEM certificate (server: its own; client: its client cert for mTLS)")
    g.add_argument("--tls-key", help="PEM private key for --tls-cert")
    g.add_argument("--tls-ca", help="PEM CA bundle that signs the peer (client: the server; server: client certs for mTLS)")
    g.add_argument("--token", default=None, help="bearer token to present (clients)" if not server else argparse.SUPPRESS)
    if server:
        g.add_argument("--require-client-cert", action="store_true", help="mTLS: refuse clients without a certificate signed by --tls-ca")
        g.add_argument(
            "--tokens-file",
            help="file of 'ROLE TOKEN' lines (roles: trainer, daemon, inspector); calls without a valid token are refused",
        )
        g.add_argument(
            "--allow-insecure-tokens",
            action="store_true",
            help="accept --tokens-file without TLS (tokens then travel in plaintext; a warning is logged on every start)",
        )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="weightsync", description="Verified, bucketed weight sync from RL trainers into live vLLM engines.")
    p.add_argument("--log-level", default="INFO")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("coordinator", help="run the coordinator (gRPC control plane)")
    c.add_argument("--listen", default="127.0.0.1:50051", help="HOST:PORT to serve gRPC on")
    c.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    c.add_argument("--metrics-addr", default="127.0.0.1")
    c.add_argument("--heartbeat-interval-s", type=float, default=1.0)
    c.add_argument("--heartbeat-timeout-s", type=float, default=10.0)
    c.add_argument("--deadline-s", type=float, default=600.0, help="default round deadline")
    c.add_argument("--grace-s", type=float, default=10.0, help="on SIGTERM, wait this long for the open round")
    lim = c.add_argument_group("state and limits")
    lim.add_argument(
        "--state-file",
        default=None,
        help="JSON file where the committed version and the version floor are kept across restarts "
        "(default: none; then every version a daemon registers with after a restart is untrusted until a full round)",
    )
    lim.add_argument("--lost-expiry-s", type=float, default=3600.0, help="forget a daemon without a session after this many seconds (default: %(default)s s)")
    lim.add_argument("--rounds-kept", type=int, default=100, help="finished rounds kept for ListRounds/status (default: %(default)s)")
    lim.add_argument("--max-daemons", type=int, default=10_000, help="registered daemons at most (default: %(default)s)")
    lim.add_argument("--max-inventory-tensors", type=int, default=1_000_000, help="tensors per registration at most (default: %(default)s)")
    lim.add_argument("--max-tensor-bytes", type=int, default=1 << 40, help="bytes per registered tensor at most (default: %(default)s = 1 TiB)")
    lim.add_argument(
        "--max-concurrent-reads", type=int, default=4,
        help="request bodies read at once; each is at most 64 MiB, so this bounds what callers can make the coordinator buffer (default: %(default)s)",
    )
    lim.add_argument(
        "--request-read-timeout-s", type=float, default=60.0,
        help="a request body not received within this many seconds fails DEADLINE_EXCEEDED and is freed (default: %(default)s s)",
    )
    lim.add_argument("--max-inventory-bytes", type=int, default=64 << 40, help="bytes per registration in all at most (default: %(default)s = 64 TiB)")
    _add_security(c, server=True)
    c.set_defaults(func=_coordinator)

    s = sub.add_parser("status", help="show daemons and recent rounds")
    s.add_argument("--coordinator", required=True, help="HOST:PORT")
    s.add_argument("--json", action="store_true")
    s.add_argument("--rounds", type=int, default=10)
    s.add_argument("--timeout-s", type=float, default=10.0)
    _add_security(s, server=False)
    s.set_defaults(func=_status)

    from weightsync.runtime import commands

    commands.add_subcommands(sub, _add_security)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "_takes_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.vllm_args = extra
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # process boundary: one clear line, details at DEBUG
        from weightsync.core import WeightsyncError

        if isinstance(e, WeightsyncError):
            logging.getLogger("weightsync").debug("command failed", exc_info=True)
            print(f"weightsync {args.command}: error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
