"""Rank processes for the data-plane tests: each runs real sends and receives over gloo on 127.0.0.1.

The parent plays the coordinator: rank 0 (the trainer) opens its store on a free port
and reports it; the parent builds the round assignments with that port and hands each
rank its list of rounds; every rank reports one result per round.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import time
import traceback
from dataclasses import dataclass

import torch
import torch.multiprocessing as mp

from weightsync.core import Assignment, BucketPlan, Participant, Rendezvous, TensorSpec
from _titan_layout import hf_to_titan
from weightsync.dataplane import (
    DeferredTensor,
    GroupCache,
    MemoryEngine,
    TitanToHF,
    TrainerStore,
    iter_assignment,
    receive_assignment,
    send_assignment,
)
from weightsync.dataplane.synthetic import random_tensor

HOST = "127.0.0.1"


@dataclass
class RankOptions:
    """How one rank behaves; the defaults make a plain, healthy round."""

    seed: int = 0
    mode: str = "apply"  # receivers: "apply" (receive_assignment) or "iter" (iter_assignment)
    kill_at_bucket: int | None = None  # SIGKILL this receiver while it holds this bucket
    drop_tensor: str | None = None  # the sender leaves this tensor out
    trainer_world: tuple[str, int] | None = None  # (init file, world size): run as a DTensor trainer rank
    dp_rank: int | None = None  # data-plane rank when it differs from the process index
    engine_drops: str | None = None  # the receiver's engine does not hold this tensor
    hang_at_bucket: int | None = None  # the receiver stops reading (but stays alive) at this bucket
    sender_fails_on: str | None = None  # computing this tensor raises on the sender
    linger_s: float = 0.0  # stay alive this long after the rounds, before reporting
    titan_heads: tuple[int, int] | None = None  # the trainer holds torchtitan names: (num_heads, num_kv_heads)
    device: str = "cpu"  # where the trainer's tensors and the receiver's engine live
    stop_after_pairs: int | None = None  # an iter_assignment consumer that leaves early
    corrupt_bucket: int | None = None  # flip one received bit of this bucket, as a bad wire would
    destination: bool = False  # the receiver lets the data plane write into its engine's tensors
    sender_deferred: bool = False  # every trainer tensor is a DeferredTensor (forces packing)
    seed_step: int = 0  # round i carries the tensors of seed + i * seed_step
    persistent: bool = False  # the trainer keeps one set of tensors and overwrites it each round
    bad_destination: str | None = None  # the destination offered for this name has the wrong dtype
    relay: str | None = None  # rank 0: how dense gloo rounds travel (GroupCache(relay=...)); None: "auto"
    refuse_ipc_export: bool = False  # CUDA IPC cannot export this trainer's memory (as with expandable segments)


def make_assignment(
    specs: list[TensorSpec],
    *,
    port: int,
    world_size: int,
    update_id: str,
    group_id: str = "g1",
    bucket_size_bytes: int = 1 << 20,
    timeout_s: float = 30.0,
    version: int = 1,
    transport: str = "gloo",
) -> Assignment:
    rendezvous = Rendezvous(transport, HOST, port, world_size, group_id, timeout_s)
    participants = tuple(Participant(f"d{r}", (r,)) for r in range(1, world_size))
    plan = BucketPlan.build(specs, bucket_size_bytes)
    return Assignment(update_id, version, rendezvous, participants, plan, deadline_s=600.0)


def _specs_of(a: Assignment) -> list[TensorSpec]:
    return [e.spec for _, e in a.plan.entries()]


def _raise_lost_shard() -> torch.Tensor:
    raise RuntimeError("trainer lost a shard")


def _sender_tensors(a: Assignment, opts: RankOptions, seed: int) -> dict[str, torch.Tensor]:
    tensors = {s.name: random_tensor(s, seed, opts.device) for s in _specs_of(a) if s.name != opts.drop_tensor}
    if opts.persistent:
        kept = _persistent.setdefault("tensors", tensors)
        for name, t in tensors.items():
            kept[name].copy_(t)  # in place: the same storages every round
        tensors = dict(kept)
    if opts.sender_deferred:
        tensors = {n: DeferredTensor(tuple(t.shape), t.dtype, (lambda t=t: t), t.device) for n, t in tensors.items()}
    if opts.sender_fails_on is not None:
        t = tensors[opts.sender_fails_on]
        tensors[opts.sender_fails_on] = DeferredTensor(tuple(t.shape), t.dtype, _raise_lost_shard)
    if opts.titan_heads is not None:
        tensors = dict(hf_to_titan(n, t, *opts.titan_heads) for n, t in tensors.items())
    if opts.trainer_world is not None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
        tensors = {n: distribute_tensor(t, mesh, [Shard(0)]) for n, t in tensors.items()}
    if opts.titan_heads is not None:
        return TitanToHF(*opts.titan_heads).map_state_dict(tensors)
    return tensors


_persistent: dict[str, dict[str, torch.Tensor]] = {}


def _destination(engine: MemoryEngine, opts: RankOptions):
    def destination(name: str) -> torch.Tensor | None:
        held = engine.destination(name)
        if name == opts.bad_destination and held is not None:
            return torch.zeros(held.shape, dtype=torch.float64, device=held.device)
        return held

    return destination


def _mismatches(engine: MemoryEngine, a: Assignment, seed: int) -> list[str]:
    held = engine.state_dict()
    bad = []
    for spec in _specs_of(a):
        want = random_tensor(spec, seed).view(-1).view(torch.uint8)
        got = held[spec.name].cpu().view(-1).view(torch.uint8)
        if not torch.equal(want, got):
            bad.append(spec.name)
    return bad


def _corrupt_wire(bucket_index: int) -> None:
    """Flips the first byte of one bucket after it arrives and before the receiver checksums it."""
    from weightsync.dataplane import transports

    cls = transports.BroadcastIn
    start, finish = cls.start, cls.finish
    views: dict[int, torch.Tensor] = {}

    def start_and_remember(self, k, slot, view):
        views[k] = view
        return start(self, k, slot, view)

    def finish_and_corrupt(self, k, handle):
        finish(self, k, handle)
        if k == bucket_index:
            views[k][0] ^= 1

    cls.start, cls.finish = start_and_remember, finish_and_corrupt


def _round(index: int, a: Assignment, cache: GroupCache, opts: RankOptions) -> dict:
    started = time.monotonic()
    dp_rank = opts.dp_rank if opts.dp_rank is not None else index
    seed = opts.seed + (a.version - 1) * opts.seed_step
    out: dict = {"update_id": a.update_id}
    engine = None
    try:
        if opts.trainer_world is not None or dp_rank == 0:
            if opts.refuse_ipc_export:
                from weightsync.dataplane import cuda_ipc

                def refuse(t):
                    raise RuntimeError("cudaIpcGetMemHandle: operation not supported (planted by the test)")

                cuda_ipc.export_storage = refuse
            tensors = _sender_tensors(a, opts, seed)
            is_dp_sender = opts.trainer_world is None or torch.distributed.get_rank() == 0
            result = send_assignment(a, tensors, cache.get(a, 0) if is_dp_sender else None)
            out["checksums"] = result.checksums
        else:
            if opts.corrupt_bucket is not None:
                _corrupt_wire(opts.corrupt_bucket)
            engine = MemoryEngine.from_specs(
                (s for s in _specs_of(a) if s.name != opts.engine_drops), device=opts.device
            )
            group = cache.get(a, dp_rank)
            buckets_seen = []

            def apply(batch):
                if opts.kill_at_bucket is not None and len(buckets_seen) == opts.kill_at_bucket:
                    os.kill(os.getpid(), signal.SIGKILL)
                if opts.hang_at_bucket is not None and len(buckets_seen) == opts.hang_at_bucket:
                    time.sleep(3600)
                engine.apply(batch)
                buckets_seen.append(len(batch))

            progress = out["progress"] = []
            if opts.mode == "iter":
                with iter_assignment(a, dp_rank, group, progress=lambda *p: progress.append(p)) as stream:
                    for i, (name, view) in enumerate(stream):  # a view lives only until the next bucket
                        if i == opts.stop_after_pairs:
                            break
                        engine.apply([(name, view)])
                result = stream.result
            else:
                result = receive_assignment(
                    a, dp_rank, group, apply, progress=lambda *p: progress.append(p),
                    destination=_destination(engine, opts) if opts.destination else None,
                )
            out["checksums"] = result.checksums
            out["bytes_received"] = result.bytes_received
            out["mismatched"] = _mismatches(engine, a, seed)
        out["ok"] = True
    except Exception as e:  # reported to the test, which asserts on it
        out.update(ok=False, error_type=type(e).__name__, error=str(e), traceback=traceback.format_exc())
    out["elapsed_s"] = time.monotonic() - started
    out["relay"] = cache.group.relay if cache.group is not None else None
    out["num_applied"] = engine.num_applied if engine is not None else 0
    return out


def rank_main(rank: int, inbox, outbox, opts: RankOptions) -> None:
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # three ranks share two cores
    try:
        store = None
        if opts.trainer_world is not None:
            init_file, world = opts.trainer_world
            torch.distributed.init_process_group(
                "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
            )
        if rank == 0:
            store = TrainerStore(HOST)
            outbox.put(("port", store.port))
        rounds: list[Assignment] = inbox.get(timeout=120)
        if opts.device.startswith("cuda"):
            torch.cuda.set_device(torch.device(opts.device))
        cache = GroupCache(trainer_store=store, device=opts.device if opts.device != "cpu" else None, relay=opts.relay or "auto")
        results = [_round(rank, a, cache, opts) for a in rounds]
        time.sleep(opts.linger_s)
        outbox.put(("done", rank, results, cache.num_constructions))
        if store is not None:
            # A trainer keeps its store until the round is over everywhere: peers still read the
            # reasons it posted there (a refused round's, say). launch() releases it.
            try:
                inbox.get(timeout=120)
            except queue.Empty:
                pass
        if opts.trainer_world is not None:
            torch.distributed.destroy_process_group()
    except BaseException:
        outbox.put(("crash", rank, traceback.format_exc(), 0))
        raise


def _context():
    # A forkserver imports torch once per test session; spawning pays ~3 s per launch on two cores.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "weightsync.dataplane", "torch.distributed.tensor", __name__])
    return ctx


@dataclass
class RankReport:
    rank: int
    rounds: list[dict]
    num_constructions: int
    exitcode: int | None


def launch(
    num_ranks: int,
    build_rounds,
    options: dict[int, RankOptions] | None = None,
    *,
    timeout_s: float = 120.0,
    silent: frozenset[int] = frozenset(),
) -> dict[int, RankReport]:
    """Runs num_ranks processes; build_rounds(port) -> {process index: [Assignment, ...]}.

    Returns a report per process; a process that died without reporting has rounds == []
    and its exit code (e.g. -9 after SIGKILL). Ranks in `silent` are expected to hang:
    they are killed once every other rank has reported.
    """
    ctx = _context()
    outbox = ctx.Queue()
    inboxes = [ctx.Queue() for _ in range(num_ranks)]
    options = options or {}
    procs = [
        ctx.Process(target=rank_main, args=(r, inboxes[r], outbox, options.get(r, RankOptions())), daemon=True)
        for r in range(num_ranks)
    ]
    for p in procs:
        p.start()
    reports: dict[int, RankReport] = {}
    deadline = time.monotonic() + timeout_s
    try:
        kind, port = outbox.get(timeout=60)
        assert kind == "port", kind
        for r, rounds in build_rounds(port).items():
            inboxes[r].put(rounds)
        while len(reports) < num_ranks:
            alive = [r for r, p in enumerate(procs) if p.is_alive() or p.exitcode is None]
            pending = [r for r in range(num_ranks) if r not in reports]
            if pending and all(r in silent for r in pending):
                break
            if all(r not in alive for r in pending):
                # Whoever is left died without reporting; drain what is still queued.
                try:
                    kind, r, payload, n = outbox.get(timeout=1.0)
                except queue.Empty:
                    break
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"ranks {pending} did not report within {timeout_s} s")
                try:
                    kind, r, payload, n = outbox.get(timeout=min(remaining, 0.5))
                except queue.Empty:
                    continue
            if kind == "crash":
                raise AssertionError(f"rank {r} crashed:\n{payload}")
            reports[r] = RankReport(r, payload, n, None)
    finally:
        inboxes[0].put("release")  # rank 0 hosts the store: every other rank is done with it
        for r in silent:
            procs[r].kill()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    for r, p in enumerate(procs):
        if r in reports:
            reports[r].exitcode = p.exitcode
        else:
            reports[r] = RankReport(r, [], 0, p.exitcode)
    return reports
