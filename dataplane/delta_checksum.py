"""Updating a tensor's checksum from its changed words alone, after a delta.

`checksum.py` defines S = sum_i x_i * R_j * M_c (mod 2**64) over the tensor's 64-bit words
x_i (the last one zero-padded), with j = i % CHUNK_WORDS and c = i // CHUNK_WORDS, and
publishes splitmix64(S ^ mix(nbytes)). Both steps of the finish are bijections, so S comes
back from a published checksum, and because S is linear in the words:

    S_new = S_old + sum over changed words i of (new_i - old_i) * R_j * M_c   (mod 2**64)

which costs O(changed words), not O(tensor).

Which one a receiver should use, and why:
- The update trusts its input: it proves the result equals the sender's tensor only if the
  target held exactly the base that `base_checksum` describes. Words outside the changed
  ones are never read, so a base that was wrong there (a corrupted engine, the wrong
  version) passes unnoticed: S_old + delta is then the checksum the tensor *should* have.
- A recompute (`checksum.tensor_checksum` of the result) reads every byte and proves the
  whole tensor, whatever was there before. It costs one read of the tensor: on a GPU about
  half a device copy, on a CPU the same order as receiving the dense bytes.

So a receiver's verdict, which must prove that the engine now holds exactly the trainer's
new tensors, recomputes. Measured (2026-12-06, BENCHMARKS.md "Where a delta round's time
goes"): the recompute reads 64 MiB in 15 ms on one CPU core, and on the emulated fleet it
is 0.02-0.05 s of a 0.4 s delta round; the update would save that much at most, and would
need the engine to keep a trusted sum of what it holds and re-verify it off the round's path
to still catch memory altered between rounds. Not worth a weaker verdict at that price. The update is for where the base checksum was computed by the
receiver from its own bytes and nothing else can have written the tensor since (e.g. a
shadow copy the receiver owns), and as a cheap early check that the patch itself arrived
intact before spending the recompute.
"""

from __future__ import annotations

import torch

from weightsync.dataplane import checksum as _cs

__all__ = ["changed_words", "checksum_update", "gather_words"]

_M64 = (1 << 64) - 1
_CHUNK_SHIFT = _cs.CHUNK_WORDS.bit_length() - 1


def _unxorshift(y: int, k: int) -> int:
    # Inverse of x ^ (x >> k): each pass recovers k more of the top bits.
    x = y
    for _ in range(64 // k + 1):
        x = y ^ (x >> k)
    return x


_INV1 = pow(0xBF58476D1CE4E5B9, -1, 1 << 64)
_INV2 = pow(0x94D049BB133111EB, -1, 1 << 64)


def _unsplitmix64(z: int) -> int:
    z = _unxorshift(z, 31)
    z = (z * _INV2) & _M64
    z = _unxorshift(z, 27)
    z = (z * _INV1) & _M64
    z = _unxorshift(z, 30)
    return (z - _cs._GOLDEN) & _M64


def _raw_sum(checksum: int, nbytes: int) -> int:
    """S (mod 2**64) from a published checksum of nbytes bytes."""
    return _unsplitmix64(checksum) ^ _cs._size_mix(nbytes)


def changed_words(indices: torch.Tensor, element_size: int) -> torch.Tensor:
    """The distinct 64-bit word positions (int64, increasing) that hold the given element indices.

    Elements of 1, 2, 4 or 8 bytes never straddle a word, as words start at byte 0 of the tensor.
    """
    if element_size not in (1, 2, 4, 8):
        raise ValueError(f"element_size must be 1, 2, 4 or 8 bytes, got {element_size}")
    words = (indices.to(torch.int64) * element_size) >> 3
    return torch.unique_consecutive(words)


def gather_words(t: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """The tensor's 64-bit words at the given positions as int64, the last one zero-padded.

    Reads bytes rather than an int64 view: the tensor's size and storage offset need not be
    multiples of 8.
    """
    raw = t.detach().reshape(-1).view(torch.uint8)
    nbytes = raw.numel()
    pos = (words.to(raw.device).unsqueeze(1) << 3) + torch.arange(8, device=raw.device)
    inside = pos < nbytes
    got = raw[pos.clamp(max=max(nbytes - 1, 0))] * inside
    return got.to(torch.uint8).contiguous().view(torch.int64).view(-1)


def checksum_update(
    checksum: int,
    nbytes: int,
    words: torch.Tensor,
    old_words: torch.Tensor,
    new_words: torch.Tensor,
) -> int:
    """The checksum of an nbytes tensor whose words at `words` went from `old_words` to `new_words`.

    `checksum` is the tensor's checksum before the change. All three tensors are int64 and
    of one length, on one device; `words` holds distinct positions.
    """
    if not (words.numel() == old_words.numel() == new_words.numel()):
        raise ValueError(
            f"words, old_words and new_words must have one length, got {words.numel()}, "
            f"{old_words.numel()} and {new_words.numel()}"
        )
    if words.numel() and int(words.max()) >= -(-nbytes // 8):
        raise ValueError(f"word position {int(words.max())} is outside a tensor of {nbytes} bytes")
    s = _raw_sum(checksum, nbytes)
    if words.numel():
        device = words.device
        weights = _cs._weights(device)[words & (_cs.CHUNK_WORDS - 1)]
        chunks = words >> _CHUNK_SHIFT
        num_chunks = int(chunks.max()) + 1
        mult = torch.tensor([_cs._signed(_cs._chunk_multiplier(c)) for c in range(num_chunks)], dtype=torch.int64)
        # int64 multiply and add wrap mod 2**64 on every device, which is the arithmetic S needs.
        diff = new_words.to(device) - old_words.to(device)
        s += int(torch.sum(diff * weights * mult.to(device)[chunks]))
    return _cs._splitmix64((s & _M64) ^ _cs._size_mix(nbytes))
