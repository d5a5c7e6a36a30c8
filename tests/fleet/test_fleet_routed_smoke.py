"""The routed round on 4 emulated hosts: 2 trainer ranks each send their half once, 2 engines each receive the model once and relay it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fleet.conftest import needs_netns

pytestmark = [pytest.mark.slow, needs_netns]

ROOT = Path(__file__).resolve().parents[2]
MODEL_MIB = 2


def test_fleet_round_routed_smoke(tmp_path):
    """fleet_round.py --trainer-ranks 2: each trainer host emits its half once (relayed), each engine takes the model once."""
    out = tmp_path / "round.json"
    res = subprocess.run(
        [sys.executable, "bench/fleet_round.py", "--trainer-ranks", "2", "--engines", "2", "--tp", "1",
         "--link-mbit", "100", "--model-mib", str(MODEL_MIB), "--rounds", "1", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["hosts"] == 4 and r["routed"]
    assert 0 < r["ratio"] <= 1.0
    model_bytes = MODEL_MIB << 20
    half = model_bytes // 2
    # The round record: each trainer rank sent its half once; each engine rank received the model.
    assert {k: v[1:] for k, v in r["rank_bytes"].items()} == {"0": [half, 0], "1": [half, 0], "2": [0, model_bytes], "3": [0, model_bytes]}
    wire = r["wire_bytes_per_host"]
    # Interface counters: a piece both engines need leaves its sender once (a star would send it twice),
    # and no rank gathers.
    for h in ("t0", "t1"):
        assert half <= wire[h]["tx_bytes"] < 1.1 * half, (h, wire[h])
    for h in ("e0", "e1"):
        assert model_bytes <= wire[h]["rx_bytes"] < 1.1 * model_bytes, (h, wire[h])
    # The second copy travels engine to engine: each engine heads one sender's chain and forwards that half.
    for h in ("e0", "e1"):
        assert half <= wire[h]["tx_bytes"] < 1.1 * half, (h, wire[h])
