"""Rank processes for routed-round tests: S DTensor trainer ranks and memory-engine receivers over gloo on 127.0.0.1.

The parent plays the coordinator: trainer ranks report what they hold (from their DTensor
placements), trainer rank 0 its store port; the parent routes and hands every rank the
assignment; every rank reports its piece sums.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import traceback
from dataclasses import dataclass

import torch
import torch.multiprocessing as mp

from weightsync.core.routing import box_of
from weightsync.dataplane import GroupCache, MemoryEngine, TrainerStore
from weightsync.dataplane.routed import held_region, local_view, receive_routed, send_routed
from weightsync.dataplane.routed_delta import receive_routed_delta, send_routed_delta
from weightsync.dataplane.synthetic import random_tensor

HOST = "127.0.0.1"


@dataclass
class Options:
    num_senders: int = 2
    seed: int = 0
    corrupt: str | None = None  # receivers: flip one bit of this tensor's landed bytes (a bad apply)
    die_after_bucket: int | None = None  # SIGKILL itself once this many buckets were posted (trainer) or relayed (receiver)
    # A routed delta round (the assignment says which receivers take the delta): the trainer sends
    # version `steps` of a synthetic change stream against version steps - 1; a delta receiver's
    # engine starts with version steps - 1, or with other bytes when `wrong_base`.
    steps: int = 0
    wrong_base: bool = False


def stream(specs, seed: int, steps: int) -> dict[str, torch.Tensor]:
    from bench.fleet.step import change_stream

    return change_stream(specs, seed=seed, steps=steps)


def _trainer(rank: int, init_file: str, specs, inbox, outbox, opts: Options) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=opts.num_senders)
    mesh = init_device_mesh("cpu", (opts.num_senders,))
    def shard(full: dict[str, torch.Tensor]) -> dict:
        # FSDP2 shards dim 0; 1-D tensors stay replicated here, so both kinds of hold occur.
        return {s.name: distribute_tensor(full[s.name], mesh, [Shard(0)] if len(s.shape) == 2 else [Replicate()]) for s in specs}

    tensors = shard(stream(specs, opts.seed, opts.steps))
    holds = {n: r for n, t in tensors.items() if (r := held_region(t)) is not None}
    store = TrainerStore(HOST) if rank == 0 else None
    outbox.put(("holds", rank, holds, store.port if store else None))
    a = inbox.get(timeout=120)
    cache = GroupCache(trainer_store=store)
    group = cache.get(a, rank)
    if opts.die_after_bucket is not None:
        # The sender checks for aborts once per bucket: the planted death point.
        real_check = group.check_abort
        seen = []

        def check_and_die(what):
            if len(seen) == opts.die_after_bucket:
                os.kill(os.getpid(), signal.SIGKILL)
            seen.append(what)
            return real_check(what)

        group.check_abort = check_and_die
    held = {n: (local_view(tensors[n]), r) for n, r in holds.items()}
    if a.delta_base_version is not None:
        base = shard(stream(specs, opts.seed, opts.steps - 1))
        result = send_routed_delta(a, rank, held, {n: local_view(base[n]) for n in held}, group)
    else:
        result = send_routed(a, rank, held, group)
    outbox.put(("done", rank, {"piece_sums": result.piece_sums, "bytes": result.num_bytes}))
    torch.distributed.destroy_process_group()


def _receiver(rank: int, specs, needs, inbox, outbox, opts: Options) -> None:
    engine = MemoryEngine.from_specs(specs)
    a = inbox.get(timeout=120)
    group = GroupCache().get(a, rank)
    delta = rank in a.delta_ranks
    if delta:
        start = {s.name: random_tensor(s, opts.seed + 1) for s in specs} if opts.wrong_base else stream(specs, opts.seed, opts.steps - 1)
        engine.apply(start.items())
    if opts.die_after_bucket is not None:
        # A receiver waits once per bucket for its relays (it keeps forwarding the next bucket meanwhile).
        real_wait = group.wait_future
        waited = []

        def wait_and_die(future, what):
            if len(waited) == opts.die_after_bucket:
                os.kill(os.getpid(), signal.SIGKILL)
            waited.append(what)
            return real_wait(future, what)

        group.wait_future = wait_and_die

    def apply(batch):
        for name, t in batch:
            if name == opts.corrupt:
                t.view(-1).view(torch.uint8)[box_start_byte(t, needs[name])] ^= 1

    if a.delta_base_version is not None:  # a routed delta round: dense ranks take framed pieces too
        result = receive_routed_delta(a, rank, group, engine.destination, apply_fn=apply)
    else:
        result = receive_routed(a, rank, group, engine.destination, apply_fn=apply)
    held = engine.state_dict()
    wrong, written_outside = [], []
    new = stream(specs, opts.seed, opts.steps)
    for s in specs:
        want = new[s.name]
        region = needs.get(s.name)
        if region is None:
            continue
        inside = tuple(slice(lo, hi) for lo, hi in box_of(region, s.shape))
        if not torch.equal(held[s.name][inside].view(torch.uint8), want[inside].view(torch.uint8)):
            wrong.append(s.name)
        outside = held[s.name].clone()
        outside[inside] = 0
        if not delta and outside.view(torch.uint8).any():
            written_outside.append(s.name)
    outbox.put(("done", rank, {"piece_sums": result.piece_sums, "bytes": result.num_bytes, "wrong": wrong, "outside": written_outside}))


def box_start_byte(t: torch.Tensor, region) -> int:
    box = box_of(region, tuple(t.shape))
    strides = [int(torch.tensor(t.shape[d + 1 :]).prod()) for d in range(t.dim())]
    return sum(lo * st for (lo, _), st in zip(box, strides)) * t.element_size()


def main(role: str, rank: int, args, opts: Options, inbox, outbox) -> None:
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    try:
        if role == "trainer":
            _trainer(rank, *args, inbox, outbox, opts)
        else:
            _receiver(rank, *args, inbox, outbox, opts)
    except BaseException as e:
        outbox.put(("error", rank, {"type": type(e).__name__, "error": str(e), "traceback": traceback.format_exc()}))


def context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "weightsync.dataplane", "torch.distributed.tensor", __name__])
    return ctx


def run_round(specs, needs_by_rank, route, opts: Options, init_file: str, timeout_s: float = 120.0, rank_opts=None):
    """Starts the ranks; route(holds, port) -> Assignment; returns (assignment, {rank: report}, exit codes, seconds after it was sent)."""
    rank_opts = rank_opts or {}

    def opts_for(r):
        return rank_opts.get(r, opts)

    ctx = context()
    outbox = ctx.Queue()
    ranks = list(range(opts.num_senders)) + sorted(needs_by_rank)
    inboxes = {r: ctx.Queue() for r in ranks}
    procs = {}
    for r in range(opts.num_senders):
        procs[r] = ctx.Process(target=main, args=("trainer", r, (init_file, specs), opts_for(r), inboxes[r], outbox), daemon=True)
    for r, needs in needs_by_rank.items():
        procs[r] = ctx.Process(target=main, args=("receiver", r, (specs, needs), opts_for(r), inboxes[r], outbox), daemon=True)
    for p in procs.values():
        p.start()
    reports: dict[int, tuple[str, dict]] = {}
    try:
        holds, port = {}, None
        while len(holds) < opts.num_senders:
            msg = outbox.get(timeout=60)
            assert msg[0] == "holds", msg
            _, r, h, p = msg
            holds[r] = h
            port = p if p is not None else port
        a = route(holds, port)
        started = time.monotonic()
        for q in inboxes.values():
            q.put(a)
        deadline = time.monotonic() + timeout_s
        alive = set(ranks)
        while alive - set(reports):
            try:
                kind, r, body = outbox.get(timeout=0.5)
                reports[r] = (kind, body)
                continue
            except Exception:
                pass
            for r, p in procs.items():
                if r not in reports and p.exitcode is not None and p.exitcode < 0:
                    alive.discard(r)
            assert time.monotonic() < deadline, f"ranks {sorted(alive - set(reports))} did not report within {timeout_s} s"
        elapsed = time.monotonic() - started
        return a, reports, {r: p.exitcode for r, p in procs.items()}, elapsed
    finally:
        for p in procs.values():
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
