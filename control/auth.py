"""Bearer tokens with roles, checked by one server interceptor.

Roles: `trainer` may begin, commit and abort rounds; `daemon` may register and hold a
session; `inspector` may only read. Trainers and daemons may also inspect. Health stays
open so that orchestrators can probe without secrets; it reveals nothing beyond
SERVING/NOT_SERVING, and its (tiny) requests are read under their own budget
(control/read_limits.py). Reflection needs a token of any role: its request stream could
otherwise make the coordinator buffer large messages for anyone.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

import grpc

__all__ = ["OPEN_PREFIXES", "ROLES", "TokenAuthInterceptor", "load_tokens"]

ROLES = ("trainer", "daemon", "inspector")
_SERVICE_ROLES: dict[str, frozenset[str]] = {
    "weightsync.v1.TrainerService": frozenset({"trainer"}),
    "weightsync.v1.DaemonService": frozenset({"daemon"}),
    "weightsync.v1.InspectionService": frozenset({"inspector", "trainer", "daemon"}),
    "grpc.reflection.v1alpha.ServerReflection": frozenset(ROLES),
    "grpc.reflection.v1.ServerReflection": frozenset(ROLES),
}
OPEN_PREFIXES = ("/grpc.health.v1.",)


def load_tokens(path: str) -> dict[str, str]:
    """Reads 'ROLE TOKEN' lines (# comments allowed) into {token: role}."""
    tokens: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2 or parts[0] not in ROLES:
                raise ValueError(f"{path}:{lineno}: expected 'ROLE TOKEN' with ROLE in {ROLES}, got {line[:40]!r}")
            if len(parts[1]) < 16:
                raise ValueError(f"{path}:{lineno}: token is {len(parts[1])} characters: expected at least 16")
            tokens[parts[1]] = parts[0]
    if not tokens:
        raise ValueError(f"{path}: no tokens: expected at least one 'ROLE TOKEN' line")
    return tokens


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: Mapping[str, str]) -> None:
        bad = sorted(set(tokens.values()) - set(ROLES))
        if bad:
            raise ValueError(f"unknown roles {bad}: expected {ROLES}")
        self._tokens = dict(tokens)

    def _role(self, metadata) -> str | None:
        for key, value in metadata or ():
            if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                presented = value[len("Bearer "):].encode()
                for token, role in self._tokens.items():
                    if hmac.compare_digest(presented, token.encode()):
                        return role
        return None

    async def intercept_service(self, continuation, handler_call_details):
        method: str = handler_call_details.method
        if method.startswith(OPEN_PREFIXES):
            return await continuation(handler_call_details)
        service = method.strip("/").split("/", 1)[0]
        allowed = _SERVICE_ROLES.get(service, frozenset())
        role = self._role(handler_call_details.invocation_metadata)
        if role is None:
            return _denial(method, grpc.StatusCode.UNAUTHENTICATED, f"{method}: missing or unknown bearer token: send 'authorization: Bearer <token>'")
        if role not in allowed:
            return _denial(method, grpc.StatusCode.PERMISSION_DENIED, f"{method}: role {role!r} may not call this; allowed roles: {sorted(allowed)}")
        return await continuation(handler_call_details)


def _denial(method: str, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    # A request-streaming handler for every method, unary ones too: gRPC reads a unary
    # request whole before calling its handler (and opens its flow-control window to the
    # announced size, up to 64 MiB), so a unary denial would first buffer whatever an
    # unauthenticated client sends. A streaming handler refuses before reading a byte.
    # The client cannot tell: cardinality is a server-side choice.
    async def deny(request_iterator, context):
        await context.abort(code, message)
        yield  # pragma: no cover - unreachable, makes this an async generator

    return grpc.stream_stream_rpc_method_handler(deny)
