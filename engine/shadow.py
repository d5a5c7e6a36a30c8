"""A vLLM worker's host-memory shadow of the weights it serves, in checkpoint format: the base of a delta round.

Why a shadow, not vLLM's own sparse patch path (vLLM 0.32 CPU, measured 2026-11-29, NOTES.md):
`model_executor/model_loader/checkpoint_weight_patch.py` (what `sparse_nccl` uses) writes a
NaN-masked full tensor through `model.load_weights` with `Tensor.copy_` patched. On CPU most
linear weights are repacked after loading, and the patch fails there: a fused q_proj ("'Parameter'
object has no attribute 'weight_loader'"), down_proj and the MoE router ("Attempted to load
weight ... into parameter (torch.Size([0]))"); it is not atomic either (earlier tensors are
written). Its contract excludes composed and custom loaders, a changed element that becomes NaN
cannot be sent, and nothing reads back what a repacked parameter holds in checkpoint
coordinates, so no checksum could prove the result. The shadow keeps, per worker, the served
weights as the trainer sent them (checkpoint names, the manifest's wire dtype, CPU): a delta is
applied to it with the codec's own `apply_many`, its checksums are of the whole resulting
tensors (a wrong base shows as a mismatch), and the patched whole tensors go through the very
apply path of a dense round (same pause, same apply units, same recovery).

Invariant: when present, the shadow holds exactly the bytes the model was last written with.
So it is filled only by an apply that succeeded, and a round that patches it takes it out
first (`take`): a failed, discarded or superseded round leaves no shadow behind, and the
engine gets dense weights next (the coordinator already flags every engine of a failed round).

Memory: one copy of the checkpoint in the wire dtype per worker (each TP worker's loader
reads every checkpoint tensor and narrows it itself, so a TP=2 engine holds two copies).
A staged dense round holds the staged copy beside the old shadow until it is applied.

Scope: after a dense round the shadow is WHOLE (every byte of every tensor). After a routed
round (engine/routed.py) it is the round's full-size staging tensors, exact only in the regions
this worker's loader reads (its declared needs; the rest was never written, and costs address
space rather than memory): the base of a routed delta round, which patches only those regions,
but not of a dense-path delta round, which patches whole tensors. The daemon says which it
holds (`holds_delta_base`, `holds_needed_delta_base`) and the coordinator picks accordingly.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from weightsync.core import is_full_round

if TYPE_CHECKING:
    import torch

__all__ = ["Shadow"]

log = logging.getLogger(__name__)


class Shadow:
    """The served weights in checkpoint format, or nothing; owned by one worker's main thread."""

    def __init__(self) -> None:
        self._tensors: dict[str, torch.Tensor] | None = None
        # Every byte is exact (a dense round's), not only the needed regions (a routed round's).
        self._whole = False
        # The scope of the tensors a round took out (`take`), for the shadow it installs.
        self._taken_whole = False

    @property
    def held(self) -> bool:
        """Exact at least in the regions this worker needs: the base of a routed delta round."""
        return self._tensors is not None

    @property
    def held_whole(self) -> bool:
        """Exact in every byte: the base of any delta round."""
        return self._tensors is not None and self._whole

    @property
    def nbytes(self) -> int:
        if self._tensors is None:
            return 0
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def take(self) -> "dict[str, torch.Tensor] | None":
        """Hands the tensors to a round that patches them; the shadow is empty until `install`."""
        tensors, self._tensors = self._tensors, None
        self._taken_whole = self._whole
        return tensors

    def drop(self, why: str) -> None:
        if self._tensors is not None:
            log.info("dropping the weights shadow (%d bytes): %s", self.nbytes, why)
        self._tensors = None

    def install(
        self,
        items: Iterable[tuple[str, "torch.Tensor"]],
        inventory: Iterable[str],
        previous: "Mapping[str, torch.Tensor] | None" = None,
        *,
        needed_only: bool = False,
    ) -> None:
        """After a successful apply of `items` (tensors this shadow may own): they are what the model holds now.

        A round that covers the inventory makes a shadow of its tensors; a partial round updates
        `previous` (the shadow it took, or the one held), and without one leaves none: the
        tensors it did not carry are unknown here. `needed_only`: the items are exact only in
        this worker's needed regions (a routed round), and so is the shadow they make.
        """
        new = dict(items)
        base_whole = self._taken_whole if previous is not None else self._whole
        base = previous if previous is not None else self._tensors
        if is_full_round(inventory, new):
            self._tensors, self._whole = new, not needed_only
        elif base is not None:
            self._tensors, self._whole = {**base, **new}, base_whole and not needed_only
        else:
            self._tensors, self._whole = None, False
