"""The routing plan (core/routing.py): pieces cut by holders and needers, balanced, bucketed, deterministic."""

from __future__ import annotations

import dataclasses
import math

import pytest

from weightsync.core import TensorSpec
from weightsync.core.rank_regions import RankRegions
from weightsync.core.regions import Region
from weightsync.core.routing import RoutingPlan, box_of, plan_routes

W = Region.whole()
MANIFEST = [
    TensorSpec("embed.weight", (10, 8), "float32"),  # 10 rows: uneven over 4 FSDP ranks (3, 3, 3, 1)
    TensorSpec("layer.q.weight", (8, 8), "bfloat16"),
    TensorSpec("layer.down.weight", (8, 16), "bfloat16"),
    TensorSpec("norm.weight", (8,), "float32"),
]


def _fsdp_holds(num_ranks: int, manifest=MANIFEST) -> dict[int, dict[str, Region]]:
    """FSDP2's Shard(0) as torch cuts it: ceil(rows / ranks) per rank, the last ranks short or empty."""
    holds: dict[int, dict[str, Region]] = {r: {} for r in range(num_ranks)}
    for s in manifest:
        chunk = math.ceil(s.shape[0] / num_ranks)
        for r in range(num_ranks):
            lo, hi = min(r * chunk, s.shape[0]), min((r + 1) * chunk, s.shape[0])
            if hi > lo:
                holds[r][s.name] = Region(0, lo, hi - lo)
    return holds


def _tp_needs(first_rank: int, tp: int, manifest=MANIFEST, dim: int = 0) -> dict[int, dict[str, Region]]:
    """TP rank t needs block t of `dim` of every 2-D tensor, 1-D tensors whole."""
    needs = {}
    for t in range(tp):
        per = {}
        for s in manifest:
            if len(s.shape) == 2:
                step = s.shape[dim] // tp
                per[s.name] = Region(dim, t * step, step)
            else:
                per[s.name] = W
        needs[first_rank + t] = per
    return needs


def _coverage(plan: RoutingPlan, rank: int, name: str, shape) -> int:
    """Elements of `name` that `rank` receives, each counted once per piece (so overlaps would show)."""
    return sum(math.prod(hi - lo for lo, hi in p.box) for p in plan.received_by(rank) if p.name == name)


def _cells_covered(plan, rank, name, shape):
    covered = set()
    for p in plan.received_by(rank):
        if p.name != name:
            continue
        ranges = [range(lo, hi) for lo, hi in p.box]
        import itertools

        for idx in itertools.product(*ranges):
            assert idx not in covered, f"{name}: element {idx} arrives twice at rank {rank}"
            covered.add(idx)
    return covered


def test_uneven_fsdp_shards_into_tp_needs_cover_exactly_what_each_rank_needs():
    """4 uneven FSDP holders, 2 TP needers x 2 engines: every needed element arrives once, from a rank that holds it."""
    holds = _fsdp_holds(4)
    needs = {**_tp_needs(4, 2), **_tp_needs(6, 2)}
    plan = plan_routes(MANIFEST, holds, needs, 1 << 20)
    for rank, per in needs.items():
        for s in MANIFEST:
            want = box_of(per[s.name], s.shape)
            got = _cells_covered(plan, rank, s.name, s.shape)
            import itertools

            assert got == set(itertools.product(*[range(lo, hi) for lo, hi in want])), (rank, s.name)
    for p in plan.pieces:
        held = box_of(holds[p.sender][p.name], dict((s.name, s.shape) for s in MANIFEST)[p.name])
        assert all(hlo <= lo and hi <= hhi for (lo, hi), (hlo, hhi) in zip(p.box, held)), p
        # the two engines' rank t need the same block: one piece serves both
        assert len(p.receivers) == 2 or p.name == "norm.weight"
    # each TP rank receives about half of the 2-D tensors plus the 1-D ones whole
    got = plan.bytes_received()
    half = sum(s.nbytes for s in MANIFEST if len(s.shape) == 2) // 2 + sum(s.nbytes for s in MANIFEST if len(s.shape) == 1)
    assert got == {4: half, 5: half, 6: half, 7: half}


def test_columns_against_rows_are_2d_boxes():
    """A needer's dim-1 columns against holders' dim-0 rows: pieces are 2-D boxes, one per holder."""
    m = [TensorSpec("w", (4, 6), "float32")]
    holds = {0: {"w": Region(0, 0, 2)}, 1: {"w": Region(0, 2, 2)}}
    needs = {2: {"w": Region(1, 0, 3)}, 3: {"w": Region(1, 3, 3)}}
    plan = plan_routes(m, holds, needs, 1 << 20)
    boxes = sorted((p.sender, p.box, p.receivers) for p in plan.pieces)
    assert boxes == [
        (0, ((0, 2), (0, 3)), (2,)),
        (0, ((0, 2), (3, 6)), (3,)),
        (1, ((2, 4), (0, 3)), (2,)),
        (1, ((2, 4), (3, 6)), (3,)),
    ]
    assert plan.bytes_sent() == {0: 48, 1: 48}


def test_replicated_tensors_spread_over_every_holder():
    """Tensors every rank holds whole are assigned so that senders' egress is balanced, each piece counted once (it is relayed)."""
    m = [TensorSpec(f"t{i}", (64,), "float32") for i in range(8)]
    holds = {r: {s.name: W for s in m} for r in range(4)}
    plan = plan_routes(m, holds, {4: None, 5: None}, 1 << 20)
    sent = plan.bytes_sent()
    assert sent == {0: 512, 1: 512, 2: 512, 3: 512}
    assert plan.bytes_received() == {4: 2048, 5: 2048}


def test_single_sender_is_todays_round():
    """No holds: rank 0 holds all; empty needs declare every tensor whole for every receiver."""
    plan = plan_routes(MANIFEST, {}, {1: None, 2: None}, 1 << 20)
    assert {p.sender for p in plan.pieces} == {0}
    total = sum(s.nbytes for s in MANIFEST)
    assert plan.bytes_received() == {1: total, 2: total}
    assert plan.tensors_whole_at(1, {s.name: s.shape for s in MANIFEST}) == [s.name for s in MANIFEST]


def test_needed_region_nobody_holds_names_tensor_and_region():
    """A gap in the holds is an error naming the tensor, the box and who needs it."""
    m = [TensorSpec("w", (8, 4), "float32")]
    holds = {0: {"w": Region(0, 0, 4)}, 1: {}}
    with pytest.raises(ValueError, match=r"held by no trainer rank.*'w' \[\[4, 8\], \[0, 4\]\] \(needed by ranks \[2\]\)"):
        plan_routes(m, holds, {2: None}, 1 << 20)


def test_bad_holds_are_listed_together():
    """Unknown names, out-of-range regions and a rank gap all appear in one error."""
    m = [TensorSpec("w", (8, 4), "float32")]
    holds = {0: {"w": Region(0, 4, 8), "nope": W}, 2: {"w": W}}
    with pytest.raises(ValueError) as e:
        plan_routes(m, holds, {3: None}, 1 << 20)
    text = str(e.value)
    assert "expected one entry per rank [0, 1]" in text
    assert "not in the manifest: 'nope'" in text
    assert "start + length <= 8" in text and "got start 4, length 8" in text


def test_buckets_bound_piece_bytes_and_large_pieces_are_cut():
    """No bucket carries more than bucket_size_bytes; a tensor larger than a bucket is cut along rows."""
    m = [TensorSpec("big", (100, 10), "float32"), TensorSpec("small", (10,), "float32")]
    plan = plan_routes(m, {}, {1: None}, 1000)
    per_bucket: dict[int, int] = {}
    for p in plan.pieces:
        per_bucket[p.bucket] = per_bucket.get(p.bucket, 0) + p.nbytes
    assert max(per_bucket.values()) <= 1000
    assert sum(p.nbytes for p in plan.pieces if p.name == "big") == 4000
    assert len([p for p in plan.pieces if p.name == "big"]) == 4


def test_deterministic_cached_and_digest_checked():
    """The same inputs give the same plan (the cached object); its JSON form round-trips and a damaged one is refused."""
    holds, needs = _fsdp_holds(2), _tp_needs(2, 2)
    a = plan_routes(MANIFEST, holds, needs, 4096)
    b = plan_routes(list(MANIFEST), dict(reversed(list(holds.items()))), needs, 4096)
    assert a is b
    again = RoutingPlan.from_json(a.to_json(), a.digest)
    assert again == a
    damaged = a.to_json().replace('"sender":1', '"sender":0', 1)
    with pytest.raises(ValueError, match="digest"):
        RoutingPlan.from_json(damaged, a.digest)


# ---------------------------------------------------------------- over real gRPC (coordinator, agents, trainer client)

from tests.control.helpers import INVENTORY, start_coordinator  # noqa: E402
from weightsync.control.daemon_agent import DaemonAgent, DaemonIdentity, HandlerResult  # noqa: E402
from weightsync.control.trainer_client import TrainerClient  # noqa: E402
from weightsync.core import InvalidArgument  # noqa: E402

RDV = dict(rendezvous_host="127.0.0.1", rendezvous_port=29999)


def _fake_sum(update_id: str, piece: int) -> int:
    return hash((update_id, piece)) & ((1 << 64) - 1)


class _PieceHandler:
    """Stands in for the routed data plane: reports the sender's sum of every piece its ranks need, one optionally wrong."""

    def __init__(self, corrupt: str | None = None, holds_delta_base: bool = False, holds_needed_delta_base: bool = False) -> None:
        self.corrupt = corrupt
        self.seen = []
        # What a vLLM daemon says while its workers hold a whole shadow of the served version,
        # or one exact only in their needed regions (after a routed round).
        self.holds_delta_base = holds_delta_base
        self.holds_needed_delta_base = holds_needed_delta_base

    async def __call__(self, assignment, ranks, progress) -> HandlerResult:
        self.seen.append((assignment, ranks))
        if assignment.routing is None:
            return HandlerResult({}, 0, 0.0, 0.0)  # a round the test only plans and aborts
        sums = {}
        for r in ranks:
            for p in assignment.routing.received_by(r):
                sums[(r, p.index)] = _fake_sum(assignment.update_id, p.index) ^ (p.name == self.corrupt and r == ranks[-1])
        return HandlerResult({}, 0, 0.0, 0.0, sums)


async def _agent(address, daemon_id, handler, *, num_ranks=1, needs=None, engine="memory") -> DaemonAgent:
    ident = DaemonIdentity(
        daemon_id=daemon_id, engine=engine, model="tiny", host="127.0.0.1", inventory=INVENTORY, num_ranks=num_ranks,
        needs=tuple(RankRegions(r, per) for r, per in sorted((needs or {}).items())),
    )
    agent = DaemonAgent(address, ident, handler, served_version=-1, reconnect_max_s=0.5)
    agent.start()
    await agent.wait_connected(10)
    return agent


async def test_bad_holds_are_refused_with_every_problem():
    """BeginUpdate with holds naming unknown tensors, out-of-range regions and a rank gap: one InvalidArgument listing all."""
    server = await start_coordinator()
    agent = await _agent(server.address, "d", _PieceHandler())
    try:
        async with TrainerClient(server.address) as client:
            holds = {0: {"nope": W, "model.embed_tokens.weight": Region(0, 60, 10)}, 2: {"model.norm.weight": W}}
            with pytest.raises(InvalidArgument) as e:
                await client.begin_update(1, INVENTORY, holds=holds, **RDV)
            text = str(e.value) + " ".join(getattr(e.value, "details", []) or [])
            assert "expected one entry per rank [0, 1]" in text, text
            assert "'nope'" in text and "start 60, length 10" in text, text
            # Holds that leave a needed row unheld: the error names tensor and rows.
            gap = {0: {s.name: W for s in INVENTORY if s.name != "model.embed_tokens.weight"} | {"model.embed_tokens.weight": Region(0, 0, 32)}}
            with pytest.raises(InvalidArgument, match=r"held by no trainer rank.*model.embed_tokens.weight.*\[\[32, 64\]"):
                await client.begin_update(1, INVENTORY, holds=gap, **RDV)
    finally:
        await agent.close()
        await server.stop()


async def test_routed_round_over_grpc_judges_every_piece_per_engine():
    """2 trainer ranks' holds and a TP=2 daemon's needs: every rank gets the same routed plan, the verdict matches
    every (piece, receiver) and flags only the engine whose piece differs, and the record shows bytes per rank."""
    server = await start_coordinator()
    tp_needs = {
        t: {s.name: (Region(0, t * s.shape[0] // 2, s.shape[0] // 2) if len(s.shape) == 2 else W) for s in INVENTORY} for t in range(2)
    }
    tp, whole = _PieceHandler(corrupt="model.layers.0.mlp.down_proj.weight"), _PieceHandler()
    agents = [await _agent(server.address, "tp", tp, num_ranks=2, needs=tp_needs), await _agent(server.address, "whole", whole)]
    try:
        async with TrainerClient(server.address) as client:
            holds = _fsdp_holds(2, list(INVENTORY))
            a = await client.begin_update(1, INVENTORY, holds=holds, **RDV)
            assert a.routing is not None and a.num_senders == 2
            assert sorted(r for p in a.participants for r in p.ranks) == [2, 3, 4]
            assert a.rendezvous.world_size == 5
            sums = {(p.sender, p.index): _fake_sum(a.update_id, p.index) for p in a.routing.pieces}
            report = await client.commit_update(a, {}, piece_sums=sums)
            seen = tp.seen[0][0]
            assert seen.digest == a.digest and seen.routing == a.routing
        verdict = {v.daemon_id: (v.status, v.mismatched_tensors) for v in report.results}
        assert verdict == {"tp": ("CHECKSUM_MISMATCH", ("model.layers.0.mlp.down_proj.weight",)), "whole": ("OK", ())}
        assert report.state == "FAILED"
        received = a.routing.bytes_received()
        assert {r: b[2] for r, b in report.rank_bytes.items() if r >= 2} == received
        assert received[4] == sum(s.nbytes for s in INVENTORY)  # the plain daemon needs everything whole
        assert received[2] == received[3] < received[4]
        assert {r: b[1] for r, b in report.rank_bytes.items() if r < 2} == a.routing.bytes_sent()
    finally:
        for agent in agents:
            await agent.close()
        await server.stop()


async def test_holds_with_an_engine_that_cannot_take_routed_rounds_are_refused():
    """Holds with a daemon whose engine has no routed receiver: InvalidArgument naming it and the fix."""
    from tests.control.helpers import start_agent

    server = await start_coordinator()
    agent = await start_agent(server.address, "old", engine="other")
    try:
        async with TrainerClient(server.address) as client:
            with pytest.raises(InvalidArgument, match=r"daemons \['old'\] run engines that cannot receive them yet.*daemon_ids"):
                await client.begin_update(1, INVENTORY, holds=_fsdp_holds(2, list(INVENTORY)), **RDV)
    finally:
        await agent.close()
        await server.stop()


async def test_a_delta_asked_of_a_routed_round_goes_to_the_engines_clean_on_the_base_and_dense_to_the_rest():
    """A routed round (holds, or needs alone) with a delta base: each memory daemon clean on exactly the base takes the
    delta and a late joiner dense, in the same round; the digest covers the encodings; the record says each daemon's
    encoding. A vLLM daemon on another version gets its pieces dense in the same routed delta round."""
    server = await start_coordinator()
    tp_needs = {
        t: {s.name: (Region(0, t * s.shape[0] // 2, s.shape[0] // 2) if len(s.shape) == 2 else W) for s in INVENTORY} for t in range(2)
    }
    agents = [
        await _agent(server.address, "tp", _PieceHandler(), num_ranks=2, needs=tp_needs),
        await _agent(server.address, "whole", _PieceHandler()),
        await _agent(server.address, "vllm", _PieceHandler(holds_delta_base=True), engine="vllm"),
    ]
    holds = _fsdp_holds(2, list(INVENTORY))
    memory = ["tp", "whole", "late"]

    async def commit(a):
        sums = {(p.sender, p.index): _fake_sum(a.update_id, p.index) for p in a.routing.pieces}
        return await client.commit_update(a, {}, piece_sums=sums)

    try:
        async with TrainerClient(server.address) as client:
            first = await client.begin_update(1, INVENTORY, holds=holds, delta_base_version=0, **RDV)
            # Nobody holds version 0 verified: dense for all, not a delta round.
            assert first.delta_base_version is None and {p.encoding for p in first.participants} == {"dense"}
            assert (await commit(first)).committed
            agents.append(await _agent(server.address, "late", _PieceHandler()))
            a = await client.begin_update(2, INVENTORY, holds=holds, delta_base_version=1, daemon_ids=memory, **RDV)
            assert a.routing is not None and a.delta_base_version == 1
            assert {p.daemon_id: p.encoding for p in a.participants} == {"tp": "delta", "whole": "delta", "late": "dense"}
            dense_twin = dataclasses.replace(a, delta_base_version=None, participants=tuple(dataclasses.replace(p, encoding="dense") for p in a.participants))
            assert a.digest != dense_twin.digest
            report = await commit(a)
            assert report.committed and {v.daemon_id: v.encoding for v in report.results} == {"tp": "delta", "whole": "delta", "late": "dense"}
            # Needs alone route the round (every engine memory, one declares needs): a delta round for all three, clean on 2.
            b = await client.begin_update(3, INVENTORY, delta_base_version=2, daemon_ids=memory, **RDV)
            assert b.routing is not None and b.num_senders == 1 and b.delta_base_version == 2
            assert {p.encoding for p in b.participants} == {"delta"}
            assert (await commit(b)).committed
            # The vLLM daemon (version 1, left out of 2 and 3) takes its pieces dense, the others the delta.
            c = await client.begin_update(4, INVENTORY, holds=holds, delta_base_version=3, **RDV)
            assert c.routing is not None and c.delta_base_version == 3
            assert {p.daemon_id: p.encoding for p in c.participants} == {"tp": "delta", "whole": "delta", "late": "delta", "vllm": "dense"}
            assert (await commit(c)).committed
            # The same vLLM daemon takes a delta where the round is not routed (its shadow is whole).
            d = await client.begin_update(5, INVENTORY, delta_base_version=4, daemon_ids=["vllm"], **RDV)
            assert d.routing is None and [p.encoding for p in d.participants] == ["delta"]
            await client.abort_update(d.update_id, "test: the plan was all it was for")
    finally:
        for agent in agents:
            await agent.close()
        await server.stop()


async def test_a_vllm_shadow_of_the_needed_regions_takes_routed_deltas_only():
    """A vLLM daemon whose workers hold a whole shadow takes a delta in routed and plain rounds alike; one whose shadow
    is exact only in its needed regions (after a routed round) takes routed deltas, and dense weights in a plain delta
    round, which patches whole tensors."""
    server = await start_coordinator()
    agents = [
        await _agent(server.address, "whole", _PieceHandler(holds_delta_base=True), engine="vllm"),
        await _agent(server.address, "needed", _PieceHandler(holds_needed_delta_base=True), engine="vllm"),
        await _agent(server.address, "memory", _PieceHandler()),
    ]
    holds = _fsdp_holds(2, list(INVENTORY))

    async def commit(a):
        sums = {(p.sender, p.index): _fake_sum(a.update_id, p.index) for p in a.routing.pieces}
        return await client.commit_update(a, {}, piece_sums=sums)

    try:
        async with TrainerClient(server.address) as client:
            assert (await commit(await client.begin_update(1, INVENTORY, holds=holds, **RDV))).committed
            routed = await client.begin_update(2, INVENTORY, holds=holds, delta_base_version=1, **RDV)
            assert routed.routing is not None and routed.delta_base_version == 1
            assert {p.daemon_id: p.encoding for p in routed.participants} == {"whole": "delta", "needed": "delta", "memory": "delta"}
            report = await commit(routed)
            assert report.committed and {v.daemon_id: v.encoding for v in report.results} == {"whole": "delta", "needed": "delta", "memory": "delta"}
            plain = await client.begin_update(3, INVENTORY, delta_base_version=2, **RDV)
            assert plain.routing is None and plain.delta_base_version == 2
            assert {p.daemon_id: p.encoding for p in plain.participants} == {"whole": "delta", "needed": "dense", "memory": "delta"}
            await client.abort_update(plain.update_id, "test: the plan was all it was for")
    finally:
        for agent in agents:
            await agent.close()
        await server.stop()


def test_routes_relay_each_piece_once_along_one_chain_per_sender():
    """Per bucket, pieces with the same sender and receivers form one route (one message); its tag is its lane's,
    one per (sender, receivers) for the whole plan, whatever the bucket; each sender's chain keeps one order in
    every bucket (it streams across them), rotated by the sender so that the senders' heads differ."""
    m = [TensorSpec(f"t{i}", (256,), "float32") for i in range(8)]  # 1 KiB each
    holds = {r: {s.name: W for s in m} for r in range(2)}
    needs = {2: None, 3: None, 4: None}
    plan = plan_routes(m, holds, needs, 2048)  # two tensors per bucket
    assert plan.num_buckets == 4
    orders = set()
    for k in range(plan.num_buckets):
        routes = plan.routes(k)
        assert {r.tag: r.order[0] for r in routes} == {1: 0, 2: 1}  # sender 0's lane, sender 1's
        for r in routes:
            assert sorted(r.order[1:]) == [2, 3, 4] and r.order[0] in (0, 1)
            assert all(p.bucket == k and (p.sender, *p.receivers) == r.order for p in r.pieces)
            assert r.nbytes == sum(p.nbytes for p in r.pieces)
            orders.add(r.order)
        # every piece of the bucket is in exactly one route; a rank sees only the routes it is in
        assert sorted(p.index for r in routes for p in r.pieces) == [p.index for p in plan.pieces if p.bucket == k]
        assert plan.routes(k, 2) == routes and plan.routes(k, 0) == [r for r in routes if 0 in r.order]
    assert orders == {(0, 2, 3, 4), (1, 3, 4, 2)}
    # Each piece leaves its sender once; the chains' last receivers forward nothing of it.
    assert sum(plan.bytes_sent().values()) == 8 * 1024
    # Each rank forwards at most what it takes in (what a link's two directions allow), the tails nothing.
    fwd = plan.bytes_forwarded()
    assert sum(fwd.values()) == 2 * 8 * 1024 and fwd == {2: 4096, 3: 8192, 4: 4096}, fwd
    assert all(fwd[r] <= got for r, got in plan.bytes_received().items())


def test_route_offsets_are_aligned_for_mixed_dtypes():
    """Pieces of odd byte sizes and wider dtypes share a message: each starts on an 8-byte boundary."""
    m = [TensorSpec("a", (3,), "bfloat16"), TensorSpec("b", (5,), "float64"), TensorSpec("c", (1,), "uint8")]
    plan = plan_routes(m, {}, {1: None}, 1 << 20)
    (route,) = plan.routes(0)
    assert route.offsets == (0, 8, 48) and route.nbytes == 49


def test_a_round_gets_several_buckets_so_work_overlaps_the_wire():
    """A 16 MiB round under a 256 MiB bucket is cut into 8 buckets of 2 MiB; a smaller asked size stays; a tiny round keeps one 1 MiB bucket."""
    m = [TensorSpec(f"t{i}", (1024, 1024), "bfloat16") for i in range(8)]  # 2 MiB each
    needs = {1: None, 2: None}
    plan = plan_routes(m, {}, needs, 256 << 20)
    assert plan.num_buckets == 8
    assert all(sum(p.nbytes for p in plan.pieces if p.bucket == k) <= 2 << 20 for k in range(8))
    assert plan_routes(m, {}, needs, 512 << 10).num_buckets == 32
    small = [TensorSpec("s", (64, 64), "float32")]
    assert plan_routes(small, {}, needs, 256 << 20).num_buckets == 1


def test_each_sender_and_set_of_receivers_keeps_one_tag_in_every_bucket():
    """Lanes relay a bucket's routes while other lanes are a bucket behind: a tag names one (sender, receivers)
    for the whole plan, and no two of them share one, or two lanes' messages between the same ranks would meet."""
    m = [TensorSpec(f"w{i}", (8, 64), "float32") for i in range(6)] + [TensorSpec("norm", (64,), "float32")]
    holds = {r: {s.name: (Region(0, 4 * r, 4) if s.shape[0] == 8 else W) for s in m} for r in range(2)}
    halves = {s.name: Region(1, 0, 32) for s in m if len(s.shape) == 2}
    other = {s.name: Region(1, 32, 32) for s in m if len(s.shape) == 2}
    needs = {2: {**halves, "norm": W}, 3: {**other, "norm": W}, 4: {**halves, "norm": W}, 5: {**other, "norm": W}}
    plan = plan_routes(m, holds, needs, 2048)
    assert plan.num_buckets >= 4
    seen: dict[tuple[int, ...], int] = {}
    for k in range(plan.num_buckets):
        for r in plan.routes(k):
            assert seen.setdefault((r.order[0], *sorted(r.order[1:])), r.tag) == r.tag, (k, r.order)
    assert sorted(seen.values()) == list(range(1, len(seen) + 1))
    assert {key[1:] for key in seen} == {(2, 4), (3, 5), (2, 3, 4, 5)}


def test_rounds_of_more_than_two_senders_relay_in_lockstep_with_heads_rotating_per_bucket():
    """S <= 2: each sender's chain keeps one order for the round (it streams); S = 4: every bucket's chains
    rotate by (bucket + sender), so that every receiver takes its turn at the head."""
    m = [TensorSpec(f"t{i}", (256,), "float32") for i in range(16)]  # 1 KiB each
    needs = {r: None for r in range(4, 7)}
    four = plan_routes(m, {r: {s.name: W for s in m} for r in range(4)}, needs, 4096)
    assert not four.streams and four.num_buckets >= 3
    heads = {(r.order[0], k): r.order[1] for k in range(four.num_buckets) for r in four.routes(k)}
    for sender in range(4):
        assert len({heads[(sender, k)] for k in range(four.num_buckets) if (sender, k) in heads}) > 1, sender
    two = plan_routes(m, {r: {s.name: W for s in m} for r in range(2)}, {r - 2: None for r in needs}, 4096)
    assert two.streams
    assert len({r.order for k in range(two.num_buckets) for r in two.routes(k)}) == 2
