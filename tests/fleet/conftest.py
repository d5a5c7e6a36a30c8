"""Emulated-fleet tests need root, `ip` and `tc`, and a kernel that lets them make namespaces."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from bench.fleet.net import namespaces_with_prefix


def _netns_unavailable() -> str | None:
    """Why emulated hosts cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "emulated hosts need root (network namespaces, veth links, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"emulated hosts need `{tool}` (iproute2), not found on PATH"
    probe = f"wsprobe{uuid.uuid4().hex[:6]}"
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if res.returncode != 0:
        return f"`ip netns add` fails here: {res.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


NETNS_UNAVAILABLE = _netns_unavailable()
needs_netns = pytest.mark.skipif(NETNS_UNAVAILABLE is not None, reason=NETNS_UNAVAILABLE or "")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has ended; only its parent's wait is missing


def root_links_with(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, check=True).stdout
    return [link["ifname"] for link in json.loads(out) if link["ifname"].startswith(prefix)]


def iptables_rules() -> str | None:
    if shutil.which("iptables") is None:
        return None
    return subprocess.run(["iptables", "-S"], capture_output=True, text=True).stdout


def pids_in_namespaces(prefix: str) -> list[int]:
    pids = []
    for netns in namespaces_with_prefix(prefix):
        out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout
        pids += [int(p) for p in out.split()]
    return pids


def assert_nothing_left(prefix: str, pids: list[int], rules_before: str | None) -> None:
    assert namespaces_with_prefix(prefix) == []
    assert root_links_with(prefix) == []
    assert [p for p in pids if alive(p)] == []
    assert iptables_rules() == rules_before
