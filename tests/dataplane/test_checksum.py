"""tensor_checksum: bit-exact, position-sensitive, and the same however the bytes are laid out or chunked."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from weightsync.dataplane import bytes_checksum, checksum_views, tensor_checksum
from weightsync.dataplane.checksum import CHUNK_WORDS, _chunk_multiplier, _splitmix64

_M64 = (1 << 64) - 1


def _reference(data: bytes) -> int:
    """The documented definition, in plain Python integers."""
    s = 0
    for i in range((len(data) + 7) // 8):
        x = int.from_bytes(data[8 * i : 8 * i + 8].ljust(8, b"\0"), "little")
        c, j = divmod(i, CHUNK_WORDS)
        s = (s + x * (_splitmix64(j) | 1) * (_chunk_multiplier(c) & _M64)) & _M64
    return _splitmix64(s ^ _splitmix64(len(data)))


@pytest.mark.parametrize("nbytes", [0, 1, 7, 8, 9, 255, 1000])
def test_matches_the_pure_python_definition(nbytes):
    """Torch's wrapping int64 arithmetic gives exactly the documented value, tail bytes included."""
    data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(nbytes))
    assert bytes_checksum(data) == _reference(bytes(data.tolist()))


def test_matches_the_definition_across_a_chunk_boundary():
    """A tensor longer than one chunk gets the chunk multipliers right (checked on words near the boundary)."""
    words = torch.zeros(CHUNK_WORDS + 3, dtype=torch.int64)
    words[CHUNK_WORDS - 1] = 12345
    words[CHUNK_WORDS + 1] = -987654321
    raw = bytearray(words.numpy().tobytes())
    assert tensor_checksum(words) == _reference(bytes(raw))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int8, torch.bool, torch.float64])
def test_equal_bytes_give_equal_checksums(dtype):
    """Two tensors with the same bytes (odd numel included) agree, and the result is an unsigned 64-bit int."""
    a = torch.randn(3, 7, 5).to(dtype)  # 105 elements: odd, with a tail for every dtype
    b = a.clone()
    value = tensor_checksum(a)
    assert value == tensor_checksum(b)
    assert 0 <= value < 1 << 64


def test_one_flipped_bit_changes_the_checksum():
    """Flipping any single bit, in the word body or the tail, changes the checksum."""
    t = torch.randn(1001, dtype=torch.float32).to(torch.bfloat16)  # 2002 bytes: 250 words + 2 tail bytes
    base = tensor_checksum(t)
    raw = t.view(torch.uint8)
    for byte_index in (0, 1, 999, 1999, 2000, 2001):
        for bit in (0, 7):
            flipped = raw.clone()
            flipped[byte_index] ^= 1 << bit
            assert tensor_checksum(flipped.view(torch.bfloat16)) != base, (byte_index, bit)


def test_swapped_or_shifted_words_change_the_checksum():
    """Reordering words (a swap, or a shift by one word) changes the checksum although the sum of words does not."""
    w = torch.arange(1, 4097, dtype=torch.int64)
    base = tensor_checksum(w)
    swapped = w.clone()
    swapped[[10, 3000]] = swapped[[3000, 10]]
    assert tensor_checksum(swapped) != base
    assert tensor_checksum(torch.roll(w, 1)) != base


def test_trailing_zero_bytes_change_the_checksum():
    """Appending zero bytes changes it: the byte count is part of the checksum."""
    data = torch.tensor([1, 2, 3], dtype=torch.uint8)
    assert bytes_checksum(data) != bytes_checksum(torch.tensor([1, 2, 3, 0], dtype=torch.uint8))


def test_non_contiguous_tensor_is_checksummed_in_row_major_order():
    """A transposed view checksums like its contiguous copy, not like its storage."""
    base = torch.randn(64, 48, dtype=torch.float32)
    view = base.t()
    assert not view.is_contiguous()
    assert tensor_checksum(view) == tensor_checksum(view.contiguous())
    assert tensor_checksum(view) != tensor_checksum(base)


def test_unaligned_slices_and_views_agree():
    """checksum_views over a buffer equals checksums of copies, also at offsets that are not 8-byte aligned."""
    buf = torch.randint(0, 256, (10_000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    spans = [(0, 256), (3, 101), (256, 0), (1024, 5000), (9999, 1)]
    expected = [bytes_checksum(buf[o : o + n].clone()) for o, n in spans]
    assert checksum_views(buf, spans) == expected


def test_the_checksum_does_not_depend_on_the_thread_count():
    """One thread (torch.mv) and many threads (parallel multiply-and-sum) give the same checksum."""
    t = torch.randint(-(2**62), 2**62, (9 * CHUNK_WORDS + 5,), dtype=torch.int64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = tensor_checksum(t)
        torch.set_num_threads(8)
        many = tensor_checksum(t)
    finally:
        torch.set_num_threads(threads)
    assert one == many


def test_views_outside_the_buffer_are_refused():
    """A span past the end of the buffer is a ValueError, not a silent short read."""
    with pytest.raises(ValueError, match="outside a buffer of 16 bytes"):
        checksum_views(torch.zeros(16, dtype=torch.uint8), [(8, 9)])


_INTERPRETED_KERNEL = r"""
import torch
from weightsync.dataplane import checksum as cs, fused

torch.manual_seed(0)
sizes = [16, 16 * 5000, 8 * cs.CHUNK_WORDS + 64, 1024]
srcs = [torch.randint(0, 256, (n,), dtype=torch.uint8) for n in sizes]
dsts = [torch.zeros(n, dtype=torch.uint8) if i % 2 == 0 else None for i, n in enumerate(sizes)]
want = [cs.bytes_checksum(s) for s in srcs]
device = torch.device("cpu")
weights = cs._weights(device)
base = weights.data_ptr()
for table in (True, False):
    fused._WEIGHTS_FROM_TABLE = table
    for d in dsts:
        if d is not None:
            d.zero_()
    block_span, block_word, nwords = fused._layout(device, tuple(n // 8 for n in sizes))
    offsets = [(s.data_ptr() - base) // 8 for s in srcs]
    offsets += [(d.data_ptr() - base) // 8 if d is not None else 0 for d in dsts]
    out = torch.empty(block_span.numel(), dtype=torch.int64)
    fused._kernel()[(block_span.numel(),)](
        weights, block_span, block_word, nwords, torch.tensor(offsets), len(sizes), weights,
        fused._chunk_multipliers(device, 2), out,
        BLOCK=fused._BLOCK_WORDS, CHUNK_SHIFT=fused._CHUNK_SHIFT, TABLE=table,
    )
    sums = torch.zeros(len(sizes), dtype=torch.int64).index_add_(0, block_span, out)
    got = fused.PendingChecksums(sizes, sums, {}).result()
    assert got == want, (table, got, want)
    assert all(torch.equal(s, d) for s, d in zip(srcs, dsts) if d is not None), table
print("ok")
"""


def test_the_fused_gpu_kernel_matches_the_definition_in_the_triton_interpreter():
    """The fused copy-and-checksum kernel, run by Triton's CPU interpreter: its sums equal the CPU
    definition across a chunk boundary, with the weights read from the table or computed, and the
    spans given a destination are copied exactly. (tests/dataplane/test_gpu.py runs it compiled.)"""
    pytest.importorskip("triton", reason="the fused kernel is written in Triton; without it the GPU paths use torch ops")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", _INTERPRETED_KERNEL], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"
