"""MemoryEngine and load_named_tensors: safetensors files and Hugging Face directories, checked applies."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from weightsync.core import TensorSpec
from weightsync.dataplane import MemoryEngine, load_named_tensors


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
        "model.norm.weight": torch.randn(8, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(4, 8, generator=g).to(torch.float16),
    }


def test_loads_a_single_safetensors_file(tmp_path):
    """A .safetensors file loads with every name, dtype and byte intact."""
    save_file(_tensors(), tmp_path / "w.safetensors")
    loaded = load_named_tensors(tmp_path / "w.safetensors")
    assert loaded.keys() == _tensors().keys()
    assert all(torch.equal(loaded[n], t) and loaded[n].dtype == t.dtype for n, t in _tensors().items())


def test_loads_a_sharded_hugging_face_directory(tmp_path):
    """A directory with model.safetensors.index.json loads every shard listed in its weight_map."""
    tensors = _tensors()
    names = list(tensors)
    save_file({n: tensors[n] for n in names[:2]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({n: tensors[n] for n in names[2:]}, tmp_path / "model-00002-of-00002.safetensors")
    weight_map = {n: f"model-0000{1 if i < 2 else 2}-of-00002.safetensors" for i, n in enumerate(names)}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    engine = MemoryEngine.from_path(tmp_path)
    assert {s.name for s in engine.inventory()} == set(names)
    assert torch.equal(engine.state_dict()["model.layers.0.mlp.up_proj.weight"], tensors["model.layers.0.mlp.up_proj.weight"])


def test_loads_a_transformers_save_pretrained_directory(tmp_path):
    """A model saved by transformers' save_pretrained loads by its Hugging Face names."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1,
                         intermediate_size=64, vocab_size=64, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(tmp_path)
    engine = MemoryEngine.from_path(tmp_path)
    held = engine.state_dict()
    assert "model.layers.0.self_attn.q_proj.bias" in held
    assert torch.equal(held["model.embed_tokens.weight"], model.state_dict()["model.embed_tokens.weight"])


def test_directory_without_safetensors_is_refused(tmp_path):
    """An empty directory (or one with only pickled checkpoints) is a ValueError that says what is expected."""
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="no \\*.safetensors files"):
        load_named_tensors(tmp_path)


def test_inventory_lists_wire_names_shapes_and_dtypes():
    """inventory() reports each tensor as a TensorSpec with the wire dtype name."""
    engine = MemoryEngine(_tensors())
    assert TensorSpec("model.embed_tokens.weight", (16, 8), "bfloat16") in engine.inventory()
    assert TensorSpec("model.norm.weight", (8,), "float32") in engine.inventory()


def test_apply_copies_and_refuses_a_bad_batch_without_writing_any_of_it():
    """apply() writes matching tensors; one wrong shape or dtype in a batch leaves every tensor untouched."""
    engine = MemoryEngine.from_specs([TensorSpec("a", (2, 2), "float32"), TensorSpec("b", (3,), "bfloat16")])
    engine.apply([("a", torch.ones(2, 2))])
    assert torch.equal(engine.state_dict()["a"], torch.ones(2, 2))
    with pytest.raises(ValueError) as e:
        engine.apply([("a", torch.full((2, 2), 7.0)), ("b", torch.ones(3)), ("c", torch.ones(1))])
    assert "b: got [3] float32, engine holds [3] bfloat16" in str(e.value) and "c: not held" in str(e.value)
    assert torch.equal(engine.state_dict()["a"], torch.ones(2, 2)), "a refused batch must write nothing"


def test_save_then_load_round_trips(tmp_path):
    """save() writes a safetensors file that loads back to the same tensors."""
    engine = MemoryEngine(_tensors())
    path = engine.save(tmp_path)
    loaded = load_named_tensors(path)
    assert all(torch.equal(loaded[n], t) for n, t in _tensors().items())
