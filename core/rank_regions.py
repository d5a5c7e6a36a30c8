"""The regions one rank needs (a receiver rank, local to its daemon) or holds (a trainer rank).

The domain form of the proto message RankRegions (see core/regions.py for what a
region is). A daemon's needs are one RankRegions per receiver rank 0..num_ranks-1,
or none at all: every rank needs every inventory tensor whole (memory daemons, and
engines that cannot tell).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from weightsync.core.dtypes import itemsize
from weightsync.core.regions import Region
from weightsync.core.types import TensorSpec

__all__ = ["RankRegions", "needed_bytes_per_rank"]


@dataclass(frozen=True, slots=True)
class RankRegions:
    """Tensor name -> region for one rank; a name absent: that rank needs none of it."""

    rank: int
    regions: Mapping[str, Region] = field(default_factory=dict)
    # How many of the regions are whole only because the real one could not be derived.
    whole_fallbacks: int = 0

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"rank: expected >= 0, got {self.rank}")
        if not 0 <= self.whole_fallbacks <= len(self.regions):
            raise ValueError(
                f"rank {self.rank}: whole_fallbacks expected 0..{len(self.regions)} (its number of regions), "
                f"got {self.whole_fallbacks}"
            )

    def num_bytes(self, inventory: Mapping[str, TensorSpec]) -> int:
        """Bytes of the inventory this rank needs (names not in the inventory count nothing)."""
        total = 0
        for name, region in self.regions.items():
            spec = inventory.get(name)
            if spec is not None:
                total += region.numel(spec.shape) * itemsize(spec.dtype)
        return total


def needed_bytes_per_rank(needs: Iterable[RankRegions], inventory: Mapping[str, TensorSpec], num_ranks: int) -> list[int]:
    """Bytes each rank 0..num_ranks-1 needs; with no needs declared, the whole inventory for every rank."""
    needs = list(needs)
    if not needs:
        return [sum(s.nbytes for s in inventory.values())] * num_ranks
    by_rank = {n.rank: n.num_bytes(inventory) for n in needs}
    return [by_rank.get(rank, 0) for rank in range(num_ranks)]
