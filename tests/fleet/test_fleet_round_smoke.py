"""The 4-host benchmark runs end to end, also with the root FORWARD policy at DROP (as after dockerd)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fleet.conftest import needs_netns

pytestmark = [pytest.mark.slow, needs_netns]

ROOT = Path(__file__).resolve().parents[2]
MODEL_MIB = 2


@pytest.fixture
def forward_drop():
    """Sets the root namespace's iptables FORWARD policy to DROP, as dockerd does, and restores it."""
    if shutil.which("iptables") is None:
        yield None  # no iptables, so nothing (dockerd included) can have set DROP here
        return
    before = subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True, text=True, check=True).stdout.split("\n")[0]
    policy = before.split()[-1]  # "-P FORWARD ACCEPT"
    subprocess.run(["iptables", "-P", "FORWARD", "DROP"], check=True)
    try:
        yield policy
    finally:
        subprocess.run(["iptables", "-P", "FORWARD", policy], check=True)


def test_fleet_round_smoke(tmp_path, forward_drop):
    """fleet_round.py on 4 hosts writes achieved time, speed of light, ratio and per-host wire bytes from counters."""
    out = tmp_path / "round.json"
    res = subprocess.run(
        [sys.executable, "bench/fleet_round.py", "--trainer-ranks", "1", "--engines", "3", "--tp", "1",
         "--link-mbit", "100", "--model-mib", str(MODEL_MIB), "--rounds", "1", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["hosts"] == 4
    assert 0 < r["achieved_s"] and 0 < r["speed_of_light_s"]
    assert 0 < r["ratio"] <= 1.0
    assert r["ratio"] == pytest.approx(r["speed_of_light_s"] / r["achieved_s"])
    wire = r["wire_bytes_per_host"]
    assert set(wire) == {"coord", "t0", "e0", "e1", "e2"}
    model_bytes = MODEL_MIB << 20
    # The default relay on separate hosts is the chain t0 -> e0 -> e1 -> e2 (dataplane/relay.py):
    # the model leaves the trainer once, and every receiver but the last forwards one copy.
    assert r["relay"] == "auto"
    assert model_bytes <= wire["t0"]["tx_bytes"] < 1.2 * model_bytes
    assert all(model_bytes <= wire[h]["rx_bytes"] < 1.2 * model_bytes for h in ("e0", "e1", "e2"))
    assert all(model_bytes <= wire[h]["tx_bytes"] < 1.2 * model_bytes for h in ("e0", "e1"))
    assert wire["e2"]["tx_bytes"] < 0.1 * model_bytes
