"""The emulated network alone (no weightsync processes): isolation, rates, cuts, partitions, delay."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from bench.fleet.net import LinkSpec, Network, namespaces_with_prefix
from tests.fleet.conftest import needs_netns

pytestmark = needs_netns  # seconds, not minutes: no weightsync processes

PORT = 5001
# A server that counts the bytes of one connection, and a client that connects and sends N bytes.
_SERVER = f"""
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", {PORT})); s.listen(8)
print("listening", flush=True)
while True:
    c, _ = s.accept(); n = 0
    while (d := c.recv(1 << 20)):
        n += len(d)
    print(n, flush=True)
"""
_CLIENT = """
import socket, sys, time
t0 = time.monotonic()
try:
    s = socket.create_connection((sys.argv[1], {port}), timeout=float(sys.argv[3]))
except OSError as e:
    print("error", e.errno, flush=True); sys.exit(0)
connect_s = time.monotonic() - t0
s.sendall(b"x" * int(sys.argv[2])); s.close()
print("ok", connect_s, time.monotonic() - t0, flush=True)
""".format(port=PORT)


@pytest.fixture
def net():
    n = Network([("a", LinkSpec.symmetric(50)), ("b", LinkSpec.symmetric(50, impairable=True))]).create()
    server = subprocess.Popen([*n.exec_prefix("b"), sys.executable, "-c", _SERVER], stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "listening"
    try:
        yield n
    finally:
        server.kill()
        server.wait(10)
        n.close()
    assert namespaces_with_prefix(n.prefix) == []


def _send(net: Network, src: str, address: str, nbytes: int, timeout_s: float = 2.0) -> list[str]:
    out = subprocess.run([*net.exec_prefix(src), sys.executable, "-c", _CLIENT, address, str(nbytes), str(timeout_s)],
                         capture_output=True, text=True, timeout=120)
    return out.stdout.split()


def test_hosts_reach_each_other_and_nothing_else(net):
    """Hosts talk over the bridge; no host has a default route, so nothing outside the run is reachable."""
    assert _send(net, "a", net.hosts["b"].address, 1000)[0] == "ok"
    routes = subprocess.run(["ip", "-n", net.hosts["a"].netns, "route", "show"], capture_output=True, text=True).stdout
    assert "default" not in routes
    assert _send(net, "a", "192.0.2.1", 10) == ["error", "101"]  # ENETUNREACH


def test_link_rate_is_enforced_and_counted(net):
    """4 MiB through a 50 Mbit/s link takes at least its wire time, and both ends' counters see the bytes."""
    nbytes = 4 << 20
    before = net.counters()
    t0 = time.monotonic()
    assert _send(net, "a", net.hosts["b"].address, nbytes)[0] == "ok"
    # The client returns once its kernel took the bytes; wait until both ends' interfaces counted them all.
    # b's count includes a header per segment, a's (segmentation offloaded) far fewer, so b may reach
    # nbytes before the last payload bytes have left a: each end is waited for on its own.
    deadline = t0 + 30

    def moved(after) -> tuple[int, int]:
        return after["a"]["tx_bytes"] - before["a"]["tx_bytes"], after["b"]["rx_bytes"] - before["b"]["rx_bytes"]

    while min(moved(after := net.counters())) < nbytes:
        assert time.monotonic() < deadline, f"a sent {moved(after)[0]} and b received {moved(after)[1]} of {nbytes} bytes"
        time.sleep(0.02)
    elapsed_s = time.monotonic() - t0
    assert elapsed_s >= 0.9 * nbytes * 8 / 50e6


def test_cut_and_partition_drop_traffic_until_healed(net):
    """A pulled cable and a partition both stop connections; healed, the same connection works again."""
    b = net.hosts["b"].address
    net.set_link_up("b", False)
    assert _send(net, "a", b, 10, timeout_s=1.0)[0] == "error"
    net.set_link_up("b", True)
    assert _send(net, "a", b, 10)[0] == "ok"
    net.partition("a", "b")
    assert _send(net, "a", b, 10, timeout_s=1.0)[0] == "error"
    net.heal_partitions("a", "b")
    assert _send(net, "a", b, 10)[0] == "ok"


def test_userspace_cable_adds_delay(net):
    """50 ms each way on b's cable: a TCP handshake (one round trip) takes at least 100 ms; 0 ms restores it."""
    b = net.hosts["b"].address
    net.impair("b", delay_ms=50, loss_pct=0)
    assert float(_send(net, "a", b, 10)[1]) >= 0.1
    net.impair("b", delay_ms=0, loss_pct=0)
    assert float(_send(net, "a", b, 10)[1]) < 0.1
    with pytest.raises(ValueError, match="host a.*impairable=True"):
        net.impair("a", delay_ms=1, loss_pct=0)
