"""One weightsync round on an emulated fleet, against its speed of light.

    python bench/fleet_round.py --trainer-ranks S --engines M --tp T --link-mbit R --model-mib B --json OUT

Every rank gets its own emulated host and link (bench/fleet: a network namespace, a veth pair
limited by htb to R Mbit/s each way, one bridge): trainer rank 0 on `t0`, each engine rank on
`e{m}` (`e{m}r{t}` with T > 1: a TP engine's T receiver ranks, one memory daemon each, each on its
own host), the coordinator on `coord` (same link; it is not counted among the hosts). Needs root.

A warm-up round forms the data-plane group; then --rounds measured rounds. For each:
  achieved_s            the trainer's push: BeginUpdate until the coordinator's verdict
  speed_of_light_s      max(busiest receiver's needed bytes / its ingress, bytes the senders must
                        emit / their egress), with the design's minimum for the senders: one copy
                        of what is needed (bench/fleet/light.py)
  ratio                 speed_of_light_s / achieved_s
  wire_bytes_per_host   rx/tx bytes of each host's interface over the round, read from
                        /sys/class/net/IF/statistics inside its namespace
Top-level figures are those of the median round. Also reported: gloo_bound_s (gloo's binomial
broadcast: the root's link carries ceil(log2 N) copies), gloo_model_s (that tree as gloo runs
it, sends sharing links fairly: a prediction) and star_bound_s (one copy per receiver).

--trainer-ranks 1 is today's round: trainer rank 0 broadcasts everything. Above 1 the round is
routed (dataplane/routed.py): trainer ranks t0..t{S-1} each hold a dim-0 chunk of every tensor
(FSDP2's layout, as DTensors) and send their pieces point to point; with --tp T each engine rank
declares rank t's needs (block t of dim 0), so it receives ~1/T of the model. The bound then
takes each receiver's needed bytes from the routing plan and the union of needed bytes, once,
over the S senders' links.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fleet.fleet import EmulatedFleet, FleetSpec  # noqa: E402
from bench.fleet.light import plan_bytes, round_bound  # noqa: E402
from bench.fleet.net import LinkSpec  # noqa: E402
from weightsync.core import default_bucket_size  # noqa: E402
from weightsync.core.regions import Region  # noqa: E402
from weightsync.core.routing import plan_routes  # noqa: E402
from weightsync.dataplane.memory_engine import tp_needs  # noqa: E402


def _routed_needs(manifest, spec: FleetSpec, bucket: int) -> tuple[dict[str, int], int]:
    """(needed bytes per engine host, distinct needed bytes) from the routing plan the coordinator builds."""
    holds = {}
    for r in range(spec.trainer_ranks):
        per = {}
        for s in manifest:
            chunk = -(-s.shape[0] // spec.trainer_ranks)
            lo, hi = min(r * chunk, s.shape[0]), min((r + 1) * chunk, s.shape[0])
            if hi > lo:
                per[s.name] = Region(0, lo, hi - lo)
        holds[r] = per
    per_rank = tp_needs(manifest, spec.tp)
    hosts = spec.engine_hosts
    needs = {spec.trainer_ranks + i: (per_rank[i % spec.tp] if spec.tp > 1 else None) for i in range(len(hosts))}
    plan = plan_routes(manifest, holds, needs, bucket)
    got = plan.bytes_received()
    return {h: got[spec.trainer_ranks + i] for i, h in enumerate(hosts)}, sum(p.nbytes for p in plan.pieces)


def _delta(before: dict, after: dict) -> dict:
    return {h: {k: after[h][k] - before[h][k] for k in after[h]} for h in after}


def run(args: argparse.Namespace) -> dict:
    spec = FleetSpec(
        num_engines=args.engines,
        tp=args.tp,
        model_mib=args.model_mib,
        trainer_ranks=args.trainer_ranks,
        link=LinkSpec.symmetric(args.link_mbit),
        bucket_size_bytes=args.bucket_size_bytes,
        collective_timeout_s=args.timeout_s,
        deadline_s=args.timeout_s,
    )
    t_start = time.monotonic()
    with EmulatedFleet(spec) as fleet:
        fleet.install_signal_handlers()
        fleet.wait_daemons()
        setup_s = time.monotonic() - t_start
        rounds = []
        for version in range(1, 2 + args.rounds):
            before = fleet.counters()
            answer = fleet.push(version, timeout_s=args.timeout_s + 60)
            after = fleet.counters()
            if answer.get("state") != "COMMITTED":
                raise SystemExit(f"fleet_round: round {version} did not commit: {answer}; logs in {fleet.logs}")
            rounds.append({
                "version": version, "achieved_s": answer["push_s"], "wire_bytes_per_host": _delta(before, after),
                "rank_bytes": answer.get("rank_bytes", {}),
            })
        last = rounds[-1]["version"]
        not_held = [h for h in fleet.daemons if not fleet.holds(h, last)]
        if not_held:
            raise SystemExit(f"fleet_round: engines {not_held} do not hold version {last} after it committed")
        manifest = fleet.manifest
        prefix = fleet.prefix
    measured = rounds[1:]  # the first round formed the group
    median = sorted(measured, key=lambda r: r["achieved_s"])[len(measured) // 2]
    bucket = args.bucket_size_bytes or default_bucket_size("gloo")
    if spec.routed:
        needed_per_host, distinct = _routed_needs(manifest, spec, bucket)
        needed = max(needed_per_host.values())
    else:
        needed = plan_bytes(manifest, bucket)
        needed_per_host, distinct = {h: needed for h in spec.engine_hosts}, needed
    bound = round_bound(
        needed_bytes=needed_per_host,
        ingress_mbit={h: args.link_mbit for h in spec.engine_hosts},
        sender_egress_mbit=[args.link_mbit] * args.trainer_ranks,
    )
    if spec.routed:
        # Every distinct needed byte leaves the senders once (light.py takes one receiver's need as the union).
        bound = dataclasses.replace(bound, sender_bound_s=distinct * 8 / (args.link_mbit * 1e6 * args.trainer_ranks))
    achieved = median["achieved_s"]
    return {
        "achieved_s": achieved,
        **bound.to_dict(),
        "ratio": bound.speed_of_light_s / achieved,
        "ratio_to_gloo_bound": bound.gloo_bound_s / achieved,
        "ratio_to_gloo_model": bound.gloo_model_s / achieved,
        "wire_bytes_per_host": median["wire_bytes_per_host"],
        "needed_bytes_per_receiver": needed,
        "hosts": args.trainer_ranks + len(spec.engine_hosts),
        "routed": spec.routed,
        "needed_bytes_per_host": needed_per_host,
        "rank_bytes": median["rank_bytes"],
        "trainer_ranks": args.trainer_ranks,
        "engines": args.engines,
        "tp": args.tp,
        "link_mbit": args.link_mbit,
        "model_mib": args.model_mib,
        "bucket_size_bytes": bucket,
        "transport": "gloo",
        "rounds": measured,
        "warmup_round": rounds[0],
        "achieved_s_all": [r["achieved_s"] for r in measured],
        "achieved_s_stdev": statistics.pstdev(r["achieved_s"] for r in measured),
        "setup_s": setup_s,
        "prefix": prefix,
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trainer-ranks", type=int, default=1, help="S: sender ranks, each on its own host (above 1: routed rounds)")
    p.add_argument("--engines", type=int, required=True, help="M: engines")
    p.add_argument("--tp", type=int, default=1, help="T: receiver ranks per engine, each on its own host")
    p.add_argument("--link-mbit", type=float, required=True, help="R: every link's rate, each direction, Mbit/s")
    p.add_argument("--model-mib", type=float, required=True, help="B: model size in MiB (bf16, 1 MiB tensors)")
    p.add_argument("--json", required=True, help="write the result here")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds after the warm-up round")
    p.add_argument("--bucket-size-bytes", type=int, default=0, help="0: the gloo default")
    p.add_argument("--timeout-s", type=float, default=300.0, help="round deadline and collective timeout")
    args = p.parse_args(argv)
    for name in ("trainer_ranks", "engines", "tp", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    if os.geteuid() != 0:
        p.error("an emulated fleet needs root (network namespaces, veth links, tc)")
    result = run(args)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"hosts={result['hosts']} link={args.link_mbit:g}Mbit model={args.model_mib:g}MiB "
        f"achieved={result['achieved_s']:.3f}s speed_of_light={result['speed_of_light_s']:.3f}s "
        f"ratio={result['ratio']:.3f} gloo_bound={result['gloo_bound_s']:.3f}s gloo_model={result['gloo_model_s']:.3f}s "
        f"trainer_tx={result['wire_bytes_per_host']['t0']['tx_bytes']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
