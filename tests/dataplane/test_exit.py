"""A process that leaves with gloo work pending exits with its own status, not by SIGABRT (_exit_worker.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port

# Each case starts two interpreters with torch and holds one through a 5 s finalization.
pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _run(scenario: str) -> tuple[subprocess.CompletedProcess, str]:
    port = free_port()
    worker = [sys.executable, str(HERE / "_exit_worker.py")]
    peer = subprocess.Popen([*worker, "peer", str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        subject = subprocess.run([*worker, "subject", str(port), scenario], cwd=ROOT, capture_output=True, text=True, timeout=60)
    finally:
        peer.kill()
        peer.wait(10)
    return subject, subject.stdout + subject.stderr


@pytest.mark.parametrize("scenario", ["pending-recv", "broken-broadcast"])
def test_exit_with_gloo_work_pending_is_clean(scenario):
    """Interpreter exit waits for our threads to leave gloo (their pairs cut): status 0, no std::terminate, whatever finalization takes."""
    subject, out = _run(scenario)
    assert "leaving" in out, out
    assert "terminate called" not in out and subject.returncode == 0, (subject.returncode, out)


def test_a_failed_group_ends_gloo_pending_collective_at_once():
    """Closing a failed group cuts its pairs, so the collective pending in gloo's threads ends now, not at the 30 s timeout."""
    _, out = _run("broken-broadcast")
    found = re.search(r"released (\w+) after ([\d.]+) s", out)
    assert found and found.group(1) == "True", out
    assert float(found.group(2)) < 3.0, out
