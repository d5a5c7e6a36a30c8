"""Client channels and the mapping of gRPC errors back to the weightsync hierarchy."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import grpc

from weightsync.core import errors as E

__all__ = ["CLIENT_OPTIONS", "check_token_transport", "error_from_rpc", "make_channel"]

CLIENT_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.keepalive_time_ms", 30000),
    ("grpc.keepalive_timeout_ms", 10000),
    ("grpc.keepalive_permit_without_calls", 1),
)

_FROM_CODE: dict[grpc.StatusCode, type[E.WeightsyncError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: E.InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: E.FailedPrecondition,
    grpc.StatusCode.NOT_FOUND: E.NotFound,
    grpc.StatusCode.UNAVAILABLE: E.Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: E.DeadlineExceeded,
    grpc.StatusCode.PERMISSION_DENIED: E.PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: E.Unauthenticated,
    grpc.StatusCode.ALREADY_EXISTS: E.AlreadyExists,
    grpc.StatusCode.RESOURCE_EXHAUSTED: E.ResourceExhausted,
}


def error_from_rpc(err: grpc.RpcError, what: str) -> E.WeightsyncError:
    """The weightsync error for a failed call; `.code` keeps the gRPC status."""
    code = err.code()
    cls = _FROM_CODE.get(code, E.WeightsyncError)
    out = cls(f"{what} failed with {code.name}: {err.details()}")
    out.code = code  # type: ignore[attr-defined]
    return out


def _is_loopback(target: str) -> bool:
    host = target.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_token_transport(target: str, credentials: grpc.ChannelCredentials | None, token: str | None) -> None:
    """Raises ValueError when `token` would have to travel in plaintext to `target`."""
    if token and credentials is None and not _is_loopback(target):
        raise ValueError(
            f"a bearer token is never sent in plaintext: {target} is not a loopback address, so TLS is needed "
            "(--tls-ca, and --tls-cert/--tls-key for mTLS)"
        )


def make_channel(
    target: str,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, object]] = (),
    token: str | None = None,
) -> grpc.aio.Channel:
    """A channel to `target`; a bearer `token` rides as call credentials, which gRPC sends only
    over TLS (or over a loopback connection, never leaving the host) and refuses otherwise."""
    opts = (*CLIENT_OPTIONS, *options)
    if token:
        check_token_transport(target, credentials, token)
        if credentials is None:
            credentials = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
        credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=opts)
    return grpc.aio.secure_channel(target, credentials, options=opts)
