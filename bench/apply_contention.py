"""Receivers sharing a machine's cores: a delta round's apply and checksums, per torch thread count.

    python bench/apply_contention.py --processes 7 --model-mib 64 --delta 0.02 --threads 2 1 --json OUT

Each of --processes processes holds a synthetic bf16 model (1 MiB tensors), builds the delta of
a step with --delta of its elements changed (bench/fleet/step.py), and then, all starting at the
same instant, patches its model (`apply_many`) and recomputes the checksums of the whole
resulting tensors, as every receiver of a delta round on the emulated fleet does at once. Per
thread count it reports each process's wall and CPU seconds. Why it exists: the emulated fleet
runs 8 hosts on 2 cores, and torch's default intra-op thread count (one per core, in every
process) made each receiver's small parallel ops wait at OpenMP barriers for threads that were
not running; bench/fleet therefore gives each emulated host one thread (FleetSpec.threads_per_host).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Processes start this long before the common instant: importing torch on a loaded machine is slow.
_START_MARGIN_S = 10.0


def _receiver(threads: int, model_mib: float, fraction: float, seed: int, start_at: float, out) -> None:
    import torch

    from bench.fleet.step import step_like
    from weightsync.dataplane.checksum import tensor_checksum
    from weightsync.dataplane.delta import apply_many, encode_many

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed)
    numel = 512 * 1024  # 1 MiB of bf16
    base = {f"t{i}": torch.randn(numel, generator=g).to(torch.bfloat16) for i in range(int(model_mib))}
    new = step_like(base, fraction=fraction, seed=seed + 1)
    names = list(base)
    deltas = encode_many([base[n] for n in names], [new[n] for n in names])
    targets = [base[n].clone() for n in names]
    tensor_checksum(targets[0])  # builds the weight table, as a daemon's first round does
    while time.time() < start_at:
        time.sleep(0.001)
    t0, c0 = time.perf_counter(), time.process_time()
    apply_many(targets, deltas)
    t1 = time.perf_counter()
    sums = [tensor_checksum(t) for t in targets]
    t2 = time.perf_counter()
    if sums != [tensor_checksum(new[n]) for n in names]:
        raise SystemExit("apply_contention: a patched tensor differs from the new version")
    out.put({"apply_s": t1 - t0, "checksum_s": t2 - t1, "cpu_s": time.process_time() - c0})


def run(args: argparse.Namespace) -> dict:
    ctx = mp.get_context("spawn")
    by_threads = {}
    for threads in args.threads:
        out = ctx.Queue()
        start_at = time.time() + _START_MARGIN_S
        procs = [
            ctx.Process(target=_receiver, args=(threads, args.model_mib, args.delta, 1000 * i, start_at, out))
            for i in range(args.processes)
        ]
        for p in procs:
            p.start()
        got = [out.get(timeout=300) for _ in procs]
        for p in procs:
            p.join()
        apply = sorted(r["apply_s"] for r in got)
        by_threads[str(threads)] = {
            "apply_s": apply,
            "checksum_s": sorted(r["checksum_s"] for r in got),
            "cpu_s": sorted(r["cpu_s"] for r in got),
            "apply_s_median": statistics.median(apply),
            "apply_s_max": apply[-1],
        }
    return {
        "processes": args.processes,
        "model_mib": args.model_mib,
        "delta_fraction": args.delta,
        "by_threads": by_threads,
        "load_average": os.getloadavg(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, default=7, help="receivers applying at once")
    p.add_argument("--model-mib", type=float, default=64, help="model size in MiB (bf16, 1 MiB tensors)")
    p.add_argument("--delta", type=float, default=0.02, help="fraction of elements changed")
    p.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="torch intra-op thread counts to compare")
    p.add_argument("--json", required=True, help="write the result here")
    args = p.parse_args(argv)
    if args.processes < 1:
        p.error(f"--processes: expected >= 1, got {args.processes}")
    if not 0 < args.delta <= 1:
        p.error(f"--delta: expected a fraction in (0, 1], got {args.delta}")
    if any(t < 1 for t in args.threads):
        p.error(f"--threads: expected counts >= 1, got {args.threads}")
    result = run(args)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    for t, r in result["by_threads"].items():
        print(f"threads={t}: apply median {r['apply_s_median']:.3f} s, max {r['apply_s_max']:.3f} s; checksums {r['checksum_s']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
