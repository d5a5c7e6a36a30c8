"""One server interceptor that maps the weightsync error hierarchy to gRPC status codes."""

from __future__ import annotations

import asyncio
import logging

import grpc

from weightsync.core import errors as E

__all__ = ["ErrorMappingInterceptor", "status_code_for"]

log = logging.getLogger(__name__)

_CODES: tuple[tuple[type[E.WeightsyncError], grpc.StatusCode], ...] = (
    (E.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (E.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (E.NotFound, grpc.StatusCode.NOT_FOUND),
    (E.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (E.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (E.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (E.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (E.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (E.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
)


def status_code_for(err: E.WeightsyncError) -> grpc.StatusCode:
    for cls, code in _CODES:
        if isinstance(err, cls):
            return code
    return grpc.StatusCode.INTERNAL


async def _abort_for(exc: BaseException, context: grpc.aio.ServicerContext, method: str):
    if isinstance(exc, E.WeightsyncError):
        await context.abort(status_code_for(exc), str(exc))
    log.error("unexpected error in %s", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(exc).__name__}: {exc}")


class _Undecodable:
    """Stands in for a request whose bytes are not a valid protobuf message."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserializer):
    if deserializer is None:
        return None

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception as e:  # any decode failure becomes INVALID_ARGUMENT below
            return _Undecodable(e)

    return deserialize


def _checked(request, method: str):
    if isinstance(request, _Undecodable):
        raise E.InvalidArgument(f"{method}: request is not a valid protobuf message: {request.error}")
    return request


async def _checked_stream(request_iterator, method: str):
    async for request in request_iterator:
        yield _checked(request, method)


def _streaming(inner, check, method: str):
    """A response-streaming handler (unary or streamed requests, as `check` takes them) with
    errors mapped as for unary calls."""

    async def handler(request, context):
        try:
            async for response in inner(check(request, method), context):
                yield response
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # RPC boundary: map, log, abort
            await _abort_for(exc, context, method)

    return handler


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        handler = handler._replace(request_deserializer=_tolerant(handler.request_deserializer))
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request, context):
                try:
                    return await inner_uu(_checked(request, method), context)
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as exc:  # RPC boundary: map, log, abort
                    await _abort_for(exc, context, method)

            return handler._replace(unary_unary=unary_unary)
        if handler.stream_stream is not None:
            return handler._replace(stream_stream=_streaming(handler.stream_stream, _checked_stream, method))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=_streaming(handler.unary_stream, _checked, method))
        return handler
