"""Emulated hosts on one machine: one network namespace per host, one rate-limited veth link each, one bridge.

Layout of a run with prefix P (P is short and random, so parallel runs never collide):

    namespace P-sw      the switch: bridge Pbr and the switch-side end of every link (Ps0, Ps1, ...)
    namespace P-NAME    one per host: its end of the link (Ph0, Ph1, ...), address 10.77.0.(i+1)/24, lo

The bridge sits in a namespace of its own, so nothing of a run lives in the root namespace but
the namespace names. That is also why no iptables rule is needed: once dockerd has run, the root
namespace's FORWARD policy is DROP and bridged frames pass through it (br_netfilter), but
netfilter is per namespace and the switch namespace's own tables are empty (tests/fleet checks
this with the root policy set to DROP). No host has a default route, so no packet can leave the
namespaces of the run.

Each direction of a link is shaped where its packets leave: the host's egress on the host-side
end, the host's ingress on the switch-side end (no ifb device needed). Both carry the same qdisc
tree: htb root, class 1:1 at the link's rate for all traffic, class 1:2 whose leaf holds no
packets (pfifo limit 0) for traffic a partition drops: this kernel has neither netem nor
act_gact, so classifying into a full queue is how a tc filter drops here. Delay and loss need
netem, which this kernel lacks: a host whose link needs them gets a userspace cable
(bench/fleet/wire.py, two TAP devices) instead of a veth pair.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

__all__ = ["Host", "LinkSpec", "Network", "cleanup_prefix", "list_prefixes", "namespaces_with_prefix"]

log = logging.getLogger(__name__)

_REPO_ROOT = Path(__file__).resolve().parents[2]
# A linux interface name holds at most 15 characters.
_IFNAMSIZ = 15
_PREFIX_RE = re.compile(r"^ws[0-9a-z]{2,6}$")
_SUBNET = "10.77.0"
_MAX_HOSTS = 250
# htb needs a burst of at least one GSO segment (64 KiB on veth) or it cannot reach its rate.
_MIN_BURST_BYTES = 128 << 10
# Starting the userspace cable (a Python process) on a loaded 2-core machine.
_WIRE_START_TIMEOUT_S = 120.0
# "No limit" still goes through htb, so that rates can be set later without rebuilding the tree.
_UNLIMITED_MBIT = 100_000
# Filters that cut a host off from one peer (partitions) live at this tc priority.
_PARTITION_PRIO = 10


@dataclass(frozen=True, slots=True)
class LinkSpec:
    """One host's link: rates in Mbit/s (None: unlimited), added one-way delay and loss, each direction.

    impairable: give the link a userspace cable even while delay and loss are 0, so that
    `Network.impair` can add them mid-run (kernel veth links cannot take them here).
    """

    egress_mbit: float | None = None
    ingress_mbit: float | None = None
    delay_ms: float = 0.0
    loss_pct: float = 0.0
    impairable: bool = False

    @property
    def needs_wire(self) -> bool:
        return self.impairable or self.delay_ms > 0 or self.loss_pct > 0

    def __post_init__(self) -> None:
        for name in ("egress_mbit", "ingress_mbit"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 Mbit/s or None (unlimited), got {value!r}")
        if not self.delay_ms >= 0:
            raise ValueError(f"delay_ms must be >= 0, got {self.delay_ms!r}")
        if not 0 <= self.loss_pct <= 100:
            raise ValueError(f"loss_pct must be within [0, 100], got {self.loss_pct!r}")

    @classmethod
    def symmetric(cls, mbit: float | None, **kwargs) -> "LinkSpec":
        return cls(egress_mbit=mbit, ingress_mbit=mbit, **kwargs)


@dataclass(frozen=True, slots=True)
class Host:
    """One emulated host: its namespace, its interface (inside the namespace), its address and link."""

    name: str
    index: int
    netns: str
    ifname: str
    switch_ifname: str
    address: str
    link: LinkSpec


def _run(cmd: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and res.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {res.returncode}): {res.stderr.strip() or res.stdout.strip()}")
    return res


def namespaces_with_prefix(prefix: str) -> list[str]:
    """Network namespaces named `prefix-...` (this run's, or a dead run's leftovers)."""
    out = _run(["ip", "-j", "netns", "list"], check=False).stdout.strip()
    names = [n["name"] for n in json.loads(out)] if out else []
    return sorted(n for n in names if n.startswith(prefix + "-"))


def list_prefixes() -> list[str]:
    """Prefixes of fleets that have namespaces now (alive or left behind)."""
    out = _run(["ip", "-j", "netns", "list"], check=False).stdout.strip()
    names = [n["name"] for n in json.loads(out)] if out else []
    return sorted({n.split("-", 1)[0] for n in names if "-" in n and _PREFIX_RE.match(n.split("-", 1)[0])})


def _pids_in(netns: str) -> list[int]:
    res = _run(["ip", "netns", "pids", netns], check=False)
    return [int(p) for p in res.stdout.split()]


def cleanup_prefix(prefix: str) -> list[str]:
    """Kills every process inside the prefix's namespaces and deletes them (links and bridge go with them).

    Returns the namespaces deleted. Safe to call on a live run's prefix only when that run is dead.
    """
    if not _PREFIX_RE.match(prefix):
        raise ValueError(f"prefix {prefix!r}: expected 'ws' followed by 2-6 lowercase letters or digits")
    removed = []
    for netns in namespaces_with_prefix(prefix):
        for pid in _pids_in(netns):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        res = _run(["ip", "netns", "del", netns], check=False)
        if res.returncode == 0:
            removed.append(netns)
        else:
            log.warning("could not delete namespace %s: %s", netns, res.stderr.strip())
    return removed


def _qdisc_tree(netns: str, ifname: str) -> list[list[str]]:
    """The htb root and the drop class 1:2; the rate class 1:1 comes from `_rate_class`."""
    tc = ["tc", "-n", netns]
    return [
        [*tc, "qdisc", "add", "dev", ifname, "root", "handle", "1:", "htb", "default", "1"],
        [*tc, "class", "add", "dev", ifname, "parent", "1:", "classid", "1:2", "htb", "rate", f"{_UNLIMITED_MBIT}mbit"],
        [*tc, "qdisc", "add", "dev", ifname, "parent", "1:2", "handle", "20:", "pfifo", "limit", "0"],
    ]


def _rate_class(netns: str, ifname: str, mbit: float | None) -> list[str]:
    rate = f"{mbit if mbit is not None else _UNLIMITED_MBIT}mbit"
    # Two milliseconds' worth at the rate, and never less than one GSO segment.
    burst_bytes = max(_MIN_BURST_BYTES, int((mbit or _UNLIMITED_MBIT) * 1e6 / 8 * 0.002))
    return ["tc", "-n", netns, "class", "replace", "dev", ifname, "parent", "1:", "classid", "1:1", "htb",
            "rate", rate, "ceil", rate, "burst", str(burst_bytes), "cburst", str(burst_bytes)]


class Network:
    """Creates the namespaces, links and bridge of one run and deletes them in `close` (idempotent)."""

    def __init__(self, hosts: Sequence[tuple[str, LinkSpec]], *, prefix: str | None = None) -> None:
        if not 1 <= len(hosts) <= _MAX_HOSTS:
            raise ValueError(f"hosts: expected 1..{_MAX_HOSTS} hosts, got {len(hosts)}")
        names = [h for h, _ in hosts]
        if len(set(names)) != len(names):
            raise ValueError(f"host names must be unique, got {names}")
        for name in names:
            if not re.fullmatch(r"[a-z][a-z0-9]{0,11}", name):
                raise ValueError(f"host name {name!r}: expected a lowercase letter then up to 11 letters or digits")
        self.prefix = prefix or "ws" + secrets.token_hex(2)
        if not _PREFIX_RE.match(self.prefix):
            raise ValueError(f"prefix {self.prefix!r}: expected 'ws' followed by 2-6 lowercase letters or digits")
        self.switch_netns = f"{self.prefix}-sw"
        self.bridge = f"{self.prefix}br"
        self.hosts: dict[str, Host] = {}
        for i, (name, link) in enumerate(hosts):
            ifname, switch_ifname = f"{self.prefix}h{i}", f"{self.prefix}s{i}"
            assert len(switch_ifname) <= _IFNAMSIZ
            self.hosts[name] = Host(name, i, f"{self.prefix}-{name}", ifname, switch_ifname, f"{_SUBNET}.{i + 1}", link)
        self._created: list[str] = []
        self._wires: dict[str, subprocess.Popen] = {}
        self._closed = False

    # ------------------------------------------------------------------ life cycle

    def create(self) -> "Network":
        """Builds everything; on any failure deletes what it built and re-raises."""
        try:
            self._add_netns(self.switch_netns)
            sw = ["ip", "-n", self.switch_netns]
            _run([*sw, "link", "add", self.bridge, "type", "bridge"])
            _run([*sw, "link", "set", self.bridge, "up"])
            _run([*sw, "link", "set", "lo", "up"])
            for host in self.hosts.values():
                self._add_host(host)
        except BaseException:
            self.close()
            raise
        return self

    def _add_netns(self, netns: str) -> None:
        _run(["ip", "netns", "add", netns])
        self._created.append(netns)

    def _add_host(self, host: Host) -> None:
        self._add_netns(host.netns)
        h = ["ip", "-n", host.netns]
        if host.link.needs_wire:
            self._add_wire(host)
        else:
            # Both ends are created straight inside their namespaces: nothing appears in the root one.
            _run(["ip", "link", "add", host.ifname, "netns", host.netns, "type", "veth",
                  "peer", "name", host.switch_ifname, "netns", self.switch_netns])
        _run([*h, "addr", "add", f"{host.address}/24", "dev", host.ifname])
        _run([*h, "link", "set", host.ifname, "up"])
        _run([*h, "link", "set", "lo", "up"])
        _run(["ip", "-n", self.switch_netns, "link", "set", host.switch_ifname, "master", self.bridge])
        _run(["ip", "-n", self.switch_netns, "link", "set", host.switch_ifname, "up"])
        for cmd in [*_qdisc_tree(host.netns, host.ifname), *_qdisc_tree(self.switch_netns, host.switch_ifname)]:
            _run(cmd)
        self.shape(host.name, host.link)

    def _add_wire(self, host: Host) -> None:
        wire = subprocess.Popen(
            [sys.executable, "-m", "bench.fleet.wire", host.netns, host.ifname, self.switch_netns, host.switch_ifname],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=_REPO_ROOT, start_new_session=True,
        )
        self._wires[host.name] = wire
        ready: list[str] = []
        reader = threading.Thread(target=lambda: ready.append(wire.stdout.readline()), daemon=True)
        reader.start()
        reader.join(_WIRE_START_TIMEOUT_S)
        if not ready or ready[0].strip() != "ready":
            raise RuntimeError(f"the userspace cable of host {host.name} did not start within {_WIRE_START_TIMEOUT_S:g} s")
        self._send_impairment(host.name, host.link.delay_ms, host.link.loss_pct)

    def _send_impairment(self, name: str, delay_ms: float, loss_pct: float) -> None:
        wire = self._wires[name]
        wire.stdin.write(f"{delay_ms} {loss_pct}\n")
        wire.stdin.flush()

    def close(self) -> None:
        """Kills what still runs inside the run's namespaces and deletes them, links and bridge included."""
        if self._closed:
            return
        self._closed = True
        for wire in self._wires.values():
            wire.kill()
            wire.wait(10)
        for netns in reversed(self._created):
            for pid in _pids_in(netns):
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            res = _run(["ip", "netns", "del", netns], check=False)
            if res.returncode != 0:
                log.warning("could not delete namespace %s: %s", netns, res.stderr.strip())
        self._created.clear()

    def __enter__(self) -> "Network":
        return self.create()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ links

    def shape(self, name: str, link: LinkSpec) -> None:
        """Sets a host's link rates (both directions), and delay and loss where it has a userspace cable."""
        host = self.hosts[name]
        _run(_rate_class(host.netns, host.ifname, link.egress_mbit))
        _run(_rate_class(self.switch_netns, host.switch_ifname, link.ingress_mbit))
        if name in self._wires:
            self._send_impairment(name, link.delay_ms, link.loss_pct)
        elif link.needs_wire:
            raise ValueError(
                f"host {name}: delay_ms={link.delay_ms}, loss_pct={link.loss_pct} need a userspace cable, and this "
                "host has a veth link; create it with LinkSpec(impairable=True)"
            )
        self.hosts[name] = replace(host, link=link)

    def impair(self, name: str, *, delay_ms: float, loss_pct: float) -> None:
        """Changes only the delay and loss of a host's link, each direction; the rates stay."""
        self.shape(name, replace(self.hosts[name].link, delay_ms=delay_ms, loss_pct=loss_pct))

    def set_link_up(self, name: str, up: bool) -> None:
        """Cuts or heals a host's cable: the switch-side end goes down, as when a cable is pulled.

        The host keeps its address and routes; its packets go nowhere and its TCP
        connections retransmit, as they would on a real cut (no reset reaches the peers).
        """
        host = self.hosts[name]
        _run(["ip", "-n", self.switch_netns, "link", "set", host.switch_ifname, "up" if up else "down"])

    def partition(self, a: str, b: str) -> None:
        """Drops every packet between hosts a and b (both directions); their other traffic flows."""
        for src, dst in ((a, b), (b, a)):
            h, peer = self.hosts[src], self.hosts[dst]
            _run(["tc", "-n", h.netns, "filter", "add", "dev", h.ifname, "parent", "1:", "protocol", "ip",
                  "prio", str(_PARTITION_PRIO), "u32", "match", "ip", "dst", f"{peer.address}/32", "flowid", "1:2"])

    def heal_partitions(self, *names: str) -> None:
        """Removes every partition filter from these hosts' links."""
        for name in names:
            h = self.hosts[name]
            _run(["tc", "-n", h.netns, "filter", "del", "dev", h.ifname, "parent", "1:", "prio", str(_PARTITION_PRIO)],
                 check=False)

    # ------------------------------------------------------------------ observation

    def counters(self, names: Sequence[str] | None = None) -> dict[str, dict[str, int]]:
        """Bytes each host's interface (default: every host's) has received and sent, read inside its namespace from sysfs."""
        out = {}
        for host in (self.hosts[n] for n in names) if names is not None else self.hosts.values():
            stats = f"/sys/class/net/{host.ifname}/statistics"
            res = _run(["ip", "netns", "exec", host.netns, "cat", f"{stats}/rx_bytes", f"{stats}/tx_bytes"])
            rx, tx = (int(v) for v in res.stdout.split())
            out[host.name] = {"rx_bytes": rx, "tx_bytes": tx}
        return out

    def netns_names(self) -> list[str]:
        return [self.switch_netns, *(h.netns for h in self.hosts.values())]

    def exec_prefix(self, name: str) -> list[str]:
        """argv prefix that runs a command inside a host's namespace."""
        return ["ip", "netns", "exec", self.hosts[name].netns]
