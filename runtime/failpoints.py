"""Failpoints for fault tests, read from the file named by WEIGHTSYNC_FAILPOINTS_FILE.

Each line is `NAME VALUE`; the file is re-read at the start of every round, so a test
can inject a fault into one round of a running daemon. Without the variable (production)
every failpoint is off and costs one environment lookup per round.

    apply_delay_s 0.2          sleep this long after applying each bucket
    corrupt_applied NAME       flip one bit of tensor NAME right after it is applied
    mark_apply PATH            touch PATH when a bucket's apply starts (tests wait on it)
    pause_before_commit_s 60   trainer: sleep this long after sending, before CommitUpdate
"""

from __future__ import annotations

import logging
import os

__all__ = ["Failpoints", "load_failpoints"]

log = logging.getLogger(__name__)

ENV = "WEIGHTSYNC_FAILPOINTS_FILE"


class Failpoints(dict):
    @property
    def apply_delay_s(self) -> float:
        return float(self.get("apply_delay_s", 0.0))

    @property
    def corrupt_applied(self) -> str | None:
        return self.get("corrupt_applied")

    @property
    def mark_apply(self) -> str | None:
        return self.get("mark_apply")

    @property
    def pause_before_commit_s(self) -> float:
        return float(self.get("pause_before_commit_s", 0.0))


def load_failpoints() -> Failpoints:
    path = os.environ.get(ENV)
    if not path or not os.path.exists(path):
        return Failpoints()
    out = Failpoints()
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.split(None, 1)
            if len(parts) == 2:
                out[parts[0]] = parts[1].strip()
    if out:
        log.warning("failpoints active: %s", dict(out))
    return out
