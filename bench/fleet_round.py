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

Today's data path has one sender: trainer rank 0 sends everything. --trainer-ranks above
1 is refused until the many-senders work lands. --relay says how its dense gloo rounds travel:
`chain` or `tree` (dataplane/relay.py: pipelined point-to-point relays, every byte leaves the
trainer once along the chain), `gloo` (gloo's own broadcast), or `auto` (the data plane's rule).
"""

from __future__ import annotations

import argparse
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
from weightsync.dataplane.groups import RELAY_ENV  # noqa: E402

# --relay -> the trainer's GroupCache relay mode (read from RELAY_ENV by every process the fleet starts).
_RELAY_MODES = {"chain": "chain", "tree": "tree", "gloo": "broadcast", "auto": "auto"}


def _delta(before: dict, after: dict) -> dict:
    return {h: {k: after[h][k] - before[h][k] for k in after[h]} for h in after}


def run(args: argparse.Namespace) -> dict:
    os.environ[RELAY_ENV] = _RELAY_MODES[args.relay]
    spec = FleetSpec(
        num_engines=args.engines,
        tp=args.tp,
        model_mib=args.model_mib,
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
            rounds.append({"version": version, "achieved_s": answer["push_s"], "wire_bytes_per_host": _delta(before, after)})
        last = rounds[-1]["version"]
        not_held = [h for h in fleet.daemons if not fleet.holds(h, last)]
        if not_held:
            raise SystemExit(f"fleet_round: engines {not_held} do not hold version {last} after it committed")
        manifest = fleet.manifest
        prefix = fleet.prefix
    measured = rounds[1:]  # the first round formed the group
    median = sorted(measured, key=lambda r: r["achieved_s"])[len(measured) // 2]
    bucket = args.bucket_size_bytes or default_bucket_size("gloo")
    needed = plan_bytes(manifest, bucket)
    bound = round_bound(
        needed_bytes={h: needed for h in spec.engine_hosts},
        ingress_mbit={h: args.link_mbit for h in spec.engine_hosts},
        sender_egress_mbit=[args.link_mbit] * args.trainer_ranks,
    )
    achieved = median["achieved_s"]
    return {
        "achieved_s": achieved,
        **bound.to_dict(),
        "ratio": bound.speed_of_light_s / achieved,
        "ratio_to_gloo_bound": bound.gloo_bound_s / achieved,
        "ratio_to_gloo_model": bound.gloo_model_s / achieved,
        "wire_bytes_per_host": median["wire_bytes_per_host"],
        "needed_bytes_per_receiver": needed,
        "hosts": 1 + len(spec.engine_hosts),
        "trainer_ranks": args.trainer_ranks,
        "engines": args.engines,
        "tp": args.tp,
        "link_mbit": args.link_mbit,
        "model_mib": args.model_mib,
        "bucket_size_bytes": bucket,
        "transport": "gloo",
        "relay": args.relay,
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
    p.add_argument("--trainer-ranks", type=int, default=1, help="S: sender ranks (today only 1)")
    p.add_argument("--engines", type=int, required=True, help="M: engines")
    p.add_argument("--tp", type=int, default=1, help="T: receiver ranks per engine, each on its own host")
    p.add_argument("--link-mbit", type=float, required=True, help="R: every link's rate, each direction, Mbit/s")
    p.add_argument("--model-mib", type=float, required=True, help="B: model size in MiB (bf16, 1 MiB tensors)")
    p.add_argument("--json", required=True, help="write the result here")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds after the warm-up round")
    p.add_argument("--bucket-size-bytes", type=int, default=0, help="0: the gloo default")
    p.add_argument("--timeout-s", type=float, default=300.0, help="round deadline and collective timeout")
    p.add_argument(
        "--relay", choices=sorted(_RELAY_MODES), default="auto",
        help="how dense gloo rounds travel: a pipelined chain or tree relay, gloo's broadcast, or the data plane's rule",
    )
    args = p.parse_args(argv)
    if args.trainer_ranks != 1:
        p.error(
            f"--trainer-ranks {args.trainer_ranks}: today's data path has exactly one sender (trainer rank 0 "
            "broadcasts every tensor); more sender ranks need the many-senders issue. Use --trainer-ranks 1."
        )
    for name in ("engines", "tp", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name}: expected >= 1, got {getattr(args, name)}")
    if os.geteuid() != 0:
        p.error("an emulated fleet needs root (network namespaces, veth links, tc)")
    result = run(args)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"relay={args.relay} hosts={result['hosts']} link={args.link_mbit:g}Mbit model={args.model_mib:g}MiB "
        f"achieved={result['achieved_s']:.3f}s speed_of_light={result['speed_of_light_s']:.3f}s "
        f"ratio={result['ratio']:.3f} gloo_bound={result['gloo_bound_s']:.3f}s gloo_model={result['gloo_model_s']:.3f}s "
        f"trainer_tx={result['wire_bytes_per_host']['t0']['tx_bytes']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
