"""A real tiny AsyncLLM engine: requests in flight while weights change, per in-flight policy."""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio
from safetensors.torch import load_file

from weightsync.engine import VllmEngine, VllmEngineConfig
from weightsync.engine.models import random_weights

from .helpers import PROMPTS, Trainer, hf_greedy, make_assignment

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

LONG_TOKENS = 200  # long enough that the update lands while the request runs


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(model_dirs, vllm_env):
    config = VllmEngineConfig(
        model=str(model_dirs["llama"]),
        mode="async",
        dtype="float32",
        max_model_len=256,
        kv_cache_memory_bytes=64 << 20,
        initial_version=0,
    )
    engine = await VllmEngine.create(config)
    try:
        yield engine
    finally:
        await engine.close()


async def _update_during_request(engine, new, policy, apply=None):
    """Starts a long greedy request, applies `new` as version 1 once its first token is out, returns its final output."""
    from vllm import SamplingParams

    if apply is None:
        apply = lambda: engine.apply_tensors(new, version=1, require_full=True, inflight_policy=policy)  # noqa: E731
    params = SamplingParams(temperature=0.0, max_tokens=LONG_TOKENS, ignore_eos=True)
    first_token = asyncio.Event()
    final = None

    async def consume():
        nonlocal final
        async for out in engine.stream({"prompt_token_ids": PROMPTS[0]}, params):
            first_token.set()
            final = out

    request = asyncio.create_task(consume())
    await asyncio.wait_for(first_token.wait(), 60)
    report = await apply()
    await asyncio.wait_for(request, 120)
    return final, report


async def _restore(engine, model_dir):
    await engine.apply_tensors(load_file(str(model_dir / "model.safetensors")), version=0, require_full=True)


async def test_async_apply_matches_transformers(engine, model_dirs):
    """With no request in flight, new weights give transformers' tokens and the outputs carry the new version label."""
    model_dir = model_dirs["llama"]
    assert await engine.generate_greedy(PROMPTS, 8) == hf_greedy(model_dir, None, PROMPTS, 8)
    new = random_weights(engine.inventory(), seed=11)
    report = await engine.apply_tensors(new, version=1, require_full=True)
    assert report.paused_s >= report.apply_s > 0
    assert await engine.generate_greedy(PROMPTS, 8) == hf_greedy(model_dir, new, PROMPTS, 8)
    assert engine.served_version == 1
    await _restore(engine, model_dir)


async def test_wait_policy_finishes_the_request_on_old_weights(engine, model_dirs):
    """'wait': the in-flight request completes entirely on the old weights before they change."""
    model_dir = model_dirs["llama"]
    new = random_weights(engine.inventory(), seed=12)
    final, _ = await _update_during_request(engine, new, "wait")
    out = final.outputs[0]
    assert list(out.token_ids) == hf_greedy(model_dir, None, PROMPTS[:1], LONG_TOKENS)[0]
    assert [(s.version, s.start, s.end) for s in out.weight_versions] == [("0", 0, LONG_TOKENS)]
    assert await engine.generate_greedy(PROMPTS, 8) == hf_greedy(model_dir, new, PROMPTS, 8)
    await _restore(engine, model_dir)


async def test_keep_policy_continues_the_request_on_new_weights(engine, model_dirs):
    """'keep': tokens before the update come from the old weights, the rest from the new ones with the KV cache recomputed."""
    model_dir = model_dirs["llama"]
    new = random_weights(engine.inventory(), seed=13)
    final, _ = await _update_during_request(engine, new, "keep")
    out = final.outputs[0]
    tokens = list(out.token_ids)
    spans = [(s.version, s.start, s.end) for s in out.weight_versions]
    assert len(spans) == 2 and spans[0][0] == "0" and spans[1] == ("1", spans[0][2], LONG_TOKENS), spans
    switch = spans[0][2]
    assert 0 < switch < LONG_TOKENS
    assert tokens[:switch] == hf_greedy(model_dir, None, PROMPTS[:1], switch)[0]
    continued = hf_greedy(model_dir, new, [list(PROMPTS[0]) + tokens[:switch]], LONG_TOKENS - switch)[0]
    assert tokens[switch:] == continued
    await _restore(engine, model_dir)


async def test_abort_policy_ends_the_request(engine, model_dirs):
    """'abort': the in-flight request ends early as aborted, and the next one runs on the new weights."""
    model_dir = model_dirs["llama"]
    new = random_weights(engine.inventory(), seed=14)
    final, _ = await _update_during_request(engine, new, "abort")
    out = final.outputs[0]
    assert out.finish_reason == "abort" and len(out.token_ids) < LONG_TOKENS
    assert await engine.generate_greedy(PROMPTS, 8) == hf_greedy(model_dir, new, PROMPTS, 8)
    await _restore(engine, model_dir)


async def test_data_plane_round_staged_while_serving(engine, model_dirs):
    """A gloo round is staged while a request runs, then applied after it finishes ('wait'): old tokens for it, new after."""
    model_dir = model_dirs["llama"]
    new = random_weights(engine.inventory(), seed=15)
    trainer = Trainer()
    try:
        assignment = make_assignment(engine.inventory(), trainer.port, update_id="async-1", version=1)
        sender = trainer.send(assignment, new)
        final, report = await _update_during_request(
            engine, new, "wait", lambda: engine.apply_assignment(assignment, [1], inflight_policy="wait")
        )
        assert report.checksums == sender.outcome().checksums
    finally:
        trainer.close()
    assert list(final.outputs[0].token_ids) == hf_greedy(model_dir, None, PROMPTS[:1], LONG_TOKENS)[0]
    assert await engine.generate_greedy(PROMPTS, 8) == hf_greedy(model_dir, new, PROMPTS, 8)
    assert engine.served_version == 1 and not engine.dirty
    await _restore(engine, model_dir)
