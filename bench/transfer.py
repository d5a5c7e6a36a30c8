"""End-to-end data-plane bandwidth beside a raw broadcast and the old per-parameter protocol, in one run.

    python bench/transfer.py --transport gloo --receivers 2 --shape qwen2.5-0.5b --json out.json

One trainer process and N receiver processes form one group. Each iteration times, on
that same group and in turn:

  end_to_end   send_assignment -> every receiver has applied and verified every byte
               (the sender returns only after the closing agreement, so its clock is the
               round's clock);
  raw          one broadcast of a buffer holding the same number of bytes, then a
               one-element all-reduce so the clock stops when every receiver has it;
  per_param    the old protocol: broadcast the tensor count and an index (dtype, shape
               per tensor), then one blocking broadcast per tensor into a freshly
               allocated tensor, applied like end_to_end, then the same all-reduce.

For cuda_ipc (one GPU, no collectives) raw is one device-to-device copy of the whole
payload out of an IPC-mapped buffer (mapped once, in the warm-up, as end to end keeps its
mappings; the store's go and acknowledgement are timed as in end to end), and per_param
maps one IPC handle per tensor, as vLLM's per-parameter IPC updates did. On a GPU,
device_copy_gib_s is one in-process copy of the payload (its first 4 GiB at most), the
device's copy bandwidth with no control around it. With --destination engine (the default, as the memory daemon
does) receivers hand the data plane their MemoryEngine's tensors to write into. Bandwidth counts payload bytes (the tensors'
own bytes, without alignment padding) once, however many receivers there are; each
figure is the median over iterations of the slowest rank.

checksum_share is the busiest rank's wall time inside checksums over the round's time;
checksum_standalone_share is one checksum pass at the rate measured alone in the same
run, over the round's time (the first grows with contention for cores, the second does
not). *_cpu_s are CPU seconds of all ranks together, user and kernel.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import queue
import resource
import statistics
import sys
import time

import torch
import torch.multiprocessing as mp

from weightsync.core import Assignment, BucketPlan, Participant, Rendezvous
from weightsync.dataplane import GroupCache, MemoryEngine, TrainerStore, receive_assignment, send_assignment
from weightsync.dataplane.checksum import bytes_checksum
from weightsync.dataplane.cuda_ipc import export_buffer, import_buffer
from weightsync.dataplane.fused import copy_and_checksum
from weightsync.dataplane.groups import DataPlaneGroup
from weightsync.dataplane.layout import torch_dtype
from weightsync.dataplane.synthetic import MODEL_SHAPES

HOST = "127.0.0.1"
_DTYPES = ["bfloat16", "float16", "float32"]


def _barrier(group: DataPlaneGroup, tag: str) -> None:
    if group.uses_collectives:
        t = torch.zeros(1, dtype=torch.int64, device=group.device)
        group.wait(group.all_reduce_max(t, f"bench barrier {tag}"), f"bench barrier {tag}")
        return
    key = f"bench/barrier/{tag}"
    group.store.set(f"{key}/{group.rank}", "")
    group.wait_keys([f"{key}/{r}" for r in range(group.world_size)], f"bench barrier {tag}")


def _cpu_s() -> float:
    """CPU seconds of this process, all threads, user and kernel: on a shared or small machine
    the work a method costs is steadier than its wall time."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _device(transport: str, rank: int) -> torch.device:
    """gloo: the CPU; cuda_ipc: every rank on GPU 0; nccl: one GPU per rank (NCCL refuses two ranks on one)."""
    if transport == "gloo":
        return torch.device("cpu")
    if transport == "nccl":
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cuda", 0)


# ---------------------------------------------------------------------- the three methods


def _end_to_end(rank, assignment, group, tensors, engine, into_engine: bool) -> dict:
    if rank == 0:
        r = send_assignment(assignment, tensors, group)
        return {"checksum_s": r.checksum_s, "timeline": r.timeline}
    apply = engine.apply if engine is not None else (lambda batch: None)
    destination = engine.destination if engine is not None and into_engine else None
    r = receive_assignment(assignment, rank, group, apply, destination=destination)
    return {"checksum_s": r.checksum_s, "timeline": r.timeline}


_raw_source: dict[str, torch.Tensor] = {}


def _raw(rank, group, buf, tag) -> None:
    if group.uses_collectives:
        group.wait(group.broadcast(buf, "raw broadcast"), "raw broadcast")
        _barrier(group, tag)
        return
    # cuda_ipc: the receivers copy the sender's whole buffer once. The buffer is mapped in
    # the first (warm-up) iteration and kept, as end to end keeps its mappings.
    if rank == 0:
        if not _raw_source:
            group.store.set("bench/raw/handle", export_buffer(buf))
            _raw_source["exported"] = buf
        torch.cuda.synchronize()
        group.store.set(f"bench/raw/{tag}", "")
        group.wait_keys([f"bench/raw/{tag}/ack/{r}" for r in range(1, group.world_size)], "raw copy")
        return
    if not _raw_source:
        group.wait_keys(["bench/raw/handle"], "raw handle")
        _raw_source["mapped"] = import_buffer(group.store.get("bench/raw/handle"))
    group.wait_keys([f"bench/raw/{tag}"], "raw go")
    buf.copy_(_raw_source["mapped"])
    torch.cuda.synchronize()
    group.store.set(f"bench/raw/{tag}/ack/{rank}", "")


def _device_copy_gib_s(buf: torch.Tensor, iters: int = 5) -> float:
    """One in-process device-to-device copy (of up to 4 GiB of the payload): the GPU's copy bandwidth."""
    dst = torch.empty_like(buf)
    dst.copy_(buf)
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(buf)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return buf.numel() / 2**30 / statistics.median(times)


def _per_param(rank, group, specs, tensors, engine, device, tag) -> None:
    """The old protocol, one tensor at a time; on cuda_ipc one IPC handle per tensor."""
    apply = engine.apply if engine is not None else (lambda batch: None)
    if not group.uses_collectives:
        if rank == 0:
            torch.cuda.synchronize()
            for i, s in enumerate(specs):
                group.store.set(f"bench/pp/{tag}/{i}", export_buffer(tensors[s.name].view(-1).view(torch.uint8)))
            group.wait_keys([f"bench/pp/{tag}/ack/{r}" for r in range(1, group.world_size)], "per-param acks")
            return
        for i, s in enumerate(specs):
            group.wait_keys([f"bench/pp/{tag}/{i}"], "per-param handle")
            src = import_buffer(group.store.get(f"bench/pp/{tag}/{i}"))
            dst = torch.empty(s.shape, dtype=torch_dtype(s.dtype), device=device)
            dst.view(-1).view(torch.uint8).copy_(src)
            apply([(s.name, dst)])
        torch.cuda.synchronize()
        group.store.set(f"bench/pp/{tag}/ack/{rank}", "")
        return
    max_dims = 4
    count = torch.tensor([len(specs)], dtype=torch.int64, device=device)
    group.wait(group.broadcast(count, "per-param count"), "per-param count")
    index = torch.zeros(int(count.item()), 2 + max_dims, dtype=torch.int64, device=device)
    if rank == 0:
        for i, s in enumerate(specs):
            index[i, 0] = _DTYPES.index(s.dtype)
            index[i, 1] = len(s.shape)
            index[i, 2 : 2 + len(s.shape)] = torch.tensor(s.shape)
    group.wait(group.broadcast(index, "per-param index"), "per-param index")
    for i, row in enumerate(index.tolist()):
        if rank == 0:
            t = tensors[specs[i].name]
        else:
            t = torch.empty(row[2 : 2 + row[1]], dtype=torch_dtype(_DTYPES[row[0]]), device=device)
        group.wait(group.broadcast(t, f"per-param tensor {i}"), f"per-param tensor {i}")
        if rank != 0:
            apply([(specs[i].name, t)])
    _barrier(group, tag)


# ---------------------------------------------------------------------- processes


def _rank_main(rank: int, args: argparse.Namespace, inbox, outbox) -> None:
    logging.basicConfig(level=logging.WARNING)
    if args.threads_per_rank:
        torch.set_num_threads(args.threads_per_rank)
    device = _device(args.transport, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = TrainerStore(HOST) if rank == 0 else None
    if rank == 0:
        outbox.put(("port", store.port))
    assignments: list[Assignment] = inbox.get(timeout=300)
    cache = GroupCache(trainer_store=store, device=device)
    specs = [e.spec for _, e in assignments[0].plan.entries()]
    payload = sum(s.nbytes for s in specs)
    tensors = engine = None
    if rank == 0:
        torch.manual_seed(1)
        tensors = {
            s.name: torch.empty(s.nbytes, dtype=torch.uint8, device=device).random_(0, 256).view(torch_dtype(s.dtype)).view(s.shape)
            for s in specs
        }
    elif args.apply == "memory":
        engine = MemoryEngine.from_specs(specs, device=str(device))
    raw_buf = torch.zeros(payload, dtype=torch.uint8, device=device)
    samples: list[dict] = []
    for ai, assignment in enumerate(assignments):
        group = cache.get(assignment, rank)
        for it in range(args.warmup + args.iters):
            tag = f"{ai}/{it}"
            row: dict = {"warmup": it < args.warmup}
            _barrier(group, tag + "/e")
            t0, c0 = time.perf_counter(), _cpu_s()
            row.update(_end_to_end(rank, assignment, group, tensors, engine, args.destination == "engine"))
            row["end_to_end_s"], row["end_to_end_cpu_s"] = time.perf_counter() - t0, _cpu_s() - c0
            _barrier(group, tag + "/r")
            t0, c0 = time.perf_counter(), _cpu_s()
            _raw(rank, group, raw_buf, tag + "/rr")
            row["raw_s"], row["raw_cpu_s"] = time.perf_counter() - t0, _cpu_s() - c0
            if not args.skip_per_param:
                _barrier(group, tag + "/p")
                t0, c0 = time.perf_counter(), _cpu_s()
                _per_param(rank, group, specs, tensors, engine, device, tag + "/pp")
                row["per_param_s"], row["per_param_cpu_s"] = time.perf_counter() - t0, _cpu_s() - c0
            samples.append(row)
    checksum_gib_s = device_copy = None
    if rank == 0:
        # Standalone checksum throughput on this machine, over the same number of bytes.
        buf = raw_buf.random_(0, 256)

        def one_pass() -> None:
            # What the data plane runs: the fused kernel on a GPU, torch ops on the CPU.
            if device.type == "cuda":
                copy_and_checksum([buf]).result()
            else:
                bytes_checksum(buf)

        one_pass()
        t0 = time.perf_counter()
        one_pass()
        checksum_gib_s = payload / 2**30 / (time.perf_counter() - t0)
        if device.type == "cuda":
            # At most 4 GiB: copy bandwidth is flat beyond that, and three payloads (the trainer's
            # tensors, the raw buffer, the copy) may not fit on one GPU.
            device_copy = _device_copy_gib_s(raw_buf[: min(raw_buf.numel(), 4 << 30)])
    outbox.put(("done", rank, samples, (checksum_gib_s, device_copy)))
    cache.close()


def _hardware(transport: str) -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    hw = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    if transport != "gloo" and torch.cuda.is_available():
        hw["gpu"] = torch.cuda.get_device_name(0)
        hw["gpu_count"] = torch.cuda.device_count()
    return hw


def _summarise(rows: list[list[dict]], payload: int, key: str) -> float | None:
    """Median over iterations of the slowest rank's time, as GiB/s."""
    per_iter = []
    for it_rows in zip(*rows):
        if it_rows[0]["warmup"] or key not in it_rows[0]:
            continue
        per_iter.append(max(r[key] for r in it_rows))
    if not per_iter:
        return None
    return payload / 2**30 / statistics.median(per_iter)


def _result_for(size_rows: list[list[dict]], payload: int, world: int, bucket_size_bytes: int) -> dict:
    e2e = _summarise(size_rows, payload, "end_to_end_s")
    raw = _summarise(size_rows, payload, "raw_s")
    pp = _summarise(size_rows, payload, "per_param_s")
    measured = [i for i, r in enumerate(size_rows[0]) if not r["warmup"]]
    e2e_times = [max(size_rows[k][i]["end_to_end_s"] for k in range(world)) for i in measured]
    checksum_share = max(
        statistics.median(size_rows[k][i]["checksum_s"] for i in measured) for k in range(world)
    ) / statistics.median(e2e_times)
    def cpu(key: str) -> float | None:
        if key not in size_rows[0][measured[0]]:
            return None
        return statistics.median(sum(size_rows[k][i][key] for k in range(world)) for i in measured)

    timeline_ms = [
        {
            name: round(1000 * statistics.median(size_rows[k][i]["timeline"][name] for i in measured), 3)
            for name in size_rows[k][measured[0]]["timeline"]
        }
        for k in range(world)
    ]
    return {
        "bucket_size_bytes": bucket_size_bytes,
        "timeline_ms_by_rank": timeline_ms,
        "end_to_end_cpu_s": cpu("end_to_end_cpu_s"),
        "raw_broadcast_cpu_s": cpu("raw_cpu_s"),
        "per_param_cpu_s": cpu("per_param_cpu_s"),
        "end_to_end_gib_s": e2e,
        "raw_broadcast_gib_s": raw,
        "per_param_gib_s": pp,
        "end_to_end_over_raw": e2e / raw if raw else None,
        "end_to_end_over_per_param": e2e / pp if pp else None,
        "checksum_share": checksum_share,
        "end_to_end_s": sorted(e2e_times),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transport", choices=["gloo", "nccl", "cuda_ipc"], default="gloo")
    parser.add_argument("--receivers", type=int, default=2)
    parser.add_argument("--shape", choices=sorted(MODEL_SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--bucket-size-bytes", default=str(256 << 20),
                        help="one size, or a comma-separated list to sweep on the same group")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--apply", choices=["memory", "none"], default="memory",
                        help="memory: receivers copy into a MemoryEngine (both protocols); none: discard")
    parser.add_argument("--threads-per-rank", type=int, default=0,
                        help="torch threads per rank; 0: max(1, cores // ranks)")
    parser.add_argument("--skip-per-param", action="store_true")
    parser.add_argument("--destination", choices=["engine", "ring"], default="engine",
                        help="engine: receivers let the data plane write into the MemoryEngine's tensors "
                        "(receive_assignment(destination=...)); ring: into the ring, then apply copies")
    parser.add_argument("--json", required=True, help="where to write the results")
    args = parser.parse_args(argv)
    if args.receivers < 1:
        parser.error("--receivers must be at least 1")
    world = args.receivers + 1
    if not args.threads_per_rank:
        args.threads_per_rank = max(1, (os.cpu_count() or 1) // world)
    sizes = [int(s) for s in args.bucket_size_bytes.split(",")]
    specs = MODEL_SHAPES[args.shape].manifest()
    payload = sum(s.nbytes for s in specs)

    ctx = mp.get_context("spawn")
    outbox = ctx.Queue()
    inboxes = [ctx.Queue() for _ in range(world)]
    procs = [ctx.Process(target=_rank_main, args=(r, args, inboxes[r], outbox), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    try:
        _, port = outbox.get(timeout=300)
        rendezvous = Rendezvous(args.transport, HOST, port, world, "bench", timeout_s=300.0)
        participants = tuple(Participant(f"d{r}", (r,)) for r in range(1, world))
        assignments = [
            Assignment(f"bench-{i}", i + 1, rendezvous, participants, BucketPlan.build(specs, size), 3600.0)
            for i, size in enumerate(sizes)
        ]
        for q in inboxes:
            q.put(assignments)
        reports: dict[int, tuple[list[dict], tuple]] = {}
        while len(reports) < world:
            try:
                kind, rank, samples, extra = outbox.get(timeout=5)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in reports and p.exitcode is not None]
                if dead:
                    raise SystemExit(f"rank(s) {dead} exited (codes {[procs[r].exitcode for r in dead]}) before reporting")
                continue
            reports[rank] = (samples, extra)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    per_iter = args.warmup + args.iters
    runs = []
    for i, size in enumerate(sizes):
        rows = [reports[r][0][i * per_iter : (i + 1) * per_iter] for r in range(world)]
        runs.append(_result_for(rows, payload, world, size))
    result = {
        **runs[0],
        "transport": args.transport,
        "shape": args.shape,
        "receivers": args.receivers,
        "apply": args.apply,
        "bytes": payload,
        "tensors": len(specs),
        "num_buckets": len(BucketPlan.build(specs, sizes[0]).buckets),
        "iters": args.iters,
        "warmup": args.warmup,
        "threads_per_rank": args.threads_per_rank,
        "destination": args.destination,
        "checksum_gib_s": reports[0][1][0],
        "device_copy_gib_s": reports[0][1][1],
        "hardware": _hardware(args.transport),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/transfer.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    for run in runs:
        # One checksum pass over the payload on an idle core, as a share of the round: the
        # in-run share above is wall time and grows with contention for the cores.
        if result["checksum_gib_s"]:
            run["checksum_standalone_share"] = payload / 2**30 / result["checksum_gib_s"] / statistics.median(
                run["end_to_end_s"]
            )
        if result["device_copy_gib_s"]:
            run["end_to_end_over_device_copy"] = run["end_to_end_gib_s"] / result["device_copy_gib_s"]
    result["checksum_standalone_share"] = runs[0].get("checksum_standalone_share")
    result["end_to_end_over_device_copy"] = runs[0].get("end_to_end_over_device_copy")
    if len(runs) > 1:
        result["sweep"] = runs
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k not in ("hardware", "sweep", "end_to_end_s")}, indent=2))
    for run in runs if len(runs) > 1 else []:
        print(
            f"bucket {run['bucket_size_bytes'] >> 20:>5} MiB: e2e {run['end_to_end_gib_s']:.2f} GiB/s, "
            f"raw {run['raw_broadcast_gib_s']:.2f}, per-param {run['per_param_gib_s'] or 0:.2f}, "
            f"e2e/raw {run['end_to_end_over_raw']:.2f}; cpu s (all ranks) e2e {run['end_to_end_cpu_s']:.2f} "
            f"raw {run['raw_broadcast_cpu_s']:.2f} per-param {run['per_param_cpu_s'] or 0:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
