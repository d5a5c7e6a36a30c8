"""The routed round on 4 emulated hosts: 2 trainer ranks each send their half, 2 engines each receive the model once."""

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
    """fleet_round.py --trainer-ranks 2: each trainer host emits half the model per engine, each engine takes it once."""
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
    # The round record: each trainer rank sent its half to each of the 2 engines; each engine rank received the model.
    assert {k: v[1:] for k, v in r["rank_bytes"].items()} == {"0": [model_bytes, 0], "1": [model_bytes, 0], "2": [0, model_bytes], "3": [0, model_bytes]}
    wire = r["wire_bytes_per_host"]
    # No rank gathers: each trainer host's link carries its own half once per engine, no more.
    for h in ("t0", "t1"):
        assert model_bytes <= wire[h]["tx_bytes"] < 1.1 * model_bytes, (h, wire[h])
    for h in ("e0", "e1"):
        assert model_bytes <= wire[h]["rx_bytes"] < 1.1 * model_bytes, (h, wire[h])
