"""Ranks fail together: a dead peer, a foreign plan, a bad tensor or a failing consumer stops every rank."""

from __future__ import annotations

from _dp_workers import RankOptions, launch, make_assignment
from weightsync.core import BucketPlan

TIMEOUT_S = 6.0
# Spawned ranks start, rendezvous and allocate before the round's clock starts;
# the margin covers scheduling on two busy cores, not a missed timeout.
MARGIN_S = 4.0


def test_killed_receiver_makes_every_other_rank_raise_within_the_timeout(tiny_specs):
    """A receiver SIGKILLed while it holds bucket 2 makes the sender and the other receiver raise TransferError in time."""

    def build(port):
        a = make_assignment(
            tiny_specs, port=port, world_size=3, update_id="u1", bucket_size_bytes=16 << 10, timeout_s=TIMEOUT_S
        )
        assert len(a.plan.buckets) >= 5
        return {r: [a] for r in range(3)}

    reports = launch(3, build, {1: RankOptions(kill_at_bucket=2)}, timeout_s=90)
    assert reports[1].exitcode == -9 and reports[1].rounds == []
    for r in (0, 2):
        rd = reports[r].rounds[0]
        assert not rd["ok"], f"rank {r} finished a round whose peer died"
        assert rd["error_type"] in ("TransferError", "RoundFailed"), rd["traceback"]
        assert f"rank {r}" in rd["error"] or "rank " in rd["error"]
        assert rd["elapsed_s"] < TIMEOUT_S + MARGIN_S, f"rank {r} took {rd['elapsed_s']:.1f} s"


def test_plan_mismatch_is_refused_on_every_rank_before_anything_is_applied(tiny_specs):
    """A receiver holding a plan with another digest makes all three ranks raise RoundFailed, and nothing is applied."""

    def build(port):
        a = make_assignment(tiny_specs, port=port, world_size=3, update_id="u1", bucket_size_bytes=64 << 10)
        other = BucketPlan.build(tiny_specs, 32 << 10)
        assert other.digest != a.plan.digest
        foreign = type(a)(a.update_id, a.version, a.rendezvous, a.participants, other, a.deadline_s)
        return {0: [a], 1: [a], 2: [foreign]}

    reports = launch(3, build, timeout_s=90)
    for r in range(3):
        rd = reports[r].rounds[0]
        assert not rd["ok"] and rd["error_type"] == "RoundFailed", rd.get("traceback")
        assert "rank 2" in rd["error"] and "plan digest mismatch" in rd["error"], rd["error"]
        assert rd["num_applied"] == 0


def test_missing_tensor_raises_valueerror_on_the_sender_and_fails_the_receivers(tiny_specs):
    """A sender missing a planned tensor raises ValueError naming it; receivers raise RoundFailed and apply nothing."""
    missing = "model.layers.1.mlp.up_proj.weight"

    def build(port):
        a = make_assignment(tiny_specs, port=port, world_size=3, update_id="u1")
        return {r: [a] for r in range(3)}

    reports = launch(3, build, {0: RankOptions(drop_tensor=missing)}, timeout_s=90)
    sender = reports[0].rounds[0]
    assert sender["error_type"] == "ValueError" and missing in sender["error"] and "[128, 64]" in sender["error"]
    for r in (1, 2):
        rd = reports[r].rounds[0]
        assert rd["error_type"] == "RoundFailed" and "rank 0" in rd["error"] and missing in rd["error"], rd["error"]
        assert rd["num_applied"] == 0


def test_failing_consumer_fails_every_rank_with_its_reason(tiny_specs):
    """A receiver whose engine rejects a tensor makes every rank raise RoundFailed naming that rank and the reason."""

    def build(port):
        a = make_assignment(tiny_specs, port=port, world_size=3, update_id="u1", bucket_size_bytes=16 << 10)
        return {r: [a] for r in range(3)}

    reports = launch(3, build, {2: RankOptions(engine_drops="model.norm.weight")}, timeout_s=90)
    for r in range(3):
        rd = reports[r].rounds[0]
        assert not rd["ok"] and rd["error_type"] == "RoundFailed", rd.get("traceback")
        assert "rank 2" in rd["error"] and "model.norm.weight: not held by this engine" in rd["error"], rd["error"]
    assert reports[1].rounds[0]["num_applied"] == len(tiny_specs), "the healthy receiver still got every bucket"


def test_sender_error_mid_transfer_reaches_waiting_receivers_through_the_abort_notice(tiny_specs):
    """A sender that fails mid-transfer but stays alive makes both receivers raise at once, not after the timeout."""
    timeout_s = 30.0
    linger_s = 3.0  # the sender's sockets stay open: only the notice can tell the receivers

    def build(port):
        a = make_assignment(
            tiny_specs, port=port, world_size=3, update_id="u1", bucket_size_bytes=16 << 10, timeout_s=timeout_s
        )
        return {r: [a] for r in range(3)}

    sender_options = RankOptions(sender_fails_on="model.layers.1.mlp.up_proj.weight", linger_s=linger_s)
    reports = launch(3, build, {0: sender_options}, timeout_s=90)
    sender = reports[0].rounds[0]
    assert sender["error_type"] == "RuntimeError" and "trainer lost a shard" in sender["error"]
    for r in (1, 2):
        rd = reports[r].rounds[0]
        assert rd["error_type"] == "TransferError", rd.get("traceback")
        assert "rank 0: sender stopped: RuntimeError: trainer lost a shard" in rd["error"], rd["error"]
        assert rd["elapsed_s"] < linger_s - 1.0, f"rank {r} waited {rd['elapsed_s']:.1f} s: the notice did not reach it"


def test_hung_receiver_makes_the_others_raise_after_the_timeout_not_hang(tiny_specs):
    """A receiver that stops reading but stays alive makes the sender and the other receiver raise once timeout_s passes."""
    timeout_s = 3.0

    def build(port):
        a = make_assignment(
            tiny_specs, port=port, world_size=3, update_id="u1", bucket_size_bytes=16 << 10, timeout_s=timeout_s
        )
        return {r: [a] for r in range(3)}

    reports = launch(3, build, {1: RankOptions(hang_at_bucket=1)}, timeout_s=90, silent=frozenset({1}))
    for r in (0, 2):
        rd = reports[r].rounds[0]
        assert rd["error_type"] == "TransferError", rd.get("traceback")
        assert rd["elapsed_s"] < timeout_s + MARGIN_S, f"rank {r} took {rd['elapsed_s']:.1f} s"
    # Whichever fires first, our wait's deadline or gloo's own op timeout, names the 3 s limit;
    # or rank 2 finds the store gone: rank 0 (which hosts it) leaves as soon as it has failed.
    for r in (0, 2):
        error = reports[r].rounds[0]["error"]
        assert any(s in error for s in ("timeout_s=3", "Timed out waiting 3000ms", "abandoned", "rendezvous store unreachable")), error


def test_consumer_leaving_a_stream_early_fails_every_rank_after_draining(tiny_specs):
    """An iter_assignment consumer that stops after 3 tensors (2 buckets) makes every rank raise RoundFailed, none hangs."""

    def build(port):
        a = make_assignment(tiny_specs, port=port, world_size=3, update_id="u1", bucket_size_bytes=16 << 10)
        return {r: [a] for r in range(3)}

    reports = launch(3, build, {1: RankOptions(mode="iter", stop_after_pairs=3)}, timeout_s=90)
    for r in range(3):
        rd = reports[r].rounds[0]
        assert rd["error_type"] == "RoundFailed", rd.get("traceback")
        assert "rank 1: consumer stopped after 2 of 11 buckets" in rd["error"], rd["error"]
    assert reports[1].rounds[0]["num_applied"] == 3
    assert reports[2].rounds[0]["num_applied"] == len(tiny_specs)


def test_bytes_damaged_on_the_wire_fail_the_round_at_close_naming_the_tensor(tiny_specs):
    """One flipped bit in a received bucket shows as a checksum mismatch for exactly that tensor, on every rank."""
    rounds = {}

    def build(port):
        a = make_assignment(tiny_specs, port=port, world_size=3, update_id="u1", bucket_size_bytes=16 << 10)
        rounds["a"] = a
        return {r: [a] for r in range(3)}

    reports = launch(3, build, {2: RankOptions(corrupt_bucket=3)}, timeout_s=90)
    damaged = rounds["a"].plan.buckets[3].entries[0].name
    for r in range(3):
        rd = reports[r].rounds[0]
        assert rd["error_type"] == "RoundFailed", rd.get("traceback")
        assert f"rank 2: checksum mismatch on 1 of {len(tiny_specs)} tensors: {damaged}" in rd["error"], rd["error"]
