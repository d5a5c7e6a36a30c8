"""Delta encoding of a tensor against a base: only the elements that changed travel, applied exactly.

Between two RL steps most wire-dtype (bf16) elements keep their bits. A `Delta` carries the
changed ones in the cheapest of five forms, chosen per tensor from exact byte counts
(W = index width: 4 bytes where numel <= 2**31, else 8; E = element size; n changed):

    dense    all values                                   numel * E
    indices  W-byte element indices + values              n * (W + E)
    bitmask  one bit per element + values                 ceil(numel / 8) + n * E
    gaps16   one uint16 gap per change + values           n * (2 + E) + W * (gaps >= 65535)
    gaps8    one uint8 gap per change + values            n * (1 + E) + W * (gaps >= 255)

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
committed, its bytes in the wire dtype); the receiver applies into that very tensor, which
must hold exactly that base. Nothing here can tell a wrong base from a right one, and a
delta applied to a wrong base yields a wrong tensor without an error: that is what the
checksums of the whole result are for (`delta_checksum.py` says which to compute, and why).
On the wire a delta is `Delta.to_dict()` (encoding, numel, num_changed, num_escapes) plus
its three tensors, positions, escapes and values, whose sizes follow from those four
numbers; a receiver rebuilds it with `Delta.from_dict`, which checks them.

Encoding and decoding are exact and deterministic on every device: the CPU (torch ops)
and a GPU (`encode_many` and `apply_many` over a whole model in a few Triton launches,
`delta_kernel.py`, torch ops for tensors the kernels cannot take) give the same bytes.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from weightsync.dataplane import delta_kernel
from weightsync.dataplane.delta_kernel import BatchChanges

__all__ = [
    "Delta",
    "Encoding",
    "apply_delta",
    "apply_many",
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


_ORDER = list(Encoding)


def index_width_bytes(numel: int) -> int:
    """Bytes per element index (and per escaped gap): int32 while every index fits."""
    return 4 if numel <= 1 << 31 else 8


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel <= 1 << 31 else torch.int64


def _as_index(t: torch.Tensor, numel: int) -> torch.Tensor:
    want = _index_dtype(numel)
    return t if t.dtype == want else t.to(want)


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
    return _sizes(numel, num_changed, element_size, num_escapes8, num_escapes16)


def _size_row(numel: int, n: int, e: int, escapes8: int, escapes16: int) -> tuple[int, ...]:
    """The wire bytes of each encoding, in _ORDER's order. Unchecked: _build calls it once per
    tensor of a model, every round."""
    w = 4 if numel <= 1 << 31 else 8
    return (
        numel * e,  # dense
        n * (w + e),  # indices
        -(-numel // 8) + n * e,  # bitmask
        n * (2 + e) + w * escapes16,  # gaps16
        n * (1 + e) + w * escapes8,  # gaps8
    )


def _sizes(numel: int, n: int, e: int, escapes8: int, escapes16: int) -> dict[Encoding, int]:
    return dict(zip(_ORDER, _size_row(numel, n, e, escapes8, escapes16)))


def choose_encoding(sizes: dict[Encoding, int], allowed: Iterable[Encoding] | None = None) -> Encoding:
    """The allowed encoding with the fewest bytes, ties to the earlier in `Encoding`; dense is
    always allowed (it needs no base)."""
    order = _ORDER if allowed is None else [e for e in _ORDER if e in {*allowed, Encoding.DENSE}]
    return min(order, key=lambda e: sizes[e])


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
        enc = self.encoding
        if enc is Encoding.DENSE:
            count, dtype = 0, None
        elif enc is Encoding.INDICES:
            count, dtype = n, _index_dtype(numel)
        elif enc is Encoding.BITMASK:
            count, dtype = -(-numel // 8), torch.uint8
        else:
            count, dtype = n, torch.uint8 if enc is Encoding.GAPS8 else torch.int16
        if self.positions.numel() != count or (dtype is not None and self.positions.dtype != dtype):
            raise ValueError(
                f"positions of a {enc.value} delta: expected {count} elements of {dtype}, "
                f"got {self.positions.numel()} of {self.positions.dtype}"
            )
        if enc is Encoding.GAPS8 or enc is Encoding.GAPS16:
            if self.escapes.dtype != _index_dtype(numel) or self.escapes.numel() > n:
                raise ValueError(
                    f"escapes of a {enc.value} delta: expected at most {n} elements of "
                    f"{_index_dtype(numel)}, got {self.escapes.numel()} of {self.escapes.dtype}"
                )
        elif self.escapes.numel():
            raise ValueError(f"a {enc.value} delta has no escapes, got {self.escapes.numel()}")

    @classmethod
    def _unchecked(cls, *fields) -> "Delta":
        """A Delta from fields that the encoder built to the contract: __post_init__'s checks cost
        microseconds per tensor of host time, for hundreds of tensors a round."""
        d = object.__new__(cls)
        for setter, value in zip(_DELTA_SETTERS, fields, strict=True):
            setter(d, value)
        return d

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

    @classmethod
    def from_dict(cls, meta: dict, positions: torch.Tensor, escapes: torch.Tensor, values: torch.Tensor) -> "Delta":
        """The delta a receiver rebuilds from `to_dict()` and the three tensors it received."""
        try:
            encoding = Encoding(meta["encoding"])
        except (KeyError, ValueError):
            raise ValueError(
                f"delta field 'encoding' must be one of {[e.value for e in Encoding]}, got {meta.get('encoding')!r}"
            ) from None
        if meta.get("num_escapes") != escapes.numel():
            raise ValueError(f"delta field 'num_escapes' is {meta.get('num_escapes')!r} but {escapes.numel()} escapes arrived")
        return cls(encoding, int(meta["numel"]), int(meta["num_changed"]), positions, escapes, values)

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


# The slots' own setters: a frozen dataclass refuses setattr, and these skip its per-call lookup.
_DELTA_SETTERS = tuple(Delta.__dict__[name].__set__ for name in ("encoding", "numel", "num_changed", "positions", "escapes", "values"))


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
    for what, t in (("base", base), ("new", new)):
        if not t.is_contiguous():
            raise ValueError(f"{what} tensor {i} must be contiguous (a delta addresses elements in storage order)")


def encode(base: torch.Tensor, new: torch.Tensor, *, allowed: Iterable[Encoding] | None = None) -> Delta:
    """The changes from `base` to `new` (same shape, dtype, device) in the cheapest allowed encoding."""
    return encode_many([base], [new], allowed=allowed)[0]


def encode_many(
    bases: Sequence[torch.Tensor],
    news: Sequence[torch.Tensor],
    *,
    allowed: Iterable[Encoding] | None = None,
) -> list[Delta]:
    """`encode` for many tensors, in one pass per device and dtype (few launches on a GPU).

    The returned deltas may share storage with each other (views of one buffer per batch)
    and, for dense, with `news`: copy them before changing either.
    """
    if len(bases) != len(news):
        raise ValueError(f"{len(bases)} bases but {len(news)} new tensors")
    allowed_list = None if allowed is None else list(allowed)
    out: list[Delta | None] = [None] * len(bases)
    for members in _groups(bases):
        on_gpu = bases[members[0]].is_cuda and delta_kernel.kernel_available()
        # On a GPU, pieces of the batch are launched one after the other and finished in order:
        # the checks and tables of piece k+1, and the choosing and building of piece k's deltas,
        # run on the host while the GPU finds the changes of earlier pieces. In the one-launch
        # design before this, none of that host work overlapped the GPU but the building (on an
        # H100's host: 3 ms before mark began, 1.5 ms between the read-back and compact, 0.7 ms
        # of building past compact's end). A piece the kernels cannot take, and a batch on the
        # CPU (one piece), use torch ops.
        launched = []
        for piece in _pieces(members, bases) if on_gpu else [members]:
            for i in piece:
                _check_pair(i, bases[i], news[i])
            pb, pn = [bases[i] for i in piece], [news[i] for i in piece]
            launched.append((piece, pb, pn, delta_kernel.launch(pb, pn) if on_gpu else None))
        for piece, pb, pn, lc in launched:
            if lc is not None:
                found = delta_kernel.finish(lc)
            else:
                found = _find_changes_torch([_int_view(t, "base") for t in pb], [_int_view(t, "new") for t in pn])
            for i, d in zip(piece, _build(found, pn, allowed_list)):
                out[i] = d
    return out  # type: ignore[return-value]


# A GPU batch is cut into at most this many pieces of at least _MIN_PIECE_BYTES each, in order:
# each piece costs a few launches and a read-back of its own, and the first piece's host work is
# the part nothing overlaps. Llama-8B on an H100 (2026-12-07, one process, encode ms for 1, 2,
# 4, 8, 16 pieces): 17.63, 17.30, 17.42, 17.97, 18.71 (BENCHMARKS.md "Encode in pieces").
_MAX_PIECES = 2
_MIN_PIECE_BYTES = 256 << 20


def _pieces(members: list[int], tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    """Consecutive runs of `members` of about equal bytes (whole tensors)."""
    sizes = [tensors[i].numel() * tensors[i].element_size() for i in members]
    target = max(_MIN_PIECE_BYTES, -(-sum(sizes) // _MAX_PIECES))
    pieces: list[list[int]] = [[]]
    filled = 0
    for i, size in zip(members, sizes):
        if pieces[-1] and filled >= target:
            pieces.append([])
            filled = 0
        pieces[-1].append(i)
        filled += size
    return pieces


def _groups(tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    """Positions of the tensors, grouped by device and dtype (a batch shares both)."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return list(groups.values())


def _find_changes_torch(base_ints: Sequence[torch.Tensor], new_ints: Sequence[torch.Tensor]) -> BatchChanges:
    idx, vals, counts = [], [], []
    for b, n in zip(base_ints, new_ints):
        where = (b != n).nonzero().squeeze(1)
        idx.append(where)
        vals.append(n[where])
        counts.append(where.numel())
    indices = torch.cat(idx)
    gaps, esc8, esc16 = delta_kernel.gaps_and_escapes(indices, counts)
    return BatchChanges(indices, torch.cat(vals), gaps, counts, esc8, esc16, None)


def _select(values: torch.Tensor, mask: torch.Tensor, count: int) -> torch.Tensor:
    """values[mask], where the caller knows how many are set: on a GPU without a read-back."""
    if values.is_cuda:
        try:
            return values[torch.nonzero_static(mask, size=count).squeeze(1)]
        except (NotImplementedError, RuntimeError):  # a torch without nonzero_static on CUDA
            pass
    return values[mask]


def _build(found: BatchChanges, news: Sequence[torch.Tensor], allowed: list[Encoding] | None) -> list[Delta]:
    """Chooses each tensor's encoding from exact byte counts and builds it with batch-wide ops only:
    per-tensor work is slicing, so a model of hundreds of tensors costs few launches. `news`: the
    batch's new tensors (contiguous, one dtype)."""
    counts, esc8, esc16 = found.counts, found.escapes8, found.escapes16
    es = news[0].element_size() if news else 1
    dtype = news[0].dtype if news else torch.uint8
    order = _ORDER if allowed is None else [e for e in _ORDER if e in {*allowed, Encoding.DENSE}]
    # Sizes as plain tuples: a dict keyed by the enum costs a Python-level hash per lookup, a
    # millisecond per round for hundreds of tensors.
    # min keeps the first of equal sizes: ties go to the earlier encoding.
    keep = [i for i, e in enumerate(_ORDER) if e in order]
    chosen = []
    numels = [t.numel() for t in news]
    for k, numel in enumerate(numels):
        sizes = _size_row(numel, counts[k], es, esc8[k], esc16[k])
        chosen.append(_ORDER[min(keep, key=sizes.__getitem__)])
    gaps = found.gaps
    codes8 = escapes8 = None
    if Encoding.GAPS8 in chosen:
        if found.codes8 is not None:
            codes8, escapes8 = found.codes8, found.escape_gaps8
        else:
            codes8 = gaps.clamp(max=_ESCAPE8).to(torch.uint8)
            escapes8 = _select(gaps, gaps >= _ESCAPE8, sum(esc8))
    codes16_of = escapes16_of = None
    if Encoding.GAPS16 in chosen:
        # Over the gaps16 tensors' gaps only: at 2% changed the few that choose it are norms
        # with a handful of changes, and these ops over every gap of a Llama-8B took about
        # 1.5 ms of the H100 after compact.
        g16 = [k for k, e in enumerate(chosen) if e is Encoding.GAPS16]
        starts = _starts(counts)
        sel = torch.cat([gaps[starts[k] : starts[k] + counts[k]] for k in g16])
        codes16 = sel.clamp(max=_ESCAPE16).to(torch.int32).to(torch.int16)
        escapes16 = _select(sel, sel >= _ESCAPE16, sum(esc16[k] for k in g16))
        codes16_of = dict(zip(g16, torch.split(codes16, [counts[k] for k in g16])))
        escapes16_of = dict(zip(g16, torch.split(escapes16, [esc16[k] for k in g16])))
    device = gaps.device
    empty = torch.empty(0, dtype=torch.uint8, device=device)
    # Per-tensor views from one split each (one call, not a Python slice per tensor: on the
    # H200 the per-tensor slicing and checks of a 291-tensor model were milliseconds of host
    # time that no GPU work overlaps).
    values_of = torch.split(found.values.view(dtype), counts)
    codes8_of = torch.split(codes8, counts) if codes8 is not None else None
    escapes8_of = torch.split(escapes8, esc8) if escapes8 is not None else None
    out = []
    lo = 0
    for k, (numel, enc) in enumerate(zip(numels, chosen)):
        n = counts[k]
        values, escapes = values_of[k], empty
        if enc is Encoding.DENSE:
            positions, values = empty, news[k].reshape(-1)
        elif enc is Encoding.INDICES:
            positions = found.indices[lo : lo + n]
            if positions.dtype != _index_dtype(numel):
                positions = positions.to(_index_dtype(numel))
        elif enc is Encoding.BITMASK:
            if found.bit_buffer is not None:
                positions = found.bits(k)
            else:
                mask = torch.zeros(numel, dtype=torch.bool, device=device)
                mask[found.indices[lo : lo + n]] = True
                positions = _pack_bits(mask)
        elif enc is Encoding.GAPS8:
            positions, escapes = codes8_of[k], _as_index(escapes8_of[k], numel)
        else:
            positions, escapes = codes16_of[k], _as_index(escapes16_of[k], numel)
        # Built here to the contract (the tests check every encoding), so not checked again.
        out.append(Delta._unchecked(enc, numel, n, positions, escapes, values))
        lo += n
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
    delta = _on(delta, target.device)
    values = delta.values
    if delta.encoding is Encoding.DENSE:
        ti.copy_(_int_view(values, "values"))
        if base_checksum is None:
            return None
        from weightsync.dataplane.checksum import tensor_checksum

        return tensor_checksum(target)
    idx = delta.indices()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= delta.numel):
        raise ValueError(
            f"a {delta.encoding.value} delta addresses elements outside its target of {delta.numel} elements "
            f"(indices {int(idx.min())} to {int(idx.max())}): a corrupt or foreign delta; nothing was written"
        )
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


def apply_many(targets: Sequence[torch.Tensor], deltas: Sequence[Delta]) -> None:
    """`apply_delta` for many tensors. On a GPU the decode is batch-wide torch ops and one launch
    per encoding scatters every change into every tensor, so hundreds of tensors cost a few launches.

    A delta whose positions point outside its target (a corrupt or foreign delta) raises
    ValueError. Nothing is ever written outside a target, but other targets of the batch may
    already hold their changes: the caller treats the batch as failed (its checksums tell).
    """
    if len(targets) != len(deltas):
        raise ValueError(f"{len(targets)} targets but {len(deltas)} deltas")
    for i, (t, d) in enumerate(zip(targets, deltas)):
        if t.dtype != d.dtype or t.numel() != d.numel:
            raise ValueError(
                f"delta {i} does not fit its target: delta is {d.numel} elements of {d.dtype}, "
                f"target is {t.numel()} elements of {t.dtype}"
            )
        _int_view(t, f"target {i}")
    for members in _groups(targets):
        ints = [_int_view(targets[i], f"target {i}") for i in members]
        es = ints[0].element_size()
        anchor_ptr = ints[0].data_ptr()
        if not (ints[0].is_cuda and delta_kernel.kernel_available()) or any((t.data_ptr() - anchor_ptr) % es for t in ints):
            for i in members:
                apply_delta(targets[i], deltas[i])
            continue
        by_encoding: dict[Encoding, list[int]] = {}
        for k, i in enumerate(members):
            if deltas[i].encoding is Encoding.DENSE:
                ints[k].copy_(_int_view(deltas[i].values.to(ints[k].device), "values"))
            elif deltas[i].num_changed:
                by_encoding.setdefault(deltas[i].encoding, []).append(k)
        for enc, ks in by_encoding.items():
            ds = [_on(deltas[members[k]], ints[0].device) for k in ks]
            positions, bases, running = _decode_batch(enc, ds)
            values = torch.cat([d.values for d in ds]).view(ints[0].dtype)
            refused = delta_kernel.scatter(
                ints[0],
                positions,
                values,
                [d.num_changed for d in ds],
                [d.numel for d in ds],
                [(ints[k].data_ptr() - anchor_ptr) // es for k in ks],
                bases,
                running=running,
            )
            if refused:
                # The kernel wrote every in-range change and none out of range: the targets are
                # now neither base nor new, which the round's checksums will report.
                raise ValueError(
                    f"{refused} changes of {enc.value} deltas {[members[k] for k in ks]} address elements outside "
                    "their targets: corrupt or foreign deltas; those targets are partly written"
                )


def _on(d: Delta, device: torch.device) -> Delta:
    if d.device == device and d.positions.device == device and d.escapes.device == device:
        return d
    return Delta(d.encoding, d.numel, d.num_changed, d.positions.to(device), d.escapes.to(device), d.values.to(device))


def _decode_batch(enc: Encoding, ds: Sequence[Delta]) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(positions, per-delta bases, running) for `delta_kernel.scatter`, with batch-wide ops."""
    device = ds[0].device
    if enc is Encoding.INDICES:
        positions = torch.cat([d.positions for d in ds])
        return positions, torch.zeros(len(ds), dtype=torch.int64, device=device), False
    if enc is Encoding.BITMASK:
        sizes = [d.positions.numel() * 8 for d in ds]
        where = _unpack_bits(torch.cat([d.positions for d in ds]), sum(sizes)).nonzero().squeeze(1)
        total = sum(d.num_changed for d in ds)
        if where.numel() != total:
            raise ValueError(f"bitmask deltas set {where.numel()} bits but count {total} changes: corrupt deltas")
        return where, torch.tensor(_starts(sizes), dtype=torch.int64).to(device), False
    gaps = torch.cat([d.positions for d in ds]).to(torch.int64)
    escape = _ESCAPE8
    if enc is Encoding.GAPS16:
        gaps &= 0xFFFF
        escape = _ESCAPE16
    gaps.masked_scatter_(gaps == escape, torch.cat([d.escapes for d in ds]).to(torch.int64))
    running = torch.cumsum(gaps, 0)
    # Each delta's base: the running sum just before its first change.
    firsts = torch.tensor(_starts([d.num_changed for d in ds]), dtype=torch.int64).to(device)
    return running, torch.cat((running.new_zeros(1), running))[firsts], True


def _starts(counts: Sequence[int]) -> list[int]:
    out, pos = [], 0
    for c in counts:
        out.append(pos)
        pos += c
    return out
