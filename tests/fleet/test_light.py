"""The speed-of-light arithmetic and the fleet's layout; no namespaces needed."""

from __future__ import annotations

import pytest

from bench.fleet.fleet import FleetSpec, fleet_manifest
from bench.fleet.light import gloo_broadcast_model_s, gloo_broadcast_tree, plan_bytes, round_bound
from bench.fleet.net import LinkSpec, Network

MIB = 1 << 20


def test_speed_of_light_is_one_copy_through_the_slowest_binding_link():
    """One sender: the model once through its link; a slower receiver binds instead when its ingress is the bottleneck."""
    b = round_bound(needed_bytes={"e0": 100 * MIB, "e1": 100 * MIB}, ingress_mbit={"e0": 800, "e1": 800}, sender_egress_mbit=[400])
    assert b.speed_of_light_s == pytest.approx(100 * MIB / 50e6)
    assert b.star_bound_s == pytest.approx(2 * b.speed_of_light_s)
    slow = round_bound(needed_bytes={"e0": 100 * MIB, "e1": 100 * MIB}, ingress_mbit={"e0": 800, "e1": 100}, sender_egress_mbit=[400])
    assert slow.speed_of_light_s == pytest.approx(100 * MIB / 12.5e6) == slow.receiver_bound_s
    two_senders = round_bound(needed_bytes={"e0": 100 * MIB}, ingress_mbit={"e0": 1600}, sender_egress_mbit=[400, 400])
    assert two_senders.sender_bound_s == pytest.approx(100 * MIB / 100e6)


def test_gloo_broadcast_replays_gloos_binomial_tree():
    """The root sends ceil(log2 N) copies (the bound); sharing fairly, the last copy lands after dim*(dim+1)/2 message times."""
    assert gloo_broadcast_tree(4) == {0: [1, 2], 1: [3], 2: [], 3: []}
    assert sorted(c for cs in gloo_broadcast_tree(16).values() for c in cs) == list(range(1, 16))
    for ranks, copies, steps in ((2, 1, 1), (4, 2, 3), (8, 3, 6), (16, 4, 10)):
        assert len(gloo_broadcast_tree(ranks)[0]) == copies
        assert gloo_broadcast_model_s(ranks, 125_000, 1.0) == pytest.approx(steps)
        b = round_bound(needed_bytes={f"e{i}": 125_000 for i in range(ranks - 1)},
                        ingress_mbit={f"e{i}": 1.0 for i in range(ranks - 1)}, sender_egress_mbit=[1.0])
        assert (b.gloo_bound_s, b.gloo_model_s, b.star_bound_s) == pytest.approx((copies, steps, ranks - 1))


def test_bad_input_names_the_field():
    """Bad sizes, rates and names are refused with the field and the value."""
    with pytest.raises(ValueError, match="ingress_mbit.*e1"):
        round_bound(needed_bytes={"e0": 1, "e1": 1}, ingress_mbit={"e0": 1}, sender_egress_mbit=[1])
    with pytest.raises(ValueError, match="egress_mbit must be > 0"):
        LinkSpec(egress_mbit=0)
    with pytest.raises(ValueError, match="loss_pct"):
        LinkSpec(loss_pct=101)
    with pytest.raises(ValueError, match="host name 'E-1'"):
        Network([("E-1", LinkSpec())])
    with pytest.raises(ValueError, match="prefix 'x'"):
        Network([("a", LinkSpec())], prefix="x")
    with pytest.raises(ValueError, match="links: unknown hosts \\['e9'\\]"):
        FleetSpec(num_engines=1, links={"e9": LinkSpec()})


def test_layout_one_host_per_rank_and_short_interface_names():
    """TP ranks get a host each; every interface name fits Linux's 15 characters."""
    spec = FleetSpec(num_engines=2, tp=2)
    assert spec.host_names == ["coord", "t0", "e0r0", "e0r1", "e1r0", "e1r1"]
    net = Network([(h, LinkSpec()) for h in spec.host_names], prefix="wszzzzzz")
    assert all(len(h.ifname) <= 15 and len(h.switch_ifname) <= 15 for h in net.hosts.values())
    assert len({h.address for h in net.hosts.values()}) == len(spec.host_names)


def test_plan_bytes_cover_the_model():
    """A receiver's needed bytes are the plan's: the model's bytes, padding included."""
    manifest = fleet_manifest(3.5)
    model = sum(s.nbytes for s in manifest)
    assert model == int(3.5 * MIB)
    assert model <= plan_bytes(manifest, 1 * MIB) < model + 256 * len(manifest)
