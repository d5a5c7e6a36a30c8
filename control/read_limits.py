"""Bounds what clients can make the coordinator hold: request bodies are read on demand,
a few at a time, each within a time limit.

gRPC reads a unary request whole before calling its handler, opening its flow-control
window to the size the client announces (up to the 64 MiB message limit), and waits for
it without end: six stalled 60 MB requests held 360 MB. Serving each unary method as
request-streaming instead lets this module decide when a body is read: only after the
credentials were checked (the token interceptor runs first and never reads), at most
`max_concurrent_reads` at once (others wait with a 64 KiB window, buffering nothing more),
and within `read_timeout_s`, after which the call fails and gRPC frees what it buffered.
Request-streaming methods (the daemon session) are left alone: they need a credential
first, and a session's reader has its own bounds (hello timeout, heartbeat timeout).
"""

from __future__ import annotations

import asyncio

import grpc

__all__ = ["ReadLimitInterceptor"]


class ReadLimitInterceptor(grpc.aio.ServerInterceptor):
    """Serves every unary-request method as request-streaming and reads its one request
    within `read_timeout_s`, holding one of `max_concurrent_reads` slots; methods under
    `open_prefixes` (reachable without credentials) share one slot of their own, so that
    callers without credentials can neither buffer more than one body nor starve the rest."""

    def __init__(self, *, max_concurrent_reads: int, read_timeout_s: float, open_prefixes: tuple[str, ...] = ()) -> None:
        if max_concurrent_reads < 1:
            raise ValueError(f"max_concurrent_reads must be >= 1, got {max_concurrent_reads}")
        if read_timeout_s <= 0:
            raise ValueError(f"read_timeout_s must be > 0, got {read_timeout_s}")
        self._reads = asyncio.Semaphore(max_concurrent_reads)
        self._open_reads = asyncio.Semaphore(1)
        self._open_prefixes = open_prefixes
        self._timeout_s = read_timeout_s

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        method = handler_call_details.method
        slots = self._open_reads if method.startswith(self._open_prefixes) else self._reads
        timeout_s = self._timeout_s

        async def read_one(request_iterator, context):
            request = None
            try:
                async with asyncio.timeout(timeout_s):
                    async with slots:
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
            return request

        kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request_iterator, context):
                return await inner_uu(await read_one(request_iterator, context), context)

            return grpc.stream_unary_rpc_method_handler(unary_unary, **kw)
        inner_us = handler.unary_stream

        async def unary_stream(request_iterator, context):
            request = await read_one(request_iterator, context)
            result = inner_us(request, context)
            if hasattr(result, "__aiter__"):
                async for response in result:
                    yield response
            else:  # a coroutine handler that writes with context.write
                await result

        return grpc.stream_stream_rpc_method_handler(unary_stream, **kw)
