"""Finding the changed elements of many CUDA tensors in two Triton kernel launches.

Torch ops (compare, nonzero, gather) measured 0.19 x a device copy on an H200 (FACTS.md):
nonzero reads the compare's output again, and every tensor costs several launches. Here:

1. `mark`: one program per block of _BLOCK elements of any tensor reads base and new once,
   compares them as integers, and writes the block's change count and its packed change
   bits (one bit per element: 1/16 of a bf16 tensor's bytes).
2. A torch cumsum over the block counts gives every block its first output slot (blocks are
   in tensor order, then element order, so the output is sorted per tensor).
3. `compact`: blocks with changes read their bits back, rank their changed elements with a
   block-local cumsum, and write each changed element's index and new value to its slot.
   Only sectors holding a change are read from `new` (masked loads), about a quarter of it at
   2% changed bf16.

The bits double as the bitmask encoding, so that one costs nothing more. Tensors the kernel
cannot take (numel not a multiple of 8, an address not 16-byte aligned, no Triton) make
`find_changes` return None and the caller uses torch ops.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

__all__ = ["find_changes", "kernel_available"]

# Elements per program. A multiple of 8 (whole bit bytes); 4096 bf16 = 8 KiB per tensor read.
_BLOCK = 4096
_NUM_WARPS = 8
# Addresses travel as element offsets from one anchor tensor; all offsets are multiples of
# this many elements (16 bytes for bf16), so the compiler may use 16-byte loads.
_ALIGN_BYTES = 16


@functools.cache
def _kernels():
    """(mark, compact), or None where Triton is missing."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

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
        offs = e0 + tl.arange(0, BLOCK).to(tl.int64)
        inside = offs < n
        x = tl.load(anchor_ptr + base_off + offs, mask=inside, other=0, eviction_policy="evict_first")
        y = tl.load(anchor_ptr + new_off + offs, mask=inside, other=0, eviction_policy="evict_first")
        changed = (x != y).to(tl.int32)
        tl.store(counts_ptr + pid, tl.sum(changed, axis=0))
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
        idx_out_ptr,
        val_out_ptr,
        num_spans,
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
            offs = e0 + tl.arange(0, BLOCK).to(tl.int64)
            inside = offs < n
            byte = tl.load(bits_ptr + bits_off + (offs >> 3), mask=inside, other=0).to(tl.int32)
            changed = (byte >> (offs & 7).to(tl.int32)) & 1
            rank = tl.cumsum(changed, axis=0) - changed
            slot = tl.load(slots_ptr + pid) + rank
            hit = changed != 0
            y = tl.load(anchor_ptr + new_off + offs, mask=hit, other=0)
            tl.store(idx_out_ptr + slot, offs.to(idx_out_ptr.dtype.element_ty), mask=hit)
            tl.store(val_out_ptr + slot, y, mask=hit)

    return mark, compact


def kernel_available() -> bool:
    return torch.cuda.is_available() and _kernels() is not None


def _takes(t: torch.Tensor) -> bool:
    return t.is_cuda and t.numel() % 8 == 0 and t.data_ptr() % _ALIGN_BYTES == 0


def find_changes(base_ints: Sequence[torch.Tensor], new_ints: Sequence[torch.Tensor]):
    """The batch's `delta.Changes` through the kernels, or None if any tensor is one they cannot take.

    All tensors are flat, contiguous integer views of one dtype on one CUDA device.
    """
    kernels = _kernels()
    if kernels is None or not base_ints:
        return None
    if not all(_takes(t) for t in (*base_ints, *new_ints)):
        return None
    return _run(kernels, base_ints, new_ints, interpret=False)


def _run(kernels, base_ints: Sequence[torch.Tensor], new_ints: Sequence[torch.Tensor], *, interpret: bool):
    """Launches mark and compact; `interpret` lets Triton's CPU interpreter run them on CPU tensors."""
    from weightsync.dataplane.delta import Changes

    mark, compact = kernels
    device = base_ints[0].device
    es = base_ints[0].element_size()
    anchor = base_ints[0]
    anchor_ptr = anchor.data_ptr()
    align = _ALIGN_BYTES // es
    numels = [t.numel() for t in base_ints]
    num_spans = len(numels)
    blocks = [-(-n // _BLOCK) for n in numels]
    bits_offs, pos = [], 0
    for n in numels:
        bits_offs.append(pos)
        pos += n // 8
    bits = torch.empty(pos, dtype=torch.uint8, device=device)
    table = (
        numels
        + [(t.data_ptr() - anchor_ptr) // es for t in base_ints]
        + [(t.data_ptr() - anchor_ptr) // es for t in new_ints]
        + bits_offs
    )
    span_table = torch.tensor(table, dtype=torch.int64).to(device)
    counts_cpu = torch.tensor(blocks, dtype=torch.int64)
    block_span_cpu = torch.repeat_interleave(torch.arange(num_spans, dtype=torch.int64), counts_cpu)
    block_starts = torch.cumsum(counts_cpu, 0) - counts_cpu
    block_elem_cpu = (torch.arange(block_span_cpu.numel(), dtype=torch.int64) - block_starts[block_span_cpu]) * _BLOCK
    block_span, block_elem = block_span_cpu.to(device), block_elem_cpu.to(device)
    num_blocks = block_span_cpu.numel()
    counts = torch.empty(num_blocks, dtype=torch.int32, device=device)
    extra = {} if interpret else {"num_warps": _NUM_WARPS}
    if num_blocks:
        mark[(num_blocks,)](
            anchor, block_span, block_elem, span_table, bits, counts, num_spans, BLOCK=_BLOCK, ALIGN=align, **extra
        )
    ends = torch.cumsum(counts, 0, dtype=torch.int64)
    slots = ends - counts
    # One read-back: the running count at each tensor's last block.
    last_block = (torch.cumsum(counts_cpu, 0) - 1).clamp(min=0)
    at_ends = ends[last_block.to(device)].tolist() if num_blocks else [0] * num_spans
    span_counts, before = [], 0
    for b, value in zip(blocks, at_ends):
        if b == 0:
            span_counts.append(0)
            continue
        span_counts.append(value - before)
        before = value
    total = sum(span_counts)
    idx_dtype = torch.int32 if max(numels) <= 1 << 31 else torch.int64
    idx_out = torch.empty(total, dtype=idx_dtype, device=device)
    val_out = torch.empty(total, dtype=anchor.dtype, device=device)
    if total:
        compact[(num_blocks,)](
            anchor,
            block_span,
            block_elem,
            span_table,
            bits,
            counts,
            slots,
            idx_out,
            val_out,
            num_spans,
            BLOCK=_BLOCK,
            ALIGN=align,
            **extra,
        )
    bit_views = [bits[o : o + n // 8] for o, n in zip(bits_offs, numels)]
    return Changes(idx_out, val_out, span_counts, bit_views)
