"""Delta rounds end to end with real processes: CLI pushes with --base into memory daemons."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.faults.fleet import Fleet

pytestmark = pytest.mark.slow


def _step(prev: dict[str, torch.Tensor], seed: int, fraction: float = 0.02) -> dict[str, torch.Tensor]:
    """`prev` with about `fraction` of its elements changed, spread at random like an optimizer step's."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in prev.items():
        mask = torch.rand(t.shape, generator=g) < fraction
        out[name] = torch.where(mask, torch.randn(t.shape, generator=g).to(t.dtype), t)
    return out


def _checkpoint(fleet: Fleet, version: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    path = fleet.tmp / f"v{version}.safetensors"
    save_file(tensors, path)
    fleet.weights[version] = path
    return tensors


def _load(fleet: Fleet, version: int) -> dict[str, torch.Tensor]:
    return load_file(fleet.weights[version])


def _consistent(fleet: Fleet, version: int) -> None:
    # The engines save after their verdict, asynchronously: wait for the bytes of `version` first.
    assert all(fleet.holds(d, version) for d in fleet.daemons), f"not every engine holds version {version}"
    fleet.assert_consistent(version)


def _round(fleet: Fleet):
    return {v.daemon_id: v for v in fleet.client.list_rounds(1)[0].results}


@pytest.fixture
def fleet(tmp_path):
    f = Fleet(tmp_path, num_daemons=2)
    yield f
    f.close()


def test_delta_rounds_heal_wrong_base_dirty_and_late_engines(fleet):
    """Delta rounds verify whole tensors; a wrong base, a corrupted engine and a late joiner are caught or sent dense and healed."""
    dense_bytes = sum(t.numel() * t.element_size() for t in fleet.base.values())
    # 1: the coordinator has not proven the engines' version 0 (it was never a round): --base
    # cannot take effect, the push is dense.
    w = _checkpoint(fleet, 1, _step(fleet.base, seed=1))
    rc, summary = fleet.push(1, base=0)
    assert rc == 0 and summary["encodings"] == {"mem0": "dense", "mem1": "dense"}, summary
    _consistent(fleet, 1)
    # 2-3: two delta rounds at ~2% changed: every engine takes the delta, holds the new bytes exactly,
    # and the wire carried a few % of the dense bytes.
    for v in (2, 3):
        w = _checkpoint(fleet, v, _step(w, seed=v))
        rc, summary = fleet.push(v, base=v - 1)
        assert rc == 0, summary
        assert summary["encodings"] == {"mem0": "delta", "mem1": "delta"}, summary
        _consistent(fleet, v)
        for d, got in _round(fleet).items():
            assert got.encoding == "delta" and 0 < got.bytes_received < 0.06 * dense_bytes, (d, got.bytes_received, dense_bytes)
            # Where the round's time went, per daemon, in the order the receiver goes through it.
            phases = [got.timeline.get(k) for k in ("opened", "received", "applied", "checksummed", "closed")]
            assert None not in phases and phases == sorted(phases) and phases[-1] > 0, (d, got.timeline)
    # 4: a wrong base (the trainer says v2's checkpoint is version 3, which the engines serve): the delta is
    # applied to bytes it was not encoded against; the whole-tensor checksums catch it on every engine.
    w3 = _checkpoint(fleet, 4, _step(w, seed=4))
    rc, summary = fleet.push(4, base=2, base_version=3)
    assert rc == 1 and summary["daemons"] == {"mem0": "CHECKSUM_MISMATCH", "mem1": "CHECKSUM_MISMATCH"}, summary
    assert all(d.dirty for d in fleet.daemons_info().values())
    # 5: flagged engines get dense in a delta push, and end verified.
    w4 = _checkpoint(fleet, 5, _step(w3, seed=5))
    rc, summary = fleet.push(5, base=3)
    assert rc == 0 and summary["encodings"] == {"mem0": "dense", "mem1": "dense"}, summary
    _consistent(fleet, 5)
    # 6: one engine corrupted while applying a delta: only it fails, flagged; the other is verified.
    fleet.set_failpoints("mem1", corrupt_applied="model.layers.1.mlp.up_proj.weight")
    w5 = _checkpoint(fleet, 6, _step(w4, seed=6))
    rc, summary = fleet.push(6, base=5)
    assert rc == 1 and summary["daemons"] == {"mem0": "OK", "mem1": "CHECKSUM_MISMATCH"}, summary
    assert fleet.client.list_rounds(1)[0].results[1].mismatched_tensors == ("model.layers.1.mlp.up_proj.weight",)
    fleet.clear_failpoints()
    # 7: the dirty engine and a late joiner get dense in the same push as a clean engine's delta.
    fleet.start_daemon("late")
    fleet.wait_daemons(["mem0", "mem1", "late"], timeout_s=120)
    _checkpoint(fleet, 7, _step(w5, seed=7))
    rc, summary = fleet.push(7, base=6)
    assert rc == 0, summary
    assert summary["encodings"] == {"mem0": "delta", "mem1": "dense", "late": "dense"}, summary
    _consistent(fleet, 7)
    wire = summary["wire_bytes"]
    assert wire["mem0"] < 0.06 * dense_bytes <= wire["mem1"] == wire["late"], wire


def test_trainer_killed_mid_delta_then_weightsync_keeps_the_base(fleet):
    """SIGKILL of the trainer in a delta round flags every engine and the next push heals them dense; WeightSync(delta=True) advances its base only on COMMIT."""
    rc, summary = fleet.push(1)
    assert rc == 0, summary
    w2 = _checkpoint(fleet, 2, _step(_load(fleet, 1), seed=2, fraction=0.05))
    push = fleet.push_mid_transfer(2, after_s=0.8, base=1)
    push.kill()
    push.wait(10)
    assert fleet.wait_round_ended() in ("FAILED", "TIMED_OUT")
    rnd = fleet.client.list_rounds(1)[0]
    assert rnd.version == 2 and {v.encoding for v in rnd.results} == {"delta"}
    assert all(d.dirty for d in fleet.daemons_info().values())
    fleet.clear_failpoints()
    fleet.wait_daemons(list(fleet.daemons))
    _checkpoint(fleet, 3, _step(w2, seed=3))
    rc, summary = fleet.push(3, base=2, base_version=1)
    assert rc == 0 and summary["encodings"] == {"mem0": "dense", "mem1": "dense"}, summary
    _consistent(fleet, 3)
    # WeightSync(delta=True) keeps the base itself: its first push is dense, the next a delta;
    # a failed round does not advance the base, and the push after it is dense where needed.
    from tests.faults.fleet import BUCKET_BYTES, COLLECTIVE_TIMEOUT_S, DEADLINE_S
    from weightsync.runtime.trainer import WeightSync

    with WeightSync(fleet.address, delta=True, bucket_size_bytes=BUCKET_BYTES, collective_timeout_s=COLLECTIVE_TIMEOUT_S,
                    deadline_s=DEADLINE_S) as sync:
        w = _load(fleet, 3)
        model = {n: t.clone() for n, t in w.items()}
        encodings = []
        for v in (4, 5, 6, 7):
            w = _checkpoint(fleet, v, _step(w, seed=v))
            # Written in place, as an optimizer step writes parameters: the kept base must be a copy.
            for n, t in w.items():
                model[n].copy_(t)
            if v == 6:
                fleet.set_failpoints("mem1", corrupt_applied="model.norm.weight")
            report = sync.push(model, version=v, raise_on_failure=False)
            fleet.clear_failpoints()
            encodings.append({r.daemon_id: (r.encoding, r.status) for r in report.results})
    assert encodings == [
        {"mem0": ("dense", "OK"), "mem1": ("dense", "OK")},  # no base yet
        {"mem0": ("delta", "OK"), "mem1": ("delta", "OK")},
        {"mem0": ("delta", "OK"), "mem1": ("delta", "CHECKSUM_MISMATCH")},
        # The base stayed at 5 (round 6 failed): mem0 serves 6, mem1 is flagged: both dense.
        {"mem0": ("dense", "OK"), "mem1": ("dense", "OK")},
    ], encodings
    _consistent(fleet, 7)
