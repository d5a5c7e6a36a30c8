"""Bounds what clients can make the coordinator hold: request bodies are read on demand,
a few at a time, each within a time limit.

gRPC reads a unary request whole before calling its handler, opening its flow-control
window to the size the client announces (up to the 64 MiB message limit), and waits for
it without end: six stalled 60 MB requests held 360 MB. Serving each unary method as
request-streaming instead lets this module decide when a body is read: only after the
credentials were checked (the token interceptor runs first and never reads), at most
`max_concurrent_reads` at once (others wait with a 64 KiB window, buffering nothing more),
and within `read_timeout_s`, after which the call fails and gRPC frees what it buffered.
"""

from __future__ import annotations

import asyncio

import grpc

__all__ = ["ReadLimitInterceptor"]


class ReadLimitInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, *, max_concurrent_reads: int, read_timeout_s: float) -> None:
        if max_concurrent_reads < 1:
            raise ValueError(f"max_concurrent_reads must be >= 1, got {max_concurrent_reads}")
        if read_timeout_s <= 0:
            raise ValueError(f"read_timeout_s must be > 0, got {read_timeout_s}")
        self._reads = asyncio.Semaphore(max_concurrent_reads)
        self._timeout_s = read_timeout_s

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        method = handler_call_details.method
        reads, timeout_s = self._reads, self._timeout_s

        async def read_then_call(request_iterator, context):
            request = None
            try:
                async with asyncio.timeout(timeout_s):
                    async with reads:
                        async for request in request_iterator:
                            break
            except TimeoutError:
                await context.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"{method}: the request was not received within {timeout_s:g} s (request_read_timeout_s, "
                    "--request-read-timeout-s): a stalled or too slow upload",
                )
            if request is None:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{method}: expected one request message, got none")
            return await inner(request, context)

        return grpc.stream_unary_rpc_method_handler(
            read_then_call, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )
