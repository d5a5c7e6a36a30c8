"""Delta rounds on the emulated fleet: the synthetic step, the delta speed of light, and fleet_round.py --delta on 4 hosts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.fleet.fleet import fleet_manifest
from bench.fleet.light import delta_round_bound, round_bound
from bench.fleet.step import changed_fraction, step_like
from tests.fleet.conftest import needs_netns
from weightsync.dataplane.synthetic import random_tensors

ROOT = Path(__file__).resolve().parents[2]
MODEL_MIB = 2
FRACTION = 0.02


def test_step_changes_the_fraction_scattered_and_spread_across_tensors():
    """step_like changes FRACTION of all elements (weighted), a different fraction per tensor, every change one ulp."""
    base = dict(random_tensors(fleet_manifest(4), seed=1))
    new = step_like(base, fraction=FRACTION, seed=2)
    assert changed_fraction(base, new) == pytest.approx(FRACTION, rel=0.02)
    per_tensor = [changed_fraction({k: base[k]}, {k: new[k]}) for k in base]
    assert max(per_tensor) > 1.3 * FRACTION and min(per_tensor) < 0.8 * FRACTION, per_tensor
    name = next(iter(base))
    diff = (new[name].view(torch.int16).int() - base[name].view(torch.int16).int()).reshape(-1)
    changed = diff.nonzero().squeeze(1)
    assert set(diff[changed].abs().unique().tolist()) <= {1, 65535}  # one ulp (a wrap at the pattern's edge)
    assert changed.min() < base[name].numel() // 10 and changed.max() > base[name].numel() * 9 // 10  # scattered
    assert step_like(base, fraction=FRACTION, seed=2)[name].view(torch.int16).equal(new[name].view(torch.int16))  # seeded
    with pytest.raises(ValueError, match="fraction must be in"):
        step_like(base, fraction=0, seed=1)


def test_delta_speed_of_light_is_the_payload_once_and_the_star_n_payloads():
    """A delta round's bound is one payload through a link; point to point from the root (no relay) is the star of N payloads."""
    payload = {f"e{i}": 250_000 for i in range(7)}
    rates = {h: 100.0 for h in payload}
    d = delta_round_bound(payload_bytes=payload, ingress_mbit=rates, sender_egress_mbit=[100.0])
    assert d.speed_of_light_s == pytest.approx(0.02)
    assert d.star_bound_s == d.gloo_bound_s == d.gloo_model_s == pytest.approx(7 * 0.02)
    dense = round_bound(needed_bytes={h: 25_000_000 for h in payload}, ingress_mbit=rates, sender_egress_mbit=[100.0])
    assert dense.gloo_bound_s == pytest.approx(3 * 2.0)  # the broadcast tree: ceil(log2 8) copies from the root


@pytest.mark.slow
@needs_netns
def test_fleet_round_delta_smoke(tmp_path):
    """fleet_round.py --delta on 4 hosts: every engine takes the delta, and the per-host counters show a small fraction of the dense round's bytes."""
    out = tmp_path / "round.json"
    res = subprocess.run(
        [sys.executable, "bench/fleet_round.py", "--engines", "3", "--link-mbit", "100", "--model-mib", str(MODEL_MIB),
         "--rounds", "1", "--delta", str(FRACTION), "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())
    delta, dense, ratios = r["delta"], r, r["delta_vs_dense"]
    assert delta["rounds"][0]["encodings"] == {"e0": "delta", "e1": "delta", "e2": "delta"}
    assert delta["changed_fraction"] == pytest.approx(FRACTION, rel=0.05)
    hosts = ("e0", "e1", "e2")
    dw, nw = delta["wire_bytes_per_host"], dense["wire_bytes_per_host"]
    model_bytes = MODEL_MIB << 20
    assert all(nw[h]["rx_bytes"] >= model_bytes for h in hosts)
    # 2% changed, gaps8 (1 byte of position + 2 of value per change): about 3% of dense, plus headers.
    for h in hosts:
        assert dw[h]["rx_bytes"] < 0.06 * nw[h]["rx_bytes"], (h, dw[h], nw[h])
        assert dw[h]["rx_bytes"] >= delta["payload_bytes_per_receiver"][h] > 0.02 * model_bytes
    # The relay (dataplane/relay.py): the payload leaves the trainer once, not once per receiver.
    payload = delta["payload_bytes_per_receiver"]["e0"]
    assert payload <= dw["t0"]["tx_bytes"] < 2 * payload, (dw["t0"], payload)
    assert ratios["wire_bytes_total"] < 0.06 and ratios["receivers_rx_bytes"] < 0.06
    assert 0 < delta["ratio"] <= 1.0 and 0 < ratios["trainer_link_share_of_delta_round"] < 1.0
    assert delta["achieved_s"] < dense["achieved_s"]
