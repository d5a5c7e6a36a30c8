"""Routed rounds on the data plane: 2 DTensor trainer ranks send what they hold into memory engines with TP=2 needs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from _routed_workers import HOST, Options, run_round
from weightsync.core import Assignment, BucketPlan, Participant, Rendezvous
from weightsync.core.regions import Region
from weightsync.core.routing import composed_checksums, judge_pieces, plan_routes
from weightsync.dataplane.memory_engine import tp_needs
from weightsync.dataplane.synthetic import random_tensor
from weightsync.dataplane.checksum import tensor_checksum

S = 2  # trainer ranks
TP = 2


def _needs(specs):
    """Two memory engines of TP=2: data-plane ranks 2, 3 (engine a) and 4, 5 (engine b)."""
    per = tp_needs(specs, TP)
    return {S + e * TP + t: per[t] for e in range(2) for t in range(TP)}


def _router(specs, needs, update_id="u1", encodings=("dense", "dense")):
    def route(holds, port):
        routing = plan_routes(specs, holds, needs, 8 << 10)  # small buckets: several per round
        rdv = Rendezvous("gloo", HOST, port, S + len(needs), "routed-" + update_id, 20.0)
        participants = tuple(Participant(f"d{e}", tuple(S + e * TP + t for t in range(TP)), encodings[e]) for e in range(2))
        base = 0 if "delta" in encodings else None
        return Assignment(update_id, 1, rdv, participants, BucketPlan.build(specs, 1 << 20), 600.0, delta_base_version=base, routing=routing)

    return route


def _sums(reports, ranks):
    return {r: reports[r][1]["piece_sums"] for r in ranks}


@pytest.mark.slow
def test_two_senders_into_tp2_engines(tiny_specs, tmp_path):
    """Bytes equal where needed and untouched elsewhere, ~half the sharded bytes per TP rank, every piece verified.

    One tensor has a single row: trainer rank 1's shard of it is empty, so rank 1 declares no hold of it."""
    from weightsync.core import TensorSpec

    tiny_specs = tiny_specs + [TensorSpec("model.one_row.weight", (1, 8), "float32")]
    needs = _needs(tiny_specs)
    a, reports, _, _ = run_round(tiny_specs, needs, _router(tiny_specs, needs), Options(num_senders=S), str(tmp_path / "init"))
    assert all(kind == "done" for kind, _ in reports.values()), reports
    for r in needs:
        assert reports[r][1]["wrong"] == [] and reports[r][1]["outside"] == [], (r, reports[r][1])
    sender_sums = {i: s for r in range(S) for i, s in reports[r][1]["piece_sums"].items()}
    assert judge_pieces(a.routing, sender_sums, _sums(reports, needs)) == {}
    # Each TP rank got half of every dim-0-divisible 2-D tensor plus the replicated ones whole.
    sharded = sum(s.nbytes for s in tiny_specs if len(s.shape) == 2 and s.shape[0] % TP == 0)
    replicated = sum(s.nbytes for s in tiny_specs) - sharded
    for r in needs:
        assert reports[r][1]["bytes"] == sharded // TP + replicated
    # Both senders sent (FSDP shards: each holds half of every 2-D tensor) and replicated tensors spread.
    sent = {r: reports[r][1]["bytes"] for r in range(S)}
    assert min(sent.values()) > 0.4 * sum(sent.values()), sent
    # Tensors a rank got whole: the composed checksum equals the tensor's own.
    for name, c in composed_checksums(a.routing, sender_sums, S, tiny_specs).items():
        spec = next(s for s in tiny_specs if s.name == name)
        assert c == tensor_checksum(random_tensor(spec, 0)), name


@pytest.mark.slow
def test_corrupt_piece_flags_that_rank_only(tiny_specs, tmp_path):
    """A bit flipped after landing on one rank of engine b shows as a mismatch of that rank and tensor only."""
    needs = _needs(tiny_specs)
    name = "model.layers.1.mlp.up_proj.weight"
    bad_rank = S + TP + 1
    opts = Options(num_senders=S)
    a, reports, _, _ = run_round(
        tiny_specs, needs, _router(tiny_specs, needs, "u2"), opts, str(tmp_path / "init"),
        rank_opts={bad_rank: dataclasses.replace(opts, corrupt=name)},
    )
    assert all(kind == "done" for kind, _ in reports.values()), reports
    sender_sums = {i: s for r in range(S) for i, s in reports[r][1]["piece_sums"].items()}
    assert judge_pieces(a.routing, sender_sums, _sums(reports, needs)) == {bad_rank: [name]}


@pytest.mark.slow
def test_source_killed_mid_round_fails_every_rank_fast(tiny_specs, tmp_path):
    """Trainer rank 1 dies after its first bucket: every other rank raises a TransferError well inside the timeout."""
    needs = _needs(tiny_specs)
    opts = Options(num_senders=S)
    a, reports, codes, elapsed = run_round(
        tiny_specs, needs, _router(tiny_specs, needs, "u3"), opts, str(tmp_path / "init"),
        rank_opts={1: dataclasses.replace(opts, die_after_bucket=1)},
    )
    assert a.routing.num_buckets > 2
    assert codes[1] == -9
    for r in [0, *needs]:
        kind, body = reports[r]
        assert kind == "error" and body["type"] in ("TransferError", "RoundFailed"), (r, kind, body)
    # The group's timeout is 20 s: a lost peer is noticed from its closed connection, not a timeout.
    assert elapsed < 15.0, elapsed


def _column_needs(specs):
    """Row-parallel TP=2 (o_proj, down_proj style): block t of dim 1 of every 2-D tensor, so against the trainers' dim-0
    shards every piece is a 2-D box, not contiguous in the tensor."""
    from weightsync.core.regions import Region

    per = [
        {s.name: (Region(1, t * s.shape[1] // TP, s.shape[1] // TP) if len(s.shape) == 2 else Region.whole()) for s in specs}
        for t in range(TP)
    ]
    return {S + e * TP + t: per[t] for e in range(2) for t in range(TP)}


@pytest.mark.slow
@pytest.mark.parametrize("needs_of", [_needs, _column_needs], ids=["dim0", "dim1"])
def test_routed_delta_round_patches_delta_engines_and_lands_dense_ones(tiny_specs, tmp_path, needs_of):
    """Engine a takes deltas (each sender encodes its own pieces), engine b dense pieces, in one round: both hold the new
    bytes; a's ranks got a small fraction of b's bytes; a rank whose region held another base is caught, no other."""
    needs = needs_of(tiny_specs)
    bad_rank = S + 1  # engine a's second TP rank
    opts = Options(num_senders=S, steps=3)
    a, reports, _, _ = run_round(
        tiny_specs, needs, _router(tiny_specs, needs, "u4", ("delta", "dense")), opts, str(tmp_path / "init"),
        rank_opts={bad_rank: dataclasses.replace(opts, wrong_base=True)},
    )
    assert all(kind == "done" for kind, _ in reports.values()), reports
    assert a.delta_ranks == (S, S + 1) and a.dense_ranks == (S + 2, S + 3)
    for r in needs:
        assert (reports[r][1]["wrong"] != []) == (r == bad_rank), (r, reports[r][1]["wrong"])
    sender_sums = {i: s for r in range(S) for i, s in reports[r][1]["piece_sums"].items()}
    bad = judge_pieces(a.routing, sender_sums, _sums(reports, needs))
    assert list(bad) == [bad_rank] and bad[bad_rank] == sorted(reports[bad_rank][1]["wrong"]), bad
    # A dense rank's frames carry its pieces whole (plus a header and the meta per sender and bucket).
    for r in (S + 2, S + 3):
        pieces = sum(p.nbytes for p in a.routing.received_by(r))
        assert pieces < reports[r][1]["bytes"] < 1.2 * pieces, (r, reports[r][1]["bytes"], pieces)
    # ~2% of elements changed: a delta rank's frames are a small fraction of its dense pieces.
    for r in (S, S + 1):
        dense_bytes = sum(p.nbytes for p in a.routing.received_by(r))
        assert reports[r][1]["bytes"] < 0.15 * dense_bytes, (reports[r][1]["bytes"], dense_bytes)
    # The senders' bytes: engine b's dense frames plus engine a's delta frames.
    sent = sum(reports[r][1]["bytes"] for r in range(S))
    assert sent == sum(reports[r][1]["bytes"] for r in needs), (sent, {r: reports[r][1]["bytes"] for r in needs})


def _chain_router(specs, needs, update_id):
    def route(holds, port):
        routing = plan_routes(specs, holds, needs, 8 << 10)
        rdv = Rendezvous("gloo", HOST, port, S + len(needs), "routed-" + update_id, 20.0)
        participants = tuple(Participant(f"d{r}", (r,)) for r in sorted(needs))
        return Assignment(update_id, 1, rdv, participants, BucketPlan.build(specs, 1 << 20), 600.0, routing=routing)

    return route


@pytest.mark.slow
def test_relayed_pieces_land_whole_at_every_receiver_of_a_chain(tiny_specs, tmp_path):
    """Three TP=1 engines need every tensor: each piece leaves its sender once and is relayed along a
    3-receiver chain; every receiver's bytes are exact and every (piece, receiver) sum matches the sender's."""
    needs = {S + i: None for i in range(3)}
    engine_needs = {r: {s.name: Region.whole() for s in tiny_specs} for r in needs}
    a, reports, _, _ = run_round(tiny_specs, engine_needs, _chain_router(tiny_specs, needs, "u4"), Options(num_senders=S), str(tmp_path / "init"))
    assert all(kind == "done" for kind, _ in reports.values()), reports
    assert all(len(p.receivers) == 3 for p in a.routing.pieces)
    # several buckets, one chain per sender, their heads apart: every receiver forwards some of the bytes
    assert a.routing.num_buckets > 2 and set(a.routing.bytes_forwarded()) == set(needs)
    model = sum(s.nbytes for s in tiny_specs)
    for r in needs:
        assert reports[r][1]["wrong"] == [] and reports[r][1]["bytes"] == model, (r, reports[r][1])
    # The senders emitted the model once between them, not once per receiver.
    assert sum(reports[r][1]["bytes"] for r in range(S)) == model
    sender_sums = {i: s for r in range(S) for i, s in reports[r][1]["piece_sums"].items()}
    assert judge_pieces(a.routing, sender_sums, _sums(reports, needs)) == {}
    for r in needs:
        for name, c in composed_checksums(a.routing, _sums(reports, needs)[r], r, tiny_specs).items():
            spec = next(s for s in tiny_specs if s.name == name)
            assert c == tensor_checksum(random_tensor(spec, 0)), (r, name)


@pytest.mark.slow
def test_relay_hop_killed_mid_round_fails_every_rank_fast(tiny_specs, tmp_path):
    """A receiver that forwards in every chain (head of one sender's, middle of the other's) dies after its first
    bucket: the senders and the other receivers raise a TransferError well inside the group's 20 s timeout."""
    needs = {S + i: None for i in range(3)}
    engine_needs = {r: {s.name: Region.whole() for s in tiny_specs} for r in needs}
    opts = Options(num_senders=S)
    victim = S + 1
    a, reports, codes, elapsed = run_round(
        tiny_specs, engine_needs, _chain_router(tiny_specs, needs, "u5"), opts, str(tmp_path / "init"),
        rank_opts={victim: dataclasses.replace(opts, die_after_bucket=1)},
    )
    assert a.routing.num_buckets > 2
    assert codes[victim] == -9
    for r in [0, 1, *(r for r in needs if r != victim)]:
        kind, body = reports[r]
        assert kind == "error" and body["type"] in ("TransferError", "RoundFailed"), (r, kind, body)
    assert elapsed < 15.0, elapsed


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "uint8", "float64"])
def test_piece_sums_compose_to_the_tensor_checksum_at_any_boundary(dtype):
    """Pieces cut at odd columns and rows (edge words shared by two pieces; float64: word-aligned rows) add up to tensor_checksum."""
    from weightsync.core import TensorSpec
    from weightsync.core.wordsum import compose_checksum
    from weightsync.dataplane.routed import piece_sum

    spec = TensorSpec("w", (7, 13), dtype)
    full = random_tensor(spec, 3)
    # 3 holders of uneven row blocks, 2 needers of uneven column blocks: 2-D boxes with odd edges.
    holds = {0: {"w": Region(0, 0, 3)}, 1: {"w": Region(0, 3, 3)}, 2: {"w": Region(0, 6, 1)}}
    needs = {3: {"w": Region(1, 0, 5)}, 4: {"w": Region(1, 5, 8)}}
    plan = plan_routes([spec], holds, needs, 1 << 20)
    assert len(plan.pieces) == 6
    sums = [piece_sum(full[tuple(slice(lo, hi) for lo, hi in p.box)].contiguous(), p.box, spec.shape) for p in plan.pieces]
    assert compose_checksum(sums, spec.nbytes) == tensor_checksum(full)
    # A changed byte inside one piece changes that piece's sum only.
    bad = full.clone()
    bad.view(torch.uint8).view(-1)[2] ^= 0x10
    moved = [piece_sum(bad[tuple(slice(lo, hi) for lo, hi in p.box)].contiguous(), p.box, spec.shape) for p in plan.pieces]
    assert sum(a != b for a, b in zip(sums, moved)) == 1
