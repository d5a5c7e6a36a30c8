"""Tensors computed only when the sender packs their bucket, so that a trainer's whole model is never copied at once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["DeferredTensor", "materialize"]


@dataclass(frozen=True, slots=True, eq=False)
class DeferredTensor:
    """Shape and dtype now, bytes later: `compute()` runs when the sender reaches this tensor in plan order.

    compute may run collectives (e.g. DTensor.full_tensor()); the sender calls it in plan
    order on every trainer rank, which is what keeps such collectives in lockstep.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    compute: Callable[[], torch.Tensor]
    device: torch.device = torch.device("cpu")

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    def materialize(self) -> torch.Tensor:
        t = self.compute()
        if tuple(t.shape) != self.shape:
            raise ValueError(f"deferred tensor computed shape {list(t.shape)}, declared {list(self.shape)}")
        return t


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    return DTensor


_DTENSOR = _dtensor_type()


def materialize(t: torch.Tensor | DeferredTensor) -> torch.Tensor:
    """A plain tensor for t: DeferredTensor computed, DTensor gathered (a collective on its mesh)."""
    if isinstance(t, DeferredTensor):
        t = t.materialize()
    if _DTENSOR is not None and isinstance(t, _DTENSOR):
        return t.full_tensor()
    return t
