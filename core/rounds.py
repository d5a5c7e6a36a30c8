"""Rules about rounds that every component must compute the same way."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["is_full_round"]


def is_full_round(inventory: Iterable[str], covered: Iterable[str]) -> bool:
    """Whether a round that carried the tensors `covered` re-syncs an engine that accepts `inventory`.

    Only such a round can clear an engine's dirty or stale flag: a partial round verifies
    its own tensors, and every tensor it did not carry may still hold bytes of another
    version. The coordinator, the daemon agent and the vLLM worker all ask this function,
    so no two views of one engine can disagree on it.
    """
    covered_set = covered if isinstance(covered, (set, frozenset)) else set(covered)
    return all(name in covered_set for name in inventory)
