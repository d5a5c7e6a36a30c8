"""The weightsync worker extension: a mixin that vLLM injects into each of its workers.

Enable with `LLM(..., worker_extension_cls=EXTENSION_CLS)` (or
`--worker-extension-cls` on the server) and drive it with
`collective_rpc("weightsync_<method>", args=...)`; every worker runs the method
and the caller gets one result per worker.

Contract:
* vLLM is imported inside methods only: importing this module needs neither
  vLLM nor a GPU.
* Every attribute is prefixed `weightsync_` / `_weightsync_`: vLLM refuses an
  extension whose names collide with the worker's, and the mixin has no
  __init__ of its own (state lives in `_weightsync_state`, made on first use).
* Arguments and results are plain dicts, lists, strings, numbers and bytes, so
  they survive collective_rpc when the engine runs in another process.
* Methods run on the worker's main thread, between engine steps (vLLM
  executes collective_rpc between steps), so no method races a forward pass.
  The only other thread is the staging receiver, which never touches the model.
* Worker i (vLLM's global worker rank) joins the data plane as `ranks[i]`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from weightsync.core import FailedPrecondition, InvalidArgument, NotFound, TensorSpec, is_full_round
from weightsync.engine.inventory import check_update, dtype_name, inventory_for_engine
from weightsync.engine.payload import assignment_from_dict, decode_tensors
from weightsync.engine.shadow import Shadow

if TYPE_CHECKING:
    import torch

    from weightsync.core import Assignment
    from weightsync.engine.apply import AppliedWeights
    from weightsync.engine.needs import WorkerNeeds
    from weightsync.engine.receive import DataPlaneSeat, StagedUpdate

__all__ = ["EXTENSION_CLS", "WeightsyncWorkerExtension"]

log = logging.getLogger(__name__)

EXTENSION_CLS = "weightsync.engine.extension.WeightsyncWorkerExtension"
# How long closing waits for a staging thread still in a collective (each is
# bounded by its round's collective timeout); discarding never waits: the next
# round's thread queues behind the old one instead of the engine loop.
_CLOSE_WAIT_S = 5.0


def _answers_failure(method):
    """With several workers, a failure is answered as {"rank", "error"} instead of raised.

    vLLM 0.32's multiprocess collective_rpc raises at the first worker that failed and leaves
    the other workers' answers in their queues, so every later call on that engine pairs
    with a stale answer (seen: a round after a failed streamed round got None from worker 1).
    VllmEngine raises once it has every worker's answer. One worker: raised as before.
    """
    import functools

    @functools.wraps(method)
    def wrapper(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return method(self, *args, **kwargs)
        except Exception as e:
            if self.parallel_config.world_size == 1:
                raise
            log.warning("worker %d: %s failed: %s", self.rank, method.__name__, e, exc_info=True)
            return {"rank": self.rank, "error": f"{type(e).__name__}: {e}"}

    return wrapper


@dataclass(slots=True)
class _WorkerState:
    inventory: dict[str, TensorSpec]
    apply_path: str
    version: int | None = None
    dirty: bool = False
    broken: str = ""
    seat: "DataPlaneSeat | None" = None
    staged: "StagedUpdate | None" = None
    num_applies: int = 0
    last_apply_s: float = 0.0
    # Checkpoint names the model's loader skips or rejects, with the reason.
    refused: dict[str, str] = field(default_factory=dict)
    inventory_problems: list[str] = field(default_factory=list)
    # The served weights in checkpoint format: the base of a delta round (shadow.py).
    shadow: Shadow = field(default_factory=Shadow)
    # False: no shadow (its host memory matters more than delta rounds): every round is dense here.
    keep_shadow: bool = True
    # What this worker's loader reads of each inventory tensor (needs.py).
    needs: "WorkerNeeds | None" = None


class WeightsyncWorkerExtension:
    """Receives, verifies and applies weights inside a vLLM worker. See the module docstring."""

    # ------------------------------------------------------------------ state

    def _weightsync(self) -> _WorkerState:
        state = getattr(self, "_weightsync_state", None)
        if state is None:
            from weightsync.engine.apply import select_apply_path
            from weightsync.engine.loader_check import dry_run_loader

            model_config = self.model_config
            specs = inventory_for_engine(model_config.model, model_config.hf_config, dtype_name(model_config.dtype))
            # What the checkpoint holds is not necessarily what the loader takes:
            # the dry run drops what it would skip or reject, so an update naming
            # those is refused before any byte moves, and reports the rest.
            check = dry_run_loader(self.model_runner.get_model(), specs, self.vllm_config)
            refused = {name: "the model's loader skips it" for name in check.skipped}
            refused.update(check.rejected)
            state = _WorkerState(
                inventory={s.name: s for s in check.accepted(specs)},
                apply_path=select_apply_path(self),
                refused=refused,
                inventory_problems=check.problems(),
            )
            if state.inventory_problems:
                log.warning("worker %d: checkpoint and vLLM's loader disagree: %s", self.rank, state.inventory_problems)
            state.needs = _derive_needs(self, list(state.inventory.values()))
            self._weightsync_state = state
        return state

    def _weightsync_rank(self, ranks: Iterable[int], assignment: "Assignment") -> int:
        ranks = [int(r) for r in ranks]
        world_size = self.parallel_config.world_size
        if len(ranks) != world_size:
            raise InvalidArgument(
                f"update {assignment.update_id}: got {len(ranks)} data-plane ranks for an engine of "
                f"{world_size} workers: expected one per worker"
            )
        rank = ranks[self.rank]
        if rank not in assignment.receiver_ranks:
            raise InvalidArgument(
                f"update {assignment.update_id}: rank {rank} of worker {self.rank} is not a receiver rank "
                f"of the round {list(assignment.receiver_ranks)}"
            )
        return rank

    def _weightsync_seat(self) -> "DataPlaneSeat":
        state = self._weightsync()
        if state.seat is None:
            from weightsync.engine.receive import DataPlaneSeat

            state.seat = DataPlaneSeat(device=self.device)
        return state.seat

    # ------------------------------------------------------------------ info and version

    def weightsync_weight_info(self) -> dict[str, Any]:
        """This worker's served version, state and inventory (HF names, shapes, serving dtype)."""
        state = self._weightsync()
        return {
            "rank": self.rank,
            "pid": os.getpid(),
            "served_version": state.version,
            "dirty": state.dirty,
            "broken": state.broken,
            "apply_path": state.apply_path,
            "device": str(self.device),
            "num_applies": state.num_applies,
            "last_apply_s": state.last_apply_s,
            "inventory": [[s.name, list(s.shape), s.dtype] for s in state.inventory.values()],
            "inventory_problems": self._weightsync_inventory_problems(),
            "staged": None if state.staged is None else state.staged.status(),
            # Whether a delta against served_version can be applied here: the coordinator
            # gives a delta only to an engine whose every worker says so.
            "holds_delta_base": state.shadow.held_whole and not (state.dirty or state.broken),
            # ... of at least the regions this worker's loader reads: a routed delta round's base.
            "holds_needed_delta_base": state.shadow.held and not (state.dirty or state.broken),
            "shadow_bytes": state.shadow.nbytes,
        }

    def weightsync_needs(self) -> dict[str, Any]:
        """The region of each inventory tensor this worker's loader reads (needs.py), and the whole fallbacks."""
        state = self._weightsync()
        return {"rank": self.rank, **state.needs.to_dict()}

    def weightsync_set_version(
        self, version: int | None, dirty: bool = False, keep_shadow: bool | None = None
    ) -> dict[str, Any]:
        """Declares which version the weights are (e.g. the checkpoint the engine started from).

        `keep_shadow` (None: unchanged) turns the delta shadow on or off for later rounds.
        """
        state = self._weightsync()
        if version is not None and int(version) < 0:
            raise InvalidArgument(f"version {version}: expected >= 0, or None for unversioned weights")
        state.version = None if version is None else int(version)
        state.dirty = bool(dirty)
        if keep_shadow is not None:
            state.keep_shadow = bool(keep_shadow)
        if state.dirty or not state.keep_shadow:
            state.shadow.drop("the weights were declared dirty" if state.dirty else "the shadow is turned off")
        return {"rank": self.rank, "served_version": state.version, "dirty": state.dirty}

    def _weightsync_inventory_problems(self) -> list[str]:
        """Where the checkpoint and vLLM's loader disagree (loader_check.py); [] when they agree."""
        return list(self._weightsync().inventory_problems)

    # ------------------------------------------------------------------ in-process apply

    def weightsync_apply(
        self,
        payload: "bytes | Mapping[str, torch.Tensor]",
        version: int | None = None,
        require_full: bool = False,
    ) -> dict[str, Any]:
        """Applies tensors passed in the call: safetensors bytes, or a name->tensor dict in-process.

        Returns the checksum of every tensor as received (the data plane's checksum,
        over its bytes), so a caller can compare with what it sent.
        """
        import torch

        from weightsync.dataplane import tensor_checksum

        tensors = decode_tensors(payload) if isinstance(payload, (bytes, bytearray, memoryview)) else dict(payload)
        bad = [name for name, t in tensors.items() if not isinstance(t, torch.Tensor)]
        if bad:
            raise InvalidArgument(
                f"payload values for {bad[:3]} are not tensors: with the engine in another process "
                "send safetensors bytes (weightsync.engine.payload.encode_tensors)"
            )
        state = self._weightsync()
        check_update(
            state.inventory,
            [TensorSpec(name, tuple(t.shape), dtype_name(t.dtype)) for name, t in tensors.items()],
            require_full=require_full,
            refused=state.refused,
        )
        checksums = {name: tensor_checksum(t) for name, t in tensors.items()}
        # Inventory order keeps each module's tensors together, so vLLM rebuilds
        # every module as soon as it can and buffers little.
        ordered = [(name, tensors[name]) for name in state.inventory if name in tensors]
        # Decoded bytes belong to this call; a caller's own tensors may change after it.
        owned = isinstance(payload, (bytes, bytearray, memoryview))
        applied = self._weightsync_write(ordered, version, owned=owned)
        return {
            "rank": self.rank,
            "served_version": state.version,
            "checksums": checksums,
            "num_tensors": applied.num_tensors,
            "bytes_applied": applied.num_bytes,
            "apply_s": applied.apply_s,
        }

    def _weightsync_write(
        self,
        items: list[tuple[str, "torch.Tensor"]],
        version: int | None,
        *,
        owned: bool = True,
        previous: "Mapping[str, torch.Tensor] | None" = None,
        routed: bool = False,
    ) -> "AppliedWeights":
        """Applies checkpoint tensors; on success they become the shadow (`previous`: a shadow a delta round took).

        `routed`: the tensors are full-size staging tensors of a routed round, exact only where
        this worker's loader reads (engine/routed.py): a shadow of the needed regions only."""
        from weightsync.engine.apply import apply_weights

        self._weightsync_check_usable()
        try:
            applied = apply_weights(self, items, path=self._weightsync().apply_path)
        except BaseException as e:
            self._weightsync_note_failure(e)
            raise
        self._weightsync_note_applied(applied, version, [name for name, _ in items])
        state = self._weightsync()
        if state.keep_shadow:
            kept = items if owned else [(n, t.detach().to("cpu", copy=True)) for n, t in items]
            state.shadow.install(((n, t.to("cpu")) for n, t in kept), state.inventory, previous, needed_only=routed)
        return applied

    def _weightsync_check_usable(self) -> None:
        state = self._weightsync()
        if state.broken:
            raise FailedPrecondition(f"worker {self.rank} weights are unusable, restart the engine: {state.broken}")

    def _weightsync_note_failure(self, error: BaseException) -> None:
        """Keeps dirty/broken true to what the model holds after a failed apply."""
        from weightsync.engine.apply import broken_reason, model_touched

        state = self._weightsync()
        state.broken = state.broken or broken_reason(error)
        if model_touched(error):
            state.dirty = True
        # Whatever the model holds now, a delta must not be applied on top of it.
        state.shadow.drop(f"an apply failed: {type(error).__name__}")

    def _weightsync_note_applied(self, applied: "AppliedWeights", version: int | None, names: list[str]) -> None:
        state = self._weightsync()
        # A partial update verifies only its own tensors: it cannot clean a dirty engine.
        state.dirty = state.dirty and not is_full_round(state.inventory, set(names))
        if version is not None:
            state.version = int(version)
        state.num_applies += 1
        state.last_apply_s = applied.apply_s
        log.info(
            "worker %d applied %d tensors (%d bytes) in %.3f s via %s: version %s%s",
            self.rank, applied.num_tensors, applied.num_bytes, applied.apply_s, state.apply_path,
            state.version, " (dirty)" if state.dirty else "",
        )

    # ------------------------------------------------------------------ data plane: staged

    def weightsync_stage(self, assignment: Mapping[str, Any], ranks: list[int], signal_address: str = "") -> dict[str, Any]:
        """Starts receiving a round in the background; returns at once. Idempotent per update_id.

        `signal_address`: the daemon's StageListener; staging progress and its end are sent there
        (engine/stage_signal.py), so the daemon need not poll."""
        from weightsync.engine.receive import StagedUpdate
        from weightsync.engine.stage_signal import notify_stage

        a = assignment_from_dict(assignment)
        rank = self._weightsync_rank(ranks, a)
        self._weightsync_check_usable()
        state = self._weightsync()
        current = state.staged
        if current is not None:
            if current.update_id == a.update_id:
                return current.status()
            log.warning("worker %d: update %s supersedes staged update %s", self.rank, a.update_id, current.update_id)
            current.discard()
            state.staged = None
        # A delta rank patches the shadow itself: it is out of the shadow until the commit applied it.
        base = state.shadow.take() if rank in a.delta_ranks else None
        staged = StagedUpdate(
            a, rank, self._weightsync_seat(), state.inventory, staging_device="cpu", base=base,
            on_change=(lambda status: notify_stage(signal_address, status)) if signal_address else None,
        )
        state.staged = staged
        staged.start()
        return staged.status()

    def weightsync_stage_status(self, update_id: str) -> dict[str, Any]:
        """The staging state of update_id: receiving, staged, failed or discarded, with progress."""
        return self._weightsync_staged(update_id).status()

    @_answers_failure
    def weightsync_commit(self, update_id: str) -> dict[str, Any]:
        """Applies a staged round; run it between engine steps with generation paused."""
        staged = self._weightsync_staged(update_id)
        tensors, result = staged.take()
        self._weightsync().staged = None
        applied = self._weightsync_write(
            tensors, staged.assignment.version, previous=staged.base, routed=staged.assignment.routing is not None
        )
        return self._weightsync_result(staged.assignment, staged.rank, applied, result)

    def weightsync_discard(self, update_id: str) -> dict[str, Any]:
        """Drops a staged (or still receiving) round; a round on the wire ends on every rank."""
        state = self._weightsync()
        staged = state.staged
        if staged is None or staged.update_id != update_id:
            return {"rank": self.rank, "update_id": update_id, "state": "unknown"}
        staged.discard()
        state.staged = None
        return staged.status()

    def _weightsync_staged(self, update_id: str) -> "StagedUpdate":
        staged = self._weightsync().staged
        if staged is None or staged.update_id != update_id:
            held = "none" if staged is None else staged.update_id
            raise NotFound(f"worker {self.rank} has no staged update {update_id!r} (it holds {held})")
        return staged

    # ------------------------------------------------------------------ data plane: streamed

    @_answers_failure
    def weightsync_receive(self, assignment: Mapping[str, Any], ranks: list[int]) -> dict[str, Any]:
        """Receives a round and applies it as it arrives, inside this call; pause generation first."""
        from weightsync.engine.receive import receive_and_apply

        a = assignment_from_dict(assignment)
        rank = self._weightsync_rank(ranks, a)
        self._weightsync_check_usable()
        state = self._weightsync()
        base = state.shadow.take() if rank in a.delta_ranks else None
        kept: list[tuple[str, torch.Tensor]] = []
        try:
            applied, result = receive_and_apply(
                self, a, rank, self._weightsync_seat(), state.inventory, path=state.apply_path, base=base,
                keep=kept if state.keep_shadow else None,
            )
        except BaseException as e:
            self._weightsync_note_failure(e)
            raise
        self._weightsync_note_applied(applied, a.version, [e.name for _, e in a.plan.entries()])
        if state.keep_shadow:
            state.shadow.install(((n, t.to("cpu")) for n, t in kept), state.inventory, base, needed_only=a.routing is not None)
        else:
            # The round took a shadow held from before (e.g. turned off since), now of an older version.
            state.shadow.drop("the shadow is turned off")
        return self._weightsync_result(a, rank, applied, result)

    def _weightsync_result(self, a: "Assignment", rank: int, applied: "AppliedWeights", result: Any) -> dict[str, Any]:
        state = self._weightsync()
        return {
            "rank": self.rank,
            "data_plane_rank": rank,
            "update_id": a.update_id,
            "served_version": state.version,
            "dirty": state.dirty,
            "checksums": dict(result.checksums),
            "num_tensors": applied.num_tensors,
            "bytes_received": result.bytes_received,
            "receive_s": result.receive_s,
            "apply_s": applied.apply_s,
            # A routed round (engine/routed.py): this worker's own pieces, [piece index, sum] (msgpack-safe).
            "piece_sums": [[int(i), int(v)] for i, v in sorted(getattr(result, "piece_sums", {}).items())],
            "staging_peak_bytes": int(getattr(result, "staging_peak_bytes", 0)),
        }

    def weightsync_close(self) -> None:
        """Drops any staged round and leaves the data-plane group."""
        state = getattr(self, "_weightsync_state", None)
        if state is None:
            return
        if state.staged is not None:
            state.staged.discard()
            state.staged = None
        if state.seat is not None:
            state.seat.close(timeout_s=_CLOSE_WAIT_S)
            state.seat = None


def _derive_needs(worker: Any, specs: list[TensorSpec]) -> "WorkerNeeds":
    """needs.derive_needs, or every tensor whole (each a fallback) when the derivation itself fails."""
    from weightsync.core.regions import Region
    from weightsync.engine.needs import WorkerNeeds, derive_needs

    try:
        needs = derive_needs(worker.model_runner.get_model(), specs, worker.vllm_config)
    except Exception as e:  # vLLM internals: whole tensors are always correct, only slower
        log.warning("worker %d: deriving needs failed, every tensor is needed whole: %s", worker.rank, e, exc_info=True)
        why = f"deriving needs failed: {type(e).__name__}: {e}"
        return WorkerNeeds({s.name: Region.whole() for s in specs}, {s.name: why for s in specs})
    if needs.whole_fallbacks:
        log.info("worker %d: %d tensors needed whole (region not derivable), e.g. %s", worker.rank,
                 len(needs.whole_fallbacks), next(iter(needs.whole_fallbacks.items())))
    return needs
