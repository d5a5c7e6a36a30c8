"""The whole stack in one test process: coordinator, daemon agent on a real vLLM engine, WeightSync trainer."""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio
from safetensors.torch import load_file

from tests.dataplane._titan_layout import hf_to_titan
from weightsync.control import CoordinatorConfig, CoordinatorServer, DaemonAgent, DaemonIdentity
from weightsync.core import InvalidArgument
from weightsync.dataplane import TitanToHF
from weightsync.engine import VllmEngine, VllmEngineConfig
from weightsync.engine.models import random_weights, tiny_config
from weightsync.runtime.trainer import WeightSync
from weightsync.runtime.vllm_commands import VllmHandler

from .helpers import NUM_TOKENS, PROMPTS, hf_greedy

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(model_dirs, vllm_env):
    server = CoordinatorServer(CoordinatorConfig(heartbeat_interval_s=0.2, heartbeat_timeout_s=5.0))
    await server.start()
    model_dir = model_dirs["llama"]
    engine = await VllmEngine.create(VllmEngineConfig(model=str(model_dir), dtype="float32", max_model_len=256,
                                                      kv_cache_memory_bytes=64 << 20, initial_version=0))
    ident = DaemonIdentity(daemon_id="llama-engine", engine="vllm", model=str(model_dir), host="127.0.0.1",
                           inventory=engine.inventory(), num_ranks=engine.num_workers)
    agent = DaemonAgent(server.address, ident, VllmHandler(engine), served_version=0)
    agent.start()
    await agent.wait_connected(30)
    try:
        yield server, engine, model_dir
    finally:
        await agent.close(5)
        await engine.close()
        await server.stop(1)


async def test_torchtitan_trainer_updates_vllm_llama(stack):
    """A trainer holding torchtitan/Meta-layout weights updates a vLLM Llama engine; tokens equal transformers with the HF weights."""
    server, engine, model_dir = stack
    cfg = tiny_config("llama")
    hf_new = random_weights(engine.inventory(), seed=31)
    titan_state = dict(hf_to_titan(n, t, cfg.num_attention_heads, cfg.num_key_value_heads) for n, t in hf_new.items())
    assert "layers.0.attention.wq.weight" in titan_state
    mapping = TitanToHF(num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads,
                        tie_word_embeddings=cfg.tie_word_embeddings)

    def push():
        with WeightSync(server.address, titan=mapping, collective_timeout_s=30, deadline_s=60) as sync:
            return sync.push(titan_state, version=1)

    report = await asyncio.to_thread(push)
    assert report.committed and [v.status for v in report.results] == ["OK"]
    assert engine.served_version == 1
    tokens = await engine.generate_greedy(PROMPTS, NUM_TOKENS)
    assert tokens == hf_greedy(model_dir, hf_new, PROMPTS, NUM_TOKENS)

    # Pushing the original checkpoint back restores the original tokens exactly.
    original = load_file(str(model_dir / "model.safetensors"))

    def push_original():
        with WeightSync(server.address, collective_timeout_s=30, deadline_s=60) as sync:
            return sync.push(original, version=2)

    assert (await asyncio.to_thread(push_original)).committed
    assert await engine.generate_greedy(PROMPTS, NUM_TOKENS) == hf_greedy(model_dir, None, PROMPTS, NUM_TOKENS)


async def test_bad_manifest_refused_engine_keeps_serving_old_weights(stack):
    """A manifest with one wrong shape is refused before any byte moves; the engine's tokens and version stay."""
    server, engine, model_dir = stack
    before = await engine.generate_greedy(PROMPTS, NUM_TOKENS)
    version = engine.served_version
    bad = random_weights(engine.inventory(), seed=5)
    name = "model.layers.0.mlp.down_proj.weight"
    bad[name] = bad[name][:, :-1].contiguous()

    def push():
        with WeightSync(server.address, collective_timeout_s=30, deadline_s=60) as sync:
            sync.push(bad, version=100)

    with pytest.raises(InvalidArgument, match=f"'{name}' shape"):
        await asyncio.to_thread(push)
    assert await engine.generate_greedy(PROMPTS, NUM_TOKENS) == before
    assert engine.served_version == version and not engine.dirty
