"""A real tiny vLLM engine (library mode, in this process) taking weight updates, per architecture."""

from __future__ import annotations

import dataclasses
import time

import pytest
import pytest_asyncio
import torch
from safetensors.torch import load_file

from weightsync.core import DeadlineExceeded, TransferError
from weightsync.dataplane import DeferredTensor, tensor_checksum
from weightsync.engine import VllmEngine, VllmEngineConfig
from weightsync.engine.inventory import apply_unit
from weightsync.engine.models import random_weights

from .helpers import NUM_TOKENS, PROMPTS, Trainer, hf_greedy, make_assignment

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]


class Served:
    """One running engine and what the tests compare against."""

    def __init__(self, arch, model_dir, engine, baseline, trainer):
        self.arch = arch
        self.model_dir = model_dir
        self.engine = engine
        self.baseline = baseline
        self.trainer = trainer
        self.checkpoint = load_file(str(model_dir / "model.safetensors"))
        self.rounds = 0

    def next_update_id(self) -> str:
        self.rounds += 1
        return f"{self.arch}-{self.rounds}"

    async def restore(self) -> None:
        await self.engine.apply_tensors(self.checkpoint, version=0, require_full=True)


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["llama", "qwen2"])
async def served(request, model_dirs, vllm_env):
    arch = request.param
    config = VllmEngineConfig(
        model=str(model_dirs[arch]),
        dtype="float32",
        max_model_len=256,
        kv_cache_memory_bytes=64 << 20,
        initial_version=0,
    )
    engine = await VllmEngine.create(config)
    trainer = Trainer()
    try:
        baseline = await engine.generate_greedy(PROMPTS, NUM_TOKENS)
        yield Served(arch, model_dirs[arch], engine, baseline, trainer)
    finally:
        trainer.close()
        await engine.close()


async def test_engine_serves_the_checkpoint_like_transformers(served):
    """Before any update, greedy tokens equal transformers' on the same checkpoint."""
    assert served.baseline == hf_greedy(served.model_dir, None, PROMPTS, NUM_TOKENS)
    assert served.engine.served_version == 0 and not served.engine.dirty


async def test_inventory_is_what_vllm_accepts(served):
    """The config-derived inventory equals the checkpoint vLLM loaded and covers every vLLM parameter."""
    inventory = served.engine.inventory()
    assert {s.name: (s.shape, s.dtype) for s in inventory} == {
        n: (tuple(t.shape), "float32") for n, t in served.checkpoint.items()
    }
    (info,) = await served.engine.weight_info()
    assert [tuple(x) for x in info["inventory"]] == [(s.name, list(s.shape), s.dtype) for s in inventory]
    assert info["inventory_problems"] == []
    assert info["apply_path"] == "reload_weights"


async def test_new_weights_then_original_weights(served):
    """New random weights give transformers' tokens for them; the checkpoint's weights give back the original tokens."""
    new = random_weights(served.engine.inventory(), seed=101)
    report = await served.engine.apply_tensors(new, version=1, require_full=True)
    assert report.checksums == {n: tensor_checksum(t) for n, t in new.items()}
    assert report.num_tensors == len(new) and report.paused_s >= report.apply_s > 0
    tokens = await served.engine.generate_greedy(PROMPTS, NUM_TOKENS)
    assert tokens == hf_greedy(served.model_dir, new, PROMPTS, NUM_TOKENS)
    assert tokens != served.baseline
    assert served.engine.served_version == 1

    await served.restore()
    assert await served.engine.generate_greedy(PROMPTS, NUM_TOKENS) == served.baseline
    assert served.engine.served_version == 0


@pytest.mark.parametrize("staging", ["staged", "stream"])
async def test_data_plane_round(served, staging):
    """A gloo round from a trainer thread lands in the engine: tokens, checksums, version and progress."""
    new = random_weights(served.engine.inventory(), seed=202)
    assignment = make_assignment(
        served.engine.inventory(), served.trainer.port, update_id=served.next_update_id(), version=7
    )
    assert len(assignment.plan.buckets) > 2
    progress = []
    polls = []
    rpc = served.engine._rpc

    async def counted(method, *args, **kwargs):
        polls.append(method)
        return await rpc(method, *args, **kwargs)

    served.engine._rpc = counted
    sender = served.trainer.send(assignment, new)
    try:
        report = await served.engine.apply_assignment(
            assignment, [1], lambda b, n: progress.append((b, n)), staging=staging
        )
    finally:
        del served.engine._rpc
    sent = sender.outcome()
    assert report.checksums == sent.checksums and len(report.checksums) == len(new)
    assert report.bytes_received == assignment.plan.total_bytes
    if staging == "staged":
        assert progress[-1] == (len(assignment.plan.buckets), assignment.plan.total_bytes)
        # Progress comes from the worker's signals, bucket by bucket; the workers are asked for
        # their status when staging starts and when it ends, not polled (engine/stage_signal.py).
        assert [b for b, _ in progress] == sorted(set(b for b, _ in progress)) and len(progress) > 2, progress
        assert polls.count("weightsync_stage_status") <= 2, polls
    assert served.engine.served_version == 7 and not served.engine.dirty
    tokens = await served.engine.generate_greedy(PROMPTS, NUM_TOKENS)
    assert tokens == hf_greedy(served.model_dir, new, PROMPTS, NUM_TOKENS)
    await served.restore()


async def test_plan_splitting_a_module_is_refused_on_every_rank(served):
    """A plan that carries q and v but not k of one layer is refused before any byte moves."""
    specs = [s for s in served.engine.inventory() if s.name != "model.layers.1.self_attn.k_proj.weight"]
    new = random_weights(specs, seed=303)
    assignment = make_assignment(specs, served.trainer.port, update_id=served.next_update_id(), version=8)
    sender = served.trainer.send(assignment, new)
    with pytest.raises(TransferError, match="qkv_proj"):
        await served.engine.apply_assignment(assignment, [1])
    with pytest.raises(TransferError):
        sender.outcome()
    assert await served.engine.generate_greedy(PROMPTS, NUM_TOKENS) == served.baseline
    assert served.engine.served_version == 0 and not served.engine.dirty


def _failing_source(specs, new, fail_at: str):
    def boom():
        raise RuntimeError("trainer lost its weights")

    source = dict(new)
    spec = next(s for s in specs if s.name == fail_at)
    source[fail_at] = DeferredTensor(spec.shape, torch.float32, boom)
    return source


async def test_round_failing_midway_staged_leaves_weights_untouched(served):
    """Staged: a round that dies after some buckets changes nothing; the engine stays clean."""
    specs = served.engine.inventory()
    new = random_weights(specs, seed=404)
    assignment = make_assignment(specs, served.trainer.port, update_id=served.next_update_id(), version=9)
    sender = served.trainer.send(assignment, _failing_source(specs, new, "model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(TransferError):
        await served.engine.apply_assignment(assignment, [1], staging="staged")
    with pytest.raises(Exception, match="trainer lost its weights"):
        sender.outcome()
    assert await served.engine.generate_greedy(PROMPTS, NUM_TOKENS) == served.baseline
    assert served.engine.served_version == 0 and not served.engine.dirty


async def test_round_failing_midway_streamed_recovers_whole_modules(served):
    """Streamed: a round that dies midway leaves a servable engine, marked dirty, whose every module is wholly old or new."""
    specs = served.engine.inventory()
    new = random_weights(specs, seed=505)
    assignment = make_assignment(specs, served.trainer.port, update_id=served.next_update_id(), version=10)
    fail_at = "model.layers.1.mlp.down_proj.weight"
    sender = served.trainer.send(assignment, _failing_source(specs, new, fail_at))
    with pytest.raises(TransferError):
        await served.engine.apply_assignment(assignment, [1], staging="stream")
    with pytest.raises(Exception):
        sender.outcome()
    assert served.engine.dirty and served.engine.served_version == 0
    tokens = await served.engine.generate_greedy(PROMPTS, NUM_TOKENS)

    # The engine got some prefix of the buckets before the failing one; whichever it
    # was, each module must be all-new (complete in that prefix) or all-old.
    checkpoint = served.checkpoint
    candidates = []
    buckets = assignment.plan.buckets
    failing_bucket = next(b.index for b in buckets if any(e.name == fail_at for e in b.entries))
    for k in range(failing_bucket + 1):
        arrived = {e.name for b in buckets[:k] for e in b.entries}
        units: dict[str, list[str]] = {}
        for s in specs:
            units.setdefault(apply_unit(s.name), []).append(s.name)
        new_names = {n for members in units.values() if set(members) <= arrived for n in members}
        candidates.append({n: (new[n] if n in new_names else checkpoint[n]) for n in checkpoint})
    references = [hf_greedy(served.model_dir, c, PROMPTS, NUM_TOKENS) for c in candidates]
    assert tokens in references

    await served.restore()
    assert await served.engine.generate_greedy(PROMPTS, NUM_TOKENS) == served.baseline
    assert not served.engine.dirty


async def test_apply_failing_inside_a_module_keeps_that_module_old(served):
    """A loader failure after part of a module arrived leaves that module old, earlier whole modules new, and the engine servable."""
    from weightsync.engine.apply import ApplyFailed, apply_weights

    new = random_weights(served.engine.inventory(), seed=606)
    sent = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"]

    def fail_inside_qkv(worker):
        def weights():
            for name in sent:
                yield name, new[name]
            raise RuntimeError("source died")

        try:
            apply_weights(worker, weights(), path="reload_weights")
        except ApplyFailed as e:
            return e.model_touched
        return None

    # Library mode runs the worker in this process, so a callable can drive it directly.
    assert served.engine.engine.collective_rpc(fail_inside_qkv) == [True]
    served.engine.engine.reset_prefix_cache()
    expected = dict(served.checkpoint)
    expected["model.embed_tokens.weight"] = new["model.embed_tokens.weight"]
    tokens = await served.engine.generate_greedy(PROMPTS, NUM_TOKENS)
    assert tokens == hf_greedy(served.model_dir, expected, PROMPTS, NUM_TOKENS)
    await served.restore()
    assert await served.engine.generate_greedy(PROMPTS, NUM_TOKENS) == served.baseline


async def test_deadline_abandons_a_stalled_round_and_the_next_round_works(served):
    """A round whose trainer never sends ends at its deadline; the engine keeps serving and the next round lands."""
    specs = served.engine.inventory()
    stalled = make_assignment(specs, served.trainer.port, update_id=served.next_update_id(), version=11)
    stalled = dataclasses.replace(stalled, deadline_s=1.0)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="deadline of 1 s"):
        await served.engine.apply_assignment(stalled, [1])
    assert time.monotonic() - started < 3.0
    assert await served.engine.generate_greedy(PROMPTS, NUM_TOKENS) == served.baseline
    assert served.engine.served_version == 0 and not served.engine.dirty

    new = random_weights(specs, seed=707)
    assignment = make_assignment(specs, served.trainer.port, update_id=served.next_update_id(), version=12)
    sender = served.trainer.send(assignment, new)
    report = await served.engine.apply_assignment(assignment, [1])
    assert report.checksums == sender.outcome().checksums
    assert await served.engine.generate_greedy(PROMPTS, NUM_TOKENS) == hf_greedy(served.model_dir, new, PROMPTS, NUM_TOKENS)
    await served.restore()
