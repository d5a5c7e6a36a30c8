"""The weightsync error hierarchy; the gRPC layer maps each class to one status code."""

from __future__ import annotations

__all__ = [
    "WeightsyncError",
    "InvalidArgument",
    "FailedPrecondition",
    "NotFound",
    "Unavailable",
    "DeadlineExceeded",
    "PermissionDenied",
    "Unauthenticated",
    "AlreadyExists",
    "ResourceExhausted",
    "TransferError",
]


class WeightsyncError(Exception):
    """Base class. `problems` lists every problem found, not only the first."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        self.problems = list(problems or [])
        if self.problems:
            detail = "; ".join(self.problems)
            message = f"{message}: {detail}" if message else detail
        super().__init__(message)


class InvalidArgument(WeightsyncError):
    """The request itself is malformed or does not fit what the engines accept."""


class FailedPrecondition(WeightsyncError):
    """The request is well formed but the system is not in a state to honour it."""


class NotFound(WeightsyncError):
    """An update id or daemon id that the coordinator does not know."""


class Unavailable(WeightsyncError):
    """Not enough healthy peers, or a peer that cannot be reached."""


class DeadlineExceeded(WeightsyncError):
    """A configured timeout expired."""


class PermissionDenied(WeightsyncError):
    """The caller is authenticated but its role may not do this."""


class Unauthenticated(WeightsyncError):
    """The caller presented no valid credentials."""


class AlreadyExists(WeightsyncError):
    """The name is held by another live party (e.g. a daemon id with an open session)."""


class ResourceExhausted(WeightsyncError):
    """A configured limit (count, size) would be exceeded."""


class TransferError(WeightsyncError):
    """The data plane failed; the message says which rank and why."""
