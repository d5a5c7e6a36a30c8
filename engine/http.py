"""ASGI middleware for `weightsync serve`: the weight version on every response, and an endpoint.

Rollout clients tag each sample with the version that produced it (staleness control):
every HTTP response carries `x-weightsync-version` (the version served when the response
started) and `x-weightsync-version-at-request` (when the request arrived); with the "wait"
in-flight policy the two differ only for requests that straddled an update. `GET
/weightsync/version` answers `{"version": N, "dirty": bool}`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

__all__ = ["SERVED", "ServedState", "VersionMiddleware"]


@dataclass(slots=True)
class ServedState:
    version: int = -1
    dirty: bool = False
    update_id: str = ""


# One engine per `weightsync serve` process: the daemon writes, the middleware reads.
SERVED = ServedState()


class VersionMiddleware:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope.get("path") == "/weightsync/version":
            body = json.dumps({"version": SERVED.version, "dirty": SERVED.dirty, "update_id": SERVED.update_id}).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return None
        at_request = str(SERVED.version).encode()

        async def tagged_send(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-weightsync-version", str(SERVED.version).encode()))
                headers.append((b"x-weightsync-version-at-request", at_request))
                message = {**message, "headers": headers}
            await send(message)

        return await self.app(scope, receive, tagged_send)
