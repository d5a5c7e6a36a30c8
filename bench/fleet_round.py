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

With --delta FRACTION, each measured step is a new version with about FRACTION of its elements
changed (bench/fleet/step.py: per tensor a fraction drawn around FRACTION, positions scattered,
one ulp each), pushed as a delta round against the committed base and then, as the next
version with the same bytes, as a dense round. The top-level figures are the dense rounds'; the
`delta` section has the same figures for the delta rounds (speed of light over the delta
payload each receiver took in, bench/fleet/light.py), and `delta_vs_dense` the ratios of the
median rounds: time, wire bytes (all hosts' tx, receivers' rx, the trainer's tx) and the
trainer link's share of the delta round (the trainer's tx bytes through its link / the round time).

--trainer-ranks 1 is a single-sender round: trainer rank 0 sends everything. --relay says how
its dense gloo rounds (and a delta round's payload) travel: `chain` or `tree`
(dataplane/relay.py: pipelined point-to-point relays, every byte leaves the trainer once along
the chain), `gloo` (gloo's own broadcast), or `auto` (the data plane's rule). Above 1 the round
is routed (dataplane/routed.py): trainer ranks t0..t{S-1} each hold a dim-0 chunk of every
tensor (FSDP2's layout, as DTensors) and send each piece once, relayed along a chain of the
receivers that need it; with --tp T each engine rank declares rank t's needs (block t of dim 0),
so it receives ~1/T of the model (also with S = 1: the coordinator routes rank 0's round by the
needs). --dense is today's round for the same hosts (no needs declared, every rank takes the
whole model from trainer rank 0): the baseline. The bound then takes each receiver's needed
bytes from the routing plan and the union of needed bytes, once, over the S senders' links.
With --delta too (or --tp above 1 from one rank) the delta round is a routed delta round
(dataplane/routed_delta.py): each trainer rank encodes the pieces it sends against its own part
of the base.
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
from safetensors.torch import load_file  # noqa: E402

from bench.fleet.light import delta_round_bound, plan_bytes, round_bound  # noqa: E402
from bench.fleet.net import LinkSpec  # noqa: E402
from bench.fleet.step import changed_fraction  # noqa: E402
from weightsync.core import default_bucket_size  # noqa: E402
from weightsync.core.regions import Region  # noqa: E402
from weightsync.core.routing import plan_routes  # noqa: E402
from weightsync.dataplane.delta import encode_many  # noqa: E402
from weightsync.dataplane.groups import RELAY_ENV  # noqa: E402
from weightsync.dataplane.memory_engine import tp_needs  # noqa: E402

# --relay -> the trainer's GroupCache relay mode (read from RELAY_ENV by every process the fleet starts).
_RELAY_MODES = {"chain": "chain", "tree": "tree", "gloo": "broadcast", "auto": "auto"}


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


def _counters_delta(before: dict, after: dict) -> dict:
    return {h: {k: after[h][k] - before[h][k] for k in after[h]} for h in after}


def _push(fleet: EmulatedFleet, version: int, timeout_s: float, base_version: int | None = None) -> dict:
    """One committed round, with every host's interface counters over it; exits naming the logs otherwise."""
    before = fleet.counters()
    answer = fleet.push(version, timeout_s=timeout_s, base_version=base_version)
    after = fleet.counters()
    if answer.get("state") != "COMMITTED":
        raise SystemExit(f"fleet_round: round {version} did not commit: {answer}; logs in {fleet.logs}")
    return {
        "version": version,
        "achieved_s": answer["push_s"],
        "wire_bytes_per_host": _counters_delta(before, after),
        "encodings": answer.get("encodings", {}),
        "bytes_received": answer.get("bytes_received", {}),
        "receive_s": answer.get("receive_s", {}),
        "apply_s": answer.get("apply_s", {}),
        "receiver_timeline": answer.get("timeline", {}),
        "sender_timeline": answer.get("sender_timeline", {}),
        "rank_bytes": answer.get("rank_bytes", {}),
    }


def _median(rounds: list[dict]) -> dict:
    return sorted(rounds, key=lambda r: r["achieved_s"])[len(rounds) // 2]


def _summary(rounds: list[dict], bound) -> dict:
    """The median round's figures against `bound`, with every round's time."""
    median = _median(rounds)
    achieved = median["achieved_s"]
    return {
        "achieved_s": achieved,
        **bound.to_dict(),
        "ratio": bound.speed_of_light_s / achieved,
        "ratio_to_gloo_bound": bound.gloo_bound_s / achieved,
        "ratio_to_gloo_model": bound.gloo_model_s / achieved,
        "wire_bytes_per_host": median["wire_bytes_per_host"],
        "sender_timeline": median["sender_timeline"],
        "receiver_apply_s_max": max(median["apply_s"].values(), default=0.0),
        "rounds": rounds,
        "achieved_s_all": [r["achieved_s"] for r in rounds],
        "achieved_s_stdev": statistics.pstdev(r["achieved_s"] for r in rounds),
    }


def _delta_steps(fleet: EmulatedFleet, args: argparse.Namespace, first_version: int) -> tuple[list[dict], list[dict], dict]:
    """Per step: the new version as a delta against the committed base, then the same bytes as a dense round.

    Versions strictly increase, so the dense round of the same step is the next version with the
    same weights; the next step's delta is against it (it holds the same bytes).
    """
    delta_rounds, dense_rounds = [], []
    base = first_version
    for _ in range(args.rounds):
        new = base + 1
        t0 = time.monotonic()
        fleet.step_checkpoint(new, base_version=base, fraction=args.delta)
        step_s = time.monotonic() - t0
        d = _push(fleet, new, args.timeout_s + 60, base_version=base)
        wrong = {h: e for h, e in d["encodings"].items() if e != "delta"}
        if wrong:
            raise SystemExit(f"fleet_round: round {new} was meant as a delta against {base}, but {wrong} took dense")
        d["base_version"] = base
        d["changed_fraction"] = changed_fraction(load_file(fleet.checkpoint(base)), load_file(fleet.checkpoint(new)))
        d["step_generation_s"] = step_s
        delta_rounds.append(d)
        fleet.same_checkpoint(new + 1, new)
        dense_rounds.append(_push(fleet, new + 1, args.timeout_s + 60))
        base = new + 1
    last = base
    # Encoding the model on this machine, alone: the trainer's CPU share of a delta round.
    b, n = load_file(fleet.checkpoint(delta_rounds[-1]["base_version"])), load_file(fleet.checkpoint(last))
    t0 = time.monotonic()
    deltas = encode_many(list(b.values()), [n[k] for k in b])
    encode = {
        "encode_s": time.monotonic() - t0,
        "payload_bytes": sum(x.nbytes for x in deltas),
        "tensors_by_encoding": {e: sum(1 for x in deltas if x.encoding.value == e) for e in sorted({x.encoding.value for x in deltas})},
    }
    return delta_rounds, dense_rounds, encode


def _delta_vs_dense(delta: dict, dense: dict, engine_hosts: list[str], link_mbit: float) -> dict:
    """Ratios of the median delta round to the median dense round, and the trainer link's share of the delta round."""
    dw, nw = delta["wire_bytes_per_host"], dense["wire_bytes_per_host"]
    hosts = ["t0", *engine_hosts]

    def total(w: dict) -> int:  # every byte any host put on its link
        return sum(w[h]["tx_bytes"] for h in hosts)

    def rx(w: dict) -> int:
        return sum(w[h]["rx_bytes"] for h in engine_hosts)

    trainer_link_s = dw["t0"]["tx_bytes"] / (link_mbit * 1e6 / 8)
    timeline = delta["sender_timeline"]
    return {
        "achieved_s": delta["achieved_s"] / dense["achieved_s"],
        "wire_bytes_total": total(dw) / total(nw),
        "receivers_rx_bytes": rx(dw) / rx(nw),
        "receiver_rx_bytes_max": max(dw[h]["rx_bytes"] for h in engine_hosts) / max(nw[h]["rx_bytes"] for h in engine_hosts),
        "trainer_tx_bytes": dw["t0"]["tx_bytes"] / nw["t0"]["tx_bytes"],
        "per_host_tx_plus_rx": {
            h: (dw[h]["tx_bytes"] + dw[h]["rx_bytes"]) / max(1, nw[h]["tx_bytes"] + nw[h]["rx_bytes"]) for h in hosts
        },
        # The trainer's link busy time, from its counter: one payload with a relay (dataplane/relay.py),
        # one per receiver without (--relay gloo: point to point from the root, a star).
        "trainer_link_s": trainer_link_s,
        "trainer_link_share_of_delta_round": trainer_link_s / delta["achieved_s"],
        # The trainer's send (encode, its sends, its checksums; serial per bucket), from its timeline.
        "trainer_send_s": timeline.get("sent", 0.0) - timeline.get("opened", 0.0),
    }


def run(args: argparse.Namespace) -> dict:
    os.environ[RELAY_ENV] = _RELAY_MODES[args.relay]
    spec = FleetSpec(
        num_engines=args.engines,
        tp=args.tp,
        model_mib=args.model_mib,
        trainer_ranks=args.trainer_ranks,
        dense=args.dense,
        link=LinkSpec.symmetric(args.link_mbit),
        bucket_size_bytes=args.bucket_size_bytes,
        collective_timeout_s=args.timeout_s,
        deadline_s=args.timeout_s,
        threads_per_host=args.threads_per_host,
    )
    t_start = time.monotonic()
    with EmulatedFleet(spec) as fleet:
        fleet.install_signal_handlers()
        fleet.wait_daemons()
        setup_s = time.monotonic() - t_start
        warmup = _push(fleet, 1, args.timeout_s + 60)  # forms the data-plane group, and the committed base
        if args.delta is None:
            dense_rounds = [_push(fleet, v, args.timeout_s + 60) for v in range(2, 2 + args.rounds)]
            delta_rounds, encode = [], {}
        else:
            delta_rounds, dense_rounds, encode = _delta_steps(fleet, args, first_version=1)
        last = max(r["version"] for r in (*dense_rounds, *delta_rounds))
        not_held = [h for h in fleet.daemons if not fleet.holds(h, last)]
        if not_held:
            raise SystemExit(f"fleet_round: engines {not_held} do not hold version {last} after it committed")
        manifest = fleet.manifest
        prefix = fleet.prefix
    bucket = args.bucket_size_bytes or default_bucket_size("gloo")
    if spec.routed:
        needed_per_host, distinct = _routed_needs(manifest, spec, bucket)
        needed = max(needed_per_host.values())
    else:
        needed = plan_bytes(manifest, bucket)
        needed_per_host, distinct = {h: needed for h in spec.engine_hosts}, needed
    ingress = {h: args.link_mbit for h in spec.engine_hosts}
    egress = [args.link_mbit] * args.trainer_ranks
    bound = round_bound(needed_bytes=needed_per_host, ingress_mbit=ingress, sender_egress_mbit=egress)
    if spec.routed:
        # Every distinct needed byte leaves the senders once (light.py takes one receiver's need as the union).
        bound = dataclasses.replace(bound, sender_bound_s=distinct * 8 / (args.link_mbit * 1e6 * args.trainer_ranks))
    median = _median(dense_rounds)
    result = {
        **_summary(dense_rounds, bound),
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
        "relay": args.relay,
        "threads_per_host": args.threads_per_host,
        "warmup_round": warmup,
        "setup_s": setup_s,
        "prefix": prefix,
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
    }
    if delta_rounds:
        median = _median(delta_rounds)
        payload = {h: median["bytes_received"][h] for h in spec.engine_hosts}
        delta_bound = delta_round_bound(payload_bytes=payload, ingress_mbit=ingress, sender_egress_mbit=egress)
        result["delta_fraction"] = args.delta
        result["delta"] = {
            **_summary(delta_rounds, delta_bound),
            "ratio_to_star_bound": delta_bound.star_bound_s / median["achieved_s"],
            "payload_bytes_per_receiver": payload,
            "changed_fraction": median["changed_fraction"],
            "trainer_encode": encode,
        }
        result["delta_vs_dense"] = _delta_vs_dense(result["delta"], result, spec.engine_hosts, args.link_mbit)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trainer-ranks", type=int, default=1, help="S: sender ranks, each on its own host (above 1: routed rounds)")
    p.add_argument("--engines", type=int, required=True, help="M: engines")
    p.add_argument("--tp", type=int, default=1, help="T: receiver ranks per engine, each on its own host (routed: each declares its needs)")
    p.add_argument(
        "--dense", action="store_true",
        help="today's single-root dense round (engine ranks declare no needs: every rank takes the whole model); the baseline",
    )
    p.add_argument("--link-mbit", type=float, required=True, help="R: every link's rate, each direction, Mbit/s")
    p.add_argument("--model-mib", type=float, required=True, help="B: model size in MiB (bf16, 1 MiB tensors)")
    p.add_argument("--json", required=True, help="write the result here")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds after the warm-up round")
    p.add_argument("--bucket-size-bytes", type=int, default=0, help="0: the gloo default")
    p.add_argument("--timeout-s", type=float, default=300.0, help="round deadline and collective timeout")
    p.add_argument(
        "--threads-per-host", type=int, default=1,
        help="torch intra-op threads in each emulated host's process (the hosts share this machine's cores)",
    )
    p.add_argument(
        "--delta", type=float, default=None, metavar="FRACTION",
        help="each measured step changes FRACTION of the elements and goes as a delta round against the committed "
        "base, then as a dense round of the same bytes (both reported)",
    )
    p.add_argument(
        "--relay", choices=sorted(_RELAY_MODES), default="auto",
        help="how dense gloo rounds travel: a pipelined chain or tree relay, gloo's broadcast, or the data plane's rule",
    )
    args = p.parse_args(argv)
    for name in ("trainer_ranks", "engines", "tp", "rounds", "threads_per_host"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    if args.delta is not None and not 0 < args.delta <= 1:
        p.error(f"--delta: expected a fraction in (0, 1], got {args.delta}")
    if args.dense and args.trainer_ranks > 1:
        p.error("--dense: today's dense round has one sender, got --trainer-ranks above 1")
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
    if "delta" in result:
        d, r = result["delta"], result["delta_vs_dense"]
        print(
            f"delta {args.delta:g}: achieved={d['achieved_s']:.3f}s speed_of_light={d['speed_of_light_s']:.3f}s "
            f"ratio={d['ratio']:.3f} star_bound={d['star_bound_s']:.3f}s delta/dense time={r['achieved_s']:.3f} "
            f"wire total={r['wire_bytes_total']:.4f} trainer_tx={r['trainer_tx_bytes']:.4f} "
            f"receiver_rx={r['receivers_rx_bytes']:.4f} trainer link share={r['trainer_link_share_of_delta_round']:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
