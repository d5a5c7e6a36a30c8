"""Manifest checks that need no server: apply units and the bucket plan's layout."""

import pytest

from weightsync.control.validation import check_against_inventory
from weightsync.core import BucketPlan, InvalidArgument, TensorSpec, apply_unit

QKV = [TensorSpec(f"model.layers.0.self_attn.{p}_proj.{k}", (32, 8) if k == "weight" else (32,), "bfloat16")
       for p in "qkv" for k in ("weight", "bias")]


def test_apply_unit_groups_modules():
    """q/k/v weights and biases share one unit; a plain module's weight and bias share another."""
    assert {apply_unit(s.name) for s in QKV} == {"model.layers.0.self_attn.qkv_proj"}
    assert apply_unit("model.layers.0.mlp.gate_proj.weight") == apply_unit("model.layers.0.mlp.up_proj.weight")
    assert apply_unit("model.norm.weight") == "model.norm"


def test_weights_without_their_biases_are_refused():
    """A manifest with q/k/v weights but not their biases is refused, naming the missing biases."""
    inventory = {s.name: s for s in QKV}
    with pytest.raises(InvalidArgument, match="travel together") as info:
        check_against_inventory([s for s in QKV if s.name.endswith("weight")], {"d": inventory})
    assert "q_proj.bias" in str(info.value)
    check_against_inventory(QKV, {"d": inventory})


def test_plan_keeps_units_in_one_bucket_and_aligns():
    """Every unit lands in one bucket, offsets are 256-byte aligned, and the digest changes with the layout."""
    plan = BucketPlan.build(QKV + [TensorSpec("model.norm.weight", (8,), "float32")], 600)
    buckets = {b.index for b, e in plan.entries() if "self_attn" in e.name}
    assert len(buckets) == 1
    assert all(e.offset_bytes % 256 == 0 for _, e in plan.entries())
    assert BucketPlan.build(QKV, 600).digest != BucketPlan.build(list(reversed(QKV)), 600).digest
    with pytest.raises(ValueError, match="digest"):
        BucketPlan.from_buckets(plan.buckets, "0" * 32)
