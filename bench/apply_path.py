"""Throughput of the steps weightsync owns on an engine's device: pack, checksum, copy-out.

vLLM is not available on the GPU machine, so this measures what weightsync adds around
vLLM's own loader: packing a model into plan buckets (cast + copy, the sender's work),
checksumming received buckets (the receiver's verification), and copying bucket views
into destination tensors (the staged apply's copy). Each is reported beside one plain
device-to-device copy of the same bytes, measured in the same run.

    python bench/apply_path.py --device cuda --shape qwen2.5-1.5b --json out.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from weightsync.core import BucketPlan  # noqa: E402
from weightsync.dataplane.checksum import checksum_views  # noqa: E402
from weightsync.dataplane.layout import entry_spans, entry_view, torch_dtype  # noqa: E402
from weightsync.dataplane.synthetic import MODEL_SHAPES  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, iters: int) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", default="qwen2.5-1.5b", choices=sorted(MODEL_SHAPES))
    ap.add_argument("--bucket-size-bytes", type=int, default=256 << 20)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    device = torch.device(args.device)
    specs = MODEL_SHAPES[args.shape].manifest("bfloat16")
    plan = BucketPlan.build(specs, args.bucket_size_bytes)
    g = torch.Generator(device="cpu").manual_seed(0)
    # The trainer's tensors in float32 (a cast is part of packing), the engine's in bf16.
    src = {s.name: torch.randn(s.shape, generator=g).to(device) for s in specs}
    dst = {s.name: torch.empty(s.shape, dtype=torch_dtype(s.dtype), device=device) for s in specs}
    buffers = [torch.empty(b.size_bytes, dtype=torch.uint8, device=device) for b in plan.buckets]
    payload = plan.payload_bytes
    flat_src = torch.empty(payload, dtype=torch.uint8, device=device)
    flat_dst = torch.empty(payload, dtype=torch.uint8, device=device)

    def pack():
        for buf, bucket in zip(buffers, plan.buckets):
            for e in bucket.entries:
                entry_view(buf, e).copy_(src[e.name])

    def checksum():
        for buf, bucket in zip(buffers, plan.buckets):
            checksum_views(buf, entry_spans(bucket))

    def copy_out():
        for buf, bucket in zip(buffers, plan.buckets):
            for e in bucket.entries:
                dst[e.name].copy_(entry_view(buf, e))

    def raw_copy():
        flat_dst.copy_(flat_src)

    results = {name: _time(fn, device, args.iters) for name, fn in
               (("raw_copy", raw_copy), ("pack", pack), ("checksum", checksum), ("copy_out", copy_out))}
    gib = payload / 2**30
    out = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "date": dt.date.today().isoformat(),
        "shape": args.shape,
        "payload_gib": round(gib, 3),
        "tensors": plan.num_tensors,
        "buckets": len(plan.buckets),
        "bucket_size_bytes": args.bucket_size_bytes,
        **{f"{k}_gib_s": round(gib / v, 1) for k, v in results.items()},
        **{f"{k}_vs_raw_copy": round(results["raw_copy"] / v, 3) for k, v in results.items() if k != "raw_copy"},
        "command": " ".join(sys.argv),
    }
    text = json.dumps(out, indent=2)
    print(text)
    Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
