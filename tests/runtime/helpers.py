"""Helpers for the runtime tests that start `weightsync serve` processes."""

from __future__ import annotations

import os
import signal
import subprocess


def stop_gracefully(procs) -> None:
    """SIGTERM, SIGKILL past a deadline, then SIGKILL whatever is left in each process's own group.

    A serve killed before vLLM installed its handlers (still starting) leaves its
    EngineCore process behind; started with `start_new_session=True`, that process
    shares the serve's process group, which this clears.
    """
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(30)
        kill_group(p)


def kill_group(p: subprocess.Popen) -> None:
    """SIGKILL what is left in the process's own group (started with `start_new_session=True`;
    for a process without a group of its own, nothing)."""
    if os.getpgid(0) != p.pid:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # the group is empty: nothing was left behind
