"""ASGI middleware for `weightsync serve`: the weight version on every response, and two endpoints.

Rollout clients tag each sample with the version that produced it (staleness control):
every HTTP response carries `x-weightsync-version` (the version served when the response
started) and `x-weightsync-version-at-request` (when the request arrived); with the "wait"
in-flight policy the two differ only for requests that straddled an update.

`GET /weightsync/version` answers the daemon's state: `{"version": N, "dirty": bool,
"stale": bool, "update_id": ..., "connected": bool, "coordinator": "HOST:PORT",
"last_error": ..., ...}`. `GET /weightsync/ready` answers 200 once the daemon holds a
session with the coordinator and 503 otherwise (same body): an orchestrator's readiness
probe, so that an engine that can never receive updates is not taken for a healthy one.

This module only reads: the daemon agent owns the state (one owner, no copy here). vLLM
builds the middleware from an import string, so `weightsync serve` hands the agent over
with `attach` before the server starts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Protocol

__all__ = ["StateSource", "VersionMiddleware", "attach", "detach"]


class StateSource(Protocol):
    def status(self) -> Mapping[str, object]: ...


class _Unattached:
    """Before a daemon is attached: nothing is known, and the engine is not ready."""

    def status(self) -> Mapping[str, object]:
        return {"version": -1, "dirty": False, "stale": False, "update_id": "", "connected": False,
                "coordinator": "", "last_error": "no daemon attached"}


_source: StateSource = _Unattached()


def attach(source: StateSource) -> None:
    """Makes `source.status()` the state every response and endpoint reports (one per process)."""
    global _source
    _source = source


def detach() -> None:
    global _source
    _source = _Unattached()


async def _json(send, status: int, body: Mapping[str, object]) -> None:
    data = json.dumps(dict(body)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


class VersionMiddleware:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path")
        if path == "/weightsync/version":
            return await _json(send, 200, _source.status())
        if path == "/weightsync/ready":
            state = _source.status()
            return await _json(send, 200 if state.get("connected") else 503, state)
        at_request = str(_source.status()["version"]).encode()

        async def tagged_send(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-weightsync-version", str(_source.status()["version"]).encode()))
                headers.append((b"x-weightsync-version-at-request", at_request))
                message = {**message, "headers": headers}
            await send(message)

        return await self.app(scope, receive, tagged_send)
