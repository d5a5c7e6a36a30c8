"""Who is calling: the identity of the credential a call presented, for binding ids to it.

A daemon id belongs to the credential that first registered it, and a round to the trainer
credential that began it. The identity is the client certificate's subject (mTLS) and a hash
of the bearer token (when tokens are configured), joined; "" when the coordinator has no
credentials at all (plain local use: every caller is equal, only the duplicate-id rule holds).
"""

from __future__ import annotations

import hashlib

import grpc

__all__ = ["caller_identity"]


def _token(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer "):]
    return None


def caller_identity(context: grpc.aio.ServicerContext, *, tokens_configured: bool) -> str:
    parts = []
    auth = context.auth_context() or {}
    # Present only when the peer presented a certificate that the TLS handshake verified.
    subject = auth.get("x509_subject") or auth.get("x509_common_name")
    if subject:
        parts.append("cert:" + subject[0].decode(errors="replace"))
    if tokens_configured:
        # The token interceptor already accepted this token; keep a hash, never the secret.
        token = _token(context) or ""
        parts.append("token:" + hashlib.sha256(token.encode()).hexdigest()[:24])
    return "|".join(parts)
