"""The delta round's framing: what a sender frames a receiver rebuilds exactly, and damage is refused by name."""

from __future__ import annotations

import json

import pytest
import torch

from weightsync.core import BucketEntry
from weightsync.dataplane.delta import apply_many, encode_many
from weightsync.dataplane.delta_round import _FRAME_DENSE_BYTES, _dense, _frame, _frame_runs, _unframe


def _pair(seed: int):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(64, 33, generator=g).bfloat16()
    new = torch.where(torch.rand(base.shape, generator=g) < 0.05, torch.randn(base.shape, generator=g).bfloat16(), base)
    return base, new


def _entries(tensors):
    return [BucketEntry(f"t{i}", tuple(t.shape), "bfloat16", 0, t.numel() * 2) for i, t in enumerate(tensors)]


@pytest.mark.parametrize("kind", ["delta", "dense"])
def test_frame_roundtrip_patches_the_base_into_the_new_bytes(kind):
    """Deltas (and dense frames) of several tensors, framed and unframed, turn each base into its new tensor bit for bit."""
    pairs = [_pair(s) for s in range(3)]
    bases, news = [b for b, _ in pairs], [n for _, n in pairs]
    deltas = encode_many(bases, news) if kind == "delta" else [_dense(n) for n in news]
    entries = _entries(news)
    _, meta, payload = _frame([e.name for e in entries], deltas, torch.device("cpu"))
    targets = [b.clone() for b in bases]
    apply_many(targets, _unframe(json.loads(bytes(meta.numpy())), payload, entries, targets))
    assert all(torch.equal(t.view(torch.int16), n.view(torch.int16)) for t, n in zip(targets, news))


def test_damaged_frames_are_refused_naming_the_problem():
    """A frame for other tensors, or one whose segments overrun the payload, raises before anything is written."""
    base, new = _pair(7)
    entries = _entries([new])
    _, meta, payload = _frame(["t0"], encode_many([base], [new]), torch.device("cpu"))
    m = json.loads(bytes(meta.numpy()))
    other = [{**m[0], "name": "model.norm.weight"}]
    with pytest.raises(ValueError, match="delta meta names 'model.norm.weight', the plan has 't0'"):
        _unframe(other, payload, entries, [base.clone()])
    with pytest.raises(ValueError, match="lies outside the payload"):
        _unframe(m, payload[:8], entries, [base.clone()])
    with pytest.raises(ValueError, match="tensors, the bucket has 1"):
        _unframe(m * 2, payload, entries, [base.clone()])


def test_frame_runs_cut_a_bucket_into_consecutive_runs_within_the_frame_size():
    """A bucket's entries are cut in order, each run within the frame size unless one tensor alone exceeds it."""
    mib = 1 << 20
    sizes = [6 * mib, 6 * mib, 6 * mib, 40 * mib, 1 * mib, 15 * mib, 16 * mib]
    entries = [BucketEntry(f"t{i}", (n // 2,), "bfloat16", 0, n) for i, n in enumerate(sizes)]
    runs = _frame_runs(entries)
    assert [e for run in runs for e in run] == entries
    assert [[e.name for e in run] for run in runs] == [["t0", "t1"], ["t2"], ["t3"], ["t4", "t5"], ["t6"]]
    assert all(sum(e.nbytes for e in run) <= _FRAME_DENSE_BYTES or len(run) == 1 for run in runs)
    # The sender and every receiver cut the same plan: the cut depends on the entries alone.
    assert _frame_runs(list(entries)) == runs
    assert _frame_runs([]) == [[]]
