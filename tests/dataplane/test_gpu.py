"""GPU transports: CUDA IPC between two processes on one GPU, NCCL between two GPUs, checksums on CUDA."""

from __future__ import annotations

import pytest
import torch

from _dp_workers import RankOptions, launch, make_assignment
from weightsync.dataplane import tensor_checksum
from weightsync.dataplane.checksum import CHUNK_WORDS
from weightsync.dataplane.synthetic import MODEL_SHAPES

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_checksum_on_cuda_equals_checksum_on_cpu():
    """The same bytes give the same checksum on the GPU as on the CPU, across chunks and with a tail."""
    t = torch.randint(-(2**62), 2**62, (2 * CHUNK_WORDS + 77,), dtype=torch.int64)
    bf = torch.randn(1001).to(torch.bfloat16)
    assert tensor_checksum(t.cuda()) == tensor_checksum(t)
    assert tensor_checksum(bf.cuda()) == tensor_checksum(bf)


def _check(reports, receivers) -> None:
    for r, rep in reports.items():
        assert rep.rounds and all(rd["ok"] for rd in rep.rounds), [rd.get("traceback") for rd in rep.rounds]
    for r in receivers:
        rd = reports[r].rounds[-1]
        assert rd["mismatched"] == []
        assert rd["checksums"] == reports[0].rounds[-1]["checksums"]


def test_cuda_ipc_moves_a_model_between_two_processes_on_one_gpu():
    """A sender and a receiver on the same GPU move a model bit-exactly over CUDA IPC, twice on one group."""
    specs = MODEL_SHAPES["qwen2.5-0.5b"].manifest()

    def build(port):
        rounds = [
            make_assignment(specs, port=port, world_size=2, update_id=f"u{i}", transport="cuda_ipc",
                            bucket_size_bytes=64 << 20, version=i)
            for i in (1, 2)
        ]
        return {0: rounds, 1: rounds}

    options = {r: RankOptions(device="cuda:0") for r in range(2)}
    reports = launch(2, build, options, timeout_s=240)
    _check(reports, [1])
    assert reports[1].num_constructions == 1


def _ipc_rounds(specs, count: int, bucket_size_bytes: int):
    def build(port):
        rounds = [
            make_assignment(specs, port=port, world_size=3, update_id=f"u{i}", transport="cuda_ipc",
                            bucket_size_bytes=bucket_size_bytes, version=i)
            for i in range(1, count + 1)
        ]
        return {0: rounds, 1: rounds, 2: rounds}

    return build


def test_cuda_ipc_direct_mode_copies_trainer_tensors_into_engine_tensors_round_after_round():
    """Plain CUDA trainer tensors go unpacked: two receivers copy them straight out of the trainer's
    memory, one into its engine's own tensors (destination), one through its ring. The trainer
    overwrites the same tensors in place before each of 3 rounds, so a stale cached mapping or a
    copy taken before the trainer's writes finished would show as a mismatch."""
    specs = MODEL_SHAPES["qwen2.5-0.5b"].manifest()
    options = {
        0: RankOptions(device="cuda:0", seed_step=1, persistent=True),
        1: RankOptions(device="cuda:0", seed_step=1, destination=True),
        2: RankOptions(device="cuda:0", seed_step=1),
    }
    reports = launch(3, _ipc_rounds(specs, 3, 64 << 20), options, timeout_s=240)
    _check(reports, [1, 2])
    sums = [rd["checksums"] for rd in reports[0].rounds]
    assert sums[0] != sums[1] != sums[2], "each round carries new bytes"
    assert reports[1].num_constructions == 1


def test_cuda_ipc_falls_back_to_packing_when_the_trainer_memory_cannot_be_exported():
    """If CUDA IPC refuses to export the trainer's tensors (planted here; expandable segments do
    it for real), the sender packs them into its ring instead, for this and later rounds, and the
    receivers still get every byte."""
    specs = MODEL_SHAPES["tiny"].manifest()
    options = {
        0: RankOptions(device="cuda:0", seed_step=1, persistent=True, refuse_ipc_export=True),
        1: RankOptions(device="cuda:0", seed_step=1, destination=True),
        2: RankOptions(device="cuda:0", seed_step=1),
    }
    reports = launch(3, _ipc_rounds(specs, 2, 16 << 10), options, timeout_s=240)
    _check(reports, [1, 2])
    for r in (1, 2):
        assert all(rd["mismatched"] == [] for rd in reports[r].rounds)


def test_cuda_ipc_ring_mode_packs_deferred_tensors():
    """Tensors that must be computed (DeferredTensor) are packed into the sender's ring; the receivers
    copy each bucket out, into engine tensors or their own ring, bit-exactly."""
    specs = MODEL_SHAPES["tiny"].manifest()
    options = {
        0: RankOptions(device="cuda:0", seed_step=1, sender_deferred=True),
        1: RankOptions(device="cuda:0", seed_step=1, destination=True),
        2: RankOptions(device="cuda:0", seed_step=1),
    }
    reports = launch(3, _ipc_rounds(specs, 2, 16 << 10), options, timeout_s=240)
    _check(reports, [1, 2])


def test_cuda_ipc_sender_raises_when_its_receiver_dies():
    """A receiver SIGKILLed mid-round makes the CUDA IPC sender raise TransferError once timeout_s passes."""
    specs = MODEL_SHAPES["tiny"].manifest()
    timeout_s = 3.0

    def build(port):
        a = make_assignment(specs, port=port, world_size=2, update_id="u1", transport="cuda_ipc",
                            bucket_size_bytes=16 << 10, timeout_s=timeout_s)
        return {0: [a], 1: [a]}

    options = {0: RankOptions(device="cuda:0"), 1: RankOptions(device="cuda:0", kill_at_bucket=2)}
    reports = launch(2, build, options, timeout_s=120)
    sender = reports[0].rounds[0]
    assert sender["error_type"] == "TransferError", sender.get("traceback")
    assert sender["elapsed_s"] < timeout_s + 4.0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL cannot put two ranks on one GPU")
def test_nccl_moves_a_model_between_two_gpus():
    """A sender on GPU 0 and a receiver on GPU 1 move a model bit-exactly over NCCL."""
    specs = MODEL_SHAPES["qwen2.5-0.5b"].manifest()

    def build(port):
        a = make_assignment(specs, port=port, world_size=2, update_id="u1", transport="nccl",
                            bucket_size_bytes=64 << 20)
        return {0: [a], 1: [a]}

    options = {0: RankOptions(device="cuda:0"), 1: RankOptions(device="cuda:1")}
    reports = launch(2, build, options, timeout_s=240)
    _check(reports, [1])


def test_fused_copy_and_checksum_equals_the_cpu_definition():
    """One launch copies many spans exactly and checksums them as checksum_views does on the CPU,
    across chunk boundaries; spans the kernel cannot take (odd length, odd address) fall back."""
    from weightsync.dataplane.fused import copy_and_checksum, fused_available

    assert fused_available(torch.device("cuda", 0))
    g = torch.Generator().manual_seed(3)
    sizes = [16, 4096 * 8, 3 * CHUNK_WORDS * 8 + 816, 1002, 64 * 1024 + 8]
    cpu = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g) for n in sizes]
    src = [t.cuda() for t in cpu]
    src[3] = torch.cat([torch.zeros(1, dtype=torch.uint8), cpu[3]]).cuda()[1:]  # odd address
    dst = [torch.zeros(n, dtype=torch.uint8, device="cuda") if i % 2 == 0 else None for i, n in enumerate(sizes)]
    got = copy_and_checksum(src, dst).result()
    assert got == [tensor_checksum(t) for t in cpu]
    for i, d in enumerate(dst):
        if d is not None:
            assert torch.equal(d.cpu(), cpu[i])
    one_flip = src[2].clone()
    one_flip[CHUNK_WORDS * 8 + 5] ^= 4
    assert copy_and_checksum([one_flip]).result()[0] != got[2]
