"""Finding and scattering the changed elements of many CUDA tensors in a few Triton launches.

Torch ops (compare, nonzero, gather) measured 0.19 x a device copy on an H200 (FACTS.md):
nonzero reads the compare's output again, and every tensor costs several launches. Here one
batch of tensors (one dtype, one device) costs:

1. `mark`: one program per block of _BLOCK elements of any tensor reads base and new once,
   compares them as integers, and writes the block's change count, its packed change bits
   (one bit per element: 1/16 of a bf16 tensor's bytes), and stages its first BLOCK/16
   changes (local position and value, packed in one integer) at their rank, while the values
   are in registers.
   `tally`: per block, its escapes (gaps of 255+ among its own changes) and its first and last
   change, from the staging (from the bits for a block too full to stage).
2. Torch ops over the blocks: a cumsum gives every block its first output slot (blocks are in
   tensor order, then element order, so the output is sorted per tensor), a binary search the
   change before each block's first (`_first_gaps`); then the one read-back, per tensor: its
   changes, escapes8 and escapes16, all that choosing an encoding needs. `launch` queues
   steps 1-2 and the read-back's copy, `finish` waits for it and queues step 3: a caller with
   several batches launches them all first (`delta.encode_many` cuts a model into pieces), so
   that its host work for one batch overlaps the GPU's for the others.
3. `compact`: a block that fits its staging copies it to its output slots in order; a fuller
   one reads its bits back and fills its slots from the output side (thread t finds the t-th
   change of its block by a binary search over the rows' running counts), so stores are whole
   sectors. It writes each change's index, new value, gap and gaps8 code, and the escaped
   gaps; no read-back follows, so the caller's host work overlaps the kernel.

The bits double as the bitmask encoding, so the chooser and every encoding need no further
pass over the tensors. `scatter` writes values through per-tensor offsets from one anchor, so
one launch applies deltas into many tensors. Tensors the kernels cannot take (numel not a
multiple of 8, an address not 16-byte aligned, no Triton) make `find_changes` return None, and
the caller uses torch ops; so do 8-byte elements (they do not pack beside a position).
Measured on an H100 for Llama-8B shapes at 2% changed: BENCHMARKS.md.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["BatchChanges", "Launched", "find_changes", "finish", "gaps_and_escapes", "kernel_available", "launch", "scatter"]

# Elements per program. A multiple of 8 (whole bit bytes); 4096 bf16 = 8 KiB per tensor read.
_BLOCK = 4096
_NUM_WARPS = 8
_COMPACT_WARPS = 1
_TALLY_WARPS = 4
# Blocks per program of tally and compact (see tally).
_TALLY_GROUP = 8
_COMPACT_GROUP = 4
# Output slots per pass of compact (one per thread at 4 warps).
_CHUNK = 128
# mark stages up to BLOCK / _CAP_DIVISOR changes per block (6.25%: a 2% step averages 82 of
# 4096, and a block's count rarely passes twice that); fuller blocks fall back to the search
# from the bits. The staging costs (2 + element size) / 16 bytes per element: 1/8 of a bf16
# tensor's bytes, transient, on the device.
_CAP_DIVISOR = 16
# Addresses travel as element offsets from one anchor tensor; all offsets are multiples of
# this many bytes, so that the compiler may use 16-byte loads.
_ALIGN_BYTES = 16
_SCATTER_BLOCK = 4096
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32}

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

    @triton.jit
    def _emit(
        at, val, p, live, first, last, first_gap, esc_at, idx_out_ptr, val_out_ptr, gap_out_ptr, code_out_ptr,
        esc_out_ptr, CHUNK: tl.constexpr, STORE_IDX: tl.constexpr, STORE_VAL: tl.constexpr,
    ):  # fmt: skip
        """Stores one chunk of a block's changes (element indices `at`, in order, at output slots
        first + p) and its escaped gaps from esc_at on; returns its last index and the next
        escape slot. Each change's predecessor is the thread before it, or `last` (the chunk
        before's); the block's first change has `first_gap`."""
        if STORE_VAL:
            tl.store(val_out_ptr + first + p, val, mask=live)
        if STORE_IDX:
            tl.store(idx_out_ptr + first + p, at.to(idx_out_ptr.dtype.element_ty), mask=live)
            t = tl.arange(0, CHUNK)
            prev = tl.where(t > 0, tl.gather(at, tl.maximum(t - 1, 0), 0), last)
            gap = tl.where(p == 0, first_gap, at - prev - 1)
            tl.store(gap_out_ptr + first + p, gap.to(gap_out_ptr.dtype.element_ty), mask=live)
            tl.store(code_out_ptr + first + p, tl.minimum(gap, 0xFF).to(tl.uint8), mask=live)
            opens = (live & (gap >= 0xFF)).to(tl.int32)
            rank = tl.cumsum(opens, axis=0) - opens
            tl.store(esc_out_ptr + esc_at + rank, gap.to(esc_out_ptr.dtype.element_ty), mask=opens != 0)
            esc_at += tl.sum(opens, axis=0)
        # (STORE_IDX/STORE_VAL off: bench/delta_codec.py --probe times the parts.)
        if not STORE_IDX and not STORE_VAL:
            tl.store(idx_out_ptr + first, tl.sum(at, axis=0).to(idx_out_ptr.dtype.element_ty))
        return tl.max(tl.where(live, at, -1), axis=0), esc_at


@functools.cache
def _kernels():
    """(mark, tally, compact, scatter), or None where Triton is missing."""
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
        stage_ptr,  # per block, CAP entries: (local position << EBITS) | the value's bits
        num_spans,
        BLOCK: tl.constexpr,
        ALIGN: tl.constexpr,
        CAP: tl.constexpr,
        EBITS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        span = tl.load(block_span_ptr + pid)
        e0 = tl.multiple_of(tl.load(block_elem_ptr + pid), BLOCK)
        n = tl.multiple_of(tl.load(span_ptr + span), 8)
        base_off = tl.multiple_of(tl.load(span_ptr + num_spans + span), ALIGN)
        new_off = tl.multiple_of(tl.load(span_ptr + 2 * num_spans + span), ALIGN)
        bits_off = tl.load(span_ptr + 3 * num_spans + span)
        # Addresses as one 64-bit scalar per tensor plus 32-bit offsets inside the block: mark's
        # extra cost over a copy is instructions over every element (staging, above all). On an
        # H100 (2026-12-07): mark 12.78 ms against 12.97 with 64-bit offsets per element.
        local = tl.arange(0, BLOCK // 8)[:, None] * 8 + tl.arange(0, 8)[None, :]
        left = tl.minimum(n - e0, BLOCK).to(tl.int32)
        inside = local < left
        base_at = anchor_ptr + tl.multiple_of(base_off + e0, ALIGN)
        new_at = anchor_ptr + tl.multiple_of(new_off + e0, ALIGN)
        x = tl.load(base_at + local, mask=inside, other=0, eviction_policy="evict_first")
        y = tl.load(new_at + local, mask=inside, other=0, eviction_policy="evict_first")
        changed = (x != y).to(tl.int32)
        packed = tl.sum(changed << tl.arange(0, 8)[None, :], axis=1)
        per_row = tl.sum(changed, axis=1)
        tl.store(counts_ptr + pid, tl.sum(per_row, axis=0))
        row = tl.arange(0, BLOCK // 8)
        tl.store(bits_ptr + (bits_off + e0 // 8) + row, packed.to(tl.uint8), mask=row < left // 8)
        # The values are in registers here; staging the first CAP changes of the block at their
        # rank (a scan over the block's rows, then over a row's 8 lanes inside one thread) spares
        # compact its binary search and its scattered reads of `new`. Position and value travel
        # packed in one integer: one predicated store per element, not two (mark's extra work
        # is instructions over every element, changed or not).
        rank = (tl.cumsum(per_row, axis=0) - per_row)[:, None] + (tl.cumsum(changed, axis=1) - changed)
        keep = (changed != 0) & (rank < CAP)
        ety = stage_ptr.dtype.element_ty
        entry = (local.to(ety) << EBITS) | (y.to(ety) & ((1 << EBITS) - 1))
        tl.store(stage_ptr + pid.to(tl.int64) * CAP + rank, entry, mask=keep)

    @triton.jit
    def tally(
        stage_ptr,
        block_tab_ptr,  # compact's
        bits_ptr,
        counts_ptr,
        info_ptr,  # 3 rows of num_blocks: escapes8 among the block's gaps but its first, its first and last change (local)
        num_blocks,
        BLOCK: tl.constexpr,
        CAP: tl.constexpr,
        EBITS: tl.constexpr,
        GROUP: tl.constexpr,
    ):
        # Per block, what the chooser needs besides the counts, before compact: one read-back
        # then gives every size. A staged block reads its positions (contiguous, about 1% of
        # the tensor's bytes at 2% changed). A fuller block works from its bits: only a row's
        # first change can have a gap of 255+ (a row is 8 elements), and it has one where some
        # change precedes it in the block and none lies in the 255 elements before it, a
        # difference of two running counts. Gaps inside a block stay below BLOCK <= 32768, so
        # 65535+ happens only at a block's first change, which `_first_gaps` handles.
        # GROUP blocks per program, one after the other: a block's work is a few loads, and one
        # program per block (2M for Llama-8B) made scheduling part of the cost. On an H100
        # (2026-12-07, tally/compact ms): 1 and 1 block 2.15 / 2.33, 8 and 4 1.63 / 1.95, 16 and
        # 8 1.61 / 1.91 (BENCHMARKS.md "Encode in pieces").
        for g in range(GROUP):
            pid = tl.program_id(0) * GROUP + g
            if pid < num_blocks:
                count = tl.load(counts_ptr + pid)
                esc = count * 0
                first = count * 0 + BLOCK
                last = count * 0 - 1
                if count > CAP:
                    r = tl.arange(0, BLOCK // 8)
                    left = tl.load(block_tab_ptr + pid)
                    bits_at = tl.load(block_tab_ptr + 2 * num_blocks + pid)
                    byte = tl.load(bits_ptr + bits_at + r, mask=r < left // 8, other=0).to(tl.int32)
                    per_row = _popcount8(byte)
                    excl = tl.cumsum(per_row, axis=0) - per_row
                    lo = tl.zeros_like(byte) + 8
                    hi = tl.zeros_like(byte) - 1
                    for j in tl.static_range(8):
                        on = ((byte >> j) & 1) != 0
                        lo = tl.where(on & (lo == 8), j, lo)
                        hi = tl.where(on, j, hi)
                    p = r * 8 + lo
                    w = tl.maximum(p - 255, 0)
                    before = tl.gather(excl, w // 8, 0) + _popcount8(tl.gather(byte, w // 8, 0) & ((1 << (w % 8)) - 1))
                    opens = (per_row > 0) & (excl > 0) & (p >= 255) & (before == excl)
                    esc = tl.sum(opens.to(tl.int32), axis=0)
                    first = tl.min(tl.where(per_row > 0, p, BLOCK), axis=0)
                    last = tl.max(tl.where(per_row > 0, r * 8 + hi, -1), axis=0)
                elif count > 0:
                    k = tl.arange(0, CAP)
                    at = stage_ptr + pid.to(tl.int64) * CAP + k
                    pos = (tl.load(at, mask=k < count, other=0) >> EBITS).to(tl.int32)
                    prev = (tl.load(at - 1, mask=(k > 0) & (k < count), other=0) >> EBITS).to(tl.int32)
                    esc = tl.sum(((k > 0) & (k < count) & (pos - prev - 1 >= 0xFF)).to(tl.int32), axis=0)
                    first = tl.min(tl.where(k < count, pos, BLOCK), axis=0)
                    last = tl.max(tl.where(k < count, pos, -1), axis=0)
                tl.store(info_ptr + pid, esc)
                tl.store(info_ptr + num_blocks + pid, first)
                tl.store(info_ptr + 2 * num_blocks + pid, last)

    @triton.jit
    def compact(
        anchor_ptr,
        block_tab_ptr,  # 3 rows of num_blocks: elements left in the block's span from e0, e0, bits offset + e0 // 8
        block_span_ptr,
        span_ptr,  # mark's
        num_spans,
        bits_ptr,
        counts_ptr,
        slots_ptr,
        stage_ptr,
        idx_out_ptr,
        val_out_ptr,
        gap_out_ptr,
        code_out_ptr,
        first_gap_ptr,  # per block: the gap before its first change
        esc_first_ptr,  # per block: its first slot in esc_out
        esc_out_ptr,  # the escaped gaps8 gaps, in batch order
        num_blocks,
        BLOCK: tl.constexpr,
        ALIGN: tl.constexpr,
        CHUNK: tl.constexpr,
        LOG2_ROWS: tl.constexpr,
        CAP: tl.constexpr,
        EBITS: tl.constexpr,
        GROUP: tl.constexpr,
        STORE_IDX: tl.constexpr = True,
        STORE_VAL: tl.constexpr = True,
    ):
        # A block of at most CAP changes copies them from mark's staging, in order: contiguous
        # loads and stores. A fuller block finds them from its bits, working from the OUTPUT
        # side: thread t of a chunk produces output slot p = t, finds the row holding the p-th
        # change of the block by a binary search over the rows' running counts and the lane by
        # the bits of that row, and loads the value from `new` (measured: storing from the row
        # side, lane by lane, spent two thirds of its time in partial-sector stores).
        # A block's first gap and first escape slot come from before this launch (`_first_gaps`).
        for g in range(GROUP):  # as in tally
            pid = tl.program_id(0) * GROUP + g
            if pid < num_blocks:
                count = tl.load(counts_ptr + pid)
                left = tl.load(block_tab_ptr + pid)
                e0 = tl.load(block_tab_ptr + num_blocks + pid)
                # The new tensors' offsets come from the span table, the one part of a call that is not
                # a size: the per-block table is then the layout's, cached, with no per-call copy.
                span = tl.load(block_span_ptr + pid)
                new_at = tl.multiple_of(tl.load(span_ptr + 2 * num_spans + span) + e0, ALIGN)
                bits_at = tl.load(block_tab_ptr + 2 * num_blocks + pid)
                first = tl.load(slots_ptr + pid)
                last = e0 * 0
                first_gap = tl.load(first_gap_ptr + pid)
                esc_at = tl.load(esc_first_ptr + pid)
                if count > CAP:
                    r = tl.arange(0, BLOCK // 8)
                    byte = tl.load(bits_ptr + bits_at + r, mask=r < left // 8, other=0).to(tl.int32)
                    per_row = _popcount8(byte)
                    ends = tl.cumsum(per_row, axis=0)  # changes in rows 0..i
                    for c0 in range(0, count, CHUNK):
                        p = c0 + tl.arange(0, CHUNK)
                        live = p < count
                        # The first row whose running count passes p (p < count, so it exists).
                        row = tl.zeros([CHUNK], dtype=tl.int32)
                        for s in tl.static_range(LOG2_ROWS):
                            half = (BLOCK // 8) >> (s + 1)
                            row = tl.where(tl.gather(ends, row + (half - 1), 0) <= p, row + half, row)
                        row = tl.minimum(row, BLOCK // 8 - 1)
                        b = tl.gather(byte, row, 0)
                        k = p - (tl.gather(ends, row, 0) - _popcount8(b))  # rank of p within its row
                        lane = tl.zeros([CHUNK], dtype=tl.int32)
                        for j in tl.static_range(8):
                            is_kth = (((b >> j) & 1) != 0) & (_popcount8(b & ((1 << j) - 1)) == k)
                            lane = tl.where(is_kth, j, lane)
                        at = e0 + row.to(tl.int64) * 8 + lane
                        val = tl.load(anchor_ptr + new_at + at - e0, mask=live, other=0)
                        last, esc_at = _emit(
                            at, val, p, live, first, last, first_gap, esc_at, idx_out_ptr, val_out_ptr, gap_out_ptr,
                            code_out_ptr, esc_out_ptr, CHUNK, STORE_IDX, STORE_VAL,
                        )  # fmt: skip
                elif count > 0:
                    for c0 in range(0, count, CHUNK):
                        p = c0 + tl.arange(0, CHUNK)
                        live = p < count
                        entry = tl.load(stage_ptr + pid.to(tl.int64) * CAP + p, mask=live, other=0)
                        at = e0 + (entry >> EBITS).to(tl.int64)
                        val = (entry & ((1 << EBITS) - 1)).to(val_out_ptr.dtype.element_ty)
                        last, esc_at = _emit(
                            at, val, p, live, first, last, first_gap, esc_at, idx_out_ptr, val_out_ptr, gap_out_ptr,
                            code_out_ptr, esc_out_ptr, CHUNK, STORE_IDX, STORE_VAL,
                        )  # fmt: skip

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

    return mark, tally, compact, scatter


def kernel_available() -> bool:
    return torch.cuda.is_available() and _kernels() is not None


@dataclass(slots=True)
class _Layout:
    """Per-batch tables that depend only on the tensors' sizes: rounds repeat, so cached."""

    block_span: torch.Tensor
    block_elem: torch.Tensor
    num_blocks: int
    last_block: torch.Tensor  # per span, on the device: its last block (0 for an empty tensor)
    has_blocks: list[bool]
    bits_offs: list[int]  # per span, its first byte in the batch's bits; one more entry, the end
    compact_tab: torch.Tensor  # compact's per-block table (3 rows of num_blocks; see its signature)
    span_first_block: torch.Tensor  # per block, on the device: the first block of its span


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
    bits_offs.append(pos)
    span_numel = torch.tensor(numels, dtype=torch.int64)[block_span]
    span_bits = torch.tensor(bits_offs[:-1], dtype=torch.int64)[block_span]
    compact_tab = torch.stack((span_numel - block_elem, block_elem, span_bits + block_elem // 8))
    span_first_block = starts[block_span]
    layout = _Layout(
        block_span.to(device),
        block_elem.to(device),
        block_span.numel(),
        (torch.cumsum(counts, 0) - 1).clamp(min=0).to(device),
        [b > 0 for b in blocks],
        bits_offs,
        compact_tab.to(device),
        span_first_block.to(device),
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
    (changes, gaps >= 255, gaps >= 65535); bit_buffer: every tensor's packed change mask, one
    after the other from the byte offsets in bit_offsets (`bits(k)`), or None where not made;
    codes8: see below.
    """

    indices: torch.Tensor
    values: torch.Tensor
    gaps: torch.Tensor
    counts: list[int]
    escapes8: list[int]
    escapes16: list[int]
    bit_buffer: torch.Tensor | None
    bit_offsets: list[int] | None = None  # per tensor its first byte, and one more entry: the end
    codes8: torch.Tensor | None = None  # the gaps clamped to 255 as uint8 (the gaps8 codes), where made
    escape_gaps8: torch.Tensor | None = None  # the gaps >= 255 in order (the gaps8 escapes), where codes8 is made

    def bits(self, k: int) -> torch.Tensor:
        """Tensor k's packed change mask (bit i of byte i // 8 for element i), a view; where made.
        (Views on demand: slicing all of them costs host time per tensor that few rounds use.)"""
        return self.bit_buffer[self.bit_offsets[k] : self.bit_offsets[k + 1]]


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


def find_changes(bases: Sequence[torch.Tensor], news: Sequence[torch.Tensor]) -> BatchChanges | None:
    """The batch's changes through the kernels, or None if any tensor is one they cannot take.

    All tensors are contiguous, of one dtype and one CUDA device, base and new alike in shape;
    elements compare as integers of their width, whatever the dtype.
    """
    launched = launch(bases, news)
    return None if launched is None else finish(launched)


def launch(bases: Sequence[torch.Tensor], news: Sequence[torch.Tensor]) -> "Launched | None":
    """`find_changes` up to its read-back: mark, tally and the per-tensor counts are queued on the
    GPU and on their way to the host; `finish` takes them on. A caller with several batches
    launches them all first, so that the host's work for batch k+1 and its choosing and building
    of batch k's deltas overlap the GPU's work (one batch's host work is milliseconds for a
    model's hundreds of tensors, on a par with the kernels). None where find_changes says None."""
    kernels = _kernels()
    # 8-byte elements do not pack beside a position into mark's 64-bit staging entries.
    if kernels is None or not bases or not bases[0].is_cuda or bases[0].element_size() > 4:
        return None
    return _launch(kernels, bases, news, interpret=False)


@dataclass(slots=True)
class Launched:
    """One batch between `launch` and `finish`: its device buffers and its counts in flight."""

    kernels: tuple
    anchor: torch.Tensor
    layout: "_Layout"
    numels: tuple[int, ...]
    span_table: torch.Tensor
    bits: torch.Tensor
    counts: torch.Tensor
    stage: torch.Tensor
    slots: torch.Tensor
    first_gaps: torch.Tensor | None
    esc8_first: torch.Tensor | None
    running: torch.Tensor  # on the host: per tensor with blocks, running changes, escapes8, escapes16
    ready: "torch.cuda.Event | None"  # recorded after the copy of `running`; None on the CPU
    block: int
    interpret: bool


def _run(
    kernels,
    bases: Sequence[torch.Tensor],
    news: Sequence[torch.Tensor],
    *,
    interpret: bool,
    block: int = _BLOCK,
    probe: tuple[bool, bool] = (True, True),
) -> BatchChanges | None:
    """Launches mark, tally and compact (None where a tensor's size or address does not suit
    them); `interpret` lets Triton's CPU interpreter run them on CPU tensors (where a smaller
    `block` keeps the test fast and puts more block boundaries in it)."""
    launched = _launch(kernels, bases, news, interpret=interpret, block=block)
    return None if launched is None else finish(launched, probe=probe)


def _launch(
    kernels, bases: Sequence[torch.Tensor], news: Sequence[torch.Tensor], *, interpret: bool, block: int = _BLOCK
) -> Launched | None:
    """mark, tally, the first gaps and the copy of the per-tensor counts to the host, queued.

    The host work before mark is one pass over the tensors' sizes and addresses: nothing the GPU
    does overlaps it in a batch of its own (no per-tensor views: the kernels address every
    tensor from one anchor)."""
    mark, tally, _, _ = kernels
    # Staged positions are int16, and gaps inside a block stay below 65535 (see mark).
    assert 128 <= block <= 1 << 15 and block & (block - 1) == 0, block
    first = bases[0]
    device = first.device
    es = first.element_size()
    numels = tuple(t.numel() for t in bases)
    base_ptrs = [t.data_ptr() for t in bases]
    new_ptrs = [t.data_ptr() for t in news]
    if any(n % 8 for n in numels) or any(p % _ALIGN_BYTES for p in base_ptrs) or any(p % _ALIGN_BYTES for p in new_ptrs):
        return None
    anchor = first.reshape(-1).view(_INT_OF_SIZE[es])
    anchor_ptr = base_ptrs[0]
    num_spans = len(numels)
    layout = _layout(device, numels, block)
    nb = layout.num_blocks
    table = [
        *numels,
        *[(p - anchor_ptr) // es for p in base_ptrs],
        *[(p - anchor_ptr) // es for p in new_ptrs],
        *layout.bits_offs[:-1],
    ]
    span_table = torch.tensor(table, dtype=torch.int64, pin_memory=not interpret).to(device, non_blocking=True)
    bits = torch.empty(layout.bits_offs[-1], dtype=torch.uint8, device=device)
    counts = torch.empty(nb, dtype=torch.int32, device=device)
    cap = block // _CAP_DIVISOR
    ebits = 8 * es
    stage = torch.empty(nb * cap, dtype=torch.int32 if es <= 2 else torch.int64, device=device)
    info = torch.empty((3, nb), dtype=torch.int32, device=device)
    if nb:
        mark[(nb,)](
            anchor, layout.block_span, layout.block_elem, span_table, bits, counts, stage, num_spans,
            BLOCK=block, ALIGN=_ALIGN_BYTES // es, CAP=cap, EBITS=ebits, **({} if interpret else {"num_warps": _NUM_WARPS}),
        )  # fmt: skip
        tally[(-(-nb // _TALLY_GROUP),)](
            stage, layout.compact_tab, bits, counts, info, nb, BLOCK=block, CAP=cap, EBITS=ebits, GROUP=_TALLY_GROUP,
            **({} if interpret else {"num_warps": _TALLY_WARPS}),
        )  # fmt: skip
    ends = torch.cumsum(counts, 0, dtype=torch.int64)
    slots = ends - counts
    first_gaps = esc8_first = None
    if nb:
        first_gaps, esc8_of, esc16_of = _first_gaps(counts, ends, slots, info, layout)
        # The read-back: per tensor, running sums over the blocks read at its last block. On
        # the H200 for Llama-8B's 2M blocks, 1-D cumsums take microseconds where index_add took
        # 1.0 ms (atomics on 291 bins) and a cumsum along rows of a 2 x blocks table 3.6 ms.
        esc8_ends = torch.cumsum(esc8_of, 0)
        esc8_first = esc8_ends - esc8_of
        running = torch.stack((ends, esc8_ends, torch.cumsum(esc16_of, 0)))[:, layout.last_block]
    else:
        running = torch.empty((3, 0), dtype=torch.int64, device=device)
    ready = None
    if not interpret:
        host = torch.empty(running.shape, dtype=running.dtype, pin_memory=True)
        running = host.copy_(running, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
    return Launched(
        kernels, anchor, layout, numels, span_table, bits, counts, stage, slots, first_gaps, esc8_first, running,
        ready, block, interpret,
    )  # fmt: skip


def finish(launched: Launched, *, probe: tuple[bool, bool] = (True, True)) -> BatchChanges:
    """The batch's changes: waits for its counts, allocates its outputs and launches compact.
    compact is the last launch, with no read-back behind it: the caller's host work (choosing and
    building the deltas) overlaps it."""
    lc = launched
    if lc.ready is not None:
        lc.ready.synchronize()
    layout, numels, anchor, block = lc.layout, lc.numels, lc.anchor, lc.block
    device = anchor.device
    es = anchor.element_size()
    num_spans = len(numels)
    nb = layout.num_blocks
    present = layout.has_blocks
    span_counts, esc8, esc16 = (_per_span([v for v, p in zip(row, present) if p], present) for row in lc.running.tolist())
    total = sum(span_counts)
    idx_dtype = torch.int32 if max(numels, default=0) <= 1 << 31 else torch.int64
    idx_out = torch.empty(total, dtype=idx_dtype, device=device)
    val_out = torch.empty(total, dtype=anchor.dtype, device=device)
    if not total:
        empty = torch.empty(0, dtype=idx_dtype, device=device)
        return BatchChanges(idx_out, val_out, empty, span_counts, [0] * num_spans, [0] * num_spans, lc.bits, layout.bits_offs)
    gaps = torch.empty(total, dtype=idx_dtype, device=device)
    codes8 = torch.empty(total, dtype=torch.uint8, device=device)
    escape_gaps8 = torch.empty(sum(esc8), dtype=idx_dtype, device=device)
    cap = block // _CAP_DIVISOR
    lc.kernels[2][(-(-nb // _COMPACT_GROUP),)](
        anchor, layout.compact_tab, layout.block_span, lc.span_table, num_spans, lc.bits, lc.counts, lc.slots,
        lc.stage, idx_out, val_out, gaps, codes8, lc.first_gaps, lc.esc8_first, escape_gaps8, nb,
        BLOCK=block, ALIGN=_ALIGN_BYTES // es, CHUNK=_CHUNK, LOG2_ROWS=(block // 8).bit_length() - 1, CAP=cap,
        EBITS=8 * es, GROUP=_COMPACT_GROUP, STORE_IDX=probe[0], STORE_VAL=probe[1],
        **({} if lc.interpret else {"num_warps": _COMPACT_WARPS}),
    )  # fmt: skip
    return BatchChanges(idx_out, val_out, gaps, span_counts, esc8, esc16, lc.bits, layout.bits_offs, codes8, escape_gaps8)


def _first_gaps(
    counts: torch.Tensor, ends: torch.Tensor, slots: torch.Tensor, info: torch.Tensor, layout: _Layout
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each block's first gap (garbage where it has no changes) and per block its escapes8 and
    escapes16, from mark's per-block counts and first and last changes.

    The outputs are in batch order, so the change before a block's first slot s is the last
    change of the block holding slot s - 1 (a binary search over the running counts), of the
    same tensor when s is past the tensor's first slot (then the gap is the distance), else the
    block's first change is its tensor's first (the gap is its index). No scan over the blocks
    (torch's cummax over 2M blocks measured 5.4 ms on the H200)."""
    has = counts > 0
    # slots - 1 < ends[-1] for every block, so the holder is a block (the first's is 0, unused).
    holder = torch.searchsorted(ends, slots - 1, right=True)
    first_at = layout.block_elem + info[1]
    prev_at = layout.block_elem[holder] + info[2][holder]
    same = slots > slots[layout.span_first_block]
    first = torch.where(same, first_at - prev_at - 1, first_at)
    esc8 = info[0] + (has & (first >= 0xFF))
    esc16 = (has & (first >= 0xFFFF)).to(torch.int32)
    return first, esc8, esc16


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
    kernel = _kernels()[3]
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
