"""A stand-in RL trainer: N rounds of "train, then `weightsync push`", each one checked.

Round r perturbs the tiny model's weights (seeded, so every run is the same),
writes them to a safetensors file and runs `weightsync push --version r`. The
job exits 0 only if, for every round,
  - `weightsync push` exited 0,
  - the coordinator reports the round COMMITTED with an OK result (checksums
    matched) from every expected daemon,
and, after the last round,
  - every expected daemon serves the last version and is neither dirty nor stale,
  - every engine answers a completion as the last version (x-weightsync-version),
    and its greedy logprobs changed from before round 1 and agree across
    engines (the bytes really reached the models, not just the daemons).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import torch
from safetensors.torch import load_file, save_file

from weightsync.v1 import weightsync_pb2 as pb
from weightsync.v1 import weightsync_pb2_grpc as pb_grpc

log = logging.getLogger("train_loop")

RPC_TIMEOUT_S = 10.0
HTTP_TIMEOUT_S = 60.0
PROMPT = "the quick brown fox"
# Logprobs of two engines holding the same weights agree to float32 rounding.
LOGPROB_TOLERANCE = 1e-3


class CheckFailed(Exception):
    pass


def _parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--coordinator", required=True, help="HOST:PORT of the coordinator")
    p.add_argument("--model-dir", required=True, help="directory holding the served model's model.safetensors")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--first-version", type=int, default=1)
    p.add_argument("--daemon-ids", required=True, help="comma-separated daemons that must take part in every round")
    p.add_argument("--engine-urls", default="", help="comma-separated OpenAI base URLs (http://host:8000) to probe; empty: skip")
    p.add_argument("--step-std", type=float, default=0.02, help="std of the per-round weight perturbation")
    p.add_argument("--work-dir", default="/tmp/train_loop")
    p.add_argument("--push-timeout-s", type=float, default=600.0)
    p.add_argument("--push-args", default="", help="extra arguments for `weightsync push`, shell-quoted")
    args = p.parse_args(argv)
    if args.rounds < 1:
        raise SystemExit(f"--rounds {args.rounds}: expected >= 1")
    args.daemon_ids = [d for d in args.daemon_ids.split(",") if d]
    args.engine_urls = [u.rstrip("/") for u in args.engine_urls.split(",") if u]
    return args


def _train_step(weights: dict[str, torch.Tensor], version: int, std: float) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + version)
    return {
        name: (t.float() + std * torch.randn(t.shape, generator=generator)).to(t.dtype).contiguous()
        for name, t in weights.items()
    }


def _push(args: argparse.Namespace, weights_path: Path, version: int) -> None:
    cmd = [
        "weightsync", "push",
        "--coordinator", args.coordinator,
        "--weights", str(weights_path),
        "--version", str(version),
        *shlex.split(args.push_args),
    ]
    log.info("round %d: %s", version, shlex.join(cmd))
    start_s = time.monotonic()
    proc = subprocess.run(cmd, timeout=args.push_timeout_s)
    if proc.returncode != 0:
        raise CheckFailed(f"round {version}: `weightsync push` exited {proc.returncode}: expected 0")
    log.info("round %d: push returned after %.2f s", version, time.monotonic() - start_s)


def _check_round(inspect: pb_grpc.InspectionServiceStub, version: int, daemon_ids: list[str]) -> None:
    rounds = inspect.ListRounds(pb.ListRoundsRequest(limit=50), timeout=RPC_TIMEOUT_S).rounds
    mine = [r for r in rounds if r.version == version]
    if not mine:
        raise CheckFailed(f"round {version}: the coordinator lists no round for it (versions: {[r.version for r in rounds]})")
    committed = [r for r in mine if r.state == pb.ROUND_STATE_COMMITTED]
    if not committed:
        states = [pb.RoundState.Name(r.state) + (f" ({r.reason})" if r.reason else "") for r in mine]
        raise CheckFailed(f"round {version}: states {states}: expected ROUND_STATE_COMMITTED")
    info = committed[-1]
    results = {r.daemon_id: r for r in info.results}
    for daemon_id in daemon_ids:
        result = results.get(daemon_id)
        if result is None:
            raise CheckFailed(f"round {version} ({info.update_id}): no result from {daemon_id}: got {sorted(results)}")
        if result.status != pb.RESULT_STATUS_OK:
            raise CheckFailed(
                f"round {version} ({info.update_id}): {daemon_id} {pb.ResultStatus.Name(result.status)} "
                f"{result.reason!r} mismatched={list(result.mismatched_tensors)}: expected RESULT_STATUS_OK"
            )
    log.info(
        "round %d: %s COMMITTED, %d tensors, %d bytes, %.2f s, results %s",
        version, info.update_id, info.num_tensors, info.total_bytes, info.duration_s,
        {d: (pb.ResultStatus.Name(r.status), round(r.receive_s, 3), round(r.apply_s, 3)) for d, r in results.items()},
    )


def _check_daemons(inspect: pb_grpc.InspectionServiceStub, version: int, daemon_ids: list[str]) -> None:
    reply = inspect.ListDaemons(pb.ListDaemonsRequest(), timeout=RPC_TIMEOUT_S)
    if reply.committed_version != version:
        raise CheckFailed(f"committed_version {reply.committed_version}: expected {version}")
    daemons = {d.daemon_id: d for d in reply.daemons}
    for daemon_id in daemon_ids:
        d = daemons.get(daemon_id)
        if d is None:
            raise CheckFailed(f"daemon {daemon_id} not listed: got {sorted(daemons)}")
        if d.served_version != version or d.dirty or d.stale:
            raise CheckFailed(
                f"daemon {daemon_id}: served_version {d.served_version} dirty={d.dirty} stale={d.stale}: "
                f"expected served_version {version}, clean"
            )
    log.info("all of %s serve version %d", daemon_ids, version)


def _logprobs(url: str, version: int | None = None) -> list[float]:
    """Greedy completion logprobs: they move with any change of the weights.

    With `version`, the response must also say (x-weightsync-version) that it
    was served by that version.
    """
    with urllib.request.urlopen(f"{url}/v1/models", timeout=HTTP_TIMEOUT_S) as reply:
        model = json.load(reply)["data"][0]["id"]
    body = json.dumps(
        {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0.0, "logprobs": 1}
    ).encode()
    request = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as reply:
        served = reply.headers.get("x-weightsync-version")
        choice = json.load(reply)["choices"][0]
    if version is not None and served != str(version):
        raise CheckFailed(f"{url}: completion served by version {served!r} (x-weightsync-version): expected {version}")
    return [float(x) for x in choice["logprobs"]["token_logprobs"]]


def run(args: argparse.Namespace) -> None:
    base = load_file(str(Path(args.model_dir) / "model.safetensors"))
    log.info("loaded %d tensors (%d bytes) from %s", len(base), sum(t.nbytes for t in base.values()), args.model_dir)
    before = {url: _logprobs(url) for url in args.engine_urls}
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    last_version = args.first_version + args.rounds - 1
    with grpc.insecure_channel(args.coordinator) as channel:
        inspect = pb_grpc.InspectionServiceStub(channel)
        weights = base
        for version in range(args.first_version, last_version + 1):
            weights = _train_step(weights, version, args.step_std)
            path = work_dir / f"v{version}.safetensors"
            save_file(weights, str(path))
            _push(args, path, version)
            _check_round(inspect, version, args.daemon_ids)
            path.unlink()
        _check_daemons(inspect, last_version, args.daemon_ids)
    after = {url: _logprobs(url, last_version) for url in args.engine_urls}
    for url in args.engine_urls:
        log.info("%s logprobs before %s after %s", url, before[url], after[url])
        if before[url] == after[url]:
            raise CheckFailed(f"{url}: logprobs unchanged after {args.rounds} rounds: the engine still runs the old weights")
    reference_url = args.engine_urls[0] if args.engine_urls else None
    for url in args.engine_urls[1:]:
        a, b = after[reference_url], after[url]
        if len(a) != len(b) or any(abs(x - y) > LOGPROB_TOLERANCE for x, y in zip(a, b)):
            raise CheckFailed(f"engines disagree after version {last_version}: {reference_url} {a} vs {url} {b}")


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = _parse_args(argv)
    start_s = time.monotonic()
    try:
        run(args)
    except CheckFailed as e:
        log.error("FAILED: %s", e)
        return 1
    log.info("PASSED: %d rounds committed and verified in %.1f s", args.rounds, time.monotonic() - start_s)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
