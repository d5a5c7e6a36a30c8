"""Finding and scattering the changed elements of many CUDA tensors in a few Triton launches.

Torch ops (compare, nonzero, gather) measured 0.19 x a device copy on an H200 (FACTS.md):
nonzero reads the compare's output again, and every tensor costs several launches. Here one
batch of tensors (one dtype, one device) costs:

1. `mark`: one program per block of _BLOCK elements of any tensor reads base and new once,
   compares them as integers, and writes the block's change count and its packed change bits
   (one bit per element: 1/16 of a bf16 tensor's bytes).
2. A torch cumsum over the block counts gives every block its first output slot (blocks are
   in tensor order, then element order, so the output is sorted per tensor).
3. `compact`: blocks with changes read their bits back, rank their changed elements, and write
   each one's index and new value to its slot. Only sectors that hold a change are read from
   `new` (masked loads), about a quarter of it at 2% changed bf16.
4. `gaps_and_escapes`: gaps from neighbouring indices and per-tensor escape counts, a few torch
   ops over the changes only.

The bits double as the bitmask encoding, so the chooser and every encoding need no further
pass over the tensors. `scatter` writes values through per-tensor offsets from one anchor, so
one launch applies deltas into many tensors. Tensors the kernels cannot take (numel not a
multiple of 8, an address not 16-byte aligned, no Triton) make `find_changes` return None, and
the caller uses torch ops.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["BatchChanges", "find_changes", "gaps_and_escapes", "kernel_available", "scatter"]

# Elements per program. A multiple of 8 (whole bit bytes); 4096 bf16 = 8 KiB per tensor read.
_BLOCK = 4096
_NUM_WARPS = 8
_COMPACT_WARPS = 8
# Addresses travel as element offsets from one anchor tensor; all offsets are multiples of
# this many bytes, so that the compiler may use 16-byte loads.
_ALIGN_BYTES = 16
_SCATTER_BLOCK = 4096

_lock = threading.Lock()
_layouts: dict[tuple[torch.device, tuple[int, ...], int], "_Layout"] = {}
_MAX_CACHED_LAYOUTS = 64


try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU paths and the torch fallback need no Triton
    triton = tl = None

if triton is not None:
    # At module level: Triton looks up the functions a kernel calls among the module's globals.
    @triton.jit
    def _popcount8(v):
        """Set bits of each int32 holding one byte (bit arithmetic; the interpreter has no popc)."""
        v = v - ((v >> 1) & 0x55)
        v = (v & 0x33) + ((v >> 2) & 0x33)
        return (v + (v >> 4)) & 0x0F


@functools.cache
def _kernels():
    """(mark, compact, scatter), or None where Triton is missing."""
    if triton is None:
        return None

    # mark loads a block as a (BLOCK // 8, 8) tile: each row is one byte of change bits and, for
    # 2-byte elements, one 16-byte load, so packing a row's bits stays inside one thread.

    @triton.jit
    def mark(
        anchor_ptr,
        block_span_ptr,
        block_elem_ptr,
        span_ptr,  # per span: numel, base offset, new offset, bits offset (elements; bits in bytes)
        bits_ptr,
        counts_ptr,
        num_spans,
        BLOCK: tl.constexpr,
        ALIGN: tl.constexpr,
    ):
        pid = tl.program_id(0)
        span = tl.load(block_span_ptr + pid)
        e0 = tl.multiple_of(tl.load(block_elem_ptr + pid), BLOCK)
        n = tl.multiple_of(tl.load(span_ptr + span), 8)
        base_off = tl.multiple_of(tl.load(span_ptr + num_spans + span), ALIGN)
        new_off = tl.multiple_of(tl.load(span_ptr + 2 * num_spans + span), ALIGN)
        bits_off = tl.load(span_ptr + 3 * num_spans + span)
        rows = e0 // 8 + tl.arange(0, BLOCK // 8).to(tl.int64)
        offs = rows[:, None] * 8 + tl.arange(0, 8)[None, :]
        inside = offs < n
        x = tl.load(anchor_ptr + base_off + offs, mask=inside, other=0, eviction_policy="evict_first")
        y = tl.load(anchor_ptr + new_off + offs, mask=inside, other=0, eviction_policy="evict_first")
        changed = (x != y).to(tl.int32)
        packed = tl.sum(changed << tl.arange(0, 8)[None, :], axis=1)
        tl.store(counts_ptr + pid, tl.sum(tl.sum(changed, axis=1), axis=0))
        tl.store(bits_ptr + bits_off + rows, packed.to(tl.uint8), mask=rows < n // 8)

    @triton.jit
    def compact(
        anchor_ptr,
        block_span_ptr,
        block_elem_ptr,
        span_ptr,
        bits_ptr,
        counts_ptr,
        slots_ptr,
        idx_out_ptr,
        val_out_ptr,
        num_spans,
        BLOCK: tl.constexpr,
        ALIGN: tl.constexpr,
        STORE_IDX: tl.constexpr = True,
        STORE_VAL: tl.constexpr = True,
    ):
        pid = tl.program_id(0)
        count = tl.load(counts_ptr + pid)
        if count > 0:
            span = tl.load(block_span_ptr + pid)
            e0 = tl.multiple_of(tl.load(block_elem_ptr + pid), BLOCK)
            n = tl.multiple_of(tl.load(span_ptr + span), 8)
            new_off = tl.multiple_of(tl.load(span_ptr + 2 * num_spans + span), ALIGN)
            bits_off = tl.load(span_ptr + 3 * num_spans + span)
            rows = e0 // 8 + tl.arange(0, BLOCK // 8).to(tl.int64)
            byte = tl.load(bits_ptr + bits_off + rows, mask=rows < n // 8, other=0).to(tl.int32)
            # One byte of bits per row of 8 elements. Everything stays 1-D over the rows (one
            # layout, no conversions): the rows' first slots from a cumsum of their popcounts,
            # then the 8 lanes one at a time, each ranked by the set bits below it.
            per_row = _popcount8(byte)
            first_slot = tl.load(slots_ptr + pid) + tl.cumsum(per_row, axis=0) - per_row
            for j in tl.static_range(8):
                hit = ((byte >> j) & 1) != 0
                slot = first_slot + _popcount8(byte & ((1 << j) - 1))
                offs = rows * 8 + j
                if STORE_VAL:
                    y = tl.load(anchor_ptr + new_off + offs, mask=hit, other=0)
                    tl.store(val_out_ptr + slot, y, mask=hit)
                if STORE_IDX:
                    tl.store(idx_out_ptr + slot, offs.to(idx_out_ptr.dtype.element_ty), mask=hit)
            # (STORE_IDX/STORE_VAL off: bench/delta_codec.py --probe times the parts.)
            if not STORE_IDX and not STORE_VAL:
                tl.store(idx_out_ptr + tl.load(slots_ptr + pid), tl.sum(first_slot, axis=0).to(idx_out_ptr.dtype.element_ty))

    @triton.jit
    def scatter(
        anchor_ptr,
        pos_ptr,
        val_ptr,
        block_span_ptr,
        block_first_ptr,
        starts_ptr,  # per span: first change (num_spans + 1 entries, the last = all changes)
        table_ptr,  # per span: numel, anchor offset, base
        err_ptr,
        num_spans,
        RUNNING: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        span = tl.load(block_span_ptr + pid)
        k = tl.load(block_first_ptr + pid) + tl.arange(0, BLOCK).to(tl.int64)
        first = tl.load(starts_ptr + span)
        inside = k < tl.load(starts_ptr + span + 1)
        pos = tl.load(pos_ptr + k, mask=inside, other=0).to(tl.int64)
        local = pos - tl.load(table_ptr + 2 * num_spans + span)
        if RUNNING:
            # pos is the running sum of gaps: the index adds one per earlier change of the span.
            local += k - first
        ok = inside & (local >= 0) & (local < tl.load(table_ptr + span))
        where = tl.load(table_ptr + num_spans + span) + local
        tl.store(anchor_ptr + where, tl.load(val_ptr + k, mask=ok), mask=ok)
        bad = tl.sum((inside & ~ok).to(tl.int32), axis=0)
        if bad > 0:
            tl.atomic_add(err_ptr, bad)

    return mark, compact, scatter


def kernel_available() -> bool:
    return torch.cuda.is_available() and _kernels() is not None


def _takes(t: torch.Tensor) -> bool:
    return t.is_cuda and t.numel() % 8 == 0 and t.data_ptr() % _ALIGN_BYTES == 0


@dataclass(slots=True)
class _Layout:
    """Per-batch tables that depend only on the tensors' sizes: rounds repeat, so cached."""

    block_span: torch.Tensor
    block_elem: torch.Tensor
    num_blocks: int
    last_block: torch.Tensor  # per span, on the device: its last block (0 for an empty tensor)
    has_blocks: list[bool]
    bits_offs: list[int]


def _layout(device: torch.device, numels: tuple[int, ...], block: int) -> _Layout:
    key = (device, numels, block)
    found = _layouts.get(key)
    if found is not None:
        return found
    blocks = [-(-n // block) for n in numels]
    counts = torch.tensor(blocks, dtype=torch.int64)
    block_span = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
    starts = torch.cumsum(counts, 0) - counts
    block_elem = (torch.arange(block_span.numel(), dtype=torch.int64) - starts[block_span]) * block
    bits_offs, pos = [], 0
    for n in numels:
        bits_offs.append(pos)
        pos += n // 8
    layout = _Layout(
        block_span.to(device),
        block_elem.to(device),
        block_span.numel(),
        (torch.cumsum(counts, 0) - 1).clamp(min=0).to(device),
        [b > 0 for b in blocks],
        bits_offs,
    )
    with _lock:
        if len(_layouts) >= _MAX_CACHED_LAYOUTS:
            _layouts.clear()
        _layouts[key] = layout
    return layout


@dataclass(slots=True)
class BatchChanges:
    """The changed elements of a batch of tensors, concatenated in tensor order.

    indices, values, gaps: per change (local element index, new value as an integer, elements
    skipped since the previous change of its tensor); counts, escapes8, escapes16: per tensor
    (changes, gaps >= 255, gaps >= 65535); bits: per tensor, its packed change mask, or None
    where not made.
    """

    indices: torch.Tensor
    values: torch.Tensor
    gaps: torch.Tensor
    counts: list[int]
    escapes8: list[int]
    escapes16: list[int]
    bits: list[torch.Tensor] | None


def _per_span(running: list[int], present: list[bool]) -> list[int]:
    """Per-tensor amounts from a running total read at each tensor's end (absent: 0, not read)."""
    out, before = [], 0
    values = iter(running)
    for p in present:
        if not p:
            out.append(0)
            continue
        value = next(values)
        out.append(value - before)
        before = value
    return out


def find_changes(base_ints: Sequence[torch.Tensor], new_ints: Sequence[torch.Tensor]) -> BatchChanges | None:
    """The batch's changes through the kernels, or None if any tensor is one they cannot take.

    All tensors are flat, contiguous integer views of one dtype on one CUDA device.
    """
    kernels = _kernels()
    if kernels is None or not base_ints:
        return None
    if not all(_takes(t) for t in (*base_ints, *new_ints)):
        return None
    return _run(kernels, base_ints, new_ints, interpret=False)


def _run(
    kernels,
    base_ints: Sequence[torch.Tensor],
    new_ints: Sequence[torch.Tensor],
    *,
    interpret: bool,
    block: int = _BLOCK,
    probe: tuple[bool, bool] = (True, True),
) -> BatchChanges:
    """Launches mark and compact; `interpret` lets Triton's CPU interpreter run them on CPU tensors
    (where a smaller `block` keeps the test fast and puts more block boundaries in it)."""
    mark, compact, _ = kernels
    device = base_ints[0].device
    es = base_ints[0].element_size()
    anchor = base_ints[0]
    anchor_ptr = anchor.data_ptr()
    numels = tuple(t.numel() for t in base_ints)
    num_spans = len(numels)
    layout = _layout(device, numels, block)
    nb = layout.num_blocks
    table = (
        list(numels)
        + [(t.data_ptr() - anchor_ptr) // es for t in base_ints]
        + [(t.data_ptr() - anchor_ptr) // es for t in new_ints]
        + layout.bits_offs
    )
    span_table = torch.tensor(table, dtype=torch.int64).to(device)
    bits = torch.empty(sum(numels) // 8, dtype=torch.uint8, device=device)
    counts = torch.empty(nb, dtype=torch.int32, device=device)
    extra = {} if interpret else {"num_warps": _NUM_WARPS}
    align = _ALIGN_BYTES // es
    if nb:
        mark[(nb,)](
            anchor, layout.block_span, layout.block_elem, span_table, bits, counts, num_spans,
            BLOCK=block, ALIGN=align, **extra,
        )  # fmt: skip
    ends = torch.cumsum(counts, 0, dtype=torch.int64)
    slots = ends - counts
    present = layout.has_blocks
    at_ends = ends[layout.last_block].tolist() if nb else []
    span_counts = _per_span([v for v, p in zip(at_ends, present) if p], present)
    total = sum(span_counts)
    idx_dtype = torch.int32 if max(numels, default=0) <= 1 << 31 else torch.int64
    idx_out = torch.empty(total, dtype=idx_dtype, device=device)
    val_out = torch.empty(total, dtype=anchor.dtype, device=device)
    if total:
        compact[(nb,)](
            anchor, layout.block_span, layout.block_elem, span_table, bits, counts, slots,
            idx_out, val_out, num_spans, BLOCK=block, ALIGN=align, STORE_IDX=probe[0], STORE_VAL=probe[1],
            **({} if interpret else {"num_warps": _COMPACT_WARPS}),
        )  # fmt: skip
    gaps, esc8, esc16 = gaps_and_escapes(idx_out, span_counts)
    bit_views = [bits[o : o + n // 8] for o, n in zip(layout.bits_offs, numels)]
    return BatchChanges(idx_out, val_out, gaps, span_counts, esc8, esc16, bit_views)


def gaps_and_escapes(indices: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, list[int], list[int]]:
    """Each change's gap (elements skipped since the previous change of its tensor), and per tensor
    the number of gaps >= 255 and >= 65535, for concatenated per-tensor sorted indices: batch-wide ops
    and one read-back."""
    gaps = torch.empty_like(indices)
    total = indices.numel()
    if not total:
        return gaps, [0] * len(counts), [0] * len(counts)
    torch.sub(indices[1:], indices[:-1], out=gaps[1:])
    gaps[1:] -= 1
    starts, pos = [], 0
    for c in counts:
        starts.append(pos)
        pos += c
    firsts = torch.tensor([p for p, c in zip(starts, counts) if c], dtype=torch.int64).to(indices.device)
    gaps[firsts] = indices[firsts]
    ends = torch.tensor([p + c - 1 for p, c in zip(starts, counts) if c], dtype=torch.int64).to(indices.device)
    run_dtype = torch.int32 if total < 1 << 31 else torch.int64
    running = [torch.cumsum(gaps >= limit, 0, dtype=run_dtype)[ends] for limit in (0xFF, 0xFFFF)]
    at_ends = torch.stack(running).tolist()
    present = [c > 0 for c in counts]
    return gaps, _per_span(at_ends[0], present), _per_span(at_ends[1], present)


def scatter(
    anchor: torch.Tensor,
    positions: torch.Tensor,
    values: torch.Tensor,
    counts: Sequence[int],
    numels: Sequence[int],
    anchor_offsets: Sequence[int],
    bases: torch.Tensor,
    *,
    running: bool,
    interpret: bool = False,
) -> int:
    """Writes the changes of a batch of deltas into their tensors in one launch; returns how many it refused.

    Change k belongs to tensor s (counts are per tensor, in order); its element index is
    positions[k] - bases[s] (running=False), or that plus k's rank within its tensor (running=True:
    positions hold running sums of gaps). It lands at anchor_offsets[s] + index elements from
    anchor's first element, unless the index lies outside [0, numels[s]): then it is refused.
    """
    _, _, kernel = _kernels()
    n = positions.numel()
    if not n:
        return 0
    device = anchor.device
    num_spans = len(counts)
    # Programs never straddle two tensors, so each knows its tensor from a table.
    blocks = torch.tensor([-(-c // _SCATTER_BLOCK) for c in counts], dtype=torch.int64)
    block_span = torch.repeat_interleave(torch.arange(num_spans, dtype=torch.int64), blocks)
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    starts_cpu = torch.tensor(starts, dtype=torch.int64)
    block_starts = torch.cumsum(blocks, 0) - blocks
    block_first = starts_cpu[block_span] + (torch.arange(block_span.numel()) - block_starts[block_span]) * _SCATTER_BLOCK
    host = torch.cat((block_span, block_first, starts_cpu, torch.tensor([*numels, *anchor_offsets], dtype=torch.int64)))
    if device.type == "cuda":
        host = host.pin_memory()
    tables = host.to(device, non_blocking=True)
    nb = block_span.numel()
    table = torch.cat((tables[2 * nb + num_spans + 1 :], bases.to(torch.int64)))
    err = torch.zeros(1, dtype=torch.int32, device=device)
    extra = {} if interpret else {"num_warps": 4}
    kernel[(nb,)](
        anchor, positions, values, tables[:nb], tables[nb : 2 * nb], tables[2 * nb : 2 * nb + num_spans + 1],
        table, err, num_spans, RUNNING=running, BLOCK=_SCATTER_BLOCK, **extra,
    )  # fmt: skip
    return int(err.item())
