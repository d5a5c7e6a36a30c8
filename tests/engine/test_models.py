"""Tiny model generation, random weights, and the collective_rpc payload codecs."""

from __future__ import annotations

import torch
import pytest

from weightsync.core import Assignment, BucketPlan, Participant, Rendezvous
from weightsync.engine.inventory import inventory_from_config
from weightsync.engine.models import make_tiny_model, random_weights, tiny_config
from weightsync.engine.payload import assignment_from_dict, assignment_to_dict, decode_tensors, encode_tensors


def test_make_tiny_model_writes_once_and_reuses(tmp_path):
    """A second call with the same arguments reuses the directory without rewriting the weights."""
    first = make_tiny_model(tmp_path / "m", "qwen2", seed=3)
    weights = first / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = make_tiny_model(tmp_path / "m", "qwen2", seed=3)
    assert again == first and weights.stat().st_mtime_ns == stamp


def test_make_tiny_model_refuses_a_foreign_directory(tmp_path):
    """A non-empty directory holding something else (or another seed) is never overwritten."""
    make_tiny_model(tmp_path / "m", "llama", seed=1)
    with pytest.raises(ValueError, match="does not hold the tiny model"):
        make_tiny_model(tmp_path / "m", "llama", seed=2)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError):
        make_tiny_model(tmp_path / "other", "llama")


def test_tiny_model_loads_offline_with_its_tokenizer(model_dirs):
    """transformers loads the model and the locally trained tokenizer, and text round-trips."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dirs["qwen2"]), local_files_only=True)
    ids = tokenizer("the weights are fresh").input_ids
    assert tokenizer.decode(ids) == "the weights are fresh"
    assert max(ids) < 1024
    model = AutoModelForCausalLM.from_pretrained(str(model_dirs["qwen2"]), local_files_only=True)
    assert model.config.head_dim == 32 and model.config.tie_word_embeddings


def test_random_weights_are_deterministic_and_seeded():
    """Same seed, same bytes; another seed, other bytes; norms drawn around 1."""
    specs = inventory_from_config(tiny_config("llama"))
    a, b, c = random_weights(specs, 5), random_weights(specs, 5), random_weights(specs, 6)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    assert abs(float(a["model.norm.weight"].mean()) - 1.0) < 0.05


def test_assignment_dict_round_trip_and_tamper_check():
    """An Assignment survives the dict form; a changed plan entry fails the digest check."""
    specs = inventory_from_config(tiny_config("qwen2"))
    plan = BucketPlan.build(list(specs), 64 << 10)
    a = Assignment("u1", 3, Rendezvous("gloo", "127.0.0.1", 1234, 3, "g"), (Participant("d", (1, 2)),), plan, 30.0)
    d = assignment_to_dict(a)
    assert assignment_from_dict(d) == a
    d["plan"]["buckets"][0]["entries"][0][1] = [1, 1]
    with pytest.raises(ValueError, match="digest"):
        assignment_from_dict(d)


def test_tensor_payload_round_trip():
    """safetensors bytes carry names, dtypes and values exactly."""
    tensors = {"a": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), "b": torch.ones(4)}
    back = decode_tensors(encode_tensors(tensors))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    with pytest.raises(ValueError, match="not a safetensors blob"):
        decode_tensors(b"nonsense")
