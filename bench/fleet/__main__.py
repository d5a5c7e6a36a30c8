"""`python -m bench.fleet`: bring an emulated fleet up, list fleets, clean up what a dead run left.

    python -m bench.fleet up --engines 3 --link-mbit 200 [--model-mib 4]   # until Ctrl-C or SIGTERM
    python -m bench.fleet list                                            # prefixes with namespaces now
    python -m bench.fleet cleanup --prefix wsab12                         # or --all

`up` prints one JSON line once every daemon is idle (prefix, hosts with their namespaces and
addresses, coordinator address, work directory), then waits; to reach a host, use
`ip netns exec PREFIX-HOST ...`. Needs root.
"""

from __future__ import annotations

import argparse
import json
import sys
import signal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.fleet.net import cleanup_prefix, list_prefixes  # noqa: E402


def _up(args: argparse.Namespace) -> int:
    from bench.fleet.fleet import EmulatedFleet, FleetSpec
    from bench.fleet.net import LinkSpec

    spec = FleetSpec(num_engines=args.engines, tp=args.tp, model_mib=args.model_mib,
                     link=LinkSpec.symmetric(args.link_mbit), prefix=args.prefix)
    fleet = EmulatedFleet(spec)
    fleet.install_signal_handlers()
    try:
        fleet.start()
        fleet.wait_daemons()
        print(json.dumps({
            "prefix": fleet.prefix,
            "coordinator": fleet.coordinator_address,
            "workdir": str(fleet.workdir),
            "hosts": {h.name: {"netns": h.netns, "ifname": h.ifname, "address": h.address} for h in fleet.net.hosts.values()},
        }), flush=True)
        while True:
            signal.pause()  # until a signal's handler ends the program
    except KeyboardInterrupt:
        return 130
    finally:
        fleet.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a fleet and keep it until Ctrl-C or SIGTERM")
    up.add_argument("--engines", type=int, required=True)
    up.add_argument("--tp", type=int, default=1)
    up.add_argument("--link-mbit", type=float, default=None, help="each link's rate, each direction (default: unlimited)")
    up.add_argument("--model-mib", type=float, default=4.0)
    up.add_argument("--prefix", default=None, help="name prefix ('ws' + 2-6 letters or digits; default: random)")
    sub.add_parser("list", help="prefixes of fleets that have namespaces now")
    c = sub.add_parser("cleanup", help="kill the processes of a fleet's namespaces and delete them")
    which = c.add_mutually_exclusive_group(required=True)
    which.add_argument("--prefix")
    which.add_argument("--all", action="store_true", help="every fleet's leftovers (make sure none is running)")
    args = p.parse_args(argv)
    if args.command == "up":
        return _up(args)
    if args.command == "list":
        print("\n".join(list_prefixes()))
        return 0
    prefixes = list_prefixes() if args.all else [args.prefix]
    for prefix in prefixes:
        try:
            removed = cleanup_prefix(prefix)
        except ValueError as e:
            p.error(f"--prefix: {e}")
        for netns in removed:
            print(f"deleted {netns}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
