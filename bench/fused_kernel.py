"""Throughput of the fused copy-and-checksum kernel beside a plain device copy, on one GPU.

    python bench/fused_kernel.py --shape llama-8b --json out.json

For a model's tensors (the shapes of --shape, random bytes), times in one process:
  copy            one torch copy_ of the whole payload as one flat buffer (the device copy bound);
  copy_per_tensor torch copy_ tensor by tensor;
  fused_copy      copy_and_checksum over all tensors with destinations (one launch);
  fused_checksum  copy_and_checksum with no destinations (read only);
  torch_checksum  checksum_views, the torch-op checksum the GPU paths used before.
GiB/s count the payload once; each figure is the median of --iters after a warm-up.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time

import torch

from weightsync.dataplane import fused
from weightsync.dataplane.checksum import bytes_checksum, checksum_views
from weightsync.dataplane.synthetic import MODEL_SHAPES


def _timed(fn, iters: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(MODEL_SHAPES), default="llama-8b")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--sweep",
        default="",
        help="kernel settings to compare, comma-separated WEIGHTS:BLOCK_WORDS:NUM_WARPS with WEIGHTS table or computed",
    )
    args = parser.parse_args(argv)
    device = torch.device("cuda", 0)
    specs = MODEL_SHAPES[args.shape].manifest()
    sizes = [s.nbytes for s in specs]
    payload = sum(sizes)
    align = 256
    offsets, pos = [], 0
    for n in sizes:
        offsets.append(pos)
        pos += -(-n // align) * align
    src = torch.empty(pos, dtype=torch.uint8, device=device).random_(0, 256)
    dst = torch.empty(pos, dtype=torch.uint8, device=device)
    srcs = [src[o : o + n] for o, n in zip(offsets, sizes)]
    dsts = [dst[o : o + n] for o, n in zip(offsets, sizes)]
    spans = list(zip(offsets, sizes))

    # Correctness first: the fused result equals the torch path, and the copy is exact.
    dst.zero_()
    got = fused.copy_and_checksum(srcs, dsts).result()
    want = checksum_views(src, spans)
    assert got == want, "fused checksums differ from checksum_views"
    assert torch.equal(src, dst), "fused copy is not exact"
    assert got[0] == bytes_checksum(srcs[0].cpu())

    gib = payload / 2**30
    results = {
        "copy": _timed(lambda: dst.copy_(src), args.iters),
        "copy_per_tensor": _timed(lambda: [d.copy_(s) for s, d in zip(srcs, dsts)], args.iters),
        "fused_copy": _timed(lambda: fused.copy_and_checksum(srcs, dsts).result(), args.iters),
        "fused_checksum": _timed(lambda: fused.copy_and_checksum(srcs).result(), args.iters),
        "torch_checksum": _timed(lambda: checksum_views(src, spans), max(3, args.iters // 3)),
    }
    for setting in [x for x in args.sweep.split(",") if x]:
        weights, words, warps = setting.split(":")
        fused._WEIGHTS_FROM_TABLE = weights == "table"
        fused._BLOCK_WORDS, fused._NUM_WARPS = int(words), int(warps)
        fused._tables.clear()
        assert fused.copy_and_checksum(srcs, dsts).result() == want, setting
        results[f"fused_copy_{setting}"] = _timed(lambda: fused.copy_and_checksum(srcs, dsts).result(), args.iters)
        results[f"fused_checksum_{setting}"] = _timed(lambda: fused.copy_and_checksum(srcs).result(), args.iters)
    report = {
        "shape": args.shape,
        "tensors": len(sizes),
        "payload_bytes": payload,
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "gib_s": {k: gib / v for k, v in results.items()},
        "ratio_to_copy": {k: results["copy"] / v for k, v in results.items()},
    }
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
