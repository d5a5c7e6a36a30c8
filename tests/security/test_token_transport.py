"""Bearer tokens never travel in plaintext (issue 10, item 9)."""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.conftest import free_port
from tests.control.helpers import INVENTORY, start_agent, trainer_checksums
from tests.control.test_processes import ROOT, stop_process, wait_serving
from weightsync.control.daemon_agent import DaemonAgent, DaemonIdentity
from weightsync.control.trainer_client import TrainerClient
from weightsync.core import Unauthenticated

RDV = dict(rendezvous_host="127.0.0.1", rendezvous_port=29999)


def _coordinator(port: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "weightsync.runtime.cli", "coordinator", "--listen", f"127.0.0.1:{port}", *extra],
                            cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_coordinator_refuses_tokens_without_tls(tmp_path):
    """`--tokens-file` without TLS exits with an error naming the fix; nothing listens."""
    tokens = tmp_path / "tokens"
    tokens.write_text("trainer " + "t" * 24 + "\n")
    proc = _coordinator(free_port(), "--tokens-file", str(tokens))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "plaintext" in out and "--allow-insecure-tokens" in out and "--tls-cert" in out, out


@pytest.mark.slow
async def test_allow_insecure_tokens_warns_and_loopback_tokens_work(tmp_path):
    """With --allow-insecure-tokens the coordinator warns on start; loopback clients send tokens as call credentials and a round commits."""
    tokens = tmp_path / "tokens"
    trainer_tok, daemon_tok = "t" * 24, "d" * 24
    tokens.write_text(f"trainer {trainer_tok}\ndaemon {daemon_tok}\n")
    port = free_port()
    address = f"127.0.0.1:{port}"
    proc = _coordinator(port, "--tokens-file", str(tokens), "--allow-insecure-tokens")
    agent = None
    try:
        await wait_serving(address)
        agent = await start_agent(address, "d0", token=daemon_tok)
        async with TrainerClient(address, token=trainer_tok) as c:
            a = await c.begin_update(1, INVENTORY, **RDV)
            assert (await c.commit_update(a, trainer_checksums(a))).committed
        async with TrainerClient(address) as anonymous:
            with pytest.raises(Unauthenticated):
                await anonymous.list_daemons()
        # Reflection needs a token too (its request stream is read for anyone it admits).
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        async with grpc.aio.insecure_channel(address) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(iter([ask]), timeout=5):
                    pass
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        creds = grpc.composite_channel_credentials(grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP),
                                                   grpc.access_token_call_credentials(trainer_tok))
        async with grpc.aio.secure_channel(address, creds) as ch:
            replies = [r async for r in reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(iter([ask]), timeout=5)]
            assert "weightsync.v1.TrainerService" in [s.name for s in replies[0].list_services_response.service]
    finally:
        if agent is not None:
            await agent.close(1)
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
        stop_process(proc)
    assert "WARNING" in out and "--allow-insecure-tokens" in out and "plaintext" in out, out


async def test_clients_refuse_to_send_a_token_in_plaintext_off_the_host():
    """A trainer or daemon given a token but no TLS for a non-loopback coordinator refuses before any byte is sent."""
    ident = DaemonIdentity(daemon_id="d0", engine="test", model="tiny", host="h", inventory=INVENTORY)
    for target in ("10.1.2.3:50051", "coordinator.example:50051"):
        with pytest.raises(ValueError, match="never sent in plaintext"):
            TrainerClient(target, token="t" * 24)
        with pytest.raises(ValueError, match="never sent in plaintext"):
            DaemonAgent(target, ident, lambda *a: None, token="d" * 24)
