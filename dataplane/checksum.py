"""A 64-bit, position-sensitive checksum over a tensor's raw bytes, computed where the tensor lives.

Definition (the same on every device, so a CPU receiver and a CUDA sender agree):
the bytes are read as little-endian 64-bit words x_i (a short tail is zero-padded
into one last word); with P = 2**20 words per chunk, c = i // P and j = i % P,

    S = sum_i x_i * R_j * M_c   (mod 2**64)

where R and M are fixed tables of odd pseudo-random 64-bit weights, and the
result is splitmix64 of S mixed with the byte count. Every single flipped bit
changes S (an odd weight times a power of two is never 0 mod 2**64), and so does
moving a word to another position, because the weights differ by position.

A plain sum of words beside S was measured to cost ~30% more time on CPU and
adds no guarantee for these error classes, so there is none. The known blind
spot of any mod-2**64 weighted sum: errors confined to the top bits of words can
cancel (two flips of bit 63 anywhere leave S unchanged). It is built to catch
layout, truncation and staleness bugs on the wire, not hardware or adversaries.

Only integer multiply and add with wraparound are used: their result does not
depend on summation order, so chunking, threads and devices all give the same
answer.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence

import torch

# One definition of the integer mix, shared with the coordinator (which composes checksums from parts).
from weightsync.core.wordsum import splitmix64 as _splitmix64

__all__ = ["CHUNK_WORDS", "bytes_checksum", "checksum_views", "tensor_checksum"]

# Part of the definition: changing it changes every checksum. 8 MiB chunks keep
# the CUDA scratch buffer small and the multiplier table short.
CHUNK_WORDS = 1 << 20
# Chunks multiplied per launch on the multiply-and-sum path: 64 MiB of scratch, the
# bound on temporary memory.
_BLOCK_ROWS = 8
# From this many torch threads on, the CPU multiplies and sums in parallel rather than
# running torch.mv, which uses one thread. Measured: mv 19.5 GiB/s on one AMD EPYC core,
# 5.4 on one Xeon core; multiply-and-sum 15 GiB/s with 5 Xeon threads, 33 with 16.
_PARALLEL_THREADS = 4
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_CHUNK_SALT = 0x5851F42D4C957F2D

_tables_lock = threading.Lock()
_weight_tables: dict[torch.device, torch.Tensor] = {}
_scratch = threading.local()


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def _splitmix64_tensor(x: torch.Tensor) -> torch.Tensor:
    # torch's >> on int64 is arithmetic; masking makes it the logical shift splitmix64 needs.
    def shr(v: torch.Tensor, k: int) -> torch.Tensor:
        return (v >> k) & ((1 << (64 - k)) - 1)

    x = x + _signed(_GOLDEN)
    x = (x ^ shr(x, 30)) * _signed(0xBF58476D1CE4E5B9)
    x = (x ^ shr(x, 27)) * _signed(0x94D049BB133111EB)
    return x ^ shr(x, 31)


def _weights(device: torch.device) -> torch.Tensor:
    """R_j for j < CHUNK_WORDS, built once on the CPU and copied to each device."""
    table = _weight_tables.get(device)
    if table is not None:
        return table
    with _tables_lock:
        table = _weight_tables.get(device)
        if table is None:
            cpu = _weight_tables.get(torch.device("cpu"))
            if cpu is None:
                cpu = _splitmix64_tensor(torch.arange(CHUNK_WORDS, dtype=torch.int64)) | 1
                _weight_tables[torch.device("cpu")] = cpu
            table = cpu if device.type == "cpu" else cpu.to(device)
            _weight_tables[device] = table
    return table


def _scratch_for(device: torch.device) -> torch.Tensor:
    # One buffer per thread and device, so concurrent callers never share it.
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    buf = buffers.get(device)
    if buf is None:
        buf = buffers[device] = torch.empty(_BLOCK_ROWS, CHUNK_WORDS, dtype=torch.int64, device=device)
    return buf


@functools.lru_cache(maxsize=4096)
def _chunk_multiplier(c: int) -> int:
    return _splitmix64(c ^ _CHUNK_SALT) | 1


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes in row-major order as a flat uint8 tensor (a copy only if not contiguous)."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.dtype == torch.uint8:
        return flat
    return flat.view(torch.uint8)


def _fill_chunk_sums(words: torch.Tensor, out: torch.Tensor, weights: torch.Tensor, scratch: torch.Tensor | None) -> None:
    """Writes sum_j x_j * R_j for each chunk of words into out (one int64 slot per chunk).

    Without scratch: torch.mv, which reads each word once and writes nothing per word
    (~1.7x faster than multiply-and-sum on one CPU core). With scratch: multiply into it,
    then sum per row; the only way on CUDA, which has no integer mv, and the faster one
    on a CPU with several threads. Both give the same integers.
    """
    full, rem = divmod(words.numel(), CHUNK_WORDS)
    if scratch is None:
        if full:
            torch.mv(words[: full * CHUNK_WORDS].view(full, CHUNK_WORDS), weights, out=out[:full])
        if rem:
            torch.mv(words[full * CHUNK_WORDS :].view(1, rem), weights[:rem], out=out[full:])
        return
    # Several chunks per launch: one 8 MiB chunk per launch left an H100 launch-bound.
    for first in range(0, full, _BLOCK_ROWS):
        rows = min(_BLOCK_ROWS, full - first)
        block = words[first * CHUNK_WORDS : (first + rows) * CHUNK_WORDS].view(rows, CHUNK_WORDS)
        torch.mul(block, weights, out=scratch[:rows])
        torch.sum(scratch[:rows], 1, out=out[first : first + rows])
    if rem:
        prod = scratch[0, :rem]
        torch.mul(words[full * CHUNK_WORDS :], weights[:rem], out=prod)
        torch.sum(prod, 0, out=out[full])


def _finish(chunk_sums: Sequence[int], tail: Sequence[int], nbytes: int) -> int:
    s = 0
    for c, part in enumerate(chunk_sums):
        s += (part & _MASK64) * _chunk_multiplier(c)
    return _finish_total(s, tail, nbytes)


def _finish_total(s: int, tail: Sequence[int], nbytes: int) -> int:
    """The checksum from S = sum over chunks of (chunk sum x chunk multiplier), any integer mod 2**64."""
    if tail:
        c, j = divmod(nbytes // 8, CHUNK_WORDS)
        tail_word = int.from_bytes(bytes(tail), "little")
        s += tail_word * (_splitmix64(j) | 1) * _chunk_multiplier(c)
    # The byte count tells apart inputs that differ only by trailing zero bytes.
    return _splitmix64((s & _MASK64) ^ _size_mix(nbytes))


@functools.lru_cache(maxsize=8192)
def _size_mix(nbytes: int) -> int:
    return _splitmix64(nbytes)


def checksum_views(data: torch.Tensor, spans: Sequence[tuple[int, int]]) -> list[int]:
    """Checksums of the byte ranges (offset_bytes, nbytes) of a flat uint8 tensor.

    Equal to bytes_checksum of each slice. All device work goes into one result tensor,
    read back with a single synchronisation: on a GPU, per-tensor launches and syncs
    would cost more than the arithmetic.
    """
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise ValueError(f"checksum_views needs a 1-D uint8 tensor, got {data.dtype} with shape {list(data.shape)}")
    for offset, nbytes in spans:
        if offset < 0 or nbytes < 0 or offset + nbytes > data.numel():
            raise ValueError(f"span [{offset}, {offset + nbytes}) lies outside a buffer of {data.numel()} bytes")
    if not spans:
        return []
    device = data.device
    weights = _weights(device)
    use_mv = device.type == "cpu" and torch.get_num_threads() < _PARALLEL_THREADS
    scratch = None if use_mv else _scratch_for(device)
    num_chunks = [-(-(n // 8) // CHUNK_WORDS) for _, n in spans]
    sums = torch.empty(sum(num_chunks), dtype=torch.int64, device=device)
    tail_positions: list[int] = []
    slot = 0
    for (offset, nbytes), count in zip(spans, num_chunks):
        num_words = nbytes // 8
        if num_words:
            body = data[offset : offset + num_words * 8]
            if body.storage_offset() % 8:
                # int64 views need an 8-byte aligned offset; plan buckets are 256-aligned, so only
                # odd slices of user tensors pay for this copy.
                body = body.clone()
            _fill_chunk_sums(body.view(torch.int64), sums[slot : slot + count], weights, scratch)
        slot += count
        tail_positions.extend(range(offset + num_words * 8, offset + nbytes))
    if tail_positions:
        index = torch.tensor(tail_positions, dtype=torch.int64).to(device)
        values = torch.cat((sums, data[index].to(torch.int64))).tolist()
    else:
        values = sums.tolist()
    out = []
    sum_pos, tail_pos = 0, sum(num_chunks)
    for (_, nbytes), count in zip(spans, num_chunks):
        num_tail = nbytes % 8
        out.append(_finish(values[sum_pos : sum_pos + count], values[tail_pos : tail_pos + num_tail], nbytes))
        sum_pos += count
        tail_pos += num_tail
    return out


def bytes_checksum(data: torch.Tensor) -> int:
    """Checksum of a flat uint8 tensor's bytes."""
    return checksum_views(data, [(0, data.numel())])[0]


def tensor_checksum(t: torch.Tensor) -> int:
    """Unsigned 64-bit checksum of a tensor's raw bytes in row-major order, on its own device."""
    return bytes_checksum(_as_bytes(t))


# Up to this many word-aligned rows, runs_sum takes each row's chunk segments against slices of
# the weight table (no per-word index tensor: measured ~10x faster on one CPU core); beyond, one
# vectorised pass with an index per word costs less than the Python loop.
_MAX_SEGMENT_ROWS = 4096


def _aligned_rows_sum(values: torch.Tensor, first_words: list[int]) -> int:
    """S of int64 rows whose first words sit at these global word positions, by chunk segments."""
    device = values.device
    weights = _weights(device)
    use_mv = device.type == "cpu"
    row_words = values.shape[1]
    total = 0
    for row, w0 in zip(values, first_words):
        at = 0
        while at < row_words:
            c, k0 = divmod(w0 + at, CHUNK_WORDS)
            n = min(row_words - at, CHUNK_WORDS - k0)
            seg = row[at : at + n]
            part = torch.dot(seg, weights[k0 : k0 + n]) if use_mv else (seg * weights[k0 : k0 + n]).sum()
            total += (int(part) & _MASK64) * _chunk_multiplier(c)
            at += n
    return total & _MASK64


def runs_sum(data: torch.Tensor, offsets_bytes: torch.Tensor) -> int:
    """S mod 2**64 (the weighted word sum before the finish) of runs of bytes at global positions.

    Row r of `data` (2-D uint8) lies at byte offset offsets_bytes[r] of a tensor whose other bytes
    count as zero, so the sums of disjoint parts of one tensor add up to its S (core/wordsum.py
    composes the checksum from them). Runs need not start or end on 8-byte words: a word shared
    by two parts contributes its bytes to each (S is linear in bytes, a word being the sum of its
    bytes shifted), so edge words are handled rather than forbidden. Word-aligned runs take the
    word path; the others pay for one multiply per byte instead of per word.
    """
    if data.dtype != torch.uint8 or data.dim() != 2 or offsets_bytes.dim() != 1 or offsets_bytes.numel() != data.shape[0]:
        raise ValueError(
            f"runs_sum needs a 2-D uint8 tensor and one offset per row, got {data.dtype} {list(data.shape)} "
            f"and {offsets_bytes.numel()} offsets"
        )
    if data.numel() == 0:
        return 0
    device = data.device
    offsets = offsets_bytes.to(device=device, dtype=torch.int64)
    num_rows, row_bytes = data.shape
    aligned = row_bytes % 8 == 0 and bool((offsets % 8 == 0).all())
    if aligned:
        rows = data.contiguous()
        if rows.storage_offset() % 8:
            rows = rows.clone()
        values = rows.view(torch.int64)
        if num_rows <= _MAX_SEGMENT_ROWS:
            return _aligned_rows_sum(values, offsets.div(8, rounding_mode="floor").tolist())
        index = offsets.div(8, rounding_mode="floor")[:, None] + torch.arange(row_bytes // 8, device=device)
    else:
        position = offsets[:, None] + torch.arange(row_bytes, device=device)
        values = data.to(torch.int64) << ((position % 8) * 8)
        index = position.div(8, rounding_mode="floor")
    chunk = index.div(CHUNK_WORDS, rounding_mode="floor")
    num_chunks = int(chunk.max()) + 1
    multipliers = torch.tensor([_signed(_chunk_multiplier(c)) for c in range(num_chunks)], dtype=torch.int64, device=device)
    weighted = values * _weights(device)[index % CHUNK_WORDS] * multipliers[chunk]
    return int(weighted.sum()) & _MASK64
