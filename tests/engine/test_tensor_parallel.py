"""Tensor parallelism: a TP=2 vLLM CPU engine (dense and MoE) where every TP worker is a data-plane receiver.

vLLM CPU runs two workers only with VLLM_CPU_OMP_THREADS_BIND="0|1" (FACTS.md):
one OMP thread bound to each core. Each worker receives the full Hugging Face
tensors and its loader narrows them to its shard, so each worker's checksums
cover the full tensors and must equal the trainer's.
"""

from __future__ import annotations

import os
import signal
import tempfile

import pytest
import pytest_asyncio
import torch
from safetensors.torch import load_file

from weightsync.core import TransferError
from weightsync.dataplane import DeferredTensor
from weightsync.engine import VllmEngine, VllmEngineConfig

from .helpers import NUM_TOKENS, PROMPTS, Trainer, hf_greedy, make_assignment, perturbed

# Two worker processes start (spawn, import torch and vLLM) before the engine
# serves: 21-32 s on an idle 2-core machine, minutes when it is shared.
pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(900)]

TP = 2


class Served:
    def __init__(self, arch, model_dir, engine, baseline, trainer):
        self.arch = arch
        self.model_dir = model_dir
        self.engine = engine
        self.baseline = baseline
        self.trainer = trainer
        self.checkpoint = load_file(str(model_dir / "model.safetensors"))


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["qwen2", "qwen3_moe"])
async def served(request, model_dirs, vllm_env):
    arch = request.param
    config = VllmEngineConfig(
        model=str(model_dirs[arch]),
        dtype="float32",
        max_model_len=256,
        kv_cache_memory_bytes=64 << 20,
        tensor_parallel_size=TP,
        initial_version=0,
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
        # vLLM's TP workers rendezvous through a file:// store in the temp dir.
        mp.setattr(tempfile, "tempdir", str(vllm_env))
        engine = await VllmEngine.create(config)
    trainer = Trainer()
    try:
        baseline = await engine.generate_greedy(PROMPTS, NUM_TOKENS)
        yield Served(arch, model_dirs[arch], engine, baseline, trainer)
    finally:
        trainer.close()
        await engine.close()


async def test_every_worker_is_a_receiver_and_tokens_equal_transformers(served):
    """A round to both TP workers (ranks 1 and 2): each worker's checksums equal the trainer's; tokens equal transformers'."""
    assert served.engine.num_workers == TP
    assert served.baseline == hf_greedy(served.model_dir, None, PROMPTS, NUM_TOKENS)
    infos = await served.engine.weight_info()
    assert [i["rank"] for i in infos] == [0, 1] and all(i["inventory_problems"] == [] for i in infos)
    assert len({i["pid"] for i in infos} | {os.getpid()}) == TP + 1

    new = perturbed(served.checkpoint, seed=21)
    assignment = make_assignment(
        served.engine.inventory(), served.trainer.port, update_id=f"tp-{served.arch}-1", version=1, num_workers=TP
    )
    sender = served.trainer.send(assignment, new)
    report = await served.engine.apply_assignment(assignment, [1, 2])
    sent = sender.outcome()
    assert len(report.worker_checksums) == TP
    assert all(c == sent.checksums for c in report.worker_checksums) and len(sent.checksums) == len(new)
    tokens = await served.engine.generate_greedy(PROMPTS, NUM_TOKENS)
    assert tokens == hf_greedy(served.model_dir, new, PROMPTS, NUM_TOKENS) and tokens != served.baseline
    assert served.engine.served_version == 1 and not served.engine.dirty

    # In-process tensors travel as bytes to worker processes.
    await served.engine.apply_tensors(served.checkpoint, version=0, require_full=True)
    assert await served.engine.generate_greedy(PROMPTS, NUM_TOKENS) == served.baseline


async def test_worker_killed_mid_round_fails_the_round_and_flags_the_engine_dirty(served):
    """SIGKILL to TP worker 1 while its round is on the wire: the round fails for this engine and it is dirty.

    Runs last for its engine: the engine cannot serve without the worker.
    """
    infos = await served.engine.weight_info()
    victim = infos[1]["pid"]
    specs = served.engine.inventory()
    new = perturbed(served.checkpoint, seed=22)
    late = specs[-1]

    def kill_then_send():
        # Called by the trainer when it packs the last tensor: earlier buckets are out.
        os.kill(victim, signal.SIGKILL)
        return new[late.name]

    source = dict(new)
    source[late.name] = DeferredTensor(late.shape, torch.float32, kill_then_send)
    assignment = make_assignment(specs, served.trainer.port, update_id=f"tp-{served.arch}-kill", version=2, num_workers=TP)
    assert len(assignment.plan.buckets) > 2
    sender = served.trainer.send(assignment, source)
    with pytest.raises(TransferError, match="tp-.*-kill"):
        await served.engine.apply_assignment(assignment, [1, 2])
    with pytest.raises(Exception):
        sender.outcome()
    assert served.engine.dirty
    assert served.engine.served_version != 2
