"""The pipelined relay (dataplane/relay.py): real gloo ranks on 127.0.0.1, bytes exact, a dead relay fails every rank fast."""

from __future__ import annotations

import pytest

from _dp_workers import RankOptions, launch, make_assignment
from weightsync.dataplane.relay import chunk_bytes, hops, links

TIMEOUT_S = 6.0
# Ranks start, rendezvous and allocate before the round's clock starts; the margin covers
# scheduling of four processes on two busy cores, not a missed timeout.
MARGIN_S = 4.0


def test_links_chain_and_tree_cover_every_rank_once():
    """Every rank but the root has exactly one parent, and parents and children agree, in both shapes."""
    order = [0, 3, 1, 4, 2, 5, 6]
    for shape in ("chain", "tree"):
        parents = {r: links(order, r, shape)[0] for r in order}
        assert parents[0] is None and all(parents[r] is not None for r in order[1:])
        for r in order:
            for child in links(order, r, shape)[1]:
                assert parents[child] == r
    assert links(order, 3, "chain") == (0, [1])
    assert links(order, 0, "tree") == (None, [3, 1])
    assert hops(8, "chain") == 7 and hops(8, "tree") == 3
    with pytest.raises(ValueError, match="relay shape 'ring'"):
        links(order, 0, "ring")


def test_chunks_keep_the_pipeline_fill_small_and_agree_for_a_size():
    """The fill ((hops - 1) chunks) is at most a sixteenth of a large message; chunks stay within bounds;
    a streaming lane's floor lets a small model's routes (512 KiB over 8 receivers) fill for 7/32 of one."""
    from weightsync.dataplane.relay import _STREAM_MIN_CHUNK_BYTES

    nbytes = 256 << 20
    for num_hops in (1, 3, 7, 15):
        c = chunk_bytes(nbytes, num_hops)
        assert c % 4096 == 0 and (64 << 10) <= c <= (4 << 20)
        assert (num_hops - 1) * c <= nbytes / 16 + num_hops * 4096  # rounded up to 4 KiB
    assert chunk_bytes(100, 7) == 64 << 10
    assert chunk_bytes(512 << 10, 8) == 64 << 10
    assert chunk_bytes(512 << 10, 8, _STREAM_MIN_CHUNK_BYTES) == 16 << 10
    assert chunk_bytes(nbytes, 7, _STREAM_MIN_CHUNK_BYTES) == chunk_bytes(nbytes, 7), "large messages: the floor does not bind"


def _check(reports, a, receivers, relay) -> None:
    sent = reports[0].rounds[0]
    assert sent["ok"], sent.get("traceback")
    assert sent["relay"] == relay
    for r in receivers:
        rd = reports[r].rounds[0]
        assert rd["ok"], f"rank {r}: {rd.get('traceback')}"
        assert rd["relay"] == relay, "every rank follows the trainer's pick"
        assert rd["mismatched"] == [], f"rank {r} holds wrong bytes for {rd['mismatched'][:5]}"
        assert rd["checksums"] == sent["checksums"]
        assert rd["bytes_received"] == a.plan.total_bytes


@pytest.mark.parametrize("relay", ["chain", "tree"])
def test_relay_brings_every_byte_to_every_receiver(tiny_specs, relay):
    """Three receivers (one taking bytes straight into its engine's tensors, one iterating) get the tiny model bit for bit over two rounds."""
    rounds = {}

    def build(port):
        a1 = make_assignment(tiny_specs, port=port, world_size=4, update_id="u1", bucket_size_bytes=32 << 10)
        a2 = make_assignment(tiny_specs, port=port, world_size=4, update_id="u2", bucket_size_bytes=32 << 10, version=2)
        rounds["a"] = a1
        return {r: [a1, a2] for r in range(4)}

    options = {0: RankOptions(relay=relay), 2: RankOptions(destination=True), 3: RankOptions(mode="iter")}
    reports = launch(4, build, options, timeout_s=120)
    a = rounds["a"]
    assert len(a.plan.buckets) > 2, "the test must cross several buckets to exercise the ring"
    _check(reports, a, [1, 2, 3], relay)
    for r in range(4):
        assert reports[r].rounds[1]["ok"], reports[r].rounds[1].get("traceback")
        assert reports[r].num_constructions == 1, "the group and its relay are reused"


@pytest.mark.slow
def test_a_killed_relay_fails_every_rank_within_the_timeout(tiny_specs):
    """Rank 1, which forwards to ranks 2 and 3 along the chain, is SIGKILLed mid-round: the trainer and both ranks behind it raise TransferError in time."""

    def build(port):
        a = make_assignment(
            tiny_specs, port=port, world_size=4, update_id="u1", bucket_size_bytes=16 << 10, timeout_s=TIMEOUT_S
        )
        assert len(a.plan.buckets) >= 5
        return {r: [a] for r in range(4)}

    reports = launch(4, build, {0: RankOptions(relay="chain"), 1: RankOptions(kill_at_bucket=2)}, timeout_s=90)
    assert reports[1].exitcode == -9 and reports[1].rounds == []
    for r in (0, 2, 3):
        rd = reports[r].rounds[0]
        assert not rd["ok"], f"rank {r} finished a round whose relay died"
        assert rd["error_type"] in ("TransferError", "RoundFailed"), rd["traceback"]
        assert rd["elapsed_s"] < TIMEOUT_S + MARGIN_S, f"rank {r} took {rd['elapsed_s']:.1f} s"
        # A relay thread left blocked in gloo would abort the process at exit (std::terminate).
        assert reports[r].exitcode == 0, f"rank {r} exited with {reports[r].exitcode}"


def test_the_trainer_picks_the_relay_from_its_argument_or_the_environment(monkeypatch):
    """auto relays along a chain for 2+ receivers off loopback only; NCCL keeps its broadcast; a bad mode names the variable."""
    from weightsync.core import Rendezvous
    from weightsync.dataplane import GroupCache
    from weightsync.dataplane.groups import RELAY_ENV, _pick_relay

    def rdv(transport, host, world_size):
        return Rendezvous(transport, host, 29500, world_size, "g", 30.0)

    assert _pick_relay("auto", rdv("gloo", "127.0.0.1", 4)) == "broadcast", "loopback: CPU-bound, keep gloo's broadcast"
    assert _pick_relay("auto", rdv("gloo", "10.1.2.3", 4)) == "chain"
    assert _pick_relay("auto", rdv("gloo", "10.1.2.3", 2)) == "broadcast", "one receiver: nothing to relay"
    assert _pick_relay("tree", rdv("gloo", "127.0.0.1", 4)) == "tree"
    assert _pick_relay("chain", rdv("nccl", "10.1.2.3", 4)) == "broadcast", "NCCL's rings relay already"
    monkeypatch.setenv(RELAY_ENV, "chain")
    assert GroupCache()._relay == "chain"
    monkeypatch.setenv(RELAY_ENV, "ring")
    with pytest.raises(ValueError, match=f"'ring'.*{RELAY_ENV}.*expected one of"):
        GroupCache()
    assert GroupCache(relay="tree")._relay == "tree"
