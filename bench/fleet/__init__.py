"""An emulated fleet on one machine: hosts in network namespaces behind rate-limited links (needs root).

`net` builds namespaces, links and the bridge; `wire` is the userspace cable for delay and loss;
`fleet` runs weightsync's processes inside the hosts; `light` computes a round's speed of light;
`python -m bench.fleet` is the CLI.
"""

from __future__ import annotations

import importlib

# Imported on first use: the cable and the CLI's cleanup start in a fraction of a second
# without torch, which `fleet` needs.
_EXPORTS = {
    "EmulatedFleet": "bench.fleet.fleet",
    "FleetSpec": "bench.fleet.fleet",
    "fleet_manifest": "bench.fleet.fleet",
    "RoundBound": "bench.fleet.light",
    "delta_round_bound": "bench.fleet.light",
    "gloo_broadcast_model_s": "bench.fleet.light",
    "plan_bytes": "bench.fleet.light",
    "round_bound": "bench.fleet.light",
    "Host": "bench.fleet.net",
    "LinkSpec": "bench.fleet.net",
    "Network": "bench.fleet.net",
    "cleanup_prefix": "bench.fleet.net",
    "list_prefixes": "bench.fleet.net",
    "namespaces_with_prefix": "bench.fleet.net",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bench.fleet' has no attribute {name!r}")
