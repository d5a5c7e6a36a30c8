"""A process that leaves with gloo work pending exits with its own status, not by SIGABRT (_exit_worker.py)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

# Each case starts two interpreters with torch and holds one through a 5 s finalization.
pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _run(scenario: str) -> tuple[subprocess.CompletedProcess, str, float]:
    """Runs the subject against its peer; returns it, its output and the monotonic time it had exited by."""
    port = free_port()
    worker = [sys.executable, str(HERE / "_exit_worker.py")]
    peer = subprocess.Popen([*worker, "peer", str(port), scenario], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        subject = subprocess.run([*worker, "subject", str(port), scenario], cwd=ROOT, capture_output=True, text=True, timeout=60)
        exited = time.monotonic()
    finally:
        peer.kill()  # SIGKILL ends a stopped peer too
        peer.wait(10)
    return subject, subject.stdout + subject.stderr, exited


@pytest.mark.parametrize("scenario", ["pending-recv", "broken-broadcast"])
def test_exit_with_gloo_work_pending_is_clean(scenario):
    """Interpreter exit waits for our threads to leave gloo (their pairs cut): status 0, no std::terminate, whatever finalization takes."""
    subject, out, _ = _run(scenario)
    assert "leaving" in out, out
    assert "terminate called" not in out and subject.returncode == 0, (subject.returncode, out)


def test_a_failed_group_ends_gloo_pending_collective_at_once():
    """Closing a failed group cuts its pairs, so the collective pending in gloo's threads ends now, not at the 30 s timeout."""
    _, out, _ = _run("broken-broadcast")
    found = re.search(r"released (\w+) after ([\d.]+) s", out)
    assert found and found.group(1) == "True", out
    assert float(found.group(2)) < 3.0, out


def test_a_send_to_a_stopped_peer_does_not_hold_exit_until_its_timeout():
    """A send whose peer posted its receive and then stopped is not ended by cutting the pairs; exit
    leaves it (its 30 s timeout cannot come back during finalization) instead of waiting 10 s, and
    the process still exits 0 with no std::terminate."""
    subject, out, exited = _run("stopped-peer-send")
    assert "abandoned: " in out and "the round ended FAILED" in out, out
    assert "terminate called" not in out and subject.returncode == 0, (subject.returncode, out)
    # The path under test was taken: the send was still inside gloo after its pairs were cut.
    assert "still inside gloo after their pairs were cut" in out, out
    leaving = float(re.search(r"leaving at ([\d.]+)", out).group(1))
    # FINALIZE_S (5 s) of finalization plus exit's 1 s grace; waiting the send out took 10 s more.
    assert exited - leaving < 5.0 + 3.0, f"exit took {exited - leaving:.1f} s; output: {out}"
