"""Regions: the part of one checkpoint tensor that a rank holds (trainer) or needs (receiver).

The shared vocabulary of the many-senders data path (../shared/DATAPATH.md): receivers declare
per tensor the region their worker's loader reads, trainer ranks declare per tensor the region
they hold, and the coordinator routes every needed region from a holder.

A region is one block along one dim: indices [start, start + length) of `dim`, every index of
the other dims. That covers what the layouts in use produce: a TP shard of rows or columns, a
vocab-parallel block of rows, the q/k/v or gate/up part of a fused parameter (each is its own
checkpoint tensor, so its shard is again one block), an FSDP2/DTensor Shard(d) placement, and a
replicated tensor (`Region.whole()`). A tensor a rank does not need at all is simply absent
from its declaration. Anything else (two disjoint blocks, a strided pick) is declared whole:
the safe fallback.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Region", "WHOLE_DIM"]

# dim of a region that is the whole tensor.
WHOLE_DIM = -1


@dataclass(frozen=True, slots=True)
class Region:
    """Indices [start, start + length) along `dim`; dim == WHOLE_DIM: the whole tensor."""

    dim: int = WHOLE_DIM
    start: int = 0
    length: int = 0

    @classmethod
    def whole(cls) -> "Region":
        return cls(WHOLE_DIM, 0, 0)

    @property
    def is_whole(self) -> bool:
        return self.dim == WHOLE_DIM

    def problems(self, shape: Sequence[int], what: str) -> list[str]:
        """Why this region is not a region of a tensor of `shape`, one line each; [] if it is."""
        if self.is_whole:
            if self.start != 0 or self.length != 0:
                return [f"{what}: a whole-tensor region (dim {WHOLE_DIM}) has start 0 and length 0, got start {self.start}, length {self.length}"]
            return []
        if not 0 <= self.dim < len(shape):
            return [f"{what}: dim expected 0..{len(shape) - 1} (or {WHOLE_DIM} for the whole tensor) for shape {list(shape)}, got {self.dim}"]
        size = shape[self.dim]
        if self.length <= 0 or self.start < 0 or self.start + self.length > size:
            return [f"{what}: expected 0 <= start < start + length <= {size} (dim {self.dim} of shape {list(shape)}), got start {self.start}, length {self.length}"]
        return []

    def bounds(self, shape: Sequence[int]) -> tuple[int, int, int]:
        """(dim, start, stop) with the whole tensor as dim 0 from 0 to shape[0] (a 0-d tensor: dim 0 of size 1)."""
        if self.is_whole:
            return 0, 0, (shape[0] if shape else 1)
        return self.dim, self.start, self.start + self.length

    def numel(self, shape: Sequence[int]) -> int:
        if self.is_whole or not shape:
            return math.prod(shape)
        return math.prod(shape) // shape[self.dim] * self.length if shape[self.dim] else 0

    def normalized(self, shape: Sequence[int]) -> "Region":
        """The same elements with a whole-covering block written as Region.whole()."""
        if not self.is_whole and self.start == 0 and shape and self.length == shape[self.dim]:
            return Region.whole()
        return self

    def intersect(self, other: "Region", shape: Sequence[int]) -> "Region | None":
        """The elements both regions cover, as a region; None when they share none.

        Two blocks along different dims intersect in a 2-D block, which is not a region: then
        ValueError (a plan never needs it: holders and needers are matched along one dim, and a
        holder of whole tensors intersects anything)."""
        if self.is_whole:
            return other
        if other.is_whole:
            return self
        if self.dim != other.dim:
            raise ValueError(f"regions along dims {self.dim} and {other.dim} of shape {list(shape)} do not intersect in one block")
        lo = max(self.start, other.start)
        hi = min(self.start + self.length, other.start + other.length)
        if hi <= lo:
            return None
        return Region(self.dim, lo, hi - lo).normalized(shape)

    def contains(self, other: "Region", shape: Sequence[int]) -> bool:
        if self.is_whole:
            return True
        o = other.normalized(shape)
        if o.is_whole:
            return self.normalized(shape).is_whole
        return o.dim == self.dim and self.start <= o.start and o.start + o.length <= self.start + self.length
