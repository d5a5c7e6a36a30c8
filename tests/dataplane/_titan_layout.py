"""Hugging Face -> torchtitan names and layouts, written independently of weightsync's mapping to test it."""

from __future__ import annotations

import re

import torch

_PARTS = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}


def meta_interleave(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of convert_llama_weights_to_hf's permute: HF half-split rotary -> Meta interleaved pairs."""
    dim1 = w.shape[0]
    return w.reshape(heads, 2, dim1 // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def hf_to_titan(name: str, t: torch.Tensor, heads: int, kv_heads: int) -> tuple[str, torch.Tensor]:
    fixed = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "output.weight"}
    if name in fixed:
        return fixed[name], t
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
    assert m, name
    layer, part, kind = m.groups()
    if part == "self_attn.q_proj":
        t = meta_interleave(t, heads)
    elif part == "self_attn.k_proj":
        t = meta_interleave(t, kv_heads)
    return f"layers.{layer}.{_PARTS[part]}.{kind}", t
