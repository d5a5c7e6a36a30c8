"""Copy and checksum many byte spans on a CUDA device in one pass and one kernel launch.

The data plane's GPU paths spend their time moving bytes: packing tensors into a bucket,
copying a bucket out of a CUDA IPC buffer into the engine's tensors, and checksumming
what moved. Done with torch ops that is a launch or two per tensor (~300 for a
model) and a separate read for the checksum. Here one Triton kernel takes a table of
(source, destination, length) spans, copies each 64-bit word once and folds it into
the checksum on the way, so a bucket costs one launch and one read of its bytes.

The result is bit-identical to `checksum.checksum_views` (same definition: weighted
sums per 8 MiB chunk, chunk multipliers, then the finishing mix), which the GPU tests
check against the CPU. Spans that the kernel cannot take (a length or an address that
is not a multiple of 16 bytes, a CPU tensor, no Triton) fall back to torch's copy and
`checksum_views`; callers need not care which path ran.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from weightsync.dataplane import checksum as _cs

__all__ = ["PendingChecksums", "Prepared", "copy_and_checksum", "fused_available", "prepare"]

log = logging.getLogger(__name__)

# Words per program: 16 KiB of data. A divisor of CHUNK_WORDS, so no program straddles a chunk.
_BLOCK_WORDS = 2048
assert _cs.CHUNK_WORDS % _BLOCK_WORDS == 0
_CHUNK_SHIFT = _cs.CHUNK_WORDS.bit_length() - 1

_lock = threading.Lock()
_tables: dict[tuple[torch.device, tuple[int, ...]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
_multipliers: dict[torch.device, torch.Tensor] = {}
_offset_tables: dict[tuple[torch.device, tuple[int, ...]], torch.Tensor] = {}
_MAX_CACHED_LAYOUTS = 64


# Kernel settings, chosen by bench/fused_kernel.py on an H100 (see BENCHMARKS.md).
_NUM_WARPS = 4
_WEIGHTS_FROM_TABLE = True


@functools.cache
def _kernel():
    """The Triton kernel, or None where Triton is missing."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def copy_checksum(
        base_ptr,
        block_span_ptr,
        block_word_ptr,
        nwords_ptr,
        offsets_ptr,
        num_spans,
        weights_ptr,
        mult_ptr,
        out_ptr,
        BLOCK: tl.constexpr,
        CHUNK_SHIFT: tl.constexpr,
        TABLE: tl.constexpr,
    ):
        # Addresses travel as word offsets from base_ptr, all even (16-byte aligned), so that
        # the compiler may use 16-byte loads and stores; pointers read from a table would
        # only get 8-byte ones.
        pid = tl.program_id(0)
        span = tl.load(block_span_ptr + pid)
        w0 = tl.multiple_of(tl.load(block_word_ptr + pid), BLOCK)
        n = tl.multiple_of(tl.load(nwords_ptr + span), 2)
        src_off = tl.multiple_of(tl.load(offsets_ptr + span), 2)
        dst_off = tl.load(offsets_ptr + num_spans + span)
        offs = w0 + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < n
        x = tl.load(base_ptr + src_off + offs, mask=mask, other=0, eviction_policy="evict_first")
        if dst_off != 0:
            dst_off = tl.multiple_of(dst_off, 2)
            tl.store(base_ptr + dst_off + offs, x, mask=mask, eviction_policy="evict_first")
        j = offs & ((1 << CHUNK_SHIFT) - 1)
        if TABLE:
            r = tl.load(weights_ptr + j, mask=mask, other=0, eviction_policy="evict_last")
        else:
            # splitmix64(j) | 1, the same weights the table holds, computed in registers.
            z = j.to(tl.uint64) + 0x9E3779B97F4A7C15
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
            z = (z ^ (z >> 27)) * 0x94D049BB133111EB
            r = ((z ^ (z >> 31)) | 1).to(tl.int64, bitcast=True)
        part = tl.sum(x * r, axis=0)
        m = tl.load(mult_ptr + (w0 >> CHUNK_SHIFT))
        tl.store(out_ptr + pid, part * m)

    return copy_checksum


def fused_available(device: torch.device) -> bool:
    return device.type == "cuda" and _kernel() is not None


def _layout(device: torch.device, nwords: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(block -> span, block -> first word, span -> words) on the device; plans repeat, so cached."""
    key = (device, nwords)
    found = _tables.get(key)
    if found is not None:
        return found
    counts = torch.tensor([-(-n // _BLOCK_WORDS) for n in nwords], dtype=torch.int64)
    block_span = torch.repeat_interleave(torch.arange(len(nwords), dtype=torch.int64), counts)
    starts = torch.cumsum(counts, 0) - counts
    block_word = (torch.arange(block_span.numel(), dtype=torch.int64) - starts[block_span]) * _BLOCK_WORDS
    return _cache_put(
        _tables,
        key,
        (block_span.to(device), block_word.to(device), torch.tensor(nwords, dtype=torch.int64).to(device)),
    )


def _cache_put(cache: dict, key, value):
    with _lock:
        if len(cache) >= _MAX_CACHED_LAYOUTS:
            cache.clear()
        cache[key] = value
    return value


def _chunk_multipliers(device: torch.device, num_chunks: int) -> torch.Tensor:
    table = _multipliers.get(device)
    if table is None or table.numel() < num_chunks:
        size = max(num_chunks, 4096)
        values = [_cs._signed(_cs._chunk_multiplier(c)) for c in range(size)]
        table = torch.tensor(values, dtype=torch.int64).to(device)
        with _lock:
            _multipliers[device] = table
    return table


@dataclass
class PendingChecksums:
    """Checksums whose device work is queued; `result()` waits for it (one synchronisation)."""

    nbytes: list[int]
    sums: torch.Tensor | None  # per span, int64, sum over chunks of chunk sum x multiplier
    fallback: dict[int, int]  # span index -> checksum computed on the torch path

    def result(self) -> list[int]:
        totals = self.sums.tolist() if self.sums is not None else []
        out = []
        for i, nbytes in enumerate(self.nbytes):
            found = self.fallback.get(i)
            if found is None:
                found = _cs._finish_total(totals[i], (), nbytes)
            out.append(found)
        return out


def _offsets_on(device: torch.device, offsets: tuple[int, ...]) -> torch.Tensor:
    """The kernel's address table on the device; the same spans recur every round, so cached."""
    key = (device, offsets)
    found = _offset_tables.get(key)
    if found is None:
        found = _cache_put(_offset_tables, key, torch.tensor(offsets, dtype=torch.int64).to(device))
    return found


@dataclass
class Prepared:
    """A copy-and-checksum worked out once for a set of spans: run() queues it again.

    Holds addresses, not tensors: run it only while the tensors it was prepared from are
    alive and unmoved (callers key it on those addresses).
    """

    device: torch.device
    nbytes: list[int]
    fast: list[int]
    slow: list[tuple[int, torch.Tensor, torch.Tensor | None]]
    tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    offsets: torch.Tensor | None = None
    index: torch.Tensor | None = None

    def run(self) -> PendingChecksums:
        fallback: dict[int, int] = {}
        for i, s, d in self.slow:
            if d is not None:
                d.copy_(s)
            fallback[i] = _cs.bytes_checksum(s)
        if not self.fast:
            return PendingChecksums(self.nbytes, None, fallback)
        block_span, block_word, nwords_dev = self.tables
        weights = _cs._weights(self.device)
        num_chunks = max(-(-self.nbytes[i] // 8 // _cs.CHUNK_WORDS) for i in self.fast)
        out = torch.empty(block_span.numel(), dtype=torch.int64, device=self.device)
        _kernel()[(block_span.numel(),)](
            weights,
            block_span,
            block_word,
            nwords_dev,
            self.offsets,
            len(self.fast),
            weights,
            _chunk_multipliers(self.device, num_chunks),
            out,
            BLOCK=_BLOCK_WORDS,
            CHUNK_SHIFT=_CHUNK_SHIFT,
            TABLE=_WEIGHTS_FROM_TABLE,
            num_warps=_NUM_WARPS,
        )
        per_fast = torch.zeros(len(self.fast), dtype=torch.int64, device=self.device).index_add_(0, block_span, out)
        if self.index is None:
            return PendingChecksums(self.nbytes, per_fast, fallback)
        sums = torch.zeros(len(self.nbytes), dtype=torch.int64, device=self.device)
        sums[self.index] = per_fast
        return PendingChecksums(self.nbytes, sums, fallback)


def prepare(
    sources: Sequence[torch.Tensor],
    destinations: Sequence[torch.Tensor | None] | None = None,
) -> Prepared:
    """Works out a copy_and_checksum (which spans the kernel takes, its tables) without queuing it."""
    if destinations is None:
        destinations = [None] * len(sources)
    if len(destinations) != len(sources):
        raise ValueError(f"{len(sources)} sources but {len(destinations)} destinations")
    device = sources[0].device if sources else torch.device("cpu")
    kernel = _kernel() if device.type == "cuda" else None
    # Word offsets from the weight table's address (any 16-byte aligned tensor would do);
    # a destination offset of 0 means "checksum only", and no destination sits at the table.
    base = _cs._weights(device).data_ptr() if kernel is not None else 0
    nbytes: list[int] = []
    fast: list[int] = []
    src_offsets: list[int] = []
    dst_offsets: list[int] = []
    slow: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []
    for i, (s, d) in enumerate(zip(sources, destinations)):
        n = s.numel()
        if s.dtype is not torch.uint8 or s.dim() != 1:
            raise ValueError(f"source {i}: expected a 1-D uint8 tensor, got {s.dtype} with shape {list(s.shape)}")
        if d is not None and (d.dtype is not torch.uint8 or d.dim() != 1 or d.numel() != n):
            raise ValueError(f"destination {i}: expected {n} uint8 bytes, got {d.dtype} {list(d.shape)}")
        nbytes.append(n)
        sp = s.data_ptr()
        dp = d.data_ptr() if d is not None else 0
        # The kernel moves 16-byte words from 16-byte aligned addresses on one device.
        if kernel is not None and n and not (n | sp | dp) % 16 and s.is_cuda and (d is None or d.is_cuda):
            fast.append(i)
            src_offsets.append((sp - base) // 8)
            dst_offsets.append((dp - base) // 8 if d is not None else 0)
        else:
            slow.append((i, s, d))
    prepared = Prepared(device, nbytes, fast, slow)
    if fast:
        prepared.tables = _layout(device, tuple(nbytes[i] // 8 for i in fast))
        prepared.offsets = _offsets_on(device, tuple(src_offsets + dst_offsets))
        if len(fast) != len(nbytes):
            prepared.index = torch.tensor(fast, dtype=torch.int64).to(device)
    return prepared


def copy_and_checksum(
    sources: Sequence[torch.Tensor],
    destinations: Sequence[torch.Tensor | None] | None = None,
) -> PendingChecksums:
    """Copies each flat uint8 source into its destination (None: no copy) and checksums the bytes.

    Sources and destinations are 1-D uint8 tensors of equal length on one CUDA device;
    work goes on the current stream. The checksum of span i equals
    `checksum.bytes_checksum(sources[i])`. Nothing is read back until `result()`.
    """
    return prepare(sources, destinations).run()
