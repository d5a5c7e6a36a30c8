"""The delta codec: every encoding reproduces the new tensor bit for bit, the chooser picks the fewest
bytes, the checksum update equals a recompute, and the Triton change finder equals the torch one."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch

from weightsync.dataplane import delta as delta_mod
from weightsync.dataplane.checksum import CHUNK_WORDS, tensor_checksum
from weightsync.dataplane.delta import Delta, Encoding, apply_delta, apply_many, encode, encode_many, encoded_nbytes
from weightsync.dataplane.delta_checksum import (
    _raw_sum,
    _unsplitmix64,
    changed_words,
    checksum_update,
    gather_words,
)
from weightsync.dataplane.checksum import _size_mix, _splitmix64

_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(_INT[t.element_size()])


def _random(numel: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Any bit pattern (NaN payloads included), not only values randn would give."""
    gen = torch.Generator().manual_seed(seed)
    es = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (numel * es,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype)


def _with_changes(base: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """A copy of base with the elements at `where` changed in their lowest bit (a one-ulp step)."""
    new = base.clone()
    _bits(new)[where] ^= 1
    return new


def _pattern(name: str, numel: int) -> torch.Tensor:
    """Changed element indices for the named pattern."""
    gen = torch.Generator().manual_seed(numel)
    if name == "none":
        return torch.empty(0, dtype=torch.int64)
    if name == "all":
        return torch.arange(numel)
    if name == "first":
        return torch.tensor([0])
    if name == "last":
        return torch.tensor([numel - 1])
    if name == "first_and_last":
        return torch.tensor([0, numel - 1])
    if name == "runs":
        return torch.cat([torch.arange(s, min(s + 37, numel)) for s in range(5, numel, 400)])
    if name == "sparse":
        return (torch.rand(numel, generator=gen) < 0.003).nonzero().squeeze(1)
    if name == "two_percent":
        return (torch.rand(numel, generator=gen) < 0.02).nonzero().squeeze(1)
    if name == "half":
        return (torch.rand(numel, generator=gen) < 0.5).nonzero().squeeze(1)
    raise AssertionError(name)


_PATTERNS = ["none", "all", "first", "last", "first_and_last", "runs", "sparse", "two_percent", "half"]


@pytest.mark.parametrize("pattern", _PATTERNS)
@pytest.mark.parametrize("encoding", list(Encoding))
def test_every_encoding_reproduces_the_new_tensor_exactly(pattern, encoding):
    """Forced into each encoding, every change pattern applies back to the new tensor bit for bit,
    and the delta's bytes are exactly what encoded_nbytes counted for that encoding."""
    base = _random(10_007, torch.bfloat16, seed=1).view(10_007)
    new = _with_changes(base, _pattern(pattern, base.numel()))
    delta = encode(base, new, allowed=[encoding])
    target = base.clone()
    apply_delta(target, delta)
    assert torch.equal(_bits(target), _bits(new))
    n = int((_bits(base) != _bits(new)).sum())
    assert delta.num_changed == n
    if delta.encoding is not Encoding.DENSE:
        assert delta.encoding is encoding  # forced: only dense may replace it, and only when cheaper
    where = (_bits(base) != _bits(new)).nonzero().squeeze(1)
    gaps = torch.diff(where, prepend=torch.tensor([-1])) - 1
    sizes = encoded_nbytes(
        base.numel(), n, 2, num_escapes8=int((gaps >= 255).sum()), num_escapes16=int((gaps >= 65535).sum())
    )
    assert delta.nbytes == sizes[delta.encoding]


@pytest.mark.parametrize("pattern", _PATTERNS)
def test_the_chooser_picks_the_smallest_encoding(pattern):
    """Left free, encode picks an encoding no larger than any forced one (measured in real bytes)."""
    base = _random(50_000, torch.float16, seed=2)
    new = _with_changes(base, _pattern(pattern, base.numel()))
    chosen = encode(base, new)
    forced = {e: encode(base, new, allowed=[e]).nbytes for e in Encoding}
    assert chosen.nbytes == min(forced.values()), (chosen.encoding, forced)


def test_dense_wins_past_the_break_even_and_gaps_win_at_two_percent():
    """All changed goes dense; 2% of bf16 changed goes gaps8 at about 3% of dense bytes."""
    base = _random(100_000, torch.bfloat16, seed=3)
    assert encode(base, _with_changes(base, _pattern("all", base.numel()))).encoding is Encoding.DENSE
    d = encode(base, _with_changes(base, _pattern("two_percent", base.numel())))
    assert d.encoding is Encoding.GAPS8
    assert d.nbytes < 0.035 * base.numel() * 2


def test_long_gaps_are_escaped_in_both_gap_widths():
    """Gaps of 255 and more (uint8) and of 65535 and more (uint16) travel as escapes and decode exactly."""
    numel = 300_000
    where = torch.tensor([0, 254, 255 + 255, 600, 600 + 65_536, 200_000, numel - 1])
    base = _random(numel, torch.bfloat16, seed=4)
    new = _with_changes(base, where)
    for enc in (Encoding.GAPS8, Encoding.GAPS16):
        d = encode(base, new, allowed=[enc])
        assert d.encoding is enc
        assert d.escapes.numel() == (4 if enc is Encoding.GAPS8 else 3)
        assert torch.equal(d.indices(), where)
        target = base.clone()
        apply_delta(target, d)
        assert torch.equal(_bits(target), _bits(new))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int8, torch.bool])
def test_nan_payloads_and_signed_zeros_are_changes(dtype):
    """Elements compare as integers: a NaN with another payload and -0.0 vs +0.0 are changes, reproduced exactly."""
    base = _random(4099, dtype, seed=5).view(4099) if dtype is not torch.bool else torch.zeros(4099, dtype=torch.bool)
    new = base.clone()
    if dtype.is_floating_point:
        base[10], new[10] = 0.0, -0.0
        base[11] = new[11] = float("nan")
        _bits(new)[11] ^= 1  # still a NaN, another payload: NaN != NaN as floats either way
        assert torch.isnan(new[11])
    else:
        _bits(new)[10] ^= 1
    d = encode(base, new)
    assert d.num_changed == int((_bits(base) != _bits(new)).sum()) >= 1
    target = base.clone()
    apply_delta(target, d)
    assert torch.equal(_bits(target), _bits(new))


def test_encode_many_equals_encode_one_by_one_across_dtypes_and_shapes():
    """A mixed batch (dtypes, shapes, nothing changed, all changed) gives each tensor what encode gives it."""
    bases = [_random(n, dt, seed=i).view(shape) for i, (n, dt, shape) in enumerate(
        [(64, torch.bfloat16, (8, 8)), (1000, torch.float32, (1000,)), (3, torch.float16, (3,)), (4096, torch.bfloat16, (64, 64))]
    )]
    news = [_with_changes(b, _pattern(p, b.numel())) for b, p in zip(bases, ["sparse", "half", "all", "none"])]
    batch = encode_many(bases, news)
    for b, n, d in zip(bases, news, batch):
        one = encode(b, n)
        assert (d.encoding, d.num_changed, d.nbytes) == (one.encoding, one.num_changed, one.nbytes)
        target = b.clone()
        apply_delta(target, d)
        assert torch.equal(_bits(target), _bits(n))
    # The encoder builds its deltas without Delta's checks: every one must pass them.
    for allowed in (None, [Encoding.INDICES], [Encoding.BITMASK], [Encoding.GAPS16], [Encoding.GAPS8]):
        for d in encode_many(bases, news, allowed=allowed):
            Delta(d.encoding, d.numel, d.num_changed, d.positions, d.escapes, d.values)


@pytest.mark.parametrize("encoding", list(Encoding))
def test_a_delta_travels_as_its_dict_and_three_tensors(encoding):
    """to_dict plus positions, escapes and values (copied, as after a wire) rebuild a delta that applies
    exactly; a wrong escape count or encoding name in the dict is refused, naming the field."""
    base = _random(70_000, torch.bfloat16, seed=9)
    new = _with_changes(base, torch.tensor([0, 3, 300, 69_999]))
    d = encode(base, new, allowed=[encoding])
    meta = d.to_dict()
    got = Delta.from_dict(meta, d.positions.clone(), d.escapes.clone(), d.values.clone())
    target = base.clone()
    apply_delta(target, got)
    assert torch.equal(_bits(target), _bits(new))
    with pytest.raises(ValueError, match="'num_escapes' is 5 but"):
        Delta.from_dict({**meta, "num_escapes": 5}, d.positions, d.escapes, d.values)
    with pytest.raises(ValueError, match="'encoding' must be one of .* got 'rle'"):
        Delta.from_dict({**meta, "encoding": "rle"}, d.positions, d.escapes, d.values)


def test_apply_many_applies_a_mixed_batch_and_refuses_a_misfit():
    """apply_many writes every delta of a batch of several dtypes and encodings; a delta for another
    tensor size is refused by its position before anything is written."""
    bases = [_random(n, dt, seed=n) for n, dt in ((5000, torch.bfloat16), (300, torch.float32), (64, torch.bfloat16))]
    news = [_with_changes(b, _pattern(p, b.numel())) for b, p in zip(bases, ["two_percent", "all", "runs"])]
    deltas = encode_many(bases, news)
    targets = [b.clone() for b in bases]
    apply_many(targets, deltas)
    assert all(torch.equal(_bits(t), _bits(n)) for t, n in zip(targets, news))
    targets = [b.clone() for b in bases]
    with pytest.raises(ValueError, match="delta 1 does not fit its target: delta is 300 elements of torch.float32, target is 299"):
        apply_many([targets[0], torch.zeros(299)], deltas[:2])
    assert torch.equal(_bits(targets[0]), _bits(bases[0]))


def test_bad_input_is_refused_naming_what_is_wrong():
    """Mismatched pairs, a delta for another tensor, an index past the end and a non-contiguous target
    raise ValueError with the values involved, before anything is written."""
    a = torch.zeros(4, 4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"tensor 0: base and new must match .* \[4, 4\] .* \[16\]"):
        encode(a, torch.zeros(16, dtype=torch.bfloat16))
    d = encode(a, a + 1)
    with pytest.raises(ValueError, match="delta is 16 elements of torch.bfloat16, target is 8 elements"):
        apply_delta(torch.zeros(8, dtype=torch.bfloat16), d)
    b = a.clone()
    b[0, 0] = b[3, 3] = 1
    bad = encode(a, b, allowed=[Encoding.INDICES])
    assert bad.encoding is Encoding.INDICES
    positions = bad.positions.clone()
    positions[1] = 16
    target = a.clone()
    with pytest.raises(ValueError, match="outside its target of 16 elements .indices 0 to 16.: a corrupt"):
        apply_delta(target, Delta(Encoding.INDICES, 16, 2, positions, bad.escapes, bad.values))
    assert torch.equal(target, a)
    with pytest.raises(ValueError, match="target must be contiguous"):
        apply_delta(torch.zeros(4, 4, dtype=torch.bfloat16).t(), d)
    with pytest.raises(ValueError, match="values of a indices delta: expected 1-D with 2 elements"):
        Delta(Encoding.INDICES, 16, 2, torch.zeros(2, dtype=torch.int32), torch.empty(0), torch.zeros(3))


def test_unsplitmix64_inverts_the_checksum_finish():
    """The finish of a checksum (splitmix64 of S mixed with the size) is undone exactly."""
    rng = random.Random(6)
    for _ in range(1000):
        s = rng.getrandbits(64)
        assert _unsplitmix64(_splitmix64(s)) == s
        nbytes = rng.randrange(1, 1 << 40)
        assert _raw_sum(_splitmix64(s ^ _size_mix(nbytes)), nbytes) == s


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("numel", [1, 3, 1001, 4097])
@pytest.mark.parametrize("pattern", ["first", "last", "first_and_last", "sparse", "half", "all"])
def test_checksum_update_equals_a_recompute(dtype, numel, pattern):
    """S_old plus the changed words' weighted differences is the recomputed checksum of the result,
    for odd sizes whose last word is partial and for changes in the first and last element."""
    base = _random(numel, dtype, seed=numel)
    new = _with_changes(base, _pattern(pattern, numel))
    target = base.clone()
    updated = apply_delta(target, encode(base, new), base_checksum=tensor_checksum(base))
    assert updated == tensor_checksum(new)


def test_checksum_update_across_a_chunk_boundary():
    """Changed words on both sides of an 8 MiB checksum chunk and in the partial last word update exactly."""
    numel = 2 * CHUNK_WORDS * 2 + 3  # fp32: two chunks of words plus 12 bytes, the last word half full
    base = _random(numel, torch.float32, seed=7)
    where = torch.tensor([0, 2 * CHUNK_WORDS - 1, 2 * CHUNK_WORDS, 2 * CHUNK_WORDS + 1, numel - 1])
    new = _with_changes(base, where)
    words = changed_words(where, 4)
    assert words.tolist() == [0, CHUNK_WORDS - 1, CHUNK_WORDS, 2 * CHUNK_WORDS + 1]  # the last: half full
    old_words, new_words = gather_words(base, words), gather_words(new, words)
    nbytes = numel * 4
    assert checksum_update(tensor_checksum(base), nbytes, words, old_words, new_words) == tensor_checksum(new)


def test_the_update_trusts_the_base_and_a_recompute_does_not():
    """A target that differed from the base outside the changed words still gets the sender's checksum
    from the update; only a recompute sees it. This is why a verdict recomputes (delta_checksum's docstring)."""
    base = _random(1000, torch.bfloat16, seed=8)
    new = _with_changes(base, torch.tensor([10, 500]))
    corrupted = base.clone()
    _bits(corrupted)[900] ^= 1
    updated = apply_delta(corrupted, encode(base, new), base_checksum=tensor_checksum(base))
    assert updated == tensor_checksum(new)
    assert tensor_checksum(corrupted) != tensor_checksum(new)


_INTERPRETED_KERNEL = r"""
import torch
import triton.runtime.interpreter as interpreter
from weightsync.dataplane import delta, delta_kernel
from weightsync.dataplane.delta import Encoding

# Triton 3.6's interpreter turns a loaded scalar into a loop bound with int(array) on a one-element
# array, which numpy >= 2.4 refuses (seen on the GPU machine: Triton 3.6.0, numpy 2.5.2); later
# Triton squeezes the array first. Give the interpreter that later behaviour; compiled kernels
# never take this path.
if hasattr(interpreter, "_patch_lang_tensor"):
    _patch_tensor = interpreter._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        _patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = _patch_lang_tensor

torch.manual_seed(0)
# Blocks of 1024 elements; sizes that end mid-block; none, some, all changed; first and last element;
# gaps of 255+ and 65535+ that cross block boundaries (int16 only: the interpreter is slow).
for dtype in (torch.int16, torch.int32, torch.uint8):
    sizes = [8, 1024 * 3 + 8, 800, 16, 3000] + ([140000] if dtype == torch.int16 else [])
    fracs = [0.0, 0.02, 1.0, 0.0, 0.3, 0.0]
    bases = [torch.randint(-100, 100, (n,), dtype=torch.int64).to(dtype) for n in sizes]
    news = [b.clone() for b in bases]
    for n, f in zip(news, fracs):
        n[torch.rand(n.numel()) < f] += 1
    news[1][0] += 1
    news[1][-1] += 1
    if dtype == torch.int16:
        # Gaps of exactly 254 and 255 inside a block (2313, 2569) and across blocks (3326).
        for i in (1023, 1024, 1400, 2058, 2313, 2569, 3071, 3326, 70000, 139999):
            news[5][i] += 1
        # A block too full to stage (more than 1024 / 16 changes) with gaps of 304, 254 and 255.
        news[5][4096:4196] += 1
        for i in (4500, 4755, 5011):
            news[5][i] += 1
    got = delta_kernel._run(delta_kernel._kernels(), bases, news, interpret=True, block=1024)
    want = delta._find_changes_torch(bases, news)
    assert got.counts == want.counts, (dtype, got.counts, want.counts)
    assert (got.escapes8, got.escapes16) == (want.escapes8, want.escapes16), dtype
    assert got.indices.dtype == torch.int32
    assert torch.equal(got.indices.long(), want.indices), dtype
    assert torch.equal(got.gaps.long(), want.gaps), dtype
    assert torch.equal(got.codes8, want.gaps.clamp(max=255).to(torch.uint8)), dtype
    assert torch.equal(got.escape_gaps8.long(), want.gaps[want.gaps >= 255]), dtype
    assert torch.equal(got.values, want.values), dtype
    for k, (b, n) in enumerate(zip(bases, news)):
        assert torch.equal(got.bits(k), delta._pack_bits(b != n)), dtype
    for allowed in (None, [Encoding.INDICES], [Encoding.BITMASK], [Encoding.GAPS16], [Encoding.GAPS8]):
        deltas = delta._build(got, news, allowed)
        # The batched decode and the scatter kernel, as apply_many runs them on a GPU.
        targets = [b.clone() for b in bases]
        for enc in {d.encoding for d in deltas} - {Encoding.DENSE}:
            ks = [k for k, d in enumerate(deltas) if d.encoding is enc and d.num_changed]
            if ks:
                ds = [deltas[k] for k in ks]
                positions, bases_, running = delta._decode_batch(enc, ds)
                es = targets[0].element_size()
                refused = delta_kernel.scatter(
                    targets[0], positions, torch.cat([d.values for d in ds]), [d.num_changed for d in ds],
                    [d.numel for d in ds], [(targets[k].data_ptr() - targets[0].data_ptr()) // es for k in ks],
                    bases_, running=running, interpret=True,
                )
                assert refused == 0
        for t, n, d in zip(targets, news, deltas):
            if d.encoding is Encoding.DENSE:
                t.copy_(n)
        assert all(torch.equal(t, n) for t, n in zip(targets, news)), (dtype, allowed)
# Indices outside their tensor are refused and counted, never written.
t = torch.zeros(16, dtype=torch.int16)
refused = delta_kernel.scatter(
    t, torch.tensor([3, 16, -1]), torch.tensor([7, 8, 9], dtype=torch.int16), [3], [16], [0],
    torch.zeros(1, dtype=torch.int64), running=False, interpret=True,
)
assert refused == 2 and t.tolist() == [0, 0, 0, 7] + [0] * 12, (refused, t)
print("ok")
"""


def test_the_triton_change_finder_matches_torch_in_the_interpreter():
    """The mark, compact and scatter kernels, run by Triton's CPU interpreter on a batch of tensors of
    several sizes and dtypes: the same counts, indices, gaps, escapes, values and bitmasks as the torch
    path, and every encoding built from them decodes batch-wide and scatters back to the new tensors.
    (test_encode_on_cuda_equals_cpu runs them compiled.)"""
    pytest.importorskip("triton", reason="the change finder is written in Triton; without it CUDA uses torch ops")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", _INTERPRETED_KERNEL], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_encode_on_cuda_equals_cpu():
    """On a GPU the kernel path (and the torch fallback for an odd-sized tensor) gives the CPU's deltas;
    they apply exactly on the device, one by one with the checksum updated and batched by apply_many,
    and an index past the end of its tensor is refused, with an error."""
    from weightsync.dataplane import delta_kernel

    assert delta_kernel.kernel_available()
    bases = [_random(n, torch.bfloat16, seed=n) for n in (4096 * 64, 1000, 7, 4096 * 20)]
    news = [_with_changes(b, _pattern(p, b.numel())) for b, p in zip(bases, ["two_percent", "half", "last", "sparse"])]
    cpu = encode_many(bases, news)
    for allowed in (None, [Encoding.INDICES], [Encoding.BITMASK], [Encoding.GAPS16]):
        cpu = encode_many(bases, news, allowed=allowed)
        for split in ([0, 1, 3], [2]):
            gpu = encode_many([bases[i].cuda() for i in split], [news[i].cuda() for i in split], allowed=allowed)
            for i, d in zip(split, gpu):
                assert (d.encoding, d.num_changed, d.nbytes) == (cpu[i].encoding, cpu[i].num_changed, cpu[i].nbytes)
                assert torch.equal(d.indices().cpu(), cpu[i].indices())
                target = bases[i].cuda()
                got = apply_delta(target, d, base_checksum=tensor_checksum(bases[i]))
                assert torch.equal(_bits(target.cpu()), _bits(news[i]))
                assert got == tensor_checksum(news[i])
            targets = [bases[i].cuda() for i in split]
            apply_many(targets, gpu)
            assert all(torch.equal(_bits(t.cpu()), _bits(news[i])) for t, i in zip(targets, split))
    bad = encode(bases[0].cuda(), news[0].cuda(), allowed=[Encoding.INDICES])
    positions = bad.positions.clone()
    positions[-1] = bad.numel
    target = bases[0].cuda()
    with pytest.raises(ValueError, match=r"1 changes of indices deltas \[0\] address elements outside their targets"):
        apply_many([target], [Delta(Encoding.INDICES, bad.numel, bad.num_changed, positions, bad.escapes, bad.values)])


def test_a_gpu_batch_is_cut_into_consecutive_pieces_of_about_equal_bytes(monkeypatch):
    """encode_many's pieces (launched one after the other so that the host's work overlaps the GPU's):
    whole tensors in their order, each piece but the last at least the target, at most _MAX_PIECES."""
    monkeypatch.setattr(delta_mod, "_MIN_PIECE_BYTES", 1)
    sizes = [4096, 100, 8192, 8, 0, 4096, 2048, 2048, 16384, 8]
    tensors = [torch.empty(n, dtype=torch.bfloat16) for n in sizes]
    members = list(range(len(sizes)))
    for max_pieces in (1, 2, 3, 8, 64):
        monkeypatch.setattr(delta_mod, "_MAX_PIECES", max_pieces)
        pieces = delta_mod._pieces(members, tensors)
        assert [i for p in pieces for i in p] == members and all(pieces)
        assert len(pieces) <= max_pieces
        target = -(-sum(2 * n for n in sizes) // max_pieces)
        assert all(sum(2 * sizes[i] for i in p) >= target for p in pieces[:-1]), (max_pieces, pieces)
    monkeypatch.setattr(delta_mod, "_MIN_PIECE_BYTES", 1 << 30)
    assert delta_mod._pieces(members, tensors) == [members]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_encode_on_cuda_in_pieces_equals_cpu(monkeypatch):
    """A batch launched in several pieces (one of them with a tensor the kernels cannot take, so
    that piece alone uses torch ops) gives the CPU's deltas, in the caller's order."""
    monkeypatch.setattr(delta_mod, "_MIN_PIECE_BYTES", 1)
    monkeypatch.setattr(delta_mod, "_MAX_PIECES", 4)
    sizes = (4096 * 64, 4096 * 8, 1000, 7, 4096 * 20, 4096 * 3, 64)
    patterns = ["two_percent", "half", "last", "last", "sparse", "none", "all"]
    bases = [_random(n, torch.bfloat16, seed=n) for n in sizes]
    news = [_with_changes(b, _pattern(p, b.numel())) for b, p in zip(bases, patterns)]
    assert delta_mod._pieces(list(range(len(sizes))), bases) == [[0], [1, 2, 3, 4], [5, 6]]
    cpu = encode_many(bases, news)
    gpu = encode_many([b.cuda() for b in bases], [n.cuda() for n in news])
    for c, g in zip(cpu, gpu, strict=True):
        assert (g.encoding, g.num_changed, g.nbytes) == (c.encoding, c.num_changed, c.nbytes)
        assert torch.equal(g.indices().cpu(), c.indices())
        assert torch.equal(_bits(g.values.cpu()), _bits(c.values))
