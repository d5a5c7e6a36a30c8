"""Finding and scattering the changed elements of many CUDA tensors in a few Triton launches.

Torch ops (compare, nonzero, gather) measured 0.19 x a device copy on an H200 (FACTS.md):
nonzero reads the compare's output again, and every tensor costs several launches. Here one
batch of tensors (one dtype, one device) costs:

1. `mark`: one program per block of _BLOCK elements of any tensor reads base and new once,
   compares them as integers, and writes the block's change count, its packed change bits
   (one bit per element: 1/16 of a bf16 tensor) and the position of its last change.
2. Torch over the blocks (a few thousand to a few million entries): a cumsum of the counts
   gives every block its first output slot; a running max of the last changes gives every
   block the change before it (blocks are in tensor order, then element order).
3. `compact`: blocks with changes read their bits back, rank their changed elements with a
   block-local cumsum, and write each one's index, new value, gap since the previous change
   and uint8 gap code to its slot, plus the block's escape counts. Only sectors that hold a
   change are read from `new` (masked loads), about a quarter of it at 2% changed bf16.

The bits double as the bitmask encoding and the gaps as both gap encodings, so the chooser
and every encoding need no further pass over the tensors. `scatter` writes values through
per-change element offsets from one anchor, so one launch applies deltas into many tensors.
Tensors the kernels cannot take (numel not a multiple of 8, an address not 16-byte aligned,
no Triton) make `find_changes` return None, and the caller uses torch ops.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["BatchChanges", "find_changes", "kernel_available", "scatter"]

# Elements per program. A multiple of 8 (whole bit bytes); 4096 bf16 = 8 KiB per tensor read.
_BLOCK = 4096
_NUM_WARPS = 8
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
    # Triton resolves the functions a kernel calls among the module's globals, so this one
    # lives here rather than inside _kernels().
    @triton.jit
    def _max(a, b):
        return tl.maximum(a, b)


@functools.cache
def _kernels():
    """(mark, compact, scatter), or None where Triton is missing."""
    if triton is None:
        return None

    @triton.jit
    def mark(
        anchor_ptr,
        block_span_ptr,
        block_elem_ptr,
        span_ptr,  # per span: numel, base offset, new offset, bits offset, first global element
        bits_ptr,
        counts_ptr,
        last_ptr,
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
        first = tl.load(span_ptr + 4 * num_spans + span)
        offs = e0 + tl.arange(0, BLOCK).to(tl.int64)
        inside = offs < n
        x = tl.load(anchor_ptr + base_off + offs, mask=inside, other=0, eviction_policy="evict_first")
        y = tl.load(anchor_ptr + new_off + offs, mask=inside, other=0, eviction_policy="evict_first")
        changed = (x != y).to(tl.int32)
        tl.store(counts_ptr + pid, tl.sum(changed, axis=0))
        tl.store(last_ptr + pid, tl.max(tl.where(changed != 0, first + offs, -1), axis=0))
        shifts = tl.arange(0, 8)
        packed = tl.sum(tl.reshape(changed, (BLOCK // 8, 8)) << shifts[None, :], axis=1)
        byte_offs = e0 // 8 + tl.arange(0, BLOCK // 8).to(tl.int64)
        tl.store(bits_ptr + bits_off + byte_offs, packed.to(tl.uint8), mask=byte_offs < n // 8)

    @triton.jit
    def compact(
        anchor_ptr,
        block_span_ptr,
        block_elem_ptr,
        span_ptr,
        bits_ptr,
        counts_ptr,
        slots_ptr,
        prev_ptr,  # per block: global position of the last change before it, or -1
        idx_out_ptr,
        val_out_ptr,
        gap_out_ptr,
        code8_out_ptr,
        esc_ptr,  # per block: gaps >= 255, then (after num_blocks) gaps >= 65535
        num_spans,
        num_blocks,
        BLOCK: tl.constexpr,
        ALIGN: tl.constexpr,
    ):
        pid = tl.program_id(0)
        count = tl.load(counts_ptr + pid)
        if count > 0:
            span = tl.load(block_span_ptr + pid)
            e0 = tl.multiple_of(tl.load(block_elem_ptr + pid), BLOCK)
            n = tl.load(span_ptr + span)
            new_off = tl.multiple_of(tl.load(span_ptr + 2 * num_spans + span), ALIGN)
            bits_off = tl.load(span_ptr + 3 * num_spans + span)
            first = tl.load(span_ptr + 4 * num_spans + span)
            offs = e0 + tl.arange(0, BLOCK).to(tl.int64)
            inside = offs < n
            byte = tl.load(bits_ptr + bits_off + (offs >> 3), mask=inside, other=0).to(tl.int32)
            changed = (byte >> (offs & 7).to(tl.int32)) & 1
            hit = changed != 0
            rank = tl.cumsum(changed, axis=0) - changed
            slot = tl.load(slots_ptr + pid) + rank
            # The change before each element: element i-1 if it changed, else the one before
            # that (a running max over the block), else the block's predecessor in this tensor.
            before = offs - 1
            in_block = (before >= e0) & (before < n)
            byte_b = tl.load(bits_ptr + bits_off + (before >> 3), mask=in_block, other=0).to(tl.int32)
            changed_b = (((byte_b >> (before & 7).to(tl.int32)) & 1) != 0) & in_block
            prev = tl.associative_scan(tl.where(changed_b, before, -1), 0, _max)
            prev = tl.maximum(prev, tl.maximum(tl.load(prev_ptr + pid) - first, -1))
            gap = offs - prev - 1
            y = tl.load(anchor_ptr + new_off + offs, mask=hit, other=0)
            tl.store(idx_out_ptr + slot, offs.to(idx_out_ptr.dtype.element_ty), mask=hit)
            tl.store(val_out_ptr + slot, y, mask=hit)
            tl.store(gap_out_ptr + slot, gap.to(gap_out_ptr.dtype.element_ty), mask=hit)
            tl.store(code8_out_ptr + slot, tl.minimum(gap, 255).to(tl.uint8), mask=hit)
            tl.store(esc_ptr + pid, tl.sum((hit & (gap >= 255)).to(tl.int32), axis=0))
            tl.store(esc_ptr + num_blocks + pid, tl.sum((hit & (gap >= 65535)).to(tl.int32), axis=0))
        else:
            tl.store(esc_ptr + pid, 0)
            tl.store(esc_ptr + num_blocks + pid, 0)

    @triton.jit
    def scatter(anchor_ptr, off_ptr, val_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        where = tl.load(off_ptr + offs, mask=inside, other=0)
        tl.store(anchor_ptr + where, tl.load(val_ptr + offs, mask=inside), mask=inside)

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
    firsts: list[int]


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
    bits_offs, firsts, pos, first = [], [], 0, 0
    for n in numels:
        bits_offs.append(pos)
        firsts.append(first)
        pos += n // 8
        first += n
    layout = _Layout(
        block_span.to(device),
        block_elem.to(device),
        block_span.numel(),
        (torch.cumsum(counts, 0) - 1).clamp(min=0).to(device),
        [b > 0 for b in blocks],
        bits_offs,
        firsts,
    )
    with _lock:
        if len(_layouts) >= _MAX_CACHED_LAYOUTS:
            _layouts.clear()
        _layouts[key] = layout
    return layout


@dataclass(slots=True)
class BatchChanges:
    """The changed elements of a batch of tensors, concatenated in tensor order.

    indices, values, gaps, codes8: per change (local element index, new value as an integer,
    elements skipped since the previous change of its tensor, that gap clamped to 255);
    counts, escapes8, escapes16: per tensor (changes, gaps >= 255, gaps >= 65535);
    bits: per tensor, its packed change mask, or None where not made.
    """

    indices: torch.Tensor
    values: torch.Tensor
    gaps: torch.Tensor
    codes8: torch.Tensor | None
    counts: list[int]
    escapes8: list[int]
    escapes16: list[int]
    bits: list[torch.Tensor] | None


def _per_span(running: list[int], present: list[bool]) -> list[int]:
    """Per-tensor amounts from a running total read at each tensor's last block."""
    out, before = [], 0
    for value, p in zip(running, present):
        if not p:
            out.append(0)
            continue
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
        + layout.firsts
    )
    span_table = torch.tensor(table, dtype=torch.int64).to(device)
    bits = torch.empty(sum(numels) // 8, dtype=torch.uint8, device=device)
    counts = torch.empty(nb, dtype=torch.int32, device=device)
    last = torch.empty(nb, dtype=torch.int64, device=device)
    extra = {} if interpret else {"num_warps": _NUM_WARPS}
    align = _ALIGN_BYTES // es
    if nb:
        mark[(nb,)](
            anchor, layout.block_span, layout.block_elem, span_table, bits, counts, last, num_spans,
            BLOCK=block, ALIGN=align, **extra,
        )  # fmt: skip
    ends = torch.cumsum(counts, 0, dtype=torch.int64)
    slots = ends - counts
    prev = torch.cummax(last, 0).values.roll(1)
    if nb:
        prev[0] = -1
    span_counts = _per_span(ends[layout.last_block].tolist() if nb else [], layout.has_blocks)
    total = sum(span_counts)
    idx_dtype = torch.int32 if max(numels, default=0) <= 1 << 31 else torch.int64
    idx_out = torch.empty(total, dtype=idx_dtype, device=device)
    val_out = torch.empty(total, dtype=anchor.dtype, device=device)
    gap_out = torch.empty(total, dtype=idx_dtype, device=device)
    code8_out = torch.empty(total, dtype=torch.uint8, device=device)
    esc = torch.zeros(2, nb, dtype=torch.int32, device=device)
    if total:
        compact[(nb,)](
            anchor, layout.block_span, layout.block_elem, span_table, bits, counts, slots, prev,
            idx_out, val_out, gap_out, code8_out, esc, num_spans, nb, BLOCK=block, ALIGN=align, **extra,
        )  # fmt: skip
        running = torch.cumsum(esc, 1, dtype=torch.int64)[:, layout.last_block].tolist()
        esc8, esc16 = _per_span(running[0], layout.has_blocks), _per_span(running[1], layout.has_blocks)
    else:
        esc8 = esc16 = [0] * num_spans
    bit_views = [bits[o : o + n // 8] for o, n in zip(layout.bits_offs, numels)]
    return BatchChanges(idx_out, val_out, gap_out, code8_out, span_counts, esc8, esc16, bit_views)


def scatter(anchor: torch.Tensor, offsets: torch.Tensor, values: torch.Tensor, *, interpret: bool = False) -> None:
    """anchor_storage[offsets[k]] = values[k]: element offsets (int64) from anchor's first element,
    which may point into other tensors of the same dtype on the same device."""
    _, _, kernel = _kernels()
    n = offsets.numel()
    if n:
        extra = {} if interpret else {"num_warps": 4}
        kernel[(-(-n // _SCATTER_BLOCK),)](anchor, offsets, values, n, BLOCK=_SCATTER_BLOCK, **extra)
