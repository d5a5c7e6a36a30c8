"""Delta encode and apply throughput on one GPU, beside a plain device copy measured in the same run.

    python bench/delta_codec.py --shape llama-8b --fraction 0.02 --json out.json

For a model's tensors (the shapes of --shape, bf16) it makes a realistic step: fp32 master
weights w (std 0.02; norm weights near 1), base = bf16(w), new = bf16(w - lr * g) with g
standard normal and lr calibrated so that about --fraction of all elements change. Which
elements change then follows a real step: small weights (fine bf16 spacing) change far more
often than large ones, norms almost never. The base lives in one flat buffer (as a trainer's
kept base would), the new tensors are separate allocations (as a trainer's casts are).

Times (median of --iters after a warm-up, synchronised):
  copy         one torch copy_ of the whole payload as one flat buffer (the device copy bound);
  encode       encode_many over all tensors: find changes, choose, build each tensor's delta;
  find         the change finder alone (Triton mark + tally + compact, or torch where it cannot run);
  torch_encode the torch-only encode FACTS.md measured (int16 compare, nonzero, gather), for reference;
  apply        apply_many of every tensor's delta into a copy of its base (batched decode, one scatter);
  apply_update apply_delta tensor by tensor with base_checksum (the checksum updated from the changed words).
GiB/s count the dense payload once, so every figure compares with the copy directly.
Every delta is checked to rebuild the new tensors bit for bit, and the updated checksums to
equal recomputed ones.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time

import torch

from weightsync.dataplane import delta_kernel
from weightsync.dataplane.checksum import tensor_checksum
from weightsync.dataplane.delta import apply_delta, apply_many, encode_many
from weightsync.dataplane.synthetic import MODEL_SHAPES
from weightsync.dataplane.layout import torch_dtype

_GIB = 1 << 30


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, iters: int) -> float:
    fn()
    _sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _master(spec, gen: torch.Generator, device) -> torch.Tensor:
    if len(spec.shape) == 1:
        return 1.0 + 0.02 * torch.randn(spec.shape, generator=gen, device=device)
    return 0.02 * torch.randn(spec.shape, generator=gen, device=device)


def _make_step(specs, fraction: float, device, seed: int):
    """(flat base buffer, base views, new tensors, lr) with about `fraction` of elements changed."""
    gen = torch.Generator(device=device).manual_seed(seed)
    # The changed fraction is close to linear in lr at these sizes: calibrate on the largest
    # matrix, then on the whole model once.
    probe = max((s for s in specs if len(s.shape) == 2), key=lambda s: s.numel)
    w = _master(probe, gen, device)
    lr = 1e-5
    for _ in range(3):
        step = lr * torch.randn(w.shape, generator=gen, device=device)
        got = float(((w.to(torch.bfloat16) != (w - step).to(torch.bfloat16)).sum()) / w.numel())
        lr *= fraction / max(got, 1e-9)
    del w, step
    align = 256
    offsets, pos = [], 0
    for s in specs:
        offsets.append(pos)
        pos += -(-s.nbytes // align) * align
    flat = torch.empty(pos, dtype=torch.uint8, device=device)
    bases, news = [], []
    for s, off in zip(specs, offsets):
        w = _master(s, gen, device)
        view = flat[off : off + s.nbytes].view(torch_dtype(s.dtype)).view(s.shape)
        view.copy_(w)
        bases.append(view)
        news.append((w - lr * torch.randn(w.shape, generator=gen, device=device)).to(torch.bfloat16))
        del w
    return flat, bases, news, lr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(MODEL_SHAPES), default="llama-8b")
    parser.add_argument("--fraction", type=float, default=0.02)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--sweep",
        default="",
        help="kernel settings to time the finder with, comma-separated BLOCK:MARK_WARPS:COMPACT_WARPS[:TALLY_WARPS]",
    )
    parser.add_argument("--probe", action="store_true", help="time the compact kernel with parts left out")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables of one encode and one apply")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu to check the script on a small shape")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    specs = MODEL_SHAPES[args.shape].manifest()
    payload = sum(s.nbytes for s in specs)

    flat, bases, news, lr = _make_step(specs, args.fraction, device, seed=1)
    _sync()
    changed = sum(int((b.view(torch.int16) != n.view(torch.int16)).sum()) for b, n in zip(bases, news))
    numel = sum(s.numel for s in specs)

    dst = torch.empty_like(flat)
    t_copy = _timed(lambda d=dst: d.copy_(flat), args.iters)
    del dst

    deltas = encode_many(bases, news)
    t_encode = _timed(lambda: encode_many(bases, news), args.iters)
    t_find = _timed(lambda: delta_kernel.find_changes(bases, news) or encode_many(bases, news), args.iters)
    ints_b = [b.view(-1).view(torch.int16) for b in bases]
    ints_n = [n.view(-1).view(torch.int16) for n in news]

    sweep = {}
    for item in filter(None, args.sweep.split(",")):
        block, mark_warps, compact_warps, *tally = (int(v) for v in item.split(":"))
        saved = (delta_kernel._BLOCK, delta_kernel._NUM_WARPS, delta_kernel._COMPACT_WARPS, delta_kernel._TALLY_WARPS)
        delta_kernel._NUM_WARPS, delta_kernel._COMPACT_WARPS = mark_warps, compact_warps
        delta_kernel._TALLY_WARPS = tally[0] if tally else saved[3]
        run = lambda: delta_kernel._run(delta_kernel._kernels(), bases, news, interpret=False, block=block)  # noqa: E731
        sweep[item] = _timed(run, args.iters)
        delta_kernel._BLOCK, delta_kernel._NUM_WARPS, delta_kernel._COMPACT_WARPS, delta_kernel._TALLY_WARPS = saved
        print(f"sweep {item}: find {sweep[item] * 1e3:.2f} ms", flush=True)
    if args.probe:
        # The compact kernel's parts: indices only, values only, neither (ranks only).
        for flags in ((True, False), (False, True), (False, False)):
            run = lambda: delta_kernel._run(delta_kernel._kernels(), bases, news, interpret=False, probe=flags)  # noqa: E731
            sweep[f"probe idx={flags[0]} val={flags[1]}"] = t = _timed(run, args.iters)
            print(f"probe store idx {flags[0]} val {flags[1]}: find {t * 1e3:.2f} ms", flush=True)

    def torch_encode():
        for b, n in zip(ints_b, ints_n):
            idx = (b != n).nonzero().squeeze(1)
            _ = idx.to(torch.int32), n[idx]

    t_torch = _timed(torch_encode, max(3, args.iters // 2))

    targets = [b.clone() for b in bases]
    t_apply = _timed(lambda: apply_many(targets, deltas), args.iters)
    exact = all(torch.equal(t.view(torch.int16), n.view(torch.int16)) for t, n in zip(targets, news))
    base_sums = [tensor_checksum(b) for b in bases]
    new_sums = [tensor_checksum(n) for n in news]
    targets = [b.clone() for b in bases]
    updated = [apply_delta(t, d, base_checksum=s) for t, d, s in zip(targets, deltas, base_sums)]
    checksums_ok = updated == new_sums
    t_update = _timed(
        lambda: [apply_delta(t, d, base_checksum=s) for t, d, s in zip(targets, deltas, base_sums)], max(3, args.iters // 2)
    )

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name, fn in (("encode", lambda: encode_many(bases, news)), ("apply", lambda: apply_many(targets, deltas))):
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fn()
                _sync()
            print(f"--- profile: {name}")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=50))

    wire = sum(d.nbytes for d in deltas)
    by_encoding: dict[str, dict[str, int]] = {}
    for d in deltas:
        e = by_encoding.setdefault(d.encoding.value, {"tensors": 0, "wire_bytes": 0, "dense_bytes": 0})
        e["tensors"] += 1
        e["wire_bytes"] += d.nbytes
        e["dense_bytes"] += d.numel * d.values.element_size()
    rate = lambda t: payload / t / _GIB  # noqa: E731
    copy_rate = rate(t_copy)
    rows = {
        "copy": t_copy,
        "encode": t_encode,
        "find": t_find,
        "torch_encode": t_torch,
        "apply": t_apply,
        "apply_update": t_update,
    }
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/delta_codec.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else "none (cpu)",
        "torch": torch.__version__,
        "triton_kernel": delta_kernel.kernel_available(),
        "shape": args.shape,
        "tensors": len(specs),
        "payload_bytes": payload,
        "lr": lr,
        "changed_fraction": changed / numel,
        "wire_bytes": wire,
        "wire_fraction_of_dense": wire / payload,
        "by_encoding": by_encoding,
        "exact": exact,
        "checksum_update_equals_recompute": checksums_ok,
        "seconds": rows,
        "sweep_find_seconds": sweep,
        "gib_per_s": {k: rate(v) for k, v in rows.items()},
        "x_device_copy": {k: rate(v) / copy_rate for k, v in rows.items()},
    }
    print(json.dumps(result, indent=2))
    print(f"{'step':14s} {'ms':>9s} {'GiB/s':>9s} {'x copy':>7s}")
    for k, v in rows.items():
        print(f"{k:14s} {v * 1e3:9.2f} {rate(v):9.1f} {rate(v) / copy_rate:7.3f}")
    print(f"changed {changed / numel:.4f}  wire {wire / payload:.4f} of dense  exact {exact}  checksums {checksums_ok}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if exact and checksums_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
