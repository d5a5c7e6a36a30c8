"""Opening and closing a round so that every rank agrees, and fails together.

Open: the sender shares a header (protocol, round counter, update_id, plan digest,
sizes, its own verdict); each receiver compares it with its own Assignment; then
every rank contributes a status code to one MAX all-reduce. Nonzero anywhere means
every rank raises the same RoundFailed, before a single byte of weights moves.

Close: the sender shares the checksum of every tensor; each receiver compares it
with the checksums of the bytes it received, and one more agreement makes the
outcome the same on every rank.

Reasons travel through the store: a failing rank writes its reason before it
enters the agreement, so whoever learns of the failure can read why.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from collections.abc import Sequence

import torch

from weightsync.core import Assignment, TransferError
from weightsync.dataplane.groups import DataPlaneGroup

__all__ = ["RoundFailed", "close_round", "open_round"]

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


def _header(group: DataPlaneGroup, assignment: Assignment, sender_refuses: bool) -> list[int]:
    plan = assignment.plan
    return [
        _PROTOCOL,
        group.round_index,
        *_digest_words(plan.digest),
        *_digest_words(assignment.update_id),
        assignment.version,
        plan.total_bytes,
        len(plan.buckets),
        group.world_size,
        int(sender_refuses),
    ]


def _check_header(got: list[int], want: list[int], assignment: Assignment) -> tuple[int, str | None]:
    if got[0] != want[0]:
        return _OUT_OF_STEP, f"data-plane protocol {got[0]:#x} from the sender, {want[0]:#x} here: upgrade both sides"
    if got[4:6] != want[4:6]:
        return _OUT_OF_STEP, f"sender is in a different round than update {assignment.update_id}"
    if got[1] != want[1]:
        return _OUT_OF_STEP, f"group round {got[1]} on the sender, {want[1]} here: a rank missed a round"
    if got[2:4] != want[2:4]:
        return _REFUSED, (
            f"plan digest mismatch: sender has {_words_hex(got[2:4])}, this rank has {assignment.plan.digest}"
        )
    names = ("version", "total_bytes", "num_buckets", "world_size")
    for name, g, w in zip(names, got[6:10], want[6:10]):
        if g != w:
            return _REFUSED, f"{name} is {g} on the sender and {w} here"
    # got[10], the sender's own refusal, needs no echo: the sender reports it with its reason.
    return _OK, None


def _share(group: DataPlaneGroup, key: str, values: list[int] | None, length: int, what: str) -> list[int]:
    """Rank 0's int64 values, delivered to every rank (a broadcast, or the store for cuda_ipc)."""
    if not group.uses_collectives:
        full_key = f"{key}/{group.round_index}"
        if group.rank == 0:
            assert values is not None and len(values) == length
            group.store.set(full_key, struct.pack(f"<{length}q", *values))
            return values
        group.wait_keys([full_key], what)
        return list(struct.unpack(f"<{length}q", group.store.get(full_key)))
    if group.rank == 0:
        assert values is not None and len(values) == length
        t = torch.tensor(values, dtype=torch.int64, device=group.device)
    else:
        t = torch.zeros(length, dtype=torch.int64, device=group.device)
    group.wait(group.broadcast(t, what), what)
    return t.tolist()


def _agree(group: DataPlaneGroup, assignment: Assignment, phase: str, code: int, reason: str | None) -> None:
    """Every rank learns every rank's status; any failure raises RoundFailed on all of them."""
    prefix = f"status/{group.round_index}/{phase}"
    if not group.uses_collectives:
        # Without collectives each rank posts "code reason" and reads everyone's.
        group.store.set(f"{prefix}/{group.rank}", f"{code} {reason or ''}"[:4000])
        keys = [f"{prefix}/{r}" for r in range(group.world_size)]
        group.wait_keys(keys, f"{phase} agreement")
        posted = [t.decode(errors="replace").partition(" ") for t in group.store.multi_get(keys)]
        codes = [int(c) for c, _, _ in posted]
        failed = {r: why or "no reason recorded" for r, (c, _, why) in enumerate(posted) if int(c)}
    else:
        if reason is not None:
            group.store.set(f"{prefix}/{group.rank}", reason[:4000])
        flags = torch.zeros(group.world_size, dtype=torch.int64, device=group.device)
        flags[group.rank] = code
        group.wait(group.all_reduce_max(flags, f"{phase} agreement"), f"{phase} agreement")
        codes = flags.tolist()
        failed = {}
        for r, c in enumerate(codes):
            if c:
                failed[r] = reason if r == group.rank else (group.read_reason(f"{prefix}/{r}") or "no reason recorded")
    if not failed:
        return
    if max(codes) >= _OUT_OF_STEP:
        # The group's collectives still work, but its ranks disagree on its history.
        group.fail(f"ranks out of step at {phase}; the group will be rebuilt")
    log.warning("update %s failed at %s on rank(s) %s (seen by rank %d)", assignment.update_id, phase, sorted(failed), group.rank)
    raise RoundFailed(assignment.update_id, phase, failed)


def _forget_round(group: DataPlaneGroup, round_index: int) -> None:
    """Deletes a finished round's control keys; every rank read them before that round could close."""
    if round_index < 1:
        return
    keys = [f"header/{round_index}", f"checksums/{round_index}"]
    keys += [f"status/{round_index}/{phase}/{r}" for phase in ("open", "close") for r in range(group.world_size)]
    for key in keys:
        group.store.delete_key(key)


def open_round(group: DataPlaneGroup, assignment: Assignment, *, local_problem: str | None = None) -> None:
    """Starts a round on every rank, or raises RoundFailed on every rank. Call before any data moves.

    A rank with `local_problem` refuses the round; the sender's refusal also travels in the header.
    """
    group.begin_round(assignment.update_id, assignment.deadline_s)
    if group.rank == 0 and not group.uses_collectives:
        # Two rounds back: a slow rank may still read the last round's close statuses, but
        # every rank posted its open status of the last round, hence finished the one before.
        _forget_round(group, group.round_index - 2)
    if group.rank == 0:
        header = _header(group, assignment, local_problem is not None)
        _share(group, "header", header, _HEADER_WORDS, "round header")
        code, reason = (_REFUSED, f"sender refused: {local_problem}") if local_problem else (_OK, None)
    else:
        got = _share(group, "header", None, _HEADER_WORDS, "round header")
        code, reason = _check_header(got, _header(group, assignment, False), assignment)
        if local_problem and code == _OK:
            code, reason = _REFUSED, f"receiver refused: {local_problem}"
    _agree(group, assignment, "open", code, reason)


def close_round(
    group: DataPlaneGroup,
    assignment: Assignment,
    checksums: Sequence[int] | None,
    *,
    local_problem: str | None = None,
) -> None:
    """Ends a round: receivers verify the sender's checksums (plan order), then every rank agrees.

    `checksums` are unsigned 64-bit values in plan order; None on a receiver that has
    none to compare (it failed and reports `local_problem`).
    """
    names = [e.name for _, e in assignment.plan.entries()]
    signed = None
    if group.rank == 0:
        assert checksums is not None and len(checksums) == len(names)
        signed = [c - (1 << 64) if c >= 1 << 63 else c for c in checksums]
    sent = _share(group, "checksums", signed, len(names), "checksum trailer")
    reason = local_problem
    if reason is None and group.rank != 0:
        assert checksums is not None
        bad = [n for n, s, c in zip(names, sent, checksums) if (s & ((1 << 64) - 1)) != c]
        if bad:
            shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
            reason = f"checksum mismatch on {len(bad)} of {len(names)} tensors: {shown}"
    _agree(group, assignment, "close", _REFUSED if reason else _OK, reason)
