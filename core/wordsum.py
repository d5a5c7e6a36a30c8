"""The integer finish of dataplane/checksum.py, shared with the control plane (no torch here).

A tensor's checksum is splitmix64((S mod 2**64) ^ splitmix64(nbytes)), where S is the
position-weighted sum of its 64-bit words. S is linear in the tensor's bytes (a word is the
sum of its bytes shifted), so the S of disjoint parts, each taken at the parts' global byte
positions with every other byte zero, add up to the tensor's S mod 2**64: a checksum can be
composed from pieces that no single rank holds whole.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["MASK64", "compose_checksum", "splitmix64"]

MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def splitmix64(x: int) -> int:
    x = (x + _GOLDEN) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def compose_checksum(partial_sums: Iterable[int], nbytes: int) -> int:
    """The checksum of a tensor of `nbytes` bytes from the raw sums S of parts that cover it exactly once."""
    s = sum(partial_sums) & MASK64
    return splitmix64(s ^ splitmix64(nbytes))
