"""Nothing of a fleet outlives SIGTERM; after SIGKILL, the cleanup CLI removes what is left.

The fault tests' fleet (tests/fleet/test_network_faults.py) checks the same after a normal close.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from bench.fleet.net import namespaces_with_prefix
from tests.fleet.conftest import assert_nothing_left, iptables_rules, needs_netns, pids_in_namespaces

pytestmark = [pytest.mark.slow, needs_netns]

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 180.0


def _start_up() -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.fleet", "up", "--engines", "1", "--model-mib", "1", "--link-mbit", "100"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(START_TIMEOUT_S)
    if not lines or not lines[0].strip():
        proc.kill()
        proc.wait(30)
        pytest.fail(f"`python -m bench.fleet up` printed nothing within {START_TIMEOUT_S:g} s")
    return proc, json.loads(lines[0])


def test_sigterm_tears_the_fleet_down():
    """SIGTERM to `python -m bench.fleet up` ends it with every namespace and process of the run gone."""
    rules_before = iptables_rules()
    proc, info = _start_up()
    prefix = info["prefix"]
    pids = pids_in_namespaces(prefix)
    assert pids and len(namespaces_with_prefix(prefix)) == 4  # switch, coord, t0, e0
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 128 + signal.SIGTERM
    assert_nothing_left(prefix, pids, rules_before)
    assert not Path(info["workdir"]).exists()


def test_cleanup_cli_removes_what_a_killed_run_left():
    """A SIGKILLed run leaves namespaces and processes; `python -m bench.fleet cleanup --prefix` removes them."""
    rules_before = iptables_rules()
    proc, info = _start_up()
    prefix = info["prefix"]
    pids = pids_in_namespaces(prefix)
    proc.kill()
    proc.wait(30)
    try:
        assert namespaces_with_prefix(prefix), "SIGKILL leaves the namespaces behind"
        listed = subprocess.run([sys.executable, "-m", "bench.fleet", "list"], cwd=ROOT, capture_output=True, text=True)
        assert prefix in listed.stdout.split()
        res = subprocess.run([sys.executable, "-m", "bench.fleet", "cleanup", "--prefix", prefix],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert f"deleted {prefix}-e0" in res.stdout
        assert_nothing_left(prefix, pids, rules_before)
    finally:
        subprocess.run([sys.executable, "-m", "bench.fleet", "cleanup", "--prefix", prefix], cwd=ROOT, capture_output=True)
        shutil.rmtree(info["workdir"], ignore_errors=True)  # a killed run cannot remove its own files
    assert not os.path.exists(f"/run/netns/{prefix}-sw")
