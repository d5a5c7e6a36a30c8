"""The one-call trainer API: `WeightSync(...).push(model, version=step)`.

    sync = WeightSync("coordinator:50051", rendezvous_host="10.0.0.5")
    for step in range(num_steps):
        train_step(model)
        sync.push(model, version=step)      # on every trainer rank; raises RoundFailed naming bad daemons
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from weightsync.control.trainer_client import RoundFailed, RoundReport, SyncTrainerClient
from weightsync.core import Assignment, FailedPrecondition, TensorSpec, WeightsyncError
from weightsync.core.regions import Region
from weightsync.core.routing import box_of
from weightsync.dataplane import GroupCache, TitanToHF, TrainerStore, send_assignment
from weightsync.dataplane import RoundFailed as DataPlaneRoundFailed
from weightsync.dataplane.deferred import DeferredTensor, materialize
from weightsync.dataplane.delta_round import send_delta_round, wire_tensor
from weightsync.dataplane.layout import dtype_name
from weightsync.dataplane.routed import held_region, local_view, send_routed
from weightsync.dataplane.routed_delta import send_routed_delta
from weightsync.dataplane.sender import SendResult
from weightsync.runtime.failpoints import load_failpoints

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed: no DTensors to gather
    DTensor = None

__all__ = ["WeightSync", "named_tensors", "manifest_for"]

log = logging.getLogger(__name__)

Source = torch.nn.Module | Mapping[str, Any] | Iterable[tuple[str, Any]]


def named_tensors(source: Source) -> dict[str, Any]:
    """HF name -> tensor (or DTensor/DeferredTensor) for a module, a state dict or (name, tensor) pairs."""
    if isinstance(source, torch.nn.Module):
        return dict(source.state_dict(keep_vars=False).items())
    if isinstance(source, Mapping):
        return dict(source.items())
    return dict(source)


def manifest_for(tensors: Mapping[str, Any], dtype: str | torch.dtype | Mapping[str, str] | None = None) -> list[TensorSpec]:
    """The manifest to send: each tensor's shape, in the wire dtype (default: its own dtype)."""
    specs = []
    for name, t in tensors.items():
        if isinstance(dtype, Mapping):
            wire = dtype.get(name) or dtype_name(t.dtype)
        elif dtype is not None:
            wire = dtype if isinstance(dtype, str) else dtype_name(dtype)
        else:
            wire = dtype_name(t.dtype)
        specs.append(TensorSpec(name, tuple(t.shape), wire))
    return specs


def _describe_failure(error: Exception, assignment) -> str:
    """The error, with data-plane ranks named by the daemons that host them."""
    reasons = getattr(error, "reasons", None)
    if not isinstance(error, DataPlaneRoundFailed) or not reasons:
        return f"{type(error).__name__}: {error}"
    owner = {r: p.daemon_id for p in assignment.participants for r in p.ranks}
    owner[0] = "trainer"
    parts = [f"{owner.get(rank, '?')} (rank {rank}): {why}" for rank, why in reasons.items()]
    return f"{error.phase} failed: " + "; ".join(parts)


def _needs_gather(t: Any) -> bool:
    """Whether materialising `t` runs a computation or a collective (a DeferredTensor, a DTensor)."""
    return isinstance(t, DeferredTensor) or (DTensor is not None and isinstance(t, DTensor))


def _keeping_gathered(assignment, tensors: Mapping[str, Any], keep: dict[str, torch.Tensor]) -> dict[str, Any]:
    """`tensors`, with every gathered or computed one copied into `keep` (wire dtype, CPU) as the sender materialises it.

    Materialising such a tensor again after the round would be a second gather on rank 0
    alone, which the other trainer ranks never join.
    """
    out = dict(tensors)
    cpu = torch.device("cpu")
    for _, e in assignment.plan.entries():
        t = tensors.get(e.name)
        if t is None or not _needs_gather(t):
            continue

        def compute(t=t, name=e.name, dtype=e.dtype) -> torch.Tensor:
            full = materialize(t)
            keep[name] = wire_tensor(full, dtype, cpu)
            return full

        out[e.name] = DeferredTensor(tuple(t.shape), t.dtype, compute, t.device)
    return out


def _gather_in_plan_order(assignment, tensors: Mapping[str, Any], *, keep: bool) -> dict[str, Any]:
    """The plan's gathered or computed tensors materialised in plan order (a collective per DTensor on every trainer rank).

    With keep (rank 0) they are kept in the wire dtype on CPU, the rest as given; without, each
    is dropped once gathered, so the other ranks never hold the whole model.
    """
    out = dict(tensors)
    cpu = torch.device("cpu")
    for _, e in assignment.plan.entries():
        if e.name in out and _needs_gather(out[e.name]):
            full = materialize(out[e.name])
            if keep:
                out[e.name] = wire_tensor(full, e.dtype, cpu)
            del full
    return out


def _local_base(base: Mapping[str, Any], tensors: Mapping[str, Any], held: Mapping[str, tuple[torch.Tensor, Region]]) -> dict[str, torch.Tensor]:
    """This rank's part of an explicit base: a DTensor's local shard, or the held region cut out of a whole tensor."""
    out = {}
    for n, (_, region) in held.items():
        b = base.get(n)
        if b is None:
            continue
        if (DTensor is not None and isinstance(b, DTensor)) or region.is_whole or tuple(b.shape) != tuple(tensors[n].shape):
            out[n] = local_view(b)
        else:
            out[n] = materialize(b)[tuple(slice(lo, hi) for lo, hi in box_of(region, tuple(b.shape)))]
    return out


def _owned_wire_copy(t: torch.Tensor, dtype: str) -> torch.Tensor:
    """`t` in the wire dtype on CPU, never sharing memory with `t`: the trainer's optimizer writes its parameters in place."""
    w = wire_tensor(t, dtype, torch.device("cpu"))
    return w.clone() if w.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() else w


def _base_misfit(held: Mapping[str, tuple[torch.Tensor, Region]], base: Mapping[str, torch.Tensor]) -> str | None:
    """Why a kept base cannot encode this rank's held tensors (another layout or set of tensors), or None."""
    missing = sorted(n for n in held if n not in base)
    if missing:
        return f"{len(missing)} held tensor(s) not in the base, e.g. {missing[0]!r}"
    for n, (t, _) in held.items():
        if tuple(base[n].shape) != tuple(t.shape):
            return f"{n}: held {list(t.shape)}, base {list(base[n].shape)}"
    return None


def _trainer_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class WeightSync:
    """Pushes a model's weights to every engine as one verified round.

    Call `push` on every trainer rank with the same model (FSDP2/DTensor parameters are
    gathered bucket by bucket); rank 0 of the trainer's own world talks to the
    coordinator and sends, the others only take part in the gathers. The data-plane
    store and group live across rounds and are rebuilt when the fleet changes.
    """

    def __init__(
        self,
        coordinator: str,
        *,
        rendezvous_host: str = "127.0.0.1",
        rendezvous_port: int = 0,
        bind_host: str | None = None,
        transport: str = "gloo",
        dtype: str | torch.dtype | Mapping[str, str] | None = None,
        bucket_size_bytes: int = 0,
        deadline_s: float = 600.0,
        collective_timeout_s: float = 120.0,
        min_daemons: int = 1,
        titan: TitanToHF | None = None,
        device: str | torch.device | None = None,
        credentials=None,
        token: str | None = None,
        delta: bool = False,
        routed: bool = False,
    ) -> None:
        self.rank, self.world_size = _trainer_world()
        # routed=True: every trainer rank is a data-plane sender of what it holds (its DTensor
        # shards, replicated tensors), and receivers get only the regions they need.
        self._routed = routed
        # delta=True keeps the base: the wire-dtype bytes of the last version the fleet committed,
        # on CPU (host memory = the model's size in the wire dtype, plus as much again while a
        # round is in flight, for the candidate base). It advances only when a round COMMITS.
        # With a sharded trainer only rank 0 keeps it, whole: rank 0 encodes whole tensors from
        # the gathers every rank takes part in anyway (as in dense rounds), so the other ranks
        # keep nothing and no extra byte is gathered. Keeping each rank's own shard instead would
        # need either a second gather per round (the base's, to encode on rank 0) or every rank
        # encoding its shard with positions in the whole tensor (a sender per shard: the
        # many-senders design); neither is cheap today. With routed=True every rank is such a
        # sender: each keeps the base of what it holds (its local shard in the wire dtype, on CPU:
        # the model's wire size / number of shards per rank, plus replicated tensors whole, and
        # as much again while a round is in flight) and encodes each piece it sends.
        self._delta = delta
        self._base: dict[str, torch.Tensor] | None = None
        self._base_version: int | None = None
        self._options = dict(
            transport=transport,
            bucket_size_bytes=bucket_size_bytes,
            deadline_s=deadline_s,
            min_daemons=min_daemons,
            collective_timeout_s=collective_timeout_s,
        )
        self._dtype = dtype
        self._titan = titan
        self._device = device
        self._client = SyncTrainerClient(coordinator, credentials=credentials, token=token) if self.rank == 0 else None
        # Every transport needs the store on rank 0: cuda_ipc exchanges its handles through it.
        self._store = (
            TrainerStore(rendezvous_host, rendezvous_port, bind_host=bind_host, timeout_s=collective_timeout_s) if self.rank == 0 else None
        )
        if self.rank == 0:
            self._groups = GroupCache(trainer_store=self._store, device=device)
        else:
            # Other ranks join the data plane only in routed rounds, as senders of what they hold.
            self._groups = GroupCache(device=device) if routed else None
        self.last_report: RoundReport | None = None
        # Rank 0's data-plane figures of its last round (bytes, seconds, phase timeline), for benchmarks.
        self.last_send: SendResult | None = None

    def _prepare(self, source: Source) -> dict[str, Any]:
        tensors = named_tensors(source)
        if self._titan is not None:
            tensors = self._titan.map_state_dict(tensors)
        return tensors

    def push(
        self,
        source: Source,
        *,
        version: int,
        raise_on_failure: bool = True,
        base: Source | None = None,
        base_version: int | None = None,
    ) -> RoundReport | None:
        """One round: BeginUpdate, transfer, verdict. Returns the report on trainer rank 0, None elsewhere.

        With delta=True (after a committed round) or an explicit `base` (the tensors of
        `base_version`, which the engines serve), the coordinator gives a delta against that
        version to every daemon clean on exactly it, and dense to all others, in this one round.
        """
        tensors = self._prepare(source)
        if base is not None:
            base = self._prepare(base)
        if self._routed:
            return self._push_routed(tensors, version, raise_on_failure, base, base_version)
        assignment = None
        error: BaseException | None = None
        if self.rank == 0:
            try:
                if base is not None and base_version is None:
                    raise ValueError("push(base=...): expected base_version, the version whose bytes `base` holds")
                delta_base, delta_version = (base, base_version) if base is not None else (self._base, self._base_version)
                assignment = self._client.begin_update(
                    version,
                    manifest_for(tensors, self._dtype),
                    delta_base_version=delta_version if delta_base is not None else None,
                    rendezvous_host=self._store.host,
                    rendezvous_port=self._store.port,
                    on_round_end=self._on_round_end,
                    **self._options,
                )
            except (WeightsyncError, ValueError) as e:
                # Raised below on every rank (after the broadcast), so no rank waits in a collective.
                error = e
        # Every trainer rank needs the plan to gather in lockstep (or to learn that there is none).
        assignment = self._share_plan(assignment, error)
        if base is not None and assignment.delta_base_version is not None:
            # An explicit base may be sharded too: gathered on every rank, in plan order, before the round.
            base = _gather_in_plan_order(assignment, base, keep=self.rank == 0)
            if self.rank == 0:
                delta_base = base
        if self.rank != 0:
            # Gathers in plan order, in lockstep with rank 0 (which materialises the same tensors,
            # dense or delta alike, also when daemons' needs made the round routed).
            send_assignment(assignment, tensors, None)
            return None
        if assignment.routing is not None:
            # Daemons declared needs: routed even from one sender, rank 0 holding every tensor whole.
            held = {e.name: (materialize(tensors[e.name]), Region.whole()) for _, e in assignment.plan.entries()}
            wire_base = None
            if assignment.delta_base_version is not None:
                wire_base = {
                    e.name: wire_tensor(delta_base[e.name], e.dtype, torch.device("cpu"))
                    for _, e in assignment.plan.entries()
                    if e.name in delta_base
                }
            return self._send_and_commit(assignment, held, version, raise_on_failure, wire_base)
        t0 = time.monotonic()
        try:
            group = self._groups.get(assignment, 0)
            keep: dict[str, torch.Tensor] | None = {} if self._delta else None
            if assignment.delta_base_version is not None:
                wire_base = {
                    e.name: wire_tensor(delta_base[e.name], e.dtype, torch.device("cpu"))
                    for _, e in assignment.plan.entries()
                    if e.name in delta_base
                }
                sent = send_delta_round(assignment, tensors, group, wire_base, device=self._device, keep=keep)
            else:
                source = _keeping_gathered(assignment, tensors, keep) if keep is not None else tensors
                sent = send_assignment(assignment, source, group, device=self._device)
                if keep is not None:
                    keep.update(
                        (e.name, _owned_wire_copy(tensors[e.name], e.dtype))
                        for _, e in assignment.plan.entries()
                        if e.name not in keep
                    )
        except Exception as e:
            reason = f"trainer failed to send: {_describe_failure(e, assignment)}"
            try:
                report = self._client.abort_update(assignment.update_id, reason[:2000])
            except FailedPrecondition:
                # The coordinator ended the round first (a daemon died or failed, and its
                # verdict came in): that verdict is the round's outcome, not an error.
                log.info("update_id=%s had already ended when the trainer aborted it; taking its verdict", assignment.update_id)
                report = self._client.get_round(assignment.update_id)
            except WeightsyncError:
                log.warning("abort of update_id=%s failed", assignment.update_id, exc_info=True)
                raise e from None
            self.last_report = report
            if raise_on_failure:
                raise RoundFailed(report) from e
            return report
        self.last_send = sent
        pause_s = load_failpoints().pause_before_commit_s
        if pause_s:
            time.sleep(pause_s)
        report = self._client.commit_update(assignment, sent.checksums, sender_s=time.monotonic() - t0)
        self.last_report = report
        if keep is not None and report.committed:
            self._base, self._base_version = keep, version
        log.info(
            "push update_id=%s version=%d state=%s bytes=%d seconds=%.3f",
            report.update_id, version, report.state, sent.bytes_sent, time.monotonic() - t0,
        )
        if raise_on_failure:
            report.raise_if_failed()
        return report

    def _push_routed(
        self, tensors: dict[str, Any], version: int, raise_on_failure: bool, base: dict[str, Any] | None, base_version: int | None
    ) -> RoundReport | None:
        """A routed round: every trainer rank declares what it holds and sends exactly that (no gathers).

        A delta against the kept base (delta=True, after a commit) or an explicit `base` (whole
        tensors, or the model's layout: each rank takes only its local part) makes it a routed delta round.
        """
        if base is not None and base_version is None:
            raise ValueError("push(base=...): expected base_version, the version whose bytes `base` holds")
        regions = {n: held_region(t) for n, t in tensors.items()}
        held = {n: (local_view(t), r) for n, t in tensors.items() if (r := regions[n]) is not None}
        holds_here = {n: region for n, (_, region) in held.items()}
        if base is not None:
            local_base, delta_version = _local_base(base, tensors, held), base_version
        else:
            local_base, delta_version = self._base, self._base_version
        misfit = _base_misfit(held, local_base) if local_base is not None and base is None else None
        all_holds = [(holds_here, misfit)]
        if self.world_size > 1:
            all_holds = [None] * self.world_size
            torch.distributed.all_gather_object(all_holds, (holds_here, misfit))
        misfits = [f"rank {r}: {m}" for r, (_, m) in enumerate(all_holds) if m]
        if misfits:
            # The layout changed since the kept base (resharded, other tensors): a delta could not be
            # encoded on every rank, and a refused round would flag every engine. This round is dense.
            log.info("push version=%d is dense: the kept base of version %s no longer fits: %s", version, delta_version, "; ".join(misfits))
            local_base = None
        all_holds = [h for h, _ in all_holds]
        assignment = None
        error: BaseException | None = None
        if self.rank == 0:
            try:
                assignment = self._client.begin_update(
                    version,
                    manifest_for(tensors, self._dtype),
                    holds=dict(enumerate(all_holds)),
                    delta_base_version=delta_version if local_base is not None else None,
                    rendezvous_host=self._store.host,
                    rendezvous_port=self._store.port,
                    on_round_end=self._on_round_end,
                    **self._options,
                )
            except WeightsyncError as e:
                error = e
        assignment = self._share_plan(assignment, error)
        wire_base = None
        if assignment.delta_base_version is not None:
            specs = {e.name: e for _, e in assignment.plan.entries()}
            wire_base = {n: wire_tensor(b, specs[n].dtype, torch.device("cpu")) for n, b in local_base.items() if n in specs}
        return self._send_and_commit(assignment, held, version, raise_on_failure, wire_base)

    def _share_plan(self, assignment: Assignment | None, error: BaseException | None) -> Assignment:
        """Rank 0's plan, or its error raised on every rank (after the broadcast, so no rank waits in a collective)."""
        if self.world_size > 1:
            box = [assignment if error is None else error]
            torch.distributed.broadcast_object_list(box, src=0)
            assignment, error = (box[0], None) if not isinstance(box[0], BaseException) else (None, box[0])
        if error is not None:
            raise error
        return assignment

    def _send_and_commit(
        self, assignment, held: dict, version: int, raise_on_failure: bool, base: dict[str, torch.Tensor] | None = None
    ) -> RoundReport | None:
        """Sends this rank's pieces of a routed round; rank 0 gathers every rank's piece sums and commits (or aborts).

        A routed delta round encodes against `base` (this rank's held tensors of the base
        version, wire dtype). With delta=True every rank's candidate base is what it holds now,
        adopted on every rank once rank 0 says the round committed.
        """
        t0 = time.monotonic()
        routed_world = self._routed and self.world_size > 1
        specs = {e.name: e for _, e in assignment.plan.entries()}
        keep = {n: _owned_wire_copy(t, specs[n].dtype) for n, (t, _) in held.items() if n in specs} if self._delta else None
        outcome: dict | str
        try:
            group = self._groups.get(assignment, self.rank)
            if assignment.delta_base_version is not None:
                sent = send_routed_delta(assignment, self.rank, held, base or {}, group)
            else:
                sent = send_routed(assignment, self.rank, held, group)
            outcome = sent.piece_sums
        except Exception as e:
            outcome = f"trainer rank {self.rank} failed to send: {_describe_failure(e, assignment)}"
            log.warning("update_id=%s: %s", assignment.update_id, outcome, exc_info=True)
        outcomes = [outcome]
        if routed_world:
            outcomes = [None] * self.world_size
            try:
                torch.distributed.all_gather_object(outcomes, outcome)
            except RuntimeError as e:
                # A trainer rank is gone: the round cannot commit.
                outcomes = [outcome, f"trainer ranks could not exchange their piece sums: {e}"]
        failures = [o for o in outcomes if not isinstance(o, dict)]
        if self.rank != 0:
            if keep is not None and routed_world and not failures:
                self._adopt_base(keep, version, None)
            return None
        if failures:
            reason = "; ".join(str(f) for f in failures)[:2000]
            try:
                report = self._client.abort_update(assignment.update_id, reason)
            except FailedPrecondition:
                report = self._client.get_round(assignment.update_id)
            self.last_report = report
            if raise_on_failure:
                raise RoundFailed(report)
            return report
        piece_sums = {(r, i): v for r, sums in enumerate(outcomes) for i, v in sums.items()}
        report = None
        try:
            report = self._client.commit_update(assignment, {}, sender_s=time.monotonic() - t0, piece_sums=piece_sums)
        finally:
            if keep is not None:
                # Also when the commit raised: the other ranks wait for this word.
                self._adopt_base(keep, version, report is not None and report.committed, share=routed_world)
        self.last_report = report
        log.info("push update_id=%s version=%d state=%s routed senders=%d seconds=%.3f",
                 report.update_id, version, report.state, len(outcomes), time.monotonic() - t0)
        if raise_on_failure:
            report.raise_if_failed()
        return report

    def _adopt_base(self, keep: dict[str, torch.Tensor], version: int, committed: bool | None, *, share: bool = True) -> None:
        """Every rank takes `keep` as its base iff the round committed (rank 0 knows; it tells the others)."""
        if share and self.world_size > 1:
            box = [committed]
            torch.distributed.broadcast_object_list(box, src=0)
            committed = box[0]
        if committed:
            self._base, self._base_version = keep, version

    def list_daemons(self):
        """The coordinator's daemons (rank 0 only), e.g. to learn which version the engines serve."""
        return self._client.list_daemons().daemons

    def _on_round_end(self, update_id: str, state: str, reason: str) -> None:
        """On the client's thread: a round that ended without committing is abandoned on the data plane at once."""
        if state != "COMMITTED" and self._groups is not None:
            self._groups.abort(update_id, f"the round ended {state} on the coordinator: {reason}")

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        if self._store is not None:
            self._store.close()

    def __enter__(self) -> "WeightSync":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
