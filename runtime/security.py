"""TLS, mTLS and token settings from command-line arguments."""

from __future__ import annotations

import argparse

import grpc

from weightsync.control.auth import TokenAuthInterceptor, load_tokens

__all__ = ["channel_credentials_from_args", "server_credentials_from_args", "server_interceptors_from_args", "read_file"]


def read_file(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def server_credentials_from_args(args: argparse.Namespace) -> grpc.ServerCredentials | None:
    if not args.tls_cert:
        if args.tls_key or args.require_client_cert:
            raise ValueError("--tls-key and --require-client-cert need --tls-cert")
        return None
    if not args.tls_key:
        raise ValueError("--tls-cert needs --tls-key")
    if args.require_client_cert and not args.tls_ca:
        raise ValueError("--require-client-cert needs --tls-ca, the CA that signs client certificates")
    return grpc.ssl_server_credentials(
        [(read_file(args.tls_key), read_file(args.tls_cert))],
        root_certificates=read_file(args.tls_ca),
        require_client_auth=bool(args.require_client_cert),
    )


def server_interceptors_from_args(args: argparse.Namespace) -> tuple[grpc.aio.ServerInterceptor, ...]:
    if not getattr(args, "tokens_file", None):
        return ()
    return (TokenAuthInterceptor(load_tokens(args.tokens_file)),)


def channel_credentials_from_args(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    if not (args.tls_ca or args.tls_cert):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=read_file(args.tls_ca),
        private_key=read_file(args.tls_key),
        certificate_chain=read_file(args.tls_cert),
    )
