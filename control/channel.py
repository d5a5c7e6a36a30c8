"""Client channels and the mapping of gRPC errors back to the weightsync hierarchy."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from weightsync.core import errors as E

__all__ = ["CLIENT_OPTIONS", "error_from_rpc", "make_channel"]

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
}


def error_from_rpc(err: grpc.RpcError, what: str) -> E.WeightsyncError:
    """The weightsync error for a failed call; `.code` keeps the gRPC status."""
    code = err.code()
    cls = _FROM_CODE.get(code, E.WeightsyncError)
    out = cls(f"{what} failed with {code.name}: {err.details()}")
    out.code = code  # type: ignore[attr-defined]
    return out


def make_channel(
    target: str,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, object]] = (),
) -> grpc.aio.Channel:
    opts = (*CLIENT_OPTIONS, *options)
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=opts)
    return grpc.aio.secure_channel(target, credentials, options=opts)
