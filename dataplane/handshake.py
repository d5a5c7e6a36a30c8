"""Opening and closing a round so that every rank agrees, and fails together.

Open: every rank contributes a header built from its own Assignment (protocol, round
counter, update_id, plan digest, sizes, whether it refuses) to one all-gather; every
rank compares each receiver's header with the sender's, so all reach the same verdict
and raise the same RoundFailed, before a single byte of weights moves.

Close: every rank contributes its status and the checksum of every tensor to one more
all-gather; each receiver's sums are compared with the sender's on every rank.

One collective per phase (one store key per rank for cuda_ipc): the handshakes are
the fixed cost of a round, a few milliseconds that small models feel. Reasons for a
rank's own refusal travel through the store, written before it enters the gather, so
whoever learns of the failure can read why.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from collections.abc import Sequence

import torch

from weightsync.core import Assignment, TransferError
from weightsync.dataplane.groups import DataPlaneGroup

__all__ = ["RoundFailed", "close_round", "open_round", "open_round_as_sender"]

log = logging.getLogger(__name__)

_PROTOCOL = 0x5753_4450_0001  # "WSDP" v1
_HEADER_WORDS = 11

# Status codes, ordered so that MAX keeps the most severe.
_OK = 0
_REFUSED = 1  # this round is refused; the group itself is healthy
_OUT_OF_STEP = 2  # ranks disagree on the group's history; rebuild the group


class RoundFailed(TransferError):
    """One or more ranks failed the round; raised identically on every rank."""

    def __init__(self, update_id: str, phase: str, reasons: dict[int, str]) -> None:
        self.update_id = update_id
        self.phase = phase
        self.reasons = dict(sorted(reasons.items()))
        ranks = ", ".join(str(r) for r in self.reasons)
        super().__init__(
            f"update {update_id} failed at {phase} on rank(s) {ranks}",
            [f"rank {r}: {why}" for r, why in self.reasons.items()],
        )


def _digest_words(text: str) -> list[int]:
    raw = bytes.fromhex(text)[:16] if len(text) == 32 and _is_hex(text) else hashlib.sha256(text.encode()).digest()[:16]
    return [int.from_bytes(raw[i : i + 8], "little", signed=True) for i in (0, 8)]


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True


def _words_hex(words: Sequence[int]) -> str:
    return b"".join(int(w).to_bytes(8, "little", signed=True) for w in words).hex()


def _header(group: DataPlaneGroup, assignment: Assignment, refuses: bool) -> list[int]:
    plan = assignment.plan
    return [
        _PROTOCOL,
        group.round_index,
        *_digest_words(assignment.digest),
        *_digest_words(assignment.update_id),
        assignment.version,
        plan.total_bytes,
        len(plan.buckets),
        group.world_size,
        int(refuses),
    ]


def _check_header(got: list[int], want: list[int]) -> tuple[int, str | None]:
    """Compares the sender's header (got) with one receiver's (want); the reason speaks for that receiver."""
    if got[0] != want[0]:
        return _OUT_OF_STEP, f"data-plane protocol {got[0]:#x} from the sender, {want[0]:#x} here: upgrade both sides"
    if got[4:6] != want[4:6]:
        return _OUT_OF_STEP, f"sender is in a different round (update {_words_hex(got[4:6])}, this rank {_words_hex(want[4:6])})"
    if got[1] != want[1]:
        return _OUT_OF_STEP, f"group round {got[1]} on the sender, {want[1]} here: a rank missed a round"
    if got[2:4] != want[2:4]:
        return _REFUSED, f"plan digest mismatch: sender has {_words_hex(got[2:4])}, this rank has {_words_hex(want[2:4])}"
    names = ("version", "total_bytes", "num_buckets", "world_size")
    for name, g, w in zip(names, got[6:10], want[6:10]):
        if g != w:
            return _REFUSED, f"{name} is {g} on the sender and {w} here"
    # Word 10, a rank's own refusal, is not compared: that rank reports it with its reason.
    return _OK, None


def _gather(group: DataPlaneGroup, phase: str, values: list[int]) -> list[list[int]]:
    """Every rank's row of int64 values, on every rank: one all-gather (one store key per rank for cuda_ipc)."""
    what = f"{phase} agreement"
    if not group.uses_collectives:
        prefix = f"gather/{group.round_index}/{phase}"
        group.store.set(f"{prefix}/{group.rank}", struct.pack(f"<{len(values)}q", *values))
        keys = [f"{prefix}/{r}" for r in range(group.world_size)]
        group.wait_keys(keys, what)
        return [list(struct.unpack(f"<{len(b) // 8}q", b)) for b in group.store.multi_get(keys)]
    t = torch.tensor(values, dtype=torch.int64).to(group.device)
    work, rows = group.all_gather(t, what)
    group.wait(work, what)
    return torch.stack(rows).tolist()


def _post_reason(group: DataPlaneGroup, phase: str, reason: str) -> None:
    # Before the gather: whoever learns of the failure from it can read why.
    group.store.set(f"status/{group.round_index}/{phase}/{group.rank}", reason[:4000])


def _reason_of(group: DataPlaneGroup, phase: str, rank: int, own: str | None) -> str:
    if rank == group.rank and own is not None:
        return own
    return group.read_reason(f"status/{group.round_index}/{phase}/{rank}") or "no reason recorded"


def _decide(group: DataPlaneGroup, assignment: Assignment, phase: str, failed: dict[int, tuple[int, str]]) -> None:
    """Every rank reaches the same `failed` from the same rows: raise RoundFailed on all of them, or on none."""
    if not failed:
        return
    if max(code for code, _ in failed.values()) >= _OUT_OF_STEP:
        # The group's collectives still work, but its ranks disagree on its history.
        group.fail(f"ranks out of step at {phase}; the group will be rebuilt")
    log.warning("update %s failed at %s on rank(s) %s (seen by rank %d)", assignment.update_id, phase, sorted(failed), group.rank)
    raise RoundFailed(assignment.update_id, phase, {r: why for r, (_, why) in failed.items()})


def _forget_round(group: DataPlaneGroup, round_index: int) -> None:
    """Deletes a finished round's control keys (during later waits); every rank has read them."""
    if round_index < 1:
        return
    group.forget(
        [
            f"{kind}/{round_index}/{phase}/{r}"
            for kind in ("gather", "status")
            for phase in ("open", "close")
            for r in range(group.world_size)
        ]
    )


def open_round(group: DataPlaneGroup, assignment: Assignment, *, local_problem: str | None = None) -> None:
    """Starts a round on every rank, or raises RoundFailed on every rank. Call before any data moves.

    Every rank contributes its own header (from its own Assignment) to one gather; every
    rank then compares each receiver's header with the sender's, so all reach the same
    verdict. A rank with `local_problem` refuses the round and says why in the store first.
    """
    group.begin_round(assignment.update_id, assignment.deadline_s)
    if group.rank == 0 and not group.uses_collectives:
        # Two rounds back: a slow rank may still read the last round's close rows, but
        # every rank posted its open row of the last round, hence finished the one before.
        _forget_round(group, group.round_index - 2)
    own = None
    if local_problem is not None:
        own = f"{'sender' if group.rank == 0 else 'receiver'} refused: {local_problem}"
        _post_reason(group, "open", own)
    rows = _gather(group, "open", _header(group, assignment, local_problem is not None))
    if any(len(row) != _HEADER_WORDS for row in rows):
        raise group.fail(f"round header of {[len(row) for row in rows]} words: ranks run different protocols")
    failed: dict[int, tuple[int, str]] = {}
    for r, row in enumerate(rows):
        code, reason = (_OK, None) if r == 0 else _check_header(rows[0], row)
        if code == _OK and row[10]:
            code, reason = _REFUSED, None
        if code != _OK:
            failed[r] = (code, reason if reason is not None else _reason_of(group, "open", r, own))
    _decide(group, assignment, "open", failed)


def open_round_as_sender(group: DataPlaneGroup, assignment: Assignment, problem: str | None) -> None:
    """open_round on the sender: a problem with its own tensors refuses the round on every rank,
    then raises ValueError naming it (the caller's mistake, not the peers')."""
    try:
        open_round(group, assignment, local_problem=problem)
    except RoundFailed as e:
        if problem:
            raise ValueError(problem) from e
        raise


def close_round(
    group: DataPlaneGroup,
    assignment: Assignment,
    checksums: Sequence[int] | None,
    *,
    local_problem: str | None = None,
) -> None:
    """Ends a round: every rank shares its checksums (plan order) in one gather, each receiver's
    are compared with the sender's on every rank, and all raise RoundFailed or none does.

    `checksums` are unsigned 64-bit values in plan order; None on a rank that has none to
    compare (it failed and reports `local_problem`).
    """
    names = [e.name for _, e in assignment.plan.entries()]
    if local_problem is not None or checksums is None:
        own = local_problem or "no checksums"
        _post_reason(group, "close", own)
        row = [_REFUSED] + [0] * len(names)
    else:
        own = None
        assert len(checksums) == len(names)
        row = [_OK] + [c - (1 << 64) if c >= 1 << 63 else c for c in checksums]
    rows = _gather(group, "close", row)
    failed: dict[int, tuple[int, str]] = {}
    for r, got in enumerate(rows):
        if len(got) != len(row):
            failed[r] = (_OUT_OF_STEP, f"sent {len(got) - 1} checksums for a plan of {len(names)} tensors")
        elif got[0] != _OK:
            failed[r] = (got[0], _reason_of(group, "close", r, own))
        elif r != 0 and rows[0][0] == _OK and len(rows[0]) == len(row):
            bad = [n for n, s, c in zip(names, rows[0][1:], got[1:]) if s != c]
            if bad:
                shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
                failed[r] = (_REFUSED, f"checksum mismatch on {len(bad)} of {len(names)} tensors: {shown}")
    _decide(group, assignment, "close", failed)
