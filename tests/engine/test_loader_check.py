"""Checkpoint tensors that vLLM's loader would skip are found at registration, not mid-round (real vLLM engine)."""

from __future__ import annotations

import shutil

import pytest
import pytest_asyncio
import torch
from safetensors.torch import load_file, save_file

from weightsync.core import InvalidArgument
from weightsync.engine import VllmEngine, VllmEngineConfig
from weightsync.engine.inventory import inventory_from_model_dir

from .helpers import NUM_TOKENS, PROMPTS

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

# Qwen2 ties lm_head to the embedding, so vLLM's loader drops lm_head.weight; and
# it skips any .bias its model has no parameter for (o_proj has none).
SKIPPED = ("lm_head.weight", "model.layers.0.self_attn.o_proj.bias")


@pytest.fixture(scope="module")
def model_dir(model_dirs, tmp_path_factory):
    """The tiny tied Qwen2 with two extra tensors in its checkpoint that vLLM's loader skips."""
    target = tmp_path_factory.mktemp("qwen2-extra")
    for f in model_dirs["qwen2"].iterdir():
        shutil.copy(f, target / f.name)
    tensors = load_file(str(target / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors["model.layers.0.self_attn.o_proj.bias"] = torch.ones(128)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(model_dir, vllm_env):
    config = VllmEngineConfig(model=str(model_dir), dtype="float32", max_model_len=256, kv_cache_memory_bytes=64 << 20)
    engine = await VllmEngine.create(config)
    try:
        yield engine
    finally:
        await engine.close()


async def test_skipped_tensors_are_reported_and_left_out_of_the_inventory(engine, model_dir):
    """The checkpoint lists them; the engine's inventory does not, and weight_info names each one."""
    checkpoint_names = {s.name for s in inventory_from_model_dir(model_dir)}
    assert set(SKIPPED) <= checkpoint_names
    assert {s.name for s in engine.inventory()} == checkpoint_names - set(SKIPPED)
    (info,) = await engine.weight_info()
    assert info["inventory_problems"] == [
        f"checkpoint tensor {name!r}: vLLM's loader skips it (no parameter receives it)" for name in SKIPPED
    ]


async def test_update_naming_a_skipped_tensor_is_refused_with_the_reason(engine, model_dir):
    """An update carrying lm_head.weight is refused before anything is written, naming why."""
    baseline = await engine.generate_greedy(PROMPTS, NUM_TOKENS)
    tensors = load_file(str(model_dir / "model.safetensors"))
    update = {n: t * 2 for n, t in tensors.items() if n.startswith("model.layers.1.") or n == "lm_head.weight"}
    with pytest.raises(InvalidArgument) as info:
        await engine.apply_tensors(update, version=3)
    assert info.value.problems == ["tensor 'lm_head.weight' is not accepted by the engine: the model's loader skips it"]
    assert await engine.generate_greedy(PROMPTS, NUM_TOKENS) == baseline
