"""Real multi-process rounds over gloo on 127.0.0.1: bytes arrive exactly, groups are reused."""

from __future__ import annotations

import pytest

from _dp_workers import RankOptions, launch, make_assignment
from weightsync.dataplane.synthetic import MODEL_SHAPES


def _all_ok(reports) -> None:
    for r, rep in reports.items():
        assert rep.rounds, f"rank {r} reported nothing (exit code {rep.exitcode})"
        for rd in rep.rounds:
            assert rd["ok"], f"rank {r} failed: {rd.get('traceback')}"


def _check_delivery(reports, receivers, total_bytes) -> None:
    sent = reports[0].rounds[0]["checksums"]
    for r in receivers:
        rd = reports[r].rounds[0]
        assert rd["mismatched"] == [], f"rank {r} holds wrong bytes for {rd['mismatched'][:5]}"
        assert rd["checksums"] == sent
        assert rd["bytes_received"] == total_bytes


def test_small_model_reaches_two_receivers_bit_exactly(tiny_specs):
    """A trainer moves a tiny model to one receive_assignment and one iter_assignment receiver, bit for bit."""
    rounds = {}

    def build(port):
        a = make_assignment(tiny_specs, port=port, world_size=3, update_id="u1", bucket_size_bytes=64 << 10)
        rounds["a"] = a
        return {r: [a] for r in range(3)}

    reports = launch(3, build, {2: RankOptions(mode="iter")}, timeout_s=90)
    _all_ok(reports)
    a = rounds["a"]
    assert len(a.plan.buckets) > 2, "the test must cross several buckets to exercise the ring"
    _check_delivery(reports, [1, 2], a.plan.total_bytes)
    assert len(reports[0].rounds[0]["checksums"]) == len(tiny_specs)
    for r in (1, 2):
        progress = reports[r].rounds[0]["progress"]
        assert [p[0] for p in progress] == list(range(1, len(a.plan.buckets) + 1)), "one call per bucket, in order"
        assert progress[-1] == (len(a.plan.buckets), a.plan.total_bytes)


@pytest.mark.slow
def test_qwen_0_5b_reaches_two_receivers_bit_exactly(qwen_0_5b_specs):
    """Qwen2.5-0.5B-shaped random bf16 weights (~0.92 GiB, 290 tensors) reach two receivers bit for bit."""
    rounds = {}

    def build(port):
        a = make_assignment(qwen_0_5b_specs, port=port, world_size=3, update_id="u1", bucket_size_bytes=128 << 20)
        rounds["a"] = a
        return {r: [a] for r in range(3)}

    reports = launch(3, build, timeout_s=280)
    _all_ok(reports)
    a = rounds["a"]
    assert a.plan.num_tensors == 290
    _check_delivery(reports, [1, 2], a.plan.total_bytes)


@pytest.mark.parametrize("titan", [False, True], ids=["hf-names", "titan-names"])
def test_sharded_dtensor_trainer_sends_unsharded_bytes(tiny_specs, tmp_path, titan):
    """Two trainer ranks with Shard(0) DTensors in their own world (HF names, or torchtitan names sent through TitanToHF.map_state_dict) deliver the full HF bytes to one receiver."""
    init_file = str(tmp_path / "trainer_world")
    heads = (MODEL_SHAPES["tiny"].num_heads, MODEL_SHAPES["tiny"].num_kv_heads) if titan else None
    options = {
        0: RankOptions(trainer_world=(init_file, 2), dp_rank=0, titan_heads=heads),
        1: RankOptions(trainer_world=(init_file, 2), titan_heads=heads),
        2: RankOptions(dp_rank=1),
    }

    def build(port):
        a = make_assignment(tiny_specs, port=port, world_size=2, update_id="u1", bucket_size_bytes=64 << 10)
        return {0: [a], 1: [a], 2: [a]}

    reports = launch(3, build, options, timeout_s=90)
    _all_ok(reports)
    receiver = reports[2].rounds[0]
    assert receiver["mismatched"] == []
    assert receiver["checksums"] == reports[0].rounds[0]["checksums"]
    assert reports[1].rounds[0]["checksums"] == {}, "trainer rank 1 only gathers"


def test_group_is_reused_while_group_id_holds_and_rebuilt_on_a_new_one(tiny_specs):
    """Two rounds on group_id g1 build one group per rank; a third round on g2 builds a second."""

    def build(port):
        a1 = make_assignment(tiny_specs, port=port, world_size=3, update_id="u1", group_id="g1", version=1)
        a2 = make_assignment(tiny_specs, port=port, world_size=3, update_id="u2", group_id="g1", version=2)
        a3 = make_assignment(tiny_specs, port=port, world_size=3, update_id="u3", group_id="g2", version=3)
        return {r: [a1, a2, a3] for r in range(3)}

    reports = launch(3, build, timeout_s=90)
    _all_ok(reports)
    for r, rep in reports.items():
        assert len(rep.rounds) == 3
        assert rep.num_constructions == 2, f"rank {r} built {rep.num_constructions} groups for 2 group ids"
    for r in (1, 2):
        assert all(rd["mismatched"] == [] for rd in reports[r].rounds)


def test_receiver_destination_takes_the_bytes_into_engine_tensors(tiny_specs):
    """A receiver that offers its engine's tensors (destination) holds the sent bytes in them; its apply
    function is handed those same tensors; the other receiver, without destination, gets them too."""

    def build(port):
        a = make_assignment(tiny_specs, port=port, world_size=3, update_id="u1", bucket_size_bytes=16 << 10)
        return {r: [a] for r in range(3)}

    reports = launch(3, build, {1: RankOptions(destination=True)}, timeout_s=90)
    _all_ok(reports)
    for r in (1, 2):
        assert reports[r].rounds[0]["mismatched"] == []
        assert reports[r].rounds[0]["checksums"] == reports[0].rounds[0]["checksums"]


def test_a_destination_of_the_wrong_dtype_fails_the_round_on_every_rank(tiny_specs):
    """A consumer that offers a float64 tensor for a bfloat16 entry gets a ValueError naming the tensor,
    the expected and the offered shape and dtype, and every rank raises RoundFailed naming that rank."""
    bad = tiny_specs[3].name

    def build(port):
        a = make_assignment(tiny_specs, port=port, world_size=3, update_id="u1", bucket_size_bytes=16 << 10,
                            timeout_s=10.0)
        return {r: [a] for r in range(3)}

    reports = launch(3, build, {1: RankOptions(destination=True, bad_destination=bad)}, timeout_s=90)
    for r in (0, 2):
        rd = reports[r].rounds[0]
        assert rd["error_type"] == "RoundFailed", rd.get("traceback")
        assert "rank 1" in rd["error"] and f"destination for {bad}" in rd["error"]
    rd = reports[1].rounds[0]
    assert not rd["ok"]
    assert f"destination for {bad}: expected a contiguous" in rd["error"] and "float64" in rd["error"]
