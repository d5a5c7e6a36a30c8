"""TitanToHF: torchtitan names and rotary layout become Hugging Face ones that give identical logits."""

from __future__ import annotations

import pytest
import torch

from _titan_layout import hf_to_titan
from weightsync.core import TensorSpec
from weightsync.dataplane import TitanToHF
from weightsync.dataplane.deferred import DeferredTensor

HEADS, KV_HEADS = 4, 2


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, num_hidden_layers=2,
        intermediate_size=128, vocab_size=128, attention_bias=True, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random biases, so that a wrong bias permutation shows in the logits
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    return model


def test_titan_weights_mapped_back_give_identical_logits():
    """A Llama's weights in Meta layout, mapped by TitanToHF and loaded into a fresh model, give equal logits."""
    reference = _tiny_llama()
    hf_state = reference.state_dict()
    titan = dict(hf_to_titan(n, t.clone(), HEADS, KV_HEADS) for n, t in hf_state.items())
    q_name = "layers.0.attention.wq.weight"
    assert not torch.equal(titan[q_name], hf_state["model.layers.0.self_attn.q_proj.weight"]), "layout must differ"

    mapper = TitanToHF(num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=16)
    mapped = {hf: t for name, tensor in titan.items() for hf, t in mapper.map(name, tensor)}
    assert set(mapped) == set(hf_state)
    model = _tiny_llama()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    model.load_state_dict(mapped, strict=True)
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_map_state_dict_defers_work_and_matches_map():
    """map_state_dict returns DeferredTensors with the right shapes whose values equal map()'s."""
    reference = _tiny_llama().state_dict()
    titan = dict(hf_to_titan(n, t, HEADS, KV_HEADS) for n, t in reference.items())
    mapper = TitanToHF(num_heads=HEADS, num_kv_heads=KV_HEADS)
    deferred = mapper.map_state_dict(titan)
    assert all(isinstance(d, DeferredTensor) for d in deferred.values())
    for name, d in deferred.items():
        assert d.shape == tuple(reference[name].shape)
        assert torch.equal(d.materialize(), reference[name]), name


def test_stacked_experts_become_per_expert_tensors_and_router_becomes_gate():
    """MoE w1/w2/w3 [E, out, in] map to E per-expert gate/down/up projections; the router to mlp.gate."""
    mapper = TitanToHF(num_heads=HEADS, num_kv_heads=KV_HEADS)
    w1 = torch.randn(3, 32, 16)
    pairs = mapper.map("layers.5.moe.experts.w1", w1)
    assert [n for n, _ in pairs] == [f"model.layers.5.mlp.experts.{e}.gate_proj.weight" for e in range(3)]
    assert all(torch.equal(t, w1[e]) for e, (_, t) in enumerate(pairs))
    assert mapper.map("layers.5.moe.experts.w2", torch.randn(3, 16, 32))[1][0] == "model.layers.5.mlp.experts.1.down_proj.weight"
    assert mapper.map("layers.5.moe.router.gate.weight", torch.randn(3, 16))[0][0] == "model.layers.5.mlp.gate.weight"


def test_map_manifest_gives_the_shapes_of_the_mapped_tensors():
    """map_manifest predicts exactly the names and shapes that map() produces, experts included."""
    mapper = TitanToHF(num_heads=HEADS, num_kv_heads=KV_HEADS)
    tensors = {
        "tok_embeddings.weight": torch.zeros(128, 64),
        "layers.0.attention.wk.weight": torch.zeros(32, 64),
        "layers.0.moe.experts.w3": torch.zeros(4, 96, 64),
        "output.weight": torch.zeros(128, 64),
    }
    specs = [TensorSpec(n, tuple(t.shape), "bfloat16") for n, t in tensors.items()]
    predicted = [(s.name, s.shape) for s in mapper.map_manifest(specs)]
    actual = [(hf, tuple(t.shape)) for n, t in tensors.items() for hf, t in mapper.map(n, t)]
    assert predicted == actual and len(actual) == 7


def test_tied_output_is_dropped():
    """With tie_word_embeddings the output projection maps to nothing (HF ties lm_head to the embedding)."""
    assert TitanToHF(4, 2, tie_word_embeddings=True).map("output.weight", torch.zeros(8, 4)) == []


def test_unknown_names_and_bad_head_counts_are_refused():
    """Unknown names and q/k shapes that do not fit the head counts raise ValueError naming the problem."""
    mapper = TitanToHF(num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=16)
    with pytest.raises(ValueError, match="not a known torchtitan"):
        mapper.map("layers.0.attention.q_norm.weight", torch.zeros(16))
    with pytest.raises(ValueError, match="expected 4 heads"):
        mapper.map("layers.0.attention.wq.weight", torch.zeros(48, 64))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        TitanToHF(num_heads=4, num_kv_heads=3)


# torchtitan 0.3.0's own names (models/deepseek_v3/state_dict_adapter.py and
# models/qwen3/state_dict_adapter.py, `from_hf_map`), HF template -> torchtitan template.
_TORCHTITAN_0_3_MOE = {
    "model.layers.{}.mlp.experts.{}.gate_proj.weight": "layers.{}.moe.routed_experts.inner_experts.w1_EFD",
    "model.layers.{}.mlp.experts.{}.up_proj.weight": "layers.{}.moe.routed_experts.inner_experts.w3_EFD",
    "model.layers.{}.mlp.experts.{}.down_proj.weight": "layers.{}.moe.routed_experts.inner_experts.w2_EDF",
    "model.layers.{}.mlp.gate.weight": "layers.{}.moe.router.gate.weight",
    "model.layers.{}.mlp.shared_experts.gate_proj.weight": "layers.{}.moe.shared_experts.w1.weight",
    "model.layers.{}.mlp.shared_experts.up_proj.weight": "layers.{}.moe.shared_experts.w3.weight",
    "model.layers.{}.mlp.shared_experts.down_proj.weight": "layers.{}.moe.shared_experts.w2.weight",
    "model.layers.{}.mlp.gate.e_score_correction_bias": "layers.{}.moe.expert_bias_E",
}


def test_torchtitan_0_3_moe_names_map_as_its_own_adapters_do():
    """Grouped experts, shared experts, router and expert bias under torchtitan 0.3 names give its adapters' HF names."""
    mapper = TitanToHF(num_heads=HEADS, num_kv_heads=KV_HEADS)
    num_experts, layer = 3, 2
    for hf, titan in _TORCHTITAN_0_3_MOE.items():
        source = titan.format(layer)
        if "inner_experts" in source:
            stacked = torch.randn(num_experts, 8, 4)
            pairs = mapper.map(source, stacked)
            assert [n for n, _ in pairs] == [hf.format(layer, e) for e in range(num_experts)], source
            assert all(torch.equal(t, stacked[e]) for e, (_, t) in enumerate(pairs))
        else:
            assert [n for n, _ in mapper.map(source, torch.randn(8, 4))] == [hf.format(layer)], source
