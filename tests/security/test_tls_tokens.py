"""TLS, mTLS and bearer-token roles on a real coordinator: accepted and rejected clients."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.control.helpers import FAST, INVENTORY, ScriptedHandler, trainer_checksums
from tests.security.certs import issue, make_ca
from weightsync.control.auth import TokenAuthInterceptor, load_tokens
from weightsync.control.daemon_agent import DaemonAgent, DaemonIdentity
from weightsync.control.server import CoordinatorServer
from weightsync.control.trainer_client import TrainerClient
from weightsync.core import DeadlineExceeded, PermissionDenied, Unauthenticated, Unavailable

RDV = dict(rendezvous_host="127.0.0.1", rendezvous_port=29999)
# A refused TLS handshake surfaces as UNAVAILABLE, or as DEADLINE_EXCEEDED when gRPC is still
# retrying the connection at the call's deadline: either way the call never reaches a servicer.
REFUSED = (Unavailable, DeadlineExceeded)
TOKENS = {"t" * 24: "trainer", "d" * 24: "daemon", "i" * 24: "inspector"}


@pytest.fixture(scope="module")
def pki():
    ca, ca_key, ca_cert = make_ca()
    other_ca, other_key, other_cert = make_ca("someone-else")
    return {
        "ca": ca,
        "server": issue(ca_key, ca_cert, "localhost", server=True),
        "expired_server": issue(ca_key, ca_cert, "localhost", server=True, expired=True),
        "client": issue(ca_key, ca_cert, "trainer-1", server=False),
        "expired_client": issue(ca_key, ca_cert, "trainer-2", server=False, expired=True),
        "foreign_client": issue(other_key, other_cert, "intruder", server=False),
    }


async def _server(pki, *, mtls: bool, server_cert="server", tokens=None) -> CoordinatorServer:
    creds = grpc.ssl_server_credentials(
        [(pki[server_cert].key, pki[server_cert].cert)], root_certificates=pki["ca"].cert if mtls else None, require_client_auth=mtls
    )
    interceptors = (TokenAuthInterceptor(tokens),) if tokens else ()
    s = CoordinatorServer(FAST, listen="localhost:0", server_credentials=creds, interceptors=interceptors)
    await s.start()
    return s


def _creds(pki, client: str | None = None) -> grpc.ChannelCredentials:
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=pki["ca"].cert)
    return grpc.ssl_channel_credentials(root_certificates=pki["ca"].cert, private_key=pki[client].key, certificate_chain=pki[client].cert)


async def _agent(server, pki, client=None, token=None, daemon_id="d0") -> DaemonAgent:
    ident = DaemonIdentity(daemon_id=daemon_id, engine="test", model="tiny", host="127.0.0.1", inventory=INVENTORY)
    agent = DaemonAgent(server.address, ident, ScriptedHandler(), credentials=_creds(pki, client), token=token, reconnect_max_s=0.5, rpc_timeout_s=3)
    agent.start()
    return agent


async def test_tls_round_commits_and_plaintext_is_refused(pki):
    """Over TLS a full round commits; a plaintext client cannot talk to the TLS coordinator."""
    server = await _server(pki, mtls=False)
    agent = await _agent(server, pki)
    try:
        await agent.wait_connected(10)
        async with TrainerClient(server.address, credentials=_creds(pki)) as c:
            a = await c.begin_update(1, INVENTORY, **RDV)
            assert (await c.commit_update(a, trainer_checksums(a))).committed
        async with TrainerClient(server.address, rpc_timeout_s=3) as plain:
            with pytest.raises(REFUSED):
                await plain.list_daemons()
    finally:
        await agent.close(1)
        await server.stop(0.5)


async def test_expired_server_certificate_is_refused(pki):
    """A client refuses a coordinator whose certificate has expired."""
    server = await _server(pki, mtls=False, server_cert="expired_server")
    try:
        async with TrainerClient(server.address, credentials=_creds(pki), rpc_timeout_s=3) as c:
            with pytest.raises(REFUSED):
                await c.list_daemons()
    finally:
        await server.stop(0.5)


@pytest.mark.parametrize("client, accepted", [("client", True), (None, False), ("expired_client", False), ("foreign_client", False)])
async def test_mtls_client_certificates(pki, client, accepted):
    """With mTLS only clients holding a valid certificate from the fleet's CA get in: none, expired or foreign ones are refused."""
    server = await _server(pki, mtls=True)
    try:
        async with TrainerClient(server.address, credentials=_creds(pki, client), rpc_timeout_s=3) as c:
            if accepted:
                assert (await c.list_daemons()).committed_version == -1
            else:
                with pytest.raises(REFUSED):
                    await c.list_daemons()
    finally:
        await server.stop(0.5)


async def test_token_roles(pki, tmp_path):
    """Tokens decide roles: missing or wrong tokens are UNAUTHENTICATED, a wrong role is PERMISSION_DENIED, the right role works."""
    path = tmp_path / "tokens"
    path.write_text("".join(f"{role} {tok}\n" for tok, role in TOKENS.items()))
    server = await _server(pki, mtls=True, tokens=load_tokens(str(path)))
    trainer_tok, daemon_tok, inspector_tok = "t" * 24, "d" * 24, "i" * 24
    good = await _agent(server, pki, "client", daemon_tok, "good")
    bad = await _agent(server, pki, "client", trainer_tok, "impostor")
    try:
        await good.wait_connected(10)
        for token, exc in ((None, Unauthenticated), ("x" * 24, Unauthenticated), (daemon_tok, PermissionDenied), (inspector_tok, PermissionDenied)):
            async with TrainerClient(server.address, credentials=_creds(pki, "client"), token=token, rpc_timeout_s=3) as c:
                with pytest.raises(exc):
                    await c.begin_update(1, INVENTORY, **RDV)
        async with TrainerClient(server.address, credentials=_creds(pki, "client"), token=inspector_tok) as c:
            listed = await c.list_daemons()
            assert [d.daemon_id for d in listed.daemons] == ["good"]
        assert not bad.connected.is_set() and "PERMISSION_DENIED" in bad.last_error
        async with TrainerClient(server.address, credentials=_creds(pki, "client"), token=trainer_tok) as c:
            a = await c.begin_update(1, INVENTORY, **RDV)
            assert (await c.commit_update(a, trainer_checksums(a))).committed
        # Health stays open for orchestrators; it reveals nothing but SERVING.
        async with grpc.aio.secure_channel(server.address, _creds(pki, "client")) as ch:
            r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=3)
            assert r.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await good.close(1)
        await bad.close(1)
        await server.stop(0.5)


def test_tokens_file_is_validated(tmp_path):
    """A tokens file with an unknown role or a short token is refused with the line named."""
    p = tmp_path / "t"
    p.write_text("admin " + "a" * 20 + "\n")
    with pytest.raises(ValueError, match=r"t:1: expected 'ROLE TOKEN'"):
        load_tokens(str(p))
    p.write_text("trainer short\n")
    with pytest.raises(ValueError, match="at least 16"):
        load_tokens(str(p))
