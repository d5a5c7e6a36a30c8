"""Manifest checks that need no server: apply units and the bucket plan's layout."""

import pytest

from weightsync.control.validation import check_against_inventory
from weightsync.core import BucketPlan, InvalidArgument, TensorSpec, apply_unit, default_bucket_size

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


@pytest.mark.parametrize(
    ("transport", "expected"), [("gloo", 256 << 20), ("nccl", 1 << 30), ("cuda_ipc", 1 << 30)]
)
def test_a_round_without_a_bucket_size_gets_the_transports_measured_default(transport, expected):
    """BeginUpdate with bucket_size_bytes 0: the coordinator plans 256 MiB buckets for gloo and 1 GiB
    for the GPU transports (BENCHMARKS.md: NCCL e2e / raw 0.90 at 1 GiB against 0.79 at 256 MiB)."""
    import asyncio

    from weightsync.control.coordinator import Coordinator, DaemonRegistration, UpdateOptions

    # Three 300 MiB tensors of three modules: a bucket each at 256 MiB (a unit larger than the
    # bucket size gets a bucket of its own), one bucket for all three at 1 GiB.
    specs = tuple(TensorSpec(f"model.layers.{i}.mlp.down_proj.weight", (76800, 1024), "float32") for i in range(3))
    assert default_bucket_size(transport) == expected

    async def run() -> BucketPlan:
        coordinator = Coordinator()
        reg = DaemonRegistration(
            daemon_id="d1", engine="memory", model="m", host="127.0.0.1", num_ranks=1, inventory=specs,
            transports=("gloo", "nccl", "cuda_ipc"), served_version=0, dirty=False,
        )
        rec = coordinator.register(reg)
        coordinator.open_session("d1", rec.session_token)
        options = UpdateOptions(transport=transport, rendezvous_host="127.0.0.1", rendezvous_port=1)
        return coordinator.begin_update(1, list(specs), options).plan

    plan = asyncio.run(run())
    sizes = [b.size_bytes for b in plan.buckets]
    assert len(sizes) == (1 if expected == 1 << 30 else 3), sizes
