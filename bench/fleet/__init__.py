"""An emulated fleet on one machine: hosts in network namespaces behind rate-limited links (needs root).

`net` builds namespaces, links and the bridge; `fleet` runs weightsync's processes inside the
hosts; `light` computes a round's speed of light; `python -m bench.fleet` is the CLI.
"""

from bench.fleet.fleet import EmulatedFleet, FleetSpec, fleet_manifest
from bench.fleet.light import RoundBound, gloo_broadcast_bound_s, plan_bytes, round_bound
from bench.fleet.net import Host, LinkSpec, Network, cleanup_prefix, list_prefixes, namespaces_with_prefix

__all__ = [
    "EmulatedFleet",
    "FleetSpec",
    "Host",
    "LinkSpec",
    "Network",
    "RoundBound",
    "cleanup_prefix",
    "fleet_manifest",
    "gloo_broadcast_bound_s",
    "list_prefixes",
    "namespaces_with_prefix",
    "plan_bytes",
    "round_bound",
]
