"""What the coordinator has committed, kept on disk so a restart cannot forget or invent it.

Registrations only make claims; this file is the coordinator's own record of the truth:
the last committed version and the version floor (the highest version any round began
with, so that a half-applied round's version is never reused).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass

__all__ = ["CommittedState", "load_state", "save_state"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CommittedState:
    committed_version: int = -1
    version_floor: int = -1

    def __post_init__(self) -> None:
        for name in ("committed_version", "version_floor"):
            value = getattr(self, name)
            if type(value) is not int or not -1 <= value < 2**63:
                raise ValueError(f"{name}: expected an integer in -1..2^63-1, got {value!r}")
        if self.version_floor < self.committed_version:
            raise ValueError(
                f"version_floor ({self.version_floor}) is below committed_version ({self.committed_version}): "
                "a committed version was begun, so the floor is at least that"
            )

    def to_dict(self) -> dict[str, int]:
        return {"committed_version": self.committed_version, "version_floor": self.version_floor}


def load_state(path: str) -> CommittedState:
    """The state in `path`, or the empty state if the file does not exist yet."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        log.info("state file %s does not exist yet: starting with no committed version", path)
        return CommittedState()
    except (OSError, ValueError) as e:
        raise ValueError(f"state file {path}: cannot read it ({e}): fix or remove it (removing forgets the committed version)") from e
    if not isinstance(raw, dict) or set(raw) != {"committed_version", "version_floor"}:
        raise ValueError(f"state file {path}: expected keys committed_version and version_floor, got {raw!r:.200}")
    try:
        return CommittedState(**raw)
    except ValueError as e:
        raise ValueError(f"state file {path}: {e}") from e


def save_state(path: str, state: CommittedState) -> None:
    """Writes atomically: a crash leaves either the old file or the new one, never half of one."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".weightsync-state-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(state.to_dict(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise

