"""A daemon id belongs to the credential that registered it, and to one live process; a round to its trainer (issue 10, item 6)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import grpc
import pytest

from tests.control.helpers import FAST, INVENTORY, ScriptedHandler, start_coordinator, trainer_checksums, wait_until
from tests.control.test_processes import ROOT, stop_process
from tests.security.certs import issue, make_ca
from weightsync.control.auth import TokenAuthInterceptor
from weightsync.control.daemon_agent import DaemonAgent, DaemonIdentity
from weightsync.control.server import CoordinatorServer
from weightsync.control.trainer_client import TrainerClient
from weightsync.core import PermissionDenied
from weightsync.v1 import weightsync_pb2 as pb
from weightsync.v1 import weightsync_pb2_grpc as pb_grpc

RDV = dict(rendezvous_host="127.0.0.1", rendezvous_port=29999)
DAEMON_A, DAEMON_B = "a" * 24, "b" * 24
TRAINER_1, TRAINER_2 = "1" * 24, "2" * 24
TOKENS = {DAEMON_A: "daemon", DAEMON_B: "daemon", TRAINER_1: "trainer", TRAINER_2: "trainer"}


@pytest.fixture(scope="module")
def pki():
    ca, ca_key, ca_cert = make_ca()
    return {
        "ca": ca,
        "server": issue(ca_key, ca_cert, "localhost", server=True),
        "engine-a": issue(ca_key, ca_cert, "engine-a", server=False),
        "engine-b": issue(ca_key, ca_cert, "engine-b", server=False),
    }


def _creds(pki, client: str) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=pki["ca"].cert, private_key=pki[client].key, certificate_chain=pki[client].cert)


async def _server(pki, tokens=None) -> CoordinatorServer:
    creds = grpc.ssl_server_credentials([(pki["server"].key, pki["server"].cert)], root_certificates=pki["ca"].cert, require_client_auth=True)
    s = CoordinatorServer(FAST, listen="localhost:0", server_credentials=creds, interceptors=(TokenAuthInterceptor(tokens),) if tokens else ())
    await s.start()
    return s


def _agent(server, pki, client, daemon_id, token=None, **kw) -> DaemonAgent:
    ident = DaemonIdentity(daemon_id=daemon_id, engine="test", model="tiny", host="127.0.0.1", inventory=INVENTORY)
    agent = DaemonAgent(server.address, ident, ScriptedHandler(), credentials=_creds(pki, client), token=token, reconnect_max_s=0.3, rpc_timeout_s=3, **kw)
    agent.start()
    return agent


def _register(daemon_id: str, dirty: bool) -> pb.RegisterDaemonRequest:
    return pb.RegisterDaemonRequest(daemon_id=daemon_id, engine="x", num_ranks=1, transports=["gloo"], served_version=1, dirty=dirty,
                                    inventory=[pb.TensorSpec(name=s.name, shape=list(s.shape), dtype=s.dtype) for s in INVENTORY])


async def test_token_binds_daemon_id_and_rounds_belong_to_their_trainer(pki):
    """Another daemon token cannot take over a daemon id, open its session or clear its dirty flag; another trainer cannot commit or abort a round."""
    server = await _server(pki, TOKENS)
    owner = _agent(server, pki, "engine-a", "d0", DAEMON_A)
    thief = None
    try:
        await owner.wait_connected(10)
        thief = _agent(server, pki, "engine-a", "d0", DAEMON_B)
        await wait_until(lambda: "PERMISSION_DENIED" in thief.last_error, 10)
        assert "another credential" in thief.last_error and not thief.connected.is_set()
        rec = server.coordinator.daemons["d0"]
        rec.dirty = True  # as after a failed round
        creds = grpc.composite_channel_credentials(_creds(pki, "engine-a"), grpc.access_token_call_credentials(DAEMON_B))
        async with grpc.aio.secure_channel(server.address, creds) as ch:
            stub = pb_grpc.DaemonServiceStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.RegisterDaemon(_register("d0", dirty=False), timeout=5)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, info.value
            # Even holding d0's session token, another credential cannot answer for d0.
            hello = pb.DaemonMessage(hello=pb.SessionHello(daemon_id="d0", session_token=rec.session_token))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in stub.Connect(iter([hello]), timeout=5):
                    pass
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, info.value
        assert server.coordinator.daemons["d0"] is rec and rec.dirty and rec.healthy and owner.sessions_opened == 1

        # Rounds belong to the trainer credential that began them.
        async with TrainerClient(server.address, credentials=_creds(pki, "engine-a"), token=TRAINER_1) as t1, \
                TrainerClient(server.address, credentials=_creds(pki, "engine-a"), token=TRAINER_2) as t2:
            a = await t1.begin_update(1, INVENTORY, **RDV)
            with pytest.raises(PermissionDenied, match="another trainer"):
                await t2.abort_update(a.update_id, "hostile")
            with pytest.raises(PermissionDenied, match="another trainer"):
                await t2.commit_update(a, trainer_checksums(a))
            assert (await t1.commit_update(a, trainer_checksums(a))).committed
        assert not rec.dirty
    finally:
        await owner.close(1)
        if thief is not None:
            await thief.close(1)
        await server.stop(0.5)


async def test_client_certificate_binds_daemon_id(pki):
    """Under mTLS without tokens, the client certificate is the identity: engine-b's certificate cannot take engine-a's daemon id."""
    server = await _server(pki)
    owner = _agent(server, pki, "engine-a", "d0")
    thief = None
    try:
        await owner.wait_connected(10)
        thief = _agent(server, pki, "engine-b", "d0")
        await wait_until(lambda: "PERMISSION_DENIED" in thief.last_error, 10)
        assert server.coordinator.daemons["d0"].owner.startswith("cert:") and owner.sessions_opened == 1
    finally:
        await owner.close(1)
        if thief is not None:
            await thief.close(1)
        await server.stop(0.5)


@pytest.mark.slow
async def test_second_live_process_with_the_same_id_is_refused_then_takes_over_after_the_first_dies():
    """Without credentials, a second process with a live id gets ALREADY_EXISTS (no flapping); once the first is SIGKILLed, it registers."""
    server = await start_coordinator()
    proc = subprocess.Popen([sys.executable, "-m", "tests.control.agent_proc", server.address, "dup"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    second = None
    try:
        await wait_until(lambda: "dup" in server.coordinator.daemons and server.coordinator.daemons["dup"].healthy, 30)
        first = server.coordinator.daemons["dup"]
        ident = DaemonIdentity(daemon_id="dup", engine="test", model="tiny", host="127.0.0.1", inventory=INVENTORY)
        second = DaemonAgent(server.address, ident, ScriptedHandler(), reconnect_min_s=0.2, reconnect_max_s=0.3)
        second.start()
        await wait_until(lambda: "ALREADY_EXISTS" in second.last_error, 10)
        assert "live session" in second.last_error and "--daemon-id" in second.last_error
        # The first process kept its one session throughout: no silent flap.
        await wait_until(lambda: second.last_error.count("ALREADY_EXISTS") and server.coordinator.daemons["dup"] is first, 2)
        assert first.healthy and not second.connected.is_set()
        async with TrainerClient(server.address) as client:
            a = await client.begin_update(1, INVENTORY, **RDV)
            assert (await client.commit_update(a, trainer_checksums(a))).committed
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        await second.wait_connected(FAST.heartbeat_timeout_s + 10)
        assert server.coordinator.daemons["dup"] is not first and server.coordinator.daemons["dup"].healthy
    finally:
        if second is not None:
            await second.close(1)
        stop_process(proc)
        await server.stop(0.5)
