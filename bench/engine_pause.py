"""How long a vLLM engine stops generating during a round, beside the round's total time (CPU).

A real AsyncLLM engine (in-flight policy "keep": requests are frozen, then continue) streams a long request while a trainer thread sends rounds over
the gloo data plane; the engine applies each round between engine steps. Reported per
staging mode: the engine's own paused time (`ApplyReport.paused_s`), the longest gap
between two tokens seen by the streaming client during the round, and the round's total.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 python bench/engine_pause.py --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from weightsync.core import Assignment, BucketPlan, Participant, Rendezvous  # noqa: E402
from weightsync.dataplane import GroupCache, TrainerStore, send_assignment  # noqa: E402


async def _run(args) -> dict:
    from vllm import SamplingParams

    from weightsync.engine import VllmEngine, VllmEngineConfig, make_tiny_model, random_weights

    work = Path(tempfile.mkdtemp(prefix="ws-pause-"))
    model_dir = make_tiny_model(work / "model", args.arch, seed=0, dtype="float32")
    engine = await VllmEngine.create(VllmEngineConfig(model=str(model_dir), mode="async", dtype="float32", max_model_len=512,
                                                      kv_cache_memory_bytes=64 << 20, initial_version=0,
                                                      inflight_policy="keep"))
    store = TrainerStore("127.0.0.1")
    groups = GroupCache(trainer_store=store)
    specs = engine.inventory()
    results = []
    try:
        for staging in ("staged", "stream"):
            for r in range(args.rounds):
                version = len(results) + 1
                weights = random_weights(specs, seed=version)
                plan = BucketPlan.build(specs, args.bucket_size_bytes)
                a = Assignment(f"pause-{version}", version, Rendezvous("gloo", "127.0.0.1", store.port, 2, "pause", 30.0),
                               (Participant("engine", (1,)),), plan, 60.0)
                gaps: list[float] = []
                stop = asyncio.Event()

                async def stream():
                    params = SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True)
                    last = time.perf_counter()
                    async for _ in engine.stream({"prompt_token_ids": [5, 6, 7]}, params):
                        now = time.perf_counter()
                        gaps.append(now - last)
                        last = now
                        if stop.is_set():
                            break

                streamer = asyncio.create_task(stream())
                await asyncio.sleep(0.5)  # the request is generating
                mark = len(gaps)
                sent = {}
                t = threading.Thread(target=lambda: sent.update(r=send_assignment(a, weights, groups.get(a, 0))))
                t0 = time.perf_counter()
                t.start()
                report = await engine.apply_assignment(a, [1], staging=staging)
                total = time.perf_counter() - t0
                t.join()
                await asyncio.sleep(0.2)
                stop.set()
                await streamer
                during = gaps[mark:]
                results.append({"staging": staging, "paused_s": report.paused_s, "round_s": total,
                                "max_token_gap_s": max(during) if during else None,
                                "median_token_gap_s": statistics.median(gaps) if gaps else None,
                                "checksums_match": report.checksums == sent["r"].checksums})
    finally:
        groups.close()
        store.close()
        await engine.close()

    def summary(mode):
        rows = [x for x in results if x["staging"] == mode]
        return {
            "rounds": len(rows),
            "paused_ms_median": round(1000 * statistics.median(x["paused_s"] for x in rows), 2),
            "round_ms_median": round(1000 * statistics.median(x["round_s"] for x in rows), 2),
            "max_token_gap_ms_median": round(1000 * statistics.median(x["max_token_gap_s"] for x in rows), 2),
            "normal_token_gap_ms": round(1000 * statistics.median(x["median_token_gap_s"] for x in rows), 2),
            "all_checksums_match": all(x["checksums_match"] for x in rows),
        }

    return {
        "model": f"tiny {args.arch} (hidden 128, 2 layers, float32, {sum(s.nbytes for s in specs) / 2**20:.2f} MiB)",
        "hardware": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": dt.date.today().isoformat(),
        "command": " ".join(sys.argv),
        "staged": summary("staged"),
        "stream": summary("stream"),
        "per_round": results,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="qwen2", choices=["qwen2", "llama"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--bucket-size-bytes", type=int, default=256 << 10)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    out = asyncio.run(_run(args))
    text = json.dumps(out, indent=2)
    print(text)
    Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
