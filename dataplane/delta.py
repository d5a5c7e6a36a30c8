"""Delta encoding of a tensor against a base: only the elements that changed travel, applied exactly.

Between two RL steps most wire-dtype (bf16) elements keep their bits. A `Delta` carries the
changed ones in the cheapest of five forms, chosen per tensor from exact byte counts
(W = index width: 4 bytes where numel <= 2**31, else 8; E = element size; n changed):

    dense    all values                                   numel * E
    indices  W-byte element indices + values              n * (W + E)
    bitmask  one bit per element + values                 ceil(numel / 8) + n * E
    gaps8    one uint8 gap per change + values            n * (1 + E) + W * (gaps >= 255)
    gaps16   one uint16 gap per change + values           n * (2 + E) + W * (gaps >= 65535)

A gap is the number of unchanged elements before a change since the previous change (the
first counts from element 0), so indices are the running sum of (gap + 1), minus one. A gap
code of 255 (65535 for gaps16) means "escaped": the gap itself is the next entry of
`escapes`. Keeping escapes in their own array rather than inline leaves the codes one fixed
width, so decoding is a vectorised cumsum, not a byte-by-byte parse. Values always follow
increasing element index. Ties between encodings go to the earlier one in the table (dense
first: it applies with one copy).

"Changed" compares the elements as integers of the element width, never as floats: a NaN
payload, -0.0 vs +0.0 and every other bit pattern is reproduced exactly.

The lockstep contract: a delta is only meaningful against the exact base bytes it was
encoded from. The sender encodes against the base the receiver holds (a version the fleet
committed, its bytes on the wire dtype); the receiver applies into that very tensor. Nothing
here can tell a wrong base from a right one: that is what the checksums are for (see
`apply_delta(base_checksum=...)` and `delta_checksum`).

CUDA tensors of one dtype are encoded by `encode_many` in two Triton kernel launches for the
whole list (`delta_kernel.py`); CPU tensors, and CUDA tensors the kernel cannot take, use
torch ops. Both give the same bytes.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "Delta",
    "Encoding",
    "apply_delta",
    "choose_encoding",
    "encode",
    "encode_many",
    "encoded_nbytes",
]

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# Gap codes that say "look in escapes"; all-ones of the code width.
_ESCAPE8 = 0xFF
_ESCAPE16 = 0xFFFF


class Encoding(enum.Enum):
    """How a tensor's changes travel; the order is the tie-break order of `choose_encoding`."""

    DENSE = "dense"
    INDICES = "indices"
    BITMASK = "bitmask"
    GAPS16 = "gaps16"
    GAPS8 = "gaps8"


def index_width_bytes(numel: int) -> int:
    """Bytes per element index (and per escaped gap): int32 while every index fits."""
    return 4 if numel <= 1 << 31 else 8


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if index_width_bytes(numel) == 4 else torch.int64


def encoded_nbytes(
    numel: int,
    num_changed: int,
    element_size: int,
    *,
    num_escapes8: int,
    num_escapes16: int,
) -> dict[Encoding, int]:
    """The exact wire bytes of each encoding (positions + escapes + values)."""
    if not 0 <= num_changed <= numel:
        raise ValueError(f"num_changed must be in [0, numel={numel}], got {num_changed}")
    if not 0 <= num_escapes16 <= num_escapes8 <= num_changed:
        raise ValueError(
            f"escape counts must satisfy 0 <= num_escapes16 <= num_escapes8 <= num_changed={num_changed}, "
            f"got num_escapes16={num_escapes16}, num_escapes8={num_escapes8}"
        )
    w, e, n = index_width_bytes(numel), element_size, num_changed
    return {
        Encoding.DENSE: numel * e,
        Encoding.INDICES: n * (w + e),
        Encoding.BITMASK: -(-numel // 8) + n * e,
        Encoding.GAPS16: n * (2 + e) + w * num_escapes16,
        Encoding.GAPS8: n * (1 + e) + w * num_escapes8,
    }


def choose_encoding(sizes: dict[Encoding, int], allowed: Iterable[Encoding] | None = None) -> Encoding:
    """The allowed encoding with the fewest bytes; dense is always allowed (it needs no base)."""
    allowed_set = set(Encoding) if allowed is None else {*allowed, Encoding.DENSE}
    return min((e for e in Encoding if e in allowed_set), key=lambda e: sizes[e])


@dataclass(frozen=True, slots=True)
class Delta:
    """One tensor's changes against its base, in one encoding.

    positions: dense: empty; indices: int32/int64 element indices; bitmask: uint8, bit i of
    byte i // 8 (least significant first) set where element i changed; gaps8: uint8 codes;
    gaps16: int16 codes read as uint16. escapes: the full gaps of escaped codes, index width
    (gaps only, else empty). values: the new elements in increasing index order (dense: all
    of them), 1-D, in the tensor's dtype. Every tensor is on one device.
    """

    encoding: Encoding
    numel: int
    num_changed: int
    positions: torch.Tensor
    escapes: torch.Tensor
    values: torch.Tensor

    def __post_init__(self) -> None:
        n, numel = self.num_changed, self.numel
        if not 0 <= n <= numel:
            raise ValueError(f"num_changed must be in [0, numel={numel}], got {n}")
        want_values = numel if self.encoding is Encoding.DENSE else n
        if self.values.dim() != 1 or self.values.numel() != want_values:
            raise ValueError(
                f"values of a {self.encoding.value} delta: expected 1-D with {want_values} elements, "
                f"got shape {list(self.values.shape)}"
            )
        want_positions = {
            Encoding.DENSE: (0, None),
            Encoding.INDICES: (n, _index_dtype(numel)),
            Encoding.BITMASK: (-(-numel // 8), torch.uint8),
            Encoding.GAPS8: (n, torch.uint8),
            Encoding.GAPS16: (n, torch.int16),
        }[self.encoding]
        count, dtype = want_positions
        if self.positions.numel() != count or (dtype is not None and self.positions.dtype != dtype):
            raise ValueError(
                f"positions of a {self.encoding.value} delta: expected {count} elements of {dtype}, "
                f"got {self.positions.numel()} of {self.positions.dtype}"
            )
        if self.encoding in (Encoding.GAPS8, Encoding.GAPS16):
            if self.escapes.dtype != _index_dtype(numel) or self.escapes.numel() > n:
                raise ValueError(
                    f"escapes of a {self.encoding.value} delta: expected at most {n} elements of "
                    f"{_index_dtype(numel)}, got {self.escapes.numel()} of {self.escapes.dtype}"
                )
        elif self.escapes.numel():
            raise ValueError(f"a {self.encoding.value} delta has no escapes, got {self.escapes.numel()}")

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        """Bytes on the wire: equal to `encoded_nbytes(...)[self.encoding]`."""
        return sum(t.numel() * t.element_size() for t in (self.positions, self.escapes, self.values))

    def to_dict(self) -> dict:
        """What a receiver must know besides the three tensors to rebuild the delta."""
        return {
            "encoding": self.encoding.value,
            "numel": self.numel,
            "num_changed": self.num_changed,
            "num_escapes": self.escapes.numel(),
        }

    def indices(self) -> torch.Tensor:
        """The changed element indices, int64, increasing (dense: every index)."""
        dev = self.device
        if self.encoding is Encoding.DENSE:
            return torch.arange(self.numel, device=dev)
        if self.encoding is Encoding.INDICES:
            return self.positions.to(torch.int64)
        if self.encoding is Encoding.BITMASK:
            return _unpack_bits(self.positions, self.numel).nonzero().squeeze(1)
        if self.encoding is Encoding.GAPS8:
            gaps, escape = self.positions.to(torch.int64), _ESCAPE8
        else:
            gaps, escape = self.positions.to(torch.int64) & 0xFFFF, _ESCAPE16
        escaped = gaps == escape
        gaps.masked_scatter_(escaped, self.escapes.to(torch.int64))
        return torch.cumsum(gaps + 1, 0) - 1


def _int_view(t: torch.Tensor, what: str) -> torch.Tensor:
    """The tensor's elements as a flat tensor of integers of the element width (no copy)."""
    if not t.is_contiguous():
        raise ValueError(f"{what} must be contiguous (a delta addresses elements in storage order)")
    return t.reshape(-1).view(_INT_OF_SIZE[t.element_size()])


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool vector as bytes, bit i of byte i // 8 for element i (torch has no packbits)."""
    pad = -mask.numel() % 8
    if pad:
        mask = torch.cat((mask, mask.new_zeros(pad)))
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    return (mask.view(-1, 8).to(torch.uint8) << shifts).sum(1, dtype=torch.uint8)


def _unpack_bits(bits: torch.Tensor, numel: int) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return ((bits.unsqueeze(1) >> shifts) & 1).view(-1)[:numel].bool()


def _check_pair(i: int, base: torch.Tensor, new: torch.Tensor) -> None:
    if base.shape != new.shape or base.dtype != new.dtype or base.device != new.device:
        raise ValueError(
            f"tensor {i}: base and new must match in shape, dtype and device, got base "
            f"{list(base.shape)} {base.dtype} {base.device} and new {list(new.shape)} {new.dtype} {new.device}"
        )


def encode(base: torch.Tensor, new: torch.Tensor, *, allowed: Iterable[Encoding] | None = None) -> Delta:
    """The changes from `base` to `new` (same shape, dtype, device) in the cheapest allowed encoding."""
    return encode_many([base], [new], allowed=allowed)[0]


def encode_many(
    bases: Sequence[torch.Tensor],
    news: Sequence[torch.Tensor],
    *,
    allowed: Iterable[Encoding] | None = None,
) -> list[Delta]:
    """`encode` for many tensors, in one pass per device and dtype (few launches, two syncs on a GPU).

    The returned deltas may share storage with each other (views of one buffer per batch)
    and, for dense, with `news`: copy them before changing either.
    """
    if len(bases) != len(news):
        raise ValueError(f"{len(bases)} bases but {len(news)} new tensors")
    allowed_list = None if allowed is None else list(allowed)
    for i, (b, n) in enumerate(zip(bases, news)):
        _check_pair(i, b, n)
    out: list[Delta | None] = [None] * len(bases)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, b in enumerate(bases):
        groups.setdefault((b.device, b.dtype), []).append(i)
    from weightsync.dataplane import delta_kernel

    for (device, _), members in groups.items():
        base_ints = [_int_view(bases[i], f"base tensor {i}") for i in members]
        new_ints = [_int_view(news[i], f"new tensor {i}") for i in members]
        found = None
        if device.type == "cuda":
            found = delta_kernel.find_changes(base_ints, new_ints)
        if found is None:
            found = _find_changes_torch(base_ints, new_ints)
        deltas = _build(found, new_ints, [news[i].dtype for i in members], allowed_list)
        for i, d in zip(members, deltas):
            out[i] = d
    return out  # type: ignore[return-value]


@dataclass(slots=True)
class Changes:
    """The changed elements of a batch of tensors, as `find_changes` leaves them.

    indices: every tensor's changed element indices (local to the tensor, increasing),
    concatenated; values: the new elements at those indices, concatenated, as integers;
    counts: changes per tensor; bits: per tensor, its packed change mask if already made.
    """

    indices: torch.Tensor
    values: torch.Tensor
    counts: list[int]
    bits: list[torch.Tensor] | None


def _find_changes_torch(base_ints: Sequence[torch.Tensor], new_ints: Sequence[torch.Tensor]) -> Changes:
    idx, vals, counts = [], [], []
    for b, n in zip(base_ints, new_ints):
        where = (b != n).nonzero().squeeze(1)
        idx.append(where)
        vals.append(n[where])
        counts.append(where.numel())
    return Changes(torch.cat(idx), torch.cat(vals), counts, None)


def _build(
    found: Changes,
    new_ints: Sequence[torch.Tensor],
    dtypes: Sequence[torch.dtype],
    allowed: list[Encoding] | None,
) -> list[Delta]:
    """Chooses each tensor's encoding from exact byte counts and builds it, batch-wide ops only."""
    device = found.indices.device
    counts = found.counts
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    total = starts[-1]
    idx = found.indices.to(torch.int64)
    # Gap of each change: the elements skipped since the previous change of the same tensor.
    prev = torch.empty_like(idx)
    if total:
        prev[1:] = idx[:-1]
        firsts = [s for s, c in zip(starts, counts) if c]
        prev[torch.tensor(firsts, dtype=torch.int64).to(device)] = -1
    gaps = idx - prev - 1
    esc8 = gaps >= _ESCAPE8
    esc16 = gaps >= _ESCAPE16
    # Per tensor escape counts from running sums read at each tensor's end: one read-back.
    ends = torch.tensor([s - 1 for s in starts[1:]], dtype=torch.int64).clamp(min=0).to(device)
    if total:
        run = torch.stack((torch.cumsum(esc8, 0), torch.cumsum(esc16, 0)))
        at_ends = run[:, ends].tolist()
    else:
        at_ends = [[0] * len(counts), [0] * len(counts)]
    esc8_counts, esc16_counts = _differences(at_ends[0], counts), _differences(at_ends[1], counts)

    chosen: list[Encoding] = []
    for k, new in enumerate(new_ints):
        sizes = encoded_nbytes(
            new.numel(), counts[k], new.element_size(), num_escapes8=esc8_counts[k], num_escapes16=esc16_counts[k]
        )
        chosen.append(choose_encoding(sizes, allowed))

    codes8 = codes16 = escapes8 = escapes16 = None
    if Encoding.GAPS8 in chosen:
        codes8 = gaps.clamp(max=_ESCAPE8).to(torch.uint8)
        escapes8 = gaps[esc8]
    if Encoding.GAPS16 in chosen:
        codes16 = gaps.clamp(max=_ESCAPE16).to(torch.int32).to(torch.int16)
        escapes16 = gaps[esc16]
    esc8_starts, esc16_starts = _starts(esc8_counts), _starts(esc16_counts)

    out = []
    empty = torch.empty(0, dtype=torch.uint8, device=device)
    for k, (new, dtype, enc) in enumerate(zip(new_ints, dtypes, chosen)):
        numel, n = new.numel(), counts[k]
        lo, hi = starts[k], starts[k + 1]
        values = found.values[lo:hi].view(dtype)
        escapes = empty
        if enc is Encoding.DENSE:
            positions, values = empty, new.view(dtype)
        elif enc is Encoding.INDICES:
            positions = found.indices[lo:hi].to(_index_dtype(numel))
        elif enc is Encoding.BITMASK:
            if found.bits is not None:
                positions = found.bits[k]
            else:
                mask = torch.zeros(numel, dtype=torch.bool, device=device)
                mask[idx[lo:hi]] = True
                positions = _pack_bits(mask)
        elif enc is Encoding.GAPS8:
            positions = codes8[lo:hi]
            escapes = escapes8[esc8_starts[k] : esc8_starts[k] + esc8_counts[k]].to(_index_dtype(numel))
        else:
            positions = codes16[lo:hi]
            escapes = escapes16[esc16_starts[k] : esc16_starts[k] + esc16_counts[k]].to(_index_dtype(numel))
        out.append(Delta(enc, numel, n, positions, escapes, values))
    return out


def _differences(running_at_ends: list[int], counts: list[int]) -> list[int]:
    """Per-tensor counts from a running sum read at each tensor's last change (none: repeat)."""
    out, before = [], 0
    for value, c in zip(running_at_ends, counts):
        if c == 0:
            out.append(0)
            continue
        out.append(value - before)
        before = value
    return out


def _starts(counts: list[int]) -> list[int]:
    out, pos = [], 0
    for c in counts:
        out.append(pos)
        pos += c
    return out


def apply_delta(target: torch.Tensor, delta: Delta, *, base_checksum: int | None = None) -> int | None:
    """Writes the delta into `target` in place; `target` must hold exactly the base it was encoded against.

    With `base_checksum` (the checksum of target's bytes before the apply) it returns the
    checksum of the result, updated from the changed words alone; see `delta_checksum` for
    what that proves and when a full recompute is needed instead.
    """
    if target.dtype != delta.dtype or target.numel() != delta.numel:
        raise ValueError(
            f"delta does not fit its target: delta is {delta.numel} elements of {delta.dtype}, "
            f"target is {target.numel()} elements of {target.dtype}"
        )
    ti = _int_view(target, "target")
    values = delta.values.to(target.device)
    if delta.encoding is Encoding.DENSE:
        ti.copy_(_int_view(values, "values"))
        if base_checksum is None:
            return None
        from weightsync.dataplane.checksum import tensor_checksum

        return tensor_checksum(target)
    moved = Delta(
        delta.encoding,
        delta.numel,
        delta.num_changed,
        delta.positions.to(target.device),
        delta.escapes.to(target.device),
        values,
    )
    idx = moved.indices()
    if base_checksum is None:
        ti[idx] = _int_view(values, "values")
        return None
    from weightsync.dataplane import delta_checksum

    words = delta_checksum.changed_words(idx, target.element_size())
    old = delta_checksum.gather_words(target, words)
    ti[idx] = _int_view(values, "values")
    new = delta_checksum.gather_words(target, words)
    nbytes = target.numel() * target.element_size()
    return delta_checksum.checksum_update(base_checksum, nbytes, words, old, new)
